//! Durations as the file writes them: strings with a unit (`"90s"`, `"10m"`, `"3h"`, `"1h30m"`,
//! `"1d"`); a bare integer is rejected with a hint, so `300` can never mean minutes by mistake.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Parses `"90s"`, `"10m"`, `"3h"`, `"1d"`, `"1h30m"`, `"0s"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("an empty duration; write e.g. \"90s\", \"10m\" or \"3h\"".into());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => {
                return Err(format!(
                    "`{t}` is not a duration; write e.g. \"90s\", \"10m\", \"3h\" or \"1h30m\""
                ))
            }
        };
        if digits.is_empty() {
            return Err(format!("`{t}` is not a duration; write e.g. \"90s\", \"10m\", \"3h\" or \"1h30m\""));
        }
        let n: u64 = digits.parse().map_err(|_| format!("`{t}` is too long a duration"))?;
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(|| format!("`{t}` is too long a duration"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!("`{t}` has no unit; write \"{t}s\" for seconds (units: s, m, h, d)"));
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration the way [`parse_duration`] reads it, for people: every unit from the
/// largest to the smallest that is not zero, two digits after the first (`90s` → `1m30s`,
/// `1h30m`, `1h02m`, `1h00m05s`, `1d`). The one format of durations in messages, job logs and
/// tables.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let parts: Vec<(u64, &str)> =
        [(secs / 86_400, "d"), (secs % 86_400 / 3600, "h"), (secs % 3600 / 60, "m"), (secs % 60, "s")].into();
    let (Some(first), Some(last)) = (parts.iter().position(|p| p.0 > 0), parts.iter().rposition(|p| p.0 > 0))
    else {
        return "0s".into();
    };
    parts[first..=last]
        .iter()
        .enumerate()
        .map(|(i, (n, unit))| if i == 0 { format!("{n}{unit}") } else { format!("{n:02}{unit}") })
        .collect()
}

/// A duration in the file: only a string such as `"90s"`.
#[derive(Clone, Copy)]
pub(super) struct Dur(pub(super) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"90s\", \"10m\" or \"3h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "durations are strings with a unit; write \"{v}s\" for {v} seconds (or \"10m\", \"3h\")"
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                self.visit_i64(v as i64)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("300").unwrap_err(),
            "`300` has no unit; write \"300s\" for seconds (units: s, m, h, d)"
        );
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        for (secs, shown) in [
            (5, "5s"),
            (192, "3m12s"),
            (3720, "1h02m"),
            (3605, "1h00m05s"),
            (86_400, "1d"),
            (90_061, "1d01h01m01s"),
        ] {
            assert_eq!(format_duration(Duration::from_secs(secs)), shown);
            assert_eq!(parse_duration(shown), Ok(Duration::from_secs(secs)), "{shown} reads back");
        }
    }
}
