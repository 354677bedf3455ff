//! TAP (Test Anything Protocol, version 13) on the console.

use crate::println;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

/// A short message (failure reason), formatted without allocation.
pub struct Msg {
    buf: [u8; 200],
    len: usize,
}

impl Msg {
    pub fn new(args: fmt::Arguments) -> Msg {
        let mut m = Msg {
            buf: [0; 200],
            len: 0,
        };
        let _ = m.write_fmt(args);
        m
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            // One line: newlines would break TAP; truncate at the buffer end.
            let c = if c == '\n' || c == '\r' { ' ' } else { c };
            let mut tmp = [0u8; 4];
            let enc = c.encode_utf8(&mut tmp).as_bytes();
            if self.len + enc.len() > self.buf.len() {
                return Ok(());
            }
            self.buf[self.len..self.len + enc.len()].copy_from_slice(enc);
            self.len += enc.len();
        }
        Ok(())
    }
}

/// Returns `Err(Msg)` from the enclosing test with a formatted reason.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::tap::Msg::new(format_args!($($arg)*)))
    };
}

/// `tk.quiet=1`: no diagnostic lines, only test results (every byte on
/// the serial port is a VM exit, and the formatting runs in emulated ring
/// 0 on the development machines: the boot benchmark uses it).
pub static QUIET: AtomicBool = AtomicBool::new(false);

/// Whether diagnostics are printed.
pub fn verbose() -> bool {
    !QUIET.load(Ordering::Relaxed)
}

/// Prints a TAP diagnostic line (`# ...`), unless `tk.quiet=1`.
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => {
        if $crate::tap::verbose() {
            $crate::println!("# {}", format_args!($($arg)*))
        }
    };
}

pub struct Tap {
    next: u32,
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
}

/// A test's verdict: Ok(None) passed, Ok(Some(reason)) skipped, Err failed.
pub type Verdict = Result<Option<&'static str>, Msg>;

impl Tap {
    /// Prints the version line (first thing on the console), on a line of
    /// its own even if firmware left a partial line (SeaBIOS does).
    pub fn version() {
        println!();
        println!("TAP version 13");
    }

    /// Prints the plan.
    pub fn start(planned: u32) -> Tap {
        println!("1..{}", planned);
        Tap {
            next: 1,
            passed: 0,
            failed: 0,
            skipped: 0,
        }
    }

    /// Reports one test's result.
    pub fn report(&mut self, name: &str, result: Verdict) {
        match result {
            Ok(None) => {
                println!("ok {} - {}", self.next, name);
                self.passed += 1;
            }
            Ok(Some(reason)) => {
                println!("ok {} - {} # SKIP {}", self.next, name, reason);
                self.skipped += 1;
            }
            Err(m) => {
                println!("not ok {} - {}: {}", self.next, name, m.as_str());
                self.failed += 1;
            }
        }
        self.next += 1;
    }

    /// Prints the summary lines.
    pub fn finish(&self) {
        crate::diag!(
            "tests {} passed, {} failed, {} skipped",
            self.passed,
            self.failed,
            self.skipped
        );
        println!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        );
    }
}
