//! Aliyun's rules about spot prices, kept in one place: how precise a `SpotPriceLimit` may be,
//! which protection period (`SpotDuration`) prices and creation use, and in which currency prices
//! are quoted.
//!
//! # `SpotPriceLimit` has at most three decimals
//!
//! The request model of `RunInstances` in Aliyun's current Python SDK
//! (`alibabacloud_ecs20140526/models/_run_instances_request.py`, field `spot_price_limit`):
//! "The maximum hourly price of the instance. The value can have up to three decimal places."
//! (`_create_instance_request.py` and the launch-template models say the same.) So
//! [`price_limit`] rounds `factor × price` **up** at the third decimal, never below it.
//!
//! A configured cap (`spot.max_price_per_hour`) still wins: when the rounded limit is above the
//! cap, the limit becomes the cap rounded **down** to three decimals; when that is below the
//! offer's own price, the offer is skipped as "above the cap" (a limit below the price would be
//! refused by ECS with `InvalidSpotPriceLimit.LowerThanPublicPrice` anyway).
//!
//! # One protection period (`SpotDuration`)
//!
//! `RunInstances`, `DescribeSpotPriceHistory` and `DescribeAvailableResource` take the same
//! `SpotDuration` (legacy SDK: `aliyunsdkecs/request/v20140526/{RunInstances,
//! DescribeSpotPriceHistory,DescribeAvailableResource}Request.py`, `set_SpotDuration`, an
//! Integer). Their docstrings in the current SDK (`_run_instances_request.py`,
//! `_describe_spot_price_history_request.py`, `_describe_available_resource_request.py`): "The
//! protection period of the spot instance. Unit: hours. Default value: 1. Valid values: 1 … 0";
//! `RunInstances` adds "This parameter can only be set to 0 or 1". A price read without the
//! parameter is the 1-hour price, so the executor sends the configured value
//! (`spot.protection_hours`, default [`DEFAULT_PROTECTION_HOURS`]) to all three calls.
//!
//! # Currency
//!
//! `DescribeSpotPriceHistory` answers `Currency` ("The currency unit of the price. China site:
//! CNY. International site: USD.", `_describe_spot_price_history_response_body.py`; the same in
//! `_describe_price_response_body.py`). Every price the executor prints is labelled with it, and
//! `spot.max_price_per_hour` is read in it.

use std::fmt;

/// `SpotPriceLimit` precision: three decimals (see the module documentation).
pub const LIMIT_DECIMALS: u32 = 3;

/// The default protection period in hours (Aliyun's own default, see the module documentation):
/// most CI jobs end within the hour, and a reclaim fails the job.
pub const DEFAULT_PROTECTION_HOURS: u32 = 1;

/// The protection periods `RunInstances` accepts ("can only be set to 0 or 1").
pub const PROTECTION_HOURS: [u32; 2] = [0, 1];

/// The currency assumed when an answer names none: the China site's (the field is documented
/// for both sites, so this only covers a missing field).
pub const DEFAULT_CURRENCY: &str = "CNY";

const SCALE: f64 = 1_000.0;

/// The `SpotPriceLimit` to send with `SpotWithPriceLimit`: `factor × spot` rounded **up** to three
/// decimals (never below `factor × spot`, never below the current price), and with a `cap`, at
/// most the cap rounded down to three decimals. `None` when the current price is above what the
/// cap allows (skip the offer; see [`above_cap_reason`]) or is not a usable price. `factor` must
/// be ≥ 1.0 (the configuration validates it); a smaller one is treated as 1.0.
pub fn price_limit(spot: f64, factor: f64, cap: Option<f64>) -> Option<f64> {
    debug_assert!(factor >= 1.0, "price limit factor {factor} below 1.0");
    if !(spot.is_finite() && spot > 0.0) {
        return None;
    }
    let factor = factor.max(1.0);
    let limit = round_up(spot * factor).max(round_up(spot));
    match cap {
        Some(cap) if limit > cap => {
            let cap = round_down(cap);
            (cap >= spot && cap > 0.0).then_some(cap)
        }
        _ => Some(limit),
    }
}

/// `x` rounded up to [`LIMIT_DECIMALS`]; the small epsilon keeps `0.1 × 1.2 =
/// 0.12000000000000001` at 0.12 instead of 0.121.
fn round_up(x: f64) -> f64 {
    let ticks = (x * SCALE - 1e-6).ceil();
    let limit = ticks / SCALE;
    if limit < x - 1e-12 {
        (ticks + 1.0) / SCALE
    } else {
        limit
    }
}

/// `x` rounded down to [`LIMIT_DECIMALS`] (with the same tolerance for float noise).
fn round_down(x: f64) -> f64 {
    (x * SCALE + 1e-6).floor() / SCALE
}

/// Whether `value` as written has at most [`LIMIT_DECIMALS`] decimals (`"0.123"` yes, `"0.1234"`
/// no); the emulator checks what it receives with it.
pub fn has_at_most_limit_decimals(value: &str) -> bool {
    match value.trim().split_once('.') {
        None => true,
        Some((_, frac)) => frac.trim_end_matches('0').len() <= LIMIT_DECIMALS as usize,
    }
}

/// The skip reason for an offer whose spot price is above the hard cap (the same text for
/// every such offer, so the walk's summary counts them together).
pub fn above_cap_reason(cap: f64, currency: &str) -> String {
    format!("spot price above the cap of {cap} {currency}/hour")
}

/// A price's share of the list price, labelled the way people read discounts: a spot price at
/// 12 % of the on-demand price is `88% off`.
pub fn percent_off(fraction_of_list: f64) -> String {
    let off = ((1.0 - fraction_of_list) * 100.0).round();
    format!("{off:.0}% off")
}

/// A price with its currency: `0.1234 CNY/hour`.
pub struct PerHour<'a>(pub f64, pub &'a str);

impl fmt::Display for PerHour<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.4} {}/hour", self.0, self.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_rounds_up_at_the_third_decimal_and_respects_the_cap() {
        assert_eq!(price_limit(0.1, 1.2, None), Some(0.12));
        assert_eq!(price_limit(0.12345, 1.0, None), Some(0.124), "rounded up, not to nearest");
        assert_eq!(price_limit(0.0512, 1.2, None), Some(0.062), "0.06144 → 0.062");
        assert_eq!(price_limit(0.5, 1.2, None), Some(0.6));
        assert_eq!(price_limit(0.33333, 1.2, None), Some(0.4));
        assert_eq!(price_limit(1.0, 1.2, Some(1.1)), Some(1.1), "clamped to the cap");
        assert_eq!(price_limit(1.1, 1.2, Some(1.1)), Some(1.1), "at the cap is allowed");
        assert_eq!(price_limit(1.2, 1.2, Some(1.1)), None, "above the cap is skipped");
        // Rounding up crosses a cap with more decimals: the cap, rounded down, is sent.
        assert_eq!(price_limit(0.1001, 1.2, Some(0.1205)), Some(0.12));
        assert_eq!(price_limit(0.1001, 1.2, Some(0.1009)), None, "no 3-decimal limit between price and cap");
        assert_eq!(price_limit(f64::NAN, 1.2, None), None);
        assert_eq!(price_limit(0.0, 1.2, None), None);
        for i in 1..3000 {
            let spot = f64::from(i) * 0.000_37;
            for factor in [1.0, 1.15, 1.2, 2.0] {
                let limit = price_limit(spot, factor, None).unwrap();
                assert!(limit >= spot * factor - 1e-9 && limit >= spot, "{spot} × {factor} → {limit}");
                assert!(limit < spot * factor + 0.001 + 1e-9, "{spot} × {factor} → {limit}");
                assert!(has_at_most_limit_decimals(&crate::ecs::format_price(limit)), "{limit}");
                if let Some(capped) = price_limit(spot, factor, Some(spot * 1.05)) {
                    assert!(capped >= spot && capped <= spot * 1.05 + 1e-12, "{spot} cap → {capped}");
                    assert!(has_at_most_limit_decimals(&crate::ecs::format_price(capped)));
                }
            }
        }
    }

    #[test]
    fn decimals_are_counted_as_written() {
        for ok in ["1", "0.1", "0.123", "0.1230", "12.500"] {
            assert!(has_at_most_limit_decimals(ok), "{ok}");
        }
        for bad in ["0.1234", "0.0001", "1.00001"] {
            assert!(!has_at_most_limit_decimals(bad), "{bad}");
        }
    }

    #[test]
    fn labels_say_what_they_mean() {
        assert_eq!(above_cap_reason(0.5, "CNY"), "spot price above the cap of 0.5 CNY/hour");
        assert_eq!(percent_off(0.12), "88% off");
        assert_eq!(percent_off(1.0), "0% off");
        assert_eq!(PerHour(0.05, "USD").to_string(), "0.0500 USD/hour");
    }
}
