//! The test kernel under QEMU (`-M microvm`, and `-M q35` for PCI and the
//! PM1a poweroff path): proof that it is a well-formed PVH guest,
//! independent of pvmm. Skipped, with the reason printed, when QEMU or
//! /dev/kvm is missing, except under CI=true, where that fails.

use integration_tests::{artifacts, run, tap};
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

/// QEMU and KVM, or a skip message (a failure under CI=true).
fn qemu() -> Option<std::path::PathBuf> {
    let q = artifacts::require_qemu()?;
    artifacts::require_kvm().then_some(q)
}

fn boot(machine: &str, mem: &str, cpus: u32, cmdline: &str) -> Option<(run::Output, tap::Report)> {
    let q = qemu()?;
    let kernel = artifacts::test_kernel().unwrap_or_else(|e| panic!("{e}"));
    let mut c = Command::new(q);
    c.args(["-accel", "kvm", "-M", machine, "-m", mem, "-smp"])
        .arg(cpus.to_string())
        .arg("-kernel")
        .arg(&kernel)
        .args([
            "-append",
            cmdline,
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ]);
    let _vm = run::vm_lock();
    let out = run::run(c, TIMEOUT).expect("qemu starts");
    let report = tap::parse(&out.stdout);
    Some((out, report))
}

fn check(out: &run::Output, report: &tap::Report, names: &[&str]) {
    assert!(
        out.success(),
        "QEMU did not exit cleanly:\n{}",
        out.describe()
    );
    if let Err(p) = report.expect_all_ok(names) {
        panic!("{p}\n{}", out.describe());
    }
}

/// microvm has no MCFG (its GPEX host bridge is described in the DSDT
/// only), so the pci test runs on q35 below.
#[test]
fn microvm_two_cpus() {
    let token = artifacts::random_token();
    let cmdline = format!("tk.tests=mem,cmdline,smp tk.mem=128M tk.cpus=2 tk.echo={token}");
    let Some((out, report)) = boot("microvm,acpi=on,rtc=off", "128M", 2, &cmdline) else {
        return;
    };
    check(&out, &report, &["mem", "cmdline", "smp"]);
    assert_eq!(report.diagnostic("echo: "), Some(token.as_str()));
    assert_eq!(report.diagnostic("cmdline: "), Some(cmdline.as_str()));
    assert!(
        report
            .diagnostics
            .iter()
            .any(|d| d.contains("booted through PVH")),
        "{}",
        out.describe()
    );
    // QEMU's generic event device takes SLP_TYP 5 through the FADT's sleep
    // control register: the kernel's poweroff path for pvmm too.
    assert!(
        report
            .diagnostics
            .iter()
            .any(|d| d.starts_with("poweroff: FADT sleep control register")),
        "{}",
        out.describe()
    );
}

/// Memory above 4 GiB: the map crosses the 32-bit hole and the kernel maps
/// and touches RAM up there.
#[test]
fn microvm_memory_above_4g() {
    let cmdline = "tk.tests=mem tk.mem=4608M";
    let Some((out, report)) = boot("microvm,acpi=on,rtc=off", "4608M", 1, cmdline) else {
        return;
    };
    check(&out, &report, &["mem"]);
    assert!(
        report
            .diagnostics
            .iter()
            .any(|d| d.starts_with("memory map") && d.contains("0x000100000000-")),
        "no RAM entry at 4 GiB:\n{}",
        out.describe()
    );
}

/// q35 has an MCFG, mechanism #1 and a non-reduced FADT (PM1a poweroff with
/// SLP_TYP from \_S5). SeaBIOS reserves RAM below 4 GiB, so no mem test.
#[test]
fn q35_pci_and_pm1a_poweroff() {
    let cmdline = "tk.tests=pci,smp tk.cf8=1 tk.cpus=2";
    let Some((out, report)) = boot("q35", "256M", 2, cmdline) else {
        return;
    };
    check(&out, &report, &["pci", "smp"]);
    assert!(
        report
            .diagnostics
            .iter()
            .any(|d| d.starts_with("ecam 00:00.0 [8086:29c0] class 06.00.00")),
        "{}",
        out.describe()
    );
    assert!(
        report
            .diagnostics
            .iter()
            .any(|d| d.starts_with("poweroff: FADT PM1a control")),
        "{}",
        out.describe()
    );
}

/// Test selection and an unknown test name: the plan counts it, it fails,
/// and the kernel still powers off.
#[test]
fn microvm_selection_and_unknown_test() {
    let Some((out, report)) = boot(
        "microvm,acpi=on,rtc=off",
        "64M",
        1,
        "tk.tests=cmdline,nosuch",
    ) else {
        return;
    };
    assert!(out.success(), "{}", out.describe());
    assert_eq!(report.plan, Some(2));
    assert_eq!(report.tests.len(), 2);
    assert!(report.tests[0].ok);
    assert!(!report.tests[1].ok);
    assert_eq!(report.tests[1].name, "nosuch");
    assert_eq!(report.summary, Some((1, 1, 0)));
    assert!(report.expect_all_ok(&["cmdline", "nosuch"]).is_err());
}

/// A wrong expectation is caught: the kernel fails `mem` when `tk.mem`
/// disagrees with the map, and `smp` when `tk.cpus` does.
#[test]
fn microvm_wrong_expectations_fail() {
    let Some((out, report)) = boot(
        "microvm,acpi=on,rtc=off",
        "64M",
        1,
        "tk.tests=mem,smp tk.mem=65M tk.cpus=2",
    ) else {
        return;
    };
    assert!(out.success(), "{}", out.describe());
    assert_eq!(report.summary, Some((0, 2, 0)), "{}", out.describe());
    assert!(report.tests[0]
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("tk.mem is 68157440"));
    assert!(report.tests[1]
        .reason
        .as_deref()
        .unwrap_or("")
        .contains("tk.cpus is 2"));
}
