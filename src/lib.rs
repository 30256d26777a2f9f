//! plumb: GitOps for machines you run yourself.
//!
//! A git repository holds, per service, the files that service needs. On every machine plumb keeps a
//! checkout of only those paths, with full history, hands each new revision to systemd, and reloads the
//! unit when, and only when, that service's files changed. ARCHITECTURE.md maps the modules.

pub mod api;
pub mod apply;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod docs;
pub mod error;
pub mod exec;
pub mod generator;
pub mod git;
pub mod hook;
pub mod layout;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod owner;
pub mod pkg;
pub mod proto;
pub mod rollout;
pub mod service;
pub mod systemd;
