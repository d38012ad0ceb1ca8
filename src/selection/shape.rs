//! The shape a job asks for and whether an instance type fits it (see the module doc of
//! [`crate::selection`], "Shape rules").

use serde::{Deserialize, Serialize};

use super::families::TypeKinds;
use super::TypeInfo;
use crate::arch::Arch;

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
    /// Shared, burstable and GPU types allowed besides ordinary ones (none by default; see
    /// [`crate::selection::families`]).
    #[serde(default)]
    pub kinds: TypeKinds,
}

impl Shape {
    /// The default shape of an architecture (docs/configuration.md, `[shape.amd64]`): amd64 8c8g..64c64g at 1:1; arm64
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
                kinds: TypeKinds::default(),
            },
            Arch::Arm64 => Shape {
                arch,
                min_cpu: 8,
                max_cpu: 64,
                min_mem_gib: 16.0,
                max_mem_gib: 128.0,
                families: vec!["ecs.c8y".to_string(), "ecs.c8r".to_string()],
                deny_types: Vec::new(),
                kinds: TypeKinds::default(),
            },
        }
    }
}

/// Relative tolerance on memory bounds: ECS reports some types' memory a little below their
/// nominal size (15.25 GiB for 16 GiB), and such a type should still fit `min_mem = 16`.
pub const MEM_TOLERANCE: f64 = 0.05;

/// A shape that cannot be satisfied, found before anything is asked of ECS.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShapeError {
    /// The minimum CPU count is above the maximum.
    #[error("minimum CPU {min} is above the maximum CPU {max}")]
    CpuMinAboveMax {
        /// Minimum vCPU count.
        min: u32,
        /// Maximum vCPU count.
        max: u32,
    },
    /// The minimum memory is above the maximum.
    #[error("minimum memory {min} GiB is above the maximum memory {max} GiB")]
    MemMinAboveMax {
        /// Minimum memory (GiB).
        min: f64,
        /// Maximum memory (GiB).
        max: f64,
    },
    /// A memory bound is NaN, infinite or negative.
    #[error("memory bound {value} GiB is not a usable number of GiB")]
    BadMemory {
        /// The offending value.
        value: f64,
    },
}

impl Shape {
    /// Checks that the bounds are usable: finite, non-negative memory and every minimum at or
    /// below its maximum.
    pub fn validate(&self) -> Result<(), ShapeError> {
        for value in [self.min_mem_gib, self.max_mem_gib] {
            if !value.is_finite() || value < 0.0 {
                return Err(ShapeError::BadMemory { value });
            }
        }
        if self.min_cpu > self.max_cpu {
            return Err(ShapeError::CpuMinAboveMax { min: self.min_cpu, max: self.max_cpu });
        }
        if self.min_mem_gib > self.max_mem_gib {
            return Err(ShapeError::MemMinAboveMax { min: self.min_mem_gib, max: self.max_mem_gib });
        }
        Ok(())
    }

    /// Whether an instance type fits: architecture, CPU and memory bounds (inclusive, memory
    /// with [`MEM_TOLERANCE`]), family allow-list, type deny-list, and the allowed kinds (shared,
    /// burstable, GPU: [`TypeKinds`]).
    pub fn admits(&self, t: &TypeInfo) -> bool {
        t.arch == self.arch
            && self.kinds.admits(&t.family_level, t.gpu_amount, &t.gpu_spec)
            && t.cores >= 1
            && (self.min_cpu..=self.max_cpu).contains(&t.cores)
            && t.memory_gib.is_finite()
            && t.memory_gib >= self.min_mem_gib * (1.0 - MEM_TOLERANCE)
            && t.memory_gib <= self.max_mem_gib * (1.0 + MEM_TOLERANCE)
            && (self.families.is_empty() || {
                let family = t.family_name();
                self.families.iter().any(|f| family.starts_with(f.as_str()))
            })
            && !self.deny_types.iter().any(|d| crate::pattern::glob_match(d, &t.id))
    }
}

/// The instance types of `types` that fit `shape` ([`Shape::admits`]), in input order.
pub fn candidates<'a>(types: &'a [TypeInfo], shape: &Shape) -> Vec<&'a TypeInfo> {
    types.iter().filter(|t| shape.admits(t)).collect()
}
