# A development check of nixos-module/ without nixpkgs: owns the evaluation of the module through
# the real `lib.evalModules`, with stub declarations of the few NixOS options it sets (systemd,
# users, environment, networking, assertions, warnings) and a stub `pkgs`. It checks what the
# module sets for a few configurations and returns the rendered settings (the JSON that
# pkgs.formats.toml turns into plumb.toml), so scripts/check-nix.sh can feed them to
# `plumb check-config`. The VM test's node (nix/vm-test.nix) is one of the configurations.
#
#   nix-instantiate --eval --strict --json nix/eval-test.nix --arg lib 'import /path/to/nixpkgs/lib'
#
# Any nixpkgs checkout's lib/ works (a lib-only one is enough). CI has none, so it only parses.
{ lib }:

let
  inherit (lib) mkOption types;

  fakeDrv = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  # pkgs.formats.toml's type, as nixpkgs defines it (pkgs/pkgs-lib/formats.nix).
  tomlType =
    let
      valueType =
        types.oneOf [
          types.bool
          types.int
          types.float
          types.str
          types.path
          (types.attrsOf valueType)
          (types.listOf valueType)
        ]
        // {
          description = "TOML value";
        };
    in
    valueType;

  pkgs = {
    formats.toml =
      { }:
      {
        type = tomlType;
        generate = name: value: fakeDrv name // { rendered = value; };
      };
    runCommand = name: env: script: fakeDrv name // { inherit script; };
    stdenv = {
      buildPlatform.canExecute = _: true;
      hostPlatform = { };
    };
    callPackage = _: _: fakeDrv "plumb-default";
    writeShellScript = name: _: fakeDrv name;
    openssh = fakeDrv "openssh";
    gnupg = fakeDrv "gnupg";
    git = fakeDrv "git";
    curl = fakeDrv "curl";
  };

  # nixos/lib/utils.nix's quoting for Exec* lines.
  utils.escapeSystemdExecArgs = lib.concatMapStringsSep " " (
    arg: lib.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg)
  );

  opt = type: default: mkOption { inherit type default; };

  # The NixOS options the module and the VM test's node set, declared as NixOS declares them
  # where it matters for merging (attrsOf submodules, lists).
  stubs = {
    options = {
      assertions = opt (types.listOf types.unspecified) [ ];
      warnings = opt (types.listOf types.str) [ ];
      environment.etc = opt (types.attrsOf (
        types.submodule { options.source = mkOption { type = types.unspecified; }; }
      )) { };
      environment.systemPackages = opt (types.listOf types.package) [ ];
      systemd.package = opt types.package (fakeDrv "systemd");
      systemd.packages = opt (types.listOf types.package) [ ];
      systemd.generators = opt (types.attrsOf types.path) { };
      systemd.tmpfiles.rules = opt (types.listOf types.str) [ ];
      systemd.services = opt (types.attrsOf (
        types.submodule {
          options = {
            description = opt types.str "";
            wantedBy = opt (types.listOf types.str) [ ];
            path = opt (types.listOf types.package) [ ];
            reloadTriggers = opt (types.listOf types.unspecified) [ ];
            environment = opt (types.attrsOf types.str) { };
            unitConfig = opt (types.attrsOf types.anything) { };
            restartIfChanged = opt types.bool true;
            serviceConfig = opt (types.attrsOf types.anything) { };
          };
        }
      )) { };
      users.groups = opt (types.attrsOf (
        types.submodule { options.gid = opt (types.nullOr types.int) null; }
      )) { };
      users.users = opt (types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; })) { };
      networking.hostName = opt types.str "machine";
      networking.firewall.allowedTCPPorts = opt (types.listOf types.port) [ ];
    };
  };

  eval =
    modules:
    (lib.evalModules {
      modules = [
        stubs
        ../nixos-module
        { _module.args = { inherit pkgs utils; }; }
      ]
      ++ modules;
    }).config;

  plumbPackage = fakeDrv "plumb";
  bin = "${plumbPackage}/bin/plumb";

  # A configuration as a user writes one.
  web = {
    services.plumb = {
      enable = true;
      package = plumbPackage;
      settings = {
        global.upstream = "https://git.example.org/ops/config.git";
        plumb.interval = "2m";
        services = [
          {
            machine = "web1";
            service = "nginx";
            action = "reload";
            dirs = [
              {
                local = "/etc/nginx";
                link = "nginx/etc";
              }
            ];
          }
        ];
      };
    };
  };

  defaults = eval [ web ];
  custom = eval [
    web
    {
      services.plumb = {
        hosts = [
          "web"
          "edge"
        ];
        metricsAddress = "127.0.0.1:9300";
        openFirewall = true;
        adminGroup = "ops";
        readOnlyGroup = "ops-ro";
        extraArgs = [
          "--interval"
          "30s"
        ];
        checkConfig = false;
        settings.plumb.state_dir = "/srv/plumb";
      };
    }
  ];
  noMetricsButFirewall = eval [
    web
    {
      services.plumb = {
        metricsAddress = "";
        openFirewall = true;
      };
    }
  ];
  withPackage = eval [
    web
    { services.plumb.settings.global.package = "nginx"; }
  ];
  bootstrapped = eval [
    {
      services.plumb = {
        enable = true;
        package = plumbPackage;
        bootstrap.url = "https://git.example.org/ops/config.git";
      };
    }
  ];
  bootstrapWithSettings = eval [
    web
    { services.plumb.bootstrap.url = "https://git.example.org/ops/config.git"; }
  ];
  disabled = eval [ { services.plumb.settings.plumb.interval = "1m"; } ];
  vm = eval [ (import ./vm-test.nix { inherit lib; }).nodes.machine ];

  checks = {
    "settings: the module's keys join the user's [plumb]" = defaults.services.plumb.settings.plumb == {
      interval = "2m";
      metrics_address = ":9222";
      admin_group = "plumb";
      readonly_group = "plumb-ro";
    };
    "settings: hosts and metrics_address go to [plumb]" =
      custom.services.plumb.settings.plumb.hosts == [
        "web"
        "edge"
      ]
      && custom.services.plumb.settings.plumb.metrics_address == "127.0.0.1:9300";
    "etc: checked config at /etc/plumb/plumb.toml" =
      let
        src = defaults.environment.etc."plumb/plumb.toml".source;
      in
      lib.hasInfix "${bin} check-config /nix/store/" src.script && lib.hasInfix "--hosts" src.script && lib.hasInfix "machine" src.script;
    "etc: unchecked config is the rendered file" =
      custom.environment.etc."plumb/plumb.toml".source.rendered == custom.services.plumb.settings;
    "generator linked from the package" =
      defaults.systemd.generators == {
        plumb-generator = "${plumbPackage}/lib/systemd/system-generators/plumb-generator";
      };
    "units from the package" = defaults.systemd.packages == [ plumbPackage ];
    "plumbctl installed" = defaults.environment.systemPackages == [ plumbPackage ];
    "plumb.service enabled, PATH, reload trigger" =
      let
        s = defaults.systemd.services.plumb;
      in
      s.wantedBy == [ "multi-user.target" ]
      && s.path == [
        pkgs.openssh
        pkgs.gnupg
      ]
      && s.reloadTriggers == [ defaults.environment.etc."plumb/plumb.toml".source ];
    "ExecStart untouched without extraArgs" = !(defaults.systemd.services.plumb.serviceConfig ? ExecStart);
    "ExecStart reset and extended with extraArgs" = custom.systemd.services.plumb.serviceConfig.ExecStart == [
      ""
      ''"${bin}" "-c" "/etc/plumb/plumb.toml" "--interval" "30s"''
    ];
    "plumb-apply@ gets a PATH drop-in" = defaults.systemd.services."plumb-apply@".path == [
      defaults.systemd.package
    ];
    "groups created" = lib.attrNames defaults.users.groups == [
      "plumb"
      "plumb-ro"
    ];
    "custom groups created and configured" =
      lib.attrNames custom.users.groups == [
        "ops"
        "ops-ro"
      ]
      && custom.services.plumb.settings.plumb.admin_group == "ops"
      && custom.services.plumb.settings.plumb.readonly_group == "ops-ro";
    "state directory" = defaults.systemd.tmpfiles.rules == [ "d /var/lib/plumb 0755 root root - -" ];
    "custom state directory" = custom.systemd.tmpfiles.rules == [ "d /srv/plumb 0755 root root - -" ];
    "firewall closed by default" = defaults.networking.firewall.allowedTCPPorts == [ ];
    "openFirewall opens the metrics port" = custom.networking.firewall.allowedTCPPorts == [ 9300 ];
    "no assertion fails normally" = lib.all (a: a.assertion) (defaults.assertions ++ custom.assertions);
    "openFirewall without metrics fails an assertion" =
      !(lib.all (a: a.assertion) noMetricsButFirewall.assertions);
    "no warnings normally" = defaults.warnings == [ ] && custom.warnings == [ ];
    "a package key warns" = lib.length withPackage.warnings == 1;
    "bootstrap: no /etc file, the repository in the environment, conditions reset" =
      let
        s = bootstrapped.systemd.services.plumb;
      in
      !(bootstrapped.environment.etc ? "plumb/plumb.toml")
      && s.environment == {
        PLUMB_BOOTSTRAP = "https://git.example.org/ops/config.git";
        PLUMB_BOOTSTRAP_DIR = "plumb";
        PLUMB_BOOTSTRAP_BRANCH = "main";
      }
      && s.unitConfig.ConditionPathExists == [ "" ]
      && s.reloadTriggers == [ ]
      && lib.all (a: a.assertion) bootstrapped.assertions;
    "bootstrap with settings fails an assertion" =
      !(lib.all (a: a.assertion) bootstrapWithSettings.assertions);
    "no bootstrap: no environment, conditions kept" =
      defaults.systemd.services.plumb.environment == { }
      && !(defaults.systemd.services.plumb.unitConfig ? ConditionPathExists);
    "disabled: nothing set" =
      disabled.environment.etc == { } && disabled.systemd.services == { } && disabled.users.groups == { };
    "vm node: two services under the alias" =
      vm.services.plumb.settings.plumb.hosts == [ "testhost" ]
      && lib.length vm.services.plumb.settings.services == 2
      && vm.systemd.services ? svc-a
      && vm.systemd.services ? plumb;
  };
  failed = lib.attrNames (lib.filterAttrs (_: ok: !ok) checks);
in
if failed != [ ] then
  throw "nix/eval-test.nix: failed: ${lib.concatStringsSep "; " failed}"
else
  {
    passed = lib.length (lib.attrNames checks);
    # The settings of each configuration, for `plumb check-config` after json2toml.
    rendered = {
      defaults = defaults.services.plumb.settings;
      custom = custom.services.plumb.settings;
      vm = vm.services.plumb.settings;
    };
  }
