#!/bin/bash
# Builds (or unpacks from cache) the Debian bookworm rootfs the systemd tests boot with systemd-nspawn.
#
# usage: tests/infra/rootfs.sh DIR     -> DIR holds the rootfs (replaced)
# The tarball is cached under /var/cache/plumb-ci, keyed by this script's own hash: change the script,
# get a fresh rootfs. Needs root and the Debian mirror named in the host's apt sources.
set -euo pipefail
ROOT=${1:?usage: rootfs.sh DIR}
KEY=$(sha256sum "$0" | cut -c1-16)
CACHE_DIR=/var/cache/plumb-ci
CACHE=$CACHE_DIR/rootfs-bookworm-$KEY.tar.zst
export DEBIAN_FRONTEND=noninteractive

need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v zstd >/dev/null || need+=(zstd)
if [ ${#need[@]} -gt 0 ]; then apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}" </dev/null; fi

rm -rf "$ROOT"; mkdir -p "$ROOT"
if [ ! -f "$CACHE" ]; then
  MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
  BUILD=$(mktemp -d /var/tmp/plumb-rootfs.XXXXXX)
  trap 'rm -rf "$BUILD"' EXIT
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,procps,nginx-light,ca-certificates,curl,iproute2,man-db \
    bookworm "$BUILD" "$MIRROR"
  chmod 0755 "$BUILD"                    # mktemp made it 0700: dbus-daemon could not reach /
  echo plumb-ci > "$BUILD/etc/hostname"
  : > "$BUILD/etc/machine-id"            # a new one on every boot
  rm -f "$BUILD/var/lib/dbus/machine-id" # else every container shares the one debootstrap made
  chroot "$BUILD" systemctl mask systemd-timesyncd.service getty@.service console-getty.service \
    systemd-networkd.service systemd-resolved.service 2>/dev/null || true
  rm -rf "$BUILD"/var/cache/apt/archives/*.deb "$BUILD"/var/lib/apt/lists/*
  mkdir -p "$CACHE_DIR"
  rm -f "$CACHE_DIR"/rootfs-bookworm-*.tar.zst     # older keys are dead weight
  tar -C "$BUILD" --zstd -cpf "$CACHE.part" . && mv "$CACHE.part" "$CACHE"
fi
tar -C "$ROOT" --zstd -xpf "$CACHE"
