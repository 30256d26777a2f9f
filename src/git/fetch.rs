//! The network side of a store: fetching the requested branches of its upstream in one connection,
//! with full history, checked ssh host keys, bounded credential attempts, cancellation and a
//! time limit.
//!
//! A fetch connects once, reads the ref advertisement, and downloads only the requested branches
//! that exist upstream (a missing branch or an empty upstream is reported as `None`, not an
//! error). Over smart HTTP (protocol v0, which libgit2 speaks) a fetch that finds every branch up
//! to date is therefore exactly one request, `GET info/refs`. Branch references are then written
//! by plumb itself (`refs/remotes/origin/<branch>`, force-updated so a force-push upstream is
//! followed); tags are never fetched and `FETCH_HEAD` is never written.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use git2::{
    AutotagOption, Cred, CredentialType, Direction, ErrorClass, ErrorCode, FetchOptions,
    FetchPrune, RemoteCallbacks, cert::Cert,
};
use git2::{CertificateCheckStatus, Oid};

use super::known_hosts::{self, Verdict};
use super::store::BRANCH_PREFIX;
use super::url::{SshEndpoint, http_credentials, ssh_endpoint};
use super::{FetchReport, GitError, Store, Transport};

/// More credential requests than this in one fetch means libgit2 is looping on a rejected
/// credential: stop. (The ssh key options are at most three, plus user-name requests.)
const MAX_CREDENTIAL_REQUESTS: u32 = 8;

impl Store {
    /// Fetches `branches` (full history, no depth, no filter, no tags) in one connection and
    /// returns their heads; a branch missing upstream is `None` and its local copy is dropped.
    ///
    /// The store is re-opened first (so nothing cached hides files that changed on disk) and its
    /// branches checked; a store found damaged (then, by this fetch, or by an earlier operation on
    /// it) is set aside, re-created and fetched again, once, within this call.
    pub fn fetch(
        &mut self,
        branches: &[String],
        transport: &Transport,
    ) -> Result<FetchReport, GitError> {
        for branch in branches {
            let valid = !branch.is_empty()
                && !branch.contains('*')
                && git2::Reference::is_valid_name(&format!("refs/heads/{branch}"));
            if !valid {
                return Err(GitError::Branch {
                    url: self.shown.clone(),
                    branch: branch.clone(),
                    reason: "not a valid branch name",
                });
            }
        }
        if transport.cancel.load(Ordering::Relaxed) {
            return Err(GitError::Cancelled {
                url: self.shown.clone(),
            });
        }
        if branches.is_empty() {
            return Ok(FetchReport {
                heads: BTreeMap::new(),
                rewritten: BTreeMap::new(),
            });
        }
        super::timeouts::init(transport.timeout);
        self.refresh()?;
        let report = match self.fetch_once(branches, transport) {
            Err(e) if e.is_corruption() && self.heal_on_fetch_error => {
                self.heal(&e.to_string())?;
                self.mark_healed_after_fetch();
                self.fetch_once(branches, transport)
            }
            other => other,
        }?;
        self.heal_on_fetch_error = true;
        self.unmark_healed_after_fetch();
        Ok(report)
    }

    fn fetch_once(
        &self,
        branches: &[String],
        transport: &Transport,
    ) -> Result<FetchReport, GitError> {
        let session = Session::new(&self.url, &self.shown, transport);
        let mut remote = self
            .repo
            .remote_anonymous(&self.url)
            .map_err(|e| session.error(e))?;
        let mut heads: BTreeMap<String, Option<Oid>> = BTreeMap::new();
        {
            let mut connection = remote
                .connect_auth(Direction::Fetch, Some(session.callbacks()), None)
                .map_err(|e| session.error(e))?;
            // The ref advertisement: every branch upstream and its head, as of this connection.
            let advertised: BTreeMap<String, Oid> = connection
                .list()
                .map_err(|e| session.error(e))?
                .iter()
                .filter_map(|head| {
                    let branch = head.name().strip_prefix("refs/heads/")?;
                    Some((branch.to_string(), head.oid()))
                })
                .collect();
            let mut refspecs = Vec::new();
            for branch in branches {
                if heads.contains_key(branch) {
                    continue;
                }
                let head = advertised.get(branch).copied();
                if head.is_some() {
                    refspecs.push(format!("+refs/heads/{branch}:{BRANCH_PREFIX}{branch}"));
                }
                heads.insert(branch.clone(), head);
            }
            if !refspecs.is_empty() {
                let mut options = FetchOptions::new();
                options
                    .remote_callbacks(session.callbacks())
                    .download_tags(AutotagOption::None)
                    .update_fetchhead(false)
                    .prune(FetchPrune::Off);
                // Negotiates with the objects already in the store; downloads nothing (and sends
                // no request) when every head is present.
                connection
                    .remote()
                    .download(&refspecs, Some(&mut options))
                    .map_err(|e| session.error(e))?;
                let stats = connection.remote().stats();
                if stats.received_objects() > 0 {
                    tracing::debug!(
                        url = self.shown,
                        objects = stats.received_objects(),
                        bytes = stats.received_bytes(),
                        "fetched"
                    );
                }
            }
        }
        let mut rewritten = BTreeMap::new();
        for (branch, head) in heads.iter_mut() {
            let refname = format!("{BRANCH_PREFIX}{branch}");
            let old = self
                .repo
                .find_reference(&refname)
                .ok()
                .and_then(|r| r.target());
            match *head {
                Some(oid) => {
                    let commit = self
                        .repo
                        .find_object(oid, None)
                        .and_then(|o| o.peel_to_commit())
                        .map_err(|e| {
                            // The head was just fetched (or found present): not having it now
                            // means the store lost objects.
                            let damage = git2::Error::new(
                                ErrorCode::GenericError,
                                ErrorClass::Odb,
                                format!(
                                    "branch {branch} is at {oid}, which the store lacks after fetching: {}",
                                    e.message()
                                ),
                            );
                            session.error(damage)
                        })?;
                    *head = Some(commit.id());
                    if let Some(old) = old.filter(|o| *o != commit.id()) {
                        let forward = self
                            .repo
                            .graph_descendant_of(commit.id(), old)
                            .map_err(|e| session.error(e))?;
                        if !forward {
                            tracing::warn!(
                                url = self.shown,
                                branch = %branch,
                                old = %old,
                                new = %commit.id(),
                                "branch was force-pushed upstream: the new head does not descend from the old one"
                            );
                            rewritten.insert(branch.clone(), (old, commit.id()));
                        }
                    }
                    self.repo
                        .reference(&refname, commit.id(), true, "plumb: fetch")
                        .map_err(|e| session.error(e))?;
                }
                None => {
                    if let Ok(mut stale) = self.repo.find_reference(&refname) {
                        stale.delete().map_err(|e| session.error(e))?;
                    }
                }
            }
        }
        Ok(FetchReport { heads, rewritten })
    }
}

/// Why a fetch stopped on plumb's request.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Cancelled,
    TimedOut(Duration),
}

/// Where an ssh key may come from, in the order tried.
#[derive(Debug)]
enum KeySource {
    Agent,
    File { path: PathBuf, configured: bool },
}

/// The state the callbacks of one fetch share. libgit2 reports failures of callbacks with generic
/// messages ("invalid or unknown remote ssh hostkey"), so the precise reason is kept here and put
/// into the [`GitError`].
struct Session<'a> {
    url: &'a str,
    shown: &'a str,
    transport: &'a Transport,
    ssh: Option<SshEndpoint>,
    started: Instant,
    stopped: Cell<Option<Stop>>,
    refusal: RefCell<Option<String>>,
    credential_requests: Cell<u32>,
    ssh_keys: RefCell<Option<VecDeque<KeySource>>>,
    tried_keys: RefCell<Vec<String>>,
    offered_url_credentials: Cell<bool>,
}

impl<'a> Session<'a> {
    fn new(url: &'a str, shown: &'a str, transport: &'a Transport) -> Self {
        Session {
            url,
            shown,
            transport,
            ssh: ssh_endpoint(url),
            started: Instant::now(),
            stopped: Cell::new(None),
            refusal: RefCell::new(None),
            credential_requests: Cell::new(0),
            ssh_keys: RefCell::new(None),
            tried_keys: RefCell::new(Vec::new()),
            offered_url_credentials: Cell::new(false),
        }
    }

    /// A fresh set of callbacks over this session (libgit2 takes one set for connecting and
    /// another for downloading; both share the state).
    fn callbacks(&'a self) -> RemoteCallbacks<'a> {
        let mut callbacks = RemoteCallbacks::new();
        callbacks
            .transfer_progress(|_| self.keep_going())
            .sideband_progress(|_| self.keep_going())
            .certificate_check(|cert, _host| self.certificate_check(cert))
            .credentials(|_url, user, allowed| self.credentials(user, allowed));
        callbacks
    }

    /// False (abort) once cancellation was requested or the time limit passed.
    fn keep_going(&self) -> bool {
        if self.transport.cancel.load(Ordering::Relaxed) {
            self.stopped.set(Some(Stop::Cancelled));
            return false;
        }
        if let Some(limit) = self.transport.timeout
            && self.started.elapsed() > limit
        {
            self.stopped.set(Some(Stop::TimedOut(limit)));
            return false;
        }
        true
    }

    /// The error of a failed fetch step, preferring what plumb itself knows about the failure.
    fn error(&self, source: git2::Error) -> GitError {
        let url = self.shown.to_string();
        match self.stopped.get() {
            Some(Stop::Cancelled) => return GitError::Cancelled { url },
            Some(Stop::TimedOut(timeout)) => return GitError::TimedOut { url, timeout },
            None => {}
        }
        match self.refusal.borrow_mut().take() {
            Some(reason) => GitError::Refused {
                url,
                reason,
                source: Some(source),
            },
            None => GitError::Fetch { url, source },
        }
    }

    /// Records why plumb refuses to go on and returns the error that makes libgit2 stop.
    fn refuse<T>(&self, reason: String) -> Result<T, git2::Error> {
        let err = git2::Error::from_str(&reason);
        *self.refusal.borrow_mut() = Some(reason);
        Err(err)
    }

    fn stopped_error<T>(&self) -> Result<T, git2::Error> {
        Err(git2::Error::new(
            ErrorCode::User,
            ErrorClass::Callback,
            "stopped by plumb",
        ))
    }

    /// TLS certificates are left to libgit2 (OpenSSL against the system CA store); ssh host keys
    /// are checked against the known_hosts files, and an unknown or changed key is refused.
    fn certificate_check(&self, cert: &Cert<'_>) -> Result<CertificateCheckStatus, git2::Error> {
        if !self.keep_going() {
            return self.stopped_error();
        }
        let Some(hostkey) = cert.as_hostkey() else {
            return Ok(CertificateCheckStatus::CertificatePassthrough);
        };
        let Some(endpoint) = &self.ssh else {
            return self
                .refuse("an ssh host key was offered for a URL plumb does not see as ssh".into());
        };
        let name = endpoint.known_hosts_name();
        let Some(key) = hostkey.hostkey() else {
            return self.refuse(format!(
                "the ssh server {name} did not present its host key in a form plumb can check"
            ));
        };
        let key_type = hostkey.hostkey_type().map_or("unknown", |t| t.name());
        let fingerprint = hostkey.hash_sha256().map_or_else(
            || "(no fingerprint)".to_string(),
            |h| format!("SHA256:{}", STANDARD_NO_PAD.encode(h)),
        );
        let files = self.known_hosts_files();
        let mut verdict = Verdict::Unknown;
        let mut described = Vec::new();
        for file in &files {
            match std::fs::read_to_string(file) {
                Ok(contents) => {
                    verdict = verdict.merge(known_hosts::check(&contents, &name, key));
                    described.push(file.display().to_string());
                }
                Err(e) => described.push(format!("{} ({e})", file.display())),
            }
        }
        let listed = described.join(", ");
        let first = files.first().map_or_else(
            || "~/.ssh/known_hosts".to_string(),
            |f| f.display().to_string(),
        );
        let keyscan = endpoint.keyscan_command();
        match verdict {
            Verdict::Trusted => Ok(CertificateCheckStatus::CertificateOk),
            Verdict::Unknown => self.refuse(format!(
                "host key for {name} not found in {listed}; add it with {keyscan} >> {first}"
            )),
            Verdict::Revoked => self.refuse(format!(
                "host key for {name} ({key_type} {fingerprint}) is marked @revoked in {listed}; refusing to connect"
            )),
            Verdict::Changed { known_types } if !known_types.iter().any(|t| t == key_type) => {
                self.refuse(format!(
                    "host key for {name}: the server offered a {key_type} key ({fingerprint}) but {listed} has only {} key(s) for it; after checking the key, add it with {keyscan} >> {first}",
                    known_types.join(", ")
                ))
            }
            Verdict::Changed { .. } => self.refuse(format!(
                "host key for {name} does not match {listed} (the server offered {key_type} {fingerprint}); if the key really changed, replace the old line (ssh-keygen -R '{name}' -f {first}; {keyscan} >> {first})"
            )),
        }
    }

    fn known_hosts_files(&self) -> Vec<PathBuf> {
        if !self.transport.known_hosts.is_empty() {
            return self.transport.known_hosts.clone();
        }
        let mut files = Vec::new();
        if let Some(home) = std::env::var_os("HOME") {
            files.push(PathBuf::from(home).join(".ssh/known_hosts"));
        }
        files.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
        files
    }

    /// Answers libgit2's credential requests: the ssh key options one after the other, the user
    /// name, or the user and password of an http(s) URL; a bounded number of times, since libgit2
    /// asks again after every rejection and would loop forever.
    fn credentials(
        &self,
        user_from_url: Option<&str>,
        allowed: CredentialType,
    ) -> Result<Cred, git2::Error> {
        if !self.keep_going() {
            return self.stopped_error();
        }
        let requests = self.credential_requests.get() + 1;
        self.credential_requests.set(requests);
        if requests > MAX_CREDENTIAL_REQUESTS {
            return self.refuse(format!(
                "authentication failed: gave up after {MAX_CREDENTIAL_REQUESTS} attempts"
            ));
        }
        let user = user_from_url
            .map(str::to_string)
            .or_else(|| self.ssh.as_ref().and_then(|e| e.user.clone()))
            .unwrap_or_else(local_user);
        if allowed.contains(CredentialType::SSH_KEY) {
            return self.next_ssh_key(&user);
        }
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(&user);
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            return match http_credentials(self.url) {
                Some((user, password)) if !self.offered_url_credentials.replace(true) => {
                    Cred::userpass_plaintext(&user, &password)
                }
                Some(_) => self.refuse("the server rejected the credentials in the URL".into()),
                None => self.refuse(
                    "the server requires authentication; put the credentials in the URL (https://user:token@host/...)".into(),
                ),
            };
        }
        self.refuse(format!(
            "the server asks for a kind of credentials plumb does not offer ({allowed:?})"
        ))
    }

    fn next_ssh_key(&self, user: &str) -> Result<Cred, git2::Error> {
        let mut keys = self.ssh_keys.borrow_mut();
        let keys = keys.get_or_insert_with(|| self.key_sources());
        let name = self
            .ssh
            .as_ref()
            .map_or_else(|| self.shown.to_string(), SshEndpoint::known_hosts_name);
        loop {
            match keys.pop_front() {
                None => {
                    let tried = self.tried_keys.borrow();
                    let reason = if tried.is_empty() {
                        format!(
                            "no ssh key to authenticate as {user} to {name}: no ssh agent (SSH_AUTH_SOCK) and no ~/.ssh/id_ed25519 or ~/.ssh/id_rsa; configure a key"
                        )
                    } else {
                        format!(
                            "ssh authentication as {user} to {name} failed; tried {}",
                            tried.join(", ")
                        )
                    };
                    return self.refuse(reason);
                }
                Some(KeySource::Agent) => {
                    self.tried_keys.borrow_mut().push("the ssh agent".into());
                    return Cred::ssh_key_from_agent(user);
                }
                Some(KeySource::File { path, configured }) => {
                    if !path.exists() {
                        if configured {
                            return self
                                .refuse(format!("ssh key {} does not exist", path.display()));
                        }
                        continue;
                    }
                    self.tried_keys
                        .borrow_mut()
                        .push(format!("key {}", path.display()));
                    return Cred::ssh_key(user, None, &path, None);
                }
            }
        }
    }

    fn key_sources(&self) -> VecDeque<KeySource> {
        if let Some(path) = &self.transport.ssh_key {
            return VecDeque::from([KeySource::File {
                path: path.clone(),
                configured: true,
            }]);
        }
        let mut sources = VecDeque::new();
        if std::env::var_os("SSH_AUTH_SOCK").is_some() {
            sources.push_back(KeySource::Agent);
        }
        if let Some(home) = std::env::var_os("HOME") {
            for name in ["id_ed25519", "id_rsa"] {
                sources.push_back(KeySource::File {
                    path: PathBuf::from(&home).join(".ssh").join(name),
                    configured: false,
                });
            }
        }
        sources
    }
}

/// The name of the user plumb runs as: what `ssh` would log in as when the URL names no user.
fn local_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map_or_else(|| "root".to_string(), |u| u.name)
}
