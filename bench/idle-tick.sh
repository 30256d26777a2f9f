#!/bin/bash
# What an idle plumb costs: 20 services on one upstream served by lighttpd + git-http-backend.
# Prints requests and bytes per idle tick at the server (its access log), processes the daemon
# spawned (execve seen by strace), CPU time per tick and the daemon's memory, then appends the table
# to bench/RESULTS.md with the date and the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
TICKS=${TICKS:-10}
B=$(mktemp -d /tmp/plumb-bench.XXXXXX); chmod 755 "$B"
cleanup() {
  local status=$?
  kill "$(cat "$B/lighttpd.pid" 2>/dev/null)" 2>/dev/null || true
  [ -z "${DPID:-}" ] || kill "$DPID" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$B"
  exit "$status"
}
trap cleanup EXIT
cargo build --release --quiet --bins
PLUMB=$PWD/target/release/plumb
git() { command git -c user.name=bench -c user.email=bench@example.invalid "$@"; }

# Upstream: 20 services' directories in one repository.
mkdir -p "$B/srv"; git init -q --bare -b main "$B/srv/fleet.git"
git clone -q "$B/srv/fleet.git" "$B/work" 2>/dev/null
for i in $(seq 0 19); do mkdir -p "$B/work/svc$i"; echo "conf $i" > "$B/work/svc$i/conf"; done
git -C "$B/work" add -A; git -C "$B/work" commit -qm fleet; git -C "$B/work" push -q origin main

# lighttpd on a free port of 127.0.0.1. Its access log is buffered, so requests are counted by a
# CGI wrapper that writes a line before handing over to git-http-backend.
cat > "$B/git-cgi" <<CGI
#!/bin/sh
echo "\$REQUEST_METHOD \$REQUEST_URI" >> "$B/requests.log"
exec "$(command git --exec-path)/git-http-backend"
CGI
chmod 755 "$B/git-cgi"; touch "$B/requests.log"; chown www-data "$B/requests.log"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$B/lighttpd.conf" <<CONF
server.modules        = ("mod_alias", "mod_cgi", "mod_setenv", "mod_accesslog")
server.document-root  = "$B/srv"
server.bind           = "127.0.0.1"
server.port           = $PORT
server.username       = "www-data"
server.groupname      = "www-data"
server.pid-file       = "$B/lighttpd.pid"
server.errorlog       = "$B/lighttpd.err"
accesslog.filename    = "$B/access.log"
accesslog.format      = "%r %s %b"
alias.url += ( "/git" => "$B/git-cgi" )
\$HTTP["url"] =~ "^/git" {
  cgi.assign = ( "" => "" )
  setenv.set-environment = ( "GIT_PROJECT_ROOT" => "$B/srv", "GIT_HTTP_EXPORT_ALL" => "",
                             "GIT_CONFIG_PARAMETERS" => "'safe.directory'='*'" )
}
CONF
touch "$B/lighttpd.err" "$B/access.log"; chown www-data "$B/lighttpd.err" "$B/access.log"
lighttpd -f "$B/lighttpd.conf"
for _ in $(seq 100); do ss -ltn | grep -q ":$PORT " && break; sleep 0.05; done

{
  printf '[plumb]\nstate_dir = "%s/state"\nsocket = "%s/plumb.sock"\ninterval = "2s"\njitter = "1ms"\n\n' "$B" "$B"
  for i in $(seq 0 19); do
    printf '[[services]]\nmachine = "bench"\nservice = "svc%d"\nupstream = "http://127.0.0.1:%d/git/fleet.git"\n' "$i" "$PORT"
    printf 'dirs = [{ local = "/srv/svc%d", link = "svc%d" }]\n\n' "$i" "$i"
  done
} > "$B/plumb.toml"

wait_for() { # wait_for SECONDS CMD...: poll until CMD succeeds
  local end=$((SECONDS + $1)); shift
  until "$@"; do [ $SECONDS -lt $end ] || { echo "timed out: $*" >&2; return 1; }; sleep 0.05; done
}
lines() { wc -l < "$B/requests.log"; }
fetches() { grep -c 'fetch done' "$B/plumb.log" || true; }
fetches_at_least() { [ "$(fetches)" -ge "$1" ]; }
all_deployed() { [ "$(ls "$B"/state/state/*.rev 2>/dev/null | wc -l)" -eq 20 ]; }

PLUMB_LOG=plumb=debug strace -f -qq -e trace=execve -o "$B/strace.log" "$PLUMB" -c "$B/plumb.toml" --hosts bench 2>"$B/plumb.log" &
STRACE=$!
wait_for 30 all_deployed
DPID=$(pgrep -P "$STRACE" -x plumb)
# Start right after an idle tick is logged, then count requests over TICKS more ticks (ticks are
# counted from the daemon's log, requests from the server's, so neither is inferred from the other).
f=$(fetches); wait_for 30 fetches_at_least $((f + 1))
c0=$(fetches); l0=$(lines); read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$DPID/stat")
wait_for $((TICKS * 5)) fetches_at_least $((c0 + TICKS))
c1=$(fetches); l1=$(lines); read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$DPID/stat")
ticks=$((c1 - c0)); nreq=$((l1 - l0))
reqs=$(tail -n "$nreq" "$B/requests.log" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s %s; ", $1, $2}')
hz=$(getconf CLK_TCK)
cpu_ms=$(( ( (u1 + s1) - (u0 + s0) ) * 1000 / hz ))
rss=$(awk '/^VmRSS/ {print $2}' "/proc/$DPID/status")
anon=$(awk '/^RssAnon/ {print $2}' "/proc/$DPID/status")
libs=$(awk '$6 ~ /\.so/ {print $6}' "/proc/$DPID/maps" | sort -u | xargs -n1 basename | tr '\n' ' ')
kill "$DPID"; wait "$STRACE" || true
# lighttpd writes its buffered access log when it stops: every idle answer has the same size.
kill "$(cat "$B/lighttpd.pid")"; for _ in $(seq 100); do kill -0 "$(cat "$B/lighttpd.pid")" 2>/dev/null || break; sleep 0.05; done
bytes=$(tail -n "$nreq" "$B/access.log" | awk '{b += $NF; n++} END {print (n ? int(b / n) : 0)}')
spawned=$(( $(grep -c 'execve(' "$B/strace.log") - 1 ))

table=$(cat <<TXT
| figure (20 services, one upstream, smart HTTP, $ticks idle ticks) | value |
|---|---|
| requests at the server per idle tick | $(awk "BEGIN {print $nreq / $ticks}") (${reqs% ; }) |
| bytes served per idle request | $bytes |
| processes spawned by the daemon (execve after its own) | $spawned |
| CPU time per idle tick | $(awk "BEGIN {printf \"%.1f\", $cpu_ms / $ticks}") ms |
| daemon RSS / private (RssAnon) | $rss KiB / $anon KiB |
| shared libraries mapped | $libs |
TXT
)
echo "$table"
{
  echo
  echo "## idle-tick, $(date -u +%Y-%m-%d), $(uname -m), $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
  echo
  echo "$table"
} >> bench/RESULTS.md
