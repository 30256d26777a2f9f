//! The drift check: local edits in a service's checkout, run for every service at every fetch.
//!
//! The authority is libgit2's diff of the synced revision's tree against the work tree, through
//! the service's index (its stat cache). That diff has a fixed cost per call that dwarfs the
//! work of a small checkout: a repository handle opened, the configuration snapshotted three
//! times, the ignore rules loaded, iterators and pathspecs set up (bench/RESULTS.md: ~0.3 ms of
//! CPU per service and tick, where a checkout of 8 files takes 10 system calls to look at).
//!
//! So [`Store::drift`] first asks [`unchanged`] whether nothing could have changed, and runs the
//! diff only when it cannot tell. `unchanged` says yes only when all of these hold, each a
//! condition under which the diff would find nothing either:
//! - the index lists, under the links, exactly the synced tree's files, with the same ids and
//!   modes (the diff's tree-to-index half is empty), and nothing but plain stage-0 entries (no
//!   conflicts, submodules, assume-valid, skip-worktree or intent-to-add entries);
//! - every file under the links on disk is one the index lists (no untracked file; an ignored
//!   one also sends the check to the diff, which knows the ignore rules), and every file the index
//!   lists is there;
//! - each of them has exactly the stat data its index entry records: type and executable bit,
//!   size, inode, owner, group, modification and change times to the nanosecond (the diff
//!   compares these too, and reads a file's content only when one differs);
//! - no entry was modified at or after the time the index file was written ("racy git", as git
//!   and libgit2 handle it): an entry older than its index describes a file that any later write
//!   would give a modification time no earlier than the index's, so a same-size edit within the
//!   same clock tick as the checkout still sends the check to the diff, which reads the file. A
//!   write always sets the change time too, which no unprivileged call can set back.
//!
//! Anything else (an error, a file that is not regular or a symlink, a symlink on the way to a
//! link) is "cannot tell", never "unchanged". The check reads the store through its main handle,
//! whose object cache keeps the trees for all the services of one fetch.
//!
//! Files the checkout holds beside git's (a service's own logs, caches) are the one case where
//! every condition but the second holds at every tick. Whether they count is the ignore rules'
//! call, which only the diff makes; but the rules judge a path, not its content. So after a diff
//! found such a checkout clean and listed as ignored exactly the files the stat pass saw beside
//! git's, the caller keeps them ([`Ignored`]: the synced revision and those paths), and a later
//! check that finds everything else unchanged and exactly those paths needs no diff. The rules
//! must then be the ones the diff used: the store pins its own (see `store.rs`), the tracked
//! `.gitignore` files are covered by their stat data, and nothing is kept while an untracked
//! `.gitignore` (among the files, or on the way from the checkout's root to a link) or a tracked
//! one that is a symlink could change them unseen. Sockets and FIFOs are skipped, as libgit2
//! skips them; more than [`MAX_BESIDE`] files beside git's are left to the diff.

use std::cell::RefCell;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use git2::{ErrorCode, Index, IndexEntry, ObjectType, Oid, Tree};

use super::checkout::{GITLINK_MODE, SYMLINK_MODE};
use super::history::validate_links;
use super::{GitError, Store};

/// The stage bits of an index entry's flags: non-zero for a conflict.
const STAGE_MASK: u16 = 0x3000;

impl Store {
    /// Local edits in a service's checkout: the paths under `links` where `target` differs from
    /// `synced`'s tree (changed, added, deleted, type or mode changed), sorted. A missing `target`
    /// is every file deleted. Reads only; the files are left as they are, so an operator decides
    /// (pull --force or wipe) rather than plumb overwriting them silently. A checkout whose stat
    /// data shows nothing could have changed costs a few system calls (see the module doc); to
    /// check many services of this store, [`Store::drift_checks`] shares what they have in common.
    pub fn drift(
        &self,
        target: &Path,
        index: &Path,
        synced: Oid,
        links: &[String],
    ) -> Result<Vec<String>, GitError> {
        self.drift_checks()
            .drift(target, index, synced, links, None)
            .map(|(files, _)| files)
    }

    /// A session of drift checks ([`DriftChecks::drift`]) on this store, for the services of one
    /// fetch: it reads each synced revision's root tree once, not once per service (libgit2
    /// caches no tree above 4 KiB, and the root of an upstream with 1,000 services is ~40 KiB).
    pub fn drift_checks(&self) -> DriftChecks<'_> {
        DriftChecks {
            store: self,
            root: RefCell::new(None),
        }
    }

    /// [`Store::drift`] by libgit2's diff of `synced`'s tree against the work tree `target`; with
    /// `ignored`, also the files the ignore rules cover (repository paths, sorted), else none.
    fn diff_checkout(
        &self,
        target: &Path,
        index: &Path,
        synced: Oid,
        links: &[String],
        ignored: bool,
    ) -> Result<(Vec<String>, Vec<Vec<u8>>), GitError> {
        let revision = synced.to_string();
        let git_err = |source: git2::Error| GitError::Checkout {
            url: self.shown.clone(),
            path: target.to_path_buf(),
            revision: revision.clone(),
            source,
        };
        let repo = self.own_handle()?;
        let tree = self.tree_of(&repo, synced)?;
        if !target.is_dir() {
            // Nothing on disk: every file of the links is gone.
            let mut gone = Vec::new();
            tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
                if entry.kind() != Some(git2::ObjectType::Tree) {
                    let path = format!("{dir}{}", entry.name().unwrap_or_default());
                    if super::under_links(&path, links) {
                        gone.push(path);
                    }
                }
                git2::TreeWalkResult::Ok
            })
            .map_err(git_err)?;
            return Ok((gone, Vec::new()));
        }
        repo.set_workdir(target, false).map_err(git_err)?;
        // The service's index is the stat cache of its checkout: with it, files whose size and
        // times did not change are not read at all. Without one, every file is hashed.
        let index_path = index;
        let mut index = Index::open(index).ok();
        if let Some(index) = index.as_mut() {
            repo.set_index(index).map_err(git_err)?;
        }
        let mut opts = git2::DiffOptions::new();
        opts.include_untracked(true)
            .recurse_untracked_dirs(true)
            .include_ignored(ignored)
            .recurse_ignored_dirs(ignored)
            .include_typechange(true)
            .disable_pathspec_match(true);
        for link in links {
            opts.pathspec(link.trim_end_matches('/'));
        }
        let diff = match index {
            Some(_) => repo.diff_tree_to_workdir_with_index(Some(&tree), Some(&mut opts)),
            None => repo.diff_tree_to_workdir(Some(&tree), Some(&mut opts)),
        }
        .map_err(git_err)?;
        let ignored: Vec<Vec<u8>> = {
            let mut paths: Vec<Vec<u8>> = diff
                .deltas()
                .filter(|d| d.status() == git2::Delta::Ignored)
                .filter_map(|d| d.new_file().path_bytes().map(<[u8]>::to_vec))
                .collect();
            paths.sort();
            paths
        };
        let changed = || diff.deltas().filter(|d| d.status() != git2::Delta::Ignored);
        if changed().next().is_none()
            && let Some(index) = index.as_mut()
            && racy(index, index_path)
        {
            // Clean, but the index is no newer than files it lists, so git cannot trust their
            // stat data and every tick would read and hash them all again ("racy git"). Written
            // now, later than the files, it makes the next check a stat per file.
            if let Err(e) = index.write() {
                tracing::debug!(index = %index_path.display(), "cannot refresh the index: {e}");
            }
        }
        let mut paths: Vec<String> = changed()
            .filter_map(|d| {
                d.new_file()
                    .path()
                    .or(d.old_file().path())
                    .map(|p| p.to_string_lossy().into_owned())
            })
            .filter(|p| super::under_links(p, links))
            .collect();
        paths.sort();
        paths.dedup();
        Ok((paths, ignored))
    }
}

/// Drift checks of several services of one store ([`Store::drift_checks`]). Holds the last
/// synced revision's root tree; dropped, it frees it.
pub struct DriftChecks<'s> {
    store: &'s Store,
    /// The root tree of the revision checked last, with that commit.
    root: RefCell<Option<(Oid, Tree<'s>)>>,
}

/// The untracked files a clean drift check of a checkout found beside git's, which the ignore
/// rules cover, at one synced revision. Handed to the next check of the same checkout
/// ([`DriftChecks::drift`]), the same files with nothing else changed are clean without the diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    synced: Oid,
    /// Repository paths (under the links), sorted; shared, as the daemon hands them to every
    /// fetch job.
    paths: std::sync::Arc<[Vec<u8>]>,
}

/// The most files beside git's that a check compares with what it kept ([`Ignored`]): a larger
/// ignored tree (a cache directory) is left to the diff, which does not walk an ignored directory.
const MAX_BESIDE: usize = 1000;

impl DriftChecks<'_> {
    /// [`Store::drift`], sharing the root tree with the checks before it. `known` is what the
    /// last check of this checkout returned; the second value is what to hand to the next one.
    pub fn drift(
        &self,
        target: &Path,
        index: &Path,
        synced: Oid,
        links: &[String],
        known: Option<&Ignored>,
    ) -> Result<(Vec<String>, Option<Ignored>), GitError> {
        validate_links(links)?;
        if links.is_empty() {
            return Ok((Vec::new(), None));
        }
        let beside = match self.unchanged(target, index, synced, links) {
            Fast::Unchanged => return Ok((Vec::new(), None)),
            Fast::Beside(paths) => {
                let known = known.filter(|k| k.synced == synced && *k.paths == *paths);
                if let Some(known) = known {
                    return Ok((Vec::new(), Some(known.clone())));
                }
                Some(paths)
            }
            Fast::CannotTell => None,
        };
        let (files, ignored) =
            self.store
                .diff_checkout(target, index, synced, links, beside.is_some())?;
        // Kept only when the diff judged exactly what the stat pass saw: a file that came or went
        // in between was not judged.
        let kept = beside
            .filter(|paths| files.is_empty() && *paths == ignored)
            .map(|paths| Ignored {
                synced,
                paths: paths.into(),
            });
        Ok((files, kept))
    }

    /// [`unchanged`] with the root tree of `synced`, read once per session and revision.
    fn unchanged(&self, target: &Path, index: &Path, synced: Oid, links: &[String]) -> Fast {
        let repo = &self.store.repo;
        let mut root = self.root.borrow_mut();
        if root.as_ref().is_none_or(|(commit, _)| *commit != synced) {
            *root = None;
            let Ok(tree) = repo.find_commit(synced).and_then(|c| c.tree()) else {
                return Fast::CannotTell;
            };
            *root = Some((synced, tree));
        }
        let Some((_, tree)) = root.as_ref() else {
            return Fast::CannotTell;
        };
        unchanged(repo, tree, target, index, links)
    }
}

/// What the stat data alone says about a checkout.
#[derive(Debug, PartialEq, Eq)]
enum Fast {
    /// Git's files are as checked out, and nothing else is there: no drift.
    Unchanged,
    /// Git's files are as checked out, and these untracked files (repository paths, sorted) are
    /// beside them: drift only if the ignore rules do not cover them.
    Beside(Vec<Vec<u8>>),
    /// Only the diff can tell.
    CannotTell,
}

/// Whether an entry of `index` was modified no earlier than the index file was written: git then
/// cannot tell a later edit of the same size from the file as checked out, and reads the file.
fn racy(index: &Index, path: &Path) -> bool {
    let Ok(written) = std::fs::metadata(path).and_then(|m| m.modified()) else {
        return false;
    };
    let written = written
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    index.iter().any(|e| {
        let mtime = std::time::Duration::new(
            u64::try_from(e.mtime.seconds()).unwrap_or(0),
            e.mtime.nanoseconds(),
        );
        mtime >= written
    })
}

/// Whether the checkout `target` certainly holds the files of `tree` (a synced revision's root)
/// under `links` as its index `index_path` describes them, untouched since, and what else is
/// there (see the module doc for the conditions). Anything in doubt is [`Fast::CannotTell`]: the
/// diff decides.
fn unchanged(
    repo: &git2::Repository,
    tree: &Tree<'_>,
    target: &Path,
    index_path: &Path,
    links: &[String],
) -> Fast {
    use Fast::CannotTell;
    let Ok(written) = fs::metadata(index_path) else {
        return CannotTell;
    };
    // The index's own time, as libgit2 takes it when it reads the index.
    let written = (written.mtime(), written.mtime_nsec());
    let Ok(index) = Index::open(index_path) else {
        return CannotTell;
    };
    let mut entries = Vec::with_capacity(index.len());
    for entry in index.iter() {
        let Ok(path) = std::str::from_utf8(&entry.path) else {
            return CannotTell;
        };
        if !super::under_links(path, links) {
            continue;
        }
        let modified = (
            i64::from(entry.mtime.seconds()),
            i64::from(entry.mtime.nanoseconds()),
        );
        if !plain(&entry) || modified >= written {
            return CannotTell;
        }
        entries.push(entry);
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let Some(files) = tree_files(repo, tree, links) else {
        return CannotTell;
    };
    let same_as_tree = files.len() == entries.len()
        && files
            .iter()
            .zip(&entries)
            .all(|(f, e)| f.path == e.path && f.id == e.id && f.mode == e.mode);
    if !same_as_tree {
        return CannotTell;
    }
    match disk_matches(target, links, &entries) {
        Some(beside) if beside.is_empty() => Fast::Unchanged,
        Some(beside) if rules_are_git_s(target, links, &entries) => Fast::Beside(beside),
        _ => CannotTell,
    }
}

/// Whether the ignore rules the diff applies to `target` come only from the store and from the
/// tracked `.gitignore` files in `entries` as they are (no symlink among them, whose target could
/// change unseen), with no untracked `.gitignore` from the checkout's root down to each link.
fn rules_are_git_s(target: &Path, links: &[String], entries: &[IndexEntry]) -> bool {
    let is_rules = |path: &[u8]| path == b".gitignore" || path.ends_with(b"/.gitignore");
    if entries
        .iter()
        .any(|e| is_rules(&e.path) && e.mode == SYMLINK_MODE as u32)
    {
        return false;
    }
    links.iter().all(|link| {
        let mut dir = target.to_path_buf();
        let mut above = vec![dir.join(".gitignore")];
        let parts: Vec<&str> = link.trim_end_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            dir.push(part);
            above.push(dir.join(".gitignore"));
        }
        above.iter().all(|p| {
            matches!(fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
        })
    })
}

/// An index entry the fast check understands: a file or symlink at stage 0, without the flags
/// that make the diff skip or treat it specially.
fn plain(entry: &IndexEntry) -> bool {
    let flags = git2::IndexEntryFlag::from_bits_truncate(entry.flags);
    let extended = git2::IndexEntryExtendedFlag::from_bits_truncate(entry.flags_extended);
    entry.flags & STAGE_MASK == 0
        && !flags.is_valid()
        && !extended.is_intent_to_add()
        && !extended.is_skip_worktree()
        && entry.mode != GITLINK_MODE
}

/// A file of a tree: its path in the repository, its blob and its (normalised) mode.
struct TreeFile {
    path: Vec<u8>,
    id: Oid,
    mode: u32,
}

/// Every file (blob) of `root` under `links`, sorted by path; `None` when the tree holds
/// something else there (a submodule) or cannot be read.
fn tree_files(repo: &git2::Repository, root: &Tree<'_>, links: &[String]) -> Option<Vec<TreeFile>> {
    let mut files = Vec::new();
    for link in links {
        let link = link.trim_end_matches('/');
        let entry = match root.get_path(Path::new(link)) {
            Ok(entry) => entry,
            Err(e) if e.code() == ErrorCode::NotFound => continue,
            Err(_) => return None,
        };
        let mut pending = match entry.kind() {
            Some(ObjectType::Tree) => vec![(link.as_bytes().to_vec(), entry.id())],
            Some(ObjectType::Blob) => {
                files.push(TreeFile {
                    path: link.as_bytes().to_vec(),
                    id: entry.id(),
                    mode: entry.filemode() as u32,
                });
                continue;
            }
            _ => return None,
        };
        while let Some((dir, id)) = pending.pop() {
            let tree = repo.find_tree(id).ok()?;
            for entry in tree.iter() {
                let path = [dir.as_slice(), b"/", entry.name_bytes()].concat();
                match entry.kind() {
                    Some(ObjectType::Tree) => pending.push((path, entry.id())),
                    Some(ObjectType::Blob) => files.push(TreeFile {
                        path,
                        id: entry.id(),
                        mode: entry.filemode() as u32,
                    }),
                    _ => return None,
                }
            }
        }
    }
    // Nested links list their common files twice.
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup_by(|a, b| a.path == b.path);
    Some(files)
}

/// Whether the files under `links` in `target` include exactly `entries` (sorted by path), each
/// with the stat data its entry records: then the other files there (repository paths, sorted),
/// else `None`. An untracked `.gitignore` is `None` too: what it ignores depends on its content.
/// Never follows a symlink.
fn disk_matches(target: &Path, links: &[String], entries: &[IndexEntry]) -> Option<Vec<Vec<u8>>> {
    let mut seen = vec![false; entries.len()];
    let mut beside = Vec::new();
    // What is still to be looked at: path on disk, path in the repository, its metadata (from
    // the directory listing, which looks a name up in its directory rather than walking a path).
    let mut pending: Vec<(PathBuf, Vec<u8>, fs::Metadata)> = Vec::new();
    'links: for link in links {
        let link = link.trim_end_matches('/');
        let mut path = target.to_path_buf();
        let mut components = link.split('/').peekable();
        while let Some(component) = components.next() {
            path.push(component);
            if components.peek().is_none() {
                break;
            }
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                // Nothing of this link on disk: its entries stay unseen.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'links,
                // A symlink or a file on the way to a link.
                _ => return None,
            }
        }
        match fs::symlink_metadata(&path) {
            Ok(meta) => pending.push((path, link.as_bytes().to_vec(), meta)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return None,
        }
    }
    while let Some((path, rel, meta)) = pending.pop() {
        if meta.is_dir() {
            let Ok(dir) = fs::read_dir(&path) else {
                return None;
            };
            for child in dir {
                let Ok(child) = child else {
                    return None;
                };
                // Not followed: fstatat(AT_SYMLINK_NOFOLLOW) in the directory.
                let meta = match child.metadata() {
                    Ok(meta) => meta,
                    // Removed meanwhile: if it was listed, its entry stays unseen.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(_) => return None,
                };
                let name = child.file_name();
                let rel = [rel.as_slice(), b"/", name.as_bytes()].concat();
                pending.push((child.path(), rel, meta));
            }
            continue;
        }
        let Ok(i) = entries.binary_search_by(|e| e.path.as_slice().cmp(&rel)) else {
            // Untracked or ignored: the diff tells which. Only files and symlinks: libgit2 skips
            // sockets, FIFOs and devices. An untracked `.gitignore` is rules: the diff decides.
            let kind = meta.file_type();
            if !kind.is_file() && !kind.is_symlink() {
                continue;
            }
            if rel == b".gitignore" || rel.ends_with(b"/.gitignore") || beside.len() == MAX_BESIDE {
                return None;
            }
            beside.push(rel);
            continue;
        };
        if !same_stat(&entries[i], &meta) {
            return None;
        }
        seen[i] = true;
    }
    if !seen.iter().all(|s| *s) {
        return None;
    }
    beside.sort();
    Some(beside)
}

/// Whether `meta` (not followed) is what `entry` records: git's mode (type and executable bit),
/// size, inode, owner, group, modification and change times, as the index keeps them (32 bits).
fn same_stat(entry: &IndexEntry, meta: &fs::Metadata) -> bool {
    let kind = meta.file_type();
    let mode = if kind.is_symlink() {
        SYMLINK_MODE as u32
    } else if kind.is_file() {
        if meta.mode() & 0o100 != 0 {
            0o100755
        } else {
            0o100644
        }
    } else {
        return false;
    };
    entry.mode == mode
        && entry.file_size == meta.size() as u32
        && entry.ino == meta.ino() as u32
        && entry.uid == meta.uid()
        && entry.gid == meta.gid()
        && entry.mtime.seconds() == meta.mtime() as i32
        && entry.mtime.nanoseconds() == meta.mtime_nsec() as u32
        && entry.ctime.seconds() == meta.ctime() as i32
        && entry.ctime.nanoseconds() == meta.ctime_nsec() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::Transport;

    /// An upstream with `web/a.conf`, `web/b.conf` and a `web/.gitignore` of `*.log`, fetched
    /// into a store.
    fn store_with_web(root: &Path) -> (Store, Oid) {
        let up = git2::Repository::init_bare(root.join("up.git")).unwrap();
        let files: [(&str, u32, &[u8]); 3] = [
            ("web/a.conf", 0o100644, b"aaaa\n"),
            ("web/b.conf", 0o100644, b"bbbb\n"),
            ("web/.gitignore", 0o100644, b"*.log\n"),
        ];
        let tree = up
            .find_tree(crate::git::fixture::tree(&up, &files))
            .unwrap();
        let who = git2::Signature::now("t", "t@example.invalid").unwrap();
        up.commit(Some("refs/heads/main"), &who, &who, "web", &tree, &[])
            .unwrap();
        let url = format!("file://{}", root.join("up.git").display());
        let mut store = Store::open(&root.join("stores"), &url).unwrap();
        let report = store
            .fetch(&["main".to_owned()], &Transport::default())
            .unwrap();
        let head = report.heads["main"].unwrap();
        (store, head)
    }

    /// [`store_with_web`] checked out at its head into `deploy` (index `web.index`) under a new
    /// temporary directory, returned to keep it.
    fn web_checkout() -> (tempfile::TempDir, Store, Oid) {
        let root = tempfile::tempdir().unwrap();
        let (store, head) = store_with_web(root.path());
        let (target, index) = (root.path().join("deploy"), root.path().join("web.index"));
        store
            .checkout(&target, &index, None, head, &["web".to_owned()])
            .unwrap();
        (root, store, head)
    }

    /// A clean checkout whose index is newer than its files is judged by its stat data alone;
    /// an edit of the same size, a new file or a mode change sends it to the diff, which sees it.
    #[test]
    fn a_clean_checkout_is_told_by_its_stat_data_and_an_edit_is_not() {
        let (root, store, head) = web_checkout();
        let links = vec!["web".to_owned()];
        let (target, index) = (root.path().join("deploy"), root.path().join("web.index"));
        let fast = || {
            let tree = store.repo.find_commit(head).unwrap().tree().unwrap();
            unchanged(&store.repo, &tree, &target, &index, &links)
        };
        // The first clean check may rewrite the index (racy git); after it, stat data decides.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            store
                .drift(&target, &index, head, &links)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            fast(),
            Fast::Unchanged,
            "a clean checkout with a newer index needs no diff"
        );

        // A file beside git's: the stat data cannot say whether it is ignored.
        fs::write(target.join("web/new.conf"), "n\n").unwrap();
        assert_eq!(fast(), Fast::Beside(vec![b"web/new.conf".to_vec()]));
        assert_eq!(
            store.drift(&target, &index, head, &links).unwrap(),
            vec!["web/new.conf".to_owned()]
        );
        fs::remove_file(target.join("web/new.conf")).unwrap();

        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(target.join("web/a.conf"), "AAAA\n").unwrap();
        assert_eq!(fast(), Fast::CannotTell);
        assert_eq!(
            store.drift(&target, &index, head, &links).unwrap(),
            vec!["web/a.conf".to_owned()]
        );
        fs::write(target.join("web/a.conf"), "aaaa\n").unwrap();

        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(target.join("web/b.conf"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(fast(), Fast::CannotTell);
        assert_eq!(
            store.drift(&target, &index, head, &links).unwrap(),
            vec!["web/b.conf".to_owned()]
        );
    }

    /// A kept [`Ignored`] naming exactly `paths` at `synced`.
    fn kept(synced: Oid, paths: &[&str]) -> Ignored {
        Ignored {
            synced,
            paths: paths.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    /// Files the ignore rules cover beside a clean checkout: the diff says so once, then the same
    /// files (even grown) need no diff while anything else, a new untracked file, an edit, a
    /// `.gitignore` that is not git's or another synced revision, still goes to the diff and is seen.
    #[test]
    fn ignored_files_beside_a_checkout_are_judged_once() {
        let (root, store, head) = web_checkout();
        let links = vec!["web".to_owned()];
        let (target, index) = (root.path().join("deploy"), root.path().join("web.index"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let checks = store.drift_checks();
        let check =
            |known: Option<&Ignored>| checks.drift(&target, &index, head, &links, known).unwrap();
        let (files, known) = check(None);
        assert!(files.is_empty() && known.is_none(), "{files:?} {known:?}");

        fs::write(target.join("web/app.log"), "started\n").unwrap();
        let (files, known) = check(None);
        assert!(files.is_empty(), "{files:?}");
        let known = known.expect("the ignored file is remembered");
        assert_eq!(known, kept(head, &["web/app.log"]));
        fs::write(target.join("web/app.log"), "started\nstill running\n").unwrap();
        assert_eq!(check(Some(&known)), (Vec::new(), Some(known.clone())));
        // The shortcut is taken: what is kept is trusted without the diff, which would object.
        fs::rename(target.join("web/app.log"), target.join("web/app.txt")).unwrap();
        let trusted = kept(head, &["web/app.txt"]);
        assert_eq!(check(Some(&trusted)), (Vec::new(), Some(trusted.clone())));
        assert_eq!(check(None), (vec!["web/app.txt".to_owned()], None));
        fs::rename(target.join("web/app.txt"), target.join("web/app.log")).unwrap();

        fs::write(target.join("web/notes.txt"), "n\n").unwrap();
        assert_eq!(
            check(Some(&known)),
            (vec!["web/notes.txt".to_owned()], None)
        );
        fs::remove_file(target.join("web/notes.txt")).unwrap();

        // An untracked .gitignore holds rules: never kept, and with one the diff always runs.
        fs::create_dir(target.join("web/sub")).unwrap();
        fs::write(target.join("web/sub/.gitignore"), "*\n").unwrap();
        fs::write(target.join("web/sub/x"), "x\n").unwrap();
        let (files, beside) = check(Some(&known));
        assert!(
            files.is_empty(),
            "git's own verdict: all ignored: {files:?}"
        );
        assert_eq!(beside, None);
        let remembered = kept(head, &["web/app.log", "web/sub/.gitignore", "web/sub/x"]);
        fs::write(target.join("web/sub/.gitignore"), "nothing\n").unwrap();
        let (files, _) = check(Some(&remembered));
        assert_eq!(files, ["web/sub/.gitignore", "web/sub/x"]);
        fs::remove_dir_all(target.join("web/sub")).unwrap();

        // So does one above the links, in the checkout's root, which the diff reads too.
        fs::write(target.join(".gitignore"), "*.txt\n").unwrap();
        fs::write(target.join("web/notes.txt"), "n\n").unwrap();
        let (files, beside) = check(None);
        assert!(files.is_empty(), "{files:?}");
        assert_eq!(beside, None);
        fs::remove_file(target.join(".gitignore")).unwrap();
        assert_eq!(
            check(beside.as_ref()),
            (vec!["web/notes.txt".to_owned()], None)
        );
        fs::remove_file(target.join("web/notes.txt")).unwrap();

        // A FIFO is nothing to git: skipped, and a file of its name later is judged.
        nix::unistd::mkfifo(&target.join("web/app.sock"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(check(Some(&known)), (Vec::new(), Some(known.clone())));
        fs::remove_file(target.join("web/app.sock")).unwrap();
        fs::write(target.join("web/app.sock"), "not a socket\n").unwrap();
        assert_eq!(check(Some(&known)), (vec!["web/app.sock".to_owned()], None));
        fs::remove_file(target.join("web/app.sock")).unwrap();

        let elsewhere = Ignored {
            synced: Oid::ZERO_SHA1,
            ..known.clone()
        };
        fs::write(target.join("web/app.log"), "").unwrap();
        let (files, again) = check(Some(&elsewhere));
        assert!(files.is_empty(), "{files:?}");
        assert_eq!(
            again.as_ref(),
            Some(&known),
            "judged again for this revision"
        );

        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(target.join("web/a.conf"), "AAAA\n").unwrap();
        assert_eq!(check(Some(&known)), (vec!["web/a.conf".to_owned()], None));
        fs::write(target.join("web/a.conf"), "aaaa\n").unwrap();
    }
}
