//! Self-test of the integration-test harness (tests/it/support): every server really serves an
//! upstream to the real git client, and `Upstream` makes the history it claims to.

use crate::support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::{
    GitDaemon, HttpServer, SshServer, Upstream, git, git_env, require_root, temp_root, wait_until,
};

/// The hash `git ls-remote url` reports for `refs/heads/main`.
fn remote_main(env: &[(&str, &str)], url: &str) -> String {
    let out = git_env(
        &std::env::temp_dir(),
        env,
        &["ls-remote", url, "refs/heads/main"],
    );
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn git_daemon_serves_upstream() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "app");
    let head = up.write("README", "hi\n").commit("one");
    let daemon = GitDaemon::start(root.path());
    assert_eq!(remote_main(&[], &daemon.url(&up)), head);
}

#[test]
fn http_serves_upstream_and_logs_requests() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "app");
    let head = up.write("README", "hi\n").commit("one");
    let http = HttpServer::start(root.path());
    let before = http.requests().len();
    assert_eq!(remote_main(&[], &http.url(&up)), head);
    // Logged before the response: no polling.
    let requests = http.requests();
    assert!(requests.len() > before, "{requests:#?}");
    assert!(
        requests
            .iter()
            .any(|r| r
                .starts_with("GET /git/app.git/info/refs?service=git-upload-pack HTTP/1.1 \"git/")),
        "{requests:#?}"
    );
}

#[test]
fn wait_until_returns_once_true() {
    let mut calls = 0;
    wait_until("the third call", Duration::from_secs(5), || {
        calls += 1;
        calls == 3
    });
    assert_eq!(calls, 3);
}

#[test]
#[should_panic(expected = "waiting for the impossible")]
fn wait_until_panics_naming_what_on_timeout() {
    wait_until("the impossible", Duration::from_millis(30), || false);
}

#[test]
fn ssh_serves_upstream_with_plain_and_hashed_known_hosts() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "app");
    let head = up.write("README", "hi\n").commit("one");
    let ssh = SshServer::start(root.path());

    let line = fs::read_to_string(&ssh.known_hosts).unwrap();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 AAAA", ssh.port)),
        "{line}"
    );
    assert!(
        ssh.url(&up)
            .starts_with(&format!("ssh://root@127.0.0.1:{}/", ssh.port))
    );

    let cmd = ssh.ssh_command();
    assert_eq!(
        remote_main(&[("GIT_SSH_COMMAND", &cmd)], &ssh.url(&up)),
        head
    );

    let hashed = ssh.hashed_known_hosts();
    let text = fs::read_to_string(&hashed).unwrap();
    assert!(
        text.starts_with("|1|") && !text.contains("127.0.0.1"),
        "{text}"
    );
    let cmd = cmd.replace(
        &ssh.known_hosts.display().to_string(),
        &hashed.display().to_string(),
    );
    assert_eq!(
        remote_main(&[("GIT_SSH_COMMAND", &cmd)], &ssh.url(&up)),
        head
    );
}

#[test]
fn upstream_builds_history() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "cfg");
    assert_eq!(git(&up.bare, &["symbolic-ref", "HEAD"]), "refs/heads/main");
    // An unborn branch (and any branch never pushed) counts 0 rather than failing.
    assert_eq!(up.rev_count("main"), 0);
    assert_eq!(up.rev_count("nope"), 0);
    assert!(up.bare.join("git-daemon-export-ok").exists());

    let first = up
        .write("nginx/conf.d/site.conf", "v1\n")
        .write("app/run.sh", "#!/bin/sh\n")
        .chmod_exec("app/run.sh", true)
        .symlink("app/current", "run.sh")
        .commit("v1");
    assert_eq!(first.len(), 40);
    assert_eq!(up.rev_count("main"), 1);

    let second = up.remove("nginx").write("app/version", "2\n").commit("v2");
    assert_eq!(up.rev_count("main"), 2);
    assert_eq!(up.commit("empty").len(), 40);
    assert_eq!(up.rev_count("main"), 3);

    // What was pushed is what a clone over file:// sees.
    let clone = root.path().join("clone");
    git(
        root.path(),
        &["clone", "-q", &up.file_url(), clone.to_str().unwrap()],
    );
    assert!(!clone.join("nginx").exists());
    assert_eq!(
        fs::read_to_string(clone.join("app/version")).unwrap(),
        "2\n"
    );
    assert_eq!(
        fs::read_link(clone.join("app/current")).unwrap().to_str(),
        Some("run.sh")
    );
    let mode = fs::metadata(clone.join("app/run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "mode {mode:o}");

    // A new branch reaches the bare repository with its first commit; main is untouched.
    up.branch("next");
    assert_eq!(up.rev_count("next"), 0);
    up.write("app/version", "3\n").commit("v3");
    assert_eq!(up.rev_count("next"), 4);
    assert_eq!(up.rev_count("main"), 3);

    // Back on main, a force reset rewinds it in the bare repository.
    up.branch("main");
    assert_eq!(up.force_reset(&first), first);
    assert_eq!(up.rev_count("main"), 1);
    assert_eq!(git(&up.bare, &["rev-parse", "refs/heads/main"]), first);
    assert_ne!(first, second);
}
