//! A directory tree worked on only through descriptors of its own directories: the live checkout
//! and the staging directory of [`Store::checkout_atomic`](super::Store::checkout_atomic).
//!
//! A checkout belongs to the service's `user`, who may rename its directories and put symlinks in
//! their place at any moment, also while plumb (root) writes into it. Checking a path with `lstat`
//! and then using it is a race the user can win: between the two, `svc/d` becomes a symlink to
//! `/etc`, and the rename, removal or `chown` meant for `svc/d/x` lands on `/etc/x`. So nothing
//! here uses a path below the top: each directory is opened relative to its parent's descriptor
//! with `O_NOFOLLOW | O_DIRECTORY`, and entries are created, renamed, removed and examined with
//! the `*at` calls on that descriptor (`AT_SYMLINK_NOFOLLOW` where they would follow).
//!
//! What a swap can still do: a directory opened before the swap is still the one written to,
//! wherever the user moved it (only to a place they can write to, so nothing of anyone else's);
//! one swapped before it is opened is not a directory of the tree: nothing is removed behind it,
//! and where a directory is needed the symlink is removed and a directory made instead. Writes may
//! then end up somewhere the revision does not have them, or fail (`ENOENT` in a directory the
//! user removed); the deploy reports that, and the next one finds the difference and repairs it.
//! The top directory is opened by path, without following a symlink: its own parents must not be
//! the user's (plumb's `checkouts/`, or the `mount` directory, are root's).

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, fchownat, unlinkat};

use crate::owner::Owner;

/// How a directory of the tree is opened: never through a symlink, never as anything else.
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// A directory tree, open by descriptor (see the module doc).
///
/// It keeps the descriptors of the directories on the way to the last one asked for, so a walk
/// in path order (a `BTreeMap` of changes) opens each directory once and holds at most as many
/// descriptors as the tree is deep.
pub(super) struct Confined {
    top: OwnedFd,
    /// The directories from `top` down to the last one opened: each one's name and descriptor.
    chain: Vec<(OsString, OwnedFd)>,
}

impl Confined {
    /// Opens the directory `path`; a symlink there is refused (`ELOOP`), not followed.
    pub(super) fn open(path: &Path) -> io::Result<Confined> {
        let top = nix::fcntl::open(path, DIR_FLAGS, Mode::empty())?;
        Ok(Confined {
            top,
            chain: Vec::new(),
        })
    }

    /// The top directory's descriptor.
    pub(super) fn top(&self) -> BorrowedFd<'_> {
        self.top.as_fd()
    }

    /// The directory `rel` (empty: the top), every component a directory of the tree. `None` when
    /// one is missing or is not a directory (a symlink or a file): nothing below it is the
    /// tree's.
    pub(super) fn dir(&mut self, rel: &Path) -> io::Result<Option<BorrowedFd<'_>>> {
        let names = components(rel)?;
        let common = self
            .chain
            .iter()
            .zip(&names)
            .take_while(|((open, _), name)| open == *name)
            .count();
        self.chain.truncate(common);
        for name in &names[common..] {
            let parent = self
                .chain
                .last()
                .map_or(self.top.as_fd(), |(_, fd)| fd.as_fd());
            match openat(parent, *name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => self.chain.push((name.to_os_string(), fd)),
                Err(Errno::ELOOP | Errno::ENOTDIR | Errno::ENOENT) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(
            self.chain
                .last()
                .map_or(self.top.as_fd(), |(_, fd)| fd.as_fd()),
        ))
    }

    /// What is at `rel` (the entry itself, a symlink is not followed); `None` when nothing is, or
    /// its directory is not the tree's.
    pub(super) fn lstat(&mut self, rel: &Path) -> io::Result<Option<FileStat>> {
        let (parent, name) = split(rel)?;
        let Some(dir) = self.dir(parent)? else {
            return Ok(None);
        };
        match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes `rel` and each directory above it a directory of the tree, parents first: a missing
    /// one is made, a file or symlink in the way is removed (never followed). A new directory gets
    /// the mode of the directory at the same path in `like` when there is one (else the default,
    /// as `mkdir` makes it), and `owner`. Returns the directory's descriptor.
    pub(super) fn make_dirs(
        &mut self,
        rel: &Path,
        like: &mut Confined,
        owner: Option<&Owner>,
    ) -> io::Result<BorrowedFd<'_>> {
        let mut sub = PathBuf::new();
        for name in components(rel)? {
            sub.push(name);
            let sub = sub.as_path();
            if self.dir(sub)?.is_some() {
                continue;
            }
            let (parent, name) = split(sub)?;
            let mode = like
                .lstat(sub)?
                .filter(|st| kind(st) == SFlag::S_IFDIR)
                .map(|st| st.st_mode & 0o7777);
            let dir = self.dir(parent)?.ok_or_else(changed)?;
            match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
                // Gone, or a directory by now (made by the user, in their checkout): used as is.
                Ok(()) | Err(Errno::ENOENT | Errno::EISDIR) => {}
                Err(e) => return Err(e.into()),
            }
            match mkdirat(dir, name, Mode::from_bits_truncate(0o777)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let made = self.dir(sub)?.ok_or_else(changed)?;
            if let Some(mode) = mode {
                fchmod(made, Mode::from_bits_truncate(mode))?;
            }
            if let Some(owner) = owner {
                std::os::unix::fs::fchown(
                    made,
                    Some(owner.uid.as_raw()),
                    Some(owner.gid.as_raw()),
                )?;
            }
        }
        self.dir(rel)?.ok_or_else(changed)
    }

    /// Moves the file or symlink `rel` of `from` to `rel` in this tree, whose directory must exist
    /// ([`Confined::make_dirs`]), replacing what is there (a directory with everything below
    /// it). With `owner`, the entry is given to them first, so it arrives theirs.
    pub(super) fn move_from(
        &mut self,
        from: &mut Confined,
        rel: &Path,
        owner: Option<&Owner>,
    ) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let source = from.dir(parent)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "its staged directory is missing")
        })?;
        if let Some(owner) = owner {
            fchownat(
                source,
                name,
                Some(owner.uid),
                Some(owner.gid),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        if self
            .lstat(rel)?
            .is_some_and(|st| kind(&st) == SFlag::S_IFDIR)
        {
            self.remove(rel)?;
        }
        let dir = self.dir(parent)?.ok_or_else(changed)?;
        renameat(source, name, dir, name)?;
        Ok(())
    }

    /// Removes what is at `rel`, a directory with everything below it; nothing there, or a
    /// directory above it that is not the tree's (a symlink), is nothing to remove.
    pub(super) fn remove(&mut self, rel: &Path) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let Some(dir) = self.dir(parent)? else {
            return Ok(());
        };
        remove_at(dir, name)?;
        self.forget(rel);
        Ok(())
    }

    /// Removes `rel` if it is a symlink (the link itself); anything else there stays.
    pub(super) fn remove_symlink(&mut self, rel: &Path) -> io::Result<()> {
        if self
            .lstat(rel)?
            .is_none_or(|st| kind(&st) != SFlag::S_IFLNK)
        {
            return Ok(());
        }
        let (parent, name) = split(rel)?;
        let Some(dir) = self.dir(parent)? else {
            return Ok(());
        };
        match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            // A directory by now: not a symlink to remove.
            Ok(()) | Err(Errno::ENOENT | Errno::EISDIR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the directory `rel` if it is empty; whether it did.
    pub(super) fn remove_empty_dir(&mut self, rel: &Path) -> bool {
        let Ok((parent, name)) = split(rel) else {
            return false;
        };
        let removed = match self.dir(parent) {
            Ok(Some(dir)) => unlinkat(dir, name, UnlinkatFlags::RemoveDir).is_ok(),
            _ => false,
        };
        if removed {
            self.forget(rel);
        }
        removed
    }

    /// Drops the descriptors of `rel` and below, whose directory was just removed.
    fn forget(&mut self, rel: &Path) {
        let depth = rel.components().count();
        if depth > 0 && self.chain.len() >= depth {
            self.chain.truncate(depth - 1);
        }
    }
}

/// The error of a directory that stopped being one of the tree while the deploy used it.
fn changed() -> io::Error {
    io::Error::other("a directory of the checkout was replaced while the deploy wrote into it")
}

/// What kind of entry `st` is: `S_IFDIR`, `S_IFLNK`, `S_IFREG`...
fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// `rel` as names of directory entries; anything but plain names (`..`, `/`) is refused.
fn components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(name) => Ok(name),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a relative path of plain names", rel.display()),
            )),
        })
        .collect()
}

/// `rel`'s directory and name.
fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    match (rel.parent(), rel.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} names no entry", rel.display()),
        )),
    }
}

/// Removes the entry `name` of `dir`, a directory with everything below it, by descriptor all
/// the way down (never through a symlink). Nothing there is fine.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    /// A directory being emptied: its descriptor, its name in its parent, the entries left.
    struct Level {
        dir: Dir,
        name: CString,
        left: Vec<CString>,
    }
    let open = |parent: BorrowedFd<'_>, name: &CStr| -> io::Result<Option<Level>> {
        let dir = match Dir::openat(parent, name, DIR_FLAGS, Mode::empty()) {
            Ok(dir) => dir,
            // Not a directory any more, or gone: the caller unlinks it or is done.
            Err(Errno::ELOOP | Errno::ENOTDIR | Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut dir = dir;
        let left = dir
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect();
        Ok(Some(Level {
            dir,
            name: name.to_owned(),
            left,
        }))
    };
    let name = CString::new(name.as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let Some(first) = open(dir, &name)? else {
        return match unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(Errno::EISDIR) => Err(changed()),
            Err(e) => Err(e.into()),
        };
    };
    let mut levels = vec![first];
    while let Some(level) = levels.last_mut() {
        if let Some(entry) = level.left.pop() {
            match unlinkat(&level.dir, entry.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(Errno::EISDIR) => match open(level.dir.as_fd(), &entry)? {
                    Some(below) => levels.push(below),
                    // Swapped for a file or a symlink since: that goes as such.
                    None => {
                        match unlinkat(&level.dir, entry.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                            Ok(()) | Err(Errno::ENOENT) => {}
                            Err(Errno::EISDIR) => return Err(changed()),
                            Err(e) => return Err(e.into()),
                        }
                    }
                },
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        let done = levels.pop().expect("a level");
        let parent = levels.last().map_or(dir, |l| l.dir.as_fd());
        match unlinkat(parent, done.name.as_c_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The first directory at or below `path` (itself included) that belongs to a user other than
/// the caller, with that user's id: its owner could rename entries in it and put symlinks in
/// their place, so nothing may write through a path below it. `None` when there is none, or no
/// `path`. Walks by descriptor, never through a symlink.
pub(super) fn held_by_another(path: &Path) -> io::Result<Option<(PathBuf, u32)>> {
    let me = nix::unistd::geteuid().as_raw();
    let top = match Dir::open(path, DIR_FLAGS, Mode::empty()) {
        Ok(dir) => dir,
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let uid = nix::sys::stat::fstat(&top)?.st_uid;
    if uid != me {
        return Ok(Some((path.to_path_buf(), uid)));
    }
    let mut pending = vec![(top, path.to_path_buf())];
    while let Some((mut dir, at)) = pending.pop() {
        let names: Vec<CString> = dir
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect();
        for name in names {
            let st = match fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            if kind(&st) != SFlag::S_IFDIR {
                continue;
            }
            let child = at.join(OsStr::from_bytes(name.as_bytes()));
            if st.st_uid != me {
                return Ok(Some((child, st.st_uid)));
            }
            match Dir::openat(&dir, name.as_c_str(), DIR_FLAGS, Mode::empty()) {
                Ok(below) => pending.push((below, child)),
                Err(Errno::ELOOP | Errno::ENOTDIR | Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(None)
}
