//! The one rate limiter for log lines a guest can cause at will (bad
//! hypercalls, faults, bad device accesses, failing backends under a
//! guest's load), shared by every crate of the VMM through
//! [`guest_log!`](crate::guest_log).
//!
//! A token bucket (GCRA, one atomic): at most [`BURST`] lines at once and
//! [`PER_SECOND`] a second after that, for the whole process, whatever the
//! call site. What it drops is counted ([`counts`], in the pvIOMMU's
//! statistics), and the first line after a drop says how many went.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines a second once the burst is spent.
pub const PER_SECOND: u64 = 10;
/// Lines at once.
pub const BURST: u64 = 50;

const INTERVAL_NS: u64 = 1_000_000_000 / PER_SECOND;

/// A rate limiter; [`global`] is the process's.
#[derive(Debug)]
pub struct Limiter {
    start: Instant,
    /// Theoretical arrival time of the next line, in ns since `start`.
    tat: AtomicU64,
    emitted: AtomicU64,
    dropped: AtomicU64,
    /// Dropped since the last line that went out.
    pending_drops: AtomicU64,
}

/// Lines logged and dropped so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Lines that went out.
    pub emitted: u64,
    /// Lines dropped by the limiter.
    pub dropped: u64,
}

impl Limiter {
    /// A full bucket.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            tat: AtomicU64::new(0),
            emitted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            pending_drops: AtomicU64::new(0),
        }
    }

    /// Whether a line may go out at `now_ns` (ns since the limiter's
    /// start): `Some(d)` with `d` lines dropped since the last one that
    /// went out, `None` when this one must be dropped.
    pub fn allow_at(&self, now_ns: u64) -> Option<u64> {
        let tolerance = (BURST - 1) * INTERVAL_NS;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now_ns);
            if base - now_ns > tolerance {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.pending_drops.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.tat.compare_exchange_weak(
                tat,
                base + INTERVAL_NS,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(t) => tat = t,
            }
        }
        self.emitted.fetch_add(1, Ordering::Relaxed);
        Some(self.pending_drops.swap(0, Ordering::Relaxed))
    }

    /// [`Limiter::allow_at`] now.
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.allow_at(now)
    }

    /// Lines logged and dropped so far.
    pub fn counts(&self) -> Counts {
        Counts {
            emitted: self.emitted.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's limiter.
pub fn global() -> &'static Limiter {
    static LIMITER: OnceLock<Limiter> = OnceLock::new();
    LIMITER.get_or_init(Limiter::new)
}

/// Lines logged and dropped so far by [`guest_log!`](crate::guest_log).
pub fn counts() -> Counts {
    global().counts()
}

/// `log::log!` for a line the guest can cause, through the process's one
/// limiter: `guest_log!(Warn, "...", args)`.
#[macro_export]
macro_rules! guest_log {
    ($level:ident, $($arg:tt)+) => {{
        if let Some(dropped) = $crate::guest_log::global().allow() {
            if dropped > 0 {
                log::warn!("({dropped} guest-caused log lines suppressed)");
            }
            log::log!(log::Level::$level, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_every_drop_counted() {
        let l = Limiter::new();
        // A guest that causes a million lines at one instant gets the burst.
        let out = (0..1_000_000).filter(|_| l.allow_at(0).is_some()).count();
        assert_eq!(out as u64, BURST);
        assert_eq!(
            l.counts(),
            Counts {
                emitted: BURST,
                dropped: 1_000_000 - BURST
            }
        );
        // One second later: PER_SECOND more, the first saying what went.
        assert_eq!(l.allow_at(1_000_000_000), Some(1_000_000 - BURST));
        let more = (1..100)
            .filter(|_| l.allow_at(1_000_000_000).is_some())
            .count();
        assert_eq!(more as u64 + 1, PER_SECOND);
        // Over a long time, never more than the rate (plus the burst).
        let l = Limiter::new();
        let mut out = 0u64;
        for ms in 0..60_000u64 {
            for _ in 0..100 {
                if l.allow_at(ms * 1_000_000).is_some() {
                    out += 1;
                }
            }
        }
        assert!(out <= BURST + 60 * PER_SECOND, "{out} lines in a minute");
        assert_eq!(l.counts().emitted + l.counts().dropped, 6_000_000);
    }
}
