#!/bin/bash
# Checks the Nix files (flake.nix, nix/, nixos-module/) as far as a machine without nixpkgs can:
# every .nix file of the repository must parse (`nix-instantiate --parse`, Debian's nix-bin, which
# scripts/install-deps.sh installs). CI runs this from .ci/run.
#
# With NIXPKGS_LIB set to a nixpkgs lib/ directory (any nixpkgs checkout's, or a lib-only one), it
# also evaluates the NixOS module through the real lib.evalModules (nix/eval-test.nix) and, when
# remarshal's json2toml is on PATH, renders each tested configuration to TOML as
# pkgs.formats.toml does and runs `plumb check-config` on it (PLUMB_BIN, default target/debug/plumb).
# CI has no nixpkgs, so there it only parses.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's nix-bin is configured for a nixbld group that a plain install does not create; nothing
# here builds, so no build users are needed.
export NIX_CONFIG="build-users-group ="

if ! command -v nix-instantiate >/dev/null; then
  echo "check-nix.sh: nix-instantiate not found (apt-get install nix-bin, or scripts/install-deps.sh)" >&2
  exit 1
fi

# Tracked files and new ones not ignored, so a file is checked before its first commit too.
mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.nix' | sort -u)
if [ "${#files[@]}" -eq 0 ]; then
  echo "check-nix.sh: no .nix files found" >&2
  exit 1
fi
failed=0
for f in "${files[@]}"; do
  if ! nix-instantiate --readonly-mode --parse "$f" >/dev/null; then
    echo "check-nix.sh: $f does not parse" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] || exit 1
echo "check-nix.sh: ${#files[@]} .nix files parse"

if [ -z "${NIXPKGS_LIB:-}" ]; then
  exit 0
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
nix-instantiate --readonly-mode --eval --strict --json nix/eval-test.nix \
  --arg lib "import $(realpath "$NIXPKGS_LIB")" >"$out/eval.json"
python3 -c 'import json, sys; print("check-nix.sh: evalModules:", json.load(open(sys.argv[1]))["passed"], "checks pass")' "$out/eval.json"

if ! command -v json2toml >/dev/null; then
  echo "check-nix.sh: json2toml (remarshal) not on PATH: rendered configs not checked"
  exit 0
fi
plumb=${PLUMB_BIN:-target/debug/plumb}
for name in $(python3 -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["rendered"]))' "$out/eval.json"); do
  python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["rendered"][sys.argv[2]]))' \
    "$out/eval.json" "$name" >"$out/$name.json"
  json2toml "$out/$name.json" "$out/$name.toml"
  # Every machine name the test configurations use, so the per-machine checks apply to all.
  if ! "$plumb" check-config "$out/$name.toml" --hosts web1,testhost >"$out/$name.out" 2>&1; then
    cat "$out/$name.out" >&2
    echo "check-nix.sh: the rendered $name config is refused by plumb check-config" >&2
    exit 1
  fi
done
echo "check-nix.sh: rendered configs pass plumb check-config"
