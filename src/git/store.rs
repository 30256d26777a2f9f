//! Opening, creating and healing stores: the bare repository `stores_dir/<store_id>.git` of one
//! upstream.
//!
//! A store is only a cache of the upstream, so damage is repaired by fetching again: a store that
//! cannot be opened, whose references point at missing objects, or whose fetch fails because the
//! repository is corrupt is renamed to `<id>.git.damaged-<unix time>` (kept for forensics) and
//! created anew. Deployed files live elsewhere and are not touched.
//!
//! A fetch error that looks like damage may also come from the upstream (a corrupt repository
//! behind `file://`, a broken pack on the wire). Re-creating the store cannot fix that, so such an
//! error heals only once until a fetch succeeds again: a broken upstream costs one copy set
//! aside, not one per fetch. That "once" is a file in the new store ([`HEALED_MARK`]), not a
//! flag of one open `Store`: the daemon opens the store afresh for every job, and a flag would
//! set a copy aside at every poll.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use git2::{ErrorClass, ErrorCode, Repository, RepositoryInitOptions};

use super::{GitError, Store, redact_url, store_id};

/// In a store created by healing after a fetch error: until a fetch succeeds, another fetch error
/// that looks like damage is the upstream's, and does not set this store aside again.
pub(super) const HEALED_MARK: &str = "plumb-healed-after-fetch-error";

/// Where fetched branches live in a store: `refs/remotes/origin/<branch>`.
pub(super) const BRANCH_PREFIX: &str = "refs/remotes/origin/";

/// Whether a libgit2 error means the repository on disk is damaged (unreadable objects,
/// references, configuration or repository files), as opposed to network, authentication,
/// locking or bad input. A missing object is not damage by itself: callers may ask for commits the
/// store never had; missing objects behind the store's own references are checked explicitly.
pub(super) fn is_damage(e: &git2::Error) -> bool {
    let class = matches!(
        e.class(),
        ErrorClass::Odb
            | ErrorClass::Zlib
            | ErrorClass::Object
            | ErrorClass::Repository
            | ErrorClass::Reference
            | ErrorClass::Config
            | ErrorClass::Tree
    );
    let code = matches!(
        e.code(),
        ErrorCode::NotFound
            | ErrorCode::Locked
            | ErrorCode::User
            | ErrorCode::Auth
            | ErrorCode::Certificate
            | ErrorCode::InvalidSpec
            | ErrorCode::Ambiguous
    );
    class && !code
}

impl Store {
    /// Opens the store for `url` under `stores_dir`, creating it when missing; a store that cannot
    /// be opened because it is damaged is moved aside (kept for forensics) and created anew.
    ///
    /// Stale `*.lock` files of the store (left by a crash) are removed: see the module invariants.
    pub fn open(stores_dir: &Path, url: &str) -> Result<Store, GitError> {
        let shown = redact_url(url);
        let path = stores_dir.join(format!("{}.git", store_id(url)));
        let io_err = |action: &'static str, path: &Path| {
            let shown = shown.clone();
            let path = path.to_path_buf();
            move |source| GitError::StoreIo {
                url: shown,
                path,
                action,
                source,
            }
        };
        fs::create_dir_all(stores_dir)
            .map_err(io_err("create the stores directory", stores_dir))?;
        let mut healed = false;
        let repo = match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(&path, &shown)?,
            Err(e) => return Err(io_err("inspect", &path)(e)),
            Ok(_) => match open_existing(&path) {
                Ok(repo) => repo,
                Err(Opened::Damaged(why)) => {
                    set_aside(&path, &shown, &why)?;
                    healed = true;
                    create(&path, &shown)?
                }
                Err(Opened::Failed(source)) => {
                    return Err(GitError::Store {
                        url: shown,
                        path,
                        source,
                    });
                }
                Err(Opened::Io(action, source)) => return Err(io_err(action, &path)(source)),
            },
        };
        Ok(Store {
            repo,
            url: url.to_string(),
            shown,
            damaged: std::cell::Cell::new(false),
            heal_on_fetch_error: !healed && fs::symlink_metadata(path.join(HEALED_MARK)).is_err(),
            path,
        })
    }

    /// Opens the existing store for `url` to read history while its owner (the daemon) may be
    /// fetching into it: nothing is created, swept, healed or written, so it is safe beside a
    /// concurrent writer (git only ever adds objects, and references move by atomic rename).
    /// `plumb apply` uses it to see which files changed between two revisions. A store that is
    /// missing or unreadable is an error; fixing it is the daemon's job.
    pub fn open_readonly(stores_dir: &Path, url: &str) -> Result<Store, GitError> {
        let shown = redact_url(url);
        let path = stores_dir.join(format!("{}.git", store_id(url)));
        let flags = git2::RepositoryOpenFlags::NO_SEARCH | git2::RepositoryOpenFlags::BARE;
        let repo = Repository::open_ext(&path, flags, std::iter::empty::<&std::ffi::OsStr>())
            .map_err(|source| GitError::Store {
                url: shown.clone(),
                path: path.clone(),
                source,
            })?;
        Ok(Store {
            repo,
            path,
            url: url.to_string(),
            shown,
            damaged: std::cell::Cell::new(false),
            // Never heals: a read-only store is not fetched.
            heal_on_fetch_error: false,
        })
    }

    /// Re-opens the store from disk and heals it if it is damaged or an operation since the last
    /// fetch found damage.
    pub(super) fn refresh(&mut self) -> Result<(), GitError> {
        match open_existing(&self.path) {
            Ok(repo) => {
                self.repo = repo;
                if self.damaged.get() {
                    self.heal("an earlier operation found it damaged")?;
                }
                Ok(())
            }
            Err(Opened::Damaged(why)) => self.heal(&why),
            Err(Opened::Failed(source)) => Err(GitError::Store {
                url: self.shown.clone(),
                path: self.path.clone(),
                source,
            }),
            Err(Opened::Io(action, source)) => Err(GitError::StoreIo {
                url: self.shown.clone(),
                path: self.path.clone(),
                action,
                source,
            }),
        }
    }

    /// Remembers in the store that it was made by healing after a fetch error (see
    /// [`HEALED_MARK`]). Best effort: without the file, the next fetch error heals once more.
    pub(super) fn mark_healed_after_fetch(&self) {
        if let Err(e) = fs::write(self.path.join(HEALED_MARK), b"") {
            tracing::warn!(store = %self.path.display(), "cannot mark the healed store: {e}");
        }
    }

    /// A fetch succeeded: the next fetch error that looks like damage may heal again.
    pub(super) fn unmark_healed_after_fetch(&self) {
        match fs::remove_file(self.path.join(HEALED_MARK)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(store = %self.path.display(), "cannot unmark the healed store: {e}");
            }
            _ => {}
        }
    }

    /// Moves this (damaged) store aside and starts over with an empty one.
    pub(super) fn heal(&mut self, why: &str) -> Result<(), GitError> {
        if fs::symlink_metadata(&self.path).is_ok() {
            set_aside(&self.path, &self.shown, why)?;
        }
        self.repo = create(&self.path, &self.shown)?;
        self.damaged.set(false);
        self.heal_on_fetch_error = false;
        Ok(())
    }
}

/// Why an existing store could not be used.
enum Opened {
    /// Damaged: set it aside and start over.
    Damaged(String),
    /// Something else (permissions, ...): re-creating would not help.
    Failed(git2::Error),
    /// A file-system error, with what was being done.
    Io(&'static str, io::Error),
}

/// Opens an existing store and checks that every branch it holds points at a commit it has.
fn open_existing(path: &Path) -> Result<Repository, Opened> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(Opened::Damaged("not a directory".to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Opened::Damaged("the store directory is gone".to_string()));
        }
        Err(e) => return Err(Opened::Io("inspect", e)),
    }
    remove_stale_locks(path).map_err(|e| Opened::Io("remove stale locks", e))?;
    let repo = match Repository::open_bare(path) {
        Ok(repo) => repo,
        Err(e) if e.code() == ErrorCode::NotFound || is_damage(&e) => {
            return Err(Opened::Damaged(e.message().to_string()));
        }
        Err(e) => return Err(Opened::Failed(e)),
    };
    if !repo.is_bare() {
        return Err(Opened::Damaged("not a bare repository".to_string()));
    }
    check_branches(&repo).map_err(|e| {
        if matches!(e.class(), ErrorClass::Os) {
            Opened::Failed(e)
        } else {
            Opened::Damaged(e.message().to_string())
        }
    })?;
    // Stores made before the settings were pinned get them now (a write only when one differs).
    // A store that cannot take them is still used, as it was before: said, not fatal.
    if let Err(e) = pin_config(&repo) {
        tracing::warn!(store = %path.display(), "cannot pin the store's git settings: {e}");
    }
    if let Err(e) = pin_info(path) {
        tracing::warn!(store = %path.display(), "cannot write the store's info files: {e}");
    }
    Ok(repo)
}

/// git settings that change what a drift check sees, pinned in each store's own config: libgit2
/// also reads `/etc/gitconfig`, root's `~/.gitconfig` and `~/.config/git/` (its `ignore` and
/// `attributes`), below the store's level, and a machine's personal git setup must not hide a
/// stray file (a global ignore), a mode change (`core.fileMode = false`) or a line-ending edit
/// (`core.autocrlf`) from the check. Checkouts write git's blobs as they are, whatever the config.
const PINNED: [(&str, &str); 8] = [
    ("core.excludesFile", "/dev/null"),
    ("core.attributesFile", "/dev/null"),
    ("core.autocrlf", "false"),
    ("core.safecrlf", "false"),
    ("core.fileMode", "true"),
    ("core.symlinks", "true"),
    ("core.ignoreCase", "false"),
    ("core.trustctime", "true"),
];

/// The store's `info/attributes`, which outranks every other attributes file (the tree's
/// `.gitattributes`, `/etc/gitattributes`, which libgit2 reads whatever `core.attributesFile`
/// says): no line-ending, ident or filter conversion when the drift check hashes a checkout's
/// files. Checkouts write blobs as they are, so they are compared as they are.
const ATTRIBUTES: &str = "* -text -eol -crlf -ident -filter\n";

/// Writes [`ATTRIBUTES`] and empties an `info/exclude` that holds any pattern (a store made from
/// a template), where they differ: the ignore rules are the tree's alone.
fn pin_info(store: &Path) -> io::Result<()> {
    let info = store.join("info");
    let attributes = info.join("attributes");
    if fs::read_to_string(&attributes).ok().as_deref() != Some(ATTRIBUTES) {
        fs::create_dir_all(&info)?;
        fs::write(&attributes, ATTRIBUTES)?;
    }
    let exclude = info.join("exclude");
    let patterns = fs::read_to_string(&exclude).is_ok_and(|text| {
        text.lines()
            .map(str::trim)
            .any(|l| !l.is_empty() && !l.starts_with('#'))
    });
    if patterns {
        fs::write(&exclude, "")?;
    }
    Ok(())
}

/// Writes [`PINNED`] into `repo`'s own config where it says otherwise.
fn pin_config(repo: &Repository) -> Result<(), git2::Error> {
    let mut local = repo.config()?.open_level(git2::ConfigLevel::Local)?;
    for (key, value) in PINNED {
        if local.get_string(key).ok().as_deref() != Some(value) {
            local.set_str(key, value)?;
        }
    }
    Ok(())
}

/// Every `refs/remotes/origin/*` must resolve to a commit present in the store.
pub(super) fn check_branches(repo: &Repository) -> Result<(), git2::Error> {
    for reference in repo.references_glob(&format!("{BRANCH_PREFIX}*"))? {
        let reference = reference?;
        let oid = reference.target().ok_or_else(|| {
            git2::Error::from_str(&format!(
                "{} is not a direct reference",
                String::from_utf8_lossy(reference.name_bytes())
            ))
        })?;
        repo.find_commit(oid).map_err(|e| {
            git2::Error::from_str(&format!(
                "{} points at {oid}: {}",
                String::from_utf8_lossy(reference.name_bytes()),
                e.message()
            ))
        })?;
    }
    Ok(())
}

/// Removes `*.lock` files in the store's top directory and under `refs/`: only a crashed plumb can
/// have left them, since one thread owns a store.
fn remove_stale_locks(path: &Path) -> io::Result<()> {
    fn sweep(dir: &Path, recurse: bool) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            let name = entry.file_name();
            if kind.is_dir() && recurse {
                sweep(&entry.path(), true)?;
            } else if !kind.is_dir() && name.as_encoded_bytes().ends_with(b".lock") {
                tracing::warn!(lock = %entry.path().display(), "removing stale lock file");
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
    sweep(path, false)?;
    sweep(&path.join("refs"), true)
}

/// Creates an empty bare store at `path`: initialised next to it and renamed into place, so a
/// crash never leaves a half-made store under the real name.
fn create(path: &Path, shown: &str) -> Result<Repository, GitError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let io_err = |action: &'static str| {
        move |source| GitError::StoreIo {
            url: shown.to_string(),
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let git_err = |source| GitError::Store {
        url: shown.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.new-"))
        .tempdir_in(parent)
        .map_err(io_err("create"))?;
    {
        let mut opts = RepositoryInitOptions::new();
        // No template: `init.templateDir` (root's, or git's own) could bring an `info/exclude`.
        opts.bare(true)
            .no_reinit(true)
            .mkpath(false)
            .external_template(false);
        let repo = Repository::init_opts(tmp.path(), &opts).map_err(git_err)?;
        let mut config = repo.config().map_err(git_err)?;
        // For people inspecting the directory: which upstream this is (never with credentials).
        config.set_str("plumb.url", shown).map_err(git_err)?;
        // A checkout gives the store a work tree for a moment, and libgit2 would then log every
        // move of HEAD to a reflog that only ever grows.
        config
            .set_bool("core.logAllRefUpdates", false)
            .map_err(git_err)?;
        pin_config(&repo).map_err(git_err)?;
        pin_info(repo.path()).map_err(io_err("write the store's info files"))?;
    }
    let tmp = tmp.keep();
    fs::rename(&tmp, path).map_err(io_err("move the new store into place"))?;
    Repository::open_bare(path).map_err(git_err)
}

/// Renames a damaged store to `<name>.damaged-<unix time>` next to it, for forensics.
fn set_aside(path: &Path, shown: &str, why: &str) -> Result<PathBuf, GitError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("{}.damaged-{now}", path.display());
    let mut aside = PathBuf::from(&base);
    let mut n = 1;
    while fs::symlink_metadata(&aside).is_ok() {
        aside = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    tracing::warn!(
        store = %path.display(),
        url = shown,
        reason = why,
        kept_at = %aside.display(),
        "store is damaged; setting it aside and fetching again"
    );
    fs::rename(path, &aside).map_err(|source| GitError::StoreIo {
        url: shown.to_string(),
        path: path.to_path_buf(),
        action: "set the damaged store aside",
        source,
    })?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_readonly_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let stores = dir.path().join("stores");
        let url = "file:///nonexistent/upstream.git";
        // Missing: an error, and nothing is created.
        let err = Store::open_readonly(&stores, url).unwrap_err();
        assert!(matches!(err, GitError::Store { .. }), "{err}");
        assert!(!stores.exists());
        // Existing, with a lock file another process holds: opened, the lock left alone.
        let path = Store::open(&stores, url).unwrap().path().to_owned();
        let lock = path.join("packed-refs.lock");
        fs::write(&lock, b"").unwrap();
        let store = Store::open_readonly(&stores, url).unwrap();
        assert_eq!(store.path(), path);
        assert!(lock.exists());
    }
}
