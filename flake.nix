# The Nix flake: owns what this repository offers Nix users: the package (nix/package.nix), an
# overlay adding `plumb` to nixpkgs, the NixOS module (nixos-module/) and the checks (the package
# and a NixOS VM test, nix/vm-test.nix). No flake.lock is committed: CI has no Nix store and no
# network to make one; the first `nix build` or `nix flake lock` writes it.
{
  description = "plumb: GitOps for people who run their own Linux machines";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

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
      nixosModules.default = ./nixos-module;

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        vm = pkgs.testers.runNixOSTest ./nix/vm-test.nix;
      });
    };
}
