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

#[cfg(test)]
mod tests {
    use super::*;

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
