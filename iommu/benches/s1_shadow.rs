//! Host ioctls and time per guest flush of a shadowed S1 domain (IOMMUFD
//! backend on a host without nesting), for flushes of 1, 512 and 262,144
//! pages: pages re-pointed then flushed, flushed unchanged, and a flush
//! over a sparse table. Figures from one run, printed; nothing asserted
//! on time. `cargo bench -p iommu --bench s1_shadow`.
//!
//! The host is a counting fake of the IOMMUFD calls (no kernel), so the
//! times are the VMM's own work: walking the guest table, diffing it with
//! the shadow, and issuing the calls.

// Benchmark arithmetic on small known values.
#![allow(clippy::cast_possible_truncation)]

use iommu::iommufd::ioctl::{HwptData, InvalidateEntries, Result as IoctlResult};
use iommu::iommufd::{AttachHwpt, IommufdBackend, IommufdOps, IovaRange, NestFormat};
use iommu::{AttachTarget, Backend, DeviceId, DomainKind, Invalidation, PagingLevels, Perms};
use iommu::{RunBudget, S1Config};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const P: u64 = 4096;
/// Guest RAM: 1 GiB + 8 MiB at GPA 0 (tables in the last 8 MiB).
const RAM: u64 = (1 << 30) + (8 << 20);
const PML4: u64 = 1 << 30;
const PDPT: u64 = PML4 + P;
const PD: u64 = PML4 + 2 * P;
/// 512 PTs after PD: IOVA 0..1 GiB in 4 KiB pages.
const PT0: u64 = PML4 + 3 * P;
const PF: u64 = 1 | 2 | 4;

#[derive(Default)]
struct CountingOps {
    next: AtomicU32,
    maps: AtomicU64,
    unmaps: AtomicU64,
}

impl IommufdOps for CountingOps {
    fn ioas_alloc(&self) -> IoctlResult<u32> {
        Ok(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }
    #[allow(unsafe_code)]
    unsafe fn ioas_map(&self, _: u32, _: u64, _: *mut u8, _: u64, _: Perms) -> IoctlResult<()> {
        self.maps.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn ioas_unmap(&self, _: u32, _: u64, len: u64) -> IoctlResult<u64> {
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        Ok(len)
    }
    fn iova_ranges(&self, _: u32) -> IoctlResult<Vec<IovaRange>> {
        Ok(vec![IovaRange {
            start: 0,
            last: u64::MAX,
        }])
    }
    fn hwpt_alloc(&self, _: u32, _: u32, _: u32, _: HwptData) -> IoctlResult<u32> {
        unreachable!("the backend shadows: no HWPT")
    }
    fn hwpt_invalidate(&self, _: u32, _: InvalidateEntries<'_>) -> IoctlResult<u32> {
        unreachable!("the backend shadows: no HWPT")
    }
    fn destroy(&self, _: u32) -> IoctlResult<()> {
        Ok(())
    }
}

struct Dev;
impl AttachHwpt for Dev {
    fn attach_hwpt(&self, _: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn detach_hwpt(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Guest RAM the backend reads tables from; written through raw pointers.
struct Ram {
    base: *mut u8,
    _buf: Vec<u64>,
}

impl Ram {
    fn new() -> Self {
        // One page more, for a page-aligned start.
        let mut buf = vec![0u64; (RAM / 8 + 512) as usize];
        let off = buf.as_ptr().align_offset(P as usize);
        let base = buf[off..].as_mut_ptr().cast::<u8>();
        Self { base, _buf: buf }
    }
    #[allow(unsafe_code)]
    fn pte(&self, table: u64, index: u64, value: u64) {
        assert!(table + index * 8 + 8 <= RAM);
        // SAFETY: inside the buffer (checked), 8-byte aligned; only raw
        // pointer accesses touch it while the backend holds it.
        unsafe {
            std::ptr::write_volatile(self.base.add((table + index * 8) as usize).cast(), value)
        }
    }
}

fn main() {
    let dev = DeviceId::pci(0, 0, 3, 0);
    let ram = Ram::new();
    let ops = Arc::new(CountingOps::default());
    let backend = IommufdBackend::new(ops.clone(), NestFormat::VtdS1)
        .expect("backend")
        .without_nesting();
    backend.set_run_budget(RunBudget::default());
    // SAFETY: `ram` outlives the backend (dropped after it, below) and is
    // only accessed through raw pointers; the fake host never touches it.
    #[allow(unsafe_code)]
    unsafe { backend.add_ram_region(0, RAM, ram.base) }.expect("ram");
    backend
        .add_host_device(dev, 1, Arc::new(Dev))
        .expect("device");
    backend.add_device(dev).expect("add");

    // IOVA page n -> GPA page 2n mod 2^18 (never contiguous: one run each),
    // so a flush of n changed pages is n unmaps and n maps.
    ram.pte(PML4, 0, PDPT | PF);
    ram.pte(PDPT, 0, PD | PF);
    for t in 0..512 {
        ram.pte(PD, t, (PT0 + t * P) | PF);
    }
    let pages: u64 = 1 << 18;
    let set_all = |shift: u64| {
        for n in 0..pages {
            let gpn = (2 * n + shift) % pages;
            ram.pte(PT0 + (n / 512) * P, n % 512, (gpn * P) | PF);
        }
    };
    set_all(0);
    backend.create_domain(1, DomainKind::S1).expect("create");
    backend
        .set_s1(
            1,
            S1Config {
                root: PML4,
                levels: PagingLevels::Four,
                translation_enabled: true,
                blocked: false,
            },
        )
        .expect("configure");
    let t = Instant::now();
    backend
        .attach(dev, AttachTarget::Domain(1))
        .expect("attach (builds the shadow)");
    println!(
        "shadow build of {pages} scattered 4K pages: {} maps, {:.1} ms",
        ops.maps.load(Ordering::Relaxed),
        t.elapsed().as_secs_f64() * 1e3
    );

    println!(
        "{:>8} {:>22} {:>8} {:>8} {:>10} {:>12} {:>12}",
        "pages", "case", "maps", "unmaps", "entries", "time", "per page"
    );
    let mut shift = 0;
    for n in [1u64, 512, 262_144] {
        // Re-point pages 0..n, then flush them.
        shift += 1;
        for k in 0..n {
            let gpn = (2 * k + shift) % pages;
            ram.pte(PT0 + (k / 512) * P, k % 512, (gpn * P) | PF);
        }
        flush(&backend, &ops, n, "re-pointed");
        flush(&backend, &ops, n, "unchanged");
    }
    // A sparse table: one present page in 1 GiB.
    for t in 1..512 {
        ram.pte(PD, t, 0);
    }
    for k in 1..512 {
        ram.pte(PT0, k, 0);
    }
    flush(&backend, &ops, pages, "cleared to 1 page");
    flush(&backend, &ops, pages, "sparse, unchanged");
    drop(backend);
    drop(ram);
}

fn flush(backend: &IommufdBackend, ops: &CountingOps, n: u64, case: &str) {
    let (m0, u0) = (
        ops.maps.load(Ordering::Relaxed),
        ops.unmaps.load(Ordering::Relaxed),
    );
    let e0 = backend.stats().shadow_entries_read;
    let t = Instant::now();
    backend
        .invalidate(
            1,
            Invalidation::Range {
                iova: 0,
                len: n * P,
            },
        )
        .expect("flush");
    let el = t.elapsed();
    println!(
        "{:>8} {:>22} {:>8} {:>8} {:>10} {:>10.1}us {:>10.3}us",
        n,
        case,
        ops.maps.load(Ordering::Relaxed) - m0,
        ops.unmaps.load(Ordering::Relaxed) - u0,
        backend.stats().shadow_entries_read - e0,
        el.as_secs_f64() * 1e6,
        el.as_secs_f64() * 1e6 / n as f64
    );
}
