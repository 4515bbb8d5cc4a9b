# Which nbpy unit loads which systemd credential, for the NixOS module: the
# rule `nbpy units install` applies when it writes its credential drop-ins
# (src/units.rs, `missing_credentials`), in plain Nix (builtins only), so
# that tests/packaging.rs can evaluate it without nixpkgs and hold it equal
# to the Rust code on the same configurations.
let
  inherit (builtins)
    any
    attrNames
    concatMap
    elem
    filter
    foldl'
    head
    isAttrs
    isString
    lessThan
    listToAttrs
    mapAttrs
    match
    removeAttrs
    replaceStrings
    sort
    stringLength
    substring
    ;

  hasPrefix = p: s: substring 0 (stringLength p) s == p;
  hasSuffix = x: s:
    let n = stringLength s; m = stringLength x; in
    n >= m && substring (n - m) m s == x;
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];

  # The credentials each unit file in systemd/ loads itself: its
  # `LoadCredential=ID` lines (tests/packaging.rs checks this against the
  # files). Template units take a drop-in for every instance.
  unitCredentials = {
    "nbpy-influxdb-ready" = [ "influxdb-password" ];
    "nbpy-schema" = [ "influxdb-password" ];
    "nbpy-publisher@" = [ ];
    "nbpy-subscriber@" = [ "influxdb-password" ];
    "nbpy-grafana" = [ "grafana-admin-password" "influxdb-password" ];
    "nbpy-validate" = [ "influxdb-password" ];
    "nbpy-validate-periodic" = [ "influxdb-password" ];
    "nbpy-health" = [ "influxdb-password" ];
  };

  # The configuration keys (by prefix) each unit reads secrets from:
  # `SECRET_READERS` in src/units.rs (tests/packaging.rs checks). `%i` is
  # the instance name: each publisher reads its own table only.
  secretReaders = {
    "nbpy-influxdb-ready" = [ "influxdb." ];
    "nbpy-health" = [ "influxdb." ];
    "nbpy-validate" = [ "influxdb." ];
    "nbpy-validate-periodic" = [ "influxdb." ];
    "nbpy-subscriber@" = [ "influxdb." ];
    "nbpy-schema" = [ "influxdb." "schema." ];
    "nbpy-grafana" = [ "influxdb." "grafana." ];
    "nbpy-publisher@" = [ "publishers.%i." ];
  };

  # `nbpy-publisher@kraken` -> `nbpy-publisher@`; other names stay.
  templateOf = unit:
    let m = match "([^@]+@).+" unit; in
    if m == null then unit else head m;

  # Every `*_file` key holding a string, with its dotted name
  # (`config::secret_files`).
  secretFiles = prefix: v:
    if !isAttrs v then [ ] else
    concatMap
      (k:
        let
          key = if prefix == "" then k else "${prefix}.${k}";
          x = v.${k};
        in
        if isString x && hasSuffix "_file" k && k != "file"
        then [{ inherit key; value = x; }]
        else secretFiles key x)
      (attrNames v);

  # A bare name is a systemd credential; a path is read as it is
  # (`units::credential_name`).
  isCredential = s: match "[A-Za-z0-9_.@-]+" s != null && !hasPrefix "." s;

  # The readers, templates whose prefixes name the instance expanded to
  # one entry per configured instance.
  readers = settings:
    let
      expand = unit: prefixes:
        if !(any (p: match ".*%i.*" p != null) prefixes) then
          [{ name = unit; value = prefixes; }]
        else
          map
            (n: {
              name = "${unit}${n}";
              value = map (replaceStrings [ "%i" ] [ n ]) prefixes;
            })
            (attrNames (settings.${if unit == "nbpy-publisher@" then "publishers" else "subscribers"} or { }));
    in
    listToAttrs (concatMap (u: expand u secretReaders.${u}) (attrNames secretReaders));

  # Per unit, the credentials the configuration names that its unit file
  # does not load: what `nbpy units install` puts in the unit's
  # 50-nbpy-credentials.conf. Units that need none are left out.
  missing = settings:
    let
      files = secretFiles "" settings;
      forUnit = unit: prefixes:
        sort lessThan (unique (filter
          (id: !elem id unitCredentials.${templateOf unit})
          (map (f: f.value) (filter
            (f: isCredential f.value && any (p: hasPrefix p f.key) prefixes)
            files))));
      all = mapAttrs forUnit (readers settings);
    in
    removeAttrs all (filter (u: all.${u} == [ ]) (attrNames all));

  # `LoadCredential=` for every unit the module gives a drop-in (the unit
  # files' and the instances that need credentials of their own): the unit
  # file's own IDs and the configuration's (`missing`), each from its file
  # in `files` (ID -> path, never a store copy of a secret) when one is
  # given, else by bare ID from the credstore (/etc/credstore/…), as
  # `units install` loads them on any other system. The list starts with ""
  # (reset), so a file wins whatever systemd makes of an ID given twice. A
  # unit that needs nothing beyond its file's credstore IDs gets [ ].
  loadCredentials = { settings, files ? { } }:
    let
      extra = missing settings;
      hasFile = id: files ? ${id} && files.${id} != null;
      load = id: if hasFile id then "${id}:${toString files.${id}}" else id;
      forUnit = unit:
        let ids = unitCredentials.${templateOf unit} ++ (extra.${unit} or [ ]); in
        if extra ? ${unit} || any hasFile ids then [ "" ] ++ map load ids else [ ];
    in
    mapAttrs (unit: _: forUnit unit) (unitCredentials // extra);
in
{
  inherit unitCredentials secretReaders missing loadCredentials;
}
