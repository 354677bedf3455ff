//! The pvIOMMU as the guest sees it (contract sections 1-3,
//! shared/pviommu-abi.md): Hyper-V CPUID leaves at 0x40000000 (KVM's own
//! moved to 0x40000100), the GUEST_OS_ID, HYPERCALL and VP_INDEX MSRs
//! (KVM MSR filter and user-space MSR exits), the hypercall page's stub
//! `endbr64; nop; out 0xE4, al; ret`, and port 0xE4 handed to one [`Iommu`]
//! per VM while the page is enabled.
//!
//! The hypercall path runs on the calling vCPU's thread: registers and CPL
//! come from KVM sync regs (vcpu.rs), [`Iommu::dispatch_from`] validates and
//! runs the call, the outcome goes to RAX, or to RCX with RIP at the stub's
//! restart point ([`hypercall_restart_rip`]), which re-runs the `out` on
//! every KVM. This layer reads the MSR state from atomics and allocates
//! nothing; the dispatcher takes the IOMMU's state lock for the typed
//! handler only, so several vCPUs may call at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use iommu::abi::{cpuid, hypercall_restart_rip, msr, HypercallMsr, HYPERCALL_PAGE_CODE};
use iommu::Iommu;
use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::hooks::{HypercallAction, HypercallExit, MsrHandler, PortIoHypercall, VmHooks};

/// KVM's TSC frequency leaf (kHz in EAX), 0x40000010, where it moves.
pub const KVM_TSC_LEAF: u32 = cpuid::KVM_LEAVES_BASE + 0x10;
/// Highest Hyper-V leaf pvmm reports.
const MAX_HV_LEAF: u32 = 0x4000_0006;

/// The VMM side of the contract for one VM.
#[derive(Debug)]
pub struct Pviommu {
    iommu: Arc<Iommu>,
    /// GUEST_OS_ID (partition-wide).
    guest_os_id: AtomicU64,
    /// HYPERCALL MSR value (partition-wide).
    hypercall: AtomicU64,
}

impl Pviommu {
    /// The interface in front of `iommu`.
    pub fn new(iommu: Arc<Iommu>) -> Self {
        Self {
            iommu,
            guest_os_id: AtomicU64::new(0),
            hypercall: AtomicU64::new(0),
        }
    }

    /// The IOMMU behind the interface.
    pub fn iommu(&self) -> &Arc<Iommu> {
        &self.iommu
    }

    /// The vCPU-loop hooks that implement the interface.
    pub fn hooks(self: &Arc<Self>) -> VmHooks {
        VmHooks {
            hypercall: Some(self.clone()),
            msr: Some(self.clone()),
            cpuid: Some(Arc::new(|_vp, entries: &mut Vec<kvm_cpuid_entry2>| {
                hyperv_cpuid(entries, None)
            })),
        }
    }

    /// A write to the HYPERCALL MSR. `false` injects #GP.
    fn write_hypercall(&self, mem: &GuestMemoryMmap, value: u64) -> bool {
        let new = HypercallMsr::from_bits(value);
        if new.reserved() != 0 {
            return false;
        }
        if HypercallMsr::from_bits(self.hypercall.load(Ordering::Acquire)).locked() {
            // Locked: further writes are ignored, as on Hyper-V.
            return true;
        }
        if self.guest_os_id.load(Ordering::Acquire) == 0 {
            // Enabling before GUEST_OS_ID is set is ignored, as on Hyper-V.
            return true;
        }
        if new.enable() {
            // gpn is 52 bits wide: the shift cannot overflow. A page
            // outside guest RAM refuses the write (#GP).
            let gpa = GuestAddress(new.gpn() << 12);
            if mem.write_slice(&HYPERCALL_PAGE_CODE, gpa).is_err() {
                return false;
            }
        }
        self.hypercall.store(value, Ordering::Release);
        true
    }
}

impl PortIoHypercall for Pviommu {
    #[inline]
    fn hypercall(
        &self,
        mem: &GuestMemoryMmap,
        vp_index: u32,
        exit: HypercallExit,
    ) -> HypercallAction {
        // Port 0xE4 is a hypercall only while the hypercall page is enabled.
        if !HypercallMsr::from_bits(self.hypercall.load(Ordering::Acquire)).enable() {
            return HypercallAction::NotAHypercall;
        }
        let restart = hypercall_restart_rip(exit.rip);
        let caller = iommu::Caller {
            vp_index,
            cpl: exit.cpl,
            restartable: restart.is_some(),
        };
        match (self.iommu.dispatch_from(mem, caller, exit.regs), restart) {
            (iommu::HypercallOutcome::Complete { rax }, _) => HypercallAction::Complete { rax },
            (iommu::HypercallOutcome::Continue { rcx }, Some(rip)) => {
                HypercallAction::Restart { rcx, rip }
            }
            // The dispatcher slices only restartable calls.
            (iommu::HypercallOutcome::Continue { .. }, None) => HypercallAction::Complete {
                rax: iommu::abi::HypercallOutput::from_status(
                    iommu::abi::HvStatus::INVALID_PARTITION_STATE,
                    0,
                )
                .into_bits(),
            },
        }
    }
}

impl MsrHandler for Pviommu {
    fn msrs(&self) -> Vec<u32> {
        vec![msr::GUEST_OS_ID, msr::HYPERCALL, msr::VP_INDEX]
    }

    fn read(&self, _mem: &GuestMemoryMmap, vp_index: u32, index: u32) -> Option<u64> {
        match index {
            msr::GUEST_OS_ID => Some(self.guest_os_id.load(Ordering::Acquire)),
            msr::HYPERCALL => Some(self.hypercall.load(Ordering::Acquire)),
            msr::VP_INDEX => Some(u64::from(vp_index)),
            _ => None,
        }
    }

    fn write(&self, mem: &GuestMemoryMmap, _vp_index: u32, index: u32, value: u64) -> bool {
        match index {
            msr::GUEST_OS_ID => {
                self.guest_os_id.store(value, Ordering::Release);
                true
            }
            msr::HYPERCALL => self.write_hypercall(mem, value),
            // VP_INDEX is read-only.
            _ => false,
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

/// Moves KVM's leaves (0x40000000..0x400000ff) to 0x40000100 (the signature
/// leaf's EAX, the highest KVM leaf, moves with them) and puts the Hyper-V
/// leaves of the contract in their place. With `tsc_khz`, KVM's TSC
/// frequency leaf appears at 0x40000110 (and the KVM range reaches it).
pub fn hyperv_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, tsc_khz: Option<u32>) {
    const KVM_RANGE: std::ops::Range<u32> = 0x4000_0000..0x4000_0100;
    entries.retain(|e| !(cpuid::KVM_LEAVES_BASE..0x4000_0200).contains(&e.function));
    for e in entries.iter_mut() {
        if KVM_RANGE.contains(&e.function) {
            e.function += 0x100;
            if e.function == cpuid::KVM_LEAVES_BASE {
                e.eax = e.eax.clamp(0x4000_0000, 0x4000_00ff) + 0x100;
                if tsc_khz.is_some() {
                    e.eax = e.eax.max(KVM_TSC_LEAF);
                }
            }
        }
    }
    if let Some(khz) = tsc_khz {
        entries.retain(|e| e.function != KVM_TSC_LEAF);
        entries.push(leaf(KVM_TSC_LEAF, khz, 0, 0, 0));
    }
    entries.extend([
        leaf(
            cpuid::LEAF_VENDOR,
            MAX_HV_LEAF,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use iommu::abi::{Control, HvStatus, HypercallCode, HypercallOutput};
    use iommu::IommuConfig;
    use zerocopy::IntoBytes;

    fn setup() -> (Arc<Pviommu>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let iommu = Arc::new(Iommu::new(IommuConfig::default()).unwrap());
        (Arc::new(Pviommu::new(iommu)), mem)
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32) -> Option<&kvm_cpuid_entry2> {
        entries.iter().find(|e| e.function == f)
    }

    #[test]
    fn cpuid_leaves_follow_the_contract() {
        // What KVM reports: signature (max leaf 0x40000001) and features.
        let mut entries = vec![
            leaf(0, 0xd, 0, 0, 0),
            leaf(0x4000_0000, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x4000_0001, 0x1234, 0, 0, 0),
        ];
        hyperv_cpuid(&mut entries, Some(2_000_000));
        let v = find(&entries, 0x4000_0000).unwrap();
        assert_eq!(
            (v.eax, v.ebx, v.ecx, v.edx),
            (0x4000_0006, 0x7263_694d, 0x666f_736f, 0x7648_2074)
        );
        assert_eq!(find(&entries, 0x4000_0001).unwrap().eax, 0x3123_7648);
        let f = find(&entries, 0x4000_0003).unwrap();
        assert_eq!(f.eax, 1 << 5 | 1 << 6);
        assert_eq!(f.edx, 1 << 24 | 1 << 25);
        assert_eq!(find(&entries, 0x4000_0006).unwrap().eax, 1 << 4);
        let kvm = find(&entries, 0x4000_0100).unwrap();
        assert_eq!((kvm.eax, kvm.ebx), (0x4000_0110, 0x4b4d_564b));
        assert_eq!(find(&entries, 0x4000_0101).unwrap().eax, 0x1234);
        assert_eq!(find(&entries, 0x4000_0110).unwrap().eax, 2_000_000);
        assert_eq!(find(&entries, 0).unwrap().eax, 0xd);
        // Each leaf once.
        let mut fs: Vec<u32> = entries.iter().map(|e| e.function).collect();
        fs.sort_unstable();
        fs.dedup();
        assert_eq!(fs.len(), entries.len());
        // Without a TSC frequency, KVM's highest leaf just moves.
        let mut entries = vec![leaf(0x4000_0000, 0x4000_0001, 0, 0, 0)];
        hyperv_cpuid(&mut entries, None);
        assert_eq!(find(&entries, 0x4000_0100).unwrap().eax, 0x4000_0101);
        assert!(find(&entries, 0x4000_0110).is_none());
    }

    #[test]
    fn msrs_enable_the_page_only_with_a_guest_os_id() {
        let (p, mem) = setup();
        assert_eq!(p.msrs(), vec![0x4000_0000, 0x4000_0001, 0x4000_0002]);
        let enable = HypercallMsr::new().with_enable(true).with_gpn(0x10);
        // GUEST_OS_ID == 0: ignored.
        assert!(p.write(&mem, 0, msr::HYPERCALL, enable.into_bits()));
        assert_eq!(p.read(&mem, 0, msr::HYPERCALL), Some(0));
        let mut code = [0u8; HYPERCALL_PAGE_CODE.len()];
        mem.read_slice(&mut code, GuestAddress(0x10000)).unwrap();
        assert_eq!(code, [0; HYPERCALL_PAGE_CODE.len()]);
        assert!(p.write(&mem, 0, msr::GUEST_OS_ID, 0x8100));
        assert_eq!(p.read(&mem, 1, msr::GUEST_OS_ID), Some(0x8100));
        assert!(p.write(&mem, 1, msr::HYPERCALL, enable.into_bits()));
        assert_eq!(p.read(&mem, 0, msr::HYPERCALL), Some(enable.into_bits()));
        mem.read_slice(&mut code, GuestAddress(0x10000)).unwrap();
        assert_eq!(code, HYPERCALL_PAGE_CODE);
        // VP_INDEX: per vCPU, read-only.
        assert_eq!(p.read(&mem, 3, msr::VP_INDEX), Some(3));
        assert!(!p.write(&mem, 3, msr::VP_INDEX, 7));
        assert_eq!(p.read(&mem, 0, 0x1234), None);
        assert!(!p.write(&mem, 0, 0x1234, 0));
    }

    #[test]
    fn hostile_hypercall_msr_writes_are_refused() {
        let (p, mem) = setup();
        assert!(p.write(&mem, 0, msr::GUEST_OS_ID, 1));
        // Outside guest RAM (1 MiB here), and the highest page number.
        for gpn in [0x100, (1 << 52) - 1] {
            let v = HypercallMsr::new().with_enable(true).with_gpn(gpn);
            assert!(!p.write(&mem, 0, msr::HYPERCALL, v.into_bits()));
        }
        // Reserved bits.
        assert!(!p.write(&mem, 0, msr::HYPERCALL, 1 | 1 << 5));
        assert_eq!(p.read(&mem, 0, msr::HYPERCALL), Some(0));
        // Locked: later writes are ignored.
        let locked = HypercallMsr::new()
            .with_enable(true)
            .with_locked(true)
            .with_gpn(1);
        assert!(p.write(&mem, 0, msr::HYPERCALL, locked.into_bits()));
        assert!(p.write(&mem, 0, msr::HYPERCALL, 0));
        assert_eq!(p.read(&mem, 0, msr::HYPERCALL), Some(locked.into_bits()));
    }

    /// RIP at the exit of the stub's `out` in a page at 0x7000 (a
    /// standard KVM's view: RIP not yet advanced).
    const STUB_OUT: u64 = 0x7000 + iommu::abi::HYPERCALL_OUT_OFFSET;

    fn exit(rcx: u64, rdx: u64, r8: u64, rip: u64, cpl: u8) -> HypercallExit {
        HypercallExit {
            regs: iommu::HypercallRegs { rcx, rdx, r8 },
            rip,
            cpl,
        }
    }

    fn status(action: HypercallAction) -> HvStatus {
        let HypercallAction::Complete { rax } = action else {
            panic!("{action:?}")
        };
        HypercallOutput::from_bits(rax).hv_status()
    }

    fn enable_page(p: &Pviommu, mem: &GuestMemoryMmap) {
        assert!(p.write(mem, 0, msr::GUEST_OS_ID, 0x8100));
        let enable = HypercallMsr::new().with_enable(true).with_gpn(0x7);
        assert!(p.write(mem, 0, msr::HYPERCALL, enable.into_bits()));
    }

    #[test]
    fn hypercalls_reach_the_iommu() {
        let (p, mem) = setup();
        enable_page(&p, &mem);
        let unknown = Control::new().with_code(0x7777).into_bits();
        let out = p.hypercall(&mem, 0, exit(unknown, 0, 0, STUB_OUT, 0));
        assert_eq!(status(out), HvStatus::INVALID_HYPERCALL_CODE);
        // GET_IOMMU_CAPABILITIES with its input at 0x1000, output at 0x2000.
        mem.write_obj(u64::MAX, GuestAddress(0x1000)).unwrap();
        let caps = Control::new()
            .with_code(HypercallCode::GET_IOMMU_CAPABILITIES.0)
            .into_bits();
        let out = p.hypercall(&mem, 1, exit(caps, 0x1000, 0x2000, STUB_OUT, 0));
        assert_eq!(out, HypercallAction::Complete { rax: 0 });
        assert_eq!(p.iommu().stats().hypercalls.total, 2);
        let hooks = p.hooks();
        assert!(hooks.hypercall.is_some() && hooks.msr.is_some() && hooks.cpuid.is_some());
    }

    #[test]
    fn port_0xe4_is_not_a_hypercall_until_the_page_is_enabled() {
        let (p, mem) = setup();
        let caps = Control::new()
            .with_code(HypercallCode::GET_IOMMU_CAPABILITIES.0)
            .into_bits();
        mem.write_obj(u64::MAX, GuestAddress(0x1000)).unwrap();
        let call = exit(caps, 0x1000, 0x2000, STUB_OUT, 0);
        assert_eq!(p.hypercall(&mem, 0, call), HypercallAction::NotAHypercall);
        // GUEST_OS_ID alone does not enable it.
        assert!(p.write(&mem, 0, msr::GUEST_OS_ID, 0x8100));
        assert_eq!(p.hypercall(&mem, 0, call), HypercallAction::NotAHypercall);
        assert_eq!(
            p.iommu().stats().hypercalls.total,
            0,
            "nothing reached the IOMMU"
        );
        enable_page(&p, &mem);
        assert_eq!(
            p.hypercall(&mem, 0, call),
            HypercallAction::Complete { rax: 0 }
        );
        // Disabled again: unused port again.
        assert!(p.write(&mem, 0, msr::HYPERCALL, 0));
        assert_eq!(p.hypercall(&mem, 0, call), HypercallAction::NotAHypercall);
    }

    #[test]
    fn calls_from_user_mode_are_denied_and_do_nothing() {
        let (p, mem) = setup();
        enable_page(&p, &mem);
        let create = Control::new()
            .with_code(HypercallCode::CREATE_DEVICE_DOMAIN.0)
            .into_bits();
        let input = iommu::abi::InputCreateDeviceDomain {
            device_domain: iommu::abi::InputDeviceDomain {
                partition_id: iommu::abi::HV_PARTITION_ID_SELF.into(),
                domain_id: iommu::abi::DeviceDomainId::with(iommu::abi::DeviceDomainType::S2, 5)
                    .into_bits()
                    .into(),
                ..Default::default()
            },
            ..Default::default()
        };
        mem.write_slice(input.as_bytes(), GuestAddress(0x1000))
            .unwrap();
        let domains = || p.iommu().stats().domains.len();
        let before = domains();
        for cpl in 1..=3 {
            let out = p.hypercall(&mem, 0, exit(create, 0x1000, 0, STUB_OUT, cpl));
            assert_eq!(status(out), HvStatus::ACCESS_DENIED, "CPL {cpl}");
        }
        assert_eq!(domains(), before, "no domain was created");
        let out = p.hypercall(&mem, 0, exit(create, 0x1000, 0, STUB_OUT, 0));
        assert_eq!(status(out), HvStatus::SUCCESS);
        assert_eq!(domains(), before + 1);
    }

    #[test]
    fn time_sliced_calls_restart_at_the_stub_on_every_kvm() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let iommu = Arc::new(
            Iommu::new(IommuConfig {
                rep_budget: 2,
                ..Default::default()
            })
            .unwrap(),
        );
        let p = Pviommu::new(iommu);
        enable_page(&p, &mem);
        // A rep call that runs past the budget of 2: a FLUSH_LIST of five
        // empty entries on a fresh S1 domain.
        let s1 = iommu::abi::DeviceDomainId::with(iommu::abi::DeviceDomainType::S1, 9);
        let create = Control::new()
            .with_code(HypercallCode::CREATE_DEVICE_DOMAIN.0)
            .into_bits();
        let dd = iommu::abi::InputDeviceDomain {
            partition_id: iommu::abi::HV_PARTITION_ID_SELF.into(),
            domain_id: s1.into_bits().into(),
            ..Default::default()
        };
        mem.write_slice(
            iommu::abi::InputCreateDeviceDomain {
                device_domain: dd,
                ..Default::default()
            }
            .as_bytes(),
            GuestAddress(0x1000),
        )
        .unwrap();
        let out = p.hypercall(&mem, 0, exit(create, 0x1000, 0, STUB_OUT, 0));
        assert_eq!(status(out), HvStatus::SUCCESS);
        mem.write_slice(
            iommu::abi::InputFlushDeviceDomainList {
                device_domain: dd,
                ..Default::default()
            }
            .as_bytes(),
            GuestAddress(0x1000),
        )
        .unwrap();
        let flush = Control::new()
            .with_code(HypercallCode::FLUSH_DEVICE_DOMAIN_LIST.0)
            .with_rep_count(5);
        let page = 0xffff_8000_0000_7000u64;
        // RIP at the `out` (kvm_intel, kvm_amd) or past it (an emulating
        // KVM): either way the guest continues at the stub's `nop`, which
        // differs from the exit's RIP.
        for rip in [page + 5, page + 7] {
            let out = p.hypercall(&mem, 0, exit(flush.into_bits(), 0x1000, 0, rip, 0));
            assert_eq!(
                out,
                HypercallAction::Restart {
                    rcx: flush.with_rep_start(2).into_bits(),
                    rip: page + 4
                }
            );
        }
        // An `out 0xE4` outside the stub cannot be restarted: all its reps
        // run at once.
        let out = p.hypercall(&mem, 0, exit(flush.into_bits(), 0x1000, 0, 0x5555, 0));
        let HypercallAction::Complete { rax } = out else {
            panic!("{out:?}")
        };
        let rax = HypercallOutput::from_bits(rax);
        assert_eq!(
            (rax.hv_status(), rax.reps_completed()),
            (HvStatus::SUCCESS, 5)
        );
    }
}
