//! pvIOMMU guest ABI: typed, no_std definitions of the Hyper-V-compatible hypercall interface.
//!
//! One definition per wire format (the contract is `shared/pviommu-abi.md`):
//! call codes and statuses are newtypes over their integer, register words and
//! packed id/flag words are `bitfield-struct` types, and memory blocks are
//! `#[repr(C)]` zerocopy structs built from little-endian byte-order integers,
//! so every struct is packed (alignment 1, no padding) and little-endian
//! whatever the host. Layout tests at the end check the size and every field
//! offset against the contract.
//!
//! It also holds the Hyper-V numbers beyond the contract that share its name
//! spaces: the SynIC's MSRs (in [`msr`]) and statuses ([`HvError::ALL`] is
//! the contract's [`HvError::PVIOMMU`] and the SynIC's), used by the vmbus
//! crate, which has the SynIC's register and message formats.
//!
//! This crate is shared by the VMM (host) and the test kernel (guest): it has
//! no `std`, no unsafe code and no dependency beyond zerocopy and
//! bitfield-struct.
#![no_std]
#![forbid(unsafe_code)]

use bitfield_struct::bitfield;
use core::fmt;
use core::num::NonZeroU16;
use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Hypercall pages, and the SynIC's message and event-flags pages, are 4 KiB
/// whatever the guest's page size (HV_HYP_PAGE_SHIFT).
pub const HV_PAGE_SHIFT: u32 = 12;
/// Size of such a page in bytes.
pub const HV_PAGE_SIZE: u64 = 1 << HV_PAGE_SHIFT;
/// The only partition id accepted: the caller's own partition.
pub const HV_PARTITION_ID_SELF: u64 = u64::MAX;
/// The calling virtual processor, as a vp_index (GET_VP_REGISTERS).
pub const HV_VP_INDEX_SELF: u32 = 0xFFFF_FFFE;

/// VMM choice (transport): the port whose `out` is the hypercall.
pub const HYPERCALL_PORT: u16 = 0xE4;
/// VMM choice (transport): the stub the VMM writes at the start of the
/// hypercall page: `endbr64 ; nop ; out 0xE4, al ; ret`.
///
/// `endbr64` lets kernels with indirect-branch tracking call the page. The
/// `nop` is the restart point of a time-sliced rep call: the VMM points RIP
/// at it (see [`hypercall_restart_rip`]), so the guest runs the `out` again
/// whether or not its KVM had already advanced RIP past the `out` when the
/// exit reached user space, and RIP always changes, which keeps a standard
/// KVM (kvm_intel, kvm_amd) from skipping the `out` on the next KVM_RUN.
pub const HYPERCALL_PAGE_CODE: [u8; 8] = [0xF3, 0x0F, 0x1E, 0xFA, 0x90, 0xE6, 0xE4, 0xC3];
/// Offset in the hypercall page of the stub's restart point (the `nop`).
pub const HYPERCALL_RESTART_OFFSET: u64 = 4;
/// Offset in the hypercall page of the stub's `out 0xE4, al`.
pub const HYPERCALL_OUT_OFFSET: u64 = 5;
/// Length of the `out imm8, al` instruction.
pub const HYPERCALL_INSTRUCTION_LEN: u64 = 2;

// The offsets are a few bytes: the casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
const _: () = {
    assert!(HYPERCALL_PAGE_CODE[HYPERCALL_RESTART_OFFSET as usize] == 0x90);
    assert!(HYPERCALL_PAGE_CODE[HYPERCALL_OUT_OFFSET as usize] == 0xE6);
    assert!(HYPERCALL_PAGE_CODE[HYPERCALL_OUT_OFFSET as usize + 1] as u16 == HYPERCALL_PORT);
    assert!(HYPERCALL_RESTART_OFFSET + 1 == HYPERCALL_OUT_OFFSET);
};

/// Where a time-sliced hypercall restarts, given RIP at its port-I/O exit:
/// the stub's `nop` in the same page, when RIP is at the stub's `out` (a
/// standard KVM: RIP not yet advanced) or just past it (a KVM that advanced
/// RIP before the exit, such as one that emulated the `out`). `None` when
/// the `out` was not the stub's: the call cannot be restarted and must run
/// to completion. The hypercall page is page-aligned in the guest's virtual
/// space too, so the page offset of RIP tells where in the stub it is.
pub const fn hypercall_restart_rip(exit_rip: u64) -> Option<u64> {
    let offset = exit_rip & (HV_PAGE_SIZE - 1);
    if offset == HYPERCALL_OUT_OFFSET || offset == HYPERCALL_OUT_OFFSET + HYPERCALL_INSTRUCTION_LEN
    {
        Some((exit_rip & !(HV_PAGE_SIZE - 1)) | HYPERCALL_RESTART_OFFSET)
    } else {
        None
    }
}

/// Most MAP_DEVICE_GPA_PAGES reps whose input fits one page:
/// (4096 - 40) / 8.
pub const MAP_MAX_REPS_PER_PAGE: u16 = 507;
/// Most FLUSH_DEVICE_DOMAIN_LIST entries whose input fits one page:
/// (4096 - 32) / 8.
pub const FLUSH_LIST_MAX_REPS_PER_PAGE: u16 = 508;
/// Most GET_VP_REGISTERS reps whose output fits one page: 4096 / 16 (the
/// input, 16 + 4 bytes a rep, would fit 1020).
pub const GET_VP_REGISTERS_MAX_REPS_PER_PAGE: u16 = 256;

/// Register names of GET_VP_REGISTERS.
pub mod register {
    /// HV_REGISTER_VSM_VP_STATUS: the VP's active VTL and enabled VTLs
    /// (Linux reads it at boot; 0 means VTL 0, no other VTL).
    pub const VSM_VP_STATUS: u32 = 0x000D_0003;
}

/// CPUID leaves and bits of the Hyper-V discovery interface (contract section 1).
pub mod cpuid {
    /// Highest leaf and vendor signature.
    pub const LEAF_VENDOR: u32 = 0x4000_0000;
    /// Interface signature.
    pub const LEAF_INTERFACE: u32 = 0x4000_0001;
    /// Hypervisor version: EAX build number, EBX major << 16 | minor, ECX
    /// service pack, EDX service branch << 24 | service number.
    pub const LEAF_VERSION: u32 = 0x4000_0002;
    /// Partition privileges and features.
    pub const LEAF_FEATURES: u32 = 0x4000_0003;
    /// Implementation recommendations (hints): EAX flags, EBX spinlock
    /// retry count.
    pub const LEAF_HINTS: u32 = 0x4000_0004;
    /// Implementation limits: EAX most virtual processors, EBX most logical
    /// processors, ECX interrupt vectors for remapping.
    pub const LEAF_LIMITS: u32 = 0x4000_0005;
    /// Hardware features in use.
    pub const LEAF_HARDWARE_FEATURES: u32 = 0x4000_0006;
    /// The lowest value EAX of leaf 0x40000000 may report.
    pub const MIN_MAX_LEAF: u32 = 0x4000_0006;
    /// The hypervisor leaves: guests look for signatures at every multiple
    /// of 0x100 from here (Linux's `hypervisor_cpuid_base` up to
    /// 0x40010000).
    pub const HYPERVISOR_LEAVES: core::ops::RangeInclusive<u32> = 0x4000_0000..=0x4fff_ffff;
    /// KVM's signature in EBX, ECX, EDX of its base leaf.
    pub const KVM_SIGNATURE: [u8; 12] = *b"KVMKVMKVM\0\0\0";
    /// "Microsoft Hv" in EBX, ECX, EDX of leaf 0x40000000.
    pub const VENDOR_EBX: u32 = 0x7263_694d;
    /// See [`VENDOR_EBX`].
    pub const VENDOR_ECX: u32 = 0x666f_736f;
    /// See [`VENDOR_EBX`].
    pub const VENDOR_EDX: u32 = 0x7648_2074;
    /// "Hv#1" in EAX of leaf 0x40000001.
    pub const INTERFACE_EAX: u32 = 0x3123_7648;
    /// Leaf 0x40000003 EAX: the TIME_REF_COUNT MSR is available.
    pub const FEATURES_EAX_TIME_REF_COUNT: u32 = 1 << 1;
    /// Leaf 0x40000003 EAX: the SynIC MSRs ([`super::msr::SCONTROL`] to
    /// [`super::msr::SINT15`]) are available.
    pub const FEATURES_EAX_SYNIC: u32 = 1 << 2;
    /// Leaf 0x40000003 EAX: hypercall MSRs available.
    pub const FEATURES_EAX_HYPERCALL_MSRS: u32 = 1 << 5;
    /// Leaf 0x40000003 EAX: VP index MSR available.
    pub const FEATURES_EAX_VP_INDEX: u32 = 1 << 6;
    /// Leaf 0x40000003 EAX: the REFERENCE_TSC MSR (reference TSC page) is
    /// available.
    pub const FEATURES_EAX_REFERENCE_TSC: u32 = 1 << 9;
    /// Leaf 0x40000003 EAX: the GUEST_IDLE MSR is available.
    pub const FEATURES_EAX_GUEST_IDLE: u32 = 1 << 10;
    /// Leaf 0x40000003 EAX: the TSC_FREQUENCY and APIC_FREQUENCY MSRs may
    /// be read (with [`FEATURES_EDX_FREQUENCY_MSRS`]).
    pub const FEATURES_EAX_FREQUENCY_MSRS: u32 = 1 << 11;
    /// Leaf 0x40000003 EAX: the TSC is invariant (and the
    /// TSC_INVARIANT_CONTROL MSR is available).
    pub const FEATURES_EAX_TSC_INVARIANT: u32 = 1 << 15;
    /// Leaf 0x40000003 EBX: the partition may post messages (POST_MESSAGE).
    pub const FEATURES_EBX_POST_MESSAGES: u32 = 1 << 4;
    /// Leaf 0x40000003 EBX: the partition may signal events (SIGNAL_EVENT).
    pub const FEATURES_EBX_SIGNAL_EVENTS: u32 = 1 << 5;
    /// Leaf 0x40000003 EDX: the frequency MSRs are available.
    pub const FEATURES_EDX_FREQUENCY_MSRS: u32 = 1 << 8;
    /// Leaf 0x40000003 EDX: device domains (S2) available.
    pub const FEATURES_EDX_DEVICE_DOMAINS: u32 = 1 << 24;
    /// Leaf 0x40000003 EDX: S1 device domains available.
    pub const FEATURES_EDX_S1_DEVICE_DOMAINS: u32 = 1 << 25;
    /// Leaf 0x40000004 EAX: relaxed timing (the guest should not treat late
    /// timers or watchdogs as fatal).
    pub const HINTS_EAX_RELAXED_TIMING: u32 = 1 << 5;
    /// Leaf 0x40000004 EAX: send IPIs with HvCallSendSyntheticClusterIpi
    /// (Linux then sends every IPI that way, and with GUEST_IDLE takes
    /// Hyper-V's paravirtual spinlocks).
    pub const HINTS_EAX_CLUSTER_IPI: u32 = 1 << 10;
    /// Leaf 0x40000004 EAX: auto-EOI is deprecated: the guest EOIs SynIC
    /// interrupts at its local APIC itself (Linux's
    /// `hv_recommend_using_aeoi`).
    pub const HINTS_EAX_DEPRECATING_AEOI: u32 = 1 << 9;
    /// Leaf 0x40000004 EBX: never notify the hypervisor of long spinlock
    /// waits.
    pub const HINTS_EBX_NEVER_NOTIFY_SPINLOCKS: u32 = u32::MAX;
    /// Leaf 0x40000006 EAX: DMA remapping in use.
    pub const HARDWARE_EAX_DMA_REMAPPING: u32 = 1 << 4;
}

/// Synthetic MSRs: the contract's (sections 1 and 2), then the SynIC's
/// (TLFS "Synthetic Interrupt Controller"; Linux's `HV_MSR_*`), which are
/// not the contract's: the vmbus crate serves them and has their register
/// formats.
pub mod msr {
    /// Guest OS id; must be non-zero before the hypercall page is enabled.
    pub const GUEST_OS_ID: u32 = 0x4000_0000;
    /// Hypercall page control, see [`super::HypercallMsr`].
    pub const HYPERCALL: u32 = 0x4000_0001;
    /// Read-only index of the vCPU.
    pub const VP_INDEX: u32 = 0x4000_0002;
    /// Read-only partition reference time: 100 ns units since the
    /// partition started, monotonic, the same on every vCPU.
    pub const TIME_REF_COUNT: u32 = 0x4000_0020;
    /// Reference TSC page control, see [`super::OverlayPageMsr`] and
    /// [`super::ReferenceTscPage`].
    pub const REFERENCE_TSC: u32 = 0x4000_0021;
    /// Read-only TSC frequency in Hz.
    pub const TSC_FREQUENCY: u32 = 0x4000_0022;
    /// Read-only local APIC timer frequency in Hz.
    pub const APIC_FREQUENCY: u32 = 0x4000_0023;
    /// The vCPU's VP assist page, see [`super::OverlayPageMsr`] (Linux
    /// enables one on every CPU, whatever CPUID says).
    pub const VP_ASSIST_PAGE: u32 = 0x4000_0073;
    /// Read-only: a read idles the vCPU until an IPI (even one its masked
    /// interrupts hold back) or the hypervisor's choice ends it; the value
    /// read is 0.
    pub const GUEST_IDLE: u32 = 0x4000_00F0;
    /// Invariant TSC control: bit 0 ([`TSC_INVARIANT_EXPOSE`]) exposes the
    /// invariant TSC in CPUID 0x80000007 EDX bit 8.
    pub const TSC_INVARIANT_CONTROL: u32 = 0x4000_0118;
    /// TSC_INVARIANT_CONTROL bit 0; the other bits are reserved.
    pub const TSC_INVARIANT_EXPOSE: u64 = 1;

    // The SynIC's.

    /// SynIC control: bit 0 enables the SynIC, bits 63:1 are reserved.
    pub const SCONTROL: u32 = 0x4000_0080;
    /// Read-only SynIC version (1).
    pub const SVERSION: u32 = 0x4000_0081;
    /// The SynIC's event-flags page (SIEFP): bit 0 enables it, bits 11:1
    /// are preserved, bits 63:12 are its guest physical page number.
    pub const SIEFP: u32 = 0x4000_0082;
    /// The SynIC's message page (SIMP), in the form of [`SIEFP`].
    pub const SIMP: u32 = 0x4000_0083;
    /// End of message: a write (any value) tells the SynIC a message slot
    /// was freed; reads 0.
    pub const EOM: u32 = 0x4000_0084;
    /// SINT0, the first synthetic interrupt source: vector (bits 7:0),
    /// masked (16), auto-EOI (17), polling (18). SINTn is `SINT0 + n`, see
    /// [`sint`].
    pub const SINT0: u32 = 0x4000_0090;
    /// SINT15, the last synthetic interrupt source.
    pub const SINT15: u32 = 0x4000_009F;

    /// The MSR of SINT `sint`, `None` for `sint` >= 16.
    pub const fn sint(sint: u8) -> Option<u32> {
        if sint as u32 <= SINT15 - SINT0 {
            Some(SINT0 + sint as u32)
        } else {
            None
        }
    }

    /// Whether `msr` is one of the SynIC's (SCONTROL to EOM, SINT0 to
    /// SINT15).
    pub const fn is_synic(msr: u32) -> bool {
        matches!(msr, SCONTROL | SVERSION | SIEFP | SIMP | EOM) || sint_of(msr).is_some()
    }

    /// The SINT that MSR `msr` controls, if it is SINT0..SINT15.
    // The difference is below 16 when `msr` is in range.
    #[allow(clippy::cast_possible_truncation)]
    pub const fn sint_of(msr: u32) -> Option<u8> {
        if msr >= SINT0 && msr <= SINT15 {
            Some((msr - SINT0) as u8)
        } else {
            None
        }
    }
}

/// Value of the HYPERCALL MSR.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct HypercallMsr {
    /// Bit 0: the hypercall page is enabled.
    pub enable: bool,
    /// Bit 1: the MSR is locked.
    pub locked: bool,
    /// Bits 11:2, reserved.
    #[bits(10)]
    pub reserved: u16,
    /// Bits 63:12: guest physical page number of the hypercall page.
    #[bits(52)]
    pub gpn: u64,
}

/// Value of an MSR that places a page in guest physical memory: the
/// REFERENCE_TSC and VP_ASSIST_PAGE MSRs.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct OverlayPageMsr {
    /// Bit 0: the page is enabled.
    pub enable: bool,
    /// Bits 11:1, reserved.
    #[bits(11)]
    pub reserved: u16,
    /// Bits 63:12: guest physical page number.
    #[bits(52)]
    pub gpn: u64,
}

/// Reference time runs at 10 MHz (100 ns units).
pub const REFERENCE_TIME_HZ: u64 = 10_000_000;

/// The reference TSC page's header (the rest of the 4 KiB page is
/// reserved): reference time = ((TSC * tsc_scale) >> 64) + tsc_offset, in
/// 100 ns units, valid while `tsc_sequence` is non-zero and unchanged
/// across the read (TLFS "Reference TSC Page"; Linux's
/// `struct ms_hyperv_tsc_page`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ReferenceTscPage {
    /// Changes whenever the hypervisor rewrites the page; 0: do not use the
    /// page (read TIME_REF_COUNT instead).
    pub tsc_sequence: U32,
    /// Reserved.
    pub reserved1: U32,
    /// 64.64 fixed-point reference time units per TSC tick.
    pub tsc_scale: U64,
    /// Added to the scaled TSC (signed).
    pub tsc_offset: I64,
}

impl ReferenceTscPage {
    /// The sequence value that marks the page invalid.
    pub const INVALID_SEQUENCE: u32 = 0;

    /// The reference time at `tsc`, or `None` while the page is invalid.
    pub fn reference_time(&self, tsc: u64) -> Option<u64> {
        if self.tsc_sequence.get() == Self::INVALID_SEQUENCE {
            return None;
        }
        Some(reference_time(
            tsc,
            self.tsc_scale.get(),
            self.tsc_offset.get(),
        ))
    }
}

/// `((tsc * scale) >> 64) + offset`, wrapping: the reference TSC page's
/// formula.
// The high half of the 128-bit product of two u64 fits a u64.
#[allow(clippy::cast_possible_truncation)]
pub const fn reference_time(tsc: u64, scale: u64, offset: i64) -> u64 {
    let scaled = ((tsc as u128 * scale as u128) >> 64) as u64;
    scaled.wrapping_add_signed(offset)
}

/// The reference TSC page's scale for a TSC running at `tsc_hz`:
/// floor(2^64 * 10^7 / tsc_hz). `None` unless the TSC is faster than the
/// 10 MHz reference clock (the scale would not fit 64 bits).
// The quotient is below 2^64 when tsc_hz > 10^7.
#[allow(clippy::cast_possible_truncation)]
pub const fn reference_tsc_scale(tsc_hz: u64) -> Option<u64> {
    if tsc_hz <= REFERENCE_TIME_HZ {
        return None;
    }
    Some((((REFERENCE_TIME_HZ as u128) << 64) / tsc_hz as u128) as u64)
}

/// A wire code's named values, written once: the associated consts, a
/// `name()` that gives a value's const name, and `Debug`/`Display` that
/// print the name, or `Type(value)` (in `$fmt`) for a value without one.
#[macro_export]
macro_rules! named_values {
    (
        $ty:ident, $fmt:literal,
        $($(#[$doc:meta])* $name:ident = $value:expr,)*
    ) => {
        impl $ty {
            $($(#[$doc])* pub const $name: Self = Self($value);)*

            /// Every value this type names, in the order they are declared.
            pub const ALL: &'static [Self] = &[$(Self::$name,)*];

            /// The value's name, `None` for one this crate does not name.
            pub const fn name(self) -> Option<&'static str> {
                // A match: two names for one value are an unreachable
                // pattern, which the lints refuse.
                match self {
                    $(Self::$name => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }

        impl ::core::fmt::Debug for $ty {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, concat!(stringify!($ty), "(", $fmt, ")"), self.0),
                }
            }
        }

        impl ::core::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                ::core::fmt::Debug::fmt(self, f)
            }
        }
    };
}

/// A hypercall call code (input value bits 15:0). The codes named here
/// are every call pvmm's dispatcher serves, the contract's and the
/// partition's; [`HypercallCode::ALL`] lists them in the dispatcher's order.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(transparent)]
pub struct HypercallCode(pub u16);

named_values! {
    HypercallCode, "{:#06x}",
    /// HvCallCreateDeviceDomain.
    CREATE_DEVICE_DOMAIN = 0x00B1,
    /// HvCallAttachDeviceDomain.
    ATTACH_DEVICE_DOMAIN = 0x00B2,
    /// HvCallMapDeviceGpaPages (rep).
    MAP_DEVICE_GPA_PAGES = 0x00B3,
    /// HvCallUnmapDeviceGpaPages (rep).
    UNMAP_DEVICE_GPA_PAGES = 0x00B4,
    /// HvCallDetachDeviceDomain.
    DETACH_DEVICE_DOMAIN = 0x00C4,
    /// HvCallDeleteDeviceDomain.
    DELETE_DEVICE_DOMAIN = 0x00C5,
    /// HvCallConfigureDeviceDomain.
    CONFIGURE_DEVICE_DOMAIN = 0x00CE,
    /// HvCallFlushDeviceDomain.
    FLUSH_DEVICE_DOMAIN = 0x00D0,
    /// HvCallFlushDeviceDomainList (rep).
    FLUSH_DEVICE_DOMAIN_LIST = 0x00D1,
    /// HvCallGetIommuCapabilities.
    GET_IOMMU_CAPABILITIES = 0x0125,
    /// HvCallGetLogicalDeviceProperty.
    GET_LOGICAL_DEVICE_PROPERTY = 0x0127,
    /// HvCallGetVpRegisters (rep).
    GET_VP_REGISTERS = 0x0050,
    /// HvCallSendSyntheticClusterIpi (TLFS; not part of the pvIOMMU
    /// contract: the partition's).
    SEND_SYNTHETIC_CLUSTER_IPI = 0x000B,
    /// HvCallPostMessage (TLFS; the partition's: VMBus's transport, served
    /// where the VMM has a message port).
    POST_MESSAGE = 0x005C,
    /// HvCallSignalEvent (TLFS; the partition's: a VMBus channel's
    /// guest-to-host doorbell, served where the VMM has an event port).
    SIGNAL_EVENT = 0x005D,
    /// HvCallRetargetDeviceInterrupt (TLFS; the partition's: pci-hyperv
    /// moves a vPCI device's interrupt to another vector and VP set).
    RETARGET_INTERRUPT = 0x007E,
}

/// A guest-visible hypercall status (result bits 15:0), SUCCESS included.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(transparent)]
pub struct HvStatus(pub u16);

macro_rules! statuses {
    ($($(#[$doc:meta])* $name:ident = $value:expr,)*) => {
        impl HvStatus {
            /// The call succeeded.
            pub const SUCCESS: Self = Self(0);
            $($(#[$doc])* pub const $name: Self = Self($value);)*

            /// The status's name, or `None` for a value this crate does not name.
            pub const fn name(self) -> Option<&'static str> {
                Some(match self.0 {
                    0 => "SUCCESS",
                    $($value => stringify!($name),)*
                    _ => return None,
                })
            }
        }

        impl HvError {
            $($(#[$doc])* pub const $name: Self = Self(match NonZeroU16::new($value) {
                Some(v) => v,
                None => panic!("error statuses are non-zero"),
            });)*

            /// Every error status this crate names: the contract's
            /// ([`HvError::PVIOMMU`]) and the SynIC's.
            pub const ALL: &'static [Self] = &[$(Self::$name,)*];
        }
    };
}

statuses! {
    /// The call code is not a known hypercall.
    INVALID_HYPERCALL_CODE = 0x0002,
    /// The input value (control word) is malformed.
    INVALID_HYPERCALL_INPUT = 0x0003,
    /// An input or output block is misaligned or crosses a page.
    INVALID_ALIGNMENT = 0x0004,
    /// A parameter is invalid.
    INVALID_PARAMETER = 0x0005,
    /// The caller is not allowed to do this.
    ACCESS_DENIED = 0x0006,
    /// The partition is not in a state that allows this.
    INVALID_PARTITION_STATE = 0x0007,
    /// The operation is not allowed now.
    OPERATION_DENIED = 0x0008,
    /// Not enough memory for the request.
    INSUFFICIENT_MEMORY = 0x000B,
    /// The partition id is not HV_PARTITION_ID_SELF.
    INVALID_PARTITION_ID = 0x000D,
    /// The virtual processor index names no VP of the partition (SynIC: a
    /// message's target VP).
    INVALID_VP_INDEX = 0x000E,
    /// An object was not found.
    NOT_FOUND = 0x0010,
    /// The port of a connection was deleted or is not active (SynIC).
    INVALID_PORT_ID = 0x0011,
    /// No port is connected on the connection id (SynIC: HvCallPostMessage,
    /// HvCallSignalEvent).
    INVALID_CONNECTION_ID = 0x0012,
    /// Not enough buffers (SynIC: the target's message queue is full; Linux
    /// retries).
    INSUFFICIENT_BUFFERS = 0x0013,
    /// The target VP's SynIC, or the page a message or event goes to, is
    /// disabled.
    INVALID_SYNIC_STATE = 0x0018,
    /// The host has no resources left for the request.
    NO_RESOURCES = 0x001D,
    /// No more device domains can be created.
    INSUFFICIENT_DEVICE_DOMAINS = 0x0038,
    /// The device id is not known.
    INVALID_DEVICE_ID = 0x0057,
    /// The device is not in a state that allows this.
    INVALID_DEVICE_STATE = 0x0058,
    /// ATTACH named the domain the device is already in (an ATTACH to
    /// another domain moves the device).
    DEVICE_ALREADY_IN_DOMAIN = 0x0066,
}

impl HvStatus {
    /// Whether this is SUCCESS.
    pub const fn is_success(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for HvStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "HvStatus({:#06x})", self.0),
        }
    }
}

impl fmt::Display for HvStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A guest-visible error status: an [`HvStatus`] that is not SUCCESS.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HvError(NonZeroU16);

impl HvError {
    /// The error statuses of the contract (section 3), the only ones its
    /// calls return; [`HvError::ALL`] also has the SynIC's
    /// (INVALID_VP_INDEX, INVALID_PORT_ID, INVALID_CONNECTION_ID,
    /// INVALID_SYNIC_STATE), which only HvCallPostMessage and
    /// HvCallSignalEvent return.
    pub const PVIOMMU: &'static [Self] = &[
        Self::INVALID_HYPERCALL_CODE,
        Self::INVALID_HYPERCALL_INPUT,
        Self::INVALID_ALIGNMENT,
        Self::INVALID_PARAMETER,
        Self::ACCESS_DENIED,
        Self::INVALID_PARTITION_STATE,
        Self::OPERATION_DENIED,
        Self::INSUFFICIENT_MEMORY,
        Self::INVALID_PARTITION_ID,
        Self::NOT_FOUND,
        Self::INSUFFICIENT_BUFFERS,
        Self::NO_RESOURCES,
        Self::INSUFFICIENT_DEVICE_DOMAINS,
        Self::INVALID_DEVICE_ID,
        Self::INVALID_DEVICE_STATE,
        Self::DEVICE_ALREADY_IN_DOMAIN,
    ];

    /// The error as a status word.
    pub const fn status(self) -> HvStatus {
        HvStatus(self.0.get())
    }

    /// The error of a non-success status, `None` for SUCCESS.
    pub const fn from_status(status: HvStatus) -> Option<Self> {
        match NonZeroU16::new(status.0) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
}

impl fmt::Debug for HvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.status(), f)
    }
}

impl fmt::Display for HvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.status(), f)
    }
}

impl From<HvError> for HvStatus {
    fn from(e: HvError) -> Self {
        e.status()
    }
}

impl<T> From<Result<T, HvError>> for HvStatus {
    fn from(r: Result<T, HvError>) -> Self {
        match r {
            Ok(_) => Self::SUCCESS,
            Err(e) => e.status(),
        }
    }
}

/// The hypercall input value, RCX (contract section 3).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct Control {
    /// Bits 15:0: call code.
    pub code: u16,
    /// Bit 16: fast call, input in RDX and R8.
    pub fast: bool,
    /// Bits 26:17: variable header size in qwords.
    #[bits(10)]
    pub variable_header_size: u16,
    /// Bits 30:27, reserved.
    #[bits(4)]
    pub reserved0: u8,
    /// Bit 31: nested hypercall.
    pub nested: bool,
    /// Bits 43:32: rep count.
    #[bits(12)]
    pub rep_count: u16,
    /// Bits 47:44, reserved.
    #[bits(4)]
    pub reserved1: u8,
    /// Bits 59:48: rep start index.
    #[bits(12)]
    pub rep_start: u16,
    /// Bits 63:60, reserved.
    #[bits(4)]
    pub reserved2: u8,
}

impl Control {
    /// Mask of the reserved bits (30:27, 47:44, 63:60).
    pub const RESERVED_MASK: u64 = (0xF << Self::RESERVED0_OFFSET)
        | (0xF << Self::RESERVED1_OFFSET)
        | (0xF << Self::RESERVED2_OFFSET);

    /// Whether every reserved bit is zero.
    pub const fn reserved_clear(self) -> bool {
        self.0 & Self::RESERVED_MASK == 0
    }

    /// The call code as a typed value.
    pub const fn call_code(self) -> HypercallCode {
        HypercallCode(self.code())
    }
}

/// The hypercall result value, RAX (contract section 3).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct HypercallOutput {
    /// Bits 15:0: status.
    pub status: u16,
    /// Bits 31:16, reserved.
    pub reserved0: u16,
    /// Bits 43:32: reps completed, a total (not relative to rep start).
    #[bits(12)]
    pub reps_completed: u16,
    /// Bits 63:44, reserved.
    #[bits(20)]
    pub reserved1: u32,
}

impl HypercallOutput {
    /// A result word from a status and a rep total.
    pub const fn from_status(status: HvStatus, reps_completed: u16) -> Self {
        Self::new()
            .with_status(status.0)
            .with_reps_completed(reps_completed)
    }

    /// The status as a typed value.
    pub const fn hv_status(self) -> HvStatus {
        HvStatus(self.status())
    }
}

/// Domain types of [`DeviceDomainId::domain_type`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceDomainType(pub u8);

impl DeviceDomainType {
    /// Second-stage (guest maps IOVA pages to GPAs with hypercalls).
    pub const S2: Self = Self(0);
    /// First-stage (guest-owned x86-64 page table).
    pub const S1: Self = Self(1);
    /// SoC domain (not offered by this VMM).
    pub const SOC: Self = Self(2);

    /// bitfield-struct conversion.
    pub const fn from_bits(v: u8) -> Self {
        Self(v)
    }
    /// bitfield-struct conversion.
    pub const fn into_bits(self) -> u8 {
        self.0
    }
}

impl fmt::Debug for DeviceDomainType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::S2 => f.write_str("S2"),
            Self::S1 => f.write_str("S1"),
            Self::SOC => f.write_str("SOC"),
            Self(v) => write!(f, "DeviceDomainType({v})"),
        }
    }
}

/// `hv_device_domain_id` (contract section 4).
#[bitfield(u64)]
#[derive(PartialEq, Eq, Hash)]
pub struct DeviceDomainId {
    /// Bits 3:0: domain type.
    #[bits(4)]
    pub domain_type: DeviceDomainType,
    /// Bits 31:4, reserved.
    #[bits(28)]
    pub reserved: u32,
    /// Bits 63:32: domain id.
    pub id: u32,
}

impl DeviceDomainId {
    /// Id of the default (identity) domain.
    pub const ID_DEFAULT: u32 = 0;
    /// Id of the null (blocking) domain.
    pub const ID_NULL: u32 = 0xFFFF_FFFF;

    /// A domain id word from its type and id.
    pub const fn with(domain_type: DeviceDomainType, id: u32) -> Self {
        Self::new().with_domain_type(domain_type).with_id(id)
    }
}

/// Device types of [`DeviceId::device_type`].
pub mod device_type {
    /// Logical device.
    pub const LOGICAL: u8 = 0;
    /// PCI device (the form this VMM uses).
    pub const PCI: u8 = 1;
    /// IOAPIC.
    pub const IOAPIC: u8 = 2;
    /// ACPI device.
    pub const ACPI: u8 = 3;
}

/// PCI requester id (bus/device/function).
#[bitfield(u16)]
#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciRid {
    /// Bits 2:0: function.
    #[bits(3)]
    pub function: u8,
    /// Bits 7:3: device.
    #[bits(5)]
    pub device: u8,
    /// Bits 15:8: bus.
    pub bus: u8,
}

/// `hv_device_id` (contract section 4), with the fields of its PCI form.
/// VMM choice: devices are registered by the PCI form with every other field
/// zero; a device offered on a vPCI bus also has a LOGICAL form (bits 63:62
/// zero, low 32 bits `prefix | function`, see [`DeviceId::logical_vpci`]),
/// which Linux's driver sends.
#[bitfield(u64)]
#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    /// Bits 15:0: requester id.
    #[bits(16)]
    pub rid: PciRid,
    /// Bits 31:16: PCI segment.
    pub segment: u16,
    /// Bits 47:32: shadow bus range (unused here, zero).
    pub shadow_bus_range: u16,
    /// Bits 49:48: phantom function bits (unused here, zero).
    #[bits(2)]
    pub phantom_function_bits: u8,
    /// Bit 50: source shadow (unused here, zero).
    pub source_shadow: bool,
    /// Bits 61:51, reserved.
    #[bits(11)]
    pub reserved: u16,
    /// Bits 63:62: device type, see [`device_type`].
    #[bits(2)]
    pub device_type: u8,
}

impl DeviceId {
    /// The PCI form of a device id.
    pub const fn pci(segment: u16, bus: u8, device: u8, function: u8) -> Self {
        Self::new()
            .with_device_type(device_type::PCI)
            .with_segment(segment)
            .with_rid(
                PciRid::new()
                    .with_bus(bus)
                    .with_device(device & 0x1F)
                    .with_function(function & 0x7),
            )
    }

    /// Whether this is the PCI form with only requester id and segment set
    /// (the form this VMM registers devices by).
    pub const fn is_plain_pci(self) -> bool {
        let pci_fields = ((1u64 << 32) - 1) | (3 << 62);
        self.device_type() == device_type::PCI && self.0 & !pci_fields == 0
    }

    /// The LOGICAL form of a device id: type 0 (bits 63:62), `id` in the low
    /// 32 bits, every other bit zero.
    pub const fn logical(id: u32) -> Self {
        Self::from_bits(id as u64)
    }

    /// The LOGICAL id Linux's driver sends for PCI function `function` of the
    /// vPCI bus offered by the VMBus channel with instance GUID `instance`
    /// (the bytes of the GUID as Linux stores it): `prefix | function`, with
    /// [`logical_device_id_prefix`].
    pub const fn logical_vpci(instance: &[u8; 16], function: u8) -> Self {
        Self::logical(logical_device_id_prefix(instance) | (function & 0x7) as u32)
    }

    /// Whether this is the LOGICAL form: type 0 and bits 61:32 zero.
    pub const fn is_logical(self) -> bool {
        self.0 >> 32 == 0
    }
}

/// The logical device id prefix of a vPCI bus, from the instance GUID of the
/// VMBus channel that offers it: `b[5] << 24 | b[4] << 16 | b[7] << 8 |
/// (b[6] & 0xf8)` (Linux's `hv_build_logical_dev_id_prefix`, the id
/// pci-hyperv also passes to RETARGET_INTERRUPT). The low 3 bits are zero:
/// they hold the PCI function.
pub const fn logical_device_id_prefix(instance: &[u8; 16]) -> u32 {
    ((instance[5] as u32) << 24)
        | ((instance[4] as u32) << 16)
        | ((instance[7] as u32) << 8)
        | (instance[6] & 0xf8) as u32
}

impl fmt::Display for DeviceId {
    /// PCI ids print as `segment:bus:device.function`, others as hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rid = self.rid();
        if self.is_plain_pci() {
            write!(
                f,
                "{:04x}:{:02x}:{:02x}.{}",
                self.segment(),
                rid.bus(),
                rid.device(),
                rid.function()
            )
        } else {
            write!(f, "{:#018x}", self.0)
        }
    }
}

/// `iommu_cap` bits of [`OutputGetIommuCapabilities`].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct IommuCapabilities {
    /// Bit 0: an IOMMU is present.
    pub present: bool,
    /// Bit 1: S2 device domains.
    pub s2: bool,
    /// Bit 2: S1 device domains.
    pub s1: bool,
    /// Bit 3: 5-level S1 page tables.
    pub s1_5lvl: bool,
    /// Bit 4: PASID.
    pub pasid: bool,
    /// Bit 5: ATS.
    pub ats: bool,
    /// Bit 6: PRI.
    pub pri: bool,
    /// Bits 63:7, reserved.
    #[bits(57)]
    pub reserved: u64,
}

/// Property codes of GET_LOGICAL_DEVICE_PROPERTY.
pub mod device_property {
    /// Whether the device is behind the pvIOMMU.
    pub const PVIOMMU: u32 = 10;
}

/// `device_iommu` of [`OutputGetLogicalDeviceProperty`].
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct DeviceIommuProperty {
    /// Bit 0: the device is behind the pvIOMMU.
    pub enabled: bool,
    /// Bits 63:1, reserved.
    #[bits(63)]
    pub reserved: u64,
}

/// `hv_input_vtl`, as in owner_vtl and target_vtl.
#[bitfield(u8)]
#[derive(PartialEq, Eq)]
pub struct InputVtl {
    /// Bits 3:0: target VTL.
    #[bits(4)]
    pub target_vtl: u8,
    /// Bit 4: use target_vtl rather than the caller's VTL.
    pub use_target_vtl: bool,
    /// Bits 7:5, reserved.
    #[bits(3)]
    pub reserved: u8,
}

impl InputVtl {
    /// Whether this names VTL 0, the only VTL of this VMM: either "the
    /// caller's VTL" (zero) or an explicit target VTL 0.
    pub const fn is_vtl0(self) -> bool {
        self.0 == 0 || self.0 == Self::new().with_use_target_vtl(true).0
    }
}

/// Flags of CREATE_DEVICE_DOMAIN.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct CreateDeviceDomainFlags {
    /// Bit 0: forward progress required.
    pub forward_progress_required: bool,
    /// Bit 1: inherit the owning VTL.
    pub inherit_owning_vtl: bool,
    /// Bits 31:2, reserved.
    #[bits(30)]
    pub reserved: u32,
}

/// Flags of CONFIGURE_DEVICE_DOMAIN.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct DeviceDomainSettingsFlags {
    /// Bit 0: first-stage translation enabled.
    pub translation_enabled: bool,
    /// Bit 1: all DMA blocked.
    pub blocked: bool,
    /// Bit 2: first-stage paging mode, 0 = 4-level, 1 = 5-level.
    pub first_stage_paging_mode: bool,
    /// Bits 63:3, reserved.
    #[bits(61)]
    pub reserved: u64,
}

/// `map_flags` of MAP_DEVICE_GPA_PAGES.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct MapFlags {
    /// 0x1: the device may read.
    pub readable: bool,
    /// 0x2: the device may write.
    pub writable: bool,
    /// 0x4: kernel execute (accepted, no meaning for DMA).
    pub kernel_exec: bool,
    /// 0x8: user execute (accepted, no meaning for DMA).
    pub user_exec: bool,
    /// Bits 31:4, reserved.
    #[bits(28)]
    pub reserved: u32,
}

/// Flags of FLUSH_DEVICE_DOMAIN_LIST.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct FlushListFlags {
    /// Bit 0: entries are in IOMMU format.
    pub iommu_format: bool,
    /// Bits 31:1, reserved.
    #[bits(31)]
    pub reserved: u32,
}

/// One FLUSH_DEVICE_DOMAIN_LIST entry: a naturally aligned block of
/// 2^page_mask_shift pages.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct FlushListEntry {
    /// Bits 11:0: log2 of the block's page count.
    #[bits(12)]
    pub page_mask_shift: u16,
    /// Bits 63:12: first page number of the block.
    #[bits(52)]
    pub page_number: u64,
}

/// `hv_input_device_domain`, the header of most calls (24 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputDeviceDomain {
    /// Must be [`HV_PARTITION_ID_SELF`].
    pub partition_id: U64,
    /// [`InputVtl`] of the owner.
    pub owner_vtl: u8,
    /// Must be zero.
    pub padding: [u8; 7],
    /// [`DeviceDomainId`].
    pub domain_id: U64,
}

impl InputDeviceDomain {
    /// A header for the caller's own partition and VTL.
    pub fn new(domain: DeviceDomainId) -> Self {
        Self {
            partition_id: U64::new(HV_PARTITION_ID_SELF),
            owner_vtl: 0,
            padding: [0; 7],
            domain_id: U64::new(domain.into_bits()),
        }
    }

    /// The domain id word.
    pub fn domain(&self) -> DeviceDomainId {
        DeviceDomainId::from_bits(self.domain_id.get())
    }

    /// The owner VTL byte.
    pub fn owner_vtl(&self) -> InputVtl {
        InputVtl::from_bits(self.owner_vtl)
    }
}

/// GET_IOMMU_CAPABILITIES input (16 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputGetIommuCapabilities {
    /// Must be [`HV_PARTITION_ID_SELF`].
    pub partition_id: U64,
    /// Must be zero.
    pub reserved: U64,
}

/// GET_IOMMU_CAPABILITIES output (24 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct OutputGetIommuCapabilities {
    /// Size of this structure in bytes.
    pub size: U32,
    /// Zero.
    pub reserved: U16,
    /// Width of the device address space (IOVA) in bits.
    pub max_iova_width: u8,
    /// Width of PASIDs in bits (0: no PASID).
    pub max_pasid_width: u8,
    /// [`IommuCapabilities`].
    pub iommu_cap: U64,
    /// Supported page sizes (bit n: 2^n bytes).
    pub pgsize_bitmap: U64,
}

/// GET_LOGICAL_DEVICE_PROPERTY input (24 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputGetLogicalDeviceProperty {
    /// Must be [`HV_PARTITION_ID_SELF`].
    pub partition_id: U64,
    /// [`DeviceId`].
    pub logical_device_id: U64,
    /// Property code, see [`device_property`].
    pub code: U32,
    /// Must be zero.
    pub reserved: U32,
}

/// GET_LOGICAL_DEVICE_PROPERTY output (16 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct OutputGetLogicalDeviceProperty {
    /// [`DeviceIommuProperty`].
    pub device_iommu: U64,
    /// Zero.
    pub reserved: U64,
}

/// CREATE_DEVICE_DOMAIN input (28 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputCreateDeviceDomain {
    /// Partition, owner VTL and the new domain's id.
    pub device_domain: InputDeviceDomain,
    /// [`CreateDeviceDomainFlags`].
    pub create_device_domain_flags: U32,
}

/// DELETE_DEVICE_DOMAIN input (24 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputDeleteDeviceDomain {
    /// Partition, owner VTL and domain.
    pub device_domain: InputDeviceDomain,
}

/// ATTACH_DEVICE_DOMAIN input (32 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputAttachDeviceDomain {
    /// Partition, owner VTL and domain.
    pub device_domain: InputDeviceDomain,
    /// [`DeviceId`].
    pub device_id: U64,
}

/// DETACH_DEVICE_DOMAIN input (16 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputDetachDeviceDomain {
    /// Must be [`HV_PARTITION_ID_SELF`].
    pub partition_id: U64,
    /// [`DeviceId`].
    pub device_id: U64,
}

/// `hv_device_domain_settings` (16 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct DeviceDomainSettings {
    /// [`DeviceDomainSettingsFlags`].
    pub flags: U64,
    /// GPA of the top-level first-stage table.
    pub page_table_root: U64,
}

/// CONFIGURE_DEVICE_DOMAIN input (40 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputConfigureDeviceDomain {
    /// Partition, owner VTL and domain.
    pub device_domain: InputDeviceDomain,
    /// Flags and page-table root.
    pub settings: DeviceDomainSettings,
}

/// MAP_DEVICE_GPA_PAGES input header (40 bytes), followed by one u64 guest
/// page number per rep.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputMapDeviceGpaPages {
    /// Partition, owner VTL and domain.
    pub device_domain: InputDeviceDomain,
    /// [`InputVtl`] of the mapping.
    pub target_vtl: u8,
    /// Must be zero.
    pub padding: [u8; 3],
    /// [`MapFlags`].
    pub map_flags: U32,
    /// IOVA of rep 0; rep i maps base + i * 4 KiB.
    pub target_device_va_base: U64,
}

/// UNMAP_DEVICE_GPA_PAGES input (32 bytes); the rep count is the page count.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputUnmapDeviceGpaPages {
    /// Partition, owner VTL and domain.
    pub device_domain: InputDeviceDomain,
    /// IOVA of rep 0; rep i unmaps base + i * 4 KiB.
    pub target_device_va_base: U64,
}

/// FLUSH_DEVICE_DOMAIN input (32 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputFlushDeviceDomain {
    /// Partition, owner VTL and domain.
    pub device_domain: InputDeviceDomain,
    /// No flags are defined: must be zero.
    pub flags: U32,
    /// Must be zero.
    pub reserved: U32,
}

/// FLUSH_DEVICE_DOMAIN_LIST input header (32 bytes), followed by one
/// [`FlushListEntry`] per rep.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputFlushDeviceDomainList {
    /// Partition, owner VTL and domain.
    pub device_domain: InputDeviceDomain,
    /// [`FlushListFlags`].
    pub flags: U32,
    /// Must be zero.
    pub reserved: U32,
}

/// SEND_SYNTHETIC_CLUSTER_IPI input (16 bytes; Linux's `hv_send_ipi`):
/// usually the fast form, RDX holding `vector` and `reserved`, R8 the mask.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputSendSyntheticClusterIpi {
    /// The interrupt vector, [`IPI_VECTORS`].
    pub vector: U32,
    /// Must be zero.
    pub reserved: U32,
    /// Bit n: VP n is a target.
    pub cpu_mask: U64,
}

/// The x86 MSI address of VP `vp`'s local APIC: physical destination
/// mode, the destination APIC id in bits 19:12, and pvmm gives VP n the
/// APIC id n. Where the partition's interrupts go: IPIs, SINTs, and the
/// MSI messages the vPCI server hands to devices.
pub const fn msi_address(vp: u32) -> u64 {
    0xfee0_0000 | (vp as u64) << 12
}

/// The vectors SEND_SYNTHETIC_CLUSTER_IPI delivers (Linux's
/// HV_IPI_LOW_VECTOR to HV_IPI_HIGH_VECTOR); any other is
/// INVALID_PARAMETER.
pub const IPI_VECTORS: core::ops::RangeInclusive<u32> = 0x10..=0xff;

/// Bytes of a SynIC message's payload (`HV_MESSAGE_PAYLOAD_BYTE_COUNT`), and
/// the most POST_MESSAGE carries.
pub const HV_MESSAGE_PAYLOAD_SIZE: usize = 240;

/// POST_MESSAGE input (`struct hv_input_post_message`, 256 bytes, TLFS
/// HvCallPostMessage; not part of the pvIOMMU contract: the partition's,
/// VMBus's transport). The message types and ports are the `vmbus`
/// crate's.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct InputPostMessage {
    /// The target port's connection id (bits 23:0; 31:24 reserved).
    pub connection_id: U32,
    /// Must be zero (RsvdZ).
    pub reserved: U32,
    /// The message type: non-zero, bit 31 clear.
    pub message_type: U32,
    /// Bytes of `payload` that are sent (<= [`HV_MESSAGE_PAYLOAD_SIZE`]).
    pub payload_size: U32,
    /// The message.
    pub payload: [u8; HV_MESSAGE_PAYLOAD_SIZE],
}

impl InputPostMessage {
    /// An input for `payload` (at most [`HV_MESSAGE_PAYLOAD_SIZE`] bytes) on
    /// `connection_id`, of type `message_type`; `None` when `payload` is
    /// too long.
    pub fn new(connection_id: u32, message_type: u32, payload: &[u8]) -> Option<Self> {
        if payload.len() > HV_MESSAGE_PAYLOAD_SIZE {
            return None;
        }
        let size = u32::try_from(payload.len()).ok()?;
        let mut input = Self::new_zeroed();
        input.connection_id = U32::new(connection_id);
        input.message_type = U32::new(message_type);
        input.payload_size = U32::new(size);
        input
            .payload
            .get_mut(..payload.len())?
            .copy_from_slice(payload);
        Some(input)
    }
}

/// SIGNAL_EVENT input (`struct hv_input_signal_event`, 8 bytes, TLFS
/// HvCallSignalEvent; the partition's: Linux's VMBus signals a channel with
/// it, as a fast call).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct InputSignalEvent {
    /// The target port's connection id (bits 23:0; 31:24 reserved).
    pub connection_id: U32,
    /// The event flag to set in the port's target (VMBus: 0).
    pub flag_number: U16,
    /// Must be zero (RsvdZ).
    pub reserved: U16,
}

/// `HV_INTERRUPT_SOURCE_MSI`: an [`InputRetargetDeviceInterrupt`]'s
/// interrupt is an MSI.
pub const HV_INTERRUPT_SOURCE_MSI: u32 = 1;
/// `HV_DEVICE_INTERRUPT_TARGET_MULTICAST`: deliver to every VP of the set.
pub const HV_DEVICE_INTERRUPT_TARGET_MULTICAST: u32 = 1;
/// `HV_DEVICE_INTERRUPT_TARGET_PROCESSOR_SET`: the target is a sparse VP
/// set (`vp_set`), not a 64-bit mask.
pub const HV_DEVICE_INTERRUPT_TARGET_PROCESSOR_SET: u32 = 2;
/// `HV_GENERIC_SET_SPARSE_4K`: a VP set's banks of 64 VPs, one u64 per
/// bit set in `valid_bank_mask`.
pub const HV_GENERIC_SET_SPARSE_4K: u64 = 0;
/// Banks a VP set holds at most (`HV_MAX_SPARSE_VCPU_BANKS`).
pub const HV_MAX_SPARSE_VCPU_BANKS: usize = 64;

/// RETARGET_INTERRUPT input (`struct hv_retarget_device_interrupt`, TLFS
/// HvCallRetargetDeviceInterrupt; the partition's, sent by pci-hyperv).
/// The fixed header is [`Self::FIXED_SIZE`] bytes; with the
/// PROCESSOR_SET flag a variable header follows (the call's variable
/// header size, in 8-byte units): `valid_bank_mask` and one bank per bit
/// set in it. This type holds the largest variable header, so that a copy
/// of the guest's bytes into a zeroed one reads as a whole.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct InputRetargetDeviceInterrupt {
    /// Must be [`HV_PARTITION_ID_SELF`].
    pub partition_id: U64,
    /// The device's logical id ([`DeviceId::logical_vpci`]).
    pub device_id: U64,
    /// `int_entry.source`: [`HV_INTERRUPT_SOURCE_MSI`].
    pub source: U32,
    /// Reserved.
    pub reserved1: U32,
    /// `int_entry.msi_entry.address`: the MSI address the device was
    /// given (its low 32 bits).
    pub msi_address: U32,
    /// `int_entry.msi_entry.data`: the MSI data the device was given.
    pub msi_data: U32,
    /// Reserved.
    pub reserved2: U64,
    /// `int_target.vector`: the vector to deliver now.
    pub vector: U32,
    /// `int_target.flags`: `HV_DEVICE_INTERRUPT_TARGET_*`.
    pub flags: U32,
    /// `int_target.vp_mask` (bit n: VP n), or with PROCESSOR_SET
    /// `vp_set.format` ([`HV_GENERIC_SET_SPARSE_4K`]).
    pub vp_mask_or_format: U64,
    /// With PROCESSOR_SET: `vp_set.valid_bank_mask` (variable header).
    pub valid_bank_mask: U64,
    /// With PROCESSOR_SET: `vp_set.bank_contents` (variable header).
    pub bank_contents: [U64; HV_MAX_SPARSE_VCPU_BANKS],
}

impl InputRetargetDeviceInterrupt {
    /// Bytes of the fixed header (through `vp_mask_or_format`).
    pub const FIXED_SIZE: usize = core::mem::offset_of!(Self, valid_bank_mask);

    /// The target VPs, as a bit per VP: from `vp_mask`, or from the sparse
    /// set given `var_words` 8-byte words of variable header. `None` for a
    /// malformed set (unknown format, a bank count that is not the mask's,
    /// a VP at or past 64: pvmm has at most 64 VPs).
    pub fn target_vps(&self, var_words: usize) -> Option<u64> {
        if self.flags.get() & HV_DEVICE_INTERRUPT_TARGET_PROCESSOR_SET == 0 {
            return (var_words == 0).then_some(self.vp_mask_or_format.get());
        }
        let mask = self.valid_bank_mask.get();
        if self.vp_mask_or_format.get() != HV_GENERIC_SET_SPARSE_4K
            || var_words != 1 + mask.count_ones() as usize
        {
            return None;
        }
        // The banks come in the mask's bit order; bank 0 holds VPs 0..64,
        // and a VP in any other bank is one pvmm lacks.
        let mut vps = 0;
        let banks = (0..64u32).filter(|b| mask & (1 << b) != 0);
        for (bank, contents) in banks.zip(&self.bank_contents) {
            match (bank, contents.get()) {
                (0, c) => vps = c,
                (_, 0) => {}
                _ => return None,
            }
        }
        Some(vps)
    }
}

/// GET_VP_REGISTERS input header (16 bytes), followed by one u32 register
/// name per rep (see [`register`]).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct InputGetVpRegisters {
    /// Must be [`HV_PARTITION_ID_SELF`].
    pub partition_id: U64,
    /// The VP: [`HV_VP_INDEX_SELF`] or an index.
    pub vp_index: U32,
    /// [`InputVtl`] of the registers.
    pub input_vtl: u8,
    /// Must be zero (Linux's rsvd_z8 and rsvd_z16).
    pub padding: [u8; 3],
}

/// One register value of GET_VP_REGISTERS's output (`hv_register_value`,
/// 16 bytes), one per rep.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct RegisterValue {
    /// Bits 63:0 (a 64-bit register's value).
    pub low: U64,
    /// Bits 127:64.
    pub high: U64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn restart_points_at_the_stub_nop_from_either_side_of_the_out() {
        let page = 0xffff_ffff_c000_3000u64;
        // Standard KVM: RIP at the `out`; a KVM that advanced it: past it.
        for rip in [page + 5, page + 7] {
            assert_eq!(hypercall_restart_rip(rip), Some(page + 4));
        }
        // Anywhere else (the `nop`, the `ret`, another page's code): no restart.
        for rip in [
            page,
            page + 4,
            page + 6,
            page + 8,
            page + 0x1005 - 0x1000 + 0x10,
        ] {
            assert_eq!(hypercall_restart_rip(rip), None, "{rip:#x}");
        }
        // The top page of the address space does not overflow.
        assert_eq!(
            hypercall_restart_rip(u64::MAX - 0xfff + 7),
            Some(u64::MAX - 0xfff + 4)
        );
        assert_eq!(
            &HYPERCALL_PAGE_CODE[..4],
            &[0xF3, 0x0F, 0x1E, 0xFA],
            "endbr64"
        );
    }

    #[test]
    fn struct_layouts_match_the_contract() {
        assert_eq!(size_of::<InputDeviceDomain>(), 24);
        assert_eq!(offset_of!(InputDeviceDomain, partition_id), 0);
        assert_eq!(offset_of!(InputDeviceDomain, owner_vtl), 8);
        assert_eq!(offset_of!(InputDeviceDomain, padding), 9);
        assert_eq!(offset_of!(InputDeviceDomain, domain_id), 16);

        assert_eq!(size_of::<InputGetIommuCapabilities>(), 16);
        assert_eq!(offset_of!(InputGetIommuCapabilities, partition_id), 0);
        assert_eq!(offset_of!(InputGetIommuCapabilities, reserved), 8);

        assert_eq!(size_of::<OutputGetIommuCapabilities>(), 24);
        assert_eq!(offset_of!(OutputGetIommuCapabilities, size), 0);
        assert_eq!(offset_of!(OutputGetIommuCapabilities, reserved), 4);
        assert_eq!(offset_of!(OutputGetIommuCapabilities, max_iova_width), 6);
        assert_eq!(offset_of!(OutputGetIommuCapabilities, max_pasid_width), 7);
        assert_eq!(offset_of!(OutputGetIommuCapabilities, iommu_cap), 8);
        assert_eq!(offset_of!(OutputGetIommuCapabilities, pgsize_bitmap), 16);

        assert_eq!(size_of::<InputGetLogicalDeviceProperty>(), 24);
        assert_eq!(offset_of!(InputGetLogicalDeviceProperty, partition_id), 0);
        assert_eq!(
            offset_of!(InputGetLogicalDeviceProperty, logical_device_id),
            8
        );
        assert_eq!(offset_of!(InputGetLogicalDeviceProperty, code), 16);
        assert_eq!(offset_of!(InputGetLogicalDeviceProperty, reserved), 20);

        assert_eq!(size_of::<OutputGetLogicalDeviceProperty>(), 16);
        assert_eq!(offset_of!(OutputGetLogicalDeviceProperty, device_iommu), 0);
        assert_eq!(offset_of!(OutputGetLogicalDeviceProperty, reserved), 8);

        assert_eq!(size_of::<InputCreateDeviceDomain>(), 28);
        assert_eq!(offset_of!(InputCreateDeviceDomain, device_domain), 0);
        assert_eq!(
            offset_of!(InputCreateDeviceDomain, create_device_domain_flags),
            24
        );

        assert_eq!(size_of::<InputDeleteDeviceDomain>(), 24);
        assert_eq!(offset_of!(InputDeleteDeviceDomain, device_domain), 0);

        assert_eq!(size_of::<InputAttachDeviceDomain>(), 32);
        assert_eq!(offset_of!(InputAttachDeviceDomain, device_domain), 0);
        assert_eq!(offset_of!(InputAttachDeviceDomain, device_id), 24);

        assert_eq!(size_of::<InputDetachDeviceDomain>(), 16);
        assert_eq!(offset_of!(InputDetachDeviceDomain, partition_id), 0);
        assert_eq!(offset_of!(InputDetachDeviceDomain, device_id), 8);

        assert_eq!(size_of::<DeviceDomainSettings>(), 16);
        assert_eq!(offset_of!(DeviceDomainSettings, flags), 0);
        assert_eq!(offset_of!(DeviceDomainSettings, page_table_root), 8);

        assert_eq!(size_of::<InputConfigureDeviceDomain>(), 40);
        assert_eq!(offset_of!(InputConfigureDeviceDomain, device_domain), 0);
        assert_eq!(offset_of!(InputConfigureDeviceDomain, settings), 24);
        assert_eq!(
            offset_of!(InputConfigureDeviceDomain, settings)
                + offset_of!(DeviceDomainSettings, page_table_root),
            32
        );

        assert_eq!(size_of::<InputMapDeviceGpaPages>(), 40);
        assert_eq!(offset_of!(InputMapDeviceGpaPages, device_domain), 0);
        assert_eq!(offset_of!(InputMapDeviceGpaPages, target_vtl), 24);
        assert_eq!(offset_of!(InputMapDeviceGpaPages, padding), 25);
        assert_eq!(offset_of!(InputMapDeviceGpaPages, map_flags), 28);
        assert_eq!(
            offset_of!(InputMapDeviceGpaPages, target_device_va_base),
            32
        );

        assert_eq!(size_of::<InputUnmapDeviceGpaPages>(), 32);
        assert_eq!(offset_of!(InputUnmapDeviceGpaPages, device_domain), 0);
        assert_eq!(
            offset_of!(InputUnmapDeviceGpaPages, target_device_va_base),
            24
        );

        assert_eq!(size_of::<InputFlushDeviceDomain>(), 32);
        assert_eq!(offset_of!(InputFlushDeviceDomain, device_domain), 0);
        assert_eq!(offset_of!(InputFlushDeviceDomain, flags), 24);
        assert_eq!(offset_of!(InputFlushDeviceDomain, reserved), 28);

        assert_eq!(size_of::<InputSendSyntheticClusterIpi>(), 16);
        assert_eq!(offset_of!(InputSendSyntheticClusterIpi, vector), 0);
        assert_eq!(offset_of!(InputSendSyntheticClusterIpi, reserved), 4);
        assert_eq!(offset_of!(InputSendSyntheticClusterIpi, cpu_mask), 8);

        assert_eq!(size_of::<InputSignalEvent>(), 8);
        assert_eq!(offset_of!(InputSignalEvent, flag_number), 4);
        assert_eq!(offset_of!(InputSignalEvent, reserved), 6);
        // Linux's hv_retarget_device_interrupt: 56 fixed bytes, then the
        // VP set's mask and banks.
        assert_eq!(InputRetargetDeviceInterrupt::FIXED_SIZE, 56);
        assert_eq!(offset_of!(InputRetargetDeviceInterrupt, device_id), 8);
        assert_eq!(offset_of!(InputRetargetDeviceInterrupt, source), 16);
        assert_eq!(offset_of!(InputRetargetDeviceInterrupt, msi_address), 24);
        assert_eq!(offset_of!(InputRetargetDeviceInterrupt, msi_data), 28);
        assert_eq!(offset_of!(InputRetargetDeviceInterrupt, vector), 40);
        assert_eq!(offset_of!(InputRetargetDeviceInterrupt, flags), 44);
        assert_eq!(
            offset_of!(InputRetargetDeviceInterrupt, vp_mask_or_format),
            48
        );
        assert_eq!(offset_of!(InputRetargetDeviceInterrupt, bank_contents), 64);
        assert_eq!(size_of::<InputRetargetDeviceInterrupt>(), 64 + 64 * 8);
        assert_eq!(size_of::<InputPostMessage>(), 256);
        assert_eq!(offset_of!(InputPostMessage, connection_id), 0);
        assert_eq!(offset_of!(InputPostMessage, reserved), 4);
        assert_eq!(offset_of!(InputPostMessage, message_type), 8);
        assert_eq!(offset_of!(InputPostMessage, payload_size), 12);
        assert_eq!(offset_of!(InputPostMessage, payload), 16);

        assert_eq!(size_of::<InputGetVpRegisters>(), 16);
        assert_eq!(offset_of!(InputGetVpRegisters, partition_id), 0);
        assert_eq!(offset_of!(InputGetVpRegisters, vp_index), 8);
        assert_eq!(offset_of!(InputGetVpRegisters, input_vtl), 12);
        assert_eq!(offset_of!(InputGetVpRegisters, padding), 13);

        assert_eq!(size_of::<RegisterValue>(), 16);
        assert_eq!(offset_of!(RegisterValue, low), 0);
        assert_eq!(offset_of!(RegisterValue, high), 8);

        assert_eq!(size_of::<InputFlushDeviceDomainList>(), 32);
        assert_eq!(offset_of!(InputFlushDeviceDomainList, device_domain), 0);
        assert_eq!(offset_of!(InputFlushDeviceDomainList, flags), 24);
        assert_eq!(offset_of!(InputFlushDeviceDomainList, reserved), 28);
    }

    #[test]
    fn rep_lists_fill_exactly_one_page() {
        let map = size_of::<InputMapDeviceGpaPages>() as u64 + MAP_MAX_REPS_PER_PAGE as u64 * 8;
        assert_eq!(map, HV_PAGE_SIZE);
        let flush = size_of::<InputFlushDeviceDomainList>() as u64
            + FLUSH_LIST_MAX_REPS_PER_PAGE as u64 * 8;
        assert_eq!(flush, HV_PAGE_SIZE);
        let vp_out = size_of::<RegisterValue>() as u64 * GET_VP_REGISTERS_MAX_REPS_PER_PAGE as u64;
        assert_eq!(vp_out, HV_PAGE_SIZE);
        let vp_in =
            size_of::<InputGetVpRegisters>() as u64 + GET_VP_REGISTERS_MAX_REPS_PER_PAGE as u64 * 4;
        assert!(vp_in <= HV_PAGE_SIZE);
    }

    #[test]
    fn structs_are_packed_and_little_endian() {
        let mut input = InputMapDeviceGpaPages::new_zeroed();
        input.device_domain = InputDeviceDomain::new(DeviceDomainId::with(DeviceDomainType::S1, 7));
        input.map_flags = U32::new(0x0302_0100);
        input.target_device_va_base = U64::new(0x1122_3344_5566_7788);
        let bytes = input.as_bytes();
        assert_eq!(&bytes[0..8], &[0xFF; 8]);
        assert_eq!(&bytes[16..24], &[1, 0, 0, 0, 7, 0, 0, 0]);
        assert_eq!(&bytes[28..32], &[0, 1, 2, 3]);
        assert_eq!(
            &bytes[32..40],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(core::mem::align_of::<InputMapDeviceGpaPages>(), 1);
        assert_eq!(core::mem::align_of::<InputCreateDeviceDomain>(), 1);
    }

    #[test]
    fn reference_tsc_page_layout() {
        assert_eq!(size_of::<ReferenceTscPage>(), 24);
        assert_eq!(offset_of!(ReferenceTscPage, tsc_sequence), 0);
        assert_eq!(offset_of!(ReferenceTscPage, reserved1), 4);
        assert_eq!(offset_of!(ReferenceTscPage, tsc_scale), 8);
        assert_eq!(offset_of!(ReferenceTscPage, tsc_offset), 16);
        assert_eq!(core::mem::align_of::<ReferenceTscPage>(), 1);
        let page = ReferenceTscPage {
            tsc_sequence: U32::new(0x0403_0201),
            reserved1: U32::new(0),
            tsc_scale: U64::new(0x1122_3344_5566_7788),
            tsc_offset: I64::new(-2),
        };
        let b = page.as_bytes();
        assert_eq!(&b[0..4], &[1, 2, 3, 4]);
        assert_eq!(&b[8..16], &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
        assert_eq!(
            &b[16..24],
            &[0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
        );
    }

    #[test]
    fn reference_time_from_the_tsc() {
        // A 2.5 GHz TSC: 250 ticks per 100 ns.
        let scale = reference_tsc_scale(2_500_000_000).unwrap();
        assert_eq!(scale, u64::try_from((1u128 << 64) / 250).unwrap());
        let page = ReferenceTscPage {
            tsc_sequence: U32::new(1),
            tsc_scale: U64::new(scale),
            tsc_offset: I64::new(-1000),
            ..Default::default()
        };
        // One second of ticks is 10^7 units, less the offset; the scale is
        // rounded down, so at most one unit short.
        let t = page.reference_time(2_500_000_000 + 1000 * 250).unwrap();
        assert!((10_000_000 - 1..=10_000_000).contains(&t), "{t}");
        assert_eq!(reference_time(0, scale, 5), 5);
        assert_eq!(reference_time(u64::MAX, u64::MAX, 0), u64::MAX - 1);
        // Invalid page, and scales that do not fit.
        let invalid = ReferenceTscPage {
            tsc_sequence: U32::new(0),
            ..page
        };
        assert_eq!(invalid.reference_time(1), None);
        assert_eq!(reference_tsc_scale(REFERENCE_TIME_HZ), None);
        assert_eq!(reference_tsc_scale(0), None);
        assert_eq!(
            reference_tsc_scale(REFERENCE_TIME_HZ + 1).map(|s| s >> 63),
            Some(1)
        );
        assert_eq!(reference_tsc_scale(u64::MAX), Some(REFERENCE_TIME_HZ));
    }

    #[test]
    fn synthetic_msrs_and_cpuid_bits_match_linux() {
        // arch/x86/include/asm/hyperv-tlfs.h and include/asm-generic/hyperv-tlfs.h.
        assert_eq!(msr::TIME_REF_COUNT, 0x4000_0020);
        assert_eq!(msr::REFERENCE_TSC, 0x4000_0021);
        assert_eq!(msr::TSC_FREQUENCY, 0x4000_0022);
        assert_eq!(msr::APIC_FREQUENCY, 0x4000_0023);
        assert_eq!(msr::VP_ASSIST_PAGE, 0x4000_0073);
        assert_eq!(msr::TSC_INVARIANT_CONTROL, 0x4000_0118);
        // include/hyperv/hvgdk_mini.h: the SynIC.
        assert_eq!(msr::SCONTROL, 0x4000_0080);
        assert_eq!(msr::SVERSION, 0x4000_0081);
        assert_eq!(msr::SIEFP, 0x4000_0082);
        assert_eq!(msr::SIMP, 0x4000_0083);
        assert_eq!(msr::EOM, 0x4000_0084);
        assert_eq!(msr::SINT0, 0x4000_0090);
        assert_eq!(msr::SINT15, 0x4000_009F);
        assert_eq!(msr::sint(0), Some(0x4000_0090));
        assert_eq!(msr::sint(2), Some(0x4000_0092));
        assert_eq!(msr::sint(15), Some(msr::SINT15));
        assert_eq!(msr::sint(16), None);
        assert_eq!(msr::sint(u8::MAX), None);
        for sint in 0..16 {
            assert_eq!(msr::sint(sint).and_then(msr::sint_of), Some(sint));
        }
        assert_eq!(msr::sint_of(0x4000_009F), Some(15));
        assert_eq!(msr::sint_of(0x4000_00A0), None);
        assert_eq!(msr::sint_of(0x4000_008F), None);
        assert!(msr::is_synic(msr::EOM) && msr::is_synic(msr::SINT15));
        assert!(!msr::is_synic(msr::SINT15 + 1) && !msr::is_synic(msr::VP_INDEX));
        assert_eq!(cpuid::FEATURES_EAX_TIME_REF_COUNT, 0x2);
        assert_eq!(cpuid::FEATURES_EAX_REFERENCE_TSC, 0x200);
        assert_eq!(cpuid::FEATURES_EAX_FREQUENCY_MSRS, 0x800);
        assert_eq!(cpuid::FEATURES_EAX_TSC_INVARIANT, 0x8000);
        assert_eq!(cpuid::FEATURES_EDX_FREQUENCY_MSRS, 0x100);
        assert_eq!(cpuid::HINTS_EAX_RELAXED_TIMING, 0x20);
        assert_eq!(&cpuid::KVM_SIGNATURE, b"KVMKVMKVM\0\0\0");
        let page = OverlayPageMsr::new().with_enable(true).with_gpn(0xABCDE);
        assert_eq!(page.into_bits(), 0xABCDE << 12 | 1);
        assert_eq!(OverlayPageMsr::from_bits(1 << 11).reserved(), 0x400);
        assert_eq!(OverlayPageMsr::from_bits(0x2).reserved(), 1);
    }

    #[test]
    fn control_word_fields() {
        let c = Control::new()
            .with_code(0x00B3)
            .with_fast(true)
            .with_variable_header_size(0x3FF)
            .with_nested(true)
            .with_rep_count(0xABC)
            .with_rep_start(0x123);
        assert_eq!(
            c.into_bits(),
            0x00B3 | 1 << 16 | 0x3FF << 17 | 1 << 31 | 0xABC << 32 | 0x123 << 48
        );
        assert!(c.reserved_clear());
        assert_eq!(c.call_code(), HypercallCode::MAP_DEVICE_GPA_PAGES);
        for bit in (27..=30).chain(44..=47).chain(60..=63) {
            assert!(!Control::from_bits(1 << bit).reserved_clear(), "bit {bit}");
        }
        assert_eq!(
            Control::RESERVED_MASK,
            0xF << 27 | 0xF << 44 | 0xF << 60,
            "reserved bits are 30:27, 47:44, 63:60"
        );
    }

    #[test]
    fn result_word_fields() {
        let r = HypercallOutput::from_status(HvStatus::INVALID_PARAMETER, 0xFFF);
        assert_eq!(r.into_bits(), 5 | 0xFFF << 32);
        assert_eq!(r.hv_status(), HvStatus::INVALID_PARAMETER);
    }

    #[test]
    fn id_words() {
        let d = DeviceDomainId::with(DeviceDomainType::S1, 0xFFFF_FFFF);
        assert_eq!(d.into_bits(), 0xFFFF_FFFF_0000_0001);
        assert_eq!(DeviceDomainId::from_bits(0x10).reserved(), 1);
        assert_eq!(
            DeviceDomainId::from_bits(0xF).domain_type(),
            DeviceDomainType(0xF)
        );

        let dev = DeviceId::pci(0x1234, 0xAB, 0x1F, 7);
        assert_eq!(
            dev.into_bits(),
            1 << 62 | 0x1234 << 16 | 0xAB << 8 | 0x1F << 3 | 7
        );
        assert_eq!(dev.rid().bus(), 0xAB);
        assert_eq!(dev.rid().device(), 0x1F);
        assert_eq!(dev.rid().function(), 7);
        assert_eq!(
            DeviceId::from_bits(3 << 62).device_type(),
            device_type::ACPI
        );

        let e = FlushListEntry::new()
            .with_page_mask_shift(9)
            .with_page_number(0x200);
        assert_eq!(e.into_bits(), 0x200 << 12 | 9);

        // LOGICAL form: Linux's prefix from the vPCI channel's instance GUID.
        let guid = [
            0x10, 0x11, 0x12, 0x13, 0xA4, 0xA5, 0xB6, 0xB7, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(logical_device_id_prefix(&guid), 0xA5A4_B7B0);
        let l = DeviceId::logical_vpci(&guid, 3);
        assert_eq!(l.into_bits(), 0xA5A4_B7B3);
        assert!(l.is_logical() && !l.is_plain_pci());
        assert_eq!(l.device_type(), device_type::LOGICAL);
        assert!(!dev.is_logical());
        assert!(!DeviceId::from_bits(1 << 40).is_logical());
    }

    #[test]
    fn flag_words() {
        assert_eq!(MapFlags::new().with_readable(true).into_bits(), 0x1);
        assert_eq!(MapFlags::new().with_writable(true).into_bits(), 0x2);
        assert_eq!(MapFlags::new().with_kernel_exec(true).into_bits(), 0x4);
        assert_eq!(MapFlags::new().with_user_exec(true).into_bits(), 0x8);
        assert_eq!(MapFlags::from_bits(0x10).reserved(), 1);
        let s = DeviceDomainSettingsFlags::new()
            .with_translation_enabled(true)
            .with_blocked(true)
            .with_first_stage_paging_mode(true);
        assert_eq!(s.into_bits(), 0b111);
        let caps = IommuCapabilities::new()
            .with_present(true)
            .with_s2(true)
            .with_s1(true)
            .with_s1_5lvl(true)
            .with_pasid(true)
            .with_ats(true)
            .with_pri(true);
        assert_eq!(caps.into_bits(), 0x7F);
        assert_eq!(CreateDeviceDomainFlags::from_bits(0b11).reserved(), 0);
        assert_eq!(CreateDeviceDomainFlags::from_bits(0b100).reserved(), 1);
        assert_eq!(FlushListFlags::from_bits(1).reserved(), 0);
        assert_eq!(DeviceIommuProperty::new().with_enabled(true).into_bits(), 1);
        let msr = HypercallMsr::new().with_enable(true).with_gpn(0x1234);
        assert_eq!(msr.into_bits(), 0x1234 << 12 | 1);
        assert!(InputVtl::from_bits(0).is_vtl0());
        assert!(InputVtl::from_bits(0x10).is_vtl0());
        assert!(!InputVtl::from_bits(0x11).is_vtl0());
        assert!(!InputVtl::from_bits(0x20).is_vtl0());
    }

    #[test]
    fn codes_and_statuses() {
        assert_eq!(HypercallCode::GET_VP_REGISTERS.0, 0x0050);
        assert_eq!(register::VSM_VP_STATUS, 0x000D_0003);
        assert_eq!(HV_VP_INDEX_SELF, 0xFFFF_FFFE);
        assert_eq!(HypercallCode::GET_IOMMU_CAPABILITIES.0, 0x0125);
        assert_eq!(HypercallCode::GET_LOGICAL_DEVICE_PROPERTY.0, 0x0127);
        assert_eq!(HypercallCode::CREATE_DEVICE_DOMAIN.0, 0x00B1);
        assert_eq!(HypercallCode::DELETE_DEVICE_DOMAIN.0, 0x00C5);
        assert_eq!(HypercallCode::ATTACH_DEVICE_DOMAIN.0, 0x00B2);
        assert_eq!(HypercallCode::DETACH_DEVICE_DOMAIN.0, 0x00C4);
        assert_eq!(HypercallCode::CONFIGURE_DEVICE_DOMAIN.0, 0x00CE);
        assert_eq!(HypercallCode::MAP_DEVICE_GPA_PAGES.0, 0x00B3);
        assert_eq!(HypercallCode::UNMAP_DEVICE_GPA_PAGES.0, 0x00B4);
        assert_eq!(HypercallCode::FLUSH_DEVICE_DOMAIN.0, 0x00D0);
        assert_eq!(HypercallCode::FLUSH_DEVICE_DOMAIN_LIST.0, 0x00D1);
        for code in HypercallCode::ALL {
            assert!(code.name().is_some());
        }
        assert_eq!(HypercallCode(0x0001).name(), None);

        // The contract's (section 3), then the SynIC's.
        let expected: [(HvStatus, u16); 17] = [
            (HvStatus::SUCCESS, 0),
            (HvStatus::INVALID_HYPERCALL_CODE, 2),
            (HvStatus::INVALID_HYPERCALL_INPUT, 3),
            (HvStatus::INVALID_ALIGNMENT, 4),
            (HvStatus::INVALID_PARAMETER, 5),
            (HvStatus::ACCESS_DENIED, 6),
            (HvStatus::INVALID_PARTITION_STATE, 7),
            (HvStatus::OPERATION_DENIED, 8),
            (HvStatus::INSUFFICIENT_MEMORY, 0xB),
            (HvStatus::INVALID_PARTITION_ID, 0xD),
            (HvStatus::NOT_FOUND, 0x10),
            (HvStatus::INSUFFICIENT_BUFFERS, 0x13),
            (HvStatus::NO_RESOURCES, 0x1D),
            (HvStatus::INSUFFICIENT_DEVICE_DOMAINS, 0x38),
            (HvStatus::INVALID_DEVICE_ID, 0x57),
            (HvStatus::INVALID_DEVICE_STATE, 0x58),
            (HvStatus::DEVICE_ALREADY_IN_DOMAIN, 0x66),
        ];
        let synic: [(HvStatus, u16); 4] = [
            (HvStatus::INVALID_VP_INDEX, 0xE),
            (HvStatus::INVALID_PORT_ID, 0x11),
            (HvStatus::INVALID_CONNECTION_ID, 0x12),
            (HvStatus::INVALID_SYNIC_STATE, 0x18),
        ];
        for (status, value) in expected.iter().chain(&synic) {
            assert_eq!(status.0, *value);
            assert!(status.name().is_some());
        }
        // PVIOMMU is exactly the contract's errors, ALL those and the
        // SynIC's, each in numeric order.
        let contract_errors = &expected[1..];
        assert_eq!(HvError::PVIOMMU.len(), contract_errors.len());
        for (e, (status, _)) in HvError::PVIOMMU.iter().zip(contract_errors) {
            assert_eq!(e.status(), *status);
        }
        assert_eq!(HvError::ALL.len(), 20);
        for (status, _) in contract_errors.iter().chain(&synic) {
            assert!(HvError::ALL.contains(&HvError::from_status(*status).unwrap()));
        }
        assert!(HvError::ALL.windows(2).all(|w| w[0] < w[1]));
        assert!(HvError::PVIOMMU.windows(2).all(|w| w[0] < w[1]));
        for e in HvError::ALL {
            assert_eq!(HvError::from_status(e.status()), Some(*e));
            assert_eq!(e.status().name(), HvStatus::from(Err::<(), _>(*e)).name());
        }
        assert_eq!(HvError::from_status(HvStatus::SUCCESS), None);
        assert_eq!(HvError::NO_RESOURCES.status(), HvStatus::NO_RESOURCES);
    }
}
