//! What a job cost: price × time, shown in the job log and appended to a ledger.
//!
//! The ledger is JSON lines on the runner host, one per released instance, so an
//! administrator can sum costs per project with `jq` without any service.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::format_duration;
use crate::env::JobInfo;
use crate::state::JobState;

/// One ledger line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LedgerEntry {
    /// When the instance was released.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Runner id.
    pub runner: String,
    /// Project id.
    pub project: String,
    /// Project path, when known.
    pub project_path: String,
    /// Job id.
    pub job: String,
    /// Instance id.
    pub instance_id: String,
    /// Instance type.
    pub instance_type: String,
    /// Zone.
    pub zone: String,
    /// Spot price per hour at creation, in `currency`.
    pub price_per_hour: f64,
    /// The currency of `price_per_hour` and `cost` (`CNY` on Aliyun's China site, `USD` on the
    /// international one); older lines without it are CNY.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Seconds from creation to release.
    pub seconds: u64,
    /// price × hours, in `currency`.
    pub cost: f64,
}

fn default_currency() -> String {
    crate::selection::pricing::DEFAULT_CURRENCY.to_string()
}

/// The ledger entry for a state whose instance was created.
pub fn ledger_entry(s: &JobState, job: &JobInfo, now: OffsetDateTime) -> Option<LedgerEntry> {
    let created = s.instance_created_at?;
    let price = s.spot_price?;
    let seconds = (now - created).whole_seconds().max(0) as u64;
    Some(LedgerEntry {
        at: now,
        runner: s.runner_id.clone(),
        project: s.project_id.clone(),
        project_path: job.project_path.clone().unwrap_or_default(),
        job: s.job_id.clone(),
        instance_id: s.instance_id.clone().unwrap_or_default(),
        instance_type: s.instance_type.clone(),
        zone: s.zone.clone(),
        price_per_hour: price,
        currency: s.currency.clone(),
        seconds,
        cost: price * seconds as f64 / 3600.0,
    })
}

/// The line shown at the end of the job log (the `cleanup_file_variables` stage).
pub fn job_cost_line(s: &JobState, now: OffsetDateTime) -> Option<String> {
    let created = s.instance_created_at?;
    let price = s.spot_price?;
    let seconds = (now - created).whole_seconds().max(0) as u64;
    Some(format!(
        "Spot instance {} ({} in {}) at {} for {}: about {:.4} {} so far",
        s.instance_id.as_deref().unwrap_or("?"),
        s.instance_type,
        s.zone,
        crate::selection::pricing::PerHour(price, &s.currency),
        format_duration(Duration::from_secs(seconds)),
        price * seconds as f64 / 3600.0,
        s.currency
    ))
}

/// The line cleanup prints (to the runner log).
pub fn summary(e: &LedgerEntry) -> String {
    format!(
        "Job {} used {} ({} in {}) for {} at {}: {:.4} {}",
        e.job,
        e.instance_id,
        e.instance_type,
        e.zone,
        format_duration(Duration::from_secs(e.seconds)),
        crate::selection::pricing::PerHour(e.price_per_hour, &e.currency),
        e.cost,
        e.currency
    )
}

/// Appends one JSON line; the file is created 0600, missing directories 0700. A symbolic link in
/// place of the ledger is refused, never followed (`O_NOFOLLOW`): root must not append to a
/// file another user chose.
pub fn append_ledger(path: &Path, e: &LedgerEntry) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Missing directories are created 0700; an existing one (maybe `/var/log`) keeps its mode.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("failed to create `{}`", dir.display()))?;
    }
    let mut f = crate::fsutil::open_append_nofollow(path, 0o600)?;
    // One write of one line: concurrent cleanups on O_APPEND never interleave within a line.
    let mut line = serde_json::to_vec(e)?;
    line.push(b'\n');
    f.write_all(&line)?;
    Ok(())
}

/// `2026-11-24 15:04:05 UTC`.
pub fn format_time(t: OffsetDateTime) -> String {
    t.format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC"))
        .unwrap_or_default()
}
