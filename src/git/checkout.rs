//! Per-service checkouts: a target directory that holds exactly the service's `link` paths of one
//! revision, updated in place, forwards or backwards.
//!
//! How: a second handle on the store gets the target as its work tree (in memory only), the
//! service's own index file, and `HEAD` detached at the previously deployed commit, which libgit2
//! uses as the checkout baseline; then a forced checkout restricted to the links (literal
//! pathspecs) writes, replaces and deletes exactly what differs. A first checkout has no baseline:
//! `HEAD` is made unborn and the index emptied, so everything under the links that is not in the
//! revision is removed as untracked. (`CheckoutBuilder::target_dir` with a shared index is not used:
//! it leaves deleted files behind and writes through symlinks.)
//!
//! libgit2 follows symlinks it finds in a work tree: a tracked file replaced by a symlink would get
//! the symlink's target overwritten, a directory replaced by one would get files created through
//! it. So before each checkout every symlink under the links that the baseline does not have (same
//! path, same target) is removed, and so is any symlink on the way to a link.
//!
//! With a service `user`, [`Store::checkout_as`] then gives the whole target to that user
//! (`crate::owner`, never following a symlink) and refreshes the index's stat data for what it
//! changed, so that the drift check's stat cache stays valid.
//!
//! libgit2 writes, replaces and removes by path, and cannot be confined to directory descriptors.
//! So a checkout here only ever writes into a tree no other user can change a path of: a target
//! where a directory belongs to someone else (a checkout already given to its `user`) is refused
//! ([`GitError::HeldTarget`]). The daemon uses these for new directories only (a wipe's fresh
//! copy, the `check`'s staged copy); a live checkout is updated by
//! [`Store::checkout_atomic`](super::Store::checkout_atomic), which works by descriptor.
//!
//! Nothing here judges what a revision holds (symlinks out of a link, oversized files): that is
//! [`Store::inspect`], which the caller runs first.
//!
//! Content is written as stored in git: no filters (no end-of-line conversion, no `ident`), since a
//! deployed file must be the same bytes on every machine whatever `.gitattributes` says.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use git2::build::CheckoutBuilder;
use git2::{Commit, ErrorCode, Index, Oid, Repository, Tree};

use super::confined::held_by_another;
use super::history::validate_links;
use super::{GitError, Store};
use crate::owner::{Owner, OwnerError, chown_tree};

/// An unborn branch `HEAD` points at when there is no baseline: the store never has `refs/heads/*`
/// (fetched branches live under `refs/remotes/origin/`), so this never exists.
const NO_BASELINE: &str = "refs/heads/plumb-no-baseline";

/// Git's mode for a symlink.
pub(super) const SYMLINK_MODE: i32 = 0o120000;

/// Git's mode for a gitlink (submodule), as the index stores it.
pub(super) const GITLINK_MODE: u32 = 0o160000;

impl Store {
    /// Makes `target` hold exactly `links` of `rev` (and nothing else under those paths), using and
    /// updating the service's index at `index`. `previous` is the revision currently deployed in
    /// `target` (`None` for a first checkout); when the store lacks it (history rewritten and the
    /// store re-created since), the checkout proceeds as a first one.
    ///
    /// Modes (executable bit) and symlinks are as in git; submodules are not checked out (an
    /// empty directory stands for one); files outside the links are not touched. Points the
    /// store's `HEAD` at `previous` (see the module invariants). Checks nothing of what `rev`
    /// holds: call [`Store::inspect`] first.
    pub fn checkout(
        &self,
        target: &Path,
        index: &Path,
        previous: Option<Oid>,
        rev: Oid,
        links: &[String],
    ) -> Result<(), GitError> {
        self.checkout_as(target, index, previous, rev, links, None)
    }

    /// [`Store::checkout`], then, when `user` is given, gives all of `target` (files, directories,
    /// symlinks themselves, `target` included) to that user and its primary group, as gitopper's
    /// `user` does. The service's index is updated with the new owners and change times, so the
    /// next drift check still trusts its stat cache instead of reading every file. An unknown
    /// user fails before anything is written, and so does a `target` in which a directory belongs
    /// to another user (see the module doc): a checkout given to its user is updated by
    /// [`Store::checkout_atomic`](super::Store::checkout_atomic) only.
    pub fn checkout_as(
        &self,
        target: &Path,
        index: &Path,
        previous: Option<Oid>,
        rev: Oid,
        links: &[String],
        user: Option<&str>,
    ) -> Result<(), GitError> {
        validate_links(links)?;
        let owner_err = |source: OwnerError| GitError::Owner {
            url: self.shown.clone(),
            path: target.to_path_buf(),
            revision: rev.to_string(),
            source: Box::new(source),
        };
        let owner = user.map(Owner::lookup).transpose().map_err(owner_err)?;
        if links.is_empty() {
            // No pathspec would mean "everything": a service without links holds nothing.
            return Ok(());
        }
        let revision = rev.to_string();
        let git_err = |source: git2::Error| GitError::Checkout {
            url: self.shown.clone(),
            path: target.to_path_buf(),
            revision: revision.clone(),
            source,
        };
        let io_err = |action: String| {
            let revision = revision.clone();
            move |source: io::Error| GitError::CheckoutIo {
                url: self.shown.clone(),
                path: target.to_path_buf(),
                revision,
                action,
                source,
            }
        };

        let repo = self.own_handle()?;
        let tree = self.tree_of(&repo, rev)?;
        let baseline = self.baseline(&repo, target, previous)?;
        let baseline_tree = match &baseline {
            Some(commit) => Some(
                commit
                    .tree()
                    .map_err(|e| self.reached_error(commit.id(), e))?,
            ),
            None => None,
        };

        // libgit2 works by path: only in a tree no other user can change a path of.
        if let Some((dir, uid)) =
            held_by_another(target).map_err(io_err("examine the target directory".into()))?
        {
            return Err(GitError::HeldTarget {
                url: self.shown.clone(),
                path: target.to_path_buf(),
                revision,
                dir,
                uid,
            });
        }
        fs::create_dir_all(target).map_err(io_err("create the target directory".into()))?;
        scrub_symlinks(&repo, target, baseline_tree.as_ref(), links)
            .map_err(|(path, e)| io_err(format!("remove symlink {}", path.display()))(e))?;

        let mut index = open_index(index).map_err(|e| match e {
            IndexError::Io(action, e) => io_err(action)(e),
            IndexError::Git(e) => git_err(e),
        })?;
        if baseline.is_none() {
            index.clear().map_err(git_err)?;
        }
        repo.set_workdir(target, false).map_err(git_err)?;
        repo.set_index(&mut index).map_err(git_err)?;
        match &baseline {
            Some(commit) => repo.set_head_detached(commit.id()),
            None => repo.set_head(NO_BASELINE),
        }
        .map_err(git_err)?;

        let mut builder = CheckoutBuilder::new();
        builder
            .force()
            .recreate_missing(true)
            .remove_untracked(true)
            .remove_ignored(true)
            .disable_pathspec_match(true)
            .disable_filters(true);
        for link in links {
            builder.path(link.trim_end_matches('/'));
        }
        repo.checkout_tree(tree.as_object(), Some(&mut builder))
            .map_err(|e| {
                let err = git_err(e);
                if err.is_corruption() {
                    self.damaged.set(true);
                }
                err
            })?;
        if let Some(owner) = &owner
            && chown_tree(target, owner).map_err(owner_err)? > 0
        {
            restat(&mut index, target).map_err(git_err)?;
        }
        index.write().map_err(git_err)?;
        Ok(())
    }
}

impl Store {
    /// A repository handle of its own for work that sets a workdir and an index, so the store's
    /// main handle stays bare and index-less.
    pub(super) fn own_handle(&self) -> Result<Repository, GitError> {
        Repository::open_bare(&self.path).map_err(|source| GitError::Store {
            url: self.shown.clone(),
            path: self.path.clone(),
            source,
        })
    }

    /// The tree of commit `rev` in `repo`.
    pub(super) fn tree_of<'r>(
        &self,
        repo: &'r Repository,
        rev: Oid,
    ) -> Result<git2::Tree<'r>, GitError> {
        repo.find_commit(rev)
            .map_err(|e| self.object_error(rev, e))?
            .tree()
            .map_err(|e| self.reached_error(rev, e))
    }

    /// The commit a checkout of `target` starts from: `previous`, or `None` for a first checkout
    /// and for a `previous` the store does not have (history rewritten and the store re-created
    /// since), which then proceeds as a first one.
    pub(super) fn baseline<'r>(
        &self,
        repo: &'r Repository,
        target: &Path,
        previous: Option<Oid>,
    ) -> Result<Option<Commit<'r>>, GitError> {
        let Some(previous) = previous else {
            return Ok(None);
        };
        match repo.find_commit(previous) {
            Ok(commit) => Ok(Some(commit)),
            Err(e) if e.code() == ErrorCode::NotFound => {
                tracing::warn!(
                    url = self.shown,
                    target = %target.display(),
                    %previous,
                    "previously deployed revision not in the store; checking out as if for the first time"
                );
                Ok(None)
            }
            Err(e) => Err(self.object_error(previous, e)),
        }
    }
}

/// Refreshes the stat data (change time, owner) of the index entries whose files changed only in
/// those since the checkout wrote them (a chown): same inode, size and modification time. Without
/// this, every such file would look possibly modified to the next drift check and be read.
pub(super) fn restat(index: &mut Index, target: &Path) -> Result<(), git2::Error> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut updated = Vec::new();
    for mut entry in index.iter() {
        if entry.mode == GITLINK_MODE {
            continue;
        }
        let path = target.join(OsStr::from_bytes(&entry.path));
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        // The index keeps 32 bits of these, as git does.
        let same_file = entry.ino == meta.ino() as u32
            && entry.file_size == meta.size() as u32
            && entry.mtime.seconds() == meta.mtime() as i32
            && entry.mtime.nanoseconds() == meta.mtime_nsec() as u32;
        let ctime = git2::IndexTime::new(meta.ctime() as i32, meta.ctime_nsec() as u32);
        if same_file && (entry.uid, entry.gid, entry.ctime) != (meta.uid(), meta.gid(), ctime) {
            entry.uid = meta.uid();
            entry.gid = meta.gid();
            entry.ctime = ctime;
            updated.push(entry);
        }
    }
    for entry in &updated {
        index.add(entry)?;
    }
    Ok(())
}

enum IndexError {
    Io(String, io::Error),
    Git(git2::Error),
}

/// Opens the service's index. It is only a cache of what is deployed, so a stale lock (crash) is
/// removed and an unreadable index is replaced by an empty one.
fn open_index(path: &Path) -> Result<Index, IndexError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| IndexError::Io(format!("create {}", parent.display()), e))?;
    }
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    let lock = PathBuf::from(lock);
    match fs::remove_file(&lock) {
        Ok(()) => tracing::warn!(lock = %lock.display(), "removed stale index lock"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(IndexError::Io(format!("remove {}", lock.display()), e)),
    }
    match Index::open(path) {
        Ok(index) => Ok(index),
        Err(e) => {
            tracing::warn!(index = %path.display(), error = e.message(), "unreadable index; starting a new one");
            fs::remove_file(path)
                .map_err(|e| IndexError::Io(format!("remove {}", path.display()), e))?;
            Index::open(path).map_err(IndexError::Git)
        }
    }
}

/// Removes every symlink under `links` in `target` that `baseline` does not have at the same path
/// with the same target, and every symlink on the way to a link (a link's parent directories are
/// never plumb's symlinks): [`planted_symlinks`]. Never follows a symlink. Returns the path that
/// could not be removed.
pub(super) fn scrub_symlinks(
    repo: &Repository,
    target: &Path,
    baseline: Option<&Tree<'_>>,
    links: &[String],
) -> Result<(), (PathBuf, io::Error)> {
    for path in planted_symlinks(repo, target, baseline, links)? {
        remove_symlink(&path)?;
    }
    Ok(())
}

/// The symlinks [`scrub_symlinks`] removes, read only: every symlink under `links` in `target`
/// that `baseline` does not have at the same path with the same target, and every symlink on the
/// way to a link. Never follows (nor descends through) a symlink. Returns the path that could not
/// be read on error.
pub(super) fn planted_symlinks(
    repo: &Repository,
    target: &Path,
    baseline: Option<&Tree<'_>>,
    links: &[String],
) -> Result<Vec<PathBuf>, (PathBuf, io::Error)> {
    let mut planted = Vec::new();
    for link in links {
        let link = link.trim_end_matches('/');
        let components: Vec<&str> = link.split('/').collect();
        let mut path = target.to_path_buf();
        let mut rel = PathBuf::new();
        for (i, component) in components.iter().enumerate() {
            path.push(component);
            rel.push(component);
            let meta = match fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err((path, e)),
            };
            let is_link_itself = i + 1 == components.len();
            if meta.file_type().is_symlink() {
                if !(is_link_itself && baseline_has_symlink(repo, baseline, &rel, &path)) {
                    planted.push(path);
                }
                break;
            }
            if !meta.is_dir() {
                break;
            }
            if is_link_itself {
                planted_in_dir(repo, baseline, &path, &rel, &mut planted)?;
            }
        }
    }
    planted.sort();
    planted.dedup();
    Ok(planted)
}

fn planted_in_dir(
    repo: &Repository,
    baseline: Option<&Tree<'_>>,
    dir: &Path,
    rel: &Path,
    planted: &mut Vec<PathBuf>,
) -> Result<(), (PathBuf, io::Error)> {
    let entries = fs::read_dir(dir).map_err(|e| (dir.to_path_buf(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| (dir.to_path_buf(), e))?;
        let path = entry.path();
        // DirEntry::file_type does not follow symlinks.
        let kind = entry.file_type().map_err(|e| (path.clone(), e))?;
        let child_rel = rel.join(entry.file_name());
        if kind.is_symlink() {
            if !baseline_has_symlink(repo, baseline, &child_rel, &path) {
                planted.push(path);
            }
        } else if kind.is_dir() {
            planted_in_dir(repo, baseline, &path, &child_rel, planted)?;
        }
    }
    Ok(())
}

fn remove_symlink(path: &Path) -> Result<(), (PathBuf, io::Error)> {
    tracing::debug!(path = %path.display(), "removing a symlink the deployed revision does not have");
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err((path.to_path_buf(), e)),
    }
}

/// Whether `baseline` has a symlink at `rel` pointing where the symlink at `path` points.
fn baseline_has_symlink(
    repo: &Repository,
    baseline: Option<&Tree<'_>>,
    rel: &Path,
    path: &Path,
) -> bool {
    let Some(tree) = baseline else {
        return false;
    };
    let Ok(entry) = tree.get_path(rel) else {
        return false;
    };
    if entry.filemode() != SYMLINK_MODE {
        return false;
    }
    let (Ok(blob), Ok(on_disk)) = (repo.find_blob(entry.id()), fs::read_link(path)) else {
        return false;
    };
    blob.content() == OsStr::as_encoded_bytes(on_disk.as_os_str())
}
