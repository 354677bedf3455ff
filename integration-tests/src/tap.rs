//! A parser for TAP version 13 as the test kernel and hk-guest (the
//! host-kernel harness's guest program) print it.
//!
//! Lines that are not TAP (the VMM's own output, kernel messages) are
//! ignored; `\r` is stripped (the kernel writes CR LF).

use std::fmt;

/// One `ok` / `not ok` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestLine {
    pub number: u32,
    pub ok: bool,
    pub name: String,
    /// For `not ok N - name: reason`, the reason.
    pub reason: Option<String>,
    /// For `ok N - name # SKIP reason`, the reason.
    pub skip: Option<String>,
}

/// A whole TAP stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub version_line: bool,
    /// `1..N`.
    pub plan: Option<u32>,
    pub tests: Vec<TestLine>,
    /// `# ...` lines, without the `# `.
    pub diagnostics: Vec<String>,
    /// `Bail out! reason`.
    pub bail_out: Option<String>,
    /// The plain `N passed, M failed[, K skipped]` line (K 0 when absent).
    pub summary: Option<(u32, u32, u32)>,
}

/// Why a report is not a clean pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem(pub String);

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse_test_line(line: &str) -> Option<TestLine> {
    let (ok, rest) = if let Some(r) = line.strip_prefix("ok ") {
        (true, r)
    } else if let Some(r) = line.strip_prefix("not ok ") {
        (false, r)
    } else {
        return None;
    };
    let (num, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let number = num.parse().ok()?;
    let desc = rest.strip_prefix("- ").unwrap_or(rest);
    let (desc, skip) = match desc.split_once(" # SKIP") {
        Some((d, r)) => (d, Some(r.trim().to_string())),
        None => (desc, None),
    };
    let (name, reason) = match (ok, desc.split_once(": ")) {
        (false, Some((n, r))) => (n.to_string(), Some(r.to_string())),
        _ => (desc.to_string(), None),
    };
    Some(TestLine {
        number,
        ok,
        name,
        reason,
        skip,
    })
}

fn parse_summary(line: &str) -> Option<(u32, u32, u32)> {
    let (p, rest) = line.split_once(" passed, ")?;
    let (f, k) = match rest.split_once(" failed, ") {
        Some((f, k)) => (f, k.strip_suffix(" skipped")?),
        None => (rest.strip_suffix(" failed")?, "0"),
    };
    Some((p.parse().ok()?, f.parse().ok()?, k.parse().ok()?))
}

/// Parses TAP out of mixed output.
pub fn parse(output: &str) -> Report {
    let mut r = Report::default();
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        if line == "TAP version 13" {
            r.version_line = true;
        } else if let Some(n) = line.strip_prefix("1..") {
            r.plan = n.parse().ok();
        } else if let Some(t) = parse_test_line(line) {
            r.tests.push(t);
        } else if let Some(d) = line.strip_prefix("# ") {
            r.diagnostics.push(d.to_string());
        } else if let Some(b) = line.strip_prefix("Bail out!") {
            r.bail_out = Some(b.trim().to_string());
        } else if let Some(s) = parse_summary(line) {
            r.summary = Some(s);
        }
    }
    r
}

impl Report {
    /// The first diagnostic starting with `prefix`, without it.
    pub fn diagnostic(&self, prefix: &str) -> Option<&str> {
        self.diagnostics.iter().find_map(|d| d.strip_prefix(prefix))
    }

    /// Checks a clean run of exactly `names`, in order: version line, plan,
    /// numbering, every test ok and none skipped, the summary line, no
    /// bail-out.
    pub fn expect_all_ok(&self, names: &[&str]) -> Result<(), Problem> {
        self.expect_ok_or_skipped(names, &[])
    }

    /// Checks a run against its own plan, for a stream with neither known
    /// names nor a summary line (hk-guest's): a plan, every planned test
    /// reported, numbered in order, none failed, no bail-out. Lists every
    /// problem, one per line.
    pub fn expect_plan_ok(&self) -> Result<(), Problem> {
        let plan = self
            .plan
            .ok_or_else(|| Problem("no TAP plan (1..N) in the output".into()))?;
        let mut problems = Vec::new();
        if let Some(b) = &self.bail_out {
            problems.push(format!("bailed out: {b}"));
        }
        for (i, t) in self.tests.iter().enumerate() {
            if usize::try_from(t.number).ok() != Some(i + 1) {
                problems.push(format!("test {} reported as number {}", i + 1, t.number));
            }
            if !t.ok {
                let reason = t.reason.as_deref().map(|r| format!(": {r}"));
                problems.push(format!(
                    "not ok {} - {}{}",
                    t.number,
                    t.name,
                    reason.unwrap_or_default()
                ));
            }
        }
        if u32::try_from(self.tests.len()).ok() != Some(plan) {
            problems.push(format!(
                "{} of {plan} planned tests reported",
                self.tests.len()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Problem(problems.join("\n")))
        }
    }

    /// `expect_all_ok`, but the tests in `may_skip` may be skipped.
    pub fn expect_ok_or_skipped(&self, names: &[&str], may_skip: &[&str]) -> Result<(), Problem> {
        if let Some(b) = &self.bail_out {
            return Err(Problem(format!("the kernel bailed out: {b}")));
        }
        if !self.version_line {
            return Err(Problem("no `TAP version 13` line".into()));
        }
        let n = u32::try_from(names.len()).unwrap_or(u32::MAX);
        if self.plan != Some(n) {
            return Err(Problem(format!("plan is {:?}, expected 1..{n}", self.plan)));
        }
        let got: Vec<&str> = self.tests.iter().map(|t| t.name.as_str()).collect();
        if got != names {
            return Err(Problem(format!("tests {got:?}, expected {names:?}")));
        }
        for (i, t) in self.tests.iter().enumerate() {
            if usize::try_from(t.number).ok() != Some(i + 1) {
                return Err(Problem(format!("test {} is numbered {}", i + 1, t.number)));
            }
            if !t.ok {
                return Err(Problem(format!(
                    "not ok {} - {}: {}",
                    t.number,
                    t.name,
                    t.reason.as_deref().unwrap_or("")
                )));
            }
            if let Some(why) = &t.skip {
                if !may_skip.contains(&t.name.as_str()) {
                    return Err(Problem(format!(
                        "test {} ({}) was skipped: {why}",
                        t.number, t.name
                    )));
                }
            }
        }
        let skipped = u32::try_from(self.tests.iter().filter(|t| t.skip.is_some()).count())
            .unwrap_or(u32::MAX);
        if self.summary != Some((n - skipped, 0, skipped)) {
            return Err(Problem(format!(
                "summary line is {:?}, expected {} passed, 0 failed, {skipped} skipped",
                self.summary,
                n - skipped
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = "pvmm: starting\r\n# booted\r\nTAP version 13\r\n1..3\r\n\
        ok 1 - mem\r\n# cmdline: a b\r\nnot ok 2 - cmdline: tk.echo is empty\r\nok 3 - smp\r\n\
        # tests 2 passed, 1 failed\r\n2 passed, 1 failed\r\n";

    #[test]
    fn parses_the_kernel_output() {
        let r = parse(SAMPLE);
        assert!(r.version_line);
        assert_eq!(r.plan, Some(3));
        assert_eq!(r.tests.len(), 3);
        assert_eq!(
            r.tests[1],
            TestLine {
                number: 2,
                ok: false,
                name: "cmdline".into(),
                reason: Some("tk.echo is empty".into()),
                skip: None,
            }
        );
        assert_eq!(r.tests[2].reason, None);
        assert_eq!(r.summary, Some((2, 1, 0)));
        assert_eq!(r.diagnostic("cmdline: "), Some("a b"));
        assert_eq!(r.bail_out, None);
    }

    #[test]
    fn failures_are_reported() {
        let r = parse(SAMPLE);
        let e = r.expect_all_ok(&["mem", "cmdline", "smp"]).unwrap_err();
        assert!(e.0.contains("not ok 2 - cmdline: tk.echo is empty"), "{e}");
        assert!(r.expect_all_ok(&["mem", "cmdline"]).is_err());
        let bail = parse("TAP version 13\n1..1\nBail out! CPU exception 14\n");
        assert!(bail
            .expect_all_ok(&["mem"])
            .unwrap_err()
            .0
            .contains("exception 14"));
    }

    #[test]
    fn a_clean_run_passes_and_a_truncated_one_does_not() {
        let clean = "TAP version 13\n1..2\nok 1 - mem\nok 2 - pci\n2 passed, 0 failed\n";
        assert_eq!(parse(clean).expect_all_ok(&["mem", "pci"]), Ok(()));
        let truncated = "TAP version 13\n1..2\nok 1 - mem\n";
        assert!(parse(truncated).expect_all_ok(&["mem", "pci"]).is_err());
        let no_summary = "TAP version 13\n1..2\nok 1 - mem\nok 2 - pci\n";
        assert!(parse(no_summary).expect_all_ok(&["mem", "pci"]).is_err());
        let misnumbered = "TAP version 13\n1..2\nok 1 - mem\nok 3 - pci\n2 passed, 0 failed\n";
        assert!(parse(misnumbered).expect_all_ok(&["mem", "pci"]).is_err());
    }

    /// hk-guest's stream: results among kernel noise, checked against the
    /// plan alone.
    #[test]
    fn plan_only_checks() {
        let text = "[    0.5] DMAR: fault\r\nTAP version 13\r\n1..3\r\nok 1 - first\r\n# diag\r\n\
                    not ok 2 - second: it broke\r\nok 3 - third\r\nok x - junk\r\n";
        let r = parse(text);
        assert_eq!(r.plan, Some(3));
        assert_eq!(r.tests.len(), 3);
        let err = r.expect_plan_ok().expect_err("a test failed").0;
        assert!(err.contains("not ok 2 - second: it broke"), "{err}");
        assert_eq!(parse("1..2\nok 1 - a\nok 2 - b\n").expect_plan_ok(), Ok(()));
        assert!(parse("ok 1 - a\n").expect_plan_ok().is_err());
        let err = parse("1..3\nok 1 - a\nok 2 - b\n")
            .expect_plan_ok()
            .expect_err("one missing")
            .0;
        assert!(err.contains("2 of 3"), "{err}");
        let err = parse("1..2\nok 1 - a\nok 3 - b\n")
            .expect_plan_ok()
            .expect_err("numbering")
            .0;
        assert!(err.contains("number 3"), "{err}");
        assert!(parse("").expect_plan_ok().is_err());
    }

    #[test]
    fn skips() {
        let out = "TAP version 13\n1..2\nok 1 - mem\nok 2 - pviommu # SKIP no Hyper-V leaves\n\
            1 passed, 0 failed, 1 skipped\n";
        let r = parse(out);
        assert_eq!(r.tests[1].name, "pviommu");
        assert_eq!(r.tests[1].skip.as_deref(), Some("no Hyper-V leaves"));
        assert_eq!(r.summary, Some((1, 0, 1)));
        let e = r.expect_all_ok(&["mem", "pviommu"]).unwrap_err();
        assert!(e.0.contains("was skipped: no Hyper-V leaves"), "{e}");
        assert_eq!(
            r.expect_ok_or_skipped(&["mem", "pviommu"], &["pviommu"]),
            Ok(())
        );
        // The summary must count the skip.
        let wrong = out.replace("1 passed, 0 failed, 1 skipped", "2 passed, 0 failed");
        assert!(parse(&wrong)
            .expect_ok_or_skipped(&["mem", "pviommu"], &["pviommu"])
            .is_err());
    }
}
