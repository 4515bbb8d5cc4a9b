# services.nbpy: the appliance on NixOS.
#
# The units are the package's own files from systemd/ (`systemd.packages`);
# this module only adds drop-ins (credentials, restart on config change,
# ordering after the backends) and the publisher/subscriber instances that
# nbpy.target wants. So the units the systemd tests boot are the units NixOS
# runs, in the same five phases: backends, schema, feeds, dashboards,
# validation.
{ config, lib, pkgs, ... }:

let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkMerge
    mkDefault
    types
    literalExpression
    optional
    optionalAttrs
    filterAttrs
    mapAttrs
    mapAttrsToList
    attrNames
    genAttrs
    ;

  cfg = config.services.nbpy;
  settingsFormat = pkgs.formats.toml { };
  ociBackend = config.virtualisation.oci-containers.backend;

  # DESIGN.md's ports, as `FeedKind::default_port` in src/feeds/mod.rs has
  # them (tests/packaging.rs checks).
  feedPorts = {
    kraken-tick = 5558;
    kraken-depth = 5560;
    kraken-orders = 5561;
    oanda-tick = 5562;
    betfair-stream = 5564;
    social = 5565;
    synthetic = 5570;
    replay = 5571;
  };

  publishers = filterAttrs (_: p: p.enable) cfg.publishers;
  subscribers = filterAttrs (_: s: s.enable) cfg.subscribers;
  withoutEnable = _: v: removeAttrs v [ "enable" ];

  publisherPort = p:
    if p ? endpoint
    then lib.toInt (lib.last (lib.splitString ":" p.endpoint))
    else feedPorts.${p.feed};

  # Which unit loads which credential, by the rule `nbpy units install`
  # applies elsewhere (tests/packaging.rs evaluates it against the Rust
  # code): the IDs each unit file loads itself, and those the configuration
  # names (`*_file = "NAME"`) in the keys the unit reads.
  credentials = import ./credentials.nix;
  unitLoadCredentials = credentials.loadCredentials {
    inherit (cfg) settings;
    files = cfg.credentials;
  };

  loadedCredentials = map
    (entry: lib.head (lib.splitString ":" entry))
    (lib.concatLists (lib.attrValues unitLoadCredentials));

  # InfluxDB auth is on when nbpy has a password to log in with.
  influxAuth = cfg.influxdb.passwordFile != null;
  influxUser = if cfg.influxdb.username != null then cfg.influxdb.username else "nbpy";
  # The InfluxDB this module runs (native or container) starts empty: nbpy's
  # own user is declared an admin, which phase 2 creates first on a server
  # with auth on and no users (the one request InfluxDB then allows).
  influxManaged = cfg.influxdb.mode != "external";

  configFile = settingsFormat.generate "nbpy.toml" cfg.settings;

  influxUrl =
    if cfg.influxdb.url != null then cfg.influxdb.url
    else "http://127.0.0.1:${toString cfg.influxdb.port}";
  grafanaUrl =
    if cfg.grafana.url != null then cfg.grafana.url
    else "http://127.0.0.1:${toString cfg.grafana.port}";

  # Phase 4's files, rendered once at build time by the same code as
  # `nbpy grafana apply`: datasources/nbpy.yaml, dashboards/nbpy.yaml (the
  # provider, naming dashboards/nbpy by its absolute path, or
  # grafana.dashboards_path) and dashboards/nbpy/*.json. The config holds only
  # credential *names* and `$__file{}` paths, so nothing secret is read here.
  grafanaRendered = pkgs.runCommand "nbpy-grafana-provisioning" { } ''
    ${lib.getExe' cfg.package "nbpy"} --config ${configFile} grafana render $out
    for f in datasources/nbpy.yaml dashboards/nbpy.yaml; do
      if [ ! -f "$out/$f" ]; then
        echo "nbpy grafana render wrote no $f" >&2
        exit 1
      fi
    done
  '';

  backendMode = types.enum [ "native" "container" "external" ];

  instanceOptions = extra: {
    freeformType = settingsFormat.type;
    options = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Whether nbpy.target starts this instance.";
      };
    } // extra;
  };
in
{
  options.services.nbpy = {
    enable = mkEnableOption "nbpy, the market-data appliance (publishers, subscribers, InfluxDB, Grafana)";

    package = mkOption {
      type = types.package;
      default = pkgs.nbpy or (pkgs.callPackage ../nix/package.nix { });
      defaultText = literalExpression "pkgs.nbpy";
      description = "The nbpy package: its binaries and the systemd units in lib/systemd/system.";
    };

    settings = mkOption {
      type = types.submodule { freeformType = settingsFormat.type; };
      default = { };
      example = literalExpression ''
        {
          influxdb.batch_size = 10000;
          log.level = "info,nbpy::sink=debug";
        }
      '';
      description = ''
        The contents of /etc/nbpy/nbpy.toml (keys as in `nbpy config show`).
        `influxdb.url`, `grafana.url` and the credential names are filled in
        from the `influxdb` / `grafana` options; `publishers` and
        `subscribers` from the options of those names. Secrets never go here:
        a `*_file` key names a systemd credential (`password_file =
        "nbpy-writer-password"`), whose file `credentials` gives.
      '';
    };

    credentials = mkOption {
      type = types.attrsOf types.path;
      default = { };
      example = literalExpression ''
        {
          "nbpy-writer-password" = "/run/secrets/influxdb-writer-password";
          "oanda-token" = "/run/secrets/oanda-token";
        }
      '';
      description = ''
        Files for the systemd credentials that `settings` names by bare name
        in its `*_file` keys (schema users' passwords, venue tokens, …), by
        credential ID. Each one is loaded, as `LoadCredential=ID:FILE`, into
        exactly the units that `nbpy units install` gives it elsewhere: the
        units that read the key naming it. The files are read by systemd (as
        root) when a unit starts, never copied into the store. An ID that
        `settings` names but that has no file here is loaded from the
        credstore (`/etc/credstore/ID`), as `units install` loads it.
        `influxdb.passwordFile` and `grafana.adminPasswordFile` set
        `influxdb-password` and `grafana-admin-password`.
      '';
    };

    publishers = mkOption {
      type = types.attrsOf (types.submodule (instanceOptions {
        feed = mkOption {
          type = types.enum (attrNames feedPorts);
          default = "synthetic";
          description = "Which feed this publisher runs.";
        };
      }));
      default = { };
      example = literalExpression ''
        {
          kraken = { feed = "kraken-tick"; instruments = [ "BTC/USD" "ETH/USD" ]; };
          synth = { feed = "synthetic"; rate = 1000; endpoint = "tcp://0.0.0.0:5570"; };
        }
      '';
      description = ''
        `[publishers.NAME]` tables; each enabled one runs as
        `nbpy-publisher@NAME.service`, wanted by nbpy.target.
      '';
    };

    subscribers = mkOption {
      type = types.attrsOf (types.submodule (instanceOptions {
        connect = mkOption {
          type = types.listOf types.str;
          example = [ "tcp://127.0.0.1:5558" ];
          description = "ZeroMQ endpoints to connect to.";
        };
      }));
      default = { };
      description = ''
        `[subscribers.NAME]` tables; each enabled one runs as
        `nbpy-subscriber@NAME.service`, wanted by nbpy.target.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the publishers' ZeroMQ ports, so subscribers on other hosts can
        connect (the endpoints must then bind a non-loopback address).
      '';
    };

    influxdb = {
      mode = mkOption {
        type = backendMode;
        default = "native";
        description = ''
          `native`: services.influxdb (1.x from nixpkgs) on loopback.
          `container`: the `influxdb:1.8` image via virtualisation.oci-containers, on loopback.
          `external`: an InfluxDB you run; set `url`.
        '';
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://influx.example.net:8086";
        description = "InfluxDB's URL; required for `external`, else `http://127.0.0.1:<port>`.";
      };
      port = mkOption {
        type = types.port;
        default = 8086;
        description = "HTTP port of the native or container InfluxDB (loopback only).";
      };
      username = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = ''
          The InfluxDB user nbpy logs in as, when `passwordFile` is set
          (null: `nbpy`). With a `native` or `container` InfluxDB it is
          declared an admin user (`settings.schema.users.<name>`), which
          phase 2 creates on the fresh server.
        '';
      };
      passwordFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/run/secrets/influxdb-password";
        description = ''
          File holding the password of `username`. Null: authentication is
          off. Set: it is on (`http.auth-enabled` in a `native` or
          `container` InfluxDB, and expected of an `external` one), and the
          units that log in to InfluxDB load it as the credential
          `influxdb-password`; read by systemd (as root), never copied to
          the store. Further users (e.g. a writer) are
          `settings.schema.users.<name>` with `password_file = "<ID>"`,
          their files in `credentials.<ID>`.
        '';
      };
      image = mkOption {
        type = types.str;
        default = "docker.io/library/influxdb:1.8";
        description = "Image for `container` mode.";
      };
      imageFile = mkOption {
        type = types.nullOr types.package;
        default = null;
        description = "Image tarball for `container` mode (e.g. from dockerTools.pullImage), for hosts that cannot pull.";
      };
    };

    grafana = {
      mode = mkOption {
        type = backendMode;
        default = "native";
        description = ''
          `native`: services.grafana on loopback, file-provisioned with the
          output of `nbpy grafana render`.
          `container`: the `grafana/grafana` image via virtualisation.oci-containers, same provisioning.
          `external`: a Grafana you run; set `url` (phase 4 then uses its API only).
        '';
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Grafana's URL; required for `external`, else `http://127.0.0.1:<port>`.";
      };
      port = mkOption {
        type = types.port;
        default = 3000;
        description = "HTTP port of the native or container Grafana (loopback only).";
      };
      adminUser = mkOption {
        type = types.str;
        default = "admin";
        description = "Grafana admin user (phase 4 uses it for the API).";
      };
      adminPasswordFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = ''
          File holding the Grafana admin password: `LoadCredential=grafana-admin-password:…`
          for nbpy, and Grafana's own `$__file{}` provider in native and container mode
          (so it must be readable by the grafana user, or mounted into the container).
        '';
      };
      secretKeyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "File holding Grafana's `security.secret_key` (native and container mode).";
      };
      image = mkOption {
        type = types.str;
        default = "docker.io/grafana/grafana:11.6.0";
        description = "Image for `container` mode.";
      };
      imageFile = mkOption {
        type = types.nullOr types.package;
        default = null;
        description = "Image tarball for `container` mode, for hosts that cannot pull.";
      };
    };
  };

  config = mkIf cfg.enable (mkMerge [
    {
      assertions = [
        {
          assertion = cfg.influxdb.mode == "external" -> cfg.influxdb.url != null;
          message = "services.nbpy.influxdb.mode = \"external\" needs services.nbpy.influxdb.url.";
        }
        {
          assertion = cfg.grafana.mode == "external" -> cfg.grafana.url != null;
          message = "services.nbpy.grafana.mode = \"external\" needs services.nbpy.grafana.url.";
        }
      ] ++ mapAttrsToList
        (name: _: {
          assertion = builtins.match "[a-z0-9_-]+" name != null;
          message = "services.nbpy: instance name ${lib.strings.escapeNixString name} may use a-z, 0-9, '-' and '_' only (it becomes a unit instance name).";
        })
        (cfg.publishers // cfg.subscribers);

      # A file for a credential no unit loads is most likely a typo of the
      # ID that `settings` names.
      warnings = map
        (id: "services.nbpy.credentials.${id}: no nbpy unit loads this credential (no `*_file` key in services.nbpy.settings names it \"${id}\"), so the file is not used.")
        (lib.subtractLists loadedCredentials (attrNames cfg.credentials));

      services.nbpy.credentials = {
        influxdb-password = mkIf influxAuth cfg.influxdb.passwordFile;
        grafana-admin-password = mkIf (cfg.grafana.adminPasswordFile != null) cfg.grafana.adminPasswordFile;
      };

      services.nbpy.settings = {
        influxdb = {
          url = mkDefault influxUrl;
        } // optionalAttrs (cfg.influxdb.username != null || influxAuth) {
          username = mkDefault influxUser;
        } // optionalAttrs influxAuth {
          password_file = mkDefault "influxdb-password";
        };
        grafana = {
          url = mkDefault grafanaUrl;
          admin_user = mkDefault cfg.grafana.adminUser;
        } // optionalAttrs (cfg.grafana.adminPasswordFile != null) {
          admin_password_file = mkDefault "grafana-admin-password";
        };
        publishers = mapAttrs withoutEnable publishers;
        subscribers = mapAttrs withoutEnable subscribers;
      } // optionalAttrs (influxAuth && influxManaged) {
        schema.users.${influxUser} = {
          admin = mkDefault true;
          password_file = mkDefault "influxdb-password";
        };
      };

      environment.etc."nbpy/nbpy.toml".source = configFile;
      environment.systemPackages = [ cfg.package ];

      systemd.packages = [ cfg.package ];

      # The package's nbpy.target wants every phase; what only the
      # configuration knows is which instances to start (what `nbpy units
      # install` links into nbpy.target.wants/ elsewhere).
      systemd.targets.nbpy = {
        wantedBy = [ "multi-user.target" ];
        wants =
          map (n: "nbpy-publisher@${n}.service") (attrNames publishers)
          ++ map (n: "nbpy-subscriber@${n}.service") (attrNames subscribers);
      };

      # Drop-ins on the package's units, and on the instances whose tables
      # name credentials of their own: what `nbpy units install` adds
      # elsewhere, each credential from its file in `credentials`.
      systemd.services = mapAttrs
        (_: loadCredential: {
          overrideStrategy = "asDropin";
          restartTriggers = [ configFile ];
          serviceConfig.LoadCredential = loadCredential;
        })
        unitLoadCredentials;

      networking.firewall.allowedTCPPorts =
        mkIf cfg.openFirewall (mapAttrsToList (_: publisherPort) publishers);
    }

    # Phase 1, InfluxDB.
    (mkIf (cfg.influxdb.mode == "native") {
      services.influxdb = {
        enable = true;
        # `extraConfig` is a plain attrs option (merged shallowly, no
        # priorities): these keep InfluxDB on loopback.
        extraConfig = {
          bind-address = "127.0.0.1:8088";
          http = {
            bind-address = "127.0.0.1:${toString cfg.influxdb.port}";
          } // optionalAttrs influxAuth {
            auth-enabled = true;
          };
          meta.bind-address = "127.0.0.1:8088";
        };
      };
      systemd.services.nbpy-influxdb-ready = {
        wants = [ "influxdb.service" ];
        after = [ "influxdb.service" ];
      };
    })
    (mkIf (cfg.influxdb.mode == "container") {
      virtualisation.oci-containers.containers.nbpy-influxdb = {
        inherit (cfg.influxdb) image imageFile;
        extraOptions = [ "--network=host" ];
        environment = {
          INFLUXDB_HTTP_BIND_ADDRESS = "127.0.0.1:${toString cfg.influxdb.port}";
          INFLUXDB_BIND_ADDRESS = "127.0.0.1:8088";
          INFLUXDB_REPORTING_DISABLED = "true";
        } // optionalAttrs influxAuth {
          INFLUXDB_HTTP_AUTH_ENABLED = "true";
        };
        volumes = [ "/var/lib/nbpy-influxdb:/var/lib/influxdb" ];
      };
      systemd.tmpfiles.rules = [ "d /var/lib/nbpy-influxdb 0700 root root - -" ];
      systemd.services.nbpy-influxdb-ready = {
        wants = [ "${ociBackend}-nbpy-influxdb.service" ];
        after = [ "${ociBackend}-nbpy-influxdb.service" ];
      };
    })

    # Phase 4's backend, Grafana.
    (mkIf (cfg.grafana.mode == "native") {
      services.grafana = {
        enable = true;
        settings = {
          server = {
            http_addr = mkDefault "127.0.0.1";
            http_port = mkDefault cfg.grafana.port;
          };
          security = {
            admin_user = mkDefault cfg.grafana.adminUser;
          } // optionalAttrs (cfg.grafana.adminPasswordFile != null) {
            admin_password = mkDefault "$__file{${toString cfg.grafana.adminPasswordFile}}";
          } // optionalAttrs (cfg.grafana.secretKeyFile != null) {
            secret_key = mkDefault "$__file{${toString cfg.grafana.secretKeyFile}}";
          };
          analytics.reporting_enabled = mkDefault false;
        };
        provision = {
          enable = true;
          datasources.path = "${grafanaRendered}/datasources/nbpy.yaml";
          dashboards.path = "${grafanaRendered}/dashboards/nbpy.yaml";
        };
      };
      # The unit orders after Debian's grafana-server.service; NixOS calls it grafana.
      systemd.services.nbpy-grafana = {
        wants = [ "grafana.service" ];
        after = [ "grafana.service" ];
      };
      # With auth on, the datasource logs in as nbpy does (as in
      # docker/compose.yaml): Grafana gets the password as a credential of
      # its own, which the provisioned datasource names by `$__file{}`.
      systemd.services.grafana.serviceConfig.LoadCredential =
        mkIf influxAuth [ "influxdb-password:${toString cfg.influxdb.passwordFile}" ];
      services.nbpy.settings.grafana = mkIf influxAuth {
        influxdb_user = mkDefault influxUser;
        influxdb_password_file = mkDefault "/run/credentials/grafana.service/influxdb-password";
      };
    })
    (mkIf (cfg.grafana.mode == "container") {
      virtualisation.oci-containers.containers.nbpy-grafana = {
        inherit (cfg.grafana) image imageFile;
        extraOptions = [ "--network=host" ];
        environment = {
          GF_SERVER_HTTP_ADDR = "127.0.0.1";
          GF_SERVER_HTTP_PORT = toString cfg.grafana.port;
          GF_SECURITY_ADMIN_USER = cfg.grafana.adminUser;
          GF_ANALYTICS_REPORTING_ENABLED = "false";
        } // optionalAttrs (cfg.grafana.adminPasswordFile != null) {
          GF_SECURITY_ADMIN_PASSWORD__FILE = "/run/secrets/grafana-admin-password";
        } // optionalAttrs (cfg.grafana.secretKeyFile != null) {
          GF_SECURITY_SECRET_KEY__FILE = "/run/secrets/grafana-secret-key";
        };
        volumes = [
          "${grafanaRendered}:/etc/grafana/provisioning:ro"
          "/var/lib/nbpy-grafana:/var/lib/grafana"
        ]
        ++ optional (cfg.grafana.adminPasswordFile != null)
          "${toString cfg.grafana.adminPasswordFile}:/run/secrets/grafana-admin-password:ro"
        ++ optional (cfg.grafana.secretKeyFile != null)
          "${toString cfg.grafana.secretKeyFile}:/run/secrets/grafana-secret-key:ro"
        ++ optional influxAuth
          "${toString cfg.influxdb.passwordFile}:/run/secrets/influxdb-password:ro";
      };
      services.nbpy.settings.grafana = {
        # The provider the render writes must name the dashboards where the
        # container sees them.
        dashboards_path = mkDefault "/etc/grafana/provisioning/dashboards/nbpy";
      } // optionalAttrs influxAuth {
        # With auth on, the datasource logs in as nbpy does (as in
        # docker/compose.yaml), its password mounted like the admin's.
        influxdb_user = mkDefault influxUser;
        influxdb_password_file = mkDefault "/run/secrets/influxdb-password";
      };
      # The image runs as uid 472.
      systemd.tmpfiles.rules = [ "d /var/lib/nbpy-grafana 0700 472 472 - -" ];
      systemd.services.nbpy-grafana = {
        wants = [ "${ociBackend}-nbpy-grafana.service" ];
        after = [ "${ociBackend}-nbpy-grafana.service" ];
      };
    })
  ]);
}
