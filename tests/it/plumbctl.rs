//! The `plumbctl` binary end to end: a real daemon and its real control API run in this process on
//! a socket in a temp dir, and the built `plumbctl` talks to it, locally (`--socket`) and as
//! `@host` through a real OpenSSH server on loopback, whose remote command is the same binary.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use plumb::ctl::Envelope;
use plumb::proto;
use plumb::proto::{ActionResult, Services};
use support::{
    DEADLINE, InProcess, SshServer, Upstream, free_port, require_root, temp_root, wait_until,
};

/// `plumbctl --socket <the daemon's socket> <args>`, and the same in a time zone.
trait Ctl {
    fn ctl(&self, args: &[&str]) -> Output;
    fn ctl_tz(&self, args: &[&str], tz: &str) -> Output;
}

impl Ctl for InProcess {
    fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_tz(args, "UTC")
    }

    /// [`Ctl::ctl`] in the time zone `tz` (a `TZ` value).
    fn ctl_tz(&self, args: &[&str], tz: &str) -> Output {
        let mut cmd = plumbctl();
        cmd.arg("--socket")
            .arg(self.socket.as_ref().expect("the daemon's API"))
            .args(args)
            .env("TZ", tz);
        cmd.output().unwrap()
    }
}

/// The daemon of `config` with its API on `root/run/plumb.sock`.
fn start(root: &Path, config: &Path) -> InProcess {
    InProcess::with_api(config, &root.join("run/plumb.sock"))
}

/// The built plumbctl with none of the caller's plumbctl settings.
fn plumbctl() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plumbctl"));
    for var in ["PLUMB_SOCKET", "PLUMBCTL_SSH", "PLUMBCTL_REMOTE"] {
        cmd.env_remove(var);
    }
    cmd
}

/// An upstream with one commit for service `app` of machine `testbox`, and its config.
fn setup(root: &Path) -> (Upstream, PathBuf, String) {
    let up = Upstream::new(root, "ctl");
    let v1 = up.write("app/conf", "1").commit("v1");
    let config = root.join("plumb.toml");
    std::fs::write(
        &config,
        format!(
            "[plumb]\nstate_dir = {:?}\n\n[[services]]\nmachine = \"testbox\"\nservice = \"app\"\nupstream = \"{}\"\ndirs = [{{ local = \"/srv/app\", link = \"app\" }}]\n",
            root.join("state"),
            up.file_url()
        ),
    )
    .unwrap();
    (up, config, v1)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn expect(out: &Output, code: i32) -> String {
    assert_eq!(out.status.code(), Some(code), "{}", show(out));
    text(&out.stdout)
}

#[test]
fn list_freeze_status_pull_rollback_unfreeze_and_log_locally() {
    require_root();
    let root = temp_root();
    let (up, config, v1) = setup(root.path());
    let d = start(root.path(), &config);
    wait_until("first deploy", DEADLINE, || {
        d.deployed("app").as_deref() == Some(v1.as_str())
    });

    let table = expect(&d.ctl(&["list", "services"]), 0);
    let mut lines = table.lines();
    assert_eq!(
        lines.next().unwrap(),
        "SERVICE  STATE  DEPLOYED      BEHIND  SINCE   INFO"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[..3], ["app", "OK", &v1[..12]], "{table}");
    assert_eq!(lines.next(), None);

    let machines = expect(&d.ctl(&["list", "machines"]), 0);
    assert_eq!(machines, "NAME     THIS  SERVICES\ntestbox  yes   app\n");

    // Times in the local zone (here two hours east of UTC), with how far off they are.
    let out = expect(&d.ctl_tz(&["freeze", "app", "1h"], "<+02>-2"), 0);
    assert!(
        out.starts_with("SERVICE  RESULT  STATE   MESSAGE\napp      ok      FREEZE  freeze: FREEZE: frozen until 20"),
        "{out}"
    );
    assert!(
        out.trim_end().ends_with("+02:00 (in 59m)") || out.trim_end().ends_with("+02:00 (in 1h)"),
        "{out}"
    );
    let status = expect(&d.ctl_tz(&["status", "app"], "<+02>-2"), 0);
    assert!(status.contains("\nstate:         FREEZE\n"), "{status}");
    let frozen = status
        .lines()
        .find(|l| l.starts_with("frozen:        until 20"))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(frozen.contains("+02:00 (in "), "{status}");
    let list = expect(&d.ctl_tz(&["list", "services"], "<+02>-2"), 0);
    assert!(
        list.contains("frozen until 20") && list.contains("+02:00 (in "),
        "{list}"
    );
    assert!(
        status.contains(&format!("\ndeployed:      {v1}\n")),
        "{status}"
    );

    // A pull while frozen fetches and holds back; a rollback pins; unfreeze catches up.
    let v2 = up.write("app/conf", "2").commit("v2");
    let out = expect(&d.ctl(&["pull", "app"]), 0);
    assert!(out.contains("app      ok      FREEZE"), "{out}");
    expect(&d.ctl(&["unfreeze", "app"]), 0);
    wait_until("catch up after unfreeze", DEADLINE, || {
        d.deployed("app").as_deref() == Some(v2.as_str())
    });
    let out = expect(&d.ctl(&["rollback", "app", &v1[..10]]), 0);
    assert!(out.contains("app      ok      FREEZE"), "{out}");
    assert_eq!(d.deployed("app").as_deref(), Some(v1.as_str()));

    // The audit log keeps the revision as typed and the commit it was resolved to.
    let doc: Vec<Envelope> =
        serde_json::from_str(&expect(&d.ctl(&["log", "--json", "--limit", "1"]), 0)).unwrap();
    let entries: Vec<proto::AuditEntry> =
        serde_json::from_value(doc[0].result.clone().unwrap()).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].arguments,
        serde_json::json!({"revision": &v1[..10], "resolved": v1})
    );
    let last_two = expect(&d.ctl(&["log", "--limit", "2"]), 0);
    assert_eq!(last_two.lines().count(), 3, "{last_two}");

    let log = expect(&d.ctl(&["log"]), 0);
    let actions: Vec<&str> = log
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(2).unwrap_or_default())
        .collect();
    assert_eq!(actions, ["freeze", "pull", "unfreeze", "rollback"], "{log}");
    assert!(log.starts_with("TIME  "), "{log}");
}

#[test]
fn refusals_are_exit_1_and_usage_errors_exit_2() {
    require_root();
    let root = temp_root();
    let (_up, config, v1) = setup(root.path());
    let d = start(root.path(), &config);
    wait_until("first deploy", DEADLINE, || {
        d.deployed("app").as_deref() == Some(v1.as_str())
    });

    let out = d.ctl(&["status", "nope"]);
    assert_eq!(expect(&out, 1), "");
    assert_eq!(
        text(&out.stderr),
        "plumbctl: no service \"nope\" on this machine\n"
    );
    // diff is a read: nothing to pull here is a clean answer.
    let out = d.ctl(&["diff", "app"]);
    expect(&out, 0);
    assert!(
        text(&out.stdout).contains("(nothing to pull)"),
        "{}",
        show(&out)
    );

    let out = d.ctl(&["rollback", "app", "no-such-rev"]);
    expect(&out, 1);
    assert!(text(&out.stderr).contains("no-such-rev"), "{}", show(&out));

    for args in [
        &["bogus"][..],
        &["list"],
        &["status"],
        &["rollback", "app"],
        &["diff"],
        &["list", "services", "@-oProxyCommand=x"],
    ] {
        let out = d.ctl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(out.stdout.is_empty(), "{args:?}: {}", show(&out));
    }

    // No daemon: one line saying where it looked.
    let out = plumbctl()
        .args(["list", "services"])
        .env("PLUMB_SOCKET", root.path().join("absent.sock"))
        .output()
        .unwrap();
    expect(&out, 1);
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "plumbctl: cannot reach plumb at {}: No such file or directory (os error 2) (is plumb running?",
            root.path().join("absent.sock").display()
        )),
        "{err}"
    );
}

#[test]
fn json_is_one_array_with_the_proto_bodies() {
    require_root();
    let root = temp_root();
    let (_up, config, v1) = setup(root.path());
    let d = start(root.path(), &config);
    wait_until("first deploy", DEADLINE, || {
        d.deployed("app").as_deref() == Some(v1.as_str())
    });

    let doc: Vec<Envelope> =
        serde_json::from_str(&expect(&d.ctl(&["--json", "list", "services"]), 0)).unwrap();
    assert_eq!(doc.len(), 1);
    assert!(doc[0].ok);
    let services: Services = serde_json::from_value(doc[0].result.clone().unwrap()).unwrap();
    assert_eq!(services.services[0].service, "app");
    assert_eq!(services.services[0].deployed.as_deref(), Some(v1.as_str()));

    let doc: Vec<Envelope> =
        serde_json::from_str(&expect(&d.ctl(&["freeze", "app", "--json"]), 0)).unwrap();
    let result: ActionResult = serde_json::from_value(doc[0].result.clone().unwrap()).unwrap();
    assert!(result.ok);
    assert_eq!(result.status.state, "FREEZE");
    assert_eq!(result.status.frozen_until, None);
    assert!(result.status.frozen);

    // `frozen` and `frozen_until` are there whatever the state; without @host the document is
    // still an array, of one.
    let raw: serde_json::Value =
        serde_json::from_str(&expect(&d.ctl(&["--json", "status", "app"]), 0)).unwrap();
    assert_eq!(raw[0]["result"]["frozen"], serde_json::json!(true));
    assert_eq!(raw[0]["result"]["frozen_until"], serde_json::Value::Null);
    expect(&d.ctl(&["unfreeze", "app"]), 0);
    let raw: serde_json::Value =
        serde_json::from_str(&expect(&d.ctl(&["--json", "list", "services"]), 0)).unwrap();
    assert_eq!(raw.as_array().map(Vec::len), Some(1), "{raw}");
    let app = &raw[0]["result"]["services"][0];
    assert_eq!(app["frozen"], serde_json::json!(false), "{app}");
    assert!(
        app.get("frozen_until")
            .is_some_and(serde_json::Value::is_null),
        "{app}"
    );

    let out = d.ctl(&["--json", "status", "nope"]);
    let doc: serde_json::Value = serde_json::from_str(&expect(&out, 1)).unwrap();
    let machine = doc[0]["machine"].as_str().unwrap().to_owned();
    assert_eq!(
        doc,
        serde_json::json!([{"machine": machine, "ok": false, "error": "no service \"nope\" on this machine"}])
    );
    assert_eq!(text(&out.stderr), "");
}

/// What bash's completion of plumbctl (the generated script, asking the built plumbctl) offers
/// for the last of `words`, with `env` added.
fn bash_complete(words: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Vec<String> {
    let docs = tempfile::tempdir().unwrap();
    plumb::docs::write_docs(docs.path()).unwrap();
    let script = docs.path().join("completions/plumbctl.bash");
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; _plumbctl; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len() - 1
    );
    let bin = Path::new(env!("CARGO_BIN_EXE_plumbctl")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = Command::new("bash")
        .args(["-c", &program])
        .env("PATH", path)
        .env_remove("PLUMB_SOCKET")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    text(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Completion offers the services of the local daemon and the hosts of the user's ssh files.
#[test]
fn completion_offers_the_daemons_services_and_ssh_hosts() {
    require_root();
    let root = temp_root();
    let (_up, config, v1) = setup(root.path());
    let d = start(root.path(), &config);
    wait_until("first deploy", DEADLINE, || {
        d.deployed("app").as_deref() == Some(v1.as_str())
    });
    let home = root.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(
        home.join(".ssh/config"),
        "Host web1 web2\n  HostName 192.0.2.1\nHost *.internal\n",
    )
    .unwrap();
    std::fs::write(
        home.join(".ssh/known_hosts"),
        "[webgit.example.org]:2222 ssh-ed25519 AAAA\n|1|x=|y= ssh-ed25519 AAAA\n",
    )
    .unwrap();
    let socket = d.socket.clone().unwrap();
    let env = [
        ("PLUMB_SOCKET", socket.as_os_str()),
        ("HOME", home.as_os_str()),
    ];
    assert_eq!(bash_complete(&["plumbctl", "freeze", ""], &env), ["app"]);
    assert_eq!(
        bash_complete(&["plumbctl", "@web1", "status", "a"], &env),
        ["app"]
    );
    assert_eq!(
        bash_complete(
            &["plumbctl", "--socket", socket.to_str().unwrap(), "wipe", ""],
            &[("HOME", home.as_os_str())]
        ),
        ["app"]
    );
    assert_eq!(
        bash_complete(&["plumbctl", "status", "app", "@web"], &env),
        ["@web1", "@web2", "@webgit.example.org"]
    );
    // The daemon gone: no services, and no error on the terminal.
    drop(d);
    assert!(bash_complete(&["plumbctl", "freeze", ""], &env).is_empty());
}

#[test]
fn hosts_are_asked_through_ssh_and_an_unreachable_one_is_a_row() {
    require_root();
    let root = temp_root();
    let (_up, config, v1) = setup(root.path());
    let d = start(root.path(), &config);
    wait_until("first deploy", DEADLINE, || {
        d.deployed("app").as_deref() == Some(v1.as_str())
    });
    let sshd = SshServer::start(root.path());
    // What a user's ~/.ssh/config does: names for hosts, with their ports.
    let ssh_config = root.path().join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!(
            "Host good\n  HostName 127.0.0.1\n  Port {}\nHost down\n  HostName 127.0.0.1\n  Port {}\n",
            sshd.port,
            // Nothing listens there: the host is down.
            free_port()
        ),
    )
    .unwrap();
    let ssh = format!(
        "ssh -F {} -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes -l root",
        ssh_config.display(),
        sshd.client_key.display(),
        sshd.known_hosts.display()
    );
    // The remote plumbctl is this build, reaching this test's daemon.
    let remote = format!(
        "env PLUMB_SOCKET={} {}",
        d.socket.as_ref().unwrap().display(),
        env!("CARGO_BIN_EXE_plumbctl")
    );
    let ctl = |args: &[&str]| {
        plumbctl()
            .args(args)
            .env("PLUMBCTL_SSH", &ssh)
            .env("PLUMBCTL_REMOTE", &remote)
            .output()
            .unwrap()
    };

    let out = ctl(&["list", "services", "@good"]);
    let table = expect(&out, 0);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "MACHINE", "SERVICE", "STATE", "DEPLOYED", "BEHIND", "SINCE", "INFO"
        ]
    );
    assert_eq!(lines[1][..4], ["good", "app", "OK", &v1[..12]], "{table}");

    let out = ctl(&["@down", "freeze", "app", "2h", "@good"]);
    let table = expect(&out, 1);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{}", show(&out));
    assert!(
        lines[0].starts_with("MACHINE  SERVICE  RESULT  STATE   MESSAGE"),
        "{table}"
    );
    assert!(
        lines[1]
            .starts_with("down     -        -       ERROR   ssh: connect to host 127.0.0.1 port "),
        "{table}"
    );
    assert!(lines[1].ends_with("Connection refused"), "{table}");
    assert!(
        lines[2].starts_with("good     app      ok      FREEZE  "),
        "{table}"
    );

    let out = ctl(&["--json", "status", "app", "@good", "@down"]);
    let doc: Vec<Envelope> = serde_json::from_str(&expect(&out, 1)).unwrap();
    assert_eq!((doc[0].machine.as_str(), doc[0].ok), ("good", true));
    let status: proto::ServiceStatus =
        serde_json::from_value(doc[0].result.clone().unwrap()).unwrap();
    assert_eq!(status.state, "FREEZE");
    assert!(status.frozen_until.is_some());
    assert_eq!((doc[1].machine.as_str(), doc[1].ok), ("down", false));
    assert!(
        doc[1]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("Connection refused"),
        "{doc:?}"
    );

    // A refusal on the remote side is that machine's error, not ssh's.
    let out = ctl(&["status", "nope", "@good"]);
    let blocks = expect(&out, 1);
    assert_eq!(
        blocks,
        "host:  good\nerror: no service \"nope\" on this machine\n"
    );

    // The host's key changed (known_hosts holds another): ssh's banner is one line in the table,
    // all of it with --verbose and in the JSON's detail.
    let wrong_key = std::fs::read_to_string(sshd.client_key.with_extension("pub")).unwrap();
    let wrong_key: Vec<&str> = wrong_key.split_whitespace().take(2).collect();
    let changed_hosts = root.path().join("known_hosts.changed");
    std::fs::write(
        &changed_hosts,
        format!("[127.0.0.1]:{} {}\n", sshd.port, wrong_key.join(" ")),
    )
    .unwrap();
    let mismatch = ssh.replace(
        &sshd.known_hosts.display().to_string(),
        &changed_hosts.display().to_string(),
    );
    let ctl = |args: &[&str]| {
        plumbctl()
            .args(args)
            .env("PLUMBCTL_SSH", &mismatch)
            .env("PLUMBCTL_REMOTE", &remote)
            .output()
            .unwrap()
    };
    let table = expect(&ctl(&["list", "services", "@good"]), 1);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[1].ends_with(
            "ERROR  -         -       -      WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! \
             (more with --verbose)"
        ),
        "{table}"
    );
    let verbose = expect(&ctl(&["list", "services", "@good", "--verbose"]), 1);
    assert!(
        verbose.contains("\ngood:\n  @@@")
            && verbose.contains("\n  Host key verification failed.\n"),
        "{verbose}"
    );
    let doc: Vec<Envelope> =
        serde_json::from_str(&expect(&ctl(&["--json", "list", "services", "@good"]), 1)).unwrap();
    assert_eq!(
        doc[0].error.as_deref(),
        Some("WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!")
    );
    let detail = doc[0].detail.as_deref().unwrap_or_default();
    assert!(detail.contains("Host key verification failed."), "{detail}");
}

/// Without a terminal on standard input, plumbctl's ssh never prompts (`BatchMode=yes`): with
/// several hosts in parallel their prompts would collide, and nobody could answer them. The
/// prompt here is ssh's question about an unknown host key, asked through `SSH_ASKPASS`, which
/// records that it was asked.
#[test]
fn without_a_terminal_ssh_asks_nothing() {
    require_root();
    let root = temp_root();
    let sshd = SshServer::start(root.path());
    let ssh_config = root.path().join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!("Host box\n  HostName 127.0.0.1\n  Port {}\n", sshd.port),
    )
    .unwrap();
    // No known host: ssh's default is to ask whether to trust the key.
    let known_hosts = root.path().join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    let asked = root.path().join("asked");
    let askpass = root.path().join("askpass");
    std::fs::write(
        &askpass,
        format!("#!/bin/sh\necho \"$1\" >> {}\necho no\n", asked.display()),
    )
    .unwrap();
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ssh = format!(
        "ssh -F {} -i {} -o UserKnownHostsFile={} -o IdentitiesOnly=yes -l root",
        ssh_config.display(),
        sshd.client_key.display(),
        known_hosts.display()
    );
    let askpass_env = |cmd: &mut Command| {
        cmd.env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .stdin(std::process::Stdio::null());
    };

    // The same ssh, run by hand without a terminal, does ask: the test can tell.
    let mut by_hand = Command::new("sh");
    by_hand.args(["-c", &format!("{ssh} box true")]);
    askpass_env(&mut by_hand);
    let out = by_hand.output().unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    let question = std::fs::read_to_string(&asked).unwrap_or_default();
    assert!(question.contains("authenticity"), "{question:?}");
    std::fs::remove_file(&asked).unwrap();

    let mut cmd = plumbctl();
    cmd.args(["list", "services", "@box"])
        .env("PLUMBCTL_SSH", &ssh);
    askpass_env(&mut cmd);
    let out = cmd.output().unwrap();
    let table = expect(&out, 1);
    assert!(
        table.contains("box") && table.contains("Host key verification failed"),
        "{table}"
    );
    assert!(
        !asked.exists(),
        "plumbctl's ssh asked: {:?}",
        std::fs::read_to_string(&asked)
    );
}
