//! Spot selection: which instance types fit a job, where they are sold as spot, and which
//! offer is cheapest — and the walk that tries those offers in order until one is created.
//!
//! This exists because the whole point of the executor is to run each job on the cheapest
//! machine that fits it, and because spot capacity comes and goes: the first choice is often
//! out of stock, so selection must produce an ordered list and the create step must fall back
//! through it (a stock-out must not fail a job while another zone or type has stock). The
//! algorithm is the one of Aliyun's `spot-instance-advisor`
//! (github.com/AliyunContainerService/spot-instance-advisor, `meta.go`): `DescribeInstanceTypes`, then
//! `DescribeAvailableResource` (spot stock per zone), then `DescribeSpotPriceHistory`, keep the
//! **latest** price per (type, zone) and sort by price per core. Everything here is pure data
//! in, data out; the ECS client implements [`CatalogueSource`] elsewhere, and
//! [`crate::selection::cache`] keeps a [`Catalogue`] for a few minutes across concurrent jobs.
//!
//! # Shape rules
//!
//! - Defaults per architecture ([`Shape::defaults`]): amd64 8c8g..64c64g (CPU:RAM 1:1, every
//!   family); arm64 8c16g..64c128g (1:2, families `ecs.c8y` and `ecs.c8r`).
//! - What a job (or `aliyun-spot prices`) asks for changes the configured shape by one rule,
//!   [`crate::config::Config::shape_for`], within the administrator's ceilings. A configured
//!   minimum above its maximum is an error ([`ShapeError`]) naming both values.
//! - Bounds are inclusive. Memory is compared with a relative tolerance of
//!   [`MEM_TOLERANCE`] (5 %), because ECS reports the usable memory of some types a little below
//!   their nominal size (15.25 GiB for a "16 GiB" type): 15.25 fits `min_mem = 16`, 15.0 does
//!   not.
//! - Family allow-list: an entry matches a type whose `InstanceTypeFamily` starts with it, so
//!   `ecs.c8y` allows exactly that family and `ecs.c8` allows `ecs.c8i`, `ecs.c8y`, `ecs.c8a`…
//!   An empty list allows every family. A type without a family gets the first two
//!   dot-separated parts of its name (`ecs.c7.2xlarge` → `ecs.c7`).
//! - Type deny-list: an entry denies a type whose name equals it, or matches it as a glob in
//!   which `*` stands for any run of characters (`ecs.g8y.*`, `*.large`).
//!
//! # Ranking rules
//!
//! - An offer is a (type, zone) that fits the shape, is in stock as spot in that zone (the
//!   inner, per-type `Status`; a zone-level `WithStock` above a type-level `SoldOut` is *not*
//!   available), and has a price. The latest price (by timestamp) of the pair is used; among
//!   equal timestamps the higher price wins, to be conservative. A price that is NaN, infinite,
//!   zero or negative is ignored, and a pair with no valid price is dropped — never ranked as
//!   free.
//! - [`rank()`] keeps only zones with a configured vswitch (those are the only zones an instance
//!   can be created in); [`rank_all`] (for `aliyun-spot prices`) keeps every zone and reports
//!   `vswitch_id: None` where none is configured.
//! - [`Ranking::PerCore`] orders by spot price ÷ cores, ties broken by total price, then type
//!   name, then zone; [`Ranking::Total`] orders by total price, ties broken by price per core
//!   (more cores for the same money first), then type name, then zone. The order is therefore
//!   fully deterministic.
//!
//! # The create-walk
//!
//! [`walk_offers`] tries offers in order through a callback that reports [`Attempt::Created`],
//! [`Attempt::NextOffer`] (stock-out, zone not on sale, price above the cap…) or
//! [`Attempt::Fatal`] (authentication, parameters…). Each skipped offer becomes one job-log line;
//! when every offer fails the result carries a one-line summary counting the reasons.
//!
//! # Files
//!
//! [`shape`] (what fits a job), [`catalogue`] (what ECS sells), [`mod@rank`] (offers in order),
//! [`mod@walk`] (the create-walk), [`offers`] (live offers from ECS through the price [`cache`]),
//! [`cooldown`] (recent stock-outs tried last), [`families`] (shared, burstable and GPU kinds),
//! [`pricing`] (price limits and currencies).

pub mod cache;
pub mod catalogue;
pub mod cooldown;
pub mod families;
pub mod offers;
pub mod pricing;
pub mod rank;
pub mod shape;
pub mod walk;

pub use crate::arch::Arch;
pub use catalogue::*;
pub use families::TypeKinds;
pub use pricing::{above_cap_reason, price_limit};
pub use rank::*;
pub use shape::*;
pub use walk::*;

#[cfg(test)]
mod tests;
