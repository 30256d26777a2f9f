#!/bin/bash
# The demo: the whole loop on a real systemd. A Debian container (systemd-nspawn) runs plumb, which
# manages nginx from an upstream on this machine; a scripted commit changes the page and it arrives
# by itself. The container is left running, with instructions to make your own commit.
#
#   scripts/demo.sh          build, boot, run the loop, leave it running
#   scripts/demo.sh stop     stop the container and the git server
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEMO=${DEMO:-/var/lib/plumb-demo}
ROOT=$DEMO/rootfs
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

stop() {
  [ -f "$DEMO/nspawn.pid" ] && kill -TERM "$(cat "$DEMO/nspawn.pid")" 2>/dev/null || true
  for _ in $(seq 100); do [ -f "$DEMO/nspawn.pid" ] && kill -0 "$(cat "$DEMO/nspawn.pid")" 2>/dev/null || break; sleep 0.1; done
  [ -f "$DEMO/gitd.pid" ] && kill "$(cat "$DEMO/gitd.pid")" 2>/dev/null || true
  rm -f "$DEMO/nspawn.pid" "$DEMO/gitd.pid"
}
if [ "${1:-}" = stop ]; then stop; echo "demo stopped"; exit 0; fi
stop

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
  local end=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { echo "timed out waiting for $what" >&2; return 1; }
    sleep 0.1
  done
}
git() { command git -c user.name=demo -c user.email=demo@example.invalid "$@"; }

say "building plumb and its Debian package"
DEB=$(bash scripts/build-deb.sh)

say "a Debian container with systemd and nginx (built once, then cached), plumb's package installed"
bash tests/infra/rootfs.sh "$ROOT"
# The package's postinst runs in the container's root: groups, state directory, plumb.service enabled.
dpkg --root="$ROOT" -i "$DEB" >/dev/null
echo plumb-demo > "$ROOT/etc/hostname"
# The container shares this machine's network: nginx serves only what git gives it, not :80.
rm -f "$ROOT/etc/nginx/sites-enabled/default"

say "an upstream on this machine, served by git daemon"
GIT_PORT=$(free_port); WEB_PORT=$(free_port)
rm -rf "$DEMO/srv" "$DEMO/work"; mkdir -p "$DEMO/srv"
git init -q --bare -b main "$DEMO/srv/config.git"
touch "$DEMO/srv/config.git/git-daemon-export-ok"
git clone -q "$DEMO/srv/config.git" "$DEMO/work" 2>/dev/null
mkdir -p "$DEMO/work/nginx/conf.d" "$DEMO/work/grafana"
printf 'server {\n  listen %s;\n  location / { return 200 "hello from git: v1\\n"; }\n}\n' "$WEB_PORT" \
  > "$DEMO/work/nginx/conf.d/demo.conf"
echo "another service's files" > "$DEMO/work/grafana/dashboard.json"
git -C "$DEMO/work" add -A; git -C "$DEMO/work" commit -qm "nginx serves v1"; git -C "$DEMO/work" push -q origin main
command git daemon --reuseaddr --listen=127.0.0.1 --port="$GIT_PORT" --base-path="$DEMO/srv" \
  --export-all --detach --pid-file="$DEMO/gitd.pid"
wait_for 10 "git daemon" command git ls-remote "git://127.0.0.1:$GIT_PORT/config.git"

mkdir -p "$ROOT/etc/plumb"
cat > "$ROOT/etc/plumb/plumb.toml" <<TOML
[global]
upstream = "git://127.0.0.1:$GIT_PORT/config.git"

[plumb]
interval = "5s"

[[services]]
machine = "plumb-demo"
service = "nginx"
action = "reload"
dirs = [ { local = "/etc/nginx/conf.d", link = "nginx/conf.d" } ]
TOML

say "booting the container: plumb starts, clones, systemd mounts nginx's config from git"
systemd-nspawn -D "$ROOT" -M plumb-demo -b --register=no --keep-unit --console=passive \
  </dev/null >"$DEMO/nspawn.log" 2>&1 &
echo $! > "$DEMO/nspawn.pid"
leader() { pgrep -P "$(cat "$DEMO/nspawn.pid")" -o; }
wait_for 30 "the container" leader
L=$(leader); IN="nsenter -t $L -a"
wait_for 60 "systemd in the container" $IN systemctl is-system-running --wait
page() { curl -s "http://127.0.0.1:$WEB_PORT/"; }
serves() { [ "$(page)" = "$1" ]; }
wait_for 60 "nginx to serve v1 from git" serves "hello from git: v1"
echo "curl http://127.0.0.1:$WEB_PORT/ -> $(page)"
$IN findmnt -n -o TARGET,SOURCE /etc/nginx/conf.d || true

say "a commit upstream; nobody touches the container"
sed -i 's/v1/v2/' "$DEMO/work/nginx/conf.d/demo.conf"
git -C "$DEMO/work" commit -qam "nginx serves v2"; git -C "$DEMO/work" push -q origin main
start=$SECONDS
wait_for 60 "nginx to serve v2" serves "hello from git: v2"
echo "curl http://127.0.0.1:$WEB_PORT/ -> $(page)   (after $((SECONDS - start)) s)"
$IN journalctl -u plumb -u plumb-apply@nginx --no-pager -n 8 -o cat || true

say "plumbctl inside the container, and the metrics"
$IN plumbctl list services || true
curl -s "http://127.0.0.1:9222/metrics" | grep '^plumb_service_hash' || true

say "done: the container is running"
cat <<TXT
  make a commit     cd $DEMO/work && \$EDITOR nginx/conf.d/demo.conf && git commit -am next && git push
  watch it arrive   watch curl -s http://127.0.0.1:$WEB_PORT/
  plumbctl          nsenter -t $L -a plumbctl status nginx
                    nsenter -t $L -a plumbctl freeze nginx 10m    (then commit: nothing arrives)
                    nsenter -t $L -a plumbctl diff nginx; nsenter -t $L -a plumbctl unfreeze nginx
                    nsenter -t $L -a plumbctl rollback nginx HASH; nsenter -t $L -a plumbctl log
  metrics           curl -s http://127.0.0.1:9222/metrics | grep plumb_
  inside            nsenter -t $L -a bash
                    systemctl status plumb plumb-apply@nginx; journalctl -u plumb
  stop it           $REPO/scripts/demo.sh stop
TXT
