#!/bin/bash
# A rollout through waves on loopback: N plumb daemons in rollout waves, gated by a real Prometheus
# scraping them, and one commit walking the waves.
#
# One upstream repository served by lighttpd + git-http-backend (bench/lib.sh's serve_start); one
# fleet config (the fleet's one description, as in production) giving machine m<i> the service svc0
# in a wave: WAVE_SIZES (default "10 30 60 100": 200 daemons, waves 0 to 3) machines per wave, a
# soak of SOAK seconds (default 10) in every wave above 0, polls every INTERVAL seconds (default 5)
# less a jitter of up to JITTER (default 2s). Each daemon runs with --no-apply, its own state
# directory, socket and metrics port; Debian's prometheus scrapes every daemon each second
# (prometheus_scrape_interval = "1s"). Then:
#
#   1. start the daemons and wait until every one reports the current hash (the first deploy
#      walks the waves too: nothing is deployed anywhere yet);
#   2. push one commit changing svc0's files; from the push returning, wait until every daemon's
#      /metrics shows the new hash, then read each daemon's own "deployed" log line (microsecond
#      timestamps): per wave, when its first and last machine deployed, and the time to the last
#      machine of all;
#   3. count the polls the gate held after the push, and those held because Prometheus did not
#      answer within the query timeout (a quarter of the interval: a loaded Prometheus slows the
#      rollout down, one poll per timeout);
#   4. check the gate: every machine in a wave above 0 deployed at least SOAK seconds after the
#      last machine of the lower waves (the gate reads what Prometheus scraped, so a machine can
#      only see a lower machine on the revision after that machine deployed it). Prints the
#      violations (0 expected) and the smallest margin.
#
# The plot goes to waves-rollout.png next to $RESULTS (one colour per wave: machines on the new
# hash over time), the table is appended to $RESULTS. Figures are printed, never asserted (the
# gate check is a count); on a shared machine expect noise (the load average is recorded).
#
# Run as root from anywhere:  bash bench/waves.sh
#   WAVE_SIZES="10 30 60 100"   SOAK=10   INTERVAL=5   JITTER=2s   METRICS_BASE=23000
#   CARGO_TARGET_DIR=target   PLUMB=/path/to/plumb (that binary, no build)
#   RESULTS=bench/RESULTS.md   OUT=DIR (time series, per-machine times)   KEEP=1 (keep state, logs)
source "$(dirname "$0")/lib.sh"
WAVE_SIZES=${WAVE_SIZES:-10 30 60 100}
SOAK=${SOAK:-10}
INTERVAL=${INTERVAL:-5}
JITTER=${JITTER:-2s} # at most half the interval
METRICS_BASE=${METRICS_BASE:-23000} # daemon i serves metrics on 127.0.0.1:METRICS_BASE+i
[ "$(id -u)" -eq 0 ] || { echo "waves.sh: must run as root" >&2; exit 1; }
die() { echo "waves.sh: $*" >&2; exit 1; }

need=()
for pkg in lighttpd git gnuplot-nox curl iproute2 procps python3 prometheus; do
  [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "waves.sh: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" </dev/null
fi

bench_init
bench_build
OUT=${OUT:-$(mktemp -d /tmp/plumb-waves-results.XXXXXX)}
N=0; WAVES=0
for n in $WAVE_SIZES; do N=$((N + n)); WAVES=$((WAVES + 1)); done
last=$((METRICS_BASE + N - 1))
if ss -Hltn "( sport >= :$METRICS_BASE and sport <= :$last )" | grep -q .; then
  die "a port in $METRICS_BASE..$last is taken; set METRICS_BASE"
fi

PIDS=()
stop_daemons() {
  [ "${#PIDS[@]}" -eq 0 ] && return 0
  kill "${PIDS[@]}" 2>/dev/null || true
  local p
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
CLEANUP+=(stop_daemons)

# The upstream: svc0 and svc1 (a service nobody runs, so not every commit is a rollout).
mkdir -p "$B/srv"; git init -q --bare -b main "$B/srv/fleet.git"
git clone -q "$B/srv/fleet.git" "$B/work" 2>/dev/null
for s in 0 1; do mkdir -p "$B/work/svc$s"; echo "conf $s" > "$B/work/svc$s/conf"; done
git -C "$B/work" add -A; git -C "$B/work" commit -qm fleet; git -C "$B/work" push -q origin main
serve_start waves

# Prometheus, scraping every daemon each second.
PROM_PORT=$(free_port)
mkdir -p "$B/prom"
{
  printf 'global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n'
  printf '  - job_name: plumb\n    static_configs:\n      - targets: ['
  for i in $(seq 0 $((N - 1))); do printf "%s'127.0.0.1:%d'" "$([ "$i" -gt 0 ] && echo ', ')" $((METRICS_BASE + i)); done
  printf ']\n'
} > "$B/prom/prometheus.yml"
prometheus --config.file="$B/prom/prometheus.yml" --storage.tsdb.path="$B/prom/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" >"$B/prom/log" 2>&1 &
PROM_PID=$!; BG_PIDS+=("$PROM_PID")
wait_for 30 curl -sf "http://127.0.0.1:$PROM_PORT/-/ready"

# The fleet's config: machine i in the wave its index falls in.
WAVE_OF=()
{
  printf '[global]\nupstream = "%s"\n\n' "$URL"
  printf '[plumb]\ninterval = "%ss"\njitter = "%s"\nadmin_group = "root"\nreadonly_group = "root"\n' "$INTERVAL" "$JITTER"
  printf 'prometheus = "http://127.0.0.1:%d"\nprometheus_scrape_interval = "1s"\n' "$PROM_PORT"
  i=0; w=0
  for n in $WAVE_SIZES; do
    for _ in $(seq 1 "$n"); do
      printf '\n[[services]]\nmachine = "m%d"\nservice = "svc0"\n' "$i"
      printf 'dirs = [{ local = "/srv/svc0", link = "svc0" }]\n'
      [ "$w" -eq 0 ] || printf 'wave = %d\nsoak = "%ss"\n' "$w" "$SOAK"
      WAVE_OF+=("$w"); i=$((i + 1))
    done
    w=$((w + 1))
  done
} > "$B/plumb.toml"
"$PLUMB" check-config "$B/plumb.toml" >/dev/null || die "the fleet config is refused"

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
: > "$B/ports"; : > "$B/machines"
for i in $(seq 0 $((N - 1))); do
  d=$B/d$i port=$((METRICS_BASE + i))
  mkdir -p "$d"
  PLUMB_LOG=info GLIBC_TUNABLES=$PLUMB_TUNABLES "$PLUMB" -c "$B/plumb.toml" --hosts "m$i" \
    --state-dir "$d/state" --socket "$d/plumb.sock" --metrics-address "127.0.0.1:$port" \
    --no-apply 2>"$d/log" &
  PIDS+=($!)
  echo "$port" >> "$B/ports"
  echo "m$i ${WAVE_OF[$i]} $port $d/log" >> "$B/machines"
done

# wait PORTS SECONDS HASH: until every daemon reports svc0 at HASH (scraping /metrics).
# times MACHINES T0 HASH SOAK OUTDIR: from the daemons' logs, per machine the time of its
# "deployed" line for HASH after T0; prints per wave "wave n first last", then
# "all LAST", "violations V margin M", and writes OUTDIR/wave-W.csv (time_s,machines).
cat > "$B/waves.py" <<'PY'
import concurrent.futures, datetime, http.client, re, sys, time

def hashes(port):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        c.request("GET", "/metrics")
        body = c.getresponse().read().decode()
        c.close()
    except (OSError, http.client.HTTPException):
        return None
    m = re.search(r'^plumb_service_hash\{[^}]*hash="(\w+)"[^}]*service="svc0"[^}]*\} 1$', body, re.M)
    return m and m.group(1)

mode = sys.argv[1]
if mode == "wait":
    ports = [int(p) for p in open(sys.argv[2]).read().split()]
    deadline, want = time.time() + float(sys.argv[3]), sys.argv[4]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=32)
    while True:
        missing = [p for p, h in zip(ports, pool.map(hashes, ports)) if h != want]
        if not missing:
            break
        if time.time() > deadline:
            sys.exit(f"{len(ports) - len(missing)} of {len(ports)} on {want[:12]}; not: {missing[:10]}")
        time.sleep(0.5)
elif mode == "times":
    machines = [l.split() for l in open(sys.argv[2])]
    t0, want, soak, out = float(sys.argv[3]), sys.argv[4], float(sys.argv[5]), sys.argv[6]
    line = re.compile(r'^(\S+)Z .* deployed service=svc0 revision=(\w+)')
    at = {}  # machine -> (wave, seconds after t0)
    for name, wave, _, log in machines:
        for l in open(log, errors="replace"):
            m = line.match(l)
            if m and want.startswith(m.group(2)):
                t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
                at[name] = (int(wave), t.timestamp() - t0)
    # The gate's answers after the push: held, and of those, Prometheus not answering in time.
    held = re.compile(r'^(\S+)Z .* held: (.*)')
    holds = timeouts = 0
    for _, _, _, log in machines:
        for l in open(log, errors="replace"):
            m = held.match(l)
            if m and datetime.datetime.fromisoformat(m.group(1)).replace(
                    tzinfo=datetime.timezone.utc).timestamp() >= t0:
                holds += 1
                timeouts += "did not answer" in m.group(2)
    print(f"held {holds} unanswered {timeouts}")
    missing = [m[0] for m in machines if m[0] not in at]
    if missing:
        sys.exit(f"no 'deployed' line for {want[:12]} in the logs of {missing[:10]}")
    waves = sorted({w for w, _ in at.values()})
    with open(f"{out}/machines.csv", "w") as f:
        f.write("machine,wave,deployed_s\n")
        for name, (w, t) in sorted(at.items(), key=lambda x: x[1][1]):
            f.write(f"{name},{w},{t:.3f}\n")
    end = max(t for _, t in at.values())
    for w in waves:
        times = sorted(t for v, t in at.values() if v == w)
        print(f"wave {w} {len(times)} {times[0]:.2f} {times[-1]:.2f}")
        with open(f"{out}/wave-{w}.csv", "w") as f:
            f.write("time_s,machines\n0,0\n")
            for k, t in enumerate(times, 1):
                f.write(f"{t:.3f},{k}\n")
            f.write(f"{end * 1.02:.3f},{len(times)}\n")  # flat to the end of the plot
    print(f"all {max(t for _, t in at.values()):.2f}")
    # The gate: no machine before the lower waves' last deploy + soak.
    violations, margin = 0, None
    for w in waves[1:]:
        lower = max(t for v, t in at.values() if v < w)
        for v, t in at.values():
            if v == w:
                m = t - (lower + soak)
                violations += m < 0
                margin = m if margin is None else min(margin, m)
    print(f"violations {violations} margin {margin if margin is not None else 0:.2f}")
PY
tool() { python3 "$B/waves.py" "$@"; }

h0=$(git -C "$B/work" log -1 --format=%H -- svc0)
t_start=$(date +%s.%N)
tool wait "$B/ports" $((120 + WAVES * (SOAK + INTERVAL) * 3)) "$h0" || die "not every daemon took the first revision"
first=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t_start}")
echo "all $N daemons on the first revision ${first} s after the start (through $WAVES waves)"

prom_metric() { # the sum of a metric of Prometheus's own
  curl -s "http://127.0.0.1:$PROM_PORT/metrics" | awk -v m="$1" 'index($0, m) == 1 {s += $NF} END {printf "%d", s}'
}
q0=$(prom_metric 'prometheus_http_requests_total{code="200",handler="/api/v1/query"}')
p0=$(cpu_ticks "$PROM_PID"); d0=$(cpu_ticks "${PIDS[@]}"); w0=$(date +%s.%N)
echo "change" >> "$B/work/svc0/conf"
git -C "$B/work" commit -qam "svc0: a rollout"
new=$(git -C "$B/work" rev-parse HEAD)
git -C "$B/work" push -q origin main
t0=$(date +%s.%N)
tool wait "$B/ports" $((120 + WAVES * (SOAK + INTERVAL) * 3)) "$new" || die "the rollout did not reach every daemon"
q1=$(prom_metric 'prometheus_http_requests_total{code="200",handler="/api/v1/query"}')
p1=$(cpu_ticks "$PROM_PID"); d1=$(cpu_ticks "${PIDS[@]}"); w1=$(date +%s.%N)
tool times "$B/machines" "$t0" "$new" "$SOAK" "$OUT" > "$OUT/summary" || die "reading the daemons' logs"
cat "$OUT/summary"

HZ=$(getconf CLK_TCK)
secs=$(awk "BEGIN {print $w1 - $w0}")
prom_cpu=$(awk "BEGIN {printf \"%.1f\", 100 * ($p1 - $p0) / $HZ / $secs}")
dmn_cpu=$(awk "BEGIN {printf \"%.1f\", 100 * ($d1 - $d0) / $HZ / $secs}")
queries=$((q1 - q0))
all=$(awk '$1 == "all" {print $2}' "$OUT/summary")
read -r violations margin < <(awk '$1 == "violations" {print $2, $4}' "$OUT/summary")
read -r holds unanswered < <(awk '$1 == "held" {print $2, $4}' "$OUT/summary")
per_wave=$(awk '$1 == "wave" {printf "%s%s: %s machines, %s to %s s", (n++ ? "; " : ""), $2, $3, $4, $5}' "$OUT/summary")
errors=$(cat "$B"/d*/log | grep -cE ' (WARN|ERROR) ' || true)
echo "rollout: all $N in $all s; $per_wave; gate violations $violations (smallest margin $margin s);" \
     "$queries queries to Prometheus ($prom_cpu % of a core), daemons $dmn_cpu %;" \
     "$holds polls held, $unanswered of them as Prometheus did not answer in time; WARN/ERROR lines $errors"

plots=()
colours=(dark-red web-blue dark-green dark-orange dark-violet black)
for w in $(seq 0 $((WAVES - 1))); do
  plots+=("'$OUT/wave-$w.csv' using 1:2 with steps linewidth 2 linecolor rgb '${colours[$((w % 6))]}' title 'wave $w'")
done
{
  echo 'set terminal png size 900,540'
  echo "set output '$(dirname "$RESULTS")/waves-rollout.png'"
  echo "set title 'plumb: one commit through $WAVES waves of $N daemons (soak ${SOAK} s, interval ${INTERVAL} s, Prometheus scraping each 1 s)'"
  echo "set xlabel 'seconds since the push returned'; set ylabel 'machines of the wave on the new hash'"
  echo "set datafile separator ','; set key top left; set grid; set xrange [0:*]; set yrange [0:*]"
  echo "plot $(IFS=,; echo "${plots[*]}")"
} | gnuplot

model=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
rows=$(awk -v soak="$SOAK" '$1 == "wave" {printf "| %s | %s | %s s | %s s |\n", $2, $3, $4, $5}' "$OUT/summary")
{
  echo
  echo "## waves, $(date -u +%Y-%m-%d), $(uname -m), $(nproc) cores, $model"
  echo
  echo "$N daemons (\`--no-apply\`, one service) in $WAVES waves of $WAVE_SIZES machines, \`soak = \"${SOAK}s\"\`,"
  echo "\`interval = \"${INTERVAL}s\"\`, \`jitter = \"$JITTER\"\`; one lighttpd + git-http-backend and one Prometheus"
  echo "(Debian's, scraping every daemon each second) on loopback. Times from the push returning to each"
  echo "daemon's own \`deployed\` log line."
  echo
  echo "| wave | machines | first deployed | last deployed |"
  echo "|---|---|---|---|"
  echo "$rows"
  echo
  echo "All $N on the new revision after $all s (the first revision, with nothing deployed anywhere,"
  echo "reached all of them ${first} s after the start). Gate check: every machine of a wave above 0"
  echo "deployed at least the soak after the last machine of the lower waves: $violations violations,"
  echo "smallest margin $margin s. Meanwhile Prometheus answered $queries queries (gate and who-blocks) and used"
  echo "$prom_cpu % of a core; the daemons together $dmn_cpu %; daemon log lines at WARN or ERROR: $errors."
  echo "Polls held at the gate after the push: $holds, $unanswered of them because Prometheus did not"
  echo "answer within the query timeout (a quarter of the interval, at least 0.5 s)."
  echo "Load average at the start: $LOAD0 (a shared machine: expect noise)."
  echo
  echo "![waves](waves-rollout.png)"
} >> "$RESULTS"
echo "time series: $OUT"
