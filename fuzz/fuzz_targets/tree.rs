//! A tree object from a hostile git host: any bytes, stored as the tree of a service's link, then
//! inspected as the daemon does before a checkout. Nothing may panic, and whatever the inspection
//! lets through must be a tree on which a checkout and the inspection agree about every path:
//! every entry a good name (`name_problem`), in git's order, once.

#![no_main]

use std::cell::RefCell;
use std::cmp::Ordering;

use git2::{ObjectType, Oid, Repository, Signature};
use libfuzzer_sys::fuzz_target;
use plumb::git::{Limits, Store, name_problem};

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    repo: Repository,
    /// Inputs written into this store so far.
    used: u32,
}

/// Inputs per store: every input adds objects, so a long run starts afresh now and then to keep
/// its memory flat (libFuzzer stops at its RSS limit).
const INPUTS_PER_STORE: u32 = 5_000;

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(dir.path(), "https://git.example/infra.git").expect("a store");
    let repo = Repository::open_bare(store.path()).expect("the store's repository");
    Fixture {
        _dir: dir,
        store,
        repo,
        used: 0,
    }
}

/// The root tree `svc/<data>`: the fuzzed tree as the directory of the link `svc`.
fn commit_of(repo: &Repository, tree: Oid) -> Oid {
    let odb = repo.odb().unwrap();
    let mut root = b"40000 svc\0".to_vec();
    root.extend_from_slice(tree.as_bytes());
    let root = odb.write(ObjectType::Tree, &root).unwrap();
    let root = repo.find_tree(root).unwrap();
    let sig = Signature::new("fuzz", "fuzz@example", &git2::Time::new(0, 0)).unwrap();
    repo.commit(None, &sig, &sig, "fuzz", &root, &[]).unwrap()
}

/// Git's order: by name, a tree's name compared as if it ended in `/`.
fn order(a: &(Vec<u8>, bool), b: &(Vec<u8>, bool)) -> Ordering {
    let key = |(name, tree): &(Vec<u8>, bool)| {
        let mut k = name.clone();
        if *tree {
            k.push(b'/');
        }
        k
    };
    key(a).cmp(&key(b))
}

fuzz_target!(|data: &[u8]| {
    FIXTURE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_some_and(|f| f.used >= INPUTS_PER_STORE) {
            *cell = None;
        }
        let f = cell.get_or_insert_with(fixture);
        f.used += 1;
        let Ok(tree) = f.repo.odb().unwrap().write(ObjectType::Tree, data) else {
            return;
        };
        let commit = commit_of(&f.repo, tree);
        let limits = Limits {
            max_file_size: 1 << 20,
        };
        if f.store.inspect(commit, &["svc".to_owned()], &limits).is_err() {
            return;
        }
        // Let through: then libgit2 parses it, and its entries are what fsck accepts.
        let Ok(parsed) = f.repo.find_tree(tree) else {
            return;
        };
        let entries: Vec<(Vec<u8>, bool)> = parsed
            .iter()
            .map(|e| (e.name_bytes().to_vec(), e.filemode_raw() == 0o040000))
            .collect();
        for (name, _) in &entries {
            assert_eq!(name_problem(name), None, "accepted entry {name:?}");
        }
        for pair in entries.windows(2) {
            assert_eq!(order(&pair[0], &pair[1]), Ordering::Less, "accepted {pair:?}");
        }
    });
});
