#!/bin/bash
# Install the Debian packages plumb's build and tests need, and only those that are missing.
#
# Idempotent and non-interactive: safe to run as root with no TTY (CI) and on every run.
# `apt-get update` runs at most once, and only when something has to be installed.
# The Rust toolchain is not installed here: it comes with the machine.
set -euo pipefail

# One list, one group per line; append new groups here.
PACKAGES=(
  # build: git2's vendored libgit2 links zlib, found via pkg-config (TLS is rustls: no OpenSSL)
  pkg-config zlib1g-dev
  # git itself (the tests drive the real client; a newer /usr/local/bin/git wins on PATH if present)
  git
  # integration-test servers on loopback: smart HTTP (lighttpd + git-http-backend) and ssh
  # (and https, lighttpd's TLS module, with a test CA made by openssl)
  lighttpd lighttpd-mod-openssl openssl openssh-server openssh-client
  # signed commits: ssh-keygen verifies ssh signatures (openssh-client), gpgv OpenPGP ones; gpg (with its agent) signs in tests
  gpg gpg-agent gpgv
  # test tooling: HTTP probes, process and socket inspection (kill, ps, ss)
  curl procps iproute2
  # benchmarks: counting the processes the daemon spawns; plotting the fleet's rollout (bench/fleet.sh)
  strace gnuplot-nox
  # metrics: promtool checks a live scrape of the daemon (the package's daemon is not started)
  prometheus
  # systemd tests: systemd-analyze verify and systemd-escape (generator), and a real systemd booted
  # with systemd-nspawn from a debootstrapped rootfs cached as a zstd tarball
  systemd systemd-container debootstrap zstd
  # docs tests: the generated man pages are rendered by man and groff and must not warn; the
  # completion scripts are loaded by the shells they are for and complete in bash and fish
  man-db groff-base zsh fish
  # the NixOS module and the flake: scripts/check-nix.sh parses every .nix file with nix-instantiate,
  # evaluates the module with nixpkgs' lib, and renders its settings to TOML with tomli-w (Debian's
  # python3, which the package installs into) for `plumb check-config`
  nix-bin python3-tomli-w
  # the Debian package: scripts/lint-deb.sh checks it with lintian
  lintian
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: must run as root (apt-get install)" >&2
  exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [ "$status" != "install ok installed" ]; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps.sh: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

echo "install-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  "${missing[@]}" </dev/null
