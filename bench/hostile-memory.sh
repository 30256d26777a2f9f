#!/bin/bash
# What a big repository costs the daemon in memory: `plumb --once` against a local `git daemon`
# (git://, so the pack comes from a real git server: libgit2's own file:// transport packs objects
# in-process and is measured apart, with FILE_URL=1). Scenarios:
#   - 100,000 small files: fetch and checkout in one run;
#   - one 1 GiB file of random data (a 1 GiB pack): a run that only fetches it (the service's link
#     is elsewhere), then a run that checks it out from the fetched store (no fetch left to do).
# Prints peak RSS (VmHWM, exact, counts the mmap'd pack) and peak private memory (RssAnon, sampled
# every 20 ms) per run, and appends the table to $RESULTS (bench/RESULTS.md). Needs ~6 GB free
# under $TMPDIR; everything is made under one temporary directory and deleted afterwards.
# MAX_FILE_SIZE=... adds `max_file_size` to [plumb] (e.g. MAX_FILE_SIZE=2GiB to see a checkout of
# the 1 GiB file where the default limit refuses it).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-bench/RESULTS.md}
B=$(mktemp -d "${TMPDIR:-/tmp}/plumb-bench.XXXXXX"); chmod 755 "$B"
cleanup() {
  local status=$?
  [ ! -f "$B/daemon.pid" ] || kill "$(cat "$B/daemon.pid")" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$B"
  exit "$status"
}
trap cleanup EXIT
free_kb=$(df -Pk "$B" | awk 'NR == 2 {print $4}')
if [ "$free_kb" -lt $((6 * 1024 * 1024)) ]; then
  echo "hostile-memory: needs 6 GB free under $B, has $((free_kb / 1024)) MB" >&2
  exit 1
fi
cargo build --release --quiet --bin plumb
PLUMB=$PWD/target/release/plumb
# No compression when making the upstream: random data does not compress, and zlib at its default
# level makes the 1 GiB push take a minute. The pack plumb fetches is 1 GiB either way.
git() {
  command git -c user.name=bench -c user.email=bench@example.invalid \
    -c core.compression=0 -c pack.compression=0 -c gc.auto=0 "$@"
}

mkdir -p "$B/srv"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
git daemon --reuseaddr --export-all --base-path="$B/srv" --listen=127.0.0.1 --port="$PORT" \
  --pid-file="$B/daemon.pid" --detach "$B/srv"
for _ in $(seq 100); do ss -ltn | grep -q ":$PORT " && break; sleep 0.05; done

# upstream NAME: a bare repository served by git daemon and a work clone at $B/work/NAME.
upstream() {
  git init -q --bare -b main "$B/srv/$1.git"
  git clone -q "$B/srv/$1.git" "$B/work/$1" 2>/dev/null
}
push() { git -C "$B/work/$1" add -A; git -C "$B/work/$1" commit -qm "$1"; git -C "$B/work/$1" push -q origin main; }

# config FILE STATE URL LINK: one service `svc` on URL deploying LINK.
config() {
  {
    printf '[plumb]\nstate_dir = "%s"\nsocket = "%s.sock"\ninterval = "1s"\nmetrics_address = ""\n' "$2" "$2"
    [ -z "${MAX_FILE_SIZE:-}" ] || printf 'max_file_size = "%s"\n' "$MAX_FILE_SIZE"
    printf '\n[[services]]\nmachine = "bench"\nservice = "svc"\nupstream = "%s"\n' "$3"
    printf 'dirs = [{ local = "/srv/svc", link = "%s" }]\n' "$4"
  } > "$1"
}

ROWS=""
# measure LABEL CONFIG: runs `plumb --once`, samples its memory, adds a row to the table.
measure() {
  local label=$1 cfg=$2 hwm=0 anon=0 start end status line
  start=$(date +%s.%N)
  "$PLUMB" -c "$cfg" --hosts bench --once > "$B/out" 2> "$B/err" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if read -r h a < <(awk '/^VmHWM/ {h = $2} /^RssAnon/ {a = $2} END {print h + 0, a + 0}' "/proc/$pid/status" 2>/dev/null); then
      [ "$h" -le "$hwm" ] || hwm=$h
      [ "$a" -le "$anon" ] || anon=$a
    fi
    sleep 0.02
  done
  status=0; wait "$pid" || status=$?
  end=$(date +%s.%N)
  line=$(awk '$1 == "svc" {$1 = ""; print; exit}' "$B/out" | sed 's/^ *//')
  [ -n "$line" ] || line="exit $status: $(tail -n 1 "$B/err")"
  ROWS+="| $label | $line | $(awk "BEGIN {printf \"%.1f\", $end - $start}") s | $((hwm / 1024)) MiB | $((anon / 1024)) MiB |"$'\n'
  echo "$label: ${line:0:100}; peak RSS $((hwm / 1024)) MiB, private $((anon / 1024)) MiB" >&2
}

# 100,000 small files in 100 directories.
upstream many
python3 - "$B/work/many" <<'PY'
import os, sys
for d in range(100):
    p = os.path.join(sys.argv[1], "svc", f"d{d:03}")
    os.makedirs(p)
    for f in range(1000):
        with open(os.path.join(p, f"f{f:04}.conf"), "w") as fh:
            fh.write(f"file {d} {f}\n")
PY
push many; rm -rf "$B/work/many"
config "$B/many.toml" "$B/state-many" "git://127.0.0.1:$PORT/many.git" svc
measure "100,000 files: fetch + checkout" "$B/many.toml"
measure "100,000 files: idle run (fetch, drift)" "$B/many.toml"
files=$(find "$B/state-many/checkouts/svc" -type f | wc -l)
rm -rf "$B/state-many"

# One 1 GiB file of random data, and a small one beside it.
upstream big
mkdir -p "$B/work/big/svc" "$B/work/big/small"
head -c 1G /dev/urandom > "$B/work/big/svc/blob"
echo small > "$B/work/big/small/conf"
push big; rm -rf "$B/work/big"
config "$B/fetch.toml" "$B/state-fetch" "git://127.0.0.1:$PORT/big.git" small
measure "1 GiB file: fetch only (link elsewhere)" "$B/fetch.toml"
# The same store (hard links: packs are never written again), a service on the big file.
mkdir -p "$B/state-checkout"; cp -al "$B/state-fetch/stores" "$B/state-checkout/"
rm -rf "$B/state-fetch"
config "$B/checkout.toml" "$B/state-checkout" "git://127.0.0.1:$PORT/big.git" svc
measure "1 GiB file: checkout from the store" "$B/checkout.toml"
rm -rf "$B/state-checkout"
if [ -n "${FILE_URL:-}" ]; then
  config "$B/file.toml" "$B/state-file" "file://$B/srv/big.git" small
  measure "1 GiB file: fetch only, file:// (libgit2 packs in-process)" "$B/file.toml"
  rm -rf "$B/state-file"
fi

table=$(cat <<TXT
| run (plumb --once, git daemon on loopback${MAX_FILE_SIZE:+, max_file_size = $MAX_FILE_SIZE}) | service afterwards | wall | peak RSS (VmHWM) | peak private (RssAnon) |
|---|---|---|---|---|
${ROWS%$'\n'}
TXT
)
echo "$table"
echo "(files in the 100,000-file checkout: $files)"
{
  echo
  echo "## hostile-memory, $(date -u +%Y-%m-%d), $(uname -m), $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
  echo
  echo "$table"
} >> "$RESULTS"
