//! Emulated PCI configuration space (type 0 header): registers with write
//! masks, BARs the guest can size and program, and a capability list.

// Registers are packed and unpacked by shifting and truncating to the field
// width on purpose (`as u8` of a shifted u32 keeps the byte wanted).
#![allow(clippy::cast_possible_truncation)]

use resources::BarKind;

use super::{PciBarRegion, PciError, CONFIG_SPACE_SIZE};

/// Command register: I/O space decode.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decode.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master (DMA) enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command register bits the guest may write.
const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | (1 << 6) // parity error response
    | (1 << 8) // SERR#
    | COMMAND_INTX_DISABLE;
/// Status register: capability list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// Register offsets of the type 0 header.
pub mod reg {
    /// Vendor id (u16).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device id (u16).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (u16).
    pub const COMMAND: u16 = 0x04;
    /// Status (u16).
    pub const STATUS: u16 = 0x06;
    /// Revision id (u8), then prog-if, subclass, class.
    pub const REVISION_ID: u16 = 0x08;
    /// Cache line size (u8).
    pub const CACHE_LINE_SIZE: u16 = 0x0c;
    /// Header type (u8).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// First BAR.
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor id (u16).
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem id (u16).
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Expansion ROM base address (hidden: reads 0).
    pub const ROM_ADDRESS: u16 = 0x30;
    /// Capabilities pointer (u8).
    pub const CAPABILITIES: u16 = 0x34;
    /// Interrupt line (u8).
    pub const INTERRUPT_LINE: u16 = 0x3c;
    /// Interrupt pin (u8).
    pub const INTERRUPT_PIN: u16 = 0x3d;
}

/// Number of BARs of a type 0 header.
pub const NUM_BARS: usize = 6;
/// First offset available to capabilities.
const CAP_START: u16 = 0x40;
/// Capabilities live in the legacy 256-byte space.
const CAP_END: u16 = 0x100;

const REGS: usize = CONFIG_SPACE_SIZE / 4;

/// Identity of a PCI function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision.
    pub revision: u8,
    /// Class code (base class).
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
    /// Interrupt pin (0 none, 1 INTA# .. 4 INTD#).
    pub interrupt_pin: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// A function's configuration space: 4 KiB of registers with per-bit write
/// masks. Reads and writes take offsets already checked by the PCI bus
/// ([`super::check_config_access`]); they never panic on any input anyway.
#[derive(Clone)]
pub struct PciConfiguration {
    regs: Box<[u32; REGS]>,
    wmask: Box<[u32; REGS]>,
    bars: [Option<Bar>; NUM_BARS],
    /// Offset of the last capability (its "next" byte is at +1).
    last_cap: Option<u16>,
    /// First free offset for the next capability.
    cap_next_free: u16,
}

impl std::fmt::Debug for PciConfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfiguration")
            .field(
                "vendor_id",
                &format_args!("{:#06x}", self.read_u16(reg::VENDOR_ID)),
            )
            .field(
                "device_id",
                &format_args!("{:#06x}", self.read_u16(reg::DEVICE_ID)),
            )
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl PciConfiguration {
    /// A type 0 header with `header`'s identity, no BARs, no capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut c = Self {
            regs: Box::new([0; REGS]),
            wmask: Box::new([0; REGS]),
            bars: [None; NUM_BARS],
            last_cap: None,
            cap_next_free: CAP_START,
        };
        c.regs[0] = u32::from(header.vendor_id) | u32::from(header.device_id) << 16;
        c.regs[2] = u32::from(header.revision)
            | u32::from(header.prog_if) << 8
            | u32::from(header.subclass) << 16
            | u32::from(header.class) << 24;
        c.regs[(reg::SUBSYSTEM_VENDOR_ID / 4) as usize] =
            u32::from(header.subsystem_vendor_id) | u32::from(header.subsystem_id) << 16;
        c.regs[(reg::INTERRUPT_LINE / 4) as usize] = u32::from(header.interrupt_pin) << 8;
        // Writable: command, cache line size, latency timer, interrupt line.
        c.wmask[(reg::COMMAND / 4) as usize] = u32::from(COMMAND_WRITABLE);
        c.wmask[(reg::CACHE_LINE_SIZE / 4) as usize] = 0x0000_ffff;
        c.wmask[(reg::INTERRUPT_LINE / 4) as usize] = 0x0000_00ff;
        c
    }

    /// Declares BAR `index` of `size` bytes (a power of two; at least 16 for
    /// memory, 4..=256 for I/O). A 64-bit BAR also takes `index + 1`.
    pub fn add_bar(
        &mut self,
        index: usize,
        size: u64,
        kind: BarKind,
        prefetchable: bool,
    ) -> Result<(), PciError> {
        let slots = if kind == BarKind::Mmio64 { 2 } else { 1 };
        if index >= NUM_BARS
            || index + slots > NUM_BARS
            || self.bars[index].is_some()
            || (slots == 2 && self.bars[index + 1].is_some())
            || (index > 0 && matches!(self.bars[index - 1], Some(b) if b.kind == BarKind::Mmio64))
        {
            return Err(PciError::BarIndex(index));
        }
        let size_ok = size.is_power_of_two()
            && match kind {
                BarKind::Io => (4..=256).contains(&size),
                BarKind::Mmio32 => (16..=1 << 31).contains(&size),
                BarKind::Mmio64 => size >= 16,
            };
        if !size_ok {
            return Err(PciError::BarSize(size));
        }
        let i = (reg::BAR0 / 4) as usize + index;
        let mask = !(size - 1);
        match kind {
            BarKind::Io => {
                self.regs[i] = 1;
                self.wmask[i] = (mask as u32) & !0x3;
            }
            BarKind::Mmio32 | BarKind::Mmio64 => {
                let mut ro = u32::from(prefetchable) << 3;
                if kind == BarKind::Mmio64 {
                    ro |= 0b10 << 1;
                    self.wmask[i + 1] = (mask >> 32) as u32;
                }
                self.regs[i] = ro;
                self.wmask[i] = (mask as u32) & !0xf;
            }
        }
        self.bars[index] = Some(Bar { size, kind });
        Ok(())
    }

    /// Sets BAR `index`'s address, as firmware would (the guest may move it).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let bar = self
            .bars
            .get(index)
            .copied()
            .flatten()
            .ok_or(PciError::BarIndex(index))?;
        if addr & (bar.size - 1) != 0 || (bar.kind != BarKind::Mmio64 && addr > u64::from(u32::MAX))
        {
            return Err(PciError::BarAddress(addr));
        }
        let i = (reg::BAR0 / 4) as usize + index;
        self.regs[i] = (self.regs[i] & !self.wmask[i]) | (addr as u32 & self.wmask[i]);
        if bar.kind == BarKind::Mmio64 {
            self.regs[i + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    /// Every declared BAR, `(index, size, kind)` (what
    /// [`PciDevice::declared_bars`](super::PciDevice::declared_bars) returns).
    pub fn declared_bars(&self) -> Vec<(usize, u64, BarKind)> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b.size, b.kind)))
            .collect()
    }

    /// BAR `index`'s size and kind, if declared.
    pub fn bar(&self, index: usize) -> Option<(u64, BarKind)> {
        self.bars
            .get(index)
            .copied()
            .flatten()
            .map(|b| (b.size, b.kind))
    }

    /// BAR `index`'s programmed address (whether or not it is decoded).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let i = (reg::BAR0 / 4) as usize + index;
        Some(match bar.kind {
            BarKind::Io => u64::from(self.regs[i] & !0x3),
            BarKind::Mmio32 => u64::from(self.regs[i] & !0xf),
            BarKind::Mmio64 => u64::from(self.regs[i] & !0xf) | u64::from(self.regs[i + 1]) << 32,
        })
    }

    /// The BARs the function decodes now: decoding enabled in the command
    /// register and a usable address (not 0, no wrap, I/O below 64 KiB).
    pub fn decoded_bars(&self) -> Vec<PciBarRegion> {
        let command = self.command();
        (0..NUM_BARS)
            .filter_map(|index| {
                let (size, kind) = self.bar(index)?;
                let addr = self.bar_address(index)?;
                let enabled = match kind {
                    BarKind::Io => command & COMMAND_IO != 0,
                    _ => command & COMMAND_MEMORY != 0,
                };
                let end = addr.checked_add(size)?;
                let fits = kind != BarKind::Io || end <= 0x1_0000;
                (enabled && addr != 0 && fits).then_some(PciBarRegion {
                    index,
                    addr,
                    size,
                    kind,
                })
            })
            .collect()
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(reg::COMMAND)
    }

    /// Whether the guest enabled bus mastering (DMA).
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Adds a capability with id `id`; `body` is its content after the id
    /// and next-pointer bytes. Returns the capability's offset. The body is
    /// read-only to the guest until [`set_write_mask`](Self::set_write_mask).
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u16, PciError> {
        let len = u16::try_from(body.len() + 2).map_err(|_| PciError::CapabilitySpace)?;
        let offset = self.cap_next_free;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= CAP_END)
            .ok_or(PciError::CapabilitySpace)?;
        self.write_raw_u8(offset, id);
        self.write_raw_u8(offset + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.write_raw_u8(offset + 2 + i as u16, *b);
        }
        match self.last_cap {
            Some(prev) => self.write_raw_u8(prev + 1, offset as u8),
            None => {
                self.write_raw_u8(reg::CAPABILITIES, offset as u8);
                let status = self.read_u16(reg::STATUS) | STATUS_CAP_LIST;
                self.write_raw_u16(reg::STATUS, status);
            }
        }
        self.last_cap = Some(offset);
        self.cap_next_free = end.next_multiple_of(4);
        Ok(offset)
    }

    /// Makes the bits of `mask` writable by the guest in the dword at
    /// `offset` (4-byte aligned; other offsets are ignored).
    pub fn set_write_mask(&mut self, offset: u16, mask: u32) {
        if offset % 4 == 0 {
            if let Some(w) = self.wmask.get_mut(usize::from(offset / 4)) {
                *w = mask;
            }
        }
    }

    /// Guest read of `data.len()` (1, 2 or 4) bytes at `offset`. Anything
    /// out of range reads as all ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let start = usize::from(offset);
        let end = start + data.len();
        if end > CONFIG_SPACE_SIZE {
            data.fill(0xff);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let pos = start + i;
            *b = (self.regs[pos / 4] >> ((pos % 4) * 8)) as u8;
        }
    }

    /// Guest write of `data` at `offset`, through the write masks.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        self.store(offset, data, true);
    }

    /// Reads a u16 at `offset` (device side).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads a u32 at `offset` (device side).
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes bytes regardless of the write masks (device side).
    pub fn write_raw(&mut self, offset: u16, data: &[u8]) {
        self.store(offset, data, false);
    }

    /// Stores `data` at `offset`, only the writable bits if `masked`; an
    /// access past the configuration space changes nothing.
    fn store(&mut self, offset: u16, data: &[u8], masked: bool) {
        let start = usize::from(offset);
        if start + data.len() > CONFIG_SPACE_SIZE {
            return;
        }
        for (i, b) in data.iter().enumerate() {
            let pos = start + i;
            let shift = (pos % 4) * 8;
            let wmask = if masked {
                self.wmask[pos / 4]
            } else {
                u32::MAX
            };
            let m = wmask & (0xff << shift);
            let r = &mut self.regs[pos / 4];
            *r = (*r & !m) | ((u32::from(*b) << shift) & m);
        }
    }

    /// Writes a byte regardless of the write masks (device side).
    pub fn write_raw_u8(&mut self, offset: u16, v: u8) {
        self.write_raw(offset, &[v]);
    }

    /// Writes a u16 regardless of the write masks (device side).
    pub fn write_raw_u16(&mut self, offset: u16, v: u16) {
        self.write_raw(offset, &v.to_le_bytes());
    }

    /// Writes a u32 regardless of the write masks (device side).
    pub fn write_raw_u32(&mut self, offset: u16, v: u32) {
        self.write_raw(offset, &v.to_le_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg() -> PciConfiguration {
        PciConfiguration::new(&PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            revision: 1,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            interrupt_pin: 1,
        })
    }

    fn write32(c: &mut PciConfiguration, off: u16, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = cfg();
        assert_eq!(c.read_u32(0), 0x5678_1234);
        assert_eq!(c.read_u32(8), 0xff00_0001);
        assert_eq!(c.read_u32(0x2c), 0x1100_1af4);
        write32(&mut c, 0, 0xffff_ffff);
        write32(&mut c, 8, 0);
        write32(&mut c, reg::ROM_ADDRESS, 0xffff_ffff);
        assert_eq!(c.read_u32(0), 0x5678_1234);
        assert_eq!(c.read_u32(8), 0xff00_0001);
        assert_eq!(c.read_u32(reg::ROM_ADDRESS), 0);
        // Interrupt line writable, pin not.
        c.write(reg::INTERRUPT_LINE, &[0x0b, 0x04]);
        assert_eq!(c.read_u16(reg::INTERRUPT_LINE), 0x010b);
    }

    #[test]
    fn command_register_mask() {
        let mut c = cfg();
        c.write(reg::COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert!(c.bus_master());
        // Status is read-only.
        c.write(reg::STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_u16(reg::STATUS), 0);
    }

    #[test]
    fn bar_sizing_and_programming_32() {
        let mut c = cfg();
        c.add_bar(0, 0x1000, BarKind::Mmio32, false).unwrap();
        c.add_bar(1, 0x100, BarKind::Io, false).unwrap();
        write32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(c.read_u32(0x10), 0xffff_f000);
        write32(&mut c, 0x14, 0xffff_ffff);
        assert_eq!(c.read_u32(0x14), 0xffff_ff01);
        write32(&mut c, 0x10, 0xc000_0123);
        assert_eq!(c.read_u32(0x10), 0xc000_0000);
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        // Unused BARs read 0 and ignore writes.
        write32(&mut c, 0x18, 0xffff_ffff);
        assert_eq!(c.read_u32(0x18), 0);
    }

    #[test]
    fn bar_sizing_and_programming_64() {
        let mut c = cfg();
        c.add_bar(2, 0x4000_0000, BarKind::Mmio64, true).unwrap();
        assert_eq!(c.read_u32(0x18), 0b1100);
        write32(&mut c, 0x18, 0xffff_ffff);
        write32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(c.read_u32(0x18), 0xc000_000c);
        assert_eq!(c.read_u32(0x1c), 0xffff_ffff);
        c.set_bar_address(2, 0x2_4000_0000).unwrap();
        assert_eq!(c.read_u32(0x18), 0x4000_000c);
        assert_eq!(c.read_u32(0x1c), 2);
        assert_eq!(c.bar_address(2), Some(0x2_4000_0000));
        assert_eq!(c.bar(2), Some((0x4000_0000, BarKind::Mmio64)));
        // The upper half is not a BAR of its own.
        assert!(c.add_bar(3, 0x1000, BarKind::Mmio32, false).is_err());
        assert_eq!(c.bar(3), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = cfg();
        assert_eq!(
            c.add_bar(0, 0x1800, BarKind::Mmio32, false),
            Err(PciError::BarSize(0x1800))
        );
        assert!(c.add_bar(0, 8, BarKind::Mmio32, false).is_err());
        assert!(c.add_bar(0, 512, BarKind::Io, false).is_err());
        assert!(c.add_bar(5, 0x1000, BarKind::Mmio64, false).is_err());
        assert!(c.add_bar(6, 0x1000, BarKind::Mmio32, false).is_err());
        c.add_bar(0, 0x1000, BarKind::Mmio32, false).unwrap();
        assert!(c.add_bar(0, 0x1000, BarKind::Mmio32, false).is_err());
        assert_eq!(
            c.set_bar_address(0, 0x1800),
            Err(PciError::BarAddress(0x1800))
        );
        assert!(c.set_bar_address(0, 1 << 32).is_err());
        assert!(c.set_bar_address(1, 0x1000).is_err());
    }

    #[test]
    fn decoding_follows_the_command_register() {
        let mut c = cfg();
        c.add_bar(0, 0x1000, BarKind::Mmio32, false).unwrap();
        c.add_bar(1, 0x10, BarKind::Io, false).unwrap();
        c.add_bar(2, 0x1000, BarKind::Mmio64, false).unwrap();
        c.set_bar_address(0, 0xc000_0000).unwrap();
        c.set_bar_address(1, 0x1000).unwrap();
        assert!(c.decoded_bars().is_empty());
        c.write(reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
        // BAR 2 is at address 0: not decoded.
        assert_eq!(
            c.decoded_bars(),
            vec![PciBarRegion {
                index: 0,
                addr: 0xc000_0000,
                size: 0x1000,
                kind: BarKind::Mmio32
            }]
        );
        c.write(reg::COMMAND, &(COMMAND_MEMORY | COMMAND_IO).to_le_bytes());
        assert_eq!(c.decoded_bars().len(), 2);
        // A 64-bit BAR left at the sizing pattern wraps: not decoded.
        write32(&mut c, 0x18, 0xffff_ffff);
        write32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(c.decoded_bars().len(), 2);
        write32(&mut c, 0x1c, 0x1);
        assert_eq!(c.decoded_bars().len(), 3);
        assert_eq!(c.decoded_bars()[2].addr, 0x1_ffff_f000);
    }

    #[test]
    fn capabilities_chain() {
        let mut c = cfg();
        let a = c.add_capability(0x05, &[1, 2, 3]).unwrap();
        let b = c.add_capability(0x11, &[0; 10]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(c.read_u16(reg::STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        let mut p = [0u8];
        c.read(reg::CAPABILITIES, &mut p);
        assert_eq!(p[0], 0x40);
        assert_eq!(c.read_u32(0x40), 0x0201_4805);
        assert_eq!(c.read_u16(0x48), 0x0011);
        // Read-only until a mask is set.
        write32(&mut c, 0x40, 0xffff_ffff);
        assert_eq!(c.read_u32(0x40), 0x0201_4805);
        c.set_write_mask(0x40, 0xff00_0000);
        write32(&mut c, 0x40, 0xffff_ffff);
        assert_eq!(c.read_u32(0x40), 0xff01_4805);
        assert_eq!(
            c.add_capability(0x09, &[0; 200]),
            Err(PciError::CapabilitySpace)
        );
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let mut c = cfg();
        let mut d = [0u8; 4];
        c.read(4094, &mut d);
        assert_eq!(d, [0xff; 4]);
        c.write(4094, &[1, 2, 3, 4]);
        c.write_raw(u16::MAX, &[1, 2]);
        c.set_write_mask(4094, 0xffff_ffff);
        c.set_write_mask(8192, 0xffff_ffff);
        c.read(u16::MAX, &mut d);
    }
}
