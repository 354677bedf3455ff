//! TAP: written by the guest on the serial console, parsed by the host.

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

/// One test line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapResult {
    pub ok: bool,
    pub number: usize,
    pub name: String,
}

/// What a TAP stream said.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TapReport {
    pub plan: Option<usize>,
    pub results: Vec<TapResult>,
}

impl TapReport {
    /// Parses the TAP lines out of `text`, ignoring every other line (kernel
    /// messages, the init script's chatter).
    pub fn parse(text: &str) -> Self {
        let mut report = TapReport::default();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(n) = line.strip_prefix("1..") {
                if let Ok(n) = n.trim().parse() {
                    report.plan = Some(n);
                }
                continue;
            }
            let (ok, rest) = if let Some(rest) = line.strip_prefix("ok ") {
                (true, rest)
            } else if let Some(rest) = line.strip_prefix("not ok ") {
                (false, rest)
            } else {
                continue;
            };
            let (num, name) = rest.split_once(' ').unwrap_or((rest, ""));
            let Ok(number) = num.parse() else { continue };
            let name = name.trim_start_matches("- ").to_string();
            report.results.push(TapResult { ok, number, name });
        }
        report
    }

    /// Ok when there is a plan, every planned test reported in order, and all passed.
    pub fn check(&self) -> Result<(), String> {
        let plan = self.plan.ok_or("no TAP plan (1..N) in the output")?;
        let mut problems = Vec::new();
        for (i, r) in self.results.iter().enumerate() {
            if r.number != i + 1 {
                problems.push(format!("test {} reported as number {}", i + 1, r.number));
            }
            if !r.ok {
                problems.push(format!("not ok {} - {}", r.number, r.name));
            }
        }
        if self.results.len() != plan {
            problems.push(format!(
                "{} of {plan} planned tests reported",
                self.results.len()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_results_among_kernel_noise() {
        let text = "[    0.5] DMAR: fault\r\nTAP version 13\r\n1..3\r\nok 1 - first\r\n# diag\r\n\
                    not ok 2 - second: it broke\r\nok 3 - third\r\nok x - junk\r\n";
        let r = TapReport::parse(text);
        assert_eq!(r.plan, Some(3));
        assert_eq!(r.results.len(), 3);
        assert_eq!(
            r.results[1],
            TapResult {
                ok: false,
                number: 2,
                name: "second: it broke".into()
            }
        );
        let err = r.check().expect_err("a test failed");
        assert!(err.contains("not ok 2 - second: it broke"), "{err}");
    }

    #[test]
    fn all_ok_passes() {
        let r = TapReport::parse("1..2\nok 1 - a\nok 2 - b\n");
        assert_eq!(r.check(), Ok(()));
    }

    #[test]
    fn missing_plan_or_results_fail() {
        assert!(TapReport::parse("ok 1 - a\n").check().is_err());
        let err = TapReport::parse("1..3\nok 1 - a\nok 2 - b\n")
            .check()
            .expect_err("one missing");
        assert!(err.contains("2 of 3"), "{err}");
        let err = TapReport::parse("1..2\nok 1 - a\nok 3 - b\n")
            .check()
            .expect_err("numbering");
        assert!(err.contains("number 3"), "{err}");
        assert!(TapReport::parse("").check().is_err());
    }
}
