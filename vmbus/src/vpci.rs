//! The host side of Hyper-V's virtual PCI bus (vPCI), for Linux's
//! unmodified `pci-hyperv` (`drivers/pci/controller/pci-hyperv.c`): the
//! functions the VMM keeps ([`VpciFunctions`]) appear on a PCI root bus of
//! their own, behind one VMBus channel.
//!
//! # The protocol as pvmm serves it (Linux's `hv_pci_probe`)
//! 1. QUERY_PROTOCOL_VERSION, newest first: 1.4, 1.3 and 1.2 are accepted
//!    (status 0); anything else gets STATUS_REVISION_MISMATCH, so Linux
//!    walks down. Linux 7.2 proposes 1.4 first and gets it. Every other
//!    request before a version is refused (STATUS_INVALID_DEVICE_STATE).
//! 2. QUERY_BUS_RELATIONS (no completion): one BUS_RELATIONS2 with every
//!    function (flags 0, NUMA node 0; none is a valid answer). Linux's
//!    probe waits for it, then asks QUERY_RESOURCE_REQUIREMENTS per new
//!    function: the BARs as a sizing read gives them.
//! 3. BUS_D0ENTRY places the two-page configuration window (page aligned):
//!    the VMM maps it and forwards its accesses to [`Vpci::window_read`] and
//!    [`Vpci::window_write`]: a 4-byte write at offset 0 selects a function
//!    (its [`WinSlot`]), its configuration space is the second page.
//!    BUS_D0EXIT unmaps it.
//! 4. RESOURCES_ASSIGNED(2) per function: status 0 (the BARs are the
//!    guest's business, in its configuration space). RESOURCES_RELEASED:
//!    accepted.
//! 5. CREATE_INTERRUPT_MESSAGE3 (1.4; CREATE_INTERRUPT_MESSAGE2 at 1.2 and
//!    1.3), per MSI or MSI-X vector: the answer is a real x86 MSI message,
//!    physical destination (APIC id = VP index, at most 254), fixed, edge:
//!    address `0xFEE0_0000 | vp << 12`, data = the vector. A multi-MSI
//!    block (Linux asks vector 32, a dummy, for up to 32 vectors) is served
//!    only by a bus made with [`Vpci::with_multi_msi`] (else NOT_SUPPORTED,
//!    and Linux uses one vector); it gets a
//!    tag in the data's reserved bits 13:11 so that no two live blocks, and
//!    no single vector, share a message. Linux then moves each vector with
//!    HvCallRetargetDeviceInterrupt: [`Vpci::retarget`] checks the message
//!    is one this bus created for that function and records the new vector
//!    and VP; [`Vpci::translate`] gives the message to deliver for what the
//!    device writes. DELETE_INTERRUPT_MESSAGE forgets one.
//! 6. Hot plug: [`Vpci::relations_changed`] sends a fresh BUS_RELATIONS2;
//!    [`Vpci::eject`] sends EJECT, and the guest's EJECTION_COMPLETE reaches
//!    [`VpciFunctions::ejected`].
//!
//! Not served: protocol 1.1 (and its CREATE_INTERRUPT_MESSAGE), READ_BLOCK
//! and WRITE_BLOCK (the SR-IOV back channel), POWER_STATE_CHANGE (Linux
//! never sends it): a negative status. Host messages BUS_RELATIONS (1.1)
//! and INVALIDATE_BLOCK are never sent.
//!
//! # A hostile guest
//! No packet makes the server panic. A malformed packet (short, an unknown
//! or host-only type, a packet type other than inband data, a completion
//! requested or not against the message's rules) is answered with a
//! negative status if the guest asked for a completion, else dropped, and
//! counted; only the first is logged. A refused request (a bad slot,
//! vector or VP) is counted too. Bounds: [`MAX_QUEUED`] answers wait for
//! room in a full ring (the server stops reading the guest until they are
//! sent), [`MAX_PACKETS_PER_RUN`] packets per run, [`MAX_VECTORS`]
//! interrupt vectors per bus, [`MAX_FUNCTIONS`] functions in a relations
//! message.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use zerocopy::little_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::abi::vpci::{
    ntstatus, BusD0Entry, BusRelations2, ChildMessage, CreateIntResponse, CreateInterrupt2,
    CreateInterrupt3, DeleteInterrupt, DevIncoming, EjectResponse, FunctionDescription2,
    MessageType, PciMessage, QResReqResponse, ResourcesAssigned, ResourcesAssigned2, Response,
    TranIntDesc, VersionRequest, WinSlot, APIC_DELIVERY_MODE_FIXED, CFG_PAGE_OFFSET,
    HV_MSI_MAX_PROCESSORS, PCI_CONFIG_MMIO_LENGTH, PCI_PROTOCOL_VERSION_1_2,
    PCI_PROTOCOL_VERSION_1_3, PCI_PROTOCOL_VERSION_1_4, PCI_STD_NUM_BARS,
    STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_DEVICE_STATE, STATUS_INVALID_PARAMETER,
    STATUS_NOT_SUPPORTED, STATUS_NO_SUCH_DEVICE, STATUS_REVISION_MISMATCH, STATUS_SUCCESS,
    VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED,
};
use crate::abi::{VM_PKT_COMP, VM_PKT_DATA_INBAND};
use crate::channel::{Channel, ChannelDevice, ChannelFault};
use crate::ring::{Packet, RingError};

/// Answers waiting for room in the host-to-guest ring; at the bound the
/// server stops reading the guest's requests.
pub const MAX_QUEUED: usize = 16;
/// Packets one [`ChannelDevice::run`] reads at most. More than a ring
/// Linux opens can hold (16 KiB: at most 682 of the smallest packets), so
/// a run drains the ring: Linux signals the host only when its ring goes
/// from empty to not empty, and waits for some answers with interrupts
/// off. The bound is for a guest that refills the ring from another VP
/// while the host reads it.
pub const MAX_PACKETS_PER_RUN: usize = 4096;
/// Interrupt vectors one bus holds at most (MSI-X allows 2048 per function).
pub const MAX_VECTORS: usize = 2048;
/// Functions a relations message lists at most (every [`WinSlot`]).
pub const MAX_FUNCTIONS: usize = 256;
/// Protocol versions served, newest first.
pub const VERSIONS: [u32; 3] = [
    PCI_PROTOCOL_VERSION_1_4,
    PCI_PROTOCOL_VERSION_1_3,
    PCI_PROTOCOL_VERSION_1_2,
];
/// The highest VP index an interrupt may target: a physical-mode xAPIC
/// destination is 8 bits, and 255 is the broadcast.
pub const MAX_MSI_VP: u32 = 254;
/// The vectors an interrupt may use (0-15 are exceptions).
pub const VECTORS: std::ops::RangeInclusive<u32> = 0x10..=0xFF;

/// Multi-MSI tags: MSI data bits 13:11 (reserved in x86's format, kept in
/// MSI's 16-bit data register, ignored by the local APIC).
const MSI_TAG_SHIFT: u32 = 11;
const MSI_TAGS: std::ops::RangeInclusive<u32> = 1..=7;
/// Vectors of one multi-MSI block at most.
const MAX_BLOCK: u16 = 32;
/// One past the highest guest physical address a window may reach.
const MAX_GPA: u64 = 1 << 52;
const PAGE_SIZE: u64 = 4096;

/// The MSI address of VP `vp`'s local APIC (`pviommu-abi`'s, pvmm's one
/// definition).
pub use pviommu_abi::msi_address;

/// One PCI function on the bus, as BUS_RELATIONS2 describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Its place on the bus (distinct per function; reserved bits zero).
    pub slot: WinSlot,
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision id.
    pub revision: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subclass.
    pub subclass: u8,
    /// Base class.
    pub class: u8,
    /// `subsystem device << 16 | subsystem vendor`: Linux serves config
    /// offsets 0x2C..0x30 from these bytes, not from the function.
    pub subsystem_id: u32,
    /// Serial number: Linux names the PCI slot after it, and a function
    /// whose slot, ids and serial are unchanged in a new relations message
    /// is the same function.
    pub serial: u32,
}

impl Function {
    fn description(&self) -> FunctionDescription2 {
        FunctionDescription2 {
            v_id: U16::new(self.vendor_id),
            d_id: U16::new(self.device_id),
            rev: self.revision,
            prog_intf: self.prog_if,
            subclass: self.subclass,
            base_class: self.class,
            subsystem_id: U32::new(self.subsystem_id),
            win_slot: U32::new(self.slot.into_bits()),
            ser: U32::new(self.serial),
            flags: U32::new(0),
            virtual_numa_node: U16::new(0),
            reserved: U16::new(0),
        }
    }
}

/// The PCI functions behind one vPCI bus, as the VMM keeps them.
pub trait VpciFunctions: Send + Sync {
    /// The functions on the bus now (their slots are distinct).
    fn functions(&self) -> Vec<Function>;
    /// Function `slot`'s six BAR registers as a sizing read gives them (all
    /// ones written, read back; 0 for an unimplemented BAR), for
    /// QUERY_RESOURCE_REQUIREMENTS. `None`: no such function.
    fn probed_bars(&self, slot: WinSlot) -> Option<[u32; PCI_STD_NUM_BARS]>;
    /// Configuration read of function `slot` at `offset` (0..4096; 1, 2 or
    /// 4 bytes, aligned) through the window. Absent function: all ones.
    fn config_read(&self, slot: WinSlot, offset: u16, data: &mut [u8]);
    /// Configuration write, likewise. Absent function: ignored.
    fn config_write(&self, slot: WinSlot, offset: u16, data: &[u8]);
    /// BUS_D0ENTRY put the configuration window at `base`
    /// ([`PCI_CONFIG_MMIO_LENGTH`] bytes, page aligned); `None` at
    /// BUS_D0EXIT and when the channel opens or closes with it mapped. The
    /// VMM forwards the window's accesses to [`Vpci::window_read`] and
    /// [`Vpci::window_write`]. `false`: the VMM cannot map it there (D0
    /// entry fails with INVALID_PARAMETER).
    fn set_config_window(&self, base: Option<u64>) -> bool;
    /// The guest finished ejecting `slot` (EJECTION_COMPLETE) after
    /// [`Vpci::eject`]. May come after the VMM gave up waiting.
    fn ejected(&self, slot: WinSlot);
}

/// What [`Vpci::retarget`] and [`Vpci::eject`] refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VpciError {
    /// The bus created no such interrupt for the function (the VMM answers
    /// HV_STATUS_INVALID_PARAMETER).
    #[error("No interrupt {address:#x}/{data:#x} of function {function} on this bus")]
    UnknownInterrupt {
        /// The PCI function number.
        function: u8,
        /// The MSI address given.
        address: u64,
        /// The MSI data given.
        data: u32,
    },
    /// A vector outside [`VECTORS`].
    #[error("Vector {0:#x} outside 0x10..=0xff")]
    BadVector(u32),
    /// No target VP.
    #[error("No target processor")]
    NoProcessor,
    /// A VP the VM lacks, or past [`MAX_MSI_VP`].
    #[error("VP {vp} is not a target ({vcpus} VPs)")]
    BadProcessor {
        /// The VP.
        vp: u32,
        /// VPs of the VM.
        vcpus: u32,
    },
    /// No function at the slot.
    #[error("No function at slot {0:#x}")]
    UnknownFunction(u32),
    /// The guest has not listed the bus' functions in this session (channel
    /// not open, or no QUERY_BUS_RELATIONS yet): it knows no function to
    /// eject.
    #[error("The guest has not listed the bus' functions")]
    NotListed,
}

/// Counters and state, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VpciStats {
    /// The negotiated protocol version.
    pub version: Option<u32>,
    /// The configuration window's base (between D0 entry and exit).
    pub config_window: Option<u64>,
    /// Interrupts created and not deleted.
    pub interrupts: usize,
    /// Their vectors.
    pub vectors: usize,
    /// Answers waiting for room in the ring.
    pub queued: usize,
    /// Malformed packets (since creation).
    pub malformed: u64,
    /// Requests refused with a negative status (since creation).
    pub refused: u64,
}

/// Why a packet is malformed (logged once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Malformed {
    #[error("packet type {0}, not inband data")]
    PacketType(u16),
    #[error("{0}: {1} bytes, short")]
    Short(MessageType, usize),
    #[error("{0}: unknown or host-only")]
    Unknown(MessageType),
    #[error("{0}: no completion requested")]
    NoCompletion(MessageType),
    #[error("{0}: a completion requested")]
    UnexpectedCompletion(MessageType),
}

/// Whether a message type takes a completion.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Completion {
    Required,
    Forbidden,
    Optional,
}

/// How the server treats a message type: its completion rule and its
/// least size, or `None` for a type it does not take.
fn rule(t: MessageType) -> Option<(Completion, usize)> {
    use std::mem::size_of;
    use Completion::{Forbidden, Optional, Required};
    Some(match t {
        MessageType::QUERY_PROTOCOL_VERSION => (Required, size_of::<VersionRequest>()),
        MessageType::QUERY_BUS_RELATIONS => (Forbidden, size_of::<PciMessage>()),
        MessageType::QUERY_RESOURCE_REQUIREMENTS => (Required, size_of::<ChildMessage>()),
        MessageType::BUS_D0ENTRY => (Required, size_of::<BusD0Entry>()),
        MessageType::BUS_D0EXIT => (Optional, size_of::<PciMessage>()),
        MessageType::RESOURCES_ASSIGNED => (Required, size_of::<ResourcesAssigned>()),
        MessageType::RESOURCES_ASSIGNED2 => (Required, size_of::<ResourcesAssigned2>()),
        MessageType::RESOURCES_RELEASED => (Forbidden, size_of::<ChildMessage>()),
        MessageType::CREATE_INTERRUPT_MESSAGE2 => (Required, size_of::<CreateInterrupt2>()),
        MessageType::CREATE_INTERRUPT_MESSAGE3 => (Required, size_of::<CreateInterrupt3>()),
        MessageType::DELETE_INTERRUPT_MESSAGE => (Forbidden, size_of::<DeleteInterrupt>()),
        MessageType::EJECTION_COMPLETE => (Forbidden, size_of::<EjectResponse>()),
        // Known, not served: a negative status.
        MessageType::CREATE_INTERRUPT_MESSAGE
        | MessageType::READ_BLOCK
        | MessageType::WRITE_BLOCK
        | MessageType::POWER_STATE_CHANGE => (Required, size_of::<PciMessage>()),
        _ => return None,
    })
}

/// A packet for the guest, waiting for room.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outgoing {
    transaction_id: u64,
    payload: Vec<u8>,
}

/// One created interrupt: `count` vectors, messages `(address, data + i)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Interrupt {
    slot: WinSlot,
    address: u64,
    data: u32,
    count: u16,
}

impl Interrupt {
    fn holds(&self, data: u32) -> bool {
        data >= self.data && data - self.data < u32::from(self.count)
    }

    fn tag(&self) -> u32 {
        self.data >> MSI_TAG_SHIFT & 7
    }
}

/// The bus' interrupts and where retargeting moved them.
#[derive(Debug, Default)]
struct Interrupts {
    records: BTreeMap<u64, Interrupt>,
    next_id: u64,
    vectors: usize,
    /// Message written by the device -> (owner id, message to deliver).
    moved: HashMap<(u64, u32), (u64, (u64, u32))>,
}

/// A CREATE_INTERRUPT_MESSAGE2/3 request, whatever its version.
struct CreateRequest {
    slot: WinSlot,
    vector: u32,
    delivery_mode: u8,
    vector_count: u16,
    processor_count: u16,
    processors: [U16; HV_MSI_MAX_PROCESSORS],
}

impl Interrupts {
    /// Creates an interrupt; `Err` is the NTSTATUS of a refusal.
    fn create(
        &mut self,
        r: &CreateRequest,
        vcpus: u32,
        multi_msi: bool,
    ) -> Result<TranIntDesc, u32> {
        let count = r.vector_count;
        // Without translation in the VMM's interrupt path, a block's
        // vectors would arrive as Linux's dummy ones.
        if count > 1 && !multi_msi {
            return Err(STATUS_NOT_SUPPORTED);
        }
        let last = r
            .vector
            .checked_add(u32::from(count))
            .and_then(|v| v.checked_sub(1));
        if r.delivery_mode != APIC_DELIVERY_MODE_FIXED
            || !(1..=MAX_BLOCK).contains(&count)
            || !VECTORS.contains(&r.vector)
            || !last.is_some_and(|l| VECTORS.contains(&l))
            || r.vector % u32::from(count.next_power_of_two()) != 0
        {
            return Err(STATUS_INVALID_PARAMETER);
        }
        let n = usize::from(r.processor_count);
        let vps = r
            .processors
            .get(..n)
            .filter(|v| !v.is_empty())
            .ok_or(STATUS_INVALID_PARAMETER)?;
        if vps.iter().any(|vp| !is_target(u32::from(vp.get()), vcpus)) {
            return Err(STATUS_INVALID_PARAMETER);
        }
        if self.vectors + usize::from(count) > MAX_VECTORS {
            return Err(STATUS_INSUFFICIENT_RESOURCES);
        }
        let first = vps.first().map_or(0, |vp| u32::from(vp.get()));
        let (address, data) = if count == 1 {
            (msi_address(first), r.vector)
        } else {
            self.free_block(first, r.vector, vcpus)
                .ok_or(STATUS_INSUFFICIENT_RESOURCES)?
        };
        let id = self.next_id;
        self.next_id += 1;
        self.records.insert(
            id,
            Interrupt {
                slot: r.slot,
                address,
                data,
                count,
            },
        );
        self.vectors += usize::from(count);
        Ok(TranIntDesc {
            reserved: U16::new(0),
            vector_count: U16::new(count),
            data: U32::new(data),
            address: U64::new(address),
        })
    }

    /// A message for a multi-MSI block: VP `vp` if a tag is free there,
    /// else another VP; a tag no live block at that address holds.
    fn free_block(&self, vp: u32, vector: u32, vcpus: u32) -> Option<(u64, u32)> {
        let last = vcpus.min(MAX_MSI_VP + 1);
        std::iter::once(vp)
            .chain((0..last).filter(|&v| v != vp))
            .flat_map(|v| MSI_TAGS.map(move |tag| (msi_address(v), tag)))
            .find(|&(address, tag)| {
                !self
                    .records
                    .values()
                    .any(|i| i.address == address && i.tag() == tag)
            })
            .map(|(address, tag)| (address, vector | tag << MSI_TAG_SHIFT))
    }

    /// Forgets interrupt `id` and where it moved.
    fn remove(&mut self, id: u64) {
        let Some(i) = self.records.remove(&id) else {
            return;
        };
        self.vectors = self.vectors.saturating_sub(usize::from(i.count));
        for k in 0..u32::from(i.count) {
            let key = (i.address, i.data.wrapping_add(k));
            if self.moved.get(&key).is_some_and(|&(owner, _)| owner == id) {
                self.moved.remove(&key);
            }
        }
    }

    fn delete(&mut self, slot: WinSlot, d: &TranIntDesc) -> bool {
        let found = self.records.iter().find_map(|(&id, i)| {
            (i.slot == slot
                && i.address == d.address.get()
                && i.data == d.data.get()
                && i.count == d.vector_count.get())
            .then_some(id)
        });
        found.inspect(|&id| self.remove(id)).is_some()
    }

    fn remove_slot(&mut self, slot: WinSlot) {
        let ids: Vec<u64> = self
            .records
            .iter()
            .filter_map(|(&id, i)| (i.slot == slot).then_some(id))
            .collect();
        for id in ids {
            self.remove(id);
        }
    }
}

/// Whether VP `vp` may be an interrupt's target.
fn is_target(vp: u32, vcpus: u32) -> bool {
    vp < vcpus && vp <= MAX_MSI_VP
}

/// The protocol session and the host's pending news.
#[derive(Debug, Default)]
struct Session {
    version: Option<u32>,
    window: Option<u64>,
    /// The window's slot register, once written.
    selected: Option<u32>,
    /// The guest asked for the relations: host messages may follow.
    listed: bool,
    /// Relations messages wanted and sent (counts): one is due while they
    /// differ.
    relations_wanted: u64,
    relations_sent: u64,
    /// EJECTs to send, and sent ones waiting for EJECTION_COMPLETE.
    ejects_pending: BTreeSet<u32>,
    ejects_sent: BTreeSet<u32>,
    out: VecDeque<Outgoing>,
    interrupts: Interrupts,
}

impl Session {
    fn relations_due(&self) -> Option<u64> {
        (self.listed && self.relations_wanted != self.relations_sent)
            .then_some(self.relations_wanted)
    }
}

#[derive(Debug, Default)]
struct State {
    session: Session,
    malformed: u64,
    refused: u64,
    warned: bool,
}

struct Inner<F> {
    functions: Arc<F>,
    vcpus: u32,
    /// Multi-MSI blocks are served (the VMM applies [`Vpci::translate`]).
    multi_msi: bool,
    state: Mutex<State>,
}

/// A vPCI bus: the server of its channel ([`ChannelDevice`]), its
/// configuration window and its interrupts. Clones share the bus: the VMM
/// keeps one for MMIO exits, hot plug and interrupts while the VMBus
/// server runs another. No lock is held while [`VpciFunctions`] is called.
pub struct Vpci<F> {
    inner: Arc<Inner<F>>,
}

impl<F> Clone for Vpci<F> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<F> std::fmt::Debug for Vpci<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vpci")
            .field("vcpus", &self.inner.vcpus)
            .finish_non_exhaustive()
    }
}

/// A window access: the slot register (byte offset in it) or configuration
/// space (offset).
enum Access {
    Slot(usize),
    Config(u16),
}

impl Access {
    /// 1, 2 or 4 bytes, naturally aligned, in the slot register or the
    /// configuration page.
    fn of(offset: u64, len: usize) -> Option<Self> {
        let n = u64::try_from(len).ok().filter(|n| matches!(n, 1 | 2 | 4))?;
        if offset % n != 0 {
            return None;
        }
        if offset.checked_add(n)? <= 4 {
            return usize::try_from(offset).ok().map(Self::Slot);
        }
        if (CFG_PAGE_OFFSET..PCI_CONFIG_MMIO_LENGTH).contains(&offset) {
            return u16::try_from(offset - CFG_PAGE_OFFSET)
                .ok()
                .map(Self::Config);
        }
        None
    }
}

fn status_payload(status: u32) -> Vec<u8> {
    Response {
        status: I32::new(ntstatus(status)),
    }
    .as_bytes()
    .to_vec()
}

/// Reads a `T` from the start of a payload (its length was checked
/// against [`rule`]).
fn read<T: FromBytes + KnownLayout + Immutable>(payload: &[u8]) -> Option<T> {
    T::read_from_prefix(payload).ok().map(|(t, _)| t)
}

impl<F: VpciFunctions> Vpci<F> {
    /// A bus over `functions`, in a VM of `vcpus` VPs (interrupt targets
    /// must be below it). Multi-MSI blocks are refused (NOT_SUPPORTED:
    /// Linux then uses one vector): their vectors reach the guest only
    /// through [`Vpci::translate`], which a VMM must apply to take them
    /// ([`Vpci::with_multi_msi`]).
    pub fn new(functions: Arc<F>, vcpus: u32) -> Self {
        Self::build(functions, vcpus, false)
    }

    /// [`Vpci::new`], serving multi-MSI blocks: for a VMM that delivers
    /// every message of the bus's functions through [`Vpci::translate`].
    pub fn with_multi_msi(functions: Arc<F>, vcpus: u32) -> Self {
        Self::build(functions, vcpus, true)
    }

    fn build(functions: Arc<F>, vcpus: u32, multi_msi: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                functions,
                vcpus,
                multi_msi,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The bus's functions.
    pub fn functions(&self) -> &Arc<F> {
        &self.inner.functions
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counters and state.
    pub fn stats(&self) -> VpciStats {
        let st = self.state();
        let s = &st.session;
        VpciStats {
            version: s.version,
            config_window: s.window,
            interrupts: s.interrupts.records.len(),
            vectors: s.interrupts.vectors,
            queued: s.out.len(),
            malformed: st.malformed,
            refused: st.refused,
        }
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> Option<u32> {
        self.state().session.version
    }

    /// The configuration window's base, between D0 entry and exit.
    pub fn config_window(&self) -> Option<u64> {
        self.state().session.window
    }

    /// Interrupts created and not deleted.
    pub fn interrupts(&self) -> usize {
        self.state().session.interrupts.records.len()
    }

    /// A read of the configuration window at `offset` (0..0x2000): the
    /// slot register at 0..4, the selected function's configuration space
    /// at 0x1000..0x2000 (1, 2 or 4 bytes, aligned). Anything else, or an
    /// unmapped window, reads all ones.
    pub fn window_read(&self, offset: u64, data: &mut [u8]) {
        let st = self.state();
        let (access, selected) = match (st.session.window, Access::of(offset, data.len())) {
            (Some(_), Some(a)) => (a, st.session.selected),
            _ => return data.fill(0xFF),
        };
        drop(st);
        match access {
            Access::Slot(at) => {
                let bytes = selected.unwrap_or(0).to_le_bytes();
                match bytes.get(at..at + data.len()) {
                    Some(b) => data.copy_from_slice(b),
                    None => data.fill(0xFF),
                }
            }
            Access::Config(off) => match selected {
                Some(s) => self
                    .inner
                    .functions
                    .config_read(WinSlot::from_bits(s), off, data),
                None => data.fill(0xFF),
            },
        }
    }

    /// A write to the configuration window: a 4-byte write at 0 selects a
    /// function, the configuration page reaches it; anything else, or an
    /// unmapped window, is ignored.
    pub fn window_write(&self, offset: u64, data: &[u8]) {
        let mut st = self.state();
        if st.session.window.is_none() {
            return;
        }
        match Access::of(offset, data.len()) {
            Some(Access::Slot(0)) => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    st.session.selected = Some(u32::from_le_bytes(b));
                }
            }
            Some(Access::Config(off)) => {
                let selected = st.session.selected;
                drop(st);
                if let Some(s) = selected {
                    self.inner
                        .functions
                        .config_write(WinSlot::from_bits(s), off, data);
                }
            }
            _ => {}
        }
    }

    /// Sends a fresh BUS_RELATIONS2 at the next run (a function was added
    /// or removed); nothing before the guest first asked for the relations
    /// (it will ask).
    pub fn relations_changed(&self) {
        let mut st = self.state();
        st.session.relations_wanted += 1;
    }

    /// Sends EJECT for `slot` at the next run; the guest's
    /// EJECTION_COMPLETE reaches [`VpciFunctions::ejected`]. An eject
    /// already under way is not sent again. The VMM times the guest out.
    pub fn eject(&self, slot: WinSlot) -> Result<(), VpciError> {
        if !self.state().session.listed {
            return Err(VpciError::NotListed);
        }
        let bits = slot.into_bits();
        if slot.reserved() != 0
            || !self
                .inner
                .functions
                .functions()
                .iter()
                .any(|f| f.slot == slot)
        {
            return Err(VpciError::UnknownFunction(bits));
        }
        let mut st = self.state();
        let s = &mut st.session;
        if !s.listed {
            return Err(VpciError::NotListed);
        }
        if !s.ejects_sent.contains(&bits) {
            s.ejects_pending.insert(bits);
        }
        Ok(())
    }

    /// HvCallRetargetDeviceInterrupt for PCI function `function` of this
    /// bus: the MSI `(address, data)` it was given (the address's low half
    /// is compared, as Linux passes it) now delivers `vector` to the first
    /// VP of `vps`.
    pub fn retarget(
        &self,
        function: u8,
        address: u64,
        data: u32,
        vector: u32,
        vps: &[u32],
    ) -> Result<(), VpciError> {
        if !VECTORS.contains(&vector) {
            return Err(VpciError::BadVector(vector));
        }
        let vcpus = self.inner.vcpus;
        let &vp = vps.first().ok_or(VpciError::NoProcessor)?;
        if !is_target(vp, vcpus) {
            return Err(VpciError::BadProcessor { vp, vcpus });
        }
        let mut st = self.state();
        let ints = &mut st.session.interrupts;
        let low = address & 0xFFFF_FFFF;
        let found = ints.records.iter().rev().find_map(|(&id, i)| {
            (i.slot.func() == function && i.address & 0xFFFF_FFFF == low && i.holds(data))
                .then_some((id, i.address))
        });
        let (id, created) = found.ok_or(VpciError::UnknownInterrupt {
            function,
            address,
            data,
        })?;
        let key = (created, data);
        let target = (msi_address(vp), vector);
        if target == key {
            ints.moved.remove(&key);
        } else {
            ints.moved.insert(key, (id, target));
        }
        Ok(())
    }

    /// The MSI message to deliver when a function of this bus writes
    /// `(address, data)`: where a retarget moved it, else itself.
    pub fn translate(&self, address: u64, data: u32) -> (u64, u32) {
        self.state()
            .session
            .interrupts
            .moved
            .get(&(address, data))
            .map_or((address, data), |&(_, t)| t)
    }

    /// A fresh session: version unknown, window unmapped, interrupts and
    /// pending news forgotten (counters stay).
    fn reset(&self) {
        let mapped = {
            let mut st = self.state();
            std::mem::take(&mut st.session).window.is_some()
        };
        if mapped {
            self.inner.functions.set_config_window(None);
        }
    }

    fn malformed(&self, why: Malformed) {
        let mut st = self.state();
        st.malformed += 1;
        if !st.warned {
            st.warned = true;
            log::warn!(
                "vPCI: malformed packet from the guest ({why}); later ones are only counted"
            );
        }
    }

    /// Serves one packet; its completion, if one is to be sent.
    fn serve(&self, packet: &Packet) -> Option<Outgoing> {
        let d = &packet.descriptor;
        let wants = d.flags.get() & VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED != 0;
        let answer = |payload: Vec<u8>| {
            wants.then_some(Outgoing {
                transaction_id: d.transaction_id.get(),
                payload,
            })
        };
        let p = &packet.payload;
        if d.packet_type.get() != VM_PKT_DATA_INBAND {
            self.malformed(Malformed::PacketType(d.packet_type.get()));
            return answer(status_payload(STATUS_NOT_SUPPORTED));
        }
        let Some(m) = read::<PciMessage>(p) else {
            self.malformed(Malformed::Short(MessageType(0), p.len()));
            return answer(status_payload(STATUS_INVALID_PARAMETER));
        };
        let t = m.message_type();
        let Some((completion, size)) = rule(t) else {
            self.malformed(Malformed::Unknown(t));
            return answer(status_payload(STATUS_NOT_SUPPORTED));
        };
        if p.len() < size {
            self.malformed(Malformed::Short(t, p.len()));
            return answer(status_payload(STATUS_INVALID_PARAMETER));
        }
        match (completion, wants) {
            (Completion::Required, false) => {
                self.malformed(Malformed::NoCompletion(t));
                return None;
            }
            (Completion::Forbidden, true) => {
                self.malformed(Malformed::UnexpectedCompletion(t));
                return answer(status_payload(STATUS_INVALID_PARAMETER));
            }
            _ => {}
        }
        let version = self.state().session.version;
        let (status, payload) = match (t, version) {
            (MessageType::QUERY_PROTOCOL_VERSION, _) => self.query_version(p),
            (_, None) => (
                STATUS_INVALID_DEVICE_STATE,
                status_payload(STATUS_INVALID_DEVICE_STATE),
            ),
            (MessageType::QUERY_BUS_RELATIONS, _) => {
                let mut st = self.state();
                st.session.listed = true;
                st.session.relations_wanted += 1;
                (STATUS_SUCCESS, Vec::new())
            }
            (MessageType::QUERY_RESOURCE_REQUIREMENTS, _) => self.resource_requirements(p),
            (MessageType::BUS_D0ENTRY, _) => self.d0_entry(p),
            (MessageType::BUS_D0EXIT, _) => {
                let was = {
                    let mut st = self.state();
                    st.session.selected = None;
                    st.session.window.take()
                };
                if was.is_some() {
                    self.inner.functions.set_config_window(None);
                }
                (STATUS_SUCCESS, status_payload(STATUS_SUCCESS))
            }
            (MessageType::RESOURCES_ASSIGNED | MessageType::RESOURCES_ASSIGNED2, _) => {
                let status = match read::<ChildMessage>(p) {
                    Some(c) if self.known(WinSlot::from_bits(c.wslot.get())) => STATUS_SUCCESS,
                    _ => STATUS_NO_SUCH_DEVICE,
                };
                (status, status_payload(status))
            }
            (MessageType::RESOURCES_RELEASED, _) => (STATUS_SUCCESS, Vec::new()),
            (MessageType::CREATE_INTERRUPT_MESSAGE2, Some(v)) if v != PCI_PROTOCOL_VERSION_1_4 => {
                self.create_interrupt(read::<CreateInterrupt2>(p).map(|c| CreateRequest {
                    slot: WinSlot::from_bits(c.wslot.get()),
                    vector: u32::from(c.int_desc.vector),
                    delivery_mode: c.int_desc.delivery_mode,
                    vector_count: c.int_desc.vector_count.get(),
                    processor_count: c.int_desc.processor_count.get(),
                    processors: c.int_desc.processor_array,
                }))
            }
            (MessageType::CREATE_INTERRUPT_MESSAGE3, Some(PCI_PROTOCOL_VERSION_1_4)) => self
                .create_interrupt(read::<CreateInterrupt3>(p).map(|c| CreateRequest {
                    slot: WinSlot::from_bits(c.wslot.get()),
                    vector: c.int_desc.vector.get(),
                    delivery_mode: c.int_desc.delivery_mode,
                    vector_count: c.int_desc.vector_count.get(),
                    processor_count: c.int_desc.processor_count.get(),
                    processors: c.int_desc.processor_array,
                })),
            (
                MessageType::CREATE_INTERRUPT_MESSAGE2 | MessageType::CREATE_INTERRUPT_MESSAGE3,
                _,
            ) => {
                let mut r = CreateIntResponse::new_zeroed();
                r.status = I32::new(ntstatus(STATUS_NOT_SUPPORTED));
                (STATUS_NOT_SUPPORTED, r.as_bytes().to_vec())
            }
            (MessageType::DELETE_INTERRUPT_MESSAGE, _) => {
                let deleted = read::<DeleteInterrupt>(p).is_some_and(|del| {
                    let slot = WinSlot::from_bits(del.wslot.get());
                    self.state().session.interrupts.delete(slot, &del.int_desc)
                });
                let status = if deleted {
                    STATUS_SUCCESS
                } else {
                    STATUS_INVALID_PARAMETER
                };
                (status, Vec::new())
            }
            (MessageType::EJECTION_COMPLETE, _) => self.ejection_complete(p),
            _ => (STATUS_NOT_SUPPORTED, status_payload(STATUS_NOT_SUPPORTED)),
        };
        if status != STATUS_SUCCESS {
            self.state().refused += 1;
        }
        answer(payload)
    }

    fn known(&self, slot: WinSlot) -> bool {
        self.inner
            .functions
            .functions()
            .iter()
            .any(|f| f.slot == slot)
    }

    fn query_version(&self, p: &[u8]) -> (u32, Vec<u8>) {
        let asked = read::<VersionRequest>(p).map(|v| v.protocol_version.get());
        let status = match asked {
            Some(v) if VERSIONS.contains(&v) => {
                self.state().session.version = Some(v);
                STATUS_SUCCESS
            }
            _ => STATUS_REVISION_MISMATCH,
        };
        (status, status_payload(status))
    }

    fn resource_requirements(&self, p: &[u8]) -> (u32, Vec<u8>) {
        let bars = read::<ChildMessage>(p).and_then(|c| {
            self.inner
                .functions
                .probed_bars(WinSlot::from_bits(c.wslot.get()))
        });
        let mut r = QResReqResponse::new_zeroed();
        let status = match bars {
            Some(bars) => {
                for (dst, src) in r.probed_bar.iter_mut().zip(bars) {
                    *dst = U32::new(src);
                }
                STATUS_SUCCESS
            }
            None => STATUS_NO_SUCH_DEVICE,
        };
        r.status = I32::new(ntstatus(status));
        (status, r.as_bytes().to_vec())
    }

    fn d0_entry(&self, p: &[u8]) -> (u32, Vec<u8>) {
        let base = read::<BusD0Entry>(p)
            .map(|d| d.mmio_base.get())
            .filter(|&b| {
                b % PAGE_SIZE == 0
                    && b.checked_add(PCI_CONFIG_MMIO_LENGTH)
                        .is_some_and(|end| end <= MAX_GPA)
            });
        let Some(base) = base else {
            return (
                STATUS_INVALID_PARAMETER,
                status_payload(STATUS_INVALID_PARAMETER),
            );
        };
        if !self.inner.functions.set_config_window(Some(base)) {
            return (
                STATUS_INVALID_PARAMETER,
                status_payload(STATUS_INVALID_PARAMETER),
            );
        }
        let mut st = self.state();
        st.session.window = Some(base);
        st.session.selected = None;
        (STATUS_SUCCESS, status_payload(STATUS_SUCCESS))
    }

    fn create_interrupt(&self, request: Option<CreateRequest>) -> (u32, Vec<u8>) {
        let result = match request {
            Some(req) if self.known(req.slot) => {
                self.state()
                    .session
                    .interrupts
                    .create(&req, self.inner.vcpus, self.inner.multi_msi)
            }
            Some(_) => Err(STATUS_NO_SUCH_DEVICE),
            None => Err(STATUS_INVALID_PARAMETER),
        };
        let mut r = CreateIntResponse::new_zeroed();
        let status = match result {
            Ok(desc) => {
                r.int_desc = desc;
                STATUS_SUCCESS
            }
            Err(s) => s,
        };
        r.status = I32::new(ntstatus(status));
        (status, r.as_bytes().to_vec())
    }

    fn ejection_complete(&self, p: &[u8]) -> (u32, Vec<u8>) {
        let Some(slot) = read::<EjectResponse>(p).map(|e| WinSlot::from_bits(e.wslot.get())) else {
            return (STATUS_INVALID_PARAMETER, Vec::new());
        };
        let ours = {
            let mut st = self.state();
            let s = &mut st.session;
            let ours = s.ejects_sent.remove(&slot.into_bits());
            if ours {
                s.interrupts.remove_slot(slot);
            }
            ours
        };
        if !ours {
            return (STATUS_INVALID_PARAMETER, Vec::new());
        }
        self.inner.functions.ejected(slot);
        (STATUS_SUCCESS, Vec::new())
    }

    /// Sends what waits: queued completions in order, then a due relations
    /// message, then EJECTs. A full ring keeps the rest for later.
    fn send_waiting(&self, channel: &mut dyn Channel) -> Result<(), ChannelFault> {
        let mut st = self.state();
        while let Some(m) = st.session.out.front() {
            match channel.send(VM_PKT_COMP, 0, m.transaction_id, &m.payload) {
                Ok(()) => {
                    st.session.out.pop_front();
                }
                Err(RingError::Full { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        // The list is read without the lock; a change meanwhile leaves
        // another message due (at most two per flush).
        for _ in 0..2 {
            let Some(wanted) = st.session.relations_due() else {
                break;
            };
            drop(st);
            let mut functions = self.inner.functions.functions();
            functions.truncate(MAX_FUNCTIONS);
            st = self.state();
            let mut payload = BusRelations2 {
                message_type: U32::new(MessageType::BUS_RELATIONS2.0),
                device_count: U32::new(u32::try_from(functions.len()).unwrap_or(0)),
            }
            .as_bytes()
            .to_vec();
            for f in &functions {
                payload.extend_from_slice(f.description().as_bytes());
            }
            match channel.send(VM_PKT_DATA_INBAND, 0, 0, &payload) {
                Ok(()) => {}
                Err(RingError::Full { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let s = &mut st.session;
            s.relations_sent = wanted;
            // Ejects of functions gone from the bus are over.
            let present = |slot: &u32| functions.iter().any(|f| f.slot.into_bits() == *slot);
            s.ejects_pending.retain(present);
            s.ejects_sent.retain(present);
        }
        while let Some(&slot) = st.session.ejects_pending.first() {
            let m = DevIncoming {
                message_type: U32::new(MessageType::EJECT.0),
                wslot: U32::new(slot),
            };
            match channel.send(VM_PKT_DATA_INBAND, 0, 0, m.as_bytes()) {
                Ok(()) => {
                    st.session.ejects_pending.remove(&slot);
                    st.session.ejects_sent.insert(slot);
                }
                Err(RingError::Full { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl<F: VpciFunctions> ChannelDevice for Vpci<F> {
    fn opened(&mut self) {
        self.reset();
    }

    fn run(&mut self, channel: &mut dyn Channel) -> Result<(), ChannelFault> {
        self.send_waiting(channel)?;
        for _ in 0..MAX_PACKETS_PER_RUN {
            if self.state().session.out.len() >= MAX_QUEUED {
                break;
            }
            let Some(packet) = channel.recv()? else {
                break;
            };
            if let Some(reply) = self.serve(&packet) {
                self.state().session.out.push_back(reply);
            }
            self.send_waiting(channel)?;
        }
        Ok(())
    }

    /// The EJECTs and relations due, and completions that waited for room.
    fn flush(&mut self, channel: &mut dyn Channel) -> Result<(), ChannelFault> {
        self.send_waiting(channel)
    }

    fn closed(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::vpci::{
        CreateInterrupt, FunctionDescription2, HvMsiDesc2, HvMsiDesc3, ReadBlock, PCI_MESSAGE_BASE,
        PCI_PROTOCOL_VERSION_1_1, STATUS_UNSUCCESSFUL,
    };
    use crate::abi::PacketDescriptor;
    use proptest::prelude::*;
    use std::mem::size_of;

    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Sent {
        packet_type: u16,
        flags: u16,
        tid: u64,
        payload: Vec<u8>,
    }

    /// A channel: packets in, packets out, and a switch that makes the ring
    /// full.
    #[derive(Default)]
    struct FakeChannel {
        incoming: VecDeque<Packet>,
        sent: Vec<Sent>,
        full: bool,
    }

    impl Channel for FakeChannel {
        fn recv(&mut self) -> Result<Option<Packet>, RingError> {
            Ok(self.incoming.pop_front())
        }

        fn send(
            &mut self,
            packet_type: u16,
            flags: u16,
            transaction_id: u64,
            payload: &[u8],
        ) -> Result<(), RingError> {
            if self.full {
                return Err(RingError::Full { need: 64, free: 8 });
            }
            self.sent.push(Sent {
                packet_type,
                flags,
                tid: transaction_id,
                payload: payload.to_vec(),
            });
            Ok(())
        }
    }

    /// A packet as the ring layer reads it: payload padded to 8 bytes.
    fn packet(packet_type: u16, flags: u16, tid: u64, payload: &[u8]) -> Packet {
        let mut payload = payload.to_vec();
        payload.resize(payload.len().next_multiple_of(8), 0);
        let len8 = u16::try_from(2 + payload.len() / 8).unwrap();
        Packet {
            descriptor: PacketDescriptor {
                packet_type: packet_type.into(),
                offset8: 2.into(),
                len8: len8.into(),
                flags: flags.into(),
                transaction_id: tid.into(),
            },
            payload,
        }
    }

    const SLOT: WinSlot = WinSlot::of(1, 0);
    const BARS: [u32; 6] = [0xFFFF_C004, 0xFFFF_FFFF, 0xFFFF_F000, 0, 0, 0];
    const BASE: u64 = 0xF_E000_0000;
    const REQ: u16 = VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED;

    fn dma_test() -> Function {
        Function {
            slot: SLOT,
            vendor_id: 0x1234,
            device_id: 0x0D7A,
            revision: 1,
            prog_if: 0,
            subclass: 0x80,
            class: 0xFF,
            subsystem_id: 0x5678_1AF4,
            serial: 7,
        }
    }

    /// The VMM's side: one dma-test-like function at [`SLOT`].
    struct FakeFns {
        /// The VMM refuses to map windows.
        refuse_windows: std::sync::atomic::AtomicBool,
        functions: Mutex<Vec<Function>>,
        config: Mutex<Vec<u8>>,
        windows: Mutex<Vec<Option<u64>>>,
        ejected: Mutex<Vec<WinSlot>>,
        writes: Mutex<Vec<(WinSlot, u16, Vec<u8>)>>,
    }

    impl FakeFns {
        fn new() -> Self {
            let mut config = vec![0u8; 4096];
            config[..4].copy_from_slice(&0x0D7A_1234u32.to_le_bytes());
            config[0x10..0x14].copy_from_slice(&0xC000_0004u32.to_le_bytes());
            config[0x14..0x18].copy_from_slice(&0x1u32.to_le_bytes());
            config[0x18..0x1C].copy_from_slice(&0xD000_0000u32.to_le_bytes());
            Self {
                refuse_windows: std::sync::atomic::AtomicBool::new(false),
                functions: Mutex::new(vec![dma_test()]),
                config: Mutex::new(config),
                windows: Mutex::new(Vec::new()),
                ejected: Mutex::new(Vec::new()),
                writes: Mutex::new(Vec::new()),
            }
        }
    }

    impl VpciFunctions for FakeFns {
        fn functions(&self) -> Vec<Function> {
            self.functions.lock().unwrap().clone()
        }

        fn probed_bars(&self, slot: WinSlot) -> Option<[u32; 6]> {
            self.functions
                .lock()
                .unwrap()
                .iter()
                .any(|f| f.slot == slot)
                .then_some(BARS)
        }

        fn config_read(&self, slot: WinSlot, offset: u16, data: &mut [u8]) {
            let o = usize::from(offset);
            if slot == SLOT {
                data.copy_from_slice(&self.config.lock().unwrap()[o..o + data.len()]);
            } else {
                data.fill(0xFF);
            }
        }

        fn config_write(&self, slot: WinSlot, offset: u16, data: &[u8]) {
            self.writes
                .lock()
                .unwrap()
                .push((slot, offset, data.to_vec()));
        }

        fn set_config_window(&self, base: Option<u64>) -> bool {
            if base.is_some()
                && self
                    .refuse_windows
                    .load(std::sync::atomic::Ordering::Relaxed)
            {
                return false;
            }
            self.windows.lock().unwrap().push(base);
            true
        }

        fn ejected(&self, slot: WinSlot) {
            self.ejected.lock().unwrap().push(slot);
        }
    }

    struct Bus {
        vpci: Vpci<FakeFns>,
        fns: Arc<FakeFns>,
        ch: FakeChannel,
    }

    impl Bus {
        fn new(vcpus: u32) -> Self {
            let fns = Arc::new(FakeFns::new());
            let mut vpci = Vpci::with_multi_msi(Arc::clone(&fns), vcpus);
            vpci.opened();
            Self {
                vpci,
                fns,
                ch: FakeChannel::default(),
            }
        }

        fn run(&mut self) -> Vec<Sent> {
            self.vpci.run(&mut self.ch).unwrap();
            std::mem::take(&mut self.ch.sent)
        }

        fn send(&mut self, flags: u16, tid: u64, payload: &[u8]) -> Vec<Sent> {
            self.ch
                .incoming
                .push_back(packet(VM_PKT_DATA_INBAND, flags, tid, payload));
            self.run()
        }

        /// A request with a completion: the one completion.
        fn ask(&mut self, tid: u64, payload: &[u8]) -> Sent {
            let sent = self.send(REQ, tid, payload);
            assert_eq!(sent.len(), 1, "{sent:?}");
            let s = sent.into_iter().next().unwrap();
            assert_eq!((s.packet_type, s.flags, s.tid), (VM_PKT_COMP, 0, tid));
            s
        }

        fn ask_status(&mut self, tid: u64, payload: &[u8]) -> i32 {
            status(&self.ask(tid, payload))
        }

        /// A message without a completion: nothing comes back.
        fn tell(&mut self, payload: &[u8]) -> Vec<Sent> {
            self.send(0, 0, payload)
        }

        /// Linux's probe up to RESOURCES_ASSIGNED2, checked.
        fn probe(&mut self) {
            assert_eq!(self.ask_status(1, &version(PCI_PROTOCOL_VERSION_1_4)), 0);
            let sent = self.tell(msg(MessageType::QUERY_BUS_RELATIONS));
            assert_eq!(sent.len(), 1);
            let q = self.ask(2, &child(MessageType::QUERY_RESOURCE_REQUIREMENTS, SLOT));
            assert_eq!(q.payload.len(), size_of::<QResReqResponse>());
            assert_eq!(self.ask_status(3, &d0(BASE)), 0);
            assert_eq!(self.ask_status(4, &assigned2(SLOT)), 0);
        }

        fn create3(&mut self, vector: u32, count: u16, vps: &[u16]) -> CreateIntResponse {
            let s = self.ask(9, &create3(SLOT, vector, count, vps));
            assert_eq!(s.payload.len(), size_of::<CreateIntResponse>());
            CreateIntResponse::read_from_bytes(&s.payload).unwrap()
        }
    }

    fn status(s: &Sent) -> i32 {
        Response::read_from_prefix(&s.payload)
            .unwrap()
            .0
            .status
            .get()
    }

    fn msg(t: MessageType) -> &'static [u8] {
        Box::leak(Box::new(PciMessage::new(t))).as_bytes()
    }

    fn version(v: u32) -> Vec<u8> {
        VersionRequest {
            message_type: U32::new(MessageType::QUERY_PROTOCOL_VERSION.0),
            protocol_version: U32::new(v),
        }
        .as_bytes()
        .to_vec()
    }

    fn child(t: MessageType, slot: WinSlot) -> Vec<u8> {
        ChildMessage {
            message_type: U32::new(t.0),
            wslot: U32::new(slot.into_bits()),
        }
        .as_bytes()
        .to_vec()
    }

    fn d0(base: u64) -> Vec<u8> {
        BusD0Entry {
            message_type: U32::new(MessageType::BUS_D0ENTRY.0),
            reserved: U32::new(0),
            mmio_base: U64::new(base),
        }
        .as_bytes()
        .to_vec()
    }

    fn assigned2(slot: WinSlot) -> Vec<u8> {
        let mut m = ResourcesAssigned2::new_zeroed();
        m.message_type = U32::new(MessageType::RESOURCES_ASSIGNED2.0);
        m.wslot = U32::new(slot.into_bits());
        m.as_bytes().to_vec()
    }

    fn processors(vps: &[u16]) -> [U16; HV_MSI_MAX_PROCESSORS] {
        let mut a = [U16::new(0); HV_MSI_MAX_PROCESSORS];
        for (d, &s) in a.iter_mut().zip(vps) {
            *d = U16::new(s);
        }
        a
    }

    fn create3(slot: WinSlot, vector: u32, count: u16, vps: &[u16]) -> Vec<u8> {
        CreateInterrupt3 {
            message_type: U32::new(MessageType::CREATE_INTERRUPT_MESSAGE3.0),
            wslot: U32::new(slot.into_bits()),
            int_desc: HvMsiDesc3 {
                vector: U32::new(vector),
                delivery_mode: APIC_DELIVERY_MODE_FIXED,
                reserved: 0,
                vector_count: U16::new(count),
                processor_count: U16::new(u16::try_from(vps.len()).unwrap()),
                processor_array: processors(vps),
            },
        }
        .as_bytes()
        .to_vec()
    }

    fn create2(slot: WinSlot, vector: u8, vps: &[u16]) -> Vec<u8> {
        CreateInterrupt2 {
            message_type: U32::new(MessageType::CREATE_INTERRUPT_MESSAGE2.0),
            wslot: U32::new(slot.into_bits()),
            int_desc: HvMsiDesc2 {
                vector,
                delivery_mode: APIC_DELIVERY_MODE_FIXED,
                vector_count: U16::new(1),
                processor_count: U16::new(u16::try_from(vps.len()).unwrap()),
                processor_array: processors(vps),
            },
        }
        .as_bytes()
        .to_vec()
    }

    fn delete(slot: WinSlot, d: TranIntDesc) -> Vec<u8> {
        DeleteInterrupt {
            message_type: U32::new(MessageType::DELETE_INTERRUPT_MESSAGE.0),
            wslot: U32::new(slot.into_bits()),
            int_desc: d,
        }
        .as_bytes()
        .to_vec()
    }

    fn ejection_complete(slot: WinSlot) -> Vec<u8> {
        EjectResponse {
            message_type: U32::new(MessageType::EJECTION_COMPLETE.0),
            wslot: U32::new(slot.into_bits()),
            status: U32::new(0),
        }
        .as_bytes()
        .to_vec()
    }

    fn relations(s: &Sent) -> Vec<FunctionDescription2> {
        assert_eq!((s.packet_type, s.flags, s.tid), (VM_PKT_DATA_INBAND, 0, 0));
        let (h, rest) = BusRelations2::read_from_prefix(&s.payload).unwrap();
        assert_eq!(h.message_type.get(), MessageType::BUS_RELATIONS2.0);
        let n = usize::try_from(h.device_count.get()).unwrap();
        assert_eq!(rest.len(), n * size_of::<FunctionDescription2>());
        rest.chunks(size_of::<FunctionDescription2>())
            .map(|c| FunctionDescription2::read_from_bytes(c).unwrap())
            .collect()
    }

    fn read_window(v: &Vpci<FakeFns>, offset: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        v.window_read(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn linux_probe_sequence_and_teardown() {
        let mut bus = Bus::new(4);
        // hv_pci_protocol_negotiation: 1.4 first, accepted.
        let s = bus.ask(1, &version(PCI_PROTOCOL_VERSION_1_4));
        assert_eq!(s.payload, [0, 0, 0, 0]);
        assert_eq!(bus.vpci.version(), Some(PCI_PROTOCOL_VERSION_1_4));

        // hv_pci_query_relations: no completion, one BUS_RELATIONS2.
        let sent = bus.tell(msg(MessageType::QUERY_BUS_RELATIONS));
        assert_eq!(sent.len(), 1);
        let f = relations(&sent[0]);
        assert_eq!(f.len(), 1);
        let f = f[0];
        assert_eq!((f.v_id.get(), f.d_id.get()), (0x1234, 0x0D7A));
        assert_eq!(
            (f.rev, f.prog_intf, f.subclass, f.base_class),
            (1, 0, 0x80, 0xFF)
        );
        assert_eq!(f.subsystem_id.get(), 0x5678_1AF4);
        assert_eq!(f.win_slot.get(), SLOT.into_bits());
        assert_eq!(f.ser.get(), 7);
        assert_eq!((f.flags.get(), f.virtual_numa_node.get()), (0, 0));

        // new_pcichild_device: the probed BARs.
        let s = bus.ask(2, &child(MessageType::QUERY_RESOURCE_REQUIREMENTS, SLOT));
        let q = QResReqResponse::read_from_bytes(&s.payload).unwrap();
        assert_eq!(q.status.get(), 0);
        assert_eq!(q.probed_bar.map(|b| b.get()), BARS);

        // hv_pci_enter_d0: the window is mapped.
        assert_eq!(bus.ask_status(3, &d0(BASE)), 0);
        assert_eq!(*bus.fns.windows.lock().unwrap(), [Some(BASE)]);
        assert_eq!(bus.vpci.config_window(), Some(BASE));

        // hv_send_resources_allocated.
        assert_eq!(bus.ask_status(4, &assigned2(SLOT)), 0);

        // _hv_pcifront_read_config: select, then read.
        let v = &bus.vpci;
        v.window_write(0, &SLOT.into_bits().to_le_bytes());
        assert_eq!(read_window(v, 0, 4), SLOT.into_bits());
        assert_eq!(read_window(v, 0x1000, 2), 0x1234);
        assert_eq!(read_window(v, 0x1002, 2), 0x0D7A);
        assert_eq!(read_window(v, 0x1010, 4), 0xC000_0004);
        assert_eq!(read_window(v, 0x1018, 1), 0);
        assert_eq!(read_window(v, 0x101B, 1), 0xD0);
        v.window_write(0x1004, &[6, 0]);
        assert_eq!(*bus.fns.writes.lock().unwrap(), [(SLOT, 4, vec![6, 0])]);

        // hv_compose_msi_msg (MSI-X vector 0x41 on CPU 2), then unmask.
        let r = bus.create3(0x41, 1, &[2]);
        assert_eq!((r.status.get(), r.reserved.get()), (0, 0));
        assert_eq!(r.int_desc.vector_count.get(), 1);
        assert_eq!(r.int_desc.data.get(), 0x41);
        assert_eq!(r.int_desc.address.get(), 0xFEE0_2000);
        assert_eq!(bus.vpci.interrupts(), 1);
        let (a, d) = (r.int_desc.address.get(), r.int_desc.data.get());
        bus.vpci.retarget(0, a, d, 0x41, &[2]).unwrap();
        assert_eq!(bus.vpci.translate(a, d), (a, d));
        // An affinity change moves it.
        bus.vpci.retarget(0, a, d, 0x52, &[3, 1]).unwrap();
        assert_eq!(bus.vpci.translate(a, d), (0xFEE0_3000, 0x52));
        assert_eq!(bus.vpci.translate(a, d + 1), (a, d + 1));
        // And back.
        bus.vpci.retarget(0, a, d, 0x41, &[2]).unwrap();
        assert_eq!(bus.vpci.translate(a, d), (a, d));
        bus.vpci.retarget(0, a, d, 0x60, &[0]).unwrap();

        // hv_int_desc_free: no completion.
        assert!(bus.tell(&delete(SLOT, r.int_desc)).is_empty());
        assert_eq!(bus.vpci.interrupts(), 0);
        assert_eq!(bus.vpci.translate(a, d), (a, d));
        assert_eq!(
            bus.vpci.retarget(0, a, d, 0x41, &[2]),
            Err(VpciError::UnknownInterrupt {
                function: 0,
                address: a,
                data: d
            })
        );

        // Hot removal: EJECT, then the guest's EJECTION_COMPLETE.
        bus.vpci.eject(SLOT).unwrap();
        let sent = bus.run();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].packet_type, sent[0].flags, sent[0].tid),
            (VM_PKT_DATA_INBAND, 0, 0)
        );
        let e = DevIncoming::read_from_bytes(&sent[0].payload).unwrap();
        assert_eq!(e.message_type.get(), MessageType::EJECT.0);
        assert_eq!(e.wslot.get(), SLOT.into_bits());
        assert!(bus.tell(&ejection_complete(SLOT)).is_empty());
        assert_eq!(*bus.fns.ejected.lock().unwrap(), [SLOT]);

        // hv_pci_bus_exit: RESOURCES_RELEASED, then D0 exit.
        assert!(bus
            .tell(&child(MessageType::RESOURCES_RELEASED, SLOT))
            .is_empty());
        assert_eq!(bus.ask_status(5, msg(MessageType::BUS_D0EXIT)), 0);
        assert_eq!(*bus.fns.windows.lock().unwrap(), [Some(BASE), None]);
        assert_eq!(read_window(&bus.vpci, 0x1000, 2), 0xFFFF);
        let st = bus.vpci.stats();
        assert_eq!((st.malformed, st.refused, st.queued), (0, 0, 0));
    }

    #[test]
    fn versions_walk_down_to_one_served() {
        let mut bus = Bus::new(1);
        let mismatch = ntstatus(STATUS_REVISION_MISMATCH);
        for v in [0x1_0005, 0x2_0000, PCI_PROTOCOL_VERSION_1_1, 0] {
            assert_eq!(bus.ask_status(1, &version(v)), mismatch);
        }
        assert_eq!(bus.vpci.version(), None);
        assert_eq!(bus.ask_status(2, &version(PCI_PROTOCOL_VERSION_1_2)), 0);
        assert_eq!(bus.ask_status(2, &version(PCI_PROTOCOL_VERSION_1_3)), 0);
        assert_eq!(bus.vpci.version(), Some(PCI_PROTOCOL_VERSION_1_3));
        bus.tell(msg(MessageType::QUERY_BUS_RELATIONS));
        // 1.3 creates with CREATE_INTERRUPT_MESSAGE2, not 3 (nor 1.1's).
        let s = bus.ask(3, &create3(SLOT, 0x41, 1, &[0]));
        let r = CreateIntResponse::read_from_bytes(&s.payload).unwrap();
        assert_eq!(r.status.get(), ntstatus(STATUS_NOT_SUPPORTED));
        let mut v1 = CreateInterrupt::new_zeroed();
        v1.message_type = U32::new(MessageType::CREATE_INTERRUPT_MESSAGE.0);
        assert!(bus.ask_status(3, v1.as_bytes()) < 0);
        let s = bus.ask(4, &create2(SLOT, 0x42, &[0]));
        let r = CreateIntResponse::read_from_bytes(&s.payload).unwrap();
        assert_eq!(r.status.get(), 0);
        assert_eq!(
            (r.int_desc.address.get(), r.int_desc.data.get()),
            (0xFEE0_0000, 0x42)
        );
        // And 1.4 takes 3, not 2.
        assert_eq!(bus.ask_status(5, &version(PCI_PROTOCOL_VERSION_1_4)), 0);
        let s = bus.ask(6, &create2(SLOT, 0x43, &[0]));
        assert!(status(&s) < 0);
        assert_eq!(bus.vpci.stats().refused, 7);
        assert_eq!(bus.vpci.stats().malformed, 0);
    }

    #[test]
    fn requests_before_a_version_are_refused() {
        let mut bus = Bus::new(1);
        let bad = ntstatus(STATUS_INVALID_DEVICE_STATE);
        assert_eq!(bus.ask_status(1, &d0(BASE)), bad);
        assert_eq!(
            bus.ask_status(2, &child(MessageType::QUERY_RESOURCE_REQUIREMENTS, SLOT)),
            bad
        );
        assert_eq!(bus.ask_status(3, &create3(SLOT, 0x41, 1, &[0])), bad);
        assert!(bus.tell(msg(MessageType::QUERY_BUS_RELATIONS)).is_empty());
        assert!(bus.fns.windows.lock().unwrap().is_empty());
        assert_eq!(bus.vpci.eject(SLOT), Err(VpciError::NotListed));
        assert_eq!(bus.vpci.stats().refused, 4);
    }

    #[test]
    fn multi_msi_blocks_get_messages_of_their_own() {
        let mut bus = Bus::new(2);
        bus.probe();
        // A single vector in the dummy block's range, on the same VP.
        let single = bus.create3(0x21, 1, &[1]);
        assert_eq!(single.int_desc.data.get(), 0x21);
        // Linux's multi-MSI: vector 32 (a dummy), 4 vectors, a dummy VP.
        let a = bus.create3(32, 4, &[1]);
        assert_eq!(a.status.get(), 0);
        assert_eq!(a.int_desc.vector_count.get(), 4);
        assert_eq!(a.int_desc.address.get(), 0xFEE0_1000);
        let da = a.int_desc.data.get();
        assert_eq!(da & 0xFF, 32);
        assert_ne!(da >> 11 & 7, 0);
        // A second block on the same VP takes another tag.
        let b = bus.create3(32, 2, &[1]);
        let db = b.int_desc.data.get();
        assert_eq!(b.int_desc.address.get(), 0xFEE0_1000);
        assert_eq!(db & 0xFF, 32);
        assert_ne!(db, da);
        // hv_irq_unmask per vector: the device writes data + i.
        let addr = a.int_desc.address.get();
        for i in 0..4 {
            bus.vpci.retarget(0, addr, da + i, 0x80 + i, &[0]).unwrap();
        }
        for i in 0..4 {
            assert_eq!(bus.vpci.translate(addr, da + i), (0xFEE0_0000, 0x80 + i));
        }
        assert_eq!(bus.vpci.translate(addr, da + 4), (addr, da + 4));
        assert!(bus.vpci.retarget(0, addr, db + 2, 0x90, &[0]).is_err());
        assert_eq!(bus.vpci.translate(addr, 0x21), (addr, 0x21));
        assert_eq!(bus.vpci.stats().vectors, 7);
        // Seven tags per VP and two VPs: fourteen blocks, then none.
        for _ in 0..12 {
            assert_eq!(bus.create3(32, 2, &[0]).status.get(), 0);
        }
        assert_eq!(
            bus.create3(32, 2, &[0]).status.get(),
            ntstatus(STATUS_INSUFFICIENT_RESOURCES)
        );
        // Deleting block a frees its tag and its retargets.
        assert!(bus.tell(&delete(SLOT, a.int_desc)).is_empty());
        assert_eq!(bus.vpci.translate(addr, da), (addr, da));
        let c = bus.create3(32, 4, &[1]);
        assert_eq!(
            (c.int_desc.address.get(), c.int_desc.data.get()),
            (addr, da)
        );
    }

    /// A bus made with `new` (the VMM does not translate) refuses
    /// multi-MSI blocks; a window the VMM cannot map fails D0 entry.
    #[test]
    fn without_translation_blocks_are_refused_and_d0_needs_a_window() {
        let fns = Arc::new(FakeFns::new());
        let mut bus = Bus {
            vpci: Vpci::new(Arc::clone(&fns), 2),
            fns,
            ch: FakeChannel::default(),
        };
        bus.vpci.opened();
        bus.probe();
        assert_eq!(
            bus.create3(32, 4, &[1]).status.get(),
            ntstatus(STATUS_NOT_SUPPORTED)
        );
        assert_eq!(bus.create3(0x41, 1, &[1]).status.get(), 0);
        bus.fns
            .refuse_windows
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            bus.ask_status(5, &d0(BASE + 0x10_0000)),
            ntstatus(STATUS_INVALID_PARAMETER)
        );
        assert_eq!(bus.vpci.config_window(), Some(BASE));
    }

    #[test]
    fn bad_interrupt_requests_are_refused() {
        let mut bus = Bus::new(4);
        bus.probe();
        let inval = ntstatus(STATUS_INVALID_PARAMETER);
        let cases: [(u32, u16, &[u16]); 11] = [
            (0, 0, &[0]),    // no vector at 0 (no underflow either)
            (300, 1, &[0]),  // past 255
            (0x0F, 1, &[0]), // an exception vector
            (0xFF, 2, &[0]), // the block passes 255
            (0x41, 0, &[0]), // no vector
            (32, 33, &[0]),  // more than 32
            (33, 2, &[0]),   // an unaligned block
            (0x41, 1, &[]),  // no VP
            (0x41, 1, &[4]), // a VP the VM lacks
            (0x41, 1, &[0, 9]),
            (u32::MAX, 2, &[0]),
        ];
        for (vector, count, vps) in cases {
            let s = bus.ask(7, &create3(SLOT, vector, count, vps));
            assert_eq!(status(&s), inval, "{vector} {count} {vps:?}");
            assert_eq!(s.payload.len(), size_of::<CreateIntResponse>());
        }
        let mut m = CreateInterrupt3::read_from_bytes(&create3(SLOT, 0x41, 1, &[0])).unwrap();
        m.int_desc.processor_count = U16::new(33);
        assert_eq!(bus.ask_status(8, m.as_bytes()), inval);
        m.int_desc.processor_count = U16::new(1);
        m.int_desc.delivery_mode = 4; // NMI
        assert_eq!(bus.ask_status(8, m.as_bytes()), inval);
        let other = WinSlot::of(2, 0);
        assert_eq!(
            bus.ask_status(9, &create3(other, 0x41, 1, &[0])),
            ntstatus(STATUS_NO_SUCH_DEVICE)
        );
        assert_eq!(bus.vpci.interrupts(), 0);
        assert_eq!(bus.vpci.stats().refused, 14);
        // A VP past the xAPIC's 254 is refused whatever the VM's size.
        let mut big = Bus::new(300);
        big.probe();
        assert_eq!(big.ask_status(1, &create3(SLOT, 0x41, 1, &[255])), inval);
        assert_eq!(
            big.create3(0x41, 1, &[254]).int_desc.address.get(),
            0xFEE_FE000
        );
    }

    #[test]
    fn the_interrupt_table_is_bounded() {
        let mut bus = Bus::new(1);
        bus.probe();
        for i in 0..MAX_VECTORS {
            let vector = 0x20 + u32::try_from(i % 0xE0).unwrap();
            assert_eq!(bus.create3(vector, 1, &[0]).status.get(), 0);
        }
        assert_eq!(
            bus.create3(0x30, 1, &[0]).status.get(),
            ntstatus(STATUS_INSUFFICIENT_RESOURCES)
        );
        assert_eq!(bus.vpci.stats().vectors, MAX_VECTORS);
    }

    #[test]
    fn retarget_checks_its_input() {
        let mut bus = Bus::new(2);
        bus.probe();
        let r = bus.create3(0x41, 1, &[1]);
        let (a, d) = (r.int_desc.address.get(), r.int_desc.data.get());
        let v = &bus.vpci;
        assert_eq!(
            v.retarget(0, a, d, 0x100, &[0]),
            Err(VpciError::BadVector(0x100))
        );
        assert_eq!(v.retarget(0, a, d, 5, &[0]), Err(VpciError::BadVector(5)));
        assert_eq!(v.retarget(0, a, d, 0x41, &[]), Err(VpciError::NoProcessor));
        assert_eq!(
            v.retarget(0, a, d, 0x41, &[2]),
            Err(VpciError::BadProcessor { vp: 2, vcpus: 2 })
        );
        for (f, aa, dd) in [(1, a, d), (0, a + 0x1000, d), (0, a, d + 1)] {
            assert!(matches!(
                v.retarget(f, aa, dd, 0x41, &[0]),
                Err(VpciError::UnknownInterrupt { .. })
            ));
        }
        // Linux passes the address's low half.
        v.retarget(0, a | 0xABCD << 32, d, 0x44, &[0]).unwrap();
        assert_eq!(v.translate(a, d), (0xFEE0_0000, 0x44));
        assert_eq!(
            VpciError::BadVector(0x100).to_string(),
            "Vector 0x100 outside 0x10..=0xff"
        );
    }

    #[test]
    fn malformed_packets_are_answered_or_dropped_and_counted() {
        let mut bus = Bus::new(1);
        bus.probe();
        let before = bus.vpci.stats().malformed;
        let mut expected = before;
        // Every type, cut short at every length, with a completion asked.
        for n in 0..0x1Cu32 {
            let t = MessageType(PCI_MESSAGE_BASE + n);
            let full = 256;
            let Some((_, size)) = rule(t) else {
                continue;
            };
            let mut m = vec![0u8; full];
            m[..4].copy_from_slice(&t.0.to_le_bytes());
            for len in 0..size {
                let p = &m[..len];
                // The ring pads to 8 bytes: those lengths are whole.
                let padded = len.next_multiple_of(8);
                if padded >= size && len >= 4 {
                    continue;
                }
                let s = bus.ask(11, p);
                assert!(status(&s) < 0, "{t} {len}");
                expected += 1;
            }
        }
        assert_eq!(bus.vpci.stats().malformed, expected);
        // Unknown and host-only types; a completion asked or not.
        for t in [
            MessageType::BUS_RELATIONS,
            MessageType::BUS_RELATIONS2,
            MessageType::EJECT,
            MessageType::INVALIDATE_BLOCK,
            MessageType::QUERY_STOP,
            MessageType(0),
            MessageType(0xFFFF_FFFF),
        ] {
            assert_eq!(
                bus.ask_status(12, &[msg(t), &[0; 60]].concat()),
                ntstatus(STATUS_NOT_SUPPORTED)
            );
            assert!(bus.tell(&[msg(t), &[0; 60]].concat()).is_empty());
            expected += 2;
        }
        // Not inband data.
        for ty in [VM_PKT_COMP, 7, 9, 0] {
            bus.ch
                .incoming
                .push_back(packet(ty, REQ, 13, &version(PCI_PROTOCOL_VERSION_1_4)));
            let sent = bus.run();
            assert_eq!(sent.len(), 1);
            assert!(status(&sent[0]) < 0);
            expected += 1;
        }
        // A completion against the rules: none for requests that need
        // one, one for messages that take none (and no action).
        assert!(bus
            .send(0, 14, &version(PCI_PROTOCOL_VERSION_1_2))
            .is_empty());
        assert!(bus.send(0, 14, &d0(BASE + 0x2000)).is_empty());
        assert_eq!(bus.vpci.version(), Some(PCI_PROTOCOL_VERSION_1_4));
        assert_eq!(bus.vpci.config_window(), Some(BASE));
        assert!(bus.ask_status(15, msg(MessageType::QUERY_BUS_RELATIONS)) < 0);
        assert!(bus.ask_status(15, &child(MessageType::RESOURCES_RELEASED, SLOT)) < 0);
        expected += 4;
        assert_eq!(bus.vpci.stats().malformed, expected);
        // Known but not served: refused, not malformed.
        let mut rb = ReadBlock::new_zeroed();
        rb.message_type = U32::new(MessageType::READ_BLOCK.0);
        assert_eq!(
            bus.ask_status(16, rb.as_bytes()),
            ntstatus(STATUS_NOT_SUPPORTED)
        );
        assert!(bus.ask_status(16, msg(MessageType::POWER_STATE_CHANGE)) < 0);
        assert_eq!(bus.vpci.stats().malformed, expected);
        assert_eq!(bus.vpci.stats().queued, 0);
    }

    #[test]
    fn bad_slots_bases_and_deletes_are_refused() {
        let mut bus = Bus::new(1);
        bus.probe();
        let other = WinSlot::of(3, 1);
        let s = bus.ask(1, &child(MessageType::QUERY_RESOURCE_REQUIREMENTS, other));
        assert_eq!(s.payload.len(), size_of::<QResReqResponse>());
        let q = QResReqResponse::read_from_bytes(&s.payload).unwrap();
        assert!(q.status.get() < 0);
        assert_eq!(q.probed_bar.map(|b| b.get()), [0; 6]);
        assert!(bus.ask_status(2, &assigned2(other)) < 0);
        let mut a1 = ResourcesAssigned::new_zeroed();
        a1.message_type = U32::new(MessageType::RESOURCES_ASSIGNED.0);
        a1.wslot = U32::new(SLOT.into_bits());
        assert_eq!(bus.ask_status(2, a1.as_bytes()), 0);
        for base in [BASE + 8, !0xFFF, (1 << 52) - 0x1000] {
            assert_eq!(
                bus.ask_status(3, &d0(base)),
                ntstatus(STATUS_INVALID_PARAMETER)
            );
        }
        assert_eq!(*bus.fns.windows.lock().unwrap(), [Some(BASE)]);
        // A D0 entry while in D0 (Linux's kdump retry) moves the window.
        assert_eq!(bus.ask_status(3, &d0(BASE + 0x4000)), 0);
        assert_eq!(bus.vpci.config_window(), Some(BASE + 0x4000));
        let r = bus.create3(0x41, 1, &[0]);
        let mut d = r.int_desc;
        d.data = U32::new(0x42);
        assert!(bus.tell(&delete(SLOT, d)).is_empty());
        assert!(bus.tell(&delete(other, r.int_desc)).is_empty());
        assert_eq!(bus.vpci.interrupts(), 1);
        assert_eq!(bus.vpci.stats().refused, 2 + 3 + 2);
        assert_eq!(bus.vpci.stats().malformed, 0);
        assert_eq!(STATUS_UNSUCCESSFUL, 0xC000_0001);
    }

    #[test]
    fn a_full_ring_queues_answers_and_stops_reading_at_the_bound() {
        let mut bus = Bus::new(1);
        bus.ch.full = true;
        assert!(bus
            .send(REQ, 1, &version(PCI_PROTOCOL_VERSION_1_4))
            .is_empty());
        assert_eq!(bus.vpci.stats().queued, 1);
        bus.ch.full = false;
        let sent = bus.run();
        assert_eq!(sent.len(), 1);
        assert_eq!((sent[0].tid, status(&sent[0])), (1, 0));

        // More requests than the queue holds while the ring is full.
        bus.ch.full = true;
        for tid in 0..MAX_QUEUED as u64 + 4 {
            bus.ch
                .incoming
                .push_back(packet(VM_PKT_DATA_INBAND, REQ, 100 + tid, &assigned2(SLOT)));
        }
        bus.ch.incoming.push_back(packet(
            VM_PKT_DATA_INBAND,
            0,
            0,
            msg(MessageType::QUERY_BUS_RELATIONS),
        ));
        assert!(bus.run().is_empty());
        assert_eq!(bus.vpci.stats().queued, MAX_QUEUED);
        assert_eq!(bus.ch.incoming.len(), 5);
        assert!(bus.run().is_empty());
        bus.ch.full = false;
        let sent = bus.run();
        assert_eq!(sent.len(), MAX_QUEUED + 4 + 1);
        for (tid, s) in (100..).zip(&sent[..MAX_QUEUED + 4]) {
            assert_eq!((s.packet_type, s.tid, status(s)), (VM_PKT_COMP, tid, 0));
        }
        assert_eq!(relations(&sent[MAX_QUEUED + 4]).len(), 1);
        assert_eq!(bus.vpci.stats().queued, 0);

        // Host messages wait too: relations, then EJECT.
        bus.ch.full = true;
        bus.vpci.relations_changed();
        bus.vpci.eject(SLOT).unwrap();
        bus.vpci.eject(SLOT).unwrap();
        assert!(bus.run().is_empty());
        bus.ch.full = false;
        let sent = bus.run();
        assert_eq!(sent.len(), 2);
        assert_eq!(relations(&sent[0]).len(), 1);
        let e = DevIncoming::read_from_bytes(&sent[1].payload).unwrap();
        assert_eq!(e.message_type.get(), MessageType::EJECT.0);
        assert!(bus.run().is_empty());
    }

    #[test]
    fn a_run_reads_a_bounded_number_of_packets() {
        let mut bus = Bus::new(1);
        bus.probe();
        for _ in 0..MAX_PACKETS_PER_RUN + 10 {
            bus.ch.incoming.push_back(packet(
                VM_PKT_DATA_INBAND,
                0,
                0,
                &child(MessageType::RESOURCES_RELEASED, SLOT),
            ));
        }
        assert!(bus.run().is_empty());
        assert_eq!(bus.ch.incoming.len(), 10);
        bus.run();
        assert!(bus.ch.incoming.is_empty());
    }

    #[test]
    fn ejects_follow_the_host_and_only_the_host() {
        let mut bus = Bus::new(1);
        assert_eq!(bus.vpci.eject(SLOT), Err(VpciError::NotListed));
        bus.probe();
        assert_eq!(
            bus.vpci.eject(WinSlot::of(2, 0)),
            Err(VpciError::UnknownFunction(2))
        );
        assert_eq!(
            bus.vpci.eject(WinSlot::from_bits(0x101)),
            Err(VpciError::UnknownFunction(0x101))
        );
        // The guest cannot eject by itself.
        assert!(bus.tell(&ejection_complete(SLOT)).is_empty());
        assert!(bus.fns.ejected.lock().unwrap().is_empty());
        // One EJECT per eject under way.
        bus.vpci.eject(SLOT).unwrap();
        assert_eq!(bus.run().len(), 1);
        bus.vpci.eject(SLOT).unwrap();
        assert!(bus.run().is_empty());
        // The VMM gave up and removed the function: the eject is over.
        bus.fns.functions.lock().unwrap().clear();
        bus.vpci.relations_changed();
        let sent = bus.run();
        assert!(relations(&sent[0]).is_empty());
        assert!(bus.tell(&ejection_complete(SLOT)).is_empty());
        assert!(bus.fns.ejected.lock().unwrap().is_empty());
        // Back again: a new eject is sent and completes.
        bus.fns.functions.lock().unwrap().push(dma_test());
        bus.vpci.relations_changed();
        assert_eq!(relations(&bus.run()[0]).len(), 1);
        let r = bus.create3(0x41, 1, &[0]);
        bus.vpci.eject(SLOT).unwrap();
        assert_eq!(bus.run().len(), 1);
        bus.tell(&ejection_complete(SLOT));
        assert_eq!(*bus.fns.ejected.lock().unwrap(), [SLOT]);
        // Its interrupts went with it.
        assert_eq!(bus.vpci.interrupts(), 0);
        assert!(bus.tell(&delete(SLOT, r.int_desc)).is_empty());
    }

    #[test]
    fn a_flush_sends_the_eject_and_leaves_the_guests_packets() {
        let mut bus = Bus::new(1);
        bus.probe();
        // A request of the guest's waits in its ring.
        bus.ch.incoming.push_back(packet(
            VM_PKT_DATA_INBAND,
            REQ,
            7,
            &version(PCI_PROTOCOL_VERSION_1_4),
        ));
        bus.vpci.eject(SLOT).unwrap();
        ChannelDevice::flush(&mut bus.vpci, &mut bus.ch).unwrap();
        let sent = std::mem::take(&mut bus.ch.sent);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(
            read::<DevIncoming>(&sent[0].payload).map(|m| m.message_type.get()),
            Some(MessageType::EJECT.0)
        );
        // Unread: the next run (the guest's signal) serves it.
        assert_eq!(bus.ch.incoming.len(), 1);
        let answered = bus.run();
        assert_eq!(answered.len(), 1);
        assert_eq!(answered[0].tid, 7);
    }

    #[test]
    fn relations_go_once_the_guest_asked() {
        let mut bus = Bus::new(1);
        bus.vpci.relations_changed();
        assert!(bus.run().is_empty());
        assert_eq!(bus.ask_status(1, &version(PCI_PROTOCOL_VERSION_1_4)), 0);
        assert!(bus.run().is_empty());
        let second = Function {
            slot: WinSlot::of(0, 3),
            serial: 8,
            ..dma_test()
        };
        bus.fns.functions.lock().unwrap().push(second);
        let sent = bus.tell(msg(MessageType::QUERY_BUS_RELATIONS));
        assert_eq!(sent.len(), 1);
        let f = relations(&sent[0]);
        assert_eq!(f.len(), 2);
        assert_eq!(f[1].win_slot.get(), 3 << 5);
        bus.vpci.relations_changed();
        bus.vpci.relations_changed();
        assert_eq!(bus.run().len(), 1);
        assert!(bus.run().is_empty());
        // No function is a valid answer.
        bus.fns.functions.lock().unwrap().clear();
        bus.vpci.relations_changed();
        let sent = bus.run();
        assert_eq!(sent[0].payload.len(), 8);
        assert!(relations(&sent[0]).is_empty());
        // Past MAX_FUNCTIONS, the list is cut.
        *bus.fns.functions.lock().unwrap() = vec![dma_test(); MAX_FUNCTIONS + 3];
        bus.vpci.relations_changed();
        assert_eq!(relations(&bus.run()[0]).len(), MAX_FUNCTIONS);
    }

    #[test]
    fn the_window_takes_only_what_linux_does() {
        let mut bus = Bus::new(1);
        let v = bus.vpci.clone();
        // Unmapped: all ones, writes ignored.
        v.window_write(0, &SLOT.into_bits().to_le_bytes());
        assert_eq!(read_window(&v, 0x1000, 4), 0xFFFF_FFFF);
        bus.probe();
        // Nothing selected yet.
        assert_eq!(read_window(&v, 0, 4), 0);
        assert_eq!(read_window(&v, 0x1000, 4), 0xFFFF_FFFF);
        v.window_write(0x1000, &[1, 2, 3, 4]);
        assert!(bus.fns.writes.lock().unwrap().is_empty());
        v.window_write(0, &SLOT.into_bits().to_le_bytes());
        assert_eq!(read_window(&v, 0, 1), 1);
        assert_eq!(read_window(&v, 2, 2), 0);
        // Unaligned, odd-sized, outside: all ones, ignored.
        assert_eq!(read_window(&v, 0x1001, 2), 0xFFFF);
        assert_eq!(read_window(&v, 0x1001, 4), 0xFFFF_FFFF);
        assert_eq!(read_window(&v, 0x1000, 3), 0xFF_FFFF);
        assert_eq!(read_window(&v, 4, 4), 0xFFFF_FFFF);
        assert_eq!(read_window(&v, 0x2000, 4), 0xFFFF_FFFF);
        assert_eq!(read_window(&v, u64::MAX - 3, 4), 0xFFFF_FFFF);
        let mut eight = [0u8; 8];
        v.window_read(0x1000, &mut eight);
        assert_eq!(eight, [0xFF; 8]);
        v.window_read(0x1000, &mut []);
        v.window_write(0x1002, &[1, 2, 3, 4]);
        v.window_write(0x2000, &[1, 2, 3, 4]);
        v.window_write(0x10, &[1, 2, 3, 4]);
        v.window_write(0, &[1, 2]);
        assert!(bus.fns.writes.lock().unwrap().is_empty());
        assert_eq!(read_window(&v, 0, 4), SLOT.into_bits());
        assert_eq!(read_window(&v, 0x1FFC, 4), 0);
        // Another slot: the VMM answers for absent functions.
        v.window_write(0, &7u32.to_le_bytes());
        assert_eq!(read_window(&v, 0x1000, 2), 0xFFFF);
    }

    #[test]
    fn open_and_close_start_afresh() {
        let mut bus = Bus::new(1);
        bus.probe();
        bus.create3(0x41, 1, &[0]);
        bus.vpci.closed();
        assert_eq!(*bus.fns.windows.lock().unwrap(), [Some(BASE), None]);
        let st = bus.vpci.stats();
        assert_eq!(
            (st.version, st.config_window, st.interrupts, st.vectors),
            (None, None, 0, 0)
        );
        bus.vpci.opened();
        assert_eq!(bus.fns.windows.lock().unwrap().len(), 2);
        assert_eq!(bus.vpci.eject(SLOT), Err(VpciError::NotListed));
        bus.probe();
        bus.vpci.opened();
        assert_eq!(
            *bus.fns.windows.lock().unwrap(),
            [Some(BASE), None, Some(BASE), None]
        );
        assert!(format!("{:?}", bus.vpci).starts_with("Vpci"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random packets, with a message type made likely, a ring full at
        /// random: no panic, every bound holds, and the bus still answers.
        #[test]
        fn random_packets_never_panic(
            packets in prop::collection::vec(
                (
                    prop_oneof![Just(VM_PKT_DATA_INBAND), any::<u16>()],
                    0u16..4,
                    any::<u64>(),
                    0u32..0x1E,
                    prop::collection::vec(any::<u8>(), 0..120),
                    any::<bool>(),
                ),
                0..60,
            ),
            vcpus in 0u32..4,
        ) {
            let mut bus = Bus::new(vcpus);
            bus.probe();
            for (ty, flags, tid, t, mut payload, full) in packets {
                if payload.len() >= 4 {
                    payload[..4].copy_from_slice(&(PCI_MESSAGE_BASE + t).to_le_bytes());
                }
                bus.ch.full = full;
                bus.ch.incoming.push_back(packet(ty, flags, tid, &payload));
                bus.vpci.run(&mut bus.ch).unwrap();
                let st = bus.vpci.stats();
                prop_assert!(st.queued <= MAX_QUEUED);
                prop_assert!(st.vectors <= MAX_VECTORS);
                let _ = bus.vpci.translate(0xFEE0_0000, 0x41);
                let _ = bus.vpci.retarget(0, 0xFEE0_0000, 0x41, 0x41, &[0]);
            }
            bus.ch.full = false;
            bus.ch.incoming.clear();
            bus.run();
            bus.ch.sent.clear();
            prop_assert_eq!(bus.ask_status(1, &version(PCI_PROTOCOL_VERSION_1_4)), 0);
        }
    }
}
