//! The git engine (`plumb::git`) against real upstreams: `file://`, `git daemon`, smart HTTP
//! (lighttpd + git-http-backend) and OpenSSH, built by `tests/it/support`. Every test checks what an
//! operator would notice: the files in a service's directory, what the servers saw, the messages.
//!
//! Expected checkouts are made by the real git client (`git checkout` of the same revision), so the
//! engine is compared with git itself, not with a model of it.

use crate::support;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use plumb::git::{GitError, Oid, Store, Transport};
use support::{
    GitDaemon, HttpServer, Node, Relay, Relaying, SshServer, Tmpfs, Upstream, git, git_checkout,
    require_root, snapshot, snapshot_links, temp_root, wait_until,
};

// ---------------------------------------------------------------------------------------------
// helpers

fn links(l: &[&str]) -> Vec<String> {
    l.iter().map(|s| s.to_string()).collect()
}

fn oid(hash: &str) -> Oid {
    Oid::from_str(hash).expect("a commit hash")
}

fn main_branch() -> Vec<String> {
    links(&["main"])
}

/// Fetches `main` and returns its head, which must exist.
fn fetch_main(store: &mut Store, transport: &Transport) -> Oid {
    let report = store.fetch(&main_branch(), transport).expect("fetch main");
    report.heads["main"].expect("main exists upstream")
}

fn file(content: &str) -> Node {
    Node::File {
        content: content.to_string(),
        exec: false,
    }
}

fn transport() -> Transport {
    Transport::default()
}

/// Sends one request through the server's git CGI (answered 404) and returns the index of its line
/// in the request log: every request that finished before it has its line above.
fn http_marker(server: &HttpServer, name: &str) -> usize {
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect to lighttpd");
    write!(
        stream,
        "GET /git/{name} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .expect("send marker");
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .expect("read marker reply");
    let mut position = 0;
    wait_until(
        "the marker request in the request log",
        Duration::from_secs(10),
        || match server.requests().iter().position(|l| l.contains(name)) {
            Some(p) => {
                position = p;
                true
            }
            None => false,
        },
    );
    position
}

// ---------------------------------------------------------------------------------------------
// transports

#[test]
fn git_daemon_first_fetch_checkout_and_update() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("web/etc/site.conf", "listen 80;\n")
        .write("web/bin/run", "#!/bin/sh\n")
        .chmod_exec("web/bin/run", true)
        .write("db/etc/db.conf", "size=1\n");
    let c1 = up.commit("first");
    let daemon = GitDaemon::start(root.path());
    let stores = root.path().join("stores");
    let mut store = Store::open(&stores, &daemon.url(&up)).expect("open store");
    assert!(store.path().starts_with(&stores));
    assert!(store.path().to_string_lossy().ends_with(".git"));

    git(&up.bare, &["tag", "v1", &c1]);
    let head = fetch_main(&mut store, &transport());
    assert_eq!(head, oid(&c1));
    assert!(store.resolve("v1").is_err(), "tags are not fetched");
    assert!(
        !store.path().join("FETCH_HEAD").exists(),
        "FETCH_HEAD is not written"
    );
    let web = links(&["web"]);
    let target = root.path().join("deploy/web");
    let index = root.path().join("state/web.index");
    store
        .checkout(&target, &index, None, head, &web)
        .expect("checkout");
    assert_eq!(
        snapshot(&target),
        BTreeMap::from([
            ("web".into(), Node::Dir),
            ("web/bin".into(), Node::Dir),
            (
                "web/bin/run".into(),
                Node::File {
                    content: "#!/bin/sh\n".into(),
                    exec: true
                }
            ),
            ("web/etc".into(), Node::Dir),
            ("web/etc/site.conf".into(), file("listen 80;\n")),
        ])
    );

    up.write("web/etc/site.conf", "listen 8080;\n")
        .remove("web/bin");
    let c2 = up.commit("second");
    let head2 = fetch_main(&mut store, &transport());
    assert_eq!(head2, oid(&c2));
    assert_eq!(store.commit_count(head2).unwrap(), up.rev_count("main"));
    store
        .checkout(&target, &index, Some(head), head2, &web)
        .expect("update");
    assert_eq!(
        snapshot_links(&target, &web),
        git_checkout(&up, root.path(), &c2, &web)
    );
    assert_eq!(
        fs::read_to_string(target.join("web/etc/site.conf")).unwrap(),
        "listen 8080;\n"
    );
    assert!(
        !target.join("web/bin").exists(),
        "a directory deleted upstream disappears"
    );
}

#[test]
fn http_first_fetch_then_idle_fetch_is_one_request() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let c1 = up.write("app/config.yml", "a: 1\n").commit("first");
    let server = HttpServer::start(root.path());
    let mut store = Store::open(&root.path().join("stores"), &server.url(&up)).unwrap();
    let head = fetch_main(&mut store, &transport());
    assert_eq!(head, oid(&c1));
    let target = root.path().join("deploy");
    store
        .checkout(
            &target,
            &root.path().join("idx"),
            None,
            head,
            &links(&["app/config.yml"]),
        )
        .unwrap();
    assert_eq!(
        fs::read_to_string(target.join("app/config.yml")).unwrap(),
        "a: 1\n"
    );
    let first = server.requests();
    assert!(
        first
            .iter()
            .any(|l| l.contains("POST /git/infra.git/git-upload-pack")),
        "the first fetch went over smart HTTP: {first:#?}"
    );

    // Nothing new upstream: one GET of the ref advertisement and nothing else.
    let before = http_marker(&server, "marker-before");
    assert_eq!(fetch_main(&mut store, &transport()), head);
    let after = http_marker(&server, "marker-after");
    let lines = server.requests();
    let idle = &lines[before + 1..after];
    assert_eq!(
        idle.len(),
        1,
        "an idle fetch is exactly one request: {idle:#?}"
    );
    assert!(
        idle[0].contains("GET /git/infra.git/info/refs?service=git-upload-pack"),
        "{idle:#?}"
    );

    // Something new: fetched over the same URL, still full history.
    let c2 = up.write("app/config.yml", "a: 2\n").commit("second");
    let head2 = fetch_main(&mut store, &transport());
    assert_eq!(head2, oid(&c2));
    assert_eq!(store.commit_count(head2).unwrap(), 2);
}

#[test]
fn credentials_in_an_http_url_never_show() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("a", "1\n").commit("first");
    let server = HttpServer::start(root.path());
    // lighttpd does not ask for credentials here; the URL still carries them.
    let url = server.url(&up).replace("http://", "http://deploy:s3cret@");
    let mut store = Store::open(&root.path().join("stores"), &url).unwrap();
    fetch_main(&mut store, &transport());
    let name = store
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        !name.contains("s3cret") && !name.contains("deploy"),
        "{name}"
    );
    assert!(!store.redacted_url().contains("s3cret"));

    let missing = server.url(&up).replace("infra.git", "nope.git");
    let missing = missing.replace("http://", "http://deploy:s3cret@");
    let mut store = Store::open(&root.path().join("stores"), &missing).unwrap();
    let err = store.fetch(&main_branch(), &transport()).unwrap_err();
    let text = plumb::error::chain(&err);
    assert!(
        text.starts_with(&format!(
            "fetch http://127.0.0.1:{}/git/nope.git: ",
            server.port
        )),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "{text}");
}

fn ssh_transport(server: &SshServer, known_hosts: &Path) -> Transport {
    Transport {
        ssh_key: Some(server.client_key.clone()),
        known_hosts: vec![known_hosts.to_path_buf()],
        ..Transport::default()
    }
}

#[test]
fn ssh_fetch_with_plain_and_hashed_known_hosts() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let c1 = up.write("svc/unit.conf", "x\n").commit("first");
    let server = SshServer::start(root.path());
    let url = server.url(&up);

    let mut store = Store::open(&root.path().join("stores"), &url).unwrap();
    let head = fetch_main(&mut store, &ssh_transport(&server, &server.known_hosts));
    assert_eq!(head, oid(&c1));
    let target = root.path().join("deploy");
    store
        .checkout(
            &target,
            &root.path().join("idx"),
            None,
            head,
            &links(&["svc"]),
        )
        .unwrap();
    assert_eq!(
        fs::read_to_string(target.join("svc/unit.conf")).unwrap(),
        "x\n"
    );

    let hashed = server.hashed_known_hosts();
    let text = fs::read_to_string(&hashed).unwrap();
    assert!(
        text.starts_with("|1|") && !text.contains("127.0.0.1"),
        "{text}"
    );
    let mut other = Store::open(&root.path().join("stores-hashed"), &url).unwrap();
    assert_eq!(
        fetch_main(&mut other, &ssh_transport(&server, &hashed)),
        head
    );

    // The ssh user is no secret: messages keep it.
    assert!(store.redacted_url().starts_with("ssh://root@127.0.0.1:"));
}

#[test]
fn ssh_unknown_or_changed_host_key_is_refused() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("a", "1\n").commit("first");
    let server = SshServer::start(root.path());
    let url = server.url(&up);
    let port = server.port;

    // The host is not in the file at all (only another host is).
    let known = root.path().join("known_hosts");
    let line = fs::read_to_string(&server.known_hosts).unwrap();
    fs::write(
        &known,
        line.replace(&format!("[127.0.0.1]:{port}"), "other.example"),
    )
    .unwrap();
    let mut store = Store::open(&root.path().join("stores"), &url).unwrap();
    let started = Instant::now();
    let err = store
        .fetch(&main_branch(), &ssh_transport(&server, &known))
        .unwrap_err();
    let text = plumb::error::chain(&err);
    assert!(matches!(err, GitError::Refused { .. }), "{err:?}");
    let expected = format!(
        "host key for [127.0.0.1]:{port} not found in {k}; add it with ssh-keyscan -p {port} 127.0.0.1 >> {k}",
        k = known.display()
    );
    assert!(text.contains(&expected), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The host is known with another key.
    let other_key = root.path().join("other_host_key");
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            other_key.to_str().unwrap(),
        ],
    );
    let other_pub = fs::read_to_string(other_key.with_extension("pub")).unwrap();
    let fields: Vec<&str> = other_pub.split_whitespace().collect();
    fs::write(
        &known,
        format!("[127.0.0.1]:{port} {} {}\n", fields[0], fields[1]),
    )
    .unwrap();
    let err = store
        .fetch(&main_branch(), &ssh_transport(&server, &known))
        .unwrap_err();
    let text = plumb::error::chain(&err);
    assert!(
        text.contains(&format!(
            "host key for [127.0.0.1]:{port} does not match {}",
            known.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("SHA256:"),
        "the message shows the offered fingerprint: {text}"
    );

    // A revoked key is refused even when it is also listed as good.
    let good = fs::read_to_string(&server.known_hosts).unwrap();
    let key_part: Vec<&str> = good.split_whitespace().skip(1).collect();
    fs::write(&known, format!("{good}@revoked * {}\n", key_part.join(" "))).unwrap();
    let err = store
        .fetch(&main_branch(), &ssh_transport(&server, &known))
        .unwrap_err();
    assert!(plumb::error::chain(&err).contains("@revoked"), "{err}");

    // A missing known_hosts file refuses too, naming the file.
    let absent = root.path().join("absent_known_hosts");
    let err = store
        .fetch(&main_branch(), &ssh_transport(&server, &absent))
        .unwrap_err();
    assert!(
        plumb::error::chain(&err).contains(&absent.display().to_string()),
        "{err}"
    );

    // Nothing was fetched through any of these.
    assert!(store.resolve("main").is_err());
}

#[test]
fn ssh_missing_or_rejected_key_fails_without_looping() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("a", "1\n").commit("first");
    let server = SshServer::start(root.path());
    let mut store = Store::open(&root.path().join("stores"), &server.url(&up)).unwrap();

    let missing = root.path().join("no-such-key");
    let transport = Transport {
        ssh_key: Some(missing.clone()),
        known_hosts: vec![server.known_hosts.clone()],
        ..Transport::default()
    };
    let started = Instant::now();
    let err = store.fetch(&main_branch(), &transport).unwrap_err();
    assert!(
        plumb::error::chain(&err)
            .contains(&format!("ssh key {} does not exist", missing.display())),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    // A key sshd does not accept: one attempt, then a message naming user, host and key.
    let stranger = root.path().join("stranger_key");
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            stranger.to_str().unwrap(),
        ],
    );
    let transport = Transport {
        ssh_key: Some(stranger.clone()),
        known_hosts: vec![server.known_hosts.clone()],
        ..Transport::default()
    };
    let started = Instant::now();
    let err = store.fetch(&main_branch(), &transport).unwrap_err();
    let text = plumb::error::chain(&err);
    assert!(
        text.contains(&format!(
            "ssh authentication as root to [127.0.0.1]:{} failed; tried key {}",
            server.port,
            stranger.display()
        )),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    // sshd saw the key once; libgit2 was not left to retry it.
    wait_until(
        "sshd to log the refused key",
        Duration::from_secs(10),
        || server.log().contains("Failed publickey"),
    );
    assert_eq!(
        server.log().matches("Failed publickey").count(),
        1,
        "{}",
        server.log()
    );
}

/// Runs a helper program (ssh-keygen), failing the test if it fails.
fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().expect("run tool");
    assert!(status.success(), "{program} {args:?}");
}

#[test]
fn unreachable_upstream_error_names_the_url() {
    let root = temp_root();
    // A port nothing listens on: bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("git://127.0.0.1:{port}/x.git");
    let mut store = Store::open(&root.path().join("stores"), &url).unwrap();
    let err = store.fetch(&main_branch(), &transport()).unwrap_err();
    assert!(!err.is_corruption());
    assert!(
        plumb::error::chain(&err).starts_with(&format!("fetch {url}: ")),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// branches and history of the upstream

#[test]
fn empty_upstream_then_first_push() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let daemon = GitDaemon::start(root.path());
    let mut store = Store::open(&root.path().join("stores"), &daemon.url(&up)).unwrap();
    let report = store
        .fetch(&main_branch(), &transport())
        .expect("an empty upstream is no error");
    assert_eq!(report.heads, BTreeMap::from([("main".to_string(), None)]));

    let c1 = up.write("a", "1\n").commit("first");
    assert_eq!(fetch_main(&mut store, &transport()), oid(&c1));
}

#[test]
fn branch_created_later_and_deleted_upstream() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let c1 = up.write("a", "1\n").commit("first");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    let both = links(&["main", "staging"]);
    let report = store.fetch(&both, &transport()).unwrap();
    assert_eq!(report.heads["main"], Some(oid(&c1)));
    assert_eq!(report.heads["staging"], None);

    up.branch("staging");
    let s1 = up.write("a", "staging\n").commit("on staging");
    let report = store.fetch(&both, &transport()).unwrap();
    assert_eq!(report.heads["main"], Some(oid(&c1)));
    assert_eq!(report.heads["staging"], Some(oid(&s1)));
    assert_eq!(store.resolve("staging").unwrap(), oid(&s1));

    git(&up.bare, &["branch", "-D", "staging"]);
    let report = store.fetch(&both, &transport()).unwrap();
    assert_eq!(
        report.heads["staging"], None,
        "a deleted branch is reported gone"
    );
    assert!(
        store.resolve("staging").is_err(),
        "and its local copy is dropped"
    );
    // its commits stay available (a service may still be deployed at one)
    assert_eq!(store.resolve(&s1[..10]).unwrap(), oid(&s1));

    // A branch name git would refuse is refused before anything goes over the wire.
    let err = store
        .fetch(&links(&["main", "bad..name"]), &transport())
        .unwrap_err();
    assert!(matches!(err, GitError::Branch { .. }), "{err:?}");
    assert_eq!(
        plumb::error::chain(&err),
        format!(
            "fetch {}: branch \"bad..name\": not a valid branch name",
            up.file_url()
        )
    );
}

#[test]
fn force_push_is_followed_and_history_is_full() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let c1 = up.write("a", "1\n").commit("one");
    up.write("a", "2\n").commit("two");
    up.write("a", "3\n").commit("three");
    let daemon = GitDaemon::start(root.path());
    let mut store = Store::open(&root.path().join("stores"), &daemon.url(&up)).unwrap();
    let h = fetch_main(&mut store, &transport());
    assert_eq!(store.commit_count(h).unwrap(), 3);
    assert_eq!(store.commit_count(h).unwrap(), up.rev_count("main"));

    up.force_reset(&c1);
    let rewritten = up.write("a", "rewritten\n").commit("rewritten");
    let h2 = fetch_main(&mut store, &transport());
    assert_eq!(h2, oid(&rewritten));
    assert_eq!(store.commit_count(h2).unwrap(), up.rev_count("main"));
    assert_eq!(store.commit_count(h2).unwrap(), 2);
    // the old head is still in the store for rollback
    assert_eq!(store.resolve(&h.to_string()).unwrap(), h);
    let err = store.resolve("no-such-rev").unwrap_err();
    assert!(plumb::error::chain(&err).contains("no-such-rev"), "{err}");
}

#[test]
fn stores_are_per_url_and_reopen() {
    let root = temp_root();
    let a = Upstream::new(root.path(), "a");
    let b = Upstream::new(root.path(), "b");
    let ca = a.write("f", "a\n").commit("a");
    let cb = b.write("f", "b\n").commit("b");
    let stores = root.path().join("stores");
    let mut sa = Store::open(&stores, &a.file_url()).unwrap();
    let mut sb = Store::open(&stores, &b.file_url()).unwrap();
    assert_ne!(sa.path(), sb.path());
    assert_eq!(fetch_main(&mut sa, &transport()), oid(&ca));
    assert_eq!(fetch_main(&mut sb, &transport()), oid(&cb));
    let path = sa.path().to_path_buf();
    drop(sa);
    let again = Store::open(&stores, &a.file_url()).unwrap();
    assert_eq!(again.path(), path);
    assert_eq!(again.resolve("main").unwrap(), oid(&ca));
    assert!(
        again.resolve(&cb).is_err(),
        "b's commits are not in a's store"
    );
}

// ---------------------------------------------------------------------------------------------
// checkouts

/// One history through every kind of change a service's files can see: r1, then r2 (deletes,
/// renames, mode changes, file <-> directory <-> symlink, deeper trees), then r3 without the
/// service. The store is fetched.
fn three_revisions() -> (tempfile::TempDir, Upstream, [String; 3], Store) {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("svc/keep", "same\n")
        .write("svc/gone", "deleted later\n")
        .write("svc/old-name", "moves\n")
        .write("svc/tool", "#!/bin/sh\n")
        .chmod_exec("svc/tool", true)
        .write("svc/script", "#!/bin/sh\n")
        .symlink("svc/link", "keep")
        .write("svc/becomes-link", "file\n")
        .write("svc/becomes-dir", "file\n")
        .write("svc/dir-becomes-file/inner", "x\n")
        .write("svc/dir-becomes-link/inner", "x\n")
        .write("svc/a/b/c/deep", "deep\n")
        .write("single.conf", "v1\n")
        .write("other/untouched", "not ours\n");
    let r1 = up.commit("r1");
    up.remove("svc/gone")
        .remove("svc/old-name")
        .write("svc/renamed/new-name", "moves\n")
        .chmod_exec("svc/tool", false)
        .chmod_exec("svc/script", true)
        .remove("svc/link")
        .write("svc/link", "now a file\n")
        .symlink("svc/becomes-link", "../single.conf")
        .remove("svc/becomes-dir")
        .write("svc/becomes-dir/f", "in dir\n")
        .remove("svc/dir-becomes-file")
        .write("svc/dir-becomes-file", "now file\n")
        .remove("svc/dir-becomes-link")
        .symlink("svc/dir-becomes-link", "a/b")
        .write("svc/a/b/c/deep", "deeper\n")
        .write("svc/new/deep/file", "new\n")
        .write("single.conf", "v2\n");
    let r2 = up.commit("r2");
    up.remove("svc").remove("single.conf");
    let r3 = up.commit("r3: service removed");

    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store, &transport());
    (root, up, [r1, r2, r3], store)
}

#[test]
fn checkout_forwards_and_backwards_matches_git() {
    for way in Way::ALL {
        let (root, up, [r1, r2, r3], store) = three_revisions();
        let l = links(&["svc", "single.conf"]);
        let target = root.path().join("deploy");
        let index = root.path().join("state/svc.index");
        fs::create_dir_all(target.join("other")).unwrap();
        fs::write(target.join("other/mine"), "outside the links\n").unwrap();

        let steps = [
            (None, &r1),
            (Some(&r1), &r2),
            (Some(&r2), &r1),
            (Some(&r1), &r2),
            (Some(&r2), &r3),
            (Some(&r3), &r1),
            (Some(&r1), &r1),
        ];
        for (previous, rev) in steps {
            way.checkout(
                &store,
                &target,
                &index,
                previous.map(String::as_str),
                rev,
                &l,
            );
            assert_eq!(
                snapshot_links(&target, &l),
                git_checkout(&up, root.path(), rev, &l),
                "after checking out {rev} (from {previous:?})"
            );
            assert_eq!(
                fs::read_to_string(target.join("other/mine")).unwrap(),
                "outside the links\n",
                "files outside the links are not touched"
            );
            assert!(
                !target.join("other/untouched").exists(),
                "paths outside the links are not checked out"
            );
            assert!(
                store
                    .drift(&target, &index, oid(rev), &l)
                    .unwrap()
                    .is_empty(),
                "the index describes {rev}"
            );
        }

        assert!(
            !store.path().join("logs").exists(),
            "checkouts leave no reflog growing in the store"
        );
        // A second service on the same store, at another revision, is independent.
        let target2 = root.path().join("deploy2");
        let index2 = root.path().join("state/svc2.index");
        way.checkout(&store, &target2, &index2, None, &r2, &l);
        assert_eq!(
            snapshot_links(&target2, &l),
            git_checkout(&up, root.path(), &r2, &l)
        );
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), &r1, &l)
        );
        // And checkout_as takes over from checkout_atomic, and back.
        store
            .checkout(&target, &index, Some(oid(&r1)), oid(&r2), &l)
            .unwrap();
        way.checkout(&store, &target, &index, Some(&r2), &r1, &l);
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), &r1, &l)
        );
    }
}

#[test]
fn local_edits_and_strays_are_reverted() {
    for way in Way::ALL {
        let root = temp_root();
        let up = Upstream::new(root.path(), "infra");
        let l = links(&["svc"]);
        up.write("svc/a", "a\n")
            .write("svc/b", "b\n")
            .write("svc/d/c", "c\n")
            .write("svc/.gitignore", "*.log\n");
        let r1 = up.commit("r1");
        let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
        fetch_main(&mut store, &transport());
        let target = root.path().join("deploy");
        let index = root.path().join("idx");
        way.checkout(&store, &target, &index, None, &r1, &l);
        let svc = inode(&target.join("svc"));

        fs::write(target.join("svc/a"), "edited by hand, longer\n").unwrap();
        fs::remove_file(target.join("svc/b")).unwrap();
        fs::write(target.join("svc/stray"), "left here\n").unwrap();
        fs::write(
            target.join("svc/ignored.log"),
            "ignored by git, still a stray\n",
        )
        .unwrap();
        fs::create_dir_all(target.join("svc/d/stray-dir")).unwrap();
        fs::write(target.join("svc/d/stray-dir/f"), "x\n").unwrap();
        fs::create_dir_all(target.join("svc/empty/deeper")).unwrap();
        fs::set_permissions(target.join("svc/d/c"), fs::Permissions::from_mode(0o755)).unwrap();
        way.checkout(&store, &target, &index, Some(&r1), &r1, &l);
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), &r1, &l)
        );
        assert_eq!(inode(&target.join("svc")), svc);

        // A first checkout into a directory full of leftovers (state lost) ends up exact too.
        fs::write(target.join("svc/stray"), "left here\n").unwrap();
        fs::write(target.join("svc/a"), "edited\n").unwrap();
        fs::remove_file(&index).unwrap();
        way.checkout(&store, &target, &index, None, &r1, &l);
        assert_deployed(&store, &up, root.path(), &target, &index, &r1, &l);

        // A damaged index (it is only a cache) or a lock left by a crash does not stop a checkout.
        fs::write(&index, b"DIRC garbage").unwrap();
        fs::write(index.with_extension("lock"), b"").unwrap();
        fs::write(target.join("svc/a"), "edited again\n").unwrap();
        way.checkout(&store, &target, &index, Some(&r1), &r1, &l);
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), &r1, &l)
        );
        assert!(!index.with_extension("lock").exists());
        assert!(
            store
                .drift(&target, &index, oid(&r1), &l)
                .unwrap()
                .is_empty()
        );

        // A previous revision the store does not know is treated like a first checkout.
        fs::write(target.join("svc/stray"), "left here\n").unwrap();
        let unknown = "0123456789012345678901234567890123456789";
        way.checkout(&store, &target, &index, Some(unknown), &r1, &l);
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), &r1, &l)
        );

        if let Way::Atomic = way {
            // A staging directory left by a crash is replaced, not reused: what it holds (here a symlink
            // out of it where the next deploy stages files) is never written through.
            let outside = root.path().join("outside");
            fs::create_dir_all(&outside).unwrap();
            fs::create_dir_all(staging_dir(&target)).unwrap();
            std::os::unix::fs::symlink(&outside, staging_dir(&target).join("svc")).unwrap();
            fs::write(target.join("svc/a"), "edited once more\n").unwrap();
            way.checkout(&store, &target, &index, Some(&r1), &r1, &l);
            assert_eq!(
                snapshot_links(&target, &l),
                git_checkout(&up, root.path(), &r1, &l)
            );
            assert!(snapshot(&outside).is_empty(), "{:?}", snapshot(&outside));
        }
    }
}

#[test]
fn pathspecs_are_literal_whole_components() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("svc1/a", "1\n")
        .write("svc10/a", "10\n")
        .write("etc/x", "etc\n")
        .write("etcd/x", "etcd\n")
        .write("s*/g", "star\n")
        .write("sX/g", "x\n")
        .write("f?", "q\n")
        .write("fa", "a\n");
    let r1 = up.commit("r1");
    up.write("svc10/a", "10b\n")
        .write("etcd/x", "etcd2\n")
        .write("sX/g", "x2\n")
        .write("fa", "a2\n");
    let r2 = up.commit("only the look-alikes change");
    up.write("svc1/a", "1b\n")
        .write("etc/x", "etc2\n")
        .write("s*/g", "star2\n")
        .write("f?", "q2\n");
    let r3 = up.commit("the real ones change");

    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store, &transport());
    let l = links(&["svc1", "etc", "s*", "f?"]);
    assert_eq!(
        store.changed_paths(None, oid(&r1), &l).unwrap(),
        links(&["etc/x", "f?", "s*/g", "svc1/a"]),
        "a first deploy lists everything under the links"
    );
    assert_eq!(
        store.changed_paths(Some(oid(&r1)), oid(&r2), &l).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store.changed_paths(Some(oid(&r2)), oid(&r3), &l).unwrap(),
        links(&["etc/x", "f?", "s*/g", "svc1/a"])
    );
    assert_eq!(
        store
            .changed_paths(Some(oid(&r3)), oid(&r1), &links(&["etcd"]))
            .unwrap(),
        links(&["etcd/x"])
    );

    let target = root.path().join("deploy");
    store
        .checkout(&target, &root.path().join("idx"), None, oid(&r3), &l)
        .unwrap();
    let names: Vec<String> = snapshot(&target).into_keys().collect();
    assert_eq!(
        names,
        links(&["etc", "etc/x", "f?", "s*", "s*/g", "svc1", "svc1/a"])
    );

    assert_eq!(
        store.last_change(oid(&r3), &links(&["svc1"])).unwrap(),
        Some(oid(&r3))
    );
    assert_eq!(
        store.last_change(oid(&r2), &links(&["svc1"])).unwrap(),
        Some(oid(&r1))
    );
    assert_eq!(
        store.last_change(oid(&r2), &links(&["svc10"])).unwrap(),
        Some(oid(&r2))
    );
}

#[test]
fn changed_paths_between_revisions() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("svc/a", "1\n")
        .write("svc/b", "1\n")
        .write("svc/c", "1\n")
        .write("elsewhere", "1\n");
    let r1 = up.commit("r1");
    up.write("svc/a", "2\n")
        .remove("svc/b")
        .chmod_exec("svc/c", true)
        .write("svc/new", "n\n")
        .write("elsewhere", "2\n");
    let r2 = up.commit("r2");
    let r3 = up.write("elsewhere", "3\n").commit("r3");

    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store, &transport());
    let l = links(&["svc"]);
    assert_eq!(
        store.changed_paths(Some(oid(&r1)), oid(&r2), &l).unwrap(),
        links(&["svc/a", "svc/b", "svc/c", "svc/new"])
    );
    assert_eq!(
        store.changed_paths(Some(oid(&r2)), oid(&r1), &l).unwrap(),
        links(&["svc/a", "svc/b", "svc/c", "svc/new"]),
        "backwards too"
    );
    assert!(
        store
            .changed_paths(Some(oid(&r2)), oid(&r3), &l)
            .unwrap()
            .is_empty()
    );
    let unknown = oid("0123456789012345678901234567890123456789");
    assert_eq!(
        store.changed_paths(Some(unknown), oid(&r3), &l).unwrap(),
        links(&["svc/a", "svc/c", "svc/new"]),
        "a previous revision the store lacks counts as a first deploy"
    );
    assert!(matches!(
        store.changed_paths(None, oid(&r3), &links(&["../etc"])),
        Err(GitError::Link { .. })
    ));
}

#[test]
fn last_change_is_the_commit_that_touched_the_links() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let c1 = up
        .write("svc1/a", "1\n")
        .write("svc2/a", "1\n")
        .commit("both");
    let c2 = up.write("svc2/a", "2\n").commit("svc2 only");
    let c3 = up.write("README", "unrelated\n").commit("unrelated");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    let head = fetch_main(&mut store, &transport());
    assert_eq!(head, oid(&c3));
    assert_eq!(
        store.last_change(head, &links(&["svc1"])).unwrap(),
        Some(oid(&c1))
    );
    assert_eq!(
        store.last_change(head, &links(&["svc2"])).unwrap(),
        Some(oid(&c2))
    );
    assert_eq!(
        store.last_change(head, &links(&["svc1", "svc2"])).unwrap(),
        Some(oid(&c2))
    );
    assert_eq!(
        store.last_change(head, &links(&["svc3"])).unwrap(),
        None,
        "never existed"
    );
    // a mode change counts; so does a removal
    let c4 = up.chmod_exec("svc1/a", true).commit("exec bit");
    let c5 = up.write("README", "more\n").commit("unrelated again");
    let head = fetch_main(&mut store, &transport());
    assert_eq!(head, oid(&c5));
    assert_eq!(
        store.last_change(head, &links(&["svc1"])).unwrap(),
        Some(oid(&c4))
    );
    let c6 = up.remove("svc1").commit("svc1 retired");
    up.write("README", "again\n").commit("unrelated");
    let head = fetch_main(&mut store, &transport());
    assert_eq!(
        store.last_change(head, &links(&["svc1"])).unwrap(),
        Some(oid(&c6))
    );

    // A merge: the feature branch changes svc2, main changes README, then merges the branch.
    let clone = up.clone_into(&root.path().join("clone"));
    git(&clone, &["switch", "-q", "-c", "feature"]);
    fs::write(clone.join("svc2/a"), "feature\n").unwrap();
    git(&clone, &["commit", "-qam", "feature changes svc2"]);
    let feature = git(&clone, &["rev-parse", "HEAD"]);
    git(&clone, &["switch", "-q", "main"]);
    fs::write(clone.join("README"), "main moves on\n").unwrap();
    git(&clone, &["commit", "-qam", "main unrelated"]);
    let before_merge = git(&clone, &["rev-parse", "HEAD"]);
    git(
        &clone,
        &["merge", "-q", "--no-ff", "-m", "merge feature", "feature"],
    );
    let merge = git(&clone, &["rev-parse", "HEAD"]);
    let after = {
        fs::write(clone.join("README"), "after merge\n").unwrap();
        git(&clone, &["commit", "-qam", "after merge"]);
        git(&clone, &["rev-parse", "HEAD"])
    };
    git(&clone, &["push", "-q", "origin", "main"]);
    let head = fetch_main(&mut store, &transport());
    assert_eq!(head, oid(&after));
    // On main's first-parent line, svc2 changed with the merge, not with the feature commit.
    assert_eq!(
        store.last_change(head, &links(&["svc2"])).unwrap(),
        Some(oid(&merge))
    );
    assert_ne!(Some(oid(&feature)), Some(oid(&merge)));
    assert_eq!(
        store
            .last_change(oid(&before_merge), &links(&["svc2"]))
            .unwrap(),
        Some(oid(&c2))
    );
}

#[test]
fn planted_symlinks_are_never_followed() {
    for way in Way::ALL {
        let root = temp_root();
        let up = Upstream::new(root.path(), "infra");
        let l = links(&["svc", "nginx/etc"]);
        up.write("svc/conf", "v1\n")
            .write("svc/dir/x", "x1\n")
            .symlink("svc/legit", "conf")
            .write("nginx/etc/nginx.conf", "n1\n");
        let r1 = up.commit("r1");
        up.write("svc/conf", "v2\n")
            .write("svc/dir/y", "y2\n")
            .write("nginx/etc/nginx.conf", "n2\n");
        let r2 = up.commit("r2");
        let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
        fetch_main(&mut store, &transport());
        let target = root.path().join("deploy");
        let index = root.path().join("idx");
        way.checkout(&store, &target, &index, None, &r1, &l);

        // Somewhere the service must never write: it holds files named like the service's.
        let outside = root.path().join("outside");
        fs::create_dir_all(outside.join("etc")).unwrap();
        for name in ["conf", "x", "y", "nginx.conf", "etc/nginx.conf"] {
            fs::write(outside.join(name), "precious\n").unwrap();
        }
        let precious = snapshot(&outside);

        // A tracked file replaced by a symlink, a tracked directory replaced by one, a link's parent
        // replaced by one, and a new symlink where the next revision puts a file.
        fs::remove_file(target.join("svc/conf")).unwrap();
        std::os::unix::fs::symlink(outside.join("conf"), target.join("svc/conf")).unwrap();
        fs::remove_dir_all(target.join("svc/dir")).unwrap();
        std::os::unix::fs::symlink(&outside, target.join("svc/dir")).unwrap();
        fs::remove_dir_all(target.join("nginx")).unwrap();
        std::os::unix::fs::symlink(&outside, target.join("nginx")).unwrap();

        way.checkout(&store, &target, &index, Some(&r1), &r2, &l);
        assert_eq!(
            snapshot(&outside),
            precious,
            "nothing was written through a planted symlink"
        );
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), &r2, &l)
        );
        assert_eq!(
            fs::read_link(target.join("svc/legit")).unwrap(),
            PathBuf::from("conf"),
            "symlinks that are in git stay"
        );

        // Same again with the same revision (nothing changes upstream): still not followed.
        fs::remove_file(target.join("svc/conf")).unwrap();
        std::os::unix::fs::symlink(outside.join("conf"), target.join("svc/conf")).unwrap();
        fs::remove_file(target.join("svc/legit")).unwrap();
        std::os::unix::fs::symlink(&outside, target.join("svc/legit")).unwrap();
        way.checkout(&store, &target, &index, Some(&r2), &r2, &l);
        assert_eq!(snapshot(&outside), precious);
        assert_deployed(&store, &up, root.path(), &target, &index, &r2, &l);
    }
}

#[test]
fn git_symlink_replaced_by_directory_does_not_write_through() {
    for way in Way::ALL {
        let root = temp_root();
        let up = Upstream::new(root.path(), "infra");
        let outside = root.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        let l = links(&["svc"]);
        up.symlink("svc/data", outside.to_str().unwrap())
            .write("svc/f", "1\n");
        let r1 = up.commit("data is a symlink out of the checkout");
        up.remove("svc/data").write("svc/data/file", "inside\n");
        let r2 = up.commit("data becomes a directory");
        let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
        fetch_main(&mut store, &transport());
        let target = root.path().join("deploy");
        let index = root.path().join("idx");
        way.checkout(&store, &target, &index, None, &r1, &l);
        assert_eq!(fs::read_link(target.join("svc/data")).unwrap(), outside);
        way.checkout(&store, &target, &index, Some(&r1), &r2, &l);
        assert!(snapshot(&outside).is_empty(), "{:?}", snapshot(&outside));
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), &r2, &l)
        );
        // And back: svc/data/file is removed from the directory, not through the symlink.
        fs::write(outside.join("file"), "precious\n").unwrap();
        way.checkout(&store, &target, &index, Some(&r2), &r1, &l);
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), &r1, &l)
        );
        assert_eq!(
            fs::read_to_string(outside.join("file")).unwrap(),
            "precious\n"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// all-or-nothing checkouts (`checkout_atomic`)

/// Where `checkout_atomic` stages a revision beside `target`.
fn staging_dir(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".plumb-stage");
    PathBuf::from(name)
}

/// `checkout_atomic` without a service user, which must succeed.
fn deploy(
    store: &Store,
    target: &Path,
    index: &Path,
    previous: Option<&str>,
    rev: &str,
    l: &[String],
) {
    store
        .checkout_atomic(target, index, previous.map(oid), oid(rev), l, None)
        .unwrap_or_else(|e| panic!("checkout_atomic {rev} (from {previous:?}): {e}"));
    assert!(
        !staging_dir(target).exists(),
        "no staging directory is left after a deploy"
    );
}

/// The two ways a checkout moves: libgit2's in place (a fresh checkout for wipe and for the
/// staged copy `check` runs on) and the all-or-nothing deploy. Every scenario holds for both.
#[derive(Debug, Clone, Copy)]
enum Way {
    InPlace,
    Atomic,
}

impl Way {
    const ALL: [Way; 2] = [Way::InPlace, Way::Atomic];

    /// Moves `target` from `previous` to `rev`, which must succeed.
    fn checkout(
        self,
        store: &Store,
        target: &Path,
        index: &Path,
        previous: Option<&str>,
        rev: &str,
        l: &[String],
    ) {
        match self {
            Way::InPlace => store
                .checkout(target, index, previous.map(oid), oid(rev), l)
                .unwrap_or_else(|e| panic!("checkout {rev} (from {previous:?}): {e}")),
            Way::Atomic => deploy(store, target, index, previous, rev, l),
        }
    }
}

/// `target` holds exactly `rev`'s files under `l`, as git checks them out, and the index at
/// `index` describes them: the drift check finds nothing.
fn assert_deployed(
    store: &Store,
    up: &Upstream,
    root: &Path,
    target: &Path,
    index: &Path,
    rev: &str,
    l: &[String],
) {
    assert_eq!(
        snapshot_links(target, l),
        git_checkout(up, root, rev, l),
        "the files of {rev}"
    );
    assert!(
        store.drift(target, index, oid(rev), l).unwrap().is_empty(),
        "the index describes {rev}"
    );
}

/// The inode of `path` itself (a symlink is not followed).
fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
        .ino()
}

/// The newest modification time of the files and symlinks under `dir`.
fn newest_file(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            pending.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            newest = newest.max(meta.modified().unwrap());
        }
    }
    newest
}

/// Runs `git args...` in `dir` with `input` on stdin; returns trimmed stdout.
fn git_with_input(dir: &Path, args: &[&str], input: &str) -> String {
    let mut child = support::git_command(dir)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run git");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "git {args:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Directory bind mounts pin a directory's inode: a deploy that changes, adds and removes files in
/// a link must leave every directory that stays where it was, and unchanged files too.
#[test]
fn atomic_checkout_keeps_directory_inodes() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let l = links(&["nginx/etc", "svc"]);
    up.write("nginx/etc/nginx.conf", "n1\n")
        .write("nginx/etc/mime.types", "same\n")
        .write("nginx/etc/old.conf", "removed later\n")
        .write("nginx/etc/conf.d/a.conf", "a1\n")
        .write("svc/sub/x", "x1\n")
        .write("svc/top", "t\n");
    let r1 = up.commit("r1");
    up.write("nginx/etc/nginx.conf", "n2, longer\n")
        .remove("nginx/etc/old.conf")
        .write("nginx/etc/conf.d/b.conf", "b2\n")
        .write("nginx/etc/new/deep.conf", "d2\n")
        .write("svc/sub/x", "x2\n")
        .write("svc/sub/y", "y2\n");
    let r2 = up.commit("r2");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store, &transport());
    let target = root.path().join("deploy");
    let index = root.path().join("idx");
    deploy(&store, &target, &index, None, &r1, &l);

    let kept = ["nginx", "nginx/etc", "nginx/etc/conf.d", "svc", "svc/sub"];
    let unchanged = ["nginx/etc/mime.types", "nginx/etc/conf.d/a.conf", "svc/top"];
    let inodes =
        |paths: &[&str]| -> Vec<u64> { paths.iter().map(|p| inode(&target.join(p))).collect() };
    let (dirs, files) = (inodes(&kept), inodes(&unchanged));
    let changed = inode(&target.join("nginx/etc/nginx.conf"));
    for (previous, rev) in [(&r1, &r2), (&r2, &r1), (&r1, &r2)] {
        deploy(&store, &target, &index, Some(previous), rev, &l);
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), rev, &l)
        );
        assert_eq!(inodes(&kept), dirs, "directories keep their inode");
        assert_eq!(inodes(&unchanged), files, "unchanged files are not touched");
    }
    assert_ne!(
        inode(&target.join("nginx/etc/nginx.conf")),
        changed,
        "a changed file is a new one, renamed in"
    );
}

/// The index written by a deploy is newer than every file it lists, so the next drift check
/// trusts their stat data: it finds nothing and has nothing to rewrite. A same-size edit made
/// right after the deploy is still seen.
#[test]
fn atomic_checkout_leaves_an_index_the_drift_check_trusts() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "racy");
    let r1 = up
        .write("web/a.conf", "aaaa\n")
        .write("web/b.conf", "bbbb\n")
        .commit("web");
    let r2 = up.write("web/b.conf", "BBBB\n").commit("web b");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store, &transport());
    let web = links(&["web"]);
    let target = root.path().join("deploy");
    let index = root.path().join("web.index");
    for (previous, rev) in [(None, &r1), (Some(&r1), &r2)] {
        deploy(
            &store,
            &target,
            &index,
            previous.map(String::as_str),
            rev,
            &web,
        );
        let written = fs::metadata(&index).unwrap().modified().unwrap();
        let newest = newest_file(&target);
        assert!(
            written > newest,
            "the index ({written:?}) is newer than its files ({newest:?})"
        );
        assert!(
            store
                .drift(&target, &index, oid(rev), &web)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            fs::metadata(&index).unwrap().modified().unwrap(),
            written,
            "a clean drift check finds nothing to refresh"
        );
        let cache = git2::Index::open(&index).unwrap();
        assert_eq!(cache.len(), 2, "the index lists the checkout");
    }
    fs::write(target.join("web/a.conf"), "AAAA\n").unwrap();
    assert_eq!(
        store.drift(&target, &index, oid(&r2), &web).unwrap(),
        vec!["web/a.conf".to_owned()]
    );
}

#[test]
fn atomic_checkout_gives_the_files_to_the_service_user() {
    use std::os::unix::fs::MetadataExt;
    require_root();
    let root = temp_root();
    let nobody = plumb::owner::Owner::lookup("nobody").expect("the nobody user");
    let theirs = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let up = Upstream::new(root.path(), "infra");
    let l = links(&["grafana/etc"]);
    up.write("grafana/etc/grafana.ini", "a\n")
        .symlink("grafana/etc/default.ini", "grafana.ini")
        .write("grafana/etc/provisioning/x.yml", "x\n");
    let r1 = up.commit("one");
    up.write("grafana/etc/grafana.ini", "b\n")
        .write("grafana/etc/new/deeper/y.yml", "y\n");
    let r2 = up.commit("two");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store, &transport());
    let target = root.path().join("deploy");
    let index = root.path().join("idx");
    let owners = |dir: &Path| {
        let mut out = BTreeMap::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(path) = pending.pop() {
            let meta = fs::symlink_metadata(&path).unwrap();
            out.insert(path.clone(), (meta.uid(), meta.gid()));
            if meta.is_dir() {
                pending.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            }
        }
        out
    };
    for (previous, rev) in [(None, &r1), (Some(&r1), &r2)] {
        store
            .checkout_atomic(
                &target,
                &index,
                previous.map(|p| oid(p)),
                oid(rev),
                &l,
                Some("nobody"),
            )
            .unwrap();
        assert_eq!(
            snapshot_links(&target, &l),
            git_checkout(&up, root.path(), rev, &l)
        );
        for (path, owner) in owners(&target) {
            assert_eq!(owner, theirs, "{} belongs to nobody", path.display());
        }
        let cache = git2::Index::open(&index).unwrap();
        for entry in cache.iter() {
            assert_eq!((entry.uid, entry.gid), theirs);
        }
        assert!(
            store
                .drift(&target, &index, oid(rev), &l)
                .unwrap()
                .is_empty()
        );
        assert!(!staging_dir(&target).exists());
    }
    // New directories have git's mode, as checkout_as makes them.
    let mode = |p: &str| fs::metadata(target.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(
        mode("grafana/etc/new/deeper"),
        mode("grafana/etc/provisioning")
    );

    // An unknown user is named, and nothing is written.
    let before = snapshot(&target);
    let index_before = fs::read(&index).unwrap();
    let err = store
        .checkout_atomic(
            &target,
            &index,
            Some(oid(&r2)),
            oid(&r1),
            &l,
            Some("plumb-nobody"),
        )
        .unwrap_err();
    assert!(
        plumb::error::chain(&err).contains("user \"plumb-nobody\": no such user"),
        "{err}"
    );
    assert_eq!(snapshot(&target), before);
    assert_eq!(fs::read(&index).unwrap(), index_before);
}

/// A deploy that does not fit on the checkout's file system fails before it changes anything:
/// the service keeps the old revision whole, not a mix with a truncated file.
#[test]
fn atomic_checkout_on_a_full_file_system_changes_nothing() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let l = links(&["svc"]);
    let v1 = up
        .write("svc/a", "a v1\n")
        .write("svc/b", "b v1\n")
        .commit("v1");
    let v2 = up
        .write("svc/a", "a v2\n")
        .write("svc/b", "b v2\n")
        .write("svc/c", &"c".repeat(2 << 20))
        .commit("v2: 2 MB more");
    let v3 = up
        .write("svc/a", "a v3\n")
        .write("svc/c", &"c".repeat(100 << 10))
        .commit("v3: fits");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store, &transport());

    let mnt = root.path().join("mnt");
    let _tmpfs = Tmpfs::mount(&mnt, "1m");
    let target = mnt.join("checkout");
    let index = mnt.join("state/svc.index");
    deploy(&store, &target, &index, None, &v1, &l);
    let deployed = snapshot(&target);
    let index_bytes = fs::read(&index).unwrap();

    let err = store
        .checkout_atomic(&target, &index, Some(oid(&v1)), oid(&v2), &l, None)
        .unwrap_err();
    assert!(
        plumb::error::chain(&err).contains("No space left on device")
            || plumb::error::chain(&err).contains("no space left"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(target.join("svc/a")).unwrap(), "a v1\n");
    assert_eq!(fs::read_to_string(target.join("svc/b")).unwrap(), "b v1\n");
    assert!(!target.join("svc/c").exists());
    assert_eq!(snapshot(&target), deployed, "nothing live changed");
    assert!(
        !staging_dir(&target).exists(),
        "the staging directory is gone"
    );
    assert_eq!(
        fs::read(&index).unwrap(),
        index_bytes,
        "the index is untouched"
    );
    assert!(
        store
            .drift(&target, &index, oid(&v1), &l)
            .unwrap()
            .is_empty()
    );

    deploy(&store, &target, &index, Some(&v1), &v3, &l);
    assert_deployed(&store, &up, root.path(), &target, &index, &v3, &l);
}

/// A revision libgit2 refuses to write (here a file named `.git`, made with git's plumbing) fails
/// in staging: the live files and the index stay as they were.
#[test]
fn atomic_checkout_refused_by_libgit2_changes_nothing() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let l = links(&["svc"]);
    let r1 = up
        .write("svc/conf", "v1\n")
        .write("svc/other", "o1\n")
        .commit("r1");
    let clone = up.clone_into(&root.path().join("clone"));
    let blob = git_with_input(&clone, &["hash-object", "-w", "--stdin"], "v2\n");
    let svc = git_with_input(
        &clone,
        &["mktree"],
        &format!("100644 blob {blob}\t.git\n100644 blob {blob}\tconf\n"),
    );
    let top = git_with_input(&clone, &["mktree"], &format!("040000 tree {svc}\tsvc\n"));
    let r2 = git(
        &clone,
        &["commit-tree", &top, "-p", &r1, "-m", "a file named .git"],
    );
    git(
        &clone,
        &["push", "-q", "origin", &format!("{r2}:refs/heads/main")],
    );

    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    assert_eq!(fetch_main(&mut store, &transport()), oid(&r2));
    let target = root.path().join("deploy");
    let index = root.path().join("idx");
    deploy(&store, &target, &index, None, &r1, &l);
    let deployed = snapshot(&target);
    let index_bytes = fs::read(&index).unwrap();

    let err = store
        .checkout_atomic(&target, &index, Some(oid(&r1)), oid(&r2), &l, None)
        .unwrap_err();
    assert!(plumb::error::chain(&err).contains(".git"), "{err}");
    assert_eq!(snapshot(&target), deployed, "nothing live changed");
    assert_eq!(
        fs::read(&index).unwrap(),
        index_bytes,
        "the index is untouched"
    );
    assert!(!staging_dir(&target).exists());

    // A staging directory that cannot be made (its parent is a file) fails the same way.
    let blocked = root.path().join("blocked");
    fs::write(&blocked, "a file where the checkout's parent should be\n").unwrap();
    let err = store
        .checkout_atomic(&blocked.join("deploy"), &index, None, oid(&r1), &l, None)
        .unwrap_err();
    assert!(plumb::error::chain(&err).contains("blocked"), "{err}");
    assert_eq!(
        fs::read(&index).unwrap(),
        index_bytes,
        "the index is untouched"
    );
}

// ---------------------------------------------------------------------------------------------
// damage, cancellation

fn damaged_copies(stores: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(stores)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".git.damaged-"))
        .collect();
    out.sort();
    out
}

#[test]
fn damaged_store_is_set_aside_and_fetched_again() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("svc/a", "1\n").commit("one");
    let c2 = up.write("svc/a", "2\n").commit("two");
    let stores = root.path().join("stores");
    let target = root.path().join("deploy");
    let index = root.path().join("idx");
    let l = links(&["svc"]);

    let mut store = Store::open(&stores, &up.file_url()).unwrap();
    let head = fetch_main(&mut store, &transport());
    store.checkout(&target, &index, None, head, &l).unwrap();
    let path = store.path().to_path_buf();
    drop(store);
    let deployed = snapshot(&target);

    // 1. Garbage configuration: the store cannot be opened.
    fs::write(path.join("config"), "[core\n\0garbage").unwrap();
    let mut store = Store::open(&stores, &up.file_url()).expect("open heals");
    assert_eq!(damaged_copies(&stores).len(), 1);
    assert!(
        damaged_copies(&stores)[0].join("config").exists(),
        "the damaged copy is kept"
    );
    assert_eq!(fetch_main(&mut store, &transport()), oid(&c2));
    assert_eq!(store.commit_count(oid(&c2)).unwrap(), 2);
    drop(store);

    // 2. Objects lost after a fetch: branches point at nothing.
    fs::remove_dir_all(path.join("objects/pack")).unwrap();
    for entry in fs::read_dir(path.join("objects")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().len() == 2 {
            fs::remove_dir_all(entry.path()).unwrap();
        }
    }
    let mut store = Store::open(&stores, &up.file_url()).expect("open heals");
    assert_eq!(damaged_copies(&stores).len(), 2);
    assert_eq!(fetch_main(&mut store, &transport()), oid(&c2));
    assert_eq!(store.commit_count(oid(&c2)).unwrap(), 2);
    drop(store);

    // 3. A pack file cut short (a disk error): its objects cannot be read.
    let pack = fs::read_dir(path.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .expect("a pack after fetching");
    let len = fs::metadata(&pack).unwrap().len();
    // git writes packs read-only; only root could write one as it is.
    fs::set_permissions(&pack, fs::Permissions::from_mode(0o644)).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let mut store = Store::open(&stores, &up.file_url()).expect("open heals");
    assert_eq!(damaged_copies(&stores).len(), 3);
    assert_eq!(fetch_main(&mut store, &transport()), oid(&c2));
    assert_eq!(store.commit_count(oid(&c2)).unwrap(), 2);
    drop(store);

    // 4. Garbage HEAD and branch reference: the store opens (neither is needed to open it), and
    //    the fetch, which reads them, finds the damage, sets the store aside and starts over.
    fs::write(path.join("HEAD"), "garbage\n").unwrap();
    fs::write(path.join("refs/remotes/origin/main"), "not a hash\n").unwrap();
    let mut store = Store::open(&stores, &up.file_url()).expect("open");
    assert_eq!(damaged_copies(&stores).len(), 3);
    assert_eq!(fetch_main(&mut store, &transport()), oid(&c2));
    assert_eq!(store.resolve("main").unwrap(), oid(&c2));
    assert_eq!(damaged_copies(&stores).len(), 4);

    // 5. Damage found after opening (objects vanish under an open store): the next fetch heals.
    for entry in fs::read_dir(path.join("objects/pack")).unwrap() {
        fs::remove_file(entry.unwrap().path()).unwrap();
    }
    for entry in fs::read_dir(path.join("objects")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().len() == 2 {
            fs::remove_dir_all(entry.path()).unwrap();
        }
    }
    let fetched = fetch_main(&mut store, &transport());
    assert_eq!(damaged_copies(&stores).len(), 5);
    assert_eq!(fetched, oid(&c2));
    assert_eq!(store.commit_count(fetched).unwrap(), 2);
    store
        .checkout(&target, &index, Some(head), fetched, &l)
        .unwrap();

    // 6. An object missing deep inside history (a subtree): reading it fails and says the store
    //    is damaged; the next fetch heals even though every branch head is still there.
    let packs: Vec<PathBuf> = fs::read_dir(path.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let saved_pack = root.path().join("saved.pack");
    for p in &packs {
        if p.extension().is_some_and(|e| e == "pack") {
            fs::rename(p, &saved_pack).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }
    let status = support::git_command(&path)
        .arg("unpack-objects")
        .arg("-q")
        .stdin(fs::File::open(&saved_pack).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "git unpack-objects");
    let subtree = git(&path, &["rev-parse", &format!("{c2}:svc")]);
    fs::remove_file(path.join("objects").join(&subtree[..2]).join(&subtree[2..])).unwrap();
    let mut store = Store::open(&stores, &up.file_url()).expect("open: the heads are all there");
    assert_eq!(damaged_copies(&stores).len(), 5);
    let file_link = links(&["svc/a"]);
    let err = store.last_change(oid(&c2), &file_link).unwrap_err();
    assert!(err.is_corruption(), "{err:?}");
    assert!(
        plumb::error::chain(&err).contains(&subtree),
        "the message names the missing object: {err}"
    );
    assert_eq!(fetch_main(&mut store, &transport()), oid(&c2));
    assert_eq!(damaged_copies(&stores).len(), 6);
    assert_eq!(
        store.last_change(oid(&c2), &file_link).unwrap(),
        Some(oid(&c2))
    );

    // The deployed files were never touched by any of this.
    assert_eq!(snapshot(&target), deployed);
}

#[test]
fn cancel_and_timeout_stop_a_fetch() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    for i in 0..5 {
        up.write(&format!("f{i}"), &format!("{i}\n"))
            .commit(&format!("c{i}"));
    }
    let daemon = GitDaemon::start(root.path());
    let mut store = Store::open(&root.path().join("stores"), &daemon.url(&up)).unwrap();

    let cancelled = Transport {
        cancel: Arc::new(AtomicBool::new(true)),
        ..Transport::default()
    };
    let err = store.fetch(&main_branch(), &cancelled).unwrap_err();
    assert!(matches!(err, GitError::Cancelled { .. }), "{err:?}");
    assert_eq!(
        plumb::error::chain(&err),
        format!("fetch {}: cancelled", daemon.url(&up))
    );

    let hurried = Transport {
        timeout: Some(Duration::ZERO),
        ..Transport::default()
    };
    let err = store.fetch(&main_branch(), &hurried).unwrap_err();
    assert!(matches!(err, GitError::TimedOut { .. }), "{err:?}");
    assert!(
        plumb::error::chain(&err).contains("timed out after"),
        "{err}"
    );
    assert!(
        store.resolve("main").is_err(),
        "nothing half-fetched became a branch"
    );

    // Neither left anything behind that gets in the way of the next fetch.
    let head = fetch_main(&mut store, &transport());
    assert_eq!(store.commit_count(head).unwrap(), up.rev_count("main"));
}

#[test]
fn a_broken_upstream_sets_no_store_aside() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("svc/a", "1\n").commit("one");
    let stores = root.path().join("stores");
    let mut store = Store::open(&stores, &up.file_url()).unwrap();
    fetch_main(&mut store, &transport());

    let c2 = up.write("svc/a", "two, broken upstream\n").commit("two");
    let blob = git(&up.bare, &["rev-parse", &format!("{c2}:svc/a")]);
    let loose = up.bare.join("objects").join(&blob[..2]).join(&blob[2..]);
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&loose, b"this is not zlib data").unwrap();

    // The upstream's own git says the upstream is broken: the store is not damaged and is not
    // set aside, however often the fetch is tried.
    for _ in 0..3 {
        let err = store.fetch(&main_branch(), &transport()).unwrap_err();
        assert!(!err.is_corruption(), "{err:?}");
        let text = plumb::error::chain(&err);
        assert!(
            text.starts_with(&format!("fetch {}: ", up.file_url())) && text.contains("upload-pack"),
            "{text}"
        );
    }
    assert_eq!(damaged_copies(&stores).len(), 0);

    // Once the upstream is repaired, fetching works again, with full history.
    let c1 = git(&up.bare, &["rev-parse", "main~1"]);
    up.force_reset(&c1);
    let c3 = up.write("svc/a", "three\n").commit("three");
    assert_eq!(fetch_main(&mut store, &transport()), oid(&c3));
    assert_eq!(store.commit_count(oid(&c3)).unwrap(), 2);
}

#[test]
fn submodules_are_not_deployed() {
    for way in Way::ALL {
        let root = temp_root();
        let up = Upstream::new(root.path(), "infra");
        let c1 = up.write("svc/conf", "1\n").commit("one");
        let clone = up.clone_into(&root.path().join("clone"));
        git(
            &clone,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("160000,{c1},svc/sub"),
            ],
        );
        git(&clone, &["commit", "-qm", "a submodule inside the service"]);
        git(&clone, &["push", "-q", "origin", "main"]);
        let c2 = git(&clone, &["rev-parse", "HEAD"]);
        let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
        assert_eq!(fetch_main(&mut store, &transport()), oid(&c2));
        let l = links(&["svc"]);
        assert!(
            store
                .changed_paths(Some(oid(&c1)), oid(&c2), &l)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.changed_paths(None, oid(&c2), &l).unwrap(),
            links(&["svc/conf"])
        );
        let target = root.path().join("deploy");
        let index = root.path().join("idx");
        for (previous, rev) in [(None, &c1), (Some(&c1), &c2), (Some(&c2), &c1), (None, &c2)] {
            way.checkout(
                &store,
                &target,
                &index,
                previous.map(String::as_str),
                rev,
                &l,
            );
            assert_eq!(
                snapshot_links(&target, &l),
                git_checkout(&up, root.path(), rev, &l),
                "after {rev}"
            );
        }
    }
}

/// A checkout writes its files and then its index within the same clock tick, so git cannot trust
/// the index's stat data and would read every file at every drift check ("racy git"). The first
/// clean check writes the index again, later than the files; a same-size edit made after that is
/// still seen.
#[test]
fn a_clean_drift_check_makes_the_index_newer_than_its_files() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "racy");
    let head = oid(&up
        .write("web/a.conf", "aaaa\n")
        .write("web/b.conf", "bbbb\n")
        .commit("web"));
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    assert_eq!(fetch_main(&mut store, &Transport::default()), head);
    let web = links(&["web"]);
    let target = root.path().join("deploy");
    let index = root.path().join("web.index");
    store.checkout(&target, &index, None, head, &web).unwrap();
    let newest_file = ["web/a.conf", "web/b.conf"]
        .iter()
        .map(|f| fs::metadata(target.join(f)).unwrap().modified().unwrap())
        .max()
        .unwrap();
    // Let the clock move past the files' modification time, as the next tick would.
    wait_until(
        "the clock to pass the checkout",
        Duration::from_secs(5),
        || std::time::SystemTime::now() > newest_file,
    );
    assert!(store.drift(&target, &index, head, &web).unwrap().is_empty());
    let written = fs::metadata(&index).unwrap().modified().unwrap();
    assert!(
        written > newest_file,
        "the index ({written:?}) is newer than its files ({newest_file:?})"
    );
    let mut cache = git2::Index::open(&index).unwrap();
    cache.read(true).unwrap();
    assert_eq!(cache.len(), 2, "the index still lists the checkout");

    // An edit of the same size, after the index was written: still local edits.
    wait_until(
        "the clock to pass the index",
        Duration::from_secs(5),
        || std::time::SystemTime::now() > written,
    );
    fs::write(target.join("web/a.conf"), "AAAA\n").unwrap();
    assert_eq!(
        store.drift(&target, &index, head, &web).unwrap(),
        vec!["web/a.conf".to_owned()]
    );
}

#[test]
fn fetch_timeout_is_a_deadline_for_the_whole_fetch() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "slow");
    // Random, so it does not compress: at 640 bytes a second its pack would take many minutes.
    let noise: String = (0..200_000)
        .map(|_| char::from(b"0123456789abcdef"[fastrand::usize(..16)]))
        .collect();
    up.write("svc/blob", &noise).commit("big");
    let server = HttpServer::start(root.path());
    let port = Relay::start(server.port, Relaying::Trickle).port;
    let url = server
        .url(&up)
        .replace(&server.port.to_string(), &port.to_string());
    let mut store = Store::open(&root.path().join("stores"), &url).unwrap();
    let limit = Duration::from_secs(2);
    let started = Instant::now();
    let err = store
        .fetch(
            &main_branch(),
            &Transport {
                timeout: Some(limit),
                ..Transport::default()
            },
        )
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, GitError::TimedOut { .. }), "{err:?}");
    assert_eq!(
        plumb::error::chain(&err),
        format!("fetch {url}: timed out after 2s"),
        "{err}"
    );
    // The deadline, plus at most one wait of a transport between two looks at it.
    assert!(took < limit + Duration::from_secs(2), "took {took:?}");
    assert!(
        store.resolve("main").is_err(),
        "nothing half-fetched became a branch"
    );
}
