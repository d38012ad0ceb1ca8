//! Job identity: a job cannot reach another job's instance by forging `CI_JOB_ID` or
//! `CI_PROJECT_ID`, stages without `config`'s per-attempt secret touch nothing, and
//! gitlab-runner's retry of a failed preparation still works. The real binaries, driven by the
//! gitlab-runner stand-in, against the emulator and a real sshd per instance.

use std::time::Duration;

use aliyun_spot_executor::demo::gitlab::{Attempt, Exit, Job};
use aliyun_spot_executor::emulator::Faults;

use super::executor::{World, RUNNER_ID, SECRET_MISSING};

/// The victim: job 2001 of project 42.
const VICTIM_JOB: u64 = 2001;
const VICTIM_PROJECT: u64 = 42;
/// The attacker's project.
const ATTACKER_PROJECT: u64 = 43;

fn job(w: &World, project: u64, id: u64, script: &str) -> Job {
    Job::new(project, id, &w.builds_dir(), script)
}

/// The victim's attempt, configured and prepared; its instance id and address.
fn prepared_victim(w: &World) -> (Job, Attempt, String, String) {
    let victim = job(w, VICTIM_PROJECT, VICTIM_JOB, "true");
    let mut attempt = w.attempt(&victim);
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    let record = w.emulator.instances().into_iter().next().expect("the victim's instance");
    (victim, attempt, record.id, record.ip)
}

fn is_live(w: &World, id: &str) -> bool {
    w.emulator.instances().iter().any(|i| i.id == id && i.status != "Deleted")
}

/// Runs a stage on the victim's attempt that prints the address of the sshd it reached, and
/// asserts it is the victim's own instance.
fn victim_runs_on_its_own_instance(victim: &Attempt, ip: &str, marker: &str) {
    let before = victim.log.text().len();
    let body = format!("echo \"{marker} ON $(echo $SSH_CONNECTION | cut -d' ' -f3)\"");
    assert!(victim.run_stage("build_script", &body).unwrap().success(), "{}", victim.log.text());
    let log = victim.log.text()[before..].to_string();
    assert!(
        log.lines().any(|l| l == format!("{marker} ON {ip}")),
        "not on the victim's instance {ip}:\n{log}"
    );
}

/// The attacker's own job id, the variables it forges, and how the warning names them.
type Forgery = (u64, &'static [(&'static str, &'static str)], &'static str);

#[test]
fn forged_job_and_project_ids_cannot_reach_another_jobs_instance() {
    let w = World::new();
    let (_victim, victim, victim_id, victim_ip) = prepared_victim(&w);
    let forgeries: [Forgery; 3] = [
        (3001, &[("CI_JOB_ID", "2001")], "CI_JOB_ID=2001"),
        (2001, &[("CI_PROJECT_ID", "42")], "CI_PROJECT_ID=42"),
        (3003, &[("CI_JOB_ID", "2001"), ("CI_PROJECT_ID", "42")], "CI_JOB_ID=2001 and CI_PROJECT_ID=42"),
    ];
    for (n, (attacker_id, forged, said)) in forgeries.into_iter().enumerate() {
        // A job of another project whose `variables:` override the predefined ids.
        let mut attacker = job(&w, ATTACKER_PROJECT, attacker_id, "true");
        for (k, v) in forged {
            attacker.variables.push((k.to_string(), v.to_string()));
        }
        // The runner id is the administrator's, whatever the job says.
        attacker.variables.push(("CI_RUNNER_ID".into(), "999".into()));
        let mut attempt = w.attempt(&attacker);
        assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
        let log = attempt.log.text();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("the job's variables say")).collect();
        assert_eq!(
            warnings,
            [format!(
                "WARNING: the job's variables say {said} but gitlab-runner's job payload says job {attacker_id} of \
                 project {ATTACKER_PROJECT}; using the payload's ids"
            )],
            "{log}"
        );
        assert!(!log.contains("Releasing instance"), "the attacker released something:\n{log}");
        assert!(!log.contains(&victim_id), "the attacker's log names the victim's instance:\n{log}");
        assert!(is_live(&w, &victim_id), "forgery {n}: the victim's instance was released");
        assert_eq!(w.live(), 2, "the victim's and the attacker's own instance");
        let attacker_instance = w
            .emulator
            .instances()
            .into_iter()
            .rev()
            .find(|i| i.status != "Deleted" && i.id != victim_id)
            .unwrap();
        assert_eq!(
            attacker_instance.tags.get("ci-spot-executor:project").map(String::as_str),
            Some("43"),
            "tags carry the payload's ids"
        );
        assert_eq!(
            attacker_instance.tags.get("ci-spot-executor:job").map(String::as_str),
            Some(attacker_id.to_string().as_str())
        );
        assert_eq!(
            attacker_instance.tags.get("ci-spot-executor:runner").map(String::as_str),
            Some(RUNNER_ID)
        );

        // The victim's next stage still runs on its own instance.
        victim_runs_on_its_own_instance(&victim, &victim_ip, &format!("VICTIM-AFTER-{n}"));

        // The attacker's cleanup releases only its own instance.
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
        assert!(!is_live(&w, &attacker_instance.id));
        assert!(
            is_live(&w, &victim_id),
            "forgery {n}: the attacker's cleanup released the victim's instance"
        );
    }
    // The victim's own job is unharmed to the end.
    assert!(victim.cleanup().unwrap().success(), "{}", victim.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn a_forged_cleanup_leaves_the_victims_instance_alive() {
    let w = World::new();
    let (_victim, victim, victim_id, victim_ip) = prepared_victim(&w);
    // A job of another project that only fails early (config passes, prepare never created
    // anything) and forges both ids: its cleanup runs with its own payload and secret.
    let mut attacker = job(&w, ATTACKER_PROJECT, 3101, "true");
    attacker.variables.push(("CI_JOB_ID".into(), VICTIM_JOB.to_string()));
    attacker.variables.push(("CI_PROJECT_ID".into(), VICTIM_PROJECT.to_string()));
    attacker.variables.push(("CI_RUNNER_ID".into(), "7".into()));
    let mut attempt = w.attempt(&attacker);
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    assert_eq!(attempt.runner_log.text(), "Nothing to release for job 3101\n");
    assert!(is_live(&w, &victim_id), "the forged cleanup released the victim's instance");
    assert!(
        w.emulator.requests().iter().all(|r| r.action.as_deref() != Some("DeleteInstance")),
        "the forged cleanup sent a DeleteInstance"
    );
    victim_runs_on_its_own_instance(&victim, &victim_ip, "VICTIM-AFTER-CLEANUP");
    assert!(victim.cleanup().unwrap().success(), "{}", victim.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn stages_without_configs_secret_refuse_and_touch_nothing() {
    let w = World::new();
    let (victim_job, victim, victim_id, victim_ip) = prepared_victim(&w);
    // Another preparation attempt of the very same job (same payload), whose config never ran:
    // no stage of it may act, not even on its own job's instance.
    let stray = w.attempt(&victim_job);
    let requests = w.emulator.requests().len();
    assert_eq!(stray.prepare_exec().unwrap(), Exit::Code(2), "{}", stray.log.text());
    assert_eq!(stray.run_stage("build_script", "echo SHOULD-NOT-RUN").unwrap(), Exit::Code(2));
    assert_eq!(stray.cleanup().unwrap(), Exit::Code(2), "{}", stray.runner_log.text());
    assert_eq!(stray.log.text(), format!("{SECRET_MISSING}\n{SECRET_MISSING}\n"));
    assert_eq!(stray.runner_log.text(), format!("{SECRET_MISSING}\n"));
    assert_eq!(w.emulator.requests().len(), requests, "no API call was made");
    assert!(is_live(&w, &victim_id));
    assert_eq!(w.emulator.instances().len(), 1, "nothing was created");
    victim_runs_on_its_own_instance(&victim, &victim_ip, "VICTIM-AFTER-STRAY");
    assert!(victim.cleanup().unwrap().success(), "{}", victim.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn a_missing_job_payload_fails_config_in_one_line() {
    let w = World::new();
    let j = job(&w, VICTIM_PROJECT, 2201, "true");
    let mut attempt = w.attempt(&j);
    let payload = attempt.dir().join("response.json");
    std::fs::remove_file(&payload).unwrap();
    let (exit, json) = attempt.config().unwrap();
    assert_eq!(exit, Exit::Code(2));
    assert!(json.is_none());
    let log = attempt.log.text();
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("ERROR: ")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].starts_with(&format!(
            "ERROR: cannot read the job payload `{}` (`JOB_RESPONSE_FILE`): ",
            payload.display()
        )),
        "{log}"
    );
    assert!(w.emulator.requests().is_empty());
}

#[test]
fn the_secret_from_config_never_reaches_a_log_or_a_tag() {
    let w = World::new();
    let j = job(&w, VICTIM_PROJECT, 2301, "echo HELLO");
    let mut attempt = w.attempt(&j);
    let (exit, json) = attempt.config().unwrap();
    assert!(exit.success(), "{}", attempt.log.text());
    let secret =
        json.unwrap()["job_env"]["ALIYUN_SPOT_JOB_SECRET"].as_str().expect("job_env carries it").to_string();
    assert_eq!(secret.len(), 64);
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    for (stage, body) in &j.stages {
        assert!(attempt.run_stage(stage, body).unwrap().success(), "{}", attempt.log.text());
    }
    let record = w.emulator.instances().into_iter().next().unwrap();
    let binding = record.tags.get("ci-spot-executor:binding").expect("a binding tag").clone();
    assert_eq!(binding.len(), 32);
    assert!(!secret.contains(&binding), "the tag holds a hash, not the secret");
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    let everything = format!(
        "{}{}{:?}{:?}",
        attempt.log.text(),
        attempt.runner_log.text(),
        w.emulator.instances(),
        w.emulator.requests()
    );
    assert!(!everything.contains(&secret), "the secret leaked");
    assert!(!everything.contains("NEVERPRINTED"), "the job token leaked");
    w.assert_nothing_left();
}

#[test]
fn gitlab_runners_retry_of_a_failed_preparation_works_and_leaves_nothing() {
    // Every API call fails: the first preparation attempt fails (a system failure, which
    // gitlab-runner retries after cleanup). Once its error line is in the job log, the API
    // recovers (before that attempt's cleanup and the next attempt).
    let w = World::with_faults(Faults { error_rate: 1.0, ..Faults::default() });
    let j = job(&w, VICTIM_PROJECT, 2401, "echo RETRIED-AND-RAN");
    let attempt = w.attempt(&j);
    let log = attempt.log.clone();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            assert!(log.wait_for("ERROR: ", Duration::from_secs(300)));
            w.emulator.set_faults(Faults::default());
        });
        attempt.run_job(&j).unwrap()
    });
    let show = format!("JOB LOG:\n{}\nRUNNER LOG:\n{}", out.job_log, out.runner_log);
    assert!(out.passed(), "{show}");
    assert_eq!(out.preparations, 2, "{show}");
    assert!(out.job_log.lines().any(|l| l == "RETRIED-AND-RAN"), "{show}");
    let errors: Vec<&str> = out.job_log.lines().filter(|l| l.starts_with("ERROR: ")).collect();
    assert_eq!(errors.len(), 1, "the first attempt's one line: {show}");
    assert!(errors[0].contains("ServiceUnavailable"), "{show}");
    let first = out.job_log.find(errors[0]).unwrap();
    assert!(
        out.job_log[first..].contains("Preparation failed: exit status 2\nWill be retried in 0s ...\n"),
        "{show}"
    );
    // Each attempt's cleanup ran: the first found nothing, the second released the instance.
    assert!(out.runner_log.lines().any(|l| l == "Nothing to release for job 2401"), "{show}");
    assert_eq!(out.runner_log.lines().filter(|l| l.starts_with("Released instance i-")).count(), 1, "{show}");
    assert_eq!(w.emulator.instances().len(), 1, "one instance for the job");
    w.assert_nothing_left();
}

#[test]
fn a_retried_preparation_releases_its_own_earlier_attempt_but_not_a_forgers() {
    let w = World::new();
    let (victim_job, _first, first_id, _) = prepared_victim(&w);
    // A forger of another project prepares in between, claiming the victim's ids.
    let mut forger = job(&w, ATTACKER_PROJECT, 3201, "true");
    forger.variables.push(("CI_JOB_ID".into(), VICTIM_JOB.to_string()));
    forger.variables.push(("CI_PROJECT_ID".into(), VICTIM_PROJECT.to_string()));
    let mut forger_attempt = w.attempt(&forger);
    assert!(forger_attempt.prepare().unwrap().success(), "{}", forger_attempt.log.text());
    let forger_id = w.emulator.instances().into_iter().find(|i| i.id != first_id).unwrap().id;
    // The victim's job is prepared again (its first attempt's cleanup never ran): the first
    // attempt's instance goes, the forger's stays.
    let mut second = w.attempt(&victim_job);
    assert!(second.prepare().unwrap().success(), "{}", second.log.text());
    let log = second.log.text();
    let released: Vec<&str> = log.lines().filter(|l| l.starts_with("Releasing instance ")).collect();
    assert_eq!(
        released,
        [format!("Releasing instance {first_id} left by an earlier attempt of this job")],
        "{log}"
    );
    assert!(!is_live(&w, &first_id));
    assert!(is_live(&w, &forger_id), "the forger's instance is not the victim's to release");
    assert!(second.cleanup().unwrap().success(), "{}", second.runner_log.text());
    assert!(forger_attempt.cleanup().unwrap().success(), "{}", forger_attempt.runner_log.text());
    w.assert_nothing_left();
}
