//! `instance.name_prefix` and `instance.hostname` against what ECS accepts as an instance's
//! `InstanceName` and `HostName` ([`crate::ecs::names`], which cites the sources): a prefix is
//! refused when any name the executor builds from it — a job's instance
//! ([`InstanceConfig::instance_name`]) or a GitHub runner's ([`InstanceConfig::runner_name`]),
//! for either architecture — would be refused by `RunInstances`.

use time::OffsetDateTime;

use super::sections::InstanceConfig;
use super::validate::{Origin, Validator};
use crate::ecs::names::{host_name_problem, instance_name_problem};
use crate::selection::Arch;

impl Validator<'_> {
    pub(super) fn instance_names(&self, instance: &InstanceConfig) -> anyhow::Result<()> {
        if let Some(h) = &instance.hostname {
            if let Some(why) = host_name_problem(h) {
                return Err(self.err(
                    Origin::File("instance.hostname"),
                    h,
                    &format!(
                        "is not a valid host name ({why}); use 2 to 64 letters, digits and single `.` or `-` \
                         between them, or leave it out to use the instance name"
                    ),
                ));
            }
        }
        // Every name has the same length whatever the time; `ffff` is as long as any suffix.
        let at = OffsetDateTime::UNIX_EPOCH;
        let names: Vec<String> = [Arch::Amd64, Arch::Arm64]
            .into_iter()
            .flat_map(|arch| [instance.instance_name(arch, at), instance.runner_name(arch, at, 0xffff)])
            .collect();
        let prefix = &instance.name_prefix;
        let longest_rest = names.iter().map(|n| n.len() - prefix.len()).max().unwrap_or_default();
        let limit = if instance.hostname.is_some() { 128 } else { 64 };
        let rule = format!(
            "use 1 to {} letters, digits and single `-` between them, starting with a letter and ending with a \
             letter or digit",
            limit - longest_rest
        );
        let refuse = |problem: String| Err(self.err(Origin::File("instance.name_prefix"), prefix, &problem));
        if !prefix.starts_with(|c: char| c.is_ascii_alphabetic())
            || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return refuse(format!("is not usable in instance and host names; {rule}"));
        }
        for name in &names {
            if let Some(why) = instance_name_problem(name) {
                return refuse(format!(
                    "makes the instance name `{name}`, which ECS refuses ({why}); {rule}"
                ));
            }
            if instance.hostname.is_none() {
                if let Some(why) = host_name_problem(name) {
                    return refuse(format!(
                        "makes the host name `{name}`, which ECS refuses ({why}); {rule} (or set \
                         `instance.hostname`)"
                    ));
                }
            }
        }
        Ok(())
    }
}
