//! The pvIOMMU as the guest sees it (contract sections 1-3,
//! shared/pviommu-abi.md): the Hyper-V interface of [`crate::hyperv`]
//! (CPUID leaves, synthetic MSRs through the KVM MSR filter, the hypercall
//! page's stub `endbr64; nop; out 0xE4, al; ret`) and port 0xE4 handed to
//! one [`Iommu`] per VM while the page is enabled.
//!
//! The hypercall path runs on the calling vCPU's thread: registers and CPL
//! come from KVM sync regs (vcpu.rs), [`Iommu::dispatch_from`] validates and
//! runs the call, the outcome goes to RAX, or to RCX with RIP at the stub's
//! restart point ([`hypercall_restart_rip`]), which re-runs the `out` on
//! every KVM. This layer reads the MSR state from atomics and allocates
//! nothing; the dispatcher takes the IOMMU's state lock for the typed
//! handler only, so several vCPUs may call at once.
//!
//! With the pvIOMMU hidden (`--hypervisor hyperv --pviommu off`), CPUID has
//! no device domain or DMA remapping bits and the only calls served are
//! GET_VP_REGISTERS (Linux's `hyperv_init` needs it) and the partition's
//! SEND_SYNTHETIC_CLUSTER_IPI (crate::processors) and POST_MESSAGE
//! (crate::vmbus); every other code is INVALID_HYPERCALL_CODE.

use std::ops::Range;
use std::sync::Arc;

use iommu::abi::{hypercall_restart_rip, Control, HvStatus, HypercallCode, HypercallOutput};
use iommu::Iommu;
use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::GuestMemoryMmap;

use crate::hooks::{
    HypercallAction, HypercallExit, MsrContext, MsrHandler, PortIoHypercall, VmHooks,
};
use crate::hyperv::{self, Partition};

/// The VMM side of the contract for one VM.
#[derive(Debug)]
pub struct Pviommu {
    iommu: Arc<Iommu>,
    hv: Partition,
}

impl Pviommu {
    /// The interface `hv` in front of `iommu` (reachable by the guest when
    /// `hv`'s parameters say the pvIOMMU is visible).
    pub fn new(iommu: Arc<Iommu>, hv: Partition) -> Self {
        Self { iommu, hv }
    }

    /// The IOMMU behind the interface.
    pub fn iommu(&self) -> &Arc<Iommu> {
        &self.iommu
    }

    /// The Hyper-V interface.
    pub fn partition(&self) -> &Partition {
        &self.hv
    }

    /// The vCPU-loop hooks that implement the interface.
    pub fn hooks(self: &Arc<Self>) -> VmHooks {
        let me = self.clone();
        VmHooks {
            hypercall: Some(self.clone()),
            msr: Some(self.clone()),
            cpuid: Some(Arc::new(move |_vp, entries: &mut Vec<kvm_cpuid_entry2>| {
                me.hv.cpuid(entries)
            })),
        }
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
        if !self.hv.hypercall_enabled() {
            return HypercallAction::NotAHypercall;
        }
        if !self.hv.params().pviommu
            && !matches!(
                Control::from_bits(exit.regs.rcx).call_code(),
                HypercallCode::GET_VP_REGISTERS
                    | HypercallCode::SEND_SYNTHETIC_CLUSTER_IPI
                    | HypercallCode::POST_MESSAGE
            )
        {
            return HypercallAction::Complete {
                rax: HypercallOutput::from_status(HvStatus::INVALID_HYPERCALL_CODE, 0).into_bits(),
            };
        }
        let restart = hypercall_restart_rip(exit.rip);
        let caller = iommu::Caller {
            vp_index,
            cpl: exit.cpl,
            restartable: restart.is_some(),
        };
        match (
            self.iommu.dispatch_for(
                mem,
                caller,
                exit.regs,
                Some(&self.hv as &dyn iommu::Processors),
            ),
            restart,
        ) {
            (iommu::HypercallOutcome::Complete { rax }, _) => HypercallAction::Complete { rax },
            (iommu::HypercallOutcome::Continue { rcx }, Some(rip)) => {
                HypercallAction::Restart { rcx, rip }
            }
            // The dispatcher slices only restartable calls.
            (iommu::HypercallOutcome::Continue { .. }, None) => HypercallAction::Complete {
                rax: HypercallOutput::from_status(HvStatus::INVALID_PARTITION_STATE, 0).into_bits(),
            },
        }
    }
}

impl MsrHandler for Pviommu {
    fn msr_ranges(&self) -> Vec<Range<u32>> {
        vec![hyperv::MSR_RANGE]
    }

    fn read(&self, ctx: &MsrContext<'_>, index: u32) -> Option<u64> {
        self.hv.read_msr(ctx, index)
    }

    fn write(&self, ctx: &MsrContext<'_>, index: u32, value: u64) -> bool {
        self.hv.write_msr(ctx, index, value)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use iommu::abi::{msr, HypercallMsr};
    use iommu::IommuConfig;
    use vm_memory::{Bytes, GuestAddress};
    use zerocopy::IntoBytes;

    fn params(pviommu: bool) -> hyperv::HvParams {
        hyperv::HvParams {
            vcpus: 2,
            host_cpus: 2,
            tsc_khz: Some(2_000_000),
            tsc_at_start: 0,
            invariant_tsc: false,
            pviommu,
            kernel_clock: false,
        }
    }

    fn with_iommu(iommu: Iommu, pviommu: bool) -> Arc<Pviommu> {
        Arc::new(Pviommu::new(
            Arc::new(iommu),
            Partition::new(params(pviommu)),
        ))
    }

    fn setup() -> (Arc<Pviommu>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let iommu = Iommu::new(IommuConfig::default()).unwrap();
        (with_iommu(iommu, true), mem)
    }

    /// A write by vCPU 0, whose TSC reads 0.
    fn wrmsr(p: &Pviommu, mem: &GuestMemoryMmap, index: u32, value: u64) -> bool {
        let tsc = || Some(0);
        p.write(&MsrContext::new(mem, 0, &tsc), index, value)
    }

    #[test]
    fn msr_hooks_cover_the_synthetic_msrs() {
        let (p, mem) = setup();
        assert_eq!(p.msr_ranges(), vec![0x4000_0000..0x4000_0200]);
        let tsc = || Some(0);
        let ctx = MsrContext::new(&mem, 1, &tsc);
        assert_eq!(p.read(&ctx, msr::VP_INDEX), Some(1));
        assert_eq!(p.read(&ctx, msr::TSC_FREQUENCY), Some(2_000_000_000));
        assert!(p.write(&ctx, msr::GUEST_OS_ID, 7));
        assert_eq!(p.partition().read_msr(&ctx, msr::GUEST_OS_ID), Some(7));
        // Beside the Hyper-V leaves, none of KVM's.
        let hooks = p.hooks();
        let mut entries = vec![kvm_cpuid_entry2 {
            function: 0x4000_0000,
            ebx: 0x4b4d_564b,
            ..Default::default()
        }];
        (hooks.cpuid.unwrap())(0, &mut entries);
        assert_eq!(entries.len(), 7);
        assert!(entries.iter().all(|e| e.ebx != 0x4b4d_564b));
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
        assert!(wrmsr(p, mem, msr::GUEST_OS_ID, 0x8100));
        let enable = HypercallMsr::new().with_enable(true).with_gpn(0x7);
        assert!(wrmsr(p, mem, msr::HYPERCALL, enable.into_bits()));
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
    fn without_the_pviommu_only_get_vp_registers_is_served() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let p = with_iommu(Iommu::new(IommuConfig::default()).unwrap(), false);
        enable_page(&p, &mem);
        mem.write_obj(u64::MAX, GuestAddress(0x1000)).unwrap();
        let caps = Control::new()
            .with_code(HypercallCode::GET_IOMMU_CAPABILITIES.0)
            .into_bits();
        let out = p.hypercall(&mem, 0, exit(caps, 0x1000, 0x2000, STUB_OUT, 0));
        assert_eq!(status(out), HvStatus::INVALID_HYPERCALL_CODE);
        assert_eq!(
            p.iommu().stats().hypercalls.total,
            0,
            "the IOMMU saw nothing"
        );
        // Linux's get_vtl(): VSM_VP_STATUS of the calling VP, one rep.
        let input = iommu::abi::InputGetVpRegisters {
            partition_id: iommu::abi::HV_PARTITION_ID_SELF.into(),
            vp_index: iommu::abi::HV_VP_INDEX_SELF.into(),
            ..Default::default()
        };
        mem.write_slice(input.as_bytes(), GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(iommu::abi::register::VSM_VP_STATUS, GuestAddress(0x1010))
            .unwrap();
        let get = Control::new()
            .with_code(HypercallCode::GET_VP_REGISTERS.0)
            .with_rep_count(1)
            .into_bits();
        let out = p.hypercall(&mem, 0, exit(get, 0x1000, 0x2000, STUB_OUT, 0));
        let HypercallAction::Complete { rax } = out else {
            panic!("{out:?}")
        };
        let rax = HypercallOutput::from_bits(rax);
        assert_eq!(
            (rax.hv_status(), rax.reps_completed()),
            (HvStatus::SUCCESS, 1)
        );
        // CPUID says so too.
        let features = p.partition().leaves()[3];
        assert_eq!(features.edx & (1 << 24 | 1 << 25), 0);
        assert_eq!(p.partition().leaves()[6].eax, 0);
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
        assert!(wrmsr(&p, &mem, msr::GUEST_OS_ID, 0x8100));
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
        assert!(wrmsr(&p, &mem, msr::HYPERCALL, 0));
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
        let p = with_iommu(
            Iommu::new(IommuConfig {
                rep_budget: 2,
                ..Default::default()
            })
            .unwrap(),
            true,
        );
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
