//! Bounded logging for events the guest can cause at will.

use std::sync::atomic::{AtomicU32, Ordering};

/// How many times each call site of [`guest_warn!`](crate::guest_warn) logs
/// before going quiet.
pub const GUEST_WARN_LIMIT: u32 = 10;

/// A per-call-site counter for [`guest_warn!`](crate::guest_warn).
#[derive(Debug, Default)]
pub struct LogLimiter(AtomicU32);

impl LogLimiter {
    /// A fresh limiter.
    pub const fn new() -> Self {
        Self(AtomicU32::new(0))
    }

    /// Whether this occurrence may be logged; the last one allowed says so.
    pub fn allow(&self) -> Option<bool> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        match n.cmp(&(GUEST_WARN_LIMIT - 1)) {
            std::cmp::Ordering::Less => Some(false),
            std::cmp::Ordering::Equal => Some(true),
            std::cmp::Ordering::Greater => {
                // Keep the counter from wrapping around to "allowed" again.
                self.0.store(GUEST_WARN_LIMIT, Ordering::Relaxed);
                None
            }
        }
    }
}

/// `log::warn!` for guest-caused events, at most
/// [`GUEST_WARN_LIMIT`](crate::ratelimit::GUEST_WARN_LIMIT) times per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new();
        match LIMITER.allow() {
            Some(false) => log::warn!($($arg)+),
            Some(true) => {
                log::warn!($($arg)+);
                log::warn!("(further messages like the previous one are suppressed)");
            }
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_up_to_the_limit_then_stays_quiet() {
        let l = LogLimiter::new();
        for _ in 0..GUEST_WARN_LIMIT - 1 {
            assert_eq!(l.allow(), Some(false));
        }
        assert_eq!(l.allow(), Some(true));
        for _ in 0..1000 {
            assert_eq!(l.allow(), None);
        }
    }
}
