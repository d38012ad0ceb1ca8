//! What credentials reachable on an instance can do: its own deletion and nothing else.
//!
//! Job code runs as root on the instance, so a job can read whatever its instance holds. The
//! runner hands each instance STS credentials whose session policy names that instance only;
//! the emulator evaluates that policy on every ECS call and answers `Forbidden.RAM` (HTTP 403)
//! outside it. The credentials printed in a job log here are the emulator's, never real ones.

use std::path::PathBuf;

use aliyun_spot_executor::config;
use aliyun_spot_executor::ecs::{ClientConfig, DescribeInstancesFilter, EcsClient, EcsError};
use aliyun_spot_executor::env::Env;
use aliyun_spot_executor::{sts, watchdog};
use serde_json::Value;

use crate::executor::World;
use crate::safety::{is_live, job_instance};

/// Removes the instances' handed-over credentials files (emulated instances share this
/// machine's filesystem) at the end of a test.
struct CredentialsFiles(Vec<PathBuf>);

impl Drop for CredentialsFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// An ECS client of the emulator signing with `creds`.
fn client_with(w: &World, creds: aliyun_spot_executor::credentials::Credentials) -> EcsClient {
    EcsClient::new(
        ClientConfig { endpoint: Some(w.emulator.endpoint()), ..ClientConfig::new("cn-hangzhou") },
        sts::provider(creds),
    )
    .unwrap()
}

fn assert_forbidden(e: &EcsError) {
    match e {
        EcsError::Api { code, http_status, .. } => {
            assert_eq!((code.as_str(), *http_status), ("Forbidden.RAM", 403), "{e}")
        }
        other => panic!("expected Forbidden.RAM, got {other}"),
    }
}

/// The credentials file's JSON, as a job printed it to its log.
fn credentials_in_log(log: &str) -> aliyun_spot_executor::credentials::Credentials {
    let line = log
        .lines()
        .find(|l| l.starts_with("{\"AccessKeyId\""))
        .unwrap_or_else(|| panic!("the job printed no credentials:\n{log}"));
    let v: Value = serde_json::from_str(line).unwrap();
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    aliyun_spot_executor::credentials::Credentials {
        access_key_id: s("AccessKeyId"),
        access_key_secret: s("AccessKeySecret").into(),
        security_token: Some(s("SecurityToken").into()),
        expiration: None,
    }
}

#[test]
fn a_job_reading_its_instance_credentials_can_delete_only_its_own_instance() {
    let w = World::new();
    let (job_a, job_b) = (w.job("3201", "true"), w.job("3202", "true"));
    let (mut attempt_a, mut attempt_b) = (w.attempt(&job_a), w.attempt(&job_b));
    assert!(attempt_a.prepare().unwrap().success(), "{}", attempt_a.log.text());
    assert!(attempt_b.prepare().unwrap().success(), "{}", attempt_b.log.text());
    let (a, b) = (job_instance(&w.emulator, "3201"), job_instance(&w.emulator, "3202"));
    let _files =
        CredentialsFiles(vec![watchdog::credentials_path(&a).into(), watchdog::credentials_path(&b).into()]);

    // Job B, root on its instance, finds the handed-over credentials and no role to ask for.
    let path = watchdog::credentials_path(&b);
    let exit = attempt_b.run_stage("build_script", &format!("cat '{path}'; echo")).unwrap();
    assert!(exit.success(), "{}", attempt_b.log.text());
    let stolen = credentials_in_log(&attempt_b.log.text());
    let roles = ureq::get(&format!(
        "{}/instances/{b}/latest/meta-data/ram/security-credentials/",
        w.emulator.endpoint()
    ))
    .call();
    assert!(matches!(roles, Err(ureq::Error::Status(404, _))), "the instance has no RAM role to read");

    // With them it can neither delete nor even list job A's instance.
    let client = client_with(&w, stolen);
    assert_forbidden(&client.delete_instance(&a, true).unwrap_err());
    assert_forbidden(&client.delete_instances(std::slice::from_ref(&a), true).unwrap_err());
    assert_forbidden(&client.describe_instances(&DescribeInstancesFilter::default()).unwrap_err());
    assert!(is_live(&w.emulator, &a), "job A's instance survives");
    let requests = w.emulator.requests();
    let refused = requests
        .iter()
        .find(|r| r.action.as_deref() == Some("DeleteInstance") && r.params.get("InstanceId") == Some(&a))
        .expect("the emulator saw the attempt");
    assert_eq!((refused.status, refused.code.as_deref()), (403, Some("Forbidden.RAM")));

    // Job A's next stage still runs on its own instance.
    let exit = attempt_a.run_stage("build_script", "echo STILL-HERE").unwrap();
    assert!(exit.success() && attempt_a.log.text().contains("STILL-HERE"), "{}", attempt_a.log.text());

    // Its own instance it can delete (what the watchdog does with them).
    // (ECS refuses to delete an instance still initializing: the release waits that out.)
    aliyun_spot_executor::stages::release_instance(&client, &b, None).unwrap();
    assert!(!is_live(&w.emulator, &b));

    assert!(attempt_a.cleanup().unwrap().success(), "{}", attempt_a.runner_log.text());
    assert!(attempt_b.cleanup().unwrap().success(), "{}", attempt_b.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn credentials_assumed_for_one_instance_cannot_delete_another_and_run_stages_renew_them() {
    // Credentials that live shorter than the idle timeout are renewed by every run stage.
    let w = World::with(Default::default(), &[("self_destruct", "duration", "15m".into())]);
    let (job_a, job_b) = (w.job("3301", "true"), w.job("3302", "true"));
    let (mut attempt_a, mut attempt_b) = (w.attempt(&job_a), w.attempt(&job_b));
    assert!(attempt_a.prepare().unwrap().success(), "{}", attempt_a.log.text());
    assert!(attempt_b.prepare().unwrap().success(), "{}", attempt_b.log.text());
    let (a, b) = (job_instance(&w.emulator, "3301"), job_instance(&w.emulator, "3302"));
    let _files =
        CredentialsFiles(vec![watchdog::credentials_path(&a).into(), watchdog::credentials_path(&b).into()]);
    let assume_count =
        || w.emulator.requests().iter().filter(|r| r.action.as_deref() == Some("AssumeRole")).count();
    assert_eq!(assume_count(), 2, "one AssumeRole per prepared instance");
    assert!(attempt_a.run_stage("build_script", "true").unwrap().success(), "{}", attempt_a.log.text());
    assert_eq!(assume_count(), 3, "the run stage renewed credentials about to expire");
    let renewed = w.emulator.requests().into_iter().rfind(|r| r.action.as_deref() == Some("AssumeRole"));
    let renewed = renewed.unwrap();
    assert_eq!(renewed.params.get("DurationSeconds").map(String::as_str), Some("900"));
    assert_eq!(
        renewed.params.get("RoleSessionName").map(String::as_str),
        Some(format!("ci-spot-{a}").as_str())
    );

    // The runner's own call, exactly as prepare makes it, for instance A.
    let config = config::load(Some(&w.config), &Env::default()).unwrap();
    let for_a = sts::assume_role(&config, &a, "3301").unwrap();
    assert!(for_a.access_key_id.starts_with("STS."));
    let client = client_with(&w, for_a);
    assert_forbidden(&client.delete_instance(&b, true).unwrap_err());
    assert!(is_live(&w.emulator, &b), "instance B is alive");
    aliyun_spot_executor::stages::release_instance(&client, &a, None).unwrap();
    assert!(!is_live(&w.emulator, &a), "instance A deleted with its own credentials");

    // STS refuses what AssumeRole documents as invalid.
    let runner = aliyun_spot_executor::offers::client(&config).unwrap();
    let sts_call = |params: &[(&str, &str)]| {
        let p: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match runner.call_api(sts::STS_API_VERSION, "AssumeRole", &p).unwrap_err() {
            EcsError::Api { code, http_status, .. } => (code, http_status),
            other => panic!("{other}"),
        }
    };
    let arn = ("RoleArn", "acs:ram::1234567890123456:role/ci-spot-self-destruct");
    let name = ("RoleSessionName", "ci-job-x");
    assert_eq!(
        sts_call(&[arn, name, ("DurationSeconds", "600")]),
        ("InvalidParameter.DurationSeconds".into(), 400)
    );
    assert_eq!(
        sts_call(&[arn, name, ("Policy", "{not json")]),
        ("InvalidParameter.PolicyGrammar".into(), 400)
    );
    assert_eq!(
        sts_call(&[arn, ("RoleSessionName", "a b")]),
        ("InvalidParameter.RoleSessionName".into(), 400)
    );
    let long = "x".repeat(33);
    assert_eq!(
        sts_call(&[arn, ("RoleSessionName", &long)]),
        ("InvalidParameter.RoleSessionName".into(), 400)
    );
    assert_eq!(
        sts_call(&[("RoleArn", "ci-spot-self-destruct"), name]),
        ("InvalidParameter.RoleArn".into(), 400)
    );

    assert!(attempt_a.cleanup().unwrap().success(), "{}", attempt_a.runner_log.text());
    assert!(attempt_b.cleanup().unwrap().success(), "{}", attempt_b.runner_log.text());
    w.assert_nothing_left();
}
