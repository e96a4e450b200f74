//! Wall-clock timestamps as RFC 3339 strings, shared by registry entries and trace events.

/// Current UTC time as RFC 3339, without pulling a date crate for one field.
pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A wall-clock time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339_from_unix(since.as_secs(), since.subsec_millis())
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_from_unix(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let time = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // Written digit by digit: every trace event carries one or two of these, and `format!`
    // with padded fields cost more than the rest of the event's numbers together.
    let mut text = *b"0000-00-00T00:00:00.000Z";
    put_digits(&mut text[0..4], year.clamp(0, 9999) as u64);
    put_digits(&mut text[5..7], u64::from(month));
    put_digits(&mut text[8..10], u64::from(day));
    put_digits(&mut text[11..13], time / 3600);
    put_digits(&mut text[14..16], (time % 3600) / 60);
    put_digits(&mut text[17..19], time % 60);
    put_digits(&mut text[20..23], u64::from(millis.min(999)));
    String::from_utf8(text.to_vec()).expect("ASCII digits")
}

/// Fills `slots` with the last `slots.len()` decimal digits of `value`, zero-padded.
fn put_digits(slots: &mut [u8], mut value: u64) {
    for slot in slots.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Reads `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, as [`rfc3339`] writes it; `None` for anything
/// else (an offset other than `Z`, say).
pub fn parse_rfc3339(text: &str) -> Option<std::time::SystemTime> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 || !text.ends_with('Z') || bytes[10] != b'T' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| text.get(range)?.parse::<u64>().ok();
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let fraction = text[19..text.len() - 1]
        .strip_prefix('.')
        .map(|digits| format!("0.{digits}").parse::<f64>().ok())
        .unwrap_or(Some(0.0))?;
    let days = days_from_civil(year as i64, month as u32, day as u32);
    let secs = days.checked_mul(86_400)? + (hour * 3600 + minute * 60 + second) as i64;
    let since = std::time::Duration::from_secs(u64::try_from(secs).ok()?)
        + std::time::Duration::from_secs_f64(fraction);
    Some(std::time::UNIX_EPOCH + since)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_writes() {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_806_400_123);
        let text = rfc3339(time);
        let back = parse_rfc3339(&text).unwrap();
        let drift = back.duration_since(time).unwrap_or_else(|e| e.duration());
        assert!(drift < std::time::Duration::from_millis(1), "{text}");
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00+01:00"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn formats_known_instant() {
        assert_eq!(
            rfc3339_from_unix(1_628_565_000, 7),
            "2021-08-10T03:10:00.007Z"
        );
        assert_eq!(rfc3339_from_unix(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_from_unix(1_798_761_599, 999),
            "2026-12-31T23:59:59.999Z"
        );
        assert_eq!(
            rfc3339_from_unix(951_782_400, 120),
            "2000-02-29T00:00:00.120Z"
        );
    }
}
