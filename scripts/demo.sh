#!/bin/bash
# The demo: a local example upstream, `plumb --once`, and a service's checkout following a commit.
#
# Everything lives under $DEMO (default /tmp/plumb-demo) and is left there to poke at afterwards.
# It grows into the full loop on a real systemd (mounts, reloads, plumbctl) with the systemd work.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO:-/tmp/plumb-demo}
cargo build --release --quiet --bins
PLUMB=$PWD/target/release/plumb

rm -rf "$DEMO"; mkdir -p "$DEMO"
git() { command git -c user.name=demo -c user.email=demo@example.invalid "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "an upstream with two services' files: nginx/ and grafana/"
git init -q --bare -b main "$DEMO/upstream.git"
git clone -q "$DEMO/upstream.git" "$DEMO/work" 2>/dev/null
mkdir -p "$DEMO/work/nginx/conf.d" "$DEMO/work/grafana/dashboards"
echo 'server { listen 8081; return 200 "v1\n"; }' > "$DEMO/work/nginx/conf.d/site.conf"
echo '{"title": "fleet"}' > "$DEMO/work/grafana/dashboards/fleet.json"
echo 'files no service uses' > "$DEMO/work/README"
git -C "$DEMO/work" add -A; git -C "$DEMO/work" commit -qm "nginx and grafana"; git -C "$DEMO/work" push -q origin main
git -C "$DEMO/work" log --oneline

cat > "$DEMO/plumb.toml" <<TOML
# gitopper's format, plus plumb's own [plumb] table.
[global]
upstream = "file://$DEMO/upstream.git"
branch = "main"
mount = "$DEMO/checkouts"

[plumb]
state_dir = "$DEMO/state"
interval = "10s"

[[services]]
machine = "demo"
service = "nginx"
action = "reload"
dirs = [ { local = "/etc/nginx/conf.d", link = "nginx/conf.d" } ]

[[services]]
machine = "demo"
service = "grafana"
action = "restart"
dirs = [ { local = "/var/lib/grafana/dashboards", link = "grafana/dashboards" } ]
TOML

say "plumb check-config: what this machine would run"
"$PLUMB" check-config "$DEMO/plumb.toml" --hosts demo

say "plumb --once: fetch, check out each service's paths, write the deployed revision"
"$PLUMB" -c "$DEMO/plumb.toml" --hosts demo --once
( cd "$DEMO/checkouts" && find . -type f | sort )
for s in nginx grafana; do echo "$s.rev: $(cat "$DEMO/state/state/$s.rev")"; done

say "a commit that changes only nginx's files"
sed -i 's/v1/v2/' "$DEMO/work/nginx/conf.d/site.conf"
git -C "$DEMO/work" commit -qam "nginx v2"; git -C "$DEMO/work" push -q origin main
"$PLUMB" -c "$DEMO/plumb.toml" --hosts demo --once
for s in nginx grafana; do echo "$s.rev: $(cat "$DEMO/state/state/$s.rev")"; done
echo "nginx now serves: $(cat "$DEMO/checkouts/nginx/nginx/conf.d/site.conf")"
git -C "$DEMO/work" log --oneline

say "done: poke at it"
cat <<TXT
  config        $DEMO/plumb.toml
  upstream      $DEMO/work  (commit and push here)
  checkouts     $DEMO/checkouts/<service>/
  state         $DEMO/state/state/<service>.{rev,json}
  run again     $PLUMB -c $DEMO/plumb.toml --hosts demo --once
  or the daemon $PLUMB -c $DEMO/plumb.toml --hosts demo     (polls every 10s; SIGHUP re-reads the config)
TXT
