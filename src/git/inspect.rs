//! What a revision must not contain before any of it is checked out: the defence against a hostile
//! (or careless) repository. [`Store::inspect`] reads only trees and object headers, so it is cheap
//! even for a revision of 100,000 files, and it loads no file content except symlink targets (which
//! are size-checked first).
//!
//! - **Symlinks stay inside their link.** Each `link` is bind-mounted on its own somewhere on the
//!   machine, so a symlink is resolved from wherever its link is mounted, not from the checkout. A
//!   symlink is refused when its target is absolute, or when resolving it from its own directory
//!   ever goes above the innermost link that holds it, even if it comes back down later
//!   (`../etc/x` in `nginx/etc` reads `/etc/etc/x` once `nginx/etc` is mounted on `/etc/nginx`).
//!   Symlinks met on the way are followed inside the revision's tree, as the kernel would follow
//!   them on disk, so a chain (`d -> .` with `a -> d/../x`) cannot escape where each link alone
//!   looks harmless. A link that is itself a symlink is refused: its mount would follow it from
//!   the checkout's directory. A loop (more than 40 symlinks followed) is refused too.
//! - **No file larger than [`Limits::max_file_size`].** libgit2 reads a whole blob into memory to
//!   write it (it has no streaming read for packed objects), so the limit bounds what one checkout
//!   costs. Sizes come from the object headers ([`git2::Odb::read_header`]), never from content.
//! - **Submodules (gitlinks) are skipped**: they are never fetched, and the checkout only makes an
//!   empty directory for one.
//! - **Every tree is one git's fsck accepts.** Under the links, an entry must have a name that is a
//!   single path component ([`name_problem`]: not empty, `.`, `..`, `.git` in any case, and no `/`
//!   or NUL), a mode git writes, and a place in git's order, once per directory. On the way down to
//!   a link, no other entry may be taken for it: none with the link's next component as its name,
//!   or as the start of a name holding `/`. libgit2 matches a checkout's paths as whole strings
//!   (`good/etc/pwn` at the root is "under `good/etc`" to it) while this walk goes one component at
//!   a time; on trees that pass, the two cannot disagree about what a path is. A tree libgit2
//!   cannot parse at all is refused the same way: its content is bad, the store is not damaged.

use std::cmp::Ordering;
use std::collections::{HashSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use git2::{ErrorClass, ErrorCode, ObjectType, Odb, Oid, Repository, Tree};

use super::{GitError, Store};

/// Git's mode for a symlink.
const SYMLINK_MODE: i32 = 0o120000;
/// Git's mode for a gitlink (submodule).
const GITLINK_MODE: i32 = 0o160000;
/// Git's mode for a tree.
const TREE_MODE: i32 = 0o040000;
/// Longest symlink target Linux accepts (`PATH_MAX` including the terminating NUL).
const MAX_SYMLINK_TARGET: usize = 4095;
/// Symlinks followed while resolving one symlink before it counts as a loop (Linux's `ELOOP`).
const MAX_SYMLINK_HOPS: usize = 40;
/// Git's modes for a file: regular, executable, and the group-writable one early gits wrote (fsck
/// still accepts it; libgit2 checks it out as a regular file).
const FILE_MODES: [i32; 3] = [0o100644, 0o100755, 0o100664];

/// Why git's fsck refuses `name` as a tree entry's name, `None` when it is a good one. This is
/// plumb's one notion of a path component: a revision is checked out only when every name under
/// a service's links passes (see the module doc).
pub fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("an empty name")
    } else if name == b"." || name == b".." {
        Some("a name that is `.` or `..`")
    } else if name.eq_ignore_ascii_case(b".git") {
        Some("the name `.git`")
    } else if name.contains(&b'/') {
        Some("a name holding `/`")
    } else if name.contains(&0) {
        Some("a name holding NUL")
    } else {
        None
    }
}

/// Whether git writes entries of mode `raw` (as stored, before libgit2 normalises it).
fn mode_known(raw: i32) -> bool {
    FILE_MODES.contains(&raw) || matches!(raw, SYMLINK_MODE | TREE_MODE | GITLINK_MODE)
}

/// Git's order of tree entries: by name, a tree's name compared as if it ended in `/`.
fn git_order(a: &[u8], a_tree: bool, b: &[u8], b_tree: bool) -> Ordering {
    let a = a.iter().copied().chain(a_tree.then_some(b'/'));
    a.cmp(b.iter().copied().chain(b_tree.then_some(b'/')))
}

/// The largest file [`Limits::default`] lets through: 256 MiB.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 256 << 20;

/// What a revision may hold and still be checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest blob (file or symlink) under a service's links, in bytes; a revision with a
    /// larger one is refused. A checkout holds a whole blob in memory while writing it, so this
    /// bounds the daemon's memory per checkout. `u64::MAX` means no limit.
    pub max_file_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_size: DEFAULT_MAX_FILE_SIZE,
        }
    }
}

impl Store {
    /// Refuses revision `head` for a service with `links` when what is under them could harm the
    /// machine or the daemon (see the module doc): a symlink that leaves its link, a link that is
    /// itself a symlink, a file larger than `limits.max_file_size`. Reads trees and object headers
    /// only; submodules are skipped; links absent from the revision are skipped (nothing to check
    /// out there). Call it before every checkout of `head`: on an error, nothing of `head` may be
    /// checked out.
    pub fn inspect(&self, head: Oid, links: &[String], limits: &Limits) -> Result<(), GitError> {
        super::history::validate_links(links)?;
        let root = self
            .repo
            .find_commit(head)
            .map_err(|e| self.object_error(head, e))?
            .tree()
            .map_err(|e| self.reached_error(head, e))?;
        let odb = self.repo.odb().map_err(|e| self.reached_error(head, e))?;
        let inspector = Inspector {
            repo: &self.repo,
            odb: &odb,
            root: &root,
            links,
            limits,
        };
        inspector.run().map_err(|e| match e {
            Found::Git(e) => self.reached_error(head, e),
            Found::Hostile { path, reason } => GitError::Hostile {
                url: self.shown.clone(),
                commit: head.to_string(),
                path,
                reason,
            },
        })
    }
}

/// Why inspection stopped.
enum Found {
    /// The store could not be read.
    Git(git2::Error),
    /// The revision is refused: the repository path and why.
    Hostile { path: String, reason: String },
}

impl From<git2::Error> for Found {
    fn from(e: git2::Error) -> Self {
        Found::Git(e)
    }
}

struct Inspector<'a> {
    repo: &'a Repository,
    odb: &'a Odb<'a>,
    root: &'a Tree<'a>,
    links: &'a [String],
    limits: &'a Limits,
}

impl Inspector<'_> {
    fn run(&self) -> Result<(), Found> {
        for link in self.links {
            let link = link.trim_end_matches('/');
            let Some(entry) = self.way_to(link)? else {
                // Not in this revision (yet): nothing of it will be checked out.
                continue;
            };
            let (id, mode) = entry;
            match mode {
                TREE_MODE => self.walk(link.as_bytes(), id)?,
                GITLINK_MODE => {}
                SYMLINK_MODE => {
                    let target = self.symlink_target(link.as_bytes(), id)?;
                    return Err(hostile(
                        link.as_bytes(),
                        format!(
                            "the link itself is a symlink (to {}): its mount would follow it \
                             outside the checkout",
                            shown(&target)
                        ),
                    ));
                }
                mode if FILE_MODES.contains(&mode) => self.check_size(link.as_bytes(), id)?,
                mode => return Err(hostile(link.as_bytes(), unknown_mode(mode))),
            }
        }
        Ok(())
    }

    /// The entry at `link` (its object and raw mode), walked down from the root one component at a
    /// time; `None` when the revision has nothing there. Refuses a tree on the way that holds
    /// another entry a checkout could take for the link (see the module doc).
    fn way_to(&self, link: &str) -> Result<Option<(Oid, i32)>, Found> {
        let mut tree = self.root.clone();
        let mut dir: Vec<u8> = Vec::new();
        let mut components = link.split('/').peekable();
        while let Some(component) = components.next() {
            let component = component.as_bytes();
            let mut found = None;
            for (i, entry) in tree.iter().enumerate() {
                let name = entry.name_bytes();
                let confusable = name.strip_prefix(component).is_some_and(|rest| {
                    rest.starts_with(b"/") || (rest.is_empty() && found.is_some())
                });
                if confusable {
                    return Err(hostile(
                        &join(&dir, name),
                        format!(
                            "tree entry {} could be taken for {link}: {}",
                            shown(name),
                            if name == component {
                                "the directory holds two entries of that name"
                            } else {
                                "its name holds `/`"
                            }
                        ),
                    ));
                }
                if name == component {
                    found = Some(i);
                }
            }
            self.check_order(&dir, &tree)?;
            let Some((id, mode)) = found
                .and_then(|i| tree.get(i))
                .map(|e| (e.id(), e.filemode_raw()))
            else {
                return Ok(None);
            };
            dir = join(&dir, component);
            if components.peek().is_none() {
                return Ok(Some((id, mode)));
            }
            if mode != TREE_MODE {
                return Ok(None);
            }
            tree = self.tree(&dir, id)?;
        }
        Ok(None)
    }

    /// Tree `id` at `path`; one libgit2 cannot parse is refused, not taken for damage.
    fn tree(&self, path: &[u8], id: Oid) -> Result<Tree<'_>, Found> {
        self.repo.find_tree(id).map_err(|e| {
            if e.code() == ErrorCode::NotFound {
                Found::Git(e)
            } else {
                hostile(path, format!("tree git cannot read: {}", e.message()))
            }
        })
    }

    /// Refuses a tree whose entries are not in git's order or name one thing twice: looking an
    /// entry up by name (a binary search) and listing the tree would then disagree.
    fn check_order(&self, dir: &[u8], tree: &Tree<'_>) -> Result<(), Found> {
        self.check_tree(dir, tree, false)
    }

    /// Refuses a tree under a link holding an entry git's fsck refuses: a bad name, an unknown
    /// mode, a name twice, entries out of order.
    fn check_entries(&self, dir: &[u8], tree: &Tree<'_>) -> Result<(), Found> {
        self.check_tree(dir, tree, true)
    }

    /// The order of `tree`, and with `entries` the names and modes of its entries too.
    fn check_tree(&self, dir: &[u8], tree: &Tree<'_>, entries: bool) -> Result<(), Found> {
        let mut previous: Option<(Vec<u8>, bool)> = None;
        let mut names = HashSet::new();
        for entry in tree.iter() {
            let (name, mode) = (entry.name_bytes(), entry.filemode_raw());
            let path = join(dir, name);
            if entries {
                if let Some(problem) = name_problem(name) {
                    return Err(hostile(&path, format!("tree entry with {problem}")));
                }
                if !mode_known(mode) {
                    return Err(hostile(&path, unknown_mode(mode)));
                }
                // In git's order, a file and a directory of one name are the only twins left.
                if !names.insert(name.to_vec()) {
                    return Err(hostile(
                        &path,
                        format!("the directory holds two entries named {}", shown(name)),
                    ));
                }
            }
            let is_tree = mode == TREE_MODE;
            if let Some((before, before_tree)) = &previous
                && git_order(before, *before_tree, name, is_tree) != Ordering::Less
            {
                return Err(hostile(
                    &path,
                    format!(
                        "tree entry {} is out of git's order (after {})",
                        shown(name),
                        shown(before)
                    ),
                ));
            }
            previous = Some((name.to_vec(), is_tree));
        }
        Ok(())
    }

    /// Checks everything under the directory `dir` (tree `id`), without recursion.
    /// Paths are bytes, as git stores them: a name that is not UTF-8 must still be found when a
    /// symlink goes through it.
    fn walk(&self, dir: &[u8], id: Oid) -> Result<(), Found> {
        let mut pending = vec![(dir.to_vec(), id)];
        while let Some((dir, id)) = pending.pop() {
            let tree = self.tree(&dir, id)?;
            self.check_entries(&dir, &tree)?;
            for entry in tree.iter() {
                let path = join(&dir, entry.name_bytes());
                match entry.filemode() {
                    TREE_MODE => pending.push((path, entry.id())),
                    GITLINK_MODE => {}
                    SYMLINK_MODE => {
                        let target = self.symlink_target(&path, entry.id())?;
                        self.check_symlink(&dir, &path, &target)?;
                    }
                    _ => self.check_size(&path, entry.id())?,
                }
            }
        }
        Ok(())
    }

    /// The size of blob `id` from its header, refused above the limit.
    fn check_size(&self, path: &[u8], id: Oid) -> Result<(), Found> {
        let (size, _) = self.odb.read_header(id)?;
        let size = size as u64;
        if size > self.limits.max_file_size {
            return Err(hostile(
                path,
                format!(
                    "file of {} is larger than max_file_size ({})",
                    exact_size(size),
                    human_size(self.limits.max_file_size)
                ),
            ));
        }
        Ok(())
    }

    /// The target of the symlink at `path` (blob `id`), read only once its header says it is
    /// short enough to be one.
    fn symlink_target(&self, path: &[u8], id: Oid) -> Result<Vec<u8>, Found> {
        let (size, kind) = self.odb.read_header(id)?;
        if kind != ObjectType::Blob {
            return Err(hostile(path, "symlink that is not a blob".to_owned()));
        }
        if size > MAX_SYMLINK_TARGET {
            return Err(hostile(
                path,
                format!(
                    "symlink target of {} is longer than a path can be",
                    exact_size(size as u64)
                ),
            ));
        }
        let target = self.repo.find_blob(id)?.content().to_vec();
        if target.is_empty() {
            return Err(hostile(path, "symlink with an empty target".to_owned()));
        }
        if target.contains(&0) {
            return Err(hostile(path, "symlink target contains NUL".to_owned()));
        }
        Ok(target)
    }

    /// Refuses the symlink at `path` (in directory `dir`, pointing at `target`) unless resolving
    /// it never leaves the innermost link that holds it.
    fn check_symlink(&self, dir: &[u8], path: &[u8], target: &[u8]) -> Result<(), Found> {
        let region = self
            .links
            .iter()
            .map(|l| l.trim_end_matches('/').as_bytes())
            .filter(|l| {
                path.strip_prefix(*l)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/"))
            })
            .max_by_key(|l| l.len())
            .unwrap_or_default();
        let region: Vec<&[u8]> = region.split(|b| *b == b'/').collect();
        let mut current: Vec<Vec<u8>> = dir.split(|b| *b == b'/').map(<[u8]>::to_vec).collect();
        let outside = |why: &str| {
            hostile(
                path,
                format!(
                    "symlink to {} {why} {}",
                    shown(target),
                    String::from_utf8_lossy(&region.join(&b'/'))
                ),
            )
        };
        if target.starts_with(b"/") {
            return Err(hostile(
                path,
                format!("symlink to {} is absolute", shown(target)),
            ));
        }
        let mut pending: VecDeque<Vec<u8>> = components(target).collect();
        let mut hops = 0;
        while let Some(component) = pending.pop_front() {
            match component.as_slice() {
                b"" | b"." => {}
                b".." => {
                    if current.len() <= region.len() {
                        return Err(outside("leaves"));
                    }
                    current.pop();
                }
                _ => {
                    current.push(component);
                    let Some(next) = self.symlink_at(&current)? else {
                        continue;
                    };
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(hostile(
                            path,
                            format!(
                                "symlink to {}: too many levels of symbolic links",
                                shown(target)
                            ),
                        ));
                    }
                    let via = current.join(&b'/');
                    let next = self.symlink_target(&via, next)?;
                    let via = String::from_utf8_lossy(&via);
                    if next.starts_with(b"/") {
                        return Err(outside(&format!(
                            "goes through {via} (a symlink to {}), which leaves",
                            shown(&next)
                        )));
                    }
                    current.pop();
                    for c in components(&next).rev() {
                        pending.push_front(c);
                    }
                }
            }
        }
        Ok(())
    }

    /// The blob of the symlink at `path` in the revision, `None` when there is something else or
    /// nothing there.
    fn symlink_at(&self, path: &[Vec<u8>]) -> Result<Option<Oid>, Found> {
        let joined = path.join(&b'/');
        match self.root.get_path(Path::new(OsStr::from_bytes(&joined))) {
            Ok(entry) if entry.filemode() == SYMLINK_MODE => Ok(Some(entry.id())),
            Ok(_) => Ok(None),
            Err(e) if e.code() == ErrorCode::NotFound && e.class() == ErrorClass::Tree => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// `dir/name`, or `name` at the root.
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

/// Why an entry of mode `mode` is refused.
fn unknown_mode(mode: i32) -> String {
    format!("tree entry of mode {mode:o}, which git does not write")
}

fn components(target: &[u8]) -> impl DoubleEndedIterator<Item = Vec<u8>> + '_ {
    target.split(|b| *b == b'/').map(<[u8]>::to_vec)
}

fn hostile(path: &[u8], reason: String) -> Found {
    Found::Hostile {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    }
}

/// A symlink target as a quoted string, for messages.
fn shown(target: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(target))
}

/// `n` bytes exactly, with [`human_size`] beside it when that rounds: `1025 bytes (1.0 KiB)`.
fn exact_size(n: u64) -> String {
    let human = human_size(n);
    if human.ends_with("bytes") {
        human
    } else {
        format!("{n} bytes ({human})")
    }
}

/// `n` bytes as people read sizes: `1.0 GiB`, `256 MiB`, `2000 bytes`.
pub fn human_size(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                format!("{:.1} {unit}", n as f64 / size as f64)
            };
        }
    }
    format!("{n} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_size(0), "0 bytes");
        assert_eq!(human_size(2000), "2.0 KiB");
        assert_eq!(human_size(1023), "1023 bytes");
        assert_eq!(human_size(DEFAULT_MAX_FILE_SIZE), "256 MiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size((1 << 30) + (1 << 29)), "1.5 GiB");
        assert_eq!(exact_size(1025), "1025 bytes (1.0 KiB)");
        assert_eq!(exact_size(1000), "1000 bytes");
    }
}
