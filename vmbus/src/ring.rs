//! A channel's rings as the host sees them (Linux's
//! `drivers/hv/ring_buffer.c` is the guest's side): the guest-to-host ring
//! at pages `[0, downstream)` of the channel's GPADL, which the host reads,
//! and the host-to-guest ring at `[downstream, end)`, which it writes.
//!
//! A ring's first page holds its [`RingControl`]; its data is the pages
//! after it, in the GPADL's order (not contiguous in guest memory: every
//! access goes page by page and wraps at the data's end). Packets are a
//! [`PacketDescriptor`], the rest of the packet up to `len8 * 8` bytes,
//! then an 8-byte trailer; everything is 8-byte aligned.
//!
//! A packet that does not fit asks the guest to signal once it has read
//! enough (`pending_send_sz`, which Linux honours: it sets the feature bit
//! on both rings itself).
//!
//! The guest owns the memory: every index, length and offset read from it
//! is checked before use, a packet is at most [`MAX_PACKET`] bytes, and a
//! ring whose indices make no sense is [`RingError::Corrupt`] (the caller
//! closes the channel). The host never writes outside the ring's pages.

use pviommu_abi::HV_PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use zerocopy::{FromBytes, IntoBytes};

use crate::abi::{PacketDescriptor, RingControl, RING_PACKET_TRAILER};

/// The largest packet the host reads or writes (Linux's vPCI and storage
/// packets are far smaller).
pub const MAX_PACKET: u32 = 64 << 10;

const PAGE: u32 = 4096;
const _: () = assert!(PAGE as u64 == HV_PAGE_SIZE);
const DESCRIPTOR: u32 = 16;
const _: () = assert!(core::mem::size_of::<PacketDescriptor>() == DESCRIPTOR as usize);
/// The most data pages a ring has (16 MiB: indices and sums stay far
/// below u32::MAX).
const MAX_DATA_PAGES: usize = 4096;
const WRITE_INDEX: u64 = core::mem::offset_of!(RingControl, write_index) as u64;
const READ_INDEX: u64 = core::mem::offset_of!(RingControl, read_index) as u64;
const INTERRUPT_MASK: u64 = core::mem::offset_of!(RingControl, interrupt_mask) as u64;
const PENDING_SEND_SZ: u64 = core::mem::offset_of!(RingControl, pending_send_sz) as u64;

/// What a ring refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A ring needs its control page and a data page at least, and at most
    /// 4096 data pages.
    #[error("A ring of {0} pages")]
    BadSize(usize),
    /// The guest's indices or packet header make no sense.
    #[error("Ring corrupt: {0}")]
    Corrupt(&'static str),
    /// A packet over [`MAX_PACKET`] bytes.
    #[error("Packet of {0} bytes (at most {MAX_PACKET})")]
    TooLarge(u32),
    /// No room for the packet now (the guest has not read enough).
    #[error("Ring full: {need} bytes needed, {free} free")]
    Full {
        /// Bytes the packet takes, trailer included.
        need: u32,
        /// Bytes free, less the one slot a ring always keeps.
        free: u32,
    },
    /// A page of the ring is not guest RAM.
    #[error("Ring page at {0:#x} is not guest RAM")]
    OutsideRam(u64),
}

/// A packet read from the guest-to-host ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Its header.
    pub descriptor: PacketDescriptor,
    /// Its payload: from `offset8 * 8` to `len8 * 8`.
    pub payload: Vec<u8>,
}

/// One ring over its GPADL pages.
#[derive(Debug, Clone)]
pub struct Ring {
    /// Page numbers: the control page, then the data pages.
    pfns: Vec<u64>,
    /// Bytes of data (a multiple of 4096).
    size: u32,
}

impl Ring {
    /// The ring on `pfns` (control page first).
    pub fn new(pfns: &[u64]) -> Result<Self, RingError> {
        let size = pfns
            .len()
            .checked_sub(1)
            .filter(|&n| (1..=MAX_DATA_PAGES).contains(&n))
            .and_then(|n| u32::try_from(n).ok()?.checked_mul(PAGE))
            .ok_or(RingError::BadSize(pfns.len()))?;
        Ok(Self {
            pfns: pfns.to_vec(),
            size,
        })
    }

    /// The channel's two rings: guest-to-host on `gpadl[..downstream]`,
    /// host-to-guest on `gpadl[downstream..]`.
    pub fn pair(gpadl: &[u64], downstream: usize) -> Result<(Self, Self), RingError> {
        if downstream == 0 || downstream >= gpadl.len() {
            return Err(RingError::BadSize(downstream));
        }
        Ok((
            Self::new(&gpadl[..downstream])?,
            Self::new(&gpadl[downstream..])?,
        ))
    }

    /// Bytes of data.
    pub fn size(&self) -> u32 {
        self.size
    }

    fn page_gpa(pfn: u64) -> Result<u64, RingError> {
        pfn.checked_mul(HV_PAGE_SIZE)
            .ok_or(RingError::OutsideRam(u64::MAX))
    }

    fn control<M: GuestMemory + ?Sized>(&self, mem: &M, field: u64) -> Result<u32, RingError> {
        let gpa = Self::page_gpa(self.pfns[0])? + field;
        mem.read_obj::<u32>(GuestAddress(gpa))
            .map(u32::from_le)
            .map_err(|_| RingError::OutsideRam(gpa))
    }

    fn set_control<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        field: u64,
        value: u32,
    ) -> Result<(), RingError> {
        let gpa = Self::page_gpa(self.pfns[0])? + field;
        mem.write_obj(value.to_le(), GuestAddress(gpa))
            .map_err(|_| RingError::OutsideRam(gpa))
    }

    /// Copies between `buf` and the data at `offset` (< size), wrapping.
    fn copy<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        mut offset: u32,
        buf: &mut [u8],
        write: bool,
    ) -> Result<(), RingError> {
        let mut done = 0;
        while done < buf.len() {
            let page = offset / PAGE;
            let within = offset % PAGE;
            let n = (PAGE - within).min(u32::try_from(buf.len() - done).unwrap_or(PAGE));
            let pfn = self.pfns[1 + page as usize];
            let gpa = GuestAddress(Self::page_gpa(pfn)? + u64::from(within));
            let chunk = &mut buf[done..done + n as usize];
            let r = if write {
                mem.write_slice(chunk, gpa)
            } else {
                mem.read_slice(chunk, gpa)
            };
            r.map_err(|_| RingError::OutsideRam(gpa.0))?;
            done += n as usize;
            // The data wraps at its size.
            offset = (offset + n) % self.size;
        }
        Ok(())
    }

    /// The indices, checked: inside the data and 8-byte aligned.
    fn indices<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(u32, u32), RingError> {
        let write = self.control(mem, WRITE_INDEX)?;
        let read = self.control(mem, READ_INDEX)?;
        if write >= self.size || read >= self.size || write % 8 != 0 || read % 8 != 0 {
            return Err(RingError::Corrupt("an index outside the data or unaligned"));
        }
        Ok((write, read))
    }

    /// Reads the next packet of the guest-to-host ring, if any, and frees
    /// its space (the read index moves past its trailer).
    pub fn read_packet<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<Option<Packet>, RingError> {
        let (write, read) = self.indices(mem)?;
        let available = (write + self.size - read) % self.size;
        if available == 0 {
            return Ok(None);
        }
        if available < DESCRIPTOR + RING_PACKET_TRAILER {
            return Err(RingError::Corrupt("less than a packet"));
        }
        let mut header = [0u8; DESCRIPTOR as usize];
        self.copy(mem, read, &mut header, false)?;
        let descriptor = PacketDescriptor::read_from_bytes(&header)
            .map_err(|_| RingError::Corrupt("a short descriptor"))?;
        let len = u32::from(descriptor.len8.get()) * 8;
        let offset = u32::from(descriptor.offset8.get()) * 8;
        if len < DESCRIPTOR || offset < DESCRIPTOR || offset > len {
            return Err(RingError::Corrupt("a packet shorter than its header"));
        }
        if len > MAX_PACKET {
            return Err(RingError::TooLarge(len));
        }
        if len + RING_PACKET_TRAILER > available {
            return Err(RingError::Corrupt("a packet past the write index"));
        }
        let mut payload = vec![0u8; (len - offset) as usize];
        self.copy(mem, (read + offset) % self.size, &mut payload, false)?;
        let next = (read + len + RING_PACKET_TRAILER) % self.size;
        self.set_control(mem, READ_INDEX, next)?;
        Ok(Some(Packet {
            descriptor,
            payload,
        }))
    }

    /// Writes a packet of type `packet_type` with `payload` to the
    /// host-to-guest ring. `Ok(true)`: the guest should be signalled (the
    /// ring was empty as it last saw it, and it did not mask interrupts).
    pub fn write_packet<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        packet_type: u16,
        flags: u16,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<bool, RingError> {
        let padded = u32::try_from(payload.len().next_multiple_of(8))
            .ok()
            .and_then(|p| p.checked_add(DESCRIPTOR))
            .filter(|&len| len <= MAX_PACKET)
            .ok_or(RingError::TooLarge(
                u32::try_from(payload.len()).unwrap_or(u32::MAX),
            ))?;
        let (write, read) = self.indices(mem)?;
        let used = (write + self.size - read) % self.size;
        let need = padded + RING_PACKET_TRAILER;
        // One slot always stays free: read == write means empty.
        let free = self.size - used;
        if need >= free {
            // Asks the guest to signal once it has read enough (Linux's
            // `hv_signal_on_read`, with the feature bit it sets itself).
            self.set_control(mem, PENDING_SEND_SZ, need)?;
            return Err(RingError::Full { need, free });
        }
        let descriptor = PacketDescriptor {
            packet_type: packet_type.into(),
            offset8: u16::try_from(DESCRIPTOR / 8).unwrap_or(2).into(),
            // padded <= MAX_PACKET: len8 fits.
            len8: u16::try_from(padded / 8).unwrap_or(u16::MAX).into(),
            flags: flags.into(),
            transaction_id: transaction_id.into(),
        };
        let mut bytes = Vec::with_capacity(need as usize);
        bytes.extend_from_slice(descriptor.as_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(padded as usize, 0);
        bytes.extend_from_slice(&(u64::from(write) << 32).to_le_bytes());
        self.copy(mem, write, &mut bytes, true)?;
        // The data before the index that publishes it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.set_control(mem, WRITE_INDEX, (write + need) % self.size)?;
        if self.control(mem, PENDING_SEND_SZ)? != 0 {
            self.set_control(mem, PENDING_SEND_SZ, 0)?;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let masked = self.control(mem, INTERRUPT_MASK)? != 0;
        let read_now = self.control(mem, READ_INDEX)?;
        Ok(!masked && read_now == write)
    }
}

#[cfg(test)]
// Test sizes are small.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::abi::{VM_PKT_COMP, VM_PKT_DATA_INBAND};
    use vm_memory::GuestMemoryMmap;

    /// 16 pages of RAM; a GPADL of 4 + 4 pages, deliberately out of order.
    fn setup() -> (GuestMemoryMmap, Ring, Ring) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * 4096)]).unwrap();
        let gpadl = [9, 3, 12, 5, 1, 14, 7, 2];
        let (up, down) = Ring::pair(&gpadl, 4).unwrap();
        (mem, up, down)
    }

    /// Linux's `hv_ringbuffer_write` of one inband packet, as the guest.
    fn guest_write(mem: &GuestMemoryMmap, ring: &Ring, id: u64, payload: &[u8]) {
        let (write, _) = ring.indices(mem).unwrap();
        let padded = payload.len().next_multiple_of(8) as u32 + DESCRIPTOR;
        let d = PacketDescriptor {
            packet_type: VM_PKT_DATA_INBAND.into(),
            offset8: 2.into(),
            len8: u16::try_from(padded / 8).unwrap().into(),
            flags: 1.into(),
            transaction_id: id.into(),
        };
        let mut bytes = d.as_bytes().to_vec();
        bytes.extend_from_slice(payload);
        bytes.resize(padded as usize, 0);
        bytes.extend_from_slice(&(u64::from(write) << 32).to_le_bytes());
        ring.copy(mem, write, &mut bytes, true).unwrap();
        let next = (write + bytes.len() as u32) % ring.size;
        ring.set_control(mem, WRITE_INDEX, next).unwrap();
    }

    #[test]
    fn packets_go_both_ways_and_wrap() {
        let (mem, up, down) = setup();
        assert_eq!(up.size(), 3 * 4096);
        assert_eq!(up.read_packet(&mem).unwrap(), None);
        // Enough packets to wrap the 12 KiB data area several times.
        for i in 0..100u64 {
            let payload: Vec<u8> = (0..(i as usize * 37) % 500).map(|b| b as u8).collect();
            guest_write(&mem, &up, i, &payload);
            let p = up.read_packet(&mem).unwrap().unwrap();
            assert_eq!(p.descriptor.transaction_id.get(), i);
            assert_eq!(&p.payload[..payload.len()], &payload[..]);
            assert!(p.payload[payload.len()..].iter().all(|&b| b == 0));
            assert_eq!(up.read_packet(&mem).unwrap(), None);

            // The reply, read back as the guest would (the same code, for
            // the other direction).
            let signal = down
                .write_packet(&mem, VM_PKT_COMP, 0, i, &payload)
                .unwrap();
            assert!(signal, "the guest had read everything");
            let back = down.read_packet(&mem).unwrap().unwrap();
            assert_eq!(back.descriptor.packet_type.get(), VM_PKT_COMP);
            assert_eq!(&back.payload[..payload.len()], &payload[..]);
        }
    }

    #[test]
    fn signal_only_when_the_guest_caught_up_and_unmasked() {
        let (mem, _, down) = setup();
        assert!(down.write_packet(&mem, VM_PKT_COMP, 0, 1, &[1; 8]).unwrap());
        // Not read yet: no second signal.
        assert!(!down.write_packet(&mem, VM_PKT_COMP, 0, 2, &[2; 8]).unwrap());
        down.read_packet(&mem).unwrap().unwrap();
        down.read_packet(&mem).unwrap().unwrap();
        down.set_control(&mem, INTERRUPT_MASK, 1).unwrap();
        assert!(!down.write_packet(&mem, VM_PKT_COMP, 0, 3, &[3; 8]).unwrap());
    }

    #[test]
    fn a_full_ring_refuses_and_frees_as_the_guest_reads() {
        let (mem, _, down) = setup();
        let payload = [7u8; 1000];
        let mut n = 0;
        while down.write_packet(&mem, VM_PKT_COMP, 0, n, &payload).is_ok() {
            n += 1;
        }
        assert_eq!(n, 11, "12 KiB of 1024-byte packets, one slot kept");
        assert!(matches!(
            down.write_packet(&mem, VM_PKT_COMP, 0, n, &payload),
            Err(RingError::Full { need: 1024, .. })
        ));
        // The guest is asked to signal once 1024 bytes are free.
        assert_eq!(down.control(&mem, PENDING_SEND_SZ).unwrap(), 1024);
        down.read_packet(&mem).unwrap().unwrap();
        down.write_packet(&mem, VM_PKT_COMP, 0, n, &payload)
            .unwrap();
        assert_eq!(down.control(&mem, PENDING_SEND_SZ).unwrap(), 0);
        assert!(matches!(
            down.write_packet(&mem, VM_PKT_COMP, 0, 0, &[0; 70_000]),
            Err(RingError::TooLarge(70_000))
        ));
    }

    /// A hostile guest's indices and headers: errors, never a panic or an
    /// access outside the ring's pages.
    #[test]
    fn corrupt_rings_are_errors() {
        let (mem, up, _) = setup();
        for (write, read) in [(3 * 4096, 0), (0, 3 * 4096), (4, 0), (u32::MAX, 0), (8, 0)] {
            up.set_control(&mem, WRITE_INDEX, write).unwrap();
            up.set_control(&mem, READ_INDEX, read).unwrap();
            assert!(
                matches!(up.read_packet(&mem), Err(RingError::Corrupt(_))),
                "{write} {read}"
            );
        }
        // A header longer than what was written, or shorter than itself.
        up.set_control(&mem, READ_INDEX, 0).unwrap();
        up.set_control(&mem, WRITE_INDEX, 0).unwrap();
        guest_write(&mem, &up, 1, &[0; 8]);
        for (offset8, len8) in [(2u16, 200u16), (1, 3), (4, 3), (2, 1)] {
            let at = Ring::page_gpa(up.pfns[1]).unwrap();
            mem.write_obj(offset8.to_le(), GuestAddress(at + 2))
                .unwrap();
            mem.write_obj(len8.to_le(), GuestAddress(at + 4)).unwrap();
            assert!(up.read_packet(&mem).is_err(), "{offset8} {len8}");
        }
        // Pages outside RAM.
        let far = Ring::new(&[1, 1 << 40]).unwrap();
        assert!(matches!(
            far.read_packet(&mem),
            Ok(None) | Err(RingError::OutsideRam(_))
        ));
        far.set_control(&mem, WRITE_INDEX, 64).unwrap();
        assert!(matches!(
            far.read_packet(&mem),
            Err(RingError::OutsideRam(_))
        ));
        assert!(matches!(Ring::new(&[1]), Err(RingError::BadSize(1))));
        assert!(Ring::pair(&[1, 2, 3], 0).is_err() && Ring::pair(&[1, 2, 3], 3).is_err());
    }
}
