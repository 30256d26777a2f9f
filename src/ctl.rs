//! `plumbctl`, the operator's client of the control API: what it asks, of which machines, and how the
//! answers are shown.
//!
//! Without `@host` arguments it speaks HTTP/1.1 to the local daemon's unix socket. With them it runs
//! `ssh <host> plumbctl --json <the same words>` for each host at once and merges the answers, so
//! reaching another machine is the user's own OpenSSH (config, agent, known_hosts, ProxyJump) and
//! authorisation is the remote account's unix groups on the remote socket: plumb holds no keys.
//!
//! The HTTP client is hand-written on purpose: one request per connection, `Connection: close`, a
//! `Content-Length` body out and a `Content-Length` or chunked body back. That is all the API needs,
//! it is blocking (a CLI does one thing at a time), and it keeps hyper and its runtime out of the
//! client binary.
//!
//! # `--json` schema
//!
//! One JSON document: an array with one object per machine asked, in the order given (one object,
//! for this machine, without `@host`):
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
//! `result.ok: false`. `error` is a message for people. The exit code is 0 when every machine
//! answered and every write succeeded, 1 otherwise, 2 for a usage error.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::exec;
use crate::proto;

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
/// machines (`@host`, through ssh).
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
    /// Print one JSON document: an array of {"machine", "ok", "result" | "error"}.
    #[arg(long, global = true)]
    pub json: bool,
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
    /// What the next pull would change in the service's files.
    Diff {
        /// The service: its unit name as in the config ("nginx", "docker-compose@caddy").
        service: String,
    },
    /// Show the audit log: every write, allowed or refused.
    Log,
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
    #[error("cannot reach plumb at {}: {source}{hint}", socket.display())]
    Connect {
        socket: PathBuf,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or timed out during the exchange.
    #[error("talking to plumb at {}: {source}", socket.display())]
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
    /// A remote machine could not be asked, or answered with an error.
    #[error("{0}")]
    Remote(String),
    /// No async runtime for the ssh children.
    #[error("cannot start the runtime for ssh: {0}")]
    Runtime(#[source] std::io::Error),
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
}

impl Settings {
    /// `--socket`, else `PLUMB_SOCKET`, else [`DEFAULT_SOCKET`]; `PLUMBCTL_SSH` and
    /// `PLUMBCTL_REMOTE`.
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
            Action::Log => vec!["log"],
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
            Action::Log => (Route::Audit, "", None),
        };
        ApiRequest {
            method: route.method(),
            path: route.path(&encode_segment(service)),
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
            | Action::Wipe { .. } => Body::Action(serde_json::from_value(value)?),
            Action::Diff { .. } => Body::Diff(serde_json::from_value(value)?),
            Action::Log => Body::Audit(serde_json::from_value(value)?),
        })
    }

    fn timeout(&self) -> Duration {
        match self {
            Action::List(_) | Action::Status { .. } | Action::Diff { .. } | Action::Log => {
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
                outcome: Err(CtlError::Remote(format!("internal error: {e}"))),
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
                " (is plumb running? --socket or PLUMB_SOCKET name another socket)"
            }
            std::io::ErrorKind::PermissionDenied => {
                " (this account is not in a group allowed to use the socket)"
            }
            _ => "",
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

/// Reads a whole HTTP/1.1 answer (the server closed the connection after it): the status, and the
/// body by `Content-Length`, chunked encoding, or up to the end.
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let end = find(raw, b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers are not UTF-8")?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad header line: {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length: {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
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

fn decode_chunked(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n").ok_or("chunk size line cut short")?;
        let line = std::str::from_utf8(&raw[..line_end]).map_err(|_| "bad chunk size line")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = raw.get(..size).ok_or("chunk cut short")?;
        body.extend_from_slice(chunk);
        raw = raw.get(size + 2..).ok_or("chunk cut short")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The ssh command line for asking `host`: program and arguments. The remote command is quoted for
/// the remote shell word by word, since ssh joins its words with spaces.
pub fn ssh_command(settings: &Settings, host: &str, action: &Action) -> (String, Vec<String>) {
    let mut words = settings.ssh.iter();
    let program = words.next().cloned().unwrap_or_else(|| "ssh".to_owned());
    let mut args: Vec<String> = words.cloned().collect();
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
        .map_err(|e| CtlError::Remote(e.to_string()))?;
    parse_remote(action, &output)
}

/// Reads what a remote `plumbctl --json` printed. Its JSON is believed whatever the exit code (1
/// means refused, and the reason is in the JSON); without JSON, ssh or the remote shell failed and
/// the error is what they said on stderr.
pub fn parse_remote(action: &Action, output: &exec::Output) -> Result<Body, CtlError> {
    if let Ok(envelopes) = serde_json::from_str::<Vec<Envelope>>(&output.stdout)
        && let Some(envelope) = envelopes.into_iter().next()
    {
        return match (envelope.ok, envelope.result) {
            (true, Some(result)) => action
                .decode(result)
                .map_err(|e| CtlError::Remote(format!("unexpected answer: {e}"))),
            _ => Err(CtlError::Remote(
                envelope
                    .error
                    .unwrap_or_else(|| "failed without a message".to_owned()),
            )),
        };
    }
    let said: Vec<&str> = output
        .stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Err(CtlError::Remote(if said.is_empty() {
        match output.code {
            Some(code) => format!("ssh exited with status {code} and no answer"),
            None => "ssh was killed by a signal".to_owned(),
        }
    } else {
        said.join("; ")
    }))
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
            },
            Err(e) => Envelope {
                machine: r.machine.clone(),
                ok: false,
                result: None,
                error: Some(e.to_string()),
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

/// Renders `reports` for people at time `now` (unix seconds). `with_machine` (set when hosts were
/// given) adds a MACHINE column and shows a failed machine as a row; without it, a failure goes to
/// stderr.
pub fn render_text(action: &Action, reports: &[Report], with_machine: bool, now: u64) -> Text {
    let mut text = Text::default();
    let mut shown: Vec<&Report> = Vec::new();
    for r in reports {
        match &r.outcome {
            Err(e) if !with_machine => text.stderr.push_str(&format!("plumbctl: {e}\n")),
            _ => shown.push(r),
        }
    }
    if shown.is_empty() {
        return text;
    }
    text.stdout = match action {
        Action::Status { .. } => status_blocks(&shown, with_machine, now),
        _ => table_for(action, &shown, now).render(with_machine),
    };
    text
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

fn table_for(action: &Action, reports: &[&Report], now: u64) -> Table {
    let (header, state_column): (Vec<&'static str>, Option<usize>) = match action {
        Action::List(ListWhat::Machines) => (vec!["NAME", "THIS", "SERVICES"], None),
        Action::List(ListWhat::Services) | Action::Status { .. } => (
            vec!["SERVICE", "STATE", "DEPLOYED", "BEHIND", "SINCE", "INFO"],
            Some(1),
        ),
        Action::Log => (
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
                error_row(header.len(), state_column, &e.to_string()),
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
                    rows.push((machine.clone(), service_row(status, now)));
                }
            }
            Ok(Body::Status(status)) => rows.push((machine, service_row(status, now))),
            Ok(Body::Action(result)) => rows.push((
                machine,
                vec![
                    result.status.service.clone(),
                    if result.ok { "ok" } else { "FAILED" }.to_owned(),
                    result.status.state.clone(),
                    result.message.clone(),
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
                            rfc3339(entry.time),
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

fn service_row(s: &proto::ServiceStatus, now: u64) -> Vec<String> {
    vec![
        s.service.clone(),
        s.state.clone(),
        s.deployed.as_deref().map(short).unwrap_or("-").to_owned(),
        s.behind.map_or_else(|| "-".to_owned(), |b| b.to_string()),
        ago(now, s.since),
        {
            let said: Vec<&str> = std::iter::once(s.info.as_str())
                .chain(s.notes.iter().map(String::as_str))
                .filter(|t| !t.is_empty())
                .collect();
            if said.is_empty() {
                "-".to_owned()
            } else {
                said.join("; ")
            }
        },
    ]
}

/// A hash cut to 12 characters for tables.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// `status`: one block of aligned `key: value` lines per machine, blank lines between them.
fn status_blocks(reports: &[&Report], with_machine: bool, now: u64) -> String {
    let mut blocks = Vec::new();
    for r in reports {
        let mut kv: Vec<(&str, String)> = Vec::new();
        if with_machine {
            kv.push(("host", r.machine.clone()));
        }
        match &r.outcome {
            Err(e) => kv.push(("error", e.to_string())),
            Ok(Body::Status(s)) => status_lines(s, now, &mut kv),
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

fn status_lines(s: &proto::ServiceStatus, now: u64, kv: &mut Vec<(&'static str, String)>) {
    let dash = |v: Option<&String>| v.cloned().unwrap_or_else(|| "-".to_owned());
    let when = |t: u64| format!("{} ({})", rfc3339(t), ago(now, t));
    kv.push(("service", s.service.clone()));
    kv.push(("machine", s.machine.clone()));
    kv.push(("state", s.state.clone()));
    if !s.info.is_empty() {
        kv.push(("info", s.info.clone()));
    }
    for note in &s.notes {
        kv.push(("note", note.clone()));
    }
    kv.push(("since", when(s.since)));
    kv.push(("upstream", s.upstream.clone()));
    kv.push(("branch", s.branch.clone()));
    kv.push(("deployed", dash(s.deployed.as_ref())));
    kv.push(("upstream head", dash(s.upstream_head.as_ref())));
    kv.push((
        "behind",
        s.behind.map_or_else(|| "-".to_owned(), |b| b.to_string()),
    ));
    match s.frozen_until {
        Some(t) => kv.push(("frozen until", when(t))),
        None if s.state == "FREEZE" => kv.push(("frozen until", "unfrozen".to_owned())),
        None => {}
    }
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
            format!(": {}", a.message)
        };
        kv.push((
            "last apply",
            format!("{outcome} {} {}{message}", short(&a.revision), when(a.time)),
        ));
    }
}

/// `t` relative to `now`: "12s ago", "3m ago", "5h ago", "2d ago", or "in 3m" for a future time.
pub fn ago(now: u64, t: u64) -> String {
    let (delta, future) = if t > now {
        (t - now, true)
    } else {
        (now - t, false)
    };
    let amount = match delta {
        d if d < 60 => format!("{d}s"),
        d if d < 3600 => format!("{}m", d / 60),
        d if d < 86_400 => format!("{}h", d / 3600),
        d => format!("{}d", d / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

/// Unix seconds as UTC RFC 3339 ("2024-02-29T13:05:09Z"), without a date crate.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01. Works in 400-year eras (146 097 days each,
/// the calendar's full cycle) counted from 0000-03-01, so that the leap day falls at the end of
/// each shifted year; months are counted from March for the same reason.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // 719 468 days from 0000-03-01 to 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    // Years of the era: a leap day every 4 years (1460 days), none every 100 (36524), one every
    // 400 (the era's last day, 146096).
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: 153 days per 5 months (31+30+31+30+31).
    let month_index = (5 * day_of_year + 2) / 153; // [0, 11]
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
            "freeze nginx",
            "freeze nginx 90m",
            "unfreeze nginx",
            "rollback nginx 0123abcd",
            "pull nginx",
            "pull nginx --force",
            "log",
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
        let r = parse("status a/b%c").action.request();
        assert_eq!(
            (r.method, r.path.as_str()),
            ("GET", "/v1/services/a%2Fb%25c")
        );
        assert_eq!(parse("log").action.request().path, "/v1/audit");
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
    }

    fn status(service: &str, state: &str) -> proto::ServiceStatus {
        proto::ServiceStatus {
            service: service.into(),
            machine: "web1".into(),
            state: state.into(),
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
            false,
            NOW,
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
                outcome: Err(CtlError::Remote(
                    "ssh: connect to host web2 port 22: Connection refused".into(),
                )),
            },
        ];
        let text = render_text(&Action::List(ListWhat::Services), &reports, true, NOW);
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
        let text = render_text(&parse("status x").action, &reports, false, NOW);
        assert_eq!(text.stdout, "");
        assert_eq!(text.stderr, "plumbctl: no service \"x\" on this machine\n");
        assert_eq!(exit_code(&reports), 1);
    }

    #[test]
    fn status_lines_are_aligned() {
        let mut s = status("nginx", "FREEZE");
        s.info = "frozen by alice".into();
        s.frozen_until = Some(NOW + 3600);
        let reports = [Report {
            machine: "web1".into(),
            outcome: Ok(Body::Status(s)),
        }];
        let text = render_text(&parse("status nginx").action, &reports, false, NOW);
        assert_eq!(
            text.stdout,
            "\
service:       nginx
machine:       web1
state:         FREEZE
info:          frozen by alice
since:         2023-11-14T22:13:20Z (3m ago)
upstream:      https://git.example.org/ops.git
branch:        main
deployed:      0123456789abcdef0123456789abcdef01234567
upstream head: fedcba9876543210fedcba9876543210fedcba98
behind:        0
frozen until:  2023-11-14T23:16:20Z (in 1h)
dir:           /etc/nginx <- nginx/etc (ro)
last apply:    ok 0123456789ab 2023-11-14T22:13:50Z (2m ago): reloaded
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
                outcome: Err(CtlError::Remote("Connection refused".into())),
            },
        ];
        let text = render_text(&parse("status nginx").action, &reports, true, NOW);
        assert_eq!(
            text.stdout,
            "\
host:          web1
service:       nginx
machine:       web1
state:         OK
since:         2023-11-14T22:13:20Z (3m ago)
upstream:      https://git.example.org/ops.git
branch:        main
deployed:      -
upstream head: -
behind:        -

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
            render_text(&action, &reports[..1], false, NOW).stdout,
            "\
SERVICE  RESULT  STATE   MESSAGE
nginx    ok      FREEZE  frozen until 2023-11-14T23:16:20Z
"
        );
        assert_eq!(exit_code(&reports[..1]), 0);
        assert_eq!(
            render_text(&action, &reports, true, NOW).stdout,
            "\
MACHINE  SERVICE  RESULT  STATE   MESSAGE
web1     nginx    ok      FREEZE  frozen until 2023-11-14T23:16:20Z
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
            render_text(&parse("list machines").action, &reports, false, NOW).stdout,
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
                outcome: Err(CtlError::Remote("Permission denied (publickey).".into())),
            },
        ];
        assert_eq!(
            render_text(&Action::Log, &reports, true, NOW).stdout,
            "\
MACHINE  TIME                  USER   ACTION  SERVICE  RESULT                       ARGUMENTS
web1     2023-11-14T22:16:20Z  alice  freeze  nginx    ok                           {\"duration\":\"1h\"}
web1     2023-11-14T22:16:25Z  1001   pull    -        refused: not in group plumb  -
db1      -                     -      -       -        -                            error: Permission denied (publickey).
"
        );
    }

    #[test]
    fn json_is_one_array_of_envelopes() {
        let reports = [
            services_report("web1"),
            Report {
                machine: "web2".into(),
                outcome: Err(CtlError::Remote("unreachable".into())),
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
                error: Some("unreachable".into())
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
        assert_eq!(ago(100, 100), "0s ago");
        assert_eq!(ago(100, 41), "59s ago");
        assert_eq!(ago(1000, 820), "3m ago");
        assert_eq!(ago(10_000, 10_000 - 3599), "59m ago");
        assert_eq!(ago(100_000, 100_000 - 7200), "2h ago");
        assert_eq!(ago(1_000_000, 1_000_000 - 3 * 86_400 - 5), "3d ago");
        assert_eq!(ago(100, 280), "in 3m");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(86_399), "1970-01-01T23:59:59Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z"); // a 400-year leap day
        assert_eq!(rfc3339(951_868_800), "2000-03-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_211_909), "2024-02-29T13:05:09Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_107_542_400), "2100-03-01T00:00:00Z"); // 2100 has no Feb 29
        assert_eq!(rfc3339(4_107_456_000), "2100-02-28T00:00:00Z");
    }

    #[test]
    fn civil_dates_agree_with_counting_days() {
        // Walks day by day from 1970 to 2400 with a plain calendar and compares every date.
        let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
        for days in 0..(430 * 366) {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let month_len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > month_len {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
