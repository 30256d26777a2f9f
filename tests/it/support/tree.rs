//! The ONE snapshot of a directory tree the tests compare checkouts with: [`Node`] is what a path
//! is, [`snapshot`] and [`snapshot_links`] read a tree into a map of them, and [`git_checkout`]
//! makes the expected tree with the real git client, so the engine is compared with git itself.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use plumb::git::under_links;

use super::{Upstream, git};

/// What a path in a directory is, as an operator would see it with `ls -l` and `cat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory (its entries are paths of their own).
    Dir,
    /// A regular file: its content, and whether any execute bit is set.
    File { content: String, exec: bool },
    /// A symlink and its target, never followed.
    Symlink(PathBuf),
}

/// Everything under `root` (never following symlinks), keyed by relative path; `.git` is skipped.
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let entry = entry.expect("read_dir entry");
            if entry.file_name() == ".git" {
                continue;
            }
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            if meta.file_type().is_symlink() {
                out.insert(rel, Node::Symlink(fs::read_link(&path).expect("readlink")));
            } else if meta.is_dir() {
                out.insert(rel, Node::Dir);
                walk(root, &path, out);
            } else {
                let content = fs::read_to_string(&path).expect("read file");
                let exec = meta.permissions().mode() & 0o111 != 0;
                out.insert(rel, Node::File { content, exec });
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// [`snapshot`] restricted to `links`.
pub fn snapshot_links(root: &Path, links: &[String]) -> BTreeMap<String, Node> {
    snapshot(root)
        .into_iter()
        .filter(|(path, _)| under_links(path, links))
        .collect()
}

/// What the real git client checks out for `rev` of `up`, restricted to `links`. The clone is
/// made once per revision under `scratch` and reused.
pub fn git_checkout(
    up: &Upstream,
    scratch: &Path,
    rev: &str,
    links: &[String],
) -> BTreeMap<String, Node> {
    let dir = scratch.join(format!("git-checkout-{rev}"));
    if !dir.exists() {
        let (bare, to) = (up.bare.to_str().unwrap(), dir.to_str().unwrap());
        git(scratch, &["clone", "-q", "--no-checkout", bare, to]);
        let detach = [
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "-q",
            "--detach",
            rev,
        ];
        git(&dir, &detach);
    }
    snapshot_links(&dir, links)
}
