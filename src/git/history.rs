//! What changed for a service: the paths under its links that differ between two commits
//! ([`Store::changed_paths`], which decides whether to reload), and the commit that last changed
//! them ([`Store::last_change`], which makes the deployed revision the same on every machine).
//!
//! Links match by whole path components: `etc` covers the file `etc` and everything in `etc/`,
//! never `etcd/`.

use std::path::Path;

use git2::{DiffOptions, ErrorClass, ErrorCode, FileMode, Oid, Tree};

use super::{GitError, Store};

/// Whether `path` (relative, `/`-separated, as git writes it) is one of `links` or inside one, by
/// whole components: `etc` matches `etc` and `etc/x`, never `etcd/x`. Trailing slashes on links
/// are ignored.
pub fn under_links(path: &str, links: &[String]) -> bool {
    links.iter().any(|link| {
        let link = link.trim_end_matches('/');
        match path.strip_prefix(link) {
            Some(rest) => !link.is_empty() && (rest.is_empty() || rest.starts_with('/')),
            None => false,
        }
    })
}

/// Checks that every link is a plain relative path inside the repository (`a/b`, optionally with
/// a trailing `/`): no absolute paths, no `.` or `..`, no empty components. Links come from
/// configuration; one that could name something outside a checkout is refused, not interpreted.
pub(super) fn validate_links(links: &[String]) -> Result<(), GitError> {
    for link in links {
        let trimmed = link.strip_suffix('/').unwrap_or(link);
        let reason = if trimmed.is_empty() {
            Some("empty")
        } else if trimmed.starts_with('/') {
            Some("must be relative to the repository root")
        } else if trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            Some("must not contain empty, `.` or `..` components")
        } else if trimmed.contains('\0') {
            Some("must not contain NUL")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(GitError::Link {
                link: link.clone(),
                reason,
            });
        }
    }
    Ok(())
}

/// The entry (object id and mode) at `link` in `tree`; `None` when there is nothing there.
fn entry_at(tree: &Tree<'_>, link: &str) -> Result<Option<(Oid, i32)>, git2::Error> {
    match tree.get_path(Path::new(link.trim_end_matches('/'))) {
        Ok(entry) => Ok(Some((entry.id(), entry.filemode()))),
        // "no such path" is a NotFound of class Tree; a missing object is a NotFound of class Odb
        Err(e) if e.code() == ErrorCode::NotFound && e.class() == ErrorClass::Tree => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a diff side is a submodule (gitlink) or absent: not a file plumb deploys.
fn not_deployed(mode: FileMode) -> bool {
    matches!(mode, FileMode::Commit | FileMode::Unreadable)
}

impl Store {
    /// Paths under `links` (prefix match on whole path components) that differ between `from` and
    /// `to`, sorted: files added, removed, modified, or changed in type or mode. `from == None`
    /// (first deploy) lists everything under `links` in `to`; so does a `from` that the store does
    /// not have (e.g. history rewritten upstream and the store re-created since), because then
    /// nothing can be assumed about what is deployed. Submodules are not files plumb deploys and
    /// are left out.
    pub fn changed_paths(
        &self,
        from: Option<Oid>,
        to: Oid,
        links: &[String],
    ) -> Result<Vec<String>, GitError> {
        let mut paths: Vec<String> = self
            .file_changes(from, to, links)?
            .into_iter()
            .flat_map(|c| [Some(c.path), c.old_path])
            .flatten()
            .collect();
        paths.sort();
        paths.dedup();
        Ok(paths)
    }

    /// What moving a service's checkout from `from` to `to` does to each of its files: what
    /// `plumbctl diff` shows before a pull.
    pub fn file_changes(
        &self,
        from: Option<Oid>,
        to: Oid,
        links: &[String],
    ) -> Result<Vec<FileChange>, GitError> {
        validate_links(links)?;
        let to_tree = self
            .repo
            .find_commit(to)
            .map_err(|e| self.object_error(to, e))?
            .tree()
            .map_err(|e| self.reached_error(to, e))?;
        let from_tree = match from {
            None => None,
            Some(from) => match self.repo.find_commit(from) {
                Ok(commit) => Some(commit.tree().map_err(|e| self.reached_error(from, e))?),
                Err(e) if e.code() == ErrorCode::NotFound => {
                    tracing::warn!(
                        url = self.shown,
                        %from,
                        "previous revision not in the store; treating every file as changed"
                    );
                    None
                }
                Err(e) => return Err(self.object_error(from, e)),
            },
        };
        if links.is_empty() {
            return Ok(Vec::new());
        }
        let mut options = DiffOptions::new();
        options
            .disable_pathspec_match(true)
            .include_typechange(true)
            .include_typechange_trees(true);
        for link in links {
            options.pathspec(link.trim_end_matches('/'));
        }
        let diff = self
            .repo
            .diff_tree_to_tree(from_tree.as_ref(), Some(&to_tree), Some(&mut options))
            .map_err(|e| self.reached_error(to, e))?;
        let shown = |file: git2::DiffFile<'_>| {
            file.path_bytes()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .filter(|p| under_links(p, links))
        };
        let mut changes = Vec::new();
        for delta in diff.deltas() {
            if not_deployed(delta.old_file().mode()) && not_deployed(delta.new_file().mode()) {
                continue;
            }
            let (old, new) = (shown(delta.old_file()), shown(delta.new_file()));
            let Some(path) = new.clone().or(old.clone()) else {
                continue;
            };
            let change = match delta.status() {
                git2::Delta::Added => "added",
                git2::Delta::Deleted => "deleted",
                git2::Delta::Renamed => "renamed",
                git2::Delta::Typechange => "typechange",
                _ => "modified",
            };
            changes.push(FileChange {
                path,
                old_path: old.filter(|o| Some(o) != new.as_ref()),
                change,
            });
        }
        changes.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(changes)
    }

    /// The newest commit on the first-parent chain from `head` where the entry (object and mode,
    /// absence included) at some link differs from the commit's first parent's; a root commit
    /// compares with "absent". `None` if the links never existed on that chain.
    ///
    /// This is the revision a service deploys: the commit that last changed *its* files, so every
    /// machine arrives at the same one, however many unrelated commits came after. Cheap: it
    /// compares tree entries, no diffs.
    pub fn last_change(&self, head: Oid, links: &[String]) -> Result<Option<Oid>, GitError> {
        validate_links(links)?;
        let start = self
            .repo
            .find_commit(head)
            .map_err(|e| self.object_error(head, e))?;
        let walk = move || -> Result<Option<Oid>, git2::Error> {
            let mut commit = start;
            loop {
                let tree = commit.tree()?;
                let parent = match commit.parent(0) {
                    Ok(parent) => Some(parent),
                    Err(e) if e.code() == ErrorCode::NotFound => None,
                    Err(e) => return Err(e),
                };
                let parent_tree = parent.as_ref().map(|p| p.tree()).transpose()?;
                for link in links {
                    let now = entry_at(&tree, link)?;
                    let before = match &parent_tree {
                        Some(t) => entry_at(t, link)?,
                        None => None,
                    };
                    if now != before {
                        return Ok(Some(commit.id()));
                    }
                }
                match parent {
                    Some(parent) => commit = parent,
                    None => return Ok(None),
                }
            }
        };
        walk().map_err(|e| self.reached_error(head, e))
    }

    /// Whether `rev` is on the first-parent chain from `head` (`head` itself included): a
    /// commit the branch itself went through, not one of a merged side branch, so the revision
    /// a service computes there ([`Store::last_change`]) is one every machine on the branch had
    /// or will have. Reads commits only, no trees.
    pub fn on_first_parent_chain(&self, rev: Oid, head: Oid) -> Result<bool, GitError> {
        let start = self
            .repo
            .find_commit(head)
            .map_err(|e| self.object_error(head, e))?;
        let walk = move || -> Result<bool, git2::Error> {
            let mut commit = start;
            loop {
                if commit.id() == rev {
                    return Ok(true);
                }
                commit = match commit.parent(0) {
                    Ok(parent) => parent,
                    Err(e) if e.code() == ErrorCode::NotFound => return Ok(false),
                    Err(e) => return Err(e),
                };
            }
        };
        walk().map_err(|e| self.reached_error(head, e))
    }

    /// How many commits on the first-parent chain from `head` back to `deployed` (exclusive)
    /// change `links`: how far a service is behind its branch, in changes of its own files.
    /// `None` when `deployed` is not on that chain (history rewritten, or a rollback target off
    /// it); the walk stops after `limit` commits with what it counted so far.
    pub fn changes_since(
        &self,
        deployed: Oid,
        head: Oid,
        links: &[String],
        limit: usize,
    ) -> Result<Option<u64>, GitError> {
        let mut counts = self.changes_since_many(head, &[(deployed, links)], limit)?;
        Ok(counts.pop().flatten())
    }

    /// [`Store::changes_since`] for several services on one `head`, each a (deployed, links)
    /// pair, in one walk: each commit of the chain and its tree are read once for all of them,
    /// not once per service (at 1,000 services on a history of 400 commits, a walk per service
    /// read 800,000 root trees after each start and each push).
    pub fn changes_since_many(
        &self,
        head: Oid,
        services: &[(Oid, &[String])],
        limit: usize,
    ) -> Result<Vec<Option<u64>>, GitError> {
        for (_, links) in services {
            validate_links(links)?;
        }
        let start = self
            .repo
            .find_commit(head)
            .map_err(|e| self.object_error(head, e))?;
        // Per service: the changes counted so far, and its answer once known (`None` until then).
        let mut counts: Vec<u64> = vec![0; services.len()];
        let mut done: Vec<Option<Option<u64>>> = vec![None; services.len()];
        let walk = |counts: &mut Vec<u64>, done: &mut Vec<Option<Option<u64>>>| {
            let mut commit = start;
            // The tree of `commit`, once read (as its parent's, from the second commit on).
            let mut tree = None;
            for _ in 0..limit {
                let mut pending = false;
                for (i, (deployed, _)) in services.iter().enumerate() {
                    if done[i].is_none() && commit.id() == *deployed {
                        done[i] = Some(Some(counts[i]));
                    }
                    pending |= done[i].is_none();
                }
                if !pending {
                    break;
                }
                let parent = match commit.parent(0) {
                    Ok(parent) => parent,
                    Err(e) if e.code() == ErrorCode::NotFound => {
                        // The chain ended before their deployed revision.
                        for d in done.iter_mut().filter(|d| d.is_none()) {
                            *d = Some(None);
                        }
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let tree_now = match tree.take() {
                    Some(tree) => tree,
                    None => commit.tree()?,
                };
                let parent_tree = parent.tree()?;
                for (i, (_, links)) in services.iter().enumerate() {
                    if done[i].is_some() {
                        continue;
                    }
                    for link in links.iter() {
                        if entry_at(&tree_now, link)? != entry_at(&parent_tree, link)? {
                            counts[i] += 1;
                            break;
                        }
                    }
                }
                commit = parent;
                tree = Some(parent_tree);
            }
            Ok::<(), git2::Error>(())
        };
        walk(&mut counts, &mut done).map_err(|e| self.reached_error(head, e))?;
        // Those still walking when the limit stopped it: what they counted so far.
        Ok(done
            .into_iter()
            .zip(counts)
            .map(|(d, count)| d.unwrap_or(Some(count)))
            .collect())
    }
}

/// One file's change between two revisions of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub path: String,
    /// The path before, when it differs (renames).
    pub old_path: Option<String>,
    /// added, deleted, modified, renamed or typechange.
    pub change: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn whole_components_only() {
        let l = links(&["etc"]);
        assert!(under_links("etc", &l));
        assert!(under_links("etc/x", &l));
        assert!(under_links("etc/a/b", &l));
        assert!(!under_links("etcd/x", &l));
        assert!(!under_links("etcd", &l));
        assert!(!under_links("et", &l));
        assert!(!under_links("x/etc", &l));
    }

    #[test]
    fn svc1_is_not_svc10() {
        let l = links(&["svc1"]);
        assert!(under_links("svc1/conf", &l));
        assert!(!under_links("svc10/conf", &l));
        assert!(!under_links("svc1.bak", &l));
    }

    #[test]
    fn nested_files_and_several_links() {
        let l = links(&["nginx/etc", "app/config.yml", "dir/"]);
        assert!(under_links("nginx/etc/nginx.conf", &l));
        assert!(!under_links("nginx/etcetera", &l));
        assert!(!under_links("nginx", &l));
        assert!(under_links("app/config.yml", &l));
        assert!(!under_links("app/config.yml.orig", &l));
        assert!(under_links("dir/f", &l));
        assert!(under_links("dir", &l));
        assert!(!under_links("anything", &[]));
        assert!(!under_links("anything", &links(&["", "/"])));
    }

    #[test]
    fn link_validation() {
        assert!(validate_links(&links(&["a", "a/b", "a/b/", "x.y", "..a", ".hidden"])).is_ok());
        for bad in ["", "/", "/etc", "a/../b", "..", ".", "a//b", "./a", "a/."] {
            assert!(validate_links(&links(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn glob_characters_are_literal() {
        let l = links(&["a*", "b?", "[c]"]);
        assert!(under_links("a*/x", &l));
        assert!(!under_links("ab/x", &l));
        assert!(!under_links("bx/y", &l));
        assert!(under_links("[c]/f", &l));
        assert!(!under_links("c/f", &l));
    }
}
