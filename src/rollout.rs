//! Rollout waves: whether a machine in a later wave may take a revision, judged by what
//! Prometheus already knows of the machines in the lower waves.
//!
//! A machine in wave N > 0 deploys revision X of a service only once every machine running the
//! same service from the same upstream and branch in a lower wave has been on X and OK for the
//! service's `soak`, without a break. The building of the queries and the reading of the answers
//! are pure (unit-tested here); [`Wave::judge`] asks Prometheus's HTTP API (`/api/v1/query`) on
//! the deploy job's blocking thread, with a timeout.
//!
//! The gate query returns one series per lower machine, `1` when it was soaked, `0` when not:
//!
//! ```text
//! min_over_time((
//!     max by (machine) (max_over_time(plumb_service_hash{service="s",hash="X",machine=~"a|b"}[2L]))
//!   * on (machine)
//!     min by (machine) (min_over_time(plumb_service_state{service="s",state="OK",machine=~"a|b"}[2L]))
//!   or label_replace(vector(0), "machine", "a", "", "")
//!   or label_replace(vector(0), "machine", "b", "", "")
//! )[S+L:L])
//! ```
//!
//! evaluated at every scrape interval `L` over the soak `S` (and one step more): a step counts when the machine had a
//! sample on X in the two scrape intervals before it and every state sample there was OK. A step
//! without samples (Prometheus down, the daemon not scraped for more than two scrape intervals)
//! falls back to the machine's `0`, so a gap breaks the soak instead of being bridged by
//! Prometheus's five-minute lookback; the earliest step is at or before now - soak, and has a
//! sample on X and OK at most two scrape intervals before it, so the machine must have been on X
//! and OK at now - soak already. Only series with `hash="X"` are read, so
//! stale series of older revisions do not block. When the gate is closed a second query (the
//! current hash and state of each lower machine) names who blocks and why.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{self, Config};
use crate::error;
use crate::git::{self, Oid};
use crate::service;

/// How long one query to Prometheus may take at most, whatever the poll interval.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest timeout a query gets, however short the poll interval: a loaded Prometheus
/// evaluating a soak's subquery over many machines needs some time even when it is well.
pub const MIN_QUERY_TIMEOUT: Duration = Duration::from_millis(500);

/// How long one query may take when the daemon polls every `interval`: a quarter of it, within
/// [`MIN_QUERY_TIMEOUT`] and [`QUERY_TIMEOUT`], so a Prometheus that hangs cannot hold an
/// upstream's deploy job for much of a poll (the job asks at most once while it hangs, see
/// [`Asked`]).
pub fn query_timeout(interval: Duration) -> Duration {
    (interval / 4).clamp(MIN_QUERY_TIMEOUT, QUERY_TIMEOUT)
}

/// The largest answer read from Prometheus (the answers hold a few series per machine).
const MAX_ANSWER: u64 = 4 << 20;

/// What gates one service on this machine: its wave, its soak, the machines of the lower waves,
/// and the Prometheus that knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wave {
    pub prometheus: config::PrometheusSettings,
    pub service: String,
    pub wave: u32,
    pub soak: Duration,
    /// (wave, machine) of every machine in a lower wave, lowest wave first.
    pub lower: Vec<(u32, String)>,
    /// How long one query may take ([`query_timeout`] of the poll interval in use).
    pub timeout: Duration,
}

/// Why the gate is closed for a revision: the note the service shows, and where each lower
/// machine is now (its hash and state), when Prometheus said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// Who blocks, or that Prometheus did not answer, as the service's note says it.
    pub why: String,
    /// Per lower machine, its (hash, state) now; `None` when Prometheus was not asked or did not
    /// answer. A machine that has deployed nothing yet takes the revision they all are on.
    pub now: Option<BTreeMap<String, (String, String)>>,
}

/// What one deploy job run learnt of Prometheus: once a query failed, the rest of the run does
/// not ask that Prometheus again (every waiting service would wait out its own timeout, and the
/// job holds the upstream's other services meanwhile), so a poll costs at most one timeout per
/// upstream. The services it skips get the same note.
#[derive(Debug, Default)]
pub struct Asked {
    /// Per Prometheus URL, the note of its failure in this run.
    failed: BTreeMap<String, String>,
}

/// Why Prometheus could not be asked, or what it answered could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error(transparent)]
    Http(Box<ureq::Error>),
    #[error("{0}")]
    Tls(String),
    #[error("cannot read the bearer token file {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("answered with an error ({kind}): {message}")]
    Query { kind: String, message: String },
    #[error("answered something that is not a query result")]
    Answer(#[source] serde_json::Error),
    #[error("answered a {0} where a vector was expected")]
    NotVector(String),
}

impl Wave {
    /// The wave gate of `s` in `config` for a daemon polling every `interval`, `None` in wave 0
    /// (or without Prometheus).
    pub fn of(config: &Config, s: &config::Service, interval: Duration) -> Option<Wave> {
        if s.wave == 0 {
            return None;
        }
        Some(Wave {
            prometheus: config.settings.prometheus.clone()?,
            service: s.name.clone(),
            wave: s.wave,
            soak: s.soak,
            lower: config.lower_waves(s),
            timeout: query_timeout(interval),
        })
    }

    /// A regex matching exactly the lower machines, for `machine=~`.
    fn machines(&self) -> String {
        let mut names: Vec<&str> = self.lower.iter().map(|(_, m)| m.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let alternatives: Vec<String> = names.into_iter().map(regex_escape).collect();
        alternatives.join("|")
    }

    /// The query whose answer opens the gate for `revision`: per lower machine, 1 when it has been
    /// on `revision` and OK without a break for the soak, 0 when not.
    pub fn gate_query(&self, revision: Oid) -> String {
        let step = self.prometheus.scrape_interval.as_secs().max(1);
        // One step more than the soak: the earliest step is at or before now - soak, so the
        // machine was on the revision then already.
        let range = self.soak.as_secs().max(step) + step;
        let (service, machines) = (string(&self.service), string(&self.machines()));
        let window = 2 * step;
        let mut fallback = String::new();
        let mut seen = Vec::new();
        for (_, m) in &self.lower {
            if !seen.contains(&m) {
                seen.push(m);
                fallback.push_str(&format!(
                    " or label_replace(vector(0), \"machine\", {}, \"\", \"\")",
                    string(&regex_escape(m))
                ));
            }
        }
        format!(
            "min_over_time((max by (machine) (max_over_time(plumb_service_hash{{service={service},hash=\"{revision}\",machine=~{machines}}}[{window}s])) \
             * on (machine) min by (machine) (min_over_time(plumb_service_state{{service={service},state=\"OK\",machine=~{machines}}}[{window}s])){fallback})[{range}s:{step}s])"
        )
    }

    /// The query that says where each lower machine is now: its hash and state (one series each).
    /// Only samples of the last two scrape intervals count: a series the daemon dropped while
    /// Prometheus was not looking (no staleness marker) would otherwise linger for the lookback.
    pub fn now_query(&self) -> String {
        let (service, machines) = (string(&self.service), string(&self.machines()));
        let window = 2 * self.prometheus.scrape_interval.as_secs().max(1);
        format!(
            "max by (machine, hash, state) (last_over_time(plumb_service_hash{{service={service},machine=~{machines}}}[{window}s]) \
             * on (machine) group_left (state) max by (machine, state) (last_over_time(plumb_service_state{{service={service},machine=~{machines}}}[{window}s]) == 1))"
        )
    }

    /// The URL to show: without credentials.
    pub fn shown_url(&self) -> String {
        git::redact_url(&self.prometheus.url)
    }

    /// Asks Prometheus whether `revision` may be deployed here: `Ok(())` when every lower
    /// machine has soaked on it, otherwise why not (who blocks and where each lower machine is,
    /// or that Prometheus did not answer). Within one job run (`asked`), a Prometheus that
    /// failed once is not asked again: the answer is the note of that failure.
    pub fn judge(&self, revision: Oid, asked: &mut Asked) -> Result<(), Closed> {
        let unanswered = |why: String| Closed { why, now: None };
        if let Some(why) = asked.failed.get(&self.prometheus.url) {
            return Err(unanswered(why.clone()));
        }
        let gate = match self.query(&self.gate_query(revision)) {
            Ok(gate) => gate,
            Err(e) => return Err(unanswered(self.failed(&e, asked))),
        };
        let blockers = blockers(&self.lower, &verdicts(&gate));
        if blockers.is_empty() {
            return Ok(());
        }
        let now = match self.query(&self.now_query()) {
            Ok(v) => Some(positions(&v)),
            Err(e) => {
                self.failed(&e, asked);
                None
            }
        };
        Err(Closed {
            why: self.why(revision, &blockers, now.as_ref()),
            now,
        })
    }

    /// The revision every lower machine is on, OK, when they all are on one (`now` as in
    /// [`Closed::now`]): the revision a machine with nothing deployed may take while a newer
    /// one waits. `None` when a lower machine is missing, not OK, or on another revision.
    pub fn common(&self, now: &BTreeMap<String, (String, String)>) -> Option<Oid> {
        let mut common: Option<&str> = None;
        for (_, machine) in &self.lower {
            let (hash, state) = now.get(machine)?;
            if state != "OK" || common.is_some_and(|c| c != hash) {
                return None;
            }
            common = Some(hash);
        }
        // A whole hash only: git2 would read a short one as a prefix padded with zeros.
        common
            .filter(|h| h.len() == 40)
            .and_then(|h| h.parse().ok())
    }

    /// The note for a Prometheus that did not answer, remembered for the rest of the run.
    fn failed(&self, e: &PrometheusError, asked: &mut Asked) -> String {
        let why = format!(
            "waiting: Prometheus at {} did not answer: {}",
            self.shown_url(),
            error::chain(e)
        );
        asked
            .failed
            .insert(self.prometheus.url.clone(), why.clone());
        why
    }

    /// "waiting for wave 0: web1 BROKEN on 3f2a1c5d0e9b; wave 1: web3 not reporting".
    pub fn why(
        &self,
        revision: Oid,
        blockers: &[(u32, String)],
        now: Option<&BTreeMap<String, (String, String)>>,
    ) -> String {
        let x = service::short(Some(revision));
        let soak = humantime::format_duration(self.soak);
        let mut waves: Vec<(u32, Vec<String>)> = Vec::new();
        for (wave, machine) in blockers {
            let why = match now.map(|n| n.get(machine)) {
                None => format!("{machine} not on {x} OK for {soak}"),
                Some(None) => format!("{machine} not reporting"),
                Some(Some((hash, state))) => {
                    let on = hash.get(..12).unwrap_or(hash);
                    if state != "OK" {
                        format!("{machine} {state} on {on}")
                    } else if !revision.to_string().starts_with(hash.as_str()) {
                        format!("{machine} on {on}, not {x}")
                    } else {
                        format!("{machine} not on {x} OK for {soak}")
                    }
                }
            };
            match waves.last_mut() {
                Some((w, list)) if w == wave => list.push(why),
                _ => waves.push((*wave, vec![why])),
            }
        }
        let parts: Vec<String> = waves
            .into_iter()
            .map(|(w, list)| format!("wave {w}: {}", list.join(", ")))
            .collect();
        format!("waiting for {}", parts.join("; "))
    }

    /// One instant query, now.
    fn query(&self, query: &str) -> Result<Vec<Sample>, PrometheusError> {
        let (base, basic) = git::split_credentials(&self.prometheus.url);
        let agent = agent(base.starts_with("https:")).map_err(PrometheusError::Tls)?;
        let mut post = agent.post(format!("{base}/api/v1/query"));
        if let Some(path) = &self.prometheus.bearer_token_file {
            let token = std::fs::read_to_string(path).map_err(|source| PrometheusError::Token {
                path: path.clone(),
                source,
            })?;
            post = post.header("Authorization", format!("Bearer {}", token.trim()));
        } else if let Some(basic) = basic {
            post = post.header("Authorization", basic);
        }
        let mut answer = post
            .config()
            .timeout_global(Some(self.timeout))
            .build()
            .send_form([("query", query)])
            .map_err(|e| PrometheusError::Http(Box::new(e)))?;
        let status = answer.status().as_u16();
        let body = answer
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .lossy_utf8(true)
            .read_to_string()
            .map_err(|e| PrometheusError::Http(Box::new(e)))?;
        parse_answer(status, &body)
    }
}

/// One series of an instant vector: its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct Series {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    /// `[unix time, "value"]`.
    value: (f64, String),
}

/// Reads an answer of `/api/v1/query` (HTTP `status`, JSON `body`) as an instant vector.
pub fn parse_answer(status: u16, body: &str) -> Result<Vec<Sample>, PrometheusError> {
    let answer: Answer = match serde_json::from_str(body) {
        Ok(a) => a,
        Err(_) if !(200..300).contains(&status) => {
            let message: String = body.trim().chars().take(200).collect();
            return Err(PrometheusError::Status { status, message });
        }
        Err(e) => return Err(PrometheusError::Answer(e)),
    };
    if answer.status != "success" {
        return Err(PrometheusError::Query {
            kind: answer.error_type.unwrap_or_default(),
            message: answer.error.unwrap_or_default(),
        });
    }
    let Some(data) = answer.data else {
        return Err(PrometheusError::NotVector("answer without data".into()));
    };
    if data.result_type != "vector" {
        return Err(PrometheusError::NotVector(data.result_type));
    }
    let series: Vec<Series> =
        serde_json::from_value(data.result).map_err(PrometheusError::Answer)?;
    Ok(series
        .into_iter()
        .map(|s| Sample {
            labels: s.metric,
            value: s.value.1.parse().unwrap_or(f64::NAN),
        })
        .collect())
}

/// The gate query's answer per machine: soaked or not. A machine with several series (scraped
/// by two jobs) is soaked when one of them says so.
pub fn verdicts(samples: &[Sample]) -> BTreeMap<String, bool> {
    let mut out: BTreeMap<String, bool> = BTreeMap::new();
    for s in samples {
        if let Some(m) = s.labels.get("machine") {
            *out.entry(m.clone()).or_default() |= s.value == 1.0;
        }
    }
    out
}

/// The lower machines not soaked (absent from the answer counts as not), lowest wave first.
pub fn blockers(lower: &[(u32, String)], verdicts: &BTreeMap<String, bool>) -> Vec<(u32, String)> {
    lower
        .iter()
        .filter(|(_, m)| !verdicts.get(m).copied().unwrap_or(false))
        .cloned()
        .collect()
}

/// The now query's answer: per machine, its (hash, state).
pub fn positions(samples: &[Sample]) -> BTreeMap<String, (String, String)> {
    samples
        .iter()
        .filter_map(|s| {
            let l = |k: &str| s.labels.get(k).cloned();
            Some((l("machine")?, (l("hash")?, l("state")?)))
        })
        .collect()
}

/// `text` as a PromQL double-quoted string.
fn string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `text` matched literally by an RE2 regex (`machine=~`).
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One agent per scheme for the daemon's life (connections kept between queries), with git's
/// TLS ([`git::tls_config`]): rustls on ring and the system's CA roots, read once for both.
fn agent(tls: bool) -> Result<&'static ureq::Agent, String> {
    static PLAIN: OnceLock<Result<ureq::Agent, String>> = OnceLock::new();
    static SECURE: OnceLock<Result<ureq::Agent, String>> = OnceLock::new();
    let build = || {
        git::tls_config(tls).map(|config| {
            ureq::Agent::config_builder()
                .tls_config(config)
                .user_agent(concat!("plumb/", env!("CARGO_PKG_VERSION")))
                .http_status_as_error(false)
                .max_redirects(0)
                .build()
                .new_agent()
        })
    };
    let agent = if tls { &SECURE } else { &PLAIN };
    agent.get_or_init(build).as_ref().map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(n: u8) -> Oid {
        Oid::from_bytes(&[n; 20]).unwrap()
    }

    fn wave() -> Wave {
        Wave {
            prometheus: config::PrometheusSettings {
                url: "http://u:p%40ss@prom:9090".into(),
                bearer_token_file: None,
                scrape_interval: Duration::from_secs(15),
            },
            service: "nginx".into(),
            wave: 2,
            soak: Duration::from_secs(300),
            lower: vec![(0, "web1.example".into()), (1, "web2".into())],
            timeout: query_timeout(Duration::from_secs(1)),
        }
    }

    #[test]
    fn the_gate_query_names_the_machines_the_revision_and_the_soak() {
        let q = wave().gate_query(oid(0xab));
        let x = oid(0xab).to_string();
        assert_eq!(
            q,
            format!(
                "min_over_time((max by (machine) (max_over_time(plumb_service_hash{{service=\"nginx\",hash=\"{x}\",machine=~\"web1\\\\.example|web2\"}}[30s])) \
                 * on (machine) min by (machine) (min_over_time(plumb_service_state{{service=\"nginx\",state=\"OK\",machine=~\"web1\\\\.example|web2\"}}[30s])) \
                 or label_replace(vector(0), \"machine\", \"web1\\\\.example\", \"\", \"\") \
                 or label_replace(vector(0), \"machine\", \"web2\", \"\", \"\"))[315s:15s])"
            )
        );
        let now = wave().now_query();
        assert!(now.contains("group_left (state)"), "{now}");
        assert!(now.contains("last_over_time(plumb_service_hash{service=\"nginx\",machine=~\"web1\\\\.example|web2\"}[30s])"), "{now}");
        assert!(now.contains("== 1"), "{now}");
    }

    #[test]
    fn strings_and_regexes_are_escaped() {
        assert_eq!(string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(regex_escape("a.b|c"), "a\\.b\\|c");
    }

    #[test]
    fn answers_become_verdicts_and_blockers() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"machine":"web1.example"},"value":[1700000000.1,"1"]},
            {"metric":{"machine":"web2"},"value":[1700000000.1,"0"]}]}}"#;
        let samples = parse_answer(200, body).unwrap();
        let v = verdicts(&samples);
        assert_eq!(v.get("web1.example"), Some(&true));
        assert_eq!(blockers(&wave().lower, &v), [(1, "web2".to_owned())]);
        // A machine missing from the answer blocks too.
        let v = verdicts(&samples[..1]);
        assert_eq!(blockers(&wave().lower, &v), [(1, "web2".to_owned())]);
        assert_eq!(
            blockers(&wave().lower, &BTreeMap::new()).len(),
            2,
            "nothing known, nothing opens"
        );
    }

    #[test]
    fn errors_of_prometheus_are_read() {
        let e = parse_answer(
            400,
            r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "answered with an error (bad_data): parse error"
        );
        let e = parse_answer(502, "Bad Gateway").unwrap_err();
        assert_eq!(e.to_string(), "answered HTTP 502: Bad Gateway");
        let e = parse_answer(
            200,
            r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "answered a matrix where a vector was expected"
        );
    }

    #[test]
    fn the_note_names_who_blocks_and_why() {
        let w = wave();
        let x = oid(0xab);
        let blockers = [(0, "web1.example".to_owned()), (1, "web2".to_owned())];
        let mut now = BTreeMap::new();
        now.insert(
            "web1.example".to_owned(),
            (x.to_string(), "BROKEN".to_owned()),
        );
        assert_eq!(
            w.why(x, &blockers, Some(&now)),
            "waiting for wave 0: web1.example BROKEN on abababababab; wave 1: web2 not reporting"
        );
        now.insert("web1.example".to_owned(), (x.to_string(), "OK".to_owned()));
        now.insert("web2".to_owned(), (oid(1).to_string(), "OK".to_owned()));
        assert_eq!(
            w.why(x, &blockers, Some(&now)),
            "waiting for wave 0: web1.example not on abababababab OK for 5m; wave 1: web2 on \
             010101010101, not abababababab"
        );
        assert_eq!(
            w.why(x, &blockers[1..], None),
            "waiting for wave 1: web2 not on abababababab OK for 5m"
        );
    }

    #[test]
    fn credentials_leave_the_url() {
        let (url, auth) = git::split_credentials("http://u:p%40ss@prom:9090/x");
        assert_eq!(url, "http://prom:9090/x");
        assert_eq!(
            auth,
            Some(format!(
                "Basic {}",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "u:p@ss")
            ))
        );
        assert_eq!(git::split_credentials("http://prom:9090").1, None);
        assert_eq!(
            wave().shown_url(),
            git::redact_url("http://u:p%40ss@prom:9090")
        );
    }

    /// A Prometheus that is not there is a note, not a hang.
    #[test]
    fn an_unreachable_prometheus_is_a_note() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut w = wave();
        w.prometheus.url = format!("http://127.0.0.1:{port}");
        let why = w.judge(oid(1), &mut Asked::default()).unwrap_err().why;
        assert!(
            why.starts_with(&format!(
                "waiting: Prometheus at http://127.0.0.1:{port} did not answer: "
            )),
            "{why}"
        );
    }

    /// A Prometheus that takes connections and never answers costs one timeout per job run:
    /// the services after the first get the same note without asking again.
    #[test]
    fn a_hanging_prometheus_is_asked_once_per_run() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut w = wave();
        w.prometheus.url = format!("http://127.0.0.1:{port}");
        assert_eq!(w.timeout, MIN_QUERY_TIMEOUT);
        let mut asked = Asked::default();
        let started = std::time::Instant::now();
        let first = w.judge(oid(1), &mut asked).unwrap_err();
        let second = w.judge(oid(2), &mut asked).unwrap_err();
        let took = started.elapsed();
        assert!(first.why.contains("did not answer"), "{}", first.why);
        assert_eq!(first, second);
        assert!(took < 2 * MIN_QUERY_TIMEOUT, "{took:?}");
        // The kernel took one connection for us: only one was made.
        listener.set_nonblocking(true).unwrap();
        let mut connections = 0;
        while listener.accept().is_ok() {
            connections += 1;
        }
        assert_eq!(connections, 1);
        // A new run asks again.
        let third = w.judge(oid(1), &mut Asked::default()).unwrap_err();
        assert!(third.why.contains("did not answer"), "{}", third.why);
    }

    #[test]
    fn the_timeout_is_a_quarter_of_the_interval_within_bounds() {
        assert_eq!(query_timeout(Duration::from_secs(1)), MIN_QUERY_TIMEOUT);
        assert_eq!(
            query_timeout(Duration::from_secs(20)),
            Duration::from_secs(5)
        );
        assert_eq!(query_timeout(Duration::from_secs(300)), QUERY_TIMEOUT);
    }

    #[test]
    fn the_revision_the_lower_waves_share_is_found_only_when_they_all_are_on_it_ok() {
        let w = wave();
        let (a, b) = (oid(0xa).to_string(), oid(0xb).to_string());
        let at = |list: &[(&str, &str, &str)]| -> BTreeMap<String, (String, String)> {
            list.iter()
                .map(|(m, h, s)| ((*m).to_owned(), ((*h).to_owned(), (*s).to_owned())))
                .collect()
        };
        let both = at(&[("web1.example", &a, "OK"), ("web2", &a, "OK")]);
        assert_eq!(w.common(&both), Some(oid(0xa)));
        // One on another revision, one not OK, one not reporting: nothing shared.
        let split = at(&[("web1.example", &a, "OK"), ("web2", &b, "OK")]);
        assert_eq!(w.common(&split), None);
        let broken = at(&[("web1.example", &a, "OK"), ("web2", &a, "BROKEN")]);
        assert_eq!(w.common(&broken), None);
        let missing = at(&[("web1.example", &a, "OK")]);
        assert_eq!(w.common(&missing), None);
        // A machine of no lower wave does not count.
        let more = at(&[
            ("web1.example", &a, "OK"),
            ("web2", &a, "OK"),
            ("web9", &b, "BROKEN"),
        ]);
        assert_eq!(w.common(&more), Some(oid(0xa)));
        // Not a whole hash: not a revision.
        let short = at(&[("web1.example", &a[..12], "OK"), ("web2", &a[..12], "OK")]);
        assert_eq!(w.common(&short), None);
    }
}
