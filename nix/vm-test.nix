# The NixOS VM test of the module (flake.nix's checks.<system>.vm, run by `nix flake check` or
# `nix build .#checks.x86_64-linux.vm`): owns the end-to-end proof that plumb works on NixOS.
# One machine, a local upstream (file://), two services under a `hosts` alias: the generator's
# units exist after boot, the first commit is deployed and bound into both services, a commit to
# one service's files reloads that service and not the other, the API answers by group, metrics
# are served, and `systemctl reload plumb` (the store path of kill) keeps the daemon up.
{ lib, ... }:

let
  services = [
    "svc-a"
    "svc-b"
  ];
in
{
  name = "plumb";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [ ../nixos-module ];

      services.plumb = {
        enable = true;
        # The hostname is "machine": the services are this machine's only through the alias,
        # which the generator must see as well as the daemon.
        hosts = [ "testhost" ];
        settings = {
          global = {
            upstream = "file:///srv/config.git";
            machine = "testhost";
            action = "reload";
          };
          plumb.interval = "2s";
          services = map (name: {
            service = name;
            dirs = [
              {
                local = "/etc/${name}";
                link = lib.removePrefix "svc-" name;
              }
            ];
          }) services;
        };
      };

      # Two stand-ins for nginx: each start or reload appends the file plumb bound in, if any.
      systemd.services = lib.genAttrs services (
        name:
        let
          log = pkgs.writeShellScript "${name}-log" ''
            cat /etc/${name}/msg >> /run/${name}.log 2>/dev/null || true
          '';
        in
        {
          description = "plumb test service ${name}";
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = log;
            ExecReload = log;
          };
        }
      );

      users.users.alice = {
        isNormalUser = true;
        extraGroups = [ "plumb-ro" ];
      };

      environment.systemPackages = [
        pkgs.git
        pkgs.curl
      ];
    };

  testScript = ''
    machine.wait_for_unit("plumb.service")

    with subtest("the generator ran with the alias from [plumb] hosts"):
        machine.succeed("systemctl cat plumb-apply@svc-a.path plumb-apply@svc-b.path")

    with subtest("the first commit reaches both services"):
        machine.succeed(
            "git init -q --bare -b main /srv/config.git",
            "git init -q -b main /root/work",
            "mkdir -p /root/work/a /root/work/b",
            "echo a1 > /root/work/a/msg",
            "echo b1 > /root/work/b/msg",
            "git -C /root/work add -A",
            "git -C /root/work -c user.name=t -c user.email=t@example.org commit -qm one",
            "git -C /root/work push -q /srv/config.git main",
        )
        machine.wait_until_succeeds("grep -qx a1 /run/svc-a.log", timeout=90)
        machine.wait_until_succeeds("grep -qx b1 /run/svc-b.log", timeout=90)
        machine.succeed("findmnt /etc/svc-a", "findmnt /etc/svc-b")

    with subtest("a commit to svc-a's files reloads svc-a only"):
        machine.succeed(
            "echo a2 > /root/work/a/msg",
            "git -C /root/work -c user.name=t -c user.email=t@example.org commit -qam two",
            "git -C /root/work push -q /srv/config.git main",
        )
        machine.wait_until_succeeds("grep -qx a2 /run/svc-a.log", timeout=90)
        machine.succeed("cat /etc/svc-a/msg | grep -qx a2")
        machine.succeed("test $(wc -l < /run/svc-b.log) -eq 1")

    with subtest("the API answers by group"):
        # su may reset PATH: name plumbctl where the system profile has it.
        ctl = "/run/current-system/sw/bin/plumbctl"
        machine.succeed(f"su -s /bin/sh alice -c '{ctl} list services' | grep -q svc-a")
        machine.fail(f"su -s /bin/sh alice -c '{ctl} freeze svc-a'")
        machine.succeed("plumbctl freeze svc-a", "plumbctl unfreeze svc-a")

    with subtest("metrics are served on the default address"):
        machine.succeed("curl -sf http://127.0.0.1:9222/metrics | grep -q 'plumb_service_hash.*svc-a'")

    with subtest("SIGHUP through the unit's ExecReload keeps the daemon up"):
        machine.succeed("systemctl reload plumb.service")
        machine.sleep(3)
        machine.succeed("systemctl is-active plumb.service")
  '';
}
