//! The pvIOMMU in pvmm, end to end through the CLI: the test kernel's
//! pviommu suite (discovery, MSRs, hypercall page, every call, the hostile
//! inputs of the contract, two vCPUs at once) and dma suite (the dma-test
//! device through the default, null, S2 and S1 domains, rep restarts),
//! pvmm's main command (the demo), the KVM interface (`--hypervisor kvm`,
//! `--pviommu off`) and Hyper-V without the pvIOMMU.

use integration_tests::{artifacts, run, tap};
use std::process::Command;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

fn pvmm(args: &[&str]) -> (run::Output, tap::Report) {
    pvmm_with_env(args, &[])
}

fn pvmm_with_env(args: &[&str], env: &[(&str, &str)]) -> (run::Output, tap::Report) {
    let bin = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    let mut c = Command::new(bin);
    c.args(args).envs(env.iter().copied());
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
    if !artifacts::require_kvm() {
        return;
    }
    // A rep budget below the kernel's 507-page maps, 1200-page unmaps and
    // 300-entry flush lists: they are sliced and restarted (RCX updated,
    // RIP at the stub's restart point) without the guest noticing. A
    // restart that lands before the stub hits the guest's ud2 guard bytes.
    let (out, r) = pvmm_with_env(
        &[
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
        ],
        &[("RUST_LOG", "info")],
    );
    assert!(out.success(), "{}", out.describe());
    r.expect_all_ok(&["smp", "pviommu", "dma"])
        .unwrap_or_else(|p| panic!("{p}\n{}", out.describe()));
    for what in [
        "reference time: TIME_REF_COUNT advances and agrees across CPUs",
        "invalid inputs refused with their documented status",
        "attach, double attach, delete while attached, attach as a replace, detach",
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
    // MAP 507 and 1200 pages, UNMAP 1200 and 400 pages and a 300-entry
    // FLUSH_LIST alone restart 7 + 18 + 18 + 6 + 4 times with a budget of 64.
    let restarts = restarts(&out.stderr).unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(restarts >= 50, "{restarts} restarts\n{}", out.describe());
}

/// The time-sliced restarts pvmm reports at exit (with RUST_LOG=info).
fn restarts(stderr: &str) -> Option<u64> {
    let line = stderr
        .lines()
        .find(|l| l.contains("time-sliced restarts"))?;
    let before = line.split(" time-sliced restarts").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

#[test]
fn main_command_shows_the_pviommu_at_work() {
    if !artifacts::require_kvm() {
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
    if !artifacts::require_kvm() {
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

/// `--hypervisor kvm`: KVM's own signature at 0x40000000, and the test
/// kernel finds no pvIOMMU and says why.
#[test]
fn hypervisor_kvm_hides_the_interface() {
    if !artifacts::require_kvm() {
        return;
    }
    let (out, r) = pvmm(&[
        "--hypervisor",
        "kvm",
        "--device",
        "dma-test",
        "--cmdline",
        "tk.tests=pviommu,dma",
    ]);
    assert!(out.success(), "{}", out.describe());
    r.expect_ok_or_skipped(&["pviommu", "dma"], &["pviommu", "dma"])
        .unwrap_or_else(|p| panic!("{p}\n{}", out.describe()));
    for t in &r.tests {
        let why = t.skip.as_deref().unwrap_or_default();
        assert!(
            why.contains("the hypervisor is KVM") && why.contains("no pvIOMMU"),
            "{}: {why:?}\n{}",
            t.name,
            out.describe()
        );
    }
    // Asking for both is refused before anything runs.
    let bin = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    let mut c = Command::new(bin);
    c.args(["--hypervisor", "kvm", "--pviommu", "on"]);
    let out = run::run(c, TIMEOUT).expect("pvmm starts");
    assert_eq!(
        out.status.and_then(|s| s.code()),
        Some(1),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("--hypervisor kvm needs --pviommu off"),
        "{}",
        out.describe()
    );
}

/// `--hypervisor hyperv --pviommu off`: the Hyper-V interface and its
/// reference time, no device domains; the pvIOMMU suites skip.
#[test]
fn hyperv_without_the_pviommu() {
    if !artifacts::require_kvm() {
        return;
    }
    let (out, r) = pvmm(&[
        "--hypervisor",
        "hyperv",
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
        r.tests.iter().all(|t| t
            .skip
            .as_deref()
            .is_some_and(|s| s.contains("Hyper-V without the pvIOMMU"))),
        "{}",
        out.describe()
    );
    assert!(
        has(&r, "reference time: TIME_REF_COUNT advances"),
        "{}",
        out.describe()
    );
}

/// The Hyper-V reference time against this test's clock: the test kernel
/// prints TIME_REF_COUNT (and the TSC page's time, where pvmm offers one),
/// waits 10 s of it, and prints them again. A sanity check of the units and
/// the source (the line timing here is only good to some 10 ms; Linux's
/// drift over a minute is measured in tests/linux.rs).
#[test]
fn reference_time_keeps_the_hosts_time() {
    if !artifacts::require_kvm() {
        return;
    }
    const SECONDS: f64 = 10.0;
    let bin = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    let _vm = run::vm_lock();
    let mut c = integration_tests::linux::Console::start(
        &bin,
        &["--cmdline", "tk.tests=hvclock tk.hvclock_s=10"],
    )
    .expect("pvmm starts");
    let mut reading = |what: &str| {
        let line = c.wait_for(what, TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        let at = std::time::Instant::now();
        // "hvclock: tN <TIME_REF_COUNT> page <page time or 0>"
        let words: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (at, words)
    };
    let (h0, g0) = reading("hvclock: t0");
    let (h1, g1) = reading("hvclock: t1");
    let (code, stderr, lines) = c.finish(TIMEOUT);
    assert_eq!(code, Some(0), "{stderr}\n{}", lines.join("\n"));
    let host = (h1 - h0).as_secs_f64();
    let units = |i: usize| (g1[i] as f64 - g0[i] as f64) / 1e7;
    let (msr, page) = (units(0), units(1));
    println!(
        "10 s of reference time took {host:.4} s of this test's clock; the TSC page's time \
         advanced {page:.4} s"
    );
    assert!(
        (SECONDS..SECONDS + 0.01).contains(&msr),
        "TIME_REF_COUNT: {msr} s"
    );
    assert!((host - msr).abs() < 0.1, "{msr} s against {host} s");
    if g0[1] != 0 {
        assert!((page - msr).abs() < 0.001, "page {page} s, MSR {msr} s");
    }
}

#[test]
fn bad_device_flags_are_refused_clearly() {
    let bin = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    for (arg, msg) in [
        ("nvme", "Unknown device kind \"nvme\""),
        ("dma-test,id=", "id"),
        ("dma-test,bdf=3", "Unknown key \"bdf\""),
        ("vfio", "A vfio device needs path="),
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

/// VMBus through the CLI's default Hyper-V interface: the test kernel's
/// vmbus suite programs the SynIC, connects at 5.3 (6.0 refused), gets
/// every answer in its message slot with an interrupt, has a bad GPADL and
/// malformed posts refused, times a message round trip and unloads. With
/// `--vmbus off` CPUID offers no SynIC and POST_MESSAGE does not exist.
#[test]
fn vmbus_connect_and_round_trip_through_the_synic() {
    if !artifacts::require_kvm() {
        return;
    }
    let (out, r) = pvmm_with_env(&["--cmdline", "tk.tests=vmbus"], &[("RUST_LOG", "info")]);
    assert!(out.success(), "{}", out.describe());
    r.expect_all_ok(&["vmbus"])
        .unwrap_or_else(|p| panic!("{p}\n{}", out.describe()));
    assert!(
        has(
            &r,
            "vmbus: connected at 5.3 (6.0 refused), no offers, a bad GPADL refused, unloaded"
        ),
        "{}",
        out.describe()
    );
    for d in r.diagnostics.iter().filter(|d| d.contains("round trip")) {
        println!("{d}");
    }
    assert!(
        out.stderr.contains("VMBus: guest connected, version 5.3"),
        "{}",
        out.describe()
    );

    let (out, r) = pvmm(&["--vmbus", "off", "--cmdline", "tk.tests=vmbus"]);
    assert!(out.success(), "{}", out.describe());
    r.expect_all_ok(&["vmbus"])
        .unwrap_or_else(|p| panic!("{p}\n{}", out.describe()));
    assert!(
        has(
            &r,
            "vmbus: not offered (CPUID); POST_MESSAGE does not exist"
        ),
        "{}",
        out.describe()
    );
}
