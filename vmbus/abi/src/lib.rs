//! VMBus wire formats, `no_std`: the SynIC's register formats, message and
//! event-flag pages, the HvPostMessage input, and VMBus's channel messages
//! (connect, offers, unload, GPADLs, open and close). The `vmbus` crate
//! (pvmm's server) and pvmm's test kernel (a guest) share them.
//!
//! One definition each. The Hyper-V numbers that share a name space with
//! pvmm's others are `pviommu-abi`'s, not this module's: the SynIC's MSR
//! numbers ([`pviommu_abi::msr`]), the HV_STATUS codes
//! ([`pviommu_abi::HvError`]) and the 4 KiB page
//! ([`pviommu_abi::HV_PAGE_SHIFT`]). Memory blocks are `#[repr(C)]`
//! zerocopy structs built from little-endian byte-order integers, so every
//! struct is packed (alignment 1, no padding) and little-endian whatever the
//! host, like `pviommu-abi`'s; register words are `bitfield-struct` types.
//! Layout tests at the end check every size and field offset.
//!
//! Sources: the TLFS (SynIC, HvCallPostMessage), Linux's
//! `include/hyperv/hvgdk_mini.h` (SynIC), `drivers/hv/hyperv_vmbus.h`
//! (post-message input, connection ids) and `include/linux/hyperv.h`
//! (channel messages, versions), as read for the research plan of issue 13.

#![no_std]

use pviommu_abi::named_values;

pub mod vpci;

#[cfg(test)]
extern crate std;

use bitfield_struct::bitfield;
use core::fmt;
use pviommu_abi::{msr, HV_PAGE_SHIFT};
pub use pviommu_abi::{InputPostMessage, HV_MESSAGE_PAYLOAD_SIZE};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Synthetic interrupt sources per virtual processor: SINT0..SINT15.
pub const SINT_COUNT: usize = (msr::SINT15 - msr::SINT0 + 1) as usize;
/// Bytes of a SynIC message (`HV_MESSAGE_SIZE`): one message-page slot.
pub const HV_MESSAGE_SIZE: usize = 256;
/// Event flags per SINT (`HV_EVENT_FLAGS_COUNT`): 2048 bits.
pub const HV_EVENT_FLAGS_COUNT: u32 = 2048;
/// Bytes of one SINT's event flags: 256.
pub const HV_EVENT_FLAGS_BYTES: usize = HV_EVENT_FLAGS_COUNT as usize / 8;

/// The value SVERSION reads (the only SynIC version).
pub const SYNIC_VERSION: u64 = 1;

/// SCONTROL ([`msr::SCONTROL`]): bit 0 enables the SynIC; bits 63:1 are
/// reserved.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SynicControl {
    /// Bit 0: the SynIC delivers messages and events.
    pub enable: bool,
    /// Bits 63:1, reserved.
    #[bits(63)]
    pub reserved: u64,
}

/// SIMP and SIEFP ([`msr::SIMP`], [`msr::SIEFP`]): bit 0 enables the page, bits 11:1 are preserved (kept as
/// written and read back), bits 63:12 are the guest physical page number.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SynicPageMsr {
    /// Bit 0: the page is enabled.
    pub enable: bool,
    /// Bits 11:1, preserved.
    #[bits(11)]
    pub preserved: u16,
    /// Bits 63:12: guest physical page number.
    #[bits(52)]
    pub gpn: u64,
}

impl SynicPageMsr {
    /// The page's guest physical address (`gpn << 12`; always fits).
    pub const fn gpa(self) -> u64 {
        self.gpn() << HV_PAGE_SHIFT
    }
}

/// SINT0..SINT15 ([`msr::sint`]; Linux's `union hv_synic_sint`).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SintMsr {
    /// Bits 7:0: the interrupt vector.
    pub vector: u8,
    /// Bits 15:8, reserved.
    pub reserved1: u8,
    /// Bit 16: masked (no delivery).
    pub masked: bool,
    /// Bit 17: auto-EOI.
    pub auto_eoi: bool,
    /// Bit 18: polling (messages are delivered, no interrupt).
    pub polling: bool,
    /// Bit 19: `as_intercept` (Linux names it; root and paravisor use).
    pub as_intercept: bool,
    /// Bit 20: `proxy` (Linux names it; paravisor use).
    pub proxy: bool,
    /// Bits 63:21, reserved.
    #[bits(43)]
    pub reserved2: u64,
}

impl SintMsr {
    /// The value at reset: masked, vector 0.
    pub const RESET: Self = Self::new().with_masked(true);
    /// Bits a guest may set: vector, masked, auto_eoi, polling.
    pub const WRITABLE_MASK: u64 = 0xFF | 1 << 16 | 1 << 17 | 1 << 18;
    /// The lowest vector an unmasked SINT may name (vectors 0-15 are
    /// exceptions; KVM refuses them too).
    pub const FIRST_VALID_VECTOR: u8 = 16;
}

/// A SynIC message type (`enum hv_message_type`): the message header's
/// first field, also HvPostMessage's `message_type`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HvMessageType(pub u32);

impl HvMessageType {
    /// HVMSG_NONE: the slot is free.
    pub const NONE: Self = Self(0);
    /// A VMBus channel message: Linux always posts type 1, and the host's
    /// messages to it carry type 1.
    pub const CHANNEL: Self = Self(1);
    /// Types with bit 31 set are the hypervisor's own (timer expired,
    /// intercepts); guests may not post them.
    pub const HYPERVISOR_MASK: u32 = 0x8000_0000;
}

impl fmt::Debug for HvMessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NONE => f.write_str("HVMSG_NONE"),
            Self::CHANNEL => f.write_str("CHANNEL"),
            Self(v) => write!(f, "HvMessageType({v:#x})"),
        }
    }
}

/// A SynIC message's flags byte.
#[bitfield(u8)]
#[derive(PartialEq, Eq)]
pub struct MessageFlags {
    /// Bit 0: more messages wait for this slot; the guest writes EOM after
    /// freeing it.
    pub msg_pending: bool,
    /// Bits 7:1, reserved.
    #[bits(7)]
    pub reserved: u8,
}

/// A SynIC message header (`struct hv_message_header`, 16 bytes).
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
pub struct HvMessageHeader {
    /// [`HvMessageType`]; HVMSG_NONE marks a free slot.
    pub message_type: U32,
    /// Bytes of the payload that are meaningful (<= 240).
    pub payload_size: u8,
    /// [`MessageFlags`].
    pub message_flags: u8,
    /// Reserved.
    pub reserved: U16,
    /// Sender / port id (bits 23:0); Linux never reads it, the host writes 0.
    pub sender: U64,
}

impl HvMessageHeader {
    /// The message type as a typed value.
    pub fn message_type(&self) -> HvMessageType {
        HvMessageType(self.message_type.get())
    }

    /// The flags as a typed value.
    pub const fn flags(&self) -> MessageFlags {
        MessageFlags::from_bits(self.message_flags)
    }
}

/// A SynIC message (`struct hv_message`, 256 bytes): one slot of the message
/// page.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct HvMessage {
    /// The header.
    pub header: HvMessageHeader,
    /// The payload; only the first `payload_size` bytes are meaningful.
    pub payload: [u8; HV_MESSAGE_PAYLOAD_SIZE],
}

impl HvMessage {
    /// Offset of the message type in a slot.
    pub const TYPE_OFFSET: u64 = 0;
    /// Offset of the flags byte in a slot.
    pub const FLAGS_OFFSET: u64 = 5;

    /// A message of type `message_type` carrying `payload` (the rest of the
    /// payload zeroed, flags clear, sender 0); `None` when `payload` is
    /// longer than 240 bytes.
    pub fn new(message_type: HvMessageType, payload: &[u8]) -> Option<Self> {
        let size = u8::try_from(payload.len())
            .ok()
            .filter(|&n| usize::from(n) <= HV_MESSAGE_PAYLOAD_SIZE)?;
        let mut m = Self::new_zeroed();
        m.header.message_type = U32::new(message_type.0);
        m.header.payload_size = size;
        m.payload.get_mut(..payload.len())?.copy_from_slice(payload);
        Some(m)
    }

    /// The meaningful part of the payload (at most 240 bytes).
    pub fn payload(&self) -> &[u8] {
        let n = usize::from(self.header.payload_size).min(HV_MESSAGE_PAYLOAD_SIZE);
        &self.payload[..n]
    }
}

/// Offset of SINT `sint`'s slot in the message page (`sint * 256`).
pub const fn message_slot_offset(sint: u8) -> u64 {
    sint as u64 * HV_MESSAGE_SIZE as u64
}

/// One SINT's event flags (`union hv_synic_event_flags`, 2048 bits).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct HvSynicEventFlags {
    /// Bit n of the SINT is bit n % 8 of byte n / 8 (little-endian longs).
    pub flags: [u8; HV_EVENT_FLAGS_BYTES],
}

/// The event-flags page: 16 SINTs x 2048 bits (4 KiB).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct HvSynicEventFlagsPage {
    /// The flags of SINT n at `n * 256`.
    pub sint_event_flags: [HvSynicEventFlags; SINT_COUNT],
}

/// The message page: 16 SINTs x one 256-byte slot (4 KiB).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct HvMessagePage {
    /// The slot of SINT n at `n * 256`.
    pub sint_message: [HvMessage; SINT_COUNT],
}

/// Offset in the event-flags page of the byte that holds flag `flag` of
/// SINT `sint`, and the bit in that byte; `None` when `flag` >= 2048.
pub const fn event_flag_position(sint: u8, flag: u32) -> Option<(u64, u8)> {
    if flag >= HV_EVENT_FLAGS_COUNT {
        return None;
    }
    Some((
        sint as u64 * HV_EVENT_FLAGS_BYTES as u64 + (flag / 8) as u64,
        1 << (flag % 8),
    ))
}

/// `hv_connection_id`: bits 23:0 the id, bits 31:24 reserved.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct ConnectionId {
    /// Bits 23:0: the connection id.
    #[bits(24)]
    pub id: u32,
    /// Bits 31:24, reserved.
    pub reserved: u8,
}

/// The message connection of VMBus below protocol 5.0 (and the one this
/// server hands out in VERSION_RESPONSE).
pub const VMBUS_MESSAGE_CONNECTION_ID: u32 = 1;
/// The VMBus event connection of protocols below 4.0 (unused here).
pub const VMBUS_EVENT_CONNECTION_ID: u32 = 2;
/// The VMBus monitor connection (unused here).
pub const VMBUS_MONITOR_CONNECTION_ID: u32 = 3;
/// The message connection Linux posts INITIATE_CONTACT to for protocol >= 5.0.
pub const VMBUS_MESSAGE_CONNECTION_ID_4: u32 = 4;
/// The SINT VMBus messages arrive on below protocol 5.0 (from 5.0 the guest
/// names it in INITIATE_CONTACT; Linux names 2 too).
pub const VMBUS_MESSAGE_SINT: u8 = 2;

/// VMBus protocol versions (`major << 16 | minor`; Linux's `VERSION_*`).
pub mod version {
    /// Windows Server 2008: 0.13.
    pub const WS2008: u32 = 13;
    /// Windows 7: 1.1.
    pub const WIN7: u32 = 1 << 16 | 1;
    /// Windows 8: 2.4.
    pub const WIN8: u32 = 2 << 16 | 4;
    /// Windows 8.1: 3.0.
    pub const WIN8_1: u32 = 3 << 16;
    /// Windows 10: 4.0.
    pub const WIN10: u32 = 4 << 16;
    /// 4.1.
    pub const WIN10_V4_1: u32 = 4 << 16 | 1;
    /// 5.0: the first with `msg_sint` and message connection 4.
    pub const WIN10_V5: u32 = 5 << 16;
    /// 5.1.
    pub const WIN10_V5_1: u32 = 5 << 16 | 1;
    /// 5.2.
    pub const WIN10_V5_2: u32 = 5 << 16 | 2;
    /// 5.3 (OpenVMM's "Iron"): the newest this server accepts.
    pub const WIN10_V5_3: u32 = 5 << 16 | 3;
    /// 6.0 (confidential VMBus; Linux's `VERSION_WIN10_V6_0` in the posted
    /// patch, OpenVMM's "Copper"). Linux 7.2's `vmbus_versions[]` proposes
    /// it first; this server refuses it.
    pub const V6_0: u32 = 6 << 16;

    /// The major number.
    // Bits 31:16 fit a u16.
    #[allow(clippy::cast_possible_truncation)]
    pub const fn major(version: u32) -> u16 {
        (version >> 16) as u16
    }

    /// The minor number.
    // Bits 15:0 fit a u16.
    #[allow(clippy::cast_possible_truncation)]
    pub const fn minor(version: u32) -> u16 {
        version as u16
    }
}

/// A VMBus channel message type (`enum vmbus_channel_message_type`): the
/// first field of every channel message.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelMessageType(pub u32);

named_values! {
    ChannelMessageType, "{}",
    /// CHANNELMSG_INVALID.
    INVALID = 0,
    /// Host: a channel offer.
    OFFERCHANNEL = 1,
    /// Host: an offer is withdrawn.
    RESCIND_CHANNELOFFER = 2,
    /// Guest: send every offer.
    REQUESTOFFERS = 3,
    /// Host: every offer was sent.
    ALLOFFERS_DELIVERED = 4,
    /// Guest: open a channel.
    OPENCHANNEL = 5,
    /// Host: result of OPENCHANNEL.
    OPENCHANNEL_RESULT = 6,
    /// Guest: close a channel.
    CLOSECHANNEL = 7,
    /// Guest: a GPADL's first part.
    GPADL_HEADER = 8,
    /// Guest: more of a GPADL.
    GPADL_BODY = 9,
    /// Host: GPADL created.
    GPADL_CREATED = 10,
    /// Guest: tear a GPADL down.
    GPADL_TEARDOWN = 11,
    /// Host: GPADL torn down.
    GPADL_TORNDOWN = 12,
    /// Guest: a rescinded relid may be reused.
    RELID_RELEASED = 13,
    /// Guest: connect, proposing a protocol version.
    INITIATE_CONTACT = 14,
    /// Host: answer to INITIATE_CONTACT.
    VERSION_RESPONSE = 15,
    /// Guest: disconnect.
    UNLOAD = 16,
    /// Host: disconnected.
    UNLOAD_RESPONSE = 17,
    /// Guest: retarget a channel's interrupts.
    MODIFYCHANNEL = 22,
    /// Host: result of MODIFYCHANNEL.
    MODIFYCHANNEL_RESPONSE = 24,
}

impl ChannelMessageType {
    /// CHANNELMSG_COUNT: Linux drops host messages whose type is not below
    /// it.
    pub const COUNT: u32 = 25;
}

/// The header of every channel message (`struct
/// vmbus_channel_message_header`, 8 bytes).
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
pub struct ChannelMessageHeader {
    /// [`ChannelMessageType`].
    pub msgtype: U32,
    /// Padding, zero.
    pub padding: U32,
}

impl ChannelMessageHeader {
    /// A header of type `msgtype`.
    pub fn new(msgtype: ChannelMessageType) -> Self {
        Self {
            msgtype: U32::new(msgtype.0),
            padding: U32::new(0),
        }
    }

    /// The type as a typed value.
    pub fn msgtype(&self) -> ChannelMessageType {
        ChannelMessageType(self.msgtype.get())
    }
}

/// REQUESTOFFERS (guest): the header alone, 8 bytes.
pub type RequestOffers = ChannelMessageHeader;
/// ALLOFFERS_DELIVERED (host): the header alone, 8 bytes (Linux's minimum
/// payload is 0).
pub type AllOffersDelivered = ChannelMessageHeader;
/// UNLOAD (guest): the header alone, 8 bytes.
pub type Unload = ChannelMessageHeader;
/// UNLOAD_RESPONSE (host): the header alone, 8 bytes.
pub type UnloadResponse = ChannelMessageHeader;

/// INITIATE_CONTACT (`struct vmbus_channel_initiate_contact`, 40 bytes).
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
pub struct InitiateContact {
    /// Type INITIATE_CONTACT.
    pub header: ChannelMessageHeader,
    /// The proposed version, see [`version`].
    pub vmbus_version_requested: U32,
    /// VP index every host message must go to (Linux: CPU 0's).
    pub target_vcpu: U32,
    /// Below 5.0 the interrupt page's GPA; from 5.0 `msg_sint` (bits 7:0),
    /// `msg_vtl` (bits 15:8), reserved (bits 31:16) and `feature_flags`
    /// (bits 63:32, 6.0 only). See the accessors.
    pub interrupt_page_or_target_info: U64,
    /// Monitor page 1 GPA (host to guest); unused while no offer has a
    /// monitor.
    pub monitor_page1: U64,
    /// Monitor page 2 GPA (guest to host); unused likewise.
    pub monitor_page2: U64,
}

impl InitiateContact {
    /// Below 5.0: the interrupt page's GPA.
    pub fn interrupt_page(&self) -> u64 {
        self.interrupt_page_or_target_info.get()
    }

    /// From 5.0: the SINT host messages must arrive on.
    // Bits 7:0.
    #[allow(clippy::cast_possible_truncation)]
    pub fn msg_sint(&self) -> u8 {
        self.interrupt_page_or_target_info.get() as u8
    }

    /// From 5.0: the VTL host messages must arrive at.
    // Bits 15:8.
    #[allow(clippy::cast_possible_truncation)]
    pub fn msg_vtl(&self) -> u8 {
        (self.interrupt_page_or_target_info.get() >> 8) as u8
    }

    /// From 6.0: feature flags (confidential VMBus).
    // Bits 63:32.
    #[allow(clippy::cast_possible_truncation)]
    pub fn feature_flags(&self) -> u32 {
        (self.interrupt_page_or_target_info.get() >> 32) as u32
    }

    /// The union's 5.0+ form from its fields.
    pub fn target_info(msg_sint: u8, msg_vtl: u8, feature_flags: u32) -> U64 {
        U64::new(u64::from(msg_sint) | u64::from(msg_vtl) << 8 | u64::from(feature_flags) << 32)
    }
}

/// VERSION_RESPONSE's `connection_state` values.
pub mod connection_state {
    /// Connected (also sent with a refusal: Linux reads only
    /// `version_supported`).
    pub const SUCCESSFUL: u8 = 0;
    /// The host is low on resources.
    pub const LOW_RESOURCES: u8 = 1;
    /// The connection failed.
    pub const FAILURE: u8 = 2;
}

/// VERSION_RESPONSE (`struct vmbus_channel_version_response`, 16 bytes).
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
pub struct VersionResponse {
    /// Type VERSION_RESPONSE.
    pub header: ChannelMessageHeader,
    /// 1: the version is accepted; 0: refused (the guest tries an older one).
    pub version_supported: u8,
    /// See [`connection_state`].
    pub connection_state: u8,
    /// Padding, zero.
    pub padding: [u8; 2],
    /// From 5.0: the connection id the guest posts every later message to.
    pub msg_conn_id: U32,
}

/// A GUID in the byte order of Linux's `guid_t` and Windows' `GUID`: the
/// first three fields little-endian, the last eight bytes as written.
#[derive(
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(transparent)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The nil GUID.
    pub const NIL: Self = Self([0; 16]);

    /// The GUID written `{d1:08x}-{d2:04x}-{d3:04x}-{d4[0..2]}-{d4[2..8]}`.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Self([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// The vPCI bus's interface type (`44c4f61d-4444-4400-9d52-802e27ede19f`,
/// Linux's `HV_PCIE_GUID`). Do NOT offer it before the vPCI protocol
/// exists: pci-hyperv's probe waits without a timeout for replies this
/// slice cannot give, and Linux's boot waits for the probe.
pub const VPCI_INTERFACE_TYPE: Guid = Guid::from_fields(
    0x44c4_f61d,
    0x4444,
    0x4400,
    [0x9d, 0x52, 0x80, 0x2e, 0x27, 0xed, 0xe1, 0x9f],
);

/// Bytes of an offer's user-defined area.
pub const OFFER_USER_DEFINED_BYTES: usize = 120;

/// The channel description in an offer (`struct vmbus_channel_offer`, 176
/// bytes).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct ChannelOffer {
    /// The device class.
    pub if_type: Guid,
    /// The device instance (its sysfs name in Linux).
    pub if_instance: Guid,
    /// Reserved.
    pub reserved1: U64,
    /// Reserved.
    pub reserved2: U64,
    /// Channel flags (0x2000 hv_sock; 0x2 and 0x4 confidential).
    pub chn_flags: U16,
    /// MMIO space the device wants, in MiB (vPCI).
    pub mmio_megabytes: U16,
    /// User-defined bytes (pipe channels: `pipe_mode` u32, then 116 bytes).
    pub user_def: [u8; OFFER_USER_DEFINED_BYTES],
    /// 0 for a primary channel.
    pub sub_channel_index: U16,
    /// Reserved (OpenVMM: `mmio_megabytes_optional`).
    pub reserved3: U16,
}

/// OFFERCHANNEL (`struct vmbus_channel_offer_channel`, 196 bytes; Linux
/// requires all 196).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct OfferChannel {
    /// Type OFFERCHANNEL.
    pub header: ChannelMessageHeader,
    /// The channel.
    pub offer: ChannelOffer,
    /// The channel's relid, 1..2047 (0 is never scheduled by Linux).
    pub child_relid: U32,
    /// Monitor id (with `monitor_allocated`).
    pub monitorid: u8,
    /// Bit 0: `monitor_allocated`; bits 7:1 reserved.
    pub monitor_allocated: u8,
    /// Bit 0: `is_dedicated_interrupt`; bits 15:1 reserved.
    pub is_dedicated_interrupt: U16,
    /// The channel's own connection id: the guest's HvSignalEvent target.
    pub connection_id: U32,
}

/// The highest child relid plus one (`MAX_CHANNEL_RELIDS`).
pub const MAX_CHANNEL_RELIDS: u32 = 2048;

/// A channel message of the GPADL, open and close exchanges: `#[repr(C)]`,
/// packed little-endian fields, checked field by field in the tests.
macro_rules! channel_message {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
            Unaligned,
        )]
        #[repr(C)]
        pub struct $name {
            /// The message's type.
            pub header: ChannelMessageHeader,
            $($(#[$fm])* pub $field: $ty,)*
        }
    };
}

channel_message! {
    /// GPADL_HEADER (`struct vmbus_channel_gpadl_header`, 20 bytes): a
    /// guest page list for a channel, followed by `range_buflen` bytes of
    /// ranges (each a [`GpaRange`] and its PFNs), as many as fit this
    /// message; GPADL_BODY messages carry the rest.
    GpadlHeader {
        /// The channel.
        child_relid: U32,
        /// The guest's handle for the list.
        gpadl: U32,
        /// Bytes of all ranges with their PFNs.
        range_buflen: U16,
        /// Ranges (Linux: always 1).
        rangecount: U16,
    }
}

/// One range of a GPADL (`struct gpa_range`, 8 bytes), followed by its
/// PFNs (4 KiB guest page numbers, u64 each).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct GpaRange {
    /// Bytes the range covers.
    pub byte_count: U32,
    /// Where they start in the first page.
    pub byte_offset: U32,
}

channel_message! {
    /// GPADL_BODY (`struct vmbus_channel_gpadl_body`, 16 bytes): more PFNs
    /// of a GPADL, after the header's.
    GpadlBody {
        /// The body message's number (Linux: not set).
        msgnumber: U32,
        /// The GPADL's handle.
        gpadl: U32,
    }
}

channel_message! {
    /// GPADL_CREATED (`struct vmbus_channel_gpadl_created`, 20 bytes): the
    /// host's answer once it has every PFN.
    GpadlCreated {
        /// The channel.
        child_relid: U32,
        /// The GPADL's handle.
        gpadl: U32,
        /// 0, or an NTSTATUS error ([`STATUS_UNSUCCESSFUL`]).
        creation_status: U32,
    }
}

channel_message! {
    /// GPADL_TEARDOWN (`struct vmbus_channel_gpadl_teardown`, 16 bytes).
    GpadlTeardown {
        /// The channel.
        child_relid: U32,
        /// The GPADL's handle.
        gpadl: U32,
    }
}

channel_message! {
    /// GPADL_TORNDOWN (`struct vmbus_channel_gpadl_torndown`, 12 bytes).
    GpadlTorndown {
        /// The GPADL's handle.
        gpadl: U32,
    }
}

channel_message! {
    /// OPENCHANNEL (`struct vmbus_channel_open_channel`, 148 bytes).
    OpenChannel {
        /// The channel.
        child_relid: U32,
        /// The guest's id for this open, echoed in the result.
        openid: U32,
        /// The GPADL of the two ring buffers: guest-to-host ("upstream")
        /// from page 0, then host-to-guest ("downstream").
        ringbuffer_gpadl_handle: U32,
        /// The VP the channel's interrupts go to.
        target_vp: U32,
        /// Where the host-to-guest ring starts in the GPADL, in pages
        /// (Linux: the guest-to-host ring's size).
        downstream_ringbuffer_page_offset: U32,
        /// The device's own open data.
        user_data: [u8; OFFER_USER_DEFINED_BYTES],
    }
}

channel_message! {
    /// OPENCHANNEL_RESULT (`struct vmbus_channel_open_result`, 20 bytes).
    OpenResult {
        /// The channel.
        child_relid: U32,
        /// The open's id, as the guest sent it.
        openid: U32,
        /// 0, or an NTSTATUS error ([`STATUS_UNSUCCESSFUL`]).
        status: U32,
    }
}

channel_message! {
    /// CLOSECHANNEL (`struct vmbus_channel_close_channel`, 12 bytes).
    CloseChannel {
        /// The channel.
        child_relid: U32,
    }
}

channel_message! {
    /// RESCIND_CHANNELOFFER (`struct vmbus_channel_rescind_offer`, 12
    /// bytes): the host takes an offer back (hot removal).
    RescindOffer {
        /// The channel.
        child_relid: U32,
    }
}

channel_message! {
    /// RELID_RELEASED (`struct vmbus_channel_relid_released`, 12 bytes):
    /// the guest is done with a rescinded channel; its relid is free.
    RelidReleased {
        /// The channel.
        child_relid: U32,
    }
}

/// The NTSTATUS the host answers a GPADL or an open it refuses with
/// (Linux only checks for non-zero).
pub const STATUS_UNSUCCESSFUL: u32 = 0xC000_0001;

/// A ring buffer's control block at the start of its first page
/// (`struct hv_ring_buffer`'s fields, 68 bytes; the rest of the page is
/// reserved and the data starts at the next page). Indices are byte
/// offsets into the data.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct RingControl {
    /// Where the writer writes next.
    pub write_index: U32,
    /// Where the reader reads next.
    pub read_index: U32,
    /// Non-zero: the reader asks not to be signalled.
    pub interrupt_mask: U32,
    /// Bytes the writer waits for (with the feature bit).
    pub pending_send_sz: U32,
    /// Reserved.
    pub reserved1: [U32; 12],
    /// Bit 0: `feat_pending_send_sz`.
    pub feature_bits: U32,
}

/// A packet's header in a ring (`struct vmpacket_descriptor`, 16 bytes).
/// The packet is `len8 * 8` bytes in all, its payload from `offset8 * 8`,
/// followed by an 8-byte trailer (the packet's start, in the high half).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct PacketDescriptor {
    /// `VM_PKT_*`.
    pub packet_type: U16,
    /// The payload's offset, in 8-byte units.
    pub offset8: U16,
    /// The packet's length, in 8-byte units.
    pub len8: U16,
    /// `VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED` (1) and the rest.
    pub flags: U16,
    /// The sender's id for a completion.
    pub transaction_id: U64,
}

/// `VM_PKT_DATA_INBAND`: a packet whose payload is all in the ring.
pub const VM_PKT_DATA_INBAND: u16 = 6;
/// `VM_PKT_COMP`: a completion.
pub const VM_PKT_COMP: u16 = 11;
/// Bytes of a ring packet's trailer (`VMBUS_PKT_TRAILER`).
pub const RING_PACKET_TRAILER: u32 = 8;

#[cfg(test)]
// Test constants are small.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};
    use pviommu_abi::HV_PAGE_SIZE;
    use std::format;
    use std::string::ToString;

    #[test]
    fn synic_layouts() {
        assert_eq!(size_of::<HvMessageHeader>(), 16);
        assert_eq!(offset_of!(HvMessageHeader, message_type), 0);
        assert_eq!(offset_of!(HvMessageHeader, payload_size), 4);
        assert_eq!(offset_of!(HvMessageHeader, message_flags), 5);
        assert_eq!(offset_of!(HvMessageHeader, reserved), 6);
        assert_eq!(offset_of!(HvMessageHeader, sender), 8);
        assert_eq!(size_of::<HvMessage>(), HV_MESSAGE_SIZE);
        assert_eq!(offset_of!(HvMessage, header), 0);
        assert_eq!(offset_of!(HvMessage, payload), 16);
        assert_eq!(
            HvMessage::FLAGS_OFFSET as usize,
            offset_of!(HvMessageHeader, message_flags)
        );
        assert_eq!(HvMessage::TYPE_OFFSET, 0);
        assert_eq!(size_of::<HvMessagePage>() as u64, HV_PAGE_SIZE);
        assert_eq!(size_of::<HvSynicEventFlags>(), 256);
        assert_eq!(size_of::<HvSynicEventFlagsPage>() as u64, HV_PAGE_SIZE);
        assert_eq!(offset_of!(HvSynicEventFlagsPage, sint_event_flags), 0);
        assert_eq!(message_slot_offset(2), 0x200);
        assert_eq!(message_slot_offset(15), 0xF00);
        assert_eq!(event_flag_position(2, 0), Some((0x200, 1)));
        assert_eq!(event_flag_position(2, 9), Some((0x201, 2)));
        assert_eq!(event_flag_position(15, 2047), Some((0xFFF, 0x80)));
        assert_eq!(event_flag_position(0, 2048), None);
        for t in [
            align_of::<HvMessage>(),
            align_of::<InputPostMessage>(),
            align_of::<OfferChannel>(),
            align_of::<InitiateContact>(),
        ] {
            assert_eq!(t, 1);
        }
    }

    #[test]
    fn post_message_input_layout() {
        assert_eq!(size_of::<InputPostMessage>(), 256);
        assert_eq!(offset_of!(InputPostMessage, connection_id), 0);
        assert_eq!(offset_of!(InputPostMessage, reserved), 4);
        assert_eq!(offset_of!(InputPostMessage, message_type), 8);
        assert_eq!(offset_of!(InputPostMessage, payload_size), 12);
        assert_eq!(offset_of!(InputPostMessage, payload), 16);
        let i = InputPostMessage::new(4, HvMessageType::CHANNEL.0, &[0xAA; 40]).unwrap();
        let b = i.as_bytes();
        assert_eq!(&b[..16], &[4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 40, 0, 0, 0]);
        assert_eq!(&b[16..56], &[0xAA; 40]);
        assert!(b[56..].iter().all(|&x| x == 0));
        assert!(InputPostMessage::new(1, HvMessageType::CHANNEL.0, &[0; 241]).is_none());
        assert_eq!(ConnectionId::from_bits(0x0100_0004).id(), 4);
        assert_eq!(ConnectionId::from_bits(0x0100_0004).reserved(), 1);
    }

    #[test]
    fn channel_message_layouts() {
        assert_eq!(size_of::<ChannelMessageHeader>(), 8);
        assert_eq!(offset_of!(ChannelMessageHeader, msgtype), 0);
        assert_eq!(offset_of!(ChannelMessageHeader, padding), 4);

        assert_eq!(size_of::<InitiateContact>(), 40);
        assert_eq!(offset_of!(InitiateContact, vmbus_version_requested), 8);
        assert_eq!(offset_of!(InitiateContact, target_vcpu), 12);
        assert_eq!(
            offset_of!(InitiateContact, interrupt_page_or_target_info),
            16
        );
        assert_eq!(offset_of!(InitiateContact, monitor_page1), 24);
        assert_eq!(offset_of!(InitiateContact, monitor_page2), 32);

        assert_eq!(size_of::<VersionResponse>(), 16);
        assert_eq!(offset_of!(VersionResponse, version_supported), 8);
        assert_eq!(offset_of!(VersionResponse, connection_state), 9);
        assert_eq!(offset_of!(VersionResponse, padding), 10);
        assert_eq!(offset_of!(VersionResponse, msg_conn_id), 12);

        assert_eq!(size_of::<ChannelOffer>(), 176);
        assert_eq!(offset_of!(ChannelOffer, if_type), 0);
        assert_eq!(offset_of!(ChannelOffer, if_instance), 16);
        assert_eq!(offset_of!(ChannelOffer, reserved1), 32);
        assert_eq!(offset_of!(ChannelOffer, reserved2), 40);
        assert_eq!(offset_of!(ChannelOffer, chn_flags), 48);
        assert_eq!(offset_of!(ChannelOffer, mmio_megabytes), 50);
        assert_eq!(offset_of!(ChannelOffer, user_def), 52);
        assert_eq!(offset_of!(ChannelOffer, sub_channel_index), 172);
        assert_eq!(offset_of!(ChannelOffer, reserved3), 174);

        // The plan's table: offsets in the whole message.
        assert_eq!(size_of::<OfferChannel>(), 196);
        let o = offset_of!(OfferChannel, offer);
        assert_eq!(o, 8);
        assert_eq!(o + offset_of!(ChannelOffer, if_type), 8);
        assert_eq!(o + offset_of!(ChannelOffer, if_instance), 24);
        assert_eq!(o + offset_of!(ChannelOffer, reserved1), 40);
        assert_eq!(o + offset_of!(ChannelOffer, chn_flags), 56);
        assert_eq!(o + offset_of!(ChannelOffer, mmio_megabytes), 58);
        assert_eq!(o + offset_of!(ChannelOffer, user_def), 60);
        assert_eq!(o + offset_of!(ChannelOffer, sub_channel_index), 180);
        assert_eq!(o + offset_of!(ChannelOffer, reserved3), 182);
        assert_eq!(offset_of!(OfferChannel, child_relid), 184);
        assert_eq!(offset_of!(OfferChannel, monitorid), 188);
        assert_eq!(offset_of!(OfferChannel, monitor_allocated), 189);
        assert_eq!(offset_of!(OfferChannel, is_dedicated_interrupt), 190);
        assert_eq!(offset_of!(OfferChannel, connection_id), 192);
    }

    #[test]
    fn initiate_contact_union() {
        let mut m = InitiateContact {
            interrupt_page_or_target_info: InitiateContact::target_info(2, 0, 0),
            ..Default::default()
        };
        let b = m.as_bytes();
        assert_eq!(&b[16..24], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((m.msg_sint(), m.msg_vtl(), m.feature_flags()), (2, 0, 0));
        m.interrupt_page_or_target_info = InitiateContact::target_info(7, 1, 0xA0B0_C0D0);
        assert_eq!(&m.as_bytes()[16..24], &[7, 1, 0, 0, 0xD0, 0xC0, 0xB0, 0xA0]);
        assert_eq!(
            (m.msg_sint(), m.msg_vtl(), m.feature_flags()),
            (7, 1, 0xA0B0_C0D0)
        );
        m.interrupt_page_or_target_info = U64::new(0x1234_5000);
        assert_eq!(m.interrupt_page(), 0x1234_5000);
    }

    #[test]
    fn registers_and_constants_match_linux() {
        // The MSR numbers are tested in pviommu-abi.
        assert_eq!(SINT_COUNT, 16);

        assert_eq!(SynicControl::new().with_enable(true).into_bits(), 1);
        assert_eq!(SynicControl::from_bits(2).reserved(), 1);
        let p = SynicPageMsr::new()
            .with_enable(true)
            .with_preserved(0x7FF)
            .with_gpn(0xABCDE);
        assert_eq!(p.into_bits(), 0xABCDE << 12 | 0xFFF);
        assert_eq!(p.gpa(), 0xABCD_E000);
        let s = SintMsr::new()
            .with_vector(0xF3)
            .with_masked(true)
            .with_auto_eoi(true)
            .with_polling(true);
        assert_eq!(s.into_bits(), 0xF3 | 1 << 16 | 1 << 17 | 1 << 18);
        assert_eq!(s.into_bits() | 0xFF, SintMsr::WRITABLE_MASK);
        assert_eq!(SintMsr::RESET.into_bits(), 0x1_0000);
        assert!(SintMsr::from_bits(1 << 19).as_intercept());
        assert!(SintMsr::from_bits(1 << 20).proxy());
        assert_eq!(SintMsr::from_bits(1 << 21).reserved2(), 1);
        assert_eq!(MessageFlags::new().with_msg_pending(true).into_bits(), 1);

        assert_eq!(version::WIN10_V5, 0x5_0000);
        assert_eq!(version::WIN10_V5_3, 0x5_0003);
        assert_eq!(version::WIN8_1, 0x3_0000);
        assert_eq!(version::WIN8, 0x2_0004);
        assert_eq!(version::WIN7, 0x1_0001);
        assert_eq!(version::WS2008, 0xD);
        assert_eq!(version::V6_0, 0x6_0000);
        assert_eq!(
            (
                version::major(version::WIN10_V5_2),
                version::minor(0x5_0002)
            ),
            (5, 2)
        );

        assert_eq!(ChannelMessageType::INITIATE_CONTACT.0, 14);
        assert_eq!(ChannelMessageType::VERSION_RESPONSE.0, 15);
        assert_eq!(ChannelMessageType::REQUESTOFFERS.0, 3);
        assert_eq!(ChannelMessageType::ALLOFFERS_DELIVERED.0, 4);
        assert_eq!(ChannelMessageType::UNLOAD.0, 16);
        assert_eq!(ChannelMessageType::UNLOAD_RESPONSE.0, 17);
        assert_eq!(ChannelMessageType::MODIFYCHANNEL_RESPONSE.0, 24);
        const { assert!(ChannelMessageType::MODIFYCHANNEL_RESPONSE.0 < ChannelMessageType::COUNT) };
        assert_eq!(ChannelMessageType(23).name(), None);
        assert_eq!(
            format!("{:?}", ChannelMessageType(99)),
            "ChannelMessageType(99)"
        );
        assert_eq!(format!("{}", ChannelMessageType::UNLOAD), "UNLOAD");

        assert_eq!(VMBUS_MESSAGE_CONNECTION_ID, 1);
        assert_eq!(VMBUS_MESSAGE_CONNECTION_ID_4, 4);
        assert_eq!(VMBUS_MESSAGE_SINT, 2);
    }

    #[test]
    fn guid_bytes_and_text() {
        assert_eq!(
            VPCI_INTERFACE_TYPE.0,
            [
                0x1d, 0xf6, 0xc4, 0x44, 0x44, 0x44, 0x00, 0x44, 0x9d, 0x52, 0x80, 0x2e, 0x27, 0xed,
                0xe1, 0x9f
            ]
        );
        assert_eq!(
            VPCI_INTERFACE_TYPE.to_string(),
            "44c4f61d-4444-4400-9d52-802e27ede19f"
        );
        assert_eq!(
            format!("{:?}", Guid::NIL),
            "Guid(00000000-0000-0000-0000-000000000000)"
        );
    }

    #[test]
    fn messages_carry_their_payload() {
        let m = HvMessage::new(HvMessageType::CHANNEL, &[1, 2, 3]).unwrap();
        assert_eq!(m.header.message_type(), HvMessageType::CHANNEL);
        assert_eq!(m.header.payload_size, 3);
        assert_eq!(m.payload(), &[1, 2, 3]);
        assert!(!m.header.flags().msg_pending());
        assert!(HvMessage::new(HvMessageType::CHANNEL, &[0; 241]).is_none());
        assert_eq!(
            HvMessage::new(HvMessageType::CHANNEL, &[7; 240])
                .unwrap()
                .payload()
                .len(),
            240
        );
        // A slot read from the guest may claim more than 240 bytes.
        let mut odd = m;
        odd.header.payload_size = 255;
        assert_eq!(odd.payload().len(), 240);
        assert_eq!(
            format!("{:?}", HvMessageType(0x8000_0010)),
            "HvMessageType(0x80000010)"
        );
        assert_eq!(format!("{:?}", HvMessageType::NONE), "HVMSG_NONE");
    }

    #[test]
    fn gpadl_open_and_close_layouts() {
        assert_eq!(size_of::<GpadlHeader>(), 20);
        assert_eq!(offset_of!(GpadlHeader, child_relid), 8);
        assert_eq!(offset_of!(GpadlHeader, gpadl), 12);
        assert_eq!(offset_of!(GpadlHeader, range_buflen), 16);
        assert_eq!(offset_of!(GpadlHeader, rangecount), 18);
        assert_eq!(size_of::<GpaRange>(), 8);
        assert_eq!(offset_of!(GpaRange, byte_offset), 4);
        assert_eq!(size_of::<GpadlBody>(), 16);
        assert_eq!(offset_of!(GpadlBody, msgnumber), 8);
        assert_eq!(offset_of!(GpadlBody, gpadl), 12);
        assert_eq!(size_of::<GpadlCreated>(), 20);
        assert_eq!(offset_of!(GpadlCreated, creation_status), 16);
        assert_eq!(size_of::<GpadlTeardown>(), 16);
        assert_eq!(size_of::<GpadlTorndown>(), 12);
        assert_eq!(size_of::<OpenChannel>(), 148);
        assert_eq!(offset_of!(OpenChannel, openid), 12);
        assert_eq!(offset_of!(OpenChannel, ringbuffer_gpadl_handle), 16);
        assert_eq!(offset_of!(OpenChannel, target_vp), 20);
        assert_eq!(
            offset_of!(OpenChannel, downstream_ringbuffer_page_offset),
            24
        );
        assert_eq!(offset_of!(OpenChannel, user_data), 28);
        assert_eq!(size_of::<OpenResult>(), 20);
        assert_eq!(offset_of!(OpenResult, status), 16);
        assert_eq!(size_of::<CloseChannel>(), 12);
        assert_eq!(size_of::<RescindOffer>(), 12);
        assert_eq!(offset_of!(RescindOffer, child_relid), 8);
        assert_eq!(size_of::<RelidReleased>(), 12);
        assert_eq!(offset_of!(RelidReleased, child_relid), 8);
        assert_eq!(size_of::<RingControl>(), 68);
        assert_eq!(offset_of!(RingControl, read_index), 4);
        assert_eq!(offset_of!(RingControl, interrupt_mask), 8);
        assert_eq!(offset_of!(RingControl, pending_send_sz), 12);
        assert_eq!(offset_of!(RingControl, feature_bits), 64);
        assert_eq!(size_of::<PacketDescriptor>(), 16);
        assert_eq!(offset_of!(PacketDescriptor, offset8), 2);
        assert_eq!(offset_of!(PacketDescriptor, len8), 4);
        assert_eq!(offset_of!(PacketDescriptor, flags), 6);
        assert_eq!(offset_of!(PacketDescriptor, transaction_id), 8);
    }
}
