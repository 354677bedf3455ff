//! The host-kernel harness: builds (or takes from the cache) a Linux 6.12 with
//! IOMMUFD, VFIO cdev and intel-iommu, packs hk-guest into an initramfs, boots
//! it in QEMU with an emulated VT-d and the edu device, and checks the TAP
//! lines that come back over the serial console (see ../run.sh).
//!
//! Where a Debian package it needs is missing (.ci/setup installs them), the
//! test fails when CI=true and is skipped with a message otherwise.

use std::path::PathBuf;
use std::process::{Command, Output};

use integration_tests::tap;

/// run.sh's exit status when a Debian package is missing.
const EXIT_NO_PREREQUISITES: i32 = 3;

fn run_guest(mode: &str) -> Option<Output> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../run.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(mode)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    if out.status.code() == Some(EXIT_NO_PREREQUISITES) {
        let msg = format!(
            "the host-kernel harness cannot run here: a Debian package is missing (run \
             .ci/setup):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return None;
    }
    Some(out)
}

fn describe(out: &Output) -> String {
    format!(
        "run.sh exit status: {}\n--- serial console ---\n{}\n--- run.sh stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Boots the guest in `mode` and checks its TAP results.
fn check_suite(mode: &str) {
    let Some(out) = run_guest(mode) else { return };
    let console = String::from_utf8_lossy(&out.stdout);
    // Kept for the CI log, which shows the figures in it (.ci/test): cargo
    // shows a passing test's output only with --nocapture.
    let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("host-kernel-{mode}.log"));
    if let Err(e) = std::fs::write(&kept, console.as_bytes()) {
        println!("cannot keep the console in {}: {e}", kept.display());
    }
    let report = tap::parse(&console);
    let mut problems = Vec::new();
    if let Err(e) = report.expect_plan_ok() {
        problems.push(e.0);
    }
    if !console.contains("init: hk-guest exit status 0") {
        problems.push("hk-guest did not exit with status 0".into());
    }
    if !out.status.success() {
        problems.push("QEMU did not exit cleanly (guest power-off)".into());
    }
    assert!(
        problems.is_empty(),
        "{}\n{}",
        problems.join("\n"),
        describe(&out)
    );
    println!("{}", describe(&out));
}

/// VFIO cdev + IOMMUFD with the emulated VT-d and edu DMA.
#[test]
fn host_kernel_vfio_iommufd_suite() {
    check_suite("test");
}

/// Nested HWPT and invalidation through IOMMUFD's selftest mock (a boot
/// without VT-d: see `SELFTEST_TESTS` in suite.rs).
#[test]
fn host_kernel_iommufd_selftest_suite() {
    check_suite("selftest");
}

/// The benchmark: `cargo test -p hk-guest --test harness -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark, prints figures; run explicitly"]
fn host_kernel_benchmark() {
    let Some(out) = run_guest("bench") else {
        return;
    };
    let console = String::from_utf8_lossy(&out.stdout);
    for line in console.lines().filter(|l| l.starts_with("bench:")) {
        println!("{line}");
    }
    assert!(
        out.status.success() && console.contains("init: hk-guest exit status 0"),
        "{}",
        describe(&out)
    );
}
