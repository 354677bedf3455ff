//! TAP, written by the guest on the serial console. The host parses it with
//! `integration_tests::tap` (tests/harness.rs).

use std::fmt::Display;
use std::io::Write;

/// Writes TAP to stdout: a plan, then one line per test.
pub struct TapWriter {
    next: usize,
    failed: usize,
}

impl TapWriter {
    /// Prints the version and the plan for `count` tests.
    pub fn new(count: usize) -> Self {
        println!("TAP version 13");
        println!("1..{count}");
        Self { next: 1, failed: 0 }
    }

    /// Prints the result of the next test.
    pub fn result<E: Display>(&mut self, name: &str, result: Result<(), E>) {
        match result {
            Ok(()) => println!("ok {} - {name}", self.next),
            Err(e) => {
                self.failed += 1;
                // One line: the reason must not break the TAP stream.
                let reason = e.to_string().replace(['\n', '\r'], " ");
                println!("not ok {} - {name}: {reason}", self.next);
            }
        }
        self.next += 1;
        let _ = std::io::stdout().flush();
    }

    /// Tests that failed so far.
    pub fn failed(&self) -> usize {
        self.failed
    }
}

/// Prints a TAP diagnostic line.
pub fn diag(msg: impl Display) {
    for line in msg.to_string().lines() {
        println!("# {line}");
    }
}
