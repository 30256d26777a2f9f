# The NixOS module `services.plumb`: owns how plumb is wired into a NixOS system: the config file
# (rendered from `settings` at /etc/plumb/plumb.toml, the one path the generator reads, unless
# `bootstrap` has plumb take it from git), the
# generator link, the shipped units and their drop-ins (PATH, enablement, reload on a config
# change), the API's groups, the state directory and the optional firewall opening.
#
# The units are the package's own (units/, with /usr/bin paths replaced at build time by
# nix/package.nix), not redefined here: what runs on NixOS is what runs on Debian.
{
  config,
  options,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.plumb;
  opts = options.services.plumb;
  inherit (lib) mkOption types;
  settingsFormat = pkgs.formats.toml { };

  # The structure of `settings`: plumb.toml(5) as src/config.rs reads it. Every key is optional
  # (null: left out of the file, so plumb's own default applies) unless plumb requires it. No
  # freeform type anywhere: plumb refuses unknown keys at every level, so a freeform table would
  # only move a typo's error from evaluation to the build.
  optional =
    type: description:
    mkOption {
      type = types.nullOr type;
      default = null;
      inherit description;
    };
  required = type: description: mkOption { inherit type description; };
  # A string, so a path literal (a private key, say) is never copied into the world-readable store.
  absolutePath = types.strMatching "/.*" // {
    description = "absolute path (a string)";
  };
  # plumb's durations are humantime's: "90s", "5m", "1h 30m".
  duration = types.str;

  dirType = types.submodule {
    options = {
      local = required absolutePath "Where the files are bound on this machine.";
      link = required types.nonEmptyStr "The path in the repository (relative, no `..`).";
      file = optional types.bool "`local` and `link` are a single file (plumb's default: false).";
      ro = optional types.bool "Bind read-only (plumb's default: false).";
    };
  };

  # What `[global]` and each `[[services]]` entry may both say; `[global]` gives the default.
  serviceFields = {
    machine = optional types.nonEmptyStr "The machine that runs the service: a hostname or a `hosts` alias.";
    upstream = optional types.nonEmptyStr "The repository URL (https://, http://, git://, ssh://, user@host:path, file://).";
    branch = optional types.str ''The branch to track (plumb's default: "main").'';
    mount = optional absolutePath "The directory of the checkouts, as `<mount>/<service>/` (plumb's default: `<state_dir>/checkouts`).";
    action = optional (types.enum [
      "reload"
      "restart"
      "reload-or-restart"
      "try-reload-or-restart"
      "none"
      ""
    ]) "What the unit is told when its files changed (plumb's default: none).";
    package = optional types.str "A package for plumb to install with apt, dnf or pacman: none of them exists on NixOS (the module warns); install it with NixOS.";
    user = optional types.str "The owner of the service's files (plumb's default: root).";
    dirs = optional (types.listOf dirType) "What is bound where: `{ local, link, file, ro }`. An empty list binds nothing; unset, a service takes `[global]`'s.";
    noop = optional types.bool "Report what would be deployed, deploy nothing (plumb's default: false).";
  };

  healthType = types.submodule {
    options = {
      settle = optional duration ''How long the unit must stay up after an apply (plumb's default: "5s").'';
      command = optional types.str "A command (`sh -c`) that must succeed after `settle`.";
      url = optional types.str "An http:// URL that must answer 2xx after `settle`.";
      timeout = optional duration ''How long `command` and `url` get (plumb's default: "30s").'';
    };
  };

  serviceType = types.submodule {
    options = serviceFields // {
      service = required types.nonEmptyStr "The systemd unit (`nginx` is nginx.service), and the service's name in plumb.";
      check = optional types.str "A command (`sh -c`) that must accept a new revision before the service's files change.";
      check_timeout = optional duration ''How long `check` may run (plumb's default: "60s").'';
      health = optional healthType "What must hold after an apply, or the service is rolled back.";
    };
  };

  keyType = types.submodule {
    options = {
      path = required types.str "gitopper's key path.";
      ro = optional types.bool "gitopper's read-only flag.";
    };
  };

  upstreamType = types.submodule {
    options = {
      url = required types.nonEmptyStr "The upstream, exactly as the services write it.";
      # Public files: a path literal is copied to the store, which is what is wanted here.
      allowed_signers = optional types.path "An ssh allowed-signers file: branch heads must carry an ssh signature by one of its keys.";
      keyring = optional types.path "An OpenPGP keyring (read by gpgv): branch heads must carry a signature by one of its keys.";
      force_push = optional (types.enum [
        "follow"
        "refuse"
      ]) ''What a rewritten branch does: "follow" deploys it, "refuse" holds the service (plumb's default: "follow").'';
    };
  };

  plumbFields = {
    state_dir = optional absolutePath ''Stores, state files and default checkouts (plumb's default: "/var/lib/plumb").'';
    interval = optional duration ''Time between polls of an upstream (plumb's default: "5m").'';
    jitter = optional duration "Each wait is shortened by a random amount up to this (plumb's default: interval / 10).";
    fetch_timeout = optional duration ''A fetch taking longer is abandoned (plumb's default: "2m").'';
    ssh_key = optional absolutePath "The private key for ssh upstreams (outside the store).";
    known_hosts = optional (types.listOf absolutePath) "known_hosts files for ssh upstreams' host keys.";
    hosts = optional (types.listOf types.nonEmptyStr) "This machine's other names; the module adds `services.plumb.hosts`.";
    socket = optional absolutePath ''The control API's socket (plumb's default: "/run/plumb/plumb.sock").'';
    admin_group = optional types.str "The API's read-write group; set by the module from `services.plumb.adminGroup` unless set here.";
    readonly_group = optional types.str "The API's read-only group; set by the module from `services.plumb.readOnlyGroup` unless set here.";
    webhook_secret = optional types.str "The push webhook's secret: it would be in the world-readable store; prefer `webhook_secret_file`.";
    webhook_secret_file = optional absolutePath "A file (outside the store) holding the push webhook's secret.";
    upstream = optional (types.listOf upstreamType) "`[[plumb.upstream]]`: settings of one upstream URL (signatures, force-pushes).";
    max_file_size = optional types.str ''The largest file a revision may hold ("256MiB", "1G", bytes, "unlimited").'';
    metrics_address = optional types.str "Where /metrics is served; set by the module from `services.plumb.metricsAddress` unless set here.";
  };

  settingsType = types.submodule {
    options = {
      global = mkOption {
        type = types.submodule {
          options = serviceFields // {
            keys = optional (types.listOf keyType) "gitopper's ssh keys: accepted and ignored by plumb.";
          };
        };
        default = { };
        description = "`[global]`: defaults for every service.";
      };
      services = mkOption {
        type = types.listOf serviceType;
        default = [ ];
        description = "`[[services]]`: one entry per service and machine.";
      };
      plumb = mkOption {
        type = types.submodule { options = plumbFields; };
        default = { };
        description = "`[plumb]`: plumb's own settings.";
      };
    };
  };

  # The settings as the file says them: unset (null) keys left out, at any depth.
  withoutNulls =
    v:
    if builtins.isAttrs v then
      lib.mapAttrs (_: withoutNulls) (lib.filterAttrs (_: x: x != null) v)
    else if builtins.isList v then
      map withoutNulls v
    else
      v;
  fileSettings = withoutNulls cfg.settings;

  renderedConfig = settingsFormat.generate "plumb.toml" fileSettings;

  # A bad config makes the generator write nothing at boot (and say so only in the kernel log), so
  # catch it when the system is built. `check-config` reads nothing but the file; the hostname
  # is passed so the per-machine checks (two services of one name here) apply to this host.
  canRunPlumb = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
  configFile =
    if cfg.checkConfig && canRunPlumb then
      pkgs.runCommand "plumb.toml" { preferLocalBuild = true; } ''
        ${lib.getExe' cfg.package "plumb"} check-config ${renderedConfig} ${
          lib.optionalString (
            config.networking.hostName != ""
          ) "--hosts ${lib.escapeShellArg config.networking.hostName}"
        }
        cp ${renderedConfig} $out
      ''
    else
      renderedConfig;

  bootstrapped = cfg.bootstrap != null;
  bootstrapSource =
    if bootstrapped then "${cfg.bootstrap.dir}/ of ${cfg.bootstrap.url}" else "the bootstrap repository";

  # plumb's own default when [plumb] state_dir is not set (README, `[plumb]`).
  stateDir = if cfg.settings.plumb.state_dir != null then cfg.settings.plumb.state_dir else "/var/lib/plumb";

  # The address the file says: metricsAddress unless settings.plumb.metrics_address is set.
  metricsAddress = cfg.settings.plumb.metrics_address;
  metricsOption =
    if metricsAddress == cfg.metricsAddress then
      "services.plumb.metricsAddress"
    else
      "services.plumb.settings.plumb.metrics_address";
  # What plumb accepts (parse_metrics_address in src/config.rs): "" (off), ":port" (every
  # address), or an IP address and a port, "[v6]:port" for IPv6. A name is not resolved. The port,
  # null when the address is not one of these.
  metricsPort =
    let
      octet = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
      m = builtins.match "(${octet}(\\.${octet}){3}|[[][0-9A-Fa-f:.]+])?:([1-9][0-9]{0,4})" metricsAddress;
      port = lib.toInt (lib.last m);
    in
    if metricsAddress == null || m == null || port > 65535 then null else port;

  # Services (and [global]) naming a `package`: plumb installs packages with apt, dnf or pacman,
  # none of which NixOS has, so such an apply would fail.
  withPackage = lib.filter (s: s.package != null) (cfg.settings.services ++ [ cfg.settings.global ]);

  # Options that say something about the config file, which comes from git with `bootstrap`: set
  # there, they would do nothing. Any definition counts, even one repeating the default.
  definedByUser = name: opts.${name}.highestPrio < (lib.mkOptionDefault null).priority;
  fileOptions = {
    hosts = "hosts";
    metricsAddress = "metrics_address";
    adminGroup = "admin_group";
    readOnlyGroup = "readonly_group";
  };
  groupNote = name: lib.optionalString (lib.elem name [ "adminGroup" "readOnlyGroup" ]) (
    " and declare the group with users.groups (the module creates only "
    + "\"${opts.adminGroup.default}\" and \"${opts.readOnlyGroup.default}\", the names a config without them uses)"
  );
in
{
  options.services.plumb = {
    enable = lib.mkEnableOption "plumb, GitOps for this machine's services";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ../nix/package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage <plumb>/nix/package.nix { }";
      description = "The plumb package: binaries, units and the generator.";
    };

    settings = lib.mkOption {
      type = settingsType;
      default = { };
      example = lib.literalExpression ''
        {
          global = {
            upstream = "https://git.example.org/ops/config.git";
            branch = "main";
          };
          plumb.interval = "2m";
          services = [
            {
              machine = "web1";
              service = "nginx";
              action = "reload";
              check = "nginx -t -q -c {dir}/nginx.conf";
              dirs = [ { local = "/etc/nginx"; link = "nginx/etc"; } ];
            }
          ];
        }
      '';
      description = ''
        plumb's configuration, written as TOML to /etc/plumb/plumb.toml, where the daemon and
        plumb-generator read it: `global`, `services` (a list) and the `plumb` table, with the keys
        of plumb.toml(5), each declared here with its type, so a misspelt key or a wrong type fails
        the evaluation; keys left unset are left out of the file (plumb's defaults apply). The
        module sets `plumb.metrics_address`, `plumb.admin_group` and `plumb.readonly_group` from
        its own options as defaults (a value set here wins) and adds `hosts` to `plumb.hosts`.
        Empty with `bootstrap`.

        The file is in the Nix store, readable by every user: do not put `webhook_secret` or
        anything else secret here; set `plumb.webhook_secret_file` to a file outside the store. Commands a service's `check` or `health`
        runs must be on the daemon's PATH: add their packages to
        `systemd.services.plumb.path` (check) and `systemd.services."plumb-apply@".path` (health).
      '';
    };

    hosts = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "web" ];
      description = ''
        This machine's other names in the services' `machine` fields, besides its hostname.
        Added to `[plumb] hosts`, which the generator reads too (it gets no arguments). Not with
        `bootstrap` (an assertion): set `[plumb] hosts` in the config in git.
      '';
    };

    metricsAddress = lib.mkOption {
      type = lib.types.str;
      default = ":9222";
      example = "127.0.0.1:9222";
      description = ''
        Where `/metrics` (and the push webhook) are served: an IP address and a port
        ("127.0.0.1:9222", "[::1]:9222"), ":port" for every address, "" for off; a host name is
        not resolved, and anything else fails an assertion. The default of
        `[plumb] metrics_address` (`settings.plumb.metrics_address` wins). Not with `bootstrap`
        (an assertion): set `[plumb] metrics_address` in the config in git.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Whether to open the metrics port in the firewall: the port of the address the file says
        (`metricsAddress`, or `settings.plumb.metrics_address` when set), which must not be "".
        Not with `bootstrap` (an assertion): the port is then the one of the config in git, which
        the system does not know; open it with `networking.firewall.allowedTCPPorts`.
      '';
    };

    adminGroup = lib.mkOption {
      type = lib.types.str;
      default = "plumb";
      description = ''
        Group whose members may read and change services through the control API (root always
        may). Created by the module; admins must be in `readOnlyGroup` too, which owns the socket.
        The default of `[plumb] admin_group`. With `bootstrap` the default group is still created
        (a config without `admin_group` uses it), and setting this option fails an assertion: set
        `[plumb] admin_group` in the config in git and declare its group in `users.groups`.
      '';
    };

    readOnlyGroup = lib.mkOption {
      type = lib.types.str;
      default = "plumb-ro";
      description = ''
        Group whose members may read through the control API; the socket belongs to it. Created
        by the module. The default of `[plumb] readonly_group`; with `bootstrap`, as `adminGroup`.
      '';
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "--interval"
        "30s"
      ];
      description = ''
        More arguments for the daemon, appended to `plumb -c /etc/plumb/plumb.toml`. Prefer
        `settings` for anything the config file can say: the generator reads only the file.
      '';
    };

    bootstrap = lib.mkOption {
      type = lib.types.nullOr (
        lib.types.submodule {
          options = {
            url = lib.mkOption {
              type = lib.types.str;
              example = "https://git.example.org/ops/config.git";
              description = "The repository holding plumb's own config.";
            };
            dir = lib.mkOption {
              type = lib.types.str;
              default = "plumb";
              description = "The repository directory with plumb.toml (or gitopper's config.toml).";
            };
            branch = lib.mkOption {
              type = lib.types.str;
              default = "main";
              description = "The branch to follow.";
            };
          };
        }
      );
      default = null;
      description = ''
        Take the config from git instead of `settings` (`plumb --bootstrap`): plumb manages
        itself as the service "plumb", checks each new config with `check-config` and installs
        it at /etc/plumb/plumb.toml, then reloads and re-runs the generator. What the module
        would write into that file must then be said in the file in git: setting `settings`,
        `hosts`, `metricsAddress`, `adminGroup`, `readOnlyGroup` or `openFirewall` fails an
        assertion that says where it goes instead, rather than doing nothing.
      '';
    };

    checkConfig = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Whether to run `plumb check-config` on the rendered file when the system is built, so a
        bad config fails the build instead of leaving the machine without plumb's units.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = bootstrapped || metricsAddress == "" || metricsPort != null;
        message =
          "${metricsOption} = ${builtins.toJSON metricsAddress} is not an address plumb can listen on: "
          + "write an IP address and a port (\"127.0.0.1:9222\", \"[::1]:9222\"), \":port\" for every "
          + "address, or \"\" for none; a host name such as \"localhost\" is not resolved, and the port "
          + "is 1 to 65535.";
      }
      {
        assertion = cfg.openFirewall && !bootstrapped -> metricsAddress != "";
        message = "services.plumb.openFirewall needs a metrics port, but ${metricsOption} is \"\" (metrics off).";
      }
      {
        assertion = bootstrapped -> !cfg.openFirewall;
        message =
          "services.plumb.openFirewall cannot be used with services.plumb.bootstrap: the metrics port is "
          + "the [plumb] metrics_address of the config in git, which the system does not know; open it "
          + "with networking.firewall.allowedTCPPorts.";
      }
      {
        assertion =
          bootstrapped
          -> fileSettings == {
            global = { };
            plumb = { };
            services = [ ];
          };
        message =
          "services.plumb.settings is not used with services.plumb.bootstrap: the config comes from "
          + "${bootstrapSource}; say it there.";
      }
    ]
    ++ lib.mapAttrsToList (name: key: {
      assertion = bootstrapped -> !definedByUser name;
      message =
        "services.plumb.${name} is not used with services.plumb.bootstrap: it would go to [plumb] "
        + "${key} of /etc/plumb/plumb.toml, which comes from git here; set it in "
        + "${bootstrapSource}${groupNote name}.";
    }) fileOptions;

    warnings = lib.optional (withPackage != [ ]) ''
      services.plumb.settings names a `package` (${
        lib.concatMapStringsSep ", " (s: s.package) withPackage
      }): plumb installs packages with apt, dnf or pacman only, so its applies fail on NixOS.
      Install the package with NixOS instead and drop `package`.
    '';

    # The config route, not command-line flags, for everything the file can say: the generator
    # reads only /etc/plumb/plumb.toml, so `hosts` passed as --hosts would reach the daemon but
    # not the generator, which would then write no units for services under those names.
    # Defaults, so that settings.plumb.* set by the user win instead of conflicting; hosts are a
    # list, which definitions add to.
    services.plumb.settings.plumb = lib.mkIf (!bootstrapped) {
      metrics_address = lib.mkDefault cfg.metricsAddress;
      admin_group = lib.mkDefault cfg.adminGroup;
      readonly_group = lib.mkDefault cfg.readOnlyGroup;
      hosts = lib.mkIf (cfg.hosts != [ ]) cfg.hosts;
    };

    # With bootstrap, plumb itself installs the file (a real file, written by the daemon).
    environment.etc."plumb/plumb.toml" = lib.mkIf (!bootstrapped) { source = configFile; };

    # plumbctl, and the man pages.
    environment.systemPackages = [ cfg.package ];

    # plumb.service and plumb-apply@.service as shipped; the definitions below become drop-ins.
    systemd.packages = [ cfg.package ];
    systemd.generators.plumb-generator = "${cfg.package}/lib/systemd/system-generators/plumb-generator";

    systemd.services.plumb = {
      # NixOS ignores [Install] of packaged units: enable it here.
      wantedBy = [ "multi-user.target" ];
      # The unit reads the config at /etc, so a new config changes no unit file: reload (SIGHUP,
      # the unit's ExecReload) when it changes. The switch's daemon-reload re-runs the generator
      # first, so new mounts exist before the daemon deploys into them.
      reloadTriggers = lib.mkIf (!bootstrapped) [ configFile ];
      # The packaged unit starts only with a config or /etc/default/plumb; a bootstrapped machine
      # has neither before its first start.
      unitConfig.ConditionPathExists = lib.mkIf bootstrapped [ "" ];
      environment = lib.mkIf bootstrapped {
        PLUMB_BOOTSTRAP = cfg.bootstrap.url;
        PLUMB_BOOTSTRAP_DIR = cfg.bootstrap.dir;
        PLUMB_BOOTSTRAP_BRANCH = cfg.bootstrap.branch;
      };
      # Besides NixOS's default PATH (coreutils, findutils, grep, sed, systemd): ssh fetches ssh
      # upstreams, git-upload-pack file:// ones, ssh-keygen and gpgv verify signed heads. Checks
      # run /bin/sh, which NixOS has.
      path = [
        pkgs.openssh
        pkgs.git
        pkgs.gnupg
      ];
      serviceConfig.ExecStart = lib.mkIf (cfg.extraArgs != [ ]) [
        ""
        (utils.escapeSystemdExecArgs (
          [
            (lib.getExe' cfg.package "plumb")
            "-c"
            "/etc/plumb/plumb.toml"
          ]
          ++ cfg.extraArgs
        ))
      ];
    };

    # `plumb apply` runs journalctl (systemd, in the default PATH) and /bin/sh for health
    # commands. Defined so the template gets NixOS's PATH drop-in at all.
    systemd.services."plumb-apply@" = {
      path = [ config.systemd.package ];
      # An apply in progress must not be cut off by a switch; the next deploy starts it again.
      restartIfChanged = false;
    };

    # The groups the file names (with bootstrap, the defaults: the options are refused above).
    users.groups = lib.genAttrs (
      if bootstrapped then
        [
          cfg.adminGroup
          cfg.readOnlyGroup
        ]
      else
        [
          cfg.settings.plumb.admin_group
          cfg.settings.plumb.readonly_group
        ]
    ) (_: { });

    # The unit's StateDirectory= covers only /var/lib/plumb; a state_dir elsewhere must exist too,
    # and before the daemon, since the generator's .path units watch <state_dir>/state/.
    systemd.tmpfiles.rules = [ "d ${stateDir} 0755 root root - -" ];

    # Nothing when the address is not valid: its assertion says why, and evaluating this never fails.
    networking.firewall.allowedTCPPorts = lib.mkIf (cfg.openFirewall && metricsPort != null) [
      metricsPort
    ];
  };
}
