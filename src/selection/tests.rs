use super::*;
use std::collections::BTreeMap;

use time::Duration as TimeDelta;
use time::OffsetDateTime;

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

fn catalogue(arch: Arch, types: Vec<TypeInfo>, stock: Vec<ZoneStock>, prices: Vec<PricePoint>) -> Catalogue {
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
    assert_eq!(order(&rank(&cat, &shape, &vsw, Ranking::Total)), ["ecs.c7.2xlarge@h", "ecs.c7.4xlarge@h"]);

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
    let types =
        vec![x86("ecs.c7.2xlarge", 8, 16.0), x86("ecs.c6.2xlarge", 8, 16.0), x86("ecs.c7.4xlarge", 16, 32.0)];
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
    let offers = rank(&cat, &Shape::defaults(Arch::Amd64), &vswitches(&["b", "g", "h"]), Ranking::PerCore);
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
    assert_eq!((arm64.min_cpu, arm64.max_cpu, arm64.min_mem_gib, arm64.max_mem_gib), (8, 64, 16.0, 128.0));
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
    let reasons = [NO_STOCK, "zone not on sale (Zone.NotOnSale)", NO_STOCK, &above_cap_reason(0.4, "CNY")];
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

    let one = walk_offers::<(), anyhow::Error>(&offers[..1], |_| Attempt::NextOffer(NO_STOCK.into()), |_| {});
    assert!(matches!(one, WalkResult::Exhausted { ref summary, .. }
        if summary == "the only offer failed: out of stock (OperationDenied.NoStock)"));
    let none = walk_offers::<(), anyhow::Error>(&[], |_| unreachable!(), |_| {});
    assert!(matches!(none, WalkResult::Exhausted { ref summary, .. } if summary == "no offers to try"));
}

#[test]
fn fetch_catalogue_filters_and_counts_calls() {
    let src = MemorySource::new(
        vec![x86("ecs.c7.2xlarge", 8, 16.0), x86("ecs.c7.xlarge", 4, 8.0), arm("ecs.c8y.2xlarge", 8, 16.0)],
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
