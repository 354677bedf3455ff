//! A fuzzing harness for the SynIC and the VMBus server, shared by the
//! cargo-fuzz target (`vmbus/fuzz`) and the in-tree smoke test.
//!
//! [`run`] decodes a byte string into a VM of one to four VPs and a
//! sequence of guest actions: SynIC MSR writes and reads (with values
//! biased towards pages of RAM, Linux's vector and the reserved bits),
//! HvCallPostMessage inputs (raw, or fixed up towards valid INITIATE_CONTACT,
//! REQUESTOFFERS and UNLOAD messages, or any channel message type with
//! random content: GPADLs, opens, closes), the guest zeroing a page or taking a message out of its slot
//! and EOM, event signals, HvCallSignalEvent on offered channels (whose
//! device echoes every packet), the VMM adding or rescinding offers or
//! resetting the server,
//! guest writes anywhere in RAM, and the host reading and writing ring
//! packets on guest-chosen pages. RAM starts filled with a canary, so that a page the guest has
//! not zeroed looks like a busy message slot. It panics if an invariant
//! breaks:
//!
//! - a refused post has a status outside HV_STATUS's errors;
//! - a queue grows beyond [`crate::synic::MESSAGE_QUEUE_DEPTH`];
//! - an interrupt goes to a VP the VM lacks, or with a vector below 16;
//! - guest memory changes outside the pages the guest named as message or
//!   event-flag pages (and the pages and slots the guest itself wrote);
//! - an accepted connection has a version outside the server's range;
//! - the server's GPADLs and open channels break their rules (bounds, RAM,
//!   offered channels, a ring GPADL of the channel's own).
//!
//! Any panic from inside the crate is a finding too.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pviommu_abi::{msr, HvError, InputPostMessage};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::FromBytes;

use crate::abi::{message_slot_offset, version, ChannelMessageType, Guid};
use crate::channel::testing::Echo;
use crate::ring::{Ring, MAX_PACKET};
use crate::server::OFFER_CONNECTION_ID_BASE;
use crate::server::{Server, MAX_VERSION, MIN_VERSION};
use crate::synic::{SintSink, Synic, MESSAGE_QUEUE_DEPTH};
use pviommu_abi::InputSignalEvent;

/// Guest RAM: 16 pages at 0.
const RAM_PAGES: u64 = 16;
const PAGE: u64 = 0x1000;
const PAGE_BYTES: usize = 0x1000;
const RAM_BYTES: usize = 16 * PAGE_BYTES;
/// What RAM holds before the guest acts.
const CANARY: u8 = 0xA5;

/// The fuzz input, read front to back; zeros once it runs out.
struct Reader<'a>(std::slice::Iter<'a, u8>);

impl Reader<'_> {
    fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    fn u8(&mut self) -> u8 {
        self.0.next().copied().unwrap_or(0)
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.u8())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// Interrupts, checked as they come.
struct Sink {
    vcpus: u32,
    count: AtomicU64,
}

impl SintSink for Sink {
    fn signal(&self, vp: u32, vector: u8) {
        assert!(vp < self.vcpus, "an interrupt to VP {vp} of {}", self.vcpus);
        assert!(vector >= 16, "an interrupt with vector {vector:#x}");
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

fn msr_of(r: &mut Reader<'_>) -> u32 {
    match r.u8() % 8 {
        0 => msr::SCONTROL,
        1 => msr::SVERSION,
        2 => msr::SIEFP,
        3 => msr::SIMP,
        4 => msr::EOM,
        5 => msr::SINT0 + 2,
        6 => msr::SINT0 + u32::from(r.u8() % 17),
        _ => r.u32(),
    }
}

fn value_of(r: &mut Reader<'_>) -> u64 {
    match r.u8() % 6 {
        // A page of RAM (or just past it), enabled.
        0 => ((u64::from(r.u8()) % (RAM_PAGES + 1)) * PAGE) | 1,
        1 => 0xF3,
        2 => 0x1_00F3,
        3 => 1,
        4 => 0,
        _ => r.u64(),
    }
}

/// A post-message input: raw bytes, or fixed up towards a valid message.
fn input_of(r: &mut Reader<'_>, vcpus: u32) -> InputPostMessage {
    let fix = r.u8();
    let raw: [u8; 256] = r.bytes();
    let mut input = InputPostMessage::read_from_bytes(&raw).unwrap_or_else(|_| unreachable!());
    if fix & 1 == 0 {
        return input;
    }
    input.connection_id = if fix & 2 == 0 { 4 } else { 1 }.into();
    input.reserved = 0.into();
    input.message_type = 1.into();
    input.payload_size = (u32::from(raw[12]) % 241).into();
    let msgtype = match fix >> 2 & 3 {
        0 => ChannelMessageType::INITIATE_CONTACT,
        1 => ChannelMessageType::REQUESTOFFERS,
        2 => ChannelMessageType::UNLOAD,
        _ => ChannelMessageType(u32::from(raw[16]) % 32),
    };
    input.payload[0..4].copy_from_slice(&msgtype.0.to_le_bytes());
    if msgtype == ChannelMessageType::INITIATE_CONTACT {
        let requested = match raw[17] % 4 {
            0 => version::WIN10_V5_3,
            1 => version::V6_0,
            2 => version::WIN10_V5 + u32::from(raw[18] % 5),
            _ => u32::from_le_bytes([raw[18], raw[19], raw[20], raw[21]]),
        };
        input.payload[8..12].copy_from_slice(&requested.to_le_bytes());
        let target = u32::from(raw[22]) % (vcpus + 1);
        input.payload[12..16].copy_from_slice(&target.to_le_bytes());
        // msg_sint, msg_vtl.
        input.payload[16] = if raw[23] & 1 == 0 { 2 } else { raw[24] % 17 };
        input.payload[17] = if raw[23] & 2 == 0 { 0 } else { raw[25] };
        input.payload_size = 40.into();
    }
    input
}

/// What a run reached (for tests of the harness itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reached {
    /// The server ended the run connected.
    pub connected: bool,
    /// Interrupts sent.
    pub interrupts: u64,
}

/// Runs one fuzz input. Panics if an invariant breaks.
pub fn run(data: &[u8]) -> Reached {
    let mut r = Reader(data.iter());
    let vcpus = u32::from(r.u8() % 4) + 1;
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_BYTES)])
            .expect("fuzz guest memory"),
    );
    let canary = vec![CANARY; RAM_BYTES];
    mem.write_slice(&canary, GuestAddress(0)).expect("canary");
    let sink = Arc::new(Sink {
        vcpus,
        count: AtomicU64::new(0),
    });
    let synic = Arc::new(Synic::new(vcpus, mem.clone(), sink.clone()));
    let server = Server::new(synic.clone());
    // Pages the guest named (any VP, any time): the SynIC may write there.
    let mut named = BTreeSet::new();
    let mut steps = 0;
    while !r.is_empty() && steps < 512 {
        steps += 1;
        let vp = u32::from(r.u8()) % (vcpus + 1);
        match r.u8() % 11 {
            0 | 1 => {
                let m = msr_of(&mut r);
                let v = value_of(&mut r);
                if synic.write_msr(vp, m, v).is_ok() && (m == msr::SIMP || m == msr::SIEFP) {
                    named.insert(v & !(PAGE - 1));
                }
                let _ = synic.read_msr(vp, m);
            }
            2..=4 => {
                let input = input_of(&mut r, vcpus);
                if let Err(e) = server.post_message(vp, &input) {
                    assert!(HvError::ALL.contains(&e.status()), "{e}: {:?}", e.status());
                }
            }
            5 => {
                // The guest takes SINT `sint`'s message: type NONE, then EOM.
                let sint = r.u8() % 16;
                if let Some(page) = synic.message_page(vp) {
                    if page
                        .checked_add(PAGE)
                        .is_some_and(|end| end <= RAM_PAGES * PAGE)
                    {
                        let slot = GuestAddress(page + message_slot_offset(sint));
                        mem.write_slice(&[0u8; 4], slot).expect("slot in RAM");
                        named.insert(page);
                    }
                }
                synic.eom(vp);
            }
            6 => {
                if r.u8() & 1 == 0 {
                    let sint = r.u8() % 17;
                    let flag = r.u32() % 2100;
                    let _ = synic.signal_event(vp, sint, flag);
                } else {
                    // HvCallSignalEvent on an offer's connection id (or
                    // near one): the echo device answers on the rings.
                    let input = InputSignalEvent {
                        connection_id: (OFFER_CONNECTION_ID_BASE + u32::from(r.u8() % 4)).into(),
                        flag_number: u16::from(r.u8() % 2).into(),
                        reserved: 0.into(),
                    };
                    // The device may write its open rings' pages.
                    for relid in 1..=3 {
                        if let Some(open) = server.open_channel(relid) {
                            if let Some(g) = server.gpadl(open.ring_gpadl) {
                                named.extend(g.pfns.iter().map(|&pfn| pfn * PAGE));
                            }
                        }
                    }
                    if let Err(e) = server.signal_event(vp, &input) {
                        assert!(HvError::ALL.contains(&e.status()), "{e}");
                    }
                }
            }
            9 => {
                // The guest writes 8 bytes anywhere in its RAM (ring
                // indices, packet headers, slots).
                // 8-byte aligned: inside one page.
                let at = (u64::from(r.u32()) % (RAM_PAGES * PAGE)) & !7;
                let bytes: [u8; 8] = r.bytes();
                mem.write_slice(&bytes, GuestAddress(at)).expect("in RAM");
                named.insert(at & !(PAGE - 1));
            }
            10 => {
                // A ring on 2 to 5 pages the guest chose (some past RAM):
                // the host reads a packet or writes one.
                let pages = usize::from(r.u8() % 4) + 2;
                let pfns: Vec<u64> = (0..pages).map(|_| u64::from(r.u8() % 20)).collect();
                if let Ok(ring) = Ring::new(&pfns) {
                    if r.u8() & 1 == 0 {
                        if let Ok(Some(p)) = ring.read_packet(&*mem) {
                            assert!(p.payload.len() <= MAX_PACKET as usize);
                        }
                    } else {
                        let len = usize::from(r.u8()) * 8;
                        let _ = ring.write_packet(&*mem, 11, 0, r.u64(), &vec![0x5A; len]);
                    }
                    // The host may write the ring's own pages.
                    named.extend(pfns.iter().map(|&pfn| pfn * PAGE));
                }
            }
            7 => {
                // The guest zeroes a page of its own (Linux allocates its
                // SynIC pages zeroed).
                let page = u64::from(r.u8()) % RAM_PAGES * PAGE;
                mem.write_slice(&[0u8; PAGE_BYTES], GuestAddress(page))
                    .expect("page in RAM");
                named.insert(page);
            }
            _ => match r.u8() % 3 {
                0 => {
                    let class = Guid(r.bytes());
                    let instance = Guid(r.bytes());
                    let _ = server.add_offer(class, instance, Echo::shared());
                }
                1 => {
                    let _ = server.rescind(u32::from(r.u8() % 4));
                }
                _ => server.reset(),
            },
        }
        for vp in 0..vcpus {
            for sint in 0..=16u8 {
                assert!(synic.queued(vp, sint) <= MESSAGE_QUEUE_DEPTH);
            }
        }
        server.check_invariants();
        if let Some(c) = server.connection() {
            assert!((MIN_VERSION..=MAX_VERSION).contains(&c.version));
            assert!(c.target_vp < vcpus);
        }
    }
    // Nothing was written outside the named pages.
    let mut ram = vec![0u8; RAM_BYTES];
    mem.read_slice(&mut ram, GuestAddress(0)).expect("RAM");
    for (gpa, page) in (0..).step_by(PAGE_BYTES).zip(ram.chunks(PAGE_BYTES)) {
        if !named.contains(&gpa) {
            assert!(
                page.iter().all(|&b| b == CANARY),
                "page {gpa:#x} was written but never named"
            );
        }
    }
    Reached {
        connected: server.connection().is_some(),
        interrupts: sink.count.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The committed seeds, through the same harness as the cargo-fuzz
    /// target.
    #[test]
    fn seeds_run() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        let mut n = 0;
        for entry in std::fs::read_dir(&seeds).expect("seeds").flatten() {
            run(&std::fs::read(entry.path()).expect("seed"));
            n += 1;
        }
        assert!(n > 0, "no seeds in {}", seeds.display());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The fuzz smoke run: random inputs through the harness.
        #[test]
        fn fuzz_smoke(data in prop::collection::vec(any::<u8>(), 0..4096)) {
            run(&data);
        }
    }

    /// The seed `connect` reaches a connection: Linux's enable sequence on
    /// VP 0, then INITIATE_CONTACT at 5.3 and REQUESTOFFERS (the harness
    /// must be able to get there, or the fuzzer explores little).
    #[test]
    fn the_connect_seed_connects() {
        let data = connect_seed();
        assert_eq!(
            run(&data),
            Reached {
                connected: true,
                // VERSION_RESPONSE, then ALLOFFERS_DELIVERED after the EOM.
                interrupts: 2
            }
        );
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/connect");
        assert_eq!(
            std::fs::read(&path).expect("fuzz/seeds/connect"),
            data,
            "regenerate {} from connect_seed()",
            path.display()
        );
    }

    /// The `connect` seed, in the harness's encoding.
    fn connect_seed() -> Vec<u8> {
        // One VP; it zeroes pages 4 and 5.
        let mut d = vec![0u8, 0, 7, 4, 0, 7, 5];
        let msr = |d: &mut Vec<u8>, sel: u8, value: &[u8]| {
            d.extend_from_slice(&[0, 0, sel]);
            d.extend_from_slice(value);
        };
        // SIMP at page 4, SIEFP at page 5 (value kind 0: a page, enabled).
        msr(&mut d, 3, &[0, 4]);
        msr(&mut d, 2, &[0, 5]);
        // SINT2 = 0xF3 (value kind 1), SCONTROL = 1 (value kind 3).
        msr(&mut d, 5, &[1]);
        msr(&mut d, 0, &[3]);
        let post = |d: &mut Vec<u8>, fix: u8, tweak: &[(usize, u8)]| {
            d.extend_from_slice(&[0, 2, fix]);
            let mut raw = [0u8; 256];
            for &(i, b) in tweak {
                raw[i] = b;
            }
            d.extend_from_slice(&raw);
        };
        // INITIATE_CONTACT at 5.3 to VP 0, SINT 2 (fix: valid, conn 4).
        post(&mut d, 1, &[]);
        // REQUESTOFFERS (payload 8 bytes).
        post(&mut d, 1 | 1 << 2, &[(12, 8)]);
        // The guest takes the message and EOMs.
        d.extend_from_slice(&[0, 5, 2]);
        d
    }
}
