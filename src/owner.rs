//! Who owns a service's deployed files: gitopper's `user` ("do the checkout with this user"). plumb
//! checks out as root and then gives every file, directory and symlink of the checkout to that
//! user and the user's primary group, as if the user had made the checkout.
//!
//! Symlinks are never followed: a symlink itself is changed, whatever it points at is not, and a
//! directory reached through a symlink is not entered, even when the user swaps one in while
//! plumb walks the tree ([`chown_tree`] works by directory descriptor); nor is a hard link to a
//! file kept elsewhere given away. Entries that already have the
//! right owner are left alone, so a checkout that moved a few files costs a few `chown`s, and the
//! files' change times (which git's stat cache compares) move only where ownership changed.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};

/// Errors giving files to a user. Each names the user, and the path when there is one.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// No such user in the user database.
    #[error("user {user:?}: no such user")]
    UnknownUser { user: String },
    /// The user database could not be read.
    #[error("user {user:?}: looking it up")]
    Lookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    /// A file of the tree could not be read or given to the user.
    #[error("giving {} to user {user:?}: {action}", .path.display())]
    Chown {
        user: String,
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A user and the group its files get (its primary group), looked up by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The name as configured, for messages.
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
}

impl Owner {
    /// Looks `user` up in the user database (`getpwnam`, so NSS sources count).
    pub fn lookup(user: &str) -> Result<Owner, OwnerError> {
        match User::from_name(user) {
            Ok(Some(u)) => Ok(Owner {
                user: user.to_owned(),
                uid: u.uid,
                gid: u.gid,
            }),
            Ok(None) => Err(OwnerError::UnknownUser {
                user: user.to_owned(),
            }),
            Err(source) => Err(OwnerError::Lookup {
                user: user.to_owned(),
                source,
            }),
        }
    }
}

/// Gives `dir` and everything below it to `owner` (its uid and primary gid), never following a
/// symlink (see the module doc). Returns how many entries were changed. A `dir` that does not
/// exist is an error.
///
/// The walk goes by directory descriptor, not by path: each directory is opened relative to its
/// parent's descriptor with `O_NOFOLLOW | O_DIRECTORY`, and each entry is examined and changed with
/// `fstatat`/`fchownat` and `AT_SYMLINK_NOFOLLOW`. The tree belongs to the service's user, who may
/// swap a directory for a symlink at any moment; by path, a swap between the check and the change
/// would hand plumb's root to whatever the symlink points at. By descriptor, a swapped-in symlink
/// is at worst changed itself, and never entered. An entry that changes kind under the walk (a
/// directory that became a symlink or went away) is skipped.
///
/// A file with more than one link keeps its owner: git never makes one, and it may be a file
/// kept elsewhere that the user linked into the tree (which `fs.protected_hardlinks = 1`, the
/// default, allows only for files the user owns already, or may read and write).
pub fn chown_tree(dir: &Path, owner: &Owner) -> Result<u64, OwnerError> {
    use nix::fcntl::{AtFlags, OFlag, openat};
    use nix::sys::stat::{Mode, SFlag, fstatat};
    use std::os::unix::fs::OpenOptionsExt;

    let err = |path: &Path, action: &'static str| {
        let path = path.to_path_buf();
        move |source: io::Error| OwnerError::Chown {
            user: owner.user.clone(),
            path,
            action,
            source,
        }
    };
    let errno = |path: &Path, action: &'static str| {
        let wrap = err(path, action);
        move |e: nix::Error| wrap(io::Error::from(e))
    };
    let (uid, gid) = (owner.uid.as_raw(), owner.gid.as_raw());
    let top = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW).bits())
        .open(dir)
        .map_err(err(dir, "open directory"))?;
    let meta = top.metadata().map_err(err(dir, "stat"))?;
    let mut changed = 0;
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::fchown(&top, Some(uid), Some(gid)).map_err(err(dir, "chown"))?;
        changed += 1;
    }
    let top = nix::dir::Dir::from_fd(top.into()).map_err(errno(dir, "read directory"))?;
    let mut pending = vec![(top, dir.to_path_buf())];
    while let Some((mut parent, path)) = pending.pop() {
        let names: Vec<std::ffi::CString> = parent
            .iter()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect();
        for name in names {
            let child = path.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
            let st = match fstatat(&parent, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(nix::Error::ENOENT) => continue,
                Err(e) => return Err(errno(&child, "lstat")(e)),
            };
            let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
            // Another name of a file kept elsewhere: its owner is not the tree's to give.
            let linked = !is_dir && st.st_nlink > 1;
            if (st.st_uid != uid || st.st_gid != gid) && !linked {
                match nix::unistd::fchownat(
                    &parent,
                    name.as_c_str(),
                    Some(owner.uid),
                    Some(owner.gid),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(()) => changed += 1,
                    Err(nix::Error::ENOENT) => continue,
                    Err(e) => return Err(errno(&child, "chown")(e)),
                }
            }
            if !is_dir {
                continue;
            }
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            match openat(&parent, name.as_c_str(), flags, Mode::empty()) {
                Ok(fd) => {
                    let dir =
                        nix::dir::Dir::from_fd(fd).map_err(errno(&child, "read directory"))?;
                    pending.push((dir, child));
                }
                // Swapped for a symlink or a file, or gone, since it was examined: not entered.
                Err(nix::Error::ELOOP | nix::Error::ENOTDIR | nix::Error::ENOENT) => {}
                Err(e) => return Err(errno(&child, "open directory")(e)),
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_users_are_named() {
        let err = Owner::lookup("plumb-no-such-user").unwrap_err();
        assert_eq!(err.to_string(), "user \"plumb-no-such-user\": no such user");
        assert_eq!(Owner::lookup("root").unwrap().uid, Uid::from_raw(0));
    }

    #[test]
    fn own_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/f"), "x").unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("l")).unwrap();
        let me = Owner {
            user: "me".into(),
            uid: Uid::effective(),
            gid: Gid::effective(),
        };
        assert_eq!(chown_tree(dir.path(), &me).unwrap(), 0);
        let err = chown_tree(&dir.path().join("missing"), &me).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(err.to_string().contains("\"me\""), "{err}");
    }
}
