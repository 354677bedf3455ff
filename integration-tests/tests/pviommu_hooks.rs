//! The test kernel's pvIOMMU driver and suite against the real `iommu`
//! dispatcher, through pvmm's vCPU loop (the `vmm` library's hooks and the
//! double in `integration_tests::hv_double`), before pvmm wires the pvIOMMU
//! itself (issue 4). A device is registered with a software backend so the
//! kernel's attach/detach checks run (`tk.iommu_dev`), and the rep budget is
//! small so that maps are sliced and restarted.

use integration_tests::{artifacts, hv_double, tap};
use iommu::IommuConfig;
use pviommu_abi::DeviceId;

/// The device the kernel attaches and detaches (not on the PCI bus: the
/// IOMMU only needs its id).
const DEVICE: (u8, u8, u8) = (0, 5, 0);
/// Reps per time slice: below the kernel's 507-page maps.
const REP_BUDGET: u16 = 64;

#[test]
fn pviommu_suite_against_the_dispatcher() {
    if !artifacts::kvm_usable() {
        eprintln!("SKIP: /dev/kvm cannot be opened");
        return;
    }
    let config = IommuConfig {
        rep_budget: REP_BUDGET,
        ..IommuConfig::default()
    };
    let (b, d, f) = DEVICE;
    let kernel = artifacts::test_kernel().unwrap_or_else(|e| panic!("{e}"));
    let cmdline = format!("tk.tests=smp,pviommu tk.pviommu=1 tk.iommu_dev={b:02x}:{d:02x}.{f}");
    let run = hv_double::boot(kernel, &cmdline, 2, config, &[DeviceId::pci(0, b, d, f)]);
    let out = run.serial;
    let exit = run
        .exit
        .unwrap_or_else(|e| panic!("pvmm failed: {e}\n{out}"));
    let iommu = run.iommu;
    // Shown with --nocapture: the guest's account of what it did.
    eprintln!("{out}");
    let r = tap::parse(&out);
    r.expect_all_ok(&["smp", "pviommu"])
        .unwrap_or_else(|p| panic!("{p} (exit: {exit:?})\n{out}"));
    for what in [
        "invalid inputs refused with their documented status",
        "attach, double attach, delete while attached, detach",
        "two CPUs, 20 create/map/unmap/delete rounds each at the same time",
    ] {
        assert!(
            r.diagnostics.iter().any(|d| d.contains(what)),
            "no `{what}`:\n{out}"
        );
    }
    // The 507- and 1200-page maps were sliced and restarted transparently.
    let stats = iommu.stats();
    assert!(
        stats.hypercalls.continuations > 0,
        "no rep restarts with a budget of {REP_BUDGET}: {:?}",
        stats.hypercalls
    );
    // Everything the kernel created it deleted.
    assert!(
        stats.domains.len() <= 2,
        "domains left behind: {:#?}",
        stats.domains
    );
}
