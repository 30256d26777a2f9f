//! `http://` and `https://`: git's smart HTTP protocol through ureq on rustls.
//!
//! The ref advertisement is `GET <url>/info/refs?service=git-upload-pack`; each round of the
//! negotiation and the pack is a `POST <url>/git-upload-pack` whose body libgit2 writes in pieces
//! and which is sent, whole, when libgit2 first reads the answer. Connections are kept (one TCP
//! and TLS handshake for a fetch's requests) and have `TCP_NODELAY`, so no request waits on
//! Nagle's algorithm and the server's delayed ACK. Credentials in the URL are sent with every
//! request (basic authentication; ureq drops them on a redirect); the CA roots are the system's
//! (`SSL_CERT_FILE`, `SSL_CERT_DIR`, the distribution's bundle), read once, the first time an
//! https upstream is fetched.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream};
use ureq::{Agent, ResponseExt};

use super::{Context, lock, push_refused};
use crate::git::url::http_credentials;

/// What plumb calls itself: a `git/` prefix is what smart-HTTP servers (GitHub among them) look
/// for before they speak the smart protocol.
const USER_AGENT: &str = concat!("git/2.0 (plumb ", env!("CARGO_PKG_VERSION"), ")");

const ADVERTISE: &str = "/info/refs?service=git-upload-pack";
const ADVERTISEMENT: &str = "application/x-git-upload-pack-advertisement";
const RESULT: &str = "application/x-git-upload-pack-result";
const REQUEST: &str = "application/x-git-upload-pack-request";

/// An http(s) subtransport: one per connect of libgit2.
pub(super) struct Http {
    ctx: Arc<Context>,
    /// Where the POSTs go: the repository URL the advertisement came from, after any redirect.
    base: Arc<Mutex<Option<String>>>,
}

impl Http {
    pub fn new(ctx: Arc<Context>) -> Http {
        Http {
            ctx,
            base: Arc::new(Mutex::new(None)),
        }
    }
}

impl SmartSubtransport for Http {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let (url, authorization) = split_credentials(url);
        let request = match action {
            Service::UploadPackLs => Request::Advertisement,
            Service::UploadPack => Request::Pack(Vec::new()),
            Service::ReceivePackLs | Service::ReceivePack => return Err(push_refused()),
        };
        let url = lock(&self.base).clone().unwrap_or(url);
        let agent = agent(url.starts_with("https:") || url.starts_with("HTTPS:"))
            .map_err(|e| git2::Error::from_str(&e))?;
        Ok(Box::new(Exchange {
            ctx: Arc::clone(&self.ctx),
            agent,
            url,
            authorization,
            base: Arc::clone(&self.base),
            request: Some(request),
            response: None,
        }))
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

/// One request and its answer, as one stream for libgit2.
struct Exchange {
    ctx: Arc<Context>,
    agent: &'static Agent,
    /// The repository URL, without credentials and without a trailing `/`.
    url: String,
    /// `Basic ...` from the credentials in the configured URL.
    authorization: Option<String>,
    base: Arc<Mutex<Option<String>>>,
    /// What to send; `None` once sent.
    request: Option<Request>,
    response: Option<ureq::BodyReader<'static>>,
}

enum Request {
    /// `GET info/refs`.
    Advertisement,
    /// `POST git-upload-pack` with the body written so far.
    Pack(Vec<u8>),
}

impl Exchange {
    /// Sends the request and checks the answer's status and type.
    fn send(&mut self, request: Request) -> io::Result<ureq::BodyReader<'static>> {
        self.ctx.check()?;
        let (expected, result) = match request {
            Request::Advertisement => {
                let mut get = self.agent.get(format!("{}{ADVERTISE}", self.url));
                if let Some(auth) = &self.authorization {
                    get = get.header("Authorization", auth);
                }
                let get = get.config().timeout_global(self.ctx.remaining()).build();
                (ADVERTISEMENT, get.call())
            }
            Request::Pack(body) => {
                let mut post = self
                    .agent
                    .post(format!("{}/git-upload-pack", self.url))
                    .header("Content-Type", REQUEST)
                    .header("Accept", RESULT);
                if let Some(auth) = &self.authorization {
                    post = post.header("Authorization", auth);
                }
                let post = post
                    .config()
                    .timeout_global(self.ctx.remaining())
                    // A redirect would turn the POST into a GET: the advertisement's final URL
                    // is where the repository is.
                    .max_redirects(0)
                    .build();
                (RESULT, post.send(&body[..]))
            }
        };
        let response = result.map_err(|e| self.failed(e))?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            401 | 403 => {
                let reason = if self.authorization.is_some() {
                    format!("the server rejected the credentials in the URL (HTTP {status})")
                } else {
                    format!(
                        "the server requires authentication (HTTP {status}); put the credentials in the URL (https://user:token@host/...)"
                    )
                };
                return Err(self.ctx.refuse(reason));
            }
            404 => {
                return Err(io::Error::other(
                    "the server answered 404: no such repository",
                ));
            }
            _ => {
                return Err(io::Error::other(format!(
                    "the server answered HTTP {status}"
                )));
            }
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if !content_type.starts_with(expected) {
            return Err(io::Error::other(format!(
                "the server does not speak git's smart HTTP protocol (it answered {content_type:?}, not {expected})"
            )));
        }
        if expected == ADVERTISEMENT {
            let landed = response.get_uri().to_string();
            if let Some(base) = landed.strip_suffix(ADVERTISE)
                && base != self.url
            {
                tracing::debug!(from = self.url, to = base, "redirected");
                *lock(&self.base) = Some(base.to_owned());
            }
        }
        Ok(response.into_body().into_reader())
    }

    /// An error of ureq as libgit2 will report it; a timeout is the fetch's deadline.
    fn failed(&self, e: ureq::Error) -> io::Error {
        match e {
            ureq::Error::Timeout(_) => self.ctx.timed_out(),
            ureq::Error::Io(e) if super::daemon::is_timeout(&e) => self.ctx.timed_out(),
            ureq::Error::Io(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }
}

impl Read for Exchange {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(request) = self.request.take() {
            self.response = Some(self.send(request)?);
        }
        self.ctx.check()?;
        let Some(body) = self.response.as_mut() else {
            return Ok(0);
        };
        match body.read(buf) {
            Err(e) if super::daemon::is_timeout(&e) => Err(self.ctx.timed_out()),
            other => other.map_err(|e| match e.downcast::<ureq::Error>() {
                Ok(e) => self.failed(e),
                Err(e) => e,
            }),
        }
    }
}

impl Write for Exchange {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.request {
            Some(Request::Pack(body)) => {
                body.extend_from_slice(buf);
                Ok(buf.len())
            }
            _ => Err(io::Error::other(
                "git wrote to a request that takes no body",
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `scheme://user:password@host/path/` -> (`scheme://host/path`, `Basic ...`). Also how the
/// rollout gate asks an `http://user:password@` Prometheus.
pub(crate) fn split_credentials(url: &str) -> (String, Option<String>) {
    let authorization = http_credentials(url)
        .map(|(user, password)| format!("Basic {}", STANDARD.encode(format!("{user}:{password}"))));
    let bare = match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find('/').unwrap_or(rest.len());
            let authority = &rest[..end];
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{}", &rest[end..])
        }
        None => url.to_owned(),
    };
    (bare.trim_end_matches('/').to_owned(), authorization)
}

/// The process's agents: one for http, one for https (created, and its CA roots read, on first
/// use). Kept for the process so connections are reused across a fetch's requests.
fn agent(tls: bool) -> Result<&'static Agent, String> {
    static PLAIN: OnceLock<Agent> = OnceLock::new();
    static SECURE: OnceLock<Result<Agent, String>> = OnceLock::new();
    if !tls {
        return Ok(PLAIN.get_or_init(|| build_agent(tls_config(false).expect("no roots needed"))));
    }
    SECURE
        .get_or_init(|| tls_config(true).map(build_agent))
        .as_ref()
        .map_err(Clone::clone)
}

/// The system's CA roots (`SSL_CERT_FILE`, `SSL_CERT_DIR` or the system bundle), read once for
/// the process, the first time an https server is asked: https upstreams and an https
/// Prometheus share them.
fn roots() -> Result<&'static ureq::tls::RootCerts, String> {
    static ROOTS: OnceLock<Result<ureq::tls::RootCerts, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(%error, "reading the system's CA certificates");
            }
            if found.certs.is_empty() {
                return Err(
                    "no CA certificates found to check https servers with (install ca-certificates, or set SSL_CERT_FILE)".to_owned(),
                );
            }
            tracing::debug!(roots = found.certs.len(), "CA roots read");
            let roots: Vec<ureq::tls::Certificate<'static>> = found
                .certs
                .iter()
                .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
                .collect();
            Ok(ureq::tls::RootCerts::new_with_certs(&roots))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// plumb's TLS for its HTTP clients (git's smart HTTP, the rollout gate's Prometheus): rustls
/// on ring, and with `https` the system's CA roots ([`roots`]).
pub(crate) fn tls_config(https: bool) -> Result<ureq::tls::TlsConfig, String> {
    let mut tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(crypto());
    if https {
        tls = tls.root_certs(roots()?.clone());
    }
    Ok(tls.build())
}

/// ring, not aws-lc-rs, as rustls' crypto: a small pure-Rust-and-assembly build with no cmake,
/// and a fraction of the resident code (the daemon's memory is mostly its own code). rustls
/// marks it deprecated because it has no post-quantum key exchange; for fetching configuration
/// from a git host that is the trade-off plumb takes, until ring has one.
#[allow(deprecated)]
fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_agent(tls: ureq::tls::TlsConfig) -> Agent {
    Agent::config_builder()
        .tls_config(tls)
        .user_agent(USER_AGENT)
        .no_delay(true)
        .http_status_as_error(false)
        .max_redirects(5)
        .build()
        .new_agent()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_url_for_a_header() {
        assert_eq!(
            split_credentials("https://deploy:s%40cret@git.example.org/ops.git/"),
            (
                "https://git.example.org/ops.git".to_owned(),
                Some(format!("Basic {}", STANDARD.encode("deploy:s@cret")))
            )
        );
        assert_eq!(
            split_credentials("http://127.0.0.1:8080/git/a.git"),
            ("http://127.0.0.1:8080/git/a.git".to_owned(), None)
        );
    }
}
