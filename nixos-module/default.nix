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
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.plumb;
  settingsFormat = pkgs.formats.toml { };

  renderedConfig = settingsFormat.generate "plumb.toml" cfg.settings;

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

  # plumb's own default when [plumb] state_dir is not set (README, `[plumb]`).
  stateDir = cfg.settings.plumb.state_dir or "/var/lib/plumb";

  # "host:port", ":port", "[v6]:port": the port is what follows the last colon.
  metricsPort = lib.toInt (lib.last (lib.splitString ":" cfg.metricsAddress));

  # Services (and [global]) naming a `package`: plumb installs packages with apt, dnf or pacman,
  # none of which NixOS has, so such an apply would fail.
  withPackage = lib.filter (s: s ? package) (
    (cfg.settings.services or [ ]) ++ [ (cfg.settings.global or { }) ]
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
      type = settingsFormat.type;
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
        plumb-generator read it: `global`, `services` (a list) and the `plumb` table, exactly as
        in plumb.toml(5). The module sets `plumb.hosts`, `plumb.metrics_address`,
        `plumb.admin_group` and `plumb.readonly_group` from its own options.

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
        Written to `[plumb] hosts`, which the generator reads too (it gets no arguments).
      '';
    };

    metricsAddress = lib.mkOption {
      type = lib.types.str;
      default = ":9222";
      example = "127.0.0.1:9222";
      description = ''
        Where `/metrics` (and the push webhook) are served: "host:port", ":port" for every
        address, "" for off. Written to `[plumb] metrics_address`.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Whether to open the port of `metricsAddress` in the firewall.";
    };

    adminGroup = lib.mkOption {
      type = lib.types.str;
      default = "plumb";
      description = ''
        Group whose members may read and change services through the control API (root always
        may). Created by the module; admins must be in `readOnlyGroup` too, which owns the socket.
      '';
    };

    readOnlyGroup = lib.mkOption {
      type = lib.types.str;
      default = "plumb-ro";
      description = ''
        Group whose members may read through the control API; the socket belongs to it. Created
        by the module.
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
        it at /etc/plumb/plumb.toml, then reloads and re-runs the generator. `settings` (and
        `hosts`, `metricsAddress`, the groups) must then be said in that file; the module writes
        none of it.
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
        assertion = cfg.openFirewall -> cfg.metricsAddress != "";
        message = "services.plumb.openFirewall needs a metricsAddress (it is \"\": metrics off).";
      }
      {
        assertion = cfg.bootstrap != null -> !(cfg.settings ? services || cfg.settings ? global);
        message = "services.plumb.bootstrap takes the config from git: leave services.plumb.settings empty.";
      }
    ];

    warnings = lib.optional (withPackage != [ ]) ''
      services.plumb.settings names a `package` (${
        lib.concatMapStringsSep ", " (s: s.package) withPackage
      }): plumb installs packages with apt, dnf or pacman only, so its applies fail on NixOS.
      Install the package with NixOS instead and drop `package`.
    '';

    # The config route, not command-line flags, for everything the file can say: the generator
    # reads only /etc/plumb/plumb.toml, so `hosts` passed as --hosts would reach the daemon but
    # not the generator, which would then write no units for services under those names.
    services.plumb.settings.plumb = {
      metrics_address = cfg.metricsAddress;
      admin_group = cfg.adminGroup;
      readonly_group = cfg.readOnlyGroup;
      hosts = lib.mkIf (cfg.hosts != [ ]) cfg.hosts;
    };

    # With bootstrap, plumb itself installs the file (a real file, written by the daemon).
    environment.etc."plumb/plumb.toml" = lib.mkIf (cfg.bootstrap == null) { source = configFile; };

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
      reloadTriggers = lib.mkIf (cfg.bootstrap == null) [ configFile ];
      # The packaged unit starts only with a config or /etc/default/plumb; a bootstrapped machine
      # has neither before its first start.
      unitConfig.ConditionPathExists = lib.mkIf (cfg.bootstrap != null) [ "" ];
      environment = lib.mkIf (cfg.bootstrap != null) {
        PLUMB_BOOTSTRAP = cfg.bootstrap.url;
        PLUMB_BOOTSTRAP_DIR = cfg.bootstrap.dir;
        PLUMB_BOOTSTRAP_BRANCH = cfg.bootstrap.branch;
      };
      # Besides NixOS's default PATH (coreutils, findutils, grep, sed, systemd): ssh-keygen and
      # gpgv verify signed heads. Checks run /bin/sh, which NixOS has.
      path = [
        pkgs.openssh
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

    users.groups = lib.genAttrs [ cfg.adminGroup cfg.readOnlyGroup ] (_: { });

    # The unit's StateDirectory= covers only /var/lib/plumb; a state_dir elsewhere must exist too,
    # and before the daemon, since the generator's .path units watch <state_dir>/state/.
    systemd.tmpfiles.rules = [ "d ${stateDir} 0755 root root - -" ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ metricsPort ];
  };
}
