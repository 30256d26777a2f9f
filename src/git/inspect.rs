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

use std::collections::VecDeque;
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
            let entry = match self.root.get_path(Path::new(link)) {
                Ok(entry) => entry,
                // Not in this revision (yet): nothing of it will be checked out.
                Err(e) if e.code() == ErrorCode::NotFound && e.class() == ErrorClass::Tree => {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match entry.filemode() {
                TREE_MODE => self.walk(link.as_bytes(), entry.id())?,
                GITLINK_MODE => {}
                SYMLINK_MODE => {
                    let target = self.symlink_target(link.as_bytes(), entry.id())?;
                    return Err(hostile(
                        link.as_bytes(),
                        format!(
                            "the link itself is a symlink (to {}): its mount would follow it \
                             outside the checkout",
                            shown(&target)
                        ),
                    ));
                }
                _ => self.check_size(link.as_bytes(), entry.id())?,
            }
        }
        Ok(())
    }

    /// Checks everything under the directory `dir` (tree `id`), without recursion.
    /// Paths are bytes, as git stores them: a name that is not UTF-8 must still be found when a
    /// symlink goes through it.
    fn walk(&self, dir: &[u8], id: Oid) -> Result<(), Found> {
        let mut pending = vec![(dir.to_vec(), id)];
        while let Some((dir, id)) = pending.pop() {
            let tree = self.repo.find_tree(id)?;
            for entry in tree.iter() {
                let path = [dir.as_slice(), b"/", entry.name_bytes()].concat();
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
