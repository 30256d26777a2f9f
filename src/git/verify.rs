//! Signed-commit verification: whether a commit of a store carries a signature by a key this
//! machine trusts, so that a compromised upstream cannot deploy what nobody trusted signed.
//!
//! It owns [`Trust`] and [`Store::verify_commit`]. The signature and the signed bytes come from
//! libgit2 (the `gpgsig` header and the commit without it); the cryptography is left to the real
//! tools, run through [`crate::exec`] exactly as git runs them:
//! - ssh signatures: `ssh-keygen -Y find-principals`, then `ssh-keygen -Y verify -n git`, against
//!   an allowed-signers file (git's `gpg.ssh.allowedSignersFile` format), at the commit's time so
//!   that `valid-after`/`valid-before` there apply;
//! - OpenPGP signatures: `gpgv --keyring`, judged by its exit status and its `GOODSIG`/`VALIDSIG`
//!   status lines.
//!
//! Every refusal is a [`GitError::Unverified`] whose reason a person can act on.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use sha2::{Digest, Sha256};

use super::{GitError, Oid, Store};
use crate::exec::{self, Output, Spec};

/// How long `ssh-keygen` or `gpgv` may take for one signature.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

const SSH_ARMOR: &[u8] = b"-----BEGIN SSH SIGNATURE-----";
const PGP_ARMOR: &[u8] = b"-----BEGIN PGP SIGNATURE-----";

/// What an upstream's commits must be signed with. Both `None` means no verification (the config
/// layer never builds a `Trust` then); a signature of a kind with no trust set is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// ssh keys allowed to sign, in git's `gpg.ssh.allowedSignersFile` format (principals, options
    /// such as `valid-before`, public keys).
    pub allowed_signers: Option<PathBuf>,
    /// OpenPGP public keys allowed to sign: a keyring file `gpgv --keyring` reads (`gpg --export`).
    pub keyring: Option<PathBuf>,
}

impl Store {
    /// Checks that `commit` is signed by a key `trust` allows, and returns who signed it, e.g.
    /// `ssh key SHA256:... of alice@example.com` or `openpgp key <fingerprint> of Alice <a@b>`,
    /// for logs. Unsigned, untrusted or bad signatures are [`GitError::Unverified`].
    pub fn verify_commit(&self, commit: Oid, trust: &Trust) -> Result<String, GitError> {
        let refuse = |reason: String| GitError::Unverified {
            commit: commit.to_string(),
            reason,
        };
        // Looked up first: extract_signature says NotFound both for "no signature" and for "no
        // such commit".
        let when = self
            .repo
            .find_commit(commit)
            .map_err(|e| self.object_error(commit, e))?
            .committer()
            .when()
            .seconds();
        let (signature, data) = match self.repo.extract_signature(&commit, None) {
            Ok(found) => found,
            Err(e) if e.code() == git2::ErrorCode::NotFound => {
                return Err(refuse("not signed".to_string()));
            }
            Err(e) => return Err(self.object_error(commit, e)),
        };
        let (signature, data) = (&signature[..], &data[..]);
        let checked = if signature.starts_with(SSH_ARMOR) {
            match &trust.allowed_signers {
                Some(signers) => verify_ssh(signers, signature, data, when),
                None => Err("signed with ssh but only OpenPGP keys are trusted".to_string()),
            }
        } else if signature.starts_with(PGP_ARMOR) {
            match &trust.keyring {
                Some(keyring) => verify_openpgp(keyring, signature, data),
                None => Err("signed with OpenPGP but only ssh signers are trusted".to_string()),
            }
        } else {
            Err("signed in a format plumb cannot check (neither ssh nor OpenPGP)".to_string())
        };
        checked.map_err(refuse)
    }
}

/// The first 12 hex digits of a commit id, as [`GitError::Unverified`] shows it.
pub(super) fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// git's ssh verification: the principals whose key made the signature (at the commit's time),
/// then a real verification of the signed bytes for one of them.
fn verify_ssh(signers: &Path, signature: &[u8], data: &[u8], when: i64) -> Result<String, String> {
    let key = ssh_fingerprint(signature).unwrap_or_else(|| "(unreadable)".to_string());
    let (_dir, sig_file) = signature_file(signature)?;
    let time = format!("-Overify-time={}", ssh_time(when));
    let found = run(Spec::new("ssh-keygen", TOOL_TIMEOUT)
        .arg("-Y")
        .arg("find-principals")
        .arg("-f")
        .arg(signers)
        .arg("-s")
        .arg(&sig_file)
        .arg(&time))?;
    let principals: Vec<&str> = found.stdout.lines().filter(|l| !l.is_empty()).collect();
    if !found.success() || principals.is_empty() {
        let why = diagnostics(&found.stderr);
        return Err(
            if why.contains("valid-before") || why.contains("valid-after") {
                format!("signature by key {key} is not valid at the commit's time: {why}")
            } else if why.is_empty() {
                format!(
                    "signature by key {key} is not in allowed signers {}",
                    signers.display()
                )
            } else {
                format!(
                    "signature by key {key} is not in allowed signers {} ({why})",
                    signers.display()
                )
            },
        );
    }
    let mut why = String::new();
    for principal in principals {
        let out = run(Spec::new("ssh-keygen", TOOL_TIMEOUT)
            .arg("-Y")
            .arg("verify")
            .arg("-f")
            .arg(signers)
            .arg("-I")
            .arg(principal)
            .arg("-n")
            .arg("git")
            .arg("-s")
            .arg(&sig_file)
            .arg(&time)
            .stdin(data.to_vec()))?;
        if out.success() {
            return Ok(format!("ssh key {key} of {principal}"));
        }
        why = diagnostics(&out.stderr);
    }
    Err(format!("bad signature by ssh key {key}: {why}"))
}

/// OpenPGP verification with `gpgv`: good only when it exits 0 and reports both `GOODSIG` (the
/// signature matches, by a key that is neither expired nor revoked) and `VALIDSIG`.
fn verify_openpgp(keyring: &Path, signature: &[u8], data: &[u8]) -> Result<String, String> {
    let (dir, sig_file) = signature_file(signature)?;
    // gpgv looks a keyring without a slash up in its home directory: make it a path.
    let keyring =
        std::path::absolute(keyring).map_err(|e| format!("keyring {}: {e}", keyring.display()))?;
    let out = run(Spec::new("gpgv", TOOL_TIMEOUT)
        // An empty home of its own: nothing of the daemon user's gnupg setup takes part.
        .arg("--homedir")
        .arg(dir.path())
        .arg("--status-fd")
        .arg("1")
        .arg("--keyring")
        .arg(&keyring)
        .arg(&sig_file)
        .arg("-")
        .env("LC_ALL", "C")
        .stdin(data.to_vec()))?;
    let status = |keyword: &str| {
        out.stdout.lines().find_map(|line| {
            let rest = line.strip_prefix("[GNUPG:] ")?.strip_prefix(keyword)?;
            rest.strip_prefix(' ').or(rest.is_empty().then_some(""))
        })
    };
    // "<keyid> <user id>" -> ("<keyid>", "<user id>")
    let key_and_uid = |fields: &str| {
        let (key, uid) = fields.split_once(' ').unwrap_or((fields, ""));
        (key.to_string(), uid.to_string())
    };
    if out.success()
        && let (Some(good), Some(valid)) = (status("GOODSIG"), status("VALIDSIG"))
    {
        // VALIDSIG <signing key fpr> ... <primary key fpr> (the 10th field).
        let fields: Vec<&str> = valid.split_whitespace().collect();
        let fpr = fields.get(9).or(fields.first()).copied().unwrap_or("?");
        let (_, uid) = key_and_uid(good);
        return Ok(if uid.is_empty() {
            format!("openpgp key {fpr}")
        } else {
            format!("openpgp key {fpr} of {uid}")
        });
    }
    Err(if let Some(bad) = status("BADSIG") {
        let (key, uid) = key_and_uid(bad);
        format!(
            "bad signature by OpenPGP key {key} ({uid}): it does not match the commit's content"
        )
    } else if let Some(expired) = status("EXPKEYSIG") {
        let (key, uid) = key_and_uid(expired);
        format!("signature by OpenPGP key {key} ({uid}), which has expired")
    } else if let Some(revoked) = status("REVKEYSIG") {
        let (key, uid) = key_and_uid(revoked);
        format!("signature by OpenPGP key {key} ({uid}), which is revoked")
    } else if let Some(errsig) = status("ERRSIG")
        // ERRSIG <keyid> <algo> <hash> <class> <time> <rc> [<fpr>]; rc 9 is "no public key".
        && let fields = errsig.split_whitespace().collect::<Vec<_>>()
        && fields.get(5) == Some(&"9")
    {
        let key = fields.get(6).or(fields.first()).copied().unwrap_or("?");
        format!(
            "signature by OpenPGP key {key} is not in keyring {}",
            keyring.display()
        )
    } else {
        format!("gpgv refused the signature: {}", diagnostics(&out.stderr))
    })
}

/// Runs a verification tool; a tool that cannot run (missing, hung) refuses the commit, naming
/// the program.
fn run(spec: Spec) -> Result<Output, String> {
    exec::run_blocking(spec).map_err(|e| crate::error::chain(&e))
}

/// The signature written to a new temporary directory (the tools read it from a file); the
/// directory goes when the returned guard is dropped.
fn signature_file(signature: &[u8]) -> Result<(tempfile::TempDir, PathBuf), String> {
    let dir = tempfile::Builder::new()
        .prefix("plumb-verify-")
        .tempdir()
        .map_err(|e| format!("temporary directory for the signature: {e}"))?;
    let file = dir.path().join("commit.sig");
    std::fs::write(&file, signature).map_err(|e| format!("write {}: {e}", file.display()))?;
    Ok((dir, file))
}

/// What a tool printed on stderr, on one line, without ssh-keygen's "No principal matched.".
fn diagnostics(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "No principal matched.")
        .collect::<Vec<_>>()
        .join("; ")
}

/// A commit time (seconds since the epoch) as ssh-keygen's `verify-time`: `YYYYMMDDHHMMSSZ`, UTC.
fn ssh_time(seconds: i64) -> String {
    // humantime formats years 1970..=9999 only.
    let seconds = seconds.clamp(0, 253_402_300_799) as u64;
    let rfc3339 =
        humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
    let digits: String = rfc3339
        .to_string()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    format!("{digits}Z")
}

/// `SHA256:...` of the public key inside an armored ssh signature (the `SSHSIG` blob), as
/// ssh-keygen prints fingerprints, so that a refusal names the key even when no tool accepted it.
fn ssh_fingerprint(armored: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(armored).ok()?;
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    // "SSHSIG", uint32 version, string public key, ...
    let rest = blob.strip_prefix(b"SSHSIG")?.get(4..)?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let key = rest.get(4..4 + len)?;
    let digest = Sha256::digest(key);
    Some(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_time_is_utc_digits() {
        assert_eq!(ssh_time(0), "19700101000000Z");
        assert_eq!(ssh_time(1_704_164_645), "20240102030405Z");
        assert_eq!(ssh_time(-5), "19700101000000Z");
    }

    #[test]
    fn refusals_show_a_short_hash() {
        let err = GitError::Unverified {
            commit: "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d".into(),
            reason: "not signed".into(),
        };
        assert_eq!(err.to_string(), "commit 1a2b3c4d5e6f: not signed");
        assert!(!err.is_corruption());
    }

    #[test]
    fn an_unreadable_signature_has_no_fingerprint() {
        assert_eq!(
            ssh_fingerprint(b"-----BEGIN SSH SIGNATURE-----\n!!\n"),
            None
        );
        assert_eq!(ssh_fingerprint(b""), None);
    }
}
