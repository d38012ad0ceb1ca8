//! Integration tests: the real binaries, the emulator and real sshd.

mod admin_output;
mod client_emulator;
mod config;
mod credentials_scope;
mod demo;
mod doctor;
mod ecs_client;
mod emulator;
mod executor;
mod faults;
mod github;
mod helper;
mod host_files;
mod identity;
mod isolation;
mod keeper;
mod options;
mod safety;
mod selection_live;
mod ssh;
mod standin;

/// A fresh private directory (0700) for one test under cargo's `target/tmp` of this checkout,
/// never directly in the shared `/tmp`: the driver's state, cache and ledger belong in a
/// directory no other user can plant files in, and the tests keep to the same rule.
pub fn private_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("t")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a private directory under target/tmp")
}

/// [`aliyun_spot_executor::demo::config_for`] (`base` for an emulator at `endpoint`, every path
/// under `dir`), with `ssh.keep_session` set from `ALIYUN_SPOT_TEST_KEEP_SESSION` when it is
/// given: `.ci/run` runs the suite once with the per-job session keeper (the default) and once
/// with `false`, so every stage test holds both ways.
#[allow(clippy::disallowed_methods)] // the suite's own switch, not the driver's environment
pub fn emulator_config(base: &str, endpoint: &str, dir: &std::path::Path) -> String {
    let text = aliyun_spot_executor::demo::config_for(base, endpoint, dir).expect("emulator.toml adapts");
    let Some(keep) = std::env::var("ALIYUN_SPOT_TEST_KEEP_SESSION").ok() else { return text };
    let keep: bool = keep.parse().expect("ALIYUN_SPOT_TEST_KEEP_SESSION is `true` or `false`");
    let mut doc: toml::Table = text.parse().expect("valid TOML");
    let ssh = doc.entry("ssh").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    ssh.as_table_mut().expect("a table").insert("keep_session".into(), toml::Value::Boolean(keep));
    toml::to_string(&doc).expect("serializable")
}

/// gitlab-runner's pause between preparation attempts in the tests: none, as gitlab-runner's
/// own tests set `PreparationRetryInterval = 0` (`common/build_test.go`), so a job whose
/// preparation fails three times does not wait 6 s.
pub const RETRY_INTERVAL: std::time::Duration = std::time::Duration::ZERO;

/// A plain spot `RunInstances` for the emulator's catalogue (`ecs.c7.large` in zone j, no user
/// data, tags or release time), for the tests that create an instance by hand.
pub fn emulator_run_request(
    name: &str,
    client_token: &str,
) -> aliyun_spot_executor::ecs::RunInstancesRequest {
    aliyun_spot_executor::ecs::RunInstancesRequest {
        zone_id: "cn-hangzhou-j".into(),
        instance_type: "ecs.c7.large".into(),
        image_id: "ubuntu_24_04_x64_20G_alibase_20250101.vhd".into(),
        security_group_id: "sg-bp1emulator0000000001".into(),
        vswitch_id: "vsw-bp1emulatorzonej".into(),
        instance_name: name.into(),
        host_name: None,
        spot_strategy: aliyun_spot_executor::ecs::SpotStrategy::SpotAsPriceGo,
        spot_price_limit: None,
        spot_duration: Some(0),
        internet_max_bandwidth_out: 10,
        system_disk_category: Some("cloud_essd".into()),
        system_disk_size: Some(40),
        key_pair_name: None,
        ram_role_name: None,
        user_data: None,
        tags: Vec::new(),
        auto_release_time: None,
        client_token: client_token.into(),
        dry_run: false,
    }
}

/// Command lines (NULs as spaces) of live processes for which `pred` holds. Zombies have an
/// empty command line and so never match.
pub fn processes_matching(pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if pred(&cmd) {
            out.push(format!("{name}: {}", cmd.trim_end()));
        }
    }
    out
}

/// Every live process's children, by parent pid (from `/proc/<pid>/stat`).
pub fn children_by_parent() -> std::collections::HashMap<u32, Vec<u32>> {
    let mut children: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The command name is in parentheses and may contain spaces; fields follow the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    children
}

/// `root` and every process descended from it, `root` first.
pub fn process_tree(root: u32) -> Vec<u32> {
    let children = children_by_parent();
    let mut stack = vec![root];
    let mut all = Vec::new();
    while let Some(p) = stack.pop() {
        all.push(p);
        stack.extend(children.get(&p).into_iter().flatten().copied());
    }
    all
}
