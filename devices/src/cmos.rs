//! The CMOS real-time clock (an MC146818 at ports 0x70-0x71): the guest's
//! wall clock where it has no paravirtual one. Linux in Hyper-V mode reads it
//! at boot (kvm-clock's wall clock is not there); without it Linux waits out
//! its "update in progress" timeout (seconds under nested virtualization),
//! prints "Unable to read current time from RTC" and starts in 1970.
//!
//! What it does: the time and date registers give the host's UTC time, in
//! BCD or binary as register B asks, always 24-hour; "update in progress" is
//! never set (every read is consistent); no alarm, periodic or update
//! interrupts (register C reads 0, no IRQ 8). Writes to the time and date
//! registers are ignored (the guest cannot set the host's clock, and pvmm
//! keeps no offset); the other bytes of the 128-byte RAM keep what the guest
//! writes. Bit 7 of the index port is the NMI mask, ignored.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Register indexes (MC146818 data sheet; the century byte is the one the
/// ACPI FADT's CENTURY field names by convention).
mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const DAY_OF_WEEK: u8 = 0x06;
    pub const DAY_OF_MONTH: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const A: u8 = 0x0a;
    pub const B: u8 = 0x0b;
    pub const C: u8 = 0x0c;
    pub const D: u8 = 0x0d;
    pub const CENTURY: u8 = 0x32;
}

/// Whether register `index` is one of the clock's (read from the host's
/// clock, writes ignored).
fn is_time_register(index: u8) -> bool {
    matches!(
        index,
        reg::SECONDS
            | reg::MINUTES
            | reg::HOURS
            | reg::DAY_OF_WEEK
            | reg::DAY_OF_MONTH
            | reg::MONTH
            | reg::YEAR
            | reg::CENTURY
    )
}

/// Register A: 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) clear.
const A_DEFAULT: u8 = 0x26;
/// Register B: 24-hour mode.
const B_24_HOUR: u8 = 1 << 1;
/// Register B: binary (not BCD) data mode.
const B_BINARY: u8 = 1 << 2;
/// Register B bits the guest may change: data mode only (no interrupts are
/// offered, and 12-hour mode is not).
const B_WRITABLE: u8 = B_BINARY;
/// Register D: valid RAM and time.
const D_VALID: u8 = 1 << 7;
/// Size of the register file.
const RAM_SIZE: usize = 128;

/// Where the device reads the time: seconds since the Unix epoch, UTC.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

/// The host's clock.
fn host_clock() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The date of `days` since 1970-01-01: (year, month 1-12, day 1-31), by
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // day is 1..=31 and month 1..=12 by construction.
    let byte = |v: i64| u8::try_from(v).unwrap_or(0);
    (year, byte(month), byte(day))
}

/// `v` (0-99) as packed BCD.
fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The CMOS RTC and its RAM.
pub struct Cmos {
    index: u8,
    ram: [u8; RAM_SIZE],
    clock: Clock,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// An RTC on the host's clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(host_clock))
    }

    /// An RTC on `clock` (tests).
    pub fn with_clock(clock: Clock) -> Self {
        let mut ram = [0u8; RAM_SIZE];
        ram[usize::from(reg::A)] = A_DEFAULT;
        ram[usize::from(reg::B)] = B_24_HOUR;
        ram[usize::from(reg::D)] = D_VALID;
        Self {
            index: 0,
            ram,
            clock,
        }
    }

    /// Register `index` now.
    fn register(&self, index: u8) -> u8 {
        if !is_time_register(index) {
            return match index {
                reg::C => 0,
                _ => self.ram[usize::from(index) % RAM_SIZE],
            };
        }
        let now = (self.clock)();
        let (days, secs) = (now.div_euclid(86_400), now.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        // Every value below is under 100 by construction.
        let byte = |v: i64| u8::try_from(v).unwrap_or(0);
        // Years outside 0..=9999 cannot be told in two BCD bytes: clamp.
        let year = year.clamp(0, 9999);
        let value = match index {
            reg::SECONDS => byte(secs % 60),
            reg::MINUTES => byte(secs / 60 % 60),
            reg::HOURS => byte(secs / 3600),
            // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
            reg::DAY_OF_WEEK => byte((days + 4).rem_euclid(7) + 1),
            reg::DAY_OF_MONTH => day,
            reg::MONTH => month,
            reg::YEAR => byte(year % 100),
            _ => byte(year / 100),
        };
        if self.ram[usize::from(reg::B)] & B_BINARY != 0 {
            value
        } else {
            bcd(value)
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            i if is_time_register(i) => {}
            reg::C | reg::D => {}
            reg::A => self.ram[usize::from(reg::A)] = value & 0x7f,
            reg::B => self.ram[usize::from(reg::B)] = B_24_HOUR | value & B_WRITABLE,
            _ => self.ram[usize::from(index) % RAM_SIZE] = value,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            1 => self.register(self.index),
            // The index port is write-only; reads float high.
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.index = value & 0x7f,
            1 => self.write_register(self.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Cmos {
        Cmos::with_clock(Box::new(move || secs))
    }

    fn read(c: &mut Cmos, index: u8) -> u8 {
        c.write(0x70, 0, &[index | 0x80]); // NMI mask bit set: ignored
        let mut b = [0u8];
        c.read(0x70, 1, &mut b);
        b[0]
    }

    #[test]
    fn dates_follow_the_calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        // 2000-02-29 (a leap day of a year divisible by 400) and 2100-03-01
        // (2100 is no leap year).
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
    }

    #[test]
    fn time_registers_give_the_clock_in_bcd() {
        // 2026-12-01 18:40:34 UTC, a Tuesday.
        let mut c = at(1_796_150_434);
        let regs: Vec<u8> = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32]
            .iter()
            .map(|&r| read(&mut c, r))
            .collect();
        assert_eq!(regs, [0x34, 0x40, 0x18, 0x03, 0x01, 0x12, 0x26, 0x20]);
        assert_eq!(read(&mut c, 0x0a) & 0x80, 0, "never update-in-progress");
        assert_eq!(read(&mut c, 0x0b), B_24_HOUR);
        assert_eq!(read(&mut c, 0x0d), D_VALID);
        assert_eq!(read(&mut c, 0x0c), 0);
    }

    #[test]
    fn binary_mode_and_guest_writes() {
        let mut c = at(1_796_150_434);
        c.write(0x70, 0, &[0x0b]);
        // Binary mode taken; 12-hour mode and interrupt enables are not.
        c.write(0x70, 1, &[0xff]);
        assert_eq!(read(&mut c, 0x0b), B_24_HOUR | B_BINARY);
        assert_eq!(read(&mut c, 0x00), 34);
        assert_eq!(read(&mut c, 0x04), 18);
        assert_eq!(read(&mut c, 0x32), 20);
        // Time writes are ignored; RAM keeps what the guest writes.
        c.write(0x70, 0, &[0x00]);
        c.write(0x70, 1, &[0x59]);
        assert_eq!(read(&mut c, 0x00), 34);
        c.write(0x70, 0, &[0x40]);
        c.write(0x70, 1, &[0xa5]);
        assert_eq!(read(&mut c, 0x40), 0xa5);
        // The index port reads high; empty and wide accesses do not panic.
        let mut b = [0u8; 4];
        c.read(0x70, 0, &mut b);
        assert_eq!(b, [0xff; 4]);
        c.read(0x70, 1, &mut []);
        c.write(0x70, 1, &[]);
        c.write(0x70, 5, &[1]);
    }

    #[test]
    fn any_clock_value_is_safe() {
        for secs in [i64::MIN, -1, 0, i64::MAX, 253_402_300_800] {
            let mut c = at(secs);
            for r in 0..128u8 {
                read(&mut c, r);
            }
        }
    }
}
