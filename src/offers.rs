//! Live offers: the ECS client as the selection's catalogue source, through the price cache.
//!
//! Selection itself ([`crate::selection`]) is pure; this module is the glue that asks ECS for
//! instance types, spot availability and the latest spot prices, caches the answer on the
//! runner host for a few minutes, and ranks it. `prepare` and `aliyun-spot prices` share it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use time::OffsetDateTime;

use crate::config::Config;
use crate::ecs::{
    AvailableResourceRequest, ClientConfig, EcsClient, InstanceTypeFilter, RetryPolicy,
    SpotPriceHistoryRequest, SpotStrategy,
};
use crate::price_cache::PriceCache;
use crate::selection::{self, Catalogue, CatalogueSource, Offer, PricePoint, Shape, TypeInfo, ZoneStock};

/// The ECS client for a configuration (region, endpoint, credentials chain).
pub fn client(config: &Config) -> Result<EcsClient> {
    let creds = crate::credentials::provider_from_spec(&config.credentials)?;
    EcsClient::new(
        ClientConfig {
            region_id: config.region()?.to_string(),
            endpoint: config.endpoint.clone(),
            timeout: config.timeouts.api_call,
            retry: RetryPolicy::default(),
        },
        creds,
    )
}

/// Checks the endpoint the way the client will, without building credentials.
pub fn validate_endpoint(config: &Config) -> Result<()> {
    crate::ecs::resolve_endpoint(config.region()?, config.endpoint.as_deref()).map(|_| ())
}

/// [`CatalogueSource`] backed by the ECS API.
pub struct EcsSource<'a>(pub &'a EcsClient);

impl CatalogueSource for EcsSource<'_> {
    fn instance_types(&self, shape: &Shape) -> Result<Vec<TypeInfo>> {
        // The memory bounds are left to the selection, which allows for ECS reporting e.g.
        // 15.25 GiB for a "16 GiB" type.
        let filter = InstanceTypeFilter {
            arch: Some(shape.arch),
            min_cores: Some(shape.min_cpu),
            max_cores: Some(shape.max_cpu),
            ..Default::default()
        };
        let types = self.0.describe_instance_types(&filter).context("failed to list instance types")?;
        Ok(types
            .into_iter()
            .filter_map(|t| {
                Some(TypeInfo {
                    arch: selection::Arch::from_ecs(&t.arch)?,
                    id: t.id,
                    family: t.family,
                    cores: t.cores,
                    memory_gib: t.memory_gib,
                })
            })
            .collect())
    }

    fn spot_stock(&self, _shape: &Shape) -> Result<Vec<ZoneStock>> {
        let req = AvailableResourceRequest {
            spot_strategy: SpotStrategy::SpotWithPriceLimit,
            ..Default::default()
        };
        let rows = self.0.describe_available_resource(&req).context("failed to list spot availability")?;
        Ok(rows
            .into_iter()
            .map(|r| ZoneStock::from_ecs(&r.instance_type, &r.zone_id, &r.status, Some(&r.status_category)))
            .collect())
    }

    fn latest_prices(&self, types: &[TypeInfo], zones: &[String]) -> Result<Vec<PricePoint>> {
        // ECS wants one `DescribeSpotPriceHistory` per instance type (the zone may be left out,
        // which gives every zone at once), so a cold catalogue costs one call per type in stock.
        // They are independent: a few run at a time, which makes a cold `prepare` against the
        // real API seconds faster, and the results are put back in type order.
        let start = OffsetDateTime::now_utc() - time::Duration::hours(3);
        let results: Vec<Mutex<Option<Result<Vec<PricePoint>>>>> =
            types.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let worker = || {
            while !failed.load(Ordering::SeqCst) {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(t) = types.get(i) else { break };
                let r = self.prices_of(t, start, zones);
                failed.fetch_or(r.is_err(), Ordering::SeqCst);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            }
        };
        std::thread::scope(|s| {
            for _ in 1..PRICE_CALLS_AT_ONCE.min(types.len()) {
                s.spawn(worker);
            }
            worker();
        });
        let mut out = Vec::new();
        for r in results {
            match r.into_inner().unwrap_or_else(|e| e.into_inner()) {
                Some(r) => out.extend(r?),
                // Not fetched because another type failed; that error comes first or later.
                None => continue,
            }
        }
        Ok(out)
    }
}

/// How many `DescribeSpotPriceHistory` calls one catalogue fetch makes at the same time: enough
/// to hide the round trips, few enough to stay far below ECS's per-API rate limits.
pub const PRICE_CALLS_AT_ONCE: usize = 4;

impl EcsSource<'_> {
    /// The recent prices of one type in `zones` (every zone when empty).
    fn prices_of(&self, t: &TypeInfo, start: OffsetDateTime, zones: &[String]) -> Result<Vec<PricePoint>> {
        let req = SpotPriceHistoryRequest {
            instance_type: t.id.clone(),
            // One zone is asked for by name; several need the whole list.
            zone_id: match zones {
                [only] => Some(only.clone()),
                _ => None,
            },
            start_time: Some(start),
            end_time: None,
            spot_duration: None,
        };
        let points = self
            .0
            .describe_spot_price_history(&req)
            .with_context(|| format!("failed to read spot prices of `{}`", t.id))?;
        Ok(points
            .into_iter()
            .filter(|p| zones.is_empty() || zones.contains(&p.zone_id))
            .map(|p| PricePoint {
                instance_type: p.instance_type,
                zone: p.zone_id,
                spot: p.spot_price,
                on_demand: p.origin_price,
                timestamp: p.timestamp,
            })
            .collect())
    }
}

/// The ranked offers for `shape`: only zones with a vswitch, unless `all_zones` (for listing).
pub fn ranked(client: &EcsClient, config: &Config, shape: &Shape, all_zones: bool) -> Result<Vec<Offer>> {
    let catalogue = catalogue(client, config, shape)?;
    Ok(if all_zones {
        selection::rank_all(&catalogue, shape, &config.network.vswitches, config.spot.ranking)
    } else {
        selection::rank(&catalogue, shape, &config.network.vswitches, config.spot.ranking)
    })
}

/// The catalogue for a shape, from the cache when fresh.
pub fn catalogue(client: &EcsClient, config: &Config, shape: &Shape) -> Result<Catalogue> {
    let cache = PriceCache::new(config.paths.cache_dir.clone(), config.spot.price_cache_ttl);
    let region = config.region()?;
    let key = crate::price_cache::cache_key(region, client.endpoint(), shape);
    cache.get_or_fetch(&key, || selection::fetch_catalogue(&EcsSource(client), region, shape))
}
