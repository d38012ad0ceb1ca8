//! The RAM policies a configuration needs, built in one place: `aliyun-spot doctor` prints
//! them and a test keeps docs/safety.md equal to them.
//!
//! Least privilege, from RAM's policy language (policy elements and the global condition keys
//! `acs:RequestTag/<key>` and `acs:ResourceTag/<key>`:
//! <https://www.alibabacloud.com/help/en/ram/user-guide/policy-elements>) and ECS's RAM
//! authorization (actions and resource ARNs:
//! <https://www.alibabacloud.com/help/en/ecs/developer-reference/ram-authorization>):
//! - the runner reads the catalogue and its instances (`Describe*`, which RAM authorizes on `*`);
//! - it creates instances only when the request carries the managed tag (`RunInstances` with
//!   `Tag.N`, condition `acs:RequestTag/<managed key>`), so it needs no `CreateTags` or
//!   `TagResources` at all and cannot mark a foreign instance as managed;
//! - it deletes only instances that carry the managed tag (`acs:ResourceTag/<managed key>`);
//! - per watchdog mode, `sts:AssumeRole` on the watchdog role (default) or `ram:PassRole` on the
//!   instance role (the opt-in shared-role mode).

use serde_json::{json, Value};

use crate::config::Config;
use crate::sts::CredentialMode;

/// The runner's policy, the watchdog role's trust policy and its permission policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policies {
    /// Attach to the runner's RAM user (or the runner host's role).
    pub runner: Value,
    /// The watchdog role's trust policy (who may assume it); `None` without a watchdog role.
    pub watchdog_trust: Option<Value>,
    /// The watchdog role's permission policy; each AssumeRole narrows it further to one instance.
    pub watchdog_permissions: Option<Value>,
}

/// `acs:ram::<account>:role/<name>` → `<account>`.
fn account_of(role_arn: &str) -> Option<&str> {
    role_arn.strip_prefix("acs:ram::")?.split_once(':').map(|(a, _)| a)
}

/// What `config` needs.
pub fn for_config(config: &Config) -> Policies {
    let tag = |kind: &str| format!("acs:{kind}Tag/{}", config.safety.managed_tag_key);
    let managed = &config.safety.managed_tag_value;
    let mut statements = vec![
        json!({
            "Effect": "Allow",
            "Action": [
                "ecs:DescribeRegions", "ecs:DescribeZones", "ecs:DescribeInstanceTypes",
                "ecs:DescribeAvailableResource", "ecs:DescribeSpotPriceHistory", "ecs:DescribeInstances",
                "ecs:DescribeInstanceStatus", "ecs:DescribeImages", "ecs:DescribeSecurityGroups",
            ],
            "Resource": "*",
        }),
        json!({
            "Effect": "Allow",
            "Action": "ecs:RunInstances",
            "Resource": ["acs:ecs:*:*:instance/*", "acs:ecs:*:*:disk/*", "acs:ecs:*:*:networkinterface/*"],
            "Condition": { "StringEquals": { tag("Request"): managed } },
        }),
        json!({
            "Effect": "Allow",
            "Action": "ecs:RunInstances",
            "Resource": [
                "acs:ecs:*:*:image/*", "acs:ecs:*:*:securitygroup/*", "acs:vpc:*:*:vswitch/*",
                "acs:ecs:*:*:keypair/*",
            ],
        }),
        json!({
            "Effect": "Allow",
            "Action": ["ecs:DeleteInstance", "ecs:DeleteInstances"],
            "Resource": "acs:ecs:*:*:instance/*",
            "Condition": { "StringEquals": { tag("Resource"): managed } },
        }),
    ];
    let sd = &config.self_destruct;
    let watchdog = config.safety.watchdog;
    let (mut trust, mut permissions) = (None, None);
    let delete_managed = json!({
        "Version": "1",
        "Statement": [{
            "Effect": "Allow",
            "Action": "ecs:DeleteInstance",
            "Resource": "acs:ecs:*:*:instance/*",
            "Condition": { "StringEquals": { tag("Resource"): managed } },
        }],
    });
    match sd.credentials {
        CredentialMode::Sts if watchdog => {
            let arn =
                sd.role_arn.clone().unwrap_or_else(|| "acs:ram::<account id>:role/<watchdog role>".into());
            let account = account_of(&arn).unwrap_or("<account id>").to_string();
            statements.push(json!({ "Effect": "Allow", "Action": "sts:AssumeRole", "Resource": arn }));
            trust = Some(json!({
                "Version": "1",
                "Statement": [{
                    "Effect": "Allow",
                    "Action": "sts:AssumeRole",
                    "Principal": { "RAM": [format!("acs:ram::{account}:root")] },
                }],
            }));
            permissions = Some(delete_managed);
        }
        CredentialMode::InstanceRole if watchdog => {
            let role = config.instance.ram_role_name.clone().unwrap_or_else(|| "<instance role>".into());
            statements.push(json!({
                "Effect": "Allow",
                "Action": "ram:PassRole",
                "Resource": format!("acs:ram:*:*:role/{role}"),
            }));
            trust = Some(json!({
                "Version": "1",
                "Statement": [{
                    "Effect": "Allow",
                    "Action": "sts:AssumeRole",
                    "Principal": { "Service": ["ecs.aliyuncs.com"] },
                }],
            }));
            permissions = Some(delete_managed);
        }
        _ => {}
    }
    Policies {
        runner: json!({ "Version": "1", "Statement": statements }),
        watchdog_trust: trust,
        watchdog_permissions: permissions,
    }
}

/// The policies as `doctor` prints them: a heading line, then pretty JSON, for each.
pub fn render(config: &Config) -> String {
    let p = for_config(config);
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let mut out = format!("RAM policy for the runner's identity:\n{}\n", pretty(&p.runner));
    let role = match config.self_destruct.credentials {
        CredentialMode::Sts => "the watchdog role (self_destruct.role_arn)",
        CredentialMode::InstanceRole => "the instance role (instance.ram_role_name)",
    };
    if let Some(t) = &p.watchdog_trust {
        out.push_str(&format!("Trust policy of {role}:\n{}\n", pretty(t)));
    }
    if let Some(perm) = &p.watchdog_permissions {
        out.push_str(&format!("Permission policy of {role}:\n{}\n", pretty(perm)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Env;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[aliyun]\nregion_id = \"cn-hangzhou\"\n[self_destruct]\nrole_arn = \"acs:ram::1234567890123456:role/ci-spot-self-destruct\"\n{extra}"
        );
        crate::config::from_toml(&text, None, &Env::default()).unwrap()
    }

    fn actions(policy: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for s in policy["Statement"].as_array().unwrap() {
            match &s["Action"] {
                Value::String(a) => out.push(a.clone()),
                Value::Array(a) => out.extend(a.iter().map(|x| x.as_str().unwrap().to_string())),
                _ => panic!(),
            }
        }
        out
    }

    #[test]
    fn runner_never_tags_existing_resources_and_deletes_only_managed_instances() {
        let p = for_config(&config(""));
        let all = actions(&p.runner);
        assert!(!all.iter().any(|a| a.contains("Tag")), "{all:?}");
        assert!(all.contains(&"sts:AssumeRole".to_string()) && !all.contains(&"ram:PassRole".to_string()));
        let delete = p.runner["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Action"][0] == "ecs:DeleteInstance")
            .unwrap();
        assert_eq!(
            delete["Condition"]["StringEquals"]["acs:ResourceTag/ci-spot-executor:managed-by"],
            "aliyun-spot-executor"
        );
        assert_eq!(
            p.watchdog_trust.unwrap()["Statement"][0]["Principal"]["RAM"][0],
            "acs:ram::1234567890123456:root"
        );
        let shared =
            for_config(&config("credentials = \"instance_role\"\n[instance]\nram_role_name = \"r\"\n"));
        assert!(actions(&shared.runner).contains(&"ram:PassRole".to_string()));
        assert_eq!(
            shared.watchdog_trust.unwrap()["Statement"][0]["Principal"]["Service"][0],
            "ecs.aliyuncs.com"
        );
        let off = for_config(&config("[safety]\nwatchdog = false\n"));
        assert!(off.watchdog_trust.is_none() && !actions(&off.runner).iter().any(|a| a.starts_with("sts:")));
    }

    /// docs/safety.md shows exactly what `doctor` prints for the example configuration's
    /// watchdog settings.
    #[test]
    fn the_documented_policies_are_the_built_ones() {
        let rendered = render(&config(""));
        for doc in ["docs/safety.md", "docs/zh/safety.md"] {
            let text =
                std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(doc)).unwrap();
            let p = for_config(&config(""));
            for v in [Some(&p.runner), p.watchdog_trust.as_ref(), p.watchdog_permissions.as_ref()]
                .into_iter()
                .flatten()
            {
                let block = serde_json::to_string_pretty(v).unwrap();
                assert!(text.contains(&block), "{doc} lacks this policy (doctor prints):\n{rendered}");
            }
        }
    }
}
