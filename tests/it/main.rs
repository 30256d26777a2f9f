//! plumb's integration tests: ONE test binary (`tests/it/`, cargo's test target `it`), in the shape
//! ripgrep uses, rather than one binary per file. Every binary under `tests/` links the whole
//! crate and its dependencies; one binary links them once, which on a 2-core machine is most of
//! the time `cargo test` spends building.
//!
//! Each file below is a module of its own; [`support`] is the one harness they share (upstreams,
//! git servers, the daemon, accounts, polling with a deadline), so a helper lives there once.
//!
//! Run one module, or one test, by name: `cargo test --test it daemon::`,
//! `cargo test --test it -- --skip container::` (the systemd-container modules `container`,
//! `full_loop` and `systemd` are the slow ones).

mod support;

mod api;
mod cli;
mod container;
mod contrib;
mod control;
mod daemon;
mod docs;
mod faults;
mod full_loop;
mod generator;
mod git_engine;
mod harness;
mod hostile;
mod plumbctl;
mod signatures;
mod systemd;
mod waves;
