//! Aliyun's published RunInstances errors (`tests/data/runinstances-errors.tsv`), one per
//! class, and the emulator's controls for them.

use super::*;

fn ranked_offers(bed: &Bed) -> Vec<aliyun_spot_executor::selection::Offer> {
    let cfg = bed.loaded_config();
    let client = aliyun_spot_executor::offers::client(&cfg).unwrap();
    let shape = cfg.shape(cfg.instance.default_arch).clone();
    aliyun_spot_executor::offers::ranked(&client, &cfg, &shape, false).unwrap()
}

fn run_instances_requests(bed: &Bed) -> Vec<Value> {
    bed.http_requests().into_iter().filter(|r| r["action"] == "RunInstances").collect()
}

#[test]
fn a_type_or_zone_condition_moves_to_the_next_offer() {
    let _seed = Seed::new("run-error-next-offer");
    let bed = Bed::start(BedOptions::default());
    let offers = ranked_offers(&bed);
    let (a, b) = (&offers[0], &offers[1]);
    let mut faults = bed.emu().faults();
    faults.run_error = vec![format!("{}@{}=InvalidInstanceType.ZoneNotSupported", a.instance_type, a.zone)];
    bed.emu().set_faults(faults);

    let job = bed.job("3801", "echo ON-THE-SECOND-OFFER");
    let out = bed.attempt(&job).run_job(&job).unwrap();
    assert_passed(&out, "ON-THE-SECOND-OFFER");
    let line = format!(
        "{} in {}: type not offered in this zone (InvalidInstanceType.ZoneNotSupported), trying the next offer",
        a.instance_type, a.zone
    );
    assert!(out.job_log.lines().any(|l| l == line), "no line `{line}`:\n{}", show(&out));
    let runs = run_instances_requests(&bed);
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!(
        (runs[0]["status"].as_u64(), runs[0]["code"].as_str()),
        (Some(403), Some("InvalidInstanceType.ZoneNotSupported"))
    );
    assert_eq!(runs[1]["status"], 200);
    // AutoReleaseTime is computed for each offer: whole minutes, at least 35 minutes ahead.
    for r in &runs {
        let sent = r["params"]["AutoReleaseTime"].as_str().expect("AutoReleaseTime sent");
        assert!(sent.ends_with(":00Z"), "{sent}");
        let at = time::OffsetDateTime::parse(sent, &time::format_description::well_known::Rfc3339).unwrap();
        let asked = time::OffsetDateTime::parse(
            r["time"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert!(at - asked >= time::Duration::minutes(34), "{sent} for a request at {asked}");
    }
    let created = bed.emu().instances();
    assert_eq!(created.len(), 1);
    assert_eq!(
        (created[0].instance_type.as_str(), created[0].zone.as_str()),
        (b.instance_type.as_str(), b.zone.as_str())
    );
    bed.finish();
}

/// Prepares a job whose every `RunInstances` fails with `code` (a `stop` class), checks that
/// prepare stops at the first offer as a system failure with one error line, cleans up, and
/// returns that line and the one `RunInstances` the emulator saw.
fn prepare_stopped_by(code: &str, seed: &'static str, job_id: &str) -> (String, Value) {
    let spec = format!("*@*={code}");
    // The check of `--run-error` and `POST /_emulator/faults`.
    assert_eq!(Faults { run_error: vec![spec.clone()], ..Faults::default() }.validate(), Ok(()));
    let _seed = Seed::new(seed);
    let bed = Bed::start(BedOptions {
        faults: Faults { run_error: vec![spec], ..Faults::default() },
        ..BedOptions::default()
    });
    let job = bed.job(job_id, "echo NEVER-RUNS");
    let mut attempt = bed.attempt(&job);
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    let prepare = attempt.prepare().unwrap();
    let log = attempt.log.text();
    assert_eq!(prepare, Exit::Code(2), "a system failure:\n{log}");
    let errors = error_lines(&log);
    assert_eq!(errors.len(), 1, "one clear line:\n{log}");
    let runs = run_instances_requests(&bed);
    assert_eq!(runs.len(), 1, "no walk through every offer: {runs:#?}");
    assert!(!log.contains("trying the next offer"), "{log}");
    assert!(bed.emu().instances().is_empty());
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    bed.finish();
    (errors[0].to_string(), runs[0].clone())
}

#[test]
fn an_account_problem_stops_at_the_first_offer_with_one_line() {
    let (line, run) = prepare_stopped_by("InvalidAccountStatus.NotEnoughBalance", "run-error-stop", "3802");
    let request_id = run["request_id"].as_str().unwrap_or_default();
    assert!(
        line.ends_with(&format!(
            "creating the instance failed: ECS `RunInstances` failed: InvalidAccountStatus.NotEnoughBalance: Your account does not have enough balance. (RequestId: {request_id}); top up the Aliyun account (it has too little balance or an outstanding payment)"
        )),
        "{line}"
    );
}

#[test]
fn a_public_ip_stock_out_stops_with_the_published_answer() {
    // Documented for instance creation in the ECS API reference (CreateInstance's error table;
    // provenance and class in tests/data/runinstances-errors.tsv): the public IP stock of the
    // region or billing method, which no other offer changes.
    let code = "InvalidOperation.PublicIpAddressNoStock";
    let (line, run) = prepare_stopped_by(code, "run-error-public-ip", "3805");
    assert_eq!((run["status"].as_u64(), run["code"].as_str()), (Some(403), Some(code)));
    let request_id = run["request_id"].as_str().unwrap_or_default();
    assert!(
        line.contains(&format!(
            "creating the instance failed: ECS `RunInstances` failed: {code}: The public IP address for the \
             specified Region or ChargeType of the instance is out of stock. Please try another Region or ChargeType. \
             (RequestId: {request_id}); "
        )),
        "{line}"
    );
}

#[test]
fn a_request_still_in_progress_is_sent_again_with_the_same_client_token() {
    let _seed = Seed::new("run-error-retry");
    let bed = Bed::start(BedOptions {
        faults: Faults { run_error: vec!["*@*=LastTokenProcessing".into()], ..Faults::default() },
        ..BedOptions::default()
    });
    let job = bed.job("3803", "echo AFTER-THE-TOKEN");
    let mut attempt = bed.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    let prepare = attempt.spawn(&bed.exes().prepare, &[], &attempt.log.clone()).unwrap();
    // More answers than one round of the client's retry policy, then the request completes.
    let in_progress = || {
        bed.emu()
            .requests()
            .iter()
            .filter(|r| {
                r.action.as_deref() == Some("RunInstances")
                    && r.code.as_deref() == Some("LastTokenProcessing")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while in_progress() < 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(in_progress() >= 8, "{}", attempt.log.text());
    bed.emu().set_faults(Faults::default());
    assert_eq!(prepare.wait().unwrap(), Exit::Code(0), "{}", attempt.log.text());
    assert!(!attempt.log.text().contains("trying the next offer"), "{}", attempt.log.text());
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    let tokens = run_instances_by_token(&bed.http_requests());
    assert_eq!(tokens.len(), 1, "one ClientToken, the same call: {tokens:?}");
    assert!(tokens.values().all(|(n, ok)| *n >= 9 && *ok == 1), "{tokens:?}");
    assert_eq!(bed.emu().instances().len(), 1);
    bed.finish();
}

#[test]
fn ecs_busy_until_the_prepare_deadline_ends_prepare_with_one_line_and_no_other_offer() {
    let _seed = Seed::new("run-error-busy");
    let bed = Bed::start(BedOptions {
        faults: Faults { run_error: vec!["*@*=ServiceUnavailable".into()], ..Faults::default() },
        // Rounds of the client's retries (10 ms backoff) 2 s apart until a 5 s prepare deadline.
        overrides: vec![
            ("aliyun", "retry_base_delay_ms", "10"),
            ("ssh", "boot_timeout", "1s"),
            ("timeouts", "prepare", "5s"),
        ],
        ..BedOptions::default()
    });
    let job = bed.job("3804", "echo NEVER-RUNS");
    let mut attempt = bed.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(2), "{}", attempt.log.text());
    let log = attempt.log.text();
    let errors = error_lines(&log);
    assert_eq!(errors.len(), 1, "one clear line:\n{log}");
    assert!(errors[0].starts_with("ERROR: creating the instance failed: "), "{log}");
    assert!(errors[0].ends_with("; ECS stayed busy until prepare had to stop, retry the job later"), "{log}");
    assert!(!log.contains("trying the next offer"), "a busy API is not a capacity error:\n{log}");
    // The same request, in whole rounds of the client's policy, more than one round.
    let tokens = run_instances_by_token(&bed.http_requests());
    assert_eq!(tokens.len(), 1, "one offer, one ClientToken: {tokens:?}");
    let per_round = RetryPolicy::default().max_attempts as usize;
    let (sent, ok) = tokens.values().next().copied().unwrap_or_default();
    assert!(
        sent >= 2 * per_round && sent % per_round == 0 && ok == 0,
        "{sent} RunInstances, {ok} answered 200"
    );
    assert!(bed.emu().instances().is_empty());
    bed.finish();
}

#[test]
fn a_booting_instance_is_deleted_once_ecs_allows_it() {
    let _seed = Seed::new("initializing");
    let bed = Bed::start(BedOptions {
        faults: Faults { initializing: Duration::from_secs(3), ..Faults::default() },
        ..BedOptions::default()
    });
    let cfg = bed.loaded_config();
    let client = aliyun_spot_executor::offers::client(&cfg).unwrap();
    let ids = client
        .run_instances(&crate::emulator_run_request(
            "ci-runner-amd64-spot-initializing",
            "faults-initializing-1",
        ))
        .unwrap();
    let created = time::OffsetDateTime::now_utc();
    // Right after RunInstances: ECS refuses while the instance initializes; the release waits.
    aliyun_spot_executor::stages::release_instance(&client, &ids[0], Some(created)).unwrap();
    let deletes: Vec<Value> =
        bed.http_requests().into_iter().filter(|r| r["action"] == "DeleteInstance").collect();
    assert!(deletes.len() >= 2, "{deletes:#?}");
    let (last, refused) = deletes.split_last().unwrap();
    assert!(
        refused.iter().all(|r| r["status"] == 403 && r["code"] == "IncorrectInstanceStatus.Initializing"),
        "{deletes:#?}"
    );
    assert_eq!(last["status"], 200, "{deletes:#?}");
    bed.finish();
}

#[test]
fn not_found_right_after_creation_means_not_visible_yet() {
    let _seed = Seed::new("not-visible-yet");
    let bed = Bed::start(BedOptions::default());
    let cfg = bed.loaded_config();
    let client = aliyun_spot_executor::offers::client(&cfg).unwrap();
    let not_found = |bed: &Bed| {
        bed.http_requests()
            .into_iter()
            .filter(|r| r["action"] == "DeleteInstance" && r["code"] == "InvalidInstanceId.NotFound")
            .count()
    };
    // Long after creation (or unknown): NotFound is "already gone", at once.
    aliyun_spot_executor::stages::release_instance(&client, "i-bp1notvisibleyet0", None).unwrap();
    assert_eq!(not_found(&bed), 1);
    // Within the grace period after RunInstances: asked again until the grace period is over.
    let grace = aliyun_spot_executor::stages::VISIBILITY_GRACE;
    let created = time::OffsetDateTime::now_utc() - (grace - Duration::from_secs(5));
    aliyun_spot_executor::stages::release_instance(&client, "i-bp1notvisibleyet0", Some(created)).unwrap();
    assert!(not_found(&bed) >= 3, "{:#?}", bed.http_requests());
    bed.finish();
}

#[test]
fn the_emulator_rounds_auto_release_time_down_to_the_minute_before_checking_it() {
    use aliyun_spot_executor::ecs::RunInstancesRequest;
    let bed = Bed::start(BedOptions::default());
    let client = aliyun_spot_executor::offers::client(&bed.loaded_config()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let minute = now.replace_second(0).unwrap().replace_nanosecond(0).unwrap();
    let request = |at: time::OffsetDateTime, token: &str| RunInstancesRequest {
        auto_release_time: Some(at),
        ..crate::emulator_run_request("ci-runner-amd64-spot-autorelease", token)
    };
    // 30 min 59 s ahead of the current minute is more than 30 minutes ahead of now, but ECS
    // reads it as 30 minutes ahead of the current minute: less than 30 minutes from now.
    let e =
        client.run_instances(&request(minute + time::Duration::seconds(30 * 60 + 59), "ar-1")).unwrap_err();
    assert_eq!(e.code(), Some("InvalidAutoReleaseTime.ValueNotSupported"), "{e}");
    assert!(bed.emu().instances().is_empty());
    bed.finish();
}

#[test]
fn run_error_and_initializing_are_set_through_the_faults_endpoint() {
    let bed = Bed::start(BedOptions::default());
    let url = format!("{}/_emulator/faults", bed.endpoint);
    let post = |body: &str| match ureq::post(&url).send_string(body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("POST {url}: {e}"),
    };
    let (status, body) = post(r#"{"run-error": ["*@*=Made.Up"]}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("`Made.Up` is not in the published RunInstances error table"), "{body}");
    let (status, body) = post(r#"{"run-error": ["ecs.c7.*@b=Zone.NotOnSale"], "initializing": 0}"#);
    assert_eq!(status, 200, "{body}");
    let faults = bed.http("/_emulator/faults");
    assert_eq!(faults["run-error"], serde_json::json!(["ecs.c7.*@b=Zone.NotOnSale"]));
    assert_eq!(faults["initializing"], serde_json::json!(0.0));
    assert_eq!(bed.emu().faults().initializing, Duration::ZERO);
    bed.finish();
}
