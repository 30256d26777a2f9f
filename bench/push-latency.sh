#!/bin/bash
# Push-to-applied latency on a real systemd: from `git push` returning until nginx, managed by plumb
# in a Debian container (systemd-nspawn, plumb's .deb installed, as scripts/demo.sh does it), serves
# the page the push put in git. Three ways for the push to reach plumb, PUSHES pushes each:
#   pull      `plumbctl pull nginx` in the container right after the push (poll interval 1h)
#   webhook   POST /v1/hooks/push on the metrics listener, GitHub-signed, right after the push (1h)
#   poll      no trigger: interval = "2s", jitter = "1ms"; each push waits a random 0..2 s first, so
#             pushes land at random phases of the poll cycle
# The upstream is served by lighttpd + git-http-backend (smart HTTP) on 127.0.0.1: bench/lib.sh's
# serve_start; the benchmark pushes to the bare repository through the file system (the push is done
# when the ref is updated either way). The page is polled with curl from this machine every ~15 ms
# (the container shares this machine's network, so that is the container's nginx).
# Prints median, p95 (nearest rank) and max per mode, and the every-minute cron job baseline
# computed from the uniform distribution, and appends the table to $RESULTS (bench/RESULTS.md).
# Each push is also split in two: push -> the daemon wrote the service's `.rev` (fetched and checked
# out), and push -> `plumb apply` wrote its `.applied` outcome (nginx's reload job has ended), read
# from the two files' modification times (same clock: the container shares this machine's kernel).
# What is left, up to nginx serving the page, is nginx's own: its master process lets the new
# workers start for 100 ms (ngx_msleep(100) in its reconfigure) before it stops the old ones, which
# keep answering with the old configuration meanwhile.
# Everything (the package, the rootfs, the logs) goes to a temporary directory under BENCH_DIR,
# removed at the end; a failed run keeps its logs there (not the rootfs) and says where.
#
#   bash bench/push-latency.sh          (root; CARGO_TARGET_DIR honoured, default target)
#   PUSHES=20 (per mode)  BENCH_DIR=/var/lib/plumb-bench  KEEP=1 (keep the run's directory, rootfs too)
#   RESULTS=bench/RESULTS.md (where the table is appended)
#   PLUMB=/path/to/release/plumb (no build: that directory's plumb, plumbctl, plumb-generator and
#   examples/gen-docs go into the package)
source "$(dirname "$0")/lib.sh"
PUSHES=${PUSHES:-20}
BENCH_DIR=${BENCH_DIR:-/var/lib/plumb-bench}
MACHINE=plumb-bench
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
now_ms() { local t=${EPOCHREALTIME/./}; NOW=$((t / 1000)); }   # sets NOW, in ms (bash 5: no fork)
mtime_ms() { stat -c %.3Y "$1" 2>/dev/null | tr -d .; }   # FILE's modification time, in ms

stop_container() { # DIR: stops the container booted by a run in DIR (its nspawn.pid), if running
  local pid
  [ -f "$1/nspawn.pid" ] || return 0
  pid=$(cat "$1/nspawn.pid")
  kill -TERM "$pid" 2>/dev/null || true   # nspawn shuts the container down cleanly
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$1/nspawn.pid"
}
IN=
finish() { # the first of bench/lib.sh's cleanup commands: the journal, the container; a failed run keeps its logs
  if [ -n "$IN" ] && [ -f "$B/nspawn.pid" ]; then
    $IN journalctl -u plumb -u plumb-apply@nginx -u nginx --no-pager -o short-precise \
      >"$B/journal.log" 2>&1 || true
  fi
  stop_container "$B"
  if [ "$BENCH_STATUS" -ne 0 ]; then
    [ -n "${KEEP:-}" ] || rm -rf "$ROOT"
    echo "push-latency: failed ($BENCH_STATUS); logs in $B" >&2; KEEP=1
  fi
}
for d in "$BENCH_DIR"/plumb-bench.*/; do   # a previous run's container and server, if one was left
  [ -d "$d" ] || continue
  stop_container "$d"
  [ ! -f "$d/git/lighttpd.pid" ] || kill "$(cat "$d/git/lighttpd.pid")" 2>/dev/null || true
done
bench_init "$BENCH_DIR"   # the rootfs is large: not under /tmp
CLEANUP+=(finish)
ROOT=$B/rootfs

say "building plumb's release binaries and its Debian package (CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}, niced)"
bench_build --example gen-docs
"$RELEASE/examples/gen-docs" "$B/docs" >/dev/null
DEB=$(bash scripts/build-deb.sh --fast --bin-dir "$RELEASE" --docs-dir "$B/docs" "$B/plumb-bench.deb")

say "the container's rootfs (cached by tests/infra/rootfs.sh), plumb's package installed"
bash tests/infra/rootfs.sh "$ROOT"
dpkg --root="$ROOT" -i "$DEB" >/dev/null
echo "$MACHINE" > "$ROOT/etc/hostname"
rm -f "$ROOT/etc/nginx/sites-enabled/default"   # shared network: nginx serves only what git gives

say "the upstream: lighttpd + git-http-backend on 127.0.0.1"
WEB_PORT=$(free_port); METRICS_PORT=$(free_port)
SECRET=$(openssl rand -hex 16)
mkdir -p "$B/srv"
git init -q --bare -b main "$B/srv/config.git"
git clone -q "$B/srv/config.git" "$B/work" 2>/dev/null
mkdir -p "$B/work/nginx/conf.d" "$B/work/grafana"
page_conf() { printf 'server {\n  listen 127.0.0.1:%s;\n  location / { return 200 "%s\\n"; }\n}\n' "$WEB_PORT" "$1"; }
page_conf v0 > "$B/work/nginx/conf.d/bench.conf"
echo "another service's files" > "$B/work/grafana/dashboard.json"
git -C "$B/work" add -A; git -C "$B/work" commit -qm v0; git -C "$B/work" push -q origin main
serve_start git
UPSTREAM=$SERVE_URL/config.git
wait_for 10 command git ls-remote "$UPSTREAM"

config() { # config INTERVAL JITTER
  cat <<TOML
[global]
upstream = "$UPSTREAM"

[plumb]
interval = "$1"
jitter = "$2"
metrics_address = "127.0.0.1:$METRICS_PORT"
webhook_secret = "$SECRET"

[[services]]
machine = "$MACHINE"
service = "nginx"
action = "reload"
dirs = [ { local = "/etc/nginx/conf.d", link = "nginx/conf.d" } ]
TOML
}
mkdir -p "$ROOT/etc/plumb"
config 1h 1s > "$ROOT/etc/plumb/plumb.toml"

say "booting the container"
systemd-nspawn -D "$ROOT" -M "$MACHINE" -b --register=no --keep-unit --console=passive \
  </dev/null >"$B/nspawn.log" 2>&1 &
echo $! > "$B/nspawn.pid"
leader() { pgrep -P "$(cat "$B/nspawn.pid")" -o; }
wait_for 30 leader
IN="nsenter -t $(leader) -a"
booted() { case $($IN systemctl is-system-running --wait 2>/dev/null) in running|degraded) ;; *) return 1 ;; esac; }
wait_for 90 booted
$IN systemctl --failed --no-legend >&2 || true
page() { curl -s --max-time 2 "http://127.0.0.1:$WEB_PORT/"; }
serves() { [ "$(page)" = "$1" ]; }
wait_for 60 serves v0   # nginx serves v0 from git
APPLIED=$ROOT/var/lib/plumb/state/nginx.applied
REV=$ROOT/var/lib/plumb/state/nginx.rev
applied() { grep -Eq "\"revision\": *\"$1\"" "$APPLIED" 2>/dev/null; }   # the apply of $1 has ended
wait_for 60 applied "$(git -C "$B/work" rev-parse HEAD)"

SAMPLES=$B/samples.txt; : > "$SAMPLES"
DEADLINE_MS=30000
N=0
# push_and_measure MODE: one push of a new token, the mode's trigger, then curl until it is served.
push_and_measure() {
  local mode=$1 token body sig code t0 t rev trigger_pid=
  N=$((N + 1)); token="$mode-$N-$RANDOM$RANDOM"
  if [ "$mode" = poll ]; then   # a random phase of the 2 s poll cycle
    sleep "$(awk -v r="$RANDOM" 'BEGIN {printf "%.3f", r / 32768 * 2}')"
  fi
  body="{\"ref\":\"refs/heads/main\",\"token\":\"$token\"}"
  sig=$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$SECRET" -r | cut -d' ' -f1)
  page_conf "$token" > "$B/work/nginx/conf.d/bench.conf"
  git -C "$B/work" commit -qam "$token"
  git -C "$B/work" push -q origin main
  now_ms; t0=$NOW
  case $mode in
    pull) $IN plumbctl pull nginx >"$B/pull.out" 2>&1 & trigger_pid=$! ;;
    webhook)
      code=$(curl -s -o "$B/hook.out" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
        -H "X-GitHub-Event: push" -H "X-GitHub-Delivery: $token" \
        -H "X-Hub-Signature-256: sha256=$sig" --data-binary "$body" \
        "http://127.0.0.1:$METRICS_PORT/v1/hooks/push")
      now_ms; LAST_HOOK=$NOW
      [ "$code" = 202 ] || echo "webhook answered $code: $(cat "$B/hook.out")" >&2 ;;
  esac
  t=
  while now_ms; [ $((NOW - t0)) -lt $DEADLINE_MS ]; do
    if [ "$(curl -s --max-time 1 "http://127.0.0.1:$WEB_PORT/")" = "$token" ]; then now_ms; t=$((NOW - t0)); break; fi
    sleep 0.01
  done
  if [ -n "$trigger_pid" ] && ! wait "$trigger_pid"; then
    echo "plumbctl pull failed: $(cat "$B/pull.out")" >&2
  fi
  # Settle before the next push: the apply of this revision has ended (its outcome is written).
  rev=$(git -C "$B/work" rev-parse HEAD)
  local deployed=timeout done=timeout ran=timeout
  if wait_for 30 applied "$rev"; then
    deployed=$(($(mtime_ms "$REV") - t0)); done=$(($(mtime_ms "$APPLIED") - t0))
    # How long `plumb apply` ran, from systemd's fork to its exit (its properties, in us).
    ran=$($IN systemctl show plumb-apply@nginx.service \
      -p ExecMainStartTimestampMonotonic -p ExecMainExitTimestampMonotonic |
      awk -F= '/^ExecMainStart/ {s = $2} /^ExecMainExit/ {e = $2} END {printf "%.1f", (e - s) / 1000}')
  fi
  echo "$mode ${t:-timeout} $deployed $done $ran" >> "$SAMPLES"
  printf '%s: served %s ms (.rev %s ms, .applied %s ms; plumb apply ran %s ms)\n' "$token" "${t:-timeout}" \
    "$deployed" "$done" "$ran" >&2
}

# The daemon's own fetch times (plumb_git_fetch_duration_seconds), per mode: how much of the
# latency is the fetch (with its checkout), the rest being the trigger, the apply and nginx's reload.
fetch_sum_count() {
  curl -s "http://127.0.0.1:$METRICS_PORT/metrics" |
    awk '/^plumb_git_fetch_duration_seconds_sum/ {s = $NF} /^plumb_git_fetch_duration_seconds_count/ {c = $NF}
         END {print s + 0, c + 0}'
}
declare -A FETCH
fetch_mark() { read -r F_SUM F_COUNT < <(fetch_sum_count); }
fetch_since() { # fetch_since MODE: mean fetch ms and number of fetches since fetch_mark
  local s c; read -r s c < <(fetch_sum_count)
  FETCH[$1]=$(awk -v s="$s" -v c="$c" -v s0="$F_SUM" -v c0="$F_COUNT" \
    'BEGIN {n = c - c0; if (n > 0) printf "%.0f (%d fetches)", (s - s0) / n * 1000, n; else print "-"}')
}

LAST_HOOK=0
for mode in pull webhook; do
  say "mode $mode: interval 1h, $PUSHES pushes"
  fetch_mark
  for _ in $(seq "$PUSHES"); do
    # Hooks make at most one fetch a second (a later one is deferred): keep the pushes that far apart,
    # so each is measured undeferred.
    if [ "$mode" = webhook ]; then
      now_ms; gap=$((1100 - (NOW - LAST_HOOK)))
      [ $gap -le 0 ] || sleep "$(awk -v g=$gap 'BEGIN {printf "%.3f", g / 1000}')"
    fi
    push_and_measure "$mode"
  done
  fetch_since "$mode"
done

say "mode poll: interval 2s, jitter 1ms, $PUSHES pushes"
config 2s 1ms > "$ROOT/etc/plumb/plumb.toml"
$IN systemctl restart plumb
wait_for 30 $IN systemctl is-active plumb
wait_for 30 fetch_sum_count
fetch_mark
for _ in $(seq "$PUSHES"); do push_and_measure poll; done
fetch_since poll

stats() { # stats MODE [COLUMN] -> "median p95 max timeouts" in ms (nearest-rank p95; median of 2 middles)
  awk -v m="$1" -v c="${2:-2}" '$1 == m && $c != "timeout" {print $c} $1 == m && $c == "timeout" {print "t"}' "$SAMPLES" |
    sort -n | awk '
      /t/ {to++; next}
      {v[++n] = $1}
      END {
        if (n == 0) {print "-", "-", "-", to + 0; exit}
        med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        r = int(0.95 * n); if (r < 0.95 * n) r++
        print med, v[r], v[n], to + 0
      }'
}
row() { # row LABEL MODE
  local med p95 max to rev_med applied_med ran_med
  read -r med p95 max to < <(stats "$2")
  read -r rev_med _ < <(stats "$2" 3)
  read -r applied_med _ < <(stats "$2" 4)
  read -r ran_med _ < <(stats "$2" 5)
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$rev_med" "$applied_med" "$ran_med" "$med" \
    "$p95" "$max" "$to" "${FETCH[$2]:--}"
}
cron_row() { # uniform on [0, 60 s): the q-quantile is q * 60 s
  awk 'BEGIN {printf "| cron every minute (`git pull && systemctl reload`), computed: uniform 0..60 s | - | - | - | %d | %d | %d | - | - |\n", 0.5 * 60000, 0.95 * 60000, 60000}'
}
load=$(cut -d' ' -f1-3 /proc/loadavg)
table=$(cat <<TXT
| trigger ($PUSHES pushes each; from the push returning) | \`.rev\` written, median ms | \`.applied\` written, median ms | of which \`plumb apply\` ran (fork to exit), median ms | nginx serves it (curl, ~15 ms polls): median ms | p95 ms | max ms | timeouts (${DEADLINE_MS} ms) | daemon's mean fetch ms |
|---|---|---|---|---|---|---|---|---|
$(row '`plumbctl pull nginx` in the container, interval 1h' pull)
$(row 'push webhook (GitHub signature), interval 1h' webhook)
$(row 'polling, interval 2s, jitter 1ms, pushes at random phases' poll)
$(cron_row)

Upstream: lighttpd + git-http-backend (smart HTTP) on 127.0.0.1; nginx reloaded by plumb-apply@nginx
in a systemd-nspawn Debian bookworm container. \`.rev\` written: the daemon fetched and checked out the
revision; \`.applied\` written: \`plumb apply\` saw nginx's reload job end. The rest, about 100 ms, is
nginx's: after a reload its old workers answer for 100 ms more (ngx_msleep(100) before they are told
to stop). Load average at the end: $load (another build may have been running on this machine:
figures are noisy).
TXT
)
echo "$table"
{
  echo
  echo "## push-latency, $(date -u +%Y-%m-%d), $(uname -m), $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
  echo
  echo "$table"
} >> "$RESULTS"
