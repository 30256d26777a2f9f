#!/bin/bash
# What plumb costs one machine, next to what a user would write instead. One fixture: 20 services on
# one upstream (a generated fleet repository, COMMITS commits over the services' directories of 8
# config files each) served over smart HTTP by lighttpd + git-http-backend. Measures
#   - the daemon's memory with 1 and with 20 services after a few idle ticks (RSS, private, per
#     mapping from /proc/PID/smaps: the binary, each shared library, heap, arenas, stacks);
#   - per idle tick with 20 services: requests and bytes at the server, the server's CPU, processes
#     spawned (execve, strace), the daemon's CPU;
#   - disk: plumb's state dir (one bare store per upstream + per-service sparse checkouts);
#   - the baseline, a cron loop over 20 full clones running, per service,
#     `git -C clone pull --ff-only && systemctl reload svc` (no systemd here: `true`, a shell builtin,
#     stands for systemctl), with the same figures, its peak memory and the clones' disk use;
# prints the tables and appends them to $RESULTS (bench/RESULTS.md). CARGO_TARGET_DIR is honoured;
# PLUMB=/path/to/plumb measures that binary without building.
source "$(dirname "$0")/lib.sh"
TICKS=${TICKS:-10}            # idle ticks of the daemon measured (interval 2s)
LOOP_TICKS=${LOOP_TICKS:-3}   # runs of the cron loop measured for CPU and memory (plus one under strace)
COMMITS=${COMMITS:-400}
N=20
bench_init
bench_build
make_fleet $N "$COMMITS"

# The baseline's clones, made before anything is measured.
serve_start clone
mkdir -p "$B/clones"
for i in $(seq 0 $((N - 1))); do git clone -q "$URL" "$B/clones/svc$i"; done
serve_stop

plumb_idle one 1 2
plumb_idle fleet $N "$TICKS"

# The cron loop: one tick is one run of loop.sh (cron would start it: its shell counts as spawned).
{
  echo 'set -e'
  for i in $(seq 0 $((N - 1))); do echo "git -C '$B/clones/svc$i' pull -q --ff-only && true # systemctl reload svc$i"; done
} > "$B/loop.sh"
serve_start loop
l0=$(requests); srv0=$(server_cpu_ms)
# CPU (user + system of every process of the loop) and the largest peak RSS of one of them, without
# strace; then one more run under strace to count the processes.
read -r loop_cpu loop_peak loop_wall < <(python3 - "$LOOP_TICKS" "$B/loop.sh" <<'PY'
import resource, subprocess, sys, time
n, script = int(sys.argv[1]), sys.argv[2]
t = time.monotonic()
for _ in range(n):
    subprocess.run(["bash", script], check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(round((r.ru_utime + r.ru_stime) * 1000 / n, 1), r.ru_maxrss, round((time.monotonic() - t) * 1000 / n))
PY
)
l1=$(requests); srv1=$(server_cpu_ms)
strace -f --seccomp-bpf -qq -e trace=execve -o "$B/loop-strace.log" bash "$B/loop.sh"
loop_kinds=$(request_kinds "$l0" "$l1")
serve_stop
read -r loop_req loop_in loop_out < <(served "$l0" "$l1")
loop_spawned=$(grep -c 'execve(.*= 0$' "$B/loop-strace.log")
loop_processes=$(grep 'execve(.*= 0$' "$B/loop-strace.log" | awk '{print $1}' | sort -u | wc -l)
loop_programs=$(grep 'execve(.*= 0$' "$B/loop-strace.log" | sed 's/.*execve("\([^"]*\)".*/\1/' | xargs -n1 basename \
  | sort | uniq -c | sort -rn | awk '{printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2}')

kib() { du -sk "$@" | awk '{s += $1} END {print s}'; }
disk_state=$(kib "$B/fleet/state"); disk_stores=$(kib "$B/fleet/state/stores"); disk_checkouts=$(kib "$B/fleet/state/checkouts")
disk_clones=$(kib "$B/clones"); disk_clone=$(kib "$B/clones/svc0"); disk_clone_git=$(kib "$B/clones/svc0/.git")
ft=$(fig fleet ticks)
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }

compare=$(cat <<TXT
| per idle tick, $N services on one upstream (smart HTTP) | plumb daemon | cron loop: \`git pull --ff-only && true\` per clone |
|---|---|---|
| requests at the server | $(per "$(fig fleet requests)" "$ft") (over $ft ticks: $(fig fleet kinds)) | $(per "$loop_req" "$LOOP_TICKS") (over $LOOP_TICKS runs: $loop_kinds) |
| bytes received / sent by the server (headers included) | $(per "$(fig fleet bytes_in)" "$ft" 0) / $(per "$(fig fleet bytes_out)" "$ft" 0) | $(per "$loop_in" "$LOOP_TICKS" 0) / $(per "$loop_out" "$LOOP_TICKS" 0) |
| server CPU (git-http-backend and children) | $(per "$(fig fleet server_cpu_ms)" "$ft") ms | $(per $((srv1 - srv0)) "$LOOP_TICKS") ms |
| processes spawned (execve) | $(fig fleet spawned) over $ft ticks | $loop_spawned in $loop_processes processes ($loop_programs; bash is the loop itself) |
| CPU time (user + system) | $(per "$(fig fleet cpu_ms)" "$ft") ms | $loop_cpu ms ($loop_wall ms wall) |
| memory | $(fig fleet VmRSS) KiB RSS, $(fig fleet RssAnon) KiB private, at idle, resident between ticks | $loop_peak KiB peak RSS of its largest process; none between ticks |
| disk | $(mib "$disk_state") (store $(mib "$disk_stores"), checkouts $(mib "$disk_checkouts")) | $(mib "$disk_clones") ($N clones of $(mib "$disk_clone"), .git $(mib "$disk_clone_git")) |
TXT
)

memory=$(
  echo "| daemon memory after idle ticks | 1 service | $N services |"
  echo "|---|---|---|"
  for k in VmRSS RssAnon RssFile Pss Uss VmHWM; do
    label=$(case $k in VmRSS) echo "RSS";; RssAnon) echo "private (RssAnon)";; RssFile) echo "file-backed (RssFile)";;
      Pss) echo "PSS (shared pages divided among their users)";;
      Uss) echo "USS (pages no other process maps: freed if plumb exits)";; VmHWM) echo "peak RSS (VmHWM, includes the first clone and checkout)";; esac)
    echo "| $label | $(fig one "$k") KiB | $(fig fleet "$k") KiB |"
  done
  echo "| threads | $(fig one Threads) | $(fig fleet Threads) |"
  # Per mapping: RSS (of which private), 1 service then N services.
  awk -F'\t' 'NR == FNR {one[$1] = $2 " (" $3 ")"; next}
              $1 != "total" {printf "| %s | %s KiB | %s KiB |\n", $1, ($1 in one ? one[$1] : "0 (0)"), $2 " (" $3 ")"}' \
    "$B/one/smaps.tsv" "$B/fleet/smaps.tsv"
)
libs=$(awk -F'\t' '$1 ~ /\.so/ {printf "%s%s", (n++ ? " " : ""), $1}' "$B/fleet/smaps.tsv")

title="machine, $(date -u +%Y-%m-%d), $(uname -m), $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), plumb $($PLUMB --version 2>/dev/null | awk '{print $2}')"
notes="Fixture: $N services x 8 files (1-5 KB), $COMMITS commits; lighttpd $(lighttpd -v | awk '{print $1}' | cut -d/ -f2), git $(command git --version | awk '{print $3}'). The daemon ran once under strace (execve only, via seccomp) to count processes, then untraced for CPU and memory, $ft idle ticks at interval 2s; the loop $LOOP_TICKS runs without strace (CPU, memory) and one with. \`true\` stands for \`systemctl reload\` (no systemd here): a real reload adds one process per service and systemd's work. Per-mapping rows: RSS (private) KiB. PSS and USS depend on what else runs: a library no other process maps counts whole in USS. Shared libraries: $libs. Other builds ran on this machine meanwhile: CPU figures are noisy."
output=$(printf '%s\n\n%s\n\n%s\n' "$compare" "$memory" "$notes")
echo "$output"
printf '\n## %s\n\n%s\n' "$title" "$output" >> "$RESULTS"
