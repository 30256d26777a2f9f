//! plumb against a real systemd (252, Debian bookworm, booted in `systemd-nspawn` by
//! `support::container`): the D-Bus client (`plumb::systemd`) and `plumb apply` end to end.
//!
//! The client is driven from the test process through the container's system bus, reached as
//! `/proc/<leader>/root/run/dbus/system_bus_socket` (the container shares the host's user ids, so
//! root here is root there). `plumb apply` runs inside, as `plumb-apply@.service` runs it, against
//! units made by the real generator and an nginx serving files from a git upstream on the host.

use crate::support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use plumb::apply::Outcome;
use plumb::systemd::{JobResult, Systemd};
use support::container::Container;
use support::{DEADLINE, GitDaemon, Upstream, free_port, require_root, temp_root, wait_until};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The container's systemd, over its system bus.
async fn connect(c: &Container) -> Systemd {
    let address = format!(
        "unix:path={}/run/dbus/system_bus_socket",
        c.root().display()
    );
    Systemd::from_address(&address)
        .await
        .unwrap_or_else(|e| panic!("connect to the container's bus: {e}"))
        .with_job_timeout(DEADLINE)
}

/// A unit file with `body` as its `[Service]` section.
fn unit(body: &str) -> String {
    format!("[Unit]\nDescription=plumb test unit\n\n[Service]\n{body}\n")
}

#[test]
fn client_waits_for_jobs_and_reports_their_results() {
    require_root();
    let started = Instant::now();
    let simple = "Type=simple\nExecStart=/bin/sleep infinity\nExecReload=/bin/true\n";
    let mut boot = Container::builder("plumb-sd-client")
        .file("/etc/systemd/system/t-reload.service", unit(simple), 0o644)
        .file(
            "/etc/systemd/system/t-badreload.service",
            unit("ExecStart=/bin/sleep infinity\nExecReload=/bin/false\n"),
            0o644,
        )
        .file(
            "/etc/systemd/system/t-noreload.service",
            unit("ExecStart=/bin/sleep infinity\n"),
            0o644,
        )
        .file(
            "/etc/systemd/system/t-fail.service",
            unit("Type=oneshot\nExecStart=/bin/false\n"),
            0o644,
        );
    for i in 0..8 {
        boot = boot.file(
            &format!("/etc/systemd/system/t-many{i}.service"),
            unit("ExecStart=/bin/sleep infinity\n"),
            0o644,
        );
    }
    let c = boot.boot();
    runtime().block_on(async {
        let sd = connect(&c).await;

        // A unit never started: loaded, inactive; a reload of it is a job that ends `invalid`.
        let s = sd.unit_state("t-reload.service").await.unwrap();
        assert_eq!(
            (s.load.as_str(), s.active.as_str(), s.sub.as_str()),
            ("loaded", "inactive", "dead")
        );
        assert_eq!(
            sd.reload("t-reload.service").await.unwrap(),
            JobResult::Invalid
        );
        assert_eq!(sd.main_pid("t-reload.service").await.unwrap(), None);

        // start, reload (same process), restart (a new one), stop.
        assert_eq!(sd.start("t-reload.service").await.unwrap(), JobResult::Done);
        let s = sd.unit_state("t-reload.service").await.unwrap();
        assert!(s.is_active(), "{s}");
        assert_eq!(s.sub, "running");
        assert!(s.active_enter_monotonic_usec > 0);
        let pid = sd
            .main_pid("t-reload.service")
            .await
            .unwrap()
            .expect("a main pid");
        assert_eq!(
            sd.reload("t-reload.service").await.unwrap(),
            JobResult::Done
        );
        assert_eq!(sd.main_pid("t-reload.service").await.unwrap(), Some(pid));
        assert_eq!(
            sd.reload_or_restart("t-reload.service").await.unwrap(),
            JobResult::Done
        );
        assert_eq!(sd.main_pid("t-reload.service").await.unwrap(), Some(pid));
        assert_eq!(
            sd.restart("t-reload.service").await.unwrap(),
            JobResult::Done
        );
        let new_pid = sd
            .main_pid("t-reload.service")
            .await
            .unwrap()
            .expect("a main pid");
        assert_ne!(new_pid, pid);
        assert_eq!(sd.stop("t-reload.service").await.unwrap(), JobResult::Done);
        assert_eq!(
            sd.unit_state("t-reload.service").await.unwrap().active,
            "inactive"
        );

        // A failing ExecReload= is a job result, not an error; the unit keeps running.
        assert_eq!(
            sd.start("t-badreload.service").await.unwrap(),
            JobResult::Done
        );
        assert_eq!(
            sd.reload("t-badreload.service").await.unwrap(),
            JobResult::Failed
        );
        assert!(
            sd.unit_state("t-badreload.service")
                .await
                .unwrap()
                .is_active()
        );

        // Calls systemd refuses are errors naming the operation, the unit and systemd's reason.
        sd.start("t-noreload.service").await.unwrap();
        let e = sd.reload("t-noreload.service").await.unwrap_err();
        assert_eq!(
            e.dbus_error_name().as_deref(),
            Some("org.freedesktop.systemd1.JobTypeNotApplicable"),
            "{e}"
        );
        assert!(
            plumb::error::chain(&e).starts_with("reload t-noreload.service: "),
            "{e}"
        );
        let e = sd.start("t-missing.service").await.unwrap_err();
        assert!(e.is_no_such_unit(), "{e}");
        assert_eq!(
            e.dbus_error_name().as_deref(),
            Some("org.freedesktop.systemd1.NoSuchUnit"),
            "{e}"
        );
        let s = sd.unit_state("t-missing.service").await.unwrap();
        assert_eq!(
            (s.load.as_str(), s.active.as_str()),
            ("not-found", "inactive")
        );

        // Many jobs at once on one connection: each waits for its own JobRemoved, however the
        // signals and replies interleave.
        let names: Vec<String> = (0..8).map(|i| format!("t-many{i}.service")).collect();
        for round in 0..3 {
            let mut jobs = tokio::task::JoinSet::new();
            for n in &names {
                let (sd, n) = (sd.clone(), n.clone());
                jobs.spawn(async move { (sd.restart(&n).await, n) });
            }
            while let Some(done) = jobs.join_next().await {
                let (result, n) = done.expect("job task");
                assert_eq!(result.unwrap(), JobResult::Done, "round {round}: {n}");
            }
        }
        for n in &names {
            assert!(sd.unit_state(n).await.unwrap().is_active(), "{n}");
        }
        let mut listed = sd.units_matching("t-many*.service").await.unwrap();
        listed.sort();
        let active: Vec<(String, String)> = names
            .iter()
            .map(|n| (n.clone(), "active".to_owned()))
            .collect();
        assert_eq!(listed, active);

        // An alias's job is found by its path, though the signal names the unit by its id.
        c.sh("ln -s t-reload.service /etc/systemd/system/t-alias.service");
        sd.daemon_reload().await.unwrap();
        assert_eq!(
            sd.restart("t-alias.service").await.unwrap(),
            JobResult::Done
        );
        assert!(sd.unit_state("t-reload.service").await.unwrap().is_active());

        // A failed unit is cleared by reset-failed; a unit that does not exist has nothing to clear.
        assert_eq!(sd.start("t-fail.service").await.unwrap(), JobResult::Failed);
        assert_eq!(
            sd.unit_state("t-fail.service").await.unwrap().active,
            "failed"
        );
        sd.reset_failed("t-fail.service").await.unwrap();
        assert_eq!(
            sd.unit_state("t-fail.service").await.unwrap().active,
            "inactive"
        );
        sd.reset_failed("t-missing.service").await.unwrap();

        // daemon-reload returns once systemd has re-read the unit files (of a running unit: a
        // stopped one is unloaded and read afresh on its next use anyway).
        // The unit knows its file changed until then, and the end of the reload is signalled.
        let mut reloads = std::pin::pin!(sd.reloads().await.unwrap());
        c.sh("echo 'Environment=PLUMB_TEST=reloaded' >> /etc/systemd/system/t-badreload.service");
        let env = || c.sh("systemctl show -P Environment t-badreload.service");
        assert_eq!(env(), "");
        let stale = sd.unit_state("t-badreload.service").await.unwrap();
        assert!(stale.need_daemon_reload, "{stale:?}");
        sd.daemon_reload().await.unwrap();
        assert_eq!(env(), "PLUMB_TEST=reloaded");
        let fresh = sd.unit_state("t-badreload.service").await.unwrap();
        assert!(!fresh.need_daemon_reload, "{fresh:?}");
        tokio::time::timeout(DEADLINE, futures_util::StreamExt::next(&mut reloads))
            .await
            .expect("the end of the daemon-reload signalled")
            .expect("the stream goes on");
    });
    eprintln!("client test took {:?}", started.elapsed());
}

/// The body of `GET path` on 127.0.0.1:`port` when the answer is 200, else `None`.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The nginx site plumb deploys: `/` answers `text`, `/plumb.txt` is the file-bound static file.
fn site(port: u16, text: &str) -> String {
    format!(
        "server {{\n    listen 127.0.0.1:{port};\n    root /var/www/html;\n    location = / {{ return 200 \"{text}\\n\"; }}\n}}\n"
    )
}

/// A drop-in for nginx.service that plumb deploys into /etc/systemd/system: a unit file change.
fn dropin(value: &str) -> String {
    format!("[Service]\nEnvironment=PLUMB_TEST={value}\n")
}

const STATE: &str = "/var/lib/plumb/state";

/// The container's `.applied` outcome of nginx, once it exists and parses.
fn applied(c: &Container) -> Option<Outcome> {
    let (ok, text) = c.try_sh(&format!("cat {STATE}/nginx.applied"));
    if !ok {
        return None;
    }
    serde_json::from_str(&text).ok()
}

/// Runs `plumb --once` inside (it fetches and writes nginx.rev, which starts
/// plumb-apply@nginx through its path unit), then waits until that apply recorded `revision`.
fn deploy(c: &Container, revision: &str) -> Outcome {
    c.sh("plumb --once");
    assert_eq!(c.sh(&format!("cat {STATE}/nginx.rev")), revision);
    let mut last = None;
    wait_until(
        &format!("plumb-apply@nginx to apply {revision}"),
        DEADLINE,
        || {
            last = applied(c);
            last.as_ref()
                .is_some_and(|o| o.revision.to_string() == revision)
        },
    );
    // The oneshot finished: its exit status is the outcome's.
    wait_until("plumb-apply@nginx.service to finish", DEADLINE, || {
        let (_, state) = c.try_sh("systemctl show -P ActiveState plumb-apply@nginx.service");
        state == "inactive" || state == "failed"
    });
    last.expect("an outcome")
}

fn main_pid(c: &Container) -> String {
    c.sh("systemctl show -P MainPID nginx.service")
}

#[test]
fn apply_binds_reloads_and_reports_failures() {
    require_root();
    let started = Instant::now();
    let root = temp_root();
    let up = Upstream::new(root.path(), "ops");
    let git = GitDaemon::start(root.path());
    let port = free_port();
    let url = git.url(&up);
    let config = |extra: &str| {
        format!(
            r#"[plumb]
interval = "1h"

[[services]]
machine = "plumb-apply"
service = "nginx"
upstream = "{url}"
action = "reload"
dirs = [
  {{ local = "/etc/nginx/sites-enabled", link = "nginx/sites" }},
  {{ local = "/var/www/html/plumb.txt", link = "nginx/plumb.txt", file = true }},
  {{ local = "/etc/systemd/system/nginx.service.d/plumb-test.conf", link = "nginx/dropin.conf", file = true }},
  {extra}
]
"#
        )
    };
    // This test plays the daemon's part by hand, so the daemon is stopped before the config
    // appears (plumb-config.path would start it, and it stops with plumb.service). Then the
    // config, and the generator on daemon-reload.
    let c = Container::builder("plumb-apply").boot();
    c.install_deb();
    c.sh("systemctl stop plumb");
    let config_file = root.path().join("plumb.toml");
    std::fs::write(&config_file, config("")).unwrap();
    c.install(&config_file, "/etc/plumb/plumb.toml", 0o644);
    c.sh("systemctl daemon-reload");
    // Its path unit starts at boot, so by hand here. A bind made by hand before plumb's mount unit ever ran: systemd adopts it as mounted.
    c.sh("systemctl start plumb-apply@nginx.path");
    c.sh("touch /var/www/html/plumb.txt && mount --bind /etc/hostname /var/www/html/plumb.txt");
    wait_until("systemd to adopt the hand-made bind", DEADLINE, || {
        c.sh("systemctl show -P ActiveState var-www-html-plumb.txt.mount") == "active"
    });

    // First deploy: the stale bind is replaced, the drop-in loaded, nginx reloaded onto the site.
    up.write("nginx/sites/plumb", &site(port, "v1"))
        .write("nginx/plumb.txt", "file-v1\n")
        .write("nginx/dropin.conf", &dropin("1"))
        .write("README", "not nginx's\n");
    let v1 = up.commit("v1");
    let o = deploy(&c, &v1);
    assert!(o.ok, "{o}");
    assert!(o.message.contains("daemon-reload"), "{o}");
    assert!(
        o.message.contains("re-bound /var/www/html/plumb.txt"),
        "{o}"
    );
    wait_until("nginx to serve v1", DEADLINE, || {
        http_get(port, "/").as_deref() == Some("v1\n")
    });
    assert_eq!(http_get(port, "/plumb.txt").as_deref(), Some("file-v1\n"));
    assert!(
        c.sh("systemctl show -P Environment nginx.service")
            .contains("PLUMB_TEST=1")
    );
    // Asked again by hand: nothing to do, exit 0.
    let again = c.sh("plumb apply nginx");
    assert!(again.contains("applied"), "{again}");
    let pid = main_pid(&c);

    // New content in a directory and in a single file: nginx reloads (same main process), the file
    // bind is re-made on git's new inode, and no daemon-reload is done for non-unit files.
    up.write("nginx/sites/plumb", &site(port, "v2"))
        .write("nginx/plumb.txt", "file-v2\n");
    let v2 = up.commit("v2");
    let o = deploy(&c, &v2);
    assert!(o.ok, "{o}");
    assert!(!o.message.contains("daemon-reload"), "{o}");
    wait_until("nginx to serve v2", DEADLINE, || {
        http_get(port, "/").as_deref() == Some("v2\n")
    });
    assert_eq!(http_get(port, "/plumb.txt").as_deref(), Some("file-v2\n"));
    assert_eq!(main_pid(&c), pid, "reload, not restart");
    let mountinfo = c.sh("cat /proc/self/mountinfo");
    assert!(
        !mountinfo
            .lines()
            .any(|l| l.contains("plumb") && l.contains("//deleted")),
        "a bind still pins a replaced file:\n{mountinfo}"
    );

    // A unit file changed: daemon-reload, after the re-bind, so systemd reads the new drop-in.
    up.write("nginx/dropin.conf", &dropin("2"));
    let v3 = up.commit("v3");
    let o = deploy(&c, &v3);
    assert!(o.ok, "{o}");
    assert!(o.message.contains("daemon-reload"), "{o}");
    assert!(
        c.sh("systemctl show -P Environment nginx.service")
            .contains("PLUMB_TEST=2")
    );

    // A broken config: the reload fails, nginx keeps serving the old one, the outcome and the
    // oneshot's status say so with nginx's own error, and a retry by hand exits 1.
    up.write(
        "nginx/sites/plumb",
        &site(port, "v4").replace("\\n\"; }", "\\n\" }"),
    );
    let v4 = up.commit("v4 (broken)");
    let o = deploy(&c, &v4);
    assert!(!o.ok, "{o}");
    assert!(
        o.message.starts_with("reload nginx.service: job failed"),
        "{o}"
    );
    assert_eq!(o.active.as_deref(), Some("active"), "{o}");
    assert!(o.journal.iter().any(|l| l.contains("[emerg]")), "{o}");
    assert_eq!(
        c.try_sh("systemctl is-failed plumb-apply@nginx.service").1,
        "failed"
    );
    wait_until("the apply's log to show nginx's error", DEADLINE, || {
        c.journal("plumb-apply@nginx.service").contains("[emerg]")
    });
    let retry = c.exec(&["plumb", "apply", "nginx"]);
    assert_eq!(retry.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&retry.stdout).contains("FAILED"));
    assert_eq!(http_get(port, "/").as_deref(), Some("v2\n"));

    // Fixed: applied again, served.
    up.write("nginx/sites/plumb", &site(port, "v5"));
    let v5 = up.commit("v5");
    let o = deploy(&c, &v5);
    assert!(o.ok, "{o}");
    wait_until("nginx to serve v5", DEADLINE, || {
        http_get(port, "/").as_deref() == Some("v5\n")
    });
    assert_eq!(
        main_pid(&c),
        pid,
        "{o}\n{}\n{}",
        c.journal("nginx.service"),
        c.journal("plumb-apply@nginx.service")
    );

    // The config gains a dir after the generator ran: its mount unit does not exist yet, so apply
    // has systemd run the generator (daemon-reload) and binds it.
    let edited = root.path().join("plumb.toml");
    std::fs::write(
        &edited,
        config(r#"{ local = "/var/www/html/extra.txt", link = "nginx/extra.txt", file = true },"#),
    )
    .unwrap();
    c.install(&edited, "/etc/plumb/plumb.toml", 0o644);
    up.write("nginx/extra.txt", "extra\n");
    let v6 = up.commit("v6");
    let o = deploy(&c, &v6);
    assert!(o.ok, "{o}");
    assert!(
        o.message.contains(
            "re-bound /var/www/html/extra.txt (daemon-reload generated var-www-html-extra.txt.mount)"
        ),
        "{o}"
    );
    assert_eq!(http_get(port, "/extra.txt").as_deref(), Some("extra\n"));

    // `plumb --state-dir DIR apply` reads the deployed revision under DIR and records its
    // outcome there, leaving the default state directory's alone.
    let alt = "/var/lib/plumb-alt";
    let (ok, out) = c.try_sh(&format!("plumb --state-dir {alt} apply nginx 2>&1"));
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("{alt}/state/nginx.rev does not exist")),
        "{out}"
    );
    let kept = c.sh(&format!("cat {STATE}/nginx.applied"));
    c.sh(&format!(
        "mkdir -p {alt}/state && cp {STATE}/nginx.rev {alt}/state/"
    ));
    // Its checkouts are not there, so the outcome may be a failure; either way it is DIR's.
    c.try_sh(&format!("plumb --state-dir {alt} apply nginx"));
    let recorded: Outcome =
        serde_json::from_str(&c.sh(&format!("cat {alt}/state/nginx.applied"))).unwrap();
    assert_eq!(recorded.revision.to_string(), v6);
    assert_eq!(c.sh(&format!("cat {STATE}/nginx.applied")), kept);
    c.sh(&format!("rm -rf {alt}"));
    eprintln!("apply test took {:?}", started.elapsed());
}
