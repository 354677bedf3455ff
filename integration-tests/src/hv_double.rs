//! A test double of the VMM side of the pvIOMMU contract (sections 1-3),
//! built on pvmm's vCPU-loop hooks, so that the test kernel's driver can run
//! against the real `iommu` dispatcher before pvmm wires the pvIOMMU itself
//! (issue 4): Hyper-V CPUID leaves (KVM's moved to 0x40000100), the
//! GUEST_OS_ID, HYPERCALL and VP_INDEX MSRs with the `out 0xe4, al; ret`
//! overlay, and port 0xe4 handed to `Iommu::dispatch`.

use iommu::{Iommu, IommuConfig, SoftwareBackend};
use kvm_bindings::kvm_cpuid_entry2;
use pviommu_abi::{cpuid, msr, DeviceId, HypercallMsr, HYPERCALL_PAGE_CODE};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::{HypercallOutcome, HypercallRegs, MsrHandler, PortIoHypercall, VmHooks};

/// The HYPERCALL and GUEST_OS_ID MSRs (partition-wide) and VP_INDEX.
#[derive(Default)]
pub struct HvMsrs {
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

pub struct Dispatch(pub Arc<Iommu>);

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
pub fn hyperv_cpuid(_vp: u32, entries: &mut Vec<kvm_cpuid_entry2>) {
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

/// What a run left: the serial output, how the VM ended, and the IOMMU.
pub struct Run {
    pub serial: String,
    pub exit: Result<vmm::ExitReason, String>,
    pub iommu: Arc<Iommu>,
}

/// Boots `kernel` with `cmdline` on `cpus` vCPUs and 256 MiB, with the
/// pvIOMMU double wired to an `Iommu` built from `config`, and `devices`
/// registered with a software backend.
pub fn boot(
    kernel: PathBuf,
    cmdline: &str,
    cpus: u8,
    config: IommuConfig,
    devices: &[DeviceId],
) -> Run {
    let iommu = Arc::new(Iommu::new(config.clone()).unwrap_or_else(|e| panic!("IOMMU: {e}")));
    let backend = iommu.add_backend(Arc::new(SoftwareBackend::new(&config)));
    for d in devices {
        iommu
            .register_device(*d, backend)
            .unwrap_or_else(|e| panic!("register {d}: {e}"));
    }
    let hooks = VmHooks {
        hypercall: Some(Arc::new(Dispatch(iommu.clone()))),
        msr: Some(Arc::new(HvMsrs::default())),
        cpuid: Some(Arc::new(hyperv_cpuid)),
    };
    let dir = std::env::temp_dir().join(format!(
        "pvmm-hv-double-{}",
        crate::artifacts::random_token()
    ));
    let serial_path = dir.join("serial.txt");
    let exit = std::fs::create_dir_all(&dir)
        .map_err(|e| format!("temp dir: {e}"))
        .and_then(|()| {
            let vm_config = vmm::VmConfig {
                kernel: vmm::KernelSource::Path(kernel),
                cmdline: Some(cmdline.to_string()),
                memory: 256 << 20,
                cpus,
                serial: vmm::SerialConfig::File(serial_path.clone()),
                ..vmm::VmConfig::default()
            };
            let _vm = crate::run::vm_lock();
            vmm::Vmm::new(vm_config, hooks)
                .and_then(|v| v.run())
                .map_err(|e| vmm::error_chain(&e))
        });
    let serial = std::fs::read_to_string(&serial_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        serial,
        exit,
        iommu,
    }
}
