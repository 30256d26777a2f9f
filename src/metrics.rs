//! Prometheus metrics: what a fleet's rollout looks like from the outside. The daemon's actor
//! updates them as its state changes; the metrics listener renders them in the text format.
//!
//! `plumb_service_hash{service,machine,hash}` has exactly one series per service, the deployed
//! revision; the series of the previous hash is removed when it changes, so a query over the fleet
//! counts machines per hash without stale rows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

use crate::service::{self, State};

/// Every metric plumb exports, in one registry.
pub struct Metrics {
    registry: Registry,
    hash: IntGaugeVec,
    state: IntGaugeVec,
    change_time: GaugeVec,
    behind: IntGaugeVec,
    frozen: IntGaugeVec,
    noop: IntGaugeVec,
    last_sync: GaugeVec,
    apply_total: IntCounterVec,
    fetch_total: IntCounterVec,
    upstream_up: IntGaugeVec,
    fetch_duration: HistogramVec,
    webhook_total: IntCounterVec,
    refused_total: IntCounterVec,
    config_ok: IntGauge,
    rollout_waiting: IntGaugeVec,
    wave: IntGaugeVec,
    /// The machine label each service's state and rollout series carry now, and its wave, so a
    /// change of either (a reload) removes the old ones.
    machines: Mutex<HashMap<String, (String, u32)>>,
    /// The services seen, each with the hash series it has now (machine, hash), so the old one
    /// can be removed.
    services: Mutex<HashMap<String, Option<(String, String)>>>,
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
        let float = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
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
        Arc::new(Metrics {
            config_ok,
            hash: gauge(
                "plumb_service_hash",
                "The deployed revision of each service: one series per service, value 1.",
                &["service", "machine", "hash"],
            ),
            state: gauge(
                "plumb_service_state",
                "1 for the service's current state, 0 for the others.",
                &["service", "machine", "state"],
            ),
            rollout_waiting: gauge(
                "plumb_service_rollout_waiting",
                "1 while a new revision waits for the lower rollout waves (or for Prometheus to say they soaked).",
                &["service", "machine"],
            ),
            wave: gauge(
                "plumb_service_wave_info",
                "The service's rollout wave on this machine (the config's wave, 0 without): one series, value 1, to group machines by wave.",
                &["service", "machine", "wave"],
            ),
            machines: Mutex::new(HashMap::new()),
            change_time: float(
                "plumb_service_change_timestamp_seconds",
                "When the deployed revision last changed (unix time).",
                &["service"],
            ),
            behind: gauge(
                "plumb_service_behind_commits",
                "Commits on the branch after the deployed revision that change the service's files.",
                &["service"],
            ),
            frozen: gauge(
                "plumb_service_frozen",
                "1 while the service does not track upstream (freeze or rollback).",
                &["service"],
            ),
            noop: gauge(
                "plumb_service_noop",
                "1 while the service only reports what it would deploy (noop mode).",
                &["service"],
            ),
            last_sync: float(
                "plumb_service_last_sync_success_timestamp_seconds",
                "When a fetch and deploy of the service last both succeeded (unix time).",
                &["service"],
            ),
            apply_total: counter(
                "plumb_apply_total",
                "Applies of a deployed revision to its unit, by result.",
                &["service", "result"],
            ),
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
            refused_total: counter(
                "plumb_refused_total",
                "Revisions a service did not keep, by reason (check, health, signature, history, hostile, known).",
                &["service", "reason"],
            ),
            fetch_duration,
            services: Mutex::new(HashMap::new()),
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
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let now = s.deployed().map(|d| (machine.to_owned(), d.to_string()));
        let before = match services.get_mut(name) {
            Some(hash) => hash,
            None => {
                for result in APPLY_RESULTS {
                    self.apply_total.with_label_values(&[name, result]);
                }
                for reason in REFUSAL_REASONS {
                    self.refused_total.with_label_values(&[name, reason]);
                }
                services.entry(name.to_owned()).or_default()
            }
        };
        if *before != now {
            if let Some((m, h)) = before.take() {
                let _ = self.hash.remove_label_values(&[name, &m, &h]);
            }
            if let Some((m, h)) = &now {
                self.hash.with_label_values(&[name, m, h]).set(1);
            }
            *before = now;
        }
        let old = self
            .machines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), (machine.to_owned(), wave));
        if let Some((m, w)) = old.filter(|(m, w)| m != machine || *w != wave) {
            self.forget_machine(name, &m, w);
        }
        self.wave
            .with_label_values(&[name, machine, &wave.to_string()])
            .set(1);
        for state in State::ALL {
            self.state
                .with_label_values(&[name, machine, state.as_str()])
                .set(i64::from(s.state() == state));
        }
        self.rollout_waiting
            .with_label_values(&[name, machine])
            .set(i64::from(s.waiting().is_some()));
        if let Some(t) = s.changed_at() {
            self.change_time.with_label_values(&[name]).set(t as f64);
        }
        if let Some(t) = s.last_sync() {
            self.last_sync.with_label_values(&[name]).set(t as f64);
        }
        match behind {
            Some(b) => self
                .behind
                .with_label_values(&[name])
                .set(i64::try_from(b).unwrap_or(i64::MAX)),
            None => {
                let _ = self.behind.remove_label_values(&[name]);
            }
        }
        self.frozen
            .with_label_values(&[name])
            .set(i64::from(s.frozen()));
        self.noop
            .with_label_values(&[name])
            .set(i64::from(s.noop()));
    }

    /// Forgets a service that is no longer configured here.
    pub fn forget(&self, name: &str) {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Some((m, h))) = services.remove(name) {
            let _ = self.hash.remove_label_values(&[name, &m, &h]);
        }
        for result in APPLY_RESULTS {
            let _ = self.apply_total.remove_label_values(&[name, result]);
        }
        for reason in REFUSAL_REASONS {
            let _ = self.refused_total.remove_label_values(&[name, reason]);
        }
        let machine = self
            .machines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some((machine, wave)) = machine {
            self.forget_machine(name, &machine, wave);
        }
        for g in [&self.behind, &self.frozen, &self.noop] {
            let _ = g.remove_label_values(&[name]);
        }
        for g in [&self.change_time, &self.last_sync] {
            let _ = g.remove_label_values(&[name]);
        }
    }

    /// Removes a service's series labelled with `machine` (and `wave`).
    fn forget_machine(&self, name: &str, machine: &str, wave: u32) {
        let _ = self
            .wave
            .remove_label_values(&[name, machine, &wave.to_string()]);
        for state in State::ALL {
            let _ = self
                .state
                .remove_label_values(&[name, machine, state.as_str()]);
        }
        let _ = self.rollout_waiting.remove_label_values(&[name, machine]);
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
        let result = if ok { "ok" } else { "error" };
        self.apply_total.with_label_values(&[service, result]).inc();
    }

    /// A head or revision the service did not keep; `reason` is one of [`REFUSAL_REASONS`].
    pub fn refused(&self, service: &str, reason: &str) {
        self.refused_total
            .with_label_values(&[service, reason])
            .inc();
    }

    /// The text exposition format, as `/metrics` serves it.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
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
        m.hook_results(&["ok", "too_large"]);
        assert!(
            m.render()
                .contains("plumb_webhook_total{result=\"too_large\"} 0")
        );
    }
}
