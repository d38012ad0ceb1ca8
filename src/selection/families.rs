//! Which kinds of instance types a CI job may run on, beyond its shape: shared, burstable and
//! GPU types are excluded unless the configuration allows them.
//!
//! Why: a shared (`EntryLevel`) type has no guaranteed CPU, a burstable (`CreditEntryLevel`) type
//! throttles to its baseline once its CPU credits are spent — both turn a cheap-looking offer
//! into a slow or stalled build — and a GPU type is expensive hardware a build rarely needs.
//!
//! The values come from Aliyun's current SDK: `InstanceFamilyLevel` in
//! `alibabacloud_ecs20140526/models/_describe_instance_types_request.py` ("EntryLevel:
//! Entry-level (shared). EnterpriseLevel: Enterprise-level. CreditEntryLevel: Credit
//! entry-level."), and the GPU fields `GPUAmount` / `GPUSpec` of
//! `_describe_instance_types_response_body.py`. terraform-provider-alicloud validates the same
//! three levels (`alicloud/resource_alicloud_ess_scaling_configuration.go`,
//! `instance_family_level`).

use serde::{Deserialize, Serialize};

/// `InstanceFamilyLevel` of a shared type.
pub const SHARED_LEVEL: &str = "EntryLevel";
/// `InstanceFamilyLevel` of a burstable type.
pub const BURSTABLE_LEVEL: &str = "CreditEntryLevel";

/// The kinds of instance types allowed besides ordinary (enterprise-level, GPU-less) ones; all
/// off by default (`spot.allow_shared`, `spot.allow_burstable`, `spot.allow_gpu`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeKinds {
    /// Shared types (`InstanceFamilyLevel = EntryLevel`).
    #[serde(default)]
    pub shared: bool,
    /// Burstable types (`InstanceFamilyLevel = CreditEntryLevel`).
    #[serde(default)]
    pub burstable: bool,
    /// Types with a GPU (`GPUAmount > 0` or a `GPUSpec`).
    #[serde(default)]
    pub gpu: bool,
}

impl TypeKinds {
    /// Whether a type of this family level and GPU description is allowed.
    pub fn admits(&self, family_level: &str, gpu_amount: u32, gpu_spec: &str) -> bool {
        (self.shared || family_level != SHARED_LEVEL)
            && (self.burstable || family_level != BURSTABLE_LEVEL)
            && (self.gpu || (gpu_amount == 0 && gpu_spec.trim().is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_burstable_and_gpu_types_need_permission() {
        let none = TypeKinds::default();
        assert!(none.admits("EnterpriseLevel", 0, ""));
        assert!(none.admits("", 0, ""), "a type without a level is ordinary");
        assert!(!none.admits("EntryLevel", 0, ""));
        assert!(!none.admits("CreditEntryLevel", 0, ""));
        assert!(!none.admits("EnterpriseLevel", 1, "NVIDIA T4"));
        assert!(!none.admits("EnterpriseLevel", 0, "NVIDIA A10 (vGPU)"));
        let all = TypeKinds { shared: true, burstable: true, gpu: true };
        for (level, n, spec) in
            [("EntryLevel", 0, ""), ("CreditEntryLevel", 0, ""), ("EnterpriseLevel", 1, "T4")]
        {
            assert!(all.admits(level, n, spec));
        }
        assert!(!TypeKinds { shared: true, ..none }.admits("CreditEntryLevel", 0, ""));
    }

    #[test]
    fn default_shapes_leave_them_out_and_configured_ones_let_them_in() {
        use crate::selection::{Arch, Shape, TypeInfo};
        let t = |id: &str, level: &str, gpus: u32| TypeInfo {
            id: id.into(),
            family: String::new(),
            cores: 8,
            memory_gib: 16.0,
            arch: Arch::Amd64,
            family_level: level.into(),
            gpu_amount: gpus,
            gpu_spec: if gpus > 0 { "NVIDIA T4".into() } else { String::new() },
        };
        let shared = t("ecs.s6-c1m2.2xlarge", SHARED_LEVEL, 0);
        let burst = t("ecs.t5-c1m2.2xlarge", BURSTABLE_LEVEL, 0);
        let gpu = t("ecs.gn6i-c8g1.2xlarge", "EnterpriseLevel", 1);
        let plain = t("ecs.c7.2xlarge", "EnterpriseLevel", 0);
        let shape = Shape::defaults(Arch::Amd64);
        assert!(shape.admits(&plain));
        for other in [&shared, &burst, &gpu] {
            assert!(!shape.admits(other), "{}", other.id);
        }
        let open = Shape { kinds: TypeKinds { shared: true, burstable: true, gpu: true }, ..shape };
        for other in [&shared, &burst, &gpu, &plain] {
            assert!(open.admits(other), "{}", other.id);
        }
    }
}
