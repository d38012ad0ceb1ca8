//! The emulator's built-in world: regions, zones, instance types, where each type is sold and
//! at what price, images, the VPC, its vswitches and the security group.
//!
//! Why a shipped file: tests, the demo and people trying the tool all see the same realistic
//! catalogue (`data/emulator-catalogue.json`, derived from the shared sample catalogue, see its
//! `about` field), and its fixed resource ids are part of the documented defaults.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The catalogue as shipped in the repository.
const CATALOGUE_JSON: &str = include_str!("../../data/emulator-catalogue.json");

/// A region listed by `DescribeRegions`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Region {
    pub region_id: String,
    pub local_name: String,
}

/// A zone of the emulated region.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Zone {
    #[serde(rename = "ZoneId")]
    pub id: String,
    #[serde(rename = "LocalName")]
    pub local_name: String,
    /// Whether ARM types are sold here.
    #[allow(dead_code)]
    pub arm: bool,
}

/// An instance type.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct InstanceType {
    pub id: String,
    pub family: String,
    pub cores: u32,
    pub memory_gib: f64,
    /// `X86` or `ARM`, as ECS spells `CpuArchitecture`.
    pub arch: String,
    /// `InstanceFamilyLevel`: `EntryLevel` (shared), `EnterpriseLevel` (the default here) or
    /// `CreditEntryLevel` (burstable), the values of the current SDK's
    /// `_describe_instance_types_request.py`.
    #[serde(default = "enterprise_level")]
    pub family_level: String,
    /// `GPUAmount`.
    #[serde(default)]
    pub gpu_amount: u32,
    /// `GPUSpec`.
    #[serde(default)]
    pub gpu_spec: String,
}

fn enterprise_level() -> String {
    "EnterpriseLevel".to_string()
}

/// What a spot instance without a protection period (`SpotDuration=0`) costs relative to one
/// with the default hour: Aliyun prices the guarantee, and spot without it is about 10 %
/// cheaper.
pub(crate) const NO_PROTECTION_FACTOR: f64 = 0.9;

impl Offer {
    /// The spot price for a protection period of `hours` (0 or 1; ECS's default is 1), rounded to
    /// four decimals as ECS quotes prices.
    pub fn spot_for(&self, hours: u32) -> f64 {
        if hours == 0 {
            (self.spot * NO_PROTECTION_FACTOR * 10_000.0).round() / 10_000.0
        } else {
            self.spot
        }
    }
}

impl InstanceType {
    /// The image architecture (`x86_64` / `arm64`) this type boots.
    pub fn image_arch(&self) -> &'static str {
        if self.arch == "ARM" {
            "arm64"
        } else {
            "x86_64"
        }
    }
}

/// A (type, zone) pair that is sold, with its current prices per hour: `spot` is the price with
/// the default one-hour protection period (`SpotDuration=1`); see [`Offer::spot_for`].
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Offer {
    #[serde(rename = "type")]
    pub instance_type: String,
    pub zone: String,
    pub spot: f64,
    pub on_demand: f64,
}

/// A public image.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Image {
    pub image_id: String,
    pub architecture: String,
    #[serde(rename = "OSName")]
    pub os_name: String,
    pub platform: String,
    pub size: u32,
}

#[derive(Deserialize)]
struct CatalogueFile {
    region: String,
    regions: Vec<Region>,
    zones: Vec<Zone>,
    vpc_id: String,
    security_group_id: String,
    images: Vec<Image>,
    types: Vec<InstanceType>,
    offers: Vec<Offer>,
}

/// The loaded catalogue with lookup helpers.
#[derive(Debug, Clone)]
pub(crate) struct Catalogue {
    pub region: String,
    pub regions: Vec<Region>,
    pub zones: Vec<Zone>,
    pub vpc_id: String,
    pub security_group_id: String,
    pub images: Vec<Image>,
    pub types: Vec<InstanceType>,
    offers: BTreeMap<(String, String), Offer>,
}

impl Catalogue {
    /// The catalogue shipped with the crate.
    pub fn builtin() -> anyhow::Result<Catalogue> {
        let f: CatalogueFile = serde_json::from_str(CATALOGUE_JSON)
            .map_err(|e| anyhow::anyhow!("the built-in emulator catalogue is invalid: {e}"))?;
        let offers = f.offers.into_iter().map(|o| ((o.instance_type.clone(), o.zone.clone()), o)).collect();
        Ok(Catalogue {
            region: f.region,
            regions: f.regions,
            zones: f.zones,
            vpc_id: f.vpc_id,
            security_group_id: f.security_group_id,
            images: f.images,
            types: f.types,
            offers,
        })
    }

    pub fn instance_type(&self, id: &str) -> Option<&InstanceType> {
        self.types.iter().find(|t| t.id == id)
    }

    pub fn zone(&self, id: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| z.id == id)
    }

    pub fn image(&self, id: &str) -> Option<&Image> {
        self.images.iter().find(|i| i.image_id == id)
    }

    /// The offer for `(type, zone)`, if the type is sold there.
    pub fn offer(&self, instance_type: &str, zone: &str) -> Option<&Offer> {
        self.offers.get(&(instance_type.to_string(), zone.to_string()))
    }

    /// Every offer of a zone.
    pub fn offers_in_zone<'a>(&'a self, zone: &'a str) -> impl Iterator<Item = &'a Offer> + 'a {
        self.offers.values().filter(move |o| o.zone == zone)
    }

    /// The vswitch id of a zone: `vsw-bp1emulatorzone<letter>`.
    pub fn vswitch_of_zone(zone: &str) -> String {
        let letter = zone.rsplit('-').next().unwrap_or(zone);
        format!("vsw-bp1emulatorzone{letter}")
    }

    /// The zone a vswitch id belongs to.
    pub fn zone_of_vswitch(&self, vswitch: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| Self::vswitch_of_zone(&z.id) == vswitch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalogue_has_the_documented_shape() {
        let c = Catalogue::builtin().unwrap();
        assert_eq!(c.region, "cn-hangzhou");
        let zones: Vec<&str> = c.zones.iter().map(|z| z.id.as_str()).collect();
        assert_eq!(
            zones,
            [
                "cn-hangzhou-b",
                "cn-hangzhou-g",
                "cn-hangzhou-h",
                "cn-hangzhou-i",
                "cn-hangzhou-j",
                "cn-hangzhou-k"
            ]
        );
        assert_eq!(c.vpc_id, "vpc-bp1emulator0000000001");
        assert_eq!(c.security_group_id, "sg-bp1emulator0000000001");
        assert_eq!(Catalogue::vswitch_of_zone("cn-hangzhou-b"), "vsw-bp1emulatorzoneb");
        assert_eq!(c.zone_of_vswitch("vsw-bp1emulatorzonek").unwrap().id, "cn-hangzhou-k");
        for o in c.offers.values() {
            let t = c.instance_type(&o.instance_type).unwrap();
            if t.arch == "ARM" {
                assert!(["cn-hangzhou-b", "cn-hangzhou-j", "cn-hangzhou-k"].contains(&o.zone.as_str()));
            }
            assert!(o.spot > 0.0 && o.spot < o.on_demand, "{o:?}");
        }
        // Shared, burstable and GPU types that fit the default amd64 shape, so excluding them
        // by default is tested.
        let kinds: Vec<(&str, &str, u32)> = c
            .types
            .iter()
            .filter(|t| t.arch == "X86" && (8..=64).contains(&t.cores) && t.memory_gib >= 8.0)
            .map(|t| (t.family.as_str(), t.family_level.as_str(), t.gpu_amount))
            .collect();
        assert!(kinds.contains(&("ecs.s6", "EntryLevel", 0)), "{kinds:?}");
        assert!(kinds.contains(&("ecs.t5", "CreditEntryLevel", 0)));
        assert!(kinds.contains(&("ecs.gn6i", "EnterpriseLevel", 1)));
        for fam in ["ecs.c8y", "ecs.c8r", "ecs.g8y"] {
            assert!(c.types.iter().any(|t| t.family == fam && t.arch == "ARM"));
        }
        // Prices differ per zone.
        let a = c.offer("ecs.c7.large", "cn-hangzhou-b").unwrap().spot;
        let b = c.offer("ecs.c7.large", "cn-hangzhou-j").unwrap().spot;
        assert_ne!(a, b);
        assert!(c.image("ubuntu_24_04_arm64_20G_alibase_20250101.vhd").is_some());
        assert!(c.image("m-bp1emulatorimage0001").is_some());
    }
}
