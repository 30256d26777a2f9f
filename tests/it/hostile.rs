//! A hostile (or careless) repository against the git engine: symlinks out of a service's links,
//! submodules, oversized files, ownership of deployed files, and a revision of 100,000 files; and
//! a hostile service user, who owns its checkout and swaps its directories for symlinks while
//! plumb works in it. Real repositories made by the real git, real checkouts on disk, a real
//! unprivileged user; every test checks what an operator would see: the files in the checkout,
//! the files outside it, the error message.
//!
//! Memory figures (a 1 GB file, 100,000 files, through the `plumb` binary) are printed by
//! `bench/hostile-memory.sh`, not asserted here.

use crate::support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use plumb::git::{GitError, Limits, Oid, Store, Transport};
use plumb::owner::{Owner, chown_tree};
use support::{
    Accounts, Node, Upstream, git, git_checkout, git_command, require_root, snapshot,
    snapshot_links, temp_root,
};

// ---------------------------------------------------------------------------------------------
// helpers

fn links(l: &[&str]) -> Vec<String> {
    l.iter().map(|s| s.to_string()).collect()
}

fn oid(hash: &str) -> Oid {
    Oid::from_str(hash).expect("a commit hash")
}

/// Fetches `main` and returns its head.
fn fetch_main(store: &mut Store) -> Oid {
    let report = store
        .fetch(&links(&["main"]), &Transport::default())
        .expect("fetch main");
    report.heads["main"].expect("main exists upstream")
}

/// What the daemon does with a new revision: inspect it, and check it out only if that passes.
fn deploy(
    store: &Store,
    target: &Path,
    index: &Path,
    previous: Option<Oid>,
    rev: Oid,
    l: &[String],
) -> Result<(), GitError> {
    store.inspect(rev, l, &Limits::default())?;
    store.checkout(target, index, previous, rev, l)
}

/// Commits symlinks `(target, path)` given as raw bytes (names git takes but a `&str` cannot
/// hold) on top of the upstream's branch, through a clone of its own; returns the commit.
fn commit_raw(up: &Upstream, scratch: &Path, symlinks: &[(&[u8], &[u8])]) -> String {
    let clone = tempfile::tempdir_in(scratch).unwrap();
    let dir = clone.path().join("c");
    git(
        scratch,
        &[
            "clone",
            "-q",
            up.bare.to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
    );
    let mut info = Vec::new();
    for (target, path) in symlinks {
        let mut hash = git_command(&dir)
            .args(["hash-object", "-w", "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        hash.stdin.take().unwrap().write_all(target).unwrap();
        let out = hash.wait_with_output().unwrap();
        assert!(out.status.success());
        info.extend_from_slice(b"120000 ");
        info.extend_from_slice(out.stdout.trim_ascii());
        info.extend_from_slice(b" 0\t");
        info.extend_from_slice(path);
        info.push(b'\n');
    }
    let mut update = git_command(&dir)
        .args(["update-index", "--index-info"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    update.stdin.take().unwrap().write_all(&info).unwrap();
    assert!(update.wait().unwrap().success());
    git(&dir, &["commit", "-qm", "raw symlinks"]);
    git(&dir, &["push", "-q", "origin", "HEAD:main"]);
    git(&dir, &["rev-parse", "HEAD"])
}

// ---------------------------------------------------------------------------------------------
// symlinks

/// One hostile change to the upstream: what it does, the path the refusal must name, and words
/// the reason must contain.
struct Case {
    change: fn(&Upstream),
    path: &'static str,
    reason: &'static str,
}

#[test]
fn escaping_symlinks_are_refused_and_the_checkout_stays() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let l = links(&["nginx/etc", "app"]);
    up.write("nginx/etc/nginx.conf", "n1\n")
        .write("nginx/etc/sites-available/default", "server {}\n")
        .write("nginx/README", "not deployed\n")
        .write("app/conf", "a1\n");
    let r1 = up.commit("good");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    assert_eq!(fetch_main(&mut store), oid(&r1));
    let target = root.path().join("deploy");
    let index = root.path().join("idx");
    deploy(&store, &target, &index, None, oid(&r1), &l).unwrap();
    let good = snapshot(&target);
    assert_eq!(
        snapshot_links(&target, &l),
        git_checkout(&up, root.path(), &r1, &l)
    );

    let cases = [
        Case {
            // The issue's example: up and out of the checkout.
            change: |up| {
                up.symlink("nginx/etc/x", "../../../etc/shadow");
            },
            path: "nginx/etc/x",
            reason: "symlink to \"../../../etc/shadow\" leaves nginx/etc",
        },
        Case {
            change: |up| {
                up.symlink("nginx/etc/abs", "/etc/shadow");
            },
            path: "nginx/etc/abs",
            reason: "symlink to \"/etc/shadow\" is absolute",
        },
        Case {
            change: |up| {
                up.symlink("nginx/etc/a", "b/../../c");
            },
            path: "nginx/etc/a",
            reason: "leaves nginx/etc",
        },
        Case {
            // Lands back inside the checkout, but the link is mounted on its own (on /etc/nginx,
            // say): from there `../etc/nginx.conf` is /etc/etc/nginx.conf.
            change: |up| {
                up.symlink("nginx/etc/back", "../etc/nginx.conf");
            },
            path: "nginx/etc/back",
            reason: "leaves nginx/etc",
        },
        Case {
            // Into another link of the same service: a different mount on the machine.
            change: |up| {
                up.symlink("nginx/etc/app", "../../app/conf");
            },
            path: "nginx/etc/app",
            reason: "leaves nginx/etc",
        },
        Case {
            // Each symlink alone stays inside; followed as the kernel does, the pair leaves.
            change: |up| {
                up.symlink("nginx/etc/here", ".")
                    .symlink("nginx/etc/chain", "here/../x");
            },
            path: "nginx/etc/chain",
            reason: "leaves nginx/etc",
        },
        Case {
            change: |up| {
                up.symlink("nginx/etc/sub/up", "..")
                    .symlink("nginx/etc/sneak", "sub/up/../../shadow");
            },
            path: "nginx/etc/sneak",
            reason: "leaves nginx/etc",
        },
        Case {
            change: |up| {
                up.symlink("nginx/etc/deep/abs", "/etc")
                    .symlink("nginx/etc/via", "deep/abs/shadow");
            },
            path: "nginx/etc/via",
            reason: "goes through nginx/etc/deep/abs (a symlink to \"/etc\"), which leaves",
        },
        Case {
            change: |up| {
                up.symlink("nginx/etc/loop1", "loop2")
                    .symlink("nginx/etc/loop2", "loop1");
            },
            path: "nginx/etc/loop",
            reason: "too many levels of symbolic links",
        },
        Case {
            // A link that is a symlink: its mount would follow it from the checkout's directory.
            change: |up| {
                up.remove("app").symlink("app", "nginx/etc");
            },
            path: "app",
            reason: "the link itself is a symlink",
        },
    ];
    for case in &cases {
        (case.change)(&up);
        let bad = up.commit("hostile");
        assert_eq!(fetch_main(&mut store), oid(&bad));
        let err = deploy(&store, &target, &index, Some(oid(&r1)), oid(&bad), &l).unwrap_err();
        let msg = plumb::error::chain(&err);
        assert!(matches!(err, GitError::Hostile { .. }), "{msg}");
        assert!(
            msg.contains(&format!("refusing {bad}: {}", case.path)),
            "{msg}"
        );
        assert!(msg.contains(case.reason), "{msg}");
        assert!(!err.is_corruption());
        assert_eq!(snapshot(&target), good, "nothing of {bad} was checked out");
        up.force_reset(&r1);
    }

    // The same pair under a directory whose name is not UTF-8: still followed, still refused.
    let bad = commit_raw(
        &up,
        root.path(),
        &[
            (b"..", b"nginx/etc/\xff/up"),
            (b"up/../../shadow", b"nginx/etc/\xff/sneak"),
        ],
    );
    fetch_main(&mut store);
    let err = deploy(&store, &target, &index, Some(oid(&r1)), oid(&bad), &l).unwrap_err();
    assert!(
        plumb::error::chain(&err)
            .contains("nginx/etc/\u{fffd}/sneak: symlink to \"up/../../shadow\" leaves nginx/etc"),
        "{err}"
    );
    assert_eq!(snapshot(&target), good);
    up.force_reset(&r1);

    // The full message, as the daemon's BROKEN state shows it.
    up.symlink("nginx/etc/x", "../../../etc/shadow");
    let bad = up.commit("hostile");
    fetch_main(&mut store);
    let err = store
        .inspect(oid(&bad), &l, &Limits::default())
        .unwrap_err();
    assert_eq!(
        plumb::error::chain(&err),
        format!(
            "{}: refusing {bad}: nginx/etc/x: symlink to \"../../../etc/shadow\" leaves nginx/etc",
            up.file_url()
        )
    );
    // The same symlink outside the service's links is not the service's business.
    store
        .inspect(oid(&bad), &links(&["app"]), &Limits::default())
        .unwrap();
}

#[test]
fn symlinks_staying_inside_are_deployed() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let l = links(&["nginx/etc", "nginx/etc/conf.d", "single.conf"]);
    up.write("nginx/etc/nginx.conf", "n1\n")
        .write("nginx/etc/sites-available/default", "server {}\n")
        .write("nginx/etc/conf.d/a.conf", "a\n")
        .write("single.conf", "s\n")
        .symlink(
            "nginx/etc/sites-enabled/default",
            "../sites-available/default",
        )
        .symlink("nginx/etc/same", "nginx.conf")
        .symlink("nginx/etc/dot", "./nginx.conf")
        .symlink("nginx/etc/self", ".")
        .symlink("nginx/etc/dangling", "missing/file")
        .symlink("nginx/etc/sub", "sites-available")
        .symlink("nginx/etc/through", "sub/../nginx.conf")
        .symlink("nginx/etc/conf.d/b.conf", "a.conf")
        .symlink("nginx/etc/conf.d/up", "./x/../a.conf");
    let r1 = up.commit("symlinks that stay inside their link");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store);
    let target = root.path().join("deploy");
    let index = root.path().join("idx");
    deploy(&store, &target, &index, None, oid(&r1), &l).unwrap();
    assert_eq!(
        snapshot_links(&target, &l),
        git_checkout(&up, root.path(), &r1, &l)
    );
    assert_eq!(
        fs::read_to_string(target.join("nginx/etc/sites-enabled/default")).unwrap(),
        "server {}\n"
    );

    // `conf.d` is a link of its own (mounted somewhere else): leaving it is refused even though
    // the target is inside `nginx/etc`.
    up.symlink("nginx/etc/conf.d/main", "../nginx.conf");
    let r2 = up.commit("out of the inner link");
    fetch_main(&mut store);
    let err = deploy(&store, &target, &index, Some(oid(&r1)), oid(&r2), &l).unwrap_err();
    assert!(
        plumb::error::chain(&err).contains(
            "nginx/etc/conf.d/main: symlink to \"../nginx.conf\" leaves nginx/etc/conf.d"
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// sizes

#[test]
fn oversized_files_are_refused_from_their_size_alone() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    let l = links(&["svc"]);
    let limits = Limits {
        max_file_size: 1024,
    };
    up.write("svc/at-limit", &"x".repeat(1024))
        .write("elsewhere/big", &"y".repeat(4096));
    let r1 = up.commit("at the limit; big outside the links");
    up.write("svc/big", &"z".repeat(1025));
    let r2 = up.commit("one byte over");
    // A symlink no kernel takes (longer than PATH_MAX), so it is made with git alone.
    let clone = up.clone_into(&root.path().join("clone"));
    fs::write(root.path().join("long"), "a/".repeat(2500)).unwrap();
    let blob = git(
        &clone,
        &[
            "hash-object",
            "-w",
            root.path().join("long").to_str().unwrap(),
        ],
    );
    git(&clone, &["rm", "-q", "svc/big"]);
    git(
        &clone,
        &[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("120000,{blob},svc/long"),
        ],
    );
    git(&clone, &["commit", "-qm", "a symlink no kernel takes"]);
    git(&clone, &["push", "-q", "origin", "main"]);
    let r3 = git(&clone, &["rev-parse", "HEAD"]);
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store);
    store.inspect(oid(&r1), &l, &limits).unwrap();
    let err = store.inspect(oid(&r2), &l, &limits).unwrap_err();
    assert!(
        plumb::error::chain(&err).ends_with(
            "svc/big: file of 1025 bytes (1.0 KiB) is larger than max_file_size (1 KiB)"
        ),
        "{err}"
    );
    let err = store.inspect(oid(&r3), &l, &limits).unwrap_err();
    assert!(
        plumb::error::chain(&err).ends_with(
            "svc/long: symlink target of 5000 bytes (4.9 KiB) is longer than a path can be"
        ),
        "{err}"
    );
    // The default is generous for configuration.
    store.inspect(oid(&r2), &l, &Limits::default()).unwrap();
    assert_eq!(Limits::default().max_file_size, 256 << 20);
}

// ---------------------------------------------------------------------------------------------
// submodules

#[test]
fn gitlinks_are_ignored_and_never_fetched() {
    let root = temp_root();
    // Where the submodule claims to live: nothing may ever connect here.
    let trap = TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let port = trap.local_addr().unwrap().port();

    let up = Upstream::new(root.path(), "infra");
    let l = links(&["svc"]);
    up.write("svc/conf", "1\n")
        .write("svc/sub/file", "a directory first\n");
    let r1 = up.commit("plain files");
    let gitmodules = format!(
        "[submodule \"sub\"]\n\tpath = svc/sub\n\turl = git://127.0.0.1:{port}/sub.git\n\
         [submodule \"sub2\"]\n\tpath = svc/sub2\n\turl = http://127.0.0.1:{port}/sub2.git\n"
    );
    up.remove("svc/sub").write(".gitmodules", &gitmodules);
    up.commit("the submodule's config");
    // Gitlinks to commits that exist nowhere, as the real git records them.
    let clone = up.clone_into(&root.path().join("clone"));
    for (path, commit) in [
        ("svc/sub", "1111111111111111111111111111111111111111"),
        ("svc/sub2", "2222222222222222222222222222222222222222"),
    ] {
        git(
            &clone,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("160000,{commit},{path}"),
            ],
        );
    }
    git(&clone, &["commit", "-qm", "submodules inside the service"]);
    git(&clone, &["push", "-q", "origin", "main"]);
    let r2 = git(&clone, &["rev-parse", "HEAD"]);

    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    assert_eq!(fetch_main(&mut store), oid(&r2));
    let target = root.path().join("deploy");
    let index = root.path().join("idx");
    deploy(&store, &target, &index, None, oid(&r1), &l).unwrap();
    deploy(&store, &target, &index, Some(oid(&r1)), oid(&r2), &l).unwrap();
    // The rest deployed; a submodule is at most an empty directory.
    assert_eq!(fs::read_to_string(target.join("svc/conf")).unwrap(), "1\n");
    for sub in ["svc/sub", "svc/sub2"] {
        let path = target.join(sub);
        if path.exists() {
            assert!(path.is_dir() && !path.is_symlink(), "{sub}");
            assert_eq!(fs::read_dir(&path).unwrap().count(), 0, "{sub} is empty");
        }
    }
    assert!(
        store
            .drift(&target, &index, oid(&r2), &l)
            .unwrap()
            .is_empty()
    );
    let changed = store.changed_paths(Some(oid(&r1)), oid(&r2), &l).unwrap();
    assert!(changed.contains(&"svc/sub/file".to_owned()), "{changed:?}");
    // A fresh checkout straight to the submodules, and back.
    let fresh = root.path().join("fresh");
    deploy(
        &store,
        &fresh,
        &root.path().join("idx2"),
        None,
        oid(&r2),
        &l,
    )
    .unwrap();
    assert_eq!(fs::read_to_string(fresh.join("svc/conf")).unwrap(), "1\n");
    deploy(&store, &target, &index, Some(oid(&r2)), oid(&r1), &l).unwrap();
    assert_eq!(
        snapshot_links(&target, &l),
        git_checkout(&up, root.path(), &r1, &l)
    );
    assert_eq!(
        trap.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "nothing connected to the submodule's URL"
    );
}

// ---------------------------------------------------------------------------------------------
// ownership

/// Every entry under `dir` (itself included, symlinks not followed) with its owner.
fn owners(dir: &Path) -> BTreeMap<String, (u32, u32)> {
    let mut out = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        let rel = path
            .strip_prefix(dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.insert(rel, (meta.uid(), meta.gid()));
        if meta.is_dir() {
            pending.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

#[test]
fn checkout_gives_the_files_to_the_service_user() {
    require_root();
    let root = temp_root();
    let nobody = Owner::lookup("nobody").expect("the nobody user");
    let theirs = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let up = Upstream::new(root.path(), "infra");
    let l = links(&["grafana/etc", "grafana/dashboards"]);
    up.write("grafana/etc/grafana.ini", "a\n")
        .write("grafana/etc/provisioning/x.yml", "x\n")
        .write("grafana/bin/run", "#!/bin/sh\n")
        .chmod_exec("grafana/bin/run", true)
        .symlink("grafana/etc/default.ini", "grafana.ini")
        .write("grafana/dashboards/a.json", "{}\n");
    let r1 = up.commit("one");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store);
    let target = root.path().join("deploy");
    let index = root.path().join("idx");
    store.inspect(oid(&r1), &l, &Limits::default()).unwrap();
    store
        .checkout_as(&target, &index, None, oid(&r1), &l, Some("nobody"))
        .unwrap();
    let got = owners(&target);
    assert_eq!(got.len(), 9, "{got:?}");
    for (path, owner) in &got {
        assert_eq!(*owner, theirs, "{path:?} belongs to nobody");
    }
    // The stat cache knows the new owners: the drift check trusts it rather than reading files.
    let cache = git2::Index::open(&index).unwrap();
    assert_eq!(cache.len(), 4);
    for entry in cache.iter() {
        assert_eq!((entry.uid, entry.gid), theirs);
    }
    assert!(
        store
            .drift(&target, &index, oid(&r1), &l)
            .unwrap()
            .is_empty()
    );

    // An update: new and changed files are the user's too; untouched ones are not touched again.
    let before = fs::symlink_metadata(target.join("grafana/dashboards/a.json")).unwrap();
    up.write("grafana/etc/grafana.ini", "b\n")
        .write("grafana/etc/new/y.yml", "y\n");
    let r2 = up.commit("two");
    fetch_main(&mut store);
    // Not in place by libgit2, which writes by path: the user could swap a path under it.
    let given = snapshot(&target);
    let err = store
        .checkout_as(
            &target,
            &index,
            Some(oid(&r1)),
            oid(&r2),
            &l,
            Some("nobody"),
        )
        .unwrap_err();
    assert!(matches!(err, GitError::HeldTarget { .. }), "{err}");
    assert!(
        err.to_string().ends_with(&format!(
            "{} belongs to uid {}, who could swap a path libgit2 writes through",
            target.display(),
            theirs.0
        )),
        "{err}"
    );
    assert_eq!(snapshot(&target), given);
    store
        .checkout_atomic(
            &target,
            &index,
            Some(oid(&r1)),
            oid(&r2),
            &l,
            Some("nobody"),
        )
        .unwrap();
    for (path, owner) in owners(&target) {
        assert_eq!(owner, theirs, "{path:?} belongs to nobody");
    }
    let after = fs::symlink_metadata(target.join("grafana/dashboards/a.json")).unwrap();
    assert_eq!(
        (before.ino(), before.ctime(), before.ctime_nsec()),
        (after.ino(), after.ctime(), after.ctime_nsec())
    );
    assert!(
        store
            .drift(&target, &index, oid(&r2), &l)
            .unwrap()
            .is_empty()
    );

    // An unknown user is named, and nothing is written.
    let other = root.path().join("other");
    let err = store
        .checkout_as(
            &other,
            &root.path().join("idx3"),
            None,
            oid(&r2),
            &l,
            Some("plumb-nobody"),
        )
        .unwrap_err();
    assert!(
        plumb::error::chain(&err).contains("user \"plumb-nobody\": no such user"),
        "{err}"
    );
    assert!(!other.exists());
}

#[test]
fn chown_never_follows_a_symlink() {
    require_root();
    let root = temp_root();
    let nobody = Owner::lookup("nobody").unwrap();
    let tree = root.path().join("tree");
    let outside = root.path().join("outside");
    fs::create_dir_all(tree.join("d")).unwrap();
    fs::create_dir_all(outside.join("dir")).unwrap();
    fs::write(outside.join("file"), "precious\n").unwrap();
    fs::write(tree.join("d/f"), "mine\n").unwrap();
    std::os::unix::fs::symlink(outside.join("file"), tree.join("to-file")).unwrap();
    std::os::unix::fs::symlink(outside.join("dir"), tree.join("d/to-dir")).unwrap();
    // Another name of the same file (a user may link their own files, or any where
    // fs.protected_hardlinks is off): the file is not the tree's to give.
    fs::hard_link(outside.join("file"), tree.join("d/linked")).unwrap();
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode();
    let modes = [mode(&tree.join("d/f")), mode(&outside.join("file"))];
    assert_eq!(chown_tree(&tree, &nobody).unwrap(), 5);
    assert_eq!(chown_tree(&tree, &nobody).unwrap(), 0, "already theirs");
    let theirs = (nobody.uid.as_raw(), nobody.gid.as_raw());
    for (path, owner) in owners(&tree) {
        let expected = if path == "d/linked" { (0, 0) } else { theirs };
        assert_eq!(owner, expected, "{path:?}");
    }
    for (path, owner) in owners(&outside) {
        assert_eq!(owner, (0, 0), "{path:?} outside stays root's");
    }
    // Mode bits are left as they were.
    assert_eq!(
        modes,
        [mode(&tree.join("d/f")), mode(&outside.join("file"))]
    );
}

// ---------------------------------------------------------------------------------------------
// size of the tree

#[test]
fn a_hundred_thousand_files_deploy() {
    require_root();
    const DIRS: usize = 100;
    const FILES: usize = 1000;
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    // One commit of 100,000 files straight into the upstream (fast-import: seconds, not minutes).
    let mut import = git_command(&up.bare)
        .args(["fast-import", "--quiet"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stream = std::io::BufWriter::new(import.stdin.take().unwrap());
        writeln!(stream, "commit refs/heads/main").unwrap();
        writeln!(
            stream,
            "committer plumb test <t@example.invalid> 1700000000 +0000"
        )
        .unwrap();
        writeln!(stream, "data 4\nmany").unwrap();
        for d in 0..DIRS {
            for f in 0..FILES {
                let content = format!("file {d} {f}\n");
                writeln!(stream, "M 100644 inline svc/d{d:03}/f{f:04}.conf").unwrap();
                writeln!(stream, "data {}\n{content}", content.len()).unwrap();
            }
        }
        writeln!(stream, "M 100644 inline other/x\ndata 2\nx\n").unwrap();
    }
    assert!(import.wait().unwrap().success());

    let l = links(&["svc"]);
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    let head = fetch_main(&mut store);

    let target = root.path().join("deploy");
    let index = root.path().join("idx");
    let t = Instant::now();
    store.inspect(head, &l, &Limits::default()).unwrap();
    let inspected = t.elapsed();
    store
        .checkout_as(&target, &index, None, head, &l, Some("nobody"))
        .unwrap();
    let checked_out = t.elapsed();
    assert!(store.drift(&target, &index, head, &l).unwrap().is_empty());
    eprintln!(
        "100,000 files: inspect {inspected:?}, inspect + checkout + chown {checked_out:?}, drift {:?}",
        t.elapsed() - checked_out
    );

    // What a user notices: every file there, with its content, and nothing else.
    let mut count = 0;
    for d in 0..DIRS {
        let dir = target.join(format!("svc/d{d:03}"));
        count += fs::read_dir(&dir).unwrap().count();
        let f = FILES - 1;
        assert_eq!(
            fs::read_to_string(dir.join(format!("f{f:04}.conf"))).unwrap(),
            format!("file {d} {f}\n")
        );
    }
    assert_eq!(count, DIRS * FILES);
    assert_eq!(fs::read_dir(&target).unwrap().count(), 1, "only svc/");
    assert_eq!(
        fs::symlink_metadata(target.join("svc/d042/f0042.conf"))
            .unwrap()
            .uid(),
        Owner::lookup("nobody").unwrap().uid.as_raw()
    );
}

// ---------------------------------------------------------------------------------------------
// trees git's fsck refuses

#[test]
fn trees_git_fsck_refuses_are_refused_over_the_network() {
    require_root();
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("nginx/etc/nginx.conf", "n1\n")
        .write("other/conf", "o\n");
    let good = up.commit("good");
    let gitd = support::GitDaemon::start(root.path());
    let http = support::HttpServer::start(root.path());
    let l = links(&["nginx/etc"]);

    let conf = up.write_literally("blob", b"n1\n");
    let shadow = up.write_literally("blob", b"/etc/shadow");
    let other = git(&up.bare, &["rev-parse", &format!("{good}:other")]);
    let etc_ok = |extra: &[(&str, &[u8], &str)]| {
        let mut entries = vec![("100644", &b"nginx.conf"[..], conf.as_str())];
        entries.extend_from_slice(extra);
        up.raw_tree(&entries)
    };
    let nginx_with = |etc: &str| up.raw_tree(&[("40000", b"etc", etc)]);
    let root_with = |nginx: &str, extra: &[(&str, &[u8], &str)]| {
        let mut entries = vec![("40000", &b"nginx"[..], nginx)];
        entries.extend_from_slice(extra);
        entries.push(("40000", b"other", other.as_str()));
        up.raw_tree(&entries)
    };
    let in_etc = |extra: &[(&str, &[u8], &str)]| root_with(&nginx_with(&etc_ok(extra)), &[]);
    let fine_nginx = nginx_with(&etc_ok(&[]));

    // (the root tree, the path the refusal names, words of its reason)
    let cases: Vec<(String, &str, &str)> = vec![
        // The report's example: a symlink at the root whose name is a path under the link.
        (
            root_with(&fine_nginx, &[("120000", b"nginx/etc/pwn", &shadow)]),
            "nginx/etc/pwn",
            "could be taken for nginx/etc: its name holds `/`",
        ),
        // A file entry named `etc/x` inside a subtree.
        (
            root_with(
                &up.raw_tree(&[("40000", b"etc", &etc_ok(&[])), ("100644", b"etc/x", &conf)]),
                &[],
            ),
            "nginx/etc/x",
            "could be taken for nginx/etc: its name holds `/`",
        ),
        (
            in_etc(&[("100644", b"sub/x", &conf)]),
            "nginx/etc/sub/x",
            "a name holding `/`",
        ),
        (
            in_etc(&[("100644", b".", &conf)]),
            "nginx/etc/.",
            "`.` or `..`",
        ),
        (
            in_etc(&[("40000", b"..", &fine_nginx)]),
            "nginx/etc/..",
            "`.` or `..`",
        ),
        (
            in_etc(&[("40000", b".GiT", &fine_nginx)]),
            "nginx/etc/.GiT",
            "the name `.git`",
        ),
        (
            in_etc(&[("100644", b"nginx.conf", &shadow)]),
            "nginx/etc/nginx.conf",
            "two entries named \"nginx.conf\"",
        ),
        (
            in_etc(&[("40000", b"nginx.conf", &fine_nginx)]),
            "nginx/etc/nginx.conf",
            "two entries named \"nginx.conf\"",
        ),
        (
            in_etc(&[("100600", b"x", &conf)]),
            "nginx/etc/x",
            "mode 100600, which git does not write",
        ),
        (
            root_with(
                &nginx_with(&up.raw_tree(&[("100644", b"z", &conf), ("100644", b"a", &conf)])),
                &[],
            ),
            "nginx/etc/a",
            "out of git's order",
        ),
        // Twice the link's directory on the way down: which one is the link?
        (
            up.raw_tree(&[
                ("40000", b"nginx", &fine_nginx),
                (
                    "40000",
                    b"nginx",
                    &nginx_with(&etc_ok(&[("120000", b"pwn", &shadow)])),
                ),
            ]),
            "nginx",
            "the directory holds two entries of that name",
        ),
    ];

    let servers = [gitd.url(&up), http.url(&up)];
    for (i, (tree, path, reason)) in cases.iter().enumerate() {
        let url = &servers[i % servers.len()];
        let stores = root.path().join(format!("stores-{i}"));
        let mut store = Store::open(&stores, url).unwrap();
        let target = root.path().join(format!("deploy-{i}"));
        let index = root.path().join(format!("idx-{i}"));
        let fetched = store.fetch(&links(&["main"]), &Transport::default());
        assert!(fetched.is_ok(), "{fetched:?}\n{}", http.log());
        deploy(&store, &target, &index, None, oid(&good), &l).unwrap();
        let before = snapshot(&target);

        let commit = up.commit_tree(tree, &good, "crafted");
        let fetched = store.fetch(&links(&["main"]), &Transport::default());
        assert!(fetched.is_ok(), "case {i} over {url}: {fetched:?}");
        let head = fetched.unwrap().heads["main"].unwrap();
        assert_eq!(head, oid(&commit), "case {i}: fetched over {url}");
        match deploy(&store, &target, &index, Some(oid(&good)), head, &l) {
            Err(GitError::Hostile {
                path: p, reason: r, ..
            }) => {
                assert_eq!(p, *path, "case {i}: the refusal names the entry ({r})");
                assert!(r.contains(reason), "case {i}: {r:?} says {reason:?}");
            }
            other => panic!("case {i} ({path}) over {url}: expected a refusal, got {other:?}"),
        }
        assert_eq!(snapshot(&target), before, "case {i}: the checkout stays");
        up.set_main(&good);
    }
}

/// A `file://` upstream whose head holds a tree with an entry of an empty name, which git's own
/// `upload-pack` (what plumb fetches `file://` through) refuses to send: every fetch fails, saying
/// so, and no copy of the store is set aside, however often the store is opened again, as the
/// daemon does per poll.
#[test]
fn a_broken_file_upstream_sets_no_store_aside() {
    let root = temp_root();
    let up = Upstream::new(root.path(), "infra");
    up.write("nginx/etc/nginx.conf", "n1\n");
    let good = up.commit("good");
    let conf = up.write_literally("blob", b"n1\n");
    let etc = up.raw_tree(&[("100644", b"", &conf)]);
    let nginx = up.raw_tree(&[("40000", b"etc", &etc)]);
    let broken_root = up.raw_tree(&[("40000", b"nginx", &nginx)]);
    let broken = up.commit_tree(&broken_root, &good, "empty name");
    up.set_main(&good);

    let stores = root.path().join("stores");
    let set_aside = || {
        fs::read_dir(&stores)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().contains(".damaged-")
            })
            .count()
    };
    let fetch = || {
        Store::open(&stores, &up.file_url())
            .unwrap()
            .fetch(&links(&["main"]), &Transport::default())
    };
    fetch().expect("the good head fetches");

    up.set_main(&broken);
    // The upstream's own git refuses to send the tree: that is the upstream's condition, not
    // damage of the store, which stays in place however often the fetch is tried.
    for poll in 0..5 {
        let err = fetch().expect_err("a tree with an empty name cannot be fetched");
        assert!(
            plumb::error::chain(&err).contains("upload-pack"),
            "poll {poll}: {err}"
        );
        assert!(!err.is_corruption(), "poll {poll}: {err:?}");
    }
    assert_eq!(set_aside(), 0);

    up.set_main(&good);
    fetch().expect("the good head fetches again");
    assert_eq!(set_aside(), 0);
}

/// The service's user owns the checkout and may swap a directory of it for a symlink to any
/// directory while plumb gives the tree to them: whatever the timing, nothing outside the tree
/// changes owner (the walk goes by directory descriptor, never by path).
#[test]
fn chown_survives_a_user_swapping_directories_for_symlinks() {
    require_root();
    let root = temp_root();
    let nobody = Owner::lookup("nobody").unwrap();
    let tree = root.path().join("tree");
    let outside = root.path().join("outside");
    fs::create_dir_all(outside.join("sub")).unwrap();
    fs::write(outside.join("precious"), "root's\n").unwrap();
    fs::write(outside.join("sub/precious"), "root's\n").unwrap();
    for i in 0..20 {
        fs::create_dir_all(tree.join(format!("d/{i}"))).unwrap();
        fs::write(tree.join(format!("d/{i}/f")), "x\n").unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (tree, outside, stop) = (tree.clone(), outside.clone(), stop.clone());
        std::thread::spawn(move || {
            let (d, real) = (tree.join("d"), tree.join("d.real"));
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // d -> a symlink to outside, then back to the real directory.
                // Each state held a moment, so a walk by path meets both often.
                let hold = std::time::Duration::from_micros(fastrand::u64(0..300));
                if fs::rename(&d, &real).is_ok() {
                    let _ = std::os::unix::fs::symlink(&outside, &d);
                    std::thread::sleep(hold);
                    let _ = fs::remove_file(&d);
                    let _ = fs::rename(&real, &d);
                    swaps += 1;
                }
                std::thread::sleep(hold);
            }
            swaps
        })
    };
    for _ in 0..1000 {
        // Each run either completes or fails on a directory that vanished mid-walk; both are fine,
        // what matters is what it changed.
        let _ = chown_tree(&tree, &nobody);
        // Give the tree back to root, so the next run has work to do.
        let _ = Command::new("chown")
            .args(["-hR", "0:0"])
            .arg(&tree)
            .status();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 100, "only {swaps} swaps happened");
    for (path, owner) in owners(&outside) {
        assert_eq!(owner, (0, 0), "{path:?} outside the tree changed owner");
    }
}

/// The service's user at work, as a perl script (perl comes with git): swaps the directory
/// `$ARGV[0]` for a symlink to `$ARGV[1]` and back as fast as it can, holding each state a random
/// moment, and leaves a stray file and directory in the real one each time (what a deploy removes).
/// Prints how many swaps it made when terminated.
const SWAPPER: &str = r#"
$| = 1;
my ($dir, $to) = @ARGV;
my $real = "$dir.real";
my $swaps = 0;
$SIG{TERM} = sub { print "$swaps\n"; exit 0 };
while (1) {
    if (rename $dir, $real) {
        if (open(my $f, '>', "$real/stray")) { close $f }
        mkdir "$real/straydir";
        if (open(my $f, '>', "$real/straydir/f")) { close $f }
        symlink $to, $dir;
        select(undef, undef, undef, rand 0.0003);
        unlink $dir;
        rename $real, $dir;
        $swaps++;
    }
    select(undef, undef, undef, rand 0.0003);
}
"#;

/// [`SWAPPER`] running as a user; killed when dropped, so a failing test leaves no process behind.
struct Swapper(Option<std::process::Child>);

impl Swapper {
    fn start(owner: &Owner, dir: &Path, to: &Path) -> Swapper {
        use std::os::unix::process::CommandExt;
        let child = Command::new("perl")
            .args(["-e", SWAPPER])
            .arg(dir)
            .arg(to)
            .uid(owner.uid.as_raw())
            .gid(owner.gid.as_raw())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run perl as the service's user");
        Swapper(Some(child))
    }

    /// Stops it; returns how many swaps it made.
    fn stop(mut self) -> u64 {
        let child = self.0.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        said.trim()
            .parse()
            .unwrap_or_else(|_| panic!("the swapper said {said:?} ({})", out.status))
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Everything under `dir` (itself included, symlinks not followed): what it is, its owner, inode
/// and change time. Any write, removal, rename or chown there changes it.
fn stat_tree(dir: &Path) -> BTreeMap<String, (Node, u32, u32, u64, i64, i64)> {
    let nodes = snapshot(dir);
    let mut out = BTreeMap::new();
    for (rel, node) in nodes.into_iter().chain([(String::new(), Node::Dir)]) {
        let meta = fs::symlink_metadata(dir.join(&rel)).unwrap();
        let stat = (
            meta.uid(),
            meta.gid(),
            meta.ino(),
            meta.ctime(),
            meta.ctime_nsec(),
        );
        out.insert(rel, (node, stat.0, stat.1, stat.2, stat.3, stat.4));
    }
    out
}

/// The service's user owns its checkout and swaps a directory of it for a symlink to a
/// directory only root may change, in a tight loop, while deploys run (items a deploy writes,
/// replaces, removes and prunes, and strays the user leaves). Whatever the timing, nothing in
/// that directory is deleted, written or given to the user: plumb works on the checkout by
/// directory descriptor, never through a path the user can change. A deploy either ends
/// correctly or fails saying what it was doing; once the user stops, the next one puts the
/// revision back exactly.
#[test]
fn deploys_never_reach_through_a_directory_the_user_swapped_for_a_symlink() {
    require_root();
    let root = temp_root();
    let mut accounts = Accounts::new();
    let user = accounts.user("plumbsvc", &[]);
    let owner = Owner::lookup(&user).unwrap();
    let theirs = (owner.uid.as_raw(), owner.gid.as_raw());

    let up = Upstream::new(root.path(), "infra");
    let l = links(&["svc"]);
    up.write("svc/top.conf", "t\n")
        .write("svc/d/keep.conf", "1\n")
        .write("svc/d/old.conf", "old\n")
        .write("svc/d/sub/x", "x\n");
    let r1 = up.commit("one");
    up.write("svc/d/keep.conf", "2\n")
        .remove("svc/d/old.conf")
        .remove("svc/d/sub")
        .write("svc/d/new.conf", "new\n")
        .write("svc/d/sub2/y", "y\n");
    let r2 = up.commit("two: a file changed, one gone, one new, a directory gone, one new");
    let mut store = Store::open(&root.path().join("stores"), &up.file_url()).unwrap();
    fetch_main(&mut store);

    // Root's, with an entry of every name a deploy writes, replaces or removes in `svc/d`.
    let outside = root.path().join("outside");
    for name in [
        "keep.conf",
        "old.conf",
        "new.conf",
        "sub/x",
        "sub2/y",
        "stray",
        "straydir/f",
    ] {
        let path = outside.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "root's\n").unwrap();
    }
    let untouched = stat_tree(&outside);

    // The checkout's parent is root's, as plumb's `checkouts/` is.
    let target = root.path().join("checkouts/svc");
    let index = root.path().join("idx");
    let deploy = |previous: &str, rev: &str| {
        store.checkout_atomic(
            &target,
            &index,
            Some(oid(previous)),
            oid(rev),
            &l,
            Some(&user),
        )
    };
    store
        .checkout_atomic(&target, &index, None, oid(&r1), &l, Some(&user))
        .unwrap();
    assert_eq!(owners(&target)["svc/d"], theirs);

    let swapper = Swapper::start(&owner, &target.join("svc/d"), &outside);
    let (mut done, mut failed) = (0, BTreeMap::<String, usize>::new());
    let mut deployed = r1.clone();
    for i in 0..1000 {
        let rev = if i % 2 == 0 { &r2 } else { &r1 };
        match deploy(&deployed, rev) {
            Ok(()) => {
                done += 1;
                deployed = rev.clone();
            }
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        GitError::CheckoutIo { .. }
                            | GitError::Checkout { .. }
                            | GitError::Owner { .. }
                    ),
                    "{e}"
                );
                *failed.entry(e.to_string()).or_default() += 1;
            }
        }
        assert_eq!(
            stat_tree(&outside),
            untouched,
            "deploy {i} ({rev}) reached outside the checkout"
        );
    }
    let swaps = swapper.stop();
    eprintln!("{swaps} swaps; {done} deploys done; failures: {failed:#?}");
    assert!(swaps > 300, "only {swaps} swaps happened");
    assert!(done > 0, "no deploy ended while the user swapped");

    // The user stopped, whatever state it left: the next deploy ends with exactly the revision.
    deploy(&deployed, &r2).unwrap();
    assert_eq!(
        snapshot_links(&target, &l),
        git_checkout(&up, root.path(), &r2, &l)
    );
    for (path, owner) in owners(&target) {
        assert_eq!(owner, theirs, "{path:?} is the service user's");
    }
    assert!(
        store
            .drift(&target, &index, oid(&r2), &l)
            .unwrap()
            .is_empty()
    );
    assert_eq!(stat_tree(&outside), untouched);
}
