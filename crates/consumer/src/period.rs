//! Reporting periods, as GitLab's weekly and monthly aggregations mean them: the ISO week
//! (Monday to Sunday, numbered by ISO 8601, so the days around New Year may belong to the
//! previous or next year's week: 2027-01-01 is in 2026-W53) and the calendar month, both in UTC.
//!
//! Pure: dates and times are arguments.

use chrono::{DateTime, Datelike as _, Days, Months, NaiveDate};

/// A kind of reporting period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeriodKind {
    /// ISO 8601 week, Monday 00:00 UTC to the next Monday 00:00 UTC.
    Week,
    /// Calendar month, the 1st 00:00 UTC to the next month's 1st 00:00 UTC.
    Month,
}

impl PeriodKind {
    pub const ALL: [PeriodKind; 2] = [PeriodKind::Week, PeriodKind::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            PeriodKind::Week => "week",
            PeriodKind::Month => "month",
        }
    }

    /// `week` or `month`.
    pub fn parse(s: &str) -> Option<PeriodKind> {
        PeriodKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One week or month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub kind: PeriodKind,
    /// `2026-W53` (ISO week-numbering year and week) or `2026-12`.
    pub key: String,
    /// First day (UTC).
    pub first_day: NaiveDate,
    /// Last day (UTC), inclusive.
    pub last_day: NaiveDate,
}

impl Period {
    /// The period of `kind` holding `day`.
    pub fn containing(kind: PeriodKind, day: NaiveDate) -> Period {
        match kind {
            PeriodKind::Week => {
                let week = day.iso_week();
                let back = Days::new(u64::from(day.weekday().num_days_from_monday()));
                let first_day = day.checked_sub_days(back).unwrap_or(NaiveDate::MIN);
                let last_day = first_day.checked_add_days(Days::new(6)).unwrap_or(NaiveDate::MAX);
                Period { kind, key: format!("{:04}-W{:02}", week.year(), week.week()), first_day, last_day }
            }
            PeriodKind::Month => {
                let first_day = day.with_day(1).unwrap_or(day);
                let last_day =
                    first_day.checked_add_months(Months::new(1)).and_then(|d| d.pred_opt()).unwrap_or(NaiveDate::MAX);
                Period { kind, key: format!("{:04}-{:02}", day.year(), day.month()), first_day, last_day }
            }
        }
    }

    /// The period of `kind` holding the instant `unix` (seconds, UTC).
    pub fn at_unix(kind: PeriodKind, unix: i64) -> Period {
        Period::containing(kind, day_of(unix))
    }

    /// Unix seconds of the first instant after the period (the next period's start, UTC).
    pub fn end_unix(&self) -> i64 {
        self.last_day.succ_opt().and_then(|d| d.and_hms_opt(0, 0, 0)).map_or(i64::MAX, |t| t.and_utc().timestamp())
    }
}

/// The UTC day of the instant `unix` (seconds); out-of-range instants clamp to the epoch.
pub fn day_of(unix: i64) -> NaiveDate {
    DateTime::from_timestamp(unix, 0).map(|t| t.date_naive()).unwrap_or_default()
}

/// A `YYYY-MM-DD` date (the `at` of `GET /counts`).
pub fn parse_day(s: &str) -> Option<NaiveDate> {
    if s.len() != 10 {
        return None;
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

/// Unix seconds of an RFC 3339 timestamp (`2026-11-22T01:00:00.123456789Z`, `…+11:00`).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    if s.len() > 64 {
        return None;
    }
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;

    fn day(s: &str) -> NaiveDate {
        parse_day(s).unwrap()
    }

    fn week(s: &str) -> (String, String, String) {
        let p = Period::containing(PeriodKind::Week, day(s));
        (p.key, p.first_day.to_string(), p.last_day.to_string())
    }

    fn month(s: &str) -> (String, String, String) {
        let p = Period::containing(PeriodKind::Month, day(s));
        (p.key, p.first_day.to_string(), p.last_day.to_string())
    }

    fn t(a: &str, b: &str, c: &str) -> (String, String, String) {
        (a.into(), b.into(), c.into())
    }

    #[test]
    fn iso_weeks_across_new_year() {
        // 2026 has 53 ISO weeks: Thursday 2026-12-31 and Friday 2027-01-01 are both in W53.
        assert_eq!(week("2026-12-28"), t("2026-W53", "2026-12-28", "2027-01-03"));
        assert_eq!(week("2026-12-31"), t("2026-W53", "2026-12-28", "2027-01-03"));
        assert_eq!(week("2027-01-01"), t("2026-W53", "2026-12-28", "2027-01-03"));
        assert_eq!(week("2027-01-03"), t("2026-W53", "2026-12-28", "2027-01-03"));
        assert_eq!(week("2027-01-04"), t("2027-W01", "2027-01-04", "2027-01-10"));
        // A year whose first days belong to the next year's week 1: 2024-12-30 is 2025-W01.
        assert_eq!(week("2024-12-29"), t("2024-W52", "2024-12-23", "2024-12-29"));
        assert_eq!(week("2024-12-30"), t("2025-W01", "2024-12-30", "2025-01-05"));
        assert_eq!(week("2025-01-01"), t("2025-W01", "2024-12-30", "2025-01-05"));
        // Leap day.
        assert_eq!(week("2028-02-29"), t("2028-W09", "2028-02-28", "2028-03-05"));
    }

    #[test]
    fn calendar_months() {
        assert_eq!(month("2026-12-31"), t("2026-12", "2026-12-01", "2026-12-31"));
        assert_eq!(month("2027-01-01"), t("2027-01", "2027-01-01", "2027-01-31"));
        assert_eq!(month("2028-02-10"), t("2028-02", "2028-02-01", "2028-02-29"));
        assert_eq!(month("2027-02-28"), t("2027-02", "2027-02-01", "2027-02-28"));
    }

    #[test]
    fn instants_are_read_in_utc() {
        // 2026-12-31T23:59:59Z and one second later: same week (W53), different months.
        let last = parse_rfc3339("2026-12-31T23:59:59Z").unwrap();
        assert_eq!(Period::at_unix(PeriodKind::Week, last).key, "2026-W53");
        assert_eq!(Period::at_unix(PeriodKind::Week, last + 1).key, "2026-W53");
        assert_eq!(Period::at_unix(PeriodKind::Month, last).key, "2026-12");
        assert_eq!(Period::at_unix(PeriodKind::Month, last + 1).key, "2027-01");
        // Sunday 23:59:59 UTC and Monday 00:00:00 UTC: different weeks.
        let sunday = parse_rfc3339("2027-01-03T23:59:59Z").unwrap();
        assert_eq!(Period::at_unix(PeriodKind::Week, sunday).key, "2026-W53");
        assert_eq!(Period::at_unix(PeriodKind::Week, sunday + 1).key, "2027-W01");
        // A local time east of UTC is still read in UTC: Monday 09:00 +11:00 is Sunday 22:00Z.
        let sydney = parse_rfc3339("2027-01-04T09:00:00+11:00").unwrap();
        assert_eq!(Period::at_unix(PeriodKind::Week, sydney).key, "2026-W53");
        let p = Period::at_unix(PeriodKind::Week, last);
        assert_eq!(p.end_unix(), parse_rfc3339("2027-01-04T00:00:00Z").unwrap());
        let m = Period::at_unix(PeriodKind::Month, last);
        assert_eq!(m.end_unix(), parse_rfc3339("2027-01-01T00:00:00Z").unwrap());
    }

    #[test]
    fn parsing() {
        assert_eq!(PeriodKind::parse("week"), Some(PeriodKind::Week));
        assert_eq!(PeriodKind::parse("month"), Some(PeriodKind::Month));
        assert_eq!(PeriodKind::parse("year"), None);
        assert!(parse_day("2026-02-30").is_none());
        assert!(parse_day("2026-2-3").is_none());
        assert!(parse_day("20260203").is_none());
        assert!(parse_rfc3339("yesterday").is_none());
        assert_eq!(parse_rfc3339("1970-01-01T00:00:10.5Z"), Some(10));
    }
}
