# A check of nixos-module/ and flake.nix without nixpkgs' packages: owns the evaluation of the
# module through the real `lib.evalModules`, with stub declarations of the few NixOS options it sets
# (systemd, users, environment, networking, assertions, warnings) and a stub `pkgs` whose
# derivations are attribute sets that keep what the module gave them. It checks what the module sets
# for many configurations, that the configurations NixOS must refuse are refused, and returns what
# scripts/check-nix.sh needs to go further:
#
# - `builds`: for each configuration whose /etc/plumb/plumb.toml is built with `plumb check-config`,
#   the settings the module renders (what pkgs.formats.toml turns into TOML), the module's own
#   build script and the store paths it names, and, for a configuration plumb must refuse, part of
#   the refusal;
# - `refusals`: for each configuration that must fail evaluation, words its error must contain.
#   With `--argstr refuse NAME`, this file evaluates that configuration's settings instead (the
#   error is then the result), so the script can read the message; `builtins.tryEval`, used here,
#   only says that it failed.
#
#   nix-instantiate --eval --strict --json nix/eval-test.nix --arg lib 'import /path/to/nixpkgs/lib'
#
# Any nixpkgs checkout's lib/ works (a lib-only one is enough). The VM test's node
# (nix/vm-test.nix) is one of the configurations.
{
  lib,
  refuse ? null,
}:

let
  inherit (lib) mkOption types;

  fakeDrv = hash: name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/${hash}-${name}";
  };
  drv = fakeDrv "00000000000000000000000000000000";

  # The rendered config has its own store path, so the build script's mention of it is unambiguous.
  renderedHash = "11111111111111111111111111111111";

  pkgs = {
    # pkgs.formats.toml's generate: JSON of the value, turned into TOML by a builder. The module
    # declares its own settings type, so the format's type is not needed.
    formats.toml =
      { }:
      {
        generate = name: value: fakeDrv renderedHash name // { rendered = value; };
      };
    runCommand = name: env: script: drv name // { inherit script; };
    stdenv = {
      buildPlatform.canExecute = _: true;
      hostPlatform = { };
    };
    callPackage = _: _: drv "plumb-default";
    writeShellScript = name: _: drv name;
    openssh = drv "openssh";
    gnupg = drv "gnupg";
    git = drv "git";
    curl = drv "curl";
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
      systemd.package = opt types.package (drv "systemd");
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

  # The flake's outputs, with this lib as nixpkgs' (only the module is used from them).
  flake = import ../flake.nix;
  flakeOutputs = flake.outputs {
    self = flakeOutputs;
    nixpkgs = { inherit lib; };
  };

  evalWith =
    module: modules:
    (lib.evalModules {
      modules = [
        stubs
        module
        { _module.args = { inherit pkgs utils; }; }
      ]
      ++ modules;
    }).config;
  eval = evalWith ../nixos-module;

  plumbPackage = drv "plumb";
  bin = "${plumbPackage}/bin/plumb";

  failedAssertions = c: map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  # Exactly one assertion fails, and its message has every one of `words`.
  failsWith =
    c: words:
    let
      failed = failedAssertions c;
    in
    lib.length failed == 1 && lib.all (w: lib.hasInfix w (lib.head failed)) words;
  passes = c: failedAssertions c == [ ];
  # What the generator and the daemon read: the value the module hands to pkgs.formats.toml.
  fileOf = c: c.environment.etc."plumb/plumb.toml".source;
  rendered = modules: (fileOf (eval (modules ++ [ { services.plumb.checkConfig = lib.mkForce false; } ]))).rendered;

  upstream = "https://git.example.org/ops/config.git";

  # A configuration as a user writes one.
  web = {
    networking.hostName = "web1";
    services.plumb = {
      enable = true;
      package = plumbPackage;
      settings = {
        global.upstream = upstream;
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
  withWeb = modules: eval ([ web ] ++ modules);
  plumbSettings = settings: withWeb [ { services.plumb.settings.plumb = settings; } ];

  defaults = eval [ web ];
  custom = withWeb [
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
  noMetricsButFirewall = withWeb [
    {
      services.plumb = {
        metricsAddress = "";
        openFirewall = true;
      };
    }
  ];
  withPackage = withWeb [ { services.plumb.settings.global.package = "nginx"; } ];

  # metricsAddress: what plumb accepts passes and opens its port; anything else fails an assertion
  # that names the value, and the firewall is still evaluated (no `toInt` crash) and left closed.
  metrics =
    address:
    withWeb [
      {
        services.plumb = {
          metricsAddress = address;
          openFirewall = true;
        };
      }
    ];
  portOf = address: (metrics address).networking.firewall.allowedTCPPorts;
  goodAddresses = {
    ":9222" = 9222;
    "127.0.0.1:9300" = 9300;
    "0.0.0.0:80" = 80;
    "[::1]:9222" = 9222;
    "[fe80::1]:65535" = 65535;
  };
  badAddresses = [
    "localhost"
    "localhost:9222"
    "9222"
    ":0"
    ":65536"
    "256.0.0.1:9222"
    "::1:9222"
    " :9222"
  ];
  refusedAddress =
    address:
    let
      c = metrics address;
      ports = builtins.tryEval (builtins.deepSeq c.networking.firewall.allowedTCPPorts c.networking.firewall.allowedTCPPorts);
    in
    failsWith c [
      "services.plumb.metricsAddress = ${builtins.toJSON address} is not an address plumb can listen on"
      "host name"
    ]
    && ports.success
    && ports.value == [ ];

  # settings.plumb.* of the user's own win over the module's (mkDefault): no conflict.
  userMetrics = withWeb [
    {
      services.plumb = {
        openFirewall = true;
        settings.plumb.metrics_address = "127.0.0.1:9400";
      };
    }
  ];
  userBadMetrics = plumbSettings { metrics_address = "localhost:9400"; };
  userGroups = plumbSettings {
    admin_group = "wheel";
    readonly_group = "users";
  };
  userHosts = withWeb [
    {
      services.plumb = {
        hosts = [ "web" ];
        settings.plumb.hosts = [ "edge" ];
      };
    }
  ];

  # Bootstrap: the config comes from git; the options that would write it are refused.
  bootstrap = {
    services.plumb = {
      enable = true;
      package = plumbPackage;
      bootstrap.url = upstream;
    };
  };
  bootstrapped = eval [ bootstrap ];
  bootstrapWith = settings: eval [
    bootstrap
    { services.plumb = settings; }
  ];
  bootstrapRefuses = settings: words: failsWith (bootstrapWith settings) words;

  disabled = eval [ { services.plumb.settings.plumb.interval = "1m"; } ];
  vm = eval [ (import ./vm-test.nix { inherit lib; }).nodes.machine ];
  fromFlake = evalWith flakeOutputs.nixosModules.default [ web ];
  # The flake's module and the path, both imported: one module (NixOS deduplicates by path).
  flakeAndPath = evalWith flakeOutputs.nixosModules.default [
    ../nixos-module
    web
  ];

  # Every key the settings type declares, set once: plumb must accept them all (check-nix.sh runs
  # check-config on it), and the check below makes a newly declared key join this configuration.
  # webhook_secret and webhook_secret_file exclude each other: the first is in `secret`.
  everyKey = {
    networking.hostName = "web1";
    services.plumb = {
      enable = true;
      package = plumbPackage;
      settings = {
        global = {
          machine = "web1";
          inherit upstream;
          branch = "main";
          mount = "/srv/checkouts";
          action = "reload";
          package = "nginx";
          user = "www-data";
          dirs = [
            {
              local = "/etc/app";
              link = "app";
            }
          ];
          noop = false;
          keys = [
            {
              path = "/etc/plumb/keys";
              ro = true;
            }
          ];
        };
        services = [
          {
            machine = "web1";
            service = "nginx";
            inherit upstream;
            branch = "prod";
            mount = "/srv/nginx-checkouts";
            action = "try-reload-or-restart";
            package = "nginx";
            user = "root";
            dirs = [
              {
                local = "/etc/nginx";
                link = "nginx/etc";
                file = false;
                ro = true;
              }
            ];
            noop = true;
            check = "nginx -t -q -c {dir}/nginx.conf";
            check_timeout = "30s";
            health = {
              settle = "3s";
              command = "systemctl is-active nginx";
              url = "http://127.0.0.1/health";
              timeout = "10s";
            };
          }
        ];
        plumb = {
          state_dir = "/var/lib/plumb";
          interval = "2m";
          jitter = "10s";
          fetch_timeout = "1m";
          ssh_key = "/etc/plumb/id_ed25519";
          known_hosts = [ "/etc/plumb/known_hosts" ];
          hosts = [ "web" ];
          socket = "/run/plumb/plumb.sock";
          admin_group = "ops";
          readonly_group = "ops-ro";
          webhook_secret_file = "/run/secrets/plumb-webhook";
          upstream = [
            {
              url = upstream;
              allowed_signers = "/etc/plumb/allowed_signers";
              keyring = "/etc/plumb/keyring.gpg";
              force_push = "refuse";
            }
          ];
          max_file_size = "64MiB";
          metrics_address = "127.0.0.1:9222";
        };
      };
    };
  };
  secret = {
    services.plumb.settings.plumb.webhook_secret = "0123456789abcdef-not-a-real-one";
  };
  everyKeyFile = rendered [ everyKey ];
  secretFile = rendered [
    web
    secret
  ];

  # The keys the settings type declares, table by table (a table's submodule found through nullOr
  # and listOf), against the keys the every-key configuration sets.
  declared = type: lib.attrNames (removeAttrs (type.getSubOptions [ ]) [ "_module" ]);
  subType = type: name: (type.getSubOptions [ ]).${name}.type;
  settingsOptionType =
    (lib.evalModules {
      modules = [
        stubs
        ../nixos-module
        { _module.args = { inherit pkgs utils; }; }
      ];
    }).options.services.plumb.settings.type;
  unwrap = type: if type.name == "submodule" then type else unwrap type.nestedTypes.elemType;
  tables =
    let
      s = settingsOptionType;
      service = unwrap (subType s "services");
      plumb = unwrap (subType s "plumb");
    in
    {
      global = {
        type = unwrap (subType s "global");
        values = [ everyKeyFile.global ];
      };
      service = {
        type = service;
        values = everyKeyFile.services;
      };
      dir = {
        type = unwrap (subType service "dirs");
        values = (lib.head everyKeyFile.services).dirs;
      };
      health = {
        type = unwrap (subType service "health");
        values = [ (lib.head everyKeyFile.services).health ];
      };
      plumb = {
        type = plumb;
        values = [
          everyKeyFile.plumb
          secretFile.plumb
        ];
      };
      upstream = {
        type = unwrap (subType plumb "upstream");
        values = everyKeyFile.plumb.upstream;
      };
      key = {
        type = unwrap (subType (unwrap (subType s "global")) "keys");
        values = everyKeyFile.global.keys;
      };
    };
  undeclaredOrUnset = lib.concatLists (
    lib.mapAttrsToList (
      table: t:
      let
        set = lib.unique (lib.concatMap lib.attrNames t.values);
      in
      map (k: "${table}.${k}") (
        lib.subtractLists set (declared t.type) ++ lib.subtractLists (declared t.type) set
      )
    ) tables
  );

  # Two nginx for this machine: one under its hostname, one under its `hosts` alias. Evaluation
  # has nothing against it; plumb check-config refuses it, but only if the module's build command
  # passes the hostname (`--hosts web1`): the file names only the alias.
  twoNginx = {
    networking.hostName = "web1";
    services.plumb = {
      enable = true;
      package = plumbPackage;
      hosts = [ "edge" ];
      settings = {
        global = {
          inherit upstream;
          action = "reload";
        };
        services = [
          {
            machine = "web1";
            service = "nginx";
            dirs = [
              {
                local = "/etc/nginx";
                link = "web1/nginx";
              }
            ];
          }
          {
            machine = "edge";
            service = "nginx";
            dirs = [
              {
                local = "/etc/nginx-edge";
                link = "edge/nginx";
              }
            ];
          }
        ];
      };
    };
  };

  # Configurations NixOS must refuse at evaluation, and words of its message.
  refusals = {
    misspelt-plumb-key = {
      modules = [ { services.plumb.settings.plumb.intervall = "2m"; } ];
      words = [
        "The option `services.plumb.settings.plumb.intervall' does not exist"
        "Did you mean `services.plumb.settings.plumb.interval'"
      ];
    };
    misspelt-global-key = {
      modules = [ { services.plumb.settings.global.upstrem = upstream; } ];
      words = [ "The option `services.plumb.settings.global.upstrem' does not exist" ];
    };
    misspelt-table = {
      modules = [ { services.plumb.settings.service = [ ]; } ];
      words = [ "The option `services.plumb.settings.service' does not exist" ];
    };
    misspelt-service-key = {
      modules = [
        {
          services.plumb.settings.services = [
            {
              machine = "web1";
              service = "cron";
              acton = "restart";
            }
          ];
        }
      ];
      words = [
        "The option `services.plumb.settings.services."
        ".acton' does not exist"
      ];
    };
    misspelt-dir-key = {
      modules = [
        {
          services.plumb.settings.services = [
            {
              machine = "web1";
              service = "cron";
              dirs = [
                {
                  local = "/etc/cron.d";
                  lnk = "cron";
                }
              ];
            }
          ];
        }
      ];
      words = [ ".lnk' does not exist" ];
    };
    misspelt-upstream-key = {
      modules = [
        {
          services.plumb.settings.plumb.upstream = [
            {
              url = upstream;
              allowed_signer = "/etc/plumb/allowed_signers";
            }
          ];
        }
      ];
      words = [ ".allowed_signer' does not exist" ];
    };
    unknown-action = {
      modules = [
        {
          services.plumb.settings.services = [
            {
              machine = "web1";
              service = "cron";
              action = "relaod";
            }
          ];
        }
      ];
      words = [
        ".action' is not of type `null or one of \"reload\""
        "\"relaod\""
      ];
    };
    service-without-name = {
      modules = [ { services.plumb.settings.services = [ { machine = "web1"; } ]; } ];
      words = [ ".service' was accessed but has no value defined" ];
    };
    relative-state-dir = {
      modules = [ { services.plumb.settings.plumb.state_dir = "var/lib/plumb"; } ];
      words = [ "`services.plumb.settings.plumb.state_dir' is not of type `null or absolute path (a string)'" ];
    };
    key-as-path-literal = {
      # A path literal would copy the private key into the world-readable store.
      modules = [ { services.plumb.settings.plumb.ssh_key = ./eval-test.nix; } ];
      words = [ "`services.plumb.settings.plumb.ssh_key' is not of type `null or absolute path (a string)'" ];
    };
    string-for-bool = {
      modules = [ { services.plumb.settings.global.noop = "yes"; } ];
      words = [ "`services.plumb.settings.global.noop' is not of type `null or boolean'" ];
    };
  };
  # What pkgs.formats.toml does with the settings: turn them into JSON.
  refusedSettings = name: builtins.toJSON (rendered ([ web ] ++ refusals.${name}.modules));

  checks = {
    "settings: the module's keys join the user's [plumb], unset keys are left out" =
      (rendered [ web ]).plumb == {
        interval = "2m";
        metrics_address = ":9222";
        admin_group = "plumb";
        readonly_group = "plumb-ro";
      }
      && (rendered [ web ]).global == { inherit upstream; }
      && (rendered [ web ]).services == [
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
    "settings: hosts and metrics_address go to [plumb]" =
      custom.services.plumb.settings.plumb.hosts == [
        "web"
        "edge"
      ]
      && custom.services.plumb.settings.plumb.metrics_address == "127.0.0.1:9300";
    "settings: an empty dirs list stays (it overrides [global]'s)" =
      (rendered [
        web
        { services.plumb.settings.services = [ { service = "cron"; machine = "web1"; dirs = [ ]; } ]; }
      ]).services
      == [
        (lib.head (rendered [ web ]).services)
        {
          service = "cron";
          machine = "web1";
          dirs = [ ];
        }
      ];
    "settings: every declared key is set by the every-key configuration, and no other" =
      undeclaredOrUnset == [ ];
    "settings: a misspelt key, a wrong type, a missing service name fail evaluation" = lib.all (
      name: !(builtins.tryEval (refusedSettings name)).success
    ) (lib.attrNames refusals);
    "settings: the user's metrics_address wins over metricsAddress, and its port is opened" =
      (rendered [
        web
        { services.plumb.settings.plumb.metrics_address = "127.0.0.1:9400"; }
      ]).plumb.metrics_address == "127.0.0.1:9400"
      && userMetrics.networking.firewall.allowedTCPPorts == [ 9400 ]
      && passes userMetrics;
    "settings: a bad metrics_address of the user's is named as such" =
      failsWith userBadMetrics [
        "services.plumb.settings.plumb.metrics_address = \"localhost:9400\" is not an address"
      ];
    "settings: the user's groups win, and are the ones created" =
      userGroups.services.plumb.settings.plumb.admin_group == "wheel"
      && lib.attrNames userGroups.users.groups == [
        "users"
        "wheel"
      ];
    "settings: hosts and settings.plumb.hosts add up" =
      lib.sort lib.lessThan userHosts.services.plumb.settings.plumb.hosts == [
        "edge"
        "web"
      ];
    "metricsAddress: valid addresses open their port" = lib.all (a: portOf a == [ goodAddresses.${a} ] && passes (metrics a)) (
      lib.attrNames goodAddresses
    );
    "metricsAddress: anything else fails an assertion naming it, and the firewall stays closed" =
      lib.all refusedAddress badAddresses;
    "etc: checked config at /etc/plumb/plumb.toml" =
      let
        script = (fileOf defaults).script;
      in
      lib.hasInfix "${bin} check-config /nix/store/${renderedHash}-plumb.toml --hosts ${lib.escapeShellArg "web1"}" script;
    "etc: unchecked config is the rendered file" =
      (fileOf custom).rendered.plumb.state_dir == "/srv/plumb"
      && (fileOf custom).outPath == "/nix/store/${renderedHash}-plumb.toml";
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
        pkgs.git
        pkgs.gnupg
      ]
      && s.reloadTriggers == [ (fileOf defaults) ];
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
    "no assertion fails normally" = passes defaults && passes custom;
    "openFirewall without metrics fails an assertion" = failsWith noMetricsButFirewall [
      "services.plumb.openFirewall needs a metrics port"
    ];
    "no warnings normally" = defaults.warnings == [ ] && custom.warnings == [ ];
    "a package key warns" = lib.length withPackage.warnings == 1;
    "bootstrap: no /etc file, the repository in the environment, conditions reset" =
      let
        s = bootstrapped.systemd.services.plumb;
      in
      !(bootstrapped.environment.etc ? "plumb/plumb.toml")
      && s.environment == {
        PLUMB_BOOTSTRAP = upstream;
        PLUMB_BOOTSTRAP_DIR = "plumb";
        PLUMB_BOOTSTRAP_BRANCH = "main";
      }
      && s.unitConfig.ConditionPathExists == [ "" ]
      && s.reloadTriggers == [ ]
      && passes bootstrapped
      && bootstrapped.warnings == [ ];
    "bootstrap: the default groups exist, no port is opened, nothing is written to settings" =
      lib.attrNames bootstrapped.users.groups == [
        "plumb"
        "plumb-ro"
      ]
      && bootstrapped.networking.firewall.allowedTCPPorts == [ ]
      && bootstrapped.services.plumb.settings.plumb.metrics_address == null;
    "bootstrap: settings fail an assertion" =
      failsWith (eval [
        web
        bootstrap
      ]) [ "services.plumb.settings is not used with services.plumb.bootstrap" ]
      && bootstrapRefuses { settings.plumb.interval = "1m"; } [
        "services.plumb.settings is not used"
        "plumb/ of ${upstream}"
      ];
    "bootstrap: hosts fails an assertion" = bootstrapRefuses { hosts = [ "web" ]; } [
      "services.plumb.hosts is not used with services.plumb.bootstrap"
      "[plumb] hosts"
    ];
    "bootstrap: metricsAddress fails an assertion, even with the default value" =
      bootstrapRefuses { metricsAddress = ":9222"; } [
        "services.plumb.metricsAddress is not used"
        "[plumb] metrics_address"
      ];
    "bootstrap: a group option fails an assertion that says to declare the group" =
      bootstrapRefuses { adminGroup = "ops"; } [
        "services.plumb.adminGroup is not used"
        "[plumb] admin_group"
        "users.groups"
      ]
      && bootstrapRefuses { readOnlyGroup = "ops-ro"; } [
        "services.plumb.readOnlyGroup is not used"
        "[plumb] readonly_group"
      ];
    "bootstrap: openFirewall fails an assertion" = bootstrapRefuses { openFirewall = true; } [
      "services.plumb.openFirewall cannot be used with services.plumb.bootstrap"
      "networking.firewall.allowedTCPPorts"
    ];
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
    # Older Nix's `flake check` (2.8, Debian bookworm's, for one) takes a module only as a
    # function or an attribute set: a path fails it.
    "flake: nixosModules.default is a module, not a path, and works as one" =
      !(builtins.isPath flakeOutputs.nixosModules.default)
      && builtins.isAttrs flakeOutputs.nixosModules.default
      && (fileOf fromFlake).script == (fileOf defaults).script;
    "flake: its module and the path together are one module" =
      (fileOf flakeAndPath).script == (fileOf defaults).script;
    "flake: nixpkgs is a NixOS release branch" =
      builtins.match "github:NixOS/nixpkgs/nixos-[0-9]{2}\\.[0-9]{2}" flake.inputs.nixpkgs.url != null;
  };
  failed = lib.attrNames (lib.filterAttrs (_: ok: !ok) checks);

  # What check-nix.sh renders and runs the module's build script on.
  build =
    modules: refused:
    let
      c = eval modules;
    in
    {
      settings = rendered modules;
      script = (fileOf c).script;
      renderedPath = "/nix/store/${renderedHash}-plumb.toml";
      plumb = lib.getExe' c.services.plumb.package "plumb";
      inherit refused;
    };
in
if refuse != null then
  refusedSettings refuse
else if failed != [ ] then
  throw "nix/eval-test.nix: failed: ${lib.concatStringsSep "; " failed}"
else
  {
    passed = lib.length (lib.attrNames checks);
    builds = {
      defaults = build [ web ] null;
      every-key = build [ everyKey ] null;
      webhook-secret = build [
        web
        secret
      ] null;
      vm = build [ (import ./vm-test.nix { inherit lib; }).nodes.machine ] null;
      two-nginx-for-this-host = build [ twoNginx ] "which are both this machine";
    };
    refusals = lib.mapAttrs (_: r: r.words) refusals;
  }
