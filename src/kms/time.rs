//! Points in time as the KMS records them: whole seconds since the Unix epoch,
//! shown as RFC 3339 UTC (`2024-05-01T12:00:00Z`), the form CloudTrail's
//! `eventTime` and the AWS CLI's dates take. A crate for this one conversion
//! would outweigh the twenty lines of civil-calendar arithmetic below.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

pub const SECONDS_PER_DAY: i64 = 86_400;

impl Timestamp {
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the system clock is set before 1970");
        Self(i64::try_from(since.as_secs()).expect("the system clock is set past year 292e9"))
    }

    pub fn from_unix(seconds: i64) -> Self {
        Self(seconds)
    }

    pub fn plus_days(self, days: u32) -> Self {
        Self(self.0 + i64::from(days) * SECONDS_PER_DAY)
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(SECONDS_PER_DAY);
        let secs = self.0.rem_euclid(SECONDS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

/// The text is not `YYYY-MM-DDTHH:MM:SSZ`.
#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a UTC time of the form YYYY-MM-DDTHH:MM:SSZ")]
pub struct BadTimestamp(String);

impl FromStr for Timestamp {
    type Err = BadTimestamp;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadTimestamp(s.to_owned());
        let b = s.as_bytes();
        if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
            return Err(bad());
        }
        if b[13] != b':' || b[16] != b':' {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u32, BadTimestamp> {
            let part = &s[r];
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            part.parse().map_err(|_| bad())
        };
        let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 59 {
            return Err(bad());
        }
        let days = days_from_civil(i64::from(y), mo, d);
        if civil_from_days(days) != (i64::from(y), mo, d) {
            return Err(bad());
        }
        Ok(Self(
            days * SECONDS_PER_DAY + i64::from(h * 3600 + mi * 60 + se),
        ))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
        // `date -u -d @951782400` (a leap day in a year divisible by 400)
        assert_eq!(Timestamp(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(Timestamp(1_700_000_000).to_string(), "2023-11-14T22:13:20Z");
        assert_eq!(Timestamp(4_107_542_399).to_string(), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn parse_is_the_inverse_of_display() {
        for t in [
            0,
            59,
            951_782_400,
            1_700_000_000,
            4_107_542_399,
            253_402_300_799,
        ] {
            let shown = Timestamp(t).to_string();
            assert_eq!(shown.parse::<Timestamp>().unwrap(), Timestamp(t), "{shown}");
        }
    }

    #[test]
    fn parse_rejects_what_is_not_a_date() {
        for s in [
            "",
            "2023-11-14 22:13:20Z",
            "2023-02-29T00:00:00Z",
            "2023-13-01T00:00:00Z",
            "2023-11-14T24:00:00Z",
            "2023-11-14T22:13:20+01:00",
            "+023-11-14T22:13:20Z",
        ] {
            assert!(s.parse::<Timestamp>().is_err(), "{s}");
        }
    }
}
