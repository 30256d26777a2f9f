//! The push webhook: `POST /v1/hooks/push` on the metrics listener makes every upstream fetch now
//! rather than at its next tick. Only signed requests count: GitHub's and Gitea/Forgejo's
//! HMAC-SHA256 of the body, or GitLab's token header, with the configured shared secret. A
//! delivery id seen before is refused (replay), and accepted hooks are rate-limited so a flood
//! cannot turn into a flood of fetches. Answers at once; the fetch runs in the daemon's loop.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::daemon::{Command, Handle};

/// Why a hook was refused; each is a status and a counted result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("no signature header (X-Hub-Signature-256, X-Gitea-Signature or X-Gitlab-Token)")]
    Unsigned,
    #[error("bad signature")]
    BadSignature,
    #[error("delivery {0} was seen before")]
    Replayed(String),
    #[error("too many hooks; the next fetch is already due")]
    RateLimited,
}

impl HookError {
    fn status(&self) -> StatusCode {
        match self {
            HookError::Unsigned | HookError::BadSignature => StatusCode::UNAUTHORIZED,
            HookError::Replayed(_) => StatusCode::CONFLICT,
            HookError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The `result` label of `plumb_webhook_total`.
    pub fn label(&self) -> &'static str {
        match self {
            HookError::Unsigned => "unsigned",
            HookError::BadSignature => "bad_signature",
            HookError::Replayed(_) => "replayed",
            HookError::RateLimited => "rate_limited",
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
    if let Some(token) = header("x-gitlab-token") {
        return constant_time_eq(token.as_bytes(), secret.as_bytes())
            .then_some(delivery)
            .ok_or(HookError::BadSignature);
    }
    let hex = match (header("x-hub-signature-256"), header("x-gitea-signature")) {
        (Some(sig), _) => sig.strip_prefix("sha256=").ok_or(HookError::BadSignature)?,
        (None, Some(sig)) => sig,
        (None, None) => return Err(HookError::Unsigned),
    };
    let given = decode_hex(hex).ok_or(HookError::BadSignature)?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| HookError::BadSignature)?;
    mac.update(body);
    mac.verify_slice(&given)
        .map(|()| delivery)
        .map_err(|_| HookError::BadSignature)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The webhook's state: secret, recent deliveries, the rate limit, the way into the daemon.
pub struct Hook {
    secret: String,
    handle: Handle,
    seen: Mutex<(VecDeque<String>, Option<Instant>)>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Deliveries remembered for replay detection.
const REMEMBERED: usize = 1024;
/// At most one accepted hook per this long; later ones in the window are refused (the fetch the
/// first one asked for is already due).
const MIN_GAP: Duration = Duration::from_secs(1);

impl Hook {
    pub fn new(
        secret: String,
        handle: Handle,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Arc<Hook> {
        Arc::new(Hook {
            secret,
            handle,
            seen: Mutex::new((VecDeque::new(), None)),
            metrics,
        })
    }

    fn admit(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), HookError> {
        let delivery = verify(headers, body, &self.secret)?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = &delivery
            && seen.0.contains(d)
        {
            return Err(HookError::Replayed(d.clone()));
        }
        let now = Instant::now();
        if seen
            .1
            .is_some_and(|last| now.duration_since(last) < MIN_GAP)
        {
            return Err(HookError::RateLimited);
        }
        seen.1 = Some(now);
        if let Some(d) = delivery {
            if seen.0.len() == REMEMBERED {
                seen.0.pop_front();
            }
            seen.0.push_back(d);
        }
        Ok(())
    }
}

/// `POST /v1/hooks/push`.
pub async fn push(
    State(hook): State<Arc<Hook>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let result = hook.admit(&headers, &body);
    if let Some(m) = &hook.metrics {
        m.hook(result.as_ref().err().map_or("ok", HookError::label));
    }
    match result {
        Ok(()) => match hook.handle.call(Command::Poke).await {
            Ok(_) => (StatusCode::ACCEPTED, "fetching\n".to_owned()),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
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
        let good: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
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
    }
}
