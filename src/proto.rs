//! The control API's wire format: the JSON bodies the daemon's API serves and `plumbctl` reads
//! (locally, and from other machines through `ssh host plumbctl --json`). One definition for both
//! ends, so they cannot drift apart; field names are the documented, stable schema (README).

use serde::{Deserialize, Serialize};

/// The path prefix of every route; a breaking change gets a new one.
pub const PREFIX: &str = "/v1";

/// Every route of the control API: the one table the server (`api.rs`) and the client (`plumbctl`)
/// are both built from, so a route cannot exist on one end only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Machines,
    Services,
    Service,
    Freeze,
    Unfreeze,
    Rollback,
    Pull,
    Diff,
    Wipe,
    Promote,
    Audit,
}

impl Route {
    /// Every route, in the order the API documents them.
    pub const ALL: [Route; 11] = [
        Route::Machines,
        Route::Services,
        Route::Service,
        Route::Freeze,
        Route::Unfreeze,
        Route::Rollback,
        Route::Pull,
        Route::Diff,
        Route::Wipe,
        Route::Promote,
        Route::Audit,
    ];

    /// The HTTP method: reads are GET, changes POST.
    pub fn method(self) -> &'static str {
        match self {
            Route::Freeze
            | Route::Unfreeze
            | Route::Rollback
            | Route::Pull
            | Route::Wipe
            | Route::Promote => "POST",
            Route::Machines | Route::Services | Route::Service | Route::Diff | Route::Audit => {
                "GET"
            }
        }
    }

    /// The path under [`PREFIX`] as the server matches it, `{name}` standing for the service.
    pub fn pattern(self) -> &'static str {
        match self {
            Route::Machines => "/machines",
            Route::Services => "/services",
            Route::Service => "/services/{name}",
            Route::Freeze => "/services/{name}/freeze",
            Route::Unfreeze => "/services/{name}/unfreeze",
            Route::Rollback => "/services/{name}/rollback",
            Route::Pull => "/services/{name}/pull",
            Route::Diff => "/services/{name}/diff",
            Route::Wipe => "/services/{name}/wipe",
            Route::Promote => "/services/{name}/promote",
            Route::Audit => "/audit",
        }
    }

    /// The full path of a request; `service` (already percent-encoded as one path segment)
    /// takes the place of `{name}`.
    pub fn path(self, service: &str) -> String {
        format!("{PREFIX}{}", self.pattern().replace("{name}", service))
    }
}

/// A service's state on the wire: `"OK"`, `"FREEZE"`, `"ROLLBACK"`, `"BROKEN"` or `"DIFF"`
/// (ARCHITECTURE.md has what each means). A state a newer daemon adds reads as `Unknown` here, so
/// an older plumbctl still shows the rest of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Ok,
    Freeze,
    Rollback,
    Broken,
    Diff,
    #[serde(other)]
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Freeze => "FREEZE",
            State::Rollback => "ROLLBACK",
            State::Broken => "BROKEN",
            State::Diff => "DIFF",
            State::Unknown => "UNKNOWN",
        }
    }

    /// Something needs an operator: the machine side failed, or git cannot be reconciled.
    pub fn failing(self) -> bool {
        matches!(self, State::Broken | State::Diff)
    }
}

impl From<crate::service::State> for State {
    fn from(s: crate::service::State) -> State {
        use crate::service::State as S;
        match s {
            S::Ok => State::Ok,
            S::Freeze => State::Freeze,
            S::Rollback => State::Rollback,
            S::Broken => State::Broken,
            S::Diff => State::Diff,
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `status.state == "OK"`: states compare with their names, as scripts and tests write them.
impl PartialEq<&str> for State {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One service as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub machine: String,
    /// OK, FREEZE, ROLLBACK, BROKEN or DIFF.
    pub state: State,
    /// Why the service is in its state.
    pub info: String,
    /// Unix seconds when the state was entered.
    pub since: u64,
    /// Upstream URL, without credentials.
    pub upstream: String,
    pub branch: String,
    /// The last commit that changed the service's files, deployed here.
    pub deployed: Option<String>,
    /// The branch head last seen upstream.
    pub upstream_head: Option<String>,
    /// Commits on the branch after `deployed` that change the service's files (0 when current).
    pub behind: Option<u64>,
    /// Not following upstream (a freeze or a rollback's pin), whatever the state shows: a frozen
    /// service that fails is BROKEN or DIFF and still frozen. Absent from daemons older than the
    /// field.
    #[serde(default)]
    pub frozen: bool,
    /// Unix seconds when a freeze ends by itself; always present, `null` when not frozen or frozen
    /// until unfrozen (and always for a pinned service: a pin ends only by an unfreeze).
    pub frozen_until: Option<u64>,
    /// The revision a rollback pinned the service to.
    pub pinned: Option<String>,
    pub dirs: Vec<DirStatus>,
    pub last_apply: Option<ApplyStatus>,
    /// Conditions beside the state, one sentence each: the upstream unreachable, ... Empty when
    /// there are none; absent from daemons older than the field.
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirStatus {
    pub local: String,
    pub link: String,
    pub file: bool,
    pub ro: bool,
}

/// The last `plumb apply` of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyStatus {
    pub revision: String,
    pub ok: bool,
    pub message: String,
    pub time: u64,
}

/// `GET /v1/machines`: the machines named in the config, and this one's names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machines {
    /// This machine's names (hostname and aliases).
    pub this: Vec<String>,
    /// Every machine in the config, with the services configured for it.
    pub machines: Vec<MachineEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineEntry {
    pub machine: String,
    pub services: Vec<String>,
}

/// `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    pub services: Vec<ServiceStatus>,
}

/// `POST /v1/services/{name}/freeze`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    /// How long, as "90m", "2h", "1d"; absent: until unfrozen.
    #[serde(default)]
    pub duration: Option<String>,
}

/// `POST /v1/services/{name}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Full or abbreviated hash, or any revision git accepts, in the service's history.
    pub revision: String,
}

/// `POST /v1/services/{name}/pull`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// Also drop local edits (drift) to the service's files.
    #[serde(default)]
    pub force: bool,
}

/// The answer to every write: what was done and the service afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionResult {
    pub action: String,
    pub ok: bool,
    pub message: String,
    pub status: ServiceStatus,
}

/// `GET /v1/services/{name}/diff`: what the next pull would change in the service's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffResult {
    pub service: String,
    /// The revision the checkout was made from.
    pub from: Option<String>,
    /// The branch head last fetched.
    pub to: Option<String>,
    /// Commits between them that change the service's files.
    pub commits: Option<u64>,
    pub files: Vec<FileDiff>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDiff {
    pub path: String,
    /// added, deleted, modified, renamed or typechange.
    pub change: String,
}

/// Every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// One entry of the audit log (`GET /v1/audit`): every write, allowed or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Ties the entry written before a write is carried out (result `started`) to the one with
    /// its outcome; 0 in entries of plumb versions before it.
    #[serde(default)]
    pub id: u64,
    pub time: u64,
    pub uid: u32,
    pub user: String,
    pub action: String,
    pub service: Option<String>,
    pub arguments: serde_json::Value,
    pub result: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_its_own_pattern_and_fills_in_the_service() {
        let mut patterns: Vec<&str> = Route::ALL.iter().map(|r| r.pattern()).collect();
        patterns.sort();
        patterns.dedup();
        assert_eq!(patterns.len(), Route::ALL.len());
        assert_eq!(
            Route::Freeze.path("docker-compose@caddy"),
            "/v1/services/docker-compose@caddy/freeze"
        );
        assert_eq!(Route::Audit.path(""), "/v1/audit");
        assert_eq!(
            (Route::Diff.method(), Route::Wipe.method()),
            ("GET", "POST")
        );
    }
}
