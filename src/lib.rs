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
//!   `CUSTOM_ENV_*` overrides, validated once into typed values; [`identity`]: who a job is,
//!   from gitlab-runner's job payload, the runner id and a per-attempt secret (never from job
//!   variables).
//! - [`ecs`]: the ECS RPC client (signing, transport, typed errors, retry, actions) and
//!   [`credentials`]: the AccessKey / profile / instance RAM role chain.
//! - [`selection`], [`price_cache`] and [`cooldown`]: candidate types, availability and spot
//!   prices, ranked; recent stock-outs tried last.
//! - [`keys`], [`ssh`], [`state`], [`fsutil`]: per-job keys, the SSH session, the job-state file.
//! - [`userdata`] and [`watchdog`]: the cloud-config given to each instance (keys, the
//!   self-destruct watchdog).
//! - [`offers`]: live offers from ECS through the price cache; [`logging`]: debug logs.
//! - [`stages`]: the four gitlab-runner stages; [`exit`] maps their outcome to exit codes;
//!   [`helper`]: gitlab-runner's own binary on the instance.
//! - [`sweep`], [`admin`], [`demo`]: the administrator's `aliyun-spot` commands.
//! - [`emulator`]: a local ECS API with a real `sshd` per instance, the test bed.

pub mod admin;
pub mod arch;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod ecs;
pub mod emulator;
pub mod env;
pub mod exit;
pub mod fsutil;
pub mod helper;
pub mod identity;
pub mod keys;
pub mod logging;
pub mod ram_policy;
pub mod secret;
pub mod selection;
pub mod ssh;
pub mod stages;
pub mod state;
pub mod sts;
pub mod sweep;
pub mod userdata;
pub mod watchdog;

// The selection modules under their earlier paths, which other modules still name.
pub use selection::{cache as price_cache, cooldown, families, offers, pricing};

/// The driver name reported to gitlab-runner and used in tags.
pub const DRIVER_NAME: &str = "aliyun-spot-executor";
/// The driver version (the crate version).
pub const DRIVER_VERSION: &str = env!("CARGO_PKG_VERSION");
