//! Spot selection: which instance types fit a job, where they are sold as spot, and which
//! offer is cheapest — and the walk that tries those offers in order until one is created.
//!
//! This exists because the whole point of the executor is to run each job on the cheapest
//! machine that fits it, and because spot capacity comes and goes: the first choice is often
//! out of stock, so selection must produce an ordered list and the create step must fall back
//! through it (a stock-out must not fail a job while another zone or type has stock). The
//! algorithm is the one of Aliyun's `spot-instance-advisor`
//! (github.com/AliyunContainerService/spot-instance-advisor, `meta.go`): `DescribeInstanceTypes`, then
//! `DescribeAvailableResource` (spot stock per zone), then `DescribeSpotPriceHistory`, keep the
//! **latest** price per (type, zone) and sort by price per core. Everything here is pure data
//! in, data out; the ECS client implements [`CatalogueSource`] elsewhere, and
//! [`crate::price_cache`] keeps a [`Catalogue`] for a few minutes across concurrent jobs.
//!
//! # Shape rules
//!
//! - Defaults per architecture ([`Shape::defaults`]): amd64 8c8g..64c64g (CPU:RAM 1:1, every
//!   family); arm64 8c16g..64c128g (1:2, families `ecs.c8y` and `ecs.c8r`).
//! - What a job (or `aliyun-spot prices`) asks for changes the configured shape by one rule,
//!   [`crate::config::Config::shape_for`], within the administrator's ceilings. A configured
//!   minimum above its maximum is an error ([`ShapeError`]) naming both values.
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

pub use crate::families::TypeKinds;

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
    /// Shared, burstable and GPU types allowed besides ordinary ones (none by default; see
    /// [`crate::families`]).
    #[serde(default)]
    pub kinds: TypeKinds,
}

impl Shape {
    /// The default shape of an architecture (docs/configuration.md, `[shape.amd64]`): amd64 8c8g..64c64g at 1:1; arm64
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
                kinds: TypeKinds::default(),
            },
            Arch::Arm64 => Shape {
                arch,
                min_cpu: 8,
                max_cpu: 64,
                min_mem_gib: 16.0,
                max_mem_gib: 128.0,
                families: vec!["ecs.c8y".to_string(), "ecs.c8r".to_string()],
                deny_types: Vec::new(),
                kinds: TypeKinds::default(),
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
    #[error("minimum memory {min} GiB is above the maximum memory {max} GiB")]
    MemMinAboveMax {
        /// Minimum memory (GiB).
        min: f64,
        /// Maximum memory (GiB).
        max: f64,
    },
    /// A memory bound is NaN, infinite or negative.
    #[error("memory bound {value} GiB is not a usable number of GiB")]
    BadMemory {
        /// The offending value.
        value: f64,
    },
}

impl Shape {
    /// Checks that the bounds are usable: finite, non-negative memory and every minimum at or
    /// below its maximum.
    pub fn validate(&self) -> Result<(), ShapeError> {
        for value in [self.min_mem_gib, self.max_mem_gib] {
            if !value.is_finite() || value < 0.0 {
                return Err(ShapeError::BadMemory { value });
            }
        }
        if self.min_cpu > self.max_cpu {
            return Err(ShapeError::CpuMinAboveMax { min: self.min_cpu, max: self.max_cpu });
        }
        if self.min_mem_gib > self.max_mem_gib {
            return Err(ShapeError::MemMinAboveMax { min: self.min_mem_gib, max: self.max_mem_gib });
        }
        Ok(())
    }

    /// Whether an instance type fits: architecture, CPU and memory bounds (inclusive, memory
    /// with [`MEM_TOLERANCE`]), family allow-list, type deny-list, and the allowed kinds (shared,
    /// burstable, GPU: [`TypeKinds`]).
    pub fn admits(&self, t: &TypeInfo) -> bool {
        t.arch == self.arch
            && self.kinds.admits(&t.family_level, t.gpu_amount, &t.gpu_spec)
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
    /// `InstanceFamilyLevel` (`EntryLevel`, `EnterpriseLevel`, `CreditEntryLevel`; may be empty).
    #[serde(default)]
    pub family_level: String,
    /// `GPUAmount`.
    #[serde(default)]
    pub gpu_amount: u32,
    /// `GPUSpec` (empty without a GPU).
    #[serde(default)]
    pub gpu_spec: String,
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
    /// category (or none) counts as available; pass the inner level, never the zone's. A missing
    /// category is `None`: the current SDK's response model
    /// (`_describe_available_resource_response_body.py`) declares `StatusCategory` an optional
    /// string, so its absence says nothing and `Status` alone decides.
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

/// One spot price observation (`DescribeSpotPriceHistory`), per instance-hour in the
/// catalogue's currency.
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
    /// The currency of every price (`Currency` of `DescribeSpotPriceHistory`: `CNY` or `USD`).
    #[serde(default = "default_currency")]
    pub currency: String,
    /// When the data was fetched (UTC); the price cache ages entries by it.
    #[serde(with = "time::serde::rfc3339")]
    pub fetched_at: OffsetDateTime,
}

fn default_currency() -> String {
    crate::pricing::DEFAULT_CURRENCY.to_string()
}

/// Prices as [`CatalogueSource::latest_prices`] returns them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceList {
    /// The observations.
    pub points: Vec<PricePoint>,
    /// The answers' `Currency`, when they named one.
    pub currency: Option<String>,
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
    fn latest_prices(&self, types: &[TypeInfo], zones: &[String]) -> anyhow::Result<PriceList>;
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
    let prices = if priced_types.is_empty() {
        PriceList::default()
    } else {
        source.latest_prices(&priced_types, &zones)?
    };
    Ok(Catalogue {
        region: region.to_string(),
        arch: shape.arch,
        types,
        stock,
        prices: prices.points,
        currency: prices.currency.unwrap_or_else(default_currency),
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
    /// The currency the prices are answered in (`None`: not named).
    pub currency: Option<String>,
    calls: AtomicUsize,
}

impl MemorySource {
    /// A source answering with these tables.
    pub fn new(types: Vec<TypeInfo>, stock: Vec<ZoneStock>, prices: Vec<PricePoint>) -> MemorySource {
        MemorySource { types, stock, prices, currency: None, calls: AtomicUsize::new(0) }
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

    fn latest_prices(&self, types: &[TypeInfo], zones: &[String]) -> anyhow::Result<PriceList> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let wanted: BTreeSet<&str> = types.iter().map(|t| t.id.as_str()).collect();
        let points = self
            .prices
            .iter()
            .filter(|p| wanted.contains(p.instance_type.as_str()) && zones.contains(&p.zone))
            .cloned()
            .collect();
        Ok(PriceList { points, currency: self.currency.clone() })
    }
}

/// One ranked spot offer: an instance type in a zone at its current price per hour, in
/// `currency`.
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
    /// Current spot price per hour.
    pub spot_price: f64,
    /// `spot_price ÷ cores`.
    pub price_per_core: f64,
    /// Pay-as-you-go list price per hour, when known.
    pub on_demand_price: Option<f64>,
    /// `spot_price ÷ on_demand_price` as a fraction (0.15 = 15 % of the list price, i.e. 85 %
    /// off; [`crate::pricing::percent_off`] labels it).
    pub discount: Option<f64>,
    /// The currency of the prices (`CNY`, `USD`).
    #[serde(default = "default_currency")]
    pub currency: String,
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
            currency: cat.currency.clone(),
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

pub use crate::pricing::{above_cap_reason, price_limit};

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

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration as TimeDelta;

    fn ty(id: &str, cores: u32, mem: f64, arch: Arch) -> TypeInfo {
        TypeInfo {
            id: id.to_string(),
            family: String::new(),
            cores,
            memory_gib: mem,
            arch,
            family_level: String::new(),
            gpu_amount: 0,
            gpu_spec: String::new(),
        }
    }

    fn x86(id: &str, cores: u32, mem: f64) -> TypeInfo {
        ty(id, cores, mem, Arch::Amd64)
    }

    fn arm(id: &str, cores: u32, mem: f64) -> TypeInfo {
        ty(id, cores, mem, Arch::Arm64)
    }

    fn stock(t: &str, zone: &str, available: bool) -> ZoneStock {
        ZoneStock { instance_type: t.to_string(), zone: zone.to_string(), available }
    }

    fn base_time() -> OffsetDateTime {
        time::macros::datetime!(2026-01-10 12:00 UTC)
    }

    fn price(t: &str, zone: &str, spot: f64, on_demand: Option<f64>, minutes_ago: i64) -> PricePoint {
        PricePoint {
            instance_type: t.to_string(),
            zone: zone.to_string(),
            spot,
            on_demand,
            timestamp: base_time() - TimeDelta::minutes(minutes_ago),
        }
    }

    fn catalogue(
        arch: Arch,
        types: Vec<TypeInfo>,
        stock: Vec<ZoneStock>,
        prices: Vec<PricePoint>,
    ) -> Catalogue {
        Catalogue {
            region: "cn-hangzhou".into(),
            arch,
            types,
            stock,
            prices,
            currency: "CNY".into(),
            fetched_at: base_time(),
        }
    }

    fn vswitches(zones: &[&str]) -> BTreeMap<String, String> {
        zones.iter().map(|z| (format!("cn-hangzhou-{z}"), format!("vsw-{z}"))).collect()
    }

    fn order(offers: &[Offer]) -> Vec<String> {
        offers
            .iter()
            .map(|o| format!("{}@{}", o.instance_type, o.zone.trim_start_matches("cn-hangzhou-")))
            .collect()
    }

    const H: &str = "cn-hangzhou-h";
    const B: &str = "cn-hangzhou-b";
    const G: &str = "cn-hangzhou-g";

    #[test]
    fn per_core_and_total_rankings_differ() {
        let cat = catalogue(
            Arch::Amd64,
            vec![x86("ecs.c7.2xlarge", 8, 16.0), x86("ecs.c7.4xlarge", 16, 32.0)],
            vec![stock("ecs.c7.2xlarge", H, true), stock("ecs.c7.4xlarge", H, true)],
            vec![price("ecs.c7.2xlarge", H, 1.0, Some(5.0), 1), price("ecs.c7.4xlarge", H, 1.6, None, 1)],
        );
        let shape = Shape::defaults(Arch::Amd64);
        let vsw = vswitches(&["h"]);
        let per_core = rank(&cat, &shape, &vsw, Ranking::PerCore);
        assert_eq!(order(&per_core), ["ecs.c7.4xlarge@h", "ecs.c7.2xlarge@h"]);
        assert_eq!(
            order(&rank(&cat, &shape, &vsw, Ranking::Total)),
            ["ecs.c7.2xlarge@h", "ecs.c7.4xlarge@h"]
        );

        let o = &per_core[1];
        assert_eq!(o.family, "ecs.c7");
        assert_eq!((o.cores, o.memory_gib, o.spot_price, o.price_per_core), (8, 16.0, 1.0, 0.125));
        assert_eq!((o.on_demand_price, o.discount, o.discount_zhe()), (Some(5.0), Some(0.2), Some(2.0)));
        assert_eq!((o.vswitch_id.as_deref(), o.vswitch_configured), (Some("vsw-h"), true));
        assert_eq!((per_core[0].on_demand_price, per_core[0].discount), (None, None));
    }

    #[test]
    fn ties_break_by_total_then_type_then_zone() {
        // All three cost 0.1 per core; 0.8 / 8 and 1.6 / 16 are exactly equal in binary.
        let types = vec![
            x86("ecs.c7.2xlarge", 8, 16.0),
            x86("ecs.c6.2xlarge", 8, 16.0),
            x86("ecs.c7.4xlarge", 16, 32.0),
        ];
        let stock = vec![
            stock("ecs.c7.2xlarge", H, true),
            stock("ecs.c7.2xlarge", B, true),
            stock("ecs.c6.2xlarge", H, true),
            stock("ecs.c7.4xlarge", B, true),
        ];
        let prices = vec![
            price("ecs.c7.2xlarge", H, 0.8, None, 1),
            price("ecs.c7.2xlarge", B, 0.8, None, 1),
            price("ecs.c6.2xlarge", H, 0.8, None, 1),
            price("ecs.c7.4xlarge", B, 1.6, None, 1),
        ];
        let cat = catalogue(Arch::Amd64, types, stock, prices);
        let shape = Shape::defaults(Arch::Amd64);
        let vsw = vswitches(&["b", "h"]);
        let expected = ["ecs.c6.2xlarge@h", "ecs.c7.2xlarge@b", "ecs.c7.2xlarge@h", "ecs.c7.4xlarge@b"];
        assert_eq!(order(&rank(&cat, &shape, &vsw, Ranking::PerCore)), expected);
        // By total, the 16-core type is last; the equal 8-core ones keep the name/zone order.
        assert_eq!(order(&rank(&cat, &shape, &vsw, Ranking::Total)), expected);
        // The order does not depend on the input order.
        let mut reversed = cat.clone();
        reversed.prices.reverse();
        reversed.stock.reverse();
        reversed.types.reverse();
        assert_eq!(order(&rank(&reversed, &shape, &vsw, Ranking::PerCore)), expected);
    }

    #[test]
    fn total_ranking_prefers_more_cores_for_the_same_price() {
        let cat = catalogue(
            Arch::Amd64,
            vec![x86("ecs.a.2xlarge", 8, 16.0), x86("ecs.z.4xlarge", 16, 32.0)],
            vec![stock("ecs.a.2xlarge", H, true), stock("ecs.z.4xlarge", H, true)],
            vec![price("ecs.a.2xlarge", H, 1.0, None, 1), price("ecs.z.4xlarge", H, 1.0, None, 1)],
        );
        let offers = rank(&cat, &Shape::defaults(Arch::Amd64), &vswitches(&["h"]), Ranking::Total);
        assert_eq!(order(&offers), ["ecs.z.4xlarge@h", "ecs.a.2xlarge@h"]);
    }

    #[test]
    fn latest_price_wins_and_missing_or_invalid_prices_are_dropped() {
        let types = vec![
            x86("ecs.c7.2xlarge", 8, 16.0),
            x86("ecs.c6.2xlarge", 8, 16.0),
            x86("ecs.g7.2xlarge", 8, 32.0),
            x86("ecs.r7.2xlarge", 8, 64.0),
        ];
        let stock = vec![
            stock("ecs.c7.2xlarge", H, true),
            stock("ecs.c6.2xlarge", H, true),
            stock("ecs.g7.2xlarge", H, true),
            stock("ecs.r7.2xlarge", H, true),
        ];
        let prices = vec![
            // Older and cheaper, then newer and dearer: the newer one is the current price.
            price("ecs.c7.2xlarge", H, 0.5, None, 60),
            price("ecs.c7.2xlarge", H, 0.9, None, 5),
            // Only unusable prices: dropped, never ranked as free.
            price("ecs.c6.2xlarge", H, f64::NAN, None, 1),
            price("ecs.c6.2xlarge", H, -1.0, None, 2),
            price("ecs.c6.2xlarge", H, 0.0, None, 3),
            price("ecs.c6.2xlarge", H, f64::INFINITY, None, 4),
            // A NaN newest point is ignored; the valid older one stands, with a bad list price.
            price("ecs.g7.2xlarge", H, 0.7, Some(f64::NAN), 10),
            price("ecs.g7.2xlarge", H, f64::NAN, None, 1),
            // ecs.r7.2xlarge: in stock, no price at all.
        ];
        let cat = catalogue(Arch::Amd64, types, stock, prices);
        let offers = rank(&cat, &Shape::defaults(Arch::Amd64), &vswitches(&["h"]), Ranking::PerCore);
        assert_eq!(order(&offers), ["ecs.g7.2xlarge@h", "ecs.c7.2xlarge@h"]);
        assert_eq!(offers[1].spot_price, 0.9);
        assert_eq!((offers[0].on_demand_price, offers[0].discount), (None, None));
    }

    #[test]
    fn inner_sold_out_is_not_available() {
        assert!(ZoneStock::from_ecs("ecs.c7.2xlarge", H, "Available", Some("WithStock")).available);
        assert!(ZoneStock::from_ecs("ecs.c7.2xlarge", H, "Available", Some("ClosedWithStock")).available);
        assert!(ZoneStock::from_ecs("ecs.c7.2xlarge", H, "Available", None).available);
        assert!(!ZoneStock::from_ecs("ecs.c7.2xlarge", H, "SoldOut", Some("WithStock")).available);
        assert!(!ZoneStock::from_ecs("ecs.c7.2xlarge", H, "Available", Some("WithoutStock")).available);
        assert!(!ZoneStock::from_ecs("ecs.c7.2xlarge", H, "SoldOut", Some("ClosedWithoutStock")).available);

        let cat = catalogue(
            Arch::Amd64,
            vec![x86("ecs.c7.2xlarge", 8, 16.0)],
            vec![
                ZoneStock::from_ecs("ecs.c7.2xlarge", H, "SoldOut", Some("WithStock")),
                stock("ecs.c7.2xlarge", B, true),
                // Contradicting entries for one pair: not available.
                stock("ecs.c7.2xlarge", G, true),
                stock("ecs.c7.2xlarge", G, false),
            ],
            vec![
                price("ecs.c7.2xlarge", H, 0.1, None, 1),
                price("ecs.c7.2xlarge", B, 0.9, None, 1),
                price("ecs.c7.2xlarge", G, 0.2, None, 1),
            ],
        );
        let offers =
            rank(&cat, &Shape::defaults(Arch::Amd64), &vswitches(&["b", "g", "h"]), Ranking::PerCore);
        assert_eq!(order(&offers), ["ecs.c7.2xlarge@b"]);
    }

    #[test]
    fn zones_without_vswitch_are_only_listed() {
        let cat = catalogue(
            Arch::Amd64,
            vec![x86("ecs.c7.2xlarge", 8, 16.0)],
            vec![stock("ecs.c7.2xlarge", H, true), stock("ecs.c7.2xlarge", B, true)],
            vec![price("ecs.c7.2xlarge", H, 0.5, None, 1), price("ecs.c7.2xlarge", B, 0.4, None, 1)],
        );
        let shape = Shape::defaults(Arch::Amd64);
        let vsw = vswitches(&["h"]);
        assert_eq!(order(&rank(&cat, &shape, &vsw, Ranking::PerCore)), ["ecs.c7.2xlarge@h"]);
        let all = rank_all(&cat, &shape, &vsw, Ranking::PerCore);
        assert_eq!(order(&all), ["ecs.c7.2xlarge@b", "ecs.c7.2xlarge@h"]);
        assert_eq!((all[0].vswitch_id.as_deref(), all[0].vswitch_configured), (None, false));
        assert_eq!((all[1].vswitch_id.as_deref(), all[1].vswitch_configured), (Some("vsw-h"), true));
        assert!(rank(&cat, &shape, &BTreeMap::new(), Ranking::PerCore).is_empty());
    }

    #[test]
    fn defaults_per_architecture() {
        let amd = Shape::defaults(Arch::Amd64);
        assert_eq!((amd.min_cpu, amd.max_cpu, amd.min_mem_gib, amd.max_mem_gib), (8, 64, 8.0, 64.0));
        assert!(amd.families.is_empty() && amd.deny_types.is_empty());
        assert!(amd.admits(&x86("ecs.c7.2xlarge", 8, 16.0)));
        assert!(amd.admits(&x86("ecs.u1.16xlarge", 64, 64.0)));
        assert!(!amd.admits(&x86("ecs.c7.xlarge", 4, 8.0)), "below 8 cores");
        assert!(!amd.admits(&x86("ecs.c7.16xlarge", 64, 128.0)), "above 64 GiB");
        assert!(!amd.admits(&arm("ecs.c8y.2xlarge", 8, 16.0)), "wrong architecture");

        let arm64 = Shape::defaults(Arch::Arm64);
        assert_eq!(
            (arm64.min_cpu, arm64.max_cpu, arm64.min_mem_gib, arm64.max_mem_gib),
            (8, 64, 16.0, 128.0)
        );
        assert_eq!(arm64.families, ["ecs.c8y", "ecs.c8r"]);
        assert!(arm64.admits(&arm("ecs.c8y.2xlarge", 8, 16.0)));
        assert!(arm64.admits(&arm("ecs.c8r.16xlarge", 64, 128.0)));
        assert!(!arm64.admits(&arm("ecs.g8y.2xlarge", 8, 32.0)), "family not allowed");
        assert!(!arm64.admits(&arm("ecs.c8y.xlarge", 4, 8.0)));
        assert!(!arm64.admits(&x86("ecs.c8i.2xlarge", 8, 16.0)));
        assert_eq!(amd.validate(), Ok(()));
        assert_eq!(arm64.validate(), Ok(()));
    }

    #[test]
    fn min_above_max_is_an_error_naming_both() {
        let amd = Shape::defaults(Arch::Amd64);
        let err = Shape { min_cpu: 96, ..amd.clone() }.validate().unwrap_err();
        assert_eq!(err.to_string(), "minimum CPU 96 is above the maximum CPU 64");
        let err = Shape { max_mem_gib: 4.5, ..amd.clone() }.validate().unwrap_err();
        assert_eq!(err.to_string(), "minimum memory 8 GiB is above the maximum memory 4.5 GiB");
        let err = Shape { max_mem_gib: f64::NAN, ..amd }.validate().unwrap_err();
        assert_eq!(err.to_string(), "memory bound NaN GiB is not a usable number of GiB");
    }

    #[test]
    fn memory_bounds_have_a_small_tolerance() {
        let shape = Shape { min_mem_gib: 16.0, max_mem_gib: 16.0, ..Shape::defaults(Arch::Amd64) };
        assert!(shape.admits(&x86("ecs.t.2xlarge", 8, 15.25)));
        assert!(shape.admits(&x86("ecs.t.2xlarge", 8, 16.0)));
        assert!(!shape.admits(&x86("ecs.t.2xlarge", 8, 15.0)));
        assert!(!shape.admits(&x86("ecs.t.2xlarge", 8, 17.0)));
        assert!(!shape.admits(&x86("ecs.t.2xlarge", 8, f64::NAN)));
        assert!(!Shape { min_cpu: 0, ..shape }.admits(&x86("ecs.zero", 0, 16.0)), "zero cores never fit");
    }

    #[test]
    fn deny_list_matches_exactly_or_by_glob() {
        let shape = Shape {
            deny_types: vec!["ecs.c7.2xlarge".into(), "ecs.g8*".into(), "*.8xlarge".into()],
            ..Shape::defaults(Arch::Amd64)
        };
        assert!(!shape.admits(&x86("ecs.c7.2xlarge", 8, 16.0)));
        assert!(shape.admits(&x86("ecs.c7.2xlarge-x", 8, 16.0)), "exact entries are not prefixes");
        assert!(!shape.admits(&x86("ecs.g8i.2xlarge", 8, 32.0)));
        assert!(!shape.admits(&x86("ecs.c6.8xlarge", 32, 64.0)));
        assert!(shape.admits(&x86("ecs.c6.4xlarge", 16, 32.0)));

        assert!(glob_match("*", "anything"));
        assert!(glob_match("ecs.*.2x*", "ecs.c7.2xlarge"));
        assert!(!glob_match("ecs.*.2x*", "ecs.c7.4xlarge"));
        assert!(glob_match("a*b*b", "abb"));
        assert!(!glob_match("ab*ba", "aba"), "prefix and suffix may not overlap");
        assert!(!glob_match("", "x"));
    }

    #[test]
    fn family_allow_list_is_a_prefix_match() {
        let shape = Shape { families: vec!["ecs.c8".into()], ..Shape::defaults(Arch::Amd64) };
        assert!(shape.admits(&x86("ecs.c8i.2xlarge", 8, 16.0)));
        assert!(shape.admits(&x86("ecs.c8a.2xlarge", 8, 16.0)));
        assert!(!shape.admits(&x86("ecs.c7.2xlarge", 8, 16.0)));
        let exact = Shape { families: vec!["ecs.c8i".into()], ..Shape::defaults(Arch::Amd64) };
        assert!(!exact.admits(&x86("ecs.c8a.2xlarge", 8, 16.0)));
        // The declared family is used when present.
        let mut t = x86("ecs.odd-name", 8, 16.0);
        assert_eq!(t.family_name(), "ecs.odd-name");
        t.family = "ecs.c8i".into();
        assert!(exact.admits(&t));
        assert_eq!(x86("ecs.c7.2xlarge", 8, 16.0).family_name(), "ecs.c7");
        let types = [x86("ecs.c8i.2xlarge", 8, 16.0), x86("ecs.c7.2xlarge", 8, 16.0)];
        assert_eq!(candidates(&types, &exact).len(), 1);
    }

    fn offer(t: &str, zone: &str) -> Offer {
        Offer {
            instance_type: t.to_string(),
            family: "ecs.c7".into(),
            zone: zone.to_string(),
            cores: 8,
            memory_gib: 16.0,
            spot_price: 0.5,
            price_per_core: 0.0625,
            on_demand_price: None,
            discount: None,
            currency: "CNY".into(),
            vswitch_id: Some("vsw".into()),
            vswitch_configured: true,
        }
    }

    const NO_STOCK: &str = "out of stock (OperationDenied.NoStock)";

    #[test]
    fn walk_logs_each_skip_and_stops_at_the_first_created() {
        let offers = [offer("ecs.c7.2xlarge", H), offer("ecs.c7.2xlarge", B), offer("ecs.c6.2xlarge", G)];
        let mut tried = Vec::new();
        let mut lines = Vec::new();
        let result = walk_offers::<String, anyhow::Error>(
            &offers,
            |o| {
                tried.push(o.zone.clone());
                match tried.len() {
                    1 => Attempt::NextOffer(NO_STOCK.into()),
                    2 => Attempt::NextOffer("zone not on sale (Zone.NotOnSale)".into()),
                    _ => Attempt::Created("i-123".to_string()),
                }
            },
            |l| lines.push(l.to_string()),
        );
        assert_eq!(
            lines,
            [
                "ecs.c7.2xlarge in cn-hangzhou-h: out of stock (OperationDenied.NoStock), trying the next offer",
                "ecs.c7.2xlarge in cn-hangzhou-b: zone not on sale (Zone.NotOnSale), trying the next offer",
            ]
        );
        match result {
            WalkResult::Created { offer, value, skipped } => {
                assert_eq!(
                    (offer.instance_type.as_str(), offer.zone.as_str(), value.as_str()),
                    ("ecs.c6.2xlarge", G, "i-123")
                );
                assert_eq!(skipped.len(), 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(tried.len(), 3);
    }

    #[test]
    fn walk_stops_at_a_fatal_error() {
        let offers = [offer("ecs.c7.2xlarge", H), offer("ecs.c7.2xlarge", B)];
        let mut calls = 0;
        let mut lines = Vec::new();
        let result = walk_offers::<(), _>(
            &offers,
            |_| {
                calls += 1;
                Attempt::Fatal(anyhow::anyhow!("ECS `RunInstances` failed: InvalidAccessKeyId.NotFound"))
            },
            |l| lines.push(l.to_string()),
        );
        assert_eq!(calls, 1);
        assert!(lines.is_empty());
        match result {
            WalkResult::Fatal { offer, error, skipped } => {
                assert_eq!(offer.zone, H);
                assert_eq!(error.to_string(), "ECS `RunInstances` failed: InvalidAccessKeyId.NotFound");
                assert!(skipped.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn walk_summarizes_when_every_offer_fails() {
        let offers = [
            offer("ecs.c7.2xlarge", H),
            offer("ecs.c7.2xlarge", B),
            offer("ecs.c6.2xlarge", G),
            offer("ecs.c6.2xlarge", H),
        ];
        let reasons =
            [NO_STOCK, "zone not on sale (Zone.NotOnSale)", NO_STOCK, &above_cap_reason(0.4, "CNY")];
        let mut i = 0;
        let mut lines = Vec::new();
        let result = walk_offers::<(), anyhow::Error>(
            &offers,
            |_| {
                i += 1;
                Attempt::NextOffer(reasons[i - 1].to_string())
            },
            |l| lines.push(l.to_string()),
        );
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[3],
            "ecs.c6.2xlarge in cn-hangzhou-h: spot price above the cap of 0.4 CNY/hour, no offers left"
        );
        match result {
            WalkResult::Exhausted { summary, skipped } => {
                assert_eq!(
                    summary,
                    "all 4 offers failed: 2 out of stock (OperationDenied.NoStock), 1 zone not on sale \
                     (Zone.NotOnSale), 1 spot price above the cap of 0.4 CNY/hour"
                );
                assert_eq!(skipped.len(), 4);
            }
            other => panic!("unexpected {other:?}"),
        }

        let one =
            walk_offers::<(), anyhow::Error>(&offers[..1], |_| Attempt::NextOffer(NO_STOCK.into()), |_| {});
        assert!(matches!(one, WalkResult::Exhausted { ref summary, .. }
            if summary == "the only offer failed: out of stock (OperationDenied.NoStock)"));
        let none = walk_offers::<(), anyhow::Error>(&[], |_| unreachable!(), |_| {});
        assert!(matches!(none, WalkResult::Exhausted { ref summary, .. } if summary == "no offers to try"));
    }

    #[test]
    fn fetch_catalogue_filters_and_counts_calls() {
        let src = MemorySource::new(
            vec![
                x86("ecs.c7.2xlarge", 8, 16.0),
                x86("ecs.c7.xlarge", 4, 8.0),
                arm("ecs.c8y.2xlarge", 8, 16.0),
            ],
            vec![
                stock("ecs.c7.2xlarge", H, true),
                stock("ecs.c7.2xlarge", B, false),
                stock("ecs.c7.xlarge", H, true),
            ],
            vec![
                price("ecs.c7.2xlarge", H, 0.5, None, 1),
                price("ecs.c7.2xlarge", B, 0.4, None, 1),
                price("ecs.c7.xlarge", H, 0.1, None, 1),
            ],
        );
        let shape = Shape::defaults(Arch::Amd64);
        let cat = fetch_catalogue(&src, "cn-hangzhou", &shape).unwrap();
        assert_eq!(src.calls(), 3);
        assert_eq!(cat.types.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["ecs.c7.2xlarge"]);
        assert_eq!(cat.stock, [stock("ecs.c7.2xlarge", H, true)]);
        assert_eq!(cat.prices, [price("ecs.c7.2xlarge", H, 0.5, None, 1)]);
        assert_eq!((cat.region.as_str(), cat.arch), ("cn-hangzhou", Arch::Amd64));

        // Nothing fits: only the type listing is asked for.
        let tiny = Shape { min_cpu: 128, max_cpu: 256, ..shape };
        let cat = fetch_catalogue(&src, "cn-hangzhou", &tiny).unwrap();
        assert_eq!(src.calls(), 4);
        assert!(cat.types.is_empty() && cat.prices.is_empty());
    }

    #[test]
    fn offers_and_catalogues_serialize_with_stable_names() {
        let json = serde_json::to_value(offer("ecs.c7.2xlarge", H)).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "cores",
                "currency",
                "discount",
                "family",
                "instance_type",
                "memory_gib",
                "on_demand_price",
                "price_per_core",
                "spot_price",
                "vswitch_configured",
                "vswitch_id",
                "zone"
            ]
        );
        let cat = catalogue(
            Arch::Arm64,
            vec![arm("ecs.c8y.2xlarge", 8, 16.0)],
            vec![stock("ecs.c8y.2xlarge", B, true)],
            vec![price("ecs.c8y.2xlarge", B, 0.3, Some(2.0), 1)],
        );
        let text = serde_json::to_string(&cat).unwrap();
        assert!(text.contains(r#""fetched_at":"2026-01-10T12:00:00Z""#), "{text}");
        assert!(text.contains(r#""arch":"arm64""#), "{text}");
        assert_eq!(serde_json::from_str::<Catalogue>(&text).unwrap(), cat);
    }
}
