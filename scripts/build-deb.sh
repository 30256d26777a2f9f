#!/bin/bash
# Builds plumb's Debian package with dpkg-deb: the binaries (stripped), the generator, the units,
# man pages and shell completions (generated from the clap definitions), an example config, the
# changelog, the copyright and the maintainer scripts of packaging/deb/.
# `scripts/lint-deb.sh` runs lintian on it (CI does).
#
# usage: scripts/build-deb.sh [--bin-dir DIR] [--docs-dir DIR] [--version V] [--fast] [OUT.deb]
#   --bin-dir DIR   take plumb, plumbctl and plumb-generator from DIR (default: cargo build --release)
#   --docs-dir DIR  take man/ and completions/ from DIR (default: cargo run --example gen-docs)
#   --version V     the package's version (default: Cargo.toml's); the tests build a newer
#                   package of the same binaries to upgrade to
#   --fast          no compression (the tests build a package per run)
#   OUT.deb         default: ${CARGO_TARGET_DIR:-target}/debian/plumb_<version>_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR= DOCS_DIR= VERSION= COMPRESS=(-Zxz) OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --docs-dir) DOCS_DIR=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --fast) COMPRESS=(-Znone); shift ;;
    -*) echo "build-deb.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done

# A native package (the project packages itself): no Debian revision, the version is Cargo.toml's.
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)}
ARCH=$(dpkg --print-architecture)
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET/debian/plumb_${VERSION}_${ARCH}.deb}
MAINTAINER="plumb developers <dev@plumb.invalid>"
# The changelog's date: the last commit's (the same package from the same tree), else now.
DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || true)

if [ -z "$BIN_DIR" ]; then
  cargo build --release --quiet --bins
  BIN_DIR=$TARGET/release
fi
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/plumb-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
if [ -z "$DOCS_DIR" ]; then
  DOCS_DIR=$STAGE/docs
  cargo run --quiet --example gen-docs -- "$DOCS_DIR" >/dev/null
fi

R=$STAGE/root
DOC=$R/usr/share/doc/plumb
install -d "$R/DEBIAN" "$R/usr/bin" "$R/usr/lib/systemd/system/plumb.service.d" \
  "$R/usr/lib/systemd/system-generators" "$R/usr/share/man/man1" "$R/usr/share/man/man5" \
  "$R/usr/share/man/man8" \
  "$DOC/examples" "$R/usr/share/bash-completion/completions" \
  "$R/usr/share/zsh/vendor-completions" "$R/usr/share/fish/vendor_completions.d"

# Stripped as dh_strip does (Debian policy 10.1, and lintian's unstripped-binary-or-object): no
# symbol table left, so a panic's backtrace shows addresses, not function names. Rebuild with
# symbols (or run the binaries of target/release) to read one.
install -m 0755 "$BIN_DIR/plumb" "$BIN_DIR/plumbctl" "$R/usr/bin/"
install -m 0755 "$BIN_DIR/plumb-generator" "$R/usr/lib/systemd/system-generators/"
for bin in "$R/usr/bin/plumb" "$R/usr/bin/plumbctl" \
  "$R/usr/lib/systemd/system-generators/plumb-generator"; do
  strip --remove-section=.comment --remove-section=.note "$bin"
done
# plumb-config.path starts plumb once a config exists; plumb.service's drop-in pulls it in.
install -m 0644 units/plumb.service units/plumb-apply@.service units/plumb-config.path \
  "$R/usr/lib/systemd/system/"
install -m 0644 units/plumb.service.d/plumb-config.conf "$R/usr/lib/systemd/system/plumb.service.d/"

for page in "$DOCS_DIR"/man/*.[0-9]; do
  section=${page##*.}
  gzip -9n < "$page" > "$R/usr/share/man/man$section/$(basename "$page").gz"
done
install -m 0644 "$DOCS_DIR/completions/plumbctl.bash" "$R/usr/share/bash-completion/completions/plumbctl"
install -m 0644 "$DOCS_DIR/completions/plumb.bash" "$R/usr/share/bash-completion/completions/plumb"
install -m 0644 "$DOCS_DIR"/completions/_plumb* "$R/usr/share/zsh/vendor-completions/"
install -m 0644 "$DOCS_DIR"/completions/*.fish "$R/usr/share/fish/vendor_completions.d/"
install -m 0644 packaging/deb/copyright "$DOC/copyright"
install -m 0644 packaging/deb/plumb.toml.example "$DOC/examples/plumb.toml"
# A native package's changelog is changelog.gz: one entry, this version's, from Cargo.toml.
{
  echo "plumb ($VERSION) unstable; urgency=medium"
  echo
  echo "  * plumb $VERSION${COMMIT:+, built from commit $COMMIT}. The changes are in"
  echo "    the project's git history."
  echo
  echo " -- $MAINTAINER  $(date -u -R -d "@$DATE_EPOCH")"
} | gzip -9n > "$DOC/changelog.gz"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$R/DEBIAN/"

# Shared libraries as linked (glibc, libgcc, zlib): TLS is rustls, compiled in. ssh upstreams use
# the system's OpenSSH client and file:// ones git-upload-pack (Recommends).
# deb-systemd-helper and deb-systemd-invoke (maintainer scripts) are in init-system-helpers,
# which is Essential.
cat > "$R/DEBIAN/control" <<CONTROL
Package: plumb
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $(du -sk "$R/usr" | cut -f1)
Depends: libc6, libgcc-s1, zlib1g, systemd, passwd
Recommends: openssh-client, git, gpgv
Section: admin
Priority: optional
Description: GitOps for the machines you run yourself
 plumb keeps, per service, a checkout of the service's directories of a git
 repository, with full history; systemd bind-mounts them onto the real paths
 and the service is reloaded when, and only when, its files changed. Operators
 freeze, roll back and pull with plumbctl, and follow rollouts in Prometheus.
CONTROL
# What `dpkg --verify` and debsums check the installed files against.
(cd "$R" && find usr -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum) > "$R/DEBIAN/md5sums"

mkdir -p "$(dirname "$OUT")"
dpkg-deb --root-owner-group "${COMPRESS[@]}" --build "$R" "$OUT" >/dev/null
echo "$OUT"
