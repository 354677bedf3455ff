//! vmbus (run only when named in `tk.tests`): VMBus's connect sequence
//! through pvmm's user-space SynIC, end to end, the way Linux's `hv_vmbus`
//! does it, and the message round trip as a figure.
//!
//! Where CPUID offers the SynIC and post messages: the guest programs SIMP,
//! SIEFP, SINT2 (vector [`idt::LINE_VECTOR`], no auto-EOI) and SCONTROL,
//! posts INITIATE_CONTACT for 6.0 (refused) and 5.3 (accepted) and takes
//! each VERSION_RESPONSE from its SINT2 slot after the interrupt, posts
//! REQUESTOFFERS (ALLOFFERS_DELIVERED: pvmm offers nothing yet), a GPADL
//! for a channel that was never offered (GPADL_CREATED with a failure),
//! malformed posts (their statuses), times REQUESTOFFERS round trips
//! against a refused post, and unloads (UNLOAD_RESPONSE). Where CPUID does
//! not offer them (`--vmbus off`): POST_MESSAGE must not exist.

use super::{median, ratio};
use crate::idt;
use crate::pviommu::{self as hv, Io};
use crate::smp::{self, Lapic};
use crate::tap::Verdict;
use crate::{diag, fail, x86, Ctx};
use core::sync::atomic::Ordering;
use pviommu_abi::{msr, HvStatus, HypercallCode, InputPostMessage};
use vmbus_abi::{
    message_slot_offset, version, ChannelMessageHeader, ChannelMessageType, GpaRange, GpadlCreated,
    GpadlHeader, HvMessage, HvMessageType, InitiateContact, MessageFlags, SintMsr, VersionResponse,
    STATUS_UNSUCCESSFUL, VMBUS_MESSAGE_CONNECTION_ID, VMBUS_MESSAGE_CONNECTION_ID_4,
    VMBUS_MESSAGE_SINT,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

extern "C" {
    /// The SynIC's message page, then its event-flags page (boot.S).
    static HV_SYNIC_PAGES: u8;
}

const PAGE: u64 = 4096;
const ROUNDS: usize = 200;
/// How long a reply may take to arrive, in ms of [`x86::TSC_PER_MS`].
const REPLY_MS: u64 = 1000;

fn message_page() -> u64 {
    core::ptr::addr_of!(HV_SYNIC_PAGES) as u64
}

fn slot() -> u64 {
    message_page() + message_slot_offset(VMBUS_MESSAGE_SINT)
}

/// The SINT2 slot's message type (volatile: the VMM writes it).
fn slot_type() -> u32 {
    // SAFETY: the kernel's own message page, mapped and aligned.
    unsafe { x86::mmio_read::<u32>(slot()) }
}

/// Takes the message out of the SINT2 slot as Linux's `vmbus_signal_eom`
/// does: copy, type NONE, and EOM if the VMM left one pending.
fn take() -> HvMessage {
    let mut raw = [0u8; 256];
    for (i, b) in raw.iter_mut().enumerate() {
        // SAFETY: inside the kernel's own message page.
        *b = unsafe { x86::mmio_read(slot() + i as u64) };
    }
    let m = HvMessage::read_from_bytes(&raw).unwrap_or_else(|_| HvMessage::new_zeroed());
    // SAFETY: as above.
    unsafe { x86::mmio_write::<u32>(slot(), HvMessageType::NONE.0) };
    if MessageFlags::from_bits(m.header.message_flags).msg_pending() {
        x86::wrmsr(msr::EOM, 0);
    }
    m
}

/// Waits (interrupts on) for a SINT2 interrupt and a message in the slot;
/// the message and the interrupts that came.
fn wait_interrupt() -> Option<(HvMessage, u64)> {
    let before = idt::LINE_INTERRUPTS.load(Ordering::Acquire);
    x86::sti();
    let start = x86::rdtsc();
    while (idt::LINE_INTERRUPTS.load(Ordering::Acquire) == before
        || slot_type() == HvMessageType::NONE.0)
        && x86::rdtsc().wrapping_sub(start) < REPLY_MS * x86::TSC_PER_MS
    {
        core::hint::spin_loop();
    }
    x86::cli();
    let came = idt::LINE_INTERRUPTS.load(Ordering::Acquire) - before;
    (slot_type() != HvMessageType::NONE.0).then(|| (take(), came))
}

fn post(io: &Io, connection: u32, payload: &[u8]) -> HvStatus {
    let Some(input) = InputPostMessage::new(connection, HvMessageType::CHANNEL.0, payload) else {
        return HvStatus::INVALID_PARAMETER;
    };
    hv::simple(io, HypercallCode::POST_MESSAGE, input.as_bytes()).status
}

fn msgtype(m: &HvMessage) -> ChannelMessageType {
    ChannelMessageHeader::read_from_prefix(&m.payload)
        .map_or(ChannelMessageType::INVALID, |(h, _)| h.msgtype())
}

fn contact(requested: u32) -> InitiateContact {
    InitiateContact {
        header: ChannelMessageHeader::new(ChannelMessageType::INITIATE_CONTACT),
        vmbus_version_requested: requested.into(),
        target_vcpu: 0.into(),
        interrupt_page_or_target_info: InitiateContact::target_info(VMBUS_MESSAGE_SINT, 0, 0),
        ..Default::default()
    }
}

pub fn run(_ctx: &Ctx) -> Verdict {
    if let Err(e) = hv::detect_hyperv() {
        return Ok(Some(e));
    }
    if let Err(e) = hv::enable(0x8100_0000_0001_0000) {
        fail!("{}", e);
    }
    let io = Io::of(0);
    let (privileges, features, _, _) = x86::cpuid(0x4000_0003, 0);
    let offered = privileges & 1 << 2 != 0 && features & 1 << 4 != 0;
    if !offered {
        let s = post(
            &io,
            VMBUS_MESSAGE_CONNECTION_ID_4,
            contact(version::WIN10_V5_3).as_bytes(),
        );
        if s != HvStatus::INVALID_HYPERCALL_CODE {
            fail!(
                "no SynIC in CPUID, yet POST_MESSAGE returned {}",
                hv::status_name(s)
            );
        }
        diag!("vmbus: not offered (CPUID); POST_MESSAGE does not exist");
        return Ok(None);
    }

    // SINT interrupts come through this CPU's local APIC, as MSIs.
    let lapic = Lapic::current();
    if !smp::lapic_mapped(lapic) {
        fail!("the local APIC is outside the identity map");
    }
    lapic.enable();
    smp::set_eoi(lapic);

    // Linux's hv_hyp_synic_enable_regs, on zeroed pages.
    // SAFETY: the kernel's own two SynIC pages.
    unsafe { core::ptr::write_bytes(message_page() as *mut u8, 0, 2 * PAGE as usize) };
    x86::wrmsr(msr::SIMP, message_page() | 1);
    x86::wrmsr(msr::SIEFP, (message_page() + PAGE) | 1);
    let sint2 = msr::SINT0 + u32::from(VMBUS_MESSAGE_SINT);
    let sint = SintMsr::from_bits(x86::rdmsr(sint2))
        .with_vector(idt::LINE_VECTOR as u8)
        .with_masked(false)
        .with_auto_eoi(false);
    x86::wrmsr(sint2, sint.into_bits());
    x86::wrmsr(msr::SCONTROL, x86::rdmsr(msr::SCONTROL) | 1);
    if x86::rdmsr(msr::SIMP) != message_page() | 1 || x86::rdmsr(msr::SVERSION) != 1 {
        fail!("SIMP or SVERSION do not read back");
    }

    // 6.0 refused, 5.3 accepted; each answer in the slot, with an interrupt.
    for (requested, accepted) in [(version::V6_0, 0), (version::WIN10_V5_3, 1)] {
        let s = post(
            &io,
            VMBUS_MESSAGE_CONNECTION_ID_4,
            contact(requested).as_bytes(),
        );
        if s != HvStatus::SUCCESS {
            fail!("INITIATE_CONTACT {:#x}: {}", requested, hv::status_name(s));
        }
        let Some((m, interrupts)) = wait_interrupt() else {
            fail!(
                "no VERSION_RESPONSE to {:#x} within {} ms",
                requested,
                REPLY_MS
            );
        };
        let Ok((r, _)) = VersionResponse::read_from_prefix(&m.payload) else {
            fail!("a short VERSION_RESPONSE");
        };
        if msgtype(&m) != ChannelMessageType::VERSION_RESPONSE
            || r.version_supported != accepted
            || interrupts == 0
        {
            fail!(
                "to {:#x}: {:?}, supported {}, {} interrupts",
                requested,
                msgtype(&m),
                r.version_supported,
                interrupts
            );
        }
    }

    // The offers: none yet, so ALLOFFERS_DELIVERED alone.
    let request = ChannelMessageHeader::new(ChannelMessageType::REQUESTOFFERS);
    if post(&io, VMBUS_MESSAGE_CONNECTION_ID, request.as_bytes()) != HvStatus::SUCCESS {
        fail!("REQUESTOFFERS refused");
    }
    match wait_interrupt() {
        Some((m, _)) if msgtype(&m) == ChannelMessageType::ALLOFFERS_DELIVERED => {}
        Some((m, _)) => fail!("REQUESTOFFERS answered with {:?}", msgtype(&m)),
        None => fail!("no ALLOFFERS_DELIVERED"),
    }

    // A GPADL for channel 9, never offered: answered, with a failure.
    let mut gpadl = [0u8; 36];
    let header = GpadlHeader {
        header: ChannelMessageHeader::new(ChannelMessageType::GPADL_HEADER),
        child_relid: 9.into(),
        gpadl: 0x77.into(),
        range_buflen: 16.into(),
        rangecount: 1.into(),
    };
    let range = GpaRange {
        byte_count: 4096.into(),
        byte_offset: 0.into(),
    };
    gpadl[..20].copy_from_slice(header.as_bytes());
    gpadl[20..28].copy_from_slice(range.as_bytes());
    gpadl[28..].copy_from_slice(&(message_page() / PAGE).to_le_bytes());
    if post(&io, VMBUS_MESSAGE_CONNECTION_ID, &gpadl) != HvStatus::SUCCESS {
        fail!("GPADL_HEADER refused");
    }
    match wait_interrupt() {
        Some((m, _)) if msgtype(&m) == ChannelMessageType::GPADL_CREATED => {
            let created = GpadlCreated::read_from_prefix(&m.payload).map(|(c, _)| c);
            if !created.is_ok_and(|c| {
                c.gpadl.get() == 0x77 && c.creation_status.get() == STATUS_UNSUCCESSFUL
            }) {
                fail!("a GPADL for a channel never offered was not refused");
            }
        }
        _ => fail!("no GPADL_CREATED"),
    }

    // Malformed posts: their statuses, and nothing in the slot.
    for (connection, payload, want) in [
        (7, request.as_bytes(), HvStatus::INVALID_CONNECTION_ID),
        (
            VMBUS_MESSAGE_CONNECTION_ID,
            &[0u8; 4][..],
            HvStatus::INVALID_PARAMETER,
        ),
        (
            VMBUS_MESSAGE_CONNECTION_ID,
            ChannelMessageHeader::new(ChannelMessageType::VERSION_RESPONSE).as_bytes(),
            HvStatus::INVALID_PARAMETER,
        ),
    ] {
        let got = post(&io, connection, payload);
        if got != want {
            fail!(
                "a malformed post returned {}, not {}",
                hv::status_name(got),
                hv::status_name(want)
            );
        }
    }
    if slot_type() != HvMessageType::NONE.0 {
        fail!("a refused post left a message");
    }

    // Round trips: REQUESTOFFERS until its answer is in the slot (polled,
    // interrupts off), against a post refused at once (the hypercall alone).
    let mut trip = [0u64; ROUNDS];
    let mut refused = [0u64; ROUNDS];
    for round in 0..ROUNDS {
        let t0 = x86::rdtsc();
        if post(&io, VMBUS_MESSAGE_CONNECTION_ID, request.as_bytes()) != HvStatus::SUCCESS {
            fail!("REQUESTOFFERS refused in round {}", round);
        }
        while slot_type() == HvMessageType::NONE.0 {
            if x86::rdtsc().wrapping_sub(t0) > REPLY_MS * x86::TSC_PER_MS {
                fail!("no answer in round {}", round);
            }
            core::hint::spin_loop();
        }
        let t1 = x86::rdtsc();
        let _ = take();
        let t2 = x86::rdtsc();
        let _ = post(&io, 7, request.as_bytes());
        trip[round] = t1.wrapping_sub(t0);
        refused[round] = x86::rdtsc().wrapping_sub(t2);
    }
    // The interrupts those answers raised wait in the local APIC (one at
    // most); the next wait takes it, harmlessly.
    let (trip, refused) = (median(&mut trip), median(&mut refused));
    let (a, b) = ratio(trip, refused);
    diag!(
        "bench: VMBus message round trip (REQUESTOFFERS to ALLOFFERS_DELIVERED in the slot) {} TSC ticks, a refused post {} ticks: ratio {}.{:02}",
        trip,
        refused,
        a,
        b
    );

    // Unload, then the SynIC off.
    let unload = ChannelMessageHeader::new(ChannelMessageType::UNLOAD);
    if post(&io, VMBUS_MESSAGE_CONNECTION_ID, unload.as_bytes()) != HvStatus::SUCCESS {
        fail!("UNLOAD refused");
    }
    match wait_interrupt() {
        Some((m, _)) if msgtype(&m) == ChannelMessageType::UNLOAD_RESPONSE => {}
        _ => fail!("no UNLOAD_RESPONSE"),
    }
    x86::wrmsr(sint2, sint.with_masked(true).into_bits());
    x86::wrmsr(msr::SCONTROL, 0);
    x86::wrmsr(msr::SIMP, 0);
    x86::wrmsr(msr::SIEFP, 0);
    diag!("vmbus: connected at 5.3 (6.0 refused), no offers, a bad GPADL refused, unloaded");
    Ok(None)
}
