//! Guest-driven pvIOMMU benchmark (issue 4), not a timed test: boots the
//! test kernel in `pvmm` (the real pvIOMMU path: MSR filter, hypercall page,
//! port 0xE4 on the vCPU thread) with `tk.tests=hvbench` and prints the
//! ratios the kernel measured in one run with one clock (the TSC): null
//! hypercall against a bare port-I/O exit (target <= 1.2x), a 507-page MAP
//! against a null hypercall (target <= 2x), pages mapped per second (TSC
//! frequency from Hyper-V's TSC_FREQUENCY MSR).
//!
//! Run: `cargo bench -p integration-tests --bench pviommu_guest`.

use integration_tests::{artifacts, run, tap};
use std::process::Command;
use std::time::Duration;

fn main() {
    if !artifacts::require_kvm() {
        return;
    }
    let bin = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    let mut c = Command::new(bin);
    c.args(["--memory", "256M", "--cmdline", "tk.tests=hvbench"]);
    let out = run::run(c, Duration::from_secs(300)).unwrap_or_else(|e| panic!("pvmm: {e}"));
    if !out.success() {
        panic!("pvmm failed:\n{}", out.describe());
    }
    let r = tap::parse(&out.stdout);
    if let Err(p) = r.expect_all_ok(&["hvbench"]) {
        panic!("{p}\n{}", out.describe());
    }
    for d in r.diagnostics.iter().filter(|d| d.starts_with("bench: ")) {
        println!("{}", &d["bench: ".len()..]);
    }
}
