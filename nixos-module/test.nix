# The NixOS VM test: `nix flake check` (or `nix build .#checks.x86_64-linux.vm`)
# on a machine with Nix and KVM. It boots the module with a synthetic feed,
# native InfluxDB and native Grafana, and checks the promises end to end:
# nbpy.target active, points in InfluxDB, dashboards in Grafana (its API),
# InfluxDB restarted mid-run with nothing lost, and a clean stop.
{ nixosModule }:

let
  # Messages the synthetic publisher sends: at `rate` per second the run
  # lasts long enough to restart InfluxDB in the middle of it.
  count = 40000;
  rate = 500;
  grafanaPassword = "nbpy-vm-test";
  # (retention policy, measurement) of everything the synthetic feed writes;
  # must follow src/schema.rs.
  measurements = [
    [ "default" "kraken_tick" ]
    [ "high_frequency" "kraken_depth" ]
    [ "default" "kraken_orders" ]
    [ "default" "oanda_tick" ]
    [ "default" "betfair_stream" ]
  ];
in
{
  name = "nbpy";

  nodes.machine = { pkgs, ... }: {
    imports = [ nixosModule ];

    virtualisation.memorySize = 2048;
    virtualisation.cores = 2;
    environment.systemPackages = [ pkgs.curl pkgs.jq ];

    services.nbpy = {
      enable = true;
      publishers.synth = {
        feed = "synthetic";
        inherit rate count;
        wait_for_subscribers = 1;
      };
      subscribers.main = {
        connect = [ "tcp://127.0.0.1:5570" ];
        stats_interval = "1s";
      };
      influxdb.mode = "native";
      grafana = {
        mode = "native";
        # Store paths are world-readable: fine for a test, never for a host.
        adminPasswordFile = pkgs.writeText "grafana-admin-password" grafanaPassword;
        secretKeyFile = pkgs.writeText "grafana-secret-key" "nbpy-vm-test-secret-key";
      };
    };
  };

  testScript = ''
    import json
    import shlex
    import time

    N = ${toString count}
    MEASUREMENTS = json.loads('${builtins.toJSON measurements}')
    INFLUX = "http://127.0.0.1:8086"
    GRAFANA = "http://admin:${grafanaPassword}@127.0.0.1:3000"


    def query(q):
        out = machine.succeed(
            f"curl -sfG {INFLUX}/query --data-urlencode db=tick --data-urlencode {shlex.quote('q=' + q)}"
        )
        return json.loads(out)


    def stored():
        """Points the feed wrote, summed over its measurements (0 if none yet)."""
        n = 0
        for rp, m in MEASUREMENTS:
            r = query(f'SELECT count("seq") FROM "tick"."{rp}"."{m}"')
            for s in r["results"][0].get("series", []):
                n += s["values"][0][1]
        return n


    def wait_for(what, pred, timeout):
        """Polls pred() until it is truthy; fails after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise Exception(f"timed out after {timeout}s waiting for {what}")
            time.sleep(1)


    def unit(name):
        out = machine.succeed(
            f"systemctl show -p ActiveState -p Result -p ExecMainStatus {name}"
        )
        return dict(line.split("=", 1) for line in out.split())


    def oneshot_succeeded(name):
        """A oneshot that ran to exit 0 (whether or not it remains active)."""
        p = unit(name)
        return (
            p["Result"] == "success"
            and p["ExecMainStatus"] == "0"
            and p["ActiveState"] in ("active", "inactive")
        )


    start_all()

    with subtest("the five phases come up: nbpy.target is active"):
        machine.wait_for_unit("nbpy.target")
        machine.wait_for_unit("influxdb.service")
        machine.wait_for_unit("grafana.service")
        machine.wait_until_succeeds("systemctl is-active nbpy-influxdb-ready.service nbpy-schema.service")
        machine.wait_for_unit("nbpy-publisher@synth.service")
        machine.wait_for_unit("nbpy-subscriber@main.service")
        machine.wait_for_unit("nbpy-health.service")
        machine.wait_until_succeeds("curl -sf http://127.0.0.1:9184/healthz")

    with subtest("points arrive in InfluxDB"):
        wait_for("the first points", lambda: stored() > 0, 120)

    with subtest("InfluxDB restarted mid-run: nothing is lost"):
        before = stored()
        assert 0 < before < N, f"the restart must fall inside the run: {before} of {N} stored"
        machine.succeed("systemctl restart influxdb.service")
        machine.wait_until_succeeds(f"curl -sf {INFLUX}/ping")
        # The run goes on through the restart and the publisher finishes.
        wait_for("the publisher to finish",
                 lambda: unit("nbpy-publisher@synth.service")["ActiveState"] == "inactive", 600)
        assert unit("nbpy-publisher@synth.service")["Result"] == "success"
        total = wait_for(f"{N} points", lambda: (lambda n: n if n >= N else 0)(stored()), 600)
        assert total == N, f"stored {total} points for {N} published"
        # Exactly once: kraken_tick holds every fifth sequence number from 1.
        r = query('SELECT min("seq"), max("seq") FROM "tick"."default"."kraken_tick"')
        lo, hi = r["results"][0]["series"][0]["values"][0][1:3]
        assert (lo, hi) == (1, N - 4), (lo, hi)

    with subtest("phase 4: dashboards are in Grafana (API)"):
        machine.wait_until_succeeds(f"curl -sf {GRAFANA}/api/health")
        wait_for("nbpy-dashboards to succeed", lambda: oneshot_succeeded("nbpy-dashboards.service"), 300)
        dashboards = json.loads(machine.succeed(f"curl -sf '{GRAFANA}/api/search?type=dash-db'"))
        assert len(dashboards) > 0, dashboards
        sources = json.loads(machine.succeed(f"curl -sf {GRAFANA}/api/datasources"))
        assert any(s["type"] == "influxdb" for s in sources), sources

    with subtest("phase 5: validation passes"):
        machine.succeed("systemctl start nbpy-validate.service")
        assert oneshot_succeeded("nbpy-validate.service")
        machine.succeed("systemctl is-active nbpy-validate.timer")

    with subtest("a clean stop: everything stops, nothing fails, nothing is killed"):
        machine.succeed("systemctl stop nbpy.target")
        machine.wait_until_succeeds(
            "test -z \"$(systemctl list-units --no-legend --state=active,activating,deactivating "
            "'nbpy-*.service')\"", timeout=120)
        machine.fail("systemctl list-units --no-legend --state=failed 'nbpy*' | grep .")
        machine.fail("journalctl -u 'nbpy-*' | grep -E 'SIGKILL|Killing process|stop-sigterm'")
        # The subscriber's own accounting, written as it stopped.
        r = query("SELECT last(\"gaps\"), last(\"received\"), last(\"malformed\") "
                  "FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'")
        gaps, received, malformed = r["results"][0]["series"][0]["values"][0][1:4]
        assert (gaps, received, malformed) == (0, N, 0), (gaps, received, malformed)
        assert stored() == N
  '';
}
