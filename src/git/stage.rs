//! All-or-nothing deploys: [`Store::checkout_atomic`] writes what a revision changes beside a
//! service's checkout first and only then moves it in by renames, so a deploy that fails (a full
//! disk, a path libgit2 refuses, an unknown user) leaves the live files as they were.
//!
//! Three phases:
//! - **Plan** (reads only): the paths under the links where the live files may differ from the
//!   revision. A diff of the revision's tree against the service's index and the work tree (the
//!   index is the stat cache, so unchanged files are not read) covers the revision's changes,
//!   local edits, deleted files and strays (ignored ones too) at once; to it come the symlinks git
//!   did not put there ([`planted_symlinks`]) and the directories the revision does not have,
//!   empty ones included (libgit2's `remove_untracked` removes those as well). Without a live
//!   checkout: everything under the links.
//! - **Stage**: libgit2 checks out only those paths of the revision into `<target>.plumb-stage`, a
//!   sibling on the same file system, with a fresh in-memory index (so no baseline: the store's
//!   `HEAD` is neither read nor moved). The staging directory is root's, mode 0700, in the
//!   checkout's parent (root's too), so no user can change a path in it while libgit2 writes
//!   there by path. Only the differences take space, not a second copy of the service. A failure
//!   removes the staging directory; nothing live has been touched yet.
//! - **Move**, by directory descriptor only ([`Confined`]): the checkout belongs to the service's
//!   user, who may swap any of its directories for a symlink while this runs, so no path below
//!   the checkout's top is used to write, remove or chown. Planted symlinks are removed; each
//!   staged file and symlink is given to the service's user and `renameat(2)`d over its live
//!   entry; what the revision does not have is removed, deepest first, with the directories that
//!   leaves empty (as git does). Directories are never moved or re-created when they exist on both
//!   sides, so they keep their inode and a directory bind mount of one stays valid; a missing one
//!   is created with the staged one's mode and the user as owner, and a symlink or file in its
//!   place is removed, never followed. Then the new index, with stat data read back (through the
//!   same descriptors) from the files moved in, is written beside the old one and renamed over
//!   it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use git2::build::CheckoutBuilder;
use git2::{DiffOptions, Index, IndexEntry, IndexTime, Oid, Repository, Tree};
use nix::sys::stat::FileStat;

use super::checkout::{GITLINK_MODE, SYMLINK_MODE, planted_symlinks, restat};
use super::confined::Confined;
use super::history::validate_links;
use super::{GitError, Store};
use crate::owner::{Owner, OwnerError, chown_tree};

/// The staging directory beside a checkout: `<target>.plumb-stage`.
const STAGE_SUFFIX: &str = ".plumb-stage";

/// The new index beside the service's index, renamed over it once the files moved.
const NEW_INDEX_SUFFIX: &str = ".plumb-new";

/// Git's mode for a directory.
const TREE_MODE: i32 = 0o040000;

/// How long the index write waits at most for the clock to pass the files it describes (one tick
/// of the file system's clock, normally a few milliseconds): an index no newer than its files is
/// "racy", and the next drift check would read them all.
const RACY_WAIT: Duration = Duration::from_secs(1);

/// What the revision has at a path the deploy touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Nothing: whatever is live there goes.
    Absent,
    /// A directory.
    Tree,
    /// A file (mode 100644 or 100755) or a symlink (120000): staged, then renamed into place.
    Blob { id: Oid, mode: i32 },
    /// A submodule: an empty directory stands for it, as with [`Store::checkout`].
    Gitlink(Oid),
}

/// What a revision has at the paths a deploy touches, reading each of its trees once: libgit2
/// caches only small trees and hashes every object it reads, so a lookup from the root per path
/// would read a directory of a thousand files a thousand times.
struct Wants<'r> {
    repo: &'r Repository,
    root: Tree<'r>,
    /// Directory -> its tree, `None` when the revision has no directory there.
    dirs: HashMap<PathBuf, Option<Tree<'r>>>,
}

impl<'r> Wants<'r> {
    fn new(repo: &'r Repository, root: &Tree<'r>) -> Wants<'r> {
        Wants {
            repo,
            root: root.clone(),
            dirs: HashMap::new(),
        }
    }

    /// The revision's entry at `path` (relative; empty is the root).
    fn get(&mut self, path: &Path) -> Result<Want, git2::Error> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(Want::Tree);
        };
        let Some(dir) = self.dir(parent)? else {
            return Ok(Want::Absent);
        };
        Ok(match dir.get_name_bytes(name.as_bytes()) {
            None => Want::Absent,
            Some(entry) => match entry.filemode() {
                TREE_MODE => Want::Tree,
                mode if mode as u32 == GITLINK_MODE => Want::Gitlink(entry.id()),
                mode => Want::Blob {
                    id: entry.id(),
                    mode,
                },
            },
        })
    }

    /// The tree of directory `dir`, `None` when the revision has no directory there.
    fn dir(&mut self, dir: &Path) -> Result<Option<Tree<'r>>, git2::Error> {
        let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
            return Ok(Some(self.root.clone()));
        };
        if let Some(known) = self.dirs.get(dir) {
            return Ok(known.clone());
        }
        let tree = match self.dir(parent)? {
            None => None,
            Some(parent) => match parent.get_name_bytes(name.as_bytes()) {
                Some(entry) if entry.filemode() == TREE_MODE => {
                    Some(self.repo.find_tree(entry.id())?)
                }
                _ => None,
            },
        };
        self.dirs.insert(dir.to_path_buf(), tree.clone());
        Ok(tree)
    }
}

/// Builds the errors of one deploy, each naming the store, the target and the revision.
struct Fail<'a> {
    store: &'a Store,
    target: &'a Path,
    revision: String,
}

impl Fail<'_> {
    fn git(&self, source: git2::Error) -> GitError {
        let err = GitError::Checkout {
            url: self.store.shown.clone(),
            path: self.target.to_path_buf(),
            revision: self.revision.clone(),
            source,
        };
        if err.is_corruption() {
            self.store.damaged.set(true);
        }
        err
    }

    fn io(&self, action: impl Into<String>, source: io::Error) -> GitError {
        GitError::CheckoutIo {
            url: self.store.shown.clone(),
            path: self.target.to_path_buf(),
            revision: self.revision.clone(),
            action: action.into(),
            source,
        }
    }

    fn owner(&self, source: OwnerError) -> GitError {
        GitError::Owner {
            url: self.store.shown.clone(),
            path: self.target.to_path_buf(),
            revision: self.revision.clone(),
            source: Box::new(source),
        }
    }
}

impl Store {
    /// [`Store::checkout_as`] (same arguments, same files, owners and index in the end), all or
    /// nothing on the live files: a deploy that fails must not leave a service half old, half new,
    /// or with a truncated file. The paths where the live files differ from `rev` are checked out
    /// completely into `<target>.plumb-stage` (same file system; only those paths, so a deploy
    /// costs the space of what changed) and only then renamed into `target`; see the module doc.
    ///
    /// What to change is found by comparing `rev` with the live files themselves (through the
    /// index's stat cache), so local edits and strays under the links are reverted and removed,
    /// and a deploy cut short before is finished. `previous` (`None`, or not in the store: a first
    /// checkout) only says which symlinks are git's: any other one under the links, or on the way
    /// to one, is removed and never written through.
    ///
    /// - Any failure before the move (no space, a path libgit2 refuses, a damaged store, an
    ///   unknown user, a staging directory that cannot be made) removes the staging directory and
    ///   returns the error; `target` and `index` are untouched.
    /// - Directories that exist before and after keep their inode, so directory bind mounts of
    ///   the checkout stay valid; unchanged files are not touched; a changed file or symlink is a
    ///   new inode (single-file binds need re-binding).
    /// - The index is replaced by a rename once the files moved, newer than every file it lists,
    ///   so the next [`Store::drift`] reads no file's contents.
    ///
    /// The move itself is one `rename(2)` or removal per changed path: it needs no space, so a
    /// full disk cannot stop it halfway, but a `kill -9` (or an I/O error) during it leaves some
    /// paths new and others old (each one whole), the old index and the staging directory
    /// (removed by the next call). The caller must therefore keep a marker while this runs (the
    /// daemon's `<service>.deploying`) and call it again after a crash, which finishes the move.
    /// Files are not fsynced.
    ///
    /// Does not use or move the store's `HEAD`. Checks nothing of what `rev` holds: call
    /// [`Store::inspect`] first.
    pub fn checkout_atomic(
        &self,
        target: &Path,
        index: &Path,
        previous: Option<Oid>,
        rev: Oid,
        links: &[String],
        user: Option<&str>,
    ) -> Result<(), GitError> {
        validate_links(links)?;
        let fail = Fail {
            store: self,
            target,
            revision: rev.to_string(),
        };
        let owner = user
            .map(Owner::lookup)
            .transpose()
            .map_err(|e| fail.owner(e))?;
        if links.is_empty() {
            // No pathspec would mean "everything": a service without links holds nothing.
            return Ok(());
        }
        let repo = self.own_handle()?;
        let tree = self.tree_of(&repo, rev)?;
        let baseline = match self.baseline(&repo, target, previous)? {
            Some(commit) => Some(
                commit
                    .tree()
                    .map_err(|e| self.reached_error(commit.id(), e))?,
            ),
            None => None,
        };
        let mut live_index = read_index(index).map_err(|e| fail.git(e))?;

        let changes = plan(
            &fail,
            &repo,
            &tree,
            baseline.as_ref(),
            target,
            &mut live_index,
            links,
        )?;
        let stage = beside(target, STAGE_SUFFIX);
        if let Err(e) = self.stage(&fail, &stage, target, &tree, &changes) {
            discard(&stage);
            return Err(e);
        }
        let moved = move_in(
            &fail,
            &repo,
            target,
            &stage,
            baseline.as_ref(),
            links,
            &tree,
            &changes,
            owner.as_ref(),
        )
        .and_then(|(mut live, chowned)| {
            write_index(
                &fail,
                &live_index,
                index,
                target,
                &mut live,
                &changes,
                chowned,
            )
        });
        discard(&stage);
        moved
    }

    /// Checks the revision's files and symlinks of `changes` out into a new `stage` directory, as
    /// root's; fails unless every one of them is there afterwards.
    fn stage(
        &self,
        fail: &Fail<'_>,
        stage: &Path,
        target: &Path,
        tree: &Tree<'_>,
        changes: &BTreeMap<PathBuf, Want>,
    ) -> Result<(), GitError> {
        if let Some(parent) = stage.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| fail.io(format!("create {}", parent.display()), e))?;
        }
        remove_any(stage).map_err(|e| {
            fail.io(
                format!("remove the staging directory {}", stage.display()),
                e,
            )
        })?;
        // Root's and closed to everyone else until plumb moves its entries out: libgit2 writes
        // into it by path, and no user may change a path in it meanwhile.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(stage)
            .map_err(|e| {
                fail.io(
                    format!("create the staging directory {}", stage.display()),
                    e,
                )
            })?;
        if let Ok(live) = fs::metadata(target) {
            let staged =
                fs::metadata(stage).map_err(|e| fail.io("stat the staging directory", e))?;
            if live.dev() != staged.dev() {
                return Err(fail.io(
                    format!("stage beside the checkout in {}", stage.display()),
                    io::Error::new(
                        io::ErrorKind::CrossesDevices,
                        "the checkout is a mount point: its sibling is on another file system",
                    ),
                ));
            }
        }
        let blobs: Vec<&PathBuf> = changes
            .iter()
            .filter(|(_, want)| matches!(want, Want::Blob { .. }))
            .map(|(path, _)| path)
            .collect();
        if !blobs.is_empty() {
            let repo = self.own_handle()?;
            let tree = repo.find_tree(tree.id()).map_err(|e| fail.git(e))?;
            // An index that was never on disk (and is not re-read: `refresh(false)`): libgit2
            // then checks out against an empty baseline and never reads HEAD.
            let mut index = Index::new().map_err(|e| fail.git(e))?;
            repo.set_workdir(stage, false).map_err(|e| fail.git(e))?;
            repo.set_index(&mut index).map_err(|e| fail.git(e))?;
            let mut builder = CheckoutBuilder::new();
            builder
                .force()
                .recreate_missing(true)
                .update_index(false)
                .refresh(false)
                .disable_pathspec_match(true)
                .disable_filters(true);
            for path in &blobs {
                builder.path(path.as_path());
            }
            repo.checkout_tree(tree.as_object(), Some(&mut builder))
                .map_err(|e| fail.git(e))?;
        }
        for path in blobs {
            let staged = stage.join(path);
            let meta = fs::symlink_metadata(&staged)
                .map_err(|e| fail.io(format!("stage {}", path.display()), e))?;
            let symlink = matches!(changes[path], Want::Blob { mode, .. } if mode == SYMLINK_MODE);
            if meta.file_type().is_symlink() != symlink || meta.is_dir() {
                return Err(fail.io(
                    format!("stage {}", path.display()),
                    io::Error::other("libgit2 did not write it as the revision has it"),
                ));
            }
        }
        Ok(())
    }
}

/// The service's index as it is, read only; an unreadable one (it is only a cache) is an empty
/// one, which makes every file under the links count as changed.
fn read_index(path: &Path) -> Result<Index, git2::Error> {
    match Index::open(path) {
        Ok(index) => Ok(index),
        Err(e) => {
            tracing::warn!(index = %path.display(), error = e.message(), "unreadable index; comparing every file");
            Index::new()
        }
    }
}

/// The paths under `links` where the live files may differ from `tree`, with what `tree` has
/// there (see the module doc). Reads only.
fn plan(
    fail: &Fail<'_>,
    repo: &Repository,
    tree: &Tree<'_>,
    baseline: Option<&Tree<'_>>,
    target: &Path,
    index: &mut Index,
    links: &[String],
) -> Result<BTreeMap<PathBuf, Want>, GitError> {
    let mut wants = Wants::new(repo, tree);
    let mut paths = BTreeSet::new();
    if fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
        repo.set_workdir(target, false).map_err(|e| fail.git(e))?;
        repo.set_index(index).map_err(|e| fail.git(e))?;
        let mut opts = DiffOptions::new();
        opts.include_untracked(true)
            .recurse_untracked_dirs(true)
            .include_ignored(true)
            .recurse_ignored_dirs(true)
            .include_typechange(true)
            .include_unreadable(true)
            .ignore_submodules(true)
            .disable_pathspec_match(true);
        for link in links {
            opts.pathspec(link.trim_end_matches('/'));
        }
        let diff = repo
            .diff_tree_to_workdir_with_index(Some(tree), Some(&mut opts))
            .map_err(|e| fail.git(e))?;
        for delta in diff.deltas() {
            for file in [delta.old_file(), delta.new_file()] {
                if let Some(path) = file.path() {
                    paths.insert(path.to_path_buf());
                }
            }
        }
        let planted = planted_symlinks(repo, target, baseline, links)
            .map_err(|(path, e)| fail.io(format!("look for symlinks at {}", path.display()), e))?;
        for path in planted {
            if let Ok(rel) = path.strip_prefix(target) {
                paths.insert(rel.to_path_buf());
            }
        }
        for link in links {
            let rel = Path::new(link.trim_end_matches('/'));
            if real_dirs(target, Some(rel)).map_err(|e| fail.io("read the checkout", e))? {
                stray_dirs(target, &mut wants, rel, &mut paths).map_err(|e| match e {
                    Walk::Io(path, e) => fail.io(format!("read {}", path.display()), e),
                    Walk::Git(e) => fail.git(e),
                })?;
            }
        }
    } else {
        for link in links {
            let rel = Path::new(link.trim_end_matches('/'));
            everything_under(&mut wants, rel, &mut paths).map_err(|e| fail.git(e))?;
        }
    }
    paths
        .into_iter()
        .map(|path| {
            let want = wants.get(&path).map_err(|e| fail.git(e))?;
            Ok((path, want))
        })
        .collect()
}

enum Walk {
    Io(PathBuf, io::Error),
    Git(git2::Error),
}

/// Adds to `paths` every directory at or below `rel` in `target` that `tree` does not have as a
/// directory (strays, empty or not; directories that became files), whole. Never follows a
/// symlink; does not enter submodules.
fn stray_dirs(
    target: &Path,
    wants: &mut Wants<'_>,
    rel: &Path,
    paths: &mut BTreeSet<PathBuf>,
) -> Result<(), Walk> {
    match wants.get(rel).map_err(Walk::Git)? {
        Want::Tree => {}
        Want::Gitlink(_) => return Ok(()),
        Want::Absent | Want::Blob { .. } => {
            paths.insert(rel.to_path_buf());
            return Ok(());
        }
    }
    let dir = target.join(rel);
    for entry in fs::read_dir(&dir).map_err(|e| Walk::Io(dir.clone(), e))? {
        let entry = entry.map_err(|e| Walk::Io(dir.clone(), e))?;
        // DirEntry::file_type does not follow symlinks.
        let kind = entry.file_type().map_err(|e| Walk::Io(entry.path(), e))?;
        if kind.is_dir() {
            stray_dirs(target, wants, &rel.join(entry.file_name()), paths)?;
        }
    }
    Ok(())
}

/// Adds every file, symlink and submodule at or below `rel` in the revision to `paths`.
fn everything_under(
    wants: &mut Wants<'_>,
    rel: &Path,
    paths: &mut BTreeSet<PathBuf>,
) -> Result<(), git2::Error> {
    match wants.get(rel)? {
        Want::Absent => {}
        Want::Tree => {
            let Some(tree) = wants.dir(rel)? else {
                return Ok(());
            };
            for entry in tree.iter() {
                let path = rel.join(OsStr::from_bytes(entry.name_bytes()));
                if entry.filemode() == TREE_MODE {
                    everything_under(wants, &path, paths)?;
                } else {
                    paths.insert(path);
                }
            }
        }
        Want::Blob { .. } | Want::Gitlink(_) => {
            paths.insert(rel.to_path_buf());
        }
    }
    Ok(())
}

/// Moves the staged revision into `target` (see the module doc), then gives `target` to `owner`
/// as [`Store::checkout_as`] does. Returns the checkout, open, and whether that changed any
/// owner.
///
/// Every write, removal and change of owner in `target` and `stage` goes through descriptors of
/// their directories ([`Confined`]), never through a path: the service's user owns `target` and
/// may swap any of its directories for a symlink meanwhile.
#[allow(clippy::too_many_arguments)]
fn move_in(
    fail: &Fail<'_>,
    repo: &Repository,
    target: &Path,
    stage: &Path,
    baseline: Option<&Tree<'_>>,
    links: &[String],
    tree: &Tree<'_>,
    changes: &BTreeMap<PathBuf, Want>,
    owner: Option<&Owner>,
) -> Result<(Confined, bool), GitError> {
    let at = |what: &str, path: &Path| format!("{what} {}", path.display());
    let mut live = open_target(target, owner).map_err(|e| fail.io("open the checkout", e))?;
    let mut staged = Confined::open(stage).map_err(|e| fail.io("open the staging directory", e))?;
    let planted = planted_symlinks(repo, target, baseline, links)
        .map_err(|(path, e)| fail.io(at("look for symlinks at", &path), e))?;
    for path in planted {
        let rel = path.strip_prefix(target).unwrap_or(&path);
        tracing::debug!(path = %path.display(), "removing a symlink the deployed revision does not have");
        live.remove_symlink(rel)
            .map_err(|e| fail.io(at("remove symlink", &path), e))?;
    }

    // What the revision has, parents first. A new directory gets the mode libgit2 gave the
    // staged one.
    for (rel, want) in changes {
        match want {
            Want::Blob { .. } => {
                let parent = rel.parent().unwrap_or(Path::new(""));
                live.make_dirs(parent, &mut staged, owner)
                    .map_err(|e| fail.io(at("create the directories of", rel), e))?;
                live.move_from(&mut staged, rel, owner)
                    .map_err(|e| fail.io(at("move in", rel), e))?;
            }
            Want::Tree | Want::Gitlink(_) => {
                live.make_dirs(rel, &mut staged, owner)
                    .map_err(|e| fail.io(at("create the directory", rel), e))?;
            }
            Want::Absent => {}
        }
    }
    // Then what it does not have, deepest first, and the directories that leaves empty. Behind a
    // symlink or a file there is nothing of the checkout to remove.
    let mut wants = Wants::new(repo, tree);
    for (rel, want) in changes.iter().rev() {
        if *want != Want::Absent {
            continue;
        }
        live.remove(rel)
            .map_err(|e| fail.io(at("remove", rel), e))?;
        prune(&mut live, &mut wants, rel);
    }
    let chowned = match owner {
        Some(owner) => chown_tree(target, owner).map_err(|e| fail.owner(e))? > 0,
        None => false,
    };
    Ok((live, chowned))
}

/// Opens the checkout `target` by descriptor ([`Confined`]), creating it (with `owner`) when
/// missing. Its parent is root's (plumb's `checkouts/`, or `mount`), so the path up to it is
/// trusted; `target` itself is opened without following a symlink.
fn open_target(target: &Path, owner: Option<&Owner>) -> io::Result<Confined> {
    match Confined::open(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::create_dir(target)?;
    let live = Confined::open(target)?;
    if let Some(owner) = owner {
        std::os::unix::fs::fchown(
            live.top(),
            Some(owner.uid.as_raw()),
            Some(owner.gid.as_raw()),
        )?;
    }
    Ok(live)
}

/// Whether every component of `rel` under `target` is a real directory (not a symlink), so a path
/// below it is inside the checkout. `None` or empty is `target` itself.
fn real_dirs(target: &Path, rel: Option<&Path>) -> io::Result<bool> {
    let mut path = target.to_path_buf();
    for component in rel.into_iter().flat_map(Path::components) {
        path.push(component);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Removes the directories above `rel` that are now empty, up to (not including) the checkout's
/// top, except a submodule's.
fn prune(live: &mut Confined, wants: &mut Wants<'_>, rel: &Path) {
    for dir in rel.ancestors().skip(1) {
        if dir.as_os_str().is_empty() || matches!(wants.get(dir), Ok(Want::Gitlink(_)) | Err(_)) {
            return;
        }
        // Fails on a directory that is not empty, which ends the walk.
        if !live.remove_empty_dir(dir) {
            return;
        }
    }
}

/// Removes a file, symlink (never what it points at) or directory with everything below; nothing
/// there is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes the staging directory; a failure only costs space until the next deploy removes it.
fn discard(stage: &Path) {
    if let Err(e) = remove_any(stage) {
        tracing::warn!(stage = %stage.display(), "cannot remove the staging directory: {e}");
    }
}

/// `path` with `suffix` appended to its last component (`a/b/` gives `a/b<suffix>`, a sibling,
/// not `a/b/<suffix>`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.components().collect::<PathBuf>().into_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes the index of the moved checkout beside `index` and renames it over `index`: the entries
/// of `live` that no change touches, and for each changed file, symlink and submodule an entry
/// with the stat data of what is now live in `checkout` (read through its descriptors, like the
/// move that put it there). Waits (at most [`RACY_WAIT`]) until the file written
/// is newer than the files it describes, so the next drift check trusts their stat data.
fn write_index(
    fail: &Fail<'_>,
    live: &Index,
    index: &Path,
    target: &Path,
    checkout: &mut Confined,
    changes: &BTreeMap<PathBuf, Want>,
    chowned: bool,
) -> Result<(), GitError> {
    let new_path = beside(index, NEW_INDEX_SUFFIX);
    let at = |what: &str, path: &Path| format!("{what} {}", path.display());
    if let Some(parent) = index.parent() {
        fs::create_dir_all(parent).map_err(|e| fail.io(at("create", parent), e))?;
    }
    // Left by a writer that crashed (the store's one thread is the only writer): a lock on the
    // old index would keep the drift check from refreshing the new one.
    for stale in [
        new_path.clone(),
        beside(&new_path, ".lock"),
        beside(index, ".lock"),
    ] {
        remove_any(&stale).map_err(|e| fail.io(at("remove", &stale), e))?;
    }
    // An entry is stale when its path changed, or lies below a path that is no directory now.
    let stale = |path: &Path| {
        changes.contains_key(path)
            || path
                .ancestors()
                .skip(1)
                .any(|dir| changes.get(dir).is_some_and(|w| *w != Want::Tree))
    };
    let mut entries: BTreeMap<Vec<u8>, IndexEntry> = live
        .iter()
        .filter(|e| !stale(Path::new(OsStr::from_bytes(&e.path))))
        .map(|e| (e.path.clone(), e))
        .collect();
    let mut newest: Option<SystemTime> = None;
    for (rel, want) in changes {
        let (id, mode) = match *want {
            Want::Blob { id, mode } => (id, mode as u32),
            Want::Gitlink(id) => (id, GITLINK_MODE),
            Want::Absent | Want::Tree => continue,
        };
        // What was moved in, where it was moved: through the checkout's descriptors.
        let meta = checkout
            .lstat(rel)
            .and_then(|st| {
                st.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "gone from the checkout"))
            })
            .map_err(|e| fail.io(at("stat", rel), e))?;
        let modified = Duration::new(
            u64::try_from(meta.st_mtime).unwrap_or(0),
            u32::try_from(meta.st_mtime_nsec).unwrap_or(0),
        );
        newest = newest.max(Some(SystemTime::UNIX_EPOCH + modified));
        let path = rel.as_os_str().as_bytes().to_vec();
        entries.insert(path.clone(), entry(&meta, id, mode, path));
    }
    let mut fresh = Index::open(&new_path).map_err(|e| fail.git(e))?;
    for entry in entries.values() {
        fresh.add(entry).map_err(|e| fail.git(e))?;
    }
    if chowned {
        restat(&mut fresh, target).map_err(|e| fail.git(e))?;
    }
    let started = Instant::now();
    loop {
        fresh.write().map_err(|e| fail.git(e))?;
        let written = fs::metadata(&new_path)
            .and_then(|m| m.modified())
            .map_err(|e| fail.io(at("stat", &new_path), e))?;
        match newest {
            Some(newest) if written <= newest && started.elapsed() < RACY_WAIT => {
                std::thread::sleep(Duration::from_millis(1));
            }
            _ => break,
        }
    }
    fs::File::open(&new_path)
        .and_then(|f| f.sync_all())
        .map_err(|e| fail.io(at("sync", &new_path), e))?;
    fs::rename(&new_path, index).map_err(|e| fail.io(at("replace", index), e))
}

/// An index entry for the live file `meta` at `path`, as libgit2 makes one from `stat` (the index
/// keeps 32 bits of each field, as git does).
fn entry(meta: &FileStat, id: Oid, mode: u32, path: Vec<u8>) -> IndexEntry {
    IndexEntry {
        ctime: IndexTime::new(meta.st_ctime as i32, meta.st_ctime_nsec as u32),
        mtime: IndexTime::new(meta.st_mtime as i32, meta.st_mtime_nsec as u32),
        dev: meta.st_rdev as u32,
        ino: meta.st_ino as u32,
        mode,
        uid: meta.st_uid,
        gid: meta.st_gid,
        file_size: meta.st_size as u32,
        id,
        flags: 0,
        flags_extended: 0,
        path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staging_directory_is_a_sibling() {
        for target in ["/var/lib/plumb/web", "/var/lib/plumb/web/", "rel/web"] {
            let stage = beside(Path::new(target), STAGE_SUFFIX);
            assert_eq!(
                stage.parent(),
                Path::new(target).parent(),
                "{target} -> {}",
                stage.display()
            );
            assert!(stage.to_string_lossy().ends_with("web.plumb-stage"));
        }
    }
}
