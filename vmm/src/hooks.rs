//! Extension points of the vCPU loop for the pvIOMMU (and anything else that
//! needs them): the hypercall port, user-space MSRs and CPUID.
//!
//! - [`PortIoHypercall`]: an `out` to port [`HYPERCALL_PORT`] (0xE4, what the
//!   hypercall page's stub runs) hands RCX, RDX and R8 and RIP (from KVM sync
//!   regs) and the CPL (KVM_GET_SREGS, on this exit only) to the handler on
//!   the vCPU's own thread, which says
//!   what to do: write RAX, restart the call at a RIP of its choice with a
//!   new RCX (rep time slicing), or treat the `out` as one to an unused port.
//! - [`MsrHandler`]: the MSR ranges it lists are filtered out of KVM
//!   (KVM_X86_SET_MSR_FILTER) and their reads and writes come here, on the
//!   vCPU's thread, with an [`MsrContext`] that can read the vCPU's TSC.
//! - [`CpuidHook`]: edits each vCPU's CPUID entries after the topology is
//!   applied (for example Hyper-V leaves at 0x4000_0000).

use std::ops::Range;
use std::sync::Arc;

pub use iommu::abi::HYPERCALL_PORT;
pub use iommu::HypercallRegs;
use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::GuestMemoryMmap;

/// A port-I/O write to [`HYPERCALL_PORT`], as the vCPU saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallExit {
    /// RCX, RDX and R8.
    pub regs: HypercallRegs,
    /// RIP at the exit: at the `out` on a standard KVM, past it where KVM
    /// advanced RIP before exiting (see
    /// [`iommu::abi::hypercall_restart_rip`]).
    pub rip: u64,
    /// The current privilege level.
    pub cpl: u8,
}

/// What the vCPU does after a write to [`HYPERCALL_PORT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HypercallAction {
    /// Not a hypercall (the interface is off): the write goes to the port
    /// bus like any other, where nothing listens.
    NotAHypercall,
    /// Done: RAX gets the result value.
    Complete {
        /// Hypercall result value.
        rax: u64,
    },
    /// Not done: RCX gets the updated input value and the guest continues
    /// at `rip`, which must differ from the exit's RIP (a standard KVM skips
    /// the `out` on the next KVM_RUN when RIP is left as it was) and lead to
    /// the `out` again.
    Restart {
        /// Input value with the new rep start index.
        rcx: u64,
        /// Where the guest continues.
        rip: u64,
    },
}

/// Handles `out 0xE4, al` on the calling vCPU's thread.
pub trait PortIoHypercall: Send + Sync {
    /// One write to the hypercall port from vCPU `vp_index`. Must not panic
    /// on any input.
    fn hypercall(
        &self,
        mem: &GuestMemoryMmap,
        vp_index: u32,
        exit: HypercallExit,
    ) -> HypercallAction;
}

/// The most MSR ranges KVM's MSR filter takes.
pub const MAX_MSR_RANGES: usize = kvm_bindings::KVM_MSR_FILTER_MAX_RANGES as usize;
/// The most MSRs one filter range covers (its bitmap's size in bits).
pub const MAX_MSRS_PER_RANGE: u32 = kvm_bindings::KVM_MSR_FILTER_MAX_BITMAP_SIZE * 8;

/// Where an MSR access comes from: the vCPU, guest RAM, and the vCPU's TSC.
pub struct MsrContext<'a> {
    mem: &'a GuestMemoryMmap,
    vp_index: u32,
    tsc: &'a dyn Fn() -> Option<u64>,
}

impl<'a> MsrContext<'a> {
    /// The context of an access by vCPU `vp_index`, whose TSC `tsc` reads.
    pub fn new(mem: &'a GuestMemoryMmap, vp_index: u32, tsc: &'a dyn Fn() -> Option<u64>) -> Self {
        Self { mem, vp_index, tsc }
    }

    /// Guest RAM.
    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// The vCPU's index.
    pub fn vp_index(&self) -> u32 {
        self.vp_index
    }

    /// The vCPU's TSC now, as the guest would read it (KVM_GET_MSRS of
    /// IA32_TSC: one ioctl, so only when needed); `None` if KVM refused.
    pub fn guest_tsc(&self) -> Option<u64> {
        (self.tsc)()
    }
}

/// Handles MSRs in user space.
pub trait MsrHandler: Send + Sync {
    /// The MSRs to take over from KVM: at most [`MAX_MSR_RANGES`] ranges of
    /// at most [`MAX_MSRS_PER_RANGE`] MSRs each.
    fn msr_ranges(&self) -> Vec<Range<u32>>;
    /// A read; `None` injects #GP. Must not panic on any input.
    fn read(&self, ctx: &MsrContext<'_>, msr: u32) -> Option<u64>;
    /// A write; `false` injects #GP. Must not panic on any input.
    fn write(&self, ctx: &MsrContext<'_>, msr: u32, value: u64) -> bool;
}

/// Edits the CPUID entries of vCPU `vp_index` before they are set.
pub type CpuidHook = dyn Fn(u32, &mut Vec<kvm_cpuid_entry2>) + Send + Sync;

/// The hooks of one VM.
#[derive(Clone, Default)]
pub struct VmHooks {
    /// Port 0xE4 hypercalls.
    pub hypercall: Option<Arc<dyn PortIoHypercall>>,
    /// User-space MSRs.
    pub msr: Option<Arc<dyn MsrHandler>>,
    /// CPUID edits.
    pub cpuid: Option<Arc<CpuidHook>>,
}

impl std::fmt::Debug for VmHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHooks")
            .field("hypercall", &self.hypercall.is_some())
            .field("msr", &self.msr.is_some())
            .field("cpuid", &self.cpuid.is_some())
            .finish()
    }
}
