//! The CPU architecture of a build machine, shared by the ECS client (which spells it `X86` /
//! `ARM`) and selection (which picks types of it), so neither imports the other for it.

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
