//! Extension points of the vCPU loop for the pvIOMMU (and anything else that
//! needs them): the hypercall port, user-space MSRs and CPUID.
//!
//! - [`PortIoHypercall`]: an `out` to port [`HYPERCALL_PORT`] (0xE4, what the
//!   hypercall page runs) hands RCX, RDX and R8 (read from KVM sync regs) to
//!   the handler on the vCPU's own thread. [`HypercallOutcome::Complete`]
//!   writes RAX; [`HypercallOutcome::Continue`] writes RCX and rewinds RIP by
//!   2 so that the guest re-executes the `out` (rep time slicing).
//! - [`MsrHandler`]: the MSRs it lists are filtered out of KVM
//!   (KVM_X86_SET_MSR_FILTER) and their reads and writes come here.
//! - [`CpuidHook`]: edits each vCPU's CPUID entries after the topology is
//!   applied (for example Hyper-V leaves at 0x4000_0000 and KVM's moved to
//!   0x4000_0100).

use std::sync::Arc;

use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::GuestMemoryMmap;

/// The port the pvIOMMU hypercall page writes to.
pub const HYPERCALL_PORT: u16 = resources::layout::pio::HYPERCALL_PORT;

/// Registers of a hypercall (Hyper-V x64 convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HypercallRegs {
    /// Hypercall input value.
    pub rcx: u64,
    /// Input page GPA (or fast input).
    pub rdx: u64,
    /// Output page GPA (or fast input).
    pub r8: u64,
}

/// What the vCPU does after a hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HypercallOutcome {
    /// Done: RAX gets the result value.
    Complete {
        /// Hypercall result value.
        rax: u64,
    },
    /// Not done: RCX gets the updated input value and the `out` runs again.
    Continue {
        /// Input value with the new rep start index.
        rcx: u64,
    },
}

/// Handles `out 0xE4, al` on the calling vCPU's thread.
pub trait PortIoHypercall: Send + Sync {
    /// One hypercall from vCPU `vp_index`. Must not panic on any input.
    fn hypercall(
        &self,
        mem: &GuestMemoryMmap,
        vp_index: u32,
        regs: HypercallRegs,
    ) -> HypercallOutcome;
}

/// Handles MSRs in user space.
pub trait MsrHandler: Send + Sync {
    /// The MSRs to take over from KVM (at most 16).
    fn msrs(&self) -> Vec<u32>;
    /// A read by vCPU `vp_index`; `None` injects #GP.
    fn read(&self, mem: &GuestMemoryMmap, vp_index: u32, msr: u32) -> Option<u64>;
    /// A write by vCPU `vp_index`; `false` injects #GP.
    fn write(&self, mem: &GuestMemoryMmap, vp_index: u32, msr: u32, value: u64) -> bool;
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
