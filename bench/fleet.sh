#!/bin/bash
# A simulated fleet on loopback: what N plumb daemons cost the git server and themselves, and how
# fast one commit reaches all of them.
#
# One upstream repository served by lighttpd + git-http-backend (smart HTTP, mod_cgi: bench/lib.sh's
# serve_start); N daemons (FLEET_SIZES, default "10 50 200"), each with its own config, state
# directory, machine name (m0..mN-1, given by --hosts), metrics port and control socket, run with
# --no-apply (checkouts and .rev files only: no mounts, no systemd). Each manages 2 services (svc0,
# svc1) of the one upstream, polled every 5 s less a random jitter of up to 2 s. For each N:
#
#   1. start the N daemons and wait until every one reports the current hash of both services
#      (plumb_service_hash on its /metrics);
#   2. steady state, WINDOW seconds (default 30): requests at the server per second (counted by the
#      CGI wrapper, one line per request; the peak is the busiest 1 s bin), the server's CPU (lighttpd's
#      utime+stime+cutime+cstime: lighttpd reaps its CGI children, so git-http-backend and git
#      upload-pack land in cutime/cstime), requests per poll (server requests / the daemons'
#      plumb_git_fetch_total), the daemons' CPU summed, and their mean RSS;
#   3. one commit changing svc0's files is pushed; every ~0.25 s every daemon's /metrics is scraped
#      (in parallel, keep-alive) and the number on the new hash recorded: rollout time runs from the
#      push returning until all N report it; p50 is the median of the machines' first-seen times.
#
# Writes a CSV per N (time_s,machines_on_new_hash) and the per-second request counts to $OUT (a
# temp dir, kept and printed; the daemons' state and logs go to a temp dir of bench/lib.sh's
# bench_init, removed at the end), the plot to fleet-rollout.png next to $RESULTS (which links to
# it), and appends the table to $RESULTS. Figures are printed, never asserted; on a shared machine expect noise (the load average
# at the start is recorded). Takes about 5 minutes (most of it the build).
#
# Run as root from anywhere:  bash bench/fleet.sh
#   FLEET_SIZES="10 50 200"   WINDOW=30 (seconds of steady state)   METRICS_BASE=21000
#   CARGO_TARGET_DIR=target (where the build goes)   PLUMB=/path/to/plumb (that binary, no build)
#   RESULTS=bench/RESULTS.md   OUT=DIR (the time series)   KEEP=1 (keep the daemons' state and logs)
source "$(dirname "$0")/lib.sh"
FLEET_SIZES=${FLEET_SIZES:-10 50 200}
WINDOW=${WINDOW:-30}
METRICS_BASE=${METRICS_BASE:-21000} # daemon i serves metrics on 127.0.0.1:METRICS_BASE+i
SERVICES=2
[ "$(id -u)" -eq 0 ] || { echo "fleet.sh: must run as root" >&2; exit 1; }

# Tools: lighttpd and git serve, gnuplot draws, curl/ss/ps look. Install only what is missing.
need=()
for pkg in lighttpd git gnuplot-nox curl iproute2 procps python3; do
  [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "fleet.sh: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" </dev/null
fi

bench_init   # $B: the daemons' sockets live under it, so TMPDIR should be short
bench_build  # the daemons run a copy: a build in the same target dir meanwhile changes nothing
OUT=${OUT:-$(mktemp -d /tmp/plumb-fleet-results.XXXXXX)}
PIDS=()   # the running daemons
stop_daemons() {
  [ "${#PIDS[@]}" -eq 0 ] && return 0
  kill "${PIDS[@]}" 2>/dev/null || true
  local end=$((SECONDS + 30)) p
  for p in "${PIDS[@]}"; do
    while kill -0 "$p" 2>/dev/null; do
      if [ $SECONDS -ge $end ]; then echo "fleet.sh: daemon $p ignores SIGTERM; killing" >&2; kill -9 "$p" 2>/dev/null || true; fi
      sleep 0.05
    done
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
}
CLEANUP+=(stop_daemons)
die() { echo "fleet.sh: $*" >&2; exit 1; }

# Upstream: svc0..svc3 in one repository (the daemons run svc0 and svc1), served by bench/lib.sh's
# lighttpd (phase "fleet": requests counted live in $B/fleet/requests.log).
mkdir -p "$B/srv"; git init -q --bare -b main "$B/srv/fleet.git"
git clone -q "$B/srv/fleet.git" "$B/work" 2>/dev/null
for s in 0 1 2 3; do mkdir -p "$B/work/svc$s"; echo "conf $s" > "$B/work/svc$s/conf"; done
git -C "$B/work" add -A; git -C "$B/work" commit -qm fleet; git -C "$B/work" push -q origin main
serve_start fleet

# The scraper: every daemon's /metrics in parallel over keep-alive connections.
#   wait PORTS SECONDS SVC=HASH...   until every daemon reports each service at its hash
#   sum PORTS METRIC                 the sum of METRIC's samples over every daemon
#   rollout PORTS SVC HASH CSV SECONDS PERIOD CMD...
#                                    run CMD (the push); from its return (T0) sample every PERIOD s
#                                    how many report SVC at HASH until all do; prints
#                                    "T0 p50 p90 all" (T0 unix time, the rest seconds since T0)
#   logs T0 SVC HASH LOG...          the same figures "p50 all" from the daemons' own "deployed"
#                                    log lines (microsecond timestamps, no scrape period)
cat > "$B/scrape.py" <<'PY'
import concurrent.futures, datetime, http.client, re, statistics, subprocess, sys, time

mode = sys.argv[1]
ports = [int(p) for p in open(sys.argv[2]).read().split()] if mode != "logs" else []
pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(64, len(ports))))
conns = {}

def get(port):
    """The daemon's /metrics text, or None (down, slow, refused)."""
    try:
        c = conns.get(port) or http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        conns[port] = c
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read().decode()
        return body if r.status == 200 else None
    except (OSError, http.client.HTTPException):
        conns.pop(port, None)
        return None

HASH = re.compile(r'^plumb_service_hash\{([^}]*)\} 1$', re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')

def hashes(body):
    out = {}
    for m in HASH.finditer(body or ""):
        labels = dict(LABEL.findall(m.group(1)))
        out[labels.get("service")] = labels.get("hash")
    return out

def scrape_all():
    return dict(zip(ports, pool.map(get, ports)))

if mode == "wait":
    deadline = time.time() + float(sys.argv[3])
    want = dict(a.split("=", 1) for a in sys.argv[4:])
    while True:
        bodies = scrape_all()
        missing = [p for p, b in bodies.items() if any(hashes(b).get(s) != h for s, h in want.items())]
        if not missing:
            break
        if time.time() > deadline:
            sys.exit(f"{len(ports) - len(missing)} of {len(ports)} daemons report {want}; "
                     f"not (metrics ports): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        time.sleep(0.2)
elif mode == "sum":
    metric = re.compile(r'^' + re.escape(sys.argv[3]) + r'(\{[^}]*\})? (\S+)$', re.M)
    bodies = scrape_all()
    down = [p for p, b in bodies.items() if b is None]
    if down:
        sys.exit(f"no metrics from ports {down}")
    print(int(sum(float(m.group(2)) for b in bodies.values() for m in metric.finditer(b))))
elif mode == "rollout":
    svc, want, csv = sys.argv[3], sys.argv[4], sys.argv[5]
    limit, period, cmd = float(sys.argv[6]), float(sys.argv[7]), sys.argv[8:]
    scrape_all()  # open the keep-alive connections before the clock starts
    subprocess.run(cmd, check=True)
    t0 = time.time()
    seen = {}  # port -> seconds since t0 when first seen on the new hash
    with open(csv, "w") as f:
        f.write("time_s,machines_on_new_hash\n")
        k = 0
        while len(seen) < len(ports):
            todo = [p for p in ports if p not in seen]
            for p, b in zip(todo, pool.map(get, todo)):
                if hashes(b).get(svc) == want:
                    seen[p] = time.time() - t0
            now = time.time() - t0
            f.write(f"{now:.3f},{len(seen)}\n")
            f.flush()
            if now > limit:
                sys.exit(f"after {limit:.0f} s only {len(seen)} of {len(ports)} daemons report {svc} at {want}")
            k += 1
            time.sleep(max(0.0, t0 + k * period - time.time()))
    times = sorted(seen.values())
    print(f"{t0:.6f} {statistics.median(times):.2f} {times[int(0.9 * (len(times) - 1))]:.2f} {now:.2f}")
elif mode == "logs":
    # 2026-12-01T04:14:20.999569Z  INFO plumb::daemon: deployed service=svc0 revision=1eaaae62fcd9
    t0, svc, want, logs = float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
    line = re.compile(r'^(\S+)Z .* deployed service=' + re.escape(svc) + r' revision=(\w+)')
    times = []
    for log in logs:
        for l in open(log, errors="replace"):
            m = line.match(l)
            if m and want.startswith(m.group(2)):
                t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
                times.append(t.timestamp() - t0)
                break
    if len(times) < len(logs):
        sys.exit(f"{len(logs) - len(times)} of {len(logs)} daemon logs have no 'deployed' line for {svc} at {want}")
    print(f"{statistics.median(times):.2f} {max(times):.2f}")
PY
scrape() { python3 "$B/scrape.py" "$@"; }

HZ=$(getconf CLK_TCK)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
rows=()
plots=()
for N in $FLEET_SIZES; do
  echo "== $N daemons (load average $(cut -d' ' -f1-3 /proc/loadavg))"
  last=$((METRICS_BASE + N - 1))
  if ss -Hltn "( sport >= :$METRICS_BASE and sport <= :$last )" | grep -q .; then
    die "a port in $METRICS_BASE..$last is taken; set METRICS_BASE"
  fi
  h0=$(git -C "$B/work" log -1 --format=%H -- svc0)
  h1=$(git -C "$B/work" log -1 --format=%H -- svc1)
  : > "$B/ports"
  for i in $(seq 0 $((N - 1))); do
    d=$B/n$N/d$i port=$((METRICS_BASE + i))
    mkdir -p "$d"
    # gitopper's format: the upstream in [global], one [[services]] per service, plumb's own [plumb].
    {
      printf '[global]\nupstream = "%s"\n\n' "$URL"
      printf '[plumb]\nstate_dir = "%s"\nsocket = "%s/plumb.sock"\ninterval = "5s"\njitter = "2s"\n' "$d/state" "$d"
      # The API's groups: root, which exists (plumb and plumb-ro would not, and each daemon warns).
      printf 'admin_group = "root"\nreadonly_group = "root"\n'
      printf 'metrics_address = "127.0.0.1:%d"\n' "$port"
      for s in $(seq 0 $((SERVICES - 1))); do
        printf '\n[[services]]\nmachine = "m%d"\nservice = "svc%d"\n' "$i" "$s"
        printf 'dirs = [{ local = "/srv/svc%d", link = "svc%d" }]\n' "$s" "$s"
      done
    } > "$d/plumb.toml"
    "$PLUMB" -c "$d/plumb.toml" --hosts "m$i" --state-dir "$d/state" \
      --metrics-address "127.0.0.1:$port" --no-apply 2>"$d/log" &
    PIDS+=($!)
    echo "$port" >> "$B/ports"
  done
  t_start=$(date +%s.%N)
  if ! scrape wait "$B/ports" $((60 + N / 2)) "svc0=$h0" "svc1=$h1"; then
    for i in $(seq 0 $((N - 1))); do
      kill -0 "${PIDS[$i]}" 2>/dev/null || { echo "daemon m$i exited; its log:" >&2; tail -5 "$B/n$N/d$i/log" >&2; }
    done
    die "not every daemon reported the initial hashes"
  fi
  up=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t_start}")
  echo "all $N report the initial hashes ${up} s after the start"

  # Steady state: counters at both ends of the window, the request count every second in between.
  f0=$(scrape sum "$B/ports" plumb_git_fetch_total)
  l0=$(requests); s0=$(cpu_ticks -c "$SERVE_PID"); d0=$(cpu_ticks -c "${PIDS[@]}"); w0=$(date +%s.%N)
  echo "second,requests" > "$OUT/fleet-$N-requests.csv"
  prev=$l0
  for k in $(seq 1 "$WINDOW"); do
    sleep 1
    l=$(requests); echo "$k,$((l - prev))" >> "$OUT/fleet-$N-requests.csv"; prev=$l
  done
  l1=$(requests); s1=$(cpu_ticks -c "$SERVE_PID"); d1=$(cpu_ticks -c "${PIDS[@]}"); w1=$(date +%s.%N)
  f1=$(scrape sum "$B/ports" plumb_git_fetch_total)
  secs=$(awk "BEGIN {print $w1 - $w0}")
  req_s=$(awk "BEGIN {printf \"%.1f\", ($l1 - $l0) / $secs}")
  peak=$(awk -F, 'NR > 1 && $2 > m {m = $2} END {print m + 0}' "$OUT/fleet-$N-requests.csv")
  per_poll=$(awk "BEGIN {printf \"%.2f\", ($f1 > $f0) ? ($l1 - $l0) / ($f1 - $f0) : 0}")
  srv_cpu=$(awk "BEGIN {printf \"%.1f\", 100 * ($s1 - $s0) / $HZ / $secs}")
  dmn_cpu=$(awk "BEGIN {printf \"%.1f\", 100 * ($d1 - $d0) / $HZ / $secs}")
  # Mean VmRSS, and mean RssAnon (private: what each machine of a real fleet pays beyond shared libs).
  rss=$(for p in "${PIDS[@]}"; do echo "/proc/$p/status"; done |
        xargs awk '/^VmRSS/ {s += $2; n++} /^RssAnon/ {a += $2} END {printf "%.1f MiB (%.1f private)", s / n / 1024, a / n / 1024}')
  echo "steady state over ${secs%.*} s: $req_s req/s (peak $peak in 1 s), $per_poll requests per poll," \
       "server CPU $srv_cpu % of a core, daemons $dmn_cpu %, mean RSS $rss"

  # Rollout: one commit changing svc0; the clock starts when the push returns.
  echo "change $N" >> "$B/work/svc0/conf"
  git -C "$B/work" commit -qam "svc0 for $N"
  new=$(git -C "$B/work" rev-parse HEAD)
  r0=$(requests)
  read -r t0 p50 p90 all < <(scrape rollout "$B/ports" svc0 "$new" "$OUT/fleet-$N.csv" 120 0.25 \
                               git -C "$B/work" push -q origin main) ||
    die "rollout to $N daemons did not finish"
  posts=$(tail -n +$((r0 + 1)) "$PHASE/requests.log" | grep -c '^POST' || true)
  read -r lp50 lall < <(scrape logs "$t0" svc0 "$new" "$B"/n"$N"/d*/log) || die "reading the daemons' logs"
  echo "rollout: p50 $p50 s, p90 $p90 s, all $N in $all s (daemons' logs: p50 $lp50 s, all $lall s);" \
       "$posts upload-pack POSTs at the server meanwhile"

  errors=$(cat "$B"/n"$N"/d*/log | grep -cE ' (WARN|ERROR) ' || true)
  [ "$errors" -eq 0 ] || { echo "daemon log lines at WARN or ERROR: $errors, e.g.:"; cat "$B"/n"$N"/d*/log | grep -E ' (WARN|ERROR) ' | sed 's/^[^ ]* //' | sort | uniq -c | sort -rn | head -5; }
  rows+=("| $N | $req_s | $peak | $per_poll | $srv_cpu % | $dmn_cpu % | $rss | $p50 s | $p90 s | $all s | $lall s | $posts | $errors |")
  plots+=("'$OUT/fleet-$N.csv' using 1:2 with steps linewidth 2 title '$N daemons'")
  stop_daemons
  [ -n "${KEEP:-}" ] || rm -rf "$B/n$N"
done

{
  echo 'set terminal png size 900,540'
  echo "set output '$(dirname "$RESULTS")/fleet-rollout.png'"
  echo "set title 'plumb: one commit reaching a fleet (interval 5 s, jitter 2 s, smart HTTP on loopback)'"
  echo "set xlabel 'seconds since the push returned'; set ylabel 'machines on the new hash'"
  echo "set datafile separator ','; set key top left; set grid; set xrange [0:*]; set yrange [0:*]"
  echo "plot $(IFS=,; echo "${plots[*]}")"
} | gnuplot

model=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
table=$(cat <<TXT
| daemons | server req/s | peak req in 1 s | requests per poll | server CPU (% of one core) | daemons' CPU, sum (% of one core) | mean daemon RSS (RssAnon) | rollout p50 | rollout p90 | rollout, all | rollout, all (daemon logs) | upload-pack POSTs in rollout | daemon WARN/ERROR lines |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")
TXT
)
notes=$(cat <<TXT
Each daemon: 2 services of one upstream, \`interval = "5s"\`, \`jitter = "2s"\`, \`--no-apply\`; one
lighttpd + git-http-backend (mod_cgi) on loopback; steady state over ${WINDOW} s after every daemon
reported the initial hash. Server CPU is lighttpd's utime+stime+cutime+cstime: it reaps its CGI
children, so git-http-backend and git upload-pack are in it. Requests per poll = server requests /
the daemons' \`plumb_git_fetch_total\`. Rollout: from the push returning until each daemon's
\`/metrics\` shows the new hash of svc0, scraped every 0.25 s (p50, p90: of the machines' first-seen
times); "daemon logs" is the last daemon's own \`deployed\` log line, without the scrape period.
Load average at the start: $LOAD0 (the machine is shared, another build ran meanwhile: expect noise).

![rollout](fleet-rollout.png)

Rollout progress in PromQL:

\`\`\`promql
# machines per deployed revision of svc0
count by (hash) (plumb_service_hash{service="svc0"})
# the fraction of the fleet on commit X (the full hash)
count(plumb_service_hash{service="svc0", hash="X"}) / count(plumb_service_hash{service="svc0"})
\`\`\`
TXT
)
echo
echo "$table"
echo "time series: $OUT"
{
  echo
  echo "## fleet, $(date -u +%Y-%m-%d), $(uname -m), $(nproc) cores, $model"
  echo
  echo "$table"
  echo
  echo "$notes"
} >> "$RESULTS"
