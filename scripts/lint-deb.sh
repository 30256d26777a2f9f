#!/bin/bash
# Runs lintian on plumb's Debian package and fails on any error or warning (CI runs it). The
# package has no overrides.
#
# usage: scripts/lint-deb.sh [PKG.deb]
#   PKG.deb  the package to check; default: one built by scripts/build-deb.sh from binaries already
#            built (${CARGO_TARGET_DIR:-target}/debug, as `make test` leaves them, else .../release;
#            else a release build). lintian's checks are about the packaging: which build of the
#            same sources the binaries come from makes no difference to them.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v lintian >/dev/null; then
  echo "lint-deb.sh: lintian is not installed (scripts/install-deps.sh installs it)" >&2
  exit 1
fi

DEB=${1:-}
if [ -z "$DEB" ]; then
  TARGET=${CARGO_TARGET_DIR:-target}
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/plumb-lint.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  args=()
  for profile in debug release; do
    dir=$TARGET/$profile
    if [ -x "$dir/plumb" ] && [ -x "$dir/plumbctl" ] && [ -x "$dir/plumb-generator" ]; then
      args=(--bin-dir "$dir")
      break
    fi
  done
  DEB=$(bash scripts/build-deb.sh "${args[@]}" "$WORK/plumb.deb")
fi

# --fail-on: lintian's exit status says whether an error or a warning was found; info and
# pedantic tags are printed but do not fail (hardening-no-fortify-functions: Rust does not use
# glibc's fortified functions; package-supports-alternative-init-but-no-init.d-script: plumb
# needs systemd).
lintian --fail-on error,warning --display-level '>=info' --tag-display-limit 0 "$DEB"
echo "lint-deb.sh: lintian found no error or warning in $(basename "$DEB")"
