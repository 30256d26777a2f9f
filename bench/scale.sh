#!/bin/bash
# How the daemon's idle cost grows with the number of services: 20, 200 and 1,000 services on one
# upstream (the fleet fixture of bench/lib.sh, COMMITS commits of history each), smart HTTP, idle
# ticks every 2 s. Per count: CPU per idle tick, RSS and private memory at idle and after ten scrapes
# of /metrics, threads. Prints the table and appends it to $RESULTS (bench/RESULTS.md). The first
# count runs once more with a log beside every checkout that the service's .gitignore covers (a
# service writing into its own directory). CARGO_TARGET_DIR is honoured; PLUMB=/path measures that
# binary without building; COUNTS="20 200" measures other counts.
source "$(dirname "$0")/lib.sh"
TICKS=${TICKS:-5}
COMMITS=${COMMITS:-400}
COUNTS=${COUNTS:-20 200 1000}
bench_init
bench_build
for n in $COUNTS; do
  rm -rf "$B/srv"
  make_fleet "$n" "$COMMITS"
  DEPLOY_WAIT=$((60 + n / 5)) plumb_idle "scale$n" "$n" "$TICKS"
done
# The first count again, each service writing a log its .gitignore covers beside its checkout.
first=${COUNTS%% *}
rm -rf "$B/srv"
make_fleet "$first" "$COMMITS" ignore
BESIDE=app.log plumb_idle "ignored$first" "$first" "$TICKS"
{
  echo
  echo "## scale, $(date -u +%F), $(uname -m), $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo | awk '{print $1, $2}'), plumb $("$PLUMB" --version | awk '{print $2}')"
  echo
  echo "| services on one upstream ($COMMITS commits) | CPU per idle tick | vs $first | RSS | private (RssAnon) | private after 10 scrapes | threads |"
  echo "|---|---|---|---|---|---|---|"
  for n in $COUNTS; do
    cpu=$(per "$(fig "scale$n" cpu_ms)" "$(fig "scale$n" ticks)")
    base=$(per "$(fig "scale$first" cpu_ms)" "$(fig "scale$first" ticks)")
    echo "| $n | $cpu ms | $(per "$cpu" "$base")x | $(fig "scale$n" VmRSS) KiB | $(fig "scale$n" RssAnon) KiB | $(fig "scale$n" scraped_RssAnon) KiB | $(fig "scale$n" Threads) |"
  done
  cpu=$(per "$(fig "ignored$first" cpu_ms)" "$(fig "ignored$first" ticks)")
  echo "| $first, each with a log its .gitignore covers beside the checkout | $cpu ms | $(per "$cpu" "$base")x | $(fig "ignored$first" VmRSS) KiB | $(fig "ignored$first" RssAnon) KiB | $(fig "ignored$first" scraped_RssAnon) KiB | $(fig "ignored$first" Threads) |"
  echo
  echo "$TICKS idle ticks per count after the first, interval 2s, MALLOC_ARENA_MAX=1 and GLIBC_TUNABLES=$PLUMB_TUNABLES as plumb.service sets them. CPU is the daemon's user + system time over those ticks, in clock ticks of 10 ms: small figures are coarse. Other work on the machine makes CPU figures noisy."
} | tee -a "$RESULTS"
