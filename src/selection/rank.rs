//! Offers ranked from a [`Catalogue`] (see the module doc of [`crate::selection`], "Ranking
//! rules").

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::catalogue::default_currency;
use super::{Catalogue, PricePoint, Shape, TypeInfo};

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
    /// off; [`crate::selection::pricing::percent_off`] labels it).
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
