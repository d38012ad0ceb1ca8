//! `run_exec <script> <stage>`: run one stage script on the job's instance over SSH.
//!
//! gitlab-runner generates the script on the runner host and passes its path; it may be any
//! stage (`prepare_script`, `get_sources`, `build_script`, `step_*`, `after_script`,
//! `clear_worktree`, `cleanup_file_variables`, …), so the name is only used for messages and
//! for the cost line of the last stage. The script is uploaded and run in its own process
//! group with stdin from `/dev/null` (a job that reads stdin must not read its own script), its
//! output streamed as it comes. Exit mapping: script status 0 → success; non-zero → build
//! failure with the status in `BUILD_EXIT_CODE_FILE`; anything else (no instance, SSH lost,
//! reclaimed, cancelled) → system failure.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Context as _};
use time::OffsetDateTime;

use super::{cost, is_reclaimed, Context, Progress};
use crate::exit::StageError;
use crate::ssh::{self, SshError, SshTarget};
use crate::state::Phase;

/// Runs the stage `stage` with the script at `script_path`.
pub fn run(ctx: &Context, script_path: &Path, stage: &str) -> Result<(), StageError> {
    ctx.env.exit_codes().clear_build_exit_code_file();
    let script = std::fs::read(script_path)
        .with_context(|| format!("failed to read the stage script `{}`", script_path.display()))?;
    let state = ctx.store.load(&ctx.key)?.ok_or_else(|| {
        StageError::system(format!(
            "no prepared instance for job {}: `prepare` did not finish (see its output above)",
            ctx.key.job_id
        ))
    })?;
    let id = state.instance_id.clone().unwrap_or_default();
    if state.phase != Phase::Ready || id.is_empty() {
        return Err(StageError::system(format!(
            "the instance of job {} is not ready (state `{:?}`): `prepare` did not finish",
            ctx.key.job_id, state.phase
        )));
    }
    let target = SshTarget {
        host: state.ip.clone().unwrap_or_default(),
        port: state.ssh_port,
        user: state.ssh_user.clone(),
        private_key: ctx.client_private_key()?,
        host_key: state.host_public_key.clone(),
        connect_timeout: ctx.config.ssh.connect_timeout,
    };
    crate::sts::renew_at_run(ctx, &target, &id);
    let cancel = ctx.cancel_flag();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    // The id goes into the shell commands that mark the stage for the watchdog.
    let (before, after) = crate::watchdog::stage_markers(crate::identity::checked_instance_id(&id)?);
    let options =
        ssh::RunOptions { hooks: ssh::StageHooks { before, after }, keepalive: ctx.config.ssh.keepalive };
    let shell = &ctx.config.runner.shell;
    // Over the job's kept session when its keeper runs; otherwise (or when it did not take the
    // stage, so nothing ran) over a connection of our own.
    let kept = match ctx.config.ssh.keep_session {
        true => {
            let dir = ctx.store.job_dir(&ctx.key);
            crate::keeper::run_stage(
                &dir,
                &target,
                &script,
                shell,
                &options,
                &mut stdout,
                &mut stderr,
                &cancel,
            )
        }
        false => None,
    };
    let outcome = match kept {
        Some(outcome) => outcome,
        None => ssh::run_script_with(&target, &script, shell, &options, &mut stdout, &mut stderr, &cancel),
    };
    let _ = stdout.flush();

    let result = match outcome {
        Ok(o) if o.cancelled => Err(StageError::system(format!(
            "stage `{stage}` was cancelled; stopped the job's processes on {id}"
        ))),
        Ok(o) => match (o.exit_status, o.signal) {
            (Some(0), _) => Ok(()),
            (Some(code), _) => Err(StageError::Build(code)),
            (None, Some(sig)) => Err(StageError::Build(128 + signal_number(&sig))),
            (None, None) => {
                Err(lost(ctx, &id, stage, anyhow!("the SSH channel closed without an exit status")))
            }
        },
        Err(e @ SshError::HostKeyMismatch { .. }) => Err(StageError::System(
            anyhow!(e).context(format!("refusing to run stage `{stage}` on {id}: its SSH host key changed")),
        )),
        Err(e) => Err(lost(ctx, &id, stage, anyhow!(e))),
    };

    if stage == "cleanup_file_variables" {
        // gitlab-runner runs this stage last and shows cleanup's output only in its own log,
        // so the job's cost goes into the job log here.
        if let Some(line) = cost::job_cost_line(&state, OffsetDateTime::now_utc()) {
            Progress.line(line);
        }
    }
    result
}

/// The SSH session failed: tell a reclaim from a plain network failure by asking ECS.
fn lost(ctx: &Context, id: &str, stage: &str, cause: anyhow::Error) -> StageError {
    match ctx.client.describe_instance(id) {
        Ok(Some(inst)) if is_reclaimed(&inst) || inst.status == "Stopped" || inst.status == "Stopping" => {
            StageError::system(format!(
                "spot instance {id} was reclaimed by Aliyun during stage `{stage}`; the job can be retried (`retry: when: runner_system_failure`)"
            ))
        }
        Ok(None) => StageError::system(format!(
            "spot instance {id} was reclaimed by Aliyun (or released) during stage `{stage}`; the job can be retried (`retry: when: runner_system_failure`)"
        )),
        _ => StageError::System(cause.context(format!("lost the SSH connection to {id} during stage `{stage}`"))),
    }
}

fn signal_number(name: &str) -> i32 {
    match name.trim_start_matches("SIG") {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ABRT" => 6,
        "KILL" => 9,
        "SEGV" => 11,
        "PIPE" => 13,
        "TERM" => 15,
        _ => 0,
    }
}
