# The Nix flake: owns what this repository offers Nix users: the package (nix/package.nix), an
# overlay adding `plumb` to nixpkgs, the NixOS module (nixos-module/) and the checks (the package
# and a NixOS VM test, nix/vm-test.nix). No flake.lock is committed: CI has no Nix store and no
# network to make one; the first `nix build` or `nix flake lock` writes it.
{
  description = "plumb: GitOps for people who run their own Linux machines";

  # The NixOS release the flake builds and tests with (packages, checks). Its rustc must be at
  # least Cargo.toml's rust-version, 1.89: 26.05's is. A system importing the module builds plumb
  # with its own nixpkgs: 25.11 works too, 25.05 (rustc 1.86) does not.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        plumb = pkgs.callPackage ./nix/package.nix { };
        default = plumb;
      });

      overlays.default = final: _prev: {
        plumb = final.callPackage ./nix/package.nix { };
      };

      # Builds plumb with the importing system's nixpkgs unless services.plumb.package says
      # otherwise (for example `plumb.packages.${system}.default`, this flake's nixpkgs).
      # An attribute set importing the directory, not the bare path, which older Nix's
      # `flake check` refuses ("module must be a function or an attribute set"); importing the
      # path keeps it the module's key, so this and `imports = [ "${plumb}/nixos-module" ]`
      # together are one module, and NixOS names the file in messages.
      nixosModules.default = {
        imports = [ ./nixos-module ];
      };

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        vm = pkgs.testers.runNixOSTest ./nix/vm-test.nix;
      });
    };
}
