#!/bin/bash
# Checks the Nix files (flake.nix, nix/, nixos-module/) as far as a machine without nixpkgs' packages
# can. CI runs this from .ci/run.
#
# 1. Every .nix file of the repository parses (`nix-instantiate --parse`, Debian's nix-bin, which
#    scripts/install-deps.sh installs).
# 2. With nixpkgs' lib (NIXPKGS_LIB, else ../shared/nixpkgs-lib beside the repository: a nixpkgs
#    checkout or a lib-only copy such as nix-community/nixpkgs.lib, or its lib/ directory),
#    nix/eval-test.nix evaluates the NixOS module and the flake's module through the real
#    lib.evalModules and checks what they set; each configuration that must fail evaluation fails,
#    with the words of NixOS's message that it expects.
# 3. For each configuration whose /etc/plumb/plumb.toml the module builds with `plumb check-config`,
#    the settings are rendered to TOML as pkgs.formats.toml does and the module's own build script
#    runs on them, with plumb (PLUMB_BIN, default $CARGO_TARGET_DIR/debug/plumb, else
#    target/debug/plumb) in place of the package's: it must pass, or fail with the expected refusal.
#
# Without a lib, steps 2 and 3 are skipped with one line saying so: never a failure, so a checkout
# without the copy beside it still passes.
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

# nixpkgs' lib: the directory holding lib's default.nix, given as it or as its parent.
lib_dir() {
  if [ -f "$1/lib/modules.nix" ]; then
    realpath "$1/lib"
  elif [ -f "$1/modules.nix" ]; then
    realpath "$1"
  else
    return 1
  fi
}
if [ -n "${NIXPKGS_LIB:-}" ]; then
  # Asked for by name: a wrong path is an error, not a skip.
  if ! lib=$(lib_dir "$NIXPKGS_LIB"); then
    echo "check-nix.sh: NIXPKGS_LIB=$NIXPKGS_LIB is not nixpkgs' lib (no lib/modules.nix or modules.nix in it)" >&2
    exit 1
  fi
elif ! lib=$(lib_dir ../shared/nixpkgs-lib); then
  echo "check-nix.sh: *** NixOS module NOT EVALUATED: no nixpkgs lib (NIXPKGS_LIB is unset and $(realpath -m ../shared/nixpkgs-lib) has none); only parsing was checked ***"
  exit 0
fi

# Debian's python3 has tomli-w (python3-tomli-w); a python3 earlier on PATH (pyenv, a venv) may not.
python=
for p in python3 /usr/bin/python3; do
  if command -v "$p" >/dev/null && "$p" -c 'import tomli_w, tomllib' 2>/dev/null; then
    python=$p
    break
  fi
done
if [ -z "$python" ]; then
  echo "check-nix.sh: no python3 with tomli_w and tomllib (apt-get install python3-tomli-w, or scripts/install-deps.sh)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
eval_test() {
  nix-instantiate --readonly-mode --eval --strict nix/eval-test.nix --arg lib "import $lib" "$@"
}
if ! eval_test --json >"$work/eval.json" 2>"$work/eval.err"; then
  cat "$work/eval.err" >&2
  echo "check-nix.sh: nix/eval-test.nix failed (with $lib)" >&2
  exit 1
fi
"$python" -c 'import json, sys; print("check-nix.sh: evalModules with", sys.argv[2] + ":", json.load(open(sys.argv[1]))["passed"], "checks pass")' "$work/eval.json" "$lib"

# Each refusal: evaluation fails, and NixOS's message has the expected words.
mapfile -t refusals < <("$python" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["refusals"]))' "$work/eval.json")
for name in "${refusals[@]}"; do
  if eval_test --argstr refuse "$name" >"$work/refusal.out" 2>"$work/refusal.err"; then
    echo "check-nix.sh: the $name configuration evaluates, but NixOS must refuse it" >&2
    exit 1
  fi
  if ! "$python" - "$work/eval.json" "$name" "$work/refusal.err" <<'EOF'; then
import json, sys
words = json.load(open(sys.argv[1]))["refusals"][sys.argv[2]]
message = open(sys.argv[3]).read()
missing = [w for w in words if w not in message]
if missing:
    sys.stderr.write(message)
    sys.exit(f"check-nix.sh: the {sys.argv[2]} configuration fails, but its message lacks {missing}")
EOF
    exit 1
  fi
done
echo "check-nix.sh: ${#refusals[@]} bad configurations fail evaluation with NixOS's message"

plumb=${PLUMB_BIN:-${CARGO_TARGET_DIR:-target}/debug/plumb}
if [ ! -x "$plumb" ]; then
  echo "check-nix.sh: $plumb not found: build it (cargo build --bin plumb) or set PLUMB_BIN" >&2
  exit 1
fi
plumb=$(realpath "$plumb")

# Each build: render the settings to TOML (tomli-w, read back with tomllib: the file must say
# exactly what the module gave pkgs.formats.toml), put this plumb and this file in place of the
# store paths the module's script names, and run the script as a builder would (bash, -e, $out).
mapfile -t builds < <("$python" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["builds"]))' "$work/eval.json")
for name in "${builds[@]}"; do
  mkdir "$work/$name"
  if ! "$python" - "$work/eval.json" "$name" "$work/$name" "$plumb" <<'EOF'; then
import json, shlex, sys, tomllib, tomli_w
build = json.load(open(sys.argv[1]))["builds"][sys.argv[2]]
d, plumb = sys.argv[3], sys.argv[4]
with open(f"{d}/plumb.toml", "wb") as f:
    tomli_w.dump(build["settings"], f)
with open(f"{d}/plumb.toml", "rb") as f:
    if tomllib.load(f) != build["settings"]:
        sys.exit(f"check-nix.sh: {sys.argv[2]}: the TOML does not read back as the settings")
script = build["script"]
for path in (build["renderedPath"], build["plumb"]):
    if path not in script:
        sys.exit(f"check-nix.sh: {sys.argv[2]}: the module's build script does not name {path}:\n{script}")
script = script.replace(build["renderedPath"], shlex.quote(f"{d}/plumb.toml"))
script = script.replace(build["plumb"], shlex.quote(plumb))
open(f"{d}/build.sh", "w").write(script)
open(f"{d}/refused", "w").write(build["refused"] or "")
EOF
    exit 1
  fi
  refused=$(cat "$work/$name/refused")
  if out="$work/$name/out" bash -eu -o pipefail "$work/$name/build.sh" >"$work/$name/log" 2>&1; then
    if [ -n "$refused" ]; then
      cat "$work/$name/log" >&2
      echo "check-nix.sh: the module's check-config passes the $name config, which plumb must refuse ($refused)" >&2
      exit 1
    fi
    if ! cmp -s "$work/$name/out" "$work/$name/plumb.toml"; then
      echo "check-nix.sh: the module's build of the $name config does not install the checked file" >&2
      exit 1
    fi
  elif [ -z "$refused" ] || ! grep -qF -- "$refused" "$work/$name/log"; then
    sed "s/^/  /" "$work/$name/build.sh" >&2
    cat "$work/$name/log" >&2
    echo "check-nix.sh: the module's check-config refuses the rendered $name config${refused:+ (expected: $refused)}" >&2
    exit 1
  fi
done
echo "check-nix.sh: the module's check-config build passes ${#builds[@]} rendered configs (or refuses the bad one)"
