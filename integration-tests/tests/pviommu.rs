//! The pvIOMMU in pvmm, end to end through the CLI: the test kernel's
//! pviommu suite (discovery, MSRs, hypercall page, every call, the hostile
//! inputs of the contract, two vCPUs at once) and dma suite (the dma-test
//! device through the default, null, S2 and S1 domains, rep restarts),
//! pvmm's main command (the demo), and `--pviommu off`.

use integration_tests::{artifacts, run, tap};
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

fn pvmm(args: &[&str]) -> (run::Output, tap::Report) {
    let bin = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    let mut c = Command::new(bin);
    c.args(args);
    let _vm = run::vm_lock();
    let out = run::run(c, TIMEOUT).expect("pvmm starts");
    let report = tap::parse(&out.stdout);
    (out, report)
}

fn has(report: &tap::Report, what: &str) -> bool {
    report.diagnostics.iter().any(|d| d.contains(what))
}

#[test]
fn suites_with_a_dma_test_device_on_two_vcpus() {
    if !artifacts::kvm_usable() {
        eprintln!("SKIP: /dev/kvm cannot be opened");
        return;
    }
    // A rep budget below the kernel's 507-page maps: they are sliced and
    // restarted (RIP rewound, RCX updated) without the guest noticing.
    let (out, r) = pvmm(&[
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--device",
        "dma-test,id=dma0",
        "--pviommu-rep-budget",
        "64",
        "--cmdline",
        "tk.tests=smp,pviommu,dma tk.pviommu=1 tk.iommu_dev=00:01.0 tk.cpus=2",
    ]);
    assert!(out.success(), "{}", out.describe());
    r.expect_all_ok(&["smp", "pviommu", "dma"])
        .unwrap_or_else(|p| panic!("{p}\n{}", out.describe()));
    for what in [
        "invalid inputs refused with their documented status",
        "attach, double attach, delete while attached, detach",
        "two CPUs, 20 create/map/unmap/delete rounds each at the same time",
        "default domain is GPA; null domain blocks; DETACH returns to the default",
        "DMA faults at the unmapped page; 507-page map used at its last page",
        "stale translation until FLUSH_DEVICE_DOMAIN_LIST, then the new one",
    ] {
        assert!(has(&r, what), "no `{what}`:\n{}", out.describe());
    }
    assert!(
        out.stderr.contains("pvmm: guest powered off"),
        "{}",
        out.describe()
    );
}

#[test]
fn main_command_shows_the_pviommu_at_work() {
    if !artifacts::kvm_usable() {
        eprintln!("SKIP: /dev/kvm cannot be opened");
        return;
    }
    let (out, r) = pvmm(&[]);
    assert!(out.success(), "{}", out.describe());
    r.expect_all_ok(&[
        "mem", "cmdline", "smp", "pci", "irq", "pviommu", "dma", "demo",
    ])
    .unwrap_or_else(|p| panic!("{p}\n{}", out.describe()));
    for what in [
        "pvIOMMU: domain 40 (S2): mapped 16 pages at IOVA 0x100000",
        "pvIOMMU: DMA copy 4096 bytes",
        "flushed",
        "pvIOMMU: refused: DMA to unmapped IOVA 0x104000 faulted (not mapped)",
        "null domain: DMA at",
    ] {
        assert!(has(&r, what), "no `{what}`:\n{}", out.describe());
    }
}

#[test]
fn pviommu_off_hides_the_interface() {
    if !artifacts::kvm_usable() {
        eprintln!("SKIP: /dev/kvm cannot be opened");
        return;
    }
    let (out, r) = pvmm(&[
        "--pviommu",
        "off",
        "--device",
        "dma-test",
        "--cmdline",
        "tk.tests=pviommu,dma",
    ]);
    assert!(out.success(), "{}", out.describe());
    r.expect_ok_or_skipped(&["pviommu", "dma"], &["pviommu", "dma"])
        .unwrap_or_else(|p| panic!("{p}\n{}", out.describe()));
    assert!(
        r.tests.iter().all(|t| t.skip.is_some()),
        "{}",
        out.describe()
    );
}

#[test]
fn bad_device_flags_are_refused_clearly() {
    let bin = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    for (arg, msg) in [
        ("nvme", "Unknown device kind \"nvme\""),
        ("dma-test,id=", "Invalid device id"),
        ("dma-test,bdf=3", "Invalid device option"),
    ] {
        let mut c = Command::new(&bin);
        c.args(["--device", arg]);
        let out = run::run(c, TIMEOUT).expect("pvmm starts");
        assert_eq!(
            out.status.and_then(|s| s.code()),
            Some(2),
            "{}",
            out.describe()
        );
        assert!(out.stderr.contains(msg), "{}", out.describe());
    }
}
