//! Spot selection: which instance types fit a job, where they are sold as spot, and which
//! offer is cheapest.
//!
//! (The ranking and the create-walk are being written; the shared vocabulary comes first.)

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// CPU architecture of the build machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// x86-64 (`amd64`, `x86_64`); ECS spells it `X86`.
    Amd64,
    /// 64-bit ARM (`arm64`, `aarch64`); ECS spells it `ARM`.
    Arm64,
}

impl Arch {
    /// The value of ECS's `CpuArchitecture` field.
    pub fn ecs_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "X86",
            Arch::Arm64 => "ARM",
        }
    }

    /// Parses ECS's `CpuArchitecture` (`X86` | `ARM`).
    pub fn from_ecs(s: &str) -> Option<Arch> {
        match s {
            "X86" | "x86" => Some(Arch::Amd64),
            "ARM" | "Arm" | "arm" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// Memory (GiB) per core that the default shape of this architecture asks for.
    pub fn default_mem_per_core(self) -> f64 {
        match self {
            Arch::Amd64 => 1.0,
            Arch::Arm64 => 2.0,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        })
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "amd64" | "x86_64" | "x86-64" => Ok(Arch::Amd64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            other => Err(format!(
                "unknown architecture `{other}`: use `amd64` (or `x86_64`) or `arm64` (or `aarch64`)"
            )),
        }
    }
}

/// The machine a job asks for: architecture and bounds on cores and memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// Architecture.
    pub arch: Arch,
    /// Minimum vCPU count (inclusive).
    pub min_cpu: u32,
    /// Maximum vCPU count (inclusive).
    pub max_cpu: u32,
    /// Minimum memory in GiB (inclusive).
    pub min_mem_gib: f64,
    /// Maximum memory in GiB (inclusive).
    pub max_mem_gib: f64,
    /// Instance type families allowed (`ecs.c8y`); empty allows every family.
    pub families: Vec<String>,
    /// Instance types never to use (`ecs.g8y.2xlarge`).
    pub deny_types: Vec<String>,
}

impl Shape {
    /// The default shape of an architecture (SPEC.md): amd64 8c8g..64c64g at 1:1; arm64
    /// 8c16g..64c128g at 1:2 in the families `ecs.c8y` and `ecs.c8r`.
    pub fn defaults(arch: Arch) -> Shape {
        match arch {
            Arch::Amd64 => Shape {
                arch,
                min_cpu: 8,
                max_cpu: 64,
                min_mem_gib: 8.0,
                max_mem_gib: 64.0,
                families: Vec::new(),
                deny_types: Vec::new(),
            },
            Arch::Arm64 => Shape {
                arch,
                min_cpu: 8,
                max_cpu: 64,
                min_mem_gib: 16.0,
                max_mem_gib: 128.0,
                families: vec!["ecs.c8y".to_string(), "ecs.c8r".to_string()],
                deny_types: Vec::new(),
            },
        }
    }
}

/// How offers are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ranking {
    /// Spot price ÷ cores, as `spot-instance-advisor` does (the default).
    #[default]
    PerCore,
    /// Total spot price per hour.
    Total,
}
