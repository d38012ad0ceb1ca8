//! Live offers: the ECS client as the selection's catalogue source, through the price cache.
//!
//! Selection itself ([`crate::selection`]) is pure; this module is the glue that asks ECS for
//! instance types, spot availability and the latest spot prices, caches the answer on the
//! runner host for a few minutes, and ranks it. `prepare` and `aliyun-spot prices` share it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use time::OffsetDateTime;

use crate::config::Config;
use crate::ecs::{
    AvailableResourceRequest, ClientConfig, EcsClient, InstanceTypeFilter, SpotPriceHistoryRequest,
    SpotStrategy,
};
use crate::selection::cache::PriceCache;
use crate::selection::{
    self, Catalogue, CatalogueSource, Offer, PriceList, PricePoint, Shape, TypeInfo, WalkResult, ZoneStock,
};

/// The ECS client for a configuration (region, endpoint, credentials chain).
pub fn client(config: &Config) -> Result<EcsClient> {
    let creds = crate::credentials::provider_from_spec(&config.credentials)?;
    EcsClient::new(
        ClientConfig {
            region_id: config.region()?.to_string(),
            endpoint: config.endpoint.clone(),
            timeout: config.timeouts.api_call,
            retry: config.api_retry.clone(),
        },
        creds,
    )
}

/// Checks the endpoint the way the client will, without building credentials.
pub fn validate_endpoint(config: &Config) -> Result<()> {
    crate::ecs::resolve_endpoint(config.region()?, config.endpoint.as_deref()).map(|_| ())
}

/// [`CatalogueSource`] backed by the ECS API, asking for prices and stock with one protection
/// period (`SpotDuration`, see [`crate::selection::pricing`]).
pub struct EcsSource<'a> {
    /// The client.
    pub client: &'a EcsClient,
    /// `SpotDuration` sent to `DescribeAvailableResource` and `DescribeSpotPriceHistory`.
    pub spot_duration: u32,
}

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
        let types = self.client.describe_instance_types(&filter).context("failed to list instance types")?;
        Ok(types
            .into_iter()
            .filter_map(|t| {
                Some(TypeInfo {
                    arch: selection::Arch::from_ecs(&t.arch)?,
                    id: t.id,
                    family: t.family,
                    cores: t.cores,
                    memory_gib: t.memory_gib,
                    family_level: t.family_level,
                    gpu_amount: t.gpu_amount,
                    gpu_spec: t.gpu_spec,
                })
            })
            .collect())
    }

    fn spot_stock(&self, _shape: &Shape) -> Result<Vec<ZoneStock>> {
        let req = AvailableResourceRequest {
            spot_strategy: SpotStrategy::SpotWithPriceLimit,
            spot_duration: Some(self.spot_duration),
            ..Default::default()
        };
        let rows =
            self.client.describe_available_resource(&req).context("failed to list spot availability")?;
        Ok(rows
            .into_iter()
            .map(|r| {
                ZoneStock::from_ecs(&r.instance_type, &r.zone_id, &r.status, r.status_category.as_deref())
            })
            .collect())
    }

    fn latest_prices(&self, types: &[TypeInfo], zones: &[String]) -> Result<PriceList> {
        // ECS wants one `DescribeSpotPriceHistory` per instance type (the zone may be left out,
        // which gives every zone at once), so a cold catalogue costs one call per type in stock.
        // They are independent: a few run at a time, which makes a cold `prepare` against the
        // real API seconds faster, and the results are put back in type order.
        let start = OffsetDateTime::now_utc() - time::Duration::hours(3);
        let results: Vec<Mutex<Option<Result<PriceList>>>> = types.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let worker = || loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(t) = types.get(i) else { break };
            *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(self.prices_of(t, start, zones));
        };
        std::thread::scope(|s| {
            for _ in 1..PRICE_CALLS_AT_ONCE.min(types.len()) {
                s.spawn(worker);
            }
            worker();
        });
        let mut out = PriceList::default();
        let mut failed = Vec::new();
        for (t, r) in types.iter().zip(results) {
            match r.into_inner().unwrap_or_else(|e| e.into_inner()) {
                Some(Ok(list)) => {
                    out.points.extend(list.points);
                    out.currency = out.currency.or(list.currency);
                }
                // One type's prices failing (after the client's retries) drops that type, not
                // the whole catalogue: the other types can still run the job.
                Some(Err(e)) => {
                    log::warn!("leaving `{}` out of the offers: {}", t.id, crate::exit::one_line(&e));
                    failed.push(e);
                }
                None => {}
            }
        }
        // Every type failing is an outage or a permission problem, not a missing type.
        if !types.is_empty() && failed.len() == types.len() {
            if let Some(e) = failed.into_iter().next() {
                return Err(e);
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
    fn prices_of(&self, t: &TypeInfo, start: OffsetDateTime, zones: &[String]) -> Result<PriceList> {
        let req = SpotPriceHistoryRequest {
            instance_type: t.id.clone(),
            // One zone is asked for by name; several need the whole list.
            zone_id: match zones {
                [only] => Some(only.clone()),
                _ => None,
            },
            start_time: Some(start),
            end_time: None,
            spot_duration: Some(self.spot_duration),
        };
        let history = self
            .client
            .describe_spot_price_history(&req)
            .with_context(|| format!("failed to read spot prices of `{}`", t.id))?;
        let points = history
            .points
            .into_iter()
            .filter(|p| zones.is_empty() || zones.contains(&p.zone_id))
            .map(|p| PricePoint {
                instance_type: p.instance_type,
                zone: p.zone_id,
                spot: p.spot_price,
                on_demand: p.origin_price,
                timestamp: p.timestamp,
            })
            .collect();
        Ok(PriceList { points, currency: history.currency })
    }
}

/// The ranked offers for `shape`: only zones with a vswitch, unless `all_zones` (for listing).
/// When the cached catalogue has no usable offer, ECS is asked afresh once
/// ([`ranked_afresh`]): stock may have come back since it was cached.
pub fn ranked(client: &EcsClient, config: &Config, shape: &Shape, all_zones: bool) -> Result<Vec<Offer>> {
    let catalogue = catalogue(client, config, shape)?;
    let offers = rank(&catalogue, config, shape, all_zones);
    if offers.is_empty() && !all_zones && !config.spot.price_cache_ttl.is_zero() {
        log::info!("no usable offer in the cached catalogue; asking ECS afresh");
        return ranked_afresh(client, config, shape);
    }
    Ok(offers)
}

fn rank(catalogue: &Catalogue, config: &Config, shape: &Shape, all_zones: bool) -> Vec<Offer> {
    if all_zones {
        selection::rank_all(catalogue, shape, &config.network.vswitches, config.spot.ranking)
    } else {
        selection::rank(catalogue, shape, &config.network.vswitches, config.spot.ranking)
    }
}

/// The ranked offers for `shape` asked of ECS afresh, bypassing (and replacing) the cached
/// catalogue: for a prepare whose cached offers were all unusable, so a retried job sees stock
/// that came back without waiting out the cache lifetime.
pub fn ranked_afresh(client: &EcsClient, config: &Config, shape: &Shape) -> Result<Vec<Offer>> {
    let (cache, key) = cache_and_key(client, config, shape)?;
    cache.invalidate(&key);
    Ok(rank(&catalogue(client, config, shape)?, config, shape, false))
}

/// [`selection::walk_offers`], and when every offer failed, one more walk over the offers
/// `fresh` returns (ECS asked afresh, [`ranked_afresh`]): the cached catalogue may be stale, and
/// gitlab-runner's retry of a failed preparation (three attempts, 3 s apart) would otherwise
/// meet the same stale "nothing available" for the whole cache lifetime. `fresh` failing or
/// finding nothing keeps the first walk's result.
pub fn walk_with_fresh_look<T, E>(
    offers: &[Offer],
    fresh: impl FnOnce() -> Result<Vec<Offer>>,
    mut try_create: impl FnMut(&Offer) -> selection::Attempt<T, E>,
    mut log: impl FnMut(&str),
) -> WalkResult<T, E> {
    let first = selection::walk_offers(offers, &mut try_create, &mut log);
    if !matches!(first, WalkResult::Exhausted { .. }) {
        return first;
    }
    match fresh() {
        Ok(again) if !again.is_empty() => {
            log(&format!("Every offer failed; asking ECS afresh: {} offers", again.len()));
            selection::walk_offers(&again, try_create, log)
        }
        Ok(_) => first,
        Err(e) => {
            log(&format!("Could not ask ECS afresh: {}", crate::exit::one_line(&e)));
            first
        }
    }
}

fn cache_and_key(client: &EcsClient, config: &Config, shape: &Shape) -> Result<(PriceCache, String)> {
    let cache = PriceCache::new(config.paths.cache_dir.clone(), config.spot.price_cache_ttl);
    let key = crate::selection::cache::cache_key(
        config.region()?,
        client.endpoint(),
        config.spot.protection_hours,
        shape,
    );
    Ok((cache, key))
}

/// The catalogue for a shape, from the cache when fresh.
pub fn catalogue(client: &EcsClient, config: &Config, shape: &Shape) -> Result<Catalogue> {
    let (cache, key) = cache_and_key(client, config, shape)?;
    let region = config.region()?;
    let source = EcsSource { client, spot_duration: config.spot.protection_hours };
    cache.get_or_fetch(&key, || selection::fetch_catalogue(&source, region, shape))
}
