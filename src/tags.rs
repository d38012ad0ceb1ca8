//! What marks and describes an instance the executor manages, for the stages (which tag and
//! find their instance) and the administrator's commands (`instances`, `sweep`) alike.
//!
//! Tag names: every managed instance carries these besides the managed-by marker; the key is
//! `{safety.tag_prefix}:{name}` ([`crate::config::Safety::tag_key`]).

use crate::ecs::Instance;

/// The runner id (`runner.id`, else the runner host's name).
pub const RUNNER: &str = "runner";
/// The project id (from the job payload).
pub const PROJECT: &str = "project";
/// The job id (from the job payload).
pub const JOB: &str = "job";
/// The hash of the preparation attempt's secret ([`crate::identity::JobSecret::binding`]):
/// only stages holding the secret act on an instance with this tag.
pub const BINDING: &str = "binding";
/// The pipeline id.
pub const PIPELINE: &str = "pipeline";
/// The runner host's name.
pub const HOST: &str = "created-by-host";

/// True when Aliyun is taking the spot instance back (`Recycling` operation lock).
pub fn is_reclaimed(i: &Instance) -> bool {
    i.operation_locks.iter().any(|l| l.eq_ignore_ascii_case("Recycling"))
}
