//! The `plumb` binary end to end against real git servers: what an operator sees in the checkouts, the
//! `.rev` hand-over files, the state files and the exit codes, for `--once` runs and for the
//! long-running daemon with SIGHUP and SIGTERM.

use crate::support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::{
    ANY_METRICS_PORT, DEADLINE, GitDaemon, HttpServer, Machine, Relay, Relaying, SshServer, Tmpfs,
    Upstream, require_root, scrape, service, temp_root, wait_until,
};

/// Lists every file under `dir`, relative, sorted: what a checkout holds.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn only_the_service_whose_files_changed_gets_a_new_revision() {
    require_root();
    let root = temp_root();
    let http = HttpServer::start(root.path());
    let up = Upstream::new(root.path(), "fleet");
    let first = up
        .write("nginx/etc/nginx.conf", "v1")
        .write("grafana/dashboards/a.json", "{}")
        .write("etc/motd", "hello")
        .write("etcd/member", "x")
        .write("README", "unrelated")
        .commit("first");
    let url = http.url(&up);
    let m = Machine::new(
        root.path(),
        &format!(
            "{}{}{}",
            service("nginx", &url, &["nginx/etc"]),
            service("grafana", &url, &["grafana/dashboards"]),
            service("etc", &url, &["etc"]),
        ),
    );
    m.once(true);
    // Each checkout holds exactly its own links, nothing of the rest of the repository.
    assert_eq!(tree(&m.checkout("nginx")), vec!["nginx/etc/nginx.conf"]);
    assert_eq!(
        tree(&m.checkout("grafana")),
        vec!["grafana/dashboards/a.json"]
    );
    assert_eq!(tree(&m.checkout("etc")), vec!["etc/motd"]);
    for s in ["nginx", "grafana", "etc"] {
        assert_eq!(m.rev(s).as_deref(), Some(first.as_str()), "{s}");
        assert_eq!(m.state_json(s)["state"], "OK");
    }
    let inodes: Vec<u64> = ["nginx", "etc"].iter().map(|s| m.rev_inode(s)).collect();

    // A commit under grafana/ and one under etcd/ (a prefix of nothing but `etc` as a string).
    let second = up
        .write("grafana/dashboards/a.json", "{\"v\":2}")
        .commit("grafana v2");
    up.write("etcd/member", "y").commit("etcd only");
    m.once(true);
    assert_eq!(m.rev("grafana").as_deref(), Some(second.as_str()));
    assert_eq!(
        m.read("grafana", "grafana/dashboards/a.json").unwrap(),
        "{\"v\":2}"
    );
    assert_eq!(m.rev("nginx").as_deref(), Some(first.as_str()));
    assert_eq!(m.rev("etc").as_deref(), Some(first.as_str()));
    // Not even rewritten with the same content: systemd would see that as a change.
    let after: Vec<u64> = ["nginx", "etc"].iter().map(|s| m.rev_inode(s)).collect();
    assert_eq!(inodes, after);

    // Full history in one shared store, however many services use the upstream.
    let stores = m.stores();
    assert_eq!(stores.len(), 1, "{stores:?}");
    let count = support::git(&stores[0], &["rev-list", "--count", "--all"]);
    assert_eq!(count.parse::<usize>().unwrap(), up.rev_count("main"));
}

#[test]
fn the_deployed_hash_is_the_same_on_every_machine_on_the_same_head() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "fleet");
    up.write("nginx/etc/x", "1")
        .write("other/f", "1")
        .commit("A");
    let machine = |name: &str| {
        let dir = root.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        Machine::new(&dir, &service("nginx", &up.file_url(), &["nginx/etc"]))
    };
    let (early, late) = (machine("early"), machine("late"));
    early.once(true);
    late.once(true);

    // B adds a file, C removes it again. One machine fetches B then C, the other only C: both
    // report C, the last commit that changed nginx's files, and hold the same files.
    let b = up.write("nginx/etc/y", "1").commit("B adds y");
    early.once(true);
    assert_eq!(early.rev("nginx").as_deref(), Some(b.as_str()));
    let c = up.remove("nginx/etc/y").commit("C removes y");
    early.once(true);
    late.once(true);
    for m in [&early, &late] {
        assert_eq!(m.rev("nginx").as_deref(), Some(c.as_str()));
        assert_eq!(m.state_json("nginx")["deployed"], c.as_str());
        assert_eq!(tree(&m.checkout("nginx")), ["nginx/etc/x"]);
    }

    // The head is amended and force-pushed (same tree, new hash): every machine follows to the
    // hash the branch has now, and no file is rewritten.
    let file = late.checkout("nginx").join("nginx/etc/x");
    let inode = fs::metadata(&file).unwrap().ino();
    let amended = up.amend("C, reworded");
    assert_ne!(amended, c);
    early.once(true);
    late.once(true);
    for m in [&early, &late] {
        assert_eq!(m.rev("nginx").as_deref(), Some(amended.as_str()));
        assert_eq!(m.state_json("nginx")["state"], "OK");
    }
    assert_eq!(
        fs::metadata(&file).unwrap().ino(),
        inode,
        "the file was not rewritten"
    );

    // A commit elsewhere moves nothing: the .rev file is not even rewritten.
    let rev_inode = late.rev_inode("nginx");
    up.write("other/f", "2").commit("D, not nginx");
    late.once(true);
    assert_eq!(late.rev("nginx").as_deref(), Some(amended.as_str()));
    assert_eq!(late.rev_inode("nginx"), rev_inode);
}

#[test]
fn an_idle_tick_for_twenty_services_is_one_request() {
    require_root();
    let root = temp_root();
    let http = HttpServer::start(root.path());
    let up = Upstream::new(root.path(), "many");
    for i in 0..20 {
        up.write(&format!("svc{i}/conf"), &format!("{i}"));
    }
    up.commit("twenty services");
    let url = http.url(&up);
    let config: String = (0..20)
        .map(|i| service(&format!("svc{i}"), &url, &[&format!("svc{i}")]))
        .collect();
    let m = Machine::new(root.path(), &config);
    m.once(true);
    // svc1 must not have picked up svc10..svc19.
    assert_eq!(tree(&m.checkout("svc1")), vec!["svc1/conf"]);
    let before = http.requests().len();
    m.once(true);
    wait_until("the idle fetch in the access log", DEADLINE, || {
        http.requests().len() > before
    });
    let idle: Vec<String> = http.requests().split_off(before);
    assert_eq!(
        idle.len(),
        1,
        "an idle tick must cost one request: {idle:#?}"
    );
    assert!(idle[0].contains("info/refs"), "{idle:?}");
}

#[test]
fn empty_upstream_and_missing_branch_wait_then_deploy() {
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "empty");
    let url = gitd.url(&up);
    let canary =
        service("canary", &url, &["app"]).replace("upstream =", "branch = \"canary\"\nupstream =");
    let m = Machine::new(
        root.path(),
        &format!("{}{canary}", service("app", &url, &["app"])),
    );
    // Nothing upstream yet: not an error, the services wait and say why.
    m.once(true);
    assert_eq!(m.rev("app"), None);
    let s = m.state_json("app");
    assert_eq!(s["state"], "OK");
    assert!(
        s["info"]
            .as_str()
            .unwrap()
            .contains("does not exist upstream yet"),
        "{s}"
    );

    let main = up.write("app/version", "stable").commit("first");
    m.once(true);
    assert_eq!(m.rev("app").as_deref(), Some(main.as_str()));
    assert_eq!(m.rev("canary"), None);
    assert!(
        m.state_json("canary")["info"]
            .as_str()
            .unwrap()
            .contains("\"canary\"")
    );

    up.branch("canary");
    let c = up.write("app/version", "canary").commit("canary build");
    m.once(true);
    assert_eq!(m.rev("canary").as_deref(), Some(c.as_str()));
    assert_eq!(m.read("canary", "app/version").unwrap(), "canary");
    assert_eq!(m.read("app", "app/version").unwrap(), "stable");
}

#[test]
fn force_push_is_followed_and_deleted_files_disappear() {
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let up = Upstream::new(root.path(), "rewrite");
    let v1 = up.write("app/a", "1").write("app/b", "1").commit("v1");
    up.write("app/a", "2").commit("v2");
    let m = Machine::new(root.path(), &service("app", &gitd.url(&up), &["app"]));
    m.once(true);
    assert_eq!(m.read("app", "app/a").unwrap(), "2");

    up.force_reset(&v1);
    let v3 = up
        .remove("app/b")
        .write("app/a", "3")
        .commit("v3 after rewrite");
    m.once(true);
    assert_eq!(m.rev("app").as_deref(), Some(v3.as_str()));
    assert_eq!(tree(&m.checkout("app")), vec!["app/a"]);
    assert_eq!(m.read("app", "app/a").unwrap(), "3");
}

#[test]
fn two_upstreams_over_git_and_ssh_get_a_store_each() {
    require_root();
    let root = temp_root();
    let gitd = GitDaemon::start(root.path());
    let sshd = SshServer::start(root.path());
    let a = Upstream::new(root.path(), "a");
    let b = Upstream::new(root.path(), "b");
    let ha = a.write("web/index.html", "a").commit("a");
    let hb = b.write("db/my.cnf", "b").commit("b");
    let m = Machine::new(root.path(), "");
    m.write_config_with(
        &format!(
            "ssh_key = {:?}\nknown_hosts = [{:?}]\n",
            sshd.client_key, sshd.known_hosts
        ),
        &format!(
            "{}{}",
            service("web", &gitd.url(&a), &["web"]),
            service("db", &sshd.url(&b), &["db"])
        ),
    );
    m.once(true);
    assert_eq!(m.rev("web").as_deref(), Some(ha.as_str()));
    assert_eq!(m.rev("db").as_deref(), Some(hb.as_str()));
    assert_eq!(m.stores().len(), 2);
}

#[test]
fn an_unreachable_upstream_keeps_files_fails_the_run_and_recovers() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "flaky");
    let v1 = up.write("app/conf", "1").commit("v1");
    let m = Machine::new(root.path(), &service("app", &up.file_url(), &["app"]));
    m.once(true);

    let away = root.path().join("away.git");
    fs::rename(&up.bare, &away).unwrap();
    // A cron user's run fails, saying why; the service's state is its own, not the upstream's.
    let out = m.once(false);
    assert_eq!(m.state_json("app")["state"], "OK");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("upstream unreachable"), "{stdout}");
    assert_eq!(m.read("app", "app/conf").unwrap(), "1");
    assert_eq!(m.rev("app").as_deref(), Some(v1.as_str()));

    fs::rename(&away, &up.bare).unwrap();
    let v2 = up.write("app/conf", "2").commit("v2");
    m.once(true);
    assert_eq!(m.state_json("app")["state"], "OK");
    assert_eq!(m.rev("app").as_deref(), Some(v2.as_str()));
}

#[test]
fn a_damaged_store_is_moved_aside_and_rebuilt() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "heal");
    up.write("app/conf", "1").commit("v1");
    let m = Machine::new(root.path(), &service("app", &up.file_url(), &["app"]));
    m.once(true);
    let store = m.stores().remove(0);
    fs::remove_dir_all(store.join("objects")).unwrap();
    fs::write(store.join("HEAD"), "garbage").unwrap();

    let v2 = up.write("app/conf", "2").commit("v2");
    m.once(true);
    assert_eq!(m.rev("app").as_deref(), Some(v2.as_str()));
    assert_eq!(m.read("app", "app/conf").unwrap(), "2");
    let names: Vec<String> = m
        .stores()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "the damaged store is kept for forensics: {names:?}"
    );
    assert!(names.iter().any(|n| n.contains("damaged")), "{names:?}");
}

#[test]
fn the_daemon_polls_reloads_its_config_and_stops_cleanly() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "live");
    up.write("a/conf", "1").write("b/conf", "1").commit("v1");
    let url = up.file_url();
    let m = Machine::new(root.path(), &service("a", &url, &["a"]));
    let mut d = m.spawn();
    wait_until("first deploy", DEADLINE, || {
        m.read("a", "a/conf").as_deref() == Some("1")
    });

    let v2 = up.write("a/conf", "2").commit("v2");
    wait_until("the poll to deploy v2", DEADLINE, || {
        m.rev("a").as_deref() == Some(v2.as_str())
    });

    // A broken config on SIGHUP is refused; the daemon keeps running the old one.
    fs::write(
        &m.config,
        "[[services]]\nmachine = \"testbox\"\nbogus = 1\n",
    )
    .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let v3 = up.write("a/conf", "3").commit("v3");
    wait_until("v3 under the old config", DEADLINE, || {
        m.rev("a").as_deref() == Some(v3.as_str())
    });
    assert!(
        d.0.try_wait().unwrap().is_none(),
        "a bad config must not stop the daemon"
    );

    // A good one adds a service without a restart.
    m.write_config(&format!(
        "{}{}",
        service("a", &url, &["a"]),
        service("b", &url, &["b"])
    ));
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("service b after reload", DEADLINE, || {
        m.read("b", "b/conf").is_some()
    });

    d.signal(nix::sys::signal::Signal::SIGTERM);
    let mut status = None;
    wait_until("exit after SIGTERM", DEADLINE, || {
        status = d.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}");
    let leftovers: Vec<_> = fs::read_dir(m.state.join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn check_config_accepts_gitoppers_sample_and_names_the_line_of_an_unknown_key() {
    let root = temp_root();
    let sample = root.path().join("config.toml");
    fs::write(
        &sample,
        r#"[global]
upstream = "https://github.com/miekg/gitopper-config"
branch = "main"
mount = "/tmp/gitopper"
keys = [
	{ path = "keys/miek_id_ed25519_gitopper.pub", ro = true },
	{ path = "/local/home/miek/.ssh/id_ed25519_gitopper.pub"},
]

[[services]]
machine = "localhost"
service = "prometheus"
user = "prometheus"
package = "prometheus"
action = "reload"
dirs = [
	{ local = "/etc/prometheus", link = "prometheus/etc" },
]
"#,
    )
    .unwrap();
    let run = |file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_plumb"))
            .args(["check-config", "--hosts", "localhost"])
            .arg(file)
            .output()
            .unwrap()
    };
    let out = run(&sample);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[prometheus] machine localhost"),
        "{stdout}"
    );
    assert!(
        stdout.contains("prometheus/etc -> /etc/prometheus"),
        "{stdout}"
    );
    assert!(
        stdout.contains("checkout  /tmp/gitopper/prometheus"),
        "{stdout}"
    );

    let bad = root.path().join("bad.toml");
    fs::write(&bad, "[global]\nupstream = \"u\"\nbranchh = \"main\"\n").unwrap();
    let out = run(&bad);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:3:1: branchh: unknown field `branchh`"),
        "{stderr}"
    );
}

/// `curl --unix-socket` against the daemon's API, as the README shows it; returns the body.
fn curl(socket: &Path, method: &str, path: &str, body: Option<&str>) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail-with-body", "--unix-socket"])
        .arg(socket)
        .args(["-X", method]);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "-d", b]);
    }
    let out = cmd.arg(format!("http://plumb{path}")).output().unwrap();
    assert!(
        out.status.success(),
        "curl {method} {path}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_freeze_made_through_the_api_survives_kill_9() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "frozen");
    let v1 = up.write("app/conf", "1").commit("v1");
    let m = Machine::new(root.path(), &service("app", &up.file_url(), &["app"]));
    let socket = m.socket.clone();
    let mut d = m.spawn();
    wait_until("first deploy", DEADLINE, || {
        m.rev("app").as_deref() == Some(v1.as_str())
    });
    wait_until("the API socket", DEADLINE, || socket.exists());
    let list: serde_json::Value =
        serde_json::from_str(&curl(&socket, "GET", "/v1/services", None)).unwrap();
    assert_eq!(list["services"][0]["service"], "app");
    let frozen: serde_json::Value = serde_json::from_str(&curl(
        &socket,
        "POST",
        "/v1/services/app/freeze",
        Some("{}"),
    ))
    .unwrap();
    assert_eq!(frozen["status"]["state"], "FREEZE");

    d.0.kill().unwrap(); // SIGKILL: no chance to save anything more
    d.0.wait().unwrap();
    let v2 = up.write("app/conf", "2").commit("v2");
    d = m.spawn();
    wait_until("the API socket again", DEADLINE, || {
        Command::new("curl")
            .args(["-sf", "--unix-socket"])
            .arg(&socket)
            .arg("http://plumb/v1/services/app")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let pulled: serde_json::Value =
        serde_json::from_str(&curl(&socket, "POST", "/v1/services/app/pull", None)).unwrap();
    assert_eq!(pulled["status"]["state"], "FREEZE", "{pulled}");
    assert_eq!(pulled["status"]["upstream_head"], v2.as_str());
    assert_eq!(m.rev("app").as_deref(), Some(v1.as_str()));
    drop(d);
}

/// `promtool check metrics` (Prometheus' own linter) on a scrape: exit 0 and no complaints.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/install-deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );
}

#[test]
fn metrics_follow_the_deployed_hash_and_show_a_frozen_service_behind() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "metered");
    let v1 = up
        .write("app/conf", "1")
        .write("web/conf", "1")
        .write("db/conf", "1")
        .commit("v1");
    let url = up.file_url();
    let m = Machine::new(root.path(), "");
    m.write_config_with(
        ANY_METRICS_PORT,
        &format!(
            "{}{}{}",
            service("app", &url, &["app"]),
            service("web", &url, &["web"]),
            service("db", &url, &["db"])
        ),
    );
    let socket = m.socket.clone();
    let d = m.spawn();
    let port = d.metrics_port();
    let series = |text: &str, prefix: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    };
    let app_hash = |h: &str| {
        format!("plumb_service_hash{{hash=\"{h}\",machine=\"testbox\",service=\"app\"}} 1")
    };
    wait_until("v1 in the metrics", DEADLINE, || {
        scrape(port).contains(&app_hash(&v1))
    });
    let text = scrape(port);
    assert!(
        text.contains("plumb_service_state{machine=\"testbox\",service=\"app\",state=\"OK\"} 1"),
        "{text}"
    );
    // The counters have their series before their first event: nothing was refused, and a
    // dashboard's `increase(plumb_apply_total[...])` has both results to show.
    for name in ["app", "web", "db"] {
        for line in [
            format!("plumb_refused_total{{reason=\"check\",service=\"{name}\"}} 0"),
            format!("plumb_refused_total{{reason=\"health\",service=\"{name}\"}} 0"),
            format!("plumb_apply_total{{result=\"ok\",service=\"{name}\"}} "),
            format!("plumb_apply_total{{result=\"error\",service=\"{name}\"}} "),
        ] {
            assert!(text.contains(&line), "{line} in\n{text}");
        }
    }
    assert!(
        text.contains("plumb_git_fetch_total{result=\"ok\""),
        "{text}"
    );
    assert!(text.contains("plumb_build_info{version="), "{text}");
    promtool_accepts(&text);

    let v2 = up.write("app/conf", "2").commit("v2");
    wait_until("v2 in the metrics", DEADLINE, || {
        scrape(port).contains(&app_hash(&v2))
    });
    let text = scrape(port);
    assert_eq!(
        series(&text, "plumb_service_hash{")
            .iter()
            .filter(|l| l.contains("service=\"app\""))
            .count(),
        1,
        "one hash series per service: {text}"
    );
    assert!(
        text.contains("plumb_service_behind_commits{service=\"app\"} 0"),
        "{text}"
    );

    // Frozen, a push: the service shows how far behind it is.
    curl(&socket, "POST", "/v1/services/app/freeze", Some("{}"));
    up.write("app/conf", "3").commit("v3");
    curl(&socket, "POST", "/v1/services/app/pull", None);
    let text = scrape(port);
    assert!(
        text.contains("plumb_service_frozen{service=\"app\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("plumb_service_behind_commits{service=\"app\"} 1"),
        "{text}"
    );
    assert!(text.contains(&app_hash(&v2)), "{text}");
    // The other services did not move: their hash is still v1's.
    for other in ["web", "db"] {
        let line = format!(
            "plumb_service_hash{{hash=\"{v1}\",machine=\"testbox\",service=\"{other}\"}} 1"
        );
        assert!(text.contains(&line), "{line}\n{text}");
    }
    let change_time = |text: &str| -> f64 {
        series(
            text,
            "plumb_service_change_timestamp_seconds{service=\"app\"}",
        )[0]
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
    };
    let before = change_time(&text);
    // Change times are whole seconds: let one pass so the next change must show a later one.
    wait_until("the next second", DEADLINE, || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            >= before + 1.0
    });

    // Unfrozen: it catches up, behind goes 1 -> 0, the hash moves and the change time advances.
    curl(&socket, "POST", "/v1/services/app/unfreeze", None);
    let answer = curl(&socket, "POST", "/v1/services/app/pull", None);
    let text = scrape(port);
    assert!(
        text.contains("plumb_service_behind_commits{service=\"app\"} 0"),
        "{answer}\n{text}"
    );
    assert!(
        text.contains("plumb_service_frozen{service=\"app\"} 0"),
        "{text}"
    );
    assert!(
        !text.contains(&app_hash(&v2)),
        "the old series is gone: {text}"
    );
    assert!(change_time(&text) > before, "{text}");
    promtool_accepts(&text);
}

/// POSTs a push webhook with `headers`; returns the HTTP status.
fn hook(port: u16, body: &str, headers: &[String]) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "--data-binary",
        body,
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}/v1/hooks/push"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// HMAC-SHA256 of `body` as GitHub signs it, computed by openssl, not by plumb's code.
fn github_signature(secret: &str, body: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&out.stdout);
    format!(
        "X-Hub-Signature-256: sha256={}",
        hex.split_whitespace().next().unwrap()
    )
}

#[test]
fn a_signed_push_webhook_fetches_now_and_a_bad_one_is_refused_and_counted() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "hooked");
    let v1 = up.write("app/conf", "1").commit("v1");
    let secret = "0123456789abcdef-test";
    let m = Machine::new(root.path(), "");
    // The secret in a file of its own (as a secrets manager writes it, with a newline), so the
    // config holds none.
    let secret_file = root.path().join("webhook-secret");
    fs::write(&secret_file, format!("{secret}\n")).unwrap();
    // An hour between polls: only the hook can bring v2 in time.
    m.write_config_with(
        &format!("interval = \"1h\"\n{ANY_METRICS_PORT}webhook_secret_file = {secret_file:?}\n"),
        &service("app", &up.file_url(), &["app"]),
    );
    let d = m.spawn();
    let port = d.metrics_port();
    wait_until("first deploy", DEADLINE, || {
        m.rev("app").as_deref() == Some(v1.as_str())
    });
    let v2 = up.write("app/conf", "2").commit("v2");
    let body = r#"{"ref":"refs/heads/main"}"#;
    // Before any hook, every result is there at 0.
    let text = scrape(port);
    for result in plumb::hook::RESULTS {
        let line = format!("plumb_webhook_total{{result=\"{result}\"}} 0");
        assert!(text.contains(&line), "{line} in\n{text}");
    }

    assert_eq!(hook(port, body, &[]), 401, "unsigned");
    // A body larger than the listener reads is refused unread, and counted.
    let large = root.path().join("large.json");
    fs::write(&large, vec![b' '; 3 << 20]).unwrap();
    let signed_large = github_signature(secret, "");
    assert_eq!(
        hook(port, &format!("@{}", large.display()), &[signed_large]),
        413,
        "too large"
    );
    let forged = github_signature("not-the-secret-at-all", body);
    assert_eq!(
        hook(port, body, &[forged]),
        401,
        "signed with another secret"
    );
    assert_eq!(m.rev("app").as_deref(), Some(v1.as_str()));

    let signed = github_signature(secret, body);
    let delivery = "X-GitHub-Delivery: 6d1f7c2e".to_owned();
    assert_eq!(hook(port, body, &[signed.clone(), delivery.clone()]), 202);
    wait_until("the hook's fetch to deploy v2", DEADLINE, || {
        m.rev("app").as_deref() == Some(v2.as_str())
    });
    assert_eq!(
        hook(port, body, &[signed.clone(), delivery]),
        409,
        "a replayed delivery"
    );

    // A burst: two pushes, each with its hook, well within a second. The second hook's fetch is
    // deferred to the end of the second, and brings the last push.
    up.write("app/conf", "3").commit("v3");
    assert_eq!(
        hook(
            port,
            body,
            &[signed.clone(), "X-GitHub-Delivery: b1".into()]
        ),
        202
    );
    let v4 = up.write("app/conf", "4").commit("v4");
    assert_eq!(
        hook(port, body, &[signed, "X-GitHub-Delivery: b2".into()]),
        202
    );
    wait_until("the burst's last push deployed", DEADLINE, || {
        m.rev("app").as_deref() == Some(v4.as_str())
    });
    let text = scrape(port);
    for result in ["ok", "deferred"] {
        let counted = format!("plumb_webhook_total{{result=\"{result}\"}}");
        assert!(text.contains(&counted), "{counted} in\n{text}");
    }
    for (result, n) in [
        ("unsigned", 1),
        ("bad_signature", 1),
        ("replayed", 1),
        ("too_large", 1),
    ] {
        let line = format!("plumb_webhook_total{{result=\"{result}\"}} {n}");
        assert!(text.contains(&line), "{line} in\n{text}");
    }
}

/// `service(...)` with more keys in its `[[services]]` table.
fn service_with(name: &str, upstream: &str, links: &[&str], keys: &str) -> String {
    format!("{}\n{keys}\n\n", service(name, upstream, links).trim_end())
}

/// The lines of a file, none when it does not exist.
fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn a_commit_failing_its_check_never_reaches_the_checkout_and_a_newer_one_does() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "checked");
    let log = root.path().join("checks.log");
    let v1 = up.write("app/app.conf", "mode good\n").commit("v1");
    let check = format!(
        "check = \"echo $PLUMB_REVISION >> {}; grep -q good {{dir}}/app.conf\"",
        log.display()
    );
    let m = Machine::new(
        root.path(),
        &service_with("app", &up.file_url(), &["app"], &check),
    );
    m.once(true);
    assert_eq!(m.rev("app").as_deref(), Some(v1.as_str()));
    assert_eq!(lines(&log), vec![v1.clone()]);

    // A bad revision: refused, the files and the hand-over file stay as they were.
    let v2 = up.write("app/app.conf", "mode bad\n").commit("v2");
    let out = m.once(false);
    assert_eq!(m.rev("app").as_deref(), Some(v1.as_str()));
    assert_eq!(m.read("app", "app/app.conf").unwrap(), "mode good\n");
    let s = m.state_json("app");
    assert_eq!(s["state"], "BROKEN");
    let info = s["info"].as_str().unwrap();
    assert!(
        info.starts_with(&format!(
            "check of {} failed, files not changed:",
            &v2[..12]
        )) && info.contains("exit status 1"),
        "{info}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!m.state.join("staging").join("app").exists());

    // Neither the same head nor a commit elsewhere runs the check again.
    m.once(false);
    up.write("other/readme", "x").commit("elsewhere");
    m.once(false);
    assert_eq!(lines(&log), vec![v1.clone(), v2.clone()]);
    assert_eq!(m.state_json("app")["state"], "BROKEN");

    // A newer commit of the service's files is checked and deployed.
    let v4 = up.write("app/app.conf", "mode good again\n").commit("v4");
    m.once(true);
    assert_eq!(m.rev("app").as_deref(), Some(v4.as_str()));
    assert_eq!(m.read("app", "app/app.conf").unwrap(), "mode good again\n");
    assert_eq!(lines(&log), vec![v1, v2, v4]);
    assert_eq!(m.state_json("app")["state"], "OK");
}

/// An ed25519 key made by `ssh-keygen` under `dir`, and an allowed-signers file trusting it.
fn signing_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(name);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let public = fs::read_to_string(key.with_extension("pub")).unwrap();
    let allowed = dir.join(format!("{name}.allowed"));
    fs::write(&allowed, format!("{name}@example.invalid {public}")).unwrap();
    (key, allowed)
}

#[test]
fn only_heads_signed_by_a_trusted_key_are_deployed() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "signed");
    let (key, allowed) = signing_key(root.path(), "alice");
    let (mallory, _) = signing_key(root.path(), "mallory");
    let sign = |key: &Path, file: &str, msg: &str| {
        up.write("app/conf", file);
        let signingkey = format!("user.signingkey={}", key.display());
        up.commit_with(&["gpg.format=ssh", &signingkey], &["-S"], msg)
    };
    let v1 = sign(&key, "1", "v1");
    let m = Machine::new(root.path(), "");
    m.write_config_with(
        &format!(
            "\n[[plumb.upstream]]\nurl = \"{}\"\nallowed_signers = {:?}\n",
            up.file_url(),
            allowed
        ),
        &service("app", &up.file_url(), &["app"]),
    );
    m.once(true);
    assert_eq!(m.rev("app").as_deref(), Some(v1.as_str()));

    // Unsigned, then signed by an untrusted key: neither is deployed, and the state says why.
    let v2 = up.write("app/conf", "2").commit("v2 unsigned");
    m.once(false);
    let s = m.state_json("app");
    assert_eq!(s["state"], "DIFF");
    assert_eq!(
        s["info"],
        format!(
            "refused {0}: commit {0}: not signed; keeping revision {1}",
            &v2[..12],
            &v1[..12]
        )
    );
    let v3 = sign(&mallory, "3", "v3 by mallory");
    m.once(false);
    let info = m.state_json("app")["info"].as_str().unwrap().to_owned();
    assert!(
        info.starts_with(&format!("refused {}: commit {}", &v3[..12], &v3[..12])),
        "{info}"
    );
    assert_eq!(m.rev("app").as_deref(), Some(v1.as_str()));
    assert_eq!(m.read("app", "app/conf").unwrap(), "1");

    // A trusted signature on top deploys (the head is what is verified).
    let v4 = sign(&key, "4", "v4");
    m.once(true);
    assert_eq!(m.rev("app").as_deref(), Some(v4.as_str()));
    assert_eq!(m.read("app", "app/conf").unwrap(), "4");
}

#[test]
fn a_refused_force_push_holds_the_service_until_pull_force() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "rewritten");
    let v1 = up.write("app/a", "1").commit("v1");
    let v2 = up.write("app/a", "2").commit("v2");
    let m = Machine::new(root.path(), "");
    m.write_config_with(
        &format!(
            "\n[[plumb.upstream]]\nurl = \"{}\"\nforce_push = \"refuse\"\n",
            up.file_url()
        ),
        &service("app", &up.file_url(), &["app"]),
    );
    let socket = m.socket.clone();
    let d = m.spawn();
    wait_until("the first deploy", DEADLINE, || {
        m.rev("app").as_deref() == Some(v2.as_str())
    });
    // Fast-forwards are followed as always.
    let v3 = up.write("app/a", "3").commit("v3");
    wait_until("a fast-forward", DEADLINE, || {
        m.rev("app").as_deref() == Some(v3.as_str())
    });

    up.force_reset(&v1);
    let v4 = up.write("app/a", "4").commit("v4 on rewritten history");
    wait_until("the rewrite to be refused", DEADLINE, || {
        m.state_json("app")["state"] == "DIFF"
    });
    let info = m.state_json("app")["info"].as_str().unwrap().to_owned();
    assert_eq!(
        info,
        format!(
            "history rewritten upstream: {} does not descend from the deployed {}; plumbctl pull --force accepts the new history",
            &v4[..12],
            &v3[..12]
        )
    );
    assert_eq!(m.read("app", "app/a").unwrap(), "3");

    let pulled: serde_json::Value = serde_json::from_str(&curl(
        &socket,
        "POST",
        "/v1/services/app/pull",
        Some("{\"force\": true}"),
    ))
    .unwrap();
    assert_eq!(pulled["status"]["state"], "OK", "{pulled}");
    assert_eq!(m.rev("app").as_deref(), Some(v4.as_str()));
    assert_eq!(m.read("app", "app/a").unwrap(), "4");
    drop(d);
}

#[test]
fn a_hostile_revision_is_refused_whole_and_the_next_clean_one_deploys() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "hostile");
    let v1 = up.write("app/conf", "1").commit("v1");
    let m = Machine::new(root.path(), "");
    m.write_config_with(
        "max_file_size = \"1KiB\"\n",
        &service("app", &up.file_url(), &["app"]),
    );
    m.once(true);

    // A symlink out of the service's files, beside an innocent change: nothing of it lands.
    let v2 = up
        .write("app/conf", "2")
        .symlink("app/shadow", "../../etc/shadow")
        .commit("v2");
    m.once(false);
    let s = m.state_json("app");
    assert_eq!(s["state"], "BROKEN");
    let info = s["info"].as_str().unwrap();
    assert!(
        info.starts_with(&format!("refused {}: ", &v2[..12]))
            && info.contains("app/shadow: symlink to \"../../etc/shadow\" leaves app"),
        "{info}"
    );
    assert_eq!(m.rev("app").as_deref(), Some(v1.as_str()));
    assert_eq!(tree(&m.checkout("app")), vec!["app/conf"]);
    assert_eq!(m.read("app", "app/conf").unwrap(), "1");

    // A file over max_file_size: refused the same way.
    let v3 = up
        .remove("app/shadow")
        .write("app/big", &"x".repeat(2048))
        .commit("v3");
    m.once(false);
    let info = m.state_json("app")["info"].as_str().unwrap().to_owned();
    assert!(
        info.starts_with(&format!("refused {}: ", &v3[..12]))
            && info.contains(
                "app/big: file of 2048 bytes (2 KiB) is larger than max_file_size (1 KiB)"
            ),
        "{info}"
    );
    assert_eq!(m.read("app", "app/conf").unwrap(), "1");

    let v4 = up.remove("app/big").write("app/conf", "4").commit("v4");
    m.once(true);
    assert_eq!(m.rev("app").as_deref(), Some(v4.as_str()));
    assert_eq!(tree(&m.checkout("app")), vec!["app/conf"]);

    // A tree written by hand: beside the directory `app`, a root entry named `app/pwn` (a
    // symlink to /etc/shadow) that a checkout of `app` would take as `app/pwn`.
    let app = support::git(&up.bare, &["rev-parse", &format!("{v4}:app")]);
    let shadow = up.write_literally("blob", b"/etc/shadow");
    let crafted = up.raw_tree(&[("40000", b"app", &app), ("120000", b"app/pwn", &shadow)]);
    let v5 = up.commit_tree(&crafted, &v4, "crafted");
    m.once(false);
    let s = m.state_json("app");
    assert_eq!(s["state"], "BROKEN");
    let info = s["info"].as_str().unwrap();
    assert!(
        info.starts_with(&format!("refused {}: ", &v5[..12]))
            && info.contains("app/pwn: tree entry \"app/pwn\" could be taken for app"),
        "{info}"
    );
    assert_eq!(tree(&m.checkout("app")), vec!["app/conf"]);
    assert_eq!(m.rev("app").as_deref(), Some(v4.as_str()));
}

#[test]
fn deployed_files_belong_to_the_services_user() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "owned");
    up.write("app/conf", "1")
        .write("app/sub/x", "x")
        .commit("v1");
    let m = Machine::new(
        root.path(),
        &service_with("app", &up.file_url(), &["app"], "user = \"nobody\""),
    );
    m.once(true);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    for path in ["app", "app/conf", "app/sub", "app/sub/x"] {
        let meta = fs::metadata(m.checkout("app").join(path)).unwrap();
        assert_eq!(meta.uid(), nobody.uid.as_raw(), "{path}");
    }
    // A user that does not exist: the deploy fails (BROKEN), naming the user.
    up.write("app/conf", "2").commit("v2");
    m.write_config(&service_with(
        "app",
        &up.file_url(),
        &["app"],
        "user = \"plumb-nosuchuser\"",
    ));
    m.once(false);
    let info = m.state_json("app")["info"].as_str().unwrap().to_owned();
    assert!(
        info.contains("user \"plumb-nosuchuser\": no such user"),
        "{info}"
    );
}

#[test]
fn bootstrap_takes_the_config_from_git_keeps_state_and_refuses_a_bad_one() {
    require_root();
    let root = temp_root();
    let http = HttpServer::start(root.path());
    let up = Upstream::new(root.path(), "ops");
    let url = http.url(&up);
    // No local config at all: the machine has only the bootstrap URL.
    let m = Machine {
        config: root.path().join("etc/plumb/plumb.toml"),
        ..Machine::at(root.path())
    };
    let socket = m.socket.clone();
    let settings = format!(
        "[plumb]\nstate_dir = {:?}\ninterval = \"1s\"\nmetrics_address = \"\"\n\n",
        m.state
    );
    let first = format!("{settings}{}", service("app", &url, &["app"]));
    up.write("plumb/plumb.toml", &first)
        .write("app/conf", "v1")
        .write("web/index", "w1")
        .commit("ops");
    let mut argv = m.args();
    argv.extend(["--bootstrap".to_owned(), url.clone(), "--socket".to_owned()]);
    argv.push(socket.display().to_string());
    // The state directory must be known before any config is.
    argv.extend(["--state-dir".to_owned(), m.state.display().to_string()]);
    // Not the default port (every address, 9222): another daemon may hold it.
    argv.extend(["--metrics-address".to_owned(), "127.0.0.1:0".to_owned()]);
    let _daemon = m.spawn_with(&argv);
    wait_until("the config from git installed", DEADLINE, || {
        fs::read_to_string(&m.config).is_ok_and(|t| t == first)
    });
    wait_until("app deployed", DEADLINE, || {
        m.read("app", "app/conf").as_deref() == Some("v1")
    });
    assert_eq!(m.state_json("plumb")["state"], "OK");
    // The metrics listener was bound with the defaults: the operator is told to restart.
    wait_until("a warning about settings read at start", DEADLINE, || {
        m.log_text()
            .lines()
            .any(|l| l.contains("next restart") && l.contains("metrics_address"))
    });
    assert_eq!(
        fs::metadata(&m.config).unwrap().mode() & 0o777,
        0o640,
        "the installed config may hold secrets"
    );

    // A commit that adds a service and changes app's files while app is frozen: the new service
    // arrives, and app's freeze (persisted state) outlives the config change.
    curl(&socket, "POST", "/v1/services/app/freeze", Some("{}"));
    let second = format!(
        "{first}{}",
        service("web", &url, &["web"]).replace("[[services]]", "[[services]]\naction = \"none\"")
    );
    up.write("plumb/plumb.toml", &second)
        .write("app/conf", "v2")
        .commit("add web");
    wait_until("web deployed from the new config", DEADLINE, || {
        m.read("web", "web/index").as_deref() == Some("w1")
    });
    assert_eq!(fs::read_to_string(&m.config).unwrap(), second);
    let app = m.state_json("app");
    assert_eq!(app["state"], "FREEZE", "{app}");
    assert_eq!(m.read("app", "app/conf").as_deref(), Some("v1"));

    // A bad config in git is refused before it reaches the machine; the running one keeps going.
    up.write(
        "plumb/plumb.toml",
        &format!("{second}[[services]]\nservice = 3\n"),
    )
    .commit("broken config");
    wait_until("plumb refusing its new config", DEADLINE, || {
        m.state_json("plumb")["state"] == "BROKEN"
    });
    let info = m.state_json("plumb")["info"].to_string();
    assert!(info.contains("plumb.toml"), "{info}");
    assert_eq!(fs::read_to_string(&m.config).unwrap(), second);
    up.write("web/index", "w2").commit("web moves on");
    wait_until("web deployed under the kept config", DEADLINE, || {
        m.read("web", "web/index").as_deref() == Some("w2")
    });

    // Fixed in git: installed, and plumb is OK again.
    up.write(
        "plumb/plumb.toml",
        &second.replace("interval = \"1s\"", "interval = \"2s\""),
    )
    .commit("fix config");
    wait_until("the fixed config installed", DEADLINE, || {
        fs::read_to_string(&m.config).is_ok_and(|t| t.contains("interval = \"2s\""))
    });
    wait_until("plumb OK again", DEADLINE, || {
        m.state_json("plumb")["state"] == "OK"
    });
}

/// A pull asked for while a fetch of the same upstream runs (which may have read the heads before
/// the push that asked) waits for a fetch that starts after it, and that fetch starts at once.
#[test]
fn a_pull_during_a_running_fetch_gets_a_fetch_of_its_own() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "busy");
    let v1 = up.write("app/conf", "1").commit("v1");
    let hold = root.path().join("hold");
    let m = Machine::new(root.path(), "");
    // The check holds the upstream's cycle while the file `hold` exists.
    m.write_config_with(
        "interval = \"1h\"\n",
        &service("app", &up.file_url(), &["app"]).replace(
            "dirs =",
            &format!(
                "check = \"while [ -e {} ]; do sleep 0.02; done\"\ndirs =",
                hold.display()
            ),
        ),
    );
    let log = m.log.clone();
    let _d = m.spawn();
    let socket = m.socket.clone();
    wait_until("first deploy", DEADLINE, || {
        m.rev("app").as_deref() == Some(v1.as_str())
    });

    fs::write(&hold, "").unwrap();
    let v2 = up.write("app/conf", "2").commit("v2");
    let first = {
        let socket = socket.clone();
        std::thread::spawn(move || curl(&socket, "POST", "/v1/services/app/pull", None))
    };
    wait_until("v2's check holding the cycle", DEADLINE, || {
        fs::read_dir(m.state.join("staging")).is_ok_and(|mut d| d.next().is_some())
    });
    let v3 = up.write("app/conf", "3").commit("v3");
    let second = {
        let socket = socket.clone();
        std::thread::spawn(move || curl(&socket, "POST", "/v1/services/app/pull", None))
    };
    wait_until(
        "the second pull queued behind the running fetch",
        DEADLINE,
        || fs::read_to_string(&log).is_ok_and(|l| l.contains("pull: after the fetch running now")),
    );
    fs::remove_file(&hold).unwrap();
    first.join().unwrap();
    assert!(m.rev("app") == Some(v2.clone()) || m.rev("app") == Some(v3.clone()));
    second.join().unwrap();
    assert_eq!(
        m.rev("app").as_deref(),
        Some(v3.as_str()),
        "the second pull answered with the commit pushed before it"
    );
}

/// A hook whose payload names one repository fetches that upstream only; one naming none of the
/// upstreams (a mirror, another name for the host) fetches them all.
#[test]
fn a_push_webhook_fetches_the_upstream_its_payload_names() {
    let root = temp_root();
    let alpha = Upstream::new(root.path(), "alpha");
    let beta = Upstream::new(root.path(), "beta");
    alpha.write("app/conf", "1").commit("a1");
    let b1 = beta.write("web/conf", "1").commit("b1");
    let secret = "0123456789abcdef-test";
    let m = Machine::new(root.path(), "");
    m.write_config_with(
        &format!("interval = \"1h\"\n{ANY_METRICS_PORT}webhook_secret = \"{secret}\"\n"),
        &format!(
            "{}{}",
            service("app", &alpha.file_url(), &["app"]),
            service("web", &beta.file_url(), &["web"])
        ),
    );
    let d = m.spawn();
    let port = d.metrics_port();
    wait_until("first deploys", DEADLINE, || {
        m.rev("app").is_some() && m.rev("web").is_some()
    });
    let send = |repository: &str, delivery: &str| {
        let body =
            format!(r#"{{"ref":"refs/heads/main","repository":{{"clone_url":"{repository}"}}}}"#);
        let headers = [
            github_signature(secret, &body),
            format!("X-GitHub-Delivery: {delivery}"),
        ];
        assert_eq!(hook(port, &body, &headers), 202);
    };
    let fetches = |up: &Upstream| {
        let line = format!(
            "plumb_git_fetch_total{{result=\"ok\",upstream=\"{}\"}} ",
            up.file_url()
        );
        scrape(port)
            .lines()
            .find_map(|l| l.strip_prefix(&line).map(|n| n.parse::<u64>().unwrap()))
            .unwrap_or(0)
    };

    let a2 = alpha.write("app/conf", "2").commit("a2");
    beta.write("web/conf", "2").commit("b2");
    // The payload names alpha by another of its URLs' spellings.
    let alpha_url = format!("{}/", alpha.file_url());
    send(&alpha_url, "h1");
    wait_until("alpha's push deployed", DEADLINE, || {
        m.rev("app").as_deref() == Some(a2.as_str())
    });
    // A second hook for alpha, after which any fetch of beta the first one started is done too.
    let a3 = alpha.write("app/conf", "3").commit("a3");
    send(&alpha_url, "h2");
    wait_until("alpha's second push deployed", DEADLINE, || {
        m.rev("app").as_deref() == Some(a3.as_str())
    });
    assert_eq!(fetches(&beta), 1, "beta fetched only at start");
    assert_eq!(m.rev("web").as_deref(), Some(b1.as_str()));

    send("https://mirror.example.invalid/elsewhere.git", "h3");
    wait_until(
        "beta fetched by a hook naming no upstream",
        DEADLINE,
        || fetches(&beta) == 2,
    );
}

/// `plumb --once --bootstrap`: one run takes the config from git and deploys the services it
/// names, including those on the bootstrap repository itself, already fetched once in that run.
#[test]
fn a_one_shot_bootstrap_deploys_what_the_new_config_names() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "ops");
    let m = Machine {
        config: root.path().join("etc/plumb.toml"),
        ..Machine::at(root.path())
    };
    let config = format!(
        "[plumb]\nstate_dir = {:?}\ninterval = \"1h\"\nmetrics_address = \"\"\n\n{}",
        m.state,
        service("app", &up.file_url(), &["app"])
    );
    let head = up
        .write("plumb/plumb.toml", &config)
        .write("app/conf", "v1")
        .commit("ops");
    let out = Command::new(env!("CARGO_BIN_EXE_plumb"))
        .arg("-c")
        .arg(&m.config)
        .args([
            "--hosts",
            "testbox",
            "--once",
            "--bootstrap",
            &up.file_url(),
        ])
        .arg("--state-dir")
        .arg(&m.state)
        .arg("--socket")
        .arg(&m.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read_to_string(&m.config).unwrap(), config);
    assert_eq!(m.rev("app").as_deref(), Some(head.as_str()), "{stdout}");
    assert_eq!(m.read("app", "app/conf").as_deref(), Some("v1"));
}

#[test]
fn noop_judges_and_reports_what_it_would_deploy_and_touches_nothing_until_turned_off() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "noop");
    let v1 = up
        .write("app/conf", "1")
        .write("app/more", "1")
        .commit("v1");
    let checks = root.path().join("checks.log");
    let config = |noop: bool| {
        service("app", &up.file_url(), &["app"]).replace(
            "dirs = [",
            &format!(
                "noop = {noop}\ncheck = \"test -f $PLUMB_DIR/conf && echo $PLUMB_REVISION >> {}\"\ndirs = [",
                checks.display()
            ),
        )
    };
    let m = Machine::new(root.path(), &config(false));

    // `plumb --once --noop` over a config without noop: the head is judged (its check runs on a
    // staged copy), and nothing of the service is written.
    let out = m.command().args(["--once", "--noop"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "noop: would deploy {}, 2 files changed",
            &v1[..12]
        )),
        "{stdout}"
    );
    assert_eq!(lines(&checks), std::slice::from_ref(&v1));
    assert!(!m.checkout("app").exists(), "no checkout in noop");
    assert_eq!(m.rev("app"), None, "no .rev in noop");

    // The daemon with `noop = true` in the config: status says what it would deploy.
    let metrics = ANY_METRICS_PORT;
    m.write_config_with(metrics, &config(true));
    let socket = m.socket.clone();
    let d = m.spawn();
    let port = d.metrics_port();
    let status = || -> serde_json::Value {
        serde_json::from_str(&curl(&socket, "GET", "/v1/services/app", None)).unwrap()
    };
    wait_until("the API socket", DEADLINE, || socket.exists());
    let would = |v: &str| {
        format!(
            "noop: would deploy {}: 2 files changed, check passed",
            &v[..12]
        )
    };
    wait_until("a report of what noop would deploy", DEADLINE, || {
        status()["notes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n.as_str() == Some(would(&v1).as_str())))
    });
    let v2 = up
        .write("app/conf", "2")
        .write("app/more", "2")
        .commit("v2");
    wait_until("the report to follow the new head", DEADLINE, || {
        status()["notes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n.as_str() == Some(would(&v2).as_str())))
    });
    assert_eq!(status()["state"], "OK");
    assert_eq!(status()["deployed"], serde_json::Value::Null);
    let refused = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&socket)
        .args(["-X", "POST", "http://plumb/v1/services/app/wipe"])
        .output()
        .unwrap();
    let refused = String::from_utf8_lossy(&refused.stdout);
    assert!(refused.contains("noop mode"), "{refused}");
    assert!(!m.checkout("app").exists() && m.rev("app").is_none());
    // Each head was judged once, however many polls passed.
    let judged = lines(&checks);
    assert_eq!(judged.iter().filter(|l| **l == v2).count(), 1, "{judged:?}");

    // noop off and SIGHUP: what was pending is deployed.
    m.write_config_with(metrics, &config(false));
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("v2 deployed once noop is off", DEADLINE, || {
        m.rev("app").as_deref() == Some(v2.as_str())
    });
    assert_eq!(m.read("app", "app/conf").as_deref(), Some("2"));
    let notes = status()["notes"].clone();
    assert_eq!(notes, serde_json::json!([]), "{notes}");

    // noop on again, and a commit arrives: what waits shows in the metrics, and a rollback is
    // refused like a wipe.
    m.write_config_with(metrics, &config(true));
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let v3 = up.write("app/conf", "3").commit("v3");
    // The fetch counts the change (metrics), then the preview judges it (notes): both in turn.
    wait_until(
        "noop and one change waiting in the metrics and the notes",
        DEADLINE,
        || {
            let text = scrape(port);
            text.contains("plumb_service_noop{service=\"app\"} 1")
                && text.contains("plumb_service_behind_commits{service=\"app\"} 1")
                && status()["notes"].as_array().is_some_and(|n| {
                    n.iter().any(|n| {
                        n.as_str().is_some_and(|n| {
                            n.starts_with(&format!("noop: would deploy {}", &v3[..12]))
                        })
                    })
                })
        },
    );
    let rollback = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&socket)
        .args(["-H", "content-type: application/json"])
        .args(["-d", &format!("{{\"revision\":\"{v1}\"}}")])
        .args(["-X", "POST", "http://plumb/v1/services/app/rollback"])
        .output()
        .unwrap();
    let rollback = String::from_utf8_lossy(&rollback.stdout);
    assert!(rollback.contains("noop mode"), "{rollback}");
    assert_eq!(m.rev("app").as_deref(), Some(v2.as_str()));
}

#[test]
fn a_deploy_that_does_not_fit_leaves_the_last_revision_whole_and_the_next_one_deploys() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "small");
    let v1 = up
        .write("app/a", "a1\n")
        .write("app/b", "b1\n")
        .commit("v1");
    let mount = root.path().join("mnt");
    let _tmpfs = Tmpfs::mount(&mount, "1m");
    let m = Machine::new(
        root.path(),
        &service("app", &up.file_url(), &["app"]).replace(
            "dirs = [",
            &format!("mount = \"{}\"\ndirs = [", mount.display()),
        ),
    );
    m.once(true);
    let live = mount.join("app/app");
    assert_eq!(fs::read_to_string(live.join("a")).unwrap(), "a1\n");

    // a and b change, and c (2 MB) does not fit on the checkout's 1 MB file system.
    up.write("app/a", "a2\n")
        .write("app/b", "b2\n")
        .write("app/c", &"x".repeat(2 << 20))
        .commit("v2, too big");
    let out = m.once(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("BROKEN"), "{stdout}");
    assert_eq!(m.state_json("app")["state"], "BROKEN");
    assert_eq!(fs::read_to_string(live.join("a")).unwrap(), "a1\n");
    assert_eq!(fs::read_to_string(live.join("b")).unwrap(), "b1\n");
    assert!(!live.join("c").exists(), "no truncated c");
    assert_eq!(
        tree(&mount),
        ["app/app/a", "app/app/b"],
        "nothing left beside it"
    );
    assert_eq!(m.rev("app").as_deref(), Some(v1.as_str()));

    // Tried again at the next poll (still too big), then a revision that fits deploys.
    m.once(false);
    assert_eq!(fs::read_to_string(live.join("a")).unwrap(), "a1\n");
    let v3 = up.remove("app/c").write("app/a", "a3\n").commit("v3");
    m.once(true);
    assert_eq!(m.rev("app").as_deref(), Some(v3.as_str()));
    assert_eq!(tree(&live), ["a", "b"]);
    assert_eq!(fs::read_to_string(live.join("a")).unwrap(), "a3\n");
    assert_eq!(fs::read_to_string(live.join("b")).unwrap(), "b2\n");
}

/// The command line's poll interval obeys the config's rule: `--interval 0s` would poll in a busy
/// loop, so it is refused before anything starts, as `interval = "0s"` in the config is.
#[test]
fn a_zero_interval_on_the_command_line_is_refused() {
    let root = temp_root();
    let m = Machine::new(root.path(), "");
    m.write_config("");
    let out = m
        .command()
        .args(["--once", "--interval", "0s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--interval") && stderr.contains("must be more than 0s"),
        "{stderr}"
    );
    m.write_config_with("interval = \"0s\"\n", "");
    let out = m.command().arg("--once").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plumb.interval: must be more than 0s"),
        "{stderr}"
    );
}

/// A config that cannot be read: every command says what it was doing and why, each once.
#[test]
fn an_unreadable_config_is_reported_with_its_cause_once() {
    let root = temp_root();
    // A directory where the file should be: reading it fails with EISDIR, as root too.
    let config = root.path().join("plumb.toml");
    fs::create_dir(&config).unwrap();
    let state = root.path().join("state");
    let runs: [&[&str]; 2] = [&["--once"], &["apply", "web"]];
    for args in runs {
        let out = Command::new(env!("CARGO_BIN_EXE_plumb"))
            .arg("-c")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().last().unwrap_or_default();
        assert!(
            line.ends_with(&format!(
                "{}: cannot read: Is a directory (os error 21)",
                config.display()
            )),
            "{args:?}: {stderr}"
        );
        assert_eq!(line.matches("Is a directory").count(), 1, "{line}");
    }
}

/// Raises this process's soft limit on open files to what a flood of `n` connections needs.
fn allow_open_files(n: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < n {
        assert!(
            hard >= n,
            "the hard limit on open files ({hard}) is under {n}"
        );
        setrlimit(Resource::RLIMIT_NOFILE, n, hard).unwrap();
    }
}

/// 1,100 TCP connections and 200 on the control socket, each holding half a request, take no
/// more than their places: a push is still deployed at the next poll, the daemon closes the
/// half-open connections after the header timeout, and `/metrics` answers once they are gone.
#[test]
fn slow_clients_cannot_starve_the_daemon() {
    use std::io::{Read, Write};
    require_root();
    allow_open_files(4096);
    let root = temp_root();
    let up = Upstream::new(root.path(), "flooded");
    up.write("app/conf", "1").commit("v1");
    let m = Machine::new(root.path(), "");
    m.write_config_with(ANY_METRICS_PORT, &service("app", &up.file_url(), &["app"]));
    let d = m.spawn();
    let port = d.metrics_port();
    wait_until("/metrics answers", DEADLINE, || {
        scrape(port).contains("plumb_service_state")
    });
    // The daemon raised its limit on open files (as far as the hard limit lets it).
    let limits = fs::read_to_string(format!("/proc/{}/limits", d.0.id())).unwrap();
    let open_files: Vec<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (soft, hard) = (open_files[0], open_files[1]);
    assert_eq!(soft, hard.min(plumb::listener::WANTED_FDS), "{limits}");

    let partial = b"GET /metrics HTTP/1.1\r\nHost: plumb\r\nX-Slow: ";
    let mut held_tcp = Vec::new();
    for _ in 0..1100 {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        // A connection the daemon closed at once (over the cap) may refuse the write.
        let _ = s.write_all(partial);
        held_tcp.push(s);
    }
    let socket = m.socket.clone();
    let mut held_unix = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&socket) {
            let _ = s.write_all(partial);
            held_unix.push(s);
        }
    }
    assert!(held_tcp.len() > 1000, "{} connections made", held_tcp.len());

    let v2 = up.write("app/conf", "2").commit("v2");
    wait_until(
        "v2 deployed while the connections are held",
        DEADLINE,
        || m.rev("app").as_deref() == Some(v2.as_str()),
    );
    assert_eq!(m.read("app", "app/conf").as_deref(), Some("2"));

    // Every held connection is closed by the daemon: a read ends (EOF or reset) instead of
    // waiting for the answer forever.
    let n = held_tcp.len();
    for s in held_tcp
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| *i < 64 || *i >= n - 8)
        .map(|(_, s)| s)
    {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) => assert!(n == 0 || buf.starts_with(b"HTTP/1.1 408"), "read {n} bytes"),
            Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "still open"),
        }
    }
    for s in held_unix.iter_mut().take(64) {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = [0u8; 64];
        if let Err(e) = s.read(&mut buf) {
            assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "still open");
        }
    }
    drop((held_tcp, held_unix));
    wait_until("/metrics answers again", DEADLINE, || {
        scrape(port).contains(&format!("hash=\"{v2}\""))
    });
}

/// A config with a typo is refused on SIGHUP without losing anything, and the refusal is where an
/// operator looks: the journal, every service's notes, `plumb_config_last_reload_successful`. The
/// generator's fallback, `plumb.toml.accepted`, keeps the last good config.
#[test]
fn a_refused_config_is_visible_and_the_last_accepted_one_is_kept() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "typo");
    let v1 = up.write("app/conf", "1").commit("v1");
    let m = Machine::new(root.path(), "");
    m.write_config_with(ANY_METRICS_PORT, &service("app", &up.file_url(), &["app"]));
    let good = fs::read_to_string(&m.config).unwrap();
    let accepted = plumb::config::accepted_path(&m.config);
    let socket = m.socket.clone();
    let d = m.spawn();
    let port = d.metrics_port();
    wait_until("first deploy", DEADLINE, || {
        m.rev("app").as_deref() == Some(v1.as_str())
    });
    assert_eq!(fs::read_to_string(&accepted).unwrap(), good);
    assert_eq!(fs::metadata(&accepted).unwrap().mode() & 0o777, 0o640);
    let reloaded = |ok: u8| format!("plumb_config_last_reload_successful {ok}");
    assert!(scrape(port).contains(&reloaded(1)));

    fs::write(
        &m.config,
        format!("{good}\n[[services]]\nservice = \"b\"\nupstrem = \"x\"\n"),
    )
    .unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the refusal in the metrics", DEADLINE, || {
        scrape(port).contains(&reloaded(0))
    });
    let status: serde_json::Value =
        serde_json::from_str(&curl(&socket, "GET", "/v1/services/app", None)).unwrap();
    let notes = status["notes"].to_string();
    assert!(
        notes.contains("config refused, running on the last accepted one: ")
            && notes.contains("unknown field `upstrem`"),
        "{notes}"
    );
    assert_eq!(status["state"], "OK");
    assert_eq!(
        fs::read_to_string(&accepted).unwrap(),
        good,
        "the accepted copy stays"
    );
    // Still serving and deploying on the running config.
    let v2 = up.write("app/conf", "2").commit("v2");
    wait_until("v2 deployed on the running config", DEADLINE, || {
        m.rev("app").as_deref() == Some(v2.as_str())
    });

    fs::write(&m.config, &good).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the config accepted again", DEADLINE, || {
        scrape(port).contains(&reloaded(1))
    });
    let status = curl(&socket, "GET", "/v1/services/app", None);
    assert!(!status.contains("config refused"), "{status}");
}

#[test]
fn an_https_upstream_is_checked_against_the_system_ca_roots() {
    require_root();
    let root = temp_root();
    let https = HttpServer::start_tls(root.path());
    let up = Upstream::new(root.path(), "tls");
    let head = up.write("web/index.html", "over tls").commit("v1");
    let m = Machine::new(root.path(), &service("web", &https.url(&up), &["web"]));

    // The test CA is no root of the system's: refused, and nothing deployed.
    let out = m
        .command()
        .arg("--once")
        .env_remove("SSL_CERT_FILE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("fetch {}: ", https.url(&up))) && stdout.contains("certificate"),
        "{stdout}"
    );
    assert_eq!(m.rev("web"), None);

    // With the CA among the roots (SSL_CERT_FILE, as OpenSSL-based tools read it): fetched.
    let out = m
        .command()
        .arg("--once")
        .env("SSL_CERT_FILE", https.ca.as_ref().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(m.rev("web").as_deref(), Some(head.as_str()));
    let requests = https.requests();
    assert!(
        requests.iter().all(|r| r.ends_with(&format!(
            "\"git/2.0 (plumb {})\"",
            env!("CARGO_PKG_VERSION")
        ))),
        "{requests:#?}"
    );
}

#[test]
fn a_commit_for_one_service_rewrites_only_that_services_files() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "many");
    up.write("a/conf", "1").write("b/conf", "1").commit("v1");
    let m = Machine::new(
        root.path(),
        &format!(
            "{}{}",
            service("a", &up.file_url(), &["a"]),
            service("b", &up.file_url(), &["b"])
        ),
    );
    m.once(true);
    let inode = |name: &str| {
        fs::metadata(m.state.join("state").join(name))
            .unwrap()
            .ino()
    };
    let before = (inode("a.json"), inode("b.json"), inode("b.rev"));

    let v2 = up.write("a/conf", "2").commit("v2: a only");
    m.once(true);
    assert_eq!(m.rev("a").as_deref(), Some(v2.as_str()));
    // Each write is a rename of a new file: b's files kept their inodes, a's did not.
    assert_ne!(inode("a.json"), before.0);
    assert_eq!((inode("b.json"), inode("b.rev")), (before.1, before.2));
}

#[test]
fn an_http_upstream_is_fetched_through_the_proxy_the_environment_names() {
    require_root();
    let root = temp_root();
    let http = HttpServer::start(root.path());
    let up = Upstream::new(root.path(), "proxied");
    let head = up.write("web/index.html", "via proxy").commit("v1");
    // The relay is an HTTP proxy that tunnels every CONNECT to lighttpd: only a fetch through the
    // proxy goes through it.
    let proxy = Relay::start(http.port, Relaying::Connect);
    let m = Machine::new(root.path(), &service("web", &http.url(&up), &["web"]));
    let out = m
        .command()
        .arg("--once")
        .env("http_proxy", format!("http://127.0.0.1:{}", proxy.port))
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(m.rev("web").as_deref(), Some(head.as_str()));
    assert!(proxy.connections() >= 1, "the fetch did not use the proxy");
}

/// root's own git setup (`~/.gitconfig`, `~/.config/git/ignore`) is not plumb's: a global ignore
/// that covers a stray or `core.fileMode = false` does not hide a local edit from the drift check,
/// and a conversion an attributes file asks for (here the tree's `.gitattributes`, as
/// `/etc/gitattributes` could) neither hides one nor makes one up. Files are compared as the
/// checkout wrote them: git's blobs, byte for byte.
#[test]
fn the_machines_own_git_config_does_not_hide_local_edits() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "ops");
    // A blob with CRLF line ends, committed before the attributes that would normalise it.
    up.write("app/dos.ini", "a\r\nb\r\n")
        .age("app/dos.ini")
        .commit("v0");
    up.write("app/conf", "1\n")
        .write("app/.gitattributes", "* text\n")
        .commit("v1");
    let home = root.path().join("home");
    fs::create_dir_all(home.join(".config/git")).unwrap();
    fs::write(home.join(".config/git/ignore"), "*.conf\n*.txt\n").unwrap();
    // A template directory would give each new store an info/exclude of its own.
    fs::create_dir_all(home.join("template/info")).unwrap();
    fs::write(home.join("template/info/exclude"), "*.md\n").unwrap();
    fs::write(
        home.join(".gitconfig"),
        format!(
            "[core]\n\tfileMode = false\n\tautocrlf = true\n[init]\n\ttemplateDir = {}\n",
            home.join("template").display()
        ),
    )
    .unwrap();
    let m = Machine::new(root.path(), &service("app", &up.file_url(), &["app"]));
    let once = || {
        m.command()
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .arg("--once")
            .output()
            .unwrap()
    };
    once();
    assert_eq!(m.state_json("app")["state"], "OK");
    let checkout = m.checkout("app");

    fs::write(checkout.join("app/stray.txt"), "left here\n").unwrap();
    fs::write(checkout.join("app/notes.md"), "and here\n").unwrap();
    once();
    let s = m.state_json("app");
    assert_eq!(s["state"], "DIFF", "{s}");
    let info = s["info"].as_str().unwrap();
    assert!(
        info.contains("app/stray.txt") && info.contains("app/notes.md"),
        "{s}"
    );
    fs::remove_file(checkout.join("app/stray.txt")).unwrap();
    fs::remove_file(checkout.join("app/notes.md")).unwrap();
    once();
    assert_eq!(m.state_json("app")["state"], "OK");

    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(checkout.join("app/conf"), fs::Permissions::from_mode(0o755)).unwrap();
    once();
    let s = m.state_json("app");
    assert_eq!(s["state"], "DIFF", "{s}");
    assert!(s["info"].as_str().unwrap().contains("app/conf"), "{s}");
    fs::set_permissions(checkout.join("app/conf"), fs::Permissions::from_mode(0o644)).unwrap();
    once();
    assert_eq!(m.state_json("app")["state"], "OK");

    fs::write(checkout.join("app/conf"), "1\r\n").unwrap();
    once();
    let s = m.state_json("app");
    assert_eq!(s["state"], "DIFF", "{s}");
    assert!(s["info"].as_str().unwrap().contains("app/conf"), "{s}");
    fs::write(checkout.join("app/conf"), "1\n").unwrap();
    once();
    assert_eq!(m.state_json("app")["state"], "OK");

    // The same bytes written again are no edit, though `text` would read them as LF.
    fs::write(checkout.join("app/dos.ini"), "a\r\nb\r\n").unwrap();
    once();
    let s = m.state_json("app");
    assert_eq!(s["state"], "OK", "{s}");
}
