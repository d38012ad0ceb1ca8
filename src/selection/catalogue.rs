//! What ECS sells in a region: instance types, spot stock per zone and spot prices, fetched the
//! way `spot-instance-advisor` does ([`fetch_catalogue`]) from any [`CatalogueSource`].

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::Shape;
use crate::arch::Arch;

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
    /// Instance types (already filtered by the shape when fetched; filtered again by [`super::rank()`]).
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

pub(super) fn default_currency() -> String {
    crate::selection::pricing::DEFAULT_CURRENCY.to_string()
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
