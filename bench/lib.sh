# Shared by the benches (source it): a temporary directory, the release build, a realistic fleet
# repository, lighttpd + git-http-backend serving it, plumb configs, polling helpers. Sourcing it
# cds to the repository and sets $RESULTS (default bench/RESULTS.md), $PORT and git (with a committer).
#
#   bench_init [PARENT]         $B: a temporary directory under PARENT (default ${TMPDIR:-/tmp}).
#                               On exit (INT and TERM too): the commands of $CLEANUP run in
#                               order (eval; $BENCH_STATUS holds the exit status), $BG_PIDS and the
#                               server are killed, $B is removed (KEEP=1 keeps it, and says where)
#   bench_build [CARGO_ARGS...] builds the release binaries (and CARGO_ARGS, e.g. --example gen-docs),
#                               niced, in ${CARGO_TARGET_DIR:-target}; $RELEASE: that release directory;
#                               $PLUMB: a copy of plumb in $B (PLUMB=/path/to/plumb: that binary, no
#                               build, and $RELEASE its directory)
#   make_fleet SERVICES COMMITS $B/srv/fleet.git: SERVICES directories svcN of 8 config files each
#                               (1-5 KB), COMMITS commits (the first adds everything, each other changes
#                               1-2 files of one service); deterministic: same hashes on every run
#   serve_start PHASE           lighttpd on $PORT serving every repository under $B/srv as
#                               $SERVE_URL/NAME ($URL: $SERVE_URL/fleet.git); logs under $B/PHASE/:
#                               requests.log (one line a request, live), access.log; $SERVE_PID
#   serve_stop                  stops it (this flushes its access log)
#   requests                    the number of requests so far in this phase
#   server_cpu_ms               CPU time of the server's finished children (git-http-backend)
#   served FROM TO              after serve_stop: requests FROM+1..TO of that phase, "count in out"
#                               (bytes received and sent, headers included)
#   write_config FILE STATE N   a plumb config with services svc0..svcN-1 on $URL, state dir STATE
#   free_port                   a free TCP port of 127.0.0.1
#   wait_for SECONDS CMD...     polls CMD (its output discarded) until it succeeds or SECONDS pass
#   cpu_ticks [-c] PID...       user + system CPU of the PIDs, summed, in clock ticks (-c: with their
#                               reaped children's)
#   plumb_idle NAME N TICKS     the daemon with N services over TICKS idle ticks: requests, bytes,
#                               execve, CPU, memory (bench/smaps.py); read with `fig NAME KEY`
#   per A B [DIGITS]            A / B, printed with DIGITS decimals (1)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS=${RESULTS:-bench/RESULTS.md}

# The malloc tunables of units/plumb.service, for the daemons the benches start.
PLUMB_TUNABLES=${PLUMB_TUNABLES-glibc.malloc.mmap_threshold=32768}

git() { command git -c user.name=bench -c user.email=bench@example.invalid "$@"; }

bench_init() {
  mkdir -p "${1:-${TMPDIR:-/tmp}}"
  B=$(mktemp -d "${1:-${TMPDIR:-/tmp}}/plumb-bench.XXXXXX"); chmod 755 "$B"
  BG_PIDS=() CLEANUP=()
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

bench_cleanup() {
  BENCH_STATUS=$?
  local c p
  for c in "${CLEANUP[@]}"; do eval "$c" || true; done
  for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -z "${SERVE_PID:-}" ] || kill "$SERVE_PID" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "$(basename "$0"): kept $B" >&2; else rm -rf "$B"; fi
  exit "$BENCH_STATUS"
}

bench_build() { # measures a copy, so a build made meanwhile in the same target dir changes nothing
  if [ -z "${PLUMB:-}" ]; then
    nice -n 10 cargo build --release --quiet --bins "$@"
    PLUMB=${CARGO_TARGET_DIR:-target}/release/plumb
  fi
  RELEASE=$(cd "$(dirname "$PLUMB")" && pwd)
  cp "$PLUMB" "$B/plumb"; PLUMB=$B/plumb
}

wait_for() { # wait_for SECONDS CMD...: poll until CMD succeeds
  local limit=$1 end=$((SECONDS + $1)); shift
  until "$@" >/dev/null; do [ $SECONDS -lt $end ] || { echo "timed out after $limit s: $*" >&2; return 1; }; sleep 0.05; done
}

make_fleet() { # make_fleet SERVICES COMMITS [IGNORE]: IGNORE, a .gitignore of *.log in every service
  local services=$1 commits=$2
  mkdir -p "$B/srv"; git init -q --bare -b main "$B/srv/fleet.git"
  python3 - "$services" "$commits" "${3:-}" <<'PY' | git -C "$B/srv/fleet.git" fast-import --quiet
import random, sys
services, commits = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(20261130)
keys = ("listen server_name root proxy_pass timeout workers cache_size log_level max_conn retries "
        "interval backend upstream user group port host path tls_cert tls_key allow deny").split()
def line():
    return f"{rng.choice(keys)}_{rng.randrange(40)} = {rng.choice(keys)}-{rng.randrange(10**6)}"
files = {f"svc{s}/conf{f}.conf": [line() for _ in range(rng.randrange(35, 170))]
         for s in range(services) for f in range(8)}
if sys.argv[3]:
    files.update({f"svc{s}/.gitignore": ["*.log"] for s in range(services)})
out = sys.stdout.buffer
def data(b):
    out.write(b"data %d\n" % len(b) + b + b"\n")
def commit(n, paths, message):
    out.write(b"commit refs/heads/main\n")
    out.write(b"committer bench <bench@example.invalid> %d +0000\n" % (1700000000 + 3600 * n))
    data(message.encode())
    for p in paths:
        out.write(f"M 100644 inline {p}\n".encode())
        data(("\n".join(files[p]) + "\n").encode())
commit(0, sorted(files), "fleet")
for n in range(1, commits):
    s = rng.randrange(services)
    paths = [f"svc{s}/conf{f}.conf" for f in rng.sample(range(8), rng.randint(1, 2))]
    for p in paths:
        lines = files[p]
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(lines))
            op = rng.random()
            if op < 0.6: lines[i] = line()
            elif op < 0.8: lines.insert(i, line())
            elif len(lines) > 10: del lines[i]
    commit(n, paths, f"svc{s}: change {n}")
PY
  git -C "$B/srv/fleet.git" repack -adq
}

# lighttpd's access log is buffered until it stops, so requests are counted live by a CGI wrapper that
# writes a line before handing over to git-http-backend; sizes come from the access log afterwards.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
SERVE_URL=http://127.0.0.1:$PORT/git
URL=$SERVE_URL/fleet.git
serve_start() {
  PHASE=$B/$1; mkdir -p "$PHASE"; chown www-data "$PHASE"
  cat > "$PHASE/git-cgi" <<CGI
#!/bin/sh
echo "\$REQUEST_METHOD \$REQUEST_URI" >> "$PHASE/requests.log"
exec "$(command git --exec-path)/git-http-backend"
CGI
  chmod 755 "$PHASE/git-cgi"
  cat > "$PHASE/lighttpd.conf" <<CONF
server.modules        = ("mod_alias", "mod_cgi", "mod_setenv", "mod_accesslog")
server.document-root  = "$B/srv"
server.bind           = "127.0.0.1"
server.port           = $PORT
server.username       = "www-data"
server.groupname      = "www-data"
server.pid-file       = "$PHASE/lighttpd.pid"
server.errorlog       = "$PHASE/lighttpd.err"
accesslog.filename    = "$PHASE/access.log"
accesslog.format      = "%r %s %I %O"
# enough for the hundreds of daemons of bench/fleet.sh
server.max-fds        = 8192
server.max-connections = 4000
alias.url += ( "/git" => "$PHASE/git-cgi" )
\$HTTP["url"] =~ "^/git" {
  cgi.assign = ( "" => "" )
  setenv.set-environment = ( "GIT_PROJECT_ROOT" => "$B/srv", "GIT_HTTP_EXPORT_ALL" => "",
                             "GIT_CONFIG_PARAMETERS" => "'safe.directory'='*'" )
}
CONF
  touch "$PHASE/requests.log" "$PHASE/lighttpd.err" "$PHASE/access.log"
  chown www-data "$PHASE/requests.log" "$PHASE/lighttpd.err" "$PHASE/access.log"
  lighttpd -f "$PHASE/lighttpd.conf"
  wait_for 10 test -s "$PHASE/lighttpd.pid"
  SERVE_PID=$(cat "$PHASE/lighttpd.pid")
  wait_for 10 listening
}
listening() { ss -ltn | grep -q "127.0.0.1:$PORT "; }
not_listening() { ! listening && ! kill -0 "$SERVE_PID" 2>/dev/null; }
serve_stop() {
  kill "$SERVE_PID"; wait_for 10 not_listening; SERVE_PID=
}
requests() { wc -l < "$PHASE/requests.log"; }
# CPU time (ms) of the server's finished children (git-http-backend and its CGI wrapper).
server_cpu_ms() { awk -v hz="$(getconf CLK_TCK)" '{print int(($16 + $17) * 1000 / hz)}' "/proc/$SERVE_PID/stat"; }
served() { # after serve_stop: requests FROM+1..TO of that phase, "count bytes_in bytes_out"
  sed -n "$(($1 + 1)),$2p" "$PHASE/access.log" | awk '{n++; i += $(NF-1); o += $NF} END {print n + 0, i + 0, o + 0}'
}
request_kinds() { # FROM TO: "N METHOD PATH; ..." of the requests FROM+1..TO
  sed -n "$(($1 + 1)),$2p" "$PHASE/requests.log" | sed 's/[?].*//' | sort | uniq -c \
    | awk '{printf "%s%s %s %s", (NR > 1 ? "; " : ""), $1, $2, $3}'
}

write_config() { # FILE STATE_DIR N: metrics on (as by default) on a free port
  {
    printf '[plumb]\nstate_dir = "%s"\nsocket = "%s/plumb.sock"\ninterval = "2s"\njitter = "1ms"\n' "$2" "$2"
    printf 'metrics_address = "127.0.0.1:%d"\n\n' "$(free_port)"
    for i in $(seq 0 $(($3 - 1))); do
      printf '[[services]]\nmachine = "bench"\nservice = "svc%d"\nupstream = "%s"\n' "$i" "$URL"
      printf 'dirs = [{ local = "/srv/svc%d", link = "svc%d" }]\n\n' "$i" "$i"
    done
  } > "$1"
}

# For a daemon logging at PLUMB_LOG=plumb=debug to LOG: idle ticks are its "fetch done" lines.
fetches() { grep -c 'fetch done' "$1" || true; }
fetches_at_least() { [ "$(fetches "$1")" -ge "$2" ]; }
deployed() { [ "$(ls "$1"/state/*.rev 2>/dev/null | wc -l)" -eq "$2" ]; } # STATE_DIR N
cpu_ticks() { # [-c] PID...: user + system (-c: and reaped children's), summed, in clock ticks
  local fields='$14 + $15' files=() p
  if [ "$1" = -c ]; then fields='$14 + $15 + $16 + $17'; shift; fi
  for p in "$@"; do files+=("/proc/$p/stat"); done
  awk "{t += $fields} END {print t}" "${files[@]}"
}

# KiB of a /proc/PID/status field (VmRSS, RssAnon, RssFile, VmHWM, Threads).
status_field() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }

# plumb_idle NAME N TICKS: serves the fleet (phase NAME), runs the daemon for services svc0..svcN-1
# under strace (execve only) through the deploy and TICKS idle ticks to count what it spawns, then
# again untraced on the same state to measure TICKS idle ticks after the first (ticks are counted
# from the daemon's log, requests from the server's, so neither is inferred from the other) and its
# memory at the end. Figures go to $B/NAME/figures, read with `fig NAME KEY`;
# the per-mapping memory to $B/NAME/smaps.tsv (bench/smaps.py).
plumb_idle() {
  local name=$1 n=$2 ticks=$3 d=$B/$1 strace pid f c0 c1 l0 l1 cpu0 cpu1 srv0 srv1 nreq bin bout
  serve_start "$name"
  write_config "$d/plumb.toml" "$d/state" "$n"
  # First run, under strace (execve only): the deploy and TICKS idle ticks, counting what it spawns.
  PLUMB_LOG=plumb=debug MALLOC_ARENA_MAX=1 GLIBC_TUNABLES=$PLUMB_TUNABLES strace -f --seccomp-bpf -qq -e trace=execve -o "$d/strace.log" \
    "$PLUMB" -c "$d/plumb.toml" --hosts bench 2>"$d/traced.log" &
  strace=$!; BG_PIDS+=("$strace")
  wait_for "${DEPLOY_WAIT:-60}" deployed "$d/state" "$n"
  pid=$(pgrep -P "$strace" -x plumb)
  f=$(fetches "$d/traced.log"); wait_for $((ticks * 5 + ${DEPLOY_WAIT:-30})) fetches_at_least "$d/traced.log" $((f + ticks + 1))
  kill "$pid"; wait "$strace" || true
  # With BESIDE=NAME, a file NAME beside every checkout's files, as a service's own log would be.
  if [ -n "${BESIDE:-}" ]; then
    for i in $(seq 0 $((n - 1))); do echo "started" > "$d/state/checkouts/svc$i/svc$i/$BESIDE"; done
  fi
  # execve calls that succeeded, less the daemon's own.
  echo "spawned $(($(grep -c 'execve(.*= 0$' "$d/strace.log") - 1))" > "$d/figures"
  # Then untraced on the same state (ptrace would inflate CPU time): TICKS idle ticks measured from
  # the one after the first.
  # MALLOC_ARENA_MAX=1 and GLIBC_TUNABLES as plumb.service sets them.
  PLUMB_LOG=plumb=debug MALLOC_ARENA_MAX=1 GLIBC_TUNABLES=$PLUMB_TUNABLES "$PLUMB" -c "$d/plumb.toml" --hosts bench 2>"$d/plumb.log" &
  pid=$!; BG_PIDS+=("$pid")
  wait_for "${DEPLOY_WAIT:-30}" fetches_at_least "$d/plumb.log" 2
  c0=$(fetches "$d/plumb.log"); l0=$(requests); cpu0=$(cpu_ticks "$pid"); srv0=$(server_cpu_ms)
  wait_for $((ticks * 5 + ${DEPLOY_WAIT:-0})) fetches_at_least "$d/plumb.log" $((c0 + ticks))
  c1=$(fetches "$d/plumb.log"); l1=$(requests); cpu1=$(cpu_ticks "$pid"); srv1=$(server_cpu_ms)
  {
    echo "ticks $((c1 - c0))"
    echo "cpu_ms $(((cpu1 - cpu0) * 1000 / $(getconf CLK_TCK)))"
    echo "server_cpu_ms $((srv1 - srv0))"
    for k in VmRSS RssAnon RssFile VmHWM Threads; do echo "$k $(status_field "$pid" "$k")"; done
    awk '$1 == "Pss:" {print "Pss", $2} $1 ~ /^Private_/ {u += $2} END {print "Uss", u}' "/proc/$pid/smaps_rollup"
    echo "kinds $(request_kinds "$l0" "$l1")"
  } >> "$d/figures"
  python3 bench/smaps.py "$pid" > "$d/smaps.tsv"
  # Then ten scrapes of /metrics, as Prometheus would make: what the daemon keeps after them.
  local port; port=$(awk -F'[:"]' '/^metrics_address/ {print $(NF - 1)}' "$d/plumb.toml")
  for _ in $(seq 10); do curl -sf -o /dev/null "http://127.0.0.1:$port/metrics"; done
  echo "scraped_RssAnon $(status_field "$pid" RssAnon)" >> "$d/figures"
  kill "$pid"; wait "$pid" || true
  serve_stop
  read -r nreq bin bout < <(served "$l0" "$l1")
  echo "requests $nreq" >> "$d/figures"; echo "bytes_in $bin" >> "$d/figures"; echo "bytes_out $bout" >> "$d/figures"
}
fig() { awk -v k="$2" '$1 == k {sub(/^[^ ]+ /, ""); print; exit}' "$B/$1/figures"; }
per() { awk -v a="$1" -v b="$2" -v p="${3:-1}" 'BEGIN {printf "%.*f", p, (b ? a / b : 0)}'; } # A / B
