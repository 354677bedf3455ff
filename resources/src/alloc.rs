//! Allocators for guest resources: MMIO and port ranges, GSIs, PCI slots and
//! device ids, on top of vm-allocator.

use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator, RangeInclusive};

use crate::layout::{self, pio};
use crate::{Error, Result};

/// An address range allocator (MMIO or port I/O).
#[derive(Debug, Clone)]
pub struct RangeAllocator {
    inner: AddressAllocator,
    name: &'static str,
}

impl RangeAllocator {
    /// Manages `base..base + size`.
    pub fn new(name: &'static str, base: u64, size: u64) -> Result<Self> {
        let inner = AddressAllocator::new(base, size).map_err(|e| Error::Allocator(name, e))?;
        Ok(Self { inner, name })
    }

    /// Allocates `size` bytes aligned to `align` (a power of two), lowest
    /// address first. Returns the base address.
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<u64> {
        self.allocate_with(size, align, AllocPolicy::FirstMatch)
    }

    /// Reserves exactly `base..base + size` (it must be free).
    pub fn reserve(&mut self, base: u64, size: u64) -> Result<()> {
        let align = if base == 0 {
            1
        } else {
            1 << base.trailing_zeros().min(63)
        };
        self.allocate_with(size, align, AllocPolicy::ExactMatch(base))
            .map(|_| ())
    }

    fn allocate_with(&mut self, size: u64, align: u64, policy: AllocPolicy) -> Result<u64> {
        self.inner
            .allocate(size, align, policy)
            .map(|r| r.start())
            .map_err(|e| Error::Allocator(self.name, e))
    }

    /// Frees a range returned by [`allocate`](Self::allocate) or
    /// [`reserve`](Self::reserve).
    pub fn free(&mut self, base: u64, size: u64) -> Result<()> {
        let end = size
            .checked_sub(1)
            .and_then(|s| base.checked_add(s))
            .ok_or(Error::InvalidRange { base, size })?;
        let range = RangeInclusive::new(base, end).map_err(|e| Error::Allocator(self.name, e))?;
        self.inner
            .free(&range)
            .map_err(|e| Error::Allocator(self.name, e))
    }

    /// First address managed.
    pub fn base(&self) -> u64 {
        self.inner.base()
    }

    /// Last address managed (inclusive).
    pub fn last(&self) -> u64 {
        self.inner.end()
    }
}

/// A 32-bit id allocator that reuses the lowest freed id first.
#[derive(Debug, Clone)]
pub struct IdPool {
    inner: IdAllocator,
    name: &'static str,
}

impl IdPool {
    /// Manages `first..=last`.
    pub fn new(name: &'static str, first: u32, last: u32) -> Result<Self> {
        let inner = IdAllocator::new(first, last).map_err(|e| Error::Allocator(name, e))?;
        Ok(Self { inner, name })
    }

    /// Allocates an id.
    pub fn allocate(&mut self) -> Result<u32> {
        self.inner
            .allocate_id()
            .map_err(|e| Error::Allocator(self.name, e))
    }

    /// Frees an id.
    pub fn free(&mut self, id: u32) -> Result<()> {
        self.inner
            .free_id(id)
            .map(|_| ())
            .map_err(|e| Error::Allocator(self.name, e))
    }

    /// Whether `id` is currently allocated.
    pub fn is_allocated(&self, id: u32) -> bool {
        self.inner.is_allocated(id)
    }
}

/// First GSI handed out for MSI routes (above the IOAPIC pins).
pub const MSI_GSI_START: u32 = layout::IOAPIC_PINS;
/// Last GSI (KVM's routing table holds 4096 entries).
pub const MSI_GSI_LAST: u32 = 4095;
/// IOAPIC pins free for devices (0-4 and 8 are taken by the legacy
/// platform: timer, keyboard, cascade, COM2, COM1, RTC; 5-7 and 9-23 are free).
pub const IOAPIC_DEVICE_PIN_FIRST: u32 = 9;
/// Number of PCI device slots on bus 0.
pub const PCI_SLOTS: u8 = 32;

/// The device numbers of PCI bus 0, lowest free first. Thirty-two slots are
/// a bitmap, not an interval tree (vm-allocator's `free` also underflows for
/// a range that starts below 2, which would leak slot 1 on every unplug).
#[derive(Debug, Clone)]
pub struct PciSlots {
    used: u32,
}

impl PciSlots {
    /// All slots free but slot 0, the host bridge's.
    pub fn new() -> Self {
        Self { used: 1 }
    }

    /// Takes the lowest free slot.
    pub fn allocate(&mut self) -> Result<u8> {
        let slot = u8::try_from(self.used.trailing_ones()).map_err(|_| Error::NoPciSlot)?;
        if slot >= PCI_SLOTS {
            return Err(Error::NoPciSlot);
        }
        self.used |= 1 << slot;
        Ok(slot)
    }

    /// Takes slot `slot`, which must be free.
    pub fn reserve(&mut self, slot: u8) -> Result<()> {
        if slot >= PCI_SLOTS || self.is_used(slot) {
            return Err(Error::PciSlot(slot));
        }
        self.used |= 1 << slot;
        Ok(())
    }

    /// Gives slot `slot` back; it must be in use and not the host bridge's.
    pub fn free(&mut self, slot: u8) -> Result<()> {
        if slot == 0 || slot >= PCI_SLOTS || !self.is_used(slot) {
            return Err(Error::PciSlot(slot));
        }
        self.used &= !(1 << slot);
        Ok(())
    }

    /// Whether slot `slot` is taken.
    pub fn is_used(&self, slot: u8) -> bool {
        slot < PCI_SLOTS && self.used & (1 << slot) != 0
    }
}

impl Default for PciSlots {
    fn default() -> Self {
        Self::new()
    }
}

/// Every allocator of one VM.
#[derive(Debug, Clone)]
pub struct SystemAllocator {
    /// PCI 32-bit MMIO window.
    pub mmio32: RangeAllocator,
    /// PCI 64-bit MMIO window.
    pub mmio64: RangeAllocator,
    /// Platform (non-PCI) MMIO window.
    pub platform_mmio: RangeAllocator,
    /// PCI I/O port window.
    pub io_ports: RangeAllocator,
    /// IOAPIC pins for device interrupts (legacy INTx, platform devices).
    pub ioapic_pins: IdPool,
    /// PCI slots on bus 0 (slot 0 is the host bridge).
    pub pci_slots: PciSlots,
    /// Opaque device ids (for the API and device bookkeeping).
    pub device_ids: IdPool,
}

impl SystemAllocator {
    /// The allocators for a VM with `mem_size` bytes of memory.
    pub fn new(mem_size: u64) -> Result<Self> {
        let (mmio64_start, mmio64_size) = layout::mmio64_window(mem_size)?;
        Ok(Self {
            mmio32: RangeAllocator::new(
                "PCI MMIO32",
                layout::PCI_MMIO32_START,
                layout::PCI_MMIO32_SIZE,
            )?,
            mmio64: RangeAllocator::new("PCI MMIO64", mmio64_start, mmio64_size)?,
            platform_mmio: RangeAllocator::new(
                "platform MMIO",
                layout::PLATFORM_MMIO_START,
                layout::PLATFORM_MMIO_SIZE,
            )?,
            io_ports: RangeAllocator::new(
                "PCI I/O",
                u64::from(pio::PCI_IO_START),
                u64::from(pio::PCI_IO_SIZE),
            )?,
            ioapic_pins: IdPool::new(
                "IOAPIC pin",
                IOAPIC_DEVICE_PIN_FIRST,
                layout::IOAPIC_PINS - 1,
            )?,
            pci_slots: PciSlots::new(),
            device_ids: IdPool::new("device id", 0, u32::MAX - 1)?,
        })
    }

    /// Allocates a free PCI slot (device number) on bus 0.
    pub fn allocate_pci_slot(&mut self) -> Result<u8> {
        self.pci_slots.allocate()
    }

    /// Reserves PCI slot `slot` on bus 0.
    pub fn reserve_pci_slot(&mut self, slot: u8) -> Result<()> {
        self.pci_slots.reserve(slot)
    }

    /// Frees PCI slot `slot`.
    pub fn free_pci_slot(&mut self, slot: u8) -> Result<()> {
        self.pci_slots.free(slot)
    }

    /// Allocates a PCI BAR of `size` bytes (a power of two, at least 4 KiB
    /// for memory BARs), naturally aligned: 64-bit BARs from the 64-bit window
    /// first, falling back to the 32-bit window.
    pub fn allocate_bar(&mut self, size: u64, kind: BarKind) -> Result<u64> {
        if !size.is_power_of_two() {
            return Err(Error::InvalidRange { base: 0, size });
        }
        match kind {
            BarKind::Mmio32 => self.mmio32.allocate(size, size),
            BarKind::Mmio64 => self
                .mmio64
                .allocate(size, size)
                .or_else(|_| self.mmio32.allocate(size, size)),
            BarKind::Io => self.io_ports.allocate(size, size),
        }
    }

    /// Frees a BAR allocated by [`allocate_bar`](Self::allocate_bar).
    pub fn free_bar(&mut self, base: u64, size: u64, kind: BarKind) -> Result<()> {
        match kind {
            BarKind::Io => self.io_ports.free(base, size),
            _ if base >= self.mmio64.base() && base <= self.mmio64.last() => {
                self.mmio64.free(base, size)
            }
            _ => self.mmio32.free(base, size),
        }
    }
}

/// The kind of a PCI BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mmio32,
    /// 64-bit memory BAR.
    Mmio64,
    /// I/O BAR.
    Io,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layout::{GIB, MIB};

    #[test]
    fn mmio_allocations_are_aligned_disjoint_and_reusable() {
        let mut a = SystemAllocator::new(512 * MIB).unwrap();
        let x = a.allocate_bar(0x1000, BarKind::Mmio32).unwrap();
        let y = a.allocate_bar(0x10_0000, BarKind::Mmio32).unwrap();
        assert_eq!(x, layout::PCI_MMIO32_START);
        assert_eq!(y % 0x10_0000, 0);
        assert!(y >= x + 0x1000);
        a.free_bar(x, 0x1000, BarKind::Mmio32).unwrap();
        assert_eq!(a.allocate_bar(0x1000, BarKind::Mmio32).unwrap(), x);
        // Double free is refused.
        a.free_bar(y, 0x10_0000, BarKind::Mmio32).unwrap();
        assert!(a.free_bar(y, 0x10_0000, BarKind::Mmio32).is_err());
    }

    #[test]
    fn bar64_goes_above_ram_and_falls_back_to_32_bit() {
        let mut a = SystemAllocator::new(6 * GIB).unwrap();
        let b = a.allocate_bar(2 * MIB, BarKind::Mmio64).unwrap();
        assert_eq!(b, 7 * GIB);
        // Larger than the whole 64-bit window: no fallback possible either.
        assert!(a.allocate_bar(128 * GIB, BarKind::Mmio64).is_err());
        a.free_bar(b, 2 * MIB, BarKind::Mmio64).unwrap();
        // Fill the 64-bit window, the next one comes from the 32-bit window.
        let mut n = 0;
        while let Ok(x) = a.allocate_bar(GIB, BarKind::Mmio64) {
            if x < 1 << 32 {
                a.free_bar(x, GIB, BarKind::Mmio64).unwrap();
                break;
            }
            n += 1;
        }
        assert_eq!(n, 48);
        let fallback = a.allocate_bar(256 * MIB, BarKind::Mmio64).unwrap();
        assert!(fallback < 1 << 32, "{fallback:#x}");
        a.free_bar(fallback, 256 * MIB, BarKind::Mmio64).unwrap();
    }

    #[test]
    fn bar_size_must_be_a_power_of_two() {
        let mut a = SystemAllocator::new(512 * MIB).unwrap();
        assert!(a.allocate_bar(0x3000, BarKind::Mmio32).is_err());
        assert!(a.allocate_bar(0, BarKind::Mmio32).is_err());
        assert_eq!(
            a.allocate_bar(0x100, BarKind::Io).unwrap(),
            u64::from(pio::PCI_IO_START)
        );
    }

    #[test]
    fn pci_slots_skip_the_host_bridge_and_run_out() {
        let mut a = SystemAllocator::new(512 * MIB).unwrap();
        assert!(a.reserve_pci_slot(0).is_err());
        a.reserve_pci_slot(5).unwrap();
        assert!(a.reserve_pci_slot(5).is_err());
        let mut got = Vec::new();
        while let Ok(s) = a.allocate_pci_slot() {
            got.push(s);
        }
        assert_eq!(got.len(), 30);
        assert_eq!(got[0], 1);
        assert!(!got.contains(&0) && !got.contains(&5));
        assert!(got.iter().all(|&s| s < PCI_SLOTS));
        a.free_pci_slot(7).unwrap();
        assert_eq!(a.allocate_pci_slot().unwrap(), 7);
        assert!(a.free_pci_slot(40).is_err());
        assert!(a.free_pci_slot(0).is_err());
    }

    #[test]
    fn pci_slot_1_can_be_freed_and_reused_forever() {
        let mut a = SystemAllocator::new(512 * MIB).unwrap();
        for _ in 0..100 {
            let s = a.allocate_pci_slot().unwrap();
            assert_eq!(s, 1);
            a.free_pci_slot(s).unwrap();
        }
        assert!(a.free_pci_slot(1).is_err(), "double free refused");
    }

    #[test]
    fn gsis_and_pins() {
        let mut a = SystemAllocator::new(512 * MIB).unwrap();
        let mut gsis = IdPool::new("MSI GSI", MSI_GSI_START, MSI_GSI_LAST).unwrap();
        assert_eq!(gsis.allocate().unwrap(), 24);
        assert_eq!(gsis.allocate().unwrap(), 25);
        gsis.free(24).unwrap();
        assert!(!gsis.is_allocated(24));
        assert_eq!(gsis.allocate().unwrap(), 24);
        assert!(gsis.free(4).is_err());
        let pins: Vec<u32> = std::iter::from_fn(|| a.ioapic_pins.allocate().ok()).collect();
        assert_eq!(pins, (9..24).collect::<Vec<_>>());
    }

    #[test]
    fn device_ids_are_reused_lowest_first() {
        let mut a = SystemAllocator::new(512 * MIB).unwrap();
        let ids: Vec<u32> = (0..3).map(|_| a.device_ids.allocate().unwrap()).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        a.device_ids.free(1).unwrap();
        assert!(a.device_ids.free(1).is_err());
        assert_eq!(a.device_ids.allocate().unwrap(), 1);
    }

    #[test]
    fn reserve_and_free_exact_ranges() {
        let mut r = RangeAllocator::new("test", 0x1000, 0x10000).unwrap();
        r.reserve(0x3000, 0x1000).unwrap();
        assert!(r.reserve(0x3000, 0x1000).is_err());
        assert!(r.reserve(0x3800, 0x1000).is_err());
        assert!(r.free(0x3000, 0).is_err());
        assert!(r.free(u64::MAX, 2).is_err());
        r.free(0x3000, 0x1000).unwrap();
        r.reserve(0x3000, 0x1000).unwrap();
        assert_eq!(r.base(), 0x1000);
        assert_eq!(r.last(), 0x10fff);
    }
}
