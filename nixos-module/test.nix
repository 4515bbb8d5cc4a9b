# The NixOS VM test: `nix flake check` (or `nix build .#checks.x86_64-linux.vm`)
# on a machine with Nix and KVM. It boots the module with a synthetic feed,
# native InfluxDB (auth on) and native Grafana, and checks the promises end
# to end: nbpy.target active, InfluxDB refusing anonymous queries while each
# unit logs in with the credentials `nbpy units install` would give it,
# points in InfluxDB, dashboards in Grafana (its API), InfluxDB restarted
# mid-run with nothing lost, and a clean stop.
{ nixosModule }:

let
  # The synthetic publisher runs until stopped, at this many messages/s.
  rate = 500;
  grafanaPassword = "nbpy-vm-test";
  # InfluxDB auth: nbpy logs in as `nbpy` (an admin phase 2 creates), and
  # phase 2 also declares a writer whose credential only the configuration
  # names (as tests/systemd.rs does), so only nbpy-schema loads it.
  influxPassword = "nbpy-vm-influx";
  writerPassword = "nbpy-vm-writer";
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
        inherit rate;
        wait_for_subscribers = 1;
      };
      subscribers.main = {
        connect = [ "tcp://127.0.0.1:5570" ];
        stats_interval = "1s";
      };
      influxdb = {
        mode = "native";
        # Store paths are world-readable: fine for a test, never for a host.
        passwordFile = pkgs.writeText "influxdb-password" influxPassword;
      };
      settings.schema.users.writer = {
        privilege = "write";
        password_file = "nbpy-writer-password";
      };
      credentials.nbpy-writer-password = pkgs.writeText "nbpy-writer-password" writerPassword;
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

    RATE = ${toString rate}
    MEASUREMENTS = json.loads('${builtins.toJSON measurements}')
    INFLUX = "http://127.0.0.1:8086"
    INFLUX_LOGIN = "nbpy:${influxPassword}"
    GRAFANA = "http://admin:${grafanaPassword}@127.0.0.1:3000"


    def query(q):
        out = machine.succeed(
            f"curl -sfG -u {INFLUX_LOGIN} {INFLUX}/query --data-urlencode db=tick"
            f" --data-urlencode {shlex.quote('q=' + q)}"
        )
        return json.loads(out)


    def query_status(login, q):
        """The HTTP status of query q, sent with login ("user:password") or none."""
        auth = f"-u {shlex.quote(login)} " if login else ""
        return machine.succeed(
            f"curl -s -o /dev/null -w '%{{http_code}}' -G {auth}{INFLUX}/query"
            f" --data-urlencode db=tick --data-urlencode {shlex.quote('q=' + q)}"
        ).strip()


    def each_measurement(select):
        """The first row of `select` over every measurement the feed writes."""
        rows = []
        for rp, m in MEASUREMENTS:
            r = query(f'{select} FROM "tick"."{rp}"."{m}"')
            for s in r["results"][0].get("series", []):
                rows.append(s["values"][0][1:])
        return rows


    def stored():
        """Points the feed wrote, summed over its measurements (0 if none yet)."""
        return sum(row[0] for row in each_measurement('SELECT count("seq")'))


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
        # The target orders after every phase, validation included.
        machine.wait_for_unit("nbpy.target", timeout=900)
        machine.succeed(
            "systemctl is-active influxdb.service grafana.service"
            " nbpy-influxdb-ready.service nbpy-schema.service"
            " nbpy-publisher@synth.service nbpy-subscriber@main.service"
            " nbpy-grafana.service nbpy-validate.service nbpy-health.service"
        )
        machine.succeed("curl -sf http://127.0.0.1:9184/healthz")

    with subtest("InfluxDB auth is on, and each unit has the credentials it needs"):
        q = 'SELECT count("seq") FROM "tick"."default"."kraken_tick"'
        # 401: no or wrong credentials; 403: the writer logs in (with the
        # password only nbpy-schema loads) but may not read.
        statuses = (
            query_status(None, q),
            query_status("writer:not-its-password", q),
            query_status("writer:${writerPassword}", q),
            query_status(INFLUX_LOGIN, q),
        )
        assert statuses == ("401", "401", "403", "200"), statuses
        # The writer's credential is loaded where `nbpy units install` puts
        # it, from its file, and nowhere else.
        machine.succeed("systemctl cat nbpy-schema.service | grep -q '^LoadCredential=nbpy-writer-password:/'")
        machine.fail("systemctl cat nbpy-subscriber@main.service | grep -q nbpy-writer-password")
        machine.succeed("systemctl cat nbpy-subscriber@main.service | grep -q '^LoadCredential=influxdb-password:/'")

    with subtest("points arrive in InfluxDB"):
        wait_for("the first points", lambda: stored() > 0, 120)

    with subtest("phase 4: dashboards are in Grafana (API)"):
        assert oneshot_succeeded("nbpy-grafana.service")
        machine.wait_until_succeeds(f"curl -sf {GRAFANA}/api/health")
        dashboards = json.loads(machine.succeed(f"curl -sf '{GRAFANA}/api/search?type=dash-db'"))
        assert len(dashboards) > 0, dashboards
        sources = json.loads(machine.succeed(f"curl -sf {GRAFANA}/api/datasources"))
        assert any(s["type"] == "influxdb" for s in sources), sources
        # The datasource logs in to InfluxDB (auth is on).
        machine.succeed(f"curl -sf {GRAFANA}/api/datasources/uid/nbpy-influxdb/health")

    with subtest("phase 5: validation passed"):
        assert oneshot_succeeded("nbpy-validate.service")
        machine.succeed("systemctl is-active nbpy-validate.timer")

    with subtest("InfluxDB restarted mid-run: the run goes on"):
        before = stored()
        machine.succeed("systemctl restart influxdb.service")
        machine.wait_until_succeeds(f"curl -sf {INFLUX}/ping")
        machine.succeed("systemctl is-active nbpy-publisher@synth.service nbpy-subscriber@main.service")
        wait_for("five more seconds of data after the restart",
                 lambda: stored() > before + 5 * RATE, 120)

    with subtest("a clean stop: everything stops, nothing fails, nothing is killed"):
        # The named units too, so the command returns when the drain is done.
        machine.succeed("systemctl stop nbpy.target 'nbpy-*'")
        machine.fail("systemctl list-units --no-legend --state=active,activating,deactivating 'nbpy-*.service' | grep .")
        machine.fail("systemctl list-units --no-legend --state=failed 'nbpy*' | grep .")
        machine.fail("journalctl -u 'nbpy-*' | grep -E 'SIGKILL|Killing process|stop-sigterm'")

    with subtest("nothing accepted was lost, across the restart and the stop"):
        # The subscriber's own accounting, written as it stopped.
        r = query("SELECT last(\"gaps\"), last(\"received\"), last(\"malformed\") "
                  "FROM \"tick\".\"default\".\"nbpy_pipeline\" WHERE component = 'main'")
        gaps, received, malformed = r["results"][0]["series"][0]["values"][0][1:4]
        assert (gaps, malformed) == (0, 0), (gaps, malformed)
        total = stored()
        assert total == received, f"stored {total}, the subscriber accepted {received}"
        # Every sequence number from 1 to the last accepted, once each.
        rows = each_measurement('SELECT min("seq"), max("seq")')
        assert min(r[0] for r in rows) == 1, rows
        assert max(r[1] for r in rows) == received, (rows, received)
  '';
}
