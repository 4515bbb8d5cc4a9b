# `nix run`: `nbpy up` with InfluxDB 1.x and Grafana from nixpkgs, the whole
# appliance natively (nix/nbpy-up.sh says how Grafana is started).
{ writeShellApplication
, nbpy
, influxdb
, grafana
, curl
, coreutils
}:

writeShellApplication {
  name = "nbpy-up";
  runtimeInputs = [ nbpy influxdb grafana curl coreutils ];
  # nixpkgs' Grafana keeps its static files here, not next to the binary.
  runtimeEnv.GRAFANA_HOME = "${grafana}/share/grafana";
  text = builtins.readFile ./nbpy-up.sh;
  meta.description = "The whole nbpy appliance, natively: InfluxDB, Grafana, feeds, dashboards, validation";
}
