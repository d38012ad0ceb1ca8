//! RAM policy evaluation for STS credentials that carry a session policy (STS `AssumeRole`
//! with `Policy`, see [`super::sts`]).
//!
//! The rules, from Alibaba Cloud's RAM documentation (policy elements and evaluation:
//! <https://www.alibabacloud.com/help/en/ram/user-guide/policy-elements>,
//! <https://www.alibabacloud.com/help/en/ram/user-guide/policy-evaluation-process>): a request is
//! denied unless an `Allow` statement matches its action and resource, and any matching `Deny`
//! wins. `Action` is `<service>:<API>` and `Resource` an ARN such as
//! `acs:ecs:{region}:{account}:instance/{id}` (ECS's RAM authorization table:
//! <https://www.alibabacloud.com/help/en/ecs/developer-reference/ram-authorization>), both with
//! `*` wildcards; actions compare without regard to case. A denial answers `Forbidden.RAM` with
//! HTTP 403 (ECS's common error codes). The emulator does not evaluate `Condition` blocks: an
//! `Allow` with a condition never matches and a `Deny` with one always does, so the emulator
//! errs on the side of refusing.

use serde_json::Value;

use super::api::{ApiError, Params};

/// The account id in the emulator's resource ARNs.
pub(crate) const ACCOUNT_ID: &str = "1234567890123456";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

/// One statement of a parsed policy.
#[derive(Debug, Clone)]
struct Statement {
    effect: Effect,
    actions: Vec<String>,
    resources: Vec<String>,
    conditional: bool,
}

/// A parsed policy document (`{"Version":"1","Statement":[…]}`).
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    statements: Vec<Statement>,
}

/// A string or a list of strings (`Action`, `Resource`).
fn strings(v: &Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(|| format!("`{what}` holds a non-string")))
            .collect(),
        _ => Err(format!("`{what}` must be a string or a non-empty list of strings")),
    }
}

impl Policy {
    /// Parses a policy document; the error says what is wrong with it.
    pub(crate) fn parse(text: &str) -> Result<Policy, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if doc.get("Version").and_then(Value::as_str) != Some("1") {
            return Err("`Version` must be \"1\"".into());
        }
        let list = doc.get("Statement").and_then(Value::as_array).ok_or("`Statement` must be a list")?;
        let mut statements = Vec::new();
        for s in list {
            let effect = match s.get("Effect").and_then(Value::as_str) {
                Some(e) if e.eq_ignore_ascii_case("allow") => Effect::Allow,
                Some(e) if e.eq_ignore_ascii_case("deny") => Effect::Deny,
                _ => return Err("`Effect` must be Allow or Deny".into()),
            };
            statements.push(Statement {
                effect,
                actions: strings(s.get("Action").unwrap_or(&Value::Null), "Action")?,
                resources: strings(s.get("Resource").unwrap_or(&Value::Null), "Resource")?,
                conditional: s.get("Condition").is_some(),
            });
        }
        Ok(Policy { statements })
    }

    fn matches(s: &Statement, action: &str, resource: &str) -> bool {
        s.actions
            .iter()
            .any(|a| crate::pattern::glob_match(&a.to_ascii_lowercase(), &action.to_ascii_lowercase()))
            && s.resources.iter().any(|r| crate::pattern::glob_match(r, resource))
    }

    /// Whether `action` on every one of `resources` is allowed.
    pub(crate) fn allows(&self, action: &str, resources: &[String]) -> bool {
        resources.iter().all(|r| {
            let denied =
                self.statements.iter().any(|s| s.effect == Effect::Deny && Policy::matches(s, action, r));
            let allowed = self
                .statements
                .iter()
                .any(|s| s.effect == Effect::Allow && !s.conditional && Policy::matches(s, action, r));
            allowed && !denied
        })
    }
}

/// The resources an ECS request acts on, as RAM names them.
fn resources(region: &str, action: &str, p: &Params) -> Vec<String> {
    let instance = |id: &str| format!("acs:ecs:{region}:{ACCOUNT_ID}:instance/{id}");
    match action {
        "DeleteInstance" => vec![instance(p.get("InstanceId").map(String::as_str).unwrap_or(""))],
        "DeleteInstances" => {
            let ids: Vec<String> =
                p.iter().filter(|(k, _)| k.starts_with("InstanceId.")).map(|(_, v)| instance(v)).collect();
            if ids.is_empty() {
                vec![instance("*")]
            } else {
                ids
            }
        }
        "RunInstances" | "DescribeInstances" | "DescribeInstanceStatus" | "DescribeUserData" => {
            vec![instance("*")]
        }
        _ => vec![format!("acs:ecs:{region}:{ACCOUNT_ID}:*")],
    }
}

/// Who signed a request.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    /// The RAM role, for STS credentials.
    pub role: Option<String>,
    /// The session policy of `AssumeRole` credentials, enforced on every call.
    pub policy: Option<Policy>,
}

/// Refuses an ECS request that `who`'s session policy does not allow.
pub(crate) fn authorize(
    default_region: &str,
    action: &str,
    p: &Params,
    who: &Principal,
) -> Result<(), ApiError> {
    let Some(policy) = &who.policy else { return Ok(()) };
    let region = p.get("RegionId").map(String::as_str).filter(|r| !r.is_empty()).unwrap_or(default_region);
    if policy.allows(&format!("ecs:{action}"), &resources(region, action, p)) {
        Ok(())
    } else {
        Err(ApiError::new(
            403,
            "Forbidden.RAM",
            "User not authorized to operate on the specified resource, or this API doesn't support RAM.",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Params {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn one_instance_policy() {
        let policy = Policy::parse(
            r#"{"Version":"1","Statement":[{"Effect":"Allow","Action":["ecs:DeleteInstance"],"Resource":["acs:ecs:*:*:instance/i-a"]}]}"#,
        )
        .unwrap();
        let who = Principal { role: Some("r".into()), policy: Some(policy) };
        let del = |id: &str| authorize("cn-hangzhou", "DeleteInstance", &p(&[("InstanceId", id)]), &who);
        assert!(del("i-a").is_ok());
        let e = del("i-b").unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (403, "Forbidden.RAM"));
        assert!(del("i-a2").is_err(), "no prefix match without a wildcard");
        assert!(authorize("cn-hangzhou", "DescribeInstances", &p(&[]), &who).is_err());
        assert!(authorize(
            "cn-hangzhou",
            "DeleteInstances",
            &p(&[("InstanceId.1", "i-a"), ("InstanceId.2", "i-b")]),
            &who
        )
        .is_err());
        let any_case = Policy::parse(r#"{"Version":"1","Statement":[{"Effect":"Allow","Action":"ECS:deleteinstance","Resource":"*"}]}"#).unwrap();
        assert!(any_case.allows("ecs:DeleteInstance", &["acs:ecs:cn-hangzhou:1:instance/i-a".into()]));
        let nobody = Principal { role: None, policy: None };
        assert!(authorize("cn-hangzhou", "DeleteInstance", &p(&[("InstanceId", "i-b")]), &nobody).is_ok());
    }

    #[test]
    fn deny_wins_and_conditions_are_not_guessed() {
        let policy = Policy::parse(
            r#"{"Version":"1","Statement":[{"Effect":"Allow","Action":"ecs:*","Resource":"*"},
               {"Effect":"Deny","Action":"ecs:Delete*","Resource":"acs:ecs:*:*:instance/i-keep"}]}"#,
        )
        .unwrap();
        assert!(policy.allows("ecs:DeleteInstance", &["acs:ecs:cn-hangzhou:1:instance/i-x".into()]));
        assert!(!policy.allows("ecs:DeleteInstance", &["acs:ecs:cn-hangzhou:1:instance/i-keep".into()]));
        let conditional = Policy::parse(
            r#"{"Version":"1","Statement":[{"Effect":"Allow","Action":"ecs:DeleteInstance","Resource":"*",
               "Condition":{"StringEquals":{"acs:ResourceTag/k":"v"}}}]}"#,
        )
        .unwrap();
        assert!(!conditional.allows("ecs:DeleteInstance", &["acs:ecs:cn-hangzhou:1:instance/i-x".into()]));
        for bad in [
            "",
            "{}",
            r#"{"Version":"1"}"#,
            r#"{"Version":"1","Statement":[{"Effect":"Maybe","Action":"a","Resource":"*"}]}"#,
            r#"{"Version":"1","Statement":[{"Effect":"Allow","Action":[],"Resource":"*"}]}"#,
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }
}
