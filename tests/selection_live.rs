//! Spot selection against the emulator, as the administrator and gitlab-runner see it: the
//! real `aliyun-spot prices` / `instances` binaries (with a configuration file and from the
//! environment alone), the create-walk falling back through `prepare` when stock runs out, and
//! the runner host's price cache.
//!
//! The expected offer lists are computed here, independently of the selection code, from the
//! emulator's own raw answers (`DescribeInstanceTypes`, `DescribeAvailableResource`,
//! `DescribeSpotPriceHistory` as JSON): filter by shape, keep the latest price per (type, zone),
//! rank by price per core, then total price, then type, then zone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use aliyun_spot_executor::demo::gitlab::Exit;
use aliyun_spot_executor::ecs::EcsClient;
use aliyun_spot_executor::emulator::{Faults, DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET};
use aliyun_spot_executor::env::Env;
use serde_json::Value;
use time::OffsetDateTime;

use crate::executor::World;

const CATALOGUE_ACTIONS: [&str; 3] =
    ["DescribeInstanceTypes", "DescribeAvailableResource", "DescribeSpotPriceHistory"];

/// Runs `aliyun-spot` with a clean environment (PATH, HOME and `env` only).
fn aliyun_spot(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", home)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("aliyun-spot runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nSTDOUT:\n{}\nSTDERR:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `aliyun-spot --config <world's file> args…` and expects success.
fn with_config(w: &World, args: &[&str]) -> Output {
    let config = w.config.display().to_string();
    let mut all = vec!["--config", config.as_str()];
    all.extend_from_slice(args);
    let out = aliyun_spot(w.dir.path(), &all, &[]);
    assert!(out.status.success(), "aliyun-spot {all:?} failed: {}", show(&out));
    out
}

/// A client for the world's emulator, for raw calls.
fn client(w: &World) -> EcsClient {
    let config = aliyun_spot_executor::config::load(Some(&w.config), &Env::default()).unwrap();
    aliyun_spot_executor::offers::client(&config).unwrap()
}

/// The shape rules of docs/configuration.md (`[shape.*]`), written out for the test.
struct ShapeSpec {
    arch: &'static str,
    min_cpu: u32,
    max_cpu: u32,
    min_mem: f64,
    max_mem: f64,
    families: &'static [&'static str],
    /// Shared (`InstanceFamilyLevel` `EntryLevel`), burstable (`CreditEntryLevel`) and GPU
    /// (`GPUAmount`/`GPUSpec`) types allowed; off by default.
    other_kinds: bool,
}

const AMD64: ShapeSpec = ShapeSpec {
    arch: "X86",
    min_cpu: 8,
    max_cpu: 64,
    min_mem: 8.0,
    max_mem: 64.0,
    families: &[],
    other_kinds: false,
};
const ARM64: ShapeSpec = ShapeSpec {
    arch: "ARM",
    min_cpu: 8,
    max_cpu: 64,
    min_mem: 16.0,
    max_mem: 128.0,
    families: &["ecs.c8y", "ecs.c8r"],
    other_kinds: false,
};
/// `--min-cpu 16 --max-cpu 16` on amd64: the minimum memory follows at 1 GiB per core.
const AMD64_16: ShapeSpec = ShapeSpec {
    arch: "X86",
    min_cpu: 16,
    max_cpu: 16,
    min_mem: 16.0,
    max_mem: 64.0,
    families: &[],
    other_kinds: false,
};

/// One offer as the test expects it.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    instance_type: String,
    zone: String,
    spot: f64,
    cores: u32,
}

fn items<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The ranked offers the emulator's own answers imply for `shape`, in every zone.
fn expected_offers(client: &EcsClient, shape: &ShapeSpec) -> Vec<Expected> {
    // Every instance type, all pages.
    let mut types: BTreeMap<String, (u32, f64, String, String, bool)> = BTreeMap::new();
    let mut token = String::new();
    loop {
        let mut params = vec![("MaxResults".to_string(), "100".to_string())];
        if !token.is_empty() {
            params.push(("NextToken".to_string(), token.clone()));
        }
        let v = client.call("DescribeInstanceTypes", &params).unwrap();
        for t in items(&v, &["InstanceTypes", "InstanceType"]) {
            types.insert(
                t["InstanceTypeId"].as_str().unwrap().to_string(),
                (
                    t["CpuCoreCount"].as_u64().unwrap() as u32,
                    t["MemorySize"].as_f64().unwrap(),
                    t["InstanceTypeFamily"].as_str().unwrap_or_default().to_string(),
                    t["CpuArchitecture"].as_str().unwrap_or_default().to_string(),
                    ["EntryLevel", "CreditEntryLevel"]
                        .contains(&t["InstanceFamilyLevel"].as_str().unwrap_or(""))
                        || t["GPUAmount"].as_u64().unwrap_or(0) > 0
                        || !t["GPUSpec"].as_str().unwrap_or("").is_empty(),
                ),
            );
        }
        token = v["NextToken"].as_str().unwrap_or_default().to_string();
        if token.is_empty() {
            break;
        }
    }
    // Memory bounds allow 5 % for types ECS reports a little below their nominal size.
    let fits = |(cores, mem, family, arch, other_kind): &(u32, f64, String, String, bool)| {
        arch == shape.arch
            && (shape.other_kinds || !other_kind)
            && (shape.min_cpu..=shape.max_cpu).contains(cores)
            && *mem >= shape.min_mem * 0.95
            && *mem <= shape.max_mem * 1.05
            && (shape.families.is_empty() || shape.families.iter().any(|f| family.starts_with(f)))
    };
    let fitting: BTreeMap<&String, u32> =
        types.iter().filter(|(_, t)| fits(t)).map(|(id, t)| (id, t.0)).collect();

    // Spot stock per (type, zone): the per-type status, never the zone's.
    let params = [
        ("DestinationResource", "InstanceType"),
        ("InstanceChargeType", "PostPaid"),
        ("SpotStrategy", "SpotWithPriceLimit"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let v = client.call("DescribeAvailableResource", &params).unwrap();
    let mut in_stock: BTreeSet<(String, String)> = BTreeSet::new();
    for z in items(&v, &["AvailableZones", "AvailableZone"]) {
        let zone = z["ZoneId"].as_str().unwrap();
        for r in items(z, &["AvailableResources", "AvailableResource"]) {
            for s in items(r, &["SupportedResources", "SupportedResource"]) {
                let category = s["StatusCategory"].as_str().unwrap_or("WithStock");
                if s["Status"] == "Available" && category.ends_with("WithStock") && category != "WithoutStock"
                {
                    in_stock.insert((s["Value"].as_str().unwrap().to_string(), zone.to_string()));
                }
            }
        }
    }

    // The latest price of every (fitting type, zone in stock).
    let mut latest: BTreeMap<(String, String), (OffsetDateTime, f64)> = BTreeMap::new();
    for ty in fitting.keys() {
        let mut offset = 0;
        loop {
            let mut params = vec![
                ("NetworkType".to_string(), "vpc".to_string()),
                ("InstanceType".to_string(), ty.to_string()),
            ];
            if offset > 0 {
                params.push(("Offset".to_string(), offset.to_string()));
            }
            let v = client.call("DescribeSpotPriceHistory", &params).unwrap();
            let page = items(&v, &["SpotPrices", "SpotPriceType"]);
            for p in page {
                let key = (ty.to_string(), p["ZoneId"].as_str().unwrap().to_string());
                let at = OffsetDateTime::parse(
                    p["Timestamp"].as_str().unwrap(),
                    &time::format_description::well_known::Rfc3339,
                )
                .unwrap();
                let price = p["SpotPrice"].as_f64().unwrap();
                let e = latest.entry(key).or_insert((at, price));
                if (at, price) > *e {
                    *e = (at, price);
                }
            }
            let next = v["NextOffset"].as_u64().unwrap_or(0);
            if page.is_empty() || next <= offset {
                break;
            }
            offset = next;
        }
    }

    let mut out: Vec<Expected> = latest
        .into_iter()
        .filter(|(k, (_, price))| in_stock.contains(k) && *price > 0.0)
        .map(|((instance_type, zone), (_, spot))| Expected {
            cores: fitting[&instance_type],
            instance_type,
            zone,
            spot,
        })
        .collect();
    out.sort_by(|a, b| {
        (a.spot / f64::from(a.cores))
            .total_cmp(&(b.spot / f64::from(b.cores)))
            .then(a.spot.total_cmp(&b.spot))
            .then_with(|| a.instance_type.cmp(&b.instance_type))
            .then_with(|| a.zone.cmp(&b.zone))
    });
    out
}

/// The offers of `prices --json`.
fn parse_prices_json(out: &Output) -> Vec<Expected> {
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(out)));
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|o| Expected {
            instance_type: o["instance_type"].as_str().unwrap().to_string(),
            zone: o["zone"].as_str().unwrap().to_string(),
            spot: o["spot_price"].as_f64().unwrap(),
            cores: o["cores"].as_u64().unwrap() as u32,
        })
        .collect()
}

fn names(offers: &[Expected]) -> Vec<String> {
    offers.iter().map(|o| format!("{}@{} {}", o.instance_type, o.zone, o.spot)).collect()
}

/// How many requests of each catalogue action the emulator has answered so far.
fn catalogue_calls(w: &World) -> BTreeMap<&'static str, usize> {
    let requests = w.emulator.requests();
    CATALOGUE_ACTIONS
        .iter()
        .map(|a| (*a, requests.iter().filter(|r| r.action.as_deref() == Some(*a)).count()))
        .collect()
}

fn count_action(w: &World, action: &str) -> usize {
    w.emulator.requests().iter().filter(|r| r.action.as_deref() == Some(action)).count()
}

#[test]
fn prices_lists_exactly_the_fitting_offers_cheapest_per_core_first() {
    // Some pairs are sold out, among them what would otherwise be the cheapest per core.
    let sold_out = ["ecs.c8a.2xlarge@cn-hangzhou-j", "ecs.u1-*@cn-hangzhou-i"];
    let w = World::with_faults(Faults { no_stock: sold_out.map(String::from).to_vec(), ..Faults::default() });
    let c = client(&w);
    let expected = expected_offers(&c, &AMD64);
    assert!(expected.len() > 20, "the catalogue offers plenty: {:?}", names(&expected));
    assert!(
        !expected.iter().any(|o| sold_out.iter().any(|p| Faults::pattern_matches(
            p,
            &o.instance_type,
            &o.zone
        ))),
        "sold-out pairs are not offers: {:?}",
        names(&expected)
    );

    let got = parse_prices_json(&with_config(&w, &["prices", "--json"]));
    assert_eq!(names(&got), names(&expected));
    assert_eq!(got, expected);

    // The first entry is the cheapest per core of every latest price the emulator reports.
    let cheapest = expected.iter().map(|o| o.spot / f64::from(o.cores)).min_by(f64::total_cmp).unwrap();
    assert_eq!(got[0].spot / f64::from(got[0].cores), cheapest);

    // arm64: only the allowed families, at 1:2.
    let arm = expected_offers(&c, &ARM64);
    assert!(!arm.is_empty());
    let got_arm = parse_prices_json(&with_config(&w, &["prices", "--json", "--arch", "arm64"]));
    assert_eq!(names(&got_arm), names(&arm));
    assert!(got_arm
        .iter()
        .all(|o| o.instance_type.starts_with("ecs.c8y.") || o.instance_type.starts_with("ecs.c8r.")));

    // Exactly 16 vCPU.
    let sixteen = expected_offers(&c, &AMD64_16);
    assert!(!sixteen.is_empty());
    let got_16 =
        parse_prices_json(&with_config(&w, &["prices", "--json", "--min-cpu", "16", "--max-cpu", "16"]));
    assert_eq!(names(&got_16), names(&sixteen));
    assert!(got_16.iter().all(|o| o.cores == 16));

    // The table: a title, a header, one row per offer in the same order.
    let table = stdout(&with_config(&w, &["prices"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        format!("{} offers for amd64 with 8-64 vCPU and 8-64 GiB (cheapest first):", expected.len()),
        "{table}"
    );
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(header[..3], ["TYPE", "ZONE", "vCPU"], "{table}");
    let rows: Vec<Vec<&str>> = lines[2..].iter().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), expected.len(), "{table}");
    for (row, e) in rows.iter().zip(&expected) {
        assert_eq!(row[..3], [e.instance_type.as_str(), e.zone.as_str(), &e.cores.to_string()], "{table}");
        assert_eq!(row[4], format!("{:.4}", e.spot), "{table}");
        assert_eq!(row.last().copied(), Some(format!("vsw-bp1emulatorzone{}", &e.zone[12..]).as_str()));
    }
}

/// `prices` with a job's bounds lists what such a job is offered: the same rule decides both
/// shapes, within the `[job_overrides]` ceilings (docs/configuration.md, `[job_overrides]`).
#[test]
fn prices_with_a_jobs_bounds_agrees_with_the_job() {
    let w = World::new();
    let c = client(&w);
    let variant = |shape_max_cpu: Option<i64>, ceilings: &[(&str, toml::Value)]| {
        let mut doc: toml::Table = std::fs::read_to_string(&w.config).unwrap().parse().unwrap();
        if let Some(max) = shape_max_cpu {
            let shape = doc.entry("shape").or_insert(toml::Value::Table(Default::default()));
            let amd = shape
                .as_table_mut()
                .unwrap()
                .entry("amd64")
                .or_insert(toml::Value::Table(Default::default()));
            amd.as_table_mut().unwrap().insert("max_cpu".into(), toml::Value::Integer(max));
        }
        let jo = doc.entry("job_overrides").or_insert(toml::Value::Table(Default::default()));
        for (k, v) in ceilings {
            jo.as_table_mut().unwrap().insert(k.to_string(), v.clone());
        }
        let path = w.dir.path().join(format!("variant-{}.toml", ceilings.len()));
        std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        path
    };
    let job_shape = |config: &Path, pairs: &[(&str, &str)]| {
        let env = Env::from_map(pairs.iter().map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v.to_string())));
        aliyun_spot_executor::config::load_for_job(Some(config), &env).unwrap().1.shape
    };
    let prices = |config: &Path, args: &[&str]| {
        let config = config.display().to_string();
        let mut all = vec!["--config", config.as_str(), "prices", "--json"];
        all.extend_from_slice(args);
        let out = aliyun_spot(w.dir.path(), &all, &[]);
        assert!(out.status.success(), "{}", show(&out));
        parse_prices_json(&out)
    };

    // `[shape.amd64] max_cpu = 16` with a ceiling of 64: `MIN_CPU=32` is 32-32 vCPU for both.
    let config = variant(Some(16), &[("max_cpu", toml::Value::Integer(64))]);
    let s = job_shape(&config, &[("ALIYUN_SPOT_MIN_CPU", "32")]);
    assert_eq!((s.min_cpu, s.max_cpu, s.min_mem_gib, s.max_mem_gib), (32, 32, 32.0, 64.0));
    let spec = ShapeSpec { min_cpu: 32, max_cpu: 32, min_mem: 32.0, ..AMD64 };
    let expected = expected_offers(&c, &spec);
    assert!(!expected.is_empty());
    let got = prices(&config, &["--min-cpu", "32"]);
    assert_eq!(names(&got), names(&expected));

    // Ceilings of 8 vCPU and 16 GiB bound a job without variables: never 16 vCPU.
    let config =
        variant(None, &[("max_cpu", toml::Value::Integer(8)), ("max_mem", toml::Value::Integer(16))]);
    let s = job_shape(&config, &[]);
    assert_eq!((s.min_cpu, s.max_cpu, s.min_mem_gib, s.max_mem_gib), (8, 8, 8.0, 16.0));
    let spec = ShapeSpec { min_cpu: 8, max_cpu: 8, min_mem: 8.0, max_mem: 16.0, ..AMD64 };
    let expected = expected_offers(&c, &spec);
    assert!(!expected.is_empty());
    let got = prices(&config, &[]);
    assert_eq!(names(&got), names(&expected));
    assert!(got.iter().all(|o| o.cores == 8));
}

#[test]
fn prices_works_from_the_environment_alone() {
    let w = World::new();
    let expected = expected_offers(&client(&w), &AMD64);
    let endpoint = w.emulator.endpoint();
    let env = [
        ("ALIYUN_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY_ID),
        ("ALIYUN_ACCESS_KEY_SECRET", DEFAULT_ACCESS_KEY_SECRET),
        ("ALIYUN_REGION_ID", "cn-hangzhou"),
        ("ALIYUN_ECS_ENDPOINT", endpoint.as_str()),
    ];

    // A file named by `ALIYUN_SPOT_CONFIG` must exist.
    let missing = w.dir.path().join("no-such-config.toml");
    let mut named = env.to_vec();
    named.push(("ALIYUN_SPOT_CONFIG", missing.to_str().unwrap()));
    let out = aliyun_spot(w.dir.path(), &["prices", "--json"], &named);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot read the configuration file `{}`", missing.display())), "{err}");

    // An empty file: the environment alone is the configuration (a missing default file is
    // the same, `config::load_file`; the machine's own default file is never read by tests).
    let empty = w.dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut env = env.to_vec();
    env.push(("ALIYUN_SPOT_CONFIG", empty.to_str().unwrap()));
    let before = w.emulator.requests().len();
    // `--fresh` keeps the host's default cache directory untouched.
    let out = aliyun_spot(w.dir.path(), &["prices", "--json", "--fresh"], &env);
    assert!(out.status.success(), "{}", show(&out));
    let got = parse_prices_json(&out);
    assert_eq!(names(&got), names(&expected));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json.as_array().unwrap().iter().all(|o| o["vswitch_id"].is_null()), "no vswitch is configured");
    let requests = w.emulator.requests();
    assert!(requests[before..]
        .iter()
        .all(|r| r.access_key_id.as_deref() == Some(DEFAULT_ACCESS_KEY_ID) && r.status == 200));

    // The table says that no zone has a vswitch.
    let out = aliyun_spot(w.dir.path(), &["prices", "--fresh"], &env);
    assert!(out.status.success(), "{}", show(&out));
    let table = stdout(&out);
    assert_eq!(table.lines().count(), expected.len() + 2, "{table}");
    assert!(table.lines().skip(2).all(|l| l.ends_with("(none: not used)")), "{table}");

    // `instances` too.
    let out = aliyun_spot(w.dir.path(), &["instances", "--json"], &env);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), serde_json::json!([]));
}

#[test]
fn prepare_falls_back_when_the_cheapest_offer_is_out_of_stock() {
    let w = World::new();
    // Fill the host's price cache, as a job a minute earlier would have; stock then runs out
    // between the listing and the creation.
    let offers = parse_prices_json(&with_config(&w, &["prices", "--json"]));
    assert_eq!(names(&offers), names(&expected_offers(&client(&w), &AMD64)));
    let (first, second) = (&offers[0], &offers[1]);
    w.emulator.set_faults(Faults {
        no_stock: vec![format!("{}@{}", first.instance_type, first.zone)],
        ..Faults::default()
    });

    let job = w.job("2001", "echo hi");
    let mut attempt = w.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(0), "{}", attempt.log.text());
    let log = attempt.log.text();
    let skipped = format!(
        "{} in {}: out of stock (OperationDenied.NoStock), trying the next offer",
        first.instance_type, first.zone
    );
    assert!(log.lines().any(|l| l == skipped), "no line `{skipped}` in:\n{log}");
    let created = w.emulator.instances();
    assert_eq!(created.len(), 1, "{created:#?}");
    assert_eq!((&created[0].instance_type, &created[0].zone), (&second.instance_type, &second.zone));
    assert!(created[0].live);
    assert!(
        log.contains(&format!(
            "Created spot instance {} ({} in {}",
            created[0].id, second.instance_type, second.zone
        )),
        "{log}"
    );
    assert_eq!(count_action(&w, "RunInstances"), 2);
    assert_eq!(attempt.cleanup().unwrap(), Exit::Code(0), "{}", attempt.runner_log.text());

    // The next job on this host remembers the stock-out: it tries that offer last, so its first
    // RunInstances goes to the second offer and succeeds.
    let job = w.job("2003", "echo hi");
    let mut next = w.attempt(&job);
    assert!(next.config().unwrap().0.success());
    assert_eq!(next.prepare().unwrap(), Exit::Code(0), "{}", next.log.text());
    let log = next.log.text();
    let remembered = format!(
        "Trying last what ran out of stock on this host in the last 10m: {} in {}",
        first.instance_type, first.zone
    );
    assert!(log.lines().any(|l| l == remembered), "no line `{remembered}` in:\n{log}");
    assert!(!log.contains("out of stock (OperationDenied.NoStock)"), "{log}");
    assert_eq!(count_action(&w, "RunInstances"), 3, "one call for the second job");
    let created = w.emulator.instances();
    assert_eq!((&created[1].instance_type, &created[1].zone), (&second.instance_type, &second.zone));
    assert_eq!(next.cleanup().unwrap(), Exit::Code(0), "{}", next.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn prepare_fails_as_a_system_failure_when_every_offer_is_out_of_stock() {
    let w = World::new();
    let offers = parse_prices_json(&with_config(&w, &["prices", "--json"]));
    let n = offers.len();
    assert!(n > 1);
    w.emulator.set_faults(Faults { no_stock: vec!["*@*".to_string()], ..Faults::default() });

    let job = w.job("2002", "echo never");
    let mut attempt = w.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(2), "{}", attempt.log.text());
    let log = attempt.log.text();
    let summary = format!(
        "ERROR: no spot capacity: all {n} offers failed: {n} out of stock (OperationDenied.NoStock); retry later, widen the shape, or add zones"
    );
    assert!(log.lines().any(|l| l == summary), "no line `{summary}` in:\n{log}");
    // Every offer was tried once, in order; the last one says so.
    let tried: Vec<String> = w
        .emulator
        .requests()
        .iter()
        .filter(|r| r.action.as_deref() == Some("RunInstances"))
        .map(|r| format!("{}@{}", r.params["InstanceType"], r.params["ZoneId"]))
        .collect();
    let order: Vec<String> = offers.iter().map(|o| format!("{}@{}", o.instance_type, o.zone)).collect();
    assert_eq!(tried, order);
    let last = offers.last().unwrap();
    let last_line = format!(
        "{} in {}: out of stock (OperationDenied.NoStock), no offers left",
        last.instance_type, last.zone
    );
    assert!(log.lines().any(|l| l == last_line), "{log}");
    assert!(w.emulator.instances().is_empty(), "{:#?}", w.emulator.instances());

    assert_eq!(attempt.cleanup().unwrap(), Exit::Code(0), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn instances_shows_the_prepared_job_until_cleanup() {
    let w = World::new();
    let job = w.job("3001", "echo hi");
    let mut attempt = w.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(0), "{}", attempt.log.text());
    let created = w.emulator.instances();
    assert_eq!(created.len(), 1);
    let inst = &created[0];

    let rows: Value = serde_json::from_slice(&with_config(&w, &["instances", "--json"]).stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let row = &rows[0];
    assert_eq!(row["id"], inst.id.as_str());
    assert_eq!(row["job"], "3001");
    assert_eq!(row["project"], "42");
    assert_eq!(row["runner"], "7");
    assert_eq!(row["instance_type"], inst.instance_type.as_str());
    assert_eq!(row["zone"], inst.zone.as_str());
    assert_eq!(row["status"], "Running");
    assert!(row["spot_price_limit"].as_f64().is_some_and(|p| p > 0.0), "{row:#}");

    let table = stdout(&with_config(&w, &["instances"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "1 managed instance(s) in cn-hangzhou", "{table}");
    let cols: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(cols[0], inst.id, "{table}");
    assert!(cols.contains(&"3001"), "{table}");

    assert_eq!(attempt.cleanup().unwrap(), Exit::Code(0), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
    let rows: Value = serde_json::from_slice(&with_config(&w, &["instances", "--json"]).stdout).unwrap();
    assert_eq!(rows, serde_json::json!([]));
    assert_eq!(stdout(&with_config(&w, &["instances"])), "0 managed instance(s) in cn-hangzhou\n");
}

#[test]
fn a_warm_price_cache_spares_the_catalogue_calls_of_the_next_prepare() {
    // One fitting type is sold out everywhere: its prices are never asked for.
    let w = World::with_faults(Faults { no_stock: vec!["ecs.c7.2xlarge@*".into()], ..Faults::default() });
    // The types whose prices a cold prepare must read: fitting types in stock somewhere.
    let priced: BTreeSet<String> =
        expected_offers(&client(&w), &AMD64).into_iter().map(|o| o.instance_type).collect();
    assert!(!priced.contains("ecs.c7.2xlarge") && priced.contains("ecs.c7.4xlarge"), "{priced:?}");
    let baseline = catalogue_calls(&w);
    let seen = w.emulator.requests().len();

    let run_prepare = |job_id: &str| {
        let job = w.job(job_id, "echo hi");
        let mut attempt = w.attempt(&job);
        assert!(attempt.config().unwrap().0.success());
        assert_eq!(attempt.prepare().unwrap(), Exit::Code(0), "{}", attempt.log.text());
        attempt
    };
    let delta = |before: &BTreeMap<&'static str, usize>| -> Vec<(&'static str, usize)> {
        catalogue_calls(&w).into_iter().map(|(a, n)| (a, n - before[a])).collect()
    };

    let first = run_prepare("4001");
    let cold = delta(&baseline);
    assert_eq!(
        cold,
        [
            ("DescribeAvailableResource", 1),
            ("DescribeInstanceTypes", 1),
            ("DescribeSpotPriceHistory", priced.len())
        ]
    );
    // One call per priced type, each for that type in every zone.
    let asked: Vec<(String, Option<String>)> = w.emulator.requests()[seen..]
        .iter()
        .filter(|r| r.action.as_deref() == Some("DescribeSpotPriceHistory"))
        .map(|r| (r.params["InstanceType"].clone(), r.params.get("ZoneId").cloned()))
        .collect();
    let asked_types: BTreeSet<String> = asked.iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(asked_types, priced);
    assert!(asked.iter().all(|(_, zone)| zone.is_none()), "{asked:?}");
    assert_eq!(first.cleanup().unwrap(), Exit::Code(0), "{}", first.runner_log.text());

    let after_first = catalogue_calls(&w);
    let second = run_prepare("4002");
    assert_eq!(
        delta(&after_first),
        [("DescribeAvailableResource", 0), ("DescribeInstanceTypes", 0), ("DescribeSpotPriceHistory", 0)]
    );
    // Both jobs got the same cheapest offer.
    let created = w.emulator.instances();
    assert_eq!(created.len(), 2);
    assert_eq!((&created[0].instance_type, &created[0].zone), (&created[1].instance_type, &created[1].zone));
    assert_eq!(second.cleanup().unwrap(), Exit::Code(0), "{}", second.runner_log.text());
    w.assert_nothing_left();
}

/// The decimals of a decimal number as sent (`"0.211"` → 3).
fn decimals(v: &str) -> usize {
    v.split_once('.').map_or(0, |(_, f)| f.trim_end_matches('0').len())
}

#[test]
fn spot_price_limits_have_at_most_three_decimals_and_more_are_refused() {
    let w = World::new();
    let c = client(&w);
    // The emulator refuses a limit with four decimals, as the generic parameter error.
    let req = aliyun_spot_executor::ecs::RunInstancesRequest {
        zone_id: "cn-hangzhou-j".into(),
        instance_type: "ecs.c7.2xlarge".into(),
        image_id: "ubuntu_24_04_x64_20G_alibase_20250101.vhd".into(),
        security_group_id: "sg-bp1emulator0000000001".into(),
        vswitch_id: "vsw-bp1emulatorzonej".into(),
        instance_name: "decimals".into(),
        host_name: None,
        spot_strategy: aliyun_spot_executor::ecs::SpotStrategy::SpotWithPriceLimit,
        spot_price_limit: Some(5.0),
        spot_duration: Some(1),
        internet_max_bandwidth_out: 0,
        system_disk_category: None,
        system_disk_size: None,
        key_pair_name: None,
        ram_role_name: None,
        user_data: None,
        tags: Vec::new(),
        auto_release_time: None,
        client_token: "decimals-1".into(),
        dry_run: true,
    };
    let mut params = aliyun_spot_executor::ecs::run_instances_params(&req).unwrap();
    for (k, v) in params.iter_mut() {
        if k == "SpotPriceLimit" {
            *v = "4.9999".into();
        }
    }
    let e = c.call("RunInstances", &params).unwrap_err();
    assert_eq!(e.code(), Some("InvalidParameter"), "{e}");
    assert_eq!(
        e.kind(),
        aliyun_spot_executor::ecs::ErrorKind::Parameter,
        "a request problem, not the offer's"
    );
    assert!(e.to_string().contains("SpotPriceLimit"), "{e}");
    // Three decimals pass (DryRun).
    for (k, v) in params.iter_mut() {
        if k == "SpotPriceLimit" {
            *v = "4.999".into();
        }
    }
    assert_eq!(c.call("RunInstances", &params).unwrap_err().code(), Some("DryRunOperation"));

    // Every limit the driver sends passes: at most three decimals, at least 1.2 × the price.
    let offers = parse_prices_json(&with_config(&w, &["prices", "--json"]));
    assert!(
        offers.iter().take(5).any(|o| decimals(&o.spot.to_string()) > 3),
        "the test needs 4-decimal prices"
    );
    let sold_out: Vec<String> =
        offers.iter().take(3).map(|o| format!("{}@{}", o.instance_type, o.zone)).collect();
    w.emulator.set_faults(Faults { no_stock: sold_out, ..Faults::default() });
    let before = w.emulator.requests().len();
    let job = w.job("5001", "echo hi");
    let mut attempt = w.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(0), "{}", attempt.log.text());
    let runs: Vec<_> = w.emulator.requests()[before..]
        .iter()
        .filter(|r| r.action.as_deref() == Some("RunInstances"))
        .cloned()
        .collect();
    assert_eq!(runs.len(), 4);
    for (r, o) in runs.iter().zip(&offers) {
        let limit = &r.params["SpotPriceLimit"];
        assert!(decimals(limit) <= 3, "{limit}");
        assert!(limit.parse::<f64>().unwrap() >= o.spot * 1.2 - 1e-9, "{limit} for {}", o.spot);
        assert!(limit.parse::<f64>().unwrap() < o.spot * 1.2 + 0.001, "{limit} for {}", o.spot);
    }
    assert_eq!(runs.last().unwrap().status, 200);
    assert_eq!(attempt.cleanup().unwrap(), Exit::Code(0), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn one_protection_period_for_prices_stock_and_creation() {
    for (hours, config) in [("1", None), ("0", Some(0))] {
        let overrides: Vec<(&str, &str, toml::Value)> =
            config.map(|h| vec![("spot", "protection_hours", toml::Value::Integer(h))]).unwrap_or_default();
        let w = World::with(Faults::default(), &overrides);
        let job = w.job("6001", "echo hi");
        let mut attempt = w.attempt(&job);
        assert!(attempt.config().unwrap().0.success());
        assert_eq!(attempt.prepare().unwrap(), Exit::Code(0), "{}", attempt.log.text());
        let requests = w.emulator.requests();
        for action in ["DescribeAvailableResource", "DescribeSpotPriceHistory", "RunInstances"] {
            let sent: BTreeSet<Option<&str>> = requests
                .iter()
                .filter(|r| r.action.as_deref() == Some(action))
                .map(|r| r.params.get("SpotDuration").map(String::as_str))
                .collect();
            assert_eq!(sent, BTreeSet::from([Some(hours)]), "{action} with protection_hours {hours}");
        }
        assert_eq!(attempt.cleanup().unwrap(), Exit::Code(0), "{}", attempt.runner_log.text());
        w.assert_nothing_left();
    }

    // Without protection, the emulator quotes less, and the driver ranks and limits by it.
    let w = World::with(Faults::default(), &[("spot", "protection_hours", toml::Value::Integer(0))]);
    let hour = expected_offers(&client(&w), &AMD64);
    let none = parse_prices_json(&with_config(&w, &["prices", "--json"]));
    assert_eq!(hour.len(), none.len());
    for o in &none {
        let h = hour.iter().find(|e| (&e.instance_type, &e.zone) == (&o.instance_type, &o.zone)).unwrap();
        assert!(
            o.spot < h.spot * 0.95,
            "{} in {}: {} vs {} with an hour",
            o.instance_type,
            o.zone,
            o.spot,
            h.spot
        );
    }
    // A protection period ECS does not offer is refused by the configuration, naming the key.
    let w = World::with(Faults::default(), &[("spot", "protection_hours", toml::Value::Integer(2))]);
    let out = aliyun_spot(w.dir.path(), &["prices", "--config", &w.config.display().to_string()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`spot.protection_hours`"), "{}", show(&out));
}

#[test]
fn prices_and_costs_are_labelled_with_the_accounts_currency() {
    let w = World::with_faults(Faults { currency: Some("USD".into()), ..Faults::default() });
    let table = stdout(&with_config(&w, &["prices"]));
    let header = table.lines().nth(1).unwrap();
    assert!(
        header.contains("SPOT/h USD") && header.contains("ON-DEMAND/h USD") && header.contains("SAVING"),
        "{table}"
    );
    assert!(!table.contains("CNY"), "{table}");
    // A saving is labelled as what is saved: a spot price at 12 % of the list price is 88 % off.
    let offers: Value = serde_json::from_slice(&with_config(&w, &["prices", "--json"]).stdout).unwrap();
    let first = &offers[0];
    assert_eq!(first["currency"], "USD");
    let off = ((1.0 - first["discount"].as_f64().unwrap()) * 100.0).round();
    let row: Vec<&str> = table.lines().nth(2).unwrap().split_whitespace().collect();
    assert!(row.windows(2).any(|p| p == [format!("{off:.0}%").as_str(), "off"]), "{row:?}");

    let job = w.job("7001", "echo hi");
    let mut attempt = w.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(0), "{}", attempt.log.text());
    let log = attempt.log.text();
    assert!(log.lines().any(|l| l.starts_with("Created spot instance") && l.contains(" USD/hour")), "{log}");
    assert!(!log.contains("CNY"), "{log}");
    assert_eq!(attempt.cleanup().unwrap(), Exit::Code(0), "{}", attempt.runner_log.text());
    let runner_log = attempt.runner_log.text();
    assert!(runner_log.lines().any(|l| l.contains(" USD/hour: ") && l.ends_with(" USD")), "{runner_log}");
    let config = aliyun_spot_executor::config::load(Some(&w.config), &Env::default()).unwrap();
    let ledger = std::fs::read_to_string(&config.paths.ledger).unwrap();
    let entry: Value = serde_json::from_str(ledger.lines().last().unwrap()).unwrap();
    assert_eq!(entry["currency"], "USD", "{ledger}");
    w.assert_nothing_left();
}

#[test]
fn shared_burstable_and_gpu_types_only_when_allowed() {
    let other = ["ecs.s6-c1m2.2xlarge", "ecs.t5-c1m1.2xlarge", "ecs.gn6i-c8g1.2xlarge"];
    let w = World::new();
    let got = parse_prices_json(&with_config(&w, &["prices", "--json"]));
    assert!(!got.is_empty());
    assert!(got.iter().all(|o| !other.contains(&o.instance_type.as_str())), "{:?}", names(&got));

    let allow = [
        ("spot", "allow_shared", toml::Value::Boolean(true)),
        ("spot", "allow_burstable", toml::Value::Boolean(true)),
        ("spot", "allow_gpu", toml::Value::Boolean(true)),
    ];
    let w = World::with(Faults::default(), &allow);
    let expected = expected_offers(&client(&w), &ShapeSpec { other_kinds: true, ..AMD64 });
    let got = parse_prices_json(&with_config(&w, &["prices", "--json"]));
    assert_eq!(names(&got), names(&expected));
    for t in other {
        assert!(got.iter().any(|o| o.instance_type == t), "{t} allowed: {:?}", names(&got));
    }
    // One kind at a time.
    let w = World::with(Faults::default(), &allow[2..]);
    let got = parse_prices_json(&with_config(&w, &["prices", "--json"]));
    let kinds: BTreeSet<&str> =
        got.iter().map(|o| o.instance_type.as_str()).filter(|t| other.contains(t)).collect();
    assert_eq!(kinds, BTreeSet::from(["ecs.gn6i-c8g1.2xlarge"]));
}

#[test]
fn a_retried_prepare_asks_ecs_afresh_when_stock_comes_back() {
    let w = World::new();
    // The host's price cache is warm, as a job a minute earlier left it.
    let offers = parse_prices_json(&with_config(&w, &["prices", "--json"]));
    w.emulator.set_faults(Faults { no_stock: vec!["*@*".into()], ..Faults::default() });

    let job = w.job("8001", "echo hi");
    let mut attempt = w.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(2), "{}", attempt.log.text());
    // Every cached offer failed, so ECS was asked again before giving up: it said sold out.
    assert_eq!(count_action(&w, "RunInstances"), offers.len());
    assert_eq!(count_action(&w, "DescribeAvailableResource"), 2);

    // Stock is back; gitlab-runner retries the preparation 3 s later, well inside the cache
    // lifetime (5 minutes), and the cached "nothing available" does not stand in the way.
    w.emulator.set_faults(Faults::default());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(0), "{}", attempt.log.text());
    assert_eq!(count_action(&w, "DescribeAvailableResource"), 3);
    let created = w.emulator.instances();
    assert_eq!(created.len(), 1, "{created:#?}");
    assert_eq!((&created[0].instance_type, &created[0].zone), (&offers[0].instance_type, &offers[0].zone));
    assert_eq!(attempt.cleanup().unwrap(), Exit::Code(0), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn the_emulator_prices_protection_and_pages_as_ecs_documents() {
    let w = World::new();
    let c = client(&w);
    let price = |duration: Option<&str>| -> Result<f64, String> {
        let mut params = vec![
            ("NetworkType".to_string(), "vpc".to_string()),
            ("InstanceType".to_string(), "ecs.c7.2xlarge".to_string()),
            ("ZoneId".to_string(), "cn-hangzhou-j".to_string()),
        ];
        if let Some(d) = duration {
            params.push(("SpotDuration".to_string(), d.to_string()));
        }
        let v =
            c.call("DescribeSpotPriceHistory", &params).map_err(|e| e.code().unwrap_or("?").to_string())?;
        let page = items(&v, &["SpotPrices", "SpotPriceType"]);
        Ok(page.last().unwrap()["SpotPrice"].as_f64().unwrap())
    };
    // Absent means one hour (the request models' default); no protection is cheaper.
    let (absent, one, zero) = (price(None).unwrap(), price(Some("1")).unwrap(), price(Some("0")).unwrap());
    assert_eq!(absent, one);
    assert!(zero < one * 0.95 && zero > one * 0.8, "{zero} vs {one}");
    assert_eq!(price(Some("2")), Err("InvalidSpotDuration".to_string()));
    let stock = [
        ("DestinationResource", "InstanceType"),
        ("SpotStrategy", "SpotWithPriceLimit"),
        ("SpotDuration", "3"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    assert_eq!(c.call("DescribeAvailableResource", &stock).unwrap_err().code(), Some("InvalidSpotDuration"));

    // DescribeInstanceTypes pages with MaxResults/NextToken, up to 1600 a page.
    let all = aliyun_spot_executor::ecs::InstanceTypeFilter::default();
    let every = c.describe_instance_types(&all).unwrap();
    let mut token = String::new();
    let mut paged = Vec::new();
    loop {
        let mut params = vec![("MaxResults".to_string(), "7".to_string())];
        if !token.is_empty() {
            params.push(("NextToken".to_string(), token.clone()));
        }
        let v = c.call("DescribeInstanceTypes", &params).unwrap();
        let page = items(&v, &["InstanceTypes", "InstanceType"]);
        assert!(page.len() <= 7);
        paged.extend(page.iter().map(|t| t["InstanceTypeId"].as_str().unwrap().to_string()));
        token = v["NextToken"].as_str().unwrap_or_default().to_string();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(paged, every.iter().map(|t| t.id.clone()).collect::<Vec<_>>());
    let too_many = [("MaxResults".to_string(), "1601".to_string())];
    assert_eq!(
        c.call("DescribeInstanceTypes", &too_many).unwrap_err().code(),
        Some("InvalidMaxResults.Malformed")
    );
    let last = w
        .emulator
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.action.as_deref() == Some("DescribeInstanceTypes"));
    assert_eq!(last.unwrap().params["MaxResults"], "1601");
    let ours = w.emulator.requests();
    let ours = ours.iter().find(|r| r.action.as_deref() == Some("DescribeInstanceTypes")).unwrap();
    assert_eq!(ours.params["MaxResults"], "1600", "the client asks for the API's maximum page");
}
