//! A known_hosts reader, so that ssh host keys are checked against the operator's files and never
//! skipped. libgit2 only consults `~/.ssh/known_hosts` of the process and cannot be pointed at
//! other files, so plumb does the check itself in the `certificate_check` callback.
//!
//! Supported (OpenSSH `sshd(8)` "SSH_KNOWN_HOSTS FILE FORMAT"): comments and blank lines,
//! comma-separated host patterns with `*` and `?` wildcards and `!` negation, `[host]:port` names
//! for non-standard ports, hashed names (`|1|base64 salt|base64 HMAC-SHA1(salt, name)`), and the
//! `@revoked` marker, which refuses a key outright. `@cert-authority` lines are ignored: libgit2
//! presents the plain host key, never a certificate, so such lines can neither match nor help.
//!
//! Pure functions over file contents; reading the files is the caller's business.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// What the known_hosts files say about a host and the key it presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A line for this host has exactly this key.
    Trusted,
    /// An `@revoked` line matching this host has this key: refuse, whatever else the files say.
    Revoked,
    /// The host is known, but with other keys, of these types.
    Changed { known_types: Vec<String> },
    /// No line names this host.
    Unknown,
}

impl Verdict {
    /// Combines the verdicts of several files: revoked anywhere beats trusted anywhere, which beats
    /// a mismatch, which beats not knowing the host at all.
    pub fn merge(self, other: Verdict) -> Verdict {
        use Verdict::*;
        match (self, other) {
            (Revoked, _) | (_, Revoked) => Revoked,
            (Trusted, _) | (_, Trusted) => Trusted,
            (Changed { known_types: mut a }, Changed { known_types: b }) => {
                for t in b {
                    if !a.contains(&t) {
                        a.push(t);
                    }
                }
                Changed { known_types: a }
            }
            (c @ Changed { .. }, Unknown) | (Unknown, c @ Changed { .. }) => c,
            (Unknown, Unknown) => Unknown,
        }
    }
}

/// Checks `key` (the raw ssh wire-format public key blob) presented by the host known as `name`
/// (`host` or `[host]:port`, see [`super::url::SshEndpoint::known_hosts_name`]) against the
/// known_hosts text `contents`.
pub(crate) fn check(contents: &str, name: &str, key: &[u8]) -> Verdict {
    let name = name.to_ascii_lowercase();
    let mut verdict = Verdict::Unknown;
    for line in contents.lines() {
        let Some(entry) = parse_line(line) else {
            continue;
        };
        if entry.marker == Marker::CertAuthority || !hosts_match(entry.hosts, &name) {
            continue;
        }
        let same_key = STANDARD.decode(entry.key_b64).is_ok_and(|blob| blob == key);
        let line_verdict = match (entry.marker, same_key) {
            (Marker::Revoked, true) => Verdict::Revoked,
            (Marker::Revoked, false) => continue,
            (_, true) => Verdict::Trusted,
            (_, false) => Verdict::Changed {
                known_types: vec![entry.key_type.to_string()],
            },
        };
        verdict = verdict.merge(line_verdict);
    }
    verdict
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

/// One meaningful known_hosts line.
#[derive(Debug, PartialEq, Eq)]
struct Entry<'a> {
    marker: Marker,
    hosts: &'a str,
    key_type: &'a str,
    key_b64: &'a str,
}

/// Splits a line into its fields; `None` for blank lines, comments and lines too short to hold a
/// key. Unknown `@markers` make the line unusable (`None`), as in OpenSSH.
fn parse_line(line: &str) -> Option<Entry<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        m if m.starts_with('@') => return None,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next()?;
    }
    let key_type = fields.next()?;
    let key_b64 = fields.next()?;
    Some(Entry {
        marker,
        hosts: first,
        key_type,
        key_b64,
    })
}

/// Whether the host field of a line names `name` (already lower-case).
fn hosts_match(field: &str, name: &str) -> bool {
    if let Some(hashed) = field.strip_prefix("|1|") {
        return hashed_match(hashed, name);
    }
    let mut matched = false;
    for pattern in field.split(',') {
        let (negated, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern),
        };
        if glob_match(pattern.to_ascii_lowercase().as_bytes(), name.as_bytes()) {
            if negated {
                return false;
            }
            matched = true;
        }
    }
    matched
}

/// `salt|hash` (both base64) of a hashed entry: does HMAC-SHA1 keyed with salt over `name` give hash?
fn hashed_match(salt_and_hash: &str, name: &str) -> bool {
    let Some((salt, hash)) = salt_and_hash.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (STANDARD.decode(salt), STANDARD.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// Shell-style match of the whole `text` against `pattern` with `*` (any run) and `?` (one byte).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // position of the last '*' in pattern and the text position it is currently matched up to
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                backtrack = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match backtrack {
                Some((star, matched)) => {
                    p = star + 1;
                    t = matched + 1;
                    backtrack = Some((star, matched + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &[u8] = b"\0\0\0\x0bssh-ed25519\0\0\0\x20aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &[u8] = b"\0\0\0\x0bssh-ed25519\0\0\0\x20bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn line(hosts: &str, key: &[u8]) -> String {
        format!(
            "{hosts} ssh-ed25519 {} comment here\n",
            STANDARD.encode(key)
        )
    }

    fn hashed(name: &str, salt: &[u8]) -> String {
        let mut mac = Hmac::<Sha1>::new_from_slice(salt).unwrap();
        mac.update(name.as_bytes());
        let hash = mac.finalize().into_bytes();
        format!("|1|{}|{}", STANDARD.encode(salt), STANDARD.encode(hash))
    }

    #[test]
    fn plain_names_and_ports() {
        let file = line("example.com", KEY_A) + &line("[example.com]:2222", KEY_B);
        assert_eq!(check(&file, "example.com", KEY_A), Verdict::Trusted);
        assert_eq!(check(&file, "[example.com]:2222", KEY_B), Verdict::Trusted);
        // the port-22 entry does not vouch for another port, nor the other way round
        assert_eq!(
            check(&file, "[example.com]:2222", KEY_A),
            Verdict::Changed {
                known_types: vec!["ssh-ed25519".into()]
            }
        );
        assert_eq!(check(&file, "other.com", KEY_A), Verdict::Unknown);
        assert_eq!(check(&file, "EXAMPLE.com", KEY_A), Verdict::Trusted);
    }

    #[test]
    fn comma_lists_wildcards_and_negation() {
        let file = line("alpha,*.example.com,!bad.example.com,h?st", KEY_A);
        assert_eq!(check(&file, "alpha", KEY_A), Verdict::Trusted);
        assert_eq!(check(&file, "git.example.com", KEY_A), Verdict::Trusted);
        assert_eq!(check(&file, "bad.example.com", KEY_A), Verdict::Unknown);
        assert_eq!(check(&file, "host", KEY_A), Verdict::Trusted);
        assert_eq!(check(&file, "hoost", KEY_A), Verdict::Unknown);
        assert_eq!(check(&file, "example.com", KEY_A), Verdict::Unknown);
        let ports = line("[10.0.0.*]:2222", KEY_A);
        assert_eq!(check(&ports, "[10.0.0.7]:2222", KEY_A), Verdict::Trusted);
        assert_eq!(check(&ports, "[10.0.0.7]:22", KEY_A), Verdict::Unknown);
    }

    #[test]
    fn glob() {
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a*b*c", b"aXXbYYc"));
        assert!(glob_match(b"a*c", b"abcbc"));
        assert!(!glob_match(b"a*c", b"abcb"));
        assert!(glob_match(b"??", b"ab"));
        assert!(!glob_match(b"??", b"abc"));
        assert!(!glob_match(b"", b"a"));
    }

    #[test]
    fn hashed_entries() {
        let entry = hashed("[127.0.0.1]:2222", b"0123456789abcdefghij");
        let file = line(&entry, KEY_A);
        assert_eq!(check(&file, "[127.0.0.1]:2222", KEY_A), Verdict::Trusted);
        assert_eq!(check(&file, "127.0.0.1", KEY_A), Verdict::Unknown);
        assert!(matches!(
            check(&file, "[127.0.0.1]:2222", KEY_B),
            Verdict::Changed { .. }
        ));
        // a damaged hash never matches
        assert_eq!(
            check(&line("|1|!!!|???", KEY_A), "x", KEY_A),
            Verdict::Unknown
        );
        assert_eq!(check(&line("|1|abc", KEY_A), "x", KEY_A), Verdict::Unknown);
    }

    #[test]
    fn revoked_beats_trusted_and_cert_authority_is_ignored() {
        let file = line("host", KEY_A) + "@revoked " + &line("*", KEY_A);
        assert_eq!(check(&file, "host", KEY_A), Verdict::Revoked);
        // a revoked line for another key says nothing about this one
        let file = line("host", KEY_A) + "@revoked " + &line("*", KEY_B);
        assert_eq!(check(&file, "host", KEY_A), Verdict::Trusted);
        let file = "@cert-authority ".to_string() + &line("*", KEY_A);
        assert_eq!(check(&file, "host", KEY_A), Verdict::Unknown);
        let file = "@unknown-marker ".to_string() + &line("*", KEY_A);
        assert_eq!(check(&file, "host", KEY_A), Verdict::Unknown);
    }

    #[test]
    fn comments_blank_and_broken_lines() {
        let file = format!(
            "# a comment\n\n   \nhost\nhost ssh-ed25519\nhost ssh-ed25519 not-base64!\n  {}",
            line("host", KEY_A)
        );
        assert_eq!(check(&file, "host", KEY_A), Verdict::Trusted);
        assert_eq!(
            check("host ssh-rsa AAAA\n", "host", KEY_A),
            Verdict::Changed {
                known_types: vec!["ssh-rsa".into()]
            }
        );
    }

    #[test]
    fn merging_files() {
        let changed = |t: &str| Verdict::Changed {
            known_types: vec![t.into()],
        };
        assert_eq!(Verdict::Unknown.merge(Verdict::Trusted), Verdict::Trusted);
        assert_eq!(changed("a").merge(Verdict::Trusted), Verdict::Trusted);
        assert_eq!(Verdict::Trusted.merge(Verdict::Revoked), Verdict::Revoked);
        assert_eq!(
            changed("a").merge(changed("b")),
            Verdict::Changed {
                known_types: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(Verdict::Unknown.merge(changed("a")), changed("a"));
    }
}
