# The nbpy binaries and the systemd units from `systemd/`, built from
# Cargo.lock. The units are the same files the systemd tests boot; only their
# Exec paths are pointed at this package, so NixOS runs what was tested.
{ lib
, rustPlatform
, influxdb
}:

let
  cargoToml = builtins.fromTOML (builtins.readFile ../Cargo.toml);
  # The unit names the NixOS module adds drop-ins to. A rename in systemd/
  # must fail this build, not produce drop-ins for units that do not exist.
  expectedUnits = [
    "nbpy.target"
    "nbpy-influxdb-ready.service"
    "nbpy-schema.service"
    "nbpy-publishers.target"
    "nbpy-publisher@.service"
    "nbpy-subscribers.target"
    "nbpy-subscriber@.service"
    "nbpy-grafana.service"
    "nbpy-validate.service"
    "nbpy-validate.timer"
    "nbpy-validate-periodic.service"
    "nbpy-health.service"
  ];
in
rustPlatform.buildRustPackage {
  pname = cargoToml.package.name;
  inherit (cargoToml.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      ../benches
      ../tests
      (lib.fileset.maybeMissing ../systemd)
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  # The unit tests only; the integration tests start processes and a real
  # influxd and run in CI (`.ci/run`) and in the NixOS VM test instead.
  cargoTestFlags = [ "--lib" ];
  nativeCheckInputs = [ influxdb ];

  postInstall = ''
    if [ ! -d systemd ]; then
      echo "systemd/ is missing from the source: the package ships its units" >&2
      exit 1
    fi
    shopt -s nullglob
    units=(systemd/*.service systemd/*.target systemd/*.timer systemd/*.socket systemd/*.path)
    install -Dm644 -t $out/lib/systemd/system "''${units[@]}"
    for u in ${lib.escapeShellArgs expectedUnits}; do
      if [ ! -e "$out/lib/systemd/system/$u" ]; then
        echo "systemd/$u is missing; the NixOS module adds drop-ins to it" >&2
        exit 1
      fi
    done
    # FHS paths (or bare names) of our own binaries -> this package.
    sed -E -i \
      -e "s#(/usr/local/bin|/usr/bin)/(nbpy[A-Za-z0-9_-]*)#$out/bin/\2#g" \
      -e "s#^(Exec[A-Za-z]*=[-@:+!|]*)(nbpy[A-Za-z0-9_-]*)#\1$out/bin/\2#" \
      $out/lib/systemd/system/*
    if grep -nE '/usr(/local)?/s?bin/nbpy' $out/lib/systemd/system/*; then
      echo "unit files still name an FHS path for an nbpy binary" >&2
      exit 1
    fi
  '';

  meta = {
    description = cargoToml.package.description;
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "nbpy";
    platforms = lib.platforms.linux;
  };
}
