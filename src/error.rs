//! Errors as people read them: an error and its causes on one line, joined with ": ".
//!
//! plumb's own errors say what failed (`cannot read /etc/plumb/plumb.toml`) and leave the cause
//! (`Permission denied`) to [`std::error::Error::source`], as nextest does, so nothing prints a
//! cause twice. Wherever an error becomes text for a person (the binaries' last words, a service's
//! info, an API answer, a log line), it goes through [`Chain`], which adds the causes back.

use std::error::Error;
use std::fmt;

/// Shows an error followed by each of its causes, `what: why: deeper why`.
///
/// Two kinds of causes are shown as people expect them: a libgit2 error by its message alone
/// (its `Display` appends `; class=...; code=...`), and a cause the line already ends with is
/// skipped, for errors of other crates that both print their cause and return it as `source`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = text(self.0);
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let more = text(e);
            if !more.is_empty() && !line.ends_with(&more) {
                line.push_str(": ");
                line.push_str(&more);
            }
            cause = e.source();
        }
        f.write_str(&line)
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The one-line text of `error` and its causes: [`Chain`] as a `String`.
pub fn chain(error: &(dyn Error + 'static)) -> String {
    Chain(error).to_string()
}

/// One error's own text, without its causes.
fn text(e: &(dyn Error + 'static)) -> String {
    match e.downcast_ref::<git2::Error>() {
        Some(git) => git.message().to_owned(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {path}")]
    struct Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading the config")]
    struct Load(#[source] Read);

    #[test]
    fn every_cause_once_in_order() {
        let e = Load(Read {
            path: "/etc/plumb/plumb.toml",
            source: std::io::Error::from_raw_os_error(13),
        });
        assert_eq!(
            chain(&e),
            "loading the config: cannot read /etc/plumb/plumb.toml: Permission denied (os error 13)"
        );
    }

    #[test]
    fn a_cause_the_message_already_shows_is_not_repeated() {
        // zbus prints "I/O error: {e}" and returns the same error as its source.
        let io = std::io::Error::from_raw_os_error(2);
        let e = zbus::Error::InputOutput(std::sync::Arc::new(io));
        assert_eq!(
            chain(&e),
            "I/O error: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn libgit2_causes_by_their_message() {
        #[derive(Debug, thiserror::Error)]
        #[error("fetch git://h/x.git")]
        struct Fetch(#[source] git2::Error);
        let e = Fetch(git2::Error::new(
            git2::ErrorCode::NotFound,
            git2::ErrorClass::Net,
            "failed to connect",
        ));
        assert_eq!(chain(&e), "fetch git://h/x.git: failed to connect");
    }
}
