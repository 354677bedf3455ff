//! The Hyper-V interface of a VM (contract sections 1 and 2,
//! shared/pviommu-abi.md): the CPUID leaves at 0x40000000 and the synthetic
//! MSRs, served in user space through KVM's MSR filter, except the clock
//! where KVM has one of its own (below).
//!
//! In this mode the guest sees no KVM signature anywhere: every leaf of
//! 0x40000000-0x4fffffff that KVM reports is removed, so Linux picks Hyper-V
//! (its detection takes the highest base, and KVM's would win wherever its
//! signature is) and runs `hyperv_init`.
//!
//! What the guest gets, and why (Linux 6.12: `arch/x86/kernel/cpu/mshyperv.c`,
//! `arch/x86/hyperv/hv_init.c`, `drivers/clocksource/hyperv_timer.c`):
//! - privileges (0x40000003 EAX): TIME_REF_COUNT, HYPERCALL, VP_INDEX; with
//!   a known TSC frequency the frequency MSRs (EDX bit 8 too: Linux then
//!   takes the TSC and LAPIC timer frequencies from the MSRs instead of
//!   calibrating them); and where KVM gives the guest an invariant TSC
//!   (CPUID 0x80000007 EDX bit 8: the host's TSC is constant) REFERENCE_TSC
//!   and TSC_INVARIANT (with it Linux trusts the raw TSC without a watchdog
//!   and prefers it to the reference TSC page); with the cluster-IPI hint
//!   below, GUEST_IDLE (Linux's paravirtual spinlocks, crate::processors).
//!   Nothing else: no SynIC,
//!   synthetic timers, APIC access MSRs, crash MSRs, reenlightenment,
//!   partition id or extended
//!   hypercalls, each of which makes Linux use MSRs or hypercalls pvmm does
//!   not implement.
//! - hints (0x40000004): "relaxed timing" (no MSR or hypercall behind it),
//!   "never notify long spinlock waits", and "cluster IPI" (every IPI
//!   through HvCallSendSyntheticClusterIpi, which pvmm serves); none of the
//!   TLB flush, processor-masks (SEND_IPI_EX), APIC access, nested or
//!   enlightened VMCS recommendations, which make Linux issue hypercalls or
//!   use MSRs pvmm lacks. Both spinlock pieces need the VP index in the
//!   IPI's 64-bit mask: a VM of more than 64 vCPUs goes without them.
//! - limits (0x40000005): the VM's vCPUs, the host's logical processors.
//! - MSRs: GUEST_OS_ID, HYPERCALL (the stub page), VP_INDEX,
//!   TIME_REF_COUNT, REFERENCE_TSC (the VMM writes the page), TSC_FREQUENCY,
//!   APIC_FREQUENCY, VP_ASSIST_PAGE (Linux enables one per CPU whatever
//!   CPUID says; pvmm keeps the value and writes nothing there: the page's
//!   only uses are lazy EOI and nested features, neither offered),
//!   GUEST_IDLE (a read idles the vCPU until an IPI, crate::processors), and
//!   TSC_INVARIANT_CONTROL (with TSC_INVARIANT; the CPUID bit it would
//!   expose is KVM's and visible from the start). Every other MSR of
//!   0x40000000-0x400001ff is #GP, the same on every KVM.
//!
//! Where KVM's TSC is invariant, reference time is a function of the
//! guest's TSC: `((tsc * scale) >> 64) + offset` with
//! `scale = 2^64 * 10^7 / tsc_hz` (the TSC frequency KVM reports for the
//! vCPU) and `offset` such that the boot vCPU's TSC when the VM was built is
//! time 0. The reference TSC page holds the same scale and offset, and
//! TIME_REF_COUNT reads the calling vCPU's TSC and applies the same formula,
//! so the page and the MSR agree exactly, on every vCPU (KVM keeps the
//! vCPUs' TSCs synchronized) and monotonically. A guest that rewrites its
//! own TSC moves its reference time with it, page and MSR alike.
//!
//! Without an invariant TSC (or a usable TSC frequency) there is no page:
//! the guest TSC is no timebase there (KVM adjusts a guest's TSC on hosts
//! without a constant one; measured under nested SVM, a page with a fixed
//! scale drifted 0.1-0.3% against the host), and KVM's own Hyper-V
//! emulation likewise keeps the page invalid without a stable master clock.
//! TIME_REF_COUNT then counts the host's monotonic clock from the VM's
//! start, and Linux reads it as `hyperv_clocksource_msr`.
//!
//! All of that is the fallback for a KVM without Hyper-V emulation (kvm_pvm).
//! Where KVM has its own Hyper-V clock (KVM_CAP_HYPERV_TIME: kvm_intel and
//! kvm_amd built with CONFIG_KVM_HYPERV), the MSR filter leaves
//! [`kernel_clock_msrs`] to it, as QEMU's `hv-time` does: TIME_REF_COUNT is
//! then read without leaving the kernel (a clock read through user space
//! costs a round trip per read; measured under nested SVM, Linux booted in
//! about twice the time of a kvm-clock boot that way), and with an
//! invariant TSC KVM keeps the reference TSC page in step with its master
//! clock (valid where that is stable, else marked invalid: sequence 0,
//! readers fall back to the MSR). Without one there is no page here either. KVM turns this on for a vCPU whose CPUID has the
//! Hyper-V interface signature, which this mode gives; everything else of
//! the range stays pvmm's (KVM's hypercall path needs a GUEST_OS_ID it never
//! sees, so VMCALL stays KVM's, and the hypercall page stays the contract's).

use std::ops::Range;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use iommu::abi::{
    cpuid, msr, reference_time, reference_tsc_scale, HypercallMsr, OverlayPageMsr,
    ReferenceTscPage, HV_PAGE_SIZE, HYPERCALL_PAGE_CODE,
};
use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::little_endian::{I64, U32, U64};
use zerocopy::IntoBytes;

use crate::hooks::MsrContext;
use crate::processors::Processors;
use crate::vmbus::VmBus;

/// The synthetic MSRs pvmm takes from KVM: all of 0x40000000-0x400001ff
/// (every MSR Linux's Hyper-V code names but the nested SynIC's), in one of
/// the MSR filter's 16 ranges.
pub const MSR_RANGE: Range<u32> = 0x4000_0000..0x4000_0200;

/// The synthetic MSRs KVM serves itself where it has its own Hyper-V clock
/// ([`HvParams::kernel_clock`]): the MSR filter leaves them to KVM. The
/// reference TSC page only with an invariant TSC ([`HvParams::invariant_tsc`]):
/// measured in L1 under nested SVM (a TSC KVM runs in catch-up mode), KVM's
/// page came out valid yet its TIME_REF_COUNT stopped advancing once the
/// page was set; without the page KVM counts its kvmclock, which keeps time.
pub fn kernel_clock_msrs(invariant_tsc: bool) -> &'static [u32] {
    const WITH_PAGE: [u32; 4] = [
        msr::TIME_REF_COUNT,
        msr::TSC_FREQUENCY,
        msr::APIC_FREQUENCY,
        msr::REFERENCE_TSC,
    ];
    if invariant_tsc {
        &WITH_PAGE
    } else {
        &WITH_PAGE[..3]
    }
}

/// The highest Hyper-V leaf pvmm reports.
pub const MAX_LEAF: u32 = cpuid::LEAF_HARDWARE_FEATURES;

/// VMM choice: the hypervisor version in leaf 0x40000002: 10.0, build
/// 20348 (a current Hyper-V's), no service pack.
pub const VERSION_MAJOR_MINOR: u32 = 10 << 16;
/// See [`VERSION_MAJOR_MINOR`].
pub const VERSION_BUILD: u32 = 20348;

/// The local APIC timer frequency of KVM's in-kernel LAPIC: its bus cycle
/// is 1 ns (APIC_BUS_CYCLE_NS), whatever the host.
pub const KVM_APIC_FREQUENCY_HZ: u64 = 1_000_000_000;

/// The CPUID leaf of the AMD/Intel power-management features; EDX bit 8 is
/// the invariant TSC.
const LEAF_ADVANCED_POWER: u32 = 0x8000_0007;
const INVARIANT_TSC: u32 = 1 << 8;

/// Whether `entries` (KVM's supported CPUID) give the guest an invariant
/// TSC.
pub fn invariant_tsc(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .any(|e| e.function == LEAF_ADVANCED_POWER && e.edx & INVARIANT_TSC != 0)
}

/// What the partition is built from, fixed when the VM is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HvParams {
    /// vCPUs of the VM (leaf 0x40000005 EAX; VP indices below it).
    pub vcpus: u32,
    /// Logical processors of the host (leaf 0x40000005 EBX).
    pub host_cpus: u32,
    /// The vCPUs' TSC frequency in kHz (KVM_GET_TSC_KHZ), if known.
    pub tsc_khz: Option<u32>,
    /// The boot vCPU's TSC when the VM was built: reference time 0.
    pub tsc_at_start: u64,
    /// KVM gives the guest an invariant TSC: the reference TSC page (and
    /// TSC_INVARIANT) are offered only then.
    pub invariant_tsc: bool,
    /// The pvIOMMU is visible: device domain and DMA remapping bits.
    pub pviommu: bool,
    /// KVM serves the reference counter, the reference TSC page and the
    /// frequency MSRs itself (KVM_CAP_HYPERV_TIME): [`kernel_clock_msrs`].
    pub kernel_clock: bool,
}

/// Where reference time comes from.
#[derive(Clone, Copy, Debug)]
enum Clock {
    /// The guest's TSC, through the reference TSC page's formula.
    Tsc {
        scale: u64,
        offset: i64,
        /// When the boot vCPU's TSC was `tsc_at_start`: for the estimate
        /// used if KVM cannot read a TSC.
        start: Instant,
    },
    /// No usable TSC frequency: the host's monotonic clock.
    Host { start: Instant },
    /// KVM's own ([`kernel_clock_msrs`]); `start` only for a read that
    /// reaches pvmm all the same.
    Kernel { start: Instant },
}

impl Clock {
    fn new(p: &HvParams) -> Self {
        let start = Instant::now();
        if p.kernel_clock {
            return Clock::Kernel { start };
        }
        let scale = tsc_hz(p).and_then(reference_tsc_scale);
        match scale.filter(|_| p.invariant_tsc) {
            Some(scale) => Clock::Tsc {
                scale,
                offset: 0i64.wrapping_sub_unsigned(reference_time(p.tsc_at_start, scale, 0)),
                start,
            },
            None => Clock::Host { start },
        }
    }
}

/// The TSC frequency in Hz, if KVM reported one.
fn tsc_hz(p: &HvParams) -> Option<u64> {
    p.tsc_khz
        .filter(|&khz| khz != 0)
        .map(|khz| u64::from(khz) * 1000)
}

/// 100 ns units since `start`.
fn host_time(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos() / 100).unwrap_or(u64::MAX)
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

/// One VM's Hyper-V interface: CPUID and synthetic MSR state.
#[derive(Debug)]
pub struct Partition {
    params: HvParams,
    clock: Clock,
    /// GUEST_OS_ID (partition-wide).
    guest_os_id: AtomicU64,
    /// HYPERCALL (partition-wide).
    hypercall: AtomicU64,
    /// REFERENCE_TSC (partition-wide).
    reference_tsc: AtomicU64,
    /// How many times the reference TSC page was written.
    tsc_page_writes: AtomicU32,
    /// TSC_INVARIANT_CONTROL (partition-wide).
    tsc_invariant_control: AtomicU64,
    /// VP_ASSIST_PAGE of each vCPU.
    vp_assist: Box<[AtomicU64]>,
    /// Serializes the writes that put something in guest memory.
    page_writes: Mutex<()>,
    /// A TSC read failed (logged once).
    tsc_read_failed: AtomicBool,
    /// The vCPUs, for cluster IPIs and GUEST_IDLE ([`Partition::with_processors`]).
    processors: Option<Arc<Processors>>,
    /// The SynICs and VMBus ([`Partition::with_vmbus`]).
    vmbus: Option<Arc<VmBus>>,
}

impl Partition {
    /// The interface for a VM built with `params`.
    pub fn new(params: HvParams) -> Self {
        Self {
            clock: Clock::new(&params),
            guest_os_id: AtomicU64::new(0),
            hypercall: AtomicU64::new(0),
            reference_tsc: AtomicU64::new(0),
            tsc_page_writes: AtomicU32::new(0),
            tsc_invariant_control: AtomicU64::new(0),
            vp_assist: (0..params.vcpus).map(|_| AtomicU64::new(0)).collect(),
            page_writes: Mutex::new(()),
            tsc_read_failed: AtomicBool::new(false),
            processors: None,
            vmbus: None,
            params,
        }
    }

    /// Offers cluster IPIs and GUEST_IDLE (Linux's paravirtual spinlocks)
    /// over `processors`.
    pub fn with_processors(mut self, processors: Arc<Processors>) -> Self {
        self.processors = Some(processors);
        self
    }

    /// Offers the SynIC, HvCallPostMessage and VMBus over `vmbus`.
    pub fn with_vmbus(mut self, vmbus: Arc<VmBus>) -> Self {
        self.vmbus = Some(vmbus);
        self
    }

    /// VMBus, if offered.
    pub fn vmbus(&self) -> Option<&Arc<VmBus>> {
        self.vmbus.as_ref()
    }

    /// The vCPUs, if cluster IPIs and GUEST_IDLE are offered.
    pub fn processors(&self) -> Option<&Arc<Processors>> {
        self.processors.as_ref()
    }

    /// What the partition was built from.
    pub fn params(&self) -> &HvParams {
        &self.params
    }

    /// The TSC frequency the frequency MSRs report, if KVM gave one.
    pub fn tsc_hz(&self) -> Option<u64> {
        tsc_hz(&self.params)
    }

    /// Whether the reference TSC page is offered.
    pub fn reference_tsc_available(&self) -> bool {
        match self.clock {
            Clock::Tsc { .. } => true,
            Clock::Kernel { .. } => self.params.invariant_tsc,
            Clock::Host { .. } => false,
        }
    }

    /// Whether KVM serves the clock MSRs ([`kernel_clock_msrs`]).
    pub fn kernel_clock(&self) -> bool {
        matches!(self.clock, Clock::Kernel { .. })
    }

    fn frequency_msrs_available(&self) -> bool {
        self.kernel_clock() || self.tsc_hz().is_some()
    }

    fn tsc_invariant(&self) -> bool {
        self.params.invariant_tsc
    }

    /// Leaf 0x40000003 EAX: the partition's privileges.
    pub fn privileges(&self) -> u32 {
        let mut eax = cpuid::FEATURES_EAX_TIME_REF_COUNT
            | cpuid::FEATURES_EAX_HYPERCALL_MSRS
            | cpuid::FEATURES_EAX_VP_INDEX;
        if self.reference_tsc_available() {
            eax |= cpuid::FEATURES_EAX_REFERENCE_TSC;
        }
        if self.frequency_msrs_available() {
            eax |= cpuid::FEATURES_EAX_FREQUENCY_MSRS;
        }
        if self.tsc_invariant() {
            eax |= cpuid::FEATURES_EAX_TSC_INVARIANT;
        }
        if self.processors.is_some() {
            eax |= cpuid::FEATURES_EAX_GUEST_IDLE;
        }
        if self.vmbus.is_some() {
            eax |= cpuid::FEATURES_EAX_SYNIC;
        }
        eax
    }

    /// Leaf 0x40000003 EBX: the partition's call privileges.
    pub fn features_ebx(&self) -> u32 {
        if self.vmbus.is_some() {
            cpuid::FEATURES_EBX_POST_MESSAGES | cpuid::FEATURES_EBX_SIGNAL_EVENTS
        } else {
            0
        }
    }

    /// Leaf 0x40000004 EAX: recommendations.
    pub fn hints(&self) -> u32 {
        let mut eax = cpuid::HINTS_EAX_RELAXED_TIMING;
        if self.processors.is_some() {
            eax |= cpuid::HINTS_EAX_CLUSTER_IPI;
        }
        if self.vmbus.is_some() {
            eax |= cpuid::HINTS_EAX_DEPRECATING_AEOI;
        }
        eax
    }

    /// Leaf 0x40000003 EDX: features.
    pub fn features_edx(&self) -> u32 {
        let mut edx = 0;
        if self.frequency_msrs_available() {
            edx |= cpuid::FEATURES_EDX_FREQUENCY_MSRS;
        }
        if self.params.pviommu {
            edx |= cpuid::FEATURES_EDX_DEVICE_DOMAINS | cpuid::FEATURES_EDX_S1_DEVICE_DOMAINS;
        }
        edx
    }

    /// The Hyper-V leaves, 0x40000000 to [`MAX_LEAF`].
    pub fn leaves(&self) -> [kvm_cpuid_entry2; 7] {
        let hardware = if self.params.pviommu {
            cpuid::HARDWARE_EAX_DMA_REMAPPING
        } else {
            0
        };
        [
            leaf(
                cpuid::LEAF_VENDOR,
                MAX_LEAF,
                cpuid::VENDOR_EBX,
                cpuid::VENDOR_ECX,
                cpuid::VENDOR_EDX,
            ),
            leaf(cpuid::LEAF_INTERFACE, cpuid::INTERFACE_EAX, 0, 0, 0),
            leaf(
                cpuid::LEAF_VERSION,
                VERSION_BUILD,
                VERSION_MAJOR_MINOR,
                0,
                0,
            ),
            leaf(
                cpuid::LEAF_FEATURES,
                self.privileges(),
                self.features_ebx(),
                0,
                self.features_edx(),
            ),
            leaf(
                cpuid::LEAF_HINTS,
                self.hints(),
                cpuid::HINTS_EBX_NEVER_NOTIFY_SPINLOCKS,
                0,
                0,
            ),
            leaf(
                cpuid::LEAF_LIMITS,
                self.params.vcpus,
                self.params.host_cpus.max(1),
                0,
                0,
            ),
            leaf(cpuid::LEAF_HARDWARE_FEATURES, hardware, 0, 0, 0),
        ]
    }

    /// Replaces every hypervisor leaf KVM reports (its signature included)
    /// by the Hyper-V leaves.
    pub fn cpuid(&self, entries: &mut Vec<kvm_cpuid_entry2>) {
        entries.retain(|e| !cpuid::HYPERVISOR_LEAVES.contains(&e.function));
        entries.extend(self.leaves());
    }

    /// Whether the hypercall page is enabled.
    pub fn hypercall_enabled(&self) -> bool {
        HypercallMsr::from_bits(self.hypercall.load(Ordering::Acquire)).enable()
    }

    /// Reference time as vCPU `ctx` sees it now.
    pub fn reference_time(&self, ctx: &MsrContext<'_>) -> u64 {
        match self.clock {
            Clock::Tsc {
                scale,
                offset,
                start,
                ..
            } => match ctx.guest_tsc() {
                Some(tsc) => reference_time(tsc, scale, offset),
                None => {
                    if !self.tsc_read_failed.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "Hyper-V: KVM cannot read vCPU {}'s TSC: TIME_REF_COUNT follows the host clock",
                            ctx.vp_index()
                        );
                    }
                    host_time(start)
                }
            },
            Clock::Host { start } | Clock::Kernel { start } => host_time(start),
        }
    }

    /// The reference TSC page pvmm writes (sequence aside).
    pub fn tsc_page(&self) -> Option<ReferenceTscPage> {
        match self.clock {
            Clock::Tsc { scale, offset, .. } => Some(ReferenceTscPage {
                tsc_sequence: U32::new(0),
                reserved1: U32::new(0),
                tsc_scale: U64::new(scale),
                tsc_offset: I64::new(offset),
            }),
            Clock::Host { .. } | Clock::Kernel { .. } => None,
        }
    }

    /// A read of synthetic MSR `index`; `None` injects #GP.
    pub fn read_msr(&self, ctx: &MsrContext<'_>, index: u32) -> Option<u64> {
        let load = |a: &AtomicU64| a.load(Ordering::Acquire);
        match index {
            msr::GUEST_OS_ID => Some(load(&self.guest_os_id)),
            msr::HYPERCALL => Some(load(&self.hypercall)),
            msr::VP_INDEX => Some(u64::from(ctx.vp_index())),
            msr::TIME_REF_COUNT => Some(self.reference_time(ctx)),
            msr::REFERENCE_TSC if self.reference_tsc_available() => Some(load(&self.reference_tsc)),
            msr::TSC_FREQUENCY if self.frequency_msrs_available() => self.tsc_hz(),
            msr::APIC_FREQUENCY if self.frequency_msrs_available() => Some(KVM_APIC_FREQUENCY_HZ),
            msr::VP_ASSIST_PAGE => self.vp_assist_slot(ctx).map(load),
            msr::TSC_INVARIANT_CONTROL if self.tsc_invariant() => {
                Some(load(&self.tsc_invariant_control))
            }
            msr::GUEST_IDLE => self.processors.as_ref().map(|p| {
                p.idle(ctx.vp_index());
                0
            }),
            _ if msr::is_synic(index) => self.vmbus.as_ref()?.read_msr(ctx.vp_index(), index),
            _ => None,
        }
    }

    /// A write of synthetic MSR `index`; `false` injects #GP (read-only and
    /// unknown MSRs, reserved bits, pages outside guest RAM).
    pub fn write_msr(&self, ctx: &MsrContext<'_>, index: u32, value: u64) -> bool {
        match index {
            msr::GUEST_OS_ID => {
                self.guest_os_id.store(value, Ordering::Release);
                true
            }
            msr::HYPERCALL => self.write_hypercall(ctx.mem(), value),
            msr::REFERENCE_TSC if self.reference_tsc_available() => {
                self.write_reference_tsc(ctx.mem(), value)
            }
            msr::VP_ASSIST_PAGE => self.write_vp_assist(ctx, value),
            msr::TSC_INVARIANT_CONTROL if self.tsc_invariant() => {
                if value & !msr::TSC_INVARIANT_EXPOSE != 0 {
                    return false;
                }
                self.tsc_invariant_control.store(value, Ordering::Release);
                true
            }
            _ if msr::is_synic(index) => self
                .vmbus
                .as_ref()
                .is_some_and(|b| b.write_msr(ctx.vp_index(), index, value)),
            // VP_INDEX, TIME_REF_COUNT and the frequencies are read-only.
            _ => false,
        }
    }

    /// A write to the HYPERCALL MSR.
    fn write_hypercall(&self, mem: &GuestMemoryMmap, value: u64) -> bool {
        let new = HypercallMsr::from_bits(value);
        if new.reserved() != 0 {
            return false;
        }
        let _writes = devices::lock::mutex(&self.page_writes);
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
            if !page_in_ram(mem, gpa) || mem.write_slice(&HYPERCALL_PAGE_CODE, gpa).is_err() {
                return false;
            }
        }
        self.hypercall.store(value, Ordering::Release);
        true
    }

    /// A write to the REFERENCE_TSC MSR: on enable, the page gets the
    /// scale and offset, then a new non-zero sequence.
    fn write_reference_tsc(&self, mem: &GuestMemoryMmap, value: u64) -> bool {
        let new = OverlayPageMsr::from_bits(value);
        if new.reserved() != 0 {
            return false;
        }
        let _writes = devices::lock::mutex(&self.page_writes);
        if new.enable() {
            let Some(mut page) = self.tsc_page() else {
                return false;
            };
            let gpa = GuestAddress(new.gpn() << 12);
            if !page_in_ram(mem, gpa) {
                return false;
            }
            // Sequence 0 first (a reader that sees it falls back to the
            // MSR), then scale and offset, then the new sequence: 1 to
            // 0xfffffffe (0 is invalid; old TLFS versions also reserved
            // 0xffffffff).
            let n = self.tsc_page_writes.fetch_add(1, Ordering::Relaxed);
            let sequence = n % (u32::MAX - 1) + 1;
            page.tsc_sequence = U32::new(ReferenceTscPage::INVALID_SEQUENCE);
            if mem.write_slice(page.as_bytes(), gpa).is_err() {
                return false;
            }
            fence(Ordering::Release);
            if mem.write_slice(U32::new(sequence).as_bytes(), gpa).is_err() {
                return false;
            }
        }
        self.reference_tsc.store(value, Ordering::Release);
        true
    }

    fn vp_assist_slot(&self, ctx: &MsrContext<'_>) -> Option<&AtomicU64> {
        usize::try_from(ctx.vp_index())
            .ok()
            .and_then(|i| self.vp_assist.get(i))
    }

    /// A write to VP_ASSIST_PAGE: kept (nothing is written to the page).
    fn write_vp_assist(&self, ctx: &MsrContext<'_>, value: u64) -> bool {
        let new = OverlayPageMsr::from_bits(value);
        let Some(slot) = self.vp_assist_slot(ctx) else {
            return false;
        };
        if new.reserved() != 0
            || (new.enable() && !page_in_ram(ctx.mem(), GuestAddress(new.gpn() << 12)))
        {
            return false;
        }
        slot.store(value, Ordering::Release);
        true
    }
}

/// The partition's calls (the dispatcher's `vp` kind): each exists only
/// where the partition offers it.
impl iommu::Processors for Partition {
    fn offers(&self, code: iommu::abi::HypercallCode) -> bool {
        match code {
            iommu::abi::HypercallCode::SEND_SYNTHETIC_CLUSTER_IPI => self.processors.is_some(),
            iommu::abi::HypercallCode::POST_MESSAGE
            | iommu::abi::HypercallCode::SIGNAL_EVENT
            | iommu::abi::HypercallCode::RETARGET_INTERRUPT => self.vmbus.is_some(),
            _ => false,
        }
    }

    fn send_ipi(&self, vector: u8, targets: u64) -> Result<(), iommu::abi::HvError> {
        self.processors
            .as_ref()
            .ok_or(iommu::abi::HvError::INVALID_HYPERCALL_CODE)?
            .send_ipi(vector, targets)
    }

    fn post_message(
        &self,
        vp: u32,
        input: &iommu::abi::InputPostMessage,
    ) -> Result<(), iommu::abi::HvError> {
        self.vmbus
            .as_ref()
            .ok_or(iommu::abi::HvError::INVALID_HYPERCALL_CODE)?
            .post_message(vp, input)
    }

    fn signal_event(
        &self,
        vp: u32,
        input: &iommu::abi::InputSignalEvent,
    ) -> Result<(), iommu::abi::HvError> {
        self.vmbus
            .as_ref()
            .ok_or(iommu::abi::HvError::INVALID_HYPERCALL_CODE)?
            .signal_event(vp, input)
    }

    fn retarget_interrupt(
        &self,
        device: iommu::DeviceId,
        address: u32,
        data: u32,
        vector: u32,
        vps: u64,
    ) -> Result<(), iommu::abi::HvError> {
        self.vmbus
            .as_ref()
            .ok_or(iommu::abi::HvError::INVALID_HYPERCALL_CODE)?
            .retarget_interrupt(device, address, data, vector, vps)
    }
}

/// Whether the 4 KiB page at `gpa` is guest RAM.
fn page_in_ram(mem: &GuestMemoryMmap, gpa: GuestAddress) -> bool {
    usize::try_from(HV_PAGE_SIZE).is_ok_and(|len| GuestMemoryBackend::check_range(mem, gpa, len))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use vm_memory::GuestMemoryMmap;
    use zerocopy::FromBytes;

    const MIB: usize = 1 << 20;
    const TSC_KHZ: u32 = 2_500_000;

    fn params() -> HvParams {
        HvParams {
            vcpus: 2,
            host_cpus: 8,
            tsc_khz: Some(TSC_KHZ),
            tsc_at_start: 1_000_000,
            invariant_tsc: true,
            pviommu: true,
            kernel_clock: false,
        }
    }

    fn memory() -> GuestMemoryMmap {
        // RAM at 0-1 MiB and 2-3 MiB: a hole between.
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), MIB),
            (GuestAddress(2 * MIB as u64), MIB),
        ])
        .unwrap()
    }

    /// Runs `f` with the context of vCPU `vp`, whose TSC reads `tsc`.
    fn with_ctx<R>(
        mem: &GuestMemoryMmap,
        vp: u32,
        tsc: Option<u64>,
        f: impl FnOnce(&MsrContext<'_>) -> R,
    ) -> R {
        let read = || tsc;
        f(&MsrContext::new(mem, vp, &read))
    }

    fn read(p: &Partition, mem: &GuestMemoryMmap, index: u32) -> Option<u64> {
        with_ctx(mem, 0, Some(0), |c| p.read_msr(c, index))
    }

    fn write(p: &Partition, mem: &GuestMemoryMmap, index: u32, value: u64) -> bool {
        with_ctx(mem, 0, Some(0), |c| p.write_msr(c, index, value))
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32) -> Option<&kvm_cpuid_entry2> {
        entries.iter().find(|e| e.function == f)
    }

    /// What KVM reports: its signature (max leaf 0x40000001), its
    /// features, and an invariant TSC.
    fn kvm_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0xd, 0, 0, 0),
            leaf(0x4000_0000, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x4000_0001, 0x1234, 0, 0, 0),
            leaf(0x4000_0100, 0x4000_0101, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x8000_0007, 0, 0, 0, 1 << 8),
        ]
    }

    fn signature(e: &kvm_cpuid_entry2) -> [u8; 12] {
        let mut s = [0u8; 12];
        s[..4].copy_from_slice(&e.ebx.to_le_bytes());
        s[4..8].copy_from_slice(&e.ecx.to_le_bytes());
        s[8..].copy_from_slice(&e.edx.to_le_bytes());
        s
    }

    #[test]
    fn cpuid_leaves_follow_the_contract() {
        let mut entries = kvm_like();
        assert!(invariant_tsc(&entries));
        let p = Partition::new(params());
        p.cpuid(&mut entries);
        let v = find(&entries, 0x4000_0000).unwrap();
        assert_eq!(
            (v.eax, v.ebx, v.ecx, v.edx),
            (0x4000_0006, 0x7263_694d, 0x666f_736f, 0x7648_2074)
        );
        assert_eq!(&signature(v), b"Microsoft Hv");
        assert_eq!(find(&entries, 0x4000_0001).unwrap().eax, 0x3123_7648);
        let version = find(&entries, 0x4000_0002).unwrap();
        assert_eq!((version.eax, version.ebx), (20348, 0x000a_0000));
        let f = find(&entries, 0x4000_0003).unwrap();
        // TIME_REF_COUNT, HYPERCALL, VP_INDEX, REFERENCE_TSC, frequency
        // MSRs, TSC invariant; frequency MSRs and device domains.
        assert_eq!(f.eax, 1 << 1 | 1 << 5 | 1 << 6 | 1 << 9 | 1 << 11 | 1 << 15);
        assert_eq!((f.ebx, f.ecx), (0, 0));
        assert_eq!(f.edx, 1 << 8 | 1 << 24 | 1 << 25);
        let hints = find(&entries, 0x4000_0004).unwrap();
        assert_eq!((hints.eax, hints.ebx), (1 << 5, u32::MAX));
        let limits = find(&entries, 0x4000_0005).unwrap();
        assert_eq!((limits.eax, limits.ebx), (2, 8));
        assert_eq!(find(&entries, 0x4000_0006).unwrap().eax, 1 << 4);
        // No KVM signature anywhere; nothing else of KVM's.
        assert!(entries.iter().all(|e| signature(e) != *b"KVMKVMKVM\0\0\0"));
        assert!(find(&entries, 0x4000_0100).is_none());
        assert!(entries
            .iter()
            .filter(|e| cpuid::HYPERVISOR_LEAVES.contains(&e.function))
            .all(|e| (0x4000_0000..=MAX_LEAF).contains(&e.function)));
        assert_eq!(find(&entries, 0).unwrap().eax, 0xd);
        // Each leaf once.
        let mut fs: Vec<u32> = entries.iter().map(|e| e.function).collect();
        fs.sort_unstable();
        fs.dedup();
        assert_eq!(fs.len(), entries.len());
    }

    #[test]
    fn cpuid_without_tsc_frequency_invariance_or_pviommu() {
        let p = Partition::new(HvParams {
            tsc_khz: None,
            invariant_tsc: false,
            pviommu: false,
            ..params()
        });
        let l = p.leaves();
        assert_eq!(l[3].eax, 1 << 1 | 1 << 5 | 1 << 6);
        assert_eq!(l[3].edx, 0);
        assert_eq!(l[6].eax, 0);
        // A TSC at or below 10 MHz cannot have a page either.
        let slow = Partition::new(HvParams {
            tsc_khz: Some(10_000),
            ..params()
        });
        assert_eq!(slow.privileges() & (1 << 9), 0);
        assert!(!slow.reference_tsc_available());
        let mem = memory();
        assert_eq!(read(&p, &mem, msr::TSC_FREQUENCY), None);
        assert_eq!(read(&p, &mem, msr::REFERENCE_TSC), None);
        assert!(!write(&p, &mem, msr::REFERENCE_TSC, 0x1001));
        assert_eq!(read(&p, &mem, msr::TSC_INVARIANT_CONTROL), None);
        host_clock_reference_time(&p, &mem);
    }

    /// Linux's paravirtual spinlocks: GUEST_IDLE (privilege bit 10) and the
    /// cluster-IPI hint (hint bit 10) come with processors, and not without;
    /// a GUEST_IDLE read returns 0 after the vCPU's kick.
    #[test]
    fn guest_idle_and_cluster_ipis_only_with_processors() {
        let mem = memory();
        let without = Partition::new(params());
        assert_eq!(without.privileges() & 1 << 10, 0);
        assert_eq!(without.leaves()[4].eax, 1 << 5);
        assert_eq!(read(&without, &mem, msr::GUEST_IDLE), None);

        let (_, vps) = crate::processors::tests::processors(2);
        let with = Partition::new(params()).with_processors(vps.clone());
        assert_eq!(with.privileges() & 1 << 10, 1 << 10);
        assert_eq!(with.leaves()[4].eax, 1 << 5 | 1 << 10);
        iommu::Processors::send_ipi(vps.as_ref(), 0xf7, 0b1).unwrap();
        assert_eq!(read(&with, &mem, msr::GUEST_IDLE), Some(0));
        // Read-only.
        assert!(!write(&with, &mem, msr::GUEST_IDLE, 0));
    }

    /// VMBus brings the SynIC, POST_MESSAGE and SIGNAL_EVENT privileges and
    /// the AEOI deprecation; without it the SynIC MSRs are #GP and VMBus's
    /// calls (RETARGET_INTERRUPT too) do not exist.
    #[test]
    fn synic_and_post_message_only_with_vmbus() {
        use iommu::Processors as _;
        let mem = memory();
        let without = Partition::new(params());
        assert_eq!(without.privileges() & 1 << 2, 0);
        assert_eq!(
            (without.leaves()[3].ebx, without.leaves()[4].eax),
            (0, 1 << 5)
        );
        assert_eq!(read(&without, &mem, msr::SCONTROL), None);
        assert!(!write(&without, &mem, msr::SIMP, 0x1000 | 1));
        let input = iommu::abi::InputPostMessage::new(4, 1, &[0; 8]).unwrap();
        assert_eq!(
            without.post_message(0, &input),
            Err(iommu::abi::HvError::INVALID_HYPERCALL_CODE)
        );
        assert_eq!(
            without.send_ipi(0xf7, 1),
            Err(iommu::abi::HvError::INVALID_HYPERCALL_CODE)
        );

        use iommu::abi::HypercallCode as Code;
        let calls = [
            Code::POST_MESSAGE,
            Code::SIGNAL_EVENT,
            Code::RETARGET_INTERRUPT,
        ];
        assert!(calls.iter().all(|&c| !without.offers(c)));

        let (rec, _) = crate::processors::tests::processors(1);
        let bus = crate::vmbus::VmBus::new(1, Arc::new(memory()), rec);
        let with = Partition::new(params()).with_vmbus(Arc::new(bus));
        assert!(calls.iter().all(|&c| with.offers(c)));
        // No vPCI bus has this logical id; no channel this connection id.
        assert_eq!(
            with.retarget_interrupt(
                iommu::DeviceId::logical(0x5601_0000),
                0xfee0_0000,
                0x41,
                0x41,
                1
            ),
            Err(iommu::abi::HvError::INVALID_DEVICE_ID)
        );
        let signal = iommu::abi::InputSignalEvent {
            connection_id: 0x1001.into(),
            flag_number: 0.into(),
            reserved: 0.into(),
        };
        assert_eq!(
            with.signal_event(0, &signal),
            Err(iommu::abi::HvError::INVALID_CONNECTION_ID)
        );
        assert_eq!(with.privileges() & 1 << 2, 1 << 2);
        assert_eq!(
            (with.leaves()[3].ebx, with.leaves()[4].eax),
            (1 << 4 | 1 << 5, 1 << 5 | 1 << 9)
        );
        assert!(write(&with, &mem, msr::SIMP, 0x1000 | 1));
        assert_eq!(read(&with, &mem, msr::SIMP), Some(0x1000 | 1));
        assert_eq!(read(&with, &mem, msr::SVERSION), Some(1));
        assert!(!write(&with, &mem, msr::SVERSION, 2));
        // The call reaches the server: a channel message of type 0 is refused.
        assert_eq!(
            with.post_message(0, &input),
            Err(iommu::abi::HvError::INVALID_PARAMETER)
        );
    }

    /// TIME_REF_COUNT follows the host clock from the VM's start, whatever
    /// the guest TSC says.
    fn host_clock_reference_time(p: &Partition, mem: &GuestMemoryMmap) {
        let at = |tsc| with_ctx(mem, 0, Some(tsc), |c| p.read_msr(c, msr::TIME_REF_COUNT)).unwrap();
        let t0 = at(u64::MAX);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let t1 = at(0);
        assert!(t1 >= t0 + 20_000, "{t0} {t1}");
        assert!(t1 < 100_000_000, "far more than the test ran: {t1}");
    }

    /// A host without a constant TSC: frequency MSRs, but no reference TSC
    /// page and no TSC_INVARIANT; the reference counter is the host's.
    #[test]
    fn no_invariant_tsc_no_tsc_page() {
        let p = Partition::new(HvParams {
            invariant_tsc: false,
            ..params()
        });
        assert_eq!(p.privileges(), 1 << 1 | 1 << 5 | 1 << 6 | 1 << 11);
        assert_eq!(p.features_edx(), 1 << 8 | 1 << 24 | 1 << 25);
        assert!(!p.reference_tsc_available());
        assert_eq!(p.tsc_page(), None);
        let mem = memory();
        assert_eq!(read(&p, &mem, msr::TSC_FREQUENCY), Some(2_500_000_000));
        assert_eq!(read(&p, &mem, msr::APIC_FREQUENCY), Some(1_000_000_000));
        assert_eq!(read(&p, &mem, msr::REFERENCE_TSC), None);
        assert!(!write(&p, &mem, msr::REFERENCE_TSC, 0x5001));
        assert!(!write(&p, &mem, msr::TSC_INVARIANT_CONTROL, 1));
        host_clock_reference_time(&p, &mem);
    }

    /// KVM's own clock: the frequencies are offered (KVM serves them), the
    /// page and TSC_INVARIANT only with an invariant TSC, and pvmm writes no
    /// page of its own.
    #[test]
    fn kernel_clock_offers_what_kvm_serves() {
        for invariant_tsc in [false, true] {
            let p = Partition::new(HvParams {
                kernel_clock: true,
                invariant_tsc,
                tsc_khz: None,
                ..params()
            });
            assert!(p.kernel_clock());
            assert_eq!(p.reference_tsc_available(), invariant_tsc);
            let page_and_invariant = if invariant_tsc { 1 << 9 | 1 << 15 } else { 0 };
            assert_eq!(
                p.privileges(),
                1 << 1 | 1 << 5 | 1 << 6 | 1 << 11 | page_and_invariant
            );
            assert_eq!(p.features_edx() & 1 << 8, 1 << 8);
            assert_eq!(p.tsc_page(), None);
            // The MSRs left to KVM are the clock's, inside the filtered
            // range, the page's only where it is offered.
            let left = kernel_clock_msrs(invariant_tsc);
            assert!(left.iter().all(|m| MSR_RANGE.contains(m)));
            assert_eq!(left.contains(&msr::REFERENCE_TSC), invariant_tsc);
            assert!(left.contains(&msr::TIME_REF_COUNT));
        }
    }

    #[test]
    fn time_ref_count_is_the_tsc_since_the_start_in_100_ns() {
        let p = Partition::new(params());
        let mem = memory();
        let ticks_per_unit = u64::from(TSC_KHZ) / 10_000; // 250
        let at = |vp: u32, tsc: u64| {
            with_ctx(&mem, vp, Some(tsc), |c| p.read_msr(c, msr::TIME_REF_COUNT)).unwrap()
        };
        assert_eq!(at(0, 1_000_000), 0, "the start is time 0");
        // Monotonic as the TSC goes up, the same on every vCPU.
        let mut last = 0;
        for step in 1..1000u64 {
            let tsc = 1_000_000 + step * step * 977;
            let t = at((step % 2) as u32, tsc);
            assert!(t >= last, "step {step}: {t} < {last}");
            assert_eq!(t, at(1 - (step % 2) as u32, tsc));
            // Within one unit of the exact value (the scale and the
            // start's offset are both rounded down).
            let exact = (tsc - 1_000_000) / ticks_per_unit;
            assert!(t.abs_diff(exact) <= 1, "{t} {exact}");
            last = t;
        }
        // One second of TSC ticks is 10^7 units.
        let one_s = at(0, 1_000_000 + u64::from(TSC_KHZ) * 1000);
        assert!((9_999_999..=10_000_000).contains(&one_s), "{one_s}");
        // Read-only.
        assert!(!write(&p, &mem, msr::TIME_REF_COUNT, 5));
        // KVM cannot read the TSC: the host clock since the start, no
        // panic, no #GP.
        let t = with_ctx(&mem, 0, None, |c| p.read_msr(c, msr::TIME_REF_COUNT));
        assert!(t.is_some_and(|t| t < 100_000_000));
    }

    #[test]
    fn tsc_page_gives_the_msr_time() {
        let p = Partition::new(params());
        let mem = memory();
        let gpa = 0x5000u64;
        // Garbage where the page goes: the VMM writes the header.
        mem.write_slice(&[0xAAu8; 4096], GuestAddress(gpa)).unwrap();
        let enable = OverlayPageMsr::new().with_enable(true).with_gpn(gpa >> 12);
        assert!(write(&p, &mem, msr::REFERENCE_TSC, enable.into_bits()));
        assert_eq!(read(&p, &mem, msr::REFERENCE_TSC), Some(enable.into_bits()));
        let mut bytes = [0u8; 24];
        mem.read_slice(&mut bytes, GuestAddress(gpa)).unwrap();
        let page = ReferenceTscPage::read_from_bytes(&bytes).unwrap();
        assert_eq!(page.tsc_sequence.get(), 1);
        assert_eq!(page.reserved1.get(), 0);
        // scale = 2^64 * 10^7 / 2.5 GHz (rounded down); the start (TSC
        // 10^6, 4000 units less a rounding) is time 0.
        assert_eq!(
            page.tsc_scale.get(),
            u64::try_from((1u128 << 64) / 250).unwrap()
        );
        assert_eq!(page.tsc_offset.get(), -3999);
        // Guest time from a TSC value, as Linux computes it, is the MSR's.
        for tsc in [1_000_000u64, 1_000_250, 123_456_789_012, 1 << 50] {
            let msr_time =
                with_ctx(&mem, 1, Some(tsc), |c| p.read_msr(c, msr::TIME_REF_COUNT)).unwrap();
            let mul =
                u64::try_from((u128::from(tsc) * u128::from(page.tsc_scale.get())) >> 64).unwrap();
            let guest = mul.wrapping_add_signed(page.tsc_offset.get());
            assert_eq!(guest, msr_time, "TSC {tsc}");
            assert_eq!(page.reference_time(tsc), Some(msr_time));
        }
        // The rest of the page is left alone.
        let mut rest = [0u8; 8];
        mem.read_slice(&mut rest, GuestAddress(gpa + 24)).unwrap();
        assert_eq!(rest, [0xAA; 8]);
        // Enabled again elsewhere: a new sequence. Disabled: kept as is.
        let again = OverlayPageMsr::new().with_enable(true).with_gpn(0x6);
        assert!(write(&p, &mem, msr::REFERENCE_TSC, again.into_bits()));
        let seq: u32 = mem.read_obj(GuestAddress(0x6000)).unwrap();
        assert_eq!(seq, 2);
        assert!(write(&p, &mem, msr::REFERENCE_TSC, 0));
        assert_eq!(read(&p, &mem, msr::REFERENCE_TSC), Some(0));
        let seq: u32 = mem.read_obj(GuestAddress(0x6000)).unwrap();
        assert_eq!(seq, 2);
    }

    #[test]
    fn frequency_vp_and_invariant_tsc_msrs() {
        let p = Partition::new(params());
        let mem = memory();
        assert_eq!(read(&p, &mem, msr::TSC_FREQUENCY), Some(2_500_000_000));
        assert_eq!(read(&p, &mem, msr::APIC_FREQUENCY), Some(1_000_000_000));
        assert!(!write(&p, &mem, msr::TSC_FREQUENCY, 1));
        assert!(!write(&p, &mem, msr::APIC_FREQUENCY, 1));
        assert_eq!(
            with_ctx(&mem, 1, None, |c| p.read_msr(c, msr::VP_INDEX)),
            Some(1)
        );
        assert!(!write(&p, &mem, msr::VP_INDEX, 0));
        // Linux writes TSC_INVARIANT_CONTROL = 1 when bit 15 is offered.
        assert!(write(&p, &mem, msr::TSC_INVARIANT_CONTROL, 1));
        assert_eq!(read(&p, &mem, msr::TSC_INVARIANT_CONTROL), Some(1));
        assert!(!write(&p, &mem, msr::TSC_INVARIANT_CONTROL, 2));
        // Per-vCPU VP assist pages.
        let assist = |gpn| {
            OverlayPageMsr::new()
                .with_enable(true)
                .with_gpn(gpn)
                .into_bits()
        };
        assert!(with_ctx(&mem, 0, None, |c| p.write_msr(
            c,
            msr::VP_ASSIST_PAGE,
            assist(3)
        )));
        assert!(with_ctx(&mem, 1, None, |c| p.write_msr(
            c,
            msr::VP_ASSIST_PAGE,
            assist(4)
        )));
        assert_eq!(
            with_ctx(&mem, 1, None, |c| p.read_msr(c, msr::VP_ASSIST_PAGE)),
            Some(assist(4))
        );
        assert_eq!(read(&p, &mem, msr::VP_ASSIST_PAGE), Some(assist(3)));
        // Nothing else of the range.
        for index in [
            0x4000_0003,
            0x4000_0010,
            0x4000_0080,
            0x4000_00b0,
            0x4000_0100,
            0x4000_01ff,
        ] {
            assert_eq!(read(&p, &mem, index), None, "{index:#x}");
            assert!(!write(&p, &mem, index, 0), "{index:#x}");
        }
    }

    #[test]
    fn hypercall_page_needs_a_guest_os_id() {
        let p = Partition::new(params());
        let mem = memory();
        let enable = HypercallMsr::new().with_enable(true).with_gpn(0x10);
        // GUEST_OS_ID == 0: ignored.
        assert!(write(&p, &mem, msr::HYPERCALL, enable.into_bits()));
        assert_eq!(read(&p, &mem, msr::HYPERCALL), Some(0));
        assert!(!p.hypercall_enabled());
        let mut code = [0u8; HYPERCALL_PAGE_CODE.len()];
        mem.read_slice(&mut code, GuestAddress(0x10000)).unwrap();
        assert_eq!(code, [0; HYPERCALL_PAGE_CODE.len()]);
        assert!(write(&p, &mem, msr::GUEST_OS_ID, 0x8100));
        assert_eq!(read(&p, &mem, msr::GUEST_OS_ID), Some(0x8100));
        assert!(write(&p, &mem, msr::HYPERCALL, enable.into_bits()));
        assert_eq!(read(&p, &mem, msr::HYPERCALL), Some(enable.into_bits()));
        assert!(p.hypercall_enabled());
        mem.read_slice(&mut code, GuestAddress(0x10000)).unwrap();
        assert_eq!(code, HYPERCALL_PAGE_CODE);
    }

    #[test]
    fn hostile_msr_writes_are_refused() {
        let p = Partition::new(params());
        let mem = memory();
        assert!(write(&p, &mem, msr::GUEST_OS_ID, 1));
        // Pages outside guest RAM: in the hole, past the end, the highest
        // page number; and a page straddling nothing but starting in RAM is
        // fine only if all of it is RAM.
        let outside = [0x100u64, 0x2ff + 1, (1 << 52) - 1];
        for gpn in outside {
            let h = HypercallMsr::new().with_enable(true).with_gpn(gpn);
            assert!(!write(&p, &mem, msr::HYPERCALL, h.into_bits()), "{gpn:#x}");
            let o = OverlayPageMsr::new().with_enable(true).with_gpn(gpn);
            assert!(
                !write(&p, &mem, msr::REFERENCE_TSC, o.into_bits()),
                "{gpn:#x}"
            );
            assert!(
                !write(&p, &mem, msr::VP_ASSIST_PAGE, o.into_bits()),
                "{gpn:#x}"
            );
        }
        // Reserved bits.
        for bit in 1..12 {
            let o = OverlayPageMsr::new()
                .with_enable(true)
                .with_gpn(1)
                .into_bits()
                | 1 << bit;
            assert!(!write(&p, &mem, msr::REFERENCE_TSC, o), "bit {bit}");
            assert!(!write(&p, &mem, msr::VP_ASSIST_PAGE, o), "bit {bit}");
        }
        assert!(!write(&p, &mem, msr::HYPERCALL, 1 | 1 << 5));
        assert!(!write(&p, &mem, msr::TSC_INVARIANT_CONTROL, u64::MAX));
        // Nothing changed.
        for index in [
            msr::HYPERCALL,
            msr::REFERENCE_TSC,
            msr::VP_ASSIST_PAGE,
            msr::TSC_INVARIANT_CONTROL,
        ] {
            assert_eq!(read(&p, &mem, index), Some(0), "{index:#x}");
        }
        // A vCPU the partition does not know (cannot happen): #GP.
        assert_eq!(
            with_ctx(&mem, 7, None, |c| p.read_msr(c, msr::VP_ASSIST_PAGE)),
            None
        );
        assert!(!with_ctx(&mem, u32::MAX, None, |c| p.write_msr(
            c,
            msr::VP_ASSIST_PAGE,
            0
        )));
        // Disabling with any page number is fine (nothing is written).
        let off = OverlayPageMsr::new().with_gpn((1 << 52) - 1).into_bits();
        assert!(write(&p, &mem, msr::REFERENCE_TSC, off));
        assert!(write(&p, &mem, msr::VP_ASSIST_PAGE, off));
        // Locked: later writes are ignored.
        let locked = HypercallMsr::new()
            .with_enable(true)
            .with_locked(true)
            .with_gpn(1);
        assert!(write(&p, &mem, msr::HYPERCALL, locked.into_bits()));
        assert!(write(&p, &mem, msr::HYPERCALL, 0));
        assert_eq!(read(&p, &mem, msr::HYPERCALL), Some(locked.into_bits()));
        // A guest that sets its TSC below the start wraps, as the page's
        // formula does: no panic.
        let t = with_ctx(&mem, 0, Some(0), |c| p.read_msr(c, msr::TIME_REF_COUNT));
        assert_eq!(t, Some(0u64.wrapping_sub(3999)));
        // Every value, every MSR of the range, both vCPUs: no panic.
        let calls = Cell::new(0u32);
        for index in MSR_RANGE {
            for value in [0, 1, u64::MAX, 0x1001, 0xffff_ffff_ffff_f001] {
                for vp in [0, 1, 2] {
                    with_ctx(&mem, vp, Some(value), |c| {
                        let _ = p.write_msr(c, index, value);
                        let _ = p.read_msr(c, index);
                    });
                    calls.set(calls.get() + 1);
                }
            }
        }
        assert_eq!(calls.get(), 512 * 15);
    }
}
