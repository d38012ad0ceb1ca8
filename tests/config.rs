//! Configuration: every error class as the administrator or the job author sees it (whole
//! lines), precedence of environment over file over defaults, job overrides within bounds, and
//! the shipped example files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aliyun_spot_executor::config::{self, Config, Override, SpotStrategy, DEFAULT_CONFIG_PATH};
use aliyun_spot_executor::env::Env;
use aliyun_spot_executor::exit::one_line;
use aliyun_spot_executor::selection::{Arch, Ranking};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Parses `text` as if it were the file `/etc/spot.toml`.
fn parse(text: &str, env: &Env) -> anyhow::Result<Config> {
    config::from_toml(text, Some(Path::new("/etc/spot.toml")), env)
}

fn err(text: &str, env: &Env) -> String {
    match parse(text, env) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => one_line(&e),
    }
}

fn no_env() -> Env {
    Env::default()
}

/// A configuration complete enough for prepare, with a job environment added by each test.
const COMPLETE: &str = r#"
[aliyun]
region_id = "cn-hangzhou"
[credentials]
access_key_id = "LTAIfile"
access_key_secret = "file-secret-value"
[network]
security_group_id = "sg-1"
[network.vswitches]
"cn-hangzhou-b" = "vsw-b"
[images]
amd64 = "img-x86"
arm64 = "img-arm"
[self_destruct]
role_arn = "acs:ram::1234567890123456:role/ci-spot-self-destruct"
"#;

fn job(pairs: &[(&str, &str)]) -> Env {
    Env::from_map(pairs.iter().map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v.to_string())))
}

fn job_err(cfg_text: &str, pairs: &[(&str, &str)]) -> String {
    let env = job(pairs);
    let cfg = parse(cfg_text, &env).unwrap();
    match cfg.job_spec(&env) {
        Ok(s) => panic!("expected an error, got {s:?}"),
        Err(e) => one_line(&e),
    }
}

// ----- error classes (one line each: key or variable, value, fix) -----

#[test]
fn unknown_key_names_the_key_and_its_table() {
    assert_eq!(
        err("[spot]\nprice_limit_factor = 1.5\nprice_limit_facter = 2\n", &no_env()),
        "invalid configuration file `/etc/spot.toml` at line 3: unknown key `price_limit_facter` in table \
         `[spot]`; expected one of `strategy`, `price_limit_factor`, `max_price_per_hour`, `ranking`, \
         `price_cache_ttl`, `stock_cooldown`, `protection_hours`, `allow_shared`, `allow_burstable`, `allow_gpu` (see docs/configuration.md)"
    );
    assert_eq!(
        err("regionid = \"cn-hangzhou\"\n", &no_env()),
        "invalid configuration file `/etc/spot.toml` at line 1: unknown key `regionid` at the top level; expected \
         one of `aliyun`, `credentials`, `network`, `images`, `instance`, `shape`, `spot`, `ssh`, `job_overrides`, \
         `safety`, `self_destruct`, `paths`, `runner`, `timeouts`, `helper` (see docs/configuration.md)"
    );
    // Nested tables too.
    let e = err("[shape.arm64]\nmin_cpus = 4\n", &no_env());
    assert!(e.contains("unknown key `min_cpus` in table `[shape.arm64]`"), "{e}");
}

#[test]
fn bad_type_names_the_key() {
    assert_eq!(
        err("[ssh]\nport = \"twenty-two\"\n", &no_env()),
        "invalid configuration file `/etc/spot.toml` at line 2: `ssh.port`: invalid type: string \"twenty-two\", \
         expected u16"
    );
    assert_eq!(
        err("[safety]\nmax_lifetime = 10800\n", &no_env()),
        "invalid configuration file `/etc/spot.toml` at line 2: `safety.max_lifetime`: durations are strings with a \
         unit; write \"10800s\" for 10800 seconds (or \"10m\", \"3h\")"
    );
    assert_eq!(
        err("[spot]\nstrategy = \"Cheapest\"\n", &no_env()),
        "invalid configuration file `/etc/spot.toml` at line 2: `spot.strategy`: unknown variant `Cheapest`, \
         expected `SpotWithPriceLimit` or `SpotAsPriceGo`"
    );
    let e = err("[aliyun\nregion_id = 1\n", &no_env());
    assert!(e.starts_with("invalid configuration file `/etc/spot.toml` at line 1: "), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn endpoint_must_be_https_or_loopback_http() {
    assert_eq!(
        err("[aliyun]\nendpoint = \"http://ecs.cn-hangzhou.aliyuncs.com\"\n", &no_env()),
        "`aliyun.endpoint` = `http://ecs.cn-hangzhou.aliyuncs.com` in `/etc/spot.toml` uses plain http to \
         `ecs.cn-hangzhou.aliyuncs.com`, which would send signed requests unencrypted; use `https://` (plain \
         `http://` is accepted only for loopback addresses such as the emulator's `http://127.0.0.1:9470`)"
    );
    // The same rule as the client's: no query, and IPv4-mapped loopback is loopback.
    assert_eq!(
        err("[aliyun]\nendpoint = \"https://ecs.cn-hangzhou.aliyuncs.com/?x=1\"\n", &no_env()),
        "`aliyun.endpoint` = `https://ecs.cn-hangzhou.aliyuncs.com/?x=1` in `/etc/spot.toml` has a query or fragment; \
         write the endpoint without `?…` or `#…`"
    );
    assert!(parse("[aliyun]\nendpoint = \"http://[::ffff:127.0.0.1]:9470\"\n", &no_env()).is_ok());
    let env = Env::from_map([("ALIYUN_ECS_ENDPOINT", "ecs.aliyuncs.com")]);
    assert_eq!(
        err("", &env),
        "environment variable `ALIYUN_ECS_ENDPOINT`=`ecs.aliyuncs.com` is not a URL; write it as `https://host` \
         (e.g. `https://ecs-vpc.cn-hangzhou.aliyuncs.com`)"
    );
    let ok = parse("[aliyun]\nendpoint = \"http://127.0.0.1:9470/\"\n", &no_env()).unwrap();
    assert_eq!(ok.endpoint.as_deref(), Some("http://127.0.0.1:9470"));
}

#[test]
fn price_limit_factor_below_one() {
    assert_eq!(
        err("[spot]\nprice_limit_factor = 0.9\n", &no_env()),
        "`spot.price_limit_factor` = `0.9` in `/etc/spot.toml` is below 1.0, so the limit would be under the \
         offer's own price and every creation would fail; set 1.0 or more (default 1.2)"
    );
}

#[test]
fn minimum_above_maximum() {
    assert_eq!(
        err("[shape.amd64]\nmin_cpu = 32\nmin_mem = 32\nmax_cpu = 16\n", &no_env()),
        "`shape.amd64.min_cpu` = `32` in `/etc/spot.toml` is above the maximum `shape.amd64.max_cpu` = `16` in \
         `/etc/spot.toml`; make the minimum at most the maximum"
    );
    assert_eq!(
        err("", &Env::from_map([("MIN_CPU", "96")])),
        "environment variable `MIN_CPU`=`96` is above the maximum `shape.amd64.max_cpu` = `64` (the default); make \
         the minimum at most the maximum"
    );
    assert_eq!(
        err("[shape.arm64]\nmax_mem = 32\n", &Env::from_map([("MIN_CPU", "32")])),
        "environment variable `MIN_CPU`=`32` (minimum memory 64 GiB implied at 2 GiB per vCPU) is above the \
         maximum `shape.arm64.max_mem` = `32` in `/etc/spot.toml`; make the minimum at most the maximum"
    );
    assert_eq!(
        err("", &Env::from_map([("MIN_MEM", "lots")])),
        "environment variable `MIN_MEM`=`lots` is not a positive number of GiB; set e.g. `16`"
    );
}

#[test]
fn other_bounds() {
    assert_eq!(
        err("[safety]\nmax_lifetime = \"20m\"\n", &no_env()),
        "`safety.max_lifetime` = `20m` in `/etc/spot.toml` is shorter than the 30 minutes Aliyun requires for \
         `AutoReleaseTime`; set at least \"30m\" (default \"3h\")"
    );
    assert_eq!(
        err("[timeouts]\nprepare = \"5m\"\n", &no_env()),
        "`timeouts.prepare` = `5m` in `/etc/spot.toml` is not longer than `ssh.boot_timeout` = `10m`, so prepare \
         could never wait for SSH; make it longer"
    );
    assert_eq!(
        err("[network]\nprivate_ip = true\ninternet_max_bandwidth_out = 10\n", &no_env()),
        "`network.internet_max_bandwidth_out` = `10` in `/etc/spot.toml` contradicts `network.private_ip = true` \
         (no public IP); remove one of them"
    );
    assert_eq!(
        err("[safety]\ntag_prefix = \"aliyun-spot-executor\"\n", &no_env()),
        "`safety.tag_prefix` = `aliyun-spot-executor` in `/etc/spot.toml` starts with a prefix Aliyun reserves \
         (`aliyun`, `acs:`), so ECS would reject it; choose another key"
    );
    assert_eq!(
        err("[aliyun]\nregion_id = \"cn-hangzhou\"\n[network.vswitches]\n\"cn-shanghai-b\" = \"vsw-1\"\n", &no_env()),
        "`network.vswitches` = `{ \"cn-shanghai-b\" = \"vsw-1\" }` in `/etc/spot.toml` names a zone outside region \
         `cn-hangzhou`; use zone ids of that region, such as `cn-hangzhou-b`"
    );
    // Names ECS refuses as a `HostName` (no consecutive `-` or `.`, at most 64 characters) or an
    // `InstanceName`, for a job's instance or a GitHub runner's (`ecs::names` cites the sources).
    let rule =
        "use 1 to 33 letters, digits and single `-` between them, starting with a letter and ending with a \
                letter or digit";
    assert_eq!(
        err("[instance]\nname_prefix = \"ci--runner\"\n", &no_env()),
        format!(
            "`instance.name_prefix` = `ci--runner` in `/etc/spot.toml` makes the host name \
             `ci--runner-amd64-spot-19700101000000`, which ECS refuses (a host name cannot hold consecutive `.` or \
             `-`); {rule} (or set `instance.hostname`)"
        )
    );
    assert_eq!(
        err("[instance]\nname_prefix = \"ci-\"\n", &no_env()),
        format!(
            "`instance.name_prefix` = `ci-` in `/etc/spot.toml` makes the host name `ci--amd64-spot-19700101000000`, \
             which ECS refuses (a host name cannot hold consecutive `.` or `-`); {rule} (or set `instance.hostname`)"
        )
    );
    let long = "a".repeat(34);
    assert_eq!(
        err(&format!("[instance]\nname_prefix = \"{long}\"\n"), &no_env()),
        format!(
            "`instance.name_prefix` = `{long}` in `/etc/spot.toml` makes the host name \
             `{long}-amd64-spot-19700101000000-ffff`, which ECS refuses (a host name has 2 to 64 characters); {rule} \
             (or set `instance.hostname`)"
        )
    );
    assert_eq!(
        err("[instance]\nname_prefix = \"1ci\"\n", &no_env()),
        format!("`instance.name_prefix` = `1ci` in `/etc/spot.toml` is not usable in instance and host names; {rule}")
    );
    assert_eq!(
        err("[instance]\nhostname = \"build..host\"\n", &no_env()),
        "`instance.hostname` = `build..host` in `/etc/spot.toml` is not a valid host name (a host name cannot hold \
         consecutive `.` or `-`); use 2 to 64 letters, digits and single `.` or `-` between them, or leave it out to \
         use the instance name"
    );
    // A fixed host name leaves the prefix to the instance-name rule alone.
    let c =
        parse("[instance]\nname_prefix = \"ci--runner\"\nhostname = \"build-host\"\n", &no_env()).unwrap();
    assert_eq!(c.instance.host_name("ci--runner-amd64-spot-1"), "build-host");
    let c = parse(&format!("[instance]\nname_prefix = \"{}\"\n", "a".repeat(33)), &no_env()).unwrap();
    assert_eq!(c.instance.name_prefix.len(), 33);
    assert_eq!(
        err("[ssh]\nprivate_key_file = \"id\"\n", &no_env()),
        "`ssh.private_key_file` is set but `ssh.key_pair_name` is not in `/etc/spot.toml`; name the registered key \
         pair whose private key it is (or `ALIYUN_KEY_PAIR_NAME`), or remove the file to use per-job keys"
    );
    assert_eq!(
        err("", &Env::from_map([("ALIYUN_VSWITCH_ID_B", "vsw-1")])),
        "environment variable `ALIYUN_VSWITCH_ID_B` is set but no region is; set `ALIYUN_REGION_ID` (its zones are \
         named after the region) or `aliyun.region_id`"
    );
}

#[test]
fn half_an_access_key_pair_is_an_error() {
    assert_eq!(
        err("", &Env::from_map([("ALIYUN_ACCESS_KEY_ID", "LTAIx")])),
        "environment variable `ALIYUN_ACCESS_KEY_ID` is set but `ALIYUN_ACCESS_KEY_SECRET` is not; set both, or \
         neither to use the configuration file"
    );
    assert_eq!(
        err("[credentials]\naccess_key_secret = \"s3cr3t-value\"\n", &no_env()),
        "`credentials.access_key_secret` is set but `credentials.access_key_id` is not in `/etc/spot.toml`; set both"
    );
}

#[test]
fn missing_settings_for_prepare_are_listed_in_one_line() {
    let cfg = parse("", &no_env()).unwrap();
    assert_eq!(
        one_line(&cfg.require_for_prepare(Arch::Arm64).unwrap_err()),
        "the configuration is incomplete for creating instances: missing region (`aliyun.region_id` or \
         `ALIYUN_REGION_ID`), credentials (`ALIYUN_ACCESS_KEY_ID` + `ALIYUN_ACCESS_KEY_SECRET`, \
         `credentials.profile_file`, or `credentials.use_instance_role = true`), security group \
         (`network.security_group_id` or `ALIYUN_SECURITY_GROUP_ID`), a vswitch (`[network.vswitches]` zone = \
         vswitch, or `ALIYUN_VSWITCH_ID_<ZONE LETTER>`), arm64 image (`images.arm64` or `ALIYUN_ARM64_IMAGE_ID`)"
    );
    assert_eq!(
        one_line(&cfg.require_for_api().unwrap_err()),
        "the configuration is incomplete for calling the ECS API: missing region (`aliyun.region_id` or \
         `ALIYUN_REGION_ID`), credentials (`ALIYUN_ACCESS_KEY_ID` + `ALIYUN_ACCESS_KEY_SECRET`, \
         `credentials.profile_file`, or `credentials.use_instance_role = true`)"
    );
    let cfg = parse("[aliyun]\nregion_id = \"cn-hangzhou\"\n[images]\narm64 = \"img\"\n", &no_env()).unwrap();
    let e = one_line(&cfg.require_for_prepare(Arch::Amd64).unwrap_err());
    assert!(e.ends_with("amd64 image (`images.amd64` or `ALIYUN_AMD64_IMAGE_ID`)"), "{e}");
    assert!(!e.contains("region"), "{e}");
    let complete = parse(COMPLETE, &no_env()).unwrap();
    complete.require_for_prepare(Arch::Amd64).unwrap();
    complete.require_for_prepare(Arch::Arm64).unwrap();
}

// ----- secrets -----

#[test]
fn secrets_never_appear_in_debug_or_errors() {
    let env = Env::from_map([
        ("ALIYUN_ACCESS_KEY_ID", "LTAIenv"),
        ("ALIYUN_ACCESS_KEY_SECRET", "env-secret-value"),
        ("ALIYUN_SECURITY_TOKEN", "env-sts-token-value"),
    ]);
    let cfg = parse(COMPLETE, &env).unwrap();
    let dbg = format!("{cfg:?}");
    for s in ["env-secret-value", "env-sts-token-value", "file-secret-value"] {
        assert!(!dbg.contains(s), "{s} leaked into {dbg}");
    }
    assert!(dbg.contains("REDACTED"));
    let e = err("[credentials]\naccess_key_secret = \"file-secret-value\"\n", &no_env());
    assert!(!e.contains("file-secret-value"), "{e}");
}

// ----- precedence: environment over file over defaults -----

#[test]
fn environment_overrides_file_overrides_defaults() {
    let file = r#"
[aliyun]
region_id = "cn-shanghai"
[network]
vpc_id = "vpc-file"
security_group_id = "sg-file"
[network.vswitches]
"cn-shanghai-b" = "vsw-file-b"
[images]
amd64 = "img-file"
[ssh]
key_pair_name = "kp-file"
[shape.amd64]
min_cpu = 16
max_cpu = 32
"#;
    let from_file = parse(file, &no_env()).unwrap();
    assert_eq!(from_file.region_id.as_deref(), Some("cn-shanghai"));
    assert_eq!(from_file.network.security_group_id.as_deref(), Some("sg-file"));
    assert_eq!(from_file.images.get(&Arch::Amd64).map(String::as_str), Some("img-file"));
    assert_eq!(from_file.images.get(&Arch::Arm64), None);
    let amd = from_file.shape(Arch::Amd64);
    assert_eq!((amd.min_cpu, amd.max_cpu, amd.min_mem_gib, amd.max_mem_gib), (16, 32, 16.0, 64.0));
    // Defaults where neither says anything.
    assert_eq!(from_file.spot.price_limit_factor, 1.2);
    assert_eq!(from_file.spot.strategy, SpotStrategy::SpotWithPriceLimit);
    assert_eq!(from_file.spot.ranking, Ranking::PerCore);
    assert_eq!(from_file.spot.price_cache_ttl, Duration::from_secs(300));
    assert_eq!(from_file.ssh.user, "root");
    assert_eq!(from_file.ssh.port, 22);
    assert_eq!(from_file.safety.max_lifetime, Duration::from_secs(3 * 3600));
    assert_eq!(from_file.runner.builds_dir, "/builds");
    assert_eq!(from_file.paths.state_dir, Path::new("/var/lib/aliyun-spot-executor"));
    assert_eq!(from_file.paths.ledger, Path::new("/var/lib/aliyun-spot-executor/ledger.jsonl"));
    assert_eq!(from_file.credentials.metadata_endpoint, "http://100.100.100.200");
    assert!(!from_file.credentials.hardened_only, "the plain-request fallback is on by default");
    let strict = parse("[credentials]\nuse_instance_role = true\nhardened_only = true\n", &no_env()).unwrap();
    assert!(strict.credentials.hardened_only);
    assert_eq!(from_file.endpoint_url().unwrap(), "https://ecs.cn-shanghai.aliyuncs.com");

    let env = Env::from_map([
        ("ALIYUN_REGION_ID", "cn-hangzhou"),
        ("ALIYUN_VPC_ID", "vpc-env"),
        ("ALIYUN_SECURITY_GROUP_ID", "sg-env"),
        ("ALIYUN_AMD64_IMAGE_ID", "img-env-x86"),
        ("ALIYUN_ARM64_IMAGE_ID", "img-env-arm"),
        ("ALIYUN_KEY_PAIR_NAME", "kp-env"),
        ("ALIYUN_ECS_ENDPOINT", "http://127.0.0.1:9470"),
        ("MIN_CPU", "4"),
        ("ALIYUN_ACCESS_KEY_ID", "LTAIenv"),
        ("ALIYUN_ACCESS_KEY_SECRET", "env-secret"),
        // Job variables never configure the driver.
        ("CUSTOM_ENV_ALIYUN_REGION_ID", "us-west-1"),
        ("CUSTOM_ENV_ALIYUN_ECS_ENDPOINT", "http://127.0.0.2:1"),
        ("CUSTOM_ENV_ALIYUN_SECURITY_GROUP_ID", "sg-job"),
    ]);
    // Zones of the file's region would now be outside the environment's region.
    let file = file.replace("\"cn-shanghai-b\" = \"vsw-file-b\"", "");
    let c = parse(&file, &env).unwrap();
    assert_eq!(c.region_id.as_deref(), Some("cn-hangzhou"));
    assert_eq!(c.network.vpc_id.as_deref(), Some("vpc-env"));
    assert_eq!(c.network.security_group_id.as_deref(), Some("sg-env"));
    assert_eq!(c.images[&Arch::Amd64], "img-env-x86");
    assert_eq!(c.images[&Arch::Arm64], "img-env-arm");
    assert_eq!(c.ssh.key_pair_name.as_deref(), Some("kp-env"));
    assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9470"));
    assert_eq!(c.credentials.access_key_id.as_deref(), Some("LTAIenv"));
    assert_eq!(c.credentials.access_key_secret.as_ref().unwrap().expose(), "env-secret");
    // MIN_CPU alone: min memory follows the architecture's ratio.
    let amd = c.shape(Arch::Amd64);
    assert_eq!((amd.min_cpu, amd.max_cpu, amd.min_mem_gib), (4, 32, 4.0));
    let arm = c.shape(Arch::Arm64);
    assert_eq!((arm.min_cpu, arm.max_cpu, arm.min_mem_gib, arm.max_mem_gib), (4, 64, 8.0, 128.0));
    assert_eq!(arm.families, ["ecs.c8y", "ecs.c8r"]);

    let c = parse("", &Env::from_map([("MIN_CPU", "16"), ("MIN_MEM", "20")])).unwrap();
    assert_eq!(c.shape(Arch::Arm64).min_mem_gib, 20.0);
}

#[test]
fn alibaba_cloud_names_are_accepted_and_aliyun_names_win() {
    let env = Env::from_map([
        ("ALIBABA_CLOUD_ACCESS_KEY_ID", "LTAIalibaba"),
        ("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "alibaba-secret"),
        ("ALIBABA_CLOUD_SECURITY_TOKEN", "alibaba-token"),
    ]);
    let c = parse(COMPLETE, &env).unwrap();
    assert_eq!(c.credentials.access_key_id.as_deref(), Some("LTAIalibaba"));
    assert_eq!(c.credentials.security_token.as_ref().unwrap().expose(), "alibaba-token");
    let env =
        env.with("ALIYUN_ACCESS_KEY_ID", "LTAIaliyun").with("ALIYUN_ACCESS_KEY_SECRET", "aliyun-secret");
    let c = parse(COMPLETE, &env).unwrap();
    assert_eq!(c.credentials.access_key_id.as_deref(), Some("LTAIaliyun"));
    assert_eq!(c.credentials.access_key_secret.as_ref().unwrap().expose(), "aliyun-secret");
    // The file's pair is used only when the environment has none.
    let c = parse(COMPLETE, &no_env()).unwrap();
    assert_eq!(c.credentials.access_key_id.as_deref(), Some("LTAIfile"));
}

#[test]
fn vswitch_letters_map_to_zones_of_the_region() {
    let env = Env::from_map([
        ("ALIYUN_REGION_ID", "cn-hangzhou"),
        ("ALIYUN_VSWITCH_ID_A", "vsw-a"),
        ("ALIYUN_VSWITCH_ID_B", "vsw-env-b"),
        ("ALIYUN_VSWITCH_ID_Z", "vsw-z"),
        ("ALIYUN_VSWITCH_ID_K", ""),
    ]);
    let c = parse(
        "[network.vswitches]\n\"cn-hangzhou-b\" = \"vsw-file-b\"\n\"cn-hangzhou-j\" = \"vsw-j\"\n",
        &env,
    )
    .unwrap();
    let got: Vec<(&str, &str)> = c.network.vswitches.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        got,
        [
            ("cn-hangzhou-a", "vsw-a"),
            ("cn-hangzhou-b", "vsw-env-b"),
            ("cn-hangzhou-j", "vsw-j"),
            ("cn-hangzhou-z", "vsw-z")
        ]
    );
    // Regions whose id ends in a digit name their zones without a hyphen.
    let c =
        parse("", &Env::from_map([("ALIYUN_REGION_ID", "ap-southeast-1"), ("ALIYUN_VSWITCH_ID_C", "vsw-c")]))
            .unwrap();
    assert_eq!(c.network.vswitches.get("ap-southeast-1c").map(String::as_str), Some("vsw-c"));
}

// ----- loading files -----

#[test]
fn emulator_config_loads_cleanly_and_is_complete() {
    let path = repo_file("config/emulator.toml");
    let c = config::load(Some(&path), &no_env()).unwrap();
    assert_eq!(c.warnings, Vec::<String>::new());
    assert_eq!(c.endpoint_url().unwrap(), "http://127.0.0.1:9470");
    assert_eq!(c.region_id.as_deref(), Some("cn-hangzhou"));
    assert_eq!(c.credentials.access_key_id.as_deref(), Some("LTAIemulatorAccessKey"));
    assert_eq!(
        c.credentials.access_key_secret.as_ref().unwrap().expose(),
        "emulator-secret-do-not-use-in-production"
    );
    assert_eq!(c.network.vswitches.len(), 6);
    assert_eq!(c.network.vswitches["cn-hangzhou-b"], "vsw-bp1emulatorzoneb");
    assert_eq!(c.network.security_group_id.as_deref(), Some("sg-bp1emulator0000000001"));
    c.require_for_prepare(Arch::Amd64).unwrap();
    c.require_for_prepare(Arch::Arm64).unwrap();
}

#[test]
fn annotated_example_parses() {
    let path = repo_file("config/config.example.toml");
    let c = config::load(Some(&path), &no_env()).unwrap();
    assert!(c.credentials.use_instance_role);
    assert_eq!(c.spot.max_price_per_hour, Some(3.0));
    assert_eq!(c.endpoint_url().unwrap(), "https://ecs.cn-hangzhou.aliyuncs.com");
    assert_eq!(c.job_overrides.allow.len(), Override::ALL.len());
    c.require_for_prepare(Arch::Arm64).unwrap();
}

#[test]
fn config_path_resolution() {
    let dir = crate::private_tempdir();
    let named = dir.path().join("named.toml");
    std::fs::write(&named, "[aliyun]\nregion_id = \"cn-beijing\"\n").unwrap();
    let via_env = dir.path().join("via-env.toml");
    std::fs::write(&via_env, "[aliyun]\nregion_id = \"cn-shenzhen\"\n[paths]\nstate_dir = \"state\"\n")
        .unwrap();
    let env = Env::from_map([("ALIYUN_SPOT_CONFIG", via_env.to_str().unwrap())]);

    // --config wins over ALIYUN_SPOT_CONFIG.
    assert_eq!(config::load(Some(&named), &env).unwrap().region_id.as_deref(), Some("cn-beijing"));
    let c = config::load(None, &env).unwrap();
    assert_eq!(c.region_id.as_deref(), Some("cn-shenzhen"));
    assert_eq!(c.source.as_deref(), Some(via_env.as_path()));
    // Relative paths are relative to the file's folder.
    assert_eq!(c.paths.state_dir, dir.path().join("state"));

    // A file named explicitly must exist.
    let missing = dir.path().join("missing.toml");
    let e = one_line(&config::load(Some(&missing), &no_env()).unwrap_err());
    assert_eq!(
        e,
        format!(
            "cannot read the configuration file `{}` (named by `--config` or `ALIYUN_SPOT_CONFIG`): No such file or \
             directory (os error 2)",
            missing.display()
        )
    );
    let env = Env::from_map([("ALIYUN_SPOT_CONFIG", missing.to_str().unwrap())]);
    assert!(config::load(None, &env).is_err());

    // The default file may be missing: the environment alone is enough for API commands.
    assert_eq!(config::resolve_path(None, &no_env()), (PathBuf::from(DEFAULT_CONFIG_PATH), false));
    let env = Env::from_map([
        ("ALIYUN_REGION_ID", "cn-hangzhou"),
        ("ALIYUN_ACCESS_KEY_ID", "LTAIenv"),
        ("ALIYUN_ACCESS_KEY_SECRET", "env-secret"),
    ]);
    let c = config::load_file(&missing, false, &env).unwrap();
    assert_eq!(c.source, None);
    c.require_for_api().unwrap();
}

#[cfg(unix)]
#[test]
fn a_readable_file_with_a_secret_for_a_real_endpoint_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::private_tempdir();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, COMPLETE).unwrap();
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = config::load(Some(&path), &no_env()).unwrap_err();
        assert_eq!(
            one_line(&e),
            format!(
                "refusing the configuration file `{p}`: it holds an AccessKey secret and is readable by other \
                 users (mode {mode:04o}); run `chmod 600 {p}`",
                p = path.display()
            )
        );
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(config::load(Some(&path), &no_env()).unwrap().warnings.is_empty());
    // Without a secret in the file (credentials from the environment or the instance role)
    // a readable file is fine.
    let no_secret =
        COMPLETE.replace("access_key_id = \"LTAIfile\"\naccess_key_secret = \"file-secret-value\"\n", "");
    assert_ne!(no_secret, COMPLETE);
    std::fs::write(&path, no_secret).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    config::load(Some(&path), &no_env()).unwrap();
}

#[test]
fn a_readable_secret_for_a_loopback_endpoint_only_warns() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::private_tempdir();
    let path = dir.path().join("c.toml");
    let local = COMPLETE.replace("[aliyun]\n", "[aliyun]\nendpoint = \"http://127.0.0.1:9470\"\n");
    std::fs::write(&path, &local).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = config::load(Some(&path), &no_env()).unwrap();
    assert_eq!(
        c.warnings,
        [format!(
            "`{p}` holds credentials and is readable by other users (mode 0644); run `chmod 600 {p}`",
            p = path.display()
        )]
    );
    // The emulator's built-in test key is public: nothing to warn about.
    let emulator =
        local.replace("file-secret-value", aliyun_spot_executor::emulator::DEFAULT_ACCESS_KEY_SECRET);
    std::fs::write(&path, emulator).unwrap();
    assert!(config::load(Some(&path), &no_env()).unwrap().warnings.is_empty());
}

#[test]
fn watchdog_without_credentials_or_with_the_shared_role_warns() {
    let c = parse("", &no_env()).unwrap();
    assert_eq!(
        c.warnings,
        ["`safety.watchdog` is on but `self_destruct.role_arn` is empty: instances get no credentials, so the \
          watchdog cannot delete them; `AutoReleaseTime` still releases them (docs/safety.md)"]
    );
    assert!(parse("[safety]\nwatchdog = false\n", &no_env()).unwrap().warnings.is_empty());
    let arn = "[self_destruct]\nrole_arn = \"acs:ram::1:role/r\"\n";
    assert!(parse(arn, &no_env()).unwrap().warnings.is_empty());
    let shared = "[self_destruct]\ncredentials = \"instance_role\"\n[instance]\nram_role_name = \"r\"\n";
    assert_eq!(
        parse(shared, &no_env()).unwrap().warnings,
        ["`self_destruct.credentials = \"instance_role\"`: every job can read the instance role's credentials and \
          delete any instance the role's policy covers; the default `sts` mode limits them to the job's own \
          instance (docs/safety.md)"]
    );
    assert_eq!(
        parse(&format!("{arn}[instance]\nram_role_name = \"r\"\n"), &no_env()).unwrap().warnings,
        ["`instance.ram_role_name` is not given to instances unless `self_destruct.credentials = \"instance_role\"`: \
          every job could read that role's credentials (docs/safety.md)"]
    );
}

// ----- job overrides -----

#[test]
fn job_without_variables_gets_the_default_shape() {
    let env = job(&[]);
    let cfg = parse(COMPLETE, &env).unwrap();
    let spec = cfg.job_spec(&env).unwrap();
    assert_eq!(spec.arch, Arch::Amd64);
    assert_eq!(&spec.shape, cfg.shape(Arch::Amd64));
    assert!(spec.overrides.is_empty());
}

#[test]
fn job_variables_within_bounds() {
    let env = job(&[("ALIYUN_SPOT_ARCH", "aarch64"), ("ALIYUN_SPOT_MIN_CPU", "16")]);
    let spec = parse(COMPLETE, &env).unwrap().job_spec(&env).unwrap();
    assert_eq!(spec.arch, Arch::Arm64);
    // Min-only CPU implies min memory by the arch ratio (2 GiB per vCPU on arm64).
    let s = &spec.shape;
    assert_eq!((s.min_cpu, s.max_cpu, s.min_mem_gib, s.max_mem_gib), (16, 64, 32.0, 128.0));
    assert_eq!(s.families, ["ecs.c8y", "ecs.c8r"]);
    assert_eq!(
        spec.overrides,
        [
            ("ALIYUN_SPOT_ARCH".to_string(), "aarch64".to_string()),
            ("ALIYUN_SPOT_MIN_CPU".into(), "16".into())
        ]
    );

    let env =
        job(&[("ALIYUN_SPOT_ARCH", "x86_64"), ("ALIYUN_SPOT_MAX_CPU", "4"), ("ALIYUN_SPOT_MAX_MEM", "16G")]);
    let s = parse(COMPLETE, &env).unwrap().job_spec(&env).unwrap().shape;
    assert_eq!((s.arch, s.min_cpu, s.max_cpu, s.min_mem_gib, s.max_mem_gib), (Arch::Amd64, 4, 4, 4.0, 16.0));

    let env =
        job(&[("ALIYUN_SPOT_MIN_CPU", "2"), ("ALIYUN_SPOT_MAX_CPU", "8"), ("ALIYUN_SPOT_MIN_MEM", "4")]);
    let s = parse(COMPLETE, &env).unwrap().job_spec(&env).unwrap().shape;
    assert_eq!((s.min_cpu, s.max_cpu, s.min_mem_gib, s.max_mem_gib), (2, 8, 4.0, 64.0));

    // The administrator's MIN_CPU sets the default minimum.
    let env = job(&[]).with("MIN_CPU", "16");
    let s = parse(COMPLETE, &env).unwrap().job_spec(&env).unwrap().shape;
    assert_eq!((s.min_cpu, s.min_mem_gib), (16, 16.0));
}

#[test]
fn job_variable_errors_name_the_variable_value_and_range() {
    assert_eq!(
        job_err(COMPLETE, &[("ALIYUN_SPOT_MAX_CPU", "512")]),
        "job variable `ALIYUN_SPOT_MAX_CPU`=`512` is above the administrator's ceiling of 64 vCPU; set a value \
         between 1 and 64"
    );
    assert_eq!(
        job_err(COMPLETE, &[("ALIYUN_SPOT_MIN_CPU", "8"), ("ALIYUN_SPOT_MAX_CPU", "512")]),
        "job variable `ALIYUN_SPOT_MAX_CPU`=`512` is above the administrator's ceiling of 64 vCPU; set a value \
         between 8 and 64"
    );
    assert_eq!(
        job_err(COMPLETE, &[("ALIYUN_SPOT_MIN_CPU", "32"), ("ALIYUN_SPOT_MAX_CPU", "16")]),
        "job variable `ALIYUN_SPOT_MAX_CPU`=`16` is below the minimum of 32 vCPU; set a value between 32 and 64"
    );
    assert_eq!(
        job_err(COMPLETE, &[("ALIYUN_SPOT_MIN_CPU", "eight")]),
        "job variable `ALIYUN_SPOT_MIN_CPU`=`eight` is not a whole number of vCPUs; set a value between 1 and 64"
    );
    assert_eq!(
        job_err(COMPLETE, &[("ALIYUN_SPOT_MIN_CPU", "0")]),
        "job variable `ALIYUN_SPOT_MIN_CPU`=`0` is zero; set a value between 1 and 64"
    );
    assert_eq!(
        job_err(COMPLETE, &[("ALIYUN_SPOT_ARCH", "riscv64")]),
        "job variable `ALIYUN_SPOT_ARCH`=`riscv64` is not an architecture; set `amd64` (or `x86_64`) or `arm64` \
         (or `aarch64`)"
    );
    assert_eq!(
        job_err(COMPLETE, &[("ALIYUN_SPOT_ARCH", "arm64"), ("ALIYUN_SPOT_MAX_MEM", "256")]),
        "job variable `ALIYUN_SPOT_MAX_MEM`=`256` is above the administrator's ceiling of 128 GiB; set a value above \
         0 and at most 128 GiB"
    );
    assert_eq!(
        job_err(COMPLETE, &[("ALIYUN_SPOT_MIN_MEM", "a lot")]),
        "job variable `ALIYUN_SPOT_MIN_MEM`=`a lot` is not a number of GiB; set a value above 0 and at most 64 GiB"
    );
    assert_eq!(
        job_err(COMPLETE, &[("ALIYUN_SPOT_MIN_MEM", "32"), ("ALIYUN_SPOT_MAX_MEM", "16")]),
        "job variable `ALIYUN_SPOT_MAX_MEM`=`16` is below the minimum of 32 GiB; set a value between 32 and 64 GiB"
    );

    let restricted = format!(
        "{COMPLETE}\n[job_overrides]\nallow = [\"arch\", \"min_cpu\"]\narchs = [\"amd64\"]\nmax_cpu = 32\nmax_mem = 48\n"
    );
    assert_eq!(
        job_err(&restricted, &[("ALIYUN_SPOT_MAX_MEM", "16")]),
        "job variable `ALIYUN_SPOT_MAX_MEM`=`16` is not allowed on this runner (it accepts: `ALIYUN_SPOT_ARCH`, \
         `ALIYUN_SPOT_MIN_CPU`); remove it from the job"
    );
    assert_eq!(
        job_err(&restricted, &[("ALIYUN_SPOT_ARCH", "arm64")]),
        "job variable `ALIYUN_SPOT_ARCH`=`arm64` is not allowed on this runner; set `amd64`"
    );
    assert_eq!(
        job_err(&restricted, &[("ALIYUN_SPOT_MIN_CPU", "48")]),
        "job variable `ALIYUN_SPOT_MIN_CPU`=`48` is above the administrator's ceiling of 32 vCPU; set a value between \
         1 and 32"
    );
    assert_eq!(
        job_err(&format!("{COMPLETE}\n[job_overrides]\nmax_mem = 32\n"), &[("ALIYUN_SPOT_MIN_CPU", "40")]),
        "job variable `ALIYUN_SPOT_MIN_CPU`=`40` implies at least 40 GiB of memory (1 GiB per vCPU on amd64), above \
         the administrator's ceiling of 32 GiB; also set `ALIYUN_SPOT_MIN_MEM` to at most 32"
    );
    // Within the ceiling, the maximum follows.
    let env = job(&[("ALIYUN_SPOT_MIN_CPU", "24")]);
    let s = parse(&restricted, &env).unwrap().job_spec(&env).unwrap().shape;
    assert_eq!((s.min_cpu, s.max_cpu, s.min_mem_gib), (24, 32, 24.0));
}

/// The ceilings bound every job: the effective bounds are the intersection of the shape and the
/// ceilings, with or without job variables.
#[test]
fn ceilings_bound_jobs_without_variables() {
    let capped = format!("{COMPLETE}\n[job_overrides]\nmax_cpu = 8\nmax_mem = 16\n");
    let shape_of = |pairs: &[(&str, &str)]| {
        let env = job(pairs);
        let s = parse(&capped, &env).unwrap().job_spec(&env).unwrap().shape;
        (s.min_cpu, s.max_cpu, s.min_mem_gib, s.max_mem_gib)
    };
    assert_eq!(shape_of(&[]), (8, 8, 8.0, 16.0), "never offered 16 vCPU");
    assert_eq!(shape_of(&[("ALIYUN_SPOT_MIN_CPU", "2")]), (2, 8, 2.0, 16.0), "not 2-64 GiB");
    assert_eq!(shape_of(&[("ALIYUN_SPOT_MIN_MEM", "12")]), (8, 8, 12.0, 16.0));
    assert_eq!(
        job_err(&capped, &[("ALIYUN_SPOT_MAX_MEM", "32")]),
        "job variable `ALIYUN_SPOT_MAX_MEM`=`32` is above the administrator's ceiling of 16 GiB; set a value above \
         0 and at most 16 GiB"
    );
    let env = job(&[]);
    assert_eq!(parse(&capped, &env).unwrap().default_job_shape(Arch::Amd64).max_cpu, 8);
}

/// `aliyun-spot prices` with a job's bounds decides the shape by the same rule as the job.
#[test]
fn prices_and_jobs_agree_on_the_shape() {
    let text = format!("{COMPLETE}\n[shape.amd64]\nmax_cpu = 16\n[job_overrides]\nmax_cpu = 64\n");
    let args = |min_cpu: &str| aliyun_spot_executor::admin::ShapeArgs {
        min_cpu: Some(min_cpu.to_string()),
        ..Default::default()
    };
    let env = job(&[("ALIYUN_SPOT_MIN_CPU", "32")]);
    let cfg = parse(&text, &env).unwrap();
    let from_job = cfg.job_spec(&env).unwrap().shape;
    assert_eq!((from_job.min_cpu, from_job.max_cpu, from_job.min_mem_gib), (32, 32, 32.0));
    assert_eq!(aliyun_spot_executor::admin::shape_of(&cfg, &args("32")).unwrap(), from_job);
    // Without bounds, both get the configured shape within the ceilings.
    let no_args = aliyun_spot_executor::admin::ShapeArgs::default();
    let env = job(&[]);
    assert_eq!(
        aliyun_spot_executor::admin::shape_of(&cfg, &no_args).unwrap(),
        cfg.job_spec(&env).unwrap().shape
    );
    // Out of bounds: the same rule, named as the command line spells it.
    assert_eq!(
        one_line(&aliyun_spot_executor::admin::shape_of(&cfg, &args("128")).unwrap_err()),
        "`--min-cpu 128` is above the administrator's ceiling of 64 vCPU; set a value between 1 and 64"
    );
    assert!(job_err(&text, &[("ALIYUN_SPOT_MIN_CPU", "128")])
        .starts_with("job variable `ALIYUN_SPOT_MIN_CPU`=`128` is above"));
}

#[test]
fn empty_job_variables_are_ignored() {
    let env = job(&[("ALIYUN_SPOT_ARCH", ""), ("ALIYUN_SPOT_MIN_CPU", "  ")]);
    let spec = parse(COMPLETE, &env).unwrap().job_spec(&env).unwrap();
    assert_eq!(spec.arch, Arch::Amd64);
    assert!(spec.overrides.is_empty());
}

#[test]
fn load_for_job_combines_both() {
    let dir = crate::private_tempdir();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, COMPLETE).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let env = job(&[("ALIYUN_SPOT_ARCH", "arm64")]);
    let (cfg, spec) = config::load_for_job(Some(&path), &env).unwrap();
    assert_eq!(spec.arch, Arch::Arm64);
    cfg.require_for_prepare(spec.arch).unwrap();
    let env = job(&[("ALIYUN_SPOT_MAX_CPU", "1000")]);
    assert!(config::load_for_job(Some(&path), &env).is_err());
}

#[test]
fn the_aliyun_cli_profile_file_is_found_in_home_when_no_key_is_given() {
    let home = crate::private_tempdir();
    let env = Env::from_map([("HOME".to_string(), home.path().display().to_string())]);
    let text = "[aliyun]\nregion_id = \"cn-hangzhou\"\n";
    assert_eq!(parse(text, &env).unwrap().credentials.profile_file, None, "no file, nothing assumed");
    std::fs::create_dir_all(home.path().join(".aliyun")).unwrap();
    std::fs::write(home.path().join(".aliyun/config.json"), r#"{"current":"default","profiles":[]}"#)
        .unwrap();
    let cfg = parse(text, &env).unwrap();
    assert_eq!(cfg.credentials.profile_file, Some(home.path().join(".aliyun/config.json")));
    assert!(!cfg.credentials.use_instance_role, "the instance role is never assumed");
    let with_key = parse(COMPLETE, &env).unwrap();
    assert_eq!(with_key.credentials.profile_file, None, "an explicit AccessKey comes first");
}

#[test]
fn stock_cooldown_defaults_to_ten_minutes_and_is_bounded() {
    assert_eq!(parse(COMPLETE, &no_env()).unwrap().spot.stock_cooldown, Duration::from_secs(600));
    let off = format!("{COMPLETE}\n[spot]\nstock_cooldown = \"0s\"\n");
    assert_eq!(parse(&off, &no_env()).unwrap().spot.stock_cooldown, Duration::ZERO);
    let e = err(&format!("{COMPLETE}\n[spot]\nstock_cooldown = \"1d\"\n"), &no_env());
    assert!(e.contains("`spot.stock_cooldown`") && e.contains("is longer than 6 hours"), "{e}");
}

#[test]
fn api_retry_backoff_defaults_and_bounds() {
    use aliyun_spot_executor::retry::{Backoff, RetryPolicy};
    let default = RetryPolicy::default();
    let c = parse("", &no_env()).unwrap();
    assert_eq!((c.api_retry.max_attempts, c.api_retry.backoff), (default.max_attempts, default.backoff));
    let c = parse("[aliyun]\nretry_base_delay_ms = 10\n", &no_env()).unwrap();
    let ms = Duration::from_millis;
    assert_eq!(c.api_retry.backoff, Backoff::full_jitter(ms(10), ms(5000)));
    assert_eq!((c.api_retry.max_attempts, c.api_retry.max_elapsed), (6, Duration::from_secs(60)));
    assert_eq!(
        parse("[aliyun]\nretry_base_delay_ms = 0\n", &no_env()).unwrap().api_retry.backoff.delay(3),
        ms(0)
    );
    assert_eq!(
        err("[aliyun]\nretry_base_delay_ms = 5001\n", &no_env()),
        "`aliyun.retry_base_delay_ms` = `5001` in `/etc/spot.toml` is out of range; set 0 to 5000 (default 200)"
    );
    assert!(err("[aliyun]\nretry_base_delay_ms = \"200ms\"\n", &no_env()).contains("retry_base_delay_ms"));
}

#[test]
fn ssh_boot_timeout_defaults_and_bounds() {
    assert_eq!(parse("", &no_env()).unwrap().ssh.boot_timeout, Duration::from_secs(600));
    let c = parse("[ssh]\nboot_timeout = \"1s\"\n", &no_env()).unwrap();
    assert_eq!(c.ssh.boot_timeout, Duration::from_secs(1));
    for (value, shown) in [("0s", "0s"), ("61m", "1h01m")] {
        assert_eq!(
            err(&format!("[ssh]\nboot_timeout = \"{value}\"\n"), &no_env()),
            format!(
                "`ssh.boot_timeout` = `{shown}` in `/etc/spot.toml` is out of range; set between \"1s\" and \"1h\" \
                 (default \"10m\")"
            )
        );
    }
}

#[test]
fn ssh_keepalive_defaults_and_bounds() {
    use aliyun_spot_executor::ssh::Keepalive;
    let c = parse("", &no_env()).unwrap();
    assert_eq!(c.ssh.keepalive, Keepalive { interval: Duration::from_secs(10), count_max: 3 });
    assert_eq!(c.ssh.keepalive.silence_limit(), Duration::from_secs(31));
    let c = parse("[ssh]\nkeepalive_interval = \"2s\"\nkeepalive_count_max = 5\n", &no_env()).unwrap();
    assert_eq!(c.ssh.keepalive, Keepalive { interval: Duration::from_secs(2), count_max: 5 });
    assert_eq!(
        err("[ssh]\nkeepalive_interval = \"10m\"\n", &no_env()),
        "`ssh.keepalive_interval` = `10m` in `/etc/spot.toml` is out of range; set between \"1s\" and \"5m\" \
         (default \"10s\")"
    );
    assert_eq!(
        err("[ssh]\nkeepalive_count_max = 0\n", &no_env()),
        "`ssh.keepalive_count_max` = `0` in `/etc/spot.toml` is out of range; set 1 to 100 (default 3)"
    );
}

#[test]
fn ssh_keep_session_is_on_unless_turned_off() {
    assert!(parse("", &no_env()).unwrap().ssh.keep_session);
    assert!(!parse("[ssh]\nkeep_session = false\n", &no_env()).unwrap().ssh.keep_session);
    let e = err("[ssh]\nkeep_session = \"no\"\n", &no_env());
    assert!(e.contains("keep_session") && e.contains("expected a boolean"), "{e}");
}
