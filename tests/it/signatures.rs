//! Signed-commit verification (`Store::verify_commit`) against commits signed by the real git
//! with real keys: ed25519 ssh keys from `ssh-keygen`, OpenPGP keys from `gpg`. Each refusal is
//! checked by the message an operator would read.

use crate::support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use plumb::git::{Oid, Store, Transport, Trust};
use support::{Upstream, git, git_env, temp_root};

// ---------------------------------------------------------------------------------------------
// helpers

/// An upstream and a work clone of it that commits with signing options, and a store fetching it.
struct Repo {
    up: Upstream,
    work: PathBuf,
    stores: PathBuf,
}

impl Repo {
    fn new(root: &Path) -> Repo {
        let up = Upstream::new(root, "signed");
        let work = root.join("signing-work");
        fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        git(
            &work,
            &["remote", "add", "origin", up.bare.to_str().unwrap()],
        );
        Repo {
            up,
            work,
            stores: root.join("stores"),
        }
    }

    /// Commits (empty) with `env`, pushes, returns the hash. With `signing` (git `-c` options
    /// naming the format and key) the commit is signed (`commit -S`).
    fn commit(&self, env: &[(&str, &str)], signing: &[&str], msg: &str) -> String {
        let mut args = signing.to_vec();
        args.extend(["commit", "-q", "--allow-empty", "-m", msg]);
        if !signing.is_empty() {
            args.push("-S");
        }
        git_env(&self.work, env, &args);
        git(&self.work, &["push", "-q", "-f", "origin", "HEAD"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// A copy of commit `rev` with its message changed but its signature kept, made the branch
    /// head: what an attacker who rewrites a signed commit produces.
    fn tamper(&self, rev: &str) -> String {
        let content = git(&self.work, &["cat-file", "commit", rev]);
        let (headers, msg) = content.split_once("\n\n").expect("commit message");
        let forged = format!("{headers}\n\n{msg} (and something else)\n");
        let path = self.work.join("forged-commit");
        fs::write(&path, forged).unwrap();
        let oid = git(
            &self.work,
            &["hash-object", "-t", "commit", "-w", path.to_str().unwrap()],
        );
        git(&self.work, &["reset", "-q", "--hard", &oid]);
        git(&self.work, &["push", "-q", "-f", "origin", "HEAD"]);
        oid
    }

    /// Fetches `main` into a store and checks it is `head`.
    fn store(&self, head: &str) -> Store {
        let mut store = Store::open(&self.stores, &self.up.file_url()).expect("open store");
        let report = store
            .fetch(&["main".to_string()], &Transport::default())
            .expect("fetch main");
        assert_eq!(report.heads["main"], Some(oid(head)));
        store
    }
}

fn oid(hash: &str) -> Oid {
    Oid::from_str(hash).expect("a commit hash")
}

fn short(hash: &str) -> &str {
    &hash[..12]
}

/// Runs a non-git tool, panicking with its output on failure; returns stdout.
fn run(program: &str, args: &[&str], env: &[(&str, &Path)]) -> Vec<u8> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An ed25519 ssh key pair without passphrase.
struct SshKey {
    private: PathBuf,
    /// `ssh-ed25519 AAAA...`, as an allowed-signers line carries it.
    public: String,
    /// `SHA256:...`, as ssh-keygen prints it.
    fingerprint: String,
}

impl SshKey {
    fn new(root: &Path, name: &str) -> SshKey {
        let private = root.join(format!("{name}_ed25519"));
        let path = private.to_str().unwrap();
        run(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-C", name, "-f", path],
            &[],
        );
        let public = fs::read_to_string(private.with_extension("pub")).unwrap();
        let public = public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let listed = run("ssh-keygen", &["-l", "-f", path], &[]);
        let fingerprint = String::from_utf8(listed).unwrap();
        let fingerprint = fingerprint.split_whitespace().nth(1).unwrap().to_string();
        SshKey {
            private,
            public,
            fingerprint,
        }
    }

    /// git options that sign a commit with this key.
    fn sign_options(&self) -> Vec<String> {
        vec![
            "-c".into(),
            "gpg.format=ssh".into(),
            "-c".into(),
            format!("user.signingkey={}", self.private.display()),
        ]
    }
}

fn ssh_signed(repo: &Repo, key: &SshKey, env: &[(&str, &str)], msg: &str) -> String {
    let options = key.sign_options();
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    repo.commit(env, &options, msg)
}

/// An allowed-signers file with `lines`.
fn allowed_signers(root: &Path, lines: &[String]) -> PathBuf {
    let path = root.join("allowed_signers");
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn ssh_trust(signers: &Path) -> Trust {
    Trust {
        allowed_signers: Some(signers.to_path_buf()),
        keyring: None,
    }
}

/// An OpenPGP key in its own GNUPGHOME; the gpg-agent it started is stopped on drop.
struct PgpKey {
    home: PathBuf,
    fingerprint: String,
}

impl PgpKey {
    fn new(root: &Path, name: &str) -> PgpKey {
        let home = root.join(format!("gnupg-{name}"));
        fs::create_dir_all(&home).unwrap();
        fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let mut key = PgpKey {
            home,
            fingerprint: String::new(),
        };
        let uid = format!("{name} <{name}@example.com>");
        key.gpg(&[
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-gen-key",
            &uid,
            "ed25519",
            "sign",
            "never",
        ]);
        let listed = String::from_utf8(key.gpg(&["--list-keys", "--with-colons"])).unwrap();
        let fingerprint = listed
            .lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .and_then(|l| l.split(':').find(|f| !f.is_empty()))
            .expect("a fingerprint")
            .to_string();

        key.fingerprint = fingerprint;
        key
    }

    fn gpg(&self, args: &[&str]) -> Vec<u8> {
        run("gpg", args, &[("GNUPGHOME", &self.home)])
    }

    /// The public key exported to a keyring file for gpgv.
    fn keyring(&self, root: &Path) -> PathBuf {
        let path = root.join("keyring.gpg");
        fs::write(&path, self.gpg(&["--export", &self.fingerprint])).unwrap();
        path
    }

    fn sign(&self, repo: &Repo, msg: &str) -> String {
        let key = format!("user.signingkey={}", self.fingerprint);
        let home = self.home.to_str().unwrap();
        repo.commit(
            &[("GNUPGHOME", home)],
            &[
                "-c",
                "gpg.format=openpgp",
                "-c",
                "gpg.program=gpg",
                "-c",
                &key,
            ],
            msg,
        )
    }
}

impl Drop for PgpKey {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .args(["--kill", "gpg-agent"])
            .env("GNUPGHOME", &self.home)
            .status();
    }
}

fn pgp_trust(keyring: &Path) -> Trust {
    Trust {
        allowed_signers: None,
        keyring: Some(keyring.to_path_buf()),
    }
}

/// The refusal's text.
fn refused(store: &Store, head: &str, trust: &Trust) -> String {
    match store.verify_commit(oid(head), trust) {
        Ok(signer) => panic!("commit {head} verified, signed by {signer}"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// ssh

#[test]
fn a_commit_signed_by_an_allowed_ssh_key_verifies_and_names_the_signer() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = SshKey::new(root.path(), "alice");
    let signers = allowed_signers(
        root.path(),
        &[format!(
            "alice@example.com namespaces=\"git\" {}",
            alice.public
        )],
    );
    repo.commit(
        &[],
        &[],
        "unsigned parent: only the commit asked about counts",
    );
    let head = ssh_signed(&repo, &alice, &[], "signed");
    let store = repo.store(&head);

    let signer = store
        .verify_commit(oid(&head), &ssh_trust(&signers))
        .unwrap();
    assert_eq!(
        signer,
        format!("ssh key {} of alice@example.com", alice.fingerprint)
    );
    // With OpenPGP trusted as well, an ssh signature still goes to the ssh signers.
    let both = Trust {
        allowed_signers: Some(signers.clone()),
        keyring: Some(root.path().join("no-such-keyring.gpg")),
    };
    assert_eq!(store.verify_commit(oid(&head), &both).unwrap(), signer);
}

#[test]
fn an_unsigned_commit_is_refused() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = SshKey::new(root.path(), "alice");
    let signers = allowed_signers(
        root.path(),
        &[format!("alice@example.com {}", alice.public)],
    );
    ssh_signed(
        &repo,
        &alice,
        &[],
        "a signed parent does not make its child signed",
    );
    let head = repo.commit(&[], &[], "unsigned");
    let store = repo.store(&head);

    assert_eq!(
        refused(&store, &head, &ssh_trust(&signers)),
        format!("commit {}: not signed", short(&head))
    );
}

#[test]
fn a_commit_signed_by_a_key_not_in_allowed_signers_is_refused() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = SshKey::new(root.path(), "alice");
    let mallory = SshKey::new(root.path(), "mallory");
    let signers = allowed_signers(
        root.path(),
        &[format!("alice@example.com {}", alice.public)],
    );
    let head = ssh_signed(&repo, &mallory, &[], "signed by someone else");
    let store = repo.store(&head);

    assert_eq!(
        refused(&store, &head, &ssh_trust(&signers)),
        format!(
            "commit {}: signature by key {} is not in allowed signers {}",
            short(&head),
            mallory.fingerprint,
            signers.display()
        )
    );
}

#[test]
fn valid_before_in_allowed_signers_is_judged_at_the_commit_time() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = SshKey::new(root.path(), "alice");
    let signers = allowed_signers(
        root.path(),
        &[format!(
            "alice@example.com valid-before=\"20200101\" {}",
            alice.public
        )],
    );
    let trust = ssh_trust(&signers);

    // Committed while the key was valid: still good today.
    let old = ssh_signed(
        &repo,
        &alice,
        &[("GIT_COMMITTER_DATE", "2019-06-01T12:00:00Z")],
        "signed in 2019",
    );
    let store = repo.store(&old);
    assert_eq!(
        store.verify_commit(oid(&old), &trust).unwrap(),
        format!("ssh key {} of alice@example.com", alice.fingerprint)
    );
    drop(store);

    // Committed after the key's end.
    let head = ssh_signed(&repo, &alice, &[], "signed now");
    let store = repo.store(&head);
    let err = refused(&store, &head, &trust);
    let expected = format!(
        "commit {}: signature by key {} is not valid at the commit's time: {}:1: key has expired",
        short(&head),
        alice.fingerprint,
        signers.display()
    );
    assert!(err.starts_with(&expected), "{err}");
    assert!(err.contains("valid-before 2020-01-01"), "{err}");
}

#[test]
fn a_tampered_ssh_signed_commit_is_refused() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = SshKey::new(root.path(), "alice");
    let signers = allowed_signers(
        root.path(),
        &[format!("alice@example.com {}", alice.public)],
    );
    let signed = ssh_signed(&repo, &alice, &[], "deploy v1");
    let store = repo.store(&signed);
    assert!(
        store
            .verify_commit(oid(&signed), &ssh_trust(&signers))
            .is_ok()
    );
    drop(store);

    let head = repo.tamper(&signed);
    let store = repo.store(&head);
    assert_eq!(
        refused(&store, &head, &ssh_trust(&signers)),
        format!(
            "commit {}: bad signature by ssh key {}: Signature verification failed: incorrect signature",
            short(&head),
            alice.fingerprint
        )
    );
}

#[test]
fn an_ssh_signature_with_only_openpgp_trusted_is_refused() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = SshKey::new(root.path(), "alice");
    let head = ssh_signed(&repo, &alice, &[], "signed with ssh");
    let store = repo.store(&head);

    assert_eq!(
        refused(&store, &head, &pgp_trust(&root.path().join("keyring.gpg"))),
        format!(
            "commit {}: signed with ssh but only OpenPGP keys are trusted",
            short(&head)
        )
    );
}

// ---------------------------------------------------------------------------------------------
// OpenPGP

#[test]
fn a_commit_signed_by_a_key_in_the_keyring_verifies_and_names_the_key() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = PgpKey::new(root.path(), "alice");
    let keyring = alice.keyring(root.path());
    let head = alice.sign(&repo, "signed with OpenPGP");
    let store = repo.store(&head);

    assert_eq!(
        store
            .verify_commit(oid(&head), &pgp_trust(&keyring))
            .unwrap(),
        format!(
            "openpgp key {} of alice <alice@example.com>",
            alice.fingerprint
        )
    );
}

#[test]
fn an_openpgp_signature_with_only_ssh_trusted_is_refused() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = PgpKey::new(root.path(), "alice");
    let head = alice.sign(&repo, "signed with OpenPGP");
    let store = repo.store(&head);
    let signers = allowed_signers(root.path(), &[]);

    assert_eq!(
        refused(&store, &head, &ssh_trust(&signers)),
        format!(
            "commit {}: signed with OpenPGP but only ssh signers are trusted",
            short(&head)
        )
    );
}

#[test]
fn a_commit_signed_by_a_key_not_in_the_keyring_is_refused() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = PgpKey::new(root.path(), "alice");
    let mallory = PgpKey::new(root.path(), "mallory");
    let keyring = alice.keyring(root.path());
    let head = mallory.sign(&repo, "signed by someone else");
    let store = repo.store(&head);

    assert_eq!(
        refused(&store, &head, &pgp_trust(&keyring)),
        format!(
            "commit {}: signature by OpenPGP key {} is not in keyring {}",
            short(&head),
            mallory.fingerprint,
            keyring.display()
        )
    );
}

#[test]
fn a_tampered_openpgp_signed_commit_is_refused() {
    let root = temp_root();
    let repo = Repo::new(root.path());
    let alice = PgpKey::new(root.path(), "alice");
    let keyring = alice.keyring(root.path());
    let signed = alice.sign(&repo, "deploy v1");
    let store = repo.store(&signed);
    assert!(
        store
            .verify_commit(oid(&signed), &pgp_trust(&keyring))
            .is_ok()
    );
    drop(store);

    let head = repo.tamper(&signed);
    let store = repo.store(&head);
    assert_eq!(
        refused(&store, &head, &pgp_trust(&keyring)),
        format!(
            "commit {}: bad signature by OpenPGP key {} (alice <alice@example.com>): it does not match the commit's content",
            short(&head),
            &alice.fingerprint[alice.fingerprint.len() - 16..]
        )
    );
}
