//! RFC 3339 instants as µs since the Unix epoch, the unit of WAL commit times.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Parses `2026-11-23T10:15:30.250Z` or `…+01:00`; sub-microsecond digits are cut.
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    u64::try_from(parse_signed(s)?).map_err(|_| format!("{s:?} is before 1970"))
}

/// As [`parse_rfc3339`], for a lower bound: any time before 1970 bounds nothing, so
/// it reads as the epoch.
pub fn parse_rfc3339_lower_bound(s: &str) -> Result<u64, String> {
    Ok(u64::try_from(parse_signed(s)?.max(0)).unwrap_or(0))
}

fn parse_signed(s: &str) -> Result<i128, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2026-11-23T10:15:30Z: {e}"))?;
    Ok(t.unix_timestamp_nanos() / 1000)
}

/// Formats µs since the epoch as RFC 3339 in UTC with microseconds.
pub fn format_rfc3339(us: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{us}µs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_honours_offsets() {
        let us = parse_rfc3339("2026-11-23T10:15:30.250001Z").expect("parse");
        assert_eq!(us % 1_000_000, 250_001);
        assert_eq!(format_rfc3339(us), "2026-11-23T10:15:30.250001Z");
        assert_eq!(
            parse_rfc3339("2026-11-23T11:15:30.250001+01:00").expect("offset"),
            us
        );
        for bad in ["yesterday", "2026-11-23", "1969-12-31T23:59:59Z"] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
        for bad in ["yesterday", "2026-11-23"] {
            assert!(parse_rfc3339_lower_bound(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_rfc3339_lower_bound("1969-12-31T23:59:59Z"), Ok(0));
        assert_eq!(parse_rfc3339_lower_bound("0607-04-01T14:58:03Z"), Ok(0));
    }
}
