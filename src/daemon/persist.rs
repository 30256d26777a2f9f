//! The services' state files: read at start (a missing or unreadable one is a fresh service),
//! written whenever the state machine says something worth keeping changed.

use tracing::error;

use crate::layout::{self, Layout};
use crate::service;

pub(super) fn load_state(layout: &Layout, name: &str, now: u64) -> service::Service {
    let path = layout.service_state(name);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                error!(service = %name, "{}: unreadable state ({e}); starting afresh", path.display());
                service::Service::new(now)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => service::Service::new(now),
        Err(e) => {
            error!(service = %name, "{}: {e}; starting afresh", path.display());
            service::Service::new(now)
        }
    }
}

/// Writes the service's state file; false (logged) when it could not.
pub(super) fn persist(layout: &Layout, name: &str, state: &service::Service) -> bool {
    let path = layout.service_state(name);
    let write = serde_json::to_vec_pretty(state)
        .map_err(std::io::Error::other)
        .and_then(|json| layout::write_atomic(&path, &json));
    if let Err(e) = &write {
        error!(service = %name, "cannot save state to {}: {e}", path.display());
    }
    write.is_ok()
}
