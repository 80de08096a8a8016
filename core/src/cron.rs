//! Cron schedules for pipelines: six fields (seconds first) in a named time zone. Slot times
//! are instants (ms since the epoch); croner does the calendar, including daylight saving
//! changes (a wall time skipped by a spring-forward fires at the first valid time after the
//! gap; one repeated by a fall-back fires once).

use std::str::FromStr as _;

use chrono::{TimeZone as _, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    cron: Cron,
    tz: Tz,
}

impl CronSchedule {
    /// `pattern`: `SEC MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK`; `timezone`: an IANA name
    /// (`UTC`, `Europe/London`).
    pub fn parse(pattern: &str, timezone: &str) -> Result<CronSchedule, String> {
        let cron = CronParser::builder().seconds(Seconds::Required).build().parse(pattern).map_err(|e| format!("{pattern:?}: {e} (six fields: seconds minutes hours day-of-month month day-of-week)"))?;
        let tz = Tz::from_str(timezone).map_err(|_| format!("{timezone:?} is not a time zone name such as \"UTC\" or \"Europe/London\""))?;
        let s = CronSchedule { cron, tz };
        // A pattern that never matches (the 30th of February) would have every leader tick
        // search far for a slot: refused here. Any real one matches within 8 years of 2000.
        const Y2000_MS: u64 = 946_684_800_000;
        if s.next_after(Y2000_MS).is_none_or(|n| n > Y2000_MS + 8 * 366 * 86_400_000) {
            return Err(format!("{pattern:?} never matches a date"));
        }
        Ok(s)
    }

    /// The first slot strictly after `after_ms`.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let t = self.tz.from_utc_datetime(&Utc.timestamp_millis_opt(after_ms as i64).single()?.naive_utc());
        let next = self.cron.find_next_occurrence(&t, false).ok()?;
        u64::try_from(next.timestamp_millis()).ok()
    }

    /// The newest `limit` slots in (`after_ms`, `until_ms`], oldest first.
    pub fn newest_slots(&self, after_ms: u64, until_ms: u64, limit: usize) -> Vec<u64> {
        if until_ms <= after_ms || limit == 0 {
            return Vec::new();
        }
        // croner counts in whole seconds and stops before its start: start a second later and
        // drop what lies after `until_ms`.
        let Some(until) = Utc.timestamp_millis_opt(until_ms as i64 + 1000).single() else { return Vec::new() };
        let start = self.tz.from_utc_datetime(&until.naive_utc());
        let mut out: Vec<u64> = self
            .cron
            .iter_before(start)
            .map(|t| t.timestamp_millis())
            .skip_while(|&t| t > until_ms as i64)
            .take_while(|&t| t > after_ms as i64)
            .filter_map(|t| u64::try_from(t).ok())
            .take(limit)
            .collect();
        out.reverse();
        out
    }

    /// Whether `slot_ms` is one of the schedule's slots.
    pub fn is_slot(&self, slot_ms: u64) -> bool {
        slot_ms > 0 && self.next_after(slot_ms - 1) == Some(slot_ms)
    }
}

/// A slot as run ids and causes show it: RFC 3339 in UTC.
pub fn slot_label(slot_ms: u64) -> String {
    Utc.timestamp_millis_opt(slot_ms as i64).single().map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_else(|| slot_ms.to_string())
}

/// The slot a `slot_label` names (a run id's `@SLOT`), in ms since the epoch.
pub fn parse_slot_label(label: &str) -> Option<u64> {
    let t = chrono::NaiveDateTime::parse_from_str(label, "%Y-%m-%dT%H:%M:%SZ").ok()?;
    u64::try_from(t.and_utc().timestamp_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_labels_read_back() {
        for ms in [0u64, 1_764_979_201_000, 1_800_000_000_000] {
            assert_eq!(parse_slot_label(&slot_label(ms)), Some(ms));
        }
        assert_eq!(parse_slot_label("yesterday"), None);
    }

    fn ms(rfc3339: &str) -> u64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis() as u64
    }

    /// Every slot in [from, to), by walking `next_after`.
    fn table(s: &CronSchedule, from: &str, to: &str) -> Vec<u64> {
        let (mut at, end) = (ms(from) - 1, ms(to));
        let mut out = Vec::new();
        while let Some(next) = s.next_after(at).filter(|&n| n < end) {
            out.push(next);
            at = next;
        }
        out
    }

    fn labels(slots: &[u64]) -> Vec<String> {
        slots.iter().map(|&s| slot_label(s)).collect()
    }

    #[test]
    fn daily_slots_across_both_daylight_saving_changes_fire_once_a_day_in_order() {
        // London: 2026-03-29 01:00 GMT -> 02:00 BST (01:30 does not exist); 2026-10-25 02:00
        // BST -> 01:00 GMT (01:30 happens twice).
        let london = CronSchedule::parse("0 30 1 * * *", "Europe/London").unwrap();
        let spring = table(&london, "2026-03-28T00:00:00Z", "2026-03-31T00:00:00Z");
        assert_eq!(labels(&spring), ["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]);
        let autumn = table(&london, "2026-10-24T00:00:00Z", "2026-10-27T00:00:00Z");
        assert_eq!(labels(&autumn), ["2026-10-24T00:30:00Z", "2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]);
        // Los Angeles: 2026-03-08 02:00 PST -> 03:00 PDT; 2026-11-01 02:00 PDT -> 01:00 PST.
        let la = CronSchedule::parse("0 30 2 * * *", "America/Los_Angeles").unwrap();
        let spring = table(&la, "2026-03-07T00:00:00Z", "2026-03-10T00:00:00Z");
        assert_eq!(labels(&spring), ["2026-03-07T10:30:00Z", "2026-03-08T10:00:00Z", "2026-03-09T09:30:00Z"]);
        let la = CronSchedule::parse("0 30 1 * * *", "America/Los_Angeles").unwrap();
        let autumn = table(&la, "2026-10-31T00:00:00Z", "2026-11-03T00:00:00Z");
        assert_eq!(labels(&autumn), ["2026-10-31T08:30:00Z", "2026-11-01T08:30:00Z", "2026-11-02T09:30:00Z"]);
    }

    #[test]
    fn frequent_slots_across_the_changes_are_strictly_increasing_and_never_repeat() {
        for (tz, days) in [("Europe/London", [("2026-03-29T00:00:00Z", "2026-03-29T03:00:00Z"), ("2026-10-25T00:00:00Z", "2026-10-25T03:00:00Z")]), ("America/Los_Angeles", [("2026-03-08T09:00:00Z", "2026-03-08T12:00:00Z"), ("2026-11-01T08:00:00Z", "2026-11-01T11:00:00Z")])] {
            let s = CronSchedule::parse("0 */15 * * * *", tz).unwrap();
            for (from, to) in days {
                let t = table(&s, from, to);
                assert!(t.windows(2).all(|w| w[0] < w[1]), "{tz}: {:?}", labels(&t));
                // Three hours of instants, every 15 minutes: 12 slots, whatever the wall
                // clock does (wall-clock minutes 0, 15, 30, 45 fall on UTC quarter hours in
                // both zones), so no slot is skipped and none fires twice.
                assert_eq!(t.len(), 12, "{tz} {from}: {:?}", labels(&t));
            }
        }
    }

    #[test]
    fn newest_slots_and_bad_patterns() {
        let s = CronSchedule::parse("*/10 * * * * *", "UTC").unwrap();
        let t0 = ms("2026-01-01T00:00:00Z");
        assert_eq!(s.newest_slots(t0, t0 + 60_000, 3), [t0 + 40_000, t0 + 50_000, t0 + 60_000]);
        assert_eq!(s.newest_slots(t0, t0 + 25_000, 10), [t0 + 10_000, t0 + 20_000]);
        assert!(s.newest_slots(t0, t0, 10).is_empty());
        assert!(s.is_slot(t0 + 10_000) && !s.is_slot(t0 + 10_001));
        assert!(CronSchedule::parse("*/10 * * * *", "UTC").unwrap_err().contains("six fields"));
        assert!(CronSchedule::parse("0 0 * * * *", "Mars/Olympus").unwrap_err().contains("time zone"));
        assert!(CronSchedule::parse("0 61 * * * *", "UTC").is_err());
        assert!(CronSchedule::parse("0 0 0 30 2 *", "UTC").unwrap_err().contains("never matches"));
        // The 29th of February is rare, not never.
        assert!(CronSchedule::parse("0 0 0 29 2 *", "UTC").is_ok());
    }
}
