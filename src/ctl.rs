//! `plumbctl`, the operator's client of the control API: what it asks, of which machines, and how the
//! answers are shown.
//!
//! Without `@host` arguments it speaks HTTP/1.1 to the local daemon's unix socket. With them it runs
//! `ssh <host> plumbctl --json <the same words>` for each host at once and merges the answers, so
//! reaching another machine is the user's own OpenSSH (config, agent, known_hosts, ProxyJump) and
//! authorisation is the remote account's unix groups on the remote socket: plumb holds no keys.
//! Without a terminal on standard input ssh runs with `BatchMode=yes`: nobody could answer a prompt.
//!
//! The HTTP client is small on purpose: one blocking request per connection, `Connection: close`,
//! a `Content-Length` body out, and the answer read whole and framed by `httparse` (status,
//! headers, `Content-Length` or chunked body). That is all the API needs, and it keeps hyper's
//! client and a runtime out of the binary.
//!
//! Times are shown in the local time zone as RFC 3339 with their offset, with how far they are
//! from now ("2026-12-01T14:03:00+01:00 (in 1h29m)"); the daemon writes UTC ones into its
//! messages, which [`Clock::localize`] shows so.
//!
//! # `--json` schema
//!
//! One JSON document: always an array with one object per machine asked, in the order given, also
//! for this machine alone (without `@host`), so a script reads every answer the same way
//! (`.[0].result`, or `.[] | select(.ok)`):
//!
//! ```json
//! [
//!   {"machine": "web1", "ok": true, "result": {"services": [ ... ]}},
//!   {"machine": "web2", "ok": false, "error": "ssh: connect to host web2 port 22: Connection refused"}
//! ]
//! ```
//!
//! `machine` is the host as written after `@`, or this machine's hostname. `ok` says whether the
//! machine answered the request; `result` is then the API's body unchanged (`proto::Machines`,
//! `proto::Services`, `proto::ServiceStatus`, `proto::ActionResult` or a list of
//! `proto::AuditEntry`), and a write the daemon could not carry out has `ok: true` with
//! `result.ok: false`. `error` is a message for people, one line; when ssh said more (a host key
//! banner), all of it is in `detail`. The exit code is 0 when every machine answered and every
//! write succeeded, 1 otherwise, 2 for a usage error.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::chain;
use crate::exec;
use crate::proto;

pub mod complete;

/// Where the daemon listens unless `--socket` or `PLUMB_SOCKET` say otherwise.
pub const DEFAULT_SOCKET: &str = "/run/plumb/plumb.sock";

/// How long a read-only request may take (the daemon answers from memory).
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a write may take: a pull fetches and deploys before answering, bounded by the daemon's
/// fetch timeout (2 minutes by default) plus the checkout.
const WRITE_TIMEOUT: Duration = Duration::from_secs(600);

/// Extra time ssh gets on top of the request's own (connecting, authenticating).
const SSH_GRACE: Duration = Duration::from_secs(60);

/// A larger answer is refused rather than read into memory.
const MAX_RESPONSE: u64 = 64 << 20;

/// Freeze, unfreeze, roll back, pull and inspect the services plumb manages, here or on other
/// machines through ssh (@host).
#[derive(Debug, Parser)]
#[command(
    name = "plumbctl",
    version,
    after_help = "Add @host (one or more) to any command to run it on those machines through ssh:\n  \
                  plumbctl list services @web1 @web2\n\
                  Environment: PLUMB_SOCKET (the local socket), PLUMBCTL_SSH (the ssh command, default \
                  \"ssh\"), PLUMBCTL_REMOTE (plumbctl on the remote machines, default \"plumbctl\")."
)]
pub struct Cli {
    /// Print one JSON document: an array of {"machine", "ok", "result" | "error"}, one element
    /// per machine asked, also for this machine alone.
    #[arg(long, global = true)]
    pub json: bool,
    /// After a failure to reach a host, show all that ssh said, not only its first line.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// The local daemon's API socket [env: PLUMB_SOCKET] [default: /run/plumb/plumb.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub action: Action,
}

/// What plumbctl asks of each machine.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Action {
    /// List the machines of the config, or this machine's services.
    #[command(subcommand)]
    List(ListWhat),
    /// Show one service in detail.
    Status {
        /// The service: its unit name as in the config ("nginx", "docker-compose@caddy").
        service: String,
    },
    /// Stop tracking upstream, for a while or until unfrozen.
    Freeze {
        /// The service: its unit name as in the config ("nginx", "docker-compose@caddy").
        service: String,
        /// How long: "90m", "2h", "1d"; without it, until unfrozen.
        duration: Option<String>,
    },
    /// Track upstream again (also ends a rollback).
    Unfreeze {
        /// The service: its unit name as in the config ("nginx", "docker-compose@caddy").
        service: String,
    },
    /// Pin the service to an older revision of its files, and freeze it there.
    Rollback {
        /// The service: its unit name as in the config ("nginx", "docker-compose@caddy").
        service: String,
        /// A commit in the service's history: full or abbreviated hash.
        hash: String,
    },
    /// Fetch and deploy now; answers when done.
    Pull {
        /// The service: its unit name as in the config ("nginx", "docker-compose@caddy").
        service: String,
        /// Also drop local edits to the service's files.
        #[arg(long)]
        force: bool,
    },
    /// Rebuild the service's checkout from the store (drops local edits; the emergency path).
    Wipe {
        /// The service: its unit name as in the config ("nginx", "docker-compose@caddy").
        service: String,
    },
    /// Deploy the revision the service's rollout wave waits for now, without waiting for the
    /// lower waves (once: the next revision waits again).
    Promote {
        /// The service: its unit name as in the config ("nginx", "docker-compose@caddy").
        service: String,
    },
    /// What the next pull would change in the service's files.
    Diff {
        /// The service: its unit name as in the config ("nginx", "docker-compose@caddy").
        service: String,
    },
    /// Show the audit log: every write, allowed or refused, oldest first.
    Log {
        /// Only the last N entries (the daemon's default: 1000).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
}

/// The two things `list` lists.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ListWhat {
    /// The machines named in the config, with their services.
    Machines,
    /// This machine's services and their states.
    Services,
}

/// Why a machine gave no answer, or refused.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The local socket could not be connected to.
    #[error("cannot reach plumb at {}", socket.display())]
    Connect {
        socket: PathBuf,
        /// What to do about it, when plumbctl can tell: `" (...)"` or empty; shown after the
        /// cause ([`CtlError::message`]).
        hint: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or timed out during the exchange.
    #[error("talking to plumb at {}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The answer was not HTTP as expected, or its body not the expected JSON.
    #[error("plumb at {} answered something unexpected: {reason}", socket.display())]
    Protocol { socket: PathBuf, reason: String },
    /// The daemon refused the request (403, 404, 422, 503, ...).
    #[error("{message}")]
    Refused { status: u16, message: String },
    /// A remote machine could not be asked, or answered with an error: the one line that says
    /// what went wrong, and all that ssh said when it said more (a host key banner).
    #[error("{message}")]
    Remote {
        /// One line: the remote plumbctl's error, or the first meaningful line ssh said.
        message: String,
        /// All that ssh said, when it said more than `message`.
        detail: Option<String>,
    },
    /// No async runtime for the ssh children.
    #[error("cannot start the runtime for ssh")]
    Runtime(#[source] std::io::Error),
}

impl CtlError {
    /// A remote failure with nothing more to say than `message`.
    pub fn remote(message: impl Into<String>) -> CtlError {
        CtlError::Remote {
            message: message.into(),
            detail: None,
        }
    }

    /// The error for people: what failed, its causes, and what to do about it when plumbctl can
    /// tell.
    pub fn message(&self) -> String {
        let mut text = chain(self);
        if let CtlError::Connect { hint, .. } = self {
            text.push_str(hint);
        }
        text
    }

    /// The whole of what ssh said, when the message is only its first meaningful line.
    pub fn detail(&self) -> Option<&str> {
        match self {
            CtlError::Remote { detail, .. } => detail.as_deref(),
            _ => None,
        }
    }
}

/// A successful answer: the API's body for the action asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Body {
    Machines(proto::Machines),
    Services(proto::Services),
    Status(proto::ServiceStatus),
    Action(proto::ActionResult),
    Audit(Vec<proto::AuditEntry>),
    Diff(proto::DiffResult),
}

/// One machine's part of the answer.
#[derive(Debug)]
pub struct Report {
    /// The host as written after `@`, or this machine's hostname.
    pub machine: String,
    pub outcome: Result<Body, CtlError>,
}

/// One element of the `--json` array (the schema in this module's documentation). Also what a
/// remote plumbctl prints, so it is read back with the same type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub machine: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Everything ssh said, when `error` is only its first meaningful line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The command line split into what clap parses and the machines to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub words: Vec<String>,
    /// Hosts without their `@`, in order, each once.
    pub hosts: Vec<String>,
}

/// Takes the `@host` arguments out of `args` (the arguments after the program name). They may stand
/// anywhere, so `plumbctl @web1 status nginx` and `plumbctl status nginx @web1` mean the same; the
/// value of `--socket` is never a host. A host starting with `-` is refused: ssh would read it as
/// an option.
pub fn split_hosts(args: &[String]) -> Result<Split, String> {
    let mut words = Vec::new();
    let mut hosts: Vec<String> = Vec::new();
    let mut value_next = false;
    for arg in args {
        if value_next {
            value_next = false;
            words.push(arg.clone());
            continue;
        }
        if arg == "--socket" {
            value_next = true;
            words.push(arg.clone());
            continue;
        }
        match arg.strip_prefix('@') {
            Some("") | None => words.push(arg.clone()),
            Some(host) if host.starts_with('-') => {
                return Err(format!("{arg}: a host cannot start with '-'"));
            }
            Some(host) => {
                if !hosts.iter().any(|h| h == host) {
                    hosts.push(host.to_owned());
                }
            }
        }
    }
    Ok(Split { words, hosts })
}

/// Where and how plumbctl reaches machines; read from the environment once, given explicitly to
/// everything else so tests need not touch the process environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The local daemon's socket.
    pub socket: PathBuf,
    /// The ssh program and its options (`PLUMBCTL_SSH`, split on whitespace; default `ssh`).
    pub ssh: Vec<String>,
    /// plumbctl on the remote machines (`PLUMBCTL_REMOTE`, split on whitespace, so it may be
    /// `env PLUMB_SOCKET=/x/plumb.sock /opt/bin/plumbctl`; default `plumbctl`).
    pub remote: Vec<String>,
    /// ssh may not ask anything (`BatchMode=yes`): standard input is not a terminal, so no one
    /// could answer, and the prompts of several hosts asked at once would collide.
    pub batch: bool,
}

impl Settings {
    /// `--socket`, else `PLUMB_SOCKET`, else [`DEFAULT_SOCKET`]; `PLUMBCTL_SSH` and
    /// `PLUMBCTL_REMOTE`; batch mode when standard input is not a terminal.
    pub fn from_env(socket: Option<&Path>) -> Settings {
        let words = |name: &str, default: &str| -> Vec<String> {
            let value = std::env::var(name).unwrap_or_default();
            let words: Vec<String> = value.split_whitespace().map(str::to_owned).collect();
            if words.is_empty() {
                vec![default.to_owned()]
            } else {
                words
            }
        };
        Settings {
            socket: socket
                .map(Path::to_path_buf)
                .or_else(|| {
                    std::env::var_os("PLUMB_SOCKET")
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                })
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            ssh: words("PLUMBCTL_SSH", "ssh"),
            remote: words("PLUMBCTL_REMOTE", "plumbctl"),
            batch: !std::io::stdin().is_terminal(),
        }
    }
}

/// An HTTP request of the API, before it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: &'static str,
    pub path: String,
    pub body: Option<Value>,
}

impl Action {
    /// The same request as words for a remote plumbctl (without `--json`, the socket or hosts).
    pub fn to_args(&self) -> Vec<String> {
        let words: Vec<&str> = match self {
            Action::List(ListWhat::Machines) => vec!["list", "machines"],
            Action::List(ListWhat::Services) => vec!["list", "services"],
            Action::Status { service } => vec!["status", service],
            Action::Freeze { service, duration } => {
                let mut w = vec!["freeze", service.as_str()];
                w.extend(duration.as_deref());
                w
            }
            Action::Unfreeze { service } => vec!["unfreeze", service],
            Action::Rollback { service, hash } => vec!["rollback", service, hash],
            Action::Pull { service, force } => {
                let mut w = vec!["pull", service.as_str()];
                if *force {
                    w.push("--force");
                }
                w
            }
            Action::Diff { service } => vec!["diff", service],
            Action::Wipe { service } => vec!["wipe", service],
            Action::Promote { service } => vec!["promote", service],
            Action::Log { limit } => {
                let mut w = vec!["log".to_owned()];
                if let Some(n) = limit {
                    w.extend(["--limit".to_owned(), n.to_string()]);
                }
                return w;
            }
        };
        words.into_iter().map(str::to_owned).collect()
    }

    /// The route, method and JSON body of the action.
    pub fn request(&self) -> ApiRequest {
        use proto::Route;
        let empty = || Value::Object(Default::default());
        let (route, service, body) = match self {
            Action::List(ListWhat::Machines) => (Route::Machines, "", None),
            Action::List(ListWhat::Services) => (Route::Services, "", None),
            Action::Status { service } => (Route::Service, service.as_str(), None),
            Action::Diff { service } => (Route::Diff, service.as_str(), None),
            Action::Wipe { service } => (Route::Wipe, service.as_str(), Some(empty())),
            Action::Promote { service } => (Route::Promote, service.as_str(), Some(empty())),
            Action::Freeze { service, duration } => (
                Route::Freeze,
                service.as_str(),
                Some(to_value(&proto::FreezeRequest {
                    duration: duration.clone(),
                })),
            ),
            Action::Unfreeze { service } => (Route::Unfreeze, service.as_str(), Some(empty())),
            Action::Rollback { service, hash } => (
                Route::Rollback,
                service.as_str(),
                Some(to_value(&proto::RollbackRequest {
                    revision: hash.clone(),
                })),
            ),
            Action::Pull { service, force } => (
                Route::Pull,
                service.as_str(),
                Some(to_value(&proto::PullRequest { force: *force })),
            ),
            Action::Log { .. } => (Route::Audit, "", None),
        };
        let mut path = route.path(&encode_segment(service));
        if let Action::Log { limit: Some(n) } = self {
            path.push_str(&format!("?limit={n}"));
        }
        ApiRequest {
            method: route.method(),
            path,
            body,
        }
    }

    /// Reads a successful answer's body as the type this action gets.
    pub fn decode(&self, value: Value) -> Result<Body, serde_json::Error> {
        Ok(match self {
            Action::List(ListWhat::Machines) => Body::Machines(serde_json::from_value(value)?),
            Action::List(ListWhat::Services) => Body::Services(serde_json::from_value(value)?),
            Action::Status { .. } => Body::Status(serde_json::from_value(value)?),
            Action::Freeze { .. }
            | Action::Unfreeze { .. }
            | Action::Rollback { .. }
            | Action::Pull { .. }
            | Action::Wipe { .. }
            | Action::Promote { .. } => Body::Action(serde_json::from_value(value)?),
            Action::Diff { .. } => Body::Diff(serde_json::from_value(value)?),
            Action::Log { .. } => Body::Audit(serde_json::from_value(value)?),
        })
    }

    fn timeout(&self) -> Duration {
        match self {
            Action::List(_) | Action::Status { .. } | Action::Diff { .. } | Action::Log { .. } => {
                READ_TIMEOUT
            }
            _ => WRITE_TIMEOUT,
        }
    }
}

/// The proto request types serialize infallibly (strings and bools only).
fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Percent-encodes a service name for one path segment. Unit names are letters, digits and `:_.-@`,
/// which pass unchanged; anything else is encoded rather than trusted.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Asks every machine and returns their answers in the order given: the local socket when `hosts`
/// is empty, otherwise each host through ssh, all at once.
pub fn run(
    action: &Action,
    hosts: &[String],
    settings: &Settings,
) -> Result<Vec<Report>, CtlError> {
    if hosts.is_empty() {
        return Ok(vec![Report {
            machine: local_hostname(),
            outcome: call_local(&settings.socket, action),
        }]);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CtlError::Runtime)?;
    Ok(runtime.block_on(async {
        let tasks: Vec<_> = hosts
            .iter()
            .map(|host| {
                let (host, action, settings) = (host.clone(), action.clone(), settings.clone());
                tokio::spawn(async move {
                    let outcome = call_remote(&settings, &host, &action).await;
                    Report {
                        machine: host,
                        outcome,
                    }
                })
            })
            .collect();
        let mut reports = Vec::with_capacity(tasks.len());
        for (host, task) in hosts.iter().zip(tasks) {
            reports.push(task.await.unwrap_or_else(|e| Report {
                machine: host.clone(),
                outcome: Err(CtlError::remote(format!("internal error: {e}"))),
            }));
        }
        reports
    }))
}

fn local_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// One request to the daemon on `socket`.
pub fn call_local(socket: &Path, action: &Action) -> Result<Body, CtlError> {
    let req = action.request();
    let response = http(socket, &req, action.timeout())?;
    read_answer(socket, action, &response)
}

/// What the daemon on `socket` answered to `action`: the body of a success as the type the action
/// gets, or the daemon's refusal. Pure, so the fuzz targets (`fuzz/`) can feed it anything.
pub fn read_answer(
    socket: &Path,
    action: &Action,
    response: &HttpResponse,
) -> Result<Body, CtlError> {
    if (200..300).contains(&response.status) {
        let value: Value =
            serde_json::from_slice(&response.body).map_err(|e| CtlError::Protocol {
                socket: socket.to_owned(),
                reason: format!("body is not JSON: {e}"),
            })?;
        action.decode(value).map_err(|e| CtlError::Protocol {
            socket: socket.to_owned(),
            reason: format!("unexpected body: {e}"),
        })
    } else {
        let message = match serde_json::from_slice::<proto::ErrorBody>(&response.body) {
            Ok(body) => body.error,
            Err(_) => {
                let text = String::from_utf8_lossy(&response.body);
                let text: String = text.trim().chars().take(200).collect();
                format!("HTTP {}: {text}", response.status)
            }
        };
        Err(CtlError::Refused {
            status: response.status,
            message,
        })
    }
}

/// A parsed HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

fn http(socket: &Path, req: &ApiRequest, timeout: Duration) -> Result<HttpResponse, CtlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| CtlError::Connect {
        socket: socket.to_owned(),
        hint: match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is plumb running? --socket or PLUMB_SOCKET name another socket)".to_owned()
            }
            std::io::ErrorKind::PermissionDenied => access_hint(socket),
            _ => String::new(),
        },
        source,
    })?;
    let io = |source| CtlError::Io {
        socket: socket.to_owned(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(&format_request(req)).map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut raw)
        .map_err(io)?;
    if raw.len() as u64 > MAX_RESPONSE {
        return Err(CtlError::Protocol {
            socket: socket.to_owned(),
            reason: format!("answer larger than {MAX_RESPONSE} bytes"),
        });
    }
    parse_response(&raw).map_err(|reason| CtlError::Protocol {
        socket: socket.to_owned(),
        reason,
    })
}

/// Why this account may not use `socket`, naming the group it needs: the socket's own group
/// (the API's read-only group, of which admins are members too). A user already in it whose
/// session started before is told to log in again.
fn access_hint(socket: &Path) -> String {
    use nix::unistd::{Gid, Group, User, getgroups, getuid};
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(socket) else {
        return String::new();
    };
    let gid = Gid::from_raw(meta.gid());
    let group = match Group::from_gid(gid) {
        Ok(Some(g)) => g.name,
        _ => gid.to_string(),
    };
    let user = User::from_uid(getuid()).ok().flatten();
    let name = user
        .as_ref()
        .map_or_else(|| getuid().to_string(), |u| u.name.clone());
    let in_database = user.as_ref().is_some_and(|u| {
        std::ffi::CString::new(u.name.clone())
            .ok()
            .and_then(|c| nix::unistd::getgrouplist(&c, u.gid).ok())
            .is_some_and(|groups| groups.contains(&gid))
    });
    let in_session = getgroups().is_ok_and(|groups| groups.contains(&gid));
    if in_database && !in_session {
        format!(
            " ({name} is in group {group}, which the socket is for, but this session started \
             before that: log in again, or run `newgrp {group}`)"
        )
    } else {
        format!(
            " ({name} is not in group {group}, which the socket is for: an administrator adds \
             it with `usermod -aG {group} {name}`, admins too; then log in again)"
        )
    }
}

/// The bytes of `req` as HTTP/1.1, one request per connection.
pub fn format_request(req: &ApiRequest) -> Vec<u8> {
    let body = req
        .body
        .as_ref()
        .map(|b| b.to_string().into_bytes())
        .unwrap_or_default();
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: plumbctl/{}\r\nAccept: application/json\r\nConnection: close\r\n",
        req.method,
        req.path,
        env!("CARGO_PKG_VERSION")
    );
    if req.body.is_some() {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Reads a whole HTTP/1.1 answer (the server closed the connection after it) with `httparse`:
/// the status, and the body by `Content-Length`, chunked encoding, or up to the end.
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the answer ends inside its headers".into()),
        Err(e) => return Err(format!("not an HTTP/1 answer: {e}")),
    };
    let status = response.code.ok_or("no status code")?;
    let mut length = None;
    let mut chunked = false;
    for header in response.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length: {value:?}"))?,
            );
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &raw[head_len..];
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| format!("body cut short: {} of {n} bytes", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, body })
}

/// A chunked body: each chunk's size line read by `httparse`, up to the last (empty) chunk.
fn decode_chunked(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let (consumed, size) = match httparse::parse_chunk_size(raw) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => return Err("chunk size line cut short".into()),
            Err(_) => return Err("bad chunk size line".into()),
        };
        raw = &raw[consumed..];
        if size == 0 {
            return Ok(body);
        }
        let size = usize::try_from(size).map_err(|_| "chunk too large")?;
        body.extend_from_slice(raw.get(..size).ok_or("chunk cut short")?);
        raw = raw
            .get(size..)
            .and_then(|r| r.strip_prefix(b"\r\n"))
            .ok_or("chunk cut short")?;
    }
}

/// The ssh command line for asking `host`: program and arguments. The remote command is quoted for
/// the remote shell word by word, since ssh joins its words with spaces.
pub fn ssh_command(settings: &Settings, host: &str, action: &Action) -> (String, Vec<String>) {
    let mut words = settings.ssh.iter();
    let program = words.next().cloned().unwrap_or_else(|| "ssh".to_owned());
    let mut args: Vec<String> = words.cloned().collect();
    if settings.batch {
        // After PLUMBCTL_SSH's words: ssh takes the first value of an option, so theirs wins.
        args.extend(["-o".to_owned(), "BatchMode=yes".to_owned()]);
    }
    args.push("--".to_owned());
    args.push(host.to_owned());
    let remote: Vec<String> = settings
        .remote
        .iter()
        .cloned()
        .chain(std::iter::once("--json".to_owned()))
        .chain(action.to_args())
        .collect();
    args.push(
        remote
            .iter()
            .map(|w| exec::shell_quote(w))
            .collect::<Vec<_>>()
            .join(" "),
    );
    (program, args)
}

async fn call_remote(settings: &Settings, host: &str, action: &Action) -> Result<Body, CtlError> {
    let (program, args) = ssh_command(settings, host, action);
    let output = exec::run(&program, &args, action.timeout() + SSH_GRACE)
        .await
        .map_err(|e| CtlError::remote(chain(&e)))?;
    parse_remote(action, &output)
}

/// Reads what a remote `plumbctl --json` printed. Its JSON is believed whatever the exit code (1
/// means refused, and the reason is in the JSON); without JSON, ssh or the remote shell failed and
/// the error is the first meaningful line of what they said on stderr ([`ssh_said`]).
pub fn parse_remote(action: &Action, output: &exec::Output) -> Result<Body, CtlError> {
    if let Ok(envelopes) = serde_json::from_str::<Vec<Envelope>>(&output.stdout)
        && let Some(envelope) = envelopes.into_iter().next()
    {
        return match (envelope.ok, envelope.result) {
            (true, Some(result)) => action
                .decode(result)
                .map_err(|e| CtlError::remote(format!("unexpected answer: {e}"))),
            _ => Err(CtlError::Remote {
                message: envelope
                    .error
                    .unwrap_or_else(|| "failed without a message".to_owned()),
                detail: envelope.detail,
            }),
        };
    }
    Err(match ssh_said(&output.stderr) {
        Some((message, detail)) => CtlError::Remote { message, detail },
        None => CtlError::remote(match output.code {
            Some(code) => format!("ssh exited with status {code} and no answer"),
            None => "ssh was killed by a signal".to_owned(),
        }),
    })
}

/// What ssh said on stderr, as one line for a table cell and, when it said more, all of it.
/// The line is the first that is neither decoration (a banner's `@@@@` rows) nor a routine
/// notice (`Warning: Permanently added ...`, OpenSSH's `** WARNING: ...` about key exchange),
/// with a banner's `@` frame taken off: a changed host key gives "WARNING: REMOTE HOST
/// IDENTIFICATION HAS CHANGED!" and the 17 lines behind it.
pub fn ssh_said(stderr: &str) -> Option<(String, Option<String>)> {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let unframed = |l: &str| l.trim().trim_matches('@').trim().to_owned();
    let decoration = |l: &str| l.chars().all(|c| "@*=-#~ \t".contains(c));
    let routine = |l: &str| {
        let l = l.trim_start();
        l.starts_with("Warning: Permanently added") || l.starts_with("** ")
    };
    let message = lines
        .iter()
        .find(|l| !decoration(l) && !routine(l))
        .or_else(|| lines.iter().find(|l| !decoration(l)))
        .map(|l| unframed(l))?;
    let detail = (lines.len() > 1).then(|| lines.join("\n"));
    Some((message, detail))
}

/// The `--json` document for `reports` (see the module documentation).
pub fn render_json(reports: &[Report]) -> String {
    let envelopes: Vec<Envelope> = reports
        .iter()
        .map(|r| match &r.outcome {
            Ok(body) => Envelope {
                machine: r.machine.clone(),
                ok: true,
                result: Some(to_value(body)),
                error: None,
                detail: None,
            },
            Err(e) => Envelope {
                machine: r.machine.clone(),
                ok: false,
                result: None,
                error: Some(e.message()),
                detail: e.detail().map(str::to_owned),
            },
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&envelopes).unwrap_or_else(|_| "[]".to_owned());
    text.push('\n');
    text
}

/// 0 when every machine answered and every write succeeded, else 1.
pub fn exit_code(reports: &[Report]) -> u8 {
    let failed = reports.iter().any(|r| match &r.outcome {
        Err(_) => true,
        Ok(Body::Action(result)) => !result.ok,
        Ok(_) => false,
    });
    u8::from(failed)
}

/// Text for people: what goes to stdout and what to stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text {
    pub stdout: String,
    pub stderr: String,
}

/// How text is rendered.
#[derive(Debug, Clone)]
pub struct View {
    /// Hosts were given: a MACHINE column, and a failed machine is a row; without it, a failure
    /// goes to stderr.
    pub with_machine: bool,
    /// `--verbose`: all of what ssh said after a failure, not only its first line.
    pub verbose: bool,
    pub clock: Clock,
}

/// Renders `reports` for people as `view` says.
pub fn render_text(action: &Action, reports: &[Report], view: &View) -> Text {
    let mut text = Text::default();
    let mut shown: Vec<&Report> = Vec::new();
    for r in reports {
        match &r.outcome {
            Err(e) if !view.with_machine => {
                text.stderr
                    .push_str(&format!("plumbctl: {}\n", e.message()));
                if let Some(detail) = e.detail().filter(|_| view.verbose) {
                    text.stderr.push_str(&indent(detail));
                }
            }
            _ => shown.push(r),
        }
    }
    if shown.is_empty() {
        return text;
    }
    text.stdout = match action {
        Action::Status { .. } => status_blocks(&shown, view),
        _ => {
            let mut out = table_for(action, &shown, view).render(view.with_machine);
            if view.verbose {
                for r in &shown {
                    if let Some(detail) = r.outcome.as_ref().err().and_then(CtlError::detail) {
                        out.push_str(&format!("\n{}:\n{}", r.machine, indent(detail)));
                    }
                }
            }
            out
        }
    };
    text
}

/// Each line of `text` indented by two spaces.
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// A failure as one line: its message, and where `--verbose` shows more.
fn one_line(e: &CtlError, view: &View) -> String {
    match e.detail() {
        Some(_) if !view.verbose => format!("{} (more with --verbose)", e.message()),
        _ => e.message(),
    }
}

/// A table whose rows each belong to a machine; the MACHINE column is added on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub header: Vec<&'static str>,
    /// (machine, cells)
    pub rows: Vec<(String, Vec<String>)>,
}

impl Table {
    /// Columns padded to their widest cell, two spaces apart; the last column is not padded.
    pub fn render(&self, with_machine: bool) -> String {
        let mut lines: Vec<Vec<&str>> = Vec::new();
        let mut header: Vec<&str> = Vec::new();
        if with_machine {
            header.push("MACHINE");
        }
        header.extend(self.header.iter().copied());
        lines.push(header);
        for (machine, cells) in &self.rows {
            let mut line: Vec<&str> = Vec::new();
            if with_machine {
                line.push(machine);
            }
            line.extend(cells.iter().map(String::as_str));
            lines.push(line);
        }
        let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for line in &lines {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in &lines {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                if i + 1 < line.len() {
                    let pad = widths[i] - cell.chars().count();
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A failed machine's row: "-" everywhere, ERROR in the state column when there is one, the message
/// last.
fn error_row(columns: usize, state_column: Option<usize>, message: &str) -> Vec<String> {
    let mut cells = vec!["-".to_owned(); columns];
    match state_column {
        Some(i) => {
            cells[i] = "ERROR".to_owned();
            cells[columns - 1] = message.to_owned();
        }
        None => cells[columns - 1] = format!("error: {message}"),
    }
    cells
}

fn table_for(action: &Action, reports: &[&Report], view: &View) -> Table {
    let (header, state_column): (Vec<&'static str>, Option<usize>) = match action {
        Action::List(ListWhat::Machines) => (vec!["NAME", "THIS", "SERVICES"], None),
        Action::List(ListWhat::Services) | Action::Status { .. } => (
            vec!["SERVICE", "STATE", "DEPLOYED", "BEHIND", "SINCE", "INFO"],
            Some(1),
        ),
        Action::Log { .. } => (
            vec!["TIME", "USER", "ACTION", "SERVICE", "RESULT", "ARGUMENTS"],
            None,
        ),
        Action::Diff { .. } => (vec!["SERVICE", "CHANGE", "PATH"], None),
        _ => (vec!["SERVICE", "RESULT", "STATE", "MESSAGE"], Some(2)),
    };
    let mut rows = Vec::new();
    for r in reports {
        let machine = r.machine.clone();
        match &r.outcome {
            Err(e) => rows.push((
                machine,
                error_row(header.len(), state_column, &one_line(e, view)),
            )),
            Ok(Body::Machines(m)) => {
                for entry in &m.machines {
                    let this = if m.this.contains(&entry.machine) {
                        "yes"
                    } else {
                        "-"
                    };
                    let services = if entry.services.is_empty() {
                        "-".to_owned()
                    } else {
                        entry.services.join(", ")
                    };
                    rows.push((
                        machine.clone(),
                        vec![entry.machine.clone(), this.to_owned(), services],
                    ));
                }
            }
            Ok(Body::Services(s)) => {
                for status in &s.services {
                    rows.push((machine.clone(), service_row(status, &view.clock)));
                }
            }
            Ok(Body::Status(status)) => rows.push((machine, service_row(status, &view.clock))),
            Ok(Body::Action(result)) => rows.push((
                machine,
                vec![
                    result.status.service.clone(),
                    if result.ok { "ok" } else { "FAILED" }.to_owned(),
                    result.status.state.to_string(),
                    view.clock.localize(&result.message),
                ],
            )),
            Ok(Body::Diff(d)) => {
                if d.files.is_empty() {
                    rows.push((
                        machine.clone(),
                        vec![
                            d.service.clone(),
                            "-".to_owned(),
                            "(nothing to pull)".to_owned(),
                        ],
                    ));
                }
                for f in &d.files {
                    rows.push((
                        machine.clone(),
                        vec![d.service.clone(), f.change.clone(), f.path.clone()],
                    ));
                }
            }
            Ok(Body::Audit(entries)) => {
                for entry in entries {
                    let arguments = match &entry.arguments {
                        Value::Null => "-".to_owned(),
                        Value::Object(o) if o.is_empty() => "-".to_owned(),
                        v => v.to_string(),
                    };
                    let user = if entry.user.is_empty() {
                        entry.uid.to_string()
                    } else {
                        entry.user.clone()
                    };
                    rows.push((
                        machine.clone(),
                        vec![
                            view.clock.local(entry.time),
                            user,
                            entry.action.clone(),
                            entry.service.clone().unwrap_or_else(|| "-".to_owned()),
                            entry.result.clone(),
                            arguments,
                        ],
                    ));
                }
            }
        }
    }
    Table { header, rows }
}

fn service_row(s: &proto::ServiceStatus, clock: &Clock) -> Vec<String> {
    vec![
        s.service.clone(),
        s.state.to_string(),
        s.deployed.as_deref().map(short).unwrap_or("-").to_owned(),
        s.behind.map_or_else(|| "-".to_owned(), |b| b.to_string()),
        relative(clock.now, s.since),
        {
            let said: Vec<&str> = std::iter::once(s.info.as_str())
                .chain(s.notes.iter().map(String::as_str))
                .filter(|t| !t.is_empty())
                .collect();
            if said.is_empty() {
                "-".to_owned()
            } else {
                clock.localize(&said.join("; "))
            }
        },
    ]
}

/// A hash cut to 12 characters for tables.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// `status`: one block of aligned `key: value` lines per machine, blank lines between them.
fn status_blocks(reports: &[&Report], view: &View) -> String {
    let mut blocks = Vec::new();
    for r in reports {
        let mut kv: Vec<(&str, String)> = Vec::new();
        if view.with_machine {
            kv.push(("host", r.machine.clone()));
        }
        match &r.outcome {
            Err(e) => {
                kv.push(("error", one_line(e, view)));
                if let Some(detail) = e.detail().filter(|_| view.verbose) {
                    kv.extend(detail.lines().map(|l| ("ssh", l.to_owned())));
                }
            }
            Ok(Body::Status(s)) => status_lines(s, &view.clock, &mut kv),
            Ok(_) => kv.push(("error", "unexpected answer".to_owned())),
        }
        let width = kv.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
        let mut block = String::new();
        for (key, value) in kv {
            let line = format!("{:<width$} {value}", format!("{key}:"));
            block.push_str(line.trim_end());
            block.push('\n');
        }
        blocks.push(block);
    }
    blocks.join("\n")
}

fn status_lines(s: &proto::ServiceStatus, clock: &Clock, kv: &mut Vec<(&'static str, String)>) {
    let dash = |v: Option<&String>| v.cloned().unwrap_or_else(|| "-".to_owned());
    let since = |t: u64| format!("{} ({})", clock.local(t), relative(clock.now, t));
    kv.push(("service", s.service.clone()));
    kv.push(("machine", s.machine.clone()));
    kv.push(("state", s.state.to_string()));
    if !s.info.is_empty() {
        kv.push(("info", clock.localize(&s.info)));
    }
    for note in &s.notes {
        kv.push(("note", clock.localize(note)));
    }
    kv.push(("since", since(s.since)));
    kv.push(("upstream", s.upstream.clone()));
    kv.push(("branch", s.branch.clone()));
    kv.push(("deployed", dash(s.deployed.as_ref())));
    kv.push(("upstream head", dash(s.upstream_head.as_ref())));
    kv.push((
        "behind",
        s.behind.map_or_else(|| "-".to_owned(), |b| b.to_string()),
    ));
    kv.push((
        "frozen",
        // A daemon older than the `frozen` field says so by the state alone.
        match (s.frozen || s.state == proto::State::Freeze, s.frozen_until) {
            (false, _) => "no".to_owned(),
            (true, Some(t)) => format!("until {}", clock.when(t)),
            (true, None) => "until unfrozen".to_owned(),
        },
    ));
    if let Some(pinned) = &s.pinned {
        kv.push(("pinned", pinned.clone()));
    }
    for d in &s.dirs {
        let mut flags = Vec::new();
        if d.file {
            flags.push("file");
        }
        if d.ro {
            flags.push("ro");
        }
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!(" ({})", flags.join(", "))
        };
        kv.push(("dir", format!("{} <- {}{flags}", d.local, d.link)));
    }
    if let Some(a) = &s.last_apply {
        let outcome = if a.ok { "ok" } else { "FAILED" };
        let message = if a.message.is_empty() {
            String::new()
        } else {
            format!(": {}", clock.localize(&a.message))
        };
        kv.push((
            "last apply",
            format!(
                "{outcome} {} {}{message}",
                short(&a.revision),
                since(a.time)
            ),
        ));
    }
}

/// When plumbctl renders: the time now and the time zone times are shown in.
#[derive(Debug, Clone)]
pub struct Clock {
    /// Unix seconds.
    pub now: u64,
    /// The zone of the times shown: the system's (`TZ`, `/etc/localtime`) in the binary.
    pub zone: TimeZone,
}

impl Clock {
    /// Now, in the system's time zone (UTC when it cannot be read).
    pub fn system() -> Clock {
        Clock {
            now: jiff::Timestamp::now().as_second().try_into().unwrap_or(0),
            zone: TimeZone::try_system().unwrap_or(TimeZone::UTC),
        }
    }

    /// `t` (unix seconds) as RFC 3339 in the clock's zone, with its offset:
    /// "2026-12-01T14:03:00+01:00". A time no calendar holds is shown as its number.
    pub fn local(&self, t: u64) -> String {
        i64::try_from(t)
            .ok()
            .and_then(|t| jiff::Timestamp::from_second(t).ok())
            .map(|ts| {
                ts.to_zoned_datetime(self.zone.clone())
                    .strftime("%Y-%m-%dT%H:%M:%S%:z")
                    .to_string()
            })
            .unwrap_or_else(|| format!("{t} (unix time)"))
    }

    /// `t` as [`Clock::local`] and relative to now: "2026-12-01T14:03:00+01:00 (in 1h29m)".
    pub fn when(&self, t: u64) -> String {
        format!("{} ({})", self.local(t), relative(self.now, t))
    }

    /// `text` with every UTC RFC 3339 time in it ("2026-12-01T13:03:00Z", as the daemon writes
    /// times into its messages, unambiguous for every reader of the API) shown as [`Clock::when`].
    pub fn localize(&self, text: &str) -> String {
        const LEN: usize = "2026-12-01T13:03:00Z".len();
        let shape = |b: &[u8]| {
            b.len() == LEN
                && b.iter().enumerate().all(|(i, c)| match i {
                    4 | 7 => *c == b'-',
                    10 => *c == b'T',
                    13 | 16 => *c == b':',
                    19 => *c == b'Z',
                    _ => c.is_ascii_digit(),
                })
        };
        let bytes = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < bytes.len() {
            let candidate = bytes.get(i..i + LEN).filter(|b| shape(b));
            let time = candidate
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.parse::<jiff::Timestamp>().ok())
                .and_then(|ts| u64::try_from(ts.as_second()).ok());
            match time {
                Some(t) => {
                    out.push_str(&self.when(t));
                    i += LEN;
                }
                None => {
                    // Times are ASCII: a character that starts none is copied whole.
                    let c = text[i..].chars().next().unwrap_or_default();
                    out.push(c);
                    i += c.len_utf8().max(1);
                }
            }
        }
        out
    }
}

/// `t` relative to `now`, to the two largest units: "12s ago", "3m ago", "1h29m ago", "2d5h ago",
/// or "in 1h29m" for a future time.
pub fn relative(now: u64, t: u64) -> String {
    let (delta, future) = if t > now {
        (t - now, true)
    } else {
        (now - t, false)
    };
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small}{small_unit}")
        }
    };
    let amount = match delta {
        d if d < 60 => format!("{d}s"),
        d if d < 3600 => format!("{}m", d / 60),
        d if d < 86_400 => two(d / 3600, "h", d % 3600 / 60, "m"),
        d => two(d / 86_400, "d", d % 86_400 / 3600, "h"),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// The arguments after the program name as UTF-8, or the first that is not.
pub fn utf8_args(args: impl IntoIterator<Item = OsString>) -> Result<Vec<String>, OsString> {
    args.into_iter().map(OsString::into_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn hosts_are_taken_out_anywhere_and_once() {
        let split = split_hosts(&words("@web1 status nginx @web2 --json @web1")).unwrap();
        assert_eq!(split.words, words("status nginx --json"));
        assert_eq!(split.hosts, words("web1 web2"));
    }

    #[test]
    fn the_socket_value_and_a_lone_at_are_words() {
        let split = split_hosts(&words("--socket @odd list services @")).unwrap();
        assert_eq!(split.words, words("--socket @odd list services @"));
        assert!(split.hosts.is_empty());
        let split = split_hosts(&words("status docker-compose@caddy")).unwrap();
        assert_eq!(split.words, words("status docker-compose@caddy"));
    }

    #[test]
    fn a_host_looking_like_an_option_is_refused() {
        let err = split_hosts(&words("list services @-oProxyCommand=x")).unwrap_err();
        assert_eq!(err, "@-oProxyCommand=x: a host cannot start with '-'");
    }

    fn parse(line: &str) -> Cli {
        Cli::try_parse_from(std::iter::once("plumbctl".to_owned()).chain(words(line))).unwrap()
    }

    #[test]
    fn the_grammar() {
        assert_eq!(
            parse("list machines").action,
            Action::List(ListWhat::Machines)
        );
        assert_eq!(
            parse("freeze nginx 2h --json").action,
            Action::Freeze {
                service: "nginx".into(),
                duration: Some("2h".into())
            }
        );
        assert!(parse("freeze nginx 2h --json").json);
        assert_eq!(
            parse("pull nginx --force").action,
            Action::Pull {
                service: "nginx".into(),
                force: true
            }
        );
        let cli = parse("--socket /tmp/p.sock rollback nginx abc123");
        assert_eq!(cli.socket.as_deref(), Some(Path::new("/tmp/p.sock")));
        for bad in ["", "list", "status", "rollback nginx", "diff", "wipe"] {
            let err = Cli::try_parse_from(std::iter::once("plumbctl".to_owned()).chain(words(bad)))
                .unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn actions_round_trip_through_their_arguments() {
        for line in [
            "list machines",
            "list services",
            "status nginx",
            "diff nginx",
            "wipe nginx",
            "promote nginx",
            "freeze nginx",
            "freeze nginx 90m",
            "unfreeze nginx",
            "rollback nginx 0123abcd",
            "pull nginx",
            "pull nginx --force",
            "log",
            "log --limit 20",
        ] {
            let action = parse(line).action;
            assert_eq!(action.to_args(), words(line));
            assert_eq!(parse(&action.to_args().join(" ")).action, action);
        }
    }

    #[test]
    fn requests() {
        let r = parse("freeze docker-compose@caddy 2h").action.request();
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/services/docker-compose@caddy/freeze");
        assert_eq!(r.body, Some(serde_json::json!({"duration": "2h"})));
        let r = parse("freeze nginx").action.request();
        assert_eq!(r.body, Some(serde_json::json!({"duration": null})));
        let r = parse("promote nginx").action.request();
        assert_eq!(
            (r.method, r.path.as_str(), r.body),
            (
                "POST",
                "/v1/services/nginx/promote",
                Some(serde_json::json!({}))
            )
        );
        let r = parse("status a/b%c").action.request();
        assert_eq!(
            (r.method, r.path.as_str()),
            ("GET", "/v1/services/a%2Fb%25c")
        );
        assert_eq!(parse("log").action.request().path, "/v1/audit");
        assert_eq!(
            parse("log --limit 5").action.request().path,
            "/v1/audit?limit=5"
        );
        assert_eq!(
            parse("pull x --force").action.request().body,
            Some(serde_json::json!({"force": true}))
        );
        assert_eq!(
            parse("rollback x abc").action.request().body,
            Some(serde_json::json!({"revision": "abc"}))
        );
    }

    #[test]
    fn request_bytes() {
        let req = parse("unfreeze nginx").action.request();
        let text = String::from_utf8(format_request(&req)).unwrap();
        let expected = format!(
            "POST /v1/services/nginx/unfreeze HTTP/1.1\r\nHost: localhost\r\nUser-Agent: plumbctl/{}\r\n\
             Accept: application/json\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Content-Length: 2\r\n\r\n{{}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(text, expected);
        let get = String::from_utf8(format_request(&parse("log").action.request())).unwrap();
        assert!(get.starts_with("GET /v1/audit HTTP/1.1\r\n"), "{get}");
        assert!(get.ends_with("Content-Length: 0\r\n\r\n"), "{get}");
    }

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx: y\r\n\r\n{}garbage")
            .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"e\r\n4;x=y\r\n\":1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"{\"e\":1}"[..]));
        let r = parse_response(b"HTTP/1.0 503 Unavailable\r\n\r\nbye").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (503, &b"bye"[..]));
        for bad in [
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(parse_response(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_ssh_command_line() {
        let settings = Settings {
            socket: PathBuf::from(DEFAULT_SOCKET),
            ssh: words("ssh -F /tmp/cfg -o BatchMode=yes"),
            remote: words("env PLUMB_SOCKET=/x/p.sock /opt/plumbctl"),
            batch: false,
        };
        let action = Action::Freeze {
            service: "nginx".into(),
            duration: Some("it's 1h".into()),
        };
        let (program, args) = ssh_command(&settings, "web1", &action);
        assert_eq!(program, "ssh");
        assert_eq!(
            args,
            vec![
                "-F",
                "/tmp/cfg",
                "-o",
                "BatchMode=yes",
                "--",
                "web1",
                r"env PLUMB_SOCKET=/x/p.sock /opt/plumbctl --json freeze nginx 'it'\''s 1h'"
            ]
        );
        // Without a terminal no one can answer ssh: it may not ask (the user's options first,
        // since ssh keeps the first value it is given).
        let batch = Settings {
            batch: true,
            ..settings
        };
        let (_, args) = ssh_command(&batch, "web1", &action);
        assert_eq!(
            args[..7],
            [
                "-F",
                "/tmp/cfg",
                "-o",
                "BatchMode=yes",
                "-o",
                "BatchMode=yes",
                "--"
            ]
        );
    }

    fn status(service: &str, state: &str) -> proto::ServiceStatus {
        proto::ServiceStatus {
            service: service.into(),
            machine: "web1".into(),
            state: serde_json::from_value(serde_json::json!(state)).unwrap(),
            info: String::new(),
            since: 1_700_000_000,
            upstream: "https://git.example.org/ops.git".into(),
            branch: "main".into(),
            deployed: Some("0123456789abcdef0123456789abcdef01234567".into()),
            upstream_head: Some("fedcba9876543210fedcba9876543210fedcba98".into()),
            behind: Some(0),
            frozen: false,
            frozen_until: None,
            pinned: None,
            notes: Vec::new(),
            dirs: vec![proto::DirStatus {
                local: "/etc/nginx".into(),
                link: "nginx/etc".into(),
                file: false,
                ro: true,
            }],
            last_apply: Some(proto::ApplyStatus {
                revision: "0123456789abcdef0123456789abcdef01234567".into(),
                ok: true,
                message: "reloaded".into(),
                time: 1_700_000_030,
            }),
        }
    }

    const NOW: u64 = 1_700_000_180;

    /// Rendering at [`NOW`] in a zone one hour east of UTC, as a user in Berlin sees it in winter.
    fn view(with_machine: bool) -> View {
        View {
            with_machine,
            verbose: false,
            clock: Clock {
                now: NOW,
                zone: TimeZone::fixed(jiff::tz::offset(1)),
            },
        }
    }

    fn services_report(machine: &str) -> Report {
        let mut grafana = status("grafana-server", "FREEZE");
        grafana.info = "frozen for 2h by alice".into();
        grafana.deployed = None;
        grafana.behind = None;
        grafana.since = NOW - 7200;
        Report {
            machine: machine.into(),
            outcome: Ok(Body::Services(proto::Services {
                services: vec![status("nginx", "OK"), grafana],
            })),
        }
    }

    #[test]
    fn services_table_here() {
        let text = render_text(
            &Action::List(ListWhat::Services),
            &[services_report("web1")],
            &view(false),
        );
        assert_eq!(
            text.stdout,
            "\
SERVICE         STATE   DEPLOYED      BEHIND  SINCE   INFO
nginx           OK      0123456789ab  0       3m ago  -
grafana-server  FREEZE  -             -       2h ago  frozen for 2h by alice
"
        );
        assert_eq!(text.stderr, "");
    }

    #[test]
    fn services_table_of_several_machines_with_one_unreachable() {
        let reports = [
            services_report("web1.example.org"),
            Report {
                machine: "web2".into(),
                outcome: Err(CtlError::remote(
                    "ssh: connect to host web2 port 22: Connection refused",
                )),
            },
        ];
        let text = render_text(&Action::List(ListWhat::Services), &reports, &view(true));
        assert_eq!(
            text.stdout,
            "\
MACHINE           SERVICE         STATE   DEPLOYED      BEHIND  SINCE   INFO
web1.example.org  nginx           OK      0123456789ab  0       3m ago  -
web1.example.org  grafana-server  FREEZE  -             -       2h ago  frozen for 2h by alice
web2              -               ERROR   -             -       -       ssh: connect to host web2 port 22: Connection refused
"
        );
        assert_eq!(exit_code(&reports), 1);
    }

    #[test]
    fn a_local_failure_goes_to_stderr() {
        let reports = [Report {
            machine: "here".into(),
            outcome: Err(CtlError::Refused {
                status: 404,
                message: "no service \"x\" on this machine".into(),
            }),
        }];
        let text = render_text(&parse("status x").action, &reports, &view(false));
        assert_eq!(text.stdout, "");
        assert_eq!(text.stderr, "plumbctl: no service \"x\" on this machine\n");
        assert_eq!(exit_code(&reports), 1);
    }

    #[test]
    fn status_lines_are_aligned() {
        let mut s = status("nginx", "FREEZE");
        s.info = "frozen by alice".into();
        s.frozen = true;
        s.frozen_until = Some(NOW + 3600);
        let reports = [Report {
            machine: "web1".into(),
            outcome: Ok(Body::Status(s)),
        }];
        let text = render_text(&parse("status nginx").action, &reports, &view(false));
        assert_eq!(
            text.stdout,
            "\
service:       nginx
machine:       web1
state:         FREEZE
info:          frozen by alice
since:         2023-11-14T23:13:20+01:00 (3m ago)
upstream:      https://git.example.org/ops.git
branch:        main
deployed:      0123456789abcdef0123456789abcdef01234567
upstream head: fedcba9876543210fedcba9876543210fedcba98
behind:        0
frozen:        until 2023-11-15T00:16:20+01:00 (in 1h)
dir:           /etc/nginx <- nginx/etc (ro)
last apply:    ok 0123456789ab 2023-11-14T23:13:50+01:00 (2m ago): reloaded
"
        );
    }

    #[test]
    fn status_of_several_machines() {
        let mut s = status("nginx", "OK");
        s.dirs.clear();
        s.last_apply = None;
        s.deployed = None;
        s.upstream_head = None;
        s.behind = None;
        let reports = [
            Report {
                machine: "web1".into(),
                outcome: Ok(Body::Status(s)),
            },
            Report {
                machine: "web2".into(),
                outcome: Err(CtlError::remote("Connection refused")),
            },
        ];
        let text = render_text(&parse("status nginx").action, &reports, &view(true));
        assert_eq!(
            text.stdout,
            "\
host:          web1
service:       nginx
machine:       web1
state:         OK
since:         2023-11-14T23:13:20+01:00 (3m ago)
upstream:      https://git.example.org/ops.git
branch:        main
deployed:      -
upstream head: -
behind:        -
frozen:        no

host:  web2
error: Connection refused
"
        );
    }

    #[test]
    fn action_results() {
        let reports = [
            Report {
                machine: "web1".into(),
                outcome: Ok(Body::Action(proto::ActionResult {
                    action: "freeze".into(),
                    ok: true,
                    message: "frozen until 2023-11-14T23:16:20Z".into(),
                    status: status("nginx", "FREEZE"),
                })),
            },
            Report {
                machine: "web22".into(),
                outcome: Ok(Body::Action(proto::ActionResult {
                    action: "freeze".into(),
                    ok: false,
                    message: "already frozen".into(),
                    status: status("nginx", "FREEZE"),
                })),
            },
        ];
        let action = parse("freeze nginx 1h").action;
        assert_eq!(
            render_text(&action, &reports[..1], &view(false)).stdout,
            "\
SERVICE  RESULT  STATE   MESSAGE
nginx    ok      FREEZE  frozen until 2023-11-15T00:16:20+01:00 (in 1h)
"
        );
        assert_eq!(exit_code(&reports[..1]), 0);
        assert_eq!(
            render_text(&action, &reports, &view(true)).stdout,
            "\
MACHINE  SERVICE  RESULT  STATE   MESSAGE
web1     nginx    ok      FREEZE  frozen until 2023-11-15T00:16:20+01:00 (in 1h)
web22    nginx    FAILED  FREEZE  already frozen
"
        );
        assert_eq!(exit_code(&reports), 1);
    }

    #[test]
    fn machines_and_audit_tables() {
        let reports = [Report {
            machine: "web1".into(),
            outcome: Ok(Body::Machines(proto::Machines {
                this: vec!["web1".into(), "frontend".into()],
                machines: vec![
                    proto::MachineEntry {
                        machine: "db1".into(),
                        services: vec!["postgresql".into()],
                    },
                    proto::MachineEntry {
                        machine: "web1".into(),
                        services: vec!["nginx".into(), "grafana-server".into()],
                    },
                ],
            })),
        }];
        assert_eq!(
            render_text(&parse("list machines").action, &reports, &view(false)).stdout,
            "\
NAME  THIS  SERVICES
db1   -     postgresql
web1  yes   nginx, grafana-server
"
        );
        let reports = [
            Report {
                machine: "web1".into(),
                outcome: Ok(Body::Audit(vec![
                    proto::AuditEntry {
                        id: 0,
                        time: NOW,
                        uid: 1000,
                        user: "alice".into(),
                        action: "freeze".into(),
                        service: Some("nginx".into()),
                        arguments: serde_json::json!({"duration": "1h"}),
                        result: "ok".into(),
                    },
                    proto::AuditEntry {
                        id: 0,
                        time: NOW + 5,
                        uid: 1001,
                        user: String::new(),
                        action: "pull".into(),
                        service: None,
                        arguments: Value::Null,
                        result: "refused: not in group plumb".into(),
                    },
                ])),
            },
            Report {
                machine: "db1".into(),
                outcome: Err(CtlError::remote("Permission denied (publickey).")),
            },
        ];
        assert_eq!(
            render_text(&Action::Log { limit: None }, &reports, &view(true)).stdout,
            "\
MACHINE  TIME                       USER   ACTION  SERVICE  RESULT                       ARGUMENTS
web1     2023-11-14T23:16:20+01:00  alice  freeze  nginx    ok                           {\"duration\":\"1h\"}
web1     2023-11-14T23:16:25+01:00  1001   pull    -        refused: not in group plumb  -
db1      -                          -      -       -        -                            error: Permission denied (publickey).
"
        );
    }

    #[test]
    fn json_is_one_array_of_envelopes() {
        let reports = [
            services_report("web1"),
            Report {
                machine: "web2".into(),
                outcome: Err(CtlError::remote("unreachable")),
            },
        ];
        let doc: Vec<Envelope> = serde_json::from_str(&render_json(&reports)).unwrap();
        assert_eq!(doc.len(), 2);
        assert!(doc[0].ok && doc[0].error.is_none());
        let services: proto::Services =
            serde_json::from_value(doc[0].result.clone().unwrap()).unwrap();
        assert_eq!(services.services[1].service, "grafana-server");
        assert_eq!(
            doc[1],
            Envelope {
                machine: "web2".into(),
                ok: false,
                result: None,
                error: Some("unreachable".into()),
                detail: None,
            }
        );
        let raw: Value = serde_json::from_str(&render_json(&reports[1..])).unwrap();
        assert_eq!(
            raw,
            serde_json::json!([{"machine": "web2", "ok": false, "error": "unreachable"}])
        );
    }

    #[test]
    fn remote_answers() {
        let action = Action::List(ListWhat::Services);
        let out = |code, stdout: &str, stderr: &str| exec::Output {
            code,
            stdout: stdout.into(),
            stderr: stderr.into(),
        };
        let body = render_json(&[services_report("remote-name")]);
        assert_eq!(
            parse_remote(&action, &out(Some(0), &body, "")).unwrap(),
            services_report("x").outcome.unwrap()
        );
        let refused = r#"[{"machine":"m","ok":false,"error":"no service \"x\""}]"#;
        let err = parse_remote(&action, &out(Some(1), refused, "")).unwrap_err();
        assert_eq!(err.to_string(), "no service \"x\"");
        let err = parse_remote(
            &action,
            &out(
                Some(255),
                "",
                "ssh: connect to host h port 22: Connection refused\r\n",
            ),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "ssh: connect to host h port 22: Connection refused"
        );
        let err = parse_remote(&action, &out(Some(127), "", "")).unwrap_err();
        assert_eq!(err.to_string(), "ssh exited with status 127 and no answer");
        let err = parse_remote(
            &action,
            &out(
                Some(0),
                r#"[{"machine":"m","ok":true,"result":{"x":1}}]"#,
                "",
            ),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("unexpected answer:"), "{err}");
    }

    #[test]
    fn relative_times() {
        assert_eq!(relative(100, 100), "0s ago");
        assert_eq!(relative(100, 41), "59s ago");
        assert_eq!(relative(1000, 820), "3m ago");
        assert_eq!(relative(10_000, 10_000 - 3599), "59m ago");
        assert_eq!(relative(100_000, 100_000 - 7200), "2h ago");
        assert_eq!(relative(100_000, 100_000 + 5340), "in 1h29m");
        assert_eq!(relative(1_000_000, 1_000_000 - 3 * 86_400 - 5), "3d ago");
        assert_eq!(
            relative(1_000_000, 1_000_000 + 2 * 86_400 + 5 * 3600),
            "in 2d5h"
        );
        assert_eq!(relative(100, 280), "in 3m");
    }

    #[test]
    fn times_are_local_rfc3339_with_their_offset() {
        let clock = view(false).clock;
        assert_eq!(clock.local(NOW), "2023-11-14T23:16:20+01:00");
        assert_eq!(
            clock.when(NOW + 5340),
            "2023-11-15T00:45:20+01:00 (in 1h29m)"
        );
        let utc = Clock {
            now: 0,
            zone: TimeZone::UTC,
        };
        assert_eq!(utc.local(951_782_400), "2000-02-29T00:00:00+00:00");
        // No calendar holds it: the number, never a panic.
        assert_eq!(utc.local(u64::MAX), "18446744073709551615 (unix time)");
    }

    #[test]
    fn the_daemons_utc_times_are_shown_local_and_relative() {
        let clock = view(false).clock;
        assert_eq!(
            clock.localize("frozen until 2023-11-15T00:46:20Z; unfreeze to follow upstream"),
            "frozen until 2023-11-15T01:46:20+01:00 (in 2h30m); unfreeze to follow upstream"
        );
        for unchanged in [
            "",
            "no times here",
            "2023-11-15T00:46:20 has no zone",
            "9999-99-99T99:99:99Z is no time",
            "ünïcode 2023-11-15",
        ] {
            assert_eq!(clock.localize(unchanged), unchanged);
        }
    }

    #[test]
    fn ssh_banners_become_one_line_and_a_detail() {
        let banner = "\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
Host key verification failed.\r
";
        let (line, detail) = ssh_said(banner).unwrap();
        assert_eq!(line, "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!");
        let detail = detail.unwrap();
        assert!(detail.starts_with("@@@@"), "{detail}");
        assert!(
            detail.ends_with("Host key verification failed."),
            "{detail}"
        );
        let routine = "** WARNING: connection is not using a post-quantum key exchange algorithm.\n\
                       Warning: Permanently added 'web1' (ED25519) to the list of known hosts.\n\
                       Permission denied (publickey).\n";
        assert_eq!(
            ssh_said(routine).unwrap().0,
            "Permission denied (publickey)."
        );
        assert_eq!(
            ssh_said("ssh: connect to host h port 22: Connection refused\r\n").unwrap(),
            (
                "ssh: connect to host h port 22: Connection refused".to_owned(),
                None
            )
        );
        assert_eq!(ssh_said(" \n\n"), None);

        // One line in the table, all of it with --verbose, and in the JSON's detail.
        let output = exec::Output {
            code: Some(255),
            stdout: String::new(),
            stderr: banner.to_owned(),
        };
        let action = parse("list services").action;
        let reports = [Report {
            machine: "web2".into(),
            outcome: parse_remote(&action, &output).map(|_| unreachable!()),
        }];
        let table = render_text(&action, &reports, &view(true)).stdout;
        assert_eq!(
            table.lines().nth(1).unwrap(),
            "web2     -        ERROR  -         -       -      \
             WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! (more with --verbose)"
        );
        assert_eq!(table.lines().count(), 2, "{table}");
        let verbose = View {
            verbose: true,
            ..view(true)
        };
        let table = render_text(&action, &reports, &verbose).stdout;
        assert!(
            table.contains("\nweb2:\n  @@@@")
                && table.contains("\n  Host key verification failed.\n"),
            "{table}"
        );
        let doc: Vec<Envelope> = serde_json::from_str(&render_json(&reports)).unwrap();
        assert_eq!(
            doc[0].error.as_deref(),
            Some("WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!")
        );
        assert_eq!(doc[0].detail.as_deref(), Some(detail.as_str()));
        // A remote plumbctl's detail comes through another hop unchanged.
        let hop = exec::Output {
            code: Some(1),
            stdout: render_json(&reports),
            stderr: String::new(),
        };
        let again = parse_remote(&action, &hop).unwrap_err();
        assert_eq!(again.detail(), Some(detail.as_str()));
    }
}
