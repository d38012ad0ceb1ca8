//! What a job may change (`[job_overrides]`), and the one rule that turns the configured shape,
//! the ceilings and the bounds a job asks for into the shape it gets.
//!
//! The same rule serves a job's `CUSTOM_ENV_ALIYUN_SPOT_*` variables and `aliyun-spot prices
//! --min-cpu …`, so `prices` with a job's bounds lists exactly the offers, in the same order,
//! that such a job is offered (docs/configuration.md, "Job variables").
//!
//! The ceilings bound every job: the effective default bounds are the intersection of
//! `[shape.<arch>]` and `[job_overrides]` (a ceiling below a shape's minimum is a configuration
//! error, checked when the file is read).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail};
use serde::Deserialize;

use super::raw::RawJobOverrides;
use super::{num, Config, Origin, Validator};
use crate::env::Env;
use crate::selection::{Arch, Shape};

/// The job variables a job may set (without the `CUSTOM_ENV_` prefix gitlab-runner adds).
pub const JOB_VAR_ARCH: &str = "ALIYUN_SPOT_ARCH";

/// A value a job may set through `CUSTOM_ENV_ALIYUN_SPOT_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Override {
    /// `ALIYUN_SPOT_ARCH`.
    Arch,
    /// `ALIYUN_SPOT_MIN_CPU`.
    MinCpu,
    /// `ALIYUN_SPOT_MAX_CPU`.
    MaxCpu,
    /// `ALIYUN_SPOT_MIN_MEM`.
    MinMem,
    /// `ALIYUN_SPOT_MAX_MEM`.
    MaxMem,
}

impl Override {
    /// All of them, in documentation order.
    pub const ALL: [Override; 5] =
        [Override::Arch, Override::MinCpu, Override::MaxCpu, Override::MinMem, Override::MaxMem];

    /// The name in `job_overrides.allow`.
    pub fn key(self) -> &'static str {
        match self {
            Override::Arch => "arch",
            Override::MinCpu => "min_cpu",
            Override::MaxCpu => "max_cpu",
            Override::MinMem => "min_mem",
            Override::MaxMem => "max_mem",
        }
    }

    /// The job variable as the user writes it in `.gitlab-ci.yml`.
    pub fn variable(self) -> &'static str {
        match self {
            Override::Arch => JOB_VAR_ARCH,
            Override::MinCpu => "ALIYUN_SPOT_MIN_CPU",
            Override::MaxCpu => "ALIYUN_SPOT_MAX_CPU",
            Override::MinMem => "ALIYUN_SPOT_MIN_MEM",
            Override::MaxMem => "ALIYUN_SPOT_MAX_MEM",
        }
    }

    /// The option of `aliyun-spot prices` that asks for the same bound.
    pub fn flag(self) -> &'static str {
        match self {
            Override::Arch => "--arch",
            Override::MinCpu => "--min-cpu",
            Override::MaxCpu => "--max-cpu",
            Override::MinMem => "--min-mem",
            Override::MaxMem => "--max-mem",
        }
    }
}

/// The administrator's limits on what a job may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOverrides {
    /// Which job variables are honoured (default: all five).
    pub allow: BTreeSet<Override>,
    /// Architectures a job may choose (default: both).
    pub archs: BTreeSet<Arch>,
    /// Per architecture, the most a job may ask for (default: the shape's maximum).
    pub ceilings: BTreeMap<Arch, Ceiling>,
}

/// The most CPU and memory a job may ask for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ceiling {
    /// vCPU.
    pub max_cpu: u32,
    /// GiB.
    pub max_mem_gib: f64,
}

/// What one job gets: the architecture and shape after its overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// The architecture.
    pub arch: Arch,
    /// The shape to select offers for.
    pub shape: Shape,
    /// The job variables that were applied, as `(ALIYUN_SPOT_…, value)`, for the job log.
    pub overrides: Vec<(String, String)>,
}

/// Who asks for bounds, which decides how an error line names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AskedBy {
    /// A job, through `CUSTOM_ENV_ALIYUN_SPOT_*`.
    #[default]
    Job,
    /// The administrator, through `aliyun-spot prices --min-cpu …`.
    CommandLine,
}

/// Bounds asked for, as written (`16`, `16G`, `16GiB`), keyed by the bound; parsed by
/// [`Config::shape_for`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShapeRequest {
    /// Who asks.
    pub by: AskedBy,
    /// `MinCpu`, `MaxCpu`, `MinMem`, `MaxMem` (an `Arch` entry is ignored).
    pub bounds: BTreeMap<Override, String>,
}

impl ShapeRequest {
    fn label(&self, o: Override, v: &str) -> String {
        match self.by {
            AskedBy::Job => format!("job variable `{}`=`{v}`", o.variable()),
            AskedBy::CommandLine => format!("`{} {v}`", o.flag()),
        }
    }

    fn name(&self, o: Override) -> &'static str {
        match self.by {
            AskedBy::Job => o.variable(),
            AskedBy::CommandLine => o.flag(),
        }
    }

    fn get(&self, o: Override) -> Option<&str> {
        self.bounds.get(&o).map(String::as_str)
    }

    fn cpu(&self, o: Override, lo: u32, hi: u32) -> anyhow::Result<Option<u32>> {
        let Some(v) = self.get(o) else { return Ok(None) };
        let what = self.label(o, v);
        let n: u32 = v.parse().map_err(|_| {
            anyhow!("{what} is not a whole number of vCPUs; set a value between {lo} and {hi}")
        })?;
        if n > hi {
            bail!(
                "{what} is above the administrator's ceiling of {hi} vCPU; set a value between {lo} and {hi}"
            );
        }
        if n < lo.max(1) {
            let why =
                if n == 0 { "is zero".to_string() } else { format!("is below the minimum of {lo} vCPU") };
            bail!("{what} {why}; set a value between {} and {hi}", lo.max(1));
        }
        Ok(Some(n))
    }

    fn mem(&self, o: Override, lo: f64, hi: f64) -> anyhow::Result<Option<f64>> {
        let Some(v) = self.get(o) else { return Ok(None) };
        let what = self.label(o, v);
        let range = if lo > 0.0 {
            format!("between {} and {} GiB", num(lo), num(hi))
        } else {
            format!("above 0 and at most {} GiB", num(hi))
        };
        let n = parse_gib(v).ok_or_else(|| anyhow!("{what} is not a number of GiB; set a value {range}"))?;
        if n > hi {
            bail!("{what} is above the administrator's ceiling of {} GiB; set a value {range}", num(hi));
        }
        if n <= 0.0 || n < lo {
            let why = if n <= 0.0 {
                "is not positive".to_string()
            } else {
                format!("is below the minimum of {} GiB", num(lo))
            };
            bail!("{what} {why}; set a value {range}");
        }
        Ok(Some(n))
    }
}

impl Config {
    /// The job's architecture and shape: the defaults, changed by the job variables
    /// `CUSTOM_ENV_ALIYUN_SPOT_{ARCH,MIN_CPU,MAX_CPU,MIN_MEM,MAX_MEM}` where the administrator
    /// allows it and within the ceilings ([`Config::shape_for`]). Errors are one line naming the
    /// variable as the user wrote it, its value and the allowed range.
    ///
    /// Every error is a [`crate::exit::JobError`] (the job's mistake, a build failure).
    pub fn job_spec(&self, env: &Env) -> anyhow::Result<JobSpec> {
        self.job_spec_unclassified(env)
            .map_err(|e| anyhow::Error::new(crate::exit::JobError(crate::exit::one_line(&e))))
    }

    fn job_spec_unclassified(&self, env: &Env) -> anyhow::Result<JobSpec> {
        let jo = &self.job_overrides;
        let mut applied = Vec::new();
        let mut take = |o: Override| -> anyhow::Result<Option<String>> {
            let Some(v) = env.custom(o.variable()) else { return Ok(None) };
            // The value is the job's and may reach the job log: control characters escaped.
            let v = &crate::identity::escape_for_log(v, 64);
            if !jo.allow.contains(&o) {
                let allowed: Vec<_> = jo.allow.iter().map(|a| format!("`{}`", a.variable())).collect();
                let allowed = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
                bail!(
                    "job variable `{}`=`{v}` is not allowed on this runner (it accepts: {allowed}); remove it \
                     from the job",
                    o.variable()
                );
            }
            applied.push((o.variable().to_string(), v.to_string()));
            Ok(Some(v.to_string()))
        };

        let arch = match take(Override::Arch)? {
            None => self.instance.default_arch,
            Some(v) => {
                let arch: Arch = v.parse().map_err(|_| {
                    anyhow!(
                        "job variable `{JOB_VAR_ARCH}`=`{v}` is not an architecture; set `amd64` (or `x86_64`) \
                         or `arm64` (or `aarch64`)"
                    )
                })?;
                if !jo.archs.contains(&arch) {
                    let ok: Vec<_> = jo.archs.iter().map(|a| format!("`{a}`")).collect();
                    bail!(
                        "job variable `{JOB_VAR_ARCH}`=`{v}` is not allowed on this runner; set {}",
                        ok.join(" or ")
                    );
                }
                arch
            }
        };
        let mut request = ShapeRequest { by: AskedBy::Job, bounds: BTreeMap::new() };
        for o in [Override::MinCpu, Override::MaxCpu, Override::MinMem, Override::MaxMem] {
            if let Some(v) = take(o)? {
                request.bounds.insert(o, v);
            }
        }
        let shape = self.shape_for(arch, &request)?;
        Ok(JobSpec { arch, shape, overrides: applied })
    }

    /// The shape of a job of `arch` that asks for nothing: `[shape.<arch>]` within the ceilings.
    pub fn default_job_shape(&self, arch: Arch) -> Shape {
        let mut shape = self.shape(arch).clone();
        let ceil = self.job_overrides.ceilings[&arch];
        shape.max_cpu = shape.max_cpu.min(ceil.max_cpu);
        shape.max_mem_gib = shape.max_mem_gib.min(ceil.max_mem_gib);
        shape
    }

    /// The one rule from asked-for bounds to a shape, for jobs and for `aliyun-spot prices`:
    ///
    /// - Start from [`Config::default_job_shape`] (the configured shape within the ceilings).
    /// - Each bound asked for lies within 1 (or the asked minimum) and the ceiling.
    /// - A minimum CPU alone raises the maximum CPU to it; a maximum CPU alone lowers the
    ///   minimum to it. Without a minimum memory, a changed minimum CPU sets the minimum memory
    ///   at the architecture's ratio ([`Arch::default_mem_per_core`]), which must then fit the
    ///   memory ceiling; a minimum memory alone raises the maximum memory to it.
    pub fn shape_for(&self, arch: Arch, request: &ShapeRequest) -> anyhow::Result<Shape> {
        let base = self.default_job_shape(arch);
        let ceil = self.job_overrides.ceilings[&arch];
        let ratio = arch.default_mem_per_core();
        let mut shape = base.clone();

        // CPU.
        let min_cpu = request.cpu(Override::MinCpu, 1, ceil.max_cpu)?;
        let max_cpu = request.cpu(Override::MaxCpu, min_cpu.unwrap_or(1), ceil.max_cpu)?;
        (shape.min_cpu, shape.max_cpu) = match (min_cpu, max_cpu) {
            (Some(min), Some(max)) => (min, max),
            (Some(min), None) => (min, base.max_cpu.max(min)),
            (None, Some(max)) => (base.min_cpu.min(max), max),
            (None, None) => (base.min_cpu, base.max_cpu),
        };

        // Memory.
        let job_min_mem = request.mem(Override::MinMem, 0.0, ceil.max_mem_gib)?;
        let job_max_mem = request.mem(Override::MaxMem, job_min_mem.unwrap_or(0.0), ceil.max_mem_gib)?;
        let min_mem = match job_min_mem {
            Some(m) => m,
            None if shape.min_cpu != base.min_cpu => {
                let implied = f64::from(shape.min_cpu) * ratio;
                if implied > ceil.max_mem_gib && job_max_mem.is_none() {
                    bail!(
                        "{} implies at least {} GiB of memory ({ratio} GiB per vCPU on {arch}), above the \
                         administrator's ceiling of {} GiB; also set `{}` to at most {}",
                        request.label(Override::MinCpu, &shape.min_cpu.to_string()),
                        num(implied),
                        num(ceil.max_mem_gib),
                        request.name(Override::MinMem),
                        num(ceil.max_mem_gib)
                    );
                }
                implied
            }
            None => base.min_mem_gib,
        };
        (shape.min_mem_gib, shape.max_mem_gib) = match job_max_mem {
            Some(max) if job_min_mem.is_some() => (min_mem, max),
            Some(max) => (min_mem.min(max), max),
            None => (min_mem, base.max_mem_gib.max(min_mem)),
        };
        Ok(shape)
    }
}

/// GiB as written by a person: `16`, `0.5`, `16G`, `16GiB`.
pub(super) fn parse_gib(v: &str) -> Option<f64> {
    let lower = v.trim().to_ascii_lowercase();
    let digits = lower.strip_suffix("gib").or_else(|| lower.strip_suffix('g')).unwrap_or(&lower).trim();
    digits.parse::<f64>().ok().filter(|n| n.is_finite())
}

impl Validator<'_> {
    pub(super) fn job_overrides(
        &self,
        raw: RawJobOverrides,
        shapes: &BTreeMap<Arch, Shape>,
        default_arch: Arch,
    ) -> anyhow::Result<JobOverrides> {
        let allow: BTreeSet<Override> = match raw.allow {
            Some(list) => list.into_iter().collect(),
            None => Override::ALL.into_iter().collect(),
        };
        let archs: BTreeSet<Arch> = match raw.archs {
            None => [Arch::Amd64, Arch::Arm64].into_iter().collect(),
            Some(list) => list
                .iter()
                .map(|a| {
                    a.parse::<Arch>().map_err(|_| {
                        self.err(
                            Origin::File("job_overrides.archs"),
                            a,
                            "is not an architecture; use `amd64` or `arm64`",
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        };
        if !archs.contains(&default_arch) {
            bail!(
                "`job_overrides.archs` does not include `instance.default_arch` = `{default_arch}`{}; add it",
                self.in_file()
            );
        }
        let mut ceilings = BTreeMap::new();
        for (arch, shape) in shapes {
            let max_cpu = raw.max_cpu.unwrap_or(shape.max_cpu);
            let max_mem_gib = raw.max_mem.unwrap_or(shape.max_mem_gib);
            if max_cpu < shape.min_cpu {
                return Err(self.err(
                    Origin::File("job_overrides.max_cpu"),
                    max_cpu,
                    &format!(
                        "is below the {arch} minimum of {} vCPU; set a ceiling of at least {}",
                        shape.min_cpu, shape.min_cpu
                    ),
                ));
            }
            if !(max_mem_gib.is_finite() && max_mem_gib >= shape.min_mem_gib) {
                return Err(self.err(
                    Origin::File("job_overrides.max_mem"),
                    num(max_mem_gib),
                    &format!(
                        "is below the {arch} minimum of {} GiB; set a ceiling of at least {}",
                        num(shape.min_mem_gib),
                        num(shape.min_mem_gib)
                    ),
                ));
            }
            ceilings.insert(*arch, Ceiling { max_cpu, max_mem_gib });
        }
        Ok(JobOverrides { allow, archs, ceilings })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gib_values() {
        assert_eq!(parse_gib("16"), Some(16.0));
        assert_eq!(parse_gib("0.5"), Some(0.5));
        assert_eq!(parse_gib("16G"), Some(16.0));
        assert_eq!(parse_gib("16GiB"), Some(16.0));
        assert_eq!(parse_gib("lots"), None);
        assert_eq!(parse_gib("inf"), None);
    }
}
