//! Wall-clock time as RFC 3339 UTC text, for log and audit lines: one writer, with milliseconds
//! (audit events) or microseconds (log lines, as tracing-subscriber writes them).

use std::time::{SystemTime, UNIX_EPOCH};

/// Digits after the decimal point of the seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fraction {
    /// `2026-11-26T10:09:17.123Z`
    Millis,
    /// `2026-11-26T10:09:17.123456Z`
    Micros,
}

/// Append `t` as RFC 3339 UTC (`Z`) to `out`; times before 1970 are written as 1970-01-01.
pub fn push_rfc3339(out: &mut Vec<u8>, t: SystemTime, fraction: Fraction) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    push_padded(out, y.max(0) as u64, 4);
    out.push(b'-');
    push_padded(out, u64::from(m), 2);
    out.push(b'-');
    push_padded(out, u64::from(day), 2);
    out.push(b'T');
    push_padded(out, rem / 3600, 2);
    out.push(b':');
    push_padded(out, rem / 60 % 60, 2);
    out.push(b':');
    push_padded(out, rem % 60, 2);
    out.push(b'.');
    match fraction {
        Fraction::Millis => push_padded(out, u64::from(d.subsec_millis()), 3),
        Fraction::Micros => push_padded(out, u64::from(d.subsec_micros()), 6),
    }
    out.push(b'Z');
}

/// `t` as RFC 3339 UTC with milliseconds, e.g. `2026-11-26T10:09:17.123Z`.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let mut out = Vec::with_capacity(24);
    push_rfc3339(&mut out, t, Fraction::Millis);
    String::from_utf8(out).unwrap_or_default()
}

/// `value` in decimal, zero-padded to `width` digits.
fn push_padded(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = itoa::Buffer::new();
    let text = digits.format(value);
    for _ in text.len()..width {
        out.push(b'0');
    }
    out.extend_from_slice(text.as_bytes());
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's
/// civil-from-days algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::time::Duration;

    use super::*;

    fn micros(t: SystemTime) -> String {
        let mut out = Vec::new();
        push_rfc3339(&mut out, t, Fraction::Micros);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |secs: u64, millis: u64| UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
        assert_eq!(rfc3339_millis(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339_millis(at(1_795_000_000, 999)), "2026-11-18T11:06:40.999Z");
        assert_eq!(micros(UNIX_EPOCH + Duration::from_micros(1_764_591_831_364_458)), "2025-12-01T12:23:51.364458Z");
        assert_eq!(micros(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn numbers_are_zero_padded() {
        let mut padded = Vec::new();
        push_padded(&mut padded, 7, 4);
        push_padded(&mut padded, 123456, 6);
        push_padded(&mut padded, 42, 1);
        assert_eq!(String::from_utf8(padded).unwrap(), "000712345642");
    }
}
