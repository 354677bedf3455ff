//! The test kernel under pvmm: memory sizes (including above the 32-bit
//! hole), vCPU counts and command lines; every test must pass, the counts
//! must match, and pvmm must exit 0 on the guest's poweroff.
//!
//! pvmm is built by `artifacts::pvmm()` (`cargo build -p vmm --bin pvmm`
//! into this test's target directory and profile) unless `PVMM_BIN` names
//! one; the kernel by `artifacts::test_kernel()` unless `TEST_KERNEL` does.

use integration_tests::{artifacts, run, tap};
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);
const BASIC: [&str; 4] = ["mem", "cmdline", "smp", "pci"];
/// Every test of the kernel, in its default order.
const ALL: [&str; 8] = [
    "mem", "cmdline", "smp", "pci", "irq", "pviommu", "dma", "demo",
];

fn pvmm() -> Command {
    let bin = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    Command::new(bin)
}

/// Boots the test kernel (`None`: the embedded one) and parses its TAP.
fn boot(kernel: Option<&str>, args: &[&str]) -> (run::Output, tap::Report) {
    let mut c = pvmm();
    if let Some(k) = kernel {
        c.args(["--kernel", k]);
    }
    c.args(args);
    let _vm = run::vm_lock();
    let out = run::run(c, TIMEOUT).expect("pvmm starts");
    let report = tap::parse(&out.stdout);
    (out, report)
}

fn kernel() -> String {
    let k = artifacts::test_kernel().unwrap_or_else(|e| panic!("{e}"));
    k.to_string_lossy().into_owned()
}

/// Boots with `--memory mem --cpus cpus` and a command line that states
/// both, runs `tests` and checks that each passes.
fn boot_and_check(mem: &str, cpus: u32, tests: &[&str]) -> tap::Report {
    boot_and_check_with(&[], mem, cpus, tests)
}

/// `boot_and_check` with extra pvmm arguments.
fn boot_and_check_with(extra: &[&str], mem: &str, cpus: u32, tests: &[&str]) -> tap::Report {
    let token = artifacts::random_token();
    let cmdline = format!(
        "tk.tests={} tk.mem={mem} tk.cpus={cpus} tk.cf8=1 tk.echo={token}",
        tests.join(",")
    );
    let k = kernel();
    let cpus_s = cpus.to_string();
    let mut args = vec!["--memory", mem, "--cpus", &cpus_s, "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    let (out, report) = boot(Some(&k), &args);
    assert!(out.success(), "pvmm did not exit 0:\n{}", out.describe());
    if let Err(p) = report.expect_all_ok(tests) {
        panic!("{p}\n{}", out.describe());
    }
    if tests.contains(&"cmdline") {
        assert_eq!(
            report.diagnostic("cmdline: "),
            Some(cmdline.as_str()),
            "{}",
            out.describe()
        );
        assert_eq!(report.diagnostic("echo: "), Some(token.as_str()));
    }
    if tests.contains(&"smp") {
        let up = format!("{cpus} of {cpus} CPUs up");
        assert!(
            report.diagnostics.contains(&up),
            "no `# {up}`:\n{}",
            out.describe()
        );
    }
    report
}

fn booted_through(r: &tap::Report, protocol: &str) -> bool {
    r.diagnostics
        .iter()
        .any(|d| d.starts_with("pvmm test kernel: booted through") && d.contains(protocol))
}

#[test]
fn one_cpu_128m() {
    let r = boot_and_check("128M", 1, &BASIC);
    assert!(booted_through(&r, "PVH"), "{:#?}", r.diagnostics);
    // pvmm's hardware-reduced FADT: sleep control register, SLP_TYP 5.
    assert!(
        r.diagnostics.iter().any(
            |d| d.starts_with("poweroff: FADT sleep control register") && d.contains("<- 0x34")
        ),
        "{:#?}",
        r.diagnostics
    );
}

/// `tk.quiet=1` (the boot benchmark's mode): results and the summary, no
/// diagnostics, and still a poweroff.
#[test]
fn quiet_mode_prints_results_only() {
    let k = kernel();
    let cmdline = "tk.tests=mem,cmdline,smp tk.mem=128M tk.cpus=2 tk.quiet=1";
    let (out, r) = boot(
        Some(&k),
        &["--memory", "128M", "--cpus", "2", "--cmdline", cmdline],
    );
    assert!(out.success(), "{}", out.describe());
    if let Err(p) = r.expect_all_ok(&["mem", "cmdline", "smp"]) {
        panic!("{p}\n{}", out.describe());
    }
    assert!(r.diagnostics.is_empty(), "{:#?}", r.diagnostics);
    assert_eq!(r.summary, Some((3, 0, 0)));
}

/// The Linux 64-bit boot protocol (boot_params, pvmm's own page tables)
/// with every test, two vCPUs and RAM above 4 GiB.
#[test]
fn linux64_protocol() {
    let r = boot_and_check_with(&["--linux64"], "4608M", 2, &BASIC);
    assert!(booted_through(&r, "Linux 64-bit"), "{:#?}", r.diagnostics);
}

#[test]
fn two_cpus_512m() {
    boot_and_check("512M", 2, &BASIC);
}

#[test]
fn four_cpus() {
    boot_and_check("256M", 4, &["smp"]);
}

/// More than 3 GiB: RAM is split around the 32-bit MMIO hole, and the
/// kernel maps and touches RAM above 4 GiB.
#[test]
fn memory_above_4g() {
    let r = boot_and_check("4608M", 1, &["mem"]);
    assert!(
        r.diagnostics
            .iter()
            .any(|d| d.starts_with("memory map") && d.contains("0x000100000000-0x000160000000 RAM")),
        "no RAM entry 4 GiB..5.5 GiB: {:#?}",
        r.diagnostics
    );
}

/// A long command line arrives whole.
#[test]
fn long_cmdline() {
    let pad = "x".repeat(1500);
    let cmdline = format!("tk.tests=cmdline tk.pad={pad} tk.echo=end");
    let k = kernel();
    let (out, report) = boot(Some(&k), &["--cmdline", &cmdline]);
    assert!(out.success(), "{}", out.describe());
    report
        .expect_all_ok(&["cmdline"])
        .unwrap_or_else(|p| panic!("{p}\n{}", out.describe()));
    assert_eq!(report.diagnostic("cmdline: "), Some(cmdline.as_str()));
}

/// With no --kernel, pvmm boots the kernel it embedded at build time, and
/// every default test passes (with the dma-test device pvmm adds when it
/// has no arguments, the pvIOMMU suites run).
#[test]
fn embedded_kernel() {
    let (out, report) = boot(None, &[]);
    assert!(out.success(), "{}", out.describe());
    report
        .expect_all_ok(&ALL)
        .unwrap_or_else(|p| panic!("{p}\n{}", out.describe()));
}
