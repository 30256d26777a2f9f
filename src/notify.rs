//! The sd_notify protocol: tells systemd the daemon is ready, still alive (watchdog), reloading or
//! stopping, for `Type=notify` units. A datagram to `$NOTIFY_SOCKET`; without it every call is a no-op,
//! so the daemon runs the same under systemd, under a test harness and by hand.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where systemd listens for this service's notifications, if it does.
#[derive(Debug, Clone)]
pub struct Notifier {
    addr: Option<SocketAddr>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn from_env() -> Notifier {
        let addr = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            let s = s.to_string_lossy().into_owned();
            match s.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok(),
                None => SocketAddr::from_pathname(&s).ok(),
            }
        });
        Notifier { addr }
    }

    /// Sends `state` (`READY=1`, `WATCHDOG=1`, ...); failures are logged, never fatal.
    pub fn send(&self, state: &str) {
        let Some(addr) = &self.addr else { return };
        let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), addr));
        if let Err(e) = sent {
            tracing::warn!("sd_notify {state:?}: {e}");
        }
    }

    /// How often to ping the watchdog: half of `$WATCHDOG_USEC` when systemd set one for this process.
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Some(pid) = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            && pid != std::process::id()
        {
            return None;
        }
        // At least 1µs: a zero period would panic `tokio::time::interval` (WATCHDOG_USEC=1).
        (usec > 0).then(|| Duration::from_micros((usec / 2).max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_reaches_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            addr: Some(SocketAddr::from_pathname(&path).unwrap()),
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }
}
