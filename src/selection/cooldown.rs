//! Offers that just ran out of stock, remembered for a while on the runner host.
//!
//! Spot stock in a zone comes and goes in minutes, and `DescribeAvailableResource` can lag
//! behind what `RunInstances` answers. Without a memory, every job that starts in the next few
//! minutes would try the same sold-out (type, zone) first and pay a failed call and a log line
//! for it. So an offer that answered out of stock (or zone not on sale) is written to a small
//! file beside the price cache, and later jobs on this host try it last until
//! `spot.stock_cooldown` has passed. It is moved to the end, never dropped: when everything else
//! fails, it is still tried.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fsutil::{create_private_dir, write_atomic, FileLock};
use crate::selection::Offer;

/// One remembered stock-out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    region: String,
    instance_type: String,
    zone: String,
    #[serde(with = "time::serde::rfc3339")]
    until: OffsetDateTime,
}

/// The stock-out memory of one runner host.
#[derive(Debug, Clone)]
pub struct Cooldown {
    path: PathBuf,
    ttl: Duration,
}

impl Cooldown {
    /// The memory kept in `dir` (the price cache directory) for `ttl`; a zero `ttl` turns it off.
    pub fn new(dir: &Path, ttl: Duration) -> Cooldown {
        Cooldown { path: dir.join("stock-cooldown.json"), ttl }
    }

    fn read(&self) -> Vec<Entry> {
        match crate::fsutil::read_nofollow(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::warn!("ignoring the unreadable stock cooldown file `{}`: {e}", self.path.display());
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    /// Remembers that `instance_type` in `zone` of `region` ran out of stock now.
    pub fn record(&self, region: &str, instance_type: &str, zone: &str) -> Result<()> {
        if self.ttl.is_zero() {
            return Ok(());
        }
        let dir = self.path.parent().context("the cooldown file has no directory")?;
        create_private_dir(dir)?;
        let _lock = FileLock::exclusive(&self.path.with_extension("lock"))?;
        let now = OffsetDateTime::now_utc();
        let mut entries: Vec<Entry> = self
            .read()
            .into_iter()
            .filter(|e| {
                e.until > now && !(e.region == region && e.instance_type == instance_type && e.zone == zone)
            })
            .collect();
        entries.push(Entry {
            region: region.to_string(),
            instance_type: instance_type.to_string(),
            zone: zone.to_string(),
            until: now + self.ttl,
        });
        write_atomic(&self.path, &serde_json::to_vec(&entries)?, 0o600)
    }

    /// The (type, zone) pairs of `region` that are cooling down now.
    pub fn active(&self, region: &str) -> BTreeSet<(String, String)> {
        if self.ttl.is_zero() {
            return BTreeSet::new();
        }
        let now = OffsetDateTime::now_utc();
        self.read()
            .into_iter()
            .filter(|e| e.region == region && e.until > now)
            .map(|e| (e.instance_type, e.zone))
            .collect()
    }
}

/// Moves the offers in `cooling` to the end, keeping the order within both groups.
pub fn demote(offers: Vec<Offer>, cooling: &BTreeSet<(String, String)>) -> (Vec<Offer>, Vec<Offer>) {
    let (cold, fresh): (Vec<Offer>, Vec<Offer>) =
        offers.into_iter().partition(|o| cooling.contains(&(o.instance_type.clone(), o.zone.clone())));
    let mut ordered = fresh;
    ordered.extend(cold.iter().cloned());
    (ordered, cold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(t: &str, z: &str) -> Offer {
        Offer {
            instance_type: t.into(),
            family: String::new(),
            zone: z.into(),
            cores: 8,
            memory_gib: 16.0,
            spot_price: 0.2,
            price_per_core: 0.025,
            on_demand_price: None,
            discount: None,
            currency: "CNY".into(),
            vswitch_id: None,
            vswitch_configured: true,
        }
    }

    #[test]
    fn recorded_stock_outs_are_tried_last_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cooldown::new(dir.path(), Duration::from_secs(600));
        assert!(c.active("cn-hangzhou").is_empty());
        c.record("cn-hangzhou", "ecs.a", "z1").unwrap();
        c.record("cn-hangzhou", "ecs.a", "z1").unwrap();
        c.record("cn-shanghai", "ecs.b", "z9").unwrap();
        let active = c.active("cn-hangzhou");
        assert_eq!(active.into_iter().collect::<Vec<_>>(), [("ecs.a".to_string(), "z1".to_string())]);
        let offers = vec![offer("ecs.a", "z1"), offer("ecs.b", "z1"), offer("ecs.a", "z2")];
        let (ordered, cold) = demote(offers, &c.active("cn-hangzhou"));
        let names: Vec<String> = ordered.iter().map(|o| format!("{}@{}", o.instance_type, o.zone)).collect();
        assert_eq!(names, ["ecs.b@z1", "ecs.a@z2", "ecs.a@z1"]);
        assert_eq!(cold.len(), 1);
        let raw: Vec<Entry> =
            serde_json::from_slice(&std::fs::read(dir.path().join("stock-cooldown.json")).unwrap()).unwrap();
        assert_eq!(raw.len(), 2, "one entry per pair, renewed in place");

        let expired = Cooldown::new(dir.path(), Duration::from_secs(0));
        assert!(expired.active("cn-hangzhou").is_empty(), "a zero cooldown is off");
        std::fs::write(dir.path().join("stock-cooldown.json"), b"not json").unwrap();
        assert!(c.active("cn-hangzhou").is_empty(), "a corrupt file is ignored");
        c.record("cn-hangzhou", "ecs.c", "z3").unwrap();
        assert_eq!(c.active("cn-hangzhou").len(), 1, "and rewritten");
    }
}
