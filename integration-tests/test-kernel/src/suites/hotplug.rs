//! hotplug: waits for PCI hotplug events from the VMM (the ACPI hotplug
//! registers at 0x610 that the DSDT's GED reads: GEDS, PCIU, PCID, B0EJ),
//! finds each added device on bus 0, drives a DMA fill through a dma-test
//! device (its default pvIOMMU domain: IOVA = GPA) and checks the bytes,
//! and acks each eject request by disabling the device and writing B0EJ.
//!
//! Polls the GEDS register (no interrupt handler: ring 0 is emulated, and
//! a poll every ~20 µs is cheap). Keys: `tk.hotplug=N` removals to wait
//! for (default 1), `tk.hotplug_ms=T` the wait in milliseconds (default
//! 60000, measured with an assumed 3 GHz TSC). Prints
//! `# hotplug: ready`, `# hotplug: found 00:SS.0 [vvvv:dddd]`,
//! `# hotplug: dma ok 00:SS.0`, `# hotplug: ejected 00:SS.0`.

use crate::tap::{Msg, Verdict};
use crate::{diag, fail, x86, Ctx};

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

fn cfg_read(slot: u8, reg: u8) -> u32 {
    x86::outl(CF8, cfg_addr(slot, reg));
    x86::inl(CFC)
}

fn cfg_write(slot: u8, reg: u8, value: u32) {
    x86::outl(CF8, cfg_addr(slot, reg));
    x86::outl(CFC, value);
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

static mut DMA_PAGE: Page = Page([0; 4096]);

/// A fill of 64 bytes through the device in `slot`, checked.
fn dma_fill(slot: u8) -> Result<(), Msg> {
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
        x86::mmio_write::<u64>(bar + DST_IOVA, page);
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

pub fn run(ctx: &Ctx) -> Verdict {
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
    diag!("hotplug: ready");
    while ejected < removals {
        if x86::rdtsc().wrapping_sub(start) > deadline {
            fail!(
                "timed out: {} added, {} ejected of {} expected",
                added,
                ejected,
                removals
            );
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
                if id == DMA_TEST_ID {
                    dma_fill(slot)?;
                    dmas += 1;
                    diag!("hotplug: dma ok 00:{:02x}.0", slot);
                }
            }
            if down & (1 << slot) != 0 {
                cfg_write(slot, 0x04, 0);
                x86::outl(B0EJ, 1 << slot);
                ejected += 1;
                diag!("hotplug: ejected 00:{:02x}.0", slot);
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
