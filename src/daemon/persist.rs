//! The services' state files: read at start (a missing or unreadable one is a fresh service),
//! written whenever the state machine says something worth keeping changed.

use std::path::Path;

use tracing::{error, info};

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

/// Keeps `text`, the config just accepted from `path`, as the last accepted one
/// ([`crate::config::accepted_path`]): the generator's fallback. Written only when it differs from
/// the copy there, mode 0640 (a config may hold secrets).
pub(super) fn keep_accepted(path: &Path, text: &str) {
    let accepted = crate::config::accepted_path(path);
    if std::fs::read_to_string(&accepted).is_ok_and(|kept| kept == text) {
        return;
    }
    let write = layout::write_atomic(&accepted, text.as_bytes()).and_then(|()| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&accepted, std::fs::Permissions::from_mode(0o640))
    });
    match write {
        Ok(()) => info!(kept = %accepted.display(), "the config is the last accepted one"),
        Err(e) => error!(
            "cannot keep the accepted config at {}: {e}",
            accepted.display()
        ),
    }
}
