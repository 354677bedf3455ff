//! The identity map: 0-4 GiB is built at link time (boot.S, 2 MiB pages);
//! `map_up_to` extends it over RAM or MMIO above 4 GiB with 1 GiB pages when
//! the CPU has them, else with 2 MiB pages from a fixed pool. Every page is
//! user-accessible (ring.rs: the kernel computes in ring 3).

use crate::x86;
use core::sync::atomic::{AtomicU64, Ordering};

const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// Present, writable, user-accessible: the kernel computes in ring 3.
const PRESENT_RW_USER: u64 = 0x7;
const HUGE: u64 = 0x80;

extern "C" {
    static mut boot_pdpt: [u64; 512];
    static PT_POOL: [u8; 0];
    static PT_POOL_END: [u8; 0];
}

/// End of the identity-mapped range (exclusive); starts at 4 GiB.
static MAPPED_END: AtomicU64 = AtomicU64::new(4 * GIB);
static POOL_USED: AtomicU64 = AtomicU64::new(0);

/// Whether `[addr, addr + len)` is identity mapped.
pub fn is_mapped(addr: u64, len: u64) -> bool {
    match addr.checked_add(len) {
        Some(end) => end <= MAPPED_END.load(Ordering::Acquire),
        None => false,
    }
}

/// End of the identity map.
pub fn mapped_end() -> u64 {
    MAPPED_END.load(Ordering::Acquire)
}

fn has_1g_pages() -> bool {
    let (max_ext, ..) = x86::cpuid(0x8000_0000, 0);
    max_ext >= 0x8000_0001 && x86::cpuid(0x8000_0001, 0).3 & (1 << 26) != 0
}

/// Takes a zeroed page from the pool; None when it is used up.
fn alloc_page() -> Option<u64> {
    let start = core::ptr::addr_of!(PT_POOL) as u64;
    let end = core::ptr::addr_of!(PT_POOL_END) as u64;
    let used = POOL_USED.fetch_add(PAGE, Ordering::AcqRel);
    let page = start.checked_add(used)?;
    if page.checked_add(PAGE)? > end {
        return None;
    }
    for off in (0..PAGE).step_by(8) {
        // SAFETY: the page is in the kernel's own pool (mapped, unused).
        unsafe { x86::mmio_write::<u64>(page + off, 0) };
    }
    Some(page)
}

/// Extends the identity map to cover `[0, end)` (rounded up to 1 GiB), up
/// to 512 GiB. Returns the new end of the map, which is smaller than `end`
/// when the page-table pool ran out. Only the boot CPU calls this, before
/// the APs start.
pub fn map_up_to(end: u64) -> u64 {
    let want = end.min(512 * GIB);
    let mut cur = MAPPED_END.load(Ordering::Acquire);
    if want <= cur {
        return cur;
    }
    let huge = has_1g_pages();
    // SAFETY: boot_pdpt is the kernel's own top-level table (boot.S); only
    // the boot CPU writes it, before any other CPU runs.
    let pdpt = unsafe { &mut *core::ptr::addr_of_mut!(boot_pdpt) };
    while cur < want {
        let idx = (cur / GIB) as usize;
        if huge {
            pdpt[idx] = cur | HUGE | PRESENT_RW_USER;
        } else {
            let Some(pd) = alloc_page() else { break };
            for i in 0..512u64 {
                let entry = (cur + i * (2 << 20)) | HUGE | PRESENT_RW_USER;
                // SAFETY: `pd` is a fresh pool page, mapped and unused.
                unsafe { x86::mmio_write::<u64>(pd + i * 8, entry) };
            }
            pdpt[idx] = pd | PRESENT_RW_USER;
        }
        cur += GIB;
    }
    // SAFETY: only not-present entries were filled in; reloading CR3 with
    // the same tables flushes the TLB and keeps every old mapping.
    unsafe { x86::write_cr3(x86::read_cr3()) };
    MAPPED_END.store(cur, Ordering::Release);
    cur
}
