//! A user-space SynIC (Hyper-V's synthetic interrupt controller), one per
//! virtual processor: its MSRs, message delivery into the guest's message
//! page (SIMP) and event flags in the event-flags page (SIEFP).
//!
//! # MSRs
//! [`Synic::read_msr`] and [`Synic::write_msr`] serve SCONTROL, SVERSION,
//! SIEFP, SIMP, EOM and SINT0..15 (see [`pviommu_abi::msr`]). A write the
//! model refuses returns an [`MsrError`]; the caller injects #GP, as
//! hardware does for a bad WRMSR. Refused are: a write to SVERSION
//! (read-only); a reserved bit set in SCONTROL (bits 63:1) or a SINT (bits
//! 15:8 and 63:19, including Linux's `as_intercept` and `proxy`, which a
//! guest that is not a root partition or paravisor client never sets: it
//! writes back what it read, and reads give 0 there); and an unmasked SINT
//! whose vector is below 16 (KVM refuses these too). SIMP and SIEFP bits
//! 11:1 are *preserved*, not reserved: they are kept as written and read
//! back. Their page may be anywhere: a page outside guest RAM is accepted
//! by the MSR and makes delivery fail later. EOM reads 0; any value written
//! acknowledges. Reset: SCONTROL enabled (like KVM's activated SynIC and
//! OpenVMM), SIMP and SIEFP disabled at GPA 0, every SINT masked with vector
//! 0. Pages are not zeroed when enabled (like KVM's SYNIC2: Linux passes
//! zeroed pages of its own).
//!
//! # Delivery and the busy slot
//! A message is delivered when SCONTROL and SIMP are enabled, the SINT is
//! unmasked and its slot (`SIMP + sint * 256`) is guest RAM; otherwise
//! [`Synic::post`] refuses it with a [`DeliveryError`] and keeps nothing.
//! Delivery writes bytes 4..256 of the message first and its type last
//! (a release store), then signals the SINT's vector through [`SintSink`]
//! (unless the SINT polls). Slot and interrupt go to guest RAM and the
//! sink only: no panic, whatever the guest's pages.
//!
//! A slot whose type is not HVMSG_NONE still holds a message the guest has
//! not taken. The new message is then queued (at most
//! [`MESSAGE_QUEUE_DEPTH`] per VP and SINT: [`DeliveryError::QueueFull`]
//! beyond) and the host atomically ORs `msg_pending` into the slot's flags,
//! then reads the type again. The guest frees a slot with
//! `cmpxchg(type, old, HVMSG_NONE)`, a full barrier, then reads
//! `msg_pending` and writes EOM only if it is set (Linux's
//! `vmbus_signal_eom`). Both sides store, fence, then load the other's
//! field, so at least one sees the other's store:
//! - the host's second read sees HVMSG_NONE: it delivers at once (the guest
//!   may then also see the pending bit and write a harmless extra EOM);
//! - or the guest sees `msg_pending`: it writes EOM, and [`Synic::eom`]
//!   retries every queue of that VP.
//!
//! A message written while more stay queued carries `msg_pending` itself,
//! so the guest's EOM after it fetches the next. Queued messages whose SINT
//! became undeliverable (masked, SIMP disabled) stay queued: an EOM or a
//! SynIC MSR write retries them. Every VP's state sits behind its own mutex;
//! the host side of the protocol runs under it, so posts from several
//! threads and the VP's own EOM exit are serialized.
//!
//! # Events
//! [`Synic::signal_event`] atomically sets a flag of the SINT's area in the
//! SIEFP page and signals the vector only on a 0 to 1 transition (as QEMU
//! and OpenVMM do). The OR is one byte wide; the guest clears the flags with
//! long-wide atomics, which x86 keeps coherent with it.
//!
//! Not modelled: auto-EOI (user-space injection cannot end the interrupt
//! for the guest; a guest that asks is logged once and gets a normal
//! interrupt; the DEPRECATING_AEOI hint keeps Linux from asking), SIRBP,
//! synthetic timers, and KVM's in-kernel SynIC (a later backend).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use pviommu_abi::{msr, HvError};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileMemory};
use zerocopy::IntoBytes;

use crate::abi::{
    self, HvMessage, HvMessageType, MessageFlags, SintMsr, SynicControl, SynicPageMsr,
    HV_MESSAGE_SIZE, SINT_COUNT, SYNIC_VERSION,
};

/// Messages a VP's SINT may hold queued behind its busy slot. 64 messages
/// of 256 bytes: at most 256 KiB a VP across its 16 SINTs.
pub const MESSAGE_QUEUE_DEPTH: usize = 64;

/// Where SINT interrupts go: the VMM delivers `vector` to VP `vp` (an MSI
/// to the local APIC whose id is the VP index, for pvmm).
///
/// Called with the VP's SynIC lock held: an implementation must not call
/// back into the [`Synic`].
pub trait SintSink: Send + Sync {
    /// Interrupt VP `vp` with `vector`.
    fn signal(&self, vp: u32, vector: u8);
}

/// A SynIC MSR access the model refuses: the caller injects #GP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsrError {
    /// The VP index is not one of the VM's.
    #[error("VP {0} does not exist")]
    UnknownVp(u32),
    /// The MSR is not one the SynIC serves.
    #[error("MSR {0:#x} is not a SynIC MSR")]
    NotSynic(u32),
    /// A write to a read-only MSR.
    #[error("MSR {0:#x} is read-only")]
    ReadOnly(u32),
    /// A write with a reserved bit set.
    #[error("MSR {msr:#x} written with reserved bits set: {value:#x}")]
    ReservedBits {
        /// The MSR.
        msr: u32,
        /// The value written.
        value: u64,
    },
    /// An unmasked SINT with an exception vector.
    #[error("SINT {sint} unmasked with vector {vector:#x}, below 16")]
    InvalidVector {
        /// The SINT.
        sint: u8,
        /// The vector written.
        vector: u8,
    },
}

/// Why a message or event was not delivered (nothing was queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The VP index is not one of the VM's.
    #[error("VP {0} does not exist")]
    UnknownVp(u32),
    /// The SINT is not 0..15.
    #[error("SINT {0} does not exist")]
    InvalidSint(u8),
    /// The event flag is not 0..2047.
    #[error("Event flag {0} does not exist")]
    InvalidFlag(u32),
    /// SCONTROL is disabled.
    #[error("SynIC of VP {0} is disabled")]
    SynicDisabled(u32),
    /// SIMP (for a message) or SIEFP (for an event) is disabled.
    #[error("SynIC page of VP {0} is disabled")]
    PageDisabled(u32),
    /// The SINT is masked.
    #[error("SINT {sint} of VP {vp} is masked")]
    SintMasked {
        /// The VP.
        vp: u32,
        /// The SINT.
        sint: u8,
    },
    /// The slot or flag's page is not guest RAM.
    #[error("SynIC page of VP {vp} at {gpa:#x} is outside guest RAM")]
    PageOutsideRam {
        /// The VP.
        vp: u32,
        /// The address the model tried.
        gpa: u64,
    },
    /// The message's type is HVMSG_NONE, which would look like a free slot
    /// (a host bug, not the guest's).
    #[error("Message of type HVMSG_NONE")]
    EmptyMessage,
    /// [`MESSAGE_QUEUE_DEPTH`] messages already wait for the slot.
    #[error("Message queue of VP {vp} SINT {sint} is full")]
    QueueFull {
        /// The VP.
        vp: u32,
        /// The SINT.
        sint: u8,
    },
}

impl DeliveryError {
    /// The HV_STATUS an HvCallPostMessage whose message (or reply) met this
    /// error returns (TLFS "HvCallPostMessage"):
    /// - INVALID_VP_INDEX (0x0E): the target VP does not exist;
    /// - INVALID_SYNIC_STATE (0x18): the target's SynIC or SIM page is
    ///   disabled; pvmm also returns it for a masked SINT (as the TLFS does
    ///   for HvSignalEvent) and for a page outside RAM;
    /// - INSUFFICIENT_BUFFERS (0x13): the queue is full (Linux retries);
    /// - INVALID_PARAMETER (0x05): no such SINT or flag, or a message of
    ///   type HVMSG_NONE.
    pub const fn status(&self) -> HvError {
        match self {
            Self::UnknownVp(_) => HvError::INVALID_VP_INDEX,
            Self::InvalidSint(_) | Self::InvalidFlag(_) | Self::EmptyMessage => {
                HvError::INVALID_PARAMETER
            }
            Self::SynicDisabled(_)
            | Self::PageDisabled(_)
            | Self::SintMasked { .. }
            | Self::PageOutsideRam { .. } => HvError::INVALID_SYNIC_STATE,
            Self::QueueFull { .. } => HvError::INSUFFICIENT_BUFFERS,
        }
    }
}

/// What [`Synic::post`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// Written into the slot (and the vector signalled unless the SINT
    /// polls).
    Delivered,
    /// Queued behind a busy slot, `msg_pending` set in the slot: an EOM
    /// delivers it.
    Queued,
}

/// One VP's SynIC.
#[derive(Debug)]
struct Vp {
    scontrol: SynicControl,
    simp: SynicPageMsr,
    siefp: SynicPageMsr,
    sints: [SintMsr; SINT_COUNT],
    queues: [VecDeque<HvMessage>; SINT_COUNT],
}

impl Default for Vp {
    fn default() -> Self {
        Self {
            scontrol: SynicControl::new().with_enable(true),
            simp: SynicPageMsr::new(),
            siefp: SynicPageMsr::new(),
            sints: [SintMsr::RESET; SINT_COUNT],
            queues: std::array::from_fn(|_| VecDeque::new()),
        }
    }
}

/// The SynICs of a VM's virtual processors, writing into guest memory `M`.
pub struct Synic<M> {
    mem: Arc<M>,
    sink: Arc<dyn SintSink>,
    vps: Box<[Mutex<Vp>]>,
    /// A guest set auto-EOI (logged once).
    auto_eoi_logged: AtomicBool,
}

impl<M> std::fmt::Debug for Synic<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synic")
            .field("vps", &self.vps.len())
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemory> Synic<M> {
    /// The SynICs of VPs `0..vcpus`, in reset state, delivering into `mem`
    /// and signalling through `sink`.
    pub fn new(vcpus: u32, mem: Arc<M>, sink: Arc<dyn SintSink>) -> Self {
        Self {
            mem,
            sink,
            vps: (0..vcpus).map(|_| Mutex::new(Vp::default())).collect(),
            auto_eoi_logged: AtomicBool::new(false),
        }
    }

    /// The guest memory messages and event flags go to.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// How many VPs there are.
    pub fn vcpus(&self) -> u32 {
        u32::try_from(self.vps.len()).unwrap_or(u32::MAX)
    }

    fn vp(&self, vp: u32) -> Option<MutexGuard<'_, Vp>> {
        let slot = self.vps.get(usize::try_from(vp).ok()?)?;
        Some(slot.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A guest RDMSR of `msr` on VP `vp`.
    pub fn read_msr(&self, vp: u32, msr: u32) -> Result<u64, MsrError> {
        let state = self.vp(vp).ok_or(MsrError::UnknownVp(vp))?;
        Ok(match msr {
            msr::SCONTROL => state.scontrol.into_bits(),
            msr::SVERSION => SYNIC_VERSION,
            msr::SIEFP => state.siefp.into_bits(),
            msr::SIMP => state.simp.into_bits(),
            msr::EOM => 0,
            _ => match msr::sint_of(msr) {
                Some(sint) => state.sints[usize::from(sint)].into_bits(),
                None => return Err(MsrError::NotSynic(msr)),
            },
        })
    }

    /// A guest WRMSR of `value` to `msr` on VP `vp`. An error means the
    /// write had no effect and the caller injects #GP (see the module
    /// documentation for what is refused). A write that may make queued
    /// messages deliverable (SCONTROL, SIMP, a SINT, EOM) retries them.
    pub fn write_msr(&self, vp: u32, msr: u32, value: u64) -> Result<(), MsrError> {
        let mut state = self.vp(vp).ok_or(MsrError::UnknownVp(vp))?;
        match msr {
            msr::SCONTROL => {
                let v = SynicControl::from_bits(value);
                if v.reserved() != 0 {
                    return Err(MsrError::ReservedBits { msr, value });
                }
                state.scontrol = v;
            }
            msr::SVERSION => return Err(MsrError::ReadOnly(msr)),
            msr::SIEFP => state.siefp = SynicPageMsr::from_bits(value),
            msr::SIMP => state.simp = SynicPageMsr::from_bits(value),
            msr::EOM => {}
            _ => {
                let sint = msr::sint_of(msr).ok_or(MsrError::NotSynic(msr))?;
                let v = SintMsr::from_bits(value);
                if value & !SintMsr::WRITABLE_MASK != 0 {
                    return Err(MsrError::ReservedBits { msr, value });
                }
                if !v.masked() && v.vector() < SintMsr::FIRST_VALID_VECTOR {
                    return Err(MsrError::InvalidVector {
                        sint,
                        vector: v.vector(),
                    });
                }
                if v.auto_eoi() && !self.auto_eoi_logged.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "SynIC: VP {vp} set auto-EOI on SINT {sint}; user-space delivery cannot honour it (interrupts need an EOI)"
                    );
                }
                state.sints[usize::from(sint)] = v;
            }
        }
        self.retry_all(vp, &mut state);
        Ok(())
    }

    /// An EOM from VP `vp` (a write to the EOM MSR): retries the queued
    /// messages of every SINT of the VP. Nothing happens for an unknown VP.
    pub fn eom(&self, vp: u32) {
        if let Some(mut state) = self.vp(vp) {
            self.retry_all(vp, &mut state);
        }
    }

    /// The message page's GPA of VP `vp`, `None` while SIMP is disabled.
    pub fn message_page(&self, vp: u32) -> Option<u64> {
        let state = self.vp(vp)?;
        state.simp.enable().then(|| state.simp.gpa())
    }

    /// The event-flags page's GPA of VP `vp`, `None` while SIEFP is
    /// disabled.
    pub fn event_flags_page(&self, vp: u32) -> Option<u64> {
        let state = self.vp(vp)?;
        state.siefp.enable().then(|| state.siefp.gpa())
    }

    /// Messages queued for VP `vp`'s SINT `sint` (0 for unknown ones).
    pub fn queued(&self, vp: u32, sint: u8) -> usize {
        self.vp(vp)
            .and_then(|state| state.queues.get(usize::from(sint)).map(VecDeque::len))
            .unwrap_or(0)
    }

    /// Whether `count` messages posted now to VP `vp`'s SINT `sint` would
    /// all be accepted (delivered or queued): the server checks this before
    /// a reply of several messages, so that it goes out whole or not at
    /// all (unless the guest reprograms the SynIC in between).
    pub fn can_post(&self, vp: u32, sint: u8, count: usize) -> Result<(), DeliveryError> {
        check_sint(sint)?;
        let state = self.vp(vp).ok_or(DeliveryError::UnknownVp(vp))?;
        self.deliverable(vp, &state, sint)?;
        let queued = state.queues[usize::from(sint)].len();
        if queued.saturating_add(count) > MESSAGE_QUEUE_DEPTH {
            return Err(DeliveryError::QueueFull { vp, sint });
        }
        Ok(())
    }

    /// Posts `message` to VP `vp`'s SINT `sint`: written into the slot
    /// when it is free, else queued behind it with `msg_pending` set (see
    /// the module documentation). An error means the message was neither
    /// delivered nor queued.
    pub fn post(&self, vp: u32, sint: u8, message: &HvMessage) -> Result<Posted, DeliveryError> {
        check_sint(sint)?;
        if message.header.message_type() == HvMessageType::NONE {
            return Err(DeliveryError::EmptyMessage);
        }
        let mut state = self.vp(vp).ok_or(DeliveryError::UnknownVp(vp))?;
        self.deliverable(vp, &state, sint)?;
        let i = usize::from(sint);
        if state.queues[i].len() >= MESSAGE_QUEUE_DEPTH {
            return Err(DeliveryError::QueueFull { vp, sint });
        }
        // Behind any older message, never ahead of it.
        state.queues[i].push_back(*message);
        if let Err(e) = self.flush(vp, &mut state, sint) {
            // Ours is the last: the flush stopped before it.
            state.queues[i].pop_back();
            return Err(e);
        }
        Ok(if state.queues[i].is_empty() {
            Posted::Delivered
        } else {
            Posted::Queued
        })
    }

    /// Sets flag `flag` of SINT `sint` in VP `vp`'s event-flags page and
    /// signals the SINT's vector if the flag was clear. `Ok(true)` when the
    /// flag went from 0 to 1.
    pub fn signal_event(&self, vp: u32, sint: u8, flag: u32) -> Result<bool, DeliveryError> {
        check_sint(sint)?;
        let (offset, bit) =
            abi::event_flag_position(sint, flag).ok_or(DeliveryError::InvalidFlag(flag))?;
        let state = self.vp(vp).ok_or(DeliveryError::UnknownVp(vp))?;
        if !state.scontrol.enable() {
            return Err(DeliveryError::SynicDisabled(vp));
        }
        if !state.siefp.enable() {
            return Err(DeliveryError::PageDisabled(vp));
        }
        let sint_reg = state.sints[usize::from(sint)];
        if sint_reg.masked() {
            return Err(DeliveryError::SintMasked { vp, sint });
        }
        // gpn < 2^52: the page's GPA plus an offset below 4 KiB fits.
        let gpa = state.siefp.gpa() | offset;
        let old =
            fetch_or_u8(&*self.mem, gpa, bit).ok_or(DeliveryError::PageOutsideRam { vp, gpa })?;
        if old & bit != 0 {
            return Ok(false);
        }
        if !sint_reg.polling() {
            self.sink.signal(vp, sint_reg.vector());
        }
        Ok(true)
    }

    /// The slot's GPA when SINT `sint` of `state` may take a message now.
    fn deliverable(&self, vp: u32, state: &Vp, sint: u8) -> Result<u64, DeliveryError> {
        if !state.scontrol.enable() {
            return Err(DeliveryError::SynicDisabled(vp));
        }
        if !state.simp.enable() {
            return Err(DeliveryError::PageDisabled(vp));
        }
        if state.sints[usize::from(sint)].masked() {
            return Err(DeliveryError::SintMasked { vp, sint });
        }
        // gpn < 2^52 and the offset is below 4 KiB: no overflow.
        let gpa = state.simp.gpa() | abi::message_slot_offset(sint);
        if !self
            .mem
            .check_range(GuestAddress(gpa), HV_MESSAGE_SIZE, Permissions::ReadWrite)
        {
            return Err(DeliveryError::PageOutsideRam { vp, gpa });
        }
        Ok(gpa)
    }

    /// Retries the queues of every SINT of `state`; a SINT that cannot take
    /// messages now keeps them.
    fn retry_all(&self, vp: u32, state: &mut Vp) {
        for sint in 0..SINT_COUNT {
            // SINT_COUNT is 16.
            #[allow(clippy::cast_possible_truncation)]
            let sint = sint as u8;
            if !state.queues[usize::from(sint)].is_empty() {
                // Undeliverable now: stays queued for the next EOM or MSR
                // write.
                let _ = self.flush(vp, state, sint);
            }
        }
    }

    /// Delivers queued messages of SINT `sint` in order while its slot is
    /// free; stops at a busy slot (after setting its `msg_pending`).
    fn flush(&self, vp: u32, state: &mut Vp, sint: u8) -> Result<(), DeliveryError> {
        let i = usize::from(sint);
        while let Some(front) = state.queues[i].front() {
            let gpa = self.deliverable(vp, state, sint)?;
            let more = state.queues[i].len() > 1;
            if !write_slot(&*self.mem, gpa, front, more)
                .ok_or(DeliveryError::PageOutsideRam { vp, gpa })?
            {
                break;
            }
            state.queues[i].pop_front();
            let sint_reg = state.sints[i];
            if !sint_reg.polling() {
                self.sink.signal(vp, sint_reg.vector());
            }
        }
        Ok(())
    }
}

fn check_sint(sint: u8) -> Result<(), DeliveryError> {
    if usize::from(sint) < SINT_COUNT {
        Ok(())
    } else {
        Err(DeliveryError::InvalidSint(sint))
    }
}

/// Writes `message` into the slot at `gpa` if it is free, with
/// `msg_pending` set when `more` wait. `Some(false)`: the slot is busy and
/// its `msg_pending` is now set. `None`: the slot is not guest RAM.
fn write_slot<M: GuestMemory + ?Sized>(
    mem: &M,
    gpa: u64,
    message: &HvMessage,
    more: bool,
) -> Option<bool> {
    let slot = GuestAddress(gpa);
    let busy = |order| {
        mem.load::<u32>(slot, order)
            .ok()
            .map(|t| t != HvMessageType::NONE.0)
    };
    if busy(Ordering::Acquire)? {
        // Ask for an EOM, then look again: the guest may have freed the
        // slot before it could see the flag (module documentation).
        let flags = gpa.checked_add(HvMessage::FLAGS_OFFSET)?;
        let pending = MessageFlags::new().with_msg_pending(true).into_bits();
        fetch_or_u8(mem, flags, pending)?;
        if busy(Ordering::SeqCst)? {
            return Some(false);
        }
    }
    let mut m = *message;
    m.header.message_flags = MessageFlags::from_bits(m.header.message_flags)
        .with_msg_pending(more)
        .into_bits();
    // Everything but the type, then the type: the guest reads the slot
    // only once the type is not HVMSG_NONE.
    let body = m.as_bytes().get(4..)?;
    mem.write_slice(body, slot.checked_add(4)?).ok()?;
    mem.store(m.header.message_type.get(), slot, Ordering::Release)
        .ok()?;
    Some(true)
}

/// Atomically ORs `bits` into the guest byte at `gpa`; the old value, or
/// `None` when the byte is not guest RAM.
fn fetch_or_u8<M: GuestMemory + ?Sized>(mem: &M, gpa: u64, bits: u8) -> Option<u8> {
    let mut slices = mem
        .get_slices(GuestAddress(gpa), 1, Permissions::ReadWrite)
        .ok()?;
    let slice = slices.next()?.ok()?;
    let byte = slice.get_atomic_ref::<AtomicU8>(0).ok()?;
    Some(byte.fetch_or(bits, Ordering::SeqCst))
}

#[cfg(test)]
// Test constants are small.
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;
    use crate::abi::HvMessageHeader;
    use vm_memory::GuestMemoryMmap;
    use zerocopy::FromBytes;

    /// Guest RAM of the tests: 16 pages at 0.
    pub(crate) const RAM_SIZE: u64 = 0x1_0000;
    /// Linux's HYPERVISOR_CALLBACK_VECTOR.
    pub(crate) const VECTOR: u8 = 0xF3;
    pub(crate) const SIMP_GPA: [u64; 2] = [0x4000, 0x6000];
    pub(crate) const SIEFP_GPA: [u64; 2] = [0x5000, 0x7000];

    /// A sink that records what it was given.
    #[derive(Default)]
    pub(crate) struct Recorder(pub(crate) Mutex<Vec<(u32, u8)>>);

    impl Recorder {
        pub(crate) fn take(&self) -> Vec<(u32, u8)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl SintSink for Recorder {
        fn signal(&self, vp: u32, vector: u8) {
            self.0.lock().unwrap().push((vp, vector));
        }
    }

    pub(crate) fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).unwrap())
    }

    /// Two VPs, nothing programmed.
    pub(crate) fn synic() -> (Arc<Recorder>, Arc<GuestMemoryMmap>, Synic<GuestMemoryMmap>) {
        let rec = Arc::new(Recorder::default());
        let mem = memory();
        let s = Synic::new(2, mem.clone(), rec.clone());
        (rec, mem, s)
    }

    /// What Linux's `hv_hyp_synic_enable_regs` does on VP `vp`: SIMP,
    /// SIEFP, SINT2 (read-modify-write, no auto-EOI), SCONTROL.
    pub(crate) fn linux_enable(s: &Synic<GuestMemoryMmap>, vp: u32) {
        let i = vp as usize;
        let simp = s.read_msr(vp, msr::SIMP).unwrap();
        s.write_msr(vp, msr::SIMP, simp | SIMP_GPA[i] | 1).unwrap();
        let siefp = s.read_msr(vp, msr::SIEFP).unwrap();
        s.write_msr(vp, msr::SIEFP, siefp | SIEFP_GPA[i] | 1)
            .unwrap();
        let sint2 = SintMsr::from_bits(s.read_msr(vp, msr::sint(2).unwrap()).unwrap())
            .with_vector(VECTOR)
            .with_masked(false)
            .with_auto_eoi(false);
        s.write_msr(vp, msr::sint(2).unwrap(), sint2.into_bits())
            .unwrap();
        let sc = s.read_msr(vp, msr::SCONTROL).unwrap();
        s.write_msr(vp, msr::SCONTROL, sc | 1).unwrap();
    }

    pub(crate) fn slot(mem: &GuestMemoryMmap, vp: u32, sint: u8) -> HvMessage {
        let mut b = [0u8; 256];
        mem.read_slice(
            &mut b,
            GuestAddress(SIMP_GPA[vp as usize] + u64::from(sint) * 256),
        )
        .unwrap();
        HvMessage::read_from_bytes(&b).unwrap()
    }

    /// Linux's `vmbus_signal_eom` after taking the slot: free it, then EOM
    /// if the host asked. Returns the message taken, if any.
    pub(crate) fn linux_take(
        s: &Synic<GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        vp: u32,
        sint: u8,
    ) -> Option<HvMessage> {
        let m = slot(mem, vp, sint);
        if m.header.message_type() == HvMessageType::NONE {
            return None;
        }
        let at = GuestAddress(SIMP_GPA[vp as usize] + u64::from(sint) * 256);
        mem.store(0u32, at, Ordering::SeqCst).unwrap();
        let flags: u8 = mem.load(at.unchecked_add(5), Ordering::SeqCst).unwrap();
        if MessageFlags::from_bits(flags).msg_pending() {
            s.write_msr(vp, msr::EOM, 0).unwrap();
        }
        Some(m)
    }

    fn msg(tag: u8) -> HvMessage {
        HvMessage::new(HvMessageType::CHANNEL, &[tag; 24]).unwrap()
    }

    #[test]
    fn reset_values_and_reads() {
        let (_, _, s) = synic();
        assert_eq!(s.read_msr(0, msr::SCONTROL), Ok(1));
        assert_eq!(s.read_msr(0, msr::SVERSION), Ok(1));
        assert_eq!(s.read_msr(0, msr::SIMP), Ok(0));
        assert_eq!(s.read_msr(0, msr::SIEFP), Ok(0));
        assert_eq!(s.read_msr(0, msr::EOM), Ok(0));
        for sint in 0..16 {
            assert_eq!(s.read_msr(1, msr::sint(sint).unwrap()), Ok(0x1_0000));
        }
        assert_eq!(s.read_msr(2, msr::SCONTROL), Err(MsrError::UnknownVp(2)));
        assert_eq!(
            s.read_msr(0, 0x4000_0085),
            Err(MsrError::NotSynic(0x4000_0085))
        );
        assert_eq!(s.message_page(0), None);
        assert_eq!(s.event_flags_page(0), None);
        assert_eq!(s.vcpus(), 2);
    }

    #[test]
    fn msr_writes_are_validated() {
        let (_, _, s) = synic();
        let sint2 = msr::sint(2).unwrap();
        assert_eq!(
            s.write_msr(0, msr::SVERSION, 1),
            Err(MsrError::ReadOnly(msr::SVERSION))
        );
        assert_eq!(
            s.write_msr(0, msr::SCONTROL, 3),
            Err(MsrError::ReservedBits {
                msr: msr::SCONTROL,
                value: 3
            })
        );
        for bit in (8..16).chain(19..64) {
            assert_eq!(
                s.write_msr(0, sint2, 0xF3 | 1 << bit),
                Err(MsrError::ReservedBits {
                    msr: sint2,
                    value: 0xF3 | 1 << bit
                }),
                "bit {bit}"
            );
        }
        assert_eq!(
            s.write_msr(0, sint2, 0x0F),
            Err(MsrError::InvalidVector {
                sint: 2,
                vector: 0x0F
            })
        );
        // Refused writes changed nothing.
        assert_eq!(s.read_msr(0, msr::SCONTROL), Ok(1));
        assert_eq!(s.read_msr(0, sint2), Ok(0x1_0000));
        // A masked SINT may keep a low vector (Linux's disable path keeps
        // whatever vector it read).
        assert_eq!(s.write_msr(0, sint2, 0x1_0000 | 0x0F), Ok(()));
        assert_eq!(s.write_msr(0, sint2, 0x4_00F3), Ok(()), "polling");
        assert_eq!(s.write_msr(0, sint2, 0x2_00F3), Ok(()), "auto-EOI, logged");
        assert_eq!(s.read_msr(0, sint2), Ok(0x2_00F3));
        // SIMP/SIEFP: preserved bits kept, any page accepted.
        assert_eq!(s.write_msr(0, msr::SIMP, 0xFFFF_FFFF_FFFF_FFFF), Ok(()));
        assert_eq!(s.read_msr(0, msr::SIMP), Ok(u64::MAX));
        assert_eq!(s.message_page(0), Some(0xFFFF_FFFF_FFFF_F000));
        assert_eq!(s.write_msr(0, msr::SIEFP, 0x5FFE), Ok(()));
        assert_eq!(s.event_flags_page(0), None, "disabled, preserved bits kept");
        assert_eq!(s.read_msr(0, msr::SIEFP), Ok(0x5FFE));
        assert_eq!(s.write_msr(0, msr::EOM, 0x1234), Ok(()));
        assert_eq!(
            s.write_msr(0, 0x4000_00A0, 0),
            Err(MsrError::NotSynic(0x4000_00A0))
        );
        assert_eq!(s.write_msr(5, msr::EOM, 0), Err(MsrError::UnknownVp(5)));
    }

    #[test]
    fn a_free_slot_takes_the_message_and_the_vector_is_signalled() {
        let (rec, mem, s) = synic();
        linux_enable(&s, 1);
        assert_eq!(s.message_page(1), Some(SIMP_GPA[1]));
        assert_eq!(s.post(1, 2, &msg(0xA1)), Ok(Posted::Delivered));
        assert_eq!(rec.take(), [(1, VECTOR)]);
        let m = slot(&mem, 1, 2);
        assert_eq!(m, msg(0xA1));
        assert_eq!(m.header.message_type(), HvMessageType::CHANNEL);
        assert!(!m.header.flags().msg_pending());
        // Nothing went to another slot or VP.
        assert_eq!(slot(&mem, 1, 1).header, HvMessageHeader::default());
        assert_eq!(slot(&mem, 1, 3).header, HvMessageHeader::default());
    }

    #[test]
    fn a_busy_slot_queues_sets_pending_and_eom_delivers() {
        let (rec, mem, s) = synic();
        linux_enable(&s, 0);
        assert_eq!(s.post(0, 2, &msg(1)), Ok(Posted::Delivered));
        assert_eq!(s.post(0, 2, &msg(2)), Ok(Posted::Queued));
        assert_eq!(s.post(0, 2, &msg(3)), Ok(Posted::Queued));
        assert_eq!(rec.take(), [(0, VECTOR)]);
        assert_eq!(s.queued(0, 2), 2);
        // The host asked for an EOM in the busy slot.
        assert!(slot(&mem, 0, 2).header.flags().msg_pending());
        // The guest takes message 1 and EOMs: message 2 arrives, pending
        // set because message 3 waits.
        assert_eq!(linux_take(&s, &mem, 0, 2).unwrap().payload(), &[1; 24]);
        assert_eq!(rec.take(), [(0, VECTOR)]);
        let m2 = slot(&mem, 0, 2);
        assert_eq!(m2.payload(), &[2; 24]);
        assert!(m2.header.flags().msg_pending());
        assert_eq!(linux_take(&s, &mem, 0, 2).unwrap().payload(), &[2; 24]);
        let m3 = slot(&mem, 0, 2);
        assert_eq!(m3.payload(), &[3; 24]);
        assert!(!m3.header.flags().msg_pending(), "the last one");
        assert_eq!(s.queued(0, 2), 0);
        // No pending flag: the guest does not EOM, nothing else arrives.
        assert_eq!(linux_take(&s, &mem, 0, 2).unwrap().payload(), &[3; 24]);
        assert_eq!(linux_take(&s, &mem, 0, 2), None);
        assert_eq!(rec.take(), [(0, VECTOR)], "message 3's");
    }

    #[test]
    fn a_slot_freed_without_an_eom_is_found_on_the_next_post() {
        // The race's other side: the guest freed the slot before the host
        // set msg_pending, so it never EOMs; the host's re-read finds the
        // slot free and delivers.
        let (rec, mem, s) = synic();
        linux_enable(&s, 0);
        s.post(0, 2, &msg(1)).unwrap();
        let at = GuestAddress(SIMP_GPA[0] + 0x200);
        mem.store(0u32, at, Ordering::SeqCst).unwrap();
        assert_eq!(s.post(0, 2, &msg(2)), Ok(Posted::Delivered));
        assert_eq!(slot(&mem, 0, 2).payload(), &[2; 24]);
        assert_eq!(rec.take().len(), 2);
    }

    #[test]
    fn an_eom_with_an_empty_queue_is_harmless() {
        let (rec, mem, s) = synic();
        linux_enable(&s, 0);
        s.eom(0);
        s.eom(7);
        s.post(0, 2, &msg(1)).unwrap();
        s.eom(0);
        assert_eq!(slot(&mem, 0, 2).payload(), &[1; 24]);
        assert_eq!(rec.take().len(), 1);
    }

    #[test]
    fn undeliverable_messages_are_refused_not_queued() {
        let (rec, _, s) = synic();
        assert_eq!(
            s.post(0, 2, &msg(1)),
            Err(DeliveryError::PageDisabled(0)),
            "SIMP disabled at reset"
        );
        linux_enable(&s, 0);
        s.write_msr(0, msr::sint(2).unwrap(), 0x1_00F3).unwrap();
        assert_eq!(
            s.post(0, 2, &msg(1)),
            Err(DeliveryError::SintMasked { vp: 0, sint: 2 })
        );
        assert_eq!(
            s.post(0, 3, &msg(1)),
            Err(DeliveryError::SintMasked { vp: 0, sint: 3 })
        );
        s.write_msr(0, msr::sint(2).unwrap(), 0xF3).unwrap();
        s.write_msr(0, msr::SCONTROL, 0).unwrap();
        assert_eq!(s.post(0, 2, &msg(1)), Err(DeliveryError::SynicDisabled(0)));
        s.write_msr(0, msr::SCONTROL, 1).unwrap();
        assert_eq!(s.post(2, 2, &msg(1)), Err(DeliveryError::UnknownVp(2)));
        assert_eq!(s.post(0, 16, &msg(1)), Err(DeliveryError::InvalidSint(16)));
        let empty = HvMessage::new(HvMessageType::NONE, &[1]).unwrap();
        assert_eq!(s.post(0, 2, &empty), Err(DeliveryError::EmptyMessage));
        assert_eq!(s.queued(0, 2), 0);
        assert!(rec.take().is_empty());
        assert_eq!(s.post(0, 2, &msg(1)), Ok(Posted::Delivered));
    }

    #[test]
    fn a_message_page_outside_ram_is_refused() {
        let (rec, _, s) = synic();
        linux_enable(&s, 0);
        for simp in [RAM_SIZE | 1, 0xFFFF_FFFF_FFFF_F001] {
            s.write_msr(0, msr::SIMP, simp).unwrap();
            let gpa = (simp & !0xFFF) + 0x200;
            assert_eq!(
                s.post(0, 2, &msg(1)),
                Err(DeliveryError::PageOutsideRam { vp: 0, gpa })
            );
            assert_eq!(
                s.can_post(0, 2, 1),
                Err(DeliveryError::PageOutsideRam { vp: 0, gpa })
            );
        }
        assert!(rec.take().is_empty());
        // Events too.
        s.write_msr(0, msr::SIEFP, RAM_SIZE | 1).unwrap();
        assert_eq!(
            s.signal_event(0, 2, 1),
            Err(DeliveryError::PageOutsideRam {
                vp: 0,
                gpa: RAM_SIZE + 0x200
            })
        );
    }

    #[test]
    fn a_full_queue_refuses_and_keeps_memory_bounded() {
        let (rec, mem, s) = synic();
        linux_enable(&s, 0);
        assert_eq!(s.post(0, 2, &msg(0)), Ok(Posted::Delivered));
        for i in 0..MESSAGE_QUEUE_DEPTH {
            assert_eq!(s.post(0, 2, &msg(i as u8)), Ok(Posted::Queued), "{i}");
        }
        assert_eq!(
            s.can_post(0, 2, 1),
            Err(DeliveryError::QueueFull { vp: 0, sint: 2 })
        );
        let e = s.post(0, 2, &msg(0xFF)).unwrap_err();
        assert_eq!(e, DeliveryError::QueueFull { vp: 0, sint: 2 });
        assert_eq!(e.status(), HvError::INSUFFICIENT_BUFFERS);
        assert_eq!(s.queued(0, 2), MESSAGE_QUEUE_DEPTH);
        // Taking one makes room for one.
        linux_take(&s, &mem, 0, 2).unwrap();
        assert_eq!(s.queued(0, 2), MESSAGE_QUEUE_DEPTH - 1);
        assert_eq!(s.can_post(0, 2, 1), Ok(()));
        assert_eq!(
            s.can_post(0, 2, 2),
            Err(DeliveryError::QueueFull { vp: 0, sint: 2 })
        );
        assert_eq!(s.post(0, 2, &msg(0xFE)), Ok(Posted::Queued));
        // The guest drains them all, in order.
        let mut got = vec![];
        while let Some(m) = linux_take(&s, &mem, 0, 2) {
            got.push(m.payload()[0]);
        }
        let mut want: Vec<u8> = (0..MESSAGE_QUEUE_DEPTH as u8).collect();
        want.push(0xFE);
        assert_eq!(got, want);
        assert_eq!(rec.take().len(), 2 + MESSAGE_QUEUE_DEPTH);
    }

    #[test]
    fn queued_messages_wait_for_an_unmask_then_flow() {
        let (rec, mem, s) = synic();
        linux_enable(&s, 0);
        s.post(0, 2, &msg(1)).unwrap();
        s.post(0, 2, &msg(2)).unwrap();
        // The guest masks the SINT, then frees the slot (EOM included).
        s.write_msr(0, msr::sint(2).unwrap(), 0x1_00F3).unwrap();
        linux_take(&s, &mem, 0, 2).unwrap();
        assert_eq!(s.queued(0, 2), 1, "kept while masked");
        assert_eq!(linux_take(&s, &mem, 0, 2), None);
        rec.take();
        // Unmasking delivers it.
        s.write_msr(0, msr::sint(2).unwrap(), 0xF3).unwrap();
        assert_eq!(slot(&mem, 0, 2).payload(), &[2; 24]);
        assert_eq!(rec.take(), [(0, VECTOR)]);
    }

    #[test]
    fn a_polling_sint_gets_messages_without_interrupts() {
        let (rec, mem, s) = synic();
        linux_enable(&s, 0);
        s.write_msr(0, msr::sint(2).unwrap(), 0x4_00F3).unwrap();
        assert_eq!(s.post(0, 2, &msg(1)), Ok(Posted::Delivered));
        assert_eq!(slot(&mem, 0, 2).payload(), &[1; 24]);
        assert_eq!(s.signal_event(0, 2, 5), Ok(true));
        assert!(rec.take().is_empty());
    }

    #[test]
    fn events_set_their_bit_and_signal_once() {
        let (rec, mem, s) = synic();
        assert_eq!(s.signal_event(0, 2, 1), Err(DeliveryError::PageDisabled(0)));
        linux_enable(&s, 1);
        assert_eq!(s.signal_event(1, 2, 9), Ok(true));
        assert_eq!(s.signal_event(1, 2, 9), Ok(false), "already set");
        assert_eq!(s.signal_event(1, 2, 2047), Ok(true));
        assert_eq!(rec.take(), [(1, VECTOR), (1, VECTOR)]);
        let area = SIEFP_GPA[1] + 2 * 256;
        let b: u8 = mem.read_obj(GuestAddress(area + 1)).unwrap();
        assert_eq!(b, 0b10);
        let b: u8 = mem.read_obj(GuestAddress(area + 255)).unwrap();
        assert_eq!(b, 0x80);
        assert_eq!(
            s.signal_event(1, 2, 2048),
            Err(DeliveryError::InvalidFlag(2048))
        );
        assert_eq!(
            s.signal_event(1, 16, 0),
            Err(DeliveryError::InvalidSint(16))
        );
        assert_eq!(
            s.signal_event(1, 3, 0),
            Err(DeliveryError::SintMasked { vp: 1, sint: 3 })
        );
        assert_eq!(s.signal_event(9, 2, 0), Err(DeliveryError::UnknownVp(9)));
        s.write_msr(1, msr::SCONTROL, 0).unwrap();
        assert_eq!(
            s.signal_event(1, 2, 0),
            Err(DeliveryError::SynicDisabled(1))
        );
        // Other SINTs' areas untouched.
        let mut other = [0u8; 256];
        mem.read_slice(&mut other, GuestAddress(SIEFP_GPA[1] + 3 * 256))
            .unwrap();
        assert_eq!(other, [0; 256]);
    }

    #[test]
    fn delivery_errors_map_to_tlfs_statuses() {
        let cases = [
            (DeliveryError::UnknownVp(3), HvError::INVALID_VP_INDEX),
            (DeliveryError::InvalidSint(16), HvError::INVALID_PARAMETER),
            (DeliveryError::InvalidFlag(4096), HvError::INVALID_PARAMETER),
            (DeliveryError::EmptyMessage, HvError::INVALID_PARAMETER),
            (
                DeliveryError::SynicDisabled(0),
                HvError::INVALID_SYNIC_STATE,
            ),
            (DeliveryError::PageDisabled(0), HvError::INVALID_SYNIC_STATE),
            (
                DeliveryError::SintMasked { vp: 0, sint: 2 },
                HvError::INVALID_SYNIC_STATE,
            ),
            (
                DeliveryError::PageOutsideRam { vp: 0, gpa: 0 },
                HvError::INVALID_SYNIC_STATE,
            ),
            (
                DeliveryError::QueueFull { vp: 0, sint: 2 },
                HvError::INSUFFICIENT_BUFFERS,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.status(), status, "{e}");
        }
    }

    #[test]
    fn posts_from_many_threads_all_arrive_in_per_thread_order() {
        // Two host threads post while the guest's VP takes messages: every
        // message accepted arrives once; each thread's arrive in order.
        let (_, mem, s) = synic();
        linux_enable(&s, 0);
        let s = Arc::new(s);
        let per_thread = 200u8;
        let posters: Vec<_> = (0..2u8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut sent = vec![];
                    for i in 0..per_thread {
                        let m = HvMessage::new(HvMessageType::CHANNEL, &[t, i]).unwrap();
                        loop {
                            match s.post(0, 2, &m) {
                                Ok(_) => break,
                                Err(DeliveryError::QueueFull { .. }) => std::thread::yield_now(),
                                Err(e) => panic!("{e}"),
                            }
                        }
                        sent.push(i);
                    }
                    sent
                })
            })
            .collect();
        let mut got: [Vec<u8>; 2] = [vec![], vec![]];
        while got[0].len() + got[1].len() < 2 * per_thread as usize {
            match linux_take(&s, &mem, 0, 2) {
                Some(m) => got[usize::from(m.payload()[0])].push(m.payload()[1]),
                None => std::thread::yield_now(),
            }
        }
        for p in posters {
            p.join().unwrap();
        }
        let want: Vec<u8> = (0..per_thread).collect();
        assert_eq!(got, [want.clone(), want]);
        assert_eq!(s.queued(0, 2), 0);
    }
}
