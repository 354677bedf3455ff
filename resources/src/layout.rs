//! The guest physical address map.
//!
//! ```text
//! 0x0000_0000 ┬ low RAM (the legacy area below 1 MiB holds the boot structures,
//!             │   see the `boot` constants; 0x9_FC00..0x10_0000 is reserved in
//!             │   the memory map and holds the ACPI tables at 0xE_0000)
//! LOW_RAM_END ┼ (= min(memory, 3 GiB))
//! 0xC000_0000 ┼ 32-bit MMIO hole: PCI MMIO32 window (512 MiB, BARs)
//! 0xE000_0000 ┼ PCI ECAM, bus 0 only (1 MiB)
//! 0xE010_0000 ┼ (unused)
//! 0xF000_0000 ┼ VMBus MMIO32 window (128 MiB: vPCI config windows and
//!             │   32-bit BARs, which the guest places itself)
//! 0xF800_0000 ┼ (unused)
//! 0xFE00_0000 ┼ platform MMIO window (12 MiB)
//! 0xFEC0_0000 ┼ IOAPIC (4 KiB)
//! 0xFEE0_0000 ┼ LAPIC (1 MiB: 0xFEE0_0000..0xFEF0_0000 is never RAM, it is the
//!             │   MSI doorbell range for devices)
//! 0xFFFB_C000 ┼ KVM identity-map page and TSS (4 pages)
//! 0x1_0000_0000 ┼ high RAM (memory above 3 GiB)
//! MMIO64_START ┼ 64-bit MMIO window (64 GiB, 1 GiB aligned): PCI 64-bit
//!             │   BARs (48 GiB), then VMBus's 64-bit window (16 GiB)
//! ```
//!
//! Port I/O: COM1 0x3F8, i8042 0x60/0x64, PCI config 0xCF8..0xCFF, the ACPI
//! sleep device at [`ACPI_SLEEP_PORT`], the PCI I/O window 0x1000..0x10000.

use crate::{Error, Result};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 0x1000;
/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// Start of the 32-bit MMIO hole: low RAM ends here at the latest.
pub const MMIO32_HOLE_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit MMIO hole: high RAM starts here.
pub const MMIO32_HOLE_END: u64 = 1 << 32;
/// Start of high RAM.
pub const HIGH_RAM_START: u64 = MMIO32_HOLE_END;

/// The PCI 32-bit MMIO window for BARs.
pub const PCI_MMIO32_START: u64 = MMIO32_HOLE_START;
/// Size of the PCI 32-bit MMIO window.
pub const PCI_MMIO32_SIZE: u64 = 512 * MIB;

/// PCI Express enhanced configuration access (ECAM) window.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
/// Number of PCI buses behind the ECAM window (bus 0 only).
pub const PCI_ECAM_BUSES: u64 = 1;
/// Size of the ECAM window: 1 MiB per bus.
pub const PCI_ECAM_SIZE: u64 = PCI_ECAM_BUSES * MIB;

/// VMBus's 32-bit MMIO window (its ACPI device's `_CRS`): Linux's
/// pci-hyperv takes each vPCI bus's config window and 32-bit BARs from it.
pub const VMBUS_MMIO32_START: u64 = 0xF000_0000;
/// Size of VMBus's 32-bit MMIO window.
pub const VMBUS_MMIO32_SIZE: u64 = 128 * MIB;
/// Size of VMBus's 64-bit MMIO window, the top of the 64-bit MMIO window
/// ([`vmbus_mmio64_window`]): vPCI devices' 64-bit BARs.
pub const VMBUS_MMIO64_SIZE: u64 = 16 * GIB;

/// Window for platform (non-PCI) MMIO devices.
pub const PLATFORM_MMIO_START: u64 = 0xFE00_0000;
/// Size of the platform MMIO window.
pub const PLATFORM_MMIO_SIZE: u64 = IOAPIC_START - PLATFORM_MMIO_START;

/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Size of the IOAPIC register page.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u32 = 24;

/// Local APIC registers (and the MSI address range).
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Size of the LAPIC/MSI range that must never be RAM.
pub const LAPIC_SIZE: u64 = MIB;

/// KVM's identity-map page (KVM_SET_IDENTITY_MAP_ADDR), just below the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = 0xFFFB_C000;
/// KVM's three-page TSS (KVM_SET_TSS_ADDR).
pub const KVM_TSS_START: u64 = 0xFFFB_D000;

/// The 64-bit MMIO window is aligned to this.
pub const MMIO64_ALIGN: u64 = GIB;
/// Size of the 64-bit MMIO window.
pub const MMIO64_SIZE: u64 = 64 * GIB;

/// Smallest guest memory: the legacy area, boot structures and a small kernel.
pub const MIN_MEMORY: u64 = 8 * MIB;
/// Largest guest memory: the RAM plus the 64-bit MMIO window must stay below
/// 2^40 (1 TiB), within the physical address width of any x86-64 host.
pub const MAX_MEMORY: u64 = (1 << 40) - MMIO64_SIZE - MMIO32_HOLE_END;

/// Fixed guest addresses used at boot (all in the first MiB of RAM).
pub mod boot {
    /// Boot GDT (64-bit and PVH entry).
    pub const GDT_START: u64 = 0x500;
    /// Boot IDT (empty).
    pub const IDT_START: u64 = 0x520;
    /// PVH `hvm_start_info`.
    pub const PVH_INFO_START: u64 = 0x6000;
    /// PVH module list (initrd), right after the start info.
    pub const PVH_MODLIST_START: u64 = 0x6040;
    /// PVH memory map table.
    pub const PVH_MEMMAP_START: u64 = 0x6100;
    /// Maximum number of PVH memory map entries.
    pub const PVH_MEMMAP_MAX_ENTRIES: usize = 64;
    /// Linux `boot_params` (zero page).
    pub const ZERO_PAGE_START: u64 = 0x7000;
    /// Initial stack pointer of the boot vCPU (64-bit entry).
    pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
    /// Boot page tables: PML4, then one PDPT, then four PDs (identity map of
    /// the first 4 GiB with 2 MiB pages).
    pub const PML4_START: u64 = 0x9000;
    /// Page-directory-pointer table.
    pub const PDPT_START: u64 = 0xA000;
    /// First of the four page directories.
    pub const PD_START: u64 = 0xB000;
    /// Kernel command line.
    pub const CMDLINE_START: u64 = 0x2_0000;
    /// Maximum kernel command line size, including the terminating NUL.
    pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
    /// Start of the extended BIOS data area: RAM usable by the guest ends here
    /// in the first MiB.
    pub const EBDA_START: u64 = 0x9_FC00;
    /// ACPI tables (RSDP first), in the reserved legacy BIOS area.
    pub const ACPI_START: u64 = 0xE_0000;
    /// End (exclusive) of the ACPI tables area.
    pub const ACPI_END: u64 = RESET_VECTOR;
    /// Where a real-mode CPU reset starts (F000:FFF0): Linux jumps there
    /// as its last way to reboot ("BIOS" reboot, tried after EFI on
    /// hardware-reduced ACPI); pvmm puts a stub that resets the VM.
    pub const RESET_VECTOR: u64 = 0xF_FFF0;
    /// Start of RAM above the legacy area.
    pub const HIMEM_START: u64 = 0x10_0000;
}

/// Legacy I/O ports.
pub mod pio {
    /// i8042 keyboard controller (data port; command port is +4).
    pub const I8042_START: u16 = 0x60;
    /// i8042 port range length (0x60..=0x64).
    pub const I8042_SIZE: u16 = 5;
    /// COM1.
    pub const COM1_START: u16 = 0x3f8;
    /// 8250 register window.
    pub const COM1_SIZE: u16 = 8;
    /// COM1's IRQ (ISA IRQ 4 = GSI 4).
    pub const COM1_GSI: u32 = 4;
    /// The CMOS RTC: index port, then data port.
    pub const CMOS_START: u16 = 0x70;
    /// 0x70..=0x71.
    pub const CMOS_SIZE: u16 = 2;
    /// PCI configuration address/data ports.
    pub const PCI_CONFIG_START: u16 = 0xcf8;
    /// 0xCF8..=0xCFF.
    pub const PCI_CONFIG_SIZE: u16 = 8;
    /// PCI I/O BAR window.
    pub const PCI_IO_START: u16 = 0x1000;
    /// Size of the PCI I/O window (up to 0xFFFF).
    pub const PCI_IO_SIZE: u32 = 0x1_0000 - PCI_IO_START as u32;
}

/// ACPI hardware-reduced sleep/reset registers: sleep control at +0, sleep
/// status at +1, reset at +2 (the layout of QEMU's generic event device).
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// Size of the ACPI sleep/reset register block.
pub const ACPI_SLEEP_SIZE: u16 = 3;

/// `bytes` for people: "512 MiB", "1 GiB", "4097 bytes".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (GIB, "GiB"),
        (MIB, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

/// A range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical start.
    pub start: u64,
    /// Size in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

impl RamRegion {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The guest RAM regions (one or two) for `mem_size` bytes of memory: below
/// the 32-bit MMIO hole, then from 4 GiB.
///
/// `mem_size` must be a multiple of 4 KiB in `MIN_MEMORY..=MAX_MEMORY`.
pub fn ram_regions(mem_size: u64) -> Result<Vec<RamRegion>> {
    check_memory_size(mem_size)?;
    let low = mem_size.min(MMIO32_HOLE_START);
    let mut regions = Vec::with_capacity(2);
    regions.push(RamRegion {
        start: 0,
        size: low,
    });
    let high = mem_size - low;
    if high > 0 {
        regions.push(RamRegion {
            start: HIGH_RAM_START,
            size: high,
        });
    }
    Ok(regions)
}

/// Checks `mem_size` against the layout.
pub fn check_memory_size(mem_size: u64) -> Result<()> {
    if mem_size < MIN_MEMORY {
        return Err(Error::MemoryTooSmall {
            size: mem_size,
            min: MIN_MEMORY,
        });
    }
    if mem_size > MAX_MEMORY {
        return Err(Error::MemoryTooLarge {
            size: mem_size,
            max: MAX_MEMORY,
        });
    }
    if mem_size % PAGE_SIZE != 0 {
        return Err(Error::MemoryNotPageAligned(mem_size));
    }
    Ok(())
}

/// End (exclusive) of low RAM for `mem_size` bytes of memory.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO32_HOLE_START)
}

/// The PCI 64-bit MMIO window `(start, size)` for `mem_size` bytes of
/// memory: from the first 1 GiB boundary at or above the end of RAM (and
/// 4 GiB), the 64-bit MMIO window less VMBus's part.
pub fn mmio64_window(mem_size: u64) -> Result<(u64, u64)> {
    check_memory_size(mem_size)?;
    let ram_end = match mem_size.checked_sub(MMIO32_HOLE_START) {
        Some(high) if high > 0 => HIGH_RAM_START + high,
        _ => HIGH_RAM_START,
    };
    let start = ram_end.div_ceil(MMIO64_ALIGN) * MMIO64_ALIGN;
    Ok((start, MMIO64_SIZE - VMBUS_MMIO64_SIZE))
}

/// VMBus's 64-bit MMIO window `(start, size)` for `mem_size` bytes of
/// memory: the top [`VMBUS_MMIO64_SIZE`] of the 64-bit MMIO window, right
/// after PCI's.
pub fn vmbus_mmio64_window(mem_size: u64) -> Result<(u64, u64)> {
    let (start, size) = mmio64_window(mem_size)?;
    Ok((start + size, VMBUS_MMIO64_SIZE))
}

/// A memory map entry type (e820 / PVH memmap / ACPI address range types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryType {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
    /// ACPI reclaimable.
    Acpi = 3,
}

/// One entry of the guest memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type.
    pub kind: MemoryType,
}

/// The memory map the guest sees (e820 or PVH memmap), sorted by address:
///
/// - RAM `0..0x9FC00`;
/// - reserved `0x9FC00..0x100000` (EBDA, legacy BIOS area, ACPI tables);
/// - RAM `0x100000..low_ram_end`;
/// - RAM `4 GiB..` for memory above 3 GiB;
/// - reserved: the PCI ECAM window (so that Linux trusts MCFG).
///
/// The RAM entries plus the legacy reserved area add up to `mem_size`.
pub fn memory_map(mem_size: u64) -> Result<Vec<MemoryMapEntry>> {
    let regions = ram_regions(mem_size)?;
    let mut map = Vec::with_capacity(5);
    map.push(MemoryMapEntry {
        addr: 0,
        size: boot::EBDA_START,
        kind: MemoryType::Ram,
    });
    map.push(MemoryMapEntry {
        addr: boot::EBDA_START,
        size: boot::HIMEM_START - boot::EBDA_START,
        kind: MemoryType::Reserved,
    });
    for r in &regions {
        let start = r.start.max(boot::HIMEM_START);
        if r.end() > start {
            map.push(MemoryMapEntry {
                addr: start,
                size: r.end() - start,
                kind: MemoryType::Ram,
            });
        }
        if r.start == 0 {
            map.push(MemoryMapEntry {
                addr: PCI_ECAM_START,
                size: PCI_ECAM_SIZE,
                kind: MemoryType::Reserved,
            });
        }
    }
    Ok(map)
}

// The fixed windows of the 32-bit hole are disjoint and in order, and the
// boot structures fit in the legacy area.
const _: () = {
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= VMBUS_MMIO32_START);
    assert!(VMBUS_MMIO32_START + VMBUS_MMIO32_SIZE <= PLATFORM_MMIO_START);
    assert!(VMBUS_MMIO64_SIZE < MMIO64_SIZE && VMBUS_MMIO64_SIZE % MMIO64_ALIGN == 0);
    assert!(PLATFORM_MMIO_START + PLATFORM_MMIO_SIZE <= IOAPIC_START);
    assert!(IOAPIC_START + IOAPIC_SIZE <= LAPIC_START);
    assert!(LAPIC_START + LAPIC_SIZE <= KVM_IDENTITY_MAP_START);
    assert!(KVM_TSS_START + 3 * PAGE_SIZE <= MMIO32_HOLE_END);
    assert!(boot::GDT_START + 4 * 8 <= boot::IDT_START);
    assert!(boot::PVH_MODLIST_START >= boot::PVH_INFO_START + 56);
    assert!(boot::PVH_MEMMAP_START >= boot::PVH_MODLIST_START + 32);
    assert!(
        boot::PVH_MEMMAP_START + 24 * boot::PVH_MEMMAP_MAX_ENTRIES as u64 <= boot::ZERO_PAGE_START
    );
    assert!(boot::ZERO_PAGE_START + PAGE_SIZE <= boot::BOOT_STACK_POINTER);
    assert!(boot::BOOT_STACK_POINTER < boot::PML4_START);
    assert!(boot::PD_START + 4 * PAGE_SIZE <= boot::CMDLINE_START);
    assert!(boot::CMDLINE_START + boot::CMDLINE_MAX_SIZE as u64 <= boot::EBDA_START);
    assert!(boot::ACPI_START >= boot::EBDA_START && boot::ACPI_END <= boot::RESET_VECTOR);
    assert!(boot::RESET_VECTOR + 16 == boot::HIMEM_START);
};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    #[test]
    fn small_memory_is_one_region() {
        let r = ram_regions(512 * MIB).unwrap();
        assert_eq!(
            r,
            vec![RamRegion {
                start: 0,
                size: 512 * MIB
            }]
        );
        assert_eq!(low_ram_end(512 * MIB), 512 * MIB);
    }

    #[test]
    fn memory_at_the_hole_is_one_region() {
        let r = ram_regions(3 * GIB).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].end(), MMIO32_HOLE_START);
    }

    #[test]
    fn large_memory_splits_around_the_hole() {
        let r = ram_regions(8 * GIB).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RamRegion {
                start: 0,
                size: 3 * GIB
            }
        );
        assert_eq!(
            r[1],
            RamRegion {
                start: 4 * GIB,
                size: 5 * GIB
            }
        );
        assert_eq!(r.iter().map(|r| r.size).sum::<u64>(), 8 * GIB);
    }

    #[test]
    fn ram_never_covers_fixed_mmio() {
        for mem in [
            MIN_MEMORY,
            512 * MIB,
            3 * GIB,
            3 * GIB + PAGE_SIZE,
            64 * GIB,
        ] {
            for r in ram_regions(mem).unwrap() {
                let ram = (r.start, r.size);
                assert!(!overlaps(ram, (LAPIC_START, LAPIC_SIZE)), "{mem:#x}");
                assert!(!overlaps(ram, (IOAPIC_START, IOAPIC_SIZE)));
                assert!(!overlaps(ram, (PCI_ECAM_START, PCI_ECAM_SIZE)));
                assert!(!overlaps(ram, (PCI_MMIO32_START, PCI_MMIO32_SIZE)));
                assert!(!overlaps(ram, (KVM_IDENTITY_MAP_START, 4 * PAGE_SIZE)));
                assert!(!overlaps(ram, (VMBUS_MMIO32_START, VMBUS_MMIO32_SIZE)));
                let (s, l) = mmio64_window(mem).unwrap();
                assert!(!overlaps(ram, (s, l)));
                assert_eq!(s % MMIO64_ALIGN, 0);
                let (vs, vl) = vmbus_mmio64_window(mem).unwrap();
                assert!(!overlaps(ram, (vs, vl)) && !overlaps((s, l), (vs, vl)));
                assert_eq!(vs, s + l);
            }
        }
    }

    #[test]
    fn memory_size_limits() {
        assert_eq!(
            ram_regions(MIN_MEMORY - PAGE_SIZE),
            Err(Error::MemoryTooSmall {
                size: MIN_MEMORY - PAGE_SIZE,
                min: MIN_MEMORY
            })
        );
        assert!(matches!(
            ram_regions(MAX_MEMORY + PAGE_SIZE),
            Err(Error::MemoryTooLarge { .. })
        ));
        assert_eq!(
            ram_regions(MIN_MEMORY + 1),
            Err(Error::MemoryNotPageAligned(MIN_MEMORY + 1))
        );
        assert!(ram_regions(MAX_MEMORY).is_ok());
        let (s, l) = vmbus_mmio64_window(MAX_MEMORY).unwrap();
        assert!(s + l <= 1 << 40);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(512 * MIB), "512 MiB");
        assert_eq!(human_size(3 * GIB), "3 GiB");
        assert_eq!(human_size(1 << 40), "1 TiB");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(4097), "4097 bytes");
        assert_eq!(human_size(0), "0 bytes");
        assert_eq!(
            Error::MemoryTooSmall {
                size: MIB,
                min: MIN_MEMORY
            }
            .to_string(),
            "Memory size 1 MiB is too small: the guest needs at least 8 MiB"
        );
    }

    #[test]
    fn memory_map_accounts_for_all_memory() {
        for mem in [MIN_MEMORY, 512 * MIB, 3 * GIB, 5 * GIB] {
            let map = memory_map(mem).unwrap();
            let ram: u64 = map
                .iter()
                .filter(|e| e.kind == MemoryType::Ram)
                .map(|e| e.size)
                .sum();
            assert_eq!(ram + (boot::HIMEM_START - boot::EBDA_START), mem);
            assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
        }
        let map = memory_map(512 * MIB).unwrap();
        assert_eq!(
            map[2],
            MemoryMapEntry {
                addr: MIB,
                size: 511 * MIB,
                kind: MemoryType::Ram
            }
        );
    }
}
