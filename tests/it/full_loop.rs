//! The whole loop on a real systemd, as a machine runs it: plumb installed like a package in a
//! booted container (the generator at boot, `plumb.service` enabled), an upstream on the host, and
//! nothing but git pushes from then on. What is asserted is what an operator sees: what nginx serves,
//! which units were reloaded or restarted, the state plumb reports, the mount table.

use crate::support;

use std::path::{Path, PathBuf};

use support::container::{Boot, Container};
use support::{DEADLINE, GitDaemon, Upstream, free_port, require_root, temp_root, wait_until};

/// A container with `config` as /etc/plumb/plumb.toml and `extra` files (unit files of test
/// services) in place, then plumb installed from this build's Debian package: its postinst
/// runs the generator (daemon-reload) and starts plumb.service, as on a real machine.
fn machine(name: &str, config: &str, extra: &[(&str, &str)]) -> Container {
    let mut b = Container::builder(name)
        // The container shares the host's network: nginx serves only what git gives it.
        .file("/etc/nginx/sites-enabled/default", "", 0o644);
    for (path, contents) in extra {
        b = b.file(path, contents, 0o644);
    }
    machine_from(b, config)
}

/// [`machine`] from a builder the caller filled.
fn machine_from(b: Boot, config: &str) -> Container {
    let c = b.file("/etc/plumb/plumb.toml", config, 0o644).boot();
    c.install_deb();
    c
}

fn get(port: u16) -> Option<String> {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nginx_conf(port: u16) -> String {
    format!("server {{\n  listen 127.0.0.1:{port};\n  root /var/www/plumb;\n}}\n")
}

/// What a service's state file says, inside the container.
fn state(c: &Container, service: &str) -> serde_json::Value {
    let text = c.sh(&format!("cat /var/lib/plumb/state/{service}.json"));
    serde_json::from_str(&text).unwrap()
}

/// The revision `plumb apply` last applied successfully to a service, from its outcome file.
fn applied(c: &Container, service: &str) -> Option<String> {
    let (ok, text) = c.try_sh(&format!("cat /var/lib/plumb/state/{service}.applied"));
    let v: serde_json::Value = serde_json::from_str(&text).ok().filter(|_| ok)?;
    (v["ok"] == true).then(|| v["revision"].as_str().unwrap_or_default().to_owned())
}

fn main_pid(c: &Container, unit: &str) -> String {
    c.sh(&format!("systemctl show -P MainPID {unit}"))
}

/// Mount table lines inside the container whose mount point is `target`.
fn mounts_on(c: &Container, target: &str) -> usize {
    c.sh(&format!(
        "awk '$5 == \"{target}\"' /proc/self/mountinfo | wc -l"
    ))
    .parse()
    .unwrap()
}

/// How often systemd reloaded `unit`, from its journal (flushed first: journald writes lazily).
fn reloads(c: &Container, unit: &str) -> usize {
    let (_, out) = c.try_sh(&format!(
        "journalctl --sync; journalctl --no-pager -o cat -u {unit} | grep -c '^Reloaded'"
    ));
    out.trim().parse().unwrap_or(0)
}

/// No metrics listener: the container shares the host's network, where the default (every
/// address, port 9222) may be taken, by the demo's container for one.
const CONFIG_HEAD: &str = "[plumb]\ninterval = \"1s\"\nmetrics_address = \"\"\n\n";

#[test]
fn nginx_follows_git_survives_reboots_and_never_stacks_mounts() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "site");
    let port = free_port();
    up.write("nginx/conf.d/site.conf", &nginx_conf(port))
        .write("www/index.html", "v1\n")
        .write("grafana/dash.json", "{}")
        .commit("v1");
    let config = format!(
        "{CONFIG_HEAD}[[services]]\nmachine = \"plumb-loop\"\nservice = \"nginx\"\naction = \"reload\"\nupstream = \"{}\"\ndirs = [\n  {{ local = \"/etc/nginx/conf.d\", link = \"nginx/conf.d\" }},\n  {{ local = \"/var/www/plumb/index.html\", link = \"www/index.html\", file = true }},\n]\n",
        gitd.url(&up)
    );
    let mut c = machine("plumb-loop", &config, &[]);
    wait_until("nginx to serve v1 from git", DEADLINE, || {
        get(port).as_deref() == Some("v1\n")
    });
    let pid = main_pid(&c, "nginx.service");

    // A new page: only a single file changes (git replaces it, so its bind must be re-made).
    let v2 = up.write("www/index.html", "v2\n").commit("v2");
    wait_until("nginx to serve v2", DEADLINE, || {
        get(port).as_deref() == Some("v2\n")
    });
    wait_until("v2 applied", DEADLINE, || {
        applied(&c, "nginx").as_deref() == Some(v2.as_str())
    });
    assert_eq!(
        main_pid(&c, "nginx.service"),
        pid,
        "a reload, not a restart"
    );
    assert_eq!(state(&c, "nginx")["state"], "OK");

    // A commit to files no service here uses: nginx is not told anything.
    let before = reloads(&c, "nginx.service");
    let unrelated = up
        .write("grafana/dash.json", "{\"v\":2}")
        .commit("grafana only");
    wait_until("plumb to see the grafana commit", DEADLINE, || {
        let (_, text) =
            c.try_sh("curl -sf --unix-socket /run/plumb/plumb.sock http://plumb/v1/services/nginx");
        serde_json::from_str::<serde_json::Value>(&text)
            .is_ok_and(|s| s["upstream_head"].as_str() == Some(unrelated.as_str()))
    });
    assert_eq!(reloads(&c, "nginx.service"), before);

    // A commit and its revert arrive in one fetch: nginx's hash moves to the revert, its files do
    // not, and nginx is not told anything.
    up.write("www/index.html", "oops\n").commit_local("oops");
    let revert = up
        .write("www/index.html", "v2\n")
        .commit_local("revert oops");
    up.push();
    wait_until(
        "nginx's hash and apply outcome to follow the revert",
        DEADLINE,
        || {
            state(&c, "nginx")["deployed"].as_str() == Some(revert.as_str())
                && applied(&c, "nginx").as_deref() == Some(revert.as_str())
        },
    );
    assert_eq!(reloads(&c, "nginx.service"), before);
    assert_eq!(get(port).as_deref(), Some("v2\n"));

    // Restart the daemon: nothing is re-applied or re-mounted.
    c.sh("systemctl restart plumb");
    up.write("www/index.html", "v3\n").commit("v3");
    wait_until("nginx to serve v3", DEADLINE, || {
        get(port).as_deref() == Some("v3\n")
    });
    for target in ["/etc/nginx/conf.d", "/var/www/plumb/index.html"] {
        assert_eq!(mounts_on(&c, target), 1, "{target} mounted once");
    }

    // Wipe through the API: the checkout is rebuilt and the mounts move onto it, one each.
    c.sh(
        "curl -sf --unix-socket /run/plumb/plumb.sock -X POST http://plumb/v1/services/nginx/wipe",
    );
    wait_until("mounts on the rebuilt checkout", DEADLINE, || {
        let (_, info) = c.try_sh("cat /proc/self/mountinfo");
        !info.contains("plumb-wiped")
    });
    for target in ["/etc/nginx/conf.d", "/var/www/plumb/index.html"] {
        assert_eq!(mounts_on(&c, target), 1, "{target} mounted once after wipe");
    }
    assert_eq!(get(port).as_deref(), Some("v3\n"));

    // Reboot: nginx starts after its mounts, on the config from git, on the first try.
    c.reboot();
    wait_until("nginx to serve v3 after reboot", DEADLINE, || {
        get(port).as_deref() == Some("v3\n")
    });
    assert_eq!(c.sh("systemctl show -P NRestarts nginx"), "0");
    let order = c.sh("systemctl show -P After nginx.service");
    assert!(order.contains("etc-nginx-conf.d.mount"), "{order}");
    for target in ["/etc/nginx/conf.d", "/var/www/plumb/index.html"] {
        assert_eq!(
            mounts_on(&c, target),
            1,
            "{target} mounted once after reboot"
        );
    }
}

#[test]
fn a_broken_config_is_broken_until_the_next_good_commit() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "site");
    let port = free_port();
    up.write("nginx/conf.d/site.conf", &nginx_conf(port))
        .write("www/index.html", "good\n")
        .commit("good");
    let config = format!(
        "{CONFIG_HEAD}[[services]]\nmachine = \"plumb-broken\"\nservice = \"nginx\"\naction = \"reload\"\nupstream = \"{}\"\ndirs = [\n  {{ local = \"/etc/nginx/conf.d\", link = \"nginx/conf.d\" }},\n  {{ local = \"/var/www/plumb/index.html\", link = \"www/index.html\", file = true }},\n]\n",
        gitd.url(&up)
    );
    let c = machine("plumb-broken", &config, &[]);
    wait_until("nginx to serve from git", DEADLINE, || {
        get(port).as_deref() == Some("good\n")
    });

    up.write(
        "nginx/conf.d/site.conf",
        "server { listen oops; bogus_directive; }\n",
    )
    .commit("broken");
    // A pull answers once the checkout and its apply are done, with the result.
    let answer: serde_json::Value = serde_json::from_str(&c.sh(
        "curl -sf --unix-socket /run/plumb/plumb.sock -X POST http://plumb/v1/services/nginx/pull",
    ))
    .unwrap();
    assert_eq!(answer["status"]["state"], "BROKEN", "{answer}");
    assert_eq!(answer["ok"], false, "{answer}");
    let info = state(&c, "nginx")["info"].as_str().unwrap().to_owned();
    assert!(info.contains("apply of"), "{info}");
    assert!(
        info.contains("bogus_directive") || info.contains("nginx"),
        "{info}"
    );
    // nginx keeps serving what it had.
    assert_eq!(get(port).as_deref(), Some("good\n"));

    up.write("nginx/conf.d/site.conf", &nginx_conf(port))
        .write("www/index.html", "fixed\n")
        .commit("fixed");
    wait_until("the fix to be served", DEADLINE, || {
        get(port).as_deref() == Some("fixed\n")
    });
    wait_until("OK again", DEADLINE, || state(&c, "nginx")["state"] == "OK");
}

/// `plumb_apply_total` of `service` with `result`, from the daemon's metrics inside the container.
fn applies(c: &Container, metrics: u16, service: &str, result: &str) -> u64 {
    let (_, text) = c.try_sh(&format!("curl -sf http://127.0.0.1:{metrics}/metrics"));
    let series = format!("plumb_apply_total{{result=\"{result}\",service=\"{service}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_apply_failing_before_its_outcome_is_broken_counted_and_retried_until_it_works() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "site");
    let (port, metrics) = (free_port(), free_port());
    up.write("nginx/conf.d/site.conf", &nginx_conf(port))
        .write("www/index.html", "v1\n")
        .commit("v1");
    let config = format!(
        "[plumb]\ninterval = \"1s\"\nmetrics_address = \"127.0.0.1:{metrics}\"\n\n[[services]]\nmachine = \"plumb-noapply\"\nservice = \"nginx\"\naction = \"reload\"\nupstream = \"{}\"\ndirs = [\n  {{ local = \"/etc/nginx/conf.d\", link = \"nginx/conf.d\" }},\n  {{ local = \"/var/www/plumb/index.html\", link = \"www/index.html\", file = true }},\n]\n",
        gitd.url(&up)
    );
    let c = machine("plumb-noapply", &config, &[]);
    wait_until("nginx to serve v1 from git", DEADLINE, || {
        get(port).as_deref() == Some("v1\n")
    });

    // The config on disk gains a key `plumb apply` refuses, and the daemon is not told: every
    // apply now fails before it can write an outcome.
    c.sh("printf '\\n[plumb.typo]\\nx = 1\\n' >> /etc/plumb/plumb.toml");
    let v2 = up.write("www/index.html", "v2\n").commit("v2");
    wait_until(
        "nginx BROKEN on v2, saying the apply left no outcome",
        DEADLINE,
        || {
            let s = state(&c, "nginx");
            s["state"] == "BROKEN"
                && s["deployed"].as_str() == Some(v2.as_str())
                && s["info"]
                    .as_str()
                    .is_some_and(|i| i.contains("left no outcome"))
        },
    );
    assert!(applies(&c, metrics, "nginx", "error") >= 1);
    let shown = c.sh("plumbctl status nginx");
    assert!(shown.contains("left no outcome"), "{shown}");
    // Applied again at every poll while it fails.
    let failures = applies(&c, metrics, "nginx", "error");
    wait_until("the apply to be tried again", DEADLINE, || {
        applies(&c, metrics, "nginx", "error") > failures
    });

    // The cause fixed by hand, no commit, no restart: the next poll's apply takes v2.
    c.sh("sed -i '/^\\[plumb.typo\\]/,$d' /etc/plumb/plumb.toml");
    wait_until("OK on v2", DEADLINE, || {
        let s = state(&c, "nginx");
        s["state"] == "OK" && applied(&c, "nginx").as_deref() == Some(v2.as_str())
    });
    assert!(applies(&c, metrics, "nginx", "ok") >= 1);
    assert_eq!(get(port).as_deref(), Some("v2\n"));
}

/// The check: nginx's own syntax check on the staged conf.d (`$PLUMB_DIR`), in a throwaway main
/// config that includes it. TOML's literal multi-line string keeps the quotes as they are.
const NGINX_CHECK: &str = r#"check = '''printf 'events {}\nhttp { include %s/*.conf; }\n' "$PLUMB_DIR" > /tmp/check.conf && nginx -t -q -c /tmp/check.conf'''"#;

#[test]
fn a_commit_failing_its_check_or_its_health_never_stays_on_the_machine() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "site");
    let port = free_port();
    let v1 = up
        .write("nginx/conf.d/site.conf", &nginx_conf(port))
        .write("www/index.html", "v1\n")
        .write("www/health.html", "ok\n")
        .commit("v1");
    let config = format!(
        "{CONFIG_HEAD}[[services]]\nmachine = \"plumb-safe\"\nservice = \"nginx\"\naction = \"reload\"\nupstream = \"{}\"\n{NGINX_CHECK}\ndirs = [\n  {{ local = \"/etc/nginx/conf.d\", link = \"nginx/conf.d\" }},\n  {{ local = \"/var/www/plumb\", link = \"www\" }},\n]\n[services.health]\nsettle = \"1s\"\nurl = \"http://127.0.0.1:{port}/health.html\"\ntimeout = \"3s\"\n",
        gitd.url(&up)
    );
    let c = machine("plumb-safe", &config, &[]);
    wait_until("nginx to serve v1", DEADLINE, || {
        get(port).as_deref() == Some("v1\n")
    });
    wait_until("v1 applied", DEADLINE, || {
        applied(&c, "nginx").as_deref() == Some(v1.as_str())
    });

    // A config nginx rejects: the check refuses it, nothing on the machine changes.
    let v2 = up
        .write(
            "nginx/conf.d/site.conf",
            "server { listen oops; bogus_directive; }\n",
        )
        .write("www/index.html", "v2\n")
        .commit("v2: broken config");
    wait_until("the check to refuse v2", DEADLINE, || {
        state(&c, "nginx")["state"] == "BROKEN"
    });
    let info = state(&c, "nginx")["info"].as_str().unwrap().to_owned();
    assert!(
        info.starts_with(&format!(
            "check of {} failed, files not changed:",
            &v2[..12]
        )) && info.contains("site.conf:1")
            && info.contains("test failed"),
        "{info}"
    );
    assert_eq!(get(port).as_deref(), Some("v1\n"));
    assert_eq!(c.sh("cat /var/lib/plumb/state/nginx.rev"), v1);

    // A config that passes the check but leaves the service unhealthy: applied, then rolled back.
    let v3 = up
        .write("nginx/conf.d/site.conf", &nginx_conf(port))
        .write("www/index.html", "v3\n")
        .remove("www/health.html")
        .commit("v3: no health page");
    let rolled_back = format!("rolled back from {} to {}", &v3[..12], &v1[..12]);
    wait_until("the rollback from v3", DEADLINE, || {
        state(&c, "nginx")["info"]
            .as_str()
            .is_some_and(|i| i.starts_with(&rolled_back))
    });
    wait_until("nginx to serve v1 again", DEADLINE, || {
        get(port).as_deref() == Some("v1\n")
    });
    wait_until("v1 applied again", DEADLINE, || {
        applied(&c, "nginx").as_deref() == Some(v1.as_str())
    });
    let s = state(&c, "nginx");
    assert_eq!(
        (s["state"].as_str(), s["deployed"].as_str()),
        (Some("BROKEN"), Some(v1.as_str()))
    );
    assert!(s["info"].as_str().unwrap().contains("answered 404"), "{s}");

    // A commit elsewhere does not bring v3 back.
    let v4 = up.write("other/readme", "x\n").commit("v4: elsewhere");
    wait_until("v4 to be seen and refused", DEADLINE, || {
        state(&c, "nginx")["rejected"]["head"] == v4.as_str()
    });
    assert_eq!(get(port).as_deref(), Some("v1\n"));
    assert_eq!(state(&c, "nginx")["deployed"], v1.as_str());

    // A newer commit of the service's files is tried, and it is healthy.
    let v5 = up
        .write("www/index.html", "v5\n")
        .write("www/health.html", "ok\n")
        .commit("v5: fixed");
    wait_until("nginx to serve v5", DEADLINE, || {
        get(port).as_deref() == Some("v5\n")
    });
    wait_until("v5 applied and OK", DEADLINE, || {
        applied(&c, "nginx").as_deref() == Some(v5.as_str()) && state(&c, "nginx")["state"] == "OK"
    });
    assert_eq!(mounts_on(&c, "/var/www/plumb"), 1);
}

/// A Debian package built with `dpkg-deb` on the host: `name` at `version`, shipping a unit file
/// `<name>.service` (a process that stays up) and a conffile.
fn deb(dir: &Path, name: &str, version: &str) -> PathBuf {
    let root = dir.join(format!("{name}-{version}"));
    let write = |path: &str, text: &str| {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "DEBIAN/control",
        &format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: plumb tests <t@example.invalid>\nDescription: plumb test package\n"
        ),
    );
    write("DEBIAN/conffiles", &format!("/etc/{name}.conf\n"));
    write(&format!("etc/{name}.conf"), &format!("version {version}\n"));
    write(
        &format!("lib/systemd/system/{name}.service"),
        &format!("[Unit]\nDescription={name}\n\n[Service]\nExecStart=/bin/sleep infinity\n"),
    );
    let out_file = dir.join(format!("{name}_{version}_all.deb"));
    let out = std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&root)
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "dpkg-deb: {out:?}");
    out_file
}

/// A flat apt repository's `Packages` index for `debs` (all in the repository's directory).
fn packages_index(debs: &[&Path]) -> String {
    use sha2::Digest;
    let mut index = String::new();
    for deb in debs {
        let bytes = std::fs::read(deb).unwrap();
        let control = std::process::Command::new("dpkg-deb")
            .arg("-f")
            .arg(deb)
            .output()
            .unwrap();
        let sha: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        index.push_str(String::from_utf8_lossy(&control.stdout).trim_end());
        index.push_str(&format!(
            "\nFilename: ./{}\nSize: {}\nSHA256: {sha}\n\n",
            deb.file_name().unwrap().to_string_lossy(),
            bytes.len()
        ));
    }
    index
}

#[test]
fn a_missing_package_is_installed_never_upgraded_and_a_failed_install_is_retried() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "pkgs");
    up.write("hello/hello.conf", "one\n")
        .write("later/later.conf", "one\n")
        .commit("v1");
    let hello = deb(root.path(), "plumb-hello", "1.0");
    let service = |name: &str, link: &str| {
        format!(
            "[[services]]\nmachine = \"plumb-pkg\"\nservice = \"{name}\"\npackage = \"{name}\"\naction = \"restart\"\nupstream = \"{}\"\ndirs = [{{ local = \"/etc/{name}.d\", link = \"{link}\" }}]\n\n",
            gitd.url(&up)
        )
    };
    let config = format!(
        "{CONFIG_HEAD}{}{}",
        service("plumb-hello", "hello"),
        service("plumb-later", "later")
    );
    // A local repository holding plumb-hello only; no network sources.
    let c = machine_from(
        Container::builder("plumb-pkg")
            .file("/etc/apt/sources.list", "", 0o644)
            .file(
                "/etc/apt/sources.list.d/plumb-test.list",
                "deb [trusted=yes] file:/srv/repo ./\n",
                0o644,
            )
            .copy(&hello, "/srv/repo/plumb-hello_1.0_all.deb", 0o644)
            .file("/srv/repo/Packages", packages_index(&[&hello]), 0o644),
        &config,
    );

    // plumb-hello: installed (after refreshing the empty package lists), its unit started.
    wait_until("plumb-hello applied (installed) and OK", DEADLINE, || {
        applied(&c, "plumb-hello").is_some() && state(&c, "plumb-hello")["state"] == "OK"
    });
    assert_eq!(c.sh("dpkg-query -W -f='${Version}' plumb-hello"), "1.0");
    assert_eq!(c.sh("systemctl is-active plumb-hello.service"), "active");
    let outcome = c.sh("cat /var/lib/plumb/state/plumb-hello.applied");
    assert!(
        outcome.contains("installed package plumb-hello"),
        "{outcome}"
    );

    // plumb-later is in no repository: BROKEN, saying so.
    wait_until("plumb-later to fail", DEADLINE, || {
        state(&c, "plumb-later")["state"] == "BROKEN"
    });
    let info = state(&c, "plumb-later")["info"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        info.contains("package plumb-later: apt-get failed: exit status 100")
            && info.contains("Unable to locate package plumb-later"),
        "{info}"
    );

    // The package appears upstream (and a newer plumb-hello with it): plumb-later is installed at
    // a later poll without any commit; plumb-hello is not upgraded, even by a new revision.
    let later = deb(root.path(), "plumb-later", "1.0");
    let hello2 = deb(root.path(), "plumb-hello", "2.0");
    c.install(&later, "/srv/repo/plumb-later_1.0_all.deb", 0o644);
    c.install(&hello2, "/srv/repo/plumb-hello_2.0_all.deb", 0o644);
    let index = root.path().join("Packages");
    std::fs::write(&index, packages_index(&[&hello, &hello2, &later])).unwrap();
    c.install(&index, "/srv/repo/Packages", 0o644);
    wait_until("plumb-later installed by a retry", DEADLINE, || {
        applied(&c, "plumb-later").is_some() && state(&c, "plumb-later")["state"] == "OK"
    });
    assert_eq!(c.sh("systemctl is-active plumb-later.service"), "active");
    let v2 = up.write("hello/hello.conf", "two\n").commit("v2");
    wait_until("v2 applied to plumb-hello", DEADLINE, || {
        applied(&c, "plumb-hello").as_deref() == Some(v2.as_str())
    });
    assert_eq!(c.sh("dpkg-query -W -f='${Version}' plumb-hello"), "1.0");
}

const COUNTER: &str = "[Unit]\nDescription=plumb test: %N\n\n[Service]\nExecStart=/bin/sleep infinity\nExecReload=/bin/true\n";
const TEMPLATE: &str =
    "[Unit]\nDescription=plumb test template %i\n\n[Service]\nExecStart=/bin/sleep infinity\n";

#[test]
fn actions_restart_or_leave_alone_and_template_instances_are_enabled() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "apps");
    let v1 = up
        .write("restarted/conf", "1")
        .write("untouched/conf", "1")
        .write("templated/conf", "1")
        .commit("v1");
    let url = gitd.url(&up);
    let svc = |name: &str, action: &str, link: &str| {
        format!(
            "[[services]]\nmachine = \"plumb-actions\"\nservice = \"{name}\"\naction = \"{action}\"\nupstream = \"{url}\"\ndirs = [{{ local = \"/etc/{link}\", link = \"{link}\" }}]\n\n"
        )
    };
    let config = format!(
        "{CONFIG_HEAD}{}{}{}",
        svc("restarted", "restart", "restarted"),
        svc("untouched", "none", "untouched"),
        svc("tmpl@one", "reload", "templated"),
    );
    let c = machine(
        "plumb-actions",
        &config,
        &[
            ("/etc/systemd/system/restarted.service", COUNTER),
            ("/etc/systemd/system/untouched.service", COUNTER),
            ("/etc/systemd/system/tmpl@.service", TEMPLATE),
        ],
    );
    // The template's instance is enabled by the generator and started.
    wait_until("tmpl@one active", DEADLINE, || {
        c.try_sh("systemctl is-active tmpl@one").0
    });
    // A generator's .wants link is what systemd calls enabled-runtime.
    assert_eq!(
        c.sh("systemctl is-enabled tmpl@one.service"),
        "enabled-runtime"
    );
    wait_until("first applies", DEADLINE, || {
        ["restarted", "untouched"]
            .iter()
            .all(|s| applied(&c, s).as_deref() == Some(v1.as_str()))
    });
    let restarted = main_pid(&c, "restarted.service");
    let untouched = main_pid(&c, "untouched.service");

    up.write("restarted/conf", "2")
        .write("untouched/conf", "2")
        .commit("v2");
    wait_until("restarted got a new process", DEADLINE, || {
        main_pid(&c, "restarted.service") != restarted
    });
    wait_until("untouched sees its new file", DEADLINE, || {
        c.sh("cat /etc/untouched/conf") == "2"
    });
    assert_eq!(
        main_pid(&c, "untouched.service"),
        untouched,
        "action none leaves it alone"
    );
    assert_eq!(c.sh("cat /etc/restarted/conf"), "2");
}

/// The machine knows only the bootstrap URL (`PLUMB_BOOTSTRAP` in /etc/default/plumb): plumb takes
/// its config from git, brings nginx up from it, follows config commits (the generator runs again,
/// persisted state stays), refuses a bad config, and boots again from the config it installed.
#[test]
fn bootstrap_takes_the_config_from_git_and_manages_plumb_itself() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "ops");
    let url = gitd.url(&up);
    let port = free_port();
    let nginx = format!(
        "[[services]]\nmachine = \"plumb-boot\"\nservice = \"nginx\"\naction = \"reload\"\nupstream = \"{url}\"\ndirs = [\n  {{ local = \"/etc/nginx/conf.d\", link = \"nginx/conf.d\" }},\n  {{ local = \"/var/www/plumb/index.html\", link = \"www/index.html\", file = true }},\n]\n\n"
    );
    let first = format!("{CONFIG_HEAD}{nginx}");
    up.write("plumb/plumb.toml", &first)
        .write("nginx/conf.d/site.conf", &nginx_conf(port))
        .write("www/index.html", "v1\n")
        .write("motd/motd", "hello\n")
        .commit("ops");
    let mut c = Container::builder("plumb-boot")
        .file("/etc/nginx/sites-enabled/default", "", 0o644)
        .file(
            "/etc/default/plumb",
            // The metrics listener on a port of its own: the container shares the host's
            // network.
            format!(
                "PLUMB_BOOTSTRAP={url}\nPLUMB_METRICS_ADDRESS=127.0.0.1:{}\n",
                free_port()
            ),
            0o644,
        )
        .boot();
    c.install_deb();
    wait_until(
        "nginx to serve v1 from the bootstrapped config",
        DEADLINE,
        || get(port).as_deref() == Some("v1\n"),
    );
    assert_eq!(c.sh("cat /etc/plumb/plumb.toml"), first.trim_end());
    assert_eq!(state(&c, "plumb")["state"], "OK");

    // A config commit adds a service with a bind mount of its own: the generator must run again
    // for its mount unit. nginx is frozen first; the freeze outlives the new config.
    c.sh("plumbctl freeze nginx");
    let second = format!(
        "{first}[[services]]\nmachine = \"plumb-boot\"\nservice = \"motd\"\naction = \"none\"\nupstream = \"{url}\"\ndirs = [{{ local = \"/srv/motd\", link = \"motd\" }}]\n"
    );
    up.write("plumb/plumb.toml", &second)
        .write("www/index.html", "v2\n")
        .commit("add motd");
    wait_until("motd bound from its new mount unit", DEADLINE, || {
        c.try_sh("cat /srv/motd/motd").1.trim() == "hello"
    });
    assert_eq!(c.sh("systemctl is-active srv-motd.mount"), "active");
    assert_eq!(state(&c, "nginx")["state"], "FREEZE");
    assert_eq!(get(port).as_deref(), Some("v1\n"), "nginx stays frozen");

    // A bad config: refused by check-config before it reaches /etc; the running one stays.
    up.write(
        "plumb/plumb.toml",
        &format!("{second}[[services]]\nservice = 3\n"),
    )
    .commit("broken config");
    wait_until("plumb refusing the bad config", DEADLINE, || {
        state(&c, "plumb")["state"] == "BROKEN"
    });
    assert_eq!(c.sh("cat /etc/plumb/plumb.toml"), second.trim_end());
    assert_eq!(c.sh("systemctl is-active plumb"), "active");

    // At boot the generator reads the installed config: everything comes back, frozen included.
    c.reboot();
    wait_until("nginx serving after the reboot", DEADLINE, || {
        get(port).as_deref() == Some("v1\n")
    });
    assert_eq!(c.sh("cat /srv/motd/motd"), "hello");
    assert_eq!(state(&c, "nginx")["state"], "FREEZE");
    c.sh("plumbctl unfreeze nginx");
    wait_until("nginx to serve v2 once unfrozen", DEADLINE, || {
        get(port).as_deref() == Some("v2\n")
    });
}
