//! The push webhook: `POST /v1/hooks/push` on the metrics listener makes the upstreams its payload
//! names (any of the repository's URLs; every upstream when none matches) fetch now rather than at
//! their next tick. Only signed requests count: GitHub's and Gitea/Forgejo's
//! HMAC-SHA256 of the body, or GitLab's token header, with the configured shared secret. A
//! delivery id seen before is refused (replay). Accepted hooks make at most one fetch a second: a
//! hook within a second of the last one is answered at once and its fetch deferred to the end of
//! that second (several such hooks share it), so a flood cannot turn into a flood of fetches and a
//! burst of pushes never loses its last one. Answers at once; the fetch runs in the daemon's loop.
//! Signatures are checked with the `hmac` crate (`verify_slice`, constant time) on hex decoded by
//! the `hex` crate. Every request is counted in `plumb_webhook_total` by its [`RESULTS`], a body
//! too large to read (413) included.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::daemon::Handle;

/// Why a hook was refused; each is a status and a counted result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("no signature header (X-Hub-Signature-256, X-Gitea-Signature or X-Gitlab-Token)")]
    Unsigned,
    #[error("bad signature")]
    BadSignature,
    #[error("delivery {0} was seen before")]
    Replayed(String),
    /// The body was refused before it was read: larger than the listener takes (413), or cut off.
    #[error("{0}")]
    Body(String, StatusCode),
}

/// Every `result` label of `plumb_webhook_total`, each exported from the start at 0.
pub const RESULTS: [&str; 7] = [
    "ok",
    "deferred",
    "unsigned",
    "bad_signature",
    "replayed",
    "too_large",
    "unreadable",
];

/// What an accepted hook does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admitted {
    /// Makes the fetch due now.
    Now,
    /// Makes it due after this long, the end of the second since the last accepted hook.
    After(Duration),
    /// Joins a deferred fetch asked for already.
    Joined,
}

impl Admitted {
    /// The `result` label of `plumb_webhook_total`.
    fn label(self) -> &'static str {
        match self {
            Admitted::Now => "ok",
            Admitted::After(_) | Admitted::Joined => "deferred",
        }
    }
}

impl HookError {
    fn status(&self) -> StatusCode {
        match self {
            HookError::Unsigned | HookError::BadSignature => StatusCode::UNAUTHORIZED,
            HookError::Replayed(_) => StatusCode::CONFLICT,
            HookError::Body(_, status) => *status,
        }
    }

    /// The `result` label of `plumb_webhook_total`.
    pub fn label(&self) -> &'static str {
        match self {
            HookError::Unsigned => "unsigned",
            HookError::BadSignature => "bad_signature",
            HookError::Replayed(_) => "replayed",
            HookError::Body(_, StatusCode::PAYLOAD_TOO_LARGE) => "too_large",
            HookError::Body(..) => "unreadable",
        }
    }
}

/// Checks a request's signature against `secret`; returns the delivery id, if the host sent one.
pub fn verify(headers: &HeaderMap, body: &[u8], secret: &str) -> Result<Option<String>, HookError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let delivery = [
        "x-github-delivery",
        "x-gitea-delivery",
        "x-gitlab-event-uuid",
    ]
    .iter()
    .find_map(|h| header(h))
    .map(str::to_owned);
    let (mac, given) = if let Some(token) = header("x-gitlab-token") {
        // GitLab sends the secret itself. Comparing the HMACs of both under the secret makes the
        // comparison `verify_slice`'s constant-time one, and hides the secret's length too.
        (
            hmac(secret, token.as_bytes()),
            hmac(secret, secret.as_bytes())
                .finalize()
                .into_bytes()
                .to_vec(),
        )
    } else {
        let hex = match (header("x-hub-signature-256"), header("x-gitea-signature")) {
            (Some(sig), _) => sig.strip_prefix("sha256=").ok_or(HookError::BadSignature)?,
            (None, Some(sig)) => sig,
            (None, None) => return Err(HookError::Unsigned),
        };
        let given = hex::decode(hex).map_err(|_| HookError::BadSignature)?;
        (hmac(secret, body), given)
    };
    mac.verify_slice(&given)
        .map(|()| delivery)
        .map_err(|_| HookError::BadSignature)
}

/// HMAC-SHA256 of `data` under `secret`, ready to verify or finalize.
fn hmac(secret: &str, data: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(data);
    mac
}

/// The webhook's state: secret, recent deliveries, the rate limit, the way into the daemon.
pub struct Hook {
    secret: String,
    handle: Handle,
    seen: Mutex<Seen>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// What the webhook remembers between requests.
#[derive(Default)]
struct Seen {
    /// The last deliveries' ids, oldest first.
    deliveries: VecDeque<String>,
    /// When the last fetch was asked for (now, or at the end of a deferral).
    last: Option<Instant>,
    /// A deferred fetch is waiting for its time.
    deferred: bool,
    /// The repositories of the hooks waiting for it (`None`: one named none, so every upstream).
    waiting: Option<Vec<String>>,
}

/// Deliveries remembered for replay detection.
const REMEMBERED: usize = 1024;
/// At most one fetch asked for by hooks per this long; later hooks in the window defer theirs.
const MIN_GAP: Duration = Duration::from_secs(1);

impl Hook {
    pub fn new(
        secret: String,
        handle: Handle,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Arc<Hook> {
        if let Some(m) = &metrics {
            m.hook_results(&RESULTS);
        }
        Arc::new(Hook {
            secret,
            handle,
            seen: Mutex::new(Seen::default()),
            metrics,
        })
    }

    /// Checks a hook and decides when its fetch runs; returns that and the repositories its payload
    /// names (read only once the signature holds).
    fn admit(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: Instant,
    ) -> Result<(Admitted, Vec<String>), HookError> {
        let delivery = verify(headers, body, &self.secret)?;
        let repositories = repositories(body);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = &delivery
            && seen.deliveries.contains(d)
        {
            return Err(HookError::Replayed(d.clone()));
        }
        if let Some(d) = delivery {
            if seen.deliveries.len() == REMEMBERED {
                seen.deliveries.pop_front();
            }
            seen.deliveries.push_back(d);
        }
        // An empty list names no repository: the fetch is for every upstream.
        let named = (!repositories.is_empty()).then(|| repositories.clone());
        let admitted = match seen.last.map(|last| last + MIN_GAP) {
            _ if seen.deferred => {
                seen.waiting = match (seen.waiting.take(), named) {
                    (Some(mut all), Some(more)) => {
                        all.extend(more);
                        Some(all)
                    }
                    _ => None,
                };
                Admitted::Joined
            }
            Some(due) if due > now => {
                seen.deferred = true;
                seen.waiting = named;
                Admitted::After(due - now)
            }
            _ => {
                seen.last = Some(now);
                Admitted::Now
            }
        };
        Ok((admitted, repositories))
    }

    /// The deferred fetch's time has come: the next hook starts a new window from now. Returns the
    /// repositories the hooks that waited named (empty: every upstream).
    fn deferral_ended(&self) -> Vec<String> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.deferred = false;
        seen.last = Some(Instant::now());
        seen.waiting.take().unwrap_or_default()
    }
}

/// The repository URLs a push payload names: GitHub's and Gitea/Forgejo's `repository` (clone,
/// ssh, git and web URLs), GitLab's `project` and `repository`. None for a body that is not JSON
/// (GitHub's form encoding) or names none.
pub fn repositories(body: &[u8]) -> Vec<String> {
    const FIELDS: [&str; 10] = [
        "clone_url",
        "ssh_url",
        "git_url",
        "html_url",
        "url",
        "git_http_url",
        "git_ssh_url",
        "http_url",
        "web_url",
        "homepage",
    ];
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut urls = Vec::new();
    for object in ["repository", "project"] {
        for field in FIELDS {
            if let Some(url) = payload[object][field].as_str()
                && !url.is_empty()
                && !urls.iter().any(|u| u == url)
            {
                urls.push(url.to_owned());
            }
        }
    }
    urls
}

/// `POST /v1/hooks/push`. The body comes as a `Result` so that one refused before it is read (over
/// axum's default limit of 2 MiB: 413) is counted as every other answer is.
pub async fn push(
    State(hook): State<Arc<Hook>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> (StatusCode, String) {
    let result = body
        .map_err(|e| HookError::Body(e.body_text(), e.status()))
        .and_then(|body| hook.admit(&headers, &body, Instant::now()));
    if let Some(m) = &hook.metrics {
        m.hook(match &result {
            Ok((a, _)) => a.label(),
            Err(e) => e.label(),
        });
    }
    match result {
        Ok((Admitted::Now, repositories)) => match hook.handle.poke(repositories).await {
            Ok(_) => (StatusCode::ACCEPTED, "fetching\n".to_owned()),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        Ok((Admitted::After(wait), _)) => {
            let deferred = hook.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let repositories = deferred.deferral_ended();
                if let Err(e) = deferred.handle.poke(repositories).await {
                    tracing::warn!("push webhook: deferred fetch: {e}");
                }
            });
            (
                StatusCode::ACCEPTED,
                format!("fetching in {} ms\n", wait.as_millis()),
            )
        }
        Ok((Admitted::Joined, _)) => (
            StatusCode::ACCEPTED,
            "fetching with the deferred fetch\n".to_owned(),
        ),
        Err(e) => {
            tracing::warn!("push webhook refused: {e}");
            (e.status(), format!("{e}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn signatures_by_host() {
        let secret = "0123456789abcdef";
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(b"{}");
        let good = hex::encode(mac.finalize().into_bytes());
        let mut bad = good.clone().into_bytes();
        bad[0] = if bad[0] == b'0' { b'1' } else { b'0' };
        let bad = String::from_utf8(bad).unwrap();
        let gh = headers(&[
            ("x-hub-signature-256", &format!("sha256={good}")),
            ("x-github-delivery", "d1"),
        ]);
        assert_eq!(verify(&gh, b"{}", secret), Ok(Some("d1".into())));
        assert_eq!(verify(&gh, b"{ }", secret), Err(HookError::BadSignature));
        let gitea = headers(&[("x-gitea-signature", &good)]);
        assert_eq!(verify(&gitea, b"{}", secret), Ok(None));
        let wrong = headers(&[("x-gitea-signature", &bad)]);
        assert_eq!(verify(&wrong, b"{}", secret), Err(HookError::BadSignature));
        let gitlab = headers(&[("x-gitlab-token", secret)]);
        assert_eq!(verify(&gitlab, b"anything", secret), Ok(None));
        let gitlab = headers(&[("x-gitlab-token", "0123456789abcdeX")]);
        assert_eq!(
            verify(&gitlab, b"anything", secret),
            Err(HookError::BadSignature)
        );
        assert_eq!(
            verify(&HeaderMap::new(), b"{}", secret),
            Err(HookError::Unsigned)
        );
        let odd = headers(&[("x-hub-signature-256", "sha256=abc")]);
        assert_eq!(verify(&odd, b"{}", secret), Err(HookError::BadSignature));
        let not_hex = headers(&[("x-gitea-signature", &good.replace(|_| true, "z"))]);
        assert_eq!(
            verify(&not_hex, b"{}", secret),
            Err(HookError::BadSignature)
        );
        let short = headers(&[("x-gitea-signature", &good[..62])]);
        assert_eq!(verify(&short, b"{}", secret), Err(HookError::BadSignature));
        let prefix = headers(&[("x-gitlab-token", &secret[..15])]);
        assert_eq!(verify(&prefix, b"{}", secret), Err(HookError::BadSignature));
    }

    #[test]
    fn hooks_within_a_second_defer_one_fetch_and_replays_are_refused() {
        let secret = "0123456789abcdef";
        let (handle, _commands) = crate::daemon::channel();
        let hook = Hook::new(secret.to_owned(), handle, None);
        let signed = |delivery: &str| {
            headers(&[
                ("x-gitlab-token", secret),
                ("x-gitlab-event-uuid", delivery),
            ])
        };
        let x = br#"{"repository":{"clone_url":"https://h/x"}}"#;
        let y = br#"{"repository":{"clone_url":"git@h:y.git"}}"#;
        let when = |delivery: &str, body: &[u8], now: Instant| {
            hook.admit(&signed(delivery), body, now).map(|(a, _)| a)
        };
        let t0 = Instant::now();
        assert_eq!(
            hook.admit(&signed("a"), x, t0),
            Ok((Admitted::Now, vec!["https://h/x".to_owned()]))
        );
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!(
            when("b", x, t1),
            Ok(Admitted::After(Duration::from_millis(700)))
        );
        let t2 = t0 + Duration::from_millis(600);
        assert_eq!(when("c", y, t2), Ok(Admitted::Joined));
        assert_eq!(when("b", b"{}", t2), Err(HookError::Replayed("b".into())));
        assert_eq!(hook.deferral_ended(), vec!["https://h/x", "git@h:y.git"]);
        let later = Instant::now() + MIN_GAP;
        assert_eq!(when("d", b"{}", later), Ok(Admitted::Now));
        // A hook naming no repository in the deferral makes it a fetch of every upstream.
        let t3 = later + Duration::from_millis(10);
        assert_eq!(
            when("e", x, t3),
            Ok(Admitted::After(Duration::from_millis(990)))
        );
        assert_eq!(when("f", b"{}", t3), Ok(Admitted::Joined));
        assert!(hook.deferral_ended().is_empty());
    }

    #[test]
    fn the_repositories_a_payload_names() {
        let github = br#"{"ref":"refs/heads/main","repository":{"clone_url":"https://github.com/o/r.git","ssh_url":"git@github.com:o/r.git","html_url":"https://github.com/o/r"}}"#;
        assert_eq!(
            repositories(github),
            vec![
                "https://github.com/o/r.git",
                "git@github.com:o/r.git",
                "https://github.com/o/r"
            ]
        );
        let gitlab = br#"{"project":{"git_http_url":"https://gl/o/r.git","git_ssh_url":"git@gl:o/r.git"},"repository":{"url":"git@gl:o/r.git"}}"#;
        assert_eq!(
            repositories(gitlab),
            vec!["git@gl:o/r.git", "https://gl/o/r.git"]
        );
        assert!(repositories(b"payload=%7B%7D").is_empty());
        assert!(repositories(br#"{"repository":{"clone_url":3}}"#).is_empty());
    }
}
