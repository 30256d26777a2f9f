//! Smoke test of the systemd container harness (tests/it/support/container.rs): a real systemd boots,
//! runs units, serves on the host's network, keeps its files across a reboot, takes turns with
//! other containers, and leaves no process, mount or directory behind.
//!
//! Timings go to stderr: `cargo test --test it container:: -- --nocapture`.

use crate::support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::container::{CI_DIR, Container};
use support::{DEADLINE, poll, require_root, temp_root, wait_until};
// The Debian package's install, upgrade and start semantics (the package_* tests).
use support::container::plumb_deb_version;
use support::{GitDaemon, Upstream, free_port};

/// `GET /` on the host's 127.0.0.1:80 (the container's nginx): the status line and the body.
fn http_get_localhost() -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", 80)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Host processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{}: {cmdline}", name.to_string_lossy()));
        }
    }
    found
}

/// The host's mount table lines that mention `needle`.
fn host_mounts_mentioning(needle: &str) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .expect("read mountinfo")
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// A oneshot unit that says hello in the journal and stays active; enabled, it runs at every boot.
const HELLO_UNIT: &str = "[Unit]
Description=plumb container smoke test

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/echo hello from smoke-hello

[Install]
WantedBy=multi-user.target
";

/// A unit written into the container's filesystem before it boots, enabled by a symlink.
const SEEDED_UNIT: &str = "[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
";

#[test]
fn boots_serves_reboots_and_leaves_nothing_behind() {
    require_root();
    let test_started = Instant::now();
    let scratch = temp_root();
    fs::write(scratch.path().join("from-host"), "shared\n").expect("write scratch file");
    let scratch_path = scratch.path().to_str().expect("utf-8 path").to_string();

    let started = Instant::now();
    let mut c = Container::builder("smoke")
        .bind(scratch.path(), &scratch_path)
        .file("/etc/plumb-ci/seeded", "seeded before boot\n", 0o600)
        .file("/etc/systemd/system/seeded.service", SEEDED_UNIT, 0o644)
        .symlink(
            "/etc/systemd/system/multi-user.target.wants/seeded.service",
            "/etc/systemd/system/seeded.service",
        )
        .boot();
    let boot_time = started.elapsed();

    // systemd is up, clean, and the container is who it says.
    assert_eq!(c.sh("systemctl is-system-running"), "running");
    assert_eq!(c.sh("systemctl is-active dbus"), "active");
    assert_eq!(c.sh("systemctl is-active nginx"), "active");
    assert_eq!(c.sh("hostname"), "smoke");
    let root = c.root();
    assert_eq!(
        fs::read_to_string(root.join("etc/hostname")).expect("read hostname via root()"),
        "smoke\n"
    );

    // Seeded before boot: content and mode; the parent directory it made looks like any other.
    assert_eq!(
        c.sh("cat /etc/plumb-ci/seeded; stat -c %a /etc/plumb-ci/seeded /etc/plumb-ci /"),
        "seeded before boot\n600\n755\n755"
    );
    // A unit seeded and enabled before boot ran at boot.
    assert_eq!(c.sh("systemctl is-active seeded"), "active");
    // The bind is the same directory on both sides.
    assert_eq!(c.sh(&format!("cat {scratch_path}/from-host")), "shared");
    c.sh(&format!("echo back > {scratch_path}/from-container"));
    assert_eq!(
        fs::read_to_string(scratch.path().join("from-container")).expect("read back"),
        "back\n"
    );

    // The host network is shared: nginx in the container answers on the host's loopback.
    let page = http_get_localhost().expect("GET http://127.0.0.1/ from the host");
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("Welcome to nginx"),
        "unexpected answer from the container's nginx:\n{page}"
    );

    // Nothing the container mounts is visible on the host, not even its root overlay.
    assert_eq!(host_mounts_mentioning(CI_DIR), Vec::<String>::new());

    // The package of this build installs in the rootfs (its dependencies are there, the binaries
    // run with its libc, OpenSSL and zlib), and its man pages and units are in place.
    c.install_deb();
    c.sh("plumb --help >/dev/null && plumbctl --help >/dev/null");
    c.sh("getent group plumb && getent group plumb-ro && test -d /var/lib/plumb");
    // `man` finds the package's pages, as a user at the machine would look them up.
    for (page, says) in [
        ("plumb", "plumb apply"),
        ("plumbctl", "rollback"),
        ("8 plumb-generator", "PLUMB_KMSG"),
        ("5 plumb.toml", "allowed_signers"),
    ] {
        let text = c.sh(&format!("MANWIDTH=100 man -P cat {page} 2>/dev/null"));
        assert!(text.contains(says), "man {page}:\n{text}");
    }
    if Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("units/plumb.service")
        .exists()
    {
        c.sh("systemctl cat plumb.service >/dev/null");
    }

    // A unit written through install(), enabled and started.
    let unit_file = scratch.path().join("smoke-hello.service");
    fs::write(&unit_file, HELLO_UNIT).expect("write unit");
    c.install(&unit_file, "/etc/systemd/system/smoke-hello.service", 0o644);
    c.sh("systemctl daemon-reload && systemctl enable --quiet --now smoke-hello");
    assert_eq!(c.sh("systemctl is-active smoke-hello"), "active");
    wait_until(
        "smoke-hello's line in the journal",
        Duration::from_secs(10),
        || c.journal("smoke-hello").contains("hello from smoke-hello"),
    );

    // Reboot: /etc keeps what was written, /run starts empty, enabled units run again.
    c.sh("echo kept > /etc/plumb-smoke; echo gone > /run/plumb-smoke");
    let leader_before = c.leader();
    let started = Instant::now();
    c.reboot();
    let reboot_time = started.elapsed();
    assert_ne!(c.leader(), leader_before, "a reboot makes a new PID 1");
    assert_eq!(c.sh("systemctl is-system-running"), "running");
    assert_eq!(c.sh("cat /etc/plumb-smoke"), "kept");
    assert_eq!(c.sh("cat /etc/plumb-ci/seeded"), "seeded before boot");
    assert_eq!(c.sh("test -e /run/plumb-smoke || echo absent"), "absent");
    assert_eq!(c.sh("systemctl is-active smoke-hello"), "active");
    wait_until(
        "smoke-hello's lines of both boots in the journal",
        Duration::from_secs(10),
        || {
            c.journal("smoke-hello")
                .matches("hello from smoke-hello")
                .count()
                == 2
        },
    );
    assert_eq!(c.sh("hostname"), "smoke");
    assert_eq!(c.sh(&format!("cat {scratch_path}/from-host")), "shared");
    assert_eq!(c.sh("plumb --help >/dev/null && echo ok"), "ok");
    assert_eq!(c.try_sh("exit 3"), (false, String::new()));
    assert_eq!(c.try_sh("echo yes"), (true, "yes".to_string()));

    // Dropping it stops every process and removes every trace.
    let run_dir: PathBuf = c.run_dir().to_path_buf();
    let machine = run_dir
        .file_name()
        .expect("machine name")
        .to_string_lossy()
        .to_string();
    let leader = c.leader();
    let started = Instant::now();
    drop(c);
    let stop_time = started.elapsed();
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    assert!(
        !Path::new(&format!("/proc/{leader}")).exists(),
        "the container's PID 1 ({leader}) survived"
    );
    assert_eq!(
        processes_mentioning(run_dir.to_str().expect("utf-8 path")),
        Vec::<String>::new()
    );
    assert_eq!(host_mounts_mentioning(CI_DIR), Vec::<String>::new());
    assert!(
        !Path::new("/run/systemd/nspawn/propagate")
            .join(&machine)
            .exists(),
        "nspawn's propagation directory for {machine} left behind"
    );
    assert!(
        http_get_localhost().is_none(),
        "something still answers on 127.0.0.1:80"
    );
    // The bound directory is the host's: untouched by the container's removal.
    assert!(scratch.path().join("from-container").exists());

    eprintln!(
        "container timings: boot {boot_time:?}, reboot {reboot_time:?}, stop {stop_time:?}, \
         whole test {:?}",
        test_started.elapsed()
    );
}

#[test]
fn containers_in_parallel_threads_take_turns() {
    require_root();
    // Both threads ask for a container at the same moment; each notes when it had one.
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = ["turn-a", "turn-b"]
        .into_iter()
        .map(|name| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let c = Container::boot(name);
                let up = Instant::now();
                // Port 80 is this container's alone while it is up.
                assert_eq!(c.sh("systemctl is-active nginx"), "active");
                assert!(http_get_localhost().is_some_and(|p| p.starts_with("HTTP/1.1 200")));
                assert_eq!(c.sh("hostname"), name);
                let down = Instant::now();
                drop(c);
                (up, down)
            })
        })
        .collect();
    let spans: Vec<(Instant, Instant)> = threads
        .into_iter()
        .map(|t| t.join().expect("container thread"))
        .collect();
    let (a, b) = (spans[0], spans[1]);
    assert!(
        a.1 <= b.0 || b.1 <= a.0,
        "two containers were up at once: {a:?} and {b:?}"
    );
}

#[test]
#[should_panic(expected = "this thread already holds a Container")]
fn a_second_container_in_one_thread_is_refused() {
    require_root();
    let _first = Container::boot("first");
    let _second = Container::boot("second");
}

// The Debian package as an administrator meets it: what an install, an upgrade and a config
// written after the install do to plumb.service, to plumb-config.path, and to the services plumb
// manages. `cargo test --test it container::package_`.

/// The service the package tests give plumb to manage: a process that stays (its PID says whether
/// anything restarted it) and whose reload changes nothing. Enabled, so it runs from the boot.
const GREETER_UNIT: &str = "[Unit]
Description=plumb package test: a service plumb manages

[Service]
ExecStart=/bin/sleep infinity
ExecReload=/bin/true

[Install]
WantedBy=multi-user.target
";

/// plumb's config for the package tests: `greeter` on machine `machine`, its files the
/// `greeter/files` directory of `url`, bound on /srv/greeter (mount unit srv-greeter.mount). No
/// metrics listener: the container shares the host's network, where port 9222 may be taken.
fn greeter_config(machine: &str, url: &str) -> String {
    format!(
        "[plumb]\ninterval = \"1s\"\nmetrics_address = \"\"\n\n[[services]]\nmachine = \"{machine}\"\nservice = \"greeter\"\n\
         upstream = \"{url}\"\naction = \"reload\"\n\
         dirs = [{{ local = \"/srv/greeter\", link = \"greeter/files\" }}]\n"
    )
}

/// greeter's upstream: `ops` served by git daemon, greeter's files at `v1`. The scratch
/// directory is dropped last.
struct Greeter {
    root: tempfile::TempDir,
    gitd: GitDaemon,
    up: Upstream,
    v1: String,
}

impl Greeter {
    fn upstream() -> Greeter {
        let root = temp_root();
        let gitd = GitDaemon::start(root.path());
        let up = Upstream::new(root.path(), "ops");
        up.write("greeter/files/hello", "v1\n");
        let v1 = up.commit("v1");
        Greeter { root, gitd, up, v1 }
    }
}

/// A newer version of the package than this build's: the same binaries, built again as
/// `<version>+pkgtest1`, which dpkg orders after `<version>`.
fn newer_version() -> String {
    format!("{}+pkgtest1", env!("CARGO_PKG_VERSION"))
}

/// A container named `name` with greeter.service enabled, and `config` as plumb's config when
/// given. plumb is not installed yet.
fn greeter_machine(name: &str, config: Option<&str>) -> Container {
    let mut boot = Container::builder(name)
        .file("/etc/systemd/system/greeter.service", GREETER_UNIT, 0o644)
        .symlink(
            "/etc/systemd/system/multi-user.target.wants/greeter.service",
            "/etc/systemd/system/greeter.service",
        );
    if let Some(config) = config {
        boot = boot.file("/etc/plumb/plumb.toml", config, 0o644);
    }
    boot.boot()
}

/// `systemctl is-enabled` and `is-active` of `unit`.
fn enabled_active(c: &Container, unit: &str) -> (String, String) {
    (
        c.try_sh(&format!("systemctl is-enabled {unit}")).1,
        c.try_sh(&format!("systemctl is-active {unit}")).1,
    )
}

/// The pair [`enabled_active`] returns, from string literals.
fn pair(enabled: &str, active: &str) -> (String, String) {
    (enabled.to_string(), active.to_string())
}

fn unit_main_pid(c: &Container, unit: &str) -> String {
    c.sh(&format!("systemctl show -P MainPID {unit}"))
}

/// Waits until greeter's files at `content` are bound on /srv/greeter by its active mount unit and
/// `plumb apply` has recorded revision `revision` (so no apply is still writing plumb's state).
fn wait_greeter_deployed(c: &Container, revision: &str, content: &str) {
    wait_until(
        &format!("greeter to be deployed at {revision} on its mount"),
        DEADLINE,
        || {
            let applied = c.try_sh("cat /var/lib/plumb/state/greeter.applied").1;
            let applied: Option<serde_json::Value> = serde_json::from_str(&applied).ok();
            applied.is_some_and(|a| a["ok"] == true && a["revision"] == revision)
                && c.try_sh("systemctl is-active srv-greeter.mount").1 == "active"
                && c.try_sh("cat /srv/greeter/hello").1 == content
                && c.try_sh("systemctl is-active plumb-apply@greeter.service")
                    .1
                    != "activating"
        },
    );
}

/// Every file under /var/lib/plumb (stores, state, checkouts) with its size, modification time
/// and hash: equal twice means nothing wrote there in between.
fn plumb_state(c: &Container) -> String {
    c.sh("cd /var/lib/plumb && find . -type f | LC_ALL=C sort | \
          while read -r f; do echo \"$(stat -c '%s %Y' \"$f\") $(sha256sum < \"$f\" | cut -c1-16) $f\"; done")
}

/// plumb's package version, as dpkg has it installed.
fn installed_version(c: &Container) -> String {
    c.sh("dpkg-query -W -f '${Version}' plumb")
}

#[test]
fn package_upgrade_keeps_a_disabled_plumb_disabled_and_its_services_running() {
    require_root();
    let started = Instant::now();
    let Greeter {
        root: _root,
        gitd,
        up,
        v1,
    } = Greeter::upstream();
    // Built before the boot: the container lock is held for less time.
    let newer = plumb_deb_version(&newer_version());
    let config = greeter_config("plumb-pkg-off", &gitd.url(&up));
    let mut c = greeter_machine("plumb-pkg-off", Some(&config));

    // Installed with a config in place: enabled, started, and greeter's files deployed on its mount.
    c.install_deb();
    assert_eq!(
        enabled_active(&c, "plumb.service"),
        pair("enabled", "active")
    );
    wait_greeter_deployed(&c, &v1, "v1");
    let greeter = unit_main_pid(&c, "greeter.service");

    // The administrator turns plumb off. plumb-config.path stops with it: nothing starts it again.
    c.sh("systemctl disable --now plumb 2>/dev/null");
    assert_eq!(
        enabled_active(&c, "plumb.service"),
        pair("disabled", "inactive")
    );
    assert_eq!(
        c.try_sh("systemctl is-active plumb-config.path").1,
        "inactive"
    );
    let state = plumb_state(&c);
    assert!(state.contains("./state/greeter.rev"), "{state}");

    // The upgrade keeps plumb off and leaves greeter and its mount alone.
    let out = c.install_deb_file(&newer);
    assert_eq!(installed_version(&c), newer_version(), "{out}");
    assert_eq!(
        enabled_active(&c, "plumb.service"),
        pair("disabled", "inactive"),
        "{out}"
    );
    assert_eq!(
        c.try_sh("systemctl is-active plumb-config.path").1,
        "inactive"
    );
    assert_eq!(c.sh("systemctl is-active srv-greeter.mount"), "active");
    assert_eq!(c.sh("cat /srv/greeter/hello"), "v1");
    assert_eq!(c.sh("systemctl is-active greeter.service"), "active");
    assert_eq!(
        unit_main_pid(&c, "greeter.service"),
        greeter,
        "greeter restarted"
    );
    assert_eq!(
        plumb_state(&c),
        state,
        "plumb's state changed in the upgrade"
    );

    // And at the next boot: plumb stays off (its config is there, so only the disabling keeps it
    // off); the generator still binds greeter's last deployed files.
    c.reboot();
    assert_eq!(
        enabled_active(&c, "plumb.service"),
        pair("disabled", "inactive")
    );
    assert_eq!(
        c.try_sh("systemctl is-active plumb-config.path").1,
        "inactive"
    );
    assert_eq!(c.sh("systemctl is-active srv-greeter.mount"), "active");
    assert_eq!(c.sh("cat /srv/greeter/hello"), "v1");
    assert_eq!(c.sh("systemctl is-active greeter.service"), "active");
    eprintln!("disabled-upgrade test took {:?}", started.elapsed());
}

#[test]
fn package_upgrade_restarts_an_enabled_plumb_and_keeps_its_services_running() {
    require_root();
    let started = Instant::now();
    let Greeter {
        root: _root,
        gitd,
        up,
        v1,
    } = Greeter::upstream();
    let newer = plumb_deb_version(&newer_version());
    let config = greeter_config("plumb-pkg-on", &gitd.url(&up));
    let c = greeter_machine("plumb-pkg-on", Some(&config));
    c.install_deb();
    wait_greeter_deployed(&c, &v1, "v1");
    let plumb = unit_main_pid(&c, "plumb.service");
    let greeter = unit_main_pid(&c, "greeter.service");

    // The upgrade restarts plumb on the new binary; greeter, its mount and its revision stay.
    let out = c.install_deb_file(&newer);
    assert_eq!(installed_version(&c), newer_version(), "{out}");
    wait_until("plumb to run again after the upgrade", DEADLINE, || {
        enabled_active(&c, "plumb.service") == pair("enabled", "active")
    });
    assert_ne!(
        unit_main_pid(&c, "plumb.service"),
        plumb,
        "plumb not restarted"
    );
    assert_eq!(c.sh("systemctl is-active plumb-config.path"), "active");
    assert_eq!(c.sh("systemctl is-active srv-greeter.mount"), "active");
    assert_eq!(c.sh("cat /srv/greeter/hello"), "v1");
    assert_eq!(
        unit_main_pid(&c, "greeter.service"),
        greeter,
        "greeter restarted"
    );
    assert_eq!(c.sh("cat /var/lib/plumb/state/greeter.rev"), v1);

    // The upgraded daemon goes on deploying.
    up.write("greeter/files/hello", "v2\n");
    let v2 = up.commit("v2");
    wait_greeter_deployed(&c, &v2, "v2");
    assert_eq!(
        unit_main_pid(&c, "greeter.service"),
        greeter,
        "reloaded, not restarted"
    );
    eprintln!("enabled-upgrade test took {:?}", started.elapsed());
}

#[test]
fn package_installed_before_the_config_starts_plumb_when_the_config_appears() {
    require_root();
    let started = Instant::now();
    let Greeter { root, gitd, up, v1 } = Greeter::upstream();
    let c = greeter_machine("plumb-pkg-late", None);

    // Installed with nothing to run on: enabled, skipped by its conditions, plumb-config.path
    // waiting for a config.
    c.install_deb();
    assert_eq!(
        enabled_active(&c, "plumb.service"),
        pair("enabled", "inactive")
    );
    assert_eq!(
        c.sh("systemctl show -P ConditionResult plumb.service"),
        "no"
    );
    assert_eq!(c.sh("systemctl is-active plumb-config.path"), "active");

    // The config arrives (written beside it and renamed into place): plumb starts by itself and
    // deploys greeter; its mount unit is made by the generator that plumb apply has systemd run.
    let config = root.path().join("plumb.toml");
    fs::write(&config, greeter_config("plumb-pkg-late", &gitd.url(&up))).expect("write config");
    c.install(&config, "/etc/plumb/plumb.toml", 0o644);
    wait_until("plumb to start on its own", DEADLINE, || {
        c.try_sh("systemctl is-active plumb.service").1 == "active"
    });
    wait_greeter_deployed(&c, &v1, "v1");

    // A stop sticks: plumb-config.path stops with plumb, though the config is still there.
    c.sh("systemctl stop plumb 2>/dev/null");
    assert_eq!(
        enabled_active(&c, "plumb.service"),
        pair("enabled", "inactive")
    );
    assert_eq!(
        c.try_sh("systemctl is-active plumb-config.path").1,
        "inactive"
    );
    eprintln!("config-after-install test took {:?}", started.elapsed());
}

#[test]
fn package_honours_policy_rc_d_on_install_and_upgrade() {
    require_root();
    let started = Instant::now();
    let newer = plumb_deb_version(&newer_version());
    // A config with nothing for this machine: plumb runs, idle.
    let config = greeter_config("elsewhere", "git://127.0.0.1:9/nothing.git");
    let deny = "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d";
    let c = greeter_machine("plumb-pkg-policy", Some(&config));

    // policy-rc.d forbids starting services (an image being built): enabled, not started.
    c.sh(deny);
    c.install_deb();
    assert_eq!(
        enabled_active(&c, "plumb.service"),
        pair("enabled", "inactive")
    );
    assert_eq!(
        c.try_sh("systemctl is-active plumb-config.path").1,
        "inactive"
    );

    // Started by hand, then upgraded under the same policy: not restarted.
    c.sh("rm /usr/sbin/policy-rc.d && systemctl start plumb");
    assert_eq!(c.sh("systemctl is-active plumb.service"), "active");
    let plumb = unit_main_pid(&c, "plumb.service");
    c.sh(deny);
    let out = c.install_deb_file(&newer);
    assert_eq!(installed_version(&c), newer_version(), "{out}");
    assert_eq!(
        enabled_active(&c, "plumb.service"),
        pair("enabled", "active")
    );
    assert_eq!(
        unit_main_pid(&c, "plumb.service"),
        plumb,
        "restarted despite policy-rc.d:\n{out}"
    );
    eprintln!("policy-rc.d test took {:?}", started.elapsed());
}

/// A unit whose unit file and drop-in directory come from git: `sh` writes the drop-in's
/// greeting where the test reads it, then stays.
const HELLO_FROM_GIT: &str = "[Unit]
Description=plumb reboot test: a unit from git

[Service]
ExecStart=/bin/sh -c 'echo \"$$GREETING\" > /run/hello-greeting; exec sleep infinity'

[Install]
WantedBy=multi-user.target
";

/// systemd reads unit files before it mounts anything: after a reboot it saw the empty placeholder
/// of the unit file's bind (a masked unit) and the unit without git's drop-in. With the upstream
/// down, the machine must still come back with the unit loaded from git, its drop-in in force, and
/// plumb reporting what is true.
#[test]
fn unit_files_and_dropins_from_git_survive_a_reboot_with_the_upstream_down() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "ops");
    up.write("hello/hello.service", HELLO_FROM_GIT).write(
        "hello/dropins/greeting.conf",
        "[Service]\nEnvironment=GREETING=from-git\n",
    );
    let v1 = up.commit("v1");
    let config = format!(
        "[plumb]\ninterval = \"1s\"\nmetrics_address = \"\"\n\n[[services]]\nmachine = \"plumb-units\"\nservice = \"hello\"\n\
         upstream = \"{}\"\naction = \"restart\"\n\
         dirs = [\n\
           {{ local = \"/etc/systemd/system/hello.service\", link = \"hello/hello.service\", file = true }},\n\
           {{ local = \"/etc/systemd/system/hello.service.d\", link = \"hello/dropins\" }},\n\
         ]\n",
        gitd.url(&up)
    );
    let mut c = Container::builder("plumb-units")
        .file("/etc/plumb/plumb.toml", &config, 0o644)
        .boot();
    c.install_deb();
    let as_git_says = |c: &Container| {
        let show = c
            .try_sh("systemctl show -p LoadState -p NeedDaemonReload -p ActiveState hello")
            .1;
        let mut show: Vec<&str> = show.lines().collect();
        show.sort_unstable();
        let applied = c.try_sh("cat /var/lib/plumb/state/hello.applied").1;
        let applied: Option<serde_json::Value> = serde_json::from_str(&applied).ok();
        show == [
            "ActiveState=active",
            "LoadState=loaded",
            "NeedDaemonReload=no",
        ] && c.try_sh("cat /run/hello-greeting").1 == "from-git"
            && applied.is_some_and(|a| a["ok"] == true && a["revision"] == v1.as_str())
    };
    wait_or_show(&c, "hello to run from git's files", || as_git_says(&c));

    // The upstream goes away for good; the machine reboots.
    drop(gitd);
    c.reboot();
    wait_or_show(&c, "hello to run from git's files after the reboot", || {
        as_git_says(&c) && c.try_sh("systemctl is-active plumb").1 == "active"
    });
    // It was the boot's apply that mended it: systemd had loaded the unit before its mounts.
    let applied = c.sh("cat /var/lib/plumb/state/hello.applied");
    assert!(
        applied.contains("restart hello.service: done; daemon-reload (systemd had"),
        "{applied}"
    );
    // The daemon came up after the boot's apply and reports the service as it is.
    wait_until("plumb to report hello OK", DEADLINE, || {
        let status = c.try_sh("plumbctl status hello").1;
        status.contains("OK") && status.contains(&v1[..12])
    });
}

/// [`wait_until`] with [`DEADLINE`], showing plumb's units and the journal when it times
/// out.
fn wait_or_show(c: &Container, what: &str, done: impl FnMut() -> bool) {
    if !poll(DEADLINE, Duration::from_millis(200), done) {
        let show = c
            .try_sh(
                "systemctl list-units --all --no-pager 'plumb*'; \
                 systemctl status --no-pager plumb; \
                 head -c 2000 /var/lib/plumb/state/*.applied; journalctl -b --no-pager | tail -40",
            )
            .1;
        panic!("timed out after {DEADLINE:?} waiting for {what}:\n{show}");
    }
}

/// The `.path` units that apply while the daemon is down are armed when the package is installed,
/// and after a config change and a daemon-reload, not only at the next boot.
#[test]
fn path_units_are_armed_after_install_and_after_a_config_change() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "ops");
    up.write("greeter/files/hello", "v1\n")
        .write("second/files/x", "x\n");
    let v1 = up.commit("v1");
    let config = greeter_config("plumb-armed", &gitd.url(&up));
    let c = greeter_machine("plumb-armed", Some(&config));
    c.install_deb();
    wait_greeter_deployed(&c, &v1, "v1");
    wait_or_show(&c, "plumb-apply@greeter.path to be armed", || {
        c.try_sh("systemctl is-active plumb-apply@greeter.path").1 == "active"
    });

    // A service added by hand, and systemd told (not plumb): its path unit is armed too.
    let second = format!(
        "{config}\n[[services]]\nmachine = \"plumb-armed\"\nservice = \"second\"\n\
         upstream = \"{}\"\naction = \"none\"\n\
         dirs = [{{ local = \"/srv/second\", link = \"second/files\" }}]\n",
        gitd.url(&up)
    );
    let file = root.path().join("plumb.toml");
    fs::write(&file, second).unwrap();
    c.install(&file, "/etc/plumb/plumb.toml", 0o644);
    c.sh("systemctl daemon-reload");
    wait_or_show(&c, "plumb-apply@second.path to be armed", || {
        c.try_sh("systemctl is-active plumb-apply@second.path").1 == "active"
    });
}

/// A typo in the config and a daemon-reload: the generator keeps generating from the last
/// accepted config, so the mounts, drop-ins and path units stay, and the refusal shows in
/// `systemctl status plumb`, the daemon's journal and `plumbctl status`.
#[test]
fn a_typo_in_the_config_keeps_the_units_and_says_so() {
    require_root();
    let Greeter { root, gitd, up, v1 } = Greeter::upstream();
    let config = greeter_config("plumb-typo", &gitd.url(&up));
    let c = greeter_machine("plumb-typo", Some(&config));
    c.install_deb();
    wait_greeter_deployed(&c, &v1, "v1");
    wait_or_show(&c, "the config kept as the accepted one", || {
        c.try_sh("cat /etc/plumb/plumb.toml.accepted").1 == config.trim_end()
    });

    let file = root.path().join("plumb.toml");
    fs::write(&file, format!("{config}typo = true\n")).unwrap();
    c.install(&file, "/etc/plumb/plumb.toml", 0o644);
    c.sh("systemctl daemon-reload");
    for unit in [
        "srv-greeter.mount",
        "plumb-apply@greeter.path",
        "greeter.service",
    ] {
        assert_eq!(
            c.try_sh(&format!("systemctl is-active {unit}")).1,
            "active",
            "{unit}"
        );
    }
    assert!(
        c.sh("systemctl cat greeter.service")
            .contains("After=srv-greeter.mount"),
        "the drop-in stays"
    );
    let status = c.try_sh("systemctl status --no-pager plumb").1;
    assert!(
        status.contains("CONFIG REFUSED") && status.contains("typo"),
        "{status}"
    );
    wait_or_show(&c, "the refusal in plumbctl status", || {
        let s = c.try_sh("plumbctl status greeter").1;
        s.contains("config refused, running on the last accepted one") && s.contains("typo")
    });
    wait_or_show(&c, "the refusal in plumb's journal", || {
        c.journal("plumb.service").contains("config refused")
    });

    // Fixed: accepted again, and the description is plumb's own.
    fs::write(&file, &config).unwrap();
    c.install(&file, "/etc/plumb/plumb.toml", 0o644);
    c.sh("systemctl daemon-reload");
    assert!(
        !c.try_sh("systemctl status --no-pager plumb")
            .1
            .contains("CONFIG REFUSED")
    );
    wait_or_show(&c, "the refusal gone from plumbctl status", || {
        !c.try_sh("plumbctl status greeter")
            .1
            .contains("config refused")
    });
}

/// A fresh machine with only a bootstrap repository: plumb starts once `/etc/default/plumb` is
/// written, takes its config from git, and ends with the service deployed and its path unit armed.
#[test]
fn a_bootstrap_from_git_ends_with_armed_path_units() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "ops");
    let config = greeter_config("plumb-boot", &gitd.url(&up));
    up.write("plumb/plumb.toml", &config)
        .write("greeter/files/hello", "v1\n");
    let v1 = up.commit("v1");
    let c = greeter_machine("plumb-boot", None);
    c.install_deb();
    let default = root.path().join("default");
    // The metrics listener on a port of its own: the container shares the host's network.
    fs::write(
        &default,
        format!(
            "PLUMB_BOOTSTRAP={}\nPLUMB_METRICS_ADDRESS=127.0.0.1:{}\n",
            gitd.url(&up),
            free_port()
        ),
    )
    .unwrap();
    c.install(&default, "/etc/default/plumb", 0o644);
    wait_greeter_deployed(&c, &v1, "v1");
    wait_or_show(&c, "plumb-apply@greeter.path to be armed", || {
        c.try_sh("systemctl is-active plumb-apply@greeter.path").1 == "active"
    });
}
