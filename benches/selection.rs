//! Selection benchmark: how long ranking a realistic catalogue takes, and how many API calls the
//! price cache saves. Plain `fn main` (no harness) so it runs quickly with
//! `cargo bench --bench selection` and prints numbers a person can read.
//!
//! The catalogue is synthetic (64 x86 types × 6 zones, a few price points per pair); the calls
//! are counted by the in-memory `MemorySource`, which stands in for the ECS API.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use aliyun_spot_executor::price_cache::{cache_key, PriceCache};
use aliyun_spot_executor::selection::{
    fetch_catalogue, rank, rank_all, Arch, Catalogue, MemorySource, PricePoint, Ranking, Shape, TypeInfo,
    ZoneStock,
};
use time::OffsetDateTime;

const ZONES: [&str; 6] = ["b", "g", "h", "i", "j", "k"];
const FAMILIES: [&str; 8] =
    ["ecs.c6", "ecs.c7", "ecs.c8i", "ecs.g6", "ecs.g7", "ecs.g8i", "ecs.u1", "ecs.hfc7"];
const SIZES: [(&str, u32); 8] = [
    ("2xlarge", 8),
    ("3xlarge", 12),
    ("4xlarge", 16),
    ("6xlarge", 24),
    ("8xlarge", 32),
    ("12xlarge", 48),
    ("16xlarge", 64),
    ("xlarge", 4),
];

/// 64 types × 6 zones, 3 price points per pair, about one pair in seven sold out.
fn synthetic() -> MemorySource {
    let now = OffsetDateTime::now_utc();
    let mut types = Vec::new();
    let mut stock = Vec::new();
    let mut prices = Vec::new();
    let mut seed: u64 = 0x5eed;
    let mut next = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as f64 / f64::from(1u32 << 31)
    };
    for (fi, family) in FAMILIES.iter().enumerate() {
        let per_core_mem = [1.0, 2.0, 4.0][fi % 3];
        for (size, cores) in SIZES {
            let id = format!("{family}.{size}");
            types.push(TypeInfo {
                id: id.clone(),
                family: family.to_string(),
                cores,
                memory_gib: f64::from(cores) * per_core_mem,
                arch: Arch::Amd64,
            });
            let list = f64::from(cores) * 0.12 * per_core_mem.sqrt();
            for (zi, zone) in ZONES.iter().enumerate() {
                let zone = format!("cn-hangzhou-{zone}");
                stock.push(ZoneStock {
                    instance_type: id.clone(),
                    zone: zone.clone(),
                    available: (fi + zi) % 7 != 3,
                });
                for age in [30, 20, 10] {
                    prices.push(PricePoint {
                        instance_type: id.clone(),
                        zone: zone.clone(),
                        spot: ((list * (0.10 + 0.12 * next())) * 10_000.0).round() / 10_000.0,
                        on_demand: Some(list),
                        timestamp: now - time::Duration::minutes(age),
                    });
                }
            }
        }
    }
    MemorySource::new(types, stock, prices)
}

fn time_per_op(iterations: u32, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    start.elapsed() / iterations
}

fn main() {
    let source = synthetic();
    // A wide shape, so ranking sees (nearly) the whole catalogue.
    let shape = Shape {
        min_cpu: 4,
        max_cpu: 64,
        min_mem_gib: 4.0,
        max_mem_gib: 256.0,
        ..Shape::defaults(Arch::Amd64)
    };
    let vswitches: BTreeMap<String, String> =
        ZONES.iter().take(4).map(|z| (format!("cn-hangzhou-{z}"), format!("vsw-{z}"))).collect();
    let cat: Catalogue = fetch_catalogue(&source, "cn-hangzhou", &shape).expect("in-memory fetch");
    println!(
        "catalogue: {} types, {} (type, zone) in stock, {} price points",
        cat.types.len(),
        cat.stock.len(),
        cat.prices.len()
    );

    let iterations = 2_000;
    let offers = rank(&cat, &shape, &vswitches, Ranking::PerCore);
    let per_core = time_per_op(iterations, || {
        black_box(rank(black_box(&cat), &shape, &vswitches, Ranking::PerCore));
    });
    let total = time_per_op(iterations, || {
        black_box(rank(black_box(&cat), &shape, &vswitches, Ranking::Total));
    });
    let all = time_per_op(iterations, || {
        black_box(rank_all(black_box(&cat), &shape, &vswitches, Ranking::PerCore));
    });
    println!("rank per-core: {} offers, {} ns/op", offers.len(), per_core.as_nanos());
    println!("rank total:    {} ns/op", total.as_nanos());
    println!(
        "rank_all:      {} offers, {} ns/op",
        rank_all(&cat, &shape, &vswitches, Ranking::PerCore).len(),
        all.as_nanos()
    );
    if let Some(best) = offers.first() {
        println!(
            "cheapest: {} in {} at {:.4} CNY/h ({:.4} per core)",
            best.instance_type, best.zone, best.spot_price, best.price_per_core
        );
    }

    // Cold vs warm cache, counted in calls to the (in-memory) API.
    let dir = tempfile::tempdir().expect("temporary directory");
    let cache = PriceCache::new(dir.path(), Duration::from_secs(300));
    let key = cache_key("cn-hangzhou", "memory", &shape);
    let fresh = synthetic();
    let cold_start = Instant::now();
    cache.get_or_fetch(&key, || fetch_catalogue(&fresh, "cn-hangzhou", &shape)).expect("cold fetch");
    let cold_time = cold_start.elapsed();
    let cold = fresh.calls();
    let warm_runs = 100;
    let warm_time = time_per_op(warm_runs, || {
        black_box(
            cache.get_or_fetch(&key, || fetch_catalogue(&fresh, "cn-hangzhou", &shape)).expect("warm read"),
        );
    });
    let warm = fresh.calls() - cold;
    println!(
        "cache cold: {cold} calls ({} µs), warm: {warm} calls over {warm_runs} reads ({} µs/read)",
        cold_time.as_micros(),
        warm_time.as_micros()
    );
}
