//! vPCI wire formats: the messages of Hyper-V's virtual PCI bus as Linux's
//! `pci-hyperv` driver (`drivers/pci/controller/pci-hyperv.c`, Linux 7.2)
//! sends and expects them over its VMBus channel.
//!
//! Every message starts with a `pci_message` (its [`MessageType`]). Linux's
//! structs that begin with a `vmpacket_descriptor` (`pci_response`,
//! `pci_incoming_message` and those built on them) are given here without
//! it: the ring layer reads and writes the descriptor, and a payload starts
//! at the `pci_message` (guest to host, and host-initiated messages) or at
//! the `s32 status` (completions). Like the rest of the crate, the structs
//! are `#[repr(C)]` zerocopy structs of little-endian integers (alignment
//! 1, packed like Linux's `__packed`), checked field by field in the tests.

use bitfield_struct::bitfield;
use pviommu_abi::named_values;
use zerocopy::little_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use crate::STATUS_UNSUCCESSFUL;

/// `PCI_MAKE_VERSION(major, minor)`: `major << 16 | minor`.
pub const fn make_version(major: u16, minor: u16) -> u32 {
    (major as u32) << 16 | minor as u32
}

/// `PCI_PROTOCOL_VERSION_1_1` (Windows 10): not served by pvmm.
pub const PCI_PROTOCOL_VERSION_1_1: u32 = make_version(1, 1);
/// `PCI_PROTOCOL_VERSION_1_2` (RS1): CREATE_INTERRUPT_MESSAGE2,
/// RESOURCES_ASSIGNED2, the VP-set form of RETARGET_INTERRUPT.
pub const PCI_PROTOCOL_VERSION_1_2: u32 = make_version(1, 2);
/// `PCI_PROTOCOL_VERSION_1_3` (Vibranium).
pub const PCI_PROTOCOL_VERSION_1_3: u32 = make_version(1, 3);
/// `PCI_PROTOCOL_VERSION_1_4` (WS2022): CREATE_INTERRUPT_MESSAGE3; Linux
/// proposes it first.
pub const PCI_PROTOCOL_VERSION_1_4: u32 = make_version(1, 4);

/// `VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED`: the sender of an inband
/// packet waits for a `VM_PKT_COMP` with its transaction id.
pub const VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED: u16 = 1;

/// `STATUS_SUCCESS`.
pub const STATUS_SUCCESS: u32 = 0;
/// `STATUS_REVISION_MISMATCH`: the answer to a protocol version the host
/// does not serve (Linux then tries its next one; any other failure ends
/// the probe).
pub const STATUS_REVISION_MISMATCH: u32 = 0xC000_0059;
/// `STATUS_INVALID_PARAMETER`.
pub const STATUS_INVALID_PARAMETER: u32 = 0xC000_000D;
/// `STATUS_NO_SUCH_DEVICE`.
pub const STATUS_NO_SUCH_DEVICE: u32 = 0xC000_000E;
/// `STATUS_INSUFFICIENT_RESOURCES`.
pub const STATUS_INSUFFICIENT_RESOURCES: u32 = 0xC000_009A;
/// `STATUS_NOT_SUPPORTED`.
pub const STATUS_NOT_SUPPORTED: u32 = 0xC000_00BB;
/// `STATUS_INVALID_DEVICE_STATE`.
pub const STATUS_INVALID_DEVICE_STATE: u32 = 0xC000_0184;

/// An NTSTATUS as the `s32 status` of a response (failures are negative).
pub const fn ntstatus(code: u32) -> i32 {
    i32::from_le_bytes(code.to_le_bytes())
}

/// `PCI_CONFIG_MMIO_LENGTH`: the configuration window the guest places
/// with BUS_D0ENTRY (two pages).
pub const PCI_CONFIG_MMIO_LENGTH: u64 = 0x2000;
/// `CFG_PAGE_OFFSET`: the selected function's configuration space starts
/// here in the window; the page before it holds the slot register.
pub const CFG_PAGE_OFFSET: u64 = 0x1000;
/// `CFG_PAGE_SIZE`: bytes of configuration space reachable (4 KiB).
pub const CFG_PAGE_SIZE: u64 = PCI_CONFIG_MMIO_LENGTH - CFG_PAGE_OFFSET;
/// `PCI_STD_NUM_BARS`.
pub const PCI_STD_NUM_BARS: usize = 6;
/// `HV_CONFIG_BLOCK_SIZE_MAX` (`include/linux/hyperv.h`): bytes of a
/// READ_BLOCK / WRITE_BLOCK configuration block.
pub const HV_CONFIG_BLOCK_SIZE_MAX: usize = 128;
/// `MAX_SUPPORTED_MSI_MESSAGES`.
pub const MAX_SUPPORTED_MSI_MESSAGES: u32 = 0x400;
/// Entries of `processor_array` in [`HvMsiDesc2`] and [`HvMsiDesc3`].
pub const HV_MSI_MAX_PROCESSORS: usize = 32;
/// `APIC_DELIVERY_MODE_FIXED`: the `delivery_mode` Linux sends on x86
/// (`DELIVERY_MODE`).
pub const APIC_DELIVERY_MODE_FIXED: u8 = 0;
/// `HV_PCI_DEVICE_FLAG_NUMA_AFFINITY`: [`FunctionDescription2`]'s
/// `virtual_numa_node` is meaningful.
pub const HV_PCI_DEVICE_FLAG_NUMA_AFFINITY: u32 = 1;

/// `PCI_MESSAGE_BASE`: every message type is this plus a small number.
pub const PCI_MESSAGE_BASE: u32 = 0x4249_0000;

/// A vPCI message type (`enum pci_message_type`): the first field of every
/// message.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageType(pub u32);

named_values! {
    MessageType, "{:#x}",
    /// Host: the functions on the bus (`pci_bus_relations`, 1.1).
    BUS_RELATIONS = PCI_MESSAGE_BASE,
    /// Guest: send the bus relations (no completion).
    QUERY_BUS_RELATIONS = PCI_MESSAGE_BASE + 1,
    /// Guest: set a function's power state (`pci_set_power`; Linux never
    /// sends it).
    POWER_STATE_CHANGE = PCI_MESSAGE_BASE + 4,
    /// Guest: a function's probed BARs (`pci_child_message`).
    QUERY_RESOURCE_REQUIREMENTS = PCI_MESSAGE_BASE + 5,
    /// Unused by Linux.
    QUERY_RESOURCE_RESOURCES = PCI_MESSAGE_BASE + 6,
    /// Guest: the bus enters D0, with the configuration window's base.
    BUS_D0ENTRY = PCI_MESSAGE_BASE + 7,
    /// Guest: the bus leaves D0 (a bare `pci_message`).
    BUS_D0EXIT = PCI_MESSAGE_BASE + 8,
    /// Guest: read a configuration block (`pci_read_block`).
    READ_BLOCK = PCI_MESSAGE_BASE + 9,
    /// Guest: write a configuration block (`pci_write_block`).
    WRITE_BLOCK = PCI_MESSAGE_BASE + 0xA,
    /// Host: eject a function (`pci_dev_incoming`).
    EJECT = PCI_MESSAGE_BASE + 0xB,
    /// Unused by Linux.
    QUERY_STOP = PCI_MESSAGE_BASE + 0xC,
    /// Unused by Linux.
    REENABLE = PCI_MESSAGE_BASE + 0xD,
    /// Unused by Linux.
    QUERY_STOP_FAILED = PCI_MESSAGE_BASE + 0xE,
    /// Guest: a function is ejected (`pci_eject_response`, no completion).
    EJECTION_COMPLETE = PCI_MESSAGE_BASE + 0xF,
    /// Guest: a function's resources (`pci_resources_assigned`, 1.1).
    RESOURCES_ASSIGNED = PCI_MESSAGE_BASE + 0x10,
    /// Guest: a function's resources are released (`pci_child_message`,
    /// no completion).
    RESOURCES_RELEASED = PCI_MESSAGE_BASE + 0x11,
    /// Host: configuration blocks changed (`pci_dev_inval_block`).
    INVALIDATE_BLOCK = PCI_MESSAGE_BASE + 0x12,
    /// Guest: propose a protocol version (`pci_version_request`).
    QUERY_PROTOCOL_VERSION = PCI_MESSAGE_BASE + 0x13,
    /// Guest: create an interrupt (`pci_create_interrupt`, 1.1).
    CREATE_INTERRUPT_MESSAGE = PCI_MESSAGE_BASE + 0x14,
    /// Guest: delete an interrupt (`pci_delete_interrupt`, no completion).
    DELETE_INTERRUPT_MESSAGE = PCI_MESSAGE_BASE + 0x15,
    /// Guest: a function's resources (`pci_resources_assigned2`, 1.2+).
    RESOURCES_ASSIGNED2 = PCI_MESSAGE_BASE + 0x16,
    /// Guest: create an interrupt (`pci_create_interrupt2`, 1.2 and 1.3).
    CREATE_INTERRUPT_MESSAGE2 = PCI_MESSAGE_BASE + 0x17,
    /// Unused by Linux.
    DELETE_INTERRUPT_MESSAGE2 = PCI_MESSAGE_BASE + 0x18,
    /// Host: the functions on the bus (`pci_bus_relations2`).
    BUS_RELATIONS2 = PCI_MESSAGE_BASE + 0x19,
    /// Unused by Linux.
    RESOURCES_ASSIGNED3 = PCI_MESSAGE_BASE + 0x1A,
    /// Guest: create an interrupt (`pci_create_interrupt3`, 1.4).
    CREATE_INTERRUPT_MESSAGE3 = PCI_MESSAGE_BASE + 0x1B,
}

impl MessageType {
    /// `PCI_MESSAGE_MAXIMUM`: one past the last type.
    pub const MAXIMUM: Self = Self(PCI_MESSAGE_BASE + 0x1C);
}

/// A function's place on the bus (`union win_slot_encoding`, Windows'
/// encoding): device in bits 4:0, function in bits 7:5. Linux compares
/// the whole u32, so the host's reserved bits must stay zero.
#[bitfield(u32)]
#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WinSlot {
    /// Bits 4:0: the device number.
    #[bits(5)]
    pub dev: u8,
    /// Bits 7:5: the function number.
    #[bits(3)]
    pub func: u8,
    /// Bits 31:8, reserved.
    #[bits(24)]
    pub reserved: u32,
}

impl WinSlot {
    /// The slot of PCI device `dev` (0..32), function `func` (0..8).
    pub const fn of(dev: u8, func: u8) -> Self {
        Self::new().with_dev(dev).with_func(func)
    }

    /// Linux's `devfn` for the slot (`wslot_to_devfn`: `dev << 3 | func`).
    pub const fn devfn(self) -> u8 {
        self.dev() << 3 | self.func()
    }
}

/// A vPCI wire struct: `#[repr(C)]`, packed little-endian fields.
macro_rules! wire {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
            Unaligned,
        )]
        #[repr(C)]
        pub struct $name {
            $($(#[$fm])* pub $field: $ty,)*
        }
    };
}

wire! {
    /// A bare message (`struct pci_message`, 4 bytes): QUERY_BUS_RELATIONS
    /// and BUS_D0EXIT are just this; every message starts with it.
    PciMessage {
        /// [`MessageType`].
        message_type: U32,
    }
}

impl PciMessage {
    /// A message of type `t`.
    pub fn new(t: MessageType) -> Self {
        Self {
            message_type: U32::new(t.0),
        }
    }

    /// The type as a typed value.
    pub fn message_type(&self) -> MessageType {
        MessageType(self.message_type.get())
    }
}

wire! {
    /// A message about one function (`struct pci_child_message`, 8 bytes):
    /// QUERY_RESOURCE_REQUIREMENTS, RESOURCES_RELEASED.
    ChildMessage {
        /// [`MessageType`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
    }
}

wire! {
    /// A host message about one function (`struct pci_dev_incoming` less
    /// its `vmpacket_descriptor`, 8 bytes): EJECT.
    DevIncoming {
        /// [`MessageType`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
    }
}

wire! {
    /// QUERY_PROTOCOL_VERSION (`struct pci_version_request`, 8 bytes).
    VersionRequest {
        /// [`MessageType::QUERY_PROTOCOL_VERSION`].
        message_type: U32,
        /// The proposed version ([`make_version`]).
        protocol_version: U32,
    }
}

wire! {
    /// BUS_D0ENTRY (`struct pci_bus_d0_entry`, 16 bytes).
    BusD0Entry {
        /// [`MessageType::BUS_D0ENTRY`].
        message_type: U32,
        /// Reserved.
        reserved: U32,
        /// The configuration window's guest physical base
        /// ([`PCI_CONFIG_MMIO_LENGTH`] bytes).
        mmio_base: U64,
    }
}

wire! {
    /// A function in BUS_RELATIONS (`struct pci_function_description`,
    /// 20 bytes).
    FunctionDescription {
        /// Vendor id.
        v_id: U16,
        /// Device id.
        d_id: U16,
        /// Revision id.
        rev: u8,
        /// Programming interface.
        prog_intf: u8,
        /// Subclass.
        subclass: u8,
        /// Base class.
        base_class: u8,
        /// Subsystem vendor id (bits 15:0) and subsystem id (bits 31:16):
        /// Linux serves config offsets 0x2C..0x30 from these bytes.
        subsystem_id: U32,
        /// [`WinSlot`].
        win_slot: U32,
        /// Serial number (Linux names the slot after it).
        ser: U32,
    }
}

wire! {
    /// A function in BUS_RELATIONS2 (`struct pci_function_description2`,
    /// 28 bytes).
    FunctionDescription2 {
        /// Vendor id.
        v_id: U16,
        /// Device id.
        d_id: U16,
        /// Revision id.
        rev: u8,
        /// Programming interface.
        prog_intf: u8,
        /// Subclass.
        subclass: u8,
        /// Base class.
        base_class: u8,
        /// Subsystem vendor id (bits 15:0) and subsystem id (bits 31:16).
        subsystem_id: U32,
        /// [`WinSlot`].
        win_slot: U32,
        /// Serial number.
        ser: U32,
        /// [`HV_PCI_DEVICE_FLAG_NUMA_AFFINITY`] or 0.
        flags: U32,
        /// The function's virtual NUMA node (with the flag).
        virtual_numa_node: U16,
        /// Reserved.
        reserved: U16,
    }
}

wire! {
    /// BUS_RELATIONS and BUS_RELATIONS2's header (`struct
    /// pci_bus_relations` / `pci_bus_relations2` less the
    /// `vmpacket_descriptor`, 8 bytes), followed by `device_count`
    /// [`FunctionDescription`]s or [`FunctionDescription2`]s.
    BusRelations {
        /// [`MessageType::BUS_RELATIONS`] or [`MessageType::BUS_RELATIONS2`].
        message_type: U32,
        /// Functions that follow.
        device_count: U32,
    }
}

/// BUS_RELATIONS2's header: the same as [`BusRelations`]'s.
pub type BusRelations2 = BusRelations;

wire! {
    /// A completion's status (`struct pci_response` less the
    /// `vmpacket_descriptor`, 4 bytes): the answer to most requests.
    Response {
        /// 0, or a negative NTSTATUS ([`ntstatus`]).
        status: I32,
    }
}

wire! {
    /// QUERY_RESOURCE_REQUIREMENTS' completion (`struct
    /// pci_q_res_req_response` less the `vmpacket_descriptor`, 28 bytes;
    /// Linux ignores a shorter one).
    QResReqResponse {
        /// 0, or a negative NTSTATUS.
        status: I32,
        /// Each BAR register as read back after writing all ones.
        probed_bar: [U32; PCI_STD_NUM_BARS],
    }
}

wire! {
    /// POWER_STATE_CHANGE (`struct pci_set_power`, 16 bytes).
    SetPower {
        /// [`MessageType::POWER_STATE_CHANGE`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// The state, in Windows' terms.
        power_state: U32,
        /// Reserved.
        reserved: U32,
    }
}

wire! {
    /// POWER_STATE_CHANGE's completion (`struct pci_set_power_response`
    /// less the `vmpacket_descriptor`, 16 bytes).
    SetPowerResponse {
        /// 0, or a negative NTSTATUS.
        status: I32,
        /// [`WinSlot`].
        wslot: U32,
        /// The state reached, in Windows' terms.
        resultant_state: U32,
        /// Reserved.
        reserved: U32,
    }
}

/// Bytes of `memory_range` in RESOURCES_ASSIGNED(2) (`u8 [0x14][6]`).
pub const MEMORY_RANGE_BYTES: usize = 0x14 * 6;

wire! {
    /// RESOURCES_ASSIGNED (`struct pci_resources_assigned`, 148 bytes).
    ResourcesAssigned {
        /// [`MessageType::RESOURCES_ASSIGNED`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// Unused by Linux (zero).
        memory_range: [[u8; 6]; 0x14],
        /// Unused by Linux (zero).
        msi_descriptors: U32,
        /// Reserved.
        reserved: [U32; 4],
    }
}

wire! {
    /// RESOURCES_ASSIGNED2 (`struct pci_resources_assigned2`, 202 bytes).
    ResourcesAssigned2 {
        /// [`MessageType::RESOURCES_ASSIGNED2`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// Unused by Linux (zero).
        memory_range: [[u8; 6]; 0x14],
        /// Unused by Linux (zero).
        msi_descriptor_count: U32,
        /// Reserved.
        reserved: [u8; 70],
    }
}

wire! {
    /// An interrupt to create, 1.1 (`struct hv_msi_desc`, 16 bytes).
    HvMsiDesc {
        /// The IDT vector.
        vector: u8,
        /// [`APIC_DELIVERY_MODE_FIXED`] on x86.
        delivery_mode: u8,
        /// Vectors (MSI: 1..=32; MSI-X: 1).
        vector_count: U16,
        /// Reserved.
        reserved: U32,
        /// Target VPs, a bit each (Linux: all ones, a dummy).
        cpu_mask: U64,
    }
}

wire! {
    /// An interrupt to create, 1.2 and 1.3 (`struct hv_msi_desc2`, 70
    /// bytes).
    HvMsiDesc2 {
        /// The IDT vector.
        vector: u8,
        /// [`APIC_DELIVERY_MODE_FIXED`] on x86.
        delivery_mode: u8,
        /// Vectors (MSI: 1..=32; MSI-X: 1).
        vector_count: U16,
        /// Entries of `processor_array` in use.
        processor_count: U16,
        /// Target VP indices (Linux: one, a dummy that RETARGET_INTERRUPT
        /// replaces).
        processor_array: [U16; HV_MSI_MAX_PROCESSORS],
    }
}

wire! {
    /// An interrupt to create, 1.4 (`struct hv_msi_desc3`, 74 bytes): a
    /// 32-bit vector (for arm64's SPIs).
    HvMsiDesc3 {
        /// The vector.
        vector: U32,
        /// [`APIC_DELIVERY_MODE_FIXED`] on x86.
        delivery_mode: u8,
        /// Reserved.
        reserved: u8,
        /// Vectors (MSI: 1..=32; MSI-X: 1).
        vector_count: U16,
        /// Entries of `processor_array` in use.
        processor_count: U16,
        /// Target VP indices.
        processor_array: [U16; HV_MSI_MAX_PROCESSORS],
    }
}

wire! {
    /// A created interrupt (`struct tran_int_desc`, 16 bytes): the MSI
    /// message the guest programs into the function.
    TranIntDesc {
        /// Reserved.
        reserved: U16,
        /// Vectors, as requested.
        vector_count: U16,
        /// The MSI data.
        data: U32,
        /// The MSI address.
        address: U64,
    }
}

wire! {
    /// CREATE_INTERRUPT_MESSAGE (`struct pci_create_interrupt`, 24 bytes).
    CreateInterrupt {
        /// [`MessageType::CREATE_INTERRUPT_MESSAGE`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// The interrupt.
        int_desc: HvMsiDesc,
    }
}

wire! {
    /// CREATE_INTERRUPT_MESSAGE2 (`struct pci_create_interrupt2`, 78 bytes).
    CreateInterrupt2 {
        /// [`MessageType::CREATE_INTERRUPT_MESSAGE2`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// The interrupt.
        int_desc: HvMsiDesc2,
    }
}

wire! {
    /// CREATE_INTERRUPT_MESSAGE3 (`struct pci_create_interrupt3`, 82 bytes).
    CreateInterrupt3 {
        /// [`MessageType::CREATE_INTERRUPT_MESSAGE3`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// The interrupt.
        int_desc: HvMsiDesc3,
    }
}

wire! {
    /// CREATE_INTERRUPT_MESSAGE*'s completion (`struct
    /// pci_create_int_response` less the `vmpacket_descriptor`, 24 bytes;
    /// Linux reads a shorter one as status -1).
    CreateIntResponse {
        /// 0, or a negative NTSTATUS.
        status: I32,
        /// Reserved.
        reserved: U32,
        /// The message to program.
        int_desc: TranIntDesc,
    }
}

wire! {
    /// DELETE_INTERRUPT_MESSAGE (`struct pci_delete_interrupt`, 24 bytes).
    DeleteInterrupt {
        /// [`MessageType::DELETE_INTERRUPT_MESSAGE`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// The interrupt, as created.
        int_desc: TranIntDesc,
    }
}

wire! {
    /// READ_BLOCK (`struct pci_read_block`, 16 bytes).
    ReadBlock {
        /// [`MessageType::READ_BLOCK`].
        message_type: U32,
        /// The block.
        block_id: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// Bytes wanted (<= [`HV_CONFIG_BLOCK_SIZE_MAX`]).
        bytes_requested: U32,
    }
}

wire! {
    /// READ_BLOCK's completion (`struct pci_read_block_response` less the
    /// `vmpacket_descriptor`, 132 bytes; the bytes may be shorter).
    ReadBlockResponse {
        /// 0, or an NTSTATUS error (a u32 here).
        status: U32,
        /// The block.
        bytes: [u8; HV_CONFIG_BLOCK_SIZE_MAX],
    }
}

wire! {
    /// WRITE_BLOCK (`struct pci_write_block`, 144 bytes; Linux sends the
    /// header, `byte_count` bytes and 4 more).
    WriteBlock {
        /// [`MessageType::WRITE_BLOCK`].
        message_type: U32,
        /// The block.
        block_id: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// Bytes that follow.
        byte_count: U32,
        /// The block.
        bytes: [u8; HV_CONFIG_BLOCK_SIZE_MAX],
    }
}

wire! {
    /// INVALIDATE_BLOCK (`struct pci_dev_inval_block` less the
    /// `vmpacket_descriptor`, 16 bytes).
    DevInvalBlock {
        /// [`MessageType::INVALIDATE_BLOCK`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// Blocks invalidated, a bit each.
        block_mask: U64,
    }
}

wire! {
    /// EJECTION_COMPLETE (`struct pci_eject_response`, 12 bytes; sent
    /// without a completion).
    EjectResponse {
        /// [`MessageType::EJECTION_COMPLETE`].
        message_type: U32,
        /// [`WinSlot`].
        wslot: U32,
        /// Zero from Linux.
        status: U32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};
    use std::format;
    use std::string::ToString;

    #[test]
    fn versions_types_and_statuses_match_linux() {
        assert_eq!(PCI_PROTOCOL_VERSION_1_1, 0x1_0001);
        assert_eq!(PCI_PROTOCOL_VERSION_1_2, 0x1_0002);
        assert_eq!(PCI_PROTOCOL_VERSION_1_3, 0x1_0003);
        assert_eq!(PCI_PROTOCOL_VERSION_1_4, 0x1_0004);
        assert_eq!(MessageType::BUS_RELATIONS.0, 0x4249_0000);
        assert_eq!(MessageType::QUERY_BUS_RELATIONS.0, 0x4249_0001);
        assert_eq!(MessageType::POWER_STATE_CHANGE.0, 0x4249_0004);
        assert_eq!(MessageType::QUERY_RESOURCE_REQUIREMENTS.0, 0x4249_0005);
        assert_eq!(MessageType::BUS_D0ENTRY.0, 0x4249_0007);
        assert_eq!(MessageType::BUS_D0EXIT.0, 0x4249_0008);
        assert_eq!(MessageType::EJECT.0, 0x4249_000B);
        assert_eq!(MessageType::EJECTION_COMPLETE.0, 0x4249_000F);
        assert_eq!(MessageType::RESOURCES_ASSIGNED.0, 0x4249_0010);
        assert_eq!(MessageType::RESOURCES_RELEASED.0, 0x4249_0011);
        assert_eq!(MessageType::QUERY_PROTOCOL_VERSION.0, 0x4249_0013);
        assert_eq!(MessageType::CREATE_INTERRUPT_MESSAGE.0, 0x4249_0014);
        assert_eq!(MessageType::DELETE_INTERRUPT_MESSAGE.0, 0x4249_0015);
        assert_eq!(MessageType::RESOURCES_ASSIGNED2.0, 0x4249_0016);
        assert_eq!(MessageType::CREATE_INTERRUPT_MESSAGE2.0, 0x4249_0017);
        assert_eq!(MessageType::BUS_RELATIONS2.0, 0x4249_0019);
        assert_eq!(MessageType::CREATE_INTERRUPT_MESSAGE3.0, 0x4249_001B);
        assert_eq!(MessageType::MAXIMUM.0, 0x4249_001C);
        for n in 0..0x1C {
            let t = MessageType(PCI_MESSAGE_BASE + n);
            assert_eq!(t.name().is_some(), !matches!(n, 2 | 3), "{t:?}");
        }
        assert_eq!(
            format!("{:?}", MessageType(PCI_MESSAGE_BASE + 2)),
            "MessageType(0x42490002)"
        );
        assert_eq!(MessageType::BUS_RELATIONS2.to_string(), "BUS_RELATIONS2");

        assert_eq!(ntstatus(STATUS_REVISION_MISMATCH), -0x3FFF_FFA7);
        assert!(ntstatus(STATUS_UNSUCCESSFUL) < 0);
        assert_eq!(ntstatus(STATUS_SUCCESS), 0);
        for s in [
            STATUS_INVALID_PARAMETER,
            STATUS_NO_SUCH_DEVICE,
            STATUS_INSUFFICIENT_RESOURCES,
            STATUS_NOT_SUPPORTED,
            STATUS_INVALID_DEVICE_STATE,
        ] {
            assert!(ntstatus(s) < 0);
        }
        assert_eq!(CFG_PAGE_SIZE, 0x1000);
    }

    #[test]
    fn win_slot_is_windows_encoding() {
        let s = WinSlot::of(3, 5);
        assert_eq!(s.into_bits(), 3 | 5 << 5);
        assert_eq!(s.devfn(), 3 << 3 | 5);
        assert_eq!(WinSlot::from_bits(0x1FF).dev(), 31);
        assert_eq!(WinSlot::from_bits(0x1FF).func(), 7);
        assert_eq!(WinSlot::from_bits(0x1FF).reserved(), 1);
    }

    #[test]
    fn small_message_layouts() {
        assert_eq!(size_of::<PciMessage>(), 4);
        assert_eq!(size_of::<ChildMessage>(), 8);
        assert_eq!(offset_of!(ChildMessage, wslot), 4);
        assert_eq!(size_of::<DevIncoming>(), 8);
        assert_eq!(offset_of!(DevIncoming, wslot), 4);
        assert_eq!(size_of::<VersionRequest>(), 8);
        assert_eq!(offset_of!(VersionRequest, protocol_version), 4);
        assert_eq!(size_of::<BusD0Entry>(), 16);
        assert_eq!(offset_of!(BusD0Entry, reserved), 4);
        assert_eq!(offset_of!(BusD0Entry, mmio_base), 8);
        assert_eq!(size_of::<Response>(), 4);
        assert_eq!(size_of::<QResReqResponse>(), 28);
        assert_eq!(offset_of!(QResReqResponse, probed_bar), 4);
        assert_eq!(size_of::<SetPower>(), 16);
        assert_eq!(offset_of!(SetPower, wslot), 4);
        assert_eq!(offset_of!(SetPower, power_state), 8);
        assert_eq!(offset_of!(SetPower, reserved), 12);
        assert_eq!(size_of::<SetPowerResponse>(), 16);
        assert_eq!(offset_of!(SetPowerResponse, wslot), 4);
        assert_eq!(offset_of!(SetPowerResponse, resultant_state), 8);
        assert_eq!(offset_of!(SetPowerResponse, reserved), 12);
        assert_eq!(size_of::<EjectResponse>(), 12);
        assert_eq!(offset_of!(EjectResponse, wslot), 4);
        assert_eq!(offset_of!(EjectResponse, status), 8);
        assert_eq!(size_of::<DevInvalBlock>(), 16);
        assert_eq!(offset_of!(DevInvalBlock, wslot), 4);
        assert_eq!(offset_of!(DevInvalBlock, block_mask), 8);
        // Linux's sizes with the 16-byte descriptor: pci_response 20,
        // pci_q_res_req_response 44, pci_set_power_response 32,
        // pci_dev_incoming 24, pci_dev_inval_block 32.
    }

    #[test]
    fn relations_layouts() {
        assert_eq!(size_of::<FunctionDescription>(), 20);
        assert_eq!(offset_of!(FunctionDescription, v_id), 0);
        assert_eq!(offset_of!(FunctionDescription, d_id), 2);
        assert_eq!(offset_of!(FunctionDescription, rev), 4);
        assert_eq!(offset_of!(FunctionDescription, prog_intf), 5);
        assert_eq!(offset_of!(FunctionDescription, subclass), 6);
        assert_eq!(offset_of!(FunctionDescription, base_class), 7);
        assert_eq!(offset_of!(FunctionDescription, subsystem_id), 8);
        assert_eq!(offset_of!(FunctionDescription, win_slot), 12);
        assert_eq!(offset_of!(FunctionDescription, ser), 16);
        assert_eq!(size_of::<FunctionDescription2>(), 28);
        assert_eq!(offset_of!(FunctionDescription2, v_id), 0);
        assert_eq!(offset_of!(FunctionDescription2, d_id), 2);
        assert_eq!(offset_of!(FunctionDescription2, rev), 4);
        assert_eq!(offset_of!(FunctionDescription2, prog_intf), 5);
        assert_eq!(offset_of!(FunctionDescription2, subclass), 6);
        assert_eq!(offset_of!(FunctionDescription2, base_class), 7);
        assert_eq!(offset_of!(FunctionDescription2, subsystem_id), 8);
        assert_eq!(offset_of!(FunctionDescription2, win_slot), 12);
        assert_eq!(offset_of!(FunctionDescription2, ser), 16);
        assert_eq!(offset_of!(FunctionDescription2, flags), 20);
        assert_eq!(offset_of!(FunctionDescription2, virtual_numa_node), 24);
        assert_eq!(offset_of!(FunctionDescription2, reserved), 26);
        // pci_bus_relations(2) with the descriptor: 24 bytes, then the
        // functions.
        assert_eq!(size_of::<BusRelations>(), 8);
        assert_eq!(offset_of!(BusRelations, device_count), 4);
        assert_eq!(size_of::<BusRelations2>(), 8);
    }

    #[test]
    fn resources_layouts() {
        assert_eq!(MEMORY_RANGE_BYTES, 120);
        assert_eq!(size_of::<ResourcesAssigned>(), 148);
        assert_eq!(offset_of!(ResourcesAssigned, wslot), 4);
        assert_eq!(offset_of!(ResourcesAssigned, memory_range), 8);
        assert_eq!(offset_of!(ResourcesAssigned, msi_descriptors), 128);
        assert_eq!(offset_of!(ResourcesAssigned, reserved), 132);
        assert_eq!(size_of::<ResourcesAssigned2>(), 202);
        assert_eq!(offset_of!(ResourcesAssigned2, wslot), 4);
        assert_eq!(offset_of!(ResourcesAssigned2, memory_range), 8);
        assert_eq!(offset_of!(ResourcesAssigned2, msi_descriptor_count), 128);
        assert_eq!(offset_of!(ResourcesAssigned2, reserved), 132);
        assert_eq!(size_of::<ReadBlock>(), 16);
        assert_eq!(offset_of!(ReadBlock, block_id), 4);
        assert_eq!(offset_of!(ReadBlock, wslot), 8);
        assert_eq!(offset_of!(ReadBlock, bytes_requested), 12);
        assert_eq!(size_of::<ReadBlockResponse>(), 132);
        assert_eq!(offset_of!(ReadBlockResponse, bytes), 4);
        assert_eq!(size_of::<WriteBlock>(), 144);
        assert_eq!(offset_of!(WriteBlock, block_id), 4);
        assert_eq!(offset_of!(WriteBlock, wslot), 8);
        assert_eq!(offset_of!(WriteBlock, byte_count), 12);
        assert_eq!(offset_of!(WriteBlock, bytes), 16);
    }

    #[test]
    fn interrupt_layouts() {
        assert_eq!(size_of::<HvMsiDesc>(), 16);
        assert_eq!(offset_of!(HvMsiDesc, vector), 0);
        assert_eq!(offset_of!(HvMsiDesc, delivery_mode), 1);
        assert_eq!(offset_of!(HvMsiDesc, vector_count), 2);
        assert_eq!(offset_of!(HvMsiDesc, reserved), 4);
        assert_eq!(offset_of!(HvMsiDesc, cpu_mask), 8);
        assert_eq!(size_of::<HvMsiDesc2>(), 70);
        assert_eq!(offset_of!(HvMsiDesc2, delivery_mode), 1);
        assert_eq!(offset_of!(HvMsiDesc2, vector_count), 2);
        assert_eq!(offset_of!(HvMsiDesc2, processor_count), 4);
        assert_eq!(offset_of!(HvMsiDesc2, processor_array), 6);
        assert_eq!(size_of::<HvMsiDesc3>(), 74);
        assert_eq!(offset_of!(HvMsiDesc3, vector), 0);
        assert_eq!(offset_of!(HvMsiDesc3, delivery_mode), 4);
        assert_eq!(offset_of!(HvMsiDesc3, reserved), 5);
        assert_eq!(offset_of!(HvMsiDesc3, vector_count), 6);
        assert_eq!(offset_of!(HvMsiDesc3, processor_count), 8);
        assert_eq!(offset_of!(HvMsiDesc3, processor_array), 10);
        assert_eq!(size_of::<TranIntDesc>(), 16);
        assert_eq!(offset_of!(TranIntDesc, reserved), 0);
        assert_eq!(offset_of!(TranIntDesc, vector_count), 2);
        assert_eq!(offset_of!(TranIntDesc, data), 4);
        assert_eq!(offset_of!(TranIntDesc, address), 8);
        assert_eq!(size_of::<CreateInterrupt>(), 24);
        assert_eq!(offset_of!(CreateInterrupt, wslot), 4);
        assert_eq!(offset_of!(CreateInterrupt, int_desc), 8);
        assert_eq!(size_of::<CreateInterrupt2>(), 78);
        assert_eq!(offset_of!(CreateInterrupt2, wslot), 4);
        assert_eq!(offset_of!(CreateInterrupt2, int_desc), 8);
        assert_eq!(size_of::<CreateInterrupt3>(), 82);
        assert_eq!(offset_of!(CreateInterrupt3, wslot), 4);
        assert_eq!(offset_of!(CreateInterrupt3, int_desc), 8);
        // pci_create_int_response with the descriptor: 40 bytes.
        assert_eq!(size_of::<CreateIntResponse>(), 24);
        assert_eq!(offset_of!(CreateIntResponse, reserved), 4);
        assert_eq!(offset_of!(CreateIntResponse, int_desc), 8);
        assert_eq!(size_of::<DeleteInterrupt>(), 24);
        assert_eq!(offset_of!(DeleteInterrupt, wslot), 4);
        assert_eq!(offset_of!(DeleteInterrupt, int_desc), 8);
        for a in [
            align_of::<CreateInterrupt3>(),
            align_of::<CreateIntResponse>(),
            align_of::<ResourcesAssigned2>(),
            align_of::<BusD0Entry>(),
        ] {
            assert_eq!(a, 1);
        }
    }

    #[test]
    fn messages_read_as_linux_writes_them() {
        // hv_compose_msi_req_v3: vector 0x41, one VP (2), slot 0.
        let mut b = [0u8; 82];
        b[..4].copy_from_slice(&0x4249_001Bu32.to_le_bytes());
        b[8..12].copy_from_slice(&0x41u32.to_le_bytes());
        b[14..16].copy_from_slice(&1u16.to_le_bytes());
        b[16..18].copy_from_slice(&1u16.to_le_bytes());
        b[18..20].copy_from_slice(&2u16.to_le_bytes());
        let m = CreateInterrupt3::read_from_bytes(&b).unwrap();
        assert_eq!(
            PciMessage::read_from_prefix(&b).unwrap().0.message_type(),
            MessageType::CREATE_INTERRUPT_MESSAGE3
        );
        assert_eq!(m.int_desc.vector.get(), 0x41);
        assert_eq!(m.int_desc.vector_count.get(), 1);
        assert_eq!(m.int_desc.processor_count.get(), 1);
        assert_eq!(m.int_desc.processor_array[0].get(), 2);
        let d = BusD0Entry {
            message_type: U32::new(MessageType::BUS_D0ENTRY.0),
            reserved: U32::new(0),
            mmio_base: U64::new(0xF_E000_0000),
        };
        assert_eq!(
            d.as_bytes(),
            &[7, 0, 0x49, 0x42, 0, 0, 0, 0, 0, 0, 0, 0xE0, 0xF, 0, 0, 0]
        );
    }
}
