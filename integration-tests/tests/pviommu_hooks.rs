//! The test kernel's pvIOMMU driver and suite against the real `iommu`
//! dispatcher, through pvmm's vCPU loop (the `vmm` library's hooks), before
//! pvmm wires the pvIOMMU itself (issue 4).
//!
//! The hooks here are a test double of contract sections 1-3, kept small:
//! Hyper-V CPUID leaves (KVM's moved to 0x40000100), the GUEST_OS_ID,
//! HYPERCALL and VP_INDEX MSRs with the `out 0xe4, al; ret` overlay, and
//! port 0xe4 handed to `Iommu::dispatch`. A device is registered with a
//! software backend so the kernel's attach/detach checks run
//! (`tk.iommu_dev`), and the rep budget is small so that maps are sliced.

use integration_tests::{artifacts, tap};
use iommu::{Iommu, IommuConfig, SoftwareBackend};
use kvm_bindings::kvm_cpuid_entry2;
use pviommu_abi::{cpuid, msr, DeviceId, HypercallMsr, HYPERCALL_PAGE_CODE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::{HypercallOutcome, HypercallRegs, MsrHandler, PortIoHypercall, VmHooks};

/// The device the kernel attaches and detaches (not on the PCI bus: the
/// IOMMU only needs its id).
const DEVICE: (u8, u8, u8) = (0, 5, 0);
/// Reps per time slice: below the kernel's 507-page maps.
const REP_BUDGET: u16 = 64;

#[derive(Default)]
struct HvMsrs {
    guest_os_id: AtomicU64,
    hypercall: AtomicU64,
}

impl MsrHandler for HvMsrs {
    fn msrs(&self) -> Vec<u32> {
        vec![msr::GUEST_OS_ID, msr::HYPERCALL, msr::VP_INDEX]
    }

    fn read(&self, _mem: &GuestMemoryMmap, vp: u32, m: u32) -> Option<u64> {
        match m {
            msr::GUEST_OS_ID => Some(self.guest_os_id.load(Ordering::SeqCst)),
            msr::HYPERCALL => Some(self.hypercall.load(Ordering::SeqCst)),
            msr::VP_INDEX => Some(u64::from(vp)),
            _ => None,
        }
    }

    fn write(&self, mem: &GuestMemoryMmap, _vp: u32, m: u32, value: u64) -> bool {
        match m {
            msr::GUEST_OS_ID => {
                self.guest_os_id.store(value, Ordering::SeqCst);
                true
            }
            msr::HYPERCALL => {
                if self.guest_os_id.load(Ordering::SeqCst) == 0 {
                    return true; // ignored, as on Hyper-V
                }
                let v = HypercallMsr::from_bits(value);
                if v.enable()
                    && mem
                        .write_slice(&HYPERCALL_PAGE_CODE, GuestAddress(v.gpn() << 12))
                        .is_err()
                {
                    return false;
                }
                self.hypercall.store(value, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }
}

struct Dispatch(Arc<Iommu>);

impl PortIoHypercall for Dispatch {
    fn hypercall(&self, mem: &GuestMemoryMmap, vp: u32, r: HypercallRegs) -> HypercallOutcome {
        let regs = iommu::HypercallRegs {
            rcx: r.rcx,
            rdx: r.rdx,
            r8: r.r8,
        };
        match self.0.dispatch(mem, vp, regs) {
            iommu::HypercallOutcome::Complete { rax } => HypercallOutcome::Complete { rax },
            iommu::HypercallOutcome::Continue { rcx } => HypercallOutcome::Continue { rcx },
        }
    }
}

fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// Moves KVM's leaves to 0x40000100 and puts the Hyper-V ones in place.
fn hyperv_cpuid(_vp: u32, entries: &mut Vec<kvm_cpuid_entry2>) {
    for e in entries.iter_mut() {
        if (0x4000_0000..0x4000_0100).contains(&e.function) {
            e.function += 0x100;
            if e.function == cpuid::KVM_LEAVES_BASE {
                e.eax = e.eax.max(0x4000_0000) + 0x100;
            }
        }
    }
    entries.extend([
        leaf(
            cpuid::LEAF_VENDOR,
            0x4000_0006,
            cpuid::VENDOR_EBX,
            cpuid::VENDOR_ECX,
            cpuid::VENDOR_EDX,
        ),
        leaf(cpuid::LEAF_INTERFACE, cpuid::INTERFACE_EAX, 0, 0, 0),
        leaf(0x4000_0002, 0, 0, 0, 0),
        leaf(
            cpuid::LEAF_FEATURES,
            cpuid::FEATURES_EAX_HYPERCALL_MSRS | cpuid::FEATURES_EAX_VP_INDEX,
            0,
            0,
            cpuid::FEATURES_EDX_DEVICE_DOMAINS | cpuid::FEATURES_EDX_S1_DEVICE_DOMAINS,
        ),
        leaf(0x4000_0004, 0, 0, 0, 0),
        leaf(0x4000_0005, 0, 0, 0, 0),
        leaf(
            cpuid::LEAF_HARDWARE_FEATURES,
            cpuid::HARDWARE_EAX_DMA_REMAPPING,
            0,
            0,
            0,
        ),
    ]);
}

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
    let iommu = Arc::new(Iommu::new(config.clone()).expect("IOMMU"));
    let backend = iommu.add_backend(Arc::new(SoftwareBackend::new(&config)));
    let (b, d, f) = DEVICE;
    iommu
        .register_device(DeviceId::pci(0, b, d, f), backend)
        .expect("register the device");
    let hooks = VmHooks {
        hypercall: Some(Arc::new(Dispatch(iommu.clone()))),
        msr: Some(Arc::new(HvMsrs::default())),
        cpuid: Some(Arc::new(hyperv_cpuid)),
    };
    let dir = std::env::temp_dir().join(format!("pvmm-pviommu-{}", artifacts::random_token()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let serial = dir.join("serial.txt");
    let kernel = artifacts::test_kernel().unwrap_or_else(|e| panic!("{e}"));
    let vm_config = vmm::VmConfig {
        kernel: vmm::KernelSource::Path(kernel),
        cmdline: Some(format!(
            "tk.tests=smp,pviommu tk.pviommu=1 tk.iommu_dev={b:02x}:{d:02x}.{f}"
        )),
        memory: 256 << 20,
        cpus: 2,
        serial: vmm::SerialConfig::File(serial.clone()),
        ..vmm::VmConfig::default()
    };
    let exit = {
        let _vm = integration_tests::run::vm_lock();
        vmm::Vmm::new(vm_config, hooks).and_then(|v| v.run())
    };
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let exit = exit.unwrap_or_else(|e| panic!("pvmm failed: {}\n{out}", vmm::error_chain(&e)));
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
