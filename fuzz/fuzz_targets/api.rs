//! What callers send the daemon: every write's request body as the control API's handlers parse it
//! (`api::write_command`: freeze, unfreeze, rollback, pull, wipe, and the audit log's copy of the
//! body), a rollback's revision as the daemon resolves it in a store (`Store::resolve`, libgit2's
//! rev-parse), and the push webhook's headers and body as `hook::verify` checks them.
//!
//! Input: header lines (`name: value`) up to the first empty line, then the body. The writes and
//! the revision take the whole input; the webhook takes the two parts.

#![no_main]

use std::cell::RefCell;
use std::time::Duration;

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use plumb::daemon::Command;
use plumb::git::Store;
use sha2::Sha256;

const SECRET: &str = "0123456789abcdef-fuzz";
const NOW: u64 = 1_700_000_000;
const WRITES: [&str; 6] = ["freeze", "unfreeze", "rollback", "pull", "wipe", "nonsense"];

fuzz_target!(|data: &[u8]| {
    writes(data);
    webhook(data);
});

fn writes(data: &[u8]) {
    let args = plumb::api::arguments(data);
    let entry = plumb::proto::AuditEntry {
        id: 0,
        time: NOW,
        uid: 0,
        user: "root".into(),
        action: "freeze".into(),
        service: Some("svc".into()),
        arguments: args,
        result: "ok".into(),
    };
    // What the audit log stores must read back.
    let line = serde_json::to_string(&entry).expect("an audit entry serialises");
    let back: plumb::proto::AuditEntry =
        serde_json::from_str(&line).expect("audit line reads back");
    assert_eq!(back.time, NOW);
    for action in WRITES {
        let Ok(command) = plumb::api::write_command(action, "svc".into(), data, NOW) else {
            continue;
        };
        match command {
            Command::Freeze { until: Some(t), .. } => {
                // The daemon schedules the end of a freeze as an Instant: it must fit.
                let left = t.checked_sub(NOW).expect("a freeze ends after it starts");
                assert!(left > 0 && Duration::from_secs(left) <= plumb::api::MAX_FREEZE);
                assert!(
                    std::time::Instant::now()
                        .checked_add(Duration::from_secs(left))
                        .is_some()
                );
            }
            Command::Rollback { revision, .. } => resolve(&revision),
            _ => {}
        }
    }
}

thread_local! {
    /// A store with two commits on `origin/main`, made once per process.
    static STORE: RefCell<Option<(Store, git2::Oid)>> = const { RefCell::new(None) };
}

/// A rollback's revision, resolved as the daemon does (`resolve_in_history`).
fn resolve(revision: &str) {
    STORE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (store, head) = cell.get_or_insert_with(make_store);
        if let Ok(target) = store.resolve(revision) {
            let _ = store.in_history(target, *head);
        }
    });
}

fn make_store() -> (Store, git2::Oid) {
    let dir = tempfile::tempdir().expect("temp dir").keep();
    let store = Store::open(&dir, "https://git.example.org/ops/config.git").expect("store");
    let repo = git2::Repository::open(store.path()).expect("open store");
    let sig = git2::Signature::new("fuzz", "fuzz@example.org", &git2::Time::new(NOW as i64, 0))
        .expect("signature");
    let mut parent: Option<git2::Oid> = None;
    for i in 0..2 {
        let blob = repo.blob(format!("v{i}\n").as_bytes()).expect("blob");
        let mut tb = repo.treebuilder(None).expect("treebuilder");
        tb.insert("file", blob, 0o100644).expect("insert");
        let tree = repo
            .find_tree(tb.write().expect("tree"))
            .expect("find tree");
        let parents: Vec<git2::Commit> = parent
            .iter()
            .map(|p| repo.find_commit(*p).expect("parent"))
            .collect();
        let parents: Vec<&git2::Commit> = parents.iter().collect();
        let id = repo
            .commit(None, &sig, &sig, &format!("commit {i}"), &tree, &parents)
            .expect("commit");
        parent = Some(id);
    }
    let head = parent.expect("a commit");
    repo.reference("refs/remotes/origin/main", head, true, "fuzz")
        .expect("reference");
    (store, head)
}

fn webhook(data: &[u8]) {
    let (head, body) = match find(data, b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (&[][..], data),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    let _ = plumb::hook::verify(&headers, body, SECRET).map_err(|e| (e.to_string(), e.label()));
    // The repositories a payload names, and their keys, from any body.
    for url in plumb::hook::repositories(body) {
        let _ = plumb::git::repository_key(&url);
    }
    // A correct signature of the same body passes, whatever else the request holds.
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(body);
    let good: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for name in ["x-gitlab-token", "x-hub-signature-256", "x-gitea-signature"] {
        headers.remove(name);
    }
    let mut github = headers.clone();
    github.insert(
        "x-hub-signature-256",
        HeaderValue::from_str(&format!("sha256={good}")).expect("hex"),
    );
    assert!(plumb::hook::verify(&github, body, SECRET).is_ok());
    let mut gitea = headers;
    gitea.insert(
        "x-gitea-signature",
        HeaderValue::from_str(&good).expect("hex"),
    );
    assert!(plumb::hook::verify(&gitea, body, SECRET).is_ok());
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
