//! The owner's rules as pure functions of (settings, holds, sensors, meter, now): whether the
//! node may serve (temperatures with hysteresis, programs that want the machine, battery, idle
//! time), snooze lengths, the weekly schedule and local-time arithmetic. The desktop
//! app and a headless node (`neuroshard node --settings FILE`) both decide through them.

use std::time::Duration;

use chrono::{Datelike, Local, TimeZone, Timelike};
use serde::{Deserialize, Serialize};

use crate::care::{HYSTERESIS_C, ThermalSettings};
use crate::meter::Period;
use crate::{ScheduleWindow, Settings, Weekday};

/// Milliseconds in an hour.
pub const MS_PER_HOUR: u64 = 3600 * 1000;
/// Milliseconds in a day.
pub const MS_PER_DAY: u64 = 24 * MS_PER_HOUR;

/// What the machine says about its user and power, for "only when idle" and "not on battery".
pub trait Machine: Send + Sync + std::fmt::Debug {
    /// Time since the user's last input; none where it cannot be read (no X server).
    fn idle(&self) -> Option<Duration>;
    /// Whether the machine runs on a discharging battery; none where it cannot be read.
    fn on_battery(&self) -> Option<bool>;
    /// The CPU's and the GPU's temperatures; none for a sensor that cannot be read.
    fn temperatures(&self) -> Temperatures {
        Temperatures::default()
    }
    /// Which of `names` (executable names, without regard to case) run now, as `names` spells
    /// them; none where processes cannot be listed.
    fn running(&self, names: &[String]) -> Option<Vec<String>> {
        let _ = names;
        None
    }
    /// Whether a program is full screen; none where the desktop cannot tell.
    fn fullscreen(&self) -> Option<bool> {
        None
    }
    /// Names of the programs running now, sorted, each once: what an owner picks from.
    fn programs(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What the machine's sensors read, in °C: its hottest CPU sensor and its hottest GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Temperatures {
    /// The hottest CPU sensor; none where none can be read.
    pub cpu_c: Option<f32>,
    /// The hottest GPU; none where none can be read.
    pub gpu_c: Option<f32>,
}

impl Temperatures {
    /// In whole degrees, as they are shown and as the limits compare them: 85.4 °C is not over
    /// a limit of 85.
    pub fn rounded(self) -> Self {
        Self {
            cpu_c: self.cpu_c.map(f32::round),
            gpu_c: self.gpu_c.map(f32::round),
        }
    }
}

/// A machine with no sensors (a server): its idle time and battery cannot be read.
#[derive(Debug, Default)]
pub struct NoSensors;

impl Machine for NoSensors {
    fn idle(&self) -> Option<Duration> {
        None
    }

    fn on_battery(&self) -> Option<bool> {
        None
    }
}

/// What the owner's rules want of the node now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The first run is not finished: nothing is lent yet.
    Setup,
    /// Paused by its owner.
    Paused,
    /// Snoozed for a while.
    Snoozed,
    /// Held back by a rule (transfer cap, temperature, a program, battery, idle time,
    /// schedule).
    Waiting,
    /// May serve.
    Serving,
}

/// Why the owner holds the node back.
#[derive(Debug, Default)]
pub struct Holds {
    /// Paused from the tray or the dashboard.
    pub paused: bool,
    /// Snoozed until then, ms since the Unix epoch.
    pub snoozed_until_ms: Option<u64>,
    /// Held for a temperature since then, ms since the Unix epoch ([`thermal`]).
    pub thermal_since_ms: Option<u64>,
    /// What the sensors read at the last decision, for the dashboard.
    pub temperatures: Temperatures,
}

/// Snooze lengths the tray offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Snooze {
    /// One hour.
    OneHour,
    /// Three hours.
    ThreeHours,
    /// Until 08:00 tomorrow, local time.
    Tomorrow,
}

impl Snooze {
    /// When a snooze of this length that starts at `now_ms` ends.
    pub fn until(self, now_ms: u64) -> u64 {
        match self {
            Snooze::OneHour => now_ms + MS_PER_HOUR,
            Snooze::ThreeHours => now_ms + 3 * MS_PER_HOUR,
            Snooze::Tomorrow => tomorrow_at(now_ms, 8),
        }
    }
}

/// What the owner's holds and the settings want at `now`, before looking at the node: the
/// first run, a pause, a snooze (cleared once it ends), a used-up transfer cap, a temperature,
/// a listed or full-screen program, the battery, idle time and the weekly schedule, in that
/// order.
pub fn decide(
    settings: &Settings,
    holds: &mut Holds,
    machine: &dyn Machine,
    period: &Period,
    now: u64,
) -> (Decision, Option<String>) {
    if !settings.profile.onboarded {
        return (Decision::Setup, None);
    }
    if holds.paused {
        return (Decision::Paused, None);
    }
    match holds.snoozed_until_ms {
        Some(until) if until > now => {
            return (
                Decision::Snoozed,
                Some(format!("until {}", clock(until, now))),
            );
        }
        Some(_) => holds.snoozed_until_ms = None,
        None => {}
    }
    if let (Some(cap), Some(ends)) = (period.cap_bytes, period.ends_ms)
        && period.bytes >= cap
    {
        return (
            Decision::Waiting,
            Some(format!("transfer cap used up until {}", clock(ends, now))),
        );
    }
    holds.temperatures = machine.temperatures();
    let (since, why) = thermal(
        &settings.thermal,
        holds.temperatures,
        holds.thermal_since_ms,
        now,
    );
    holds.thermal_since_ms = since;
    match why.or_else(|| machine_wait(settings, machine, now)) {
        Some(why) => (Decision::Waiting, Some(why)),
        None => (Decision::Serving, None),
    }
}

/// The temperature rule, from the hold before (since when, if held) and the sensors at `now`:
/// a sensor above its limit holds the node; a held node serves again once every limited
/// sensor has fallen [`HYSTERESIS_C`] below its limit and it has held `min_hold_secs`, or at
/// once when no limit is left. A sensor that cannot be read holds nothing. The hold (since
/// when) and why.
pub fn thermal(
    limits: &ThermalSettings,
    temperatures: Temperatures,
    since: Option<u64>,
    now: u64,
) -> (Option<u64>, Option<String>) {
    let temperatures = temperatures.rounded();
    let sensors = [
        ("CPU", limits.cpu_limit_c, temperatures.cpu_c),
        ("GPU", limits.gpu_limit_c, temperatures.gpu_c),
    ];
    if limits.cpu_limit_c.is_none() && limits.gpu_limit_c.is_none() {
        // No limit left: nothing to cool down for.
        return (None, None);
    }
    let read = sensors
        .iter()
        .filter_map(|&(name, limit, reading)| Some((name, f32::from(limit?), reading?)));
    if let Some((name, limit, c)) = read.clone().find(|&(_, limit, c)| c > limit) {
        let why = format!("{name} at {c:.0} °C, above its {limit:.0} °C limit");
        return (Some(since.unwrap_or(now)), Some(why));
    }
    let Some(since) = since else {
        return (None, None);
    };
    if let Some((name, limit, c)) = read.clone().find(|&(_, limit, c)| c > limit - HYSTERESIS_C) {
        let resume = limit - HYSTERESIS_C;
        let why = format!("cooling down: {name} at {c:.0} °C, serves again below {resume:.0} °C");
        return (Some(since), Some(why));
    }
    let held_ms = now.saturating_sub(since);
    let min_ms = u64::from(limits.min_hold_secs) * 1000;
    if held_ms < min_ms {
        let left = (min_ms - held_ms).div_ceil(1000);
        return (
            Some(since),
            Some(format!("cooling down: serves again in {left} s")),
        );
    }
    (None, None)
}

/// Why the machine's state or the clock keeps the node waiting: a listed program running, a
/// full-screen program, battery power, too little idle time, or outside the weekly schedule;
/// none when it may serve.
fn machine_wait(settings: &Settings, machine: &dyn Machine, now: u64) -> Option<String> {
    let schedule = &settings.schedule;
    let gaming = &settings.gaming;
    if !gaming.programs.is_empty()
        && let Some(first) = machine
            .running(&gaming.programs)
            .and_then(|r| r.first().cloned())
    {
        return Some(format!("{first} is running"));
    }
    if gaming.hold_when_fullscreen && machine.fullscreen() == Some(true) {
        return Some("a program is full screen".into());
    }
    if schedule.pause_on_battery && machine.on_battery() == Some(true) {
        return Some("on battery power".into());
    }
    if schedule.only_when_idle {
        let wanted = Duration::from_secs(u64::from(schedule.idle_minutes) * 60);
        match machine.idle() {
            Some(idle) if idle >= wanted => {}
            Some(_) => {
                let minutes = schedule.idle_minutes;
                return Some(format!("runs after {minutes} min without input"));
            }
            None => return Some("idle time cannot be read here".into()),
        }
    }
    let local = Local
        .timestamp_millis_opt(now as i64)
        .single()
        .unwrap_or_else(Local::now);
    let weekday = WEEKDAYS[local.weekday().num_days_from_monday() as usize];
    let minute = (local.hour() * 60 + local.minute()) as u16;
    if !in_schedule(&schedule.weekly, weekday, minute) {
        return Some("outside the weekly schedule".into());
    }
    None
}

const WEEKDAYS: [Weekday; 7] = [
    Weekday::Mon,
    Weekday::Tue,
    Weekday::Wed,
    Weekday::Thu,
    Weekday::Fri,
    Weekday::Sat,
    Weekday::Sun,
];

/// Whether `minute` of `day` falls in one of the weekly windows; no windows means any time.
pub fn in_schedule(weekly: &[ScheduleWindow], day: Weekday, minute: u16) -> bool {
    weekly.is_empty()
        || weekly
            .iter()
            .any(|w| w.day == day && (w.start_minute..w.end_minute).contains(&minute))
}

/// Local midnight before `now_ms`, in ms since the Unix epoch.
pub fn local_midnight(now_ms: u64) -> u64 {
    let now = Local
        .timestamp_millis_opt(now_ms as i64)
        .single()
        .unwrap_or_else(Local::now);
    now.date_naive()
        .and_hms_opt(0, 0, 0)
        .and_then(|t| Local.from_local_datetime(&t).earliest())
        .map_or(now_ms - now_ms % MS_PER_DAY, |t| {
            t.timestamp_millis() as u64
        })
}

/// `hour`:00 local time on the day after `now_ms`.
fn tomorrow_at(now_ms: u64, hour: u64) -> u64 {
    let midnight = local_midnight(now_ms);
    local_midnight(midnight + MS_PER_DAY + 2 * MS_PER_HOUR) + hour * MS_PER_HOUR
}

/// "15:30" for a time today, "Tue 08:00" for a later day.
fn clock(at_ms: u64, now_ms: u64) -> String {
    let Some(at) = Local.timestamp_millis_opt(at_ms as i64).single() else {
        return String::new();
    };
    if local_midnight(at_ms) == local_midnight(now_ms) {
        at.format("%H:%M").to_string()
    } else {
        at.format("%a %H:%M").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine whose idle time, power, temperatures, processes and full-screen state the
    /// test sets.
    #[derive(Debug, Clone, Default)]
    struct Sensors {
        idle: Option<Duration>,
        battery: Option<bool>,
        temperatures: Temperatures,
        running: Vec<String>,
        fullscreen: Option<bool>,
    }

    impl Machine for Sensors {
        fn idle(&self) -> Option<Duration> {
            self.idle
        }

        fn on_battery(&self) -> Option<bool> {
            self.battery
        }

        fn temperatures(&self) -> Temperatures {
            self.temperatures
        }

        fn running(&self, names: &[String]) -> Option<Vec<String>> {
            let running = |n: &String| self.running.iter().any(|r| r.eq_ignore_ascii_case(n));
            Some(names.iter().filter(|n| running(n)).cloned().collect())
        }

        fn fullscreen(&self) -> Option<bool> {
            self.fullscreen
        }
    }

    #[test]
    fn the_rules_apply_in_order_and_a_snooze_clears_once_it_ends() {
        let now = 1_800_000_000_000;
        let mut settings = Settings::default();
        let mut holds = Holds::default();
        let plugged = Sensors {
            idle: Some(Duration::from_secs(3600)),
            battery: Some(false),
            ..Sensors::default()
        };
        let quiet = Period::default();
        let state =
            |s: &Settings, h: &mut Holds, m: &Sensors, b: &Period| decide(s, h, m, b, now).0;
        assert_eq!(
            state(&settings, &mut holds, &plugged, &quiet),
            Decision::Setup
        );
        settings.profile.onboarded = true;
        assert_eq!(
            state(&settings, &mut holds, &plugged, &quiet),
            Decision::Serving
        );
        // A pause wins over a snooze, and a used-up cap over the battery.
        holds.snoozed_until_ms = Some(now + 1);
        holds.paused = true;
        assert_eq!(
            state(&settings, &mut holds, &plugged, &quiet),
            Decision::Paused
        );
        holds.paused = false;
        assert_eq!(
            state(&settings, &mut holds, &plugged, &quiet),
            Decision::Snoozed
        );
        holds.snoozed_until_ms = Some(now);
        assert_eq!(
            state(&settings, &mut holds, &plugged, &quiet),
            Decision::Serving
        );
        assert_eq!(holds.snoozed_until_ms, None, "an ended snooze is cleared");
        let used_up = Period {
            bytes: 10,
            cap_bytes: Some(10),
            ends_ms: Some(now + MS_PER_DAY),
        };
        let on_battery = Sensors {
            battery: Some(true),
            ..plugged.clone()
        };
        let (waiting, why) = decide(&settings, &mut holds, &on_battery, &used_up, now);
        assert_eq!(waiting, Decision::Waiting);
        assert!(why.unwrap().starts_with("transfer cap used up"));
        let (_, why) = decide(&settings, &mut holds, &on_battery, &quiet, now);
        assert_eq!(why.as_deref(), Some("on battery power"));
        // Idle rules: too little idle time waits; none readable says so.
        settings.schedule.only_when_idle = true;
        let busy = Sensors {
            idle: Some(Duration::from_secs(10)),
            battery: None,
            ..Sensors::default()
        };
        let (_, why) = decide(&settings, &mut holds, &busy, &quiet, now);
        assert!(why.unwrap().contains("without input"));
        let unreadable = Sensors::default();
        let (_, why) = decide(&settings, &mut holds, &unreadable, &quiet, now);
        assert_eq!(why.as_deref(), Some("idle time cannot be read here"));
    }

    #[test]
    fn snoozes_end_when_they_say() {
        let now = 1_800_000_000_000;
        assert_eq!(Snooze::OneHour.until(now), now + MS_PER_HOUR);
        assert_eq!(Snooze::ThreeHours.until(now), now + 3 * MS_PER_HOUR);
        let tomorrow = Snooze::Tomorrow.until(now);
        assert!(tomorrow > now && tomorrow - now <= 2 * MS_PER_DAY);
        assert!(in_schedule(&[], Weekday::Mon, 0), "no windows: any time");
    }

    /// The temperature rule over a sequence of readings: it holds above a limit, keeps holding
    /// until every limited sensor is 5 °C under its limit and the minimum hold has passed,
    /// and ignores a sensor it cannot read or has no limit for.
    #[test]
    fn a_temperature_hold_lasts_until_the_hysteresis_and_the_minimum_hold_pass() {
        let limits = ThermalSettings {
            cpu_limit_c: Some(85),
            gpu_limit_c: Some(80),
            min_hold_secs: 120,
        };
        let read = |cpu, gpu| Temperatures {
            cpu_c: Some(cpu),
            gpu_c: Some(gpu),
        };
        // (ms, CPU, GPU, held since, the reason begins with)
        let steps = [
            (0, 70.0, 60.0, None, None),
            (
                1_000,
                86.0,
                60.0,
                Some(1_000),
                Some("CPU at 86 °C, above its 85 °C limit"),
            ),
            (
                2_000,
                84.0,
                60.0,
                Some(1_000),
                Some("cooling down: CPU at 84 °C, serves again below 80 °C"),
            ),
            (
                3_000,
                79.0,
                81.0,
                Some(1_000),
                Some("GPU at 81 °C, above its 80 °C limit"),
            ),
            (
                4_000,
                79.0,
                70.0,
                Some(1_000),
                Some("cooling down: serves again in 117 s"),
            ),
            (
                120_999,
                79.0,
                70.0,
                Some(1_000),
                Some("cooling down: serves again in 1 s"),
            ),
            (121_000, 79.9, 74.9, None, None),
            (122_000, 84.9, 79.9, None, None),
        ];
        let mut since = None;
        for (now, cpu, gpu, held, why) in steps {
            let (next, reason) = thermal(&limits, read(cpu, gpu), since, now);
            assert_eq!(next, held, "at {now} ms");
            assert_eq!(reason.as_deref(), why, "at {now} ms");
            since = next;
        }
        // A sensor that cannot be read holds nothing, nor does one without a limit.
        let unread = Temperatures {
            cpu_c: None,
            gpu_c: Some(120.0),
        };
        let cpu_only = ThermalSettings {
            gpu_limit_c: None,
            ..limits.clone()
        };
        assert_eq!(thermal(&cpu_only, unread, None, 0), (None, None));
        // Every limit taken away while held releases at once; a reading is taken in whole
        // degrees.
        let none = ThermalSettings::default();
        assert_eq!(
            thermal(&none, read(99.0, 99.0), Some(0), 1_000),
            (None, None)
        );
        assert_eq!(thermal(&limits, read(85.4, 60.0), None, 0), (None, None));
        assert_eq!(thermal(&limits, read(85.5, 60.0), None, 0).0, Some(0));
    }

    /// A listed program or a full-screen one holds the node, a temperature before either; the
    /// hold's start is kept in the holds between decisions.
    #[test]
    fn programs_and_temperatures_hold_the_node_in_order() {
        let now = 1_800_000_000_000;
        let mut settings = Settings::default();
        settings.profile.onboarded = true;
        settings.gaming.programs = vec!["Game.exe".into(), "steam".into()];
        let mut holds = Holds::default();
        let quiet = Period::default();
        let mut desk = Sensors {
            running: vec!["bash".into(), "STEAM".into()],
            ..Sensors::default()
        };
        let (decision, why) = decide(&settings, &mut holds, &desk, &quiet, now);
        assert_eq!(decision, Decision::Waiting);
        assert_eq!(why.as_deref(), Some("steam is running"));
        desk.running.clear();
        desk.fullscreen = Some(true);
        assert_eq!(
            decide(&settings, &mut holds, &desk, &quiet, now).0,
            Decision::Serving
        );
        settings.gaming.hold_when_fullscreen = true;
        let (_, why) = decide(&settings, &mut holds, &desk, &quiet, now);
        assert_eq!(why.as_deref(), Some("a program is full screen"));
        settings.thermal.cpu_limit_c = Some(80);
        desk.temperatures.cpu_c = Some(90.0);
        let (_, why) = decide(&settings, &mut holds, &desk, &quiet, now);
        assert_eq!(why.as_deref(), Some("CPU at 90 °C, above its 80 °C limit"));
        assert_eq!(holds.thermal_since_ms, Some(now));
        desk.fullscreen = Some(false);
        desk.temperatures.cpu_c = Some(60.0);
        let later = now + 120_000;
        assert_eq!(
            decide(&settings, &mut holds, &desk, &quiet, later).0,
            Decision::Serving
        );
        assert_eq!(holds.thermal_since_ms, None);
    }
}
