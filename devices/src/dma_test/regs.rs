//! The dma-test device's guest interface: PCI identity and the register
//! file of BAR 0. One definition, shared by the device (`devices` crate)
//! and the test kernel's driver (included there with `#[path]`), so it is
//! `no_std` and depends on zerocopy only.
//!
//! Programming: write SRC_IOVA, DST_IOVA, LEN (and PATTERN for a fill),
//! optionally MSI_ON_COMPLETION = 1, then COMMAND. The command runs before
//! the write returns; STATUS tells how it ended, and on a fault FAULT_IOVA,
//! FAULT_REASON and FAULT_ACCESS tell where and why. Registers are 32 or 64
//! bits wide and are accessed with naturally aligned 4- or 8-byte accesses.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// PCI vendor id.
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device id.
pub const DEVICE_ID: u16 = 0x0d7a;
/// Size of BAR 0 (32-bit memory).
pub const BAR_SIZE: u64 = 0x1000;
/// Longest transfer (bytes).
pub const MAX_LEN: u32 = 1 << 20;

/// The register file at the start of BAR 0.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DmaTestRegs {
    /// Source device address (copy, checksum). Read-write.
    pub src_iova: u64,
    /// Destination device address (copy, fill). Read-write.
    pub dst_iova: u64,
    /// Bytes to transfer, 1..=[`MAX_LEN`]. Read-write.
    pub len: u32,
    /// Fill pattern, repeated little-endian. Read-write.
    pub pattern: u32,
    /// Writing a [`command`] code runs it; reads the last one.
    pub command: u32,
    /// How the last command ended ([`status`]). Read-only.
    pub status: u32,
    /// First faulting device address of the last command. Read-only.
    pub fault_iova: u64,
    /// Why it faulted ([`fault`]; bits 15:8 the S1 paging level where one
    /// applies). Read-only.
    pub fault_reason: u32,
    /// What faulted: 1 read, 2 write. Read-only.
    pub fault_access: u32,
    /// Checksum result: the wrapping sum of the bytes read. Read-only.
    pub result: u64,
    /// Commands completed (any status) since reset. Read-only.
    pub completions: u32,
    /// Bit 0: raise the MSI when a command completes. Read-write.
    pub msi_on_completion: u32,
}

/// Register offsets in BAR 0.
pub mod offset {
    use super::DmaTestRegs;
    use core::mem::offset_of;
    /// [`DmaTestRegs::src_iova`].
    pub const SRC_IOVA: u64 = offset_of!(DmaTestRegs, src_iova) as u64;
    /// [`DmaTestRegs::dst_iova`].
    pub const DST_IOVA: u64 = offset_of!(DmaTestRegs, dst_iova) as u64;
    /// [`DmaTestRegs::len`].
    pub const LEN: u64 = offset_of!(DmaTestRegs, len) as u64;
    /// [`DmaTestRegs::pattern`].
    pub const PATTERN: u64 = offset_of!(DmaTestRegs, pattern) as u64;
    /// [`DmaTestRegs::command`].
    pub const COMMAND: u64 = offset_of!(DmaTestRegs, command) as u64;
    /// [`DmaTestRegs::status`].
    pub const STATUS: u64 = offset_of!(DmaTestRegs, status) as u64;
    /// [`DmaTestRegs::fault_iova`].
    pub const FAULT_IOVA: u64 = offset_of!(DmaTestRegs, fault_iova) as u64;
    /// [`DmaTestRegs::fault_reason`].
    pub const FAULT_REASON: u64 = offset_of!(DmaTestRegs, fault_reason) as u64;
    /// [`DmaTestRegs::fault_access`].
    pub const FAULT_ACCESS: u64 = offset_of!(DmaTestRegs, fault_access) as u64;
    /// [`DmaTestRegs::result`].
    pub const RESULT: u64 = offset_of!(DmaTestRegs, result) as u64;
    /// [`DmaTestRegs::completions`].
    pub const COMPLETIONS: u64 = offset_of!(DmaTestRegs, completions) as u64;
    /// [`DmaTestRegs::msi_on_completion`].
    pub const MSI_ON_COMPLETION: u64 = offset_of!(DmaTestRegs, msi_on_completion) as u64;
    /// Size of the register file.
    pub const END: u64 = core::mem::size_of::<DmaTestRegs>() as u64;
}

/// Command codes.
pub mod command {
    /// Copy LEN bytes from SRC_IOVA to DST_IOVA.
    pub const COPY: u32 = 1;
    /// Fill LEN bytes at DST_IOVA with PATTERN.
    pub const FILL: u32 = 2;
    /// Sum LEN bytes at SRC_IOVA into RESULT.
    pub const CHECKSUM: u32 = 3;
}

/// Status codes.
pub mod status {
    /// No command yet.
    pub const IDLE: u32 = 0;
    /// The last command completed.
    pub const DONE: u32 = 1;
    /// The last command faulted in the IOMMU (see FAULT_*); nothing was
    /// written for a faulting copy or fill.
    pub const FAULT: u32 = 2;
    /// Unknown command code.
    pub const BAD_COMMAND: u32 = 3;
    /// LEN is 0 or above [`super::MAX_LEN`].
    pub const BAD_LENGTH: u32 = 4;
    /// Bus mastering is off in the command register.
    pub const BUS_MASTER_OFF: u32 = 5;
}

/// Fault reason codes (FAULT_REASON bits 7:0).
pub mod fault {
    /// No fault.
    pub const NONE: u32 = 0;
    /// The device is not known to the IOMMU.
    pub const UNKNOWN_DEVICE: u32 = 1;
    /// The address range wraps.
    pub const ADDRESS_OVERFLOW: u32 = 2;
    /// The address is past the IOMMU's reach.
    pub const IOVA_OUT_OF_RANGE: u32 = 3;
    /// The device is in the null domain (or a blocked S1 domain).
    pub const BLOCKED: u32 = 4;
    /// The S1 domain has translation disabled.
    pub const TRANSLATION_DISABLED: u32 = 5;
    /// No S2 mapping.
    pub const NOT_MAPPED: u32 = 6;
    /// A write to a read-only mapping.
    pub const WRITE_DENIED: u32 = 7;
    /// An S1 entry is supervisor-only.
    pub const SUPERVISOR_ONLY: u32 = 8;
    /// An S1 entry is not present.
    pub const S1_NOT_PRESENT: u32 = 9;
    /// An S1 entry has reserved bits set.
    pub const S1_RESERVED: u32 = 10;
    /// An S1 table is outside guest RAM.
    pub const S1_TABLE_OUTSIDE_RAM: u32 = 11;
    /// The translated address is outside guest RAM.
    pub const GPA_OUTSIDE_RAM: u32 = 12;
    /// Any other reason.
    pub const OTHER: u32 = 0xff;

    /// A short name for a FAULT_REASON value.
    pub fn name(reason: u32) -> &'static str {
        match reason & 0xff {
            NONE => "none",
            UNKNOWN_DEVICE => "unknown device",
            ADDRESS_OVERFLOW => "address overflow",
            IOVA_OUT_OF_RANGE => "IOVA out of range",
            BLOCKED => "blocked",
            TRANSLATION_DISABLED => "translation disabled",
            NOT_MAPPED => "not mapped",
            WRITE_DENIED => "write denied",
            SUPERVISOR_ONLY => "supervisor-only page",
            S1_NOT_PRESENT => "S1 entry not present",
            S1_RESERVED => "S1 reserved bits",
            S1_TABLE_OUTSIDE_RAM => "S1 table outside RAM",
            GPA_OUTSIDE_RAM => "GPA outside RAM",
            _ => "other",
        }
    }
}
