//! Spot selection: which instance types fit a job, where they are sold as spot, and which
//! offer is cheapest — and the walk that tries those offers in order until one is created.
//!
//! This exists because the whole point of the executor is to run each job on the cheapest
//! machine that fits it, and because spot capacity comes and goes: the first choice is often
//! out of stock, so selection must produce an ordered list and the create step must fall back
//! through it (the top complaint about comparable tools, PEERS.md §2 and §5). The algorithm is
//! the one of Aliyun's `spot-instance-advisor` (PEERS.md §6): `DescribeInstanceTypes`, then
//! `DescribeAvailableResource` (spot stock per zone), then `DescribeSpotPriceHistory`, keep the
//! **latest** price per (type, zone) and sort by price per core. Everything here is pure data
//! in, data out; the ECS client implements [`CatalogueSource`] elsewhere, and
//! [`crate::price_cache`] keeps a [`Catalogue`] for a few minutes across concurrent jobs.
//!
//! # Shape rules
//!
//! - Defaults per architecture ([`Shape::defaults`]): amd64 8c8g..64c64g (CPU:RAM 1:1, every
//!   family); arm64 8c16g..64c128g (1:2, families `ecs.c8y` and `ecs.c8r`).
//! - Overrides ([`Shape::with_overrides`]): when only a minimum CPU is given, the minimum memory
//!   follows from the architecture's ratio ([`Arch::default_mem_per_core`]): `min_cpu = 16` on
//!   arm64 means 16c32g. When only a minimum memory is given, the minimum CPU stays as it was.
//!   Maximums keep their defaults unless given. A minimum above its maximum is an error
//!   ([`ShapeError`]) naming both values; it is never silently "fixed" by raising the maximum.
//! - Bounds are inclusive. Memory is compared with a relative tolerance of
//!   [`MEM_TOLERANCE`] (5 %), because ECS reports the usable memory of some types a little below
//!   their nominal size (15.25 GiB for a "16 GiB" type): 15.25 fits `min_mem = 16`, 15.0 does
//!   not.
//! - Family allow-list: an entry matches a type whose `InstanceTypeFamily` starts with it, so
//!   `ecs.c8y` allows exactly that family and `ecs.c8` allows `ecs.c8i`, `ecs.c8y`, `ecs.c8a`…
//!   An empty list allows every family. A type without a family gets the first two
//!   dot-separated parts of its name (`ecs.c7.2xlarge` → `ecs.c7`).
//! - Type deny-list: an entry denies a type whose name equals it, or matches it as a glob in
//!   which `*` stands for any run of characters (`ecs.g8y.*`, `*.large`).
//!
//! # Ranking rules
//!
//! - An offer is a (type, zone) that fits the shape, is in stock as spot in that zone (the
//!   inner, per-type `Status`; a zone-level `WithStock` above a type-level `SoldOut` is *not*
//!   available), and has a price. The latest price (by timestamp) of the pair is used; among
//!   equal timestamps the higher price wins, to be conservative. A price that is NaN, infinite,
//!   zero or negative is ignored, and a pair with no valid price is dropped — never ranked as
//!   free.
//! - [`rank`] keeps only zones with a configured vswitch (those are the only zones an instance
//!   can be created in); [`rank_all`] (for `aliyun-spot prices`) keeps every zone and reports
//!   `vswitch_id: None` where none is configured.
//! - [`Ranking::PerCore`] orders by spot price ÷ cores, ties broken by total price, then type
//!   name, then zone; [`Ranking::Total`] orders by total price, ties broken by price per core
//!   (more cores for the same money first), then type name, then zone. The order is therefore
//!   fully deterministic.
//!
//! # The create-walk
//!
//! [`walk_offers`] tries offers in order through a callback that reports [`Attempt::Created`],
//! [`Attempt::NextOffer`] (stock-out, zone not on sale, price above the cap…) or
//! [`Attempt::Fatal`] (authentication, parameters…). Each skipped offer becomes one job-log line;
//! when every offer fails the result carries a one-line summary counting the reasons.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// CPU architecture of the build machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// x86-64 (`amd64`, `x86_64`); ECS spells it `X86`.
    Amd64,
    /// 64-bit ARM (`arm64`, `aarch64`); ECS spells it `ARM`.
    Arm64,
}

impl Arch {
    /// The value of ECS's `CpuArchitecture` field.
    pub fn ecs_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "X86",
            Arch::Arm64 => "ARM",
        }
    }

    /// Parses ECS's `CpuArchitecture` (`X86` | `ARM`).
    pub fn from_ecs(s: &str) -> Option<Arch> {
        match s {
            "X86" | "x86" => Some(Arch::Amd64),
            "ARM" | "Arm" | "arm" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// Memory (GiB) per core that the default shape of this architecture asks for.
    pub fn default_mem_per_core(self) -> f64 {
        match self {
            Arch::Amd64 => 1.0,
            Arch::Arm64 => 2.0,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        })
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "amd64" | "x86_64" | "x86-64" => Ok(Arch::Amd64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            other => Err(format!(
                "unknown architecture `{other}`: use `amd64` (or `x86_64`) or `arm64` (or `aarch64`)"
            )),
        }
    }
}

/// The machine a job asks for: architecture and bounds on cores and memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// Architecture.
    pub arch: Arch,
    /// Minimum vCPU count (inclusive).
    pub min_cpu: u32,
    /// Maximum vCPU count (inclusive).
    pub max_cpu: u32,
    /// Minimum memory in GiB (inclusive).
    pub min_mem_gib: f64,
    /// Maximum memory in GiB (inclusive).
    pub max_mem_gib: f64,
    /// Instance type families allowed (`ecs.c8y`); empty allows every family.
    pub families: Vec<String>,
    /// Instance types never to use (`ecs.g8y.2xlarge`).
    pub deny_types: Vec<String>,
}

impl Shape {
    /// The default shape of an architecture (SPEC.md): amd64 8c8g..64c64g at 1:1; arm64
    /// 8c16g..64c128g at 1:2 in the families `ecs.c8y` and `ecs.c8r`.
    pub fn defaults(arch: Arch) -> Shape {
        match arch {
            Arch::Amd64 => Shape {
                arch,
                min_cpu: 8,
                max_cpu: 64,
                min_mem_gib: 8.0,
                max_mem_gib: 64.0,
                families: Vec::new(),
                deny_types: Vec::new(),
            },
            Arch::Arm64 => Shape {
                arch,
                min_cpu: 8,
                max_cpu: 64,
                min_mem_gib: 16.0,
                max_mem_gib: 128.0,
                families: vec!["ecs.c8y".to_string(), "ecs.c8r".to_string()],
                deny_types: Vec::new(),
            },
        }
    }
}

/// How offers are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ranking {
    /// Spot price ÷ cores, as `spot-instance-advisor` does (the default).
    #[default]
    PerCore,
    /// Total spot price per hour.
    Total,
}

/// Relative tolerance on memory bounds: ECS reports some types' memory a little below their
/// nominal size (15.25 GiB for 16 GiB), and such a type should still fit `min_mem = 16`.
pub const MEM_TOLERANCE: f64 = 0.05;

/// A shape that cannot be satisfied, found before anything is asked of ECS.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShapeError {
    /// The minimum CPU count is above the maximum.
    #[error("minimum CPU {min} is above the maximum CPU {max}")]
    CpuMinAboveMax {
        /// Minimum vCPU count.
        min: u32,
        /// Maximum vCPU count.
        max: u32,
    },
    /// The minimum memory is above the maximum.
    #[error("minimum memory {min} GiB{} is above the maximum memory {max} GiB", derived_note(*.from_cpu, *.per_core))]
    MemMinAboveMax {
        /// Minimum memory (GiB).
        min: f64,
        /// Maximum memory (GiB).
        max: f64,
        /// The minimum CPU count the minimum memory was derived from, if it was.
        from_cpu: Option<u32>,
        /// GiB per core used for that derivation.
        per_core: f64,
    },
    /// A memory bound is NaN, infinite or negative.
    #[error("memory bound {value} GiB is not a usable number of GiB")]
    BadMemory {
        /// The offending value.
        value: f64,
    },
}

fn derived_note(from_cpu: Option<u32>, per_core: f64) -> String {
    match from_cpu {
        Some(cpu) => format!(" (from minimum CPU {cpu} at {per_core} GiB per core)"),
        None => String::new(),
    }
}

/// Optional per-job or per-command changes to a base [`Shape`] (see the module doc's rules).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShapeOverrides {
    /// Minimum vCPU count.
    pub min_cpu: Option<u32>,
    /// Maximum vCPU count.
    pub max_cpu: Option<u32>,
    /// Minimum memory (GiB).
    pub min_mem_gib: Option<f64>,
    /// Maximum memory (GiB).
    pub max_mem_gib: Option<f64>,
}

impl Shape {
    /// Applies `ov` to this shape (usually [`Shape::defaults`] or the administrator's configured
    /// shape for the architecture) and validates the result. When only `min_cpu` is given, the
    /// minimum memory becomes `min_cpu ×` [`Arch::default_mem_per_core`].
    pub fn with_overrides(&self, ov: &ShapeOverrides) -> Result<Shape, ShapeError> {
        let mut s = self.clone();
        let mut from_cpu = None;
        if let Some(c) = ov.min_cpu {
            s.min_cpu = c;
        }
        if let Some(c) = ov.max_cpu {
            s.max_cpu = c;
        }
        match (ov.min_cpu, ov.min_mem_gib) {
            (_, Some(m)) => s.min_mem_gib = m,
            (Some(c), None) => {
                s.min_mem_gib = f64::from(c) * s.arch.default_mem_per_core();
                from_cpu = Some(c);
            }
            (None, None) => {}
        }
        if let Some(m) = ov.max_mem_gib {
            s.max_mem_gib = m;
        }
        s.check(from_cpu)?;
        Ok(s)
    }

    /// Checks that the bounds are usable: finite, non-negative memory and every minimum at or
    /// below its maximum.
    pub fn validate(&self) -> Result<(), ShapeError> {
        self.check(None)
    }

    fn check(&self, from_cpu: Option<u32>) -> Result<(), ShapeError> {
        for value in [self.min_mem_gib, self.max_mem_gib] {
            if !value.is_finite() || value < 0.0 {
                return Err(ShapeError::BadMemory { value });
            }
        }
        if self.min_cpu > self.max_cpu {
            return Err(ShapeError::CpuMinAboveMax { min: self.min_cpu, max: self.max_cpu });
        }
        if self.min_mem_gib > self.max_mem_gib {
            return Err(ShapeError::MemMinAboveMax {
                min: self.min_mem_gib,
                max: self.max_mem_gib,
                from_cpu,
                per_core: self.arch.default_mem_per_core(),
            });
        }
        Ok(())
    }

    /// Whether an instance type fits: architecture, CPU and memory bounds (inclusive, memory
    /// with [`MEM_TOLERANCE`]), family allow-list, type deny-list.
    pub fn admits(&self, t: &TypeInfo) -> bool {
        t.arch == self.arch
            && t.cores >= 1
            && (self.min_cpu..=self.max_cpu).contains(&t.cores)
            && t.memory_gib.is_finite()
            && t.memory_gib >= self.min_mem_gib * (1.0 - MEM_TOLERANCE)
            && t.memory_gib <= self.max_mem_gib * (1.0 + MEM_TOLERANCE)
            && (self.families.is_empty() || {
                let family = t.family_name();
                self.families.iter().any(|f| family.starts_with(f.as_str()))
            })
            && !self.deny_types.iter().any(|d| glob_match(d, &t.id))
    }
}

/// The instance types of `types` that fit `shape` ([`Shape::admits`]), in input order.
pub fn candidates<'a>(types: &'a [TypeInfo], shape: &Shape) -> Vec<&'a TypeInfo> {
    types.iter().filter(|t| shape.admits(t)).collect()
}

/// `*` matches any run of characters (also none); everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut remaining) = name.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or("");
    for part in parts {
        match remaining.find(part) {
            Some(i) => remaining = &remaining[i + part.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last)
}

/// One instance type as `DescribeInstanceTypes` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeInfo {
    /// `InstanceTypeId`, e.g. `ecs.c7.2xlarge`.
    pub id: String,
    /// `InstanceTypeFamily`, e.g. `ecs.c7` (may be empty; see [`TypeInfo::family_name`]).
    pub family: String,
    /// `CpuCoreCount` (vCPUs).
    pub cores: u32,
    /// `MemorySize` in GiB.
    pub memory_gib: f64,
    /// `CpuArchitecture`.
    pub arch: Arch,
}

impl TypeInfo {
    /// The family, or when ECS left it empty, the first two dot-separated parts of the id.
    pub fn family_name(&self) -> &str {
        if !self.family.is_empty() {
            return &self.family;
        }
        match self.id.match_indices('.').nth(1) {
            Some((i, _)) => &self.id[..i],
            None => &self.id,
        }
    }
}

/// Whether one instance type is sold as spot in one zone (the inner, per-type level of
/// `DescribeAvailableResource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneStock {
    /// Instance type id.
    pub instance_type: String,
    /// Zone id, e.g. `cn-hangzhou-h`.
    pub zone: String,
    /// In stock now.
    pub available: bool,
}

impl ZoneStock {
    /// Builds an entry from the per-type `Status` (`Available` | `SoldOut`) and
    /// `StatusCategory` (`WithStock` | `ClosedWithStock` | `WithoutStock` |
    /// `ClosedWithoutStock`) of a `SupportedResource`. Only `Available` with a `…WithStock`
    /// category (or none) counts as available; pass the inner level, never the zone's.
    pub fn from_ecs(
        instance_type: &str,
        zone: &str,
        status: &str,
        status_category: Option<&str>,
    ) -> ZoneStock {
        let category_ok = matches!(status_category, None | Some("WithStock") | Some("ClosedWithStock"));
        ZoneStock {
            instance_type: instance_type.to_string(),
            zone: zone.to_string(),
            available: status == "Available" && category_ok,
        }
    }
}

/// One spot price observation (`DescribeSpotPriceHistory`), CNY per instance-hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PricePoint {
    /// Instance type id.
    pub instance_type: String,
    /// Zone id.
    pub zone: String,
    /// `SpotPrice`.
    pub spot: f64,
    /// `OriginPrice` (the pay-as-you-go list price), when known.
    pub on_demand: Option<f64>,
    /// `Timestamp` of the observation.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
}

/// Everything ranking needs for one region, architecture and shape; what the price cache
/// stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalogue {
    /// Region id.
    pub region: String,
    /// Architecture the catalogue was fetched for.
    pub arch: Arch,
    /// Instance types (already filtered by the shape when fetched; filtered again by [`rank`]).
    pub types: Vec<TypeInfo>,
    /// Spot stock per (type, zone).
    pub stock: Vec<ZoneStock>,
    /// Price observations; the latest per (type, zone) is the current price.
    pub prices: Vec<PricePoint>,
    /// When the data was fetched (UTC); the price cache ages entries by it.
    #[serde(with = "time::serde::rfc3339")]
    pub fetched_at: OffsetDateTime,
}

/// Where catalogue data comes from: the ECS API (implemented by the ECS client) or, in tests
/// and benchmarks, [`MemorySource`]. One method per API call family.
pub trait CatalogueSource {
    /// Instance types of the shape's architecture (`DescribeInstanceTypes`); may return more
    /// than fit, the caller filters with [`Shape::admits`].
    fn instance_types(&self, shape: &Shape) -> anyhow::Result<Vec<TypeInfo>>;
    /// Spot stock per (type, zone) (`DescribeAvailableResource`, inner level).
    fn spot_stock(&self, shape: &Shape) -> anyhow::Result<Vec<ZoneStock>>;
    /// Recent prices of the given types in the given zones (`DescribeSpotPriceHistory`).
    fn latest_prices(&self, types: &[TypeInfo], zones: &[String]) -> anyhow::Result<Vec<PricePoint>>;
}

/// Fetches a [`Catalogue`] from `source` for `shape`, stamped with the current time: the
/// fitting types, their available stock, and prices for those types in the zones where they
/// are available. When nothing fits or nothing is in stock, the price call is skipped.
pub fn fetch_catalogue(
    source: &dyn CatalogueSource,
    region: &str,
    shape: &Shape,
) -> anyhow::Result<Catalogue> {
    let types: Vec<TypeInfo> =
        source.instance_types(shape)?.into_iter().filter(|t| shape.admits(t)).collect();
    let names: BTreeSet<&str> = types.iter().map(|t| t.id.as_str()).collect();
    let stock: Vec<ZoneStock> = if types.is_empty() {
        Vec::new()
    } else {
        source
            .spot_stock(shape)?
            .into_iter()
            .filter(|s| s.available && names.contains(s.instance_type.as_str()))
            .collect()
    };
    let stocked: BTreeSet<&str> = stock.iter().map(|s| s.instance_type.as_str()).collect();
    let zones: Vec<String> =
        stock.iter().map(|s| s.zone.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let priced_types: Vec<TypeInfo> =
        types.iter().filter(|t| stocked.contains(t.id.as_str())).cloned().collect();
    let prices =
        if priced_types.is_empty() { Vec::new() } else { source.latest_prices(&priced_types, &zones)? };
    Ok(Catalogue {
        region: region.to_string(),
        arch: shape.arch,
        types,
        stock,
        prices,
        fetched_at: OffsetDateTime::now_utc(),
    })
}

/// An in-memory [`CatalogueSource`] that counts its calls, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct MemorySource {
    /// Every instance type known.
    pub types: Vec<TypeInfo>,
    /// Stock per (type, zone).
    pub stock: Vec<ZoneStock>,
    /// Price history.
    pub prices: Vec<PricePoint>,
    calls: AtomicUsize,
}

impl MemorySource {
    /// A source answering with these tables.
    pub fn new(types: Vec<TypeInfo>, stock: Vec<ZoneStock>, prices: Vec<PricePoint>) -> MemorySource {
        MemorySource { types, stock, prices, calls: AtomicUsize::new(0) }
    }

    /// How many calls (of any method) were made so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl CatalogueSource for MemorySource {
    fn instance_types(&self, shape: &Shape) -> anyhow::Result<Vec<TypeInfo>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(self.types.iter().filter(|t| t.arch == shape.arch).cloned().collect())
    }

    fn spot_stock(&self, shape: &Shape) -> anyhow::Result<Vec<ZoneStock>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let arch_types: BTreeSet<&str> =
            self.types.iter().filter(|t| t.arch == shape.arch).map(|t| t.id.as_str()).collect();
        Ok(self.stock.iter().filter(|s| arch_types.contains(s.instance_type.as_str())).cloned().collect())
    }

    fn latest_prices(&self, types: &[TypeInfo], zones: &[String]) -> anyhow::Result<Vec<PricePoint>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let wanted: BTreeSet<&str> = types.iter().map(|t| t.id.as_str()).collect();
        Ok(self
            .prices
            .iter()
            .filter(|p| wanted.contains(p.instance_type.as_str()) && zones.iter().any(|z| *z == p.zone))
            .cloned()
            .collect())
    }
}

/// One ranked spot offer: an instance type in a zone at its current price (CNY/hour).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Instance type id.
    pub instance_type: String,
    /// Instance type family.
    pub family: String,
    /// Zone id.
    pub zone: String,
    /// vCPUs.
    pub cores: u32,
    /// Memory in GiB.
    pub memory_gib: f64,
    /// Current spot price, CNY per hour.
    pub spot_price: f64,
    /// `spot_price ÷ cores`.
    pub price_per_core: f64,
    /// Pay-as-you-go list price, CNY per hour, when known.
    pub on_demand_price: Option<f64>,
    /// `spot_price ÷ on_demand_price` as a fraction (0.15 = 15 % of the list price).
    pub discount: Option<f64>,
    /// The configured vswitch of the zone; `None` only in [`rank_all`]'s listing.
    pub vswitch_id: Option<String>,
    /// Whether a vswitch is configured for the zone (an instance can be created there).
    pub vswitch_configured: bool,
}

impl Offer {
    /// The discount as `spot-instance-advisor` prints it, in "折" (tenths of the list price):
    /// 1.5 means the spot price is 15 % of the list price.
    pub fn discount_zhe(&self) -> Option<f64> {
        self.discount.map(|d| d * 10.0)
    }
}

fn valid_price(p: f64) -> bool {
    p.is_finite() && p > 0.0
}

/// The offers that can be created, cheapest first: only zones with a configured vswitch in
/// `vswitches` (zone → vswitch id). See the module doc for the rules.
pub fn rank(
    cat: &Catalogue,
    shape: &Shape,
    vswitches: &BTreeMap<String, String>,
    ranking: Ranking,
) -> Vec<Offer> {
    rank_inner(cat, shape, vswitches, ranking, false)
}

/// Like [`rank`], but keeps zones without a vswitch (with `vswitch_id: None`), for listings.
pub fn rank_all(
    cat: &Catalogue,
    shape: &Shape,
    vswitches: &BTreeMap<String, String>,
    ranking: Ranking,
) -> Vec<Offer> {
    rank_inner(cat, shape, vswitches, ranking, true)
}

fn rank_inner(
    cat: &Catalogue,
    shape: &Shape,
    vswitches: &BTreeMap<String, String>,
    ranking: Ranking,
    all_zones: bool,
) -> Vec<Offer> {
    let types: HashMap<&str, &TypeInfo> =
        cat.types.iter().filter(|t| shape.admits(t)).map(|t| (t.id.as_str(), t)).collect();

    // (type, zone) → in stock; one unavailable entry makes the pair unavailable.
    let mut stock: HashMap<(&str, &str), bool> = HashMap::new();
    for s in &cat.stock {
        if !types.contains_key(s.instance_type.as_str()) {
            continue;
        }
        stock
            .entry((s.instance_type.as_str(), s.zone.as_str()))
            .and_modify(|a| *a &= s.available)
            .or_insert(s.available);
    }

    // (type, zone) → latest valid price point.
    let mut latest: HashMap<(&str, &str), &PricePoint> = HashMap::new();
    for p in &cat.prices {
        if !valid_price(p.spot) {
            log::debug!("ignoring invalid spot price {} of `{}` in `{}`", p.spot, p.instance_type, p.zone);
            continue;
        }
        let key = (p.instance_type.as_str(), p.zone.as_str());
        if stock.get(&key) != Some(&true) {
            continue;
        }
        latest
            .entry(key)
            .and_modify(|cur| {
                if (p.timestamp, p.spot) > (cur.timestamp, cur.spot) {
                    *cur = p;
                }
            })
            .or_insert(p);
    }

    let mut offers: Vec<Offer> = Vec::with_capacity(latest.len());
    for ((ty, zone), p) in latest {
        let vswitch_id = vswitches.get(zone).cloned();
        if vswitch_id.is_none() && !all_zones {
            continue;
        }
        let t = types[ty];
        let on_demand = p.on_demand.filter(|v| valid_price(*v));
        offers.push(Offer {
            instance_type: t.id.clone(),
            family: t.family_name().to_string(),
            zone: zone.to_string(),
            cores: t.cores,
            memory_gib: t.memory_gib,
            spot_price: p.spot,
            price_per_core: p.spot / f64::from(t.cores),
            on_demand_price: on_demand,
            discount: on_demand.map(|od| p.spot / od),
            vswitch_configured: vswitch_id.is_some(),
            vswitch_id,
        });
    }
    offers.sort_by(|a, b| {
        let (first, second) = match ranking {
            Ranking::PerCore => {
                (a.price_per_core.total_cmp(&b.price_per_core), a.spot_price.total_cmp(&b.spot_price))
            }
            Ranking::Total => {
                (a.spot_price.total_cmp(&b.spot_price), a.price_per_core.total_cmp(&b.price_per_core))
            }
        };
        first
            .then(second)
            .then_with(|| a.instance_type.cmp(&b.instance_type))
            .then_with(|| a.zone.cmp(&b.zone))
    });
    offers
}

/// The `SpotPriceLimit` to send with `SpotWithPriceLimit`: `factor × spot`, rounded up to 4
/// decimals (never below the current price), clamped to the hard `cap` (CNY/hour) when one is
/// set. `None` when the current price is already above the cap (skip the offer; see
/// [`above_cap_reason`]) or is not a usable price. `factor` must be ≥ 1.0 (the configuration
/// validates it); a smaller one is treated as 1.0.
pub fn price_limit(spot: f64, factor: f64, cap: Option<f64>) -> Option<f64> {
    debug_assert!(factor >= 1.0, "price limit factor {factor} below 1.0");
    if !valid_price(spot) {
        return None;
    }
    if let Some(cap) = cap {
        if spot > cap {
            return None;
        }
    }
    let factor = factor.max(1.0);
    // The small epsilon keeps 0.1 × 1.2 = 0.12000000000000001 at 0.12 instead of 0.1201.
    let mut ticks = (spot * factor * 10_000.0 - 1e-6).ceil();
    if ticks / 10_000.0 < spot {
        ticks += 1.0;
    }
    let limit = ticks / 10_000.0;
    Some(match cap {
        Some(cap) if limit > cap => cap,
        _ => limit,
    })
}

/// The skip reason for an offer whose spot price is above the hard cap (the same text for
/// every such offer, so the walk's summary counts them together).
pub fn above_cap_reason(cap: f64) -> String {
    format!("spot price above the cap of {cap} CNY/hour")
}

/// What one create attempt reported to [`walk_offers`].
#[derive(Debug)]
pub enum Attempt<T, E = anyhow::Error> {
    /// The instance was created; the walk stops.
    Created(T),
    /// This offer cannot be used (stock-out, zone not on sale, above the cap…); the reason is
    /// short and stable, e.g. `out of stock (OperationDenied.NoStock)`, because the summary
    /// counts offers by it.
    NextOffer(String),
    /// Stop at once (authentication, permission, parameter errors…).
    Fatal(E),
}

/// How [`walk_offers`] ended.
#[derive(Debug)]
pub enum WalkResult<T, E = anyhow::Error> {
    /// An offer was created.
    Created {
        /// The offer that worked.
        offer: Offer,
        /// What the callback returned.
        value: T,
        /// Offers skipped before it, with their reasons.
        skipped: Vec<(Offer, String)>,
    },
    /// Every offer was skipped (or there were none).
    Exhausted {
        /// One line: `all 3 offers failed: 2 out of stock (…), 1 zone not on sale (…)`.
        summary: String,
        /// Every offer with its reason, in the order tried.
        skipped: Vec<(Offer, String)>,
    },
    /// An attempt failed in a way no other offer can fix.
    Fatal {
        /// The offer being tried.
        offer: Offer,
        /// The error.
        error: E,
        /// Offers skipped before it, with their reasons.
        skipped: Vec<(Offer, String)>,
    },
}

/// Tries `offers` in order with `try_create` until one is created or one fails fatally. Each
/// skipped offer is reported through `log` as one line for the job log:
/// `ecs.c7.2xlarge in cn-hangzhou-h: out of stock (OperationDenied.NoStock), trying the next
/// offer` (the last one says `no offers left` instead).
pub fn walk_offers<T, E>(
    offers: &[Offer],
    mut try_create: impl FnMut(&Offer) -> Attempt<T, E>,
    mut log: impl FnMut(&str),
) -> WalkResult<T, E> {
    let mut skipped: Vec<(Offer, String)> = Vec::new();
    for (i, offer) in offers.iter().enumerate() {
        match try_create(offer) {
            Attempt::Created(value) => return WalkResult::Created { offer: offer.clone(), value, skipped },
            Attempt::Fatal(error) => return WalkResult::Fatal { offer: offer.clone(), error, skipped },
            Attempt::NextOffer(reason) => {
                let next = if i + 1 < offers.len() { "trying the next offer" } else { "no offers left" };
                log(&format!("{} in {}: {reason}, {next}", offer.instance_type, offer.zone));
                skipped.push((offer.clone(), reason));
            }
        }
    }
    let summary = summarize(&skipped);
    WalkResult::Exhausted { summary, skipped }
}

fn summarize(skipped: &[(Offer, String)]) -> String {
    if skipped.is_empty() {
        return "no offers to try".to_string();
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for (_, reason) in skipped {
        match counts.iter_mut().find(|(r, _)| *r == reason.as_str()) {
            Some((_, n)) => *n += 1,
            None => counts.push((reason.as_str(), 1)),
        }
    }
    if let [(_, reason)] = skipped {
        return format!("the only offer failed: {reason}");
    }
    let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!("all {} offers failed: {}", skipped.len(), parts.join(", "))
}
