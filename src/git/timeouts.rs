//! libgit2's socket timeouts: the one place plumb calls `unsafe` code.
//!
//! [`Transport::timeout`](super::Transport::timeout) is otherwise only checked when libgit2 calls
//! back, so a server that accepts the connection and then says nothing (or a connect that never
//! completes) would hold its store's thread forever. libgit2 can bound every connect and every
//! single socket read or write (git://, http(s)://, and ssh through libssh2's session timeout),
//! but only through two process-wide options that git2 exposes as `unsafe fn`s.
//!
//! They are set once per process, from the first fetch's timeout: a later SIGHUP that changes
//! `fetch_timeout` moves the overall limit checked in the callbacks, not the socket timeouts
//! (until the next start).

use std::sync::Once;
use std::time::Duration;

static SET: Once = Once::new();

/// Bounds each connect and each socket read or write of every later fetch by `timeout`, the
/// transport's whole-fetch limit (one read waiting longer than the whole fetch may take is a
/// fetch that has failed). Only the process's first call counts: a first `None` leaves libgit2's
/// default (no timeouts) for good. Every fetch calls this before it connects.
#[allow(unsafe_code)]
pub(super) fn init(timeout: Option<Duration>) {
    SET.call_once(|| {
        let Some(timeout) = timeout else {
            return;
        };
        // libgit2 takes milliseconds as a C int; 0 would mean "no timeout".
        let ms = i32::try_from(timeout.as_millis())
            .unwrap_or(i32::MAX)
            .max(1);
        // SAFETY: the two functions write plain C `int` globals of libgit2 (GIT_OPT_SET_SERVER_*
        // through git_libgit2_opts, which cannot fail for a non-negative value) without
        // synchronisation; git2 marks them unsafe because a write racing a read is a data race.
        // libgit2 reads those globals only when it opens a connection (socket stream creation,
        // libssh2 session setup), and in plumb only `Store::fetch` opens connections, after
        // calling this function. `Once` makes this the only write ever, and every caller, in
        // any thread, returns from `call_once` only after it completed (happens-before), so
        // every read follows the write and none can overlap it. Nothing else in plumb reads or
        // writes these options.
        unsafe {
            let _ = git2::opts::set_server_connect_timeout_in_milliseconds(ms);
            let _ = git2::opts::set_server_timeout_in_milliseconds(ms);
        }
        tracing::debug!(timeout_ms = ms, "libgit2 socket timeouts set");
    });
}
