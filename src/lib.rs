//! aliyun-spot-executor: a GitLab Runner custom executor that runs every CI job on a fresh
//! Alibaba Cloud ECS spot instance.
//!
//! ```text
//!  gitlab-runner ──► config   validate configuration, print the runner JSON
//!                ──► prepare  select the cheapest offer ─► RunInstances (fallback on stock-out)
//!                             ─► wait Running + SSH ─► job state (0600)
//!                ──► run ×N   one stage script over SSH, output streamed line by line
//!                ──► cleanup  DeleteInstance (by state, else by tags) ─► cost ledger
//! ```
//!
//! Module map:
//! - [`config`] and [`mod@env`]: the TOML file, the administrator's environment and the job's
//!   `CUSTOM_ENV_*` overrides, validated once into typed values (the job's shape is decided by
//!   one rule, [`config::Config::shape_for`]); [`identity`]: who a job is, from gitlab-runner's
//!   job payload, the runner id and a per-attempt secret (never from job variables).
//! - [`ecs`]: the ECS RPC client (endpoint checks, signing, transport, typed errors, retry,
//!   actions) and [`ecs::credentials`]: the AccessKey / profile / instance RAM role chain.
//! - [`selection`]: candidate types, availability and spot prices, ranked, and the create-walk;
//!   with live offers ([`selection::offers`]), the price cache ([`selection::cache`]), recent
//!   stock-outs tried last ([`selection::cooldown`]), type kinds and pricing rules.
//!   [`arch`]: the CPU architecture, shared by the client and selection.
//! - [`keys`], [`ssh`], [`state`], [`fsutil`]: per-job keys, the SSH session, the job-state file.
//! - [`userdata`] and [`watchdog`]: the cloud-config given to each instance (keys, the
//!   self-destruct watchdog); [`sts`]: its short-lived credentials.
//! - [`launch`]: the walk over the ranked offers that creates one instance (both front ends).
//! - [`retry`]: the one retry loop (attempts, time cap, backoff with jitter) every retrying
//!   caller uses, each with its own "retry this?" rule; [`pattern`]: the `*` pattern matcher.
//! - [`logging`]: debug logs; [`tags`]: the tags of a managed instance, for stages and admin.
//! - [`stages`]: the four gitlab-runner stages; [`exit`] maps their outcome to exit codes;
//!   [`helper`]: gitlab-runner's own binary on the instance.
//! - [`admin`] (with [`admin::sweep`]) and [`demo`]: the administrator's `aliyun-spot` commands;
//!   [`github`]: ephemeral GitHub Actions runners on the same rules (`aliyun-spot github`).
//! - [`emulator`]: a local ECS API with a real `sshd` per instance, the test bed.

pub mod admin;
pub mod arch;
pub mod config;
pub mod demo;
pub mod ecs;
pub mod emulator;
pub mod env;
pub mod exit;
pub mod fsutil;
pub mod github;
pub mod helper;
pub mod identity;
pub mod keeper;
pub mod keys;
pub mod launch;
pub mod logging;
pub mod pattern;
pub mod ram_policy;
pub mod retry;
pub mod secret;
pub mod selection;
pub mod ssh;
pub mod stages;
pub mod state;
pub mod sts;
pub mod tags;
pub mod userdata;
pub mod watchdog;

// Modules under their earlier paths, which other modules still name.
pub use ecs::credentials;
pub use selection::{cache as price_cache, cooldown, families, offers, pricing};

/// The driver name reported to gitlab-runner and used in tags.
pub const DRIVER_NAME: &str = "aliyun-spot-executor";
/// The driver version (the crate version).
pub const DRIVER_VERSION: &str = env!("CARGO_PKG_VERSION");
