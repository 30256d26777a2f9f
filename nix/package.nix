# The plumb package for Nix: owns how the binaries, the systemd units, the generator, the man pages
# and the shell completions are built and laid out in the store. Called by flake.nix (packages,
# overlays) and by nixos-module/default.nix (the default of services.plumb.package), with
# `callPackage`, so it builds with whichever nixpkgs the caller has (rustc >= Cargo.toml's
# rust-version).
{
  lib,
  stdenv,
  rustPlatform,
  pkg-config,
  installShellFiles,
  zlib,
  coreutils,
}:

let
  # Only what cargo reads: a checkout's target/ (gigabytes) or fuzz/ must not reach the store when
  # the module is imported from a plain path rather than a flake.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../generators
      ../examples
      ../man
      ../units
    ];
  };
in
rustPlatform.buildRustPackage {
  pname = "plumb";
  version = (lib.importTOML ../Cargo.toml).package.version;
  inherit src;

  cargoLock.lockFile = ../Cargo.lock;

  # The binaries, and gen-docs (examples/gen-docs.rs, what `make docs` runs) built by the same cargo
  # invocation, so the docs cost no second build of the library. cargoInstallHook installs only the
  # top-level executables of the release directory, so the example is not installed.
  cargoBuildFlags = [
    "--bins"
    "--example"
    "gen-docs"
  ];

  # git2's vendored libgit2 links zlib, found with pkg-config (the same package
  # scripts/install-deps.sh installs on Debian). TLS is rustls, compiled in: no OpenSSL.
  nativeBuildInputs = [
    pkg-config
    installShellFiles
  ];
  buildInputs = [
    zlib
  ];

  # The tests start git daemon, lighttpd and sshd on loopback, need root and boot systemd-nspawn
  # containers: none of that exists in the build sandbox. CI runs them (.ci/run); the flake's
  # checks.<system>.vm runs plumb on a real NixOS.
  doCheck = false;

  # Man pages and completions come from the clap definitions (src/docs.rs) by running gen-docs,
  # which a cross build cannot do: it then ships without them.
  postBuild = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    target/${stdenv.hostPlatform.rust.cargoShortTarget}/$cargoBuildType/examples/gen-docs target/plumb-docs
  '';

  postInstall = ''
    # The shipped units name /usr/bin/plumb and /bin/kill, which NixOS does not have: point them at
    # the store. --replace-fail: a unit that changes its paths fails this build instead of
    # shipping a unit that cannot start.
    install -Dm644 -t $out/lib/systemd/system units/plumb.service 'units/plumb-apply@.service'
    substituteInPlace $out/lib/systemd/system/plumb.service \
      --replace-fail /usr/bin/plumb $out/bin/plumb \
      --replace-fail /bin/kill ${coreutils}/bin/kill
    substituteInPlace "$out/lib/systemd/system/plumb-apply@.service" \
      --replace-fail /usr/bin/plumb $out/bin/plumb

    # systemd runs the generator; nobody else should (it takes the generator directories).
    install -Dm755 -t $out/lib/systemd/system-generators $out/bin/plumb-generator
    rm $out/bin/plumb-generator
  ''
  + lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installManPage target/plumb-docs/man/*.1 target/plumb-docs/man/*.5 target/plumb-docs/man/*.8
    installShellCompletion --bash target/plumb-docs/completions/{plumb,plumbctl}.bash
    installShellCompletion --fish target/plumb-docs/completions/{plumb,plumbctl}.fish
    installShellCompletion --zsh target/plumb-docs/completions/_{plumb,plumbctl}
  '';

  meta = {
    description = "GitOps for machines you run yourself: per-service checkouts, bind mounts, reloads";
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "plumb";
    platforms = lib.platforms.linux;
  };
}
