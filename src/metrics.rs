//! Prometheus metrics: what a fleet's rollout looks like from the outside. The daemon's actor
//! updates them as its state changes; the metrics listener renders them in the text format.
//!
//! `plumb_service_hash{service,machine,hash}` has exactly one series per service, the deployed
//! revision; the series of the previous hash is removed when it changes, so a query over the fleet
//! counts machines per hash without stale rows.
//!
//! The per-service series are one row of plain values per service (`Services`), turned into
//! series only while a scrape renders them, one family at a time: the `prometheus` crate's
//! labelled children each keep their own copy of the metric's description and labels, ~21 of
//! them a service, about 11 KB of private memory a service at 1,000 services, and building every
//! series of a scrape at once left ~5 MB more in glibc's heap (bench/RESULTS.md).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio_util::sync::CancellationToken;

use crate::git::Oid;
use crate::service::{self, State};

/// Every metric plumb exports, in one registry.
pub struct Metrics {
    registry: Registry,
    fetch_total: IntCounterVec,
    upstream_up: IntGaugeVec,
    fetch_duration: HistogramVec,
    webhook_total: IntCounterVec,
    config_ok: IntGauge,
    services: Arc<Services>,
}

/// The `result`s of `plumb_apply_total`.
const APPLY_RESULTS: [&str; 2] = ["ok", "error"];

/// The `reason`s of `plumb_refused_total`: every [`service::Refusal::reason`], and `health` for
/// an automatic rollback.
pub const REFUSAL_REASONS: [&str; 6] = [
    "check",
    "hostile",
    "signature",
    "history",
    "known",
    "health",
];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with every plumb metric and `plumb_build_info` set.
    pub fn new() -> Arc<Metrics> {
        // The `expect`s below are on constants: the names, help texts and label names are literals
        // here, each registered once, so they cannot fail at run time (a unit test builds it all).
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let fetch_duration = HistogramVec::new(
            HistogramOpts::new(
                "plumb_git_fetch_duration_seconds",
                "Time one fetch of an upstream took.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
            ]),
            &["upstream"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(fetch_duration.clone()))
            .expect("unique metric");
        let build = gauge(
            "plumb_build_info",
            "The running plumb's version.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let config_ok = IntGauge::new(
            "plumb_config_last_reload_successful",
            "1 when the config file last read was accepted, 0 while it is refused (the daemon and the generator keep the last accepted one).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(config_ok.clone()))
            .expect("unique metric");
        config_ok.set(1);
        let services = Arc::new(Services::default());
        Arc::new(Metrics {
            config_ok,
            fetch_total: counter(
                "plumb_git_fetch_total",
                "Fetches of an upstream, by result.",
                &["upstream", "result"],
            ),
            upstream_up: gauge(
                "plumb_upstream_up",
                "1 when the last fetch of the upstream succeeded, 0 while it fails (the services keep their state and files).",
                &["upstream"],
            ),
            webhook_total: counter(
                "plumb_webhook_total",
                "Push webhooks received, by result (ok, deferred, unsigned, bad_signature, replayed, too_large, unreadable).",
                &["result"],
            ),
            fetch_duration,
            services,
            registry,
        })
    }

    /// Brings one service's series in line with its state and its rollout `wave`. A service seen
    /// for the first time gets its counters at 0, so a query over them has a series before the
    /// first apply or refusal (`increase` needs one).
    pub fn service(
        &self,
        name: &str,
        machine: &str,
        wave: u32,
        s: &service::Service,
        behind: Option<u64>,
    ) {
        let seen = Seen {
            machine: machine.to_owned(),
            wave,
            hash: s.deployed(),
            state: s.state(),
            waiting: s.waiting().is_some(),
            changed_at: s.changed_at(),
            last_sync: s.last_sync(),
            behind,
            frozen: s.frozen(),
            noop: s.noop(),
        };
        self.services.row(name, |row| row.seen = Some(seen));
    }

    /// Forgets a service that is no longer configured here.
    pub fn forget(&self, name: &str) {
        self.services.rows().remove(name);
    }

    /// Forgets an upstream no service here uses any more, so its `plumb_upstream_up` does not
    /// stay at its last value.
    pub fn forget_upstream(&self, upstream: &str) {
        let _ = self.upstream_up.remove_label_values(&[upstream]);
    }

    /// One fetch of `upstream` (already without credentials).
    pub fn fetched(&self, upstream: &str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.fetch_total
            .with_label_values(&[upstream, result])
            .inc();
        self.fetch_duration
            .with_label_values(&[upstream])
            .observe(took.as_secs_f64());
        self.upstream_up
            .with_label_values(&[upstream])
            .set(i64::from(ok));
    }

    /// Whether the config file last read was accepted.
    pub fn config_accepted(&self, ok: bool) {
        self.config_ok.set(i64::from(ok));
    }

    /// Gives `plumb_webhook_total` its `results` at 0: the webhook is on.
    pub fn hook_results(&self, results: &[&str]) {
        for result in results {
            self.webhook_total.with_label_values(&[result]);
        }
    }

    /// One push webhook's fate.
    pub fn hook(&self, result: &str) {
        self.webhook_total.with_label_values(&[result]).inc();
    }

    /// One apply's outcome.
    pub fn applied(&self, service: &str, ok: bool) {
        self.services
            .row(service, |row| row.applies[usize::from(!ok)] += 1);
    }

    /// A head or revision the service did not keep; `reason` is one of [`REFUSAL_REASONS`].
    pub fn refused(&self, service: &str, reason: &str) {
        // Every reason is one of them (a test says so); an unknown one would have no series.
        if let Some(i) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
            self.services.row(service, |row| row.refused[i] += 1);
        }
    }

    /// The text exposition format, as `/metrics` serves it: the registry's metrics, then the
    /// services' families, each built, written and dropped before the next, so that a scrape of
    /// 1,000 services holds one family's series at a time, not all ~21,000.
    pub fn render(&self) -> String {
        let encoder = TextEncoder::new();
        let mut out = Vec::new();
        let mut result = encoder.encode(&self.registry.gather(), &mut out);
        for family in 0..FAMILIES.len() {
            let family = self.services.family(family);
            if result.is_ok() && !family.get_metric().is_empty() {
                result = encoder.encode(std::slice::from_ref(&family), &mut out);
            }
        }
        if let Err(e) = result {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The per-service series: one [`Row`] per service, rendered into series when scraped.
#[derive(Default)]
struct Services {
    rows: Mutex<BTreeMap<String, Row>>,
}

/// One service's values behind its series.
#[derive(Default)]
struct Row {
    /// What [`Metrics::service`] said last; `None` while only a counter moved.
    seen: Option<Seen>,
    /// `plumb_apply_total` by [`APPLY_RESULTS`].
    applies: [u64; APPLY_RESULTS.len()],
    /// `plumb_refused_total` by [`REFUSAL_REASONS`].
    refused: [u64; REFUSAL_REASONS.len()],
}

/// A service's state as its gauges show it.
struct Seen {
    machine: String,
    wave: u32,
    hash: Option<Oid>,
    state: State,
    waiting: bool,
    changed_at: Option<u64>,
    last_sync: Option<u64>,
    behind: Option<u64>,
    frozen: bool,
    noop: bool,
}

/// A per-service metric: name, help and type, in [`FAMILIES`] order, which [`Services::family`]
/// indexes by the constants below it (its labels are the ones `family` gives it).
struct Family(&'static str, &'static str, MetricType);

const FAMILIES: [Family; 11] = [
    Family(
        "plumb_service_hash",
        "The deployed revision of each service: one series per service, value 1.",
        MetricType::GAUGE,
    ),
    Family(
        "plumb_service_state",
        "1 for the service's current state, 0 for the others.",
        MetricType::GAUGE,
    ),
    Family(
        "plumb_service_rollout_waiting",
        "1 while a new revision waits for the lower rollout waves (or for Prometheus to say they soaked).",
        MetricType::GAUGE,
    ),
    Family(
        "plumb_service_wave_info",
        "The service's rollout wave on this machine (the config's wave, 0 without): one series, value 1, to group machines by wave.",
        MetricType::GAUGE,
    ),
    Family(
        "plumb_service_change_timestamp_seconds",
        "When the deployed revision last changed (unix time).",
        MetricType::GAUGE,
    ),
    Family(
        "plumb_service_behind_commits",
        "Commits on the branch after the deployed revision that change the service's files.",
        MetricType::GAUGE,
    ),
    Family(
        "plumb_service_frozen",
        "1 while the service does not track upstream (freeze or rollback).",
        MetricType::GAUGE,
    ),
    Family(
        "plumb_service_noop",
        "1 while the service only reports what it would deploy (noop mode).",
        MetricType::GAUGE,
    ),
    Family(
        "plumb_service_last_sync_success_timestamp_seconds",
        "When a fetch and deploy of the service last both succeeded (unix time).",
        MetricType::GAUGE,
    ),
    Family(
        "plumb_apply_total",
        "Applies of a deployed revision to its unit, by result.",
        MetricType::COUNTER,
    ),
    Family(
        "plumb_refused_total",
        "Revisions a service did not keep, by reason (check, health, signature, history, hostile, known).",
        MetricType::COUNTER,
    ),
];

const HASH: usize = 0;
const STATE: usize = 1;
const WAITING: usize = 2;
const WAVE: usize = 3;
const CHANGED: usize = 4;
const BEHIND: usize = 5;
const FROZEN: usize = 6;
const NOOP: usize = 7;
const LAST_SYNC: usize = 8;
const APPLIES: usize = 9;
const REFUSED: usize = 10;

impl Services {
    fn rows(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Row>> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the row of `name`, made with its counters at 0 when there was none.
    fn row(&self, name: &str, change: impl FnOnce(&mut Row)) {
        let mut rows = self.rows();
        match rows.get_mut(name) {
            Some(row) => change(row),
            None => change(rows.entry(name.to_owned()).or_default()),
        }
    }

    /// Every row's series of the [`FAMILIES`] entry `wanted`.
    fn family(&self, wanted: usize) -> MetricFamily {
        let Family(name, help, kind) = &FAMILIES[wanted];
        let mut family = MetricFamily::default();
        family.set_name((*name).to_owned());
        family.set_help((*help).to_owned());
        family.set_field_type(*kind);
        let mut add = |which: usize, labels: &[(&str, &str)], value: f64| {
            if which == wanted {
                family.mut_metric().push(series(*kind, labels, value));
            }
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        for (name, row) in self.rows().iter() {
            let service = ("service", name.as_str());
            for (result, n) in APPLY_RESULTS.iter().zip(row.applies) {
                add(APPLIES, &[("result", result), service], n as f64);
            }
            for (reason, n) in REFUSAL_REASONS.iter().zip(row.refused) {
                add(REFUSED, &[("reason", reason), service], n as f64);
            }
            let Some(seen) = &row.seen else { continue };
            let machine = ("machine", seen.machine.as_str());
            if let Some(hash) = seen.hash.filter(|_| wanted == HASH) {
                add(HASH, &[("hash", &hash.to_string()), machine, service], 1.0);
            }
            for state in State::ALL {
                let value = flag(seen.state == state);
                add(STATE, &[machine, service, ("state", state.as_str())], value);
            }
            add(WAITING, &[machine, service], flag(seen.waiting));
            if wanted == WAVE {
                add(
                    WAVE,
                    &[machine, service, ("wave", &seen.wave.to_string())],
                    1.0,
                );
            }
            if let Some(t) = seen.changed_at {
                add(CHANGED, &[service], t as f64);
            }
            if let Some(n) = seen.behind {
                add(BEHIND, &[service], n as f64);
            }
            add(FROZEN, &[service], flag(seen.frozen));
            add(NOOP, &[service], flag(seen.noop));
            if let Some(t) = seen.last_sync {
                add(LAST_SYNC, &[service], t as f64);
            }
        }
        family
    }
}

/// One series: `labels` in the order given (sorted by name, as the crate's own metrics have them).
fn series(kind: MetricType, labels: &[(&str, &str)], value: f64) -> proto::Metric {
    let labels = labels
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect();
    let mut metric = proto::Metric::from_label(labels);
    if kind == MetricType::COUNTER {
        let mut c = proto::Counter::default();
        c.set_value(value);
        metric.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        metric.set_gauge(g);
    }
    metric
}

/// Serves `GET /metrics` (and the push webhook when there is one) on `listener` until `shutdown`,
/// connections limited as [`crate::listener::METRICS`] says.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    hook: Option<Arc<crate::hook::Hook>>,
    shutdown: CancellationToken,
) {
    use axum::http::header;
    let hooks = match hook {
        Some(h) => axum::Router::new()
            .route("/v1/hooks/push", axum::routing::post(crate::hook::push))
            .with_state(h),
        None => axum::Router::new(),
    };
    let app = hooks.route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    m.render(),
                )
            }
        }),
    );
    crate::listener::serve("metrics", listener, app, crate::listener::METRICS, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::Oid;

    /// A service that deployed revision `n` (as head `n`) at time 100.
    fn deployed(n: u8) -> service::Service {
        service::Service::deployed_at(Oid::from_bytes(&[n; 20]).unwrap(), 100)
    }

    #[test]
    fn an_upstream_is_up_after_a_good_fetch_down_after_a_bad_one_and_gone_when_forgotten() {
        let m = Metrics::new();
        let up = |m: &Metrics| {
            m.render()
                .lines()
                .find_map(|l| l.strip_prefix("plumb_upstream_up{upstream=\"git://h/r\"} "))
                .map(str::to_owned)
        };
        m.fetched("git://h/r", true, Duration::from_millis(1));
        assert_eq!(up(&m).as_deref(), Some("1"));
        m.fetched("git://h/r", false, Duration::from_millis(1));
        assert_eq!(up(&m).as_deref(), Some("0"));
        m.forget_upstream("git://h/r");
        assert_eq!(up(&m), None);
    }

    #[test]
    fn one_hash_series_per_service_and_one_state_set() {
        let m = Metrics::new();
        m.service("nginx", "web1", 0, &deployed(1), Some(0));
        m.service("nginx", "web1", 0, &deployed(2), Some(0));
        let text = m.render();
        let hashes: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("plumb_service_hash{"))
            .collect();
        assert_eq!(hashes.len(), 1, "{text}");
        assert!(hashes[0].contains(&"02".repeat(20)), "{text}");
        assert!(
            text.contains("plumb_service_state{machine=\"web1\",service=\"nginx\",state=\"OK\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "plumb_service_state{machine=\"web1\",service=\"nginx\",state=\"DIFF\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("plumb_service_rollout_waiting{machine=\"web1\",service=\"nginx\"} 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "plumb_service_wave_info{machine=\"web1\",service=\"nginx\",wave=\"0\"} 1"
            ),
            "{text}"
        );
        // Another wave after a reload: one series, the new one.
        m.service("nginx", "web1", 2, &deployed(2), Some(0));
        let text = m.render();
        let waves: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("plumb_service_wave_info{"))
            .collect();
        assert_eq!(
            waves,
            ["plumb_service_wave_info{machine=\"web1\",service=\"nginx\",wave=\"2\"} 1"]
        );
        assert!(text.contains("plumb_build_info{version="), "{text}");
        // Times of day follow Prometheus' naming, `*_timestamp_seconds`, every one of them.
        let times: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP "))
            .filter(|l| l.contains("(unix time)"))
            .map(|l| l.split(' ').next().unwrap_or(l))
            .collect();
        assert_eq!(times.len(), 2, "{text}");
        for name in times {
            assert!(name.ends_with("_timestamp_seconds"), "{name}");
        }
        m.forget("nginx");
        assert!(!m.render().contains("service=\"nginx\""));
    }

    #[test]
    fn counters_are_at_zero_before_their_first_event() {
        let m = Metrics::new();
        m.service("nginx", "web1", 0, &deployed(1), None);
        let text = m.render();
        for line in [
            "plumb_apply_total{result=\"ok\",service=\"nginx\"} 0",
            "plumb_apply_total{result=\"error\",service=\"nginx\"} 0",
            "plumb_refused_total{reason=\"check\",service=\"nginx\"} 0",
            "plumb_refused_total{reason=\"health\",service=\"nginx\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        m.applied("nginx", false);
        m.service("nginx", "web1", 0, &deployed(1), None);
        assert!(
            m.render()
                .contains("plumb_apply_total{result=\"error\",service=\"nginx\"} 1"),
            "seeing the service again leaves its counters alone"
        );
        // Every reason a refusal is counted under is one exported at 0.
        for why in [
            service::Refusal::Check(String::new()),
            service::Refusal::Hostile(String::new()),
            service::Refusal::Unverified(String::new()),
            service::Refusal::Rewritten(String::new()),
            service::Refusal::Known,
        ] {
            assert!(REFUSAL_REASONS.contains(&why.reason()), "{why:?}");
        }
        assert!(
            !text.contains("plumb_webhook_total{"),
            "no webhook, no series"
        );
        // A count for a service whose state was not reported yet: its counters, no state.
        m.applied("other", true);
        let text = m.render();
        assert!(
            text.contains("plumb_apply_total{result=\"ok\",service=\"other\"} 1"),
            "{text}"
        );
        let of_other = |prefix: &str| {
            text.lines()
                .any(|l| l.starts_with(prefix) && l.contains("service=\"other\""))
        };
        assert!(!of_other("plumb_service_"), "{text}");
        m.hook_results(&["ok", "too_large"]);
        assert!(
            m.render()
                .contains("plumb_webhook_total{result=\"too_large\"} 0")
        );
    }
}
