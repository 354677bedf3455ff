//! hotplug: waits for PCI hotplug events from the VMM (the ACPI hotplug
//! registers at 0x610 that the DSDT's GED reads: GEDS, PCIU, PCID, B0EJ),
//! finds each added device on bus 0, drives a DMA fill through a dma-test
//! device (its default pvIOMMU domain: IOVA = GPA) and checks the bytes,
//! and acks each eject request by disabling the device and writing B0EJ.
//!
//! With the pvIOMMU present, each added dma-test device then gets its own
//! S2 domain (id 0x100 + slot) with the DMA page mapped at an IOVA that is
//! not its GPA, is attached to it and fills the page through it. The suite
//! leaves it attached: after acking the eject it deletes the domain, which
//! succeeds only once the VMM has detached the removed device (a domain
//! with a device attached cannot be deleted).
//!
//! An edu device (a host's, passed through with VFIO) is driven by
//! [`super::edu`]: DMA and MSI at IOVA = GPA, then through an S2 domain of
//! its own, a DMA refused after UNMAP; its domain too is deleted after the
//! eject.
//!
//! `tk.hotplug_ack=0` makes the guest ignore eject requests: it then waits
//! for the VMM's forced removal (the slot stops answering) and prints
//! `# hotplug: removed without eject 00:SS.0`.
//!
//! Polls the GEDS register (no interrupt handler: ring 0 is emulated, and
//! a poll every ~20 µs is cheap). Keys: `tk.hotplug=N` removals to wait
//! for (default 1; 0: serve until the VM is shut down, with no time
//! limit), `tk.hotplug_ms=T` the wait in milliseconds (default
//! 60000, measured with an assumed 3 GHz TSC). Prints
//! `# hotplug: ready`, `# hotplug: found 00:SS.0 [vvvv:dddd]`,
//! `# hotplug: dma ok 00:SS.0`, `# hotplug: s2 dma ok 00:SS.0 domain N`,
//! `# hotplug: ejected 00:SS.0`, `# hotplug: domain N deleted`.

use crate::pviommu::{self as hv, Io};
use crate::tap::{Msg, Verdict};
use crate::{diag, fail, x86, Ctx};
use pviommu_abi::{DeviceDomainId, DeviceId, HvStatus, MapFlags};

const PORT: u16 = 0x610;
const PCIU: u16 = PORT;
const PCID: u16 = PORT + 4;
const B0EJ: u16 = PORT + 8;
const GEDS: u16 = PORT + 12;
const GED_PCI_HOTPLUG: u32 = 1;

const CF8: u16 = 0xcf8;
const CFC: u16 = 0xcfc;

const DMA_TEST_ID: u32 = 0x0d7a_1234;
/// dma-test BAR 0 registers (devices/src/dma_test/regs.rs).
const DST_IOVA: u64 = 8;
const LEN: u64 = 16;
const PATTERN: u64 = 20;
const COMMAND: u64 = 24;
const STATUS: u64 = 28;
const CMD_FILL: u32 = 2;
const STATUS_DONE: u32 = 1;

fn cfg_addr(slot: u8, reg: u8) -> u32 {
    0x8000_0000 | u32::from(slot) << 11 | u32::from(reg & 0xfc)
}

pub(super) fn cfg_read(slot: u8, reg: u8) -> u32 {
    x86::outl(CF8, cfg_addr(slot, reg));
    x86::inl(CFC)
}

pub(super) fn cfg_write(slot: u8, reg: u8, value: u32) {
    x86::outl(CF8, cfg_addr(slot, reg));
    x86::outl(CFC, value);
}

/// The config-space offset of the first capability with id `id` of the
/// function in `slot`, walking at most 48 entries.
pub(super) fn find_capability(slot: u8, id: u8) -> Option<u8> {
    if cfg_read(slot, 0x04) >> 16 & 0x10 == 0 {
        return None;
    }
    let mut at = (cfg_read(slot, 0x34) & 0xfc) as u8;
    for _ in 0..48 {
        if at < 0x40 {
            return None;
        }
        let header = cfg_read(slot, at);
        if header & 0xff == u32::from(id) {
            return Some(at);
        }
        at = ((header >> 8) & 0xfc) as u8;
    }
    None
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

static mut DMA_PAGE: Page = Page([0; 4096]);

/// Where the S2 domains map the DMA page (not its GPA).
const S2_IOVA: u64 = 0x7_0000_0000;
const GUEST_OS_ID: u64 = 0x8100_0000_0001_0000;

/// A fill of 64 bytes at IOVA = GPA through the device in `slot`, checked.
fn dma_fill(slot: u8) -> Result<(), Msg> {
    let page = core::ptr::addr_of_mut!(DMA_PAGE) as u64;
    dma_fill_at(slot, page)
}

/// A fill of the DMA page's first 64 bytes, addressed by the device as
/// `iova`, checked.
fn dma_fill_at(slot: u8, iova: u64) -> Result<(), Msg> {
    let bar = u64::from(cfg_read(slot, 0x10) & !0xf);
    if bar == 0 {
        fail!("00:{:02x}.0 has no BAR 0 address", slot);
    }
    // Memory decoding and bus mastering on.
    cfg_write(slot, 0x04, 0x6);
    let page = core::ptr::addr_of_mut!(DMA_PAGE) as u64;
    // SAFETY: the page is ours and identity-mapped; BAR 0 is in the
    // identity-mapped 32-bit MMIO hole and holds the dma-test registers.
    unsafe {
        for i in 0..64u64 {
            x86::mmio_write::<u8>(page + i, 0);
        }
        x86::mmio_write::<u64>(bar + DST_IOVA, iova);
        x86::mmio_write::<u32>(bar + LEN, 64);
        x86::mmio_write::<u32>(bar + PATTERN, 0xa5c3_5a3c);
        x86::mmio_write::<u32>(bar + COMMAND, CMD_FILL);
        let status = x86::mmio_read::<u32>(bar + STATUS);
        if status != STATUS_DONE {
            fail!(
                "DMA fill through 00:{:02x}.0 ended with status {}",
                slot,
                status
            );
        }
        let word = x86::mmio_read::<u32>(page + 60);
        if word != 0xa5c3_5a3c {
            fail!("DMA fill wrote {:#x}, expected 0xa5c35a3c", word);
        }
    }
    Ok(())
}

/// The number of the S2 domain this suite gives the device in `slot`.
fn domain_number(slot: u8) -> u32 {
    0x100 + u32::from(slot)
}

/// The S2 domain of the device in `slot`: created, the DMA page mapped at
/// [`S2_IOVA`], the device attached, a fill through it checked; `None` for
/// a device the guest may not attach (direct).
fn s2_dma(io: &Io, slot: u8) -> Result<Option<DeviceDomainId>, Msg> {
    let d = hv::s2(domain_number(slot));
    let o = hv::create_domain(io, d);
    if !o.ok() {
        fail!(
            "CREATE domain {:#x}: {}",
            domain_number(slot),
            hv::status_name(o.status)
        );
    }
    let gpn = core::ptr::addr_of!(DMA_PAGE) as u64 / 4096;
    let flags = MapFlags::new().with_readable(true).with_writable(true);
    if let Err((status, _)) = hv::map_pages(io, d, S2_IOVA, gpn, 1, flags) {
        fail!("MAP in the device's domain: {}", hv::status_name(status));
    }
    let o = hv::attach(io, d, DeviceId::pci(0, 0, slot, 0));
    if o.status == HvStatus::INVALID_DEVICE_ID {
        // A device the VMM attached directly: not the guest's to move.
        let o = hv::delete_domain(io, d);
        if !o.ok() {
            fail!("DELETE of the unused domain: {}", hv::status_name(o.status));
        }
        diag!(
            "hotplug: 00:{:02x}.0 stays at IOVA = GPA: ATTACH refused (INVALID_DEVICE_ID)",
            slot
        );
        return Ok(None);
    }
    if !o.ok() {
        fail!("ATTACH 00:{:02x}.0: {}", slot, hv::status_name(o.status));
    }
    dma_fill_at(slot, S2_IOVA)?;
    Ok(Some(d))
}

/// After the device in `slot` is gone: deletes its S2 domain, if it has
/// one, once the VMM has detached it; fails after ~5 s.
fn delete_after_removal(
    io: Option<&Io>,
    domains: &mut [Option<DeviceDomainId>; 32],
    slot: u8,
) -> Result<(), Msg> {
    let (Some(io), Some(d)) = (io, domains[usize::from(slot)].take()) else {
        return Ok(());
    };
    delete_after_eject(io, d)?;
    diag!("hotplug: domain {:#x} deleted", domain_number(slot));
    Ok(())
}

/// Deletes `d` once the VMM has detached the ejected device from it;
/// fails after ~5 s.
fn delete_after_eject(io: &Io, d: DeviceDomainId) -> Result<(), Msg> {
    let start = x86::rdtsc();
    loop {
        let o = hv::delete_domain(io, d);
        if o.ok() {
            return Ok(());
        }
        if x86::rdtsc().wrapping_sub(start) > 5000 * x86::TSC_PER_MS {
            fail!(
                "the domain of an ejected device cannot be deleted: {}",
                hv::status_name(o.status)
            );
        }
        x86::delay_ticks(20_000);
    }
}

pub fn run(ctx: &Ctx) -> Verdict {
    // The pvIOMMU part runs when the VMM offers it.
    let io = match hv::detect() {
        Ok(_) => match hv::enable(GUEST_OS_ID) {
            Ok(()) => Some(Io::of(0)),
            Err(e) => fail!("{}", e),
        },
        Err(e) => {
            diag!("hotplug: no pvIOMMU ({}): default domain only", e);
            None
        }
    };
    let mut domains: [Option<DeviceDomainId>; 32] = [None; 32];
    let ack = ctx.arg("tk.hotplug_ack") != Some("0");
    // Slots whose eject this guest ignored (tk.hotplug_ack=0).
    let mut ignored = 0u32;
    let removals: u32 = ctx
        .arg("tk.hotplug")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let wait_ms: u64 = ctx
        .arg("tk.hotplug_ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000);
    let deadline = wait_ms.saturating_mul(x86::TSC_PER_MS);
    let start = x86::rdtsc();
    let (mut added, mut dmas, mut ejected) = (0u32, 0u32, 0u32);
    // tk.hotplug=0: serve hot-adds and removals until the VM is shut down.
    let forever = removals == 0;
    if forever {
        diag!("hotplug: ready, serving until shut down");
    } else {
        diag!("hotplug: ready");
    }
    while forever || ejected < removals {
        if !forever && x86::rdtsc().wrapping_sub(start) > deadline {
            fail!(
                "timed out: {} added, {} ejected of {} expected",
                added,
                ejected,
                removals
            );
        }
        for slot in 1..32u8 {
            if ignored & (1 << slot) != 0 && cfg_read(slot, 0) & 0xffff == 0xffff {
                ignored &= !(1 << slot);
                ejected += 1;
                diag!("hotplug: removed without eject 00:{:02x}.0", slot);
                delete_after_removal(io.as_ref(), &mut domains, slot)?;
            }
        }
        if x86::inl(GEDS) & GED_PCI_HOTPLUG == 0 {
            x86::delay_ticks(20_000);
            continue;
        }
        let up = x86::inl(PCIU);
        let down = x86::inl(PCID);
        for slot in 1..32u8 {
            if up & (1 << slot) != 0 {
                let id = cfg_read(slot, 0);
                if id & 0xffff == 0xffff {
                    fail!("PCIU names 00:{:02x}.0 but nothing answers there", slot);
                }
                added += 1;
                diag!(
                    "hotplug: found 00:{:02x}.0 [{:04x}:{:04x}]",
                    slot,
                    id & 0xffff,
                    id >> 16
                );
                if id == super::edu::EDU_ID {
                    let d = super::edu::check(io.as_ref(), slot, domain_number(slot))?;
                    domains[usize::from(slot)] = d;
                    dmas += 1;
                    diag!("hotplug: edu ok 00:{:02x}.0", slot);
                } else if id == DMA_TEST_ID {
                    dma_fill(slot)?;
                    dmas += 1;
                    diag!("hotplug: dma ok 00:{:02x}.0", slot);
                    if let Some(io) = &io {
                        if let Some(d) = s2_dma(io, slot)? {
                            domains[usize::from(slot)] = Some(d);
                            diag!(
                                "hotplug: s2 dma ok 00:{:02x}.0 domain {:#x}",
                                slot,
                                domain_number(slot)
                            );
                        }
                    }
                }
            }
            if down & (1 << slot) != 0 {
                if ack {
                    cfg_write(slot, 0x04, 0);
                    x86::outl(B0EJ, 1 << slot);
                    ejected += 1;
                    diag!("hotplug: ejected 00:{:02x}.0", slot);
                    delete_after_removal(io.as_ref(), &mut domains, slot)?;
                } else {
                    ignored |= 1 << slot;
                    diag!("hotplug: ignoring the eject request for 00:{:02x}.0", slot);
                }
            }
        }
    }
    diag!(
        "hotplug: {} added, {} DMA checked, {} ejected",
        added,
        dmas,
        ejected
    );
    Ok(None)
}
