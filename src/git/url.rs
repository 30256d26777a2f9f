//! Upstream URLs as plumb needs to see them: the name of a store on disk ([`store_id`]), the form
//! safe to print ([`redact_url`]), and the ssh endpoint (user, host, port) that host key checks and
//! credentials need, since libgit2 hands callbacks the host without its port.
//!
//! Everything here is a pure function of the URL text: no I/O, unit-tested below.

use sha1::{Digest, Sha1};

/// Longest readable part of a store name, so names stay well under file name limits.
const READABLE_MAX: usize = 64;

/// Hex digits of the URL hash in a store name: 64 bits, so distinct upstreams never collide in practice.
const HASH_HEX: usize = 16;

/// The name of the store directory for `url` (without the `.git` suffix the store adds).
///
/// A readable part (host and path, credentials dropped, anything but `[A-Za-z0-9._]` turned into
/// `-`) lets an operator tell stores apart with `ls`; a hash of the URL makes the name unique, so
/// two URLs never share a store.
///
/// The hash covers the URL *without its password*: two URLs that differ only in a password (or
/// token) are the same upstream and share one store, rotating a token does not re-fetch the whole
/// history, and a directory listing reveals nothing that would help guess the secret. A different
/// user name (`alice@` vs `bob@`) is a different identity and gets its own store.
pub fn store_id(url: &str) -> String {
    let hash = Sha1::digest(without_password(url).as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let readable = readable_part(url);
    format!("{readable}-{}", &hex[..HASH_HEX])
}

/// `url` with its secrets removed, for logs, errors and state files.
///
/// For `http(s)://` (and any other scheme but ssh) the whole `user:password@` part goes: hosting
/// services put tokens in the user name as often as in the password. For `ssh://` only a
/// `:password` is dropped and `user@` stays, because an ssh user name is not a secret and the
/// operator needs it to debug key authentication. scp-like `user@host:path` cannot carry a
/// password and is returned as is.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some(at) = userinfo_end(rest) else {
        return url.to_string();
    };
    let (userinfo, host_path) = (&rest[..at], &rest[at + 1..]);
    if is_ssh_scheme(scheme) {
        let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
        format!("{scheme}://{user}@{host_path}")
    } else {
        format!("{scheme}://{host_path}")
    }
}

/// Where the userinfo (`user:password`) of the part of a URL after `scheme://` ends: its `@`.
///
/// It is the last `@` before the path. A password with an unencoded `/` (base64 tokens have them)
/// puts its `@` after the first `/`; with a `:` before that `/` it is taken as userinfo too, since
/// for what is printed, cutting too much beats leaking a secret: such a URL is not valid, and a
/// URL with both a port and an `@` in its path is rare.
fn userinfo_end(rest: &str) -> Option<usize> {
    let authority_end = rest.find('/').unwrap_or(rest.len());
    rest[..authority_end].rfind('@').or_else(|| {
        let at = rest.rfind('@')?;
        rest[..authority_end].contains(':').then_some(at)
    })
}

/// What names a repository whatever the protocol that reaches it: the host (lower case, without
/// user or port) and the path without `.git` and surrounding slashes, lower case. So the
/// `https://`, `ssh://` and scp-like `git@host:path` URLs a git host lists for one repository
/// (in a push webhook's payload, say) give the key of the upstream configured by any of them.
pub fn repository_key(url: &str) -> String {
    let (host, path) = match url.split_once("://") {
        Some((_, rest)) => {
            let rest = userinfo_end(rest).map_or(rest, |at| &rest[at + 1..]);
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            (authority, path)
        }
        // scp-like: [user@]host:path
        None => match url.split_once(':') {
            Some((authority, path)) => (authority.rsplit('@').next().unwrap_or(authority), path),
            None => ("", url),
        },
    };
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let path = path.trim_matches('/');
    let path = path
        .strip_suffix(".git")
        .unwrap_or(path)
        .trim_end_matches('/');
    format!(
        "{}/{}",
        host.to_ascii_lowercase(),
        path.to_ascii_lowercase()
    )
}

/// `url` with only the password removed (user kept): the identity of an upstream.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&authority[..at], &authority[at + 1..]);
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}@{host}{path}")
        }
        None => url.to_string(),
    }
}

/// Host and path of `url` without scheme, credentials or `.git`, squeezed to `[A-Za-z0-9._-]`.
fn readable_part(url: &str) -> String {
    let rest = match url.split_once("://") {
        Some((_, rest)) => rest,
        None => url,
    };
    let rest = match userinfo_end(rest) {
        Some(at) => &rest[at + 1..],
        None => match rest.split_once('@') {
            // scp-like user@host:path: drop the user
            Some((user, host_path)) if !user.contains('/') && !user.contains(':') => host_path,
            _ => rest,
        },
    };
    let rest = rest.trim_end_matches('/');
    let rest = rest.strip_suffix(".git").unwrap_or(rest);
    let mut out = String::with_capacity(rest.len());
    for c in rest.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            c
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    let trimmed = out.trim_matches(|c| c == '-' || c == '.');
    let mut readable: String = trimmed.chars().take(READABLE_MAX).collect();
    while readable.ends_with(['-', '.']) {
        readable.pop();
    }
    if readable.is_empty() {
        "store".to_string()
    } else {
        readable
    }
}

fn is_ssh_scheme(scheme: &str) -> bool {
    matches!(
        scheme.to_ascii_lowercase().as_str(),
        "ssh" | "ssh+git" | "git+ssh"
    )
}

/// Where an ssh upstream lives: what host key checks and key authentication need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SshEndpoint {
    /// The user from the URL, if any.
    pub user: Option<String>,
    /// Host name or address as written (IPv6 without brackets), lower-cased.
    pub host: String,
    pub port: u16,
}

impl SshEndpoint {
    /// The name this endpoint has in known_hosts files: `host` on port 22, `[host]:port` otherwise.
    pub fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    /// The `ssh-keyscan` command that prints this endpoint's host keys, for error messages.
    pub fn keyscan_command(&self) -> String {
        if self.port == 22 {
            format!("ssh-keyscan {}", self.host)
        } else {
            format!("ssh-keyscan -p {} {}", self.port, self.host)
        }
    }
}

/// The ssh endpoint of `url`, or `None` when `url` does not use ssh (`ssh://`, `git+ssh://`,
/// `ssh+git://` or scp-like `[user@]host:path`).
pub(crate) fn ssh_endpoint(url: &str) -> Option<SshEndpoint> {
    if let Some((scheme, rest)) = url.split_once("://") {
        if !is_ssh_scheme(scheme) {
            return None;
        }
        let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
        let (user, hostport) = match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                (Some(percent_decode(user)), &authority[at + 1..])
            }
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport)?;
        return Some(SshEndpoint {
            user,
            host,
            port: port.unwrap_or(22),
        });
    }
    // scp-like: [user@]host:path, where no '/' comes before the ':' (that would be a local path)
    let (user, rest) = match url.split_once('@') {
        Some((user, rest)) if !user.contains('/') && !user.contains(':') => {
            (Some(user.to_string()), rest)
        }
        _ => (None, url),
    };
    let host = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        after.strip_prefix(':')?;
        host
    } else {
        let (host, _) = rest.split_once(':')?;
        if host.contains('/') {
            return None;
        }
        host
    };
    if host.is_empty() {
        return None;
    }
    Some(SshEndpoint {
        user,
        host: host.to_ascii_lowercase(),
        port: 22,
    })
}

/// `host[:port]` or `[v6]:port` -> (host, port); `None` for an empty host or a bad port.
fn split_host_port(hostport: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return None,
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some("") | None => None,
        Some(p) => Some(p.parse().ok()?),
    };
    Some((host.to_ascii_lowercase(), port))
}

/// The `user` and `password` of an `http(s)://user:password@host/...` URL, percent-decoded.
pub(crate) fn http_credentials(url: &str) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    Some((percent_decode(user), percent_decode(password)))
}

/// Decodes `%XX` escapes; malformed escapes are kept literally.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_id_is_readable_and_unique() {
        let a = store_id("https://github.com/acme/infra.git");
        assert!(a.starts_with("github.com-acme-infra-"), "{a}");
        assert_eq!(a.len(), "github.com-acme-infra-".len() + HASH_HEX);
        assert_ne!(a, store_id("https://github.com/acme/infra"));
        assert_ne!(a, store_id("http://github.com/acme/infra.git"));
        assert_eq!(a, store_id("https://github.com/acme/infra.git"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        );
    }

    #[test]
    fn store_id_hides_credentials_but_not_identity() {
        let with = store_id("https://bot:s3cret@example.com/x.git");
        assert!(!with.contains("s3cret") && !with.contains("bot"), "{with}");
        // a rotated password is the same upstream
        assert_eq!(with, store_id("https://bot:other@example.com/x.git"));
        // another user is another identity
        assert_ne!(with, store_id("https://alice:s3cret@example.com/x.git"));
        let scp = store_id("git@example.com:acme/infra.git");
        assert!(scp.starts_with("example.com-acme-infra-"), "{scp}");
    }

    #[test]
    fn store_id_of_odd_urls_is_a_safe_name() {
        for url in [
            "",
            "/",
            "file:///",
            "../../etc",
            "a b/../c",
            "ünïcode://x/ÿ",
        ] {
            let id = store_id(url);
            assert!(!id.starts_with('.') && !id.contains('/'), "{url:?} -> {id}");
            assert!(id.len() <= READABLE_MAX + 1 + HASH_HEX);
        }
        let long = format!("https://example.com/{}", "x".repeat(500));
        assert!(store_id(&long).len() <= READABLE_MAX + 1 + HASH_HEX);
    }

    #[test]
    fn a_password_with_an_unencoded_slash_is_still_redacted() {
        let url = "https://ci:abc/def+ghi==@git.example.org/ops.git";
        assert_eq!(redact_url(url), "https://git.example.org/ops.git");
        assert!(!store_id(url).contains("abc"), "{}", store_id(url));
        assert_eq!(redact_url("ssh://git:pa/ss@host/r"), "ssh://git@host/r");
    }

    #[test]
    fn redact_strips_http_userinfo_keeps_ssh_user() {
        assert_eq!(
            redact_url("https://u:p@host:8443/a/b.git"),
            "https://host:8443/a/b.git"
        );
        assert_eq!(
            redact_url("https://ghp_token@github.com/a"),
            "https://github.com/a"
        );
        assert_eq!(
            redact_url("ssh://git:pw@host:2222/r"),
            "ssh://git@host:2222/r"
        );
        assert_eq!(redact_url("ssh://git@host/r"), "ssh://git@host/r");
        assert_eq!(redact_url("git@host:r.git"), "git@host:r.git");
        assert_eq!(
            redact_url("git://127.0.0.1:9418/x.git"),
            "git://127.0.0.1:9418/x.git"
        );
        assert_eq!(redact_url("file:///srv/x.git"), "file:///srv/x.git");
        // an @ in the path is not userinfo
        assert_eq!(
            redact_url("https://host/a@b/c.git"),
            "https://host/a@b/c.git"
        );
    }

    #[test]
    fn ssh_endpoints() {
        let e = ssh_endpoint("ssh://root@127.0.0.1:2222/srv/x.git").unwrap();
        assert_eq!(e.user.as_deref(), Some("root"));
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 2222));
        assert_eq!(e.known_hosts_name(), "[127.0.0.1]:2222");
        assert_eq!(e.keyscan_command(), "ssh-keyscan -p 2222 127.0.0.1");

        let e = ssh_endpoint("ssh://Example.COM/x").unwrap();
        assert_eq!((e.user, e.host.as_str(), e.port), (None, "example.com", 22));
        assert_eq!(
            ssh_endpoint("git+ssh://u@h/x").unwrap().known_hosts_name(),
            "h"
        );

        let e = ssh_endpoint("ssh://u@[::1]:2222/x").unwrap();
        assert_eq!(e.known_hosts_name(), "[::1]:2222");
        let e = ssh_endpoint("ssh://[::1]/x").unwrap();
        assert_eq!(e.known_hosts_name(), "::1");

        let e = ssh_endpoint("git@github.com:acme/infra.git").unwrap();
        assert_eq!(e.user.as_deref(), Some("git"));
        assert_eq!(e.known_hosts_name(), "github.com");
        let e = ssh_endpoint("host:repo").unwrap();
        assert_eq!((e.user, e.host.as_str()), (None, "host"));
        let e = ssh_endpoint("me@[fe80::1]:repo").unwrap();
        assert_eq!(e.host, "fe80::1");

        for not_ssh in [
            "https://h/x",
            "git://h/x",
            "file:///x",
            "/srv/x.git",
            "./a:b",
            "ssh://:22/x",
            "ssh://h:notaport/x",
        ] {
            assert_eq!(ssh_endpoint(not_ssh), None, "{not_ssh}");
        }
    }

    #[test]
    fn http_credentials_are_decoded() {
        assert_eq!(
            http_credentials("https://bot:p%40ss@h/x"),
            Some(("bot".to_string(), "p@ss".to_string()))
        );
        assert_eq!(
            http_credentials("https://tok@h/x"),
            Some(("tok".to_string(), String::new()))
        );
        assert_eq!(http_credentials("https://h/x"), None);
        assert_eq!(http_credentials("ssh://u:p@h/x"), None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn one_repository_key_for_every_protocol_of_a_repository() {
        let key = "git.example.org/ops/config";
        for url in [
            "https://git.example.org/ops/config.git",
            "https://ci:token@git.example.org/Ops/Config",
            "http://git.example.org:3000/ops/config/",
            "ssh://git@git.example.org:2222/ops/config.git",
            "git@git.example.org:ops/config.git",
            "git://git.example.org/ops/config",
        ] {
            assert_eq!(repository_key(url), key, "{url}");
        }
        assert_ne!(repository_key("https://git.example.org/ops/other.git"), key);
        assert_ne!(
            repository_key("https://mirror.example.org/ops/config.git"),
            key
        );
        assert_eq!(
            repository_key("file:///srv/git/config.git"),
            "/srv/git/config"
        );
    }
}
