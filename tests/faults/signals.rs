//! Faults in the middle of a job: spot reclaim and SIGTERM / SIGKILL at seeded random points
//! of prepare, run and cleanup, and twenty concurrent jobs under throttling.

use super::*;

/// A job whose stage `index` ends with `tail` (so it is still running when the fault hits).
fn job_with_long_stage(bed: &Bed, job_id: &str, index: usize, tail: &str) -> Job {
    let mut job = bed.job(job_id, "echo BUILD");
    job.stages[index].1.push('\n');
    job.stages[index].1.push_str(tail);
    job
}

/// Runs config, prepare and the stages before `index`, asserting each succeeds.
fn run_up_to(attempt: &mut Attempt, job: &Job, index: usize) {
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    for (stage, body) in &job.stages[..index] {
        assert!(attempt.run_stage(stage, body).unwrap().success(), "{stage}: {}", attempt.log.text());
    }
}

#[test]
fn reclaim_in_the_middle_of_a_random_stage_is_a_system_failure_that_says_so() {
    let seed = Seed::new("reclaim");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..2 {
        let index = rng.gen_range(0..4);
        let delay = Duration::from_millis(rng.gen_range(0..1500));
        let marker = format!("faultmark-reclaim-{}-{round}", std::process::id());
        let job = job_with_long_stage(
            &bed,
            &format!("370{round}"),
            index,
            &format!("echo RECLAIM-POINT\nbash -c 'exec -a {marker} sleep 300'"),
        );
        let (stage, body) = job.stages[index].clone();
        let mut attempt = bed.attempt(&job);
        run_up_to(&mut attempt, &job, index);
        let running = attempt.start_stage(&stage, &body).unwrap();
        assert!(attempt.log.wait_for("RECLAIM-POINT", Duration::from_secs(60)), "{}", attempt.log.text());
        std::thread::sleep(delay);
        let id = bed.emu().instances().last().unwrap().id.clone();
        assert!(bed.emu().reclaim(&id));
        let exit = running.wait().unwrap();
        let log = attempt.log.text();
        assert_eq!(exit, Exit::Code(2), "stage {stage} after {delay:?}:\n{log}");
        let errors = error_lines(&log);
        assert_eq!(errors.len(), 1, "{log}");
        assert!(
            errors[0].starts_with(&format!(
                "ERROR: spot instance {id} was reclaimed by Aliyun during stage `{stage}`"
            )),
            "{log}"
        );
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
        assert!(
            processes_matching(|c| c.contains(&marker)).is_empty(),
            "the job's process survived the reclaim"
        );
    }
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// Signals at seeded random points
// ---------------------------------------------------------------------------------------------

/// A bed where prepare takes at least 3 s (boot 2 s, sshd 1 s later), so a kill within the first
/// 2.8 s always lands inside prepare.
fn slow_boot_bed() -> Bed {
    Bed::start(BedOptions {
        boot_delay: Duration::from_secs(2),
        ssh_delay: Duration::from_secs(1),
        ..BedOptions::default()
    })
}

const PREPARE_FLOOR_MS: u64 = 2800;

#[test]
fn sigterm_at_random_points_of_prepare_is_a_system_failure_and_leaves_nothing() {
    let seed = Seed::new("sigterm-prepare");
    let mut rng = seed.rng();
    let bed = slow_boot_bed();
    for round in 0..3 {
        let delay = Duration::from_millis(rng.gen_range(0..PREPARE_FLOOR_MS));
        let job = bed.job(&format!("410{round}"), "true");
        let mut attempt = bed.attempt(&job);
        assert!(attempt.config().unwrap().0.success());
        let prepare = attempt.spawn(&bed.exes().prepare, &[], &attempt.log.clone()).unwrap();
        wait_for_sigterm_handler(prepare.pid());
        std::thread::sleep(delay);
        let exit = prepare.terminate(Duration::from_secs(60)).unwrap();
        let log = attempt.log.text();
        assert_eq!(exit, Exit::Code(2), "SIGTERM {delay:?} into prepare:\n{log}");
        let errors = error_lines(&log);
        assert_eq!(errors.len(), 1, "{log}");
        assert!(errors[0].contains("terminated"), "the line says why: {log}");
        assert_eq!(bed.http_live(), 0, "a prepare that gives up releases what it created:\n{log}");
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    }
    bed.finish();
}

#[test]
fn sigkill_at_random_points_of_prepare_then_cleanup_leaves_nothing() {
    let seed = Seed::new("sigkill-prepare");
    let mut rng = seed.rng();
    let bed = slow_boot_bed();
    for round in 0..4 {
        let delay = Duration::from_millis(rng.gen_range(0..PREPARE_FLOOR_MS));
        let job = bed.job(&format!("420{round}"), "true");
        let mut attempt = bed.attempt(&job);
        assert!(attempt.config().unwrap().0.success());
        let prepare = attempt.spawn(&bed.exes().prepare, &[], &attempt.log.clone()).unwrap();
        std::thread::sleep(delay);
        prepare.signal_group(libc::SIGKILL);
        assert_eq!(prepare.wait().unwrap(), Exit::Signal(libc::SIGKILL), "{}", attempt.log.text());
        let cleanup = attempt.cleanup().unwrap();
        assert!(
            cleanup.success(),
            "cleanup after SIGKILL {delay:?} into prepare: {}",
            attempt.runner_log.text()
        );
        assert_eq!(
            bed.http_live(),
            0,
            "after SIGKILL {delay:?} into prepare and cleanup: {}",
            attempt.runner_log.text()
        );
    }
    bed.finish();
}

/// Starts the job, runs it up to a random stage that is kept running, and signals that stage's
/// `run` at a random moment; returns the job's attempt and how `run` ended.
fn signal_random_run_stage(
    bed: &Bed,
    rng: &mut StdRng,
    job_id: &str,
    marker: &str,
    sig: i32,
) -> (Attempt, String, Exit) {
    let index = rng.gen_range(0..4);
    let delay = Duration::from_millis(rng.gen_range(0..3000));
    let job = job_with_long_stage(bed, job_id, index, &format!("bash -c 'exec -a {marker} sleep 300'"));
    let (stage, body) = job.stages[index].clone();
    let mut attempt = bed.attempt(&job);
    run_up_to(&mut attempt, &job, index);
    let running: Running = attempt.start_stage(&stage, &body).unwrap();
    if sig == libc::SIGTERM {
        wait_for_sigterm_handler(running.pid());
    }
    std::thread::sleep(delay);
    let exit = if sig == libc::SIGTERM {
        running.terminate(Duration::from_secs(60)).unwrap()
    } else {
        running.signal_group(sig);
        running.wait().unwrap()
    };
    let what = format!("signal {sig} {delay:?} into stage `{stage}` of job {job_id}");
    (attempt, what, exit)
}

#[test]
fn sigterm_at_random_points_of_random_run_stages_is_a_system_failure_and_leaves_nothing() {
    let seed = Seed::new("sigterm-run");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..3 {
        let marker = format!("faultmark-term-{}-{round}", std::process::id());
        let (attempt, what, exit) =
            signal_random_run_stage(&bed, &mut rng, &format!("430{round}"), &marker, libc::SIGTERM);
        let log = attempt.log.text();
        assert_eq!(exit, Exit::Code(2), "{what}:\n{log}");
        let errors = error_lines(&log);
        assert_eq!(errors.len(), 1, "{what}:\n{log}");
        assert!(
            errors[0].contains("cancelled") || errors[0].contains("terminated"),
            "{what}: the line says why:\n{log}"
        );
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
        assert!(processes_matching(|c| c.contains(&marker)).is_empty(), "{what}: the job's process survived");
    }
    bed.finish();
}

#[test]
fn sigkill_at_random_points_of_random_run_stages_then_cleanup_leaves_nothing() {
    let seed = Seed::new("sigkill-run");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..2 {
        let marker = format!("faultmark-kill-{}-{round}", std::process::id());
        let (attempt, what, exit) =
            signal_random_run_stage(&bed, &mut rng, &format!("440{round}"), &marker, libc::SIGKILL);
        assert_eq!(exit, Exit::Signal(libc::SIGKILL), "{what}");
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
        assert!(processes_matching(|c| c.contains(&marker)).is_empty(), "{what}: the job's process survived");
    }
    bed.finish();
}

/// Added to every API answer while cleanup is signalled: its two calls (find by tags, delete)
/// then take at least 1.2 s, and the signal comes within the first second.
const CLEANUP_LATENCY_MS: u64 = 600;

/// Prepares a job, slows the API down so cleanup takes a while, signals cleanup at a random
/// moment, then runs cleanup again (gitlab-runner's next attempt, or the administrator).
fn interrupted_cleanup(bed: &Bed, rng: &mut StdRng, job_id: &str, sig: i32) {
    let job = bed.job(job_id, "true");
    let mut attempt = bed.attempt(&job);
    run_up_to(&mut attempt, &job, 0);
    assert_eq!(bed.http_live(), 1);
    let delay = Duration::from_millis(rng.gen_range(0..1000));
    bed.emu().set_faults(Faults { latency_ms: CLEANUP_LATENCY_MS, ..bed.emu().faults() });
    let cleanup = attempt.spawn(&bed.exes().cleanup, &[], &attempt.runner_log.clone()).unwrap();
    if sig == libc::SIGTERM {
        wait_for_sigterm_handler(cleanup.pid());
    }
    std::thread::sleep(delay);
    let exit = if sig == libc::SIGTERM {
        cleanup.terminate(Duration::from_secs(60)).unwrap()
    } else {
        cleanup.signal_group(sig);
        cleanup.wait().unwrap()
    };
    let what = format!("signal {sig} {delay:?} into cleanup of job {job_id}");
    assert_ne!(
        exit,
        Exit::Code(0),
        "{what}: an interrupted cleanup does not claim success: {}",
        attempt.runner_log.text()
    );
    if sig == libc::SIGTERM {
        assert_eq!(exit, Exit::Code(2), "{what}: {}", attempt.runner_log.text());
        assert_eq!(error_lines(&attempt.runner_log.text()).len(), 1, "{what}: {}", attempt.runner_log.text());
    }
    bed.emu().set_faults(Faults { latency_ms: 0, ..bed.emu().faults() });
    let again = attempt.cleanup().unwrap();
    assert!(again.success(), "{what}: the next cleanup finishes: {}", attempt.runner_log.text());
    assert_eq!(bed.http_live(), 0, "{what}: {}", attempt.runner_log.text());
}

#[test]
fn sigterm_at_random_points_of_cleanup_then_cleanup_again_leaves_nothing() {
    let seed = Seed::new("sigterm-cleanup");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..3 {
        interrupted_cleanup(&bed, &mut rng, &format!("450{round}"), libc::SIGTERM);
    }
    bed.finish();
}

#[test]
fn sigkill_at_random_points_of_cleanup_then_cleanup_again_leaves_nothing() {
    let seed = Seed::new("sigkill-cleanup");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..3 {
        interrupted_cleanup(&bed, &mut rng, &format!("460{round}"), libc::SIGKILL);
    }
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

#[test]
fn twenty_concurrent_jobs_under_throttling_all_pass_without_duplicates() {
    let _seed = Seed::new("concurrency");
    const JOBS: usize = 20;
    let bed = Bed::start(BedOptions {
        faults: Faults { throttle_every: Some(3), ..Faults::default() },
        overrides: SHORT_BACKOFF.to_vec(),
        ..BedOptions::default()
    });
    let ids: Vec<String> = (0..JOBS).map(|i| format!("{}", 5000 + i)).collect();
    let outcomes: Vec<(String, JobOutcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let bed = &bed;
                s.spawn(move || {
                    // Each job in a project of its own: the emulated instances share this
                    // machine's disk, where real ones each have their own.
                    let builds = bed.dir.path().join("builds").display().to_string();
                    let job = Job::in_project(
                        42,
                        &format!("group/p{id}"),
                        id.parse().unwrap(),
                        &builds,
                        &format!("echo CONCURRENT-{id}"),
                    );
                    (id.clone(), bed.attempt(&job).run_job(&job).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a job thread panicked")).collect()
    });
    for (id, out) in &outcomes {
        assert_passed(out, &format!("CONCURRENT-{id}"));
    }
    assert_eq!(bed.http_live(), 0);

    let requests = bed.http_requests();
    let throttled = requests.iter().filter(|r| r["code"] == "Throttling.User").count();
    assert!(throttled >= JOBS, "throttling really happened: {throttled} of {}", requests.len());

    // One instance per job tag.
    let job_tag = bed.loaded_config().safety.tag_key("job");
    let instances = bed.emu().instances();
    let mut per_job: BTreeMap<String, usize> = BTreeMap::new();
    for i in &instances {
        *per_job.entry(i.tags.get(&job_tag).cloned().unwrap_or_default()).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(per_job, expected, "instances per `{job_tag}` tag");

    // One instance per ClientToken; a token sent more than once only because of a retry.
    let mut per_token: BTreeMap<String, usize> = BTreeMap::new();
    for i in &instances {
        *per_token.entry(i.client_token.clone().expect("every instance has a ClientToken")).or_default() += 1;
    }
    assert_eq!(per_token.len(), JOBS, "{per_token:?}");
    assert!(per_token.values().all(|n| *n == 1), "{per_token:?}");
    let by_token = run_instances_by_token(&requests);
    assert_eq!(by_token.keys().collect::<BTreeSet<_>>(), per_token.keys().collect::<BTreeSet<_>>());
    for (token, (sent, ok)) in &by_token {
        assert!(*ok >= 1, "ClientToken {token}: RunInstances never succeeded");
        if *sent > 1 {
            assert!(ok < sent, "ClientToken {token}: sent {sent} times without a failed attempt to retry");
        }
    }
    bed.finish();
}
