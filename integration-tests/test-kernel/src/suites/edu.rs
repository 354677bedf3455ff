//! edu: QEMU's `edu` device (1234:11e8), passed through by pvmm with VFIO
//! from a host that has one, driven the way a driver would: its DMA engine
//! and its MSI, in the default domain (IOVA = GPA) and in an S2 domain of
//! this guest's own (map, DMA, unmap, DMA refused). Called by the hotplug
//! suite for each edu that arrives.
//!
//! The device (hw/misc/edu.c): BAR 0 holds the identification register
//! (0x00, 0x010000ed), a liveness register (0x04 reads back the complement
//! of what was written), and the DMA engine: source (0x80), destination
//! (0x88), count (0x90), command (0x98: bit 0 start, bit 1 from the device
//! to RAM, bit 2 raise an interrupt when done). The device side of a DMA
//! is its 4 KiB buffer at 0x40000. It masks DMA addresses to 28 bits and
//! runs each transfer 100 ms (virtual time) after the command.
//!
//! What a refused DMA looks like: the host IOMMU has no translation, the
//! emulated VT-d of the host records a fault (which the host's kernel
//! logs, the test outside checks that), and the device's transfer reads
//! or writes nothing. Here the destination page stays as it was.

use crate::pviommu::{self as hv, Io};
use crate::smp::{self, Lapic};
use crate::tap::Msg;
use crate::{diag, fail, idt, x86};
use core::sync::atomic::Ordering;
use pviommu_abi::{DeviceDomainId, DeviceId, HvStatus, MapFlags};

/// Vendor and device id, as config register 0 reads.
pub const EDU_ID: u32 = 0x11e8_1234;

const IDENT: u64 = 0x00;
const LIVENESS: u64 = 0x04;
const DMA_SRC: u64 = 0x80;
const DMA_DST: u64 = 0x88;
const DMA_COUNT: u64 = 0x90;
const DMA_CMD: u64 = 0x98;
const INTR_ACK: u64 = 0x64;
const INTR_STATUS: u64 = 0x24;
const CMD_START: u64 = 1;
const CMD_TO_RAM: u64 = 2;
const CMD_IRQ: u64 = 4;
/// The device side of its DMA engine.
const BUFFER: u64 = 0x4_0000;
/// The interrupt status bit a DMA completion raises.
const DMA_IRQ: u32 = 0x100;
/// Where this guest's S2 domain maps the destination page (not its GPA,
/// and below the device's 28-bit DMA mask).
const S2_IOVA: u64 = 0x0a00_0000;
/// Bytes per transfer: less than the 4 KiB buffer, which QEMU 7.2's edu
/// refuses whole (its range check is off by one, and the refusal stops
/// the machine).
const LEN: usize = 2048;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

static mut SOURCE: Page = Page([0; 4096]);
static mut DEST: Page = Page([0; 4096]);

fn page(p: *mut Page) -> u64 {
    p as u64
}

/// The MMIO registers of one edu.
struct Edu {
    bar: u64,
}

impl Edu {
    fn read32(&self, reg: u64) -> u32 {
        // SAFETY: BAR 0 is in the identity-mapped 32-bit MMIO hole and holds
        // the edu's registers (checked by `check`).
        unsafe { x86::mmio_read::<u32>(self.bar + reg) }
    }

    fn write32(&self, reg: u64, v: u32) {
        // SAFETY: as in `read32`.
        unsafe { x86::mmio_write::<u32>(self.bar + reg, v) }
    }

    fn write64(&self, reg: u64, v: u64) {
        // SAFETY: as in `read32`; edu takes 64-bit accesses on its DMA
        // registers.
        unsafe { x86::mmio_write::<u64>(self.bar + reg, v) }
    }

    fn read64(&self, reg: u64) -> u64 {
        // SAFETY: as in `write64`.
        unsafe { x86::mmio_read::<u64>(self.bar + reg) }
    }

    /// One transfer of `LEN` bytes, with a completion interrupt; waits for
    /// the engine (at most ~2 s) and returns the interrupts that arrived.
    fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<u64, Msg> {
        let before = idt::LINE_INTERRUPTS.load(Ordering::Acquire);
        self.write64(DMA_SRC, src);
        self.write64(DMA_DST, dst);
        self.write64(DMA_COUNT, LEN as u64);
        let dir = if to_ram { CMD_TO_RAM } else { 0 };
        x86::sti();
        self.write64(DMA_CMD, CMD_START | dir | CMD_IRQ);
        let start = x86::rdtsc();
        while self.read64(DMA_CMD) & CMD_START != 0
            || idt::LINE_INTERRUPTS.load(Ordering::Acquire) == before
        {
            if x86::rdtsc().wrapping_sub(start) > 2000 * x86::TSC_PER_MS {
                x86::cli();
                fail!(
                    "edu DMA {:#x} -> {:#x}: command {:#x}, {} interrupts after 2 s",
                    src,
                    dst,
                    self.read64(DMA_CMD),
                    idt::LINE_INTERRUPTS.load(Ordering::Acquire) - before
                );
            }
            core::hint::spin_loop();
        }
        x86::cli();
        let status = self.read32(INTR_STATUS);
        self.write32(INTR_ACK, status);
        if status & DMA_IRQ == 0 {
            fail!("edu interrupt status {:#x}: no DMA completion", status);
        }
        Ok(idt::LINE_INTERRUPTS.load(Ordering::Acquire) - before)
    }
}

fn fill(p: *mut Page, seed: u8) {
    for i in 0..LEN {
        // SAFETY: the page is this suite's own static; nothing else uses it.
        unsafe { core::ptr::write_volatile((page(p) + i as u64) as *mut u8, seed ^ (i as u8)) };
    }
}

fn matches(p: *mut Page, seed: u8) -> bool {
    // SAFETY: as in `fill`.
    (0..LEN).all(|i| unsafe {
        core::ptr::read_volatile((page(p) + i as u64) as *const u8) == seed ^ (i as u8)
    })
}

fn zero(p: *mut Page) {
    // SAFETY: as in `fill`.
    unsafe { core::ptr::write_bytes(page(p) as *mut u8, 0, LEN) };
}

fn is_zero(p: *mut Page) -> bool {
    // SAFETY: as in `fill`.
    (0..LEN).all(|i| unsafe { core::ptr::read_volatile((page(p) + i as u64) as *const u8) == 0 })
}

/// Points the device's MSI at this CPU's line vector (edge, fixed).
fn enable_msi(slot: u8) -> Result<(), Msg> {
    let lapic = Lapic::current();
    if !smp::lapic_mapped(lapic) {
        fail!("the local APIC is outside the identity map");
    }
    lapic.enable();
    smp::set_eoi(lapic);
    let Some(cap) = super::hotplug::find_capability(slot, 0x05) else {
        fail!("edu 00:{:02x}.0 has no MSI capability", slot);
    };
    let control = super::hotplug::cfg_read(slot, cap) >> 16;
    let apic_id = smp::cpuid_apic_id();
    super::hotplug::cfg_write(slot, cap + 4, 0xfee0_0000 | (apic_id << 12));
    let data_reg = if control & 0x80 != 0 {
        // 64-bit address: upper half zero, data at +12.
        super::hotplug::cfg_write(slot, cap + 8, 0);
        cap + 12
    } else {
        cap + 8
    };
    super::hotplug::cfg_write(slot, data_reg, idt::LINE_VECTOR as u32);
    // Enable, one vector.
    super::hotplug::cfg_write(slot, cap, (control & !0x70 | 1) << 16 | 0x05);
    Ok(())
}

/// Drives the edu in `slot`: identification and liveness, MSI, DMA both
/// ways at IOVA = GPA, then (with the pvIOMMU) DMA through an S2 domain of
/// this guest's, and a DMA refused after the page is unmapped. Returns the
/// S2 domain, left attached (the hotplug suite deletes it after the eject,
/// which works only once the VMM has detached the device).
pub fn check(io: Option<&Io>, slot: u8, domain: u32) -> Result<Option<DeviceDomainId>, Msg> {
    let bar = u64::from(super::hotplug::cfg_read(slot, 0x10) & !0xf);
    if bar == 0 || !crate::paging::is_mapped(bar, 0x1000) {
        fail!("edu 00:{:02x}.0: BAR 0 at {:#x} is not usable", slot, bar);
    }
    // Memory decoding and bus mastering on.
    super::hotplug::cfg_write(slot, 0x04, 0x6);
    let edu = Edu { bar };
    let ident = edu.read32(IDENT);
    if ident & 0xffff != 0xed {
        fail!("edu identification register reads {:#x}", ident);
    }
    edu.write32(LIVENESS, 0x1234_5678);
    if edu.read32(LIVENESS) != !0x1234_5678 {
        fail!("edu liveness register does not invert");
    }
    enable_msi(slot)?;
    let (src, dst) = (
        core::ptr::addr_of_mut!(SOURCE),
        core::ptr::addr_of_mut!(DEST),
    );

    // Default domain: IOVA = GPA, both ways, data checked.
    fill(src, 0x5a);
    zero(dst);
    let irq_in = edu.dma(page(src), BUFFER, false)?;
    let irq_out = edu.dma(BUFFER, page(dst), true)?;
    if !matches(dst, 0x5a) {
        fail!("edu DMA at IOVA = GPA: the data came back wrong");
    }
    diag!(
        "edu: 00:{:02x}.0 ident {:#x}; default domain: DMA to and from RAM at IOVA = GPA, data checked, {} MSIs",
        slot,
        ident,
        irq_in + irq_out
    );
    let Some(io) = io else {
        return Ok(None);
    };

    // An S2 domain of this guest's: the page at S2_IOVA only.
    let d = hv::s2(domain);
    let o = hv::create_domain(io, d);
    if !o.ok() {
        fail!("CREATE domain {:#x}: {}", domain, hv::status_name(o.status));
    }
    let flags = MapFlags::new().with_readable(true).with_writable(true);
    if let Err((s, _)) = hv::map_pages(io, d, S2_IOVA, page(dst) / 4096, 1, flags) {
        fail!("MAP in the edu's domain: {}", hv::status_name(s));
    }
    let o = hv::attach(io, d, DeviceId::pci(0, 0, slot, 0));
    if o.status == HvStatus::INVALID_DEVICE_ID {
        // Passed through with "iommu": "direct": not the guest's to move.
        let o = hv::delete_domain(io, d);
        if !o.ok() {
            fail!("DELETE of the unused domain: {}", hv::status_name(o.status));
        }
        diag!(
            "edu: 00:{:02x}.0 stays at IOVA = GPA: ATTACH refused (INVALID_DEVICE_ID)",
            slot
        );
        return Ok(None);
    }
    if !o.ok() {
        fail!("ATTACH 00:{:02x}.0: {}", slot, hv::status_name(o.status));
    }
    // The device's buffer still holds the 0x5a data: write it out through
    // S2_IOVA.
    zero(dst);
    edu.dma(BUFFER, S2_IOVA, true)?;
    if !matches(dst, 0x5a) {
        fail!(
            "edu DMA through IOVA {:#x} did not reach the mapped page",
            S2_IOVA
        );
    }
    // Unmapped: the same DMA is refused, the page stays zero.
    if let Err((s, _)) = hv::unmap_pages(io, d, S2_IOVA, 1) {
        fail!("UNMAP in the edu's domain: {}", hv::status_name(s));
    }
    zero(dst);
    edu.dma(BUFFER, S2_IOVA, true)?;
    if !is_zero(dst) {
        fail!("edu DMA reached the page after UNMAP returned");
    }
    diag!(
        "edu: 00:{:02x}.0 s2 domain {:#x}: DMA through IOVA {:#x} checked; after UNMAP the DMA was refused",
        slot,
        domain,
        S2_IOVA
    );
    Ok(Some(d))
}
