#!/bin/bash
# Builds plumb's Debian package with dpkg-deb: the binaries, the generator, the units, man pages and
# shell completions (generated from the clap definitions), an example config and the maintainer
# scripts of packaging/deb/.
#
# usage: scripts/build-deb.sh [--bin-dir DIR] [--docs-dir DIR] [--fast] [OUT.deb]
#   --bin-dir DIR   take plumb, plumbctl and plumb-generator from DIR (default: cargo build --release)
#   --docs-dir DIR  take man/ and completions/ from DIR (default: cargo run --example gen-docs)
#   --fast          no compression (the tests build a package per run)
#   OUT.deb         default: target/debian/plumb_<version>_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR= DOCS_DIR= COMPRESS=(-Zxz) OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --docs-dir) DOCS_DIR=$2; shift 2 ;;
    --fast) COMPRESS=(-Znone); shift ;;
    -*) echo "build-deb.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
ARCH=$(dpkg --print-architecture)
OUT=${OUT:-target/debian/plumb_${VERSION}_${ARCH}.deb}

if [ -z "$BIN_DIR" ]; then
  cargo build --release --quiet --bins
  BIN_DIR=target/release
fi
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/plumb-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
if [ -z "$DOCS_DIR" ]; then
  DOCS_DIR=$STAGE/docs
  cargo run --quiet --example gen-docs -- "$DOCS_DIR" >/dev/null
fi

R=$STAGE/root
install -d "$R/DEBIAN" "$R/usr/bin" "$R/usr/lib/systemd/system" \
  "$R/usr/lib/systemd/system-generators" "$R/usr/share/man/man5" "$R/usr/share/man/man8" \
  "$R/usr/share/doc/plumb/examples" "$R/usr/share/bash-completion/completions" \
  "$R/usr/share/zsh/vendor-completions" "$R/usr/share/fish/vendor_completions.d"
# Debug info stripped, symbols kept: a panic's backtrace still names functions.
for bin in plumb plumbctl; do
  install -m 0755 "$BIN_DIR/$bin" "$R/usr/bin/$bin"
  strip --strip-debug "$R/usr/bin/$bin"
done
install -m 0755 "$BIN_DIR/plumb-generator" "$R/usr/lib/systemd/system-generators/plumb-generator"
strip --strip-debug "$R/usr/lib/systemd/system-generators/plumb-generator"
install -m 0644 units/plumb.service units/plumb-apply@.service "$R/usr/lib/systemd/system/"

for page in "$DOCS_DIR"/man/*.[0-9]; do
  section=${page##*.}
  gzip -9n < "$page" > "$R/usr/share/man/man$section/$(basename "$page").gz"
done
install -m 0644 "$DOCS_DIR/completions/plumbctl.bash" "$R/usr/share/bash-completion/completions/plumbctl"
install -m 0644 "$DOCS_DIR/completions/plumb.bash" "$R/usr/share/bash-completion/completions/plumb"
install -m 0644 "$DOCS_DIR"/completions/_plumb* "$R/usr/share/zsh/vendor-completions/"
install -m 0644 "$DOCS_DIR"/completions/*.fish "$R/usr/share/fish/vendor_completions.d/"
install -m 0644 packaging/deb/copyright "$R/usr/share/doc/plumb/copyright"
install -m 0644 packaging/deb/plumb.toml.example "$R/usr/share/doc/plumb/examples/plumb.toml"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$R/DEBIAN/"

# Shared libraries as linked (libssl, libcrypto, zlib); Debian 13 renamed libssl3 to libssl3t64.
cat > "$R/DEBIAN/control" <<CONTROL
Package: plumb
Version: $VERSION
Architecture: $ARCH
Maintainer: plumb developers <dev@plumb.invalid>
Installed-Size: $(du -sk "$R/usr" | cut -f1)
Depends: libc6, libgcc-s1, libssl3 | libssl3t64, zlib1g, systemd, passwd
Recommends: openssh-client, gpgv
Section: admin
Priority: optional
Description: GitOps for the machines you run yourself
 plumb keeps, per service, a checkout of the service's directories of a git
 repository, with full history; systemd bind-mounts them onto the real paths
 and the service is reloaded when, and only when, its files changed. Operators
 freeze, roll back and pull with plumbctl, and follow rollouts in Prometheus.
CONTROL

mkdir -p "$(dirname "$OUT")"
dpkg-deb --root-owner-group "${COMPRESS[@]}" --build "$R" "$OUT" >/dev/null
echo "$OUT"
