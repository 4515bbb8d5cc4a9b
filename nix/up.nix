# `nix run`: `nbpy up` with InfluxDB 1.x and Grafana from nixpkgs on its PATH.
#
# nixpkgs' Grafana needs `--homepath` (its static files live in the store,
# not next to the binary), so the PATH gets small `grafana` and
# `grafana-server` shims that add it; whichever `nbpy up` calls works.
{ lib
, writeShellApplication
, writeShellScriptBin
, nbpy
, influxdb
, grafana
}:

let
  home = "${grafana}/share/grafana";
  grafanaShims = [
    (writeShellScriptBin "grafana-server" ''
      exec ${grafana}/bin/grafana server --homepath ${home} "$@"
    '')
    (writeShellScriptBin "grafana" ''
      if [ "''${1:-}" = server ]; then
        shift
        exec ${grafana}/bin/grafana server --homepath ${home} "$@"
      fi
      exec ${grafana}/bin/grafana "$@"
    '')
  ];
in
writeShellApplication {
  name = "nbpy-up";
  runtimeInputs = [ nbpy influxdb ] ++ grafanaShims;
  text = ''
    exec nbpy up "$@"
  '';
  meta.description = "The whole nbpy appliance, natively: InfluxDB, Grafana, feeds, dashboards, validation";
}
