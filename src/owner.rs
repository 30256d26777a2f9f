//! Who owns a service's deployed files: gitopper's `user` ("do the checkout with this user"). plumb
//! checks out as root and then gives every file, directory and symlink of the checkout to that
//! user and the user's primary group, as if the user had made the checkout.
//!
//! Symlinks are never followed: a symlink itself is changed (`lchown`), whatever it points at is
//! not, and a directory reached through a symlink is not entered. Entries that already have the
//! right owner are left alone, so a checkout that moved a few files costs a few `chown`s, and the
//! files' change times (which git's stat cache compares) move only where ownership changed.

use std::fs;
use std::io;
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
    #[error("user {user:?}: looking it up: {source}")]
    Lookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    /// A file of the tree could not be read or given to the user.
    #[error("giving {} to user {user:?}: {action}: {source}", .path.display())]
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
pub fn chown_tree(dir: &Path, owner: &Owner) -> Result<u64, OwnerError> {
    let err = |path: &Path, action: &'static str| {
        let path = path.to_path_buf();
        move |source| OwnerError::Chown {
            user: owner.user.clone(),
            path,
            action,
            source,
        }
    };
    let (uid, gid) = (owner.uid.as_raw(), owner.gid.as_raw());
    let mut changed = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path).map_err(err(&path, "lstat"))?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(err(&path, "chown"))?;
            changed += 1;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(err(&path, "read directory"))? {
                pending.push(entry.map_err(err(&path, "read directory"))?.path());
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
