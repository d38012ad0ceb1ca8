//! Creating the runner's instance: the ranked offers, then
//! [`crate::launch::create_on_offers`], the same walk as prepare's (price limit, fallback on
//! capacity errors, fresh look, `AutoReleaseTime`, error classes), with this front end's
//! signal flag, deadline (`timeouts.prepare`) and `ClientToken`s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::config::Config;
use crate::ecs::EcsClient;
use crate::launch::{Created, Hooks, Sending, Template};
use crate::selection::{Offer, Shape};
use crate::state::JobKey;

/// One instance to create.
pub struct Launch<'a> {
    /// Configuration.
    pub config: &'a Config,
    /// ECS client.
    pub client: &'a EcsClient,
    /// The shape (arch and bounds).
    pub shape: &'a Shape,
    /// Name, tags, role and user data of the instance.
    pub template: Template,
    /// The runner's scope (`repos/OWNER/REPO` or `orgs/ORG`).
    pub scope: String,
    /// The runner's name, unique to this start: with the scope, it makes the `ClientToken`s.
    pub runner_name: String,
    /// Set by SIGTERM/SIGINT.
    pub cancel: &'a AtomicBool,
}

/// Walks the offers; returns the created instance.
pub fn create(l: &Launch) -> Result<Created> {
    let config = l.config;
    let offers = crate::offers::ranked(l.client, config, l.shape, false)?;
    if offers.is_empty() {
        anyhow::bail!(
            "no spot offer fits: no {} instance type with {}-{} vCPU and {}-{} GiB is sold as spot in a zone with a configured vswitch; widen the shape or add vswitches",
            l.shape.arch,
            l.shape.min_cpu,
            l.shape.max_cpu,
            l.shape.min_mem_gib,
            l.shape.max_mem_gib
        );
    }
    let started = Instant::now();
    let mut hooks = StartHooks {
        cancel: l.cancel,
        started,
        deadline: started + config.timeouts.prepare,
        // The ClientToken's derivation is prepare's; a start is one "job" of its runner.
        key: JobKey {
            runner_id: "github".into(),
            project_id: l.scope.clone(),
            job_id: l.runner_name.clone(),
            binding: String::new(),
        },
    };
    crate::launch::create_on_offers(l.client, config, l.shape, offers, &l.template, &mut hooks)
}

struct StartHooks<'a> {
    cancel: &'a AtomicBool,
    started: Instant,
    deadline: Instant,
    key: JobKey,
}

impl Hooks for StartHooks<'_> {
    type Error = anyhow::Error;

    fn stop(&mut self) -> Option<anyhow::Error> {
        if self.cancel.load(Ordering::SeqCst) {
            return Some(anyhow!("terminated by a signal before an instance was created"));
        }
        if Instant::now() >= self.deadline {
            return Some(anyhow!(
                "github start timed out after {}s while creating an instance; raise `timeouts.prepare`",
                self.started.elapsed().as_secs()
            ));
        }
        None
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.cancel.load(Ordering::SeqCst) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
        }
    }

    fn client_token(&self, offer: &Offer) -> String {
        crate::stages::prepare::client_token(&self.key, "github-start", offer)
    }

    fn sending(&mut self, _: &Sending) -> Result<()> {
        Ok(())
    }

    fn fail(&self, error: anyhow::Error) -> anyhow::Error {
        error
    }

    fn none_created(&mut self) {}

    fn busy_hint(&self) -> String {
        "github start had to stop, run it again later".into()
    }
}
