{
  description = "nbpy: market-data appliance (venue feeds on ZeroMQ, written to InfluxDB, shown in Grafana)";

  # The locked crates need rustc >= 1.89 (zeromq 0.7, uuid): nixos-25.11 or later.
  # No flake.lock is committed (it could not be made offline); the first
  # `nix flake check` / `nix build` writes one.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f (import nixpkgs {
        inherit system;
        overlays = [ self.overlays.default ];
      }));
    in
    {
      overlays.default = final: prev: {
        nbpy = final.callPackage ./nix/package.nix { };
      };

      # Standalone: `services.nbpy.package` defaults to `pkgs.nbpy` when the
      # overlay is applied, else to the same package built from this source.
      nixosModules.default = ./nixos-module;

      packages = forAllSystems (pkgs: {
        default = pkgs.nbpy;
        nbpy = pkgs.nbpy;
        oci-image = pkgs.callPackage ./nix/oci-image.nix { };
      });

      # `nix run`: the whole appliance natively, with InfluxDB and Grafana
      # from nixpkgs on its PATH (`nbpy up` starts them as child processes).
      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = pkgs.lib.getExe (pkgs.callPackage ./nix/up.nix { });
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ pkgs.nbpy ];
          packages = with pkgs; [
            cargo-nextest
            clippy
            rustfmt
            influxdb
            grafana
            nixpkgs-fmt
            podman
            (python3.withPackages (ps: [ ps.pyzmq ]))
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);

      checks = forAllSystems (pkgs: {
        package = pkgs.nbpy;
        oci-image = self.packages.${pkgs.stdenv.hostPlatform.system}.oci-image;
        # The NixOS VM test (needs KVM): boots the module with synthetic feeds.
        vm = pkgs.testers.runNixOSTest (import ./nixos-module/test.nix {
          nixosModule = self.nixosModules.default;
        });
        nix-format = pkgs.runCommandLocal "nbpy-nix-format" { nativeBuildInputs = [ pkgs.nixpkgs-fmt ]; } ''
          cd ${self}
          nixpkgs-fmt --check $(find . -name '*.nix' -not -path './target/*')
          touch $out
        '';
      });
    };
}
