//! The control API end to end: the real daemon (in-process, `--no-apply`) behind the real API on a
//! unix socket, called with `curl --unix-socket` as real users made for the test, so the kernel's
//! credentials, the user database's groups, the socket's mode and the audit log are all the real ones.

use crate::support;

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use plumb::api;
use serde_json::{Value, json};
use support::{Accounts, DEADLINE, InProcess, Upstream, require_root, temp_root, wait_until};

/// The daemon and its API, in-process ([`InProcess`]), on a config with one service, `web`, on a
/// `file://` upstream; stopped when dropped.
struct Plumb {
    socket: PathBuf,
    state: PathBuf,
    _daemon: InProcess,
}

impl Plumb {
    /// Starts plumb on `root` with one service, `web`, on a `file://` upstream.
    fn start(root: &Path, admin_group: &str, readonly_group: &str) -> Plumb {
        let up = Upstream::new(root, "config");
        up.write("web/index.html", "hello\n");
        up.commit("web");
        let state = root.join("state");
        let socket = root.join("run").join("plumb.sock");
        let config = root.join("plumb.toml");
        fs::write(
            &config,
            format!(
                "[plumb]\nstate_dir = {state:?}\ninterval = \"1h\"\nsocket = {socket:?}\n\
                 admin_group = {admin_group:?}\nreadonly_group = {readonly_group:?}\n\n\
                 [[services]]\nmachine = \"testbox\"\nservice = \"web\"\nupstream = {:?}\n\
                 dirs = [{{ local = \"/srv/web\", link = \"web\" }}]\n",
                up.file_url()
            ),
        )
        .unwrap();
        let p = Plumb {
            _daemon: InProcess::with_api(&config, &socket),
            socket,
            state,
        };
        wait_until("the API to answer", DEADLINE, || {
            p.curl(None, "GET", "/v1/services", None).status == 200
        });
        p
    }

    /// `curl` against the socket, as `user` (`None`: root).
    fn curl(&self, user: Option<&str>, method: &str, path: &str, body: Option<&str>) -> Answer {
        let mut cmd = match user {
            None => Command::new("curl"),
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={u}"),
                    &format!("--regid={}", primary_gid(u)),
                    "--init-groups",
                    "curl",
                ]);
                c
            }
        };
        cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&self.socket)
            .args(["-X", method]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
        } else if method == "POST" {
            cmd.args(["--data-binary", ""]);
        }
        cmd.arg(format!("http://plumb{path}"));
        let out = cmd.output().expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (text, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        Answer {
            curl_exit: out.status.code(),
            status: code.trim().parse().unwrap_or(0),
            body: serde_json::from_str(text).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn audit(&self) -> Vec<Value> {
        let a = self.curl(None, "GET", "/v1/audit", None);
        assert_eq!(a.status, 200, "{a:?}");
        a.body.as_array().cloned().expect("audit is an array")
    }
}

#[derive(Debug)]
struct Answer {
    curl_exit: Option<i32>,
    status: u16,
    body: Value,
    stderr: String,
}

impl Answer {
    fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }
}

fn primary_gid(user: &str) -> u32 {
    nix::unistd::User::from_name(user)
        .unwrap()
        .unwrap_or_else(|| panic!("no user {user}"))
        .gid
        .as_raw()
}

fn uid(user: &str) -> u64 {
    nix::unistd::User::from_name(user)
        .unwrap()
        .unwrap_or_else(|| panic!("no user {user}"))
        .uid
        .as_raw()
        .into()
}

/// Who may do what: root and the admin group everything, the read-only group reads, anyone else
/// nothing (the socket's mode keeps them out, and the API refuses them even when it does not); every
/// write, refused or not, is in the audit log with who asked.
#[test]
fn groups_decide_who_may_read_and_write_and_every_write_is_audited() {
    require_root();
    let root = temp_root();
    let mut accounts = Accounts::new();
    let admin_group = accounts.group("pla");
    let ro_group = accounts.group("plr");
    // Admins are in both groups: the read-only group owns the socket (README).
    let admin = accounts.user("pua", &[&admin_group, &ro_group]);
    let reader = accounts.user("pur", &[&ro_group]);
    let stranger = accounts.user("pus", &[]);
    let plumb = Plumb::start(root.path(), &admin_group, &ro_group);

    let meta = fs::metadata(&plumb.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&meta),
        nix::unistd::Group::from_name(&ro_group)
            .unwrap()
            .unwrap()
            .gid
            .as_raw()
    );

    // The stranger cannot even connect.
    let a = plumb.curl(Some(&stranger), "GET", "/v1/services", None);
    assert_eq!(a.curl_exit, Some(7), "{a:?}");
    assert_eq!(a.status, 0, "{a:?}");
    assert!(a.stderr.contains("connect"), "{a:?}");

    // Reads.
    for user in [None, Some(admin.as_str()), Some(reader.as_str())] {
        let a = plumb.curl(user, "GET", "/v1/services", None);
        assert_eq!(a.status, 200, "{user:?}: {a:?}");
        assert_eq!(a.body["services"][0]["service"], "web", "{a:?}");
        let a = plumb.curl(user, "GET", "/v1/services/web", None);
        assert_eq!(a.status, 200, "{user:?}: {a:?}");
        assert_eq!(a.body["machine"], "testbox", "{a:?}");
    }
    let a = plumb.curl(Some(&reader), "GET", "/v1/machines", None);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body["machines"],
        json!([{ "machine": "testbox", "services": ["web"] }])
    );
    assert!(
        a.body["this"]
            .as_array()
            .unwrap()
            .contains(&json!("testbox"))
    );

    // Writes.
    let a = plumb.curl(
        Some(&reader),
        "POST",
        "/v1/services/web/freeze",
        Some(r#"{"duration":"2h"}"#),
    );
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.error().contains("may only read"), "{a:?}");
    assert!(a.error().contains(&admin_group), "{a:?}");

    let a = plumb.curl(
        Some(&admin),
        "POST",
        "/v1/services/web/freeze",
        Some(r#"{"duration":"2h"}"#),
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["action"], "freeze", "{a:?}");
    assert_eq!(a.body["status"]["state"], "FREEZE", "{a:?}");
    let until = a.body["status"]["frozen_until"].as_u64().expect("until");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        until > now + 7000 && until <= now + 7200,
        "{until} vs {now}"
    );
    let a = plumb.curl(Some(&reader), "GET", "/v1/services/web", None);
    assert_eq!(a.body["state"], "FREEZE", "{a:?}");

    let a = plumb.curl(None, "POST", "/v1/services/web/unfreeze", None);
    assert_eq!(a.status, 200, "{a:?}");
    assert_ne!(a.body["status"]["state"], "FREEZE", "{a:?}");

    // Everything above, oldest first, with who and what.
    let audit = plumb.audit();
    let summary: Vec<(u64, &str, &str, &str)> = audit
        .iter()
        .map(|e| {
            (
                e["uid"].as_u64().unwrap(),
                e["user"].as_str().unwrap(),
                e["action"].as_str().unwrap(),
                e["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(summary.len(), 3, "{audit:#?}");
    assert_eq!(summary[0].0, uid(&reader));
    assert_eq!(summary[0].1, reader);
    assert_eq!(summary[0].2, "freeze");
    assert!(summary[0].3.starts_with("refused: "), "{audit:#?}");
    assert_eq!(
        (summary[1].0, summary[1].1, summary[1].2, summary[1].3),
        (uid(&admin), admin.as_str(), "freeze", "ok")
    );
    assert_eq!(
        (summary[2].0, summary[2].1, summary[2].2, summary[2].3),
        (0, "root", "unfreeze", "ok")
    );
    assert_eq!(audit[1]["service"], "web");
    assert_eq!(audit[1]["arguments"], json!({ "duration": "2h" }));
    let last = plumb.curl(Some(&reader), "GET", "/v1/audit?limit=1", None);
    assert_eq!(last.body, json!([audit[2].clone()]));
    // The log itself: one JSON line per refused write, two per write carried out (one before,
    // one with the outcome), not readable by everyone.
    let log = plumb.state.join("audit.log");
    let lines: Vec<Value> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let results: Vec<&str> = lines
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert_eq!(results.len(), 5, "{lines:#?}");
    assert!(results[0].starts_with("refused: "), "{results:?}");
    assert_eq!(
        results[1..],
        ["started", "ok", "started", "ok"],
        "{results:?}"
    );
    assert_eq!(lines[1]["id"], lines[2]["id"]);
    assert_ne!(lines[2]["id"], lines[3]["id"]);
    assert_eq!(fs::metadata(&log).unwrap().permissions().mode() & 0o007, 0);

    // With the socket opened to everyone, the API still refuses the stranger, by its credentials.
    fs::set_permissions(&plumb.socket, fs::Permissions::from_mode(0o666)).unwrap();
    for path in ["/v1/services", "/v1/audit", "/v1/machines"] {
        let a = plumb.curl(Some(&stranger), "GET", path, None);
        assert_eq!(a.status, 403, "{a:?}");
        assert!(a.error().contains(&stranger), "{a:?}");
        assert!(a.error().contains(&ro_group), "{a:?}");
    }
    let a = plumb.curl(Some(&stranger), "POST", "/v1/services/web/pull", None);
    assert_eq!(a.status, 403, "{a:?}");
    let audit = plumb.audit();
    assert_eq!(audit.len(), 4, "{audit:#?}");
    assert_eq!(audit[3]["user"], stranger.as_str());
    assert_eq!(audit[3]["action"], "pull");
    assert!(audit[3]["result"].as_str().unwrap().starts_with("refused"));

    // The same refusal reaches a reader using plumbctl: exit 1, the daemon's reason on stderr;
    // reading works.
    let ctl = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={reader}"),
                &format!("--regid={}", primary_gid(&reader)),
                "--init-groups",
                env!("CARGO_BIN_EXE_plumbctl"),
                "--socket",
            ])
            .arg(&plumb.socket)
            .args(args)
            .output()
            .expect("run plumbctl")
    };
    let out = ctl(&["freeze", "web", "2h"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("may only read"), "{stderr}");
    let out = ctl(&["status", "web"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        plumb.audit().len(),
        5,
        "plumbctl's refused write is audited too"
    );
}

/// Bad requests get JSON errors with the right status, and are audited like any write.
/// plumbctl, run as a user the socket keeps out, names the group to join: an admin who is not in
/// the read-only group (which owns the socket) is told to join it, and a user who was added to it
/// after the session started is told to log in again.
#[test]
fn plumbctl_names_the_group_a_refused_user_needs() {
    require_root();
    let root = temp_root();
    let mut accounts = Accounts::new();
    let admin_group = accounts.group("pla");
    let ro_group = accounts.group("plr");
    let admin_only = accounts.user("pua", &[&admin_group]);
    let reader = accounts.user("pur", &[&ro_group]);
    let plumb = Plumb::start(root.path(), &admin_group, &ro_group);
    let plumbctl = |user: &str, groups: &str| {
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={user}"),
                &format!("--regid={}", primary_gid(user)),
                groups,
                env!("CARGO_BIN_EXE_plumbctl"),
                "--socket",
            ])
            .arg(&plumb.socket)
            .args(["list", "services"])
            .env_remove("PLUMB_SOCKET")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let said = plumbctl(&admin_only, "--init-groups");
    assert!(
        said.starts_with(&format!(
            "plumbctl: cannot reach plumb at {}: Permission denied",
            plumb.socket.display()
        )),
        "{said}"
    );
    assert!(
        said.ends_with(&format!(
            " ({admin_only} is not in group {ro_group}, which the socket is for: an administrator \
             adds it with `usermod -aG {ro_group} {admin_only}`, admins too; then log in again)\n"
        )),
        "{said}"
    );
    // In the group in /etc/group, but not in this session's groups.
    let said = plumbctl(&reader, "--clear-groups");
    assert!(
        said.ends_with(&format!(
            " ({reader} is in group {ro_group}, which the socket is for, but this session \
             started before that: log in again, or run `newgrp {ro_group}`)\n"
        )),
        "{said}"
    );
}

#[test]
fn bad_requests_are_json_errors() {
    require_root();
    let root = temp_root();
    // Groups that do not exist: the daemon starts anyway, root-only.
    let plumb = Plumb::start(
        root.path(),
        "plumb-test-no-such-admin",
        "plumb-test-no-such-ro",
    );
    assert_eq!(
        fs::metadata(&plumb.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let a = plumb.curl(
        None,
        "POST",
        "/v1/services/web/freeze",
        Some(r#"{ "duration": "soon" }"#),
    );
    assert_eq!(a.status, 422, "{a:?}");
    assert!(a.error().contains("\"soon\""), "{a:?}");

    let a = plumb.curl(None, "GET", "/v1/services/nope", None);
    assert_eq!(a.status, 404, "{a:?}");
    assert!(a.error().contains("nope"), "{a:?}");
    let a = plumb.curl(None, "POST", "/v1/services/nope/freeze", None);
    assert_eq!(a.status, 404, "{a:?}");

    let a = plumb.curl(None, "POST", "/v1/services/web/freeze", Some("{nope"));
    assert_eq!(a.status, 400, "{a:?}");
    assert!(!a.error().is_empty(), "{a:?}");
    let a = plumb.curl(None, "POST", "/v1/services/web/rollback", None);
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.error().contains("revision"), "{a:?}");

    let a = plumb.curl(None, "GET", "/v1/nothing", None);
    assert_eq!(a.status, 404, "{a:?}");
    assert!(a.error().contains("/v1/nothing"), "{a:?}");
    let a = plumb.curl(None, "DELETE", "/v1/services", None);
    assert_eq!(a.status, 405, "{a:?}");
    assert!(!a.error().is_empty(), "{a:?}");
    let a = plumb.curl(None, "GET", "/v1/audit?limit=many", None);
    assert_eq!(a.status, 400, "{a:?}");

    let a = plumb.curl(None, "POST", "/v1/services/web/pull", None);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["action"], "pull", "{a:?}");
    assert_eq!(a.body["status"]["state"], "OK", "{a:?}");
    let a = plumb.curl(
        None,
        "POST",
        "/v1/services/web/rollback",
        Some(r#"{"revision":"no-such-revision"}"#),
    );
    assert_eq!(a.status, 422, "{a:?}");

    let results: Vec<String> = plumb
        .audit()
        .iter()
        .map(|e| e["result"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(results.len(), 6, "{results:?}");
    assert_eq!(results[4], "ok", "{results:?}");
    assert!(results[5].starts_with("error 422"), "{results:?}");
    assert!(results[0].starts_with("error 422"), "{results:?}");
    assert!(results[1].starts_with("error 404"), "{results:?}");
    assert!(results[2].starts_with("error 400"), "{results:?}");
}

/// A socket left by a plumb that died is replaced; one that is listening, or a file that is not a
/// socket, is not.
#[test]
fn bind_replaces_only_a_stale_socket() {
    require_root();
    let root = temp_root();
    let path = root.path().join("sub").join("p.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let first = api::bind(&path, "root", "root").unwrap();
        let e = api::bind(&path, "root", "root").unwrap_err();
        assert!(
            matches!(e, api::ApiError::InUse { .. }),
            "{e}: a listening socket must not be taken over"
        );
        drop(first);
        api::bind(&path, "root", "root").expect("a stale socket is replaced");
        let file = root.path().join("file");
        fs::write(&file, "x").unwrap();
        let e = api::bind(&file, "root", "root").unwrap_err();
        assert!(matches!(e, api::ApiError::NotASocket { .. }), "{e}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "x");
    });
}

/// What a caller can make the daemon read, keep and write is bounded: a body over a few KiB is
/// refused before it is read, and 50 of them, from a read-only member, add a few kilobytes to the
/// audit log, not 100 MB. A misspelt key or a body that is not an object is an error naming it,
/// not a write with defaults.
#[test]
fn bodies_are_small_strict_objects_and_refusals_cost_bytes() {
    require_root();
    let root = temp_root();
    let mut accounts = Accounts::new();
    let admin_group = accounts.group("pla");
    let ro_group = accounts.group("plr");
    let reader = accounts.user("pur", &[&ro_group]);
    let plumb = Plumb::start(root.path(), &admin_group, &ro_group);

    let big = root.path().join("big.json");
    fs::write(
        &big,
        format!("{{\"duration\":\"{}\"}}", "x".repeat(2 << 20)),
    )
    .unwrap();
    let big = format!("@{}", big.display());
    let log = plumb.state.join("audit.log");
    for who in [Some(reader.as_str()), None] {
        for service in ["web", "no-such-service"] {
            let a = plumb.curl(
                who,
                "POST",
                &format!("/v1/services/{service}/freeze"),
                Some(&big),
            );
            assert_eq!(a.status, 413, "{who:?}: {a:?}");
        }
    }
    for _ in 0..50 {
        let a = plumb.curl(
            Some(&reader),
            "POST",
            "/v1/services/no-such-service/freeze",
            Some(&big),
        );
        assert_eq!(a.status, 413, "{a:?}");
    }
    let size = fs::metadata(&log).unwrap().len();
    assert!(
        size < 54 * 1024,
        "54 refused 2 MB bodies wrote {size} bytes to the audit log"
    );
    let last = plumb.audit().pop().unwrap();
    assert!(
        last["result"].as_str().unwrap().starts_with("error 413"),
        "{last}"
    );

    let a = plumb.curl(
        None,
        "POST",
        "/v1/services/web/freeze",
        Some(r#"{"duraton":"2h"}"#),
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.error().contains("unknown field `duraton`"), "{a:?}");
    let a = plumb.curl(None, "POST", "/v1/services/web/pull", Some("[]"));
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.error().contains("expected a JSON object"), "{a:?}");
    let a = plumb.curl(
        None,
        "POST",
        "/v1/services/web/wipe",
        Some(r#"{"force":true}"#),
    );
    assert_eq!(a.status, 400, "{a:?}");
    let web = plumb.curl(None, "GET", "/v1/services/web", None);
    assert_eq!(web.body["state"], "OK", "no write happened: {web:?}");
}

/// A write the audit log cannot record is not made: with the state directory full, a freeze is
/// answered 503 and the service is not frozen, then or once space is back.
#[test]
fn a_write_the_audit_log_cannot_record_is_not_made() {
    require_root();
    let root = temp_root();
    let _state = support::Tmpfs::mount(&root.path().join("state"), "4m");
    let plumb = Plumb::start(
        root.path(),
        "plumb-test-no-such-admin",
        "plumb-test-no-such-ro",
    );
    // The first fetch done before the disk fills: one failing on the full disk would clean up
    // after itself and free the room the audit line needs.
    wait_until("the first deploy", DEADLINE, || {
        plumb.curl(None, "GET", "/v1/services/web", None).body["deployed"].is_string()
    });
    let filler = plumb.state.join("filler");
    let mut file = fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    drop(file);

    let a = plumb.curl(None, "POST", "/v1/services/web/freeze", None);
    assert_eq!(a.status, 503, "{a:?}");
    assert!(
        a.error()
            .starts_with("nothing was changed: the write cannot be recorded in the audit log"),
        "{a:?}"
    );
    let web = plumb.curl(None, "GET", "/v1/services/web", None);
    assert_eq!(web.body["state"], "OK", "{web:?}");

    fs::remove_file(&filler).unwrap();
    let web = plumb.curl(None, "GET", "/v1/services/web", None);
    assert_eq!(
        web.body["state"], "OK",
        "the refused freeze did not wait for space: {web:?}"
    );
    let a = plumb.curl(None, "POST", "/v1/services/web/freeze", None);
    assert_eq!(a.status, 200, "{a:?}");
    let audit = plumb.audit();
    let last = audit.last().unwrap();
    assert_eq!(
        (last["action"].as_str(), last["result"].as_str()),
        (Some("freeze"), Some("ok"))
    );
    assert_eq!(
        audit.iter().filter(|e| e["result"] == "ok").count(),
        1,
        "{audit:#?}"
    );
}

#[test]
fn a_user_taken_out_of_the_admin_group_is_turned_away_without_a_restart() {
    require_root();
    let root = temp_root();
    let mut accounts = Accounts::new();
    let admin_group = accounts.group("pla");
    let ro_group = accounts.group("plr");
    let admin = accounts.user("pua", &[&admin_group, &ro_group]);
    let plumb = Plumb::start(root.path(), &admin_group, &ro_group);
    let a = plumb.curl(Some(&admin), "POST", "/v1/services/web/unfreeze", None);
    assert_eq!(a.status, 200, "{a:?}");

    accounts.leave(&admin, &admin_group);
    // Groups are read again at most a few seconds later (README): then the write is refused,
    // while reading still works.
    wait_until("the write to be refused", DEADLINE, || {
        plumb
            .curl(Some(&admin), "POST", "/v1/services/web/unfreeze", None)
            .status
            == 403
    });
    let a = plumb.curl(Some(&admin), "GET", "/v1/services/web", None);
    assert_eq!(a.status, 200, "{a:?}");
}
