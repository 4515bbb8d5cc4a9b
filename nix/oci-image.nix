# The OCI image, built by Nix: the same binaries as the package, a non-root
# user, and the same HEALTHCHECK as docker/Dockerfile, so compose works with
# either image.
{ lib
, dockerTools
, nbpy
}:

let
  uid = "10001";
  seconds = s: s * 1000000000;
in
dockerTools.buildLayeredImage {
  name = "nbpy";
  tag = nbpy.version;
  contents = [ nbpy ];

  # /etc/passwd so the user has a name; writable state and the directory the
  # `grafana render` one-shot fills (a named volume mounted there starts as a
  # copy of it, owned by the non-root user).
  extraCommands = ''
    mkdir -p etc tmp var/lib/nbpy etc/nbpy etc/grafana/provisioning
    chmod 1777 tmp
    echo "root:x:0:0:root:/root:/bin/false" > etc/passwd
    echo "nbpy:x:${uid}:${uid}:nbpy:/var/lib/nbpy:/bin/false" >> etc/passwd
    echo "root:x:0:" > etc/group
    echo "nbpy:x:${uid}:" >> etc/group
  '';
  fakeRootCommands = ''
    chown -R ${uid}:${uid} var/lib/nbpy etc/grafana/provisioning
  '';

  config = {
    User = "${uid}:${uid}";
    WorkingDir = "/var/lib/nbpy";
    Cmd = [ "/bin/nbpy" "--help" ];
    Env = [ "PATH=/bin" ];
    Volumes = { "/var/lib/nbpy" = { }; };
    ExposedPorts = { "9184/tcp" = { }; };
    Healthcheck = {
      Test = [ "CMD" "/bin/nbpy" "health-check" ];
      Interval = seconds 10;
      Timeout = seconds 5;
      StartPeriod = seconds 10;
      Retries = 3;
    };
    Labels = {
      "org.opencontainers.image.title" = "nbpy";
      "org.opencontainers.image.description" = nbpy.meta.description;
      "org.opencontainers.image.version" = nbpy.version;
    };
  };
}
