//! The VMBus control plane: connect (INITIATE_CONTACT), the offer list
//! (REQUESTOFFERS), unload, and a channel's page lists and opening
//! (GPADL_HEADER/BODY/TEARDOWN, OPENCHANNEL, CLOSECHANNEL), received
//! through HvCallPostMessage and answered through the [`Synic`].
//!
//! # The connect sequence (Linux's `drivers/hv/connection.c`)
//! 1. Linux proposes versions newest first, each with INITIATE_CONTACT: to
//!    connection 4 for 5.0 and newer (with `msg_sint` = 2, `msg_vtl` = 0),
//!    to connection 1 below (with an interrupt page). It waits, without a
//!    timeout, for the VERSION_RESPONSE, which must arrive at VP
//!    `target_vcpu`, SINT `msg_sint` (SINT 2 below 5.0).
//! 2. This server accepts 5.0 to 5.3 (`version_supported` = 1,
//!    `msg_conn_id` = [`VMBUS_MESSAGE_CONNECTION_ID`]: Linux posts every
//!    later message there) and refuses every other version
//!    (`version_supported` = 0), so Linux walks down from its newest (6.0
//!    in Linux 7.2) to 5.3. A refusal is a
//!    reply too: Linux waits for one. Below 5.0 the reply goes to SINT 2,
//!    where those versions expect it. A guest asking for messages at
//!    another VTL than 0 is refused likewise. A second INITIATE_CONTACT
//!    resets the connection first (kexec, as QEMU and OpenVMM do).
//! 3. REQUESTOFFERS: one OFFERCHANNEL per offer registered with
//!    [`Server::add_offer`] (none is fine), then ALLOFFERS_DELIVERED.
//! 4. UNLOAD (kexec, shutdown): UNLOAD_RESPONSE, then the connection is
//!    forgotten, with its GPADLs and open channels. Linux waits for the
//!    response without a timeout.
//!
//! # Channels (Linux's `drivers/hv/channel.c`)
//! - A GPADL is a guest page list for one channel: a header with one range
//!   and its first PFNs, GPADL_BODY messages with the rest (Linux sends
//!   them all, then waits for GPADL_CREATED without a timeout). The server
//!   answers once every PFN is in: success if every page is guest RAM, else
//!   [`crate::abi::STATUS_UNSUCCESSFUL`]; a header it cannot use is
//!   answered with the failure at once. At most [`MAX_GPADLS`] GPADLs of
//!   [`MAX_GPADL_PAGES`] pages each.
//! - OPENCHANNEL names the GPADL of the channel's two rings and where the
//!   second starts; OPENCHANNEL_RESULT says whether it opened (Linux waits
//!   for it without a timeout, so a refusal is an answer too).
//!   CLOSECHANNEL closes it (no answer). GPADL_TEARDOWN of a GPADL no open
//!   channel uses is answered with GPADL_TORNDOWN.
//! - An open channel's rings belong to its offer's device
//!   ([`ChannelDevice`]): HvCallSignalEvent on the channel's connection id
//!   ([`Server::signal_event`]) runs the device on the signalling vCPU's
//!   thread with the rings as a [`Channel`], and the host's packets
//!   interrupt the guest as Linux expects for 5.x: the channel's relid as
//!   an event flag of the connection's SINT in the target VP's event-flags
//!   page ([`Synic::signal_event`]). The VMM has a device send host news
//!   through [`Server::flush_channel`], which serves none of the guest's
//!   packets on the VMM's thread. A device that fails on its rings
//!   (a corrupt ring) is closed until the guest opens the channel again.
//! - Offers come and go after the offer list: [`Server::add_offer`] sends
//!   a new one at once, [`Server::rescind`] takes one back
//!   (RESCIND_CHANNELOFFER; the channel ends on the host's side at once,
//!   as Linux sends no teardown for it) and the relid is free again once
//!   the guest sends RELID_RELEASED.
//! - Not yet: monitor pages (offers say none: Linux then signals with
//!   HvCallSignalEvent).
//!
//! Messages post on connection 1 or 4, whatever the version (OpenVMM's
//! VTL0 server listens on both; `[verify]` which `msg_conn_id` it returns:
//! Linux uses whatever it is told).
//!
//! # Errors and statuses
//! Every refusal is a [`PostError`]; [`PostError::status`] gives the
//! HV_STATUS for the hypercall. A reply is sent whole or not at all: the
//! server checks that the SynIC takes all of it before changing state, and
//! changes state only once the reply is posted, so a guest that gets
//! HV_STATUS_INSUFFICIENT_BUFFERS can simply retry (Linux does). Only a
//! guest that reprograms its SynIC while a multi-message reply goes out can
//! see part of it.
//!
//! The server logs one line, on the first connection; every other event
//! is the caller's to log through its rate limiter.

use std::collections::BTreeMap;
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use pviommu_abi::{HvError, HV_PAGE_SIZE};
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::abi::{
    connection_state, version, ChannelMessageHeader, ChannelMessageType, ChannelOffer,
    CloseChannel, GpaRange, GpadlBody, GpadlCreated, GpadlHeader, GpadlTeardown, GpadlTorndown,
    Guid, HvMessage, HvMessageType, InitiateContact, InputPostMessage, OfferChannel, OpenChannel,
    OpenResult, RelidReleased, RescindOffer, VersionResponse, HV_MESSAGE_PAYLOAD_SIZE,
    MAX_CHANNEL_RELIDS, SINT_COUNT, STATUS_UNSUCCESSFUL, VMBUS_MESSAGE_CONNECTION_ID,
    VMBUS_MESSAGE_CONNECTION_ID_4, VMBUS_MESSAGE_SINT,
};
use crate::channel::{Channel, ChannelDevice, ChannelFault};
use crate::ring::{Packet, Ring, RingError};
use crate::synic::{DeliveryError, Synic};
use pviommu_abi::InputSignalEvent;

/// Offers the server holds at most (it could hold 2047: relids 1..2047).
pub const MAX_OFFERS: usize = 32;
const MAX_OFFERS_U32: u32 = 32;
const _: () = assert!(MAX_OFFERS_U32 as usize == MAX_OFFERS);
/// A guest page, in bytes.
const PAGE_BYTES: usize = 4096;
const _: () = assert!(PAGE_BYTES as u64 == HV_PAGE_SIZE);

/// GPADLs a connection holds at most, created and pending together.
pub const MAX_GPADLS: usize = 64;
/// Pages a GPADL has at most (16 MiB): with [`MAX_GPADLS`], at most 2 MiB
/// of PFNs per VM.
pub const MAX_GPADL_PAGES: usize = 4096;
/// The first offer's connection id (its HvSignalEvent target) is this plus
/// its relid: clear of the VMBus ids 1..4.
pub const OFFER_CONNECTION_ID_BASE: u32 = 0x1000;
/// The lowest version accepted.
pub const MIN_VERSION: u32 = version::WIN10_V5;
/// The highest version accepted.
pub const MAX_VERSION: u32 = version::WIN10_V5_3;

// Offers fit the relid space and a SynIC queue with ALLOFFERS_DELIVERED.
const _: () = assert!(MAX_OFFERS < MAX_CHANNEL_RELIDS as usize);
const _: () = assert!(MAX_OFFERS < crate::synic::MESSAGE_QUEUE_DEPTH);

/// An HvCallPostMessage the server refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    /// The connection id is not 1 or 4.
    #[error("No message port on connection {0:#x}")]
    InvalidConnectionId(u32),
    /// The RsvdZ field after the connection id is not zero.
    #[error("Reserved field of the post-message input is {0:#x}")]
    ReservedNonZero(u32),
    /// The message type is not 1 (VMBus).
    #[error("Message type {0:#x} is not a VMBus channel message")]
    InvalidMessageType(u32),
    /// The payload size is over 240.
    #[error("Payload of {0} bytes is longer than 240")]
    PayloadTooLarge(u32),
    /// The payload is shorter than a channel message header.
    #[error("Payload of {0} bytes holds no channel message header")]
    NoHeader(u32),
    /// The payload is shorter than its message.
    #[error("{msgtype} of {size} bytes is shorter than {min}")]
    TruncatedMessage {
        /// The message type.
        msgtype: ChannelMessageType,
        /// The payload size.
        size: u32,
        /// The message's size.
        min: u32,
    },
    /// A channel message this server does not serve (RELID_RELEASED,
    /// MODIFYCHANNEL and the rest), or one only the host sends.
    #[error("Channel message {0} is not served")]
    UnsupportedMessage(ChannelMessageType),
    /// A message that needs a connection came before INITIATE_CONTACT
    /// succeeded (or after UNLOAD).
    #[error("{0} before a connection")]
    NotConnected(ChannelMessageType),
    /// INITIATE_CONTACT named a target VP the VM does not have.
    #[error("INITIATE_CONTACT names VP {0}, which does not exist")]
    InvalidTargetVp(u32),
    /// INITIATE_CONTACT named a SINT above 15.
    #[error("INITIATE_CONTACT names SINT {0}")]
    InvalidMessageSint(u8),
    /// GPADL_BODY or GPADL_TEARDOWN for a GPADL that is not pending, or
    /// not created for that channel.
    #[error("GPADL {0:#x} is unknown")]
    UnknownGpadl(u32),
    /// GPADL_TEARDOWN of a GPADL an open channel uses.
    #[error("GPADL {0:#x} is an open channel's ring")]
    GpadlInUse(u32),
    /// CLOSECHANNEL of a channel that is not open.
    #[error("Channel {0} is not open")]
    NotOpen(u32),
    /// RELID_RELEASED of a relid the host did not rescind.
    #[error("Channel {0} was not rescinded")]
    NotRescinded(u32),
    /// The SynIC did not take the reply; nothing changed.
    #[error("Reply not posted")]
    Reply(#[source] DeliveryError),
}

/// An HvCallSignalEvent the server refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    /// No channel has this connection id.
    #[error("No event port on connection {0:#x}")]
    InvalidConnectionId(u32),
    /// A flag other than 0 (a channel's port has one flag), or the RsvdZ
    /// field set.
    #[error("Event flag {flag} (reserved {reserved:#x}) of connection {connection_id:#x}")]
    InvalidFlag {
        /// The connection id.
        connection_id: u32,
        /// The flag number.
        flag: u16,
        /// The reserved field.
        reserved: u16,
    },
}

impl SignalError {
    /// The HV_STATUS the hypercall returns (TLFS "HvCallSignalEvent"):
    /// INVALID_CONNECTION_ID for no port, INVALID_PARAMETER for a flag
    /// past the port's or the RsvdZ field set.
    pub const fn status(&self) -> HvError {
        match self {
            Self::InvalidConnectionId(_) => HvError::INVALID_CONNECTION_ID,
            Self::InvalidFlag { .. } => HvError::INVALID_PARAMETER,
        }
    }
}

impl PostError {
    /// The HV_STATUS the hypercall returns (TLFS "HvCallPostMessage"):
    /// - INVALID_CONNECTION_ID (0x12): no port on the connection (Linux then
    ///   tries the next version on INITIATE_CONTACT);
    /// - INVALID_PARAMETER (0x05): a message type of 0 or with bit
    ///   31 set, or a payload over 240 bytes (the TLFS's cases); pvmm also
    ///   returns it for the RsvdZ field set, another message type than 1, a
    ///   payload too short for its message, and a channel message the
    ///   server refuses (unsupported, or before a connection). QEMU returns
    ///   HV_STATUS_INVALID_HYPERCALL_INPUT for some of these; the plan's
    ///   `[verify]` is settled by the TLFS table for the size and type cases;
    /// - INVALID_VP_INDEX (0x0E): INITIATE_CONTACT targets a VP that does
    ///   not exist;
    /// - a reply that could not be posted: [`DeliveryError::status`]
    ///   (INSUFFICIENT_BUFFERS 0x13 for a full queue, which Linux retries;
    ///   INVALID_SYNIC_STATE 0x18 for a SynIC not set up to receive).
    pub const fn status(&self) -> HvError {
        match self {
            Self::InvalidConnectionId(_) => HvError::INVALID_CONNECTION_ID,
            Self::ReservedNonZero(_)
            | Self::InvalidMessageType(_)
            | Self::PayloadTooLarge(_)
            | Self::NoHeader(_)
            | Self::TruncatedMessage { .. }
            | Self::UnsupportedMessage(_)
            | Self::NotConnected(_)
            | Self::InvalidMessageSint(_)
            | Self::UnknownGpadl(_)
            | Self::GpadlInUse(_)
            | Self::NotOpen(_)
            | Self::NotRescinded(_) => HvError::INVALID_PARAMETER,
            Self::InvalidTargetVp(_) => HvError::INVALID_VP_INDEX,
            Self::Reply(e) => e.status(),
        }
    }
}

/// Why an offer was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// [`MAX_OFFERS`] are registered.
    #[error("Too many offers (at most {MAX_OFFERS})")]
    TooMany,
    /// An offer with this instance GUID exists (Linux names devices by it).
    #[error("An offer with instance {0} exists")]
    DuplicateInstance(Guid),
    /// The SynIC did not take the hot-added offer's message (the guest's
    /// SINT queue is full, or its SynIC is off); nothing changed.
    #[error("The offer could not be sent")]
    NotSent(#[source] DeliveryError),
}

/// Why an offer was not rescinded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RescindError {
    /// No offer has this relid, or it is rescinded already.
    #[error("No offer with relid {0}")]
    UnknownRelid(u32),
}

/// A registered offer's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfferIds {
    /// The channel's relid (1..).
    pub relid: u32,
    /// The channel's connection id: the guest's HvSignalEvent target.
    pub connection_id: u32,
}

/// A device behind a channel, shared by the server and the VMM.
pub type SharedDevice = Arc<Mutex<dyn ChannelDevice>>;

/// An offer: a channel the guest may open, and the device behind it.
#[derive(Clone)]
struct Offer {
    interface_type: Guid,
    instance: Guid,
    ids: OfferIds,
    device: SharedDevice,
    /// Taken back: the guest still holds its relid until RELID_RELEASED.
    rescinded: bool,
}

impl std::fmt::Debug for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offer")
            .field("interface_type", &self.interface_type)
            .field("instance", &self.instance)
            .field("ids", &self.ids)
            .field("rescinded", &self.rescinded)
            .finish_non_exhaustive()
    }
}

impl Offer {
    /// The OFFERCHANNEL message: a primary channel with a dedicated
    /// interrupt (5.0 and newer have no shared interrupt page), no monitor
    /// page (the guest signals with HvSignalEvent), no MMIO, no flags.
    fn message(&self) -> OfferChannel {
        let mut offer = ChannelOffer::new_zeroed();
        offer.if_type = self.interface_type;
        offer.if_instance = self.instance;
        let mut m = OfferChannel::new_zeroed();
        m.header = ChannelMessageHeader::new(ChannelMessageType::OFFERCHANNEL);
        m.offer = offer;
        m.child_relid.set(self.ids.relid);
        m.is_dedicated_interrupt.set(1);
        m.connection_id.set(self.ids.connection_id);
        m
    }
}

/// The guest's connection, after an accepted INITIATE_CONTACT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// The version agreed.
    pub version: u32,
    /// The VP every message goes to.
    pub target_vp: u32,
    /// The SINT every message goes to.
    pub sint: u8,
    /// The guest requested the offers.
    pub offers_requested: bool,
}

/// A guest page list (GPADL) the guest described for a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpadl {
    /// The channel it was made for.
    pub relid: u32,
    /// Bytes it covers.
    pub byte_count: u32,
    /// Where they start in the first page.
    pub byte_offset: u32,
    /// Its 4 KiB guest pages, in order (all in guest RAM once created).
    pub pfns: Vec<u64>,
}

/// A GPADL being described: its header came, its PFNs still come.
#[derive(Debug)]
struct PendingGpadl {
    gpadl: Gpadl,
    /// PFNs it has in all.
    pages: usize,
}

impl PendingGpadl {
    /// Takes the PFNs in `bytes` (whole u64s), as many as it still lacks.
    fn take(&mut self, bytes: &[u8]) {
        let lacking = self.pages - self.gpadl.pfns.len();
        self.gpadl.pfns.extend(
            bytes
                .chunks_exact(8)
                .take(lacking)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())),
        );
    }
}

/// An open channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenChannelState {
    /// The guest's id of the open.
    pub openid: u32,
    /// The GPADL of its two rings: guest-to-host first, then host-to-guest.
    pub ring_gpadl: u32,
    /// The VP its interrupts go to.
    pub target_vp: u32,
    /// Where the host-to-guest ring starts in the GPADL, in pages (the
    /// guest-to-host ring is at page 0).
    pub downstream_page_offset: u32,
}

/// An open channel: its state and its rings (none once its device failed
/// on them).
#[derive(Debug)]
struct Open {
    state: OpenChannelState,
    rings: Option<(Ring, Ring)>,
    /// This open's number: a run of the device that began before a close
    /// (or a later open) finds another number, or none, and does nothing.
    epoch: u64,
}

#[derive(Debug, Default)]
struct State {
    connection: Option<Connection>,
    offers: Vec<Offer>,
    /// Created GPADLs, by handle (at most [`MAX_GPADLS`] with the pending).
    gpadls: BTreeMap<u32, Gpadl>,
    /// GPADLs whose PFNs are still coming, by handle.
    pending: BTreeMap<u32, PendingGpadl>,
    /// Open channels, by relid.
    open: BTreeMap<u32, Open>,
    /// Opens so far (each open's epoch).
    opens: u64,
}

impl State {
    /// Ends the connection and everything made in it (VMBus's unload);
    /// returns the devices of the channels that were open, for the caller
    /// to close once it let go of the state (a device runs under its own
    /// lock, which is always taken before the state's).
    #[must_use]
    fn disconnect(&mut self) -> Vec<SharedDevice> {
        self.connection = None;
        self.gpadls.clear();
        self.pending.clear();
        let closing = std::mem::take(&mut self.open)
            .into_keys()
            .filter_map(|relid| self.device_of(relid))
            .collect();
        // The guest is gone: the relids it held are free.
        self.offers.retain(|o| !o.rescinded);
        closing
    }

    /// Whether `relid` is a live (offered, not rescinded) channel.
    fn offer(&self, relid: u32) -> bool {
        self.offers
            .iter()
            .any(|o| o.ids.relid == relid && !o.rescinded)
    }

    /// The guest has the offer list: offers come and go by message.
    fn offers_sent(&self) -> Option<Connection> {
        self.connection.filter(|c| c.offers_requested)
    }

    /// Channel `relid`'s device.
    fn device_of(&self, relid: u32) -> Option<SharedDevice> {
        self.offers
            .iter()
            .find(|o| o.ids.relid == relid)
            .map(|o| o.device.clone())
    }
}

/// Tells `devices` that their channels closed (without the state lock).
fn close_all(devices: &[SharedDevice]) {
    for d in devices {
        lock_device(d).closed();
    }
}

/// The VMBus server of a VM.
pub struct Server<M> {
    synic: Arc<Synic<M>>,
    state: Mutex<State>,
    connect_logged: AtomicBool,
}

impl<M> std::fmt::Debug for Server<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl<M: GuestMemory> Server<M> {
    /// A server with no offers and no connection, replying through `synic`.
    pub fn new(synic: Arc<Synic<M>>) -> Self {
        Self {
            synic,
            state: Mutex::new(State::default()),
            connect_logged: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The SynIC replies go through.
    pub fn synic(&self) -> &Arc<Synic<M>> {
        &self.synic
    }

    /// The guest's connection, if any.
    pub fn connection(&self) -> Option<Connection> {
        self.state().connection
    }

    /// Forgets the connection, its GPADLs and open channels (VM reset);
    /// offers stay.
    pub fn reset(&self) {
        let closing = self.state().disconnect();
        close_all(&closing);
    }

    /// GPADL `handle`, once created.
    pub fn gpadl(&self, handle: u32) -> Option<Gpadl> {
        self.state().gpadls.get(&handle).cloned()
    }

    /// Channel `relid`'s open state, if open.
    pub fn open_channel(&self, relid: u32) -> Option<OpenChannelState> {
        self.state().open.get(&relid).map(|o| o.state)
    }

    /// Registers an offer of class `interface_type`, instance `instance`,
    /// sent at the guest's next REQUESTOFFERS. Do not offer a class whose
    /// Linux driver waits on channel messages this slice does not serve
    /// (such as [`crate::abi::VPCI_INTERFACE_TYPE`]): its probe would hang the
    /// guest's boot.
    pub fn add_offer(
        &self,
        interface_type: Guid,
        instance: Guid,
        device: SharedDevice,
    ) -> Result<OfferIds, OfferError> {
        let mut state = self.state();
        if state.offers.len() >= MAX_OFFERS {
            return Err(OfferError::TooMany);
        }
        if state.offers.iter().any(|o| o.instance == instance) {
            return Err(OfferError::DuplicateInstance(instance));
        }
        // The lowest relid no offer holds (rescinded ones hold theirs until
        // the guest releases them); below MAX_OFFERS + 1, so it fits.
        let relid = (1..=MAX_OFFERS_U32)
            .find(|r| state.offers.iter().all(|o| o.ids.relid != *r))
            .ok_or(OfferError::TooMany)?;
        let offer = Offer {
            interface_type,
            instance,
            ids: OfferIds {
                relid,
                connection_id: OFFER_CONNECTION_ID_BASE + relid,
            },
            device,
            rescinded: false,
        };
        // Hot add: a guest that has the offer list gets the offer now.
        if let Some(c) = state.offers_sent() {
            self.synic
                .post(
                    c.target_vp,
                    c.sint,
                    &channel_message(offer.message().as_bytes()),
                )
                .map_err(OfferError::NotSent)?;
        }
        let ids = offer.ids;
        state.offers.push(offer);
        Ok(ids)
    }

    /// Takes offer `relid` back (hot removal): the channel's rings, GPADLs
    /// and device session end at once, whatever the guest does (Linux sends
    /// no teardown for a rescinded channel), and a guest that has the offer
    /// list is sent RESCIND_CHANNELOFFER. The relid stays the guest's until
    /// it sends RELID_RELEASED (or disconnects); a guest that never had the
    /// offer list loses the offer at once. `Ok(false)`: the guest's SynIC
    /// did not take the message (its SINT masked, its queue full): the
    /// offer is gone on the host's side all the same, and its relid stays
    /// held until the guest disconnects.
    pub fn rescind(&self, relid: u32) -> Result<bool, RescindError> {
        let mut state = self.state();
        let index = state
            .offers
            .iter()
            .position(|o| o.ids.relid == relid && !o.rescinded)
            .ok_or(RescindError::UnknownRelid(relid))?;
        let device = state.offers[index].device.clone();
        let told = match state.offers_sent() {
            Some(c) => {
                let m = RescindOffer {
                    header: ChannelMessageHeader::new(ChannelMessageType::RESCIND_CHANNELOFFER),
                    child_relid: relid.into(),
                };
                state.offers[index].rescinded = true;
                self.synic
                    .post(c.target_vp, c.sint, &channel_message(m.as_bytes()))
                    .is_ok()
            }
            None => {
                state.offers.remove(index);
                true
            }
        };
        let was_open = state.open.remove(&relid).is_some();
        state.gpadls.retain(|_, g| g.relid != relid);
        state.pending.retain(|_, p| p.gpadl.relid != relid);
        drop(state);
        if was_open {
            lock_device(&device).closed();
        }
        Ok(told)
    }

    /// HvCallPostMessage from VP `_vp`, the caller (not used: replies go to
    /// the VP that INITIATE_CONTACT named, whoever posts). `Ok` is
    /// HV_STATUS_SUCCESS; see [`PostError::status`] for the rest.
    pub fn post_message(&self, _vp: u32, input: &InputPostMessage) -> Result<(), PostError> {
        let connection_id = input.connection_id.get();
        if connection_id != VMBUS_MESSAGE_CONNECTION_ID
            && connection_id != VMBUS_MESSAGE_CONNECTION_ID_4
        {
            return Err(PostError::InvalidConnectionId(connection_id));
        }
        let reserved = input.reserved.get();
        if reserved != 0 {
            return Err(PostError::ReservedNonZero(reserved));
        }
        let message_type = input.message_type.get();
        if message_type != HvMessageType::CHANNEL.0 {
            return Err(PostError::InvalidMessageType(message_type));
        }
        let size = input.payload_size.get();
        let payload = usize::try_from(size)
            .ok()
            .and_then(|n| input.payload.get(..n))
            .ok_or(PostError::PayloadTooLarge(size))?;
        let (header, _) = ChannelMessageHeader::read_from_prefix(payload)
            .map_err(|_| PostError::NoHeader(size))?;
        let msgtype = header.msgtype();
        match msgtype {
            ChannelMessageType::INITIATE_CONTACT => {
                self.initiate_contact(parse(msgtype, payload, size)?)
            }
            ChannelMessageType::REQUESTOFFERS => self.request_offers(),
            ChannelMessageType::UNLOAD => self.unload(),
            ChannelMessageType::GPADL_HEADER => self.gpadl_header(payload, size),
            ChannelMessageType::GPADL_BODY => self.gpadl_body(payload, size),
            ChannelMessageType::GPADL_TEARDOWN => {
                self.gpadl_teardown(parse(msgtype, payload, size)?)
            }
            ChannelMessageType::OPENCHANNEL => self.open(parse(msgtype, payload, size)?),
            ChannelMessageType::CLOSECHANNEL => self.close(parse(msgtype, payload, size)?),
            ChannelMessageType::RELID_RELEASED => {
                self.relid_released(parse(msgtype, payload, size)?)
            }
            _ => Err(PostError::UnsupportedMessage(msgtype)),
        }
    }

    fn initiate_contact(&self, m: InitiateContact) -> Result<(), PostError> {
        let requested = m.vmbus_version_requested.get();
        let target_vp = m.target_vcpu.get();
        if target_vp >= self.synic.vcpus() {
            return Err(PostError::InvalidTargetVp(target_vp));
        }
        let modern = requested >= version::WIN10_V5;
        let sint = if modern {
            m.msg_sint()
        } else {
            VMBUS_MESSAGE_SINT
        };
        if usize::from(sint) >= SINT_COUNT {
            return Err(PostError::InvalidMessageSint(sint));
        }
        let accepted = (MIN_VERSION..=MAX_VERSION).contains(&requested) && m.msg_vtl() == 0;
        // All 16 bytes, whatever the version: Linux 7.2's min_payload_len
        // for VERSION_RESPONSE is `sizeof(struct
        // vmbus_channel_version_response)`, 16 (channel_mgmt.c). OpenVMM sends
        // 20 (`supported_features`) only for an accepted 6.0, refused here.
        let reply = VersionResponse {
            header: ChannelMessageHeader::new(ChannelMessageType::VERSION_RESPONSE),
            version_supported: u8::from(accepted),
            connection_state: connection_state::SUCCESSFUL,
            padding: [0; 2],
            msg_conn_id: if accepted {
                VMBUS_MESSAGE_CONNECTION_ID.into()
            } else {
                0.into()
            },
        };
        let mut state = self.state();
        self.reply(target_vp, sint, &reply)?;
        // A new INITIATE_CONTACT ends any earlier connection, refused or not.
        let closing = state.disconnect();
        state.connection = accepted.then_some(Connection {
            version: requested,
            target_vp,
            sint,
            offers_requested: false,
        });
        if accepted && !self.connect_logged.swap(true, Ordering::Relaxed) {
            log::info!(
                "VMBus: guest connected, version {}.{}, messages to VP {target_vp} SINT {sint}, {} offer(s)",
                version::major(requested),
                version::minor(requested),
                state.offers.len()
            );
        }
        drop(state);
        close_all(&closing);
        Ok(())
    }

    /// Linux waits for ALLOFFERS_DELIVERED (since 6.14 in rounds that warn;
    /// `[verify]` the loop and its timeout in 7.2), then flushes its work
    /// queues, including the primary channels' probes: an offer whose
    /// driver blocks in probe hangs its boot.
    fn request_offers(&self) -> Result<(), PostError> {
        let mut state = self.state();
        let Some(mut connection) = state.connection else {
            return Err(PostError::NotConnected(ChannelMessageType::REQUESTOFFERS));
        };
        let (vp, sint) = (connection.target_vp, connection.sint);
        self.synic
            .can_post(
                vp,
                sint,
                state.offers.iter().filter(|o| !o.rescinded).count() + 1,
            )
            .map_err(PostError::Reply)?;
        for offer in state.offers.iter().filter(|o| !o.rescinded) {
            self.reply(vp, sint, &offer.message())?;
        }
        let done = ChannelMessageHeader::new(ChannelMessageType::ALLOFFERS_DELIVERED);
        self.reply(vp, sint, &done)?;
        connection.offers_requested = true;
        state.connection = Some(connection);
        Ok(())
    }

    /// Linux's `vmbus_initiate_unload` waits for the response without a
    /// timeout (kexec), or polls the message pages for a bounded time on its
    /// crash path (`[verify]` how long).
    fn unload(&self) -> Result<(), PostError> {
        let mut state = self.state();
        let Some(connection) = state.connection else {
            return Err(PostError::NotConnected(ChannelMessageType::UNLOAD));
        };
        let done = ChannelMessageHeader::new(ChannelMessageType::UNLOAD_RESPONSE);
        self.reply(connection.target_vp, connection.sint, &done)?;
        let closing = state.disconnect();
        drop(state);
        close_all(&closing);
        Ok(())
    }

    /// The connection, for a message that needs one.
    fn connected(state: &State, msgtype: ChannelMessageType) -> Result<Connection, PostError> {
        state.connection.ok_or(PostError::NotConnected(msgtype))
    }

    /// GPADL_HEADER: a page list for a channel, one range (as Linux sends),
    /// its first PFNs here and the rest in GPADL_BODY messages. Once every
    /// PFN is in, GPADL_CREATED answers: success if every page is guest RAM,
    /// else [`STATUS_UNSUCCESSFUL`]. A header that cannot describe a GPADL
    /// (a channel not offered, a handle in use, no or several ranges, sizes
    /// that disagree, too many pages or GPADLs) is answered at once with
    /// the failure: Linux waits for the answer without a timeout.
    fn gpadl_header(&self, payload: &[u8], size: u32) -> Result<(), PostError> {
        let msgtype = ChannelMessageType::GPADL_HEADER;
        let header: GpadlHeader = parse(msgtype, payload, size)?;
        let mut state = self.state();
        let connection = Self::connected(&state, msgtype)?;
        let (relid, handle) = (header.child_relid.get(), header.gpadl.get());
        let rest = payload.get(size_of::<GpadlHeader>()..).unwrap_or_default();
        let described = GpaRange::read_from_prefix(rest)
            .ok()
            .filter(|_| header.rangecount.get() == 1)
            .and_then(|(range, pfns)| {
                let buflen = usize::from(header.range_buflen.get());
                let pages = buflen.checked_sub(size_of::<GpaRange>())? / 8;
                let covered =
                    u64::from(range.byte_offset.get()) + u64::from(range.byte_count.get());
                let fits = pages.checked_sub(1)? as u64 * HV_PAGE_SIZE < covered
                    && covered <= pages as u64 * HV_PAGE_SIZE;
                let offset_in_page = u64::from(range.byte_offset.get()) < HV_PAGE_SIZE;
                (buflen % 8 == 0
                    && (1..=MAX_GPADL_PAGES).contains(&pages)
                    && fits
                    && offset_in_page)
                    .then_some((range, pages, pfns))
            });
        let usable = state.offer(relid)
            && handle != 0
            && !state.gpadls.contains_key(&handle)
            && !state.pending.contains_key(&handle)
            && state.gpadls.len() + state.pending.len() < MAX_GPADLS;
        let Some((range, pages, pfns)) = described.filter(|_| usable) else {
            return self.gpadl_created(&connection, relid, handle, false);
        };
        let mut pending = PendingGpadl {
            gpadl: Gpadl {
                relid,
                byte_count: range.byte_count.get(),
                byte_offset: range.byte_offset.get(),
                pfns: Vec::with_capacity(pages),
            },
            pages,
        };
        pending.take(pfns);
        if pending.gpadl.pfns.len() < pending.pages {
            state.pending.insert(handle, pending);
            return Ok(());
        }
        // All of it in the header: answered now, kept once answered.
        let in_ram = self.in_ram(&pending.gpadl.pfns);
        self.gpadl_created(&connection, relid, handle, in_ram)?;
        if in_ram {
            state.gpadls.insert(handle, pending.gpadl);
        }
        Ok(())
    }

    /// GPADL_BODY: more PFNs of a pending GPADL; the last one brings the
    /// answer. A body whose answer cannot be posted changes nothing, so that
    /// the guest's retry (Linux retries INSUFFICIENT_BUFFERS) finds the
    /// GPADL as it was.
    fn gpadl_body(&self, payload: &[u8], size: u32) -> Result<(), PostError> {
        let msgtype = ChannelMessageType::GPADL_BODY;
        let body: GpadlBody = parse(msgtype, payload, size)?;
        let mut state = self.state();
        let connection = Self::connected(&state, msgtype)?;
        let handle = body.gpadl.get();
        let pending = state
            .pending
            .get_mut(&handle)
            .ok_or(PostError::UnknownGpadl(handle))?;
        let before = pending.gpadl.pfns.len();
        pending.take(payload.get(size_of::<GpadlBody>()..).unwrap_or_default());
        if pending.gpadl.pfns.len() < pending.pages {
            return Ok(());
        }
        let (relid, in_ram) = (pending.gpadl.relid, self.in_ram(&pending.gpadl.pfns));
        if let Err(e) = self.gpadl_created(&connection, relid, handle, in_ram) {
            if let Some(p) = state.pending.get_mut(&handle) {
                p.gpadl.pfns.truncate(before);
            }
            return Err(e);
        }
        if let Some(done) = state.pending.remove(&handle) {
            if in_ram {
                state.gpadls.insert(handle, done.gpadl);
            }
        }
        Ok(())
    }

    /// Panics if the server's state breaks its own rules: GPADLs within
    /// their bounds and made for offered channels, open channels on a
    /// GPADL of their own, nothing without a connection (the fuzz target's
    /// invariants).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn check_invariants(&self) {
        let state = self.state();
        assert!(state.gpadls.len() + state.pending.len() <= MAX_GPADLS);
        if state.connection.is_none() {
            assert!(state.gpadls.is_empty() && state.pending.is_empty() && state.open.is_empty());
        }
        for p in state.pending.values() {
            assert!(p.gpadl.pfns.len() < p.pages && p.pages <= MAX_GPADL_PAGES);
            assert!(state.offer(p.gpadl.relid));
        }
        for g in state.gpadls.values() {
            assert!((1..=MAX_GPADL_PAGES).contains(&g.pfns.len()));
            assert!(state.offer(g.relid) && self.in_ram(&g.pfns));
        }
        for (relid, open) in &state.open {
            let open = &open.state;
            let ring = state.gpadls.get(&open.ring_gpadl);
            assert!(ring.is_some_and(|g| g.relid == *relid
                && open.downstream_page_offset > 0
                && (open.downstream_page_offset as usize) < g.pfns.len()));
            assert!(open.target_vp < self.synic.vcpus());
        }
    }

    /// Whether every page of `pfns` is guest RAM.
    fn in_ram(&self, pfns: &[u64]) -> bool {
        let mem = self.synic.memory();
        pfns.iter().all(|&pfn| {
            pfn.checked_mul(HV_PAGE_SIZE).is_some_and(|gpa| {
                mem.check_range(GuestAddress(gpa), PAGE_BYTES, Permissions::ReadWrite)
            })
        })
    }

    fn gpadl_created(
        &self,
        connection: &Connection,
        relid: u32,
        handle: u32,
        ok: bool,
    ) -> Result<(), PostError> {
        let reply = GpadlCreated {
            header: ChannelMessageHeader::new(ChannelMessageType::GPADL_CREATED),
            child_relid: relid.into(),
            gpadl: handle.into(),
            creation_status: if ok { 0 } else { STATUS_UNSUCCESSFUL }.into(),
        };
        self.reply(connection.target_vp, connection.sint, &reply)
    }

    /// GPADL_TEARDOWN: forgets a created GPADL that no open channel uses,
    /// and answers GPADL_TORNDOWN (Linux waits for it without a timeout; a
    /// refused post ends its wait with an error).
    fn gpadl_teardown(&self, m: GpadlTeardown) -> Result<(), PostError> {
        let mut state = self.state();
        let connection = Self::connected(&state, ChannelMessageType::GPADL_TEARDOWN)?;
        let handle = m.gpadl.get();
        match state.gpadls.get(&handle) {
            Some(g) if g.relid == m.child_relid.get() => {}
            _ => return Err(PostError::UnknownGpadl(handle)),
        }
        if state.open.values().any(|o| o.state.ring_gpadl == handle) {
            return Err(PostError::GpadlInUse(handle));
        }
        let reply = GpadlTorndown {
            header: ChannelMessageHeader::new(ChannelMessageType::GPADL_TORNDOWN),
            gpadl: handle.into(),
        };
        self.reply(connection.target_vp, connection.sint, &reply)?;
        state.gpadls.remove(&handle);
        Ok(())
    }

    /// OPENCHANNEL: opens an offered, closed channel on a GPADL of its own
    /// whose two rings (split at the downstream offset) each have a page at
    /// least, interrupting an existing VP. The result says which: Linux
    /// waits for it without a timeout, so a refused open is answered too.
    fn open(&self, m: OpenChannel) -> Result<(), PostError> {
        let mut state = self.state();
        let connection = Self::connected(&state, ChannelMessageType::OPENCHANNEL)?;
        let relid = m.child_relid.get();
        let opened = OpenChannelState {
            openid: m.openid.get(),
            ring_gpadl: m.ringbuffer_gpadl_handle.get(),
            target_vp: m.target_vp.get(),
            downstream_page_offset: m.downstream_ringbuffer_page_offset.get(),
        };
        let rings = state
            .gpadls
            .get(&opened.ring_gpadl)
            .filter(|g| g.relid == relid)
            .and_then(|g| Ring::pair(&g.pfns, opened.downstream_page_offset as usize).ok());
        let ok = state.offer(relid)
            && !state.open.contains_key(&relid)
            && opened.target_vp < self.synic.vcpus()
            && rings.is_some();
        let reply = OpenResult {
            header: ChannelMessageHeader::new(ChannelMessageType::OPENCHANNEL_RESULT),
            child_relid: relid.into(),
            openid: opened.openid.into(),
            status: if ok { 0 } else { STATUS_UNSUCCESSFUL }.into(),
        };
        self.reply(connection.target_vp, connection.sint, &reply)?;
        if ok {
            state.opens += 1;
            let epoch = state.opens;
            state.open.insert(
                relid,
                Open {
                    state: opened,
                    rings,
                    epoch,
                },
            );
            let device = state.device_of(relid);
            drop(state);
            if let Some(d) = device {
                lock_device(&d).opened();
            }
        }
        Ok(())
    }

    /// CLOSECHANNEL: closes an open channel (no answer: Linux does not wait).
    fn close(&self, m: CloseChannel) -> Result<(), PostError> {
        let mut state = self.state();
        Self::connected(&state, ChannelMessageType::CLOSECHANNEL)?;
        let relid = m.child_relid.get();
        // Linux closes a rescinded channel too: it is closed already.
        if state
            .offers
            .iter()
            .any(|o| o.ids.relid == relid && o.rescinded)
        {
            return Ok(());
        }
        state.open.remove(&relid).ok_or(PostError::NotOpen(relid))?;
        let device = state.device_of(relid);
        drop(state);
        if let Some(d) = device {
            lock_device(&d).closed();
        }
        Ok(())
    }

    /// RELID_RELEASED: the guest is done with a rescinded channel; its
    /// relid is free for a new offer (no answer).
    fn relid_released(&self, m: RelidReleased) -> Result<(), PostError> {
        let mut state = self.state();
        Self::connected(&state, ChannelMessageType::RELID_RELEASED)?;
        let relid = m.child_relid.get();
        let index = state
            .offers
            .iter()
            .position(|o| o.ids.relid == relid && o.rescinded)
            .ok_or(PostError::NotRescinded(relid))?;
        state.offers.remove(index);
        Ok(())
    }

    /// HvCallSignalEvent from VP `_vp`: the guest put packets in a
    /// channel's ring, or read the host's. Runs the channel's device if the
    /// channel is open (a closed or failed channel's signal does nothing).
    /// `Ok(Some(fault))`: the call succeeded, but the device failed on its
    /// rings and the channel is closed to it (the caller logs it).
    pub fn signal_event(
        &self,
        _vp: u32,
        input: &InputSignalEvent,
    ) -> Result<Option<ChannelFault>, SignalError> {
        let connection_id = input.connection_id.get();
        let relid = self
            .state()
            .offers
            .iter()
            .find(|o| o.ids.connection_id == connection_id)
            .map(|o| o.ids.relid)
            .ok_or(SignalError::InvalidConnectionId(connection_id))?;
        let (flag, reserved) = (input.flag_number.get(), input.reserved.get());
        if flag != 0 || reserved != 0 {
            return Err(SignalError::InvalidFlag {
                connection_id,
                flag,
                reserved,
            });
        }
        Ok(self.run_channel(relid).err())
    }

    /// Runs channel `relid`'s device on its rings if the channel is open
    /// (the host has news for the guest, or the guest signalled). A device
    /// that fails is closed and the channel's rings are dropped until the
    /// guest opens it again.
    pub fn run_channel(&self, relid: u32) -> Result<(), ChannelFault> {
        self.drive(relid, Drive::Run)
    }

    /// Has channel `relid`'s device send what it has to say, if the channel
    /// is open, without serving the guest's packets
    /// ([`ChannelDevice::flush`]): for a host thread with news (an eject)
    /// that must not do the guest's work. A failure is handled as in
    /// [`Server::run_channel`].
    pub fn flush_channel(&self, relid: u32) -> Result<(), ChannelFault> {
        self.drive(relid, Drive::Flush)
    }

    fn drive(&self, relid: u32, how: Drive) -> Result<(), ChannelFault> {
        let (device, rings, target_vp, sint, epoch) = {
            let state = self.state();
            let (Some(connection), Some(open)) = (state.connection, state.open.get(&relid)) else {
                return Ok(());
            };
            let Some(rings) = open.rings.clone() else {
                return Ok(());
            };
            let Some(offer) = state.offers.iter().find(|o| o.ids.relid == relid) else {
                return Ok(());
            };
            (
                offer.device.clone(),
                rings,
                open.state.target_vp,
                connection.sint,
                open.epoch,
            )
        };
        let (inbound, outbound) = rings;
        let mut channel = RingChannel {
            synic: &self.synic,
            inbound,
            outbound,
            target_vp,
            sint,
            relid,
        };
        let mut dev = lock_device(&device);
        // Still the same open: a close (or a new open) since the rings were
        // taken waits for this lock to tell the device, so the device never
        // runs on a session that ended.
        let current = |state: &State| {
            state
                .open
                .get(&relid)
                .is_some_and(|o| o.epoch == epoch && o.rings.is_some())
        };
        if !current(&self.state()) {
            return Ok(());
        }
        let result = match how {
            Drive::Run => dev.run(&mut channel),
            Drive::Flush => dev.flush(&mut channel),
        };
        if result.is_err() {
            dev.closed();
            let mut state = self.state();
            if current(&state) {
                if let Some(open) = state.open.get_mut(&relid) {
                    open.rings = None;
                }
            }
        }
        result
    }

    /// Posts channel message `message` to `vp`, `sint`.
    fn reply<T: IntoBytes + Immutable>(
        &self,
        vp: u32,
        sint: u8,
        message: &T,
    ) -> Result<(), PostError> {
        self.synic
            .post(vp, sint, &channel_message(message.as_bytes()))
            .map(|_| ())
            .map_err(PostError::Reply)
    }
}

/// What [`Server::drive`] has a channel's device do.
#[derive(Clone, Copy)]
enum Drive {
    /// Serve the guest's packets and send what the host has to say.
    Run,
    /// Only send what the host has to say.
    Flush,
}

/// Locks a channel's device (a device that panicked keeps its state).
fn lock_device(device: &SharedDevice) -> MutexGuard<'_, dyn ChannelDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An open channel's rings as its device uses them: packets from the
/// guest-to-host ring, packets to the host-to-guest ring with the
/// channel's interrupt (its relid's event flag on the connection's SINT
/// of its target VP) when the ring protocol asks for one.
struct RingChannel<'a, M> {
    synic: &'a Synic<M>,
    inbound: Ring,
    outbound: Ring,
    target_vp: u32,
    sint: u8,
    relid: u32,
}

impl<M: GuestMemory> Channel for RingChannel<'_, M> {
    fn recv(&mut self) -> Result<Option<Packet>, RingError> {
        self.inbound.read_packet(self.synic.memory())
    }

    fn send(
        &mut self,
        packet_type: u16,
        flags: u16,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<(), RingError> {
        let signal = self.outbound.write_packet(
            self.synic.memory(),
            packet_type,
            flags,
            transaction_id,
            payload,
        )?;
        if signal {
            // A guest whose SynIC cannot take the event polls its ring
            // (or reprogrammed its SynIC): nothing more to do.
            let _ = self
                .synic
                .signal_event(self.target_vp, self.sint, self.relid);
        }
        Ok(())
    }
}

// Every reply fits one SynIC message.
const _: () = {
    assert!(core::mem::size_of::<VersionResponse>() <= HV_MESSAGE_PAYLOAD_SIZE);
    assert!(core::mem::size_of::<OfferChannel>() <= HV_MESSAGE_PAYLOAD_SIZE);
    assert!(core::mem::size_of::<ChannelMessageHeader>() <= HV_MESSAGE_PAYLOAD_SIZE);
};

/// A SynIC message of type CHANNEL carrying `bytes` (at most 240: every
/// reply fits, checked above).
fn channel_message(bytes: &[u8]) -> HvMessage {
    let n = bytes.len().min(HV_MESSAGE_PAYLOAD_SIZE);
    let mut m = HvMessage::new_zeroed();
    m.header.message_type.set(HvMessageType::CHANNEL.0);
    m.header.payload_size = u8::try_from(n).unwrap_or(u8::MAX);
    m.payload[..n].copy_from_slice(&bytes[..n]);
    m
}

/// The channel message `T` at the start of `payload` (`size` bytes).
fn parse<T: FromBytes + KnownLayout + Immutable>(
    msgtype: ChannelMessageType,
    payload: &[u8],
    size: u32,
) -> Result<T, PostError> {
    T::read_from_prefix(payload)
        .map(|(m, _)| m)
        .map_err(|_| PostError::TruncatedMessage {
            msgtype,
            size,
            // At most 240: a message type fits one post.
            min: u32::try_from(core::mem::size_of::<T>().min(HV_MESSAGE_PAYLOAD_SIZE))
                .unwrap_or(u32::MAX),
        })
}

#[cfg(test)]
// Test constants are small.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::abi::{HvMessageType, SintMsr};
    use crate::channel::testing::Echo;
    use crate::synic::tests::{linux_enable, linux_take, memory, slot, Recorder, VECTOR};
    use crate::synic::{Posted, MESSAGE_QUEUE_DEPTH};
    use proptest::prelude::*;
    use pviommu_abi::msr;
    use vm_memory::{Bytes, GuestMemoryMmap};
    use zerocopy::little_endian::{U32, U64};

    type Mem = GuestMemoryMmap;

    fn server(vcpus: u32) -> (Arc<Recorder>, Arc<Mem>, Server<Mem>) {
        let rec = Arc::new(Recorder::default());
        let mem = memory();
        let synic = Arc::new(Synic::new(vcpus, mem.clone(), rec.clone()));
        (rec, mem, Server::new(synic))
    }

    /// Linux's `vmbus_negotiate_version` message for `version`, and the
    /// connection it posts it to.
    fn contact(version: u32, target_vcpu: u32) -> (u32, InitiateContact) {
        let mut m = InitiateContact {
            header: ChannelMessageHeader::new(ChannelMessageType::INITIATE_CONTACT),
            vmbus_version_requested: U32::new(version),
            target_vcpu: U32::new(target_vcpu),
            monitor_page1: U64::new(0x9000),
            monitor_page2: U64::new(0xA000),
            ..Default::default()
        };
        let conn = if version >= version::WIN10_V5 {
            m.interrupt_page_or_target_info = InitiateContact::target_info(2, 0, 0);
            VMBUS_MESSAGE_CONNECTION_ID_4
        } else {
            m.interrupt_page_or_target_info = U64::new(0x8000);
            VMBUS_MESSAGE_CONNECTION_ID
        };
        (conn, m)
    }

    /// Linux's HvCallPostMessage input for `version`.
    fn initiate_contact(version: u32, target_vcpu: u32) -> InputPostMessage {
        let (conn, m) = contact(version, target_vcpu);
        post(conn, m.as_bytes())
    }

    fn post(conn: u32, payload: &[u8]) -> InputPostMessage {
        InputPostMessage::new(conn, HvMessageType::CHANNEL.0, payload).unwrap()
    }

    fn header_only(conn: u32, t: ChannelMessageType) -> InputPostMessage {
        post(conn, ChannelMessageHeader::new(t).as_bytes())
    }

    fn version_response(m: &HvMessage) -> VersionResponse {
        assert_eq!(m.header.message_type(), HvMessageType::CHANNEL);
        assert_eq!(usize::from(m.header.payload_size), 16);
        VersionResponse::read_from_bytes(m.payload()).unwrap()
    }

    /// Linux on VP 0 (its SynIC enabled) connects at 5.3 and takes the
    /// VERSION_RESPONSE, which accepts.
    fn linux_connect(s: &Server<Mem>, mem: &Mem) {
        s.post_message(0, &initiate_contact(version::WIN10_V5_3, 0))
            .unwrap();
        let r = version_response(&linux_take(s.synic(), mem, 0, 2).unwrap());
        assert_eq!(r.version_supported, 1);
    }

    fn msgtype(m: &HvMessage) -> ChannelMessageType {
        ChannelMessageHeader::read_from_prefix(m.payload())
            .unwrap()
            .0
            .msgtype()
    }

    // ------------------------------------------------------------ GPADL, open, close

    /// Linux's `create_gpadl_header` for `pfns` (one range of whole pages):
    /// the header with as many PFNs as fit, then bodies.
    fn gpadl_messages(relid: u32, handle: u32, pfns: &[u64]) -> Vec<InputPostMessage> {
        let head = size_of::<GpadlHeader>() + size_of::<GpaRange>();
        let first = pfns.len().min((HV_MESSAGE_PAYLOAD_SIZE - head) / 8);
        let header = GpadlHeader {
            header: ChannelMessageHeader::new(ChannelMessageType::GPADL_HEADER),
            child_relid: relid.into(),
            gpadl: handle.into(),
            range_buflen: u16::try_from(8 + 8 * pfns.len()).unwrap().into(),
            rangecount: 1.into(),
        };
        let range = GpaRange {
            byte_count: u32::try_from(pfns.len() * 4096).unwrap().into(),
            byte_offset: 0.into(),
        };
        let mut bytes = [header.as_bytes(), range.as_bytes()].concat();
        for pfn in &pfns[..first] {
            bytes.extend_from_slice(&pfn.to_le_bytes());
        }
        let mut out = vec![post(VMBUS_MESSAGE_CONNECTION_ID, &bytes)];
        for chunk in pfns[first..].chunks((HV_MESSAGE_PAYLOAD_SIZE - 16) / 8) {
            let body = GpadlBody {
                header: ChannelMessageHeader::new(ChannelMessageType::GPADL_BODY),
                msgnumber: 0.into(),
                gpadl: handle.into(),
            };
            let mut bytes = body.as_bytes().to_vec();
            for pfn in chunk {
                bytes.extend_from_slice(&pfn.to_le_bytes());
            }
            out.push(post(VMBUS_MESSAGE_CONNECTION_ID, &bytes));
        }
        out
    }

    /// A connected server with one offer (relid 1), its offers taken.
    fn with_channel() -> (Arc<Mem>, Server<Mem>) {
        let (_, mem, s) = with_device(Echo::shared());
        (mem, s)
    }

    /// [`with_channel`] with `device` behind the offer.
    fn with_device(device: SharedDevice) -> (Arc<Recorder>, Arc<Mem>, Server<Mem>) {
        let (rec, mem, s) = server(2);
        s.add_offer(TEST_CLASS, INSTANCE_A, device).unwrap();
        linux_enable(s.synic(), 0);
        linux_connect(&s, &mem);
        s.post_message(0, &header_only(1, ChannelMessageType::REQUESTOFFERS))
            .unwrap();
        assert_eq!(
            msgtype(&linux_take(s.synic(), &mem, 0, 2).unwrap()),
            ChannelMessageType::OFFERCHANNEL
        );
        assert_eq!(
            msgtype(&linux_take(s.synic(), &mem, 0, 2).unwrap()),
            ChannelMessageType::ALLOFFERS_DELIVERED
        );
        (rec, mem, s)
    }

    fn take<T: FromBytes>(s: &Server<Mem>, mem: &Mem, t: ChannelMessageType) -> T {
        let m = linux_take(s.synic(), mem, 0, 2).expect("a reply");
        assert_eq!(msgtype(&m), t);
        T::read_from_prefix(m.payload()).unwrap().0
    }

    fn open_message(relid: u32, gpadl: u32, downstream: u32, target_vp: u32) -> InputPostMessage {
        let m = OpenChannel {
            header: ChannelMessageHeader::new(ChannelMessageType::OPENCHANNEL),
            child_relid: relid.into(),
            openid: 7.into(),
            ringbuffer_gpadl_handle: gpadl.into(),
            target_vp: target_vp.into(),
            downstream_ringbuffer_page_offset: downstream.into(),
            user_data: [0; 120],
        };
        post(VMBUS_MESSAGE_CONNECTION_ID, m.as_bytes())
    }

    /// Hot add and removal as Linux sees them: an offer added after the
    /// offer list goes out at once; a rescind reaches the guest, ends the
    /// channel (rings, GPADLs, device session) without a teardown from the
    /// guest, tolerates Linux's CLOSECHANNEL, and holds the relid until
    /// RELID_RELEASED, after which a new offer reuses it.
    #[test]
    fn offers_come_and_go_after_the_offer_list() {
        let echo = Echo::shared();
        let (mem, s) = with_channel();
        let late = Guid::from_fields(7, 7, 7, [7; 8]);
        let ids = s.add_offer(TEST_CLASS, late, echo.clone()).unwrap();
        assert_eq!(ids.relid, 2);
        let o: OfferChannel = take(&s, &mem, ChannelMessageType::OFFERCHANNEL);
        assert_eq!((o.offer.if_instance, o.child_relid.get()), (late, 2));

        // Open it on a GPADL, then rescind it.
        let pfns = [8u64, 9, 10, 11];
        for m in gpadl_messages(2, 0xE2, &pfns) {
            s.post_message(0, &m).unwrap();
        }
        let _: GpadlCreated = take(&s, &mem, ChannelMessageType::GPADL_CREATED);
        s.post_message(0, &open_message(2, 0xE2, 2, 0)).unwrap();
        let r: OpenResult = take(&s, &mem, ChannelMessageType::OPENCHANNEL_RESULT);
        assert_eq!(r.status.get(), 0);
        assert_eq!(s.rescind(2), Ok(true));
        let r: RescindOffer = take(&s, &mem, ChannelMessageType::RESCIND_CHANNELOFFER);
        assert_eq!(r.child_relid.get(), 2);
        assert_eq!(echo.lock().unwrap().closed, 1);
        assert_eq!((s.open_channel(2), s.gpadl(0xE2)), (None, None));
        assert_eq!(s.rescind(2), Err(RescindError::UnknownRelid(2)));
        // Linux's vmbus_close of the rescinded channel is accepted.
        let close = CloseChannel {
            header: ChannelMessageHeader::new(ChannelMessageType::CLOSECHANNEL),
            child_relid: 2.into(),
        };
        s.post_message(0, &post(VMBUS_MESSAGE_CONNECTION_ID, close.as_bytes()))
            .unwrap();
        // Relid 2 is the guest's until it releases it.
        let other = Guid::from_fields(8, 8, 8, [8; 8]);
        let third = s.add_offer(TEST_CLASS, other, Echo::shared()).unwrap();
        assert_eq!(third.relid, 3);
        let _: OfferChannel = take(&s, &mem, ChannelMessageType::OFFERCHANNEL);
        let released = |relid: u32| {
            let m = RelidReleased {
                header: ChannelMessageHeader::new(ChannelMessageType::RELID_RELEASED),
                child_relid: relid.into(),
            };
            post(VMBUS_MESSAGE_CONNECTION_ID, m.as_bytes())
        };
        assert_eq!(
            s.post_message(0, &released(1)),
            Err(PostError::NotRescinded(1))
        );
        s.post_message(0, &released(2)).unwrap();
        assert_eq!(
            s.post_message(0, &released(2)),
            Err(PostError::NotRescinded(2))
        );
        // The same instance comes back, on the freed relid.
        assert_eq!(s.add_offer(TEST_CLASS, late, echo).unwrap().relid, 2);
        let _: OfferChannel = take(&s, &mem, ChannelMessageType::OFFERCHANNEL);
        // A guest whose SINT cannot take the rescind loses the offer all
        // the same (the relid stays held until it disconnects).
        let sint2 = msr::sint(2).unwrap();
        let v = s.synic().read_msr(0, sint2).unwrap();
        s.synic()
            .write_msr(
                0,
                sint2,
                SintMsr::from_bits(v).with_masked(true).into_bits(),
            )
            .unwrap();
        assert_eq!(s.rescind(3), Ok(false));
        assert_eq!(s.rescind(3), Err(RescindError::UnknownRelid(3)));
        // A guest that never had the list loses a rescinded offer at once.
        let (_, _, fresh) = server(1);
        let ids = fresh.add_offer(TEST_CLASS, late, Echo::shared()).unwrap();
        assert_eq!(fresh.rescind(ids.relid), Ok(true));
        assert_eq!(
            fresh
                .add_offer(TEST_CLASS, late, Echo::shared())
                .unwrap()
                .relid,
            1
        );
    }

    /// A channel's life as Linux's `vmbus_open` and `vmbus_sendpacket`
    /// make it: the guest writes a packet and signals the channel's
    /// connection id; the device answers on the host-to-guest ring, and the
    /// guest gets the channel's event flag and an interrupt. A corrupt ring
    /// closes the channel to its device; bad signals are refused.
    #[test]
    fn signal_event_runs_the_device_on_its_rings() {
        let echo = Echo::shared();
        let (rec, mem, s) = with_device(echo.clone());
        // Four zeroed pages: the guest-to-host ring on 8-9, host-to-guest
        // on 10-11.
        let pfns = [8u64, 9, 10, 11];
        for pfn in pfns {
            mem.write_slice(&[0u8; PAGE_BYTES], GuestAddress(pfn * 4096))
                .unwrap();
        }
        for m in gpadl_messages(1, 0xE1, &pfns) {
            s.post_message(0, &m).unwrap();
        }
        let _: GpadlCreated = take(&s, &mem, ChannelMessageType::GPADL_CREATED);
        s.post_message(0, &open_message(1, 0xE1, 2, 0)).unwrap();
        let r: OpenResult = take(&s, &mem, ChannelMessageType::OPENCHANNEL_RESULT);
        assert_eq!(r.status.get(), 0);
        assert_eq!(echo.lock().unwrap().opened, 1);
        rec.take();

        // The guest's side of the rings.
        let to_host = Ring::new(&pfns[..2]).unwrap();
        let to_guest = Ring::new(&pfns[2..]).unwrap();
        to_host
            .write_packet(&*mem, crate::abi::VM_PKT_DATA_INBAND, 1, 0x77, b"ping!")
            .unwrap();
        // A host thread's flush does not serve the guest's packet.
        assert_eq!(s.flush_channel(1), Ok(()));
        assert_eq!(echo.lock().unwrap().packets, 0);
        assert!(to_guest.read_packet(&*mem).unwrap().is_none());
        let signal = |connection_id: u32, flag: u16| InputSignalEvent {
            connection_id: connection_id.into(),
            flag_number: flag.into(),
            reserved: 0.into(),
        };
        assert_eq!(
            s.signal_event(0, &signal(OFFER_CONNECTION_ID_BASE + 1, 0)),
            Ok(None)
        );
        let answer = to_guest.read_packet(&*mem).unwrap().unwrap();
        assert_eq!(answer.descriptor.transaction_id.get(), 0x77);
        assert_eq!(&answer.payload[..5], b"ping!");
        // Relid 1's flag in SINT 2 of VP 0's event flags, and the vector.
        let (offset, bit) = crate::abi::event_flag_position(2, 1).unwrap();
        let siefp = s.synic().event_flags_page(0).unwrap();
        let flags: u8 = mem.read_obj(GuestAddress(siefp + offset)).unwrap();
        assert_eq!(flags & bit, bit);
        assert_eq!(rec.take(), [(0, VECTOR)]);

        assert_eq!(
            s.signal_event(0, &signal(0x7777, 0)),
            Err(SignalError::InvalidConnectionId(0x7777))
        );
        assert_eq!(
            s.signal_event(0, &signal(OFFER_CONNECTION_ID_BASE + 1, 1))
                .map_err(|e| e.status()),
            Err(HvError::INVALID_PARAMETER)
        );
        // A write index past the ring: the device fails, the channel is
        // closed to it, later signals do nothing.
        mem.write_obj(0xFFFF_0000u32, GuestAddress(8 * 4096))
            .unwrap();
        assert!(matches!(
            s.signal_event(0, &signal(OFFER_CONNECTION_ID_BASE + 1, 0)),
            Ok(Some(ChannelFault::Ring(RingError::Corrupt(_))))
        ));
        assert_eq!(echo.lock().unwrap().closed, 1);
        assert_eq!(
            s.signal_event(0, &signal(OFFER_CONNECTION_ID_BASE + 1, 0)),
            Ok(None)
        );
        assert_eq!(echo.lock().unwrap().packets, 1);
        // Unload closes it (again) for the device.
        s.post_message(0, &header_only(1, ChannelMessageType::UNLOAD))
            .unwrap();
        assert_eq!(echo.lock().unwrap().closed, 2);
    }

    /// Linux's `vmbus_establish_gpadl` (40 pages: a header and a body),
    /// `vmbus_open` on it, `vmbus_close` and `vmbus_teardown_gpadl`.
    #[test]
    fn gpadl_open_close_teardown_as_linux_does_them() {
        let (mem, s) = with_channel();
        let pfns: Vec<u64> = (0..40).map(|i| i % 16).collect();
        let msgs = gpadl_messages(1, 0xE1E1, &pfns);
        assert_eq!(msgs.len(), 2);
        s.post_message(0, &msgs[0]).unwrap();
        // Nothing until every PFN is in.
        assert!(linux_take(s.synic(), &mem, 0, 2).is_none());
        assert_eq!(s.gpadl(0xE1E1), None);
        s.post_message(0, &msgs[1]).unwrap();
        let c: GpadlCreated = take(&s, &mem, ChannelMessageType::GPADL_CREATED);
        assert_eq!(
            (c.child_relid.get(), c.gpadl.get(), c.creation_status.get()),
            (1, 0xE1E1, 0)
        );
        let g = s.gpadl(0xE1E1).unwrap();
        assert_eq!(
            (g.relid, g.byte_count, g.byte_offset, g.pfns),
            (1, 40 * 4096, 0, pfns)
        );

        s.post_message(0, &open_message(1, 0xE1E1, 20, 1)).unwrap();
        let r: OpenResult = take(&s, &mem, ChannelMessageType::OPENCHANNEL_RESULT);
        assert_eq!(
            (r.child_relid.get(), r.openid.get(), r.status.get()),
            (1, 7, 0)
        );
        let open = s.open_channel(1).unwrap();
        assert_eq!(
            (open.ring_gpadl, open.target_vp, open.downstream_page_offset),
            (0xE1E1, 1, 20)
        );
        // Its ring cannot go while it is open; a second open is refused.
        let teardown = GpadlTeardown {
            header: ChannelMessageHeader::new(ChannelMessageType::GPADL_TEARDOWN),
            child_relid: 1.into(),
            gpadl: 0xE1E1.into(),
        };
        let teardown = post(VMBUS_MESSAGE_CONNECTION_ID, teardown.as_bytes());
        assert_eq!(
            s.post_message(0, &teardown),
            Err(PostError::GpadlInUse(0xE1E1))
        );
        s.post_message(0, &open_message(1, 0xE1E1, 20, 1)).unwrap();
        let r: OpenResult = take(&s, &mem, ChannelMessageType::OPENCHANNEL_RESULT);
        assert_eq!(r.status.get(), STATUS_UNSUCCESSFUL);

        let close = CloseChannel {
            header: ChannelMessageHeader::new(ChannelMessageType::CLOSECHANNEL),
            child_relid: 1.into(),
        };
        let close = post(VMBUS_MESSAGE_CONNECTION_ID, close.as_bytes());
        s.post_message(0, &close).unwrap();
        assert_eq!(s.open_channel(1), None);
        assert_eq!(s.post_message(0, &close), Err(PostError::NotOpen(1)));
        s.post_message(0, &teardown).unwrap();
        let t: GpadlTorndown = take(&s, &mem, ChannelMessageType::GPADL_TORNDOWN);
        assert_eq!(t.gpadl.get(), 0xE1E1);
        assert_eq!(s.gpadl(0xE1E1), None);
        assert_eq!(
            s.post_message(0, &teardown),
            Err(PostError::UnknownGpadl(0xE1E1))
        );
    }

    /// The last GPADL_BODY's answer does not fit the full queue: the body
    /// changes nothing, and Linux's retry (it retries INSUFFICIENT_BUFFERS)
    /// creates the GPADL.
    #[test]
    fn a_gpadl_body_whose_answer_does_not_fit_can_be_retried() {
        let (mem, s) = with_channel();
        let pfns: Vec<u64> = (0..40).map(|i| i % 16).collect();
        let msgs = gpadl_messages(1, 0xE1E1, &pfns);
        s.post_message(0, &msgs[0]).unwrap();
        let filler = HvMessage::new(HvMessageType::CHANNEL, &[0; 8]).unwrap();
        for _ in 0..=MESSAGE_QUEUE_DEPTH {
            s.synic().post(0, 2, &filler).unwrap();
        }
        let e = s.post_message(0, &msgs[1]).unwrap_err();
        assert_eq!(e.status(), HvError::INSUFFICIENT_BUFFERS);
        assert_eq!(s.gpadl(0xE1E1), None);
        for _ in 0..=MESSAGE_QUEUE_DEPTH {
            linux_take(s.synic(), &mem, 0, 2).unwrap();
        }
        s.post_message(0, &msgs[1]).unwrap();
        let c: GpadlCreated = take(&s, &mem, ChannelMessageType::GPADL_CREATED);
        assert_eq!((c.gpadl.get(), c.creation_status.get()), (0xE1E1, 0));
        assert_eq!(s.gpadl(0xE1E1).unwrap().pfns, pfns);
    }

    /// Every GPADL Linux waits for is answered, a bad one with a failure:
    /// pages outside RAM, a channel not offered, handle 0 or in use, sizes
    /// that disagree, two ranges, too many pages. Opens likewise.
    #[test]
    fn bad_gpadls_and_opens_are_answered_with_failures() {
        let (mem, s) = with_channel();
        let created = |s: &Server<Mem>| {
            let c: GpadlCreated = take(s, &mem, ChannelMessageType::GPADL_CREATED);
            (c.gpadl.get(), c.creation_status.get())
        };
        // A page outside RAM (16 pages of RAM).
        s.post_message(0, &gpadl_messages(1, 2, &[1, 16])[0])
            .unwrap();
        assert_eq!(created(&s), (2, STATUS_UNSUCCESSFUL));
        s.post_message(0, &gpadl_messages(1, 3, &[1, u64::MAX])[0])
            .unwrap();
        assert_eq!(created(&s), (3, STATUS_UNSUCCESSFUL));
        // Channel 2 is not offered; handle 0.
        s.post_message(0, &gpadl_messages(2, 4, &[1])[0]).unwrap();
        assert_eq!(created(&s), (4, STATUS_UNSUCCESSFUL));
        s.post_message(0, &gpadl_messages(1, 0, &[1])[0]).unwrap();
        assert_eq!(created(&s), (0, STATUS_UNSUCCESSFUL));
        // A good one; then its handle again.
        s.post_message(0, &gpadl_messages(1, 5, &[1, 2])[0])
            .unwrap();
        assert_eq!(created(&s), (5, 0));
        s.post_message(0, &gpadl_messages(1, 5, &[3])[0]).unwrap();
        assert_eq!(created(&s), (5, STATUS_UNSUCCESSFUL));
        assert_eq!(s.gpadl(5).unwrap().pfns, [1, 2]);
        // Sizes that disagree, two ranges, no pages, too many pages.
        for (buflen, count, bytes) in [
            (8 + 16, 1, 3 * 4096),
            (8 + 16, 1, 4096),
            (8 + 17, 1, 2 * 4096),
            (8 + 16, 2, 2 * 4096),
            (8, 1, 0),
            (8 + 8 * 4097, 1, 4097 * 4096),
        ] {
            let mut m = gpadl_messages(1, 6, &[1, 2])[0];
            m.payload[16..18].copy_from_slice(&u16::try_from(buflen).unwrap().to_le_bytes());
            m.payload[18..20].copy_from_slice(&u16::to_le_bytes(count));
            m.payload[20..24].copy_from_slice(&u32::to_le_bytes(bytes));
            s.post_message(0, &m).unwrap();
            assert_eq!(
                created(&s),
                (6, STATUS_UNSUCCESSFUL),
                "{buflen} {count} {bytes}"
            );
        }
        // Bytes that start past the first page.
        let mut m = gpadl_messages(1, 6, &[1, 2])[0];
        m.payload[20..24].copy_from_slice(&u32::to_le_bytes(1));
        m.payload[24..28].copy_from_slice(&u32::to_le_bytes(4096));
        s.post_message(0, &m).unwrap();
        assert_eq!(created(&s), (6, STATUS_UNSUCCESSFUL));
        // A body for no pending GPADL.
        let body = gpadl_messages(1, 9, &[1; 40])[1];
        assert_eq!(s.post_message(0, &body), Err(PostError::UnknownGpadl(9)));
        // Opens: an unknown GPADL, a ring with no downstream half, a VP the
        // VM lacks, another channel's GPADL, a channel not offered.
        for (relid, gpadl, downstream, vp) in [
            (1, 77, 1, 0),
            (1, 5, 2, 0),
            (1, 5, 0, 0),
            (1, 5, 1, 2),
            (2, 5, 1, 0),
        ] {
            s.post_message(0, &open_message(relid, gpadl, downstream, vp))
                .unwrap();
            let r: OpenResult = take(&s, &mem, ChannelMessageType::OPENCHANNEL_RESULT);
            assert_eq!(
                r.status.get(),
                STATUS_UNSUCCESSFUL,
                "{relid} {gpadl} {downstream} {vp}"
            );
        }
        assert_eq!(s.open_channel(1), None);
        // At most MAX_GPADLS, created and pending together; the rest fail.
        for h in 100..100 + MAX_GPADLS as u32 - 1 {
            s.post_message(0, &gpadl_messages(1, h, &[1; 40])[0])
                .unwrap();
        }
        s.post_message(0, &gpadl_messages(1, 999, &[1])[0]).unwrap();
        assert_eq!(created(&s), (999, STATUS_UNSUCCESSFUL));
        // Unload forgets them all.
        s.post_message(0, &header_only(1, ChannelMessageType::UNLOAD))
            .unwrap();
        assert_eq!(s.gpadl(5), None);
        assert!(s.state().pending.is_empty());
    }

    const INSTANCE_A: Guid =
        Guid::from_fields(0x1111_2222, 0x3333, 0x4444, [5, 5, 6, 6, 7, 7, 8, 8]);
    const INSTANCE_B: Guid =
        Guid::from_fields(0x9999_AAAA, 0xBBBB, 0xCCCC, [1, 2, 3, 4, 5, 6, 7, 8]);
    const TEST_CLASS: Guid =
        Guid::from_fields(0x70766d6d, 0x7465, 0x7374, [0, 1, 2, 3, 4, 5, 6, 7]);

    #[test]
    fn linux_connects_at_5_3_after_6_0_is_refused() {
        let (rec, mem, s) = server(2);
        linux_enable(s.synic(), 0);
        linux_enable(s.synic(), 1);

        // 6.0 first: refused, reply in the slot, vector signalled.
        assert_eq!(
            s.post_message(1, &initiate_contact(version::V6_0, 0)),
            Ok(())
        );
        assert_eq!(rec.take(), [(0, VECTOR)]);
        let m = linux_take(s.synic(), &mem, 0, 2).unwrap();
        let r = version_response(&m);
        assert_eq!(r.header.msgtype(), ChannelMessageType::VERSION_RESPONSE);
        assert_eq!(r.version_supported, 0);
        assert_eq!(s.connection(), None);

        // Then 5.3: accepted, msg_conn_id 1, byte for byte.
        assert_eq!(
            s.post_message(1, &initiate_contact(version::WIN10_V5_3, 0)),
            Ok(())
        );
        assert_eq!(rec.take(), [(0, VECTOR)]);
        let m = linux_take(s.synic(), &mem, 0, 2).unwrap();
        assert_eq!(
            m.as_bytes()[..32],
            [
                1, 0, 0, 0, // HvMessage type: channel message
                16, 0, 0, 0, // payload size 16, no flags, reserved
                0, 0, 0, 0, 0, 0, 0, 0, // sender
                15, 0, 0, 0, 0, 0, 0, 0, // VERSION_RESPONSE, padding
                1, 0, 0, 0, // supported, connection state 0, padding
                1, 0, 0, 0, // msg_conn_id 1
            ]
        );
        assert!(m.as_bytes()[32..].iter().all(|&b| b == 0));
        assert_eq!(
            s.connection(),
            Some(Connection {
                version: version::WIN10_V5_3,
                target_vp: 0,
                sint: 2,
                offers_requested: false
            })
        );
        // Nothing reached VP 1.
        assert_eq!(linux_take(s.synic(), &mem, 1, 2), None);
    }

    #[test]
    fn versions_5_0_to_5_3_are_accepted_others_refused() {
        let accepted = [
            version::WIN10_V5,
            version::WIN10_V5_1,
            version::WIN10_V5_2,
            version::WIN10_V5_3,
        ];
        let refused = [
            version::V6_0,
            version::WIN10_V4_1,
            version::WIN10,
            version::WIN8_1,
            version::WIN8,
            version::WIN7,
            version::WS2008,
            0x5_0004,
            0,
            u32::MAX,
        ];
        for v in accepted.into_iter().chain(refused) {
            let (_, mem, s) = server(1);
            linux_enable(s.synic(), 0);
            assert_eq!(s.post_message(0, &initiate_contact(v, 0)), Ok(()), "{v:#x}");
            // Below 5.0 too the reply lands in SINT 2.
            let r = version_response(&linux_take(s.synic(), &mem, 0, 2).unwrap());
            let ok = accepted.contains(&v);
            assert_eq!(r.version_supported, u8::from(ok), "{v:#x}");
            assert_eq!(r.msg_conn_id.get(), if ok { 1 } else { 0 }, "{v:#x}");
            assert_eq!(s.connection().is_some(), ok, "{v:#x}");
        }
    }

    #[test]
    fn a_refused_version_or_vtl_ends_an_earlier_connection() {
        let (_, mem, s) = server(1);
        linux_enable(s.synic(), 0);
        linux_connect(&s, &mem);
        assert!(s.connection().is_some());
        s.post_message(0, &initiate_contact(version::WIN8, 0))
            .unwrap();
        linux_take(s.synic(), &mem, 0, 2).unwrap();
        assert_eq!(s.connection(), None);
        // VTL 1 asked: refused.
        let (_, mut m) = contact(version::WIN10_V5_3, 0);
        m.interrupt_page_or_target_info = InitiateContact::target_info(2, 1, 0);
        s.post_message(0, &post(4, m.as_bytes())).unwrap();
        let r = version_response(&linux_take(s.synic(), &mem, 0, 2).unwrap());
        assert_eq!(r.version_supported, 0);
        assert_eq!(s.connection(), None);
    }

    #[test]
    fn replies_go_to_the_target_vp_and_sint_named() {
        let (rec, mem, s) = server(2);
        linux_enable(s.synic(), 1);
        s.synic()
            .write_msr(
                1,
                msr::sint(5).unwrap(),
                SintMsr::new().with_vector(0x40).into_bits(),
            )
            .unwrap();
        let (_, mut m) = contact(version::WIN10_V5_2, 1);
        m.interrupt_page_or_target_info = InitiateContact::target_info(5, 0, 0);
        // Posted from VP 0: the reply goes to VP 1 SINT 5 all the same.
        s.post_message(0, &post(1, m.as_bytes())).unwrap();
        assert_eq!(rec.take(), [(1, 0x40)]);
        assert_eq!(version_response(&slot(&mem, 1, 5)).version_supported, 1);
        assert_eq!(s.connection().map(|c| (c.target_vp, c.sint)), Some((1, 5)));
        // SINT 16 or a VP the VM lacks: refused, nothing changes.
        m.interrupt_page_or_target_info = InitiateContact::target_info(16, 0, 0);
        let e = s.post_message(0, &post(4, m.as_bytes())).unwrap_err();
        assert_eq!(e, PostError::InvalidMessageSint(16));
        assert_eq!(e.status(), HvError::INVALID_PARAMETER);
        let e = s
            .post_message(0, &initiate_contact(version::WIN10_V5_3, 2))
            .unwrap_err();
        assert_eq!(e, PostError::InvalidTargetVp(2));
        assert_eq!(e.status(), HvError::INVALID_VP_INDEX);
        assert_eq!(s.connection().map(|c| (c.target_vp, c.sint)), Some((1, 5)));
    }

    /// The whole of Linux's connect: INITIATE_CONTACT (5.3), REQUESTOFFERS
    /// with two offers, the guest taking each message and EOMing when the
    /// host set msg_pending.
    #[test]
    fn linux_connect_and_offers_with_the_pending_dance() {
        let (rec, mem, s) = server(1);
        let a = s.add_offer(TEST_CLASS, INSTANCE_A, Echo::shared()).unwrap();
        let b = s.add_offer(TEST_CLASS, INSTANCE_B, Echo::shared()).unwrap();
        assert_eq!(
            a,
            OfferIds {
                relid: 1,
                connection_id: 0x1001
            }
        );
        assert_eq!(
            b,
            OfferIds {
                relid: 2,
                connection_id: 0x1002
            }
        );
        linux_enable(s.synic(), 0);
        linux_connect(&s, &mem);
        rec.take();

        // REQUESTOFFERS on the connection VERSION_RESPONSE named.
        s.post_message(0, &header_only(1, ChannelMessageType::REQUESTOFFERS))
            .unwrap();
        // The first offer is in the slot, with msg_pending: two more wait.
        let first = slot(&mem, 0, 2);
        assert!(first.header.flags().msg_pending());
        assert_eq!(s.synic().queued(0, 2), 2);
        assert_eq!(rec.take(), [(0, VECTOR)]);

        let mut got = vec![];
        while let Some(m) = linux_take(s.synic(), &mem, 0, 2) {
            got.push(m);
        }
        assert_eq!(
            rec.take(),
            [(0, VECTOR), (0, VECTOR)],
            "one interrupt a message"
        );
        assert_eq!(got.len(), 3);
        for (m, (ids, instance)) in got.iter().zip([(a, INSTANCE_A), (b, INSTANCE_B)]) {
            assert_eq!(msgtype(m), ChannelMessageType::OFFERCHANNEL);
            assert_eq!(usize::from(m.header.payload_size), 196);
            let o = OfferChannel::read_from_bytes(m.payload()).unwrap();
            assert_eq!(o.offer.if_type, TEST_CLASS);
            assert_eq!(o.offer.if_instance, instance);
            assert_eq!(o.child_relid.get(), ids.relid);
            assert_eq!(o.connection_id.get(), ids.connection_id);
            assert_eq!(o.is_dedicated_interrupt.get(), 1);
            assert_eq!((o.monitorid, o.monitor_allocated), (0, 0));
            assert_eq!(o.offer.sub_channel_index.get(), 0);
            // Byte offsets of the plan's table.
            let p = m.payload();
            assert_eq!(&p[8..24], TEST_CLASS.as_bytes());
            assert_eq!(&p[184..188], &ids.relid.to_le_bytes());
            assert_eq!(&p[190..192], &[1, 0]);
            assert_eq!(&p[192..196], &ids.connection_id.to_le_bytes());
        }
        let last = &got[2];
        assert_eq!(msgtype(last), ChannelMessageType::ALLOFFERS_DELIVERED);
        assert_eq!(last.header.payload_size, 8);
        assert!(!last.header.flags().msg_pending());
        assert!(s.connection().unwrap().offers_requested);
        // UNLOAD (kexec): UNLOAD_RESPONSE, connection forgotten.
        s.post_message(0, &header_only(1, ChannelMessageType::UNLOAD))
            .unwrap();
        let m = linux_take(s.synic(), &mem, 0, 2).unwrap();
        assert_eq!(msgtype(&m), ChannelMessageType::UNLOAD_RESPONSE);
        assert_eq!(m.header.payload_size, 8);
        assert_eq!(s.connection(), None);
        assert_eq!(
            s.post_message(0, &header_only(1, ChannelMessageType::REQUESTOFFERS)),
            Err(PostError::NotConnected(ChannelMessageType::REQUESTOFFERS))
        );
        // The next kernel connects again and gets the same offers.
        linux_connect(&s, &mem);
        s.post_message(0, &header_only(4, ChannelMessageType::REQUESTOFFERS))
            .unwrap();
        let mut n = 0;
        while linux_take(s.synic(), &mem, 0, 2).is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn zero_offers_is_just_alloffers_delivered() {
        let (_, mem, s) = server(1);
        linux_enable(s.synic(), 0);
        linux_connect(&s, &mem);
        s.post_message(0, &header_only(1, ChannelMessageType::REQUESTOFFERS))
            .unwrap();
        let m = linux_take(s.synic(), &mem, 0, 2).unwrap();
        assert_eq!(msgtype(&m), ChannelMessageType::ALLOFFERS_DELIVERED);
        assert_eq!(linux_take(s.synic(), &mem, 0, 2), None);
    }

    #[test]
    fn a_reply_that_does_not_fit_changes_nothing_and_can_be_retried() {
        let (_, mem, s) = server(1);
        s.add_offer(TEST_CLASS, INSTANCE_A, Echo::shared()).unwrap();
        linux_enable(s.synic(), 0);
        s.post_message(0, &initiate_contact(version::WIN10_V5_3, 0))
            .unwrap();
        // The guest does not take the VERSION_RESPONSE; the host's queue
        // fills with messages of its own.
        let filler = HvMessage::new(HvMessageType::CHANNEL, &[0; 8]).unwrap();
        for _ in 0..MESSAGE_QUEUE_DEPTH - 1 {
            assert_eq!(s.synic().post(0, 2, &filler), Ok(Posted::Queued));
        }
        // Two messages (offer + ALLOFFERS_DELIVERED) need two places: none
        // is sent.
        let e = s
            .post_message(0, &header_only(1, ChannelMessageType::REQUESTOFFERS))
            .unwrap_err();
        assert_eq!(
            e,
            PostError::Reply(DeliveryError::QueueFull { vp: 0, sint: 2 })
        );
        assert_eq!(e.status(), HvError::INSUFFICIENT_BUFFERS);
        assert_eq!(s.synic().queued(0, 2), MESSAGE_QUEUE_DEPTH - 1);
        assert!(!s.connection().unwrap().offers_requested);
        // UNLOAD with a full queue: refused, still connected.
        s.synic().post(0, 2, &filler).unwrap();
        assert_eq!(
            s.post_message(0, &header_only(1, ChannelMessageType::UNLOAD))
                .unwrap_err()
                .status(),
            HvError::INSUFFICIENT_BUFFERS
        );
        assert!(s.connection().is_some());
        // The guest drains; the retry goes through.
        while linux_take(s.synic(), &mem, 0, 2).is_some() {}
        s.post_message(0, &header_only(1, ChannelMessageType::REQUESTOFFERS))
            .unwrap();
        assert_eq!(
            msgtype(&linux_take(s.synic(), &mem, 0, 2).unwrap()),
            ChannelMessageType::OFFERCHANNEL
        );
    }

    #[test]
    fn a_guest_synic_not_set_up_gets_invalid_synic_state() {
        let (rec, mem, s) = server(1);
        // Nothing enabled.
        let e = s
            .post_message(0, &initiate_contact(version::WIN10_V5_3, 0))
            .unwrap_err();
        assert_eq!(e, PostError::Reply(DeliveryError::PageDisabled(0)));
        assert_eq!(e.status(), HvError::INVALID_SYNIC_STATE);
        // SINT 2 masked.
        linux_enable(s.synic(), 0);
        s.synic()
            .write_msr(0, msr::sint(2).unwrap(), 0x1_00F3)
            .unwrap();
        let e = s
            .post_message(0, &initiate_contact(version::WIN10_V5_3, 0))
            .unwrap_err();
        assert_eq!(
            e,
            PostError::Reply(DeliveryError::SintMasked { vp: 0, sint: 2 })
        );
        assert_eq!(e.status(), HvError::INVALID_SYNIC_STATE);
        // SIMP outside RAM.
        s.synic().write_msr(0, msr::sint(2).unwrap(), 0xF3).unwrap();
        s.synic()
            .write_msr(0, msr::SIMP, 0x10_0000_0000 | 1)
            .unwrap();
        let e = s
            .post_message(0, &initiate_contact(version::WIN10_V5_3, 0))
            .unwrap_err();
        assert_eq!(
            e,
            PostError::Reply(DeliveryError::PageOutsideRam {
                vp: 0,
                gpa: 0x10_0000_0200
            })
        );
        assert_eq!(e.status(), HvError::INVALID_SYNIC_STATE);
        assert_eq!(s.connection(), None, "nothing changed");
        assert!(rec.take().is_empty());
        let _ = mem;
    }

    #[test]
    fn malformed_posts_are_refused_with_their_status() {
        let (rec, _, s) = server(1);
        linux_enable(s.synic(), 0);
        let good = initiate_contact(version::WIN10_V5_3, 0);
        let with = |f: &dyn Fn(&mut InputPostMessage)| {
            let mut i = good;
            f(&mut i);
            s.post_message(0, &i)
        };
        let cases: Vec<(Result<(), PostError>, HvError)> = vec![
            (
                with(&|i| i.connection_id.set(2)),
                HvError::INVALID_CONNECTION_ID,
            ),
            (
                with(&|i| i.connection_id.set(0)),
                HvError::INVALID_CONNECTION_ID,
            ),
            (
                with(&|i| i.connection_id.set(0x0100_0004)),
                HvError::INVALID_CONNECTION_ID,
            ),
            (with(&|i| i.reserved.set(1)), HvError::INVALID_PARAMETER),
            (with(&|i| i.message_type.set(0)), HvError::INVALID_PARAMETER),
            (with(&|i| i.message_type.set(2)), HvError::INVALID_PARAMETER),
            (
                with(&|i| i.message_type.set(0x8000_0001)),
                HvError::INVALID_PARAMETER,
            ),
            (
                with(&|i| i.payload_size.set(241)),
                HvError::INVALID_PARAMETER,
            ),
            (
                with(&|i| i.payload_size.set(u32::MAX)),
                HvError::INVALID_PARAMETER,
            ),
            (with(&|i| i.payload_size.set(7)), HvError::INVALID_PARAMETER),
            (with(&|i| i.payload_size.set(0)), HvError::INVALID_PARAMETER),
            (
                with(&|i| i.payload_size.set(39)),
                HvError::INVALID_PARAMETER,
            ),
        ];
        let want = [
            PostError::InvalidConnectionId(2),
            PostError::InvalidConnectionId(0),
            PostError::InvalidConnectionId(0x0100_0004),
            PostError::ReservedNonZero(1),
            PostError::InvalidMessageType(0),
            PostError::InvalidMessageType(2),
            PostError::InvalidMessageType(0x8000_0001),
            PostError::PayloadTooLarge(241),
            PostError::PayloadTooLarge(u32::MAX),
            PostError::NoHeader(7),
            PostError::NoHeader(0),
            PostError::TruncatedMessage {
                msgtype: ChannelMessageType::INITIATE_CONTACT,
                size: 39,
                min: 40,
            },
        ];
        for ((got, status), want) in cases.into_iter().zip(want) {
            assert_eq!(got, Err(want));
            assert_eq!(want.status(), status, "{want}");
        }
        // Channel messages not served, and host-only ones.
        for t in [0, 1, 2, 4, 6, 10, 12, 15, 17, 22, 24, 25, 0xFFFF_FFFF] {
            let t = ChannelMessageType(t);
            let e = s.post_message(0, &header_only(1, t)).unwrap_err();
            assert_eq!(e, PostError::UnsupportedMessage(t));
            assert_eq!(e.status(), HvError::INVALID_PARAMETER);
        }
        // Served ones, cut short.
        for (t, min) in [(5, 148), (7, 12), (8, 20), (9, 16), (11, 16), (13, 12)] {
            let msgtype = ChannelMessageType(t);
            let e = s.post_message(0, &header_only(1, msgtype)).unwrap_err();
            assert_eq!(
                e,
                PostError::TruncatedMessage {
                    msgtype,
                    size: 8,
                    min
                }
            );
            assert_eq!(e.status(), HvError::INVALID_PARAMETER);
        }
        assert_eq!(
            s.post_message(0, &header_only(4, ChannelMessageType::UNLOAD)),
            Err(PostError::NotConnected(ChannelMessageType::UNLOAD))
        );
        // Nothing was delivered; the good one still works, and extra bytes
        // after a message are ignored.
        assert!(rec.take().is_empty());
        assert_eq!(with(&|i| i.payload_size.set(240)), Ok(()));
    }

    #[test]
    fn offers_are_bounded_and_unique() {
        let (_, _, s) = server(1);
        for i in 0..MAX_OFFERS {
            let g = Guid::from_fields(i as u32, 0, 0, [0; 8]);
            assert_eq!(
                s.add_offer(TEST_CLASS, g, Echo::shared()).unwrap().relid,
                i as u32 + 1
            );
        }
        assert_eq!(
            s.add_offer(
                TEST_CLASS,
                Guid::from_fields(0xFFFF, 0, 0, [0; 8]),
                Echo::shared()
            ),
            Err(OfferError::TooMany)
        );
        let (_, _, s) = server(1);
        s.add_offer(TEST_CLASS, INSTANCE_A, Echo::shared()).unwrap();
        assert_eq!(
            s.add_offer(TEST_CLASS, INSTANCE_A, Echo::shared()),
            Err(OfferError::DuplicateInstance(INSTANCE_A))
        );
        // A connection that has not requested offers yet may get more.
        let (_, mem, s) = server(1);
        linux_enable(s.synic(), 0);
        linux_connect(&s, &mem);
        assert!(s.add_offer(TEST_CLASS, INSTANCE_B, Echo::shared()).is_ok());
        s.reset();
        assert_eq!(s.connection(), None);
    }

    /// One step of a guest gone wrong.
    #[derive(Debug, Clone)]
    enum Step {
        /// HvCallPostMessage with these 256 bytes from this VP.
        Post(u32, Vec<u8>),
        /// The guest takes the slot of SINT 2 of a VP (EOM if pending).
        Take(u32),
        /// A guest WRMSR.
        Msr(u32, u32, u64),
    }

    /// Inputs close enough to valid ones to reach the server's handlers.
    fn near_valid_input() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec(any::<u8>(), 256),
            prop_oneof![Just(1u32), Just(4u32), any::<u32>()],
            prop_oneof![4 => Just(0u32), 1 => any::<u32>()],
            prop_oneof![4 => Just(1u32), 1 => any::<u32>()],
            prop_oneof![0u32..=240, any::<u32>()],
            prop_oneof![0u32..=30, any::<u32>()],
            prop_oneof![
                version::V6_0..=version::V6_0,
                0x4_0000u32..=0x5_0004,
                any::<u32>()
            ],
            prop_oneof![0u32..3, any::<u32>()],
            prop_oneof![0u8..17, any::<u8>()],
        )
            .prop_map(
                |(mut b, conn, rsvd, ty, size, msgtype, version, vp, sint)| {
                    b[0..4].copy_from_slice(&conn.to_le_bytes());
                    b[4..8].copy_from_slice(&rsvd.to_le_bytes());
                    b[8..12].copy_from_slice(&ty.to_le_bytes());
                    b[12..16].copy_from_slice(&size.to_le_bytes());
                    b[16..20].copy_from_slice(&msgtype.to_le_bytes());
                    b[24..28].copy_from_slice(&version.to_le_bytes());
                    b[28..32].copy_from_slice(&vp.to_le_bytes());
                    b[32] = sint;
                    b
                },
            )
    }

    fn step() -> impl Strategy<Value = Step> {
        let msrs = prop_oneof![
            Just(msr::SCONTROL),
            Just(msr::SVERSION),
            Just(msr::SIEFP),
            Just(msr::SIMP),
            Just(msr::EOM),
            msr::SINT0..=msr::SINT15,
            any::<u32>(),
        ];
        let values = prop_oneof![
            Just(0u64),
            Just(1u64),
            Just(0xF3u64),
            Just(0x1_00F3u64),
            Just(0x4001u64),
            Just(0x6001u64),
            any::<u64>(),
        ];
        prop_oneof![
            6 => (0u32..3, near_valid_input()).prop_map(|(vp, b)| Step::Post(vp, b)),
            2 => (0u32..3, prop::collection::vec(any::<u8>(), 256)).prop_map(|(vp, b)| Step::Post(vp, b)),
            3 => (0u32..3).prop_map(Step::Take),
            2 => (0u32..3, msrs, values).prop_map(|(vp, m, v)| Step::Msr(vp, m, v)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary post-message inputs, guest MSR writes and slot takes:
        /// no panic, every error has a non-success status, queues stay
        /// bounded.
        #[test]
        fn arbitrary_guests_cannot_panic_or_grow_queues(steps in prop::collection::vec(step(), 1..96)) {
            let (_, mem, s) = server(2);
            s.add_offer(TEST_CLASS, INSTANCE_A, Echo::shared()).unwrap();
            linux_enable(s.synic(), 0);
            linux_enable(s.synic(), 1);
            for step in steps {
                match step {
                    Step::Post(vp, bytes) => {
                        let input = InputPostMessage::read_from_bytes(&bytes).unwrap();
                        if let Err(e) = s.post_message(vp, &input) {
                            prop_assert!(HvError::ALL.contains(&e.status()), "{e}");
                        }
                    }
                    Step::Take(vp) => {
                        // Only where the test knows the page is RAM.
                        if s.synic().message_page(vp).is_some_and(|p| p + 0x1000 <= crate::synic::tests::RAM_SIZE) {
                            let at = vm_memory::GuestAddress(s.synic().message_page(vp).unwrap() + 0x200);
                            let _ = vm_memory::Bytes::store(&*mem, 0u32, at, Ordering::SeqCst);
                            s.synic().eom(vp);
                        }
                    }
                    Step::Msr(vp, m, v) => {
                        let _ = s.synic().write_msr(vp, m, v);
                        let _ = s.synic().read_msr(vp, m);
                    }
                }
                for vp in 0..3 {
                    for sint in 0..=16 {
                        prop_assert!(s.synic().queued(vp, sint) <= MESSAGE_QUEUE_DEPTH);
                    }
                }
            }
        }
    }
}
