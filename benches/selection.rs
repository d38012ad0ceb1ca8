//! Selection benchmark: how long ranking takes, and how many ECS API calls a job's selection
//! costs with a cold and a warm price cache. Plain `fn main` (no harness); numbers are printed,
//! not asserted.
//!
//! Run it with `cargo bench --bench selection` (about a minute after compiling). The part that
//! drives the real `prepare` and `cleanup` binaries starts an in-process emulator with a real
//! `sshd` per instance on port 22 of a loopback address, so it needs root and
//! `/usr/sbin/sshd`; without root it is skipped with a note.
//!
//! 1. Synthetic: a catalogue of 64 x86 types × 6 zones with a few price points per pair, held in
//!    the in-memory `MemorySource`: ranking time and the calls the price cache saves.
//! 2. Emulator, one job: the API calls (by action, from the emulator's request log) of
//!    `prepare` with a cold cache, `prepare` of the next job with the cache warm, and `cleanup`.
//! 3. Emulator, the whole catalogue (a few hundred (type, zone) pairs across both
//!    architectures): the live fetch over loopback HTTP, a warm cache read, and ranking.

mod common;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use aliyun_spot_executor::env::Env;
use aliyun_spot_executor::price_cache::{cache_key, PriceCache};
use aliyun_spot_executor::selection::{
    fetch_catalogue, rank, rank_all, Arch, Catalogue, MemorySource, PricePoint, Ranking, Shape, TypeInfo,
    ZoneStock,
};
use common::{can_run_sshd, stage, Bed};
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
                family_level: "EnterpriseLevel".to_string(),
                gpu_amount: 0,
                gpu_spec: String::new(),
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

fn synthetic_section() {
    println!("== synthetic catalogue (in memory) ==");
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
    let key = cache_key("cn-hangzhou", "memory", 1, &shape);
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

fn job_calls_section() {
    println!("\n== API calls of one job against the emulator (real stage binaries) ==");
    if !can_run_sshd() {
        return;
    }
    let bed = Bed::start();
    let mut columns = Vec::new();
    for (label, job_id) in [("cold", "5001"), ("warm", "5002")] {
        let mut a = bed.attempt(job_id);
        assert!(a.config().expect("config runs").0.success(), "config failed: {}", a.log.text());
        let prepare = stage(&bed, || a.prepare().expect("prepare runs").success());
        let cleanup = stage(&bed, || a.cleanup().expect("cleanup runs").success());
        if !prepare.2 || !cleanup.2 {
            println!("the {label} job failed:\n{}\n{}", a.log.text(), a.runner_log.text());
            return;
        }
        columns.push((format!("prepare ({label} cache)"), prepare.0, prepare.1));
        columns.push((format!("cleanup ({label})"), cleanup.0, cleanup.1));
    }
    let mut actions: Vec<&String> = columns.iter().flat_map(|(_, m, _)| m.keys()).collect();
    actions.sort();
    actions.dedup();
    print!("{:<28}", "action");
    for (label, _, _) in &columns {
        print!("{label:>22}");
    }
    println!();
    let cell = |m: &BTreeMap<String, usize>, a: &str| m.get(a).copied().unwrap_or(0);
    for action in actions {
        if columns.iter().all(|(_, m, _)| cell(m, action) == 0) {
            continue;
        }
        print!("{action:<28}");
        for (_, m, _) in &columns {
            print!("{:>22}", cell(m, action));
        }
        println!();
    }
    print!("{:<28}", "total");
    for (_, m, _) in &columns {
        print!("{:>22}", m.values().sum::<usize>());
    }
    println!();
    print!("{:<28}", "wall time (ms)");
    for (_, _, t) in &columns {
        print!("{:>22}", t.as_millis());
    }
    println!();
    println!(
        "(prepare polls DescribeInstances until Running; the emulator boots in 0.3 s, so real ECS makes a few more)"
    );
    println!(
        "instances created: {}, still live: {}",
        bed.emulator.instances().len(),
        bed.emulator.live_instances()
    );
}

fn emulator_catalogue_section() {
    println!("\n== selection over the emulator's whole catalogue (loopback HTTP) ==");
    let bed = Bed::start();
    let text = std::fs::read_to_string(&bed.config).expect("configuration readable");
    let mut config = aliyun_spot_executor::config::from_toml(&text, Some(&bed.config), &Env::default())
        .expect("the emulator configuration is valid");
    let client = aliyun_spot_executor::offers::client(&config).expect("client");
    println!(
        "{:<6} {:>6} {:>7} {:>7} {:>10} {:>14} {:>14} {:>10}",
        "arch", "types", "pairs", "offers", "API calls", "cold fetch ms", "warm read µs", "rank µs"
    );
    for arch in [Arch::Amd64, Arch::Arm64] {
        // Everything of the architecture: no family list, any size.
        let shape = Shape {
            min_cpu: 1,
            max_cpu: 1024,
            min_mem_gib: 0.0,
            max_mem_gib: 8192.0,
            families: Vec::new(),
            ..Shape::defaults(arch)
        };
        // Cold: a zero TTL fetches every time and touches no file.
        config.spot.price_cache_ttl = Duration::ZERO;
        let before = bed.emulator.requests().len();
        let runs = 5;
        let cold = time_per_op(runs, || {
            black_box(aliyun_spot_executor::offers::catalogue(&client, &config, &shape).expect("live fetch"));
        });
        let calls = (bed.emulator.requests().len() - before) / runs as usize;
        // Warm: the first read fills the cache, the rest hit it.
        config.spot.price_cache_ttl = Duration::from_secs(300);
        let cat = aliyun_spot_executor::offers::catalogue(&client, &config, &shape).expect("fill");
        let warm_before = bed.emulator.requests().len();
        let warm = time_per_op(50, || {
            black_box(aliyun_spot_executor::offers::catalogue(&client, &config, &shape).expect("cached"));
        });
        assert_eq!(bed.emulator.requests().len(), warm_before, "a warm cache makes no API call");
        let offers = rank_all(&cat, &shape, &config.network.vswitches, Ranking::PerCore);
        let rank_time = time_per_op(200, || {
            black_box(rank_all(black_box(&cat), &shape, &config.network.vswitches, Ranking::PerCore));
        });
        println!(
            "{:<6} {:>6} {:>7} {:>7} {:>10} {:>14.1} {:>14} {:>10}",
            arch.to_string(),
            cat.types.len(),
            cat.stock.len(),
            offers.len(),
            calls,
            cold.as_secs_f64() * 1000.0,
            warm.as_micros(),
            rank_time.as_micros()
        );
    }
}

fn main() {
    synthetic_section();
    job_calls_section();
    emulator_catalogue_section();
}
