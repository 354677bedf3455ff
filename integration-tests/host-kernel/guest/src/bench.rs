//! Benchmarks inside the QEMU guest, through the `iommu` crate's IOMMUFD
//! backend (TCG: absolute times are emulated; the host calls per operation
//! and the ratios between runs measured together are the useful part).
//!
//! - Direct attach: a backend (its direct-attach and blocked IOAS) and one
//!   IOAS_MAP per guest RAM region, for sparse memfd guests of 1, 16 and
//!   64 GiB, before any device is attached: IOMMUFD pins nothing until a
//!   domain needs the pages, as when a VMM maps guest RAM at start-up. The
//!   pinning cost is measured apart, with the edu device attached first, on
//!   guests small enough to be pinned in this guest.
//! - S2 path: 10^4 single-page runs mapped then unmapped in an S2 domain the
//!   edu device is attached to (real VT-d page-table updates and IOTLB
//!   flushes), against the same 10^4 pages as one run.
// Registering guest RAM with the backend is unsafe (see add_ram_region).
#![allow(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use iommu::backend::{AttachTarget, Backend, DomainKind, MapRun, Perms};
use iommu::DeviceId;

use crate::iommufd::Iommufd;
use crate::pci;
use crate::ram::GuestRam;
use crate::suite::Failure;
use crate::vfio::BoundDevice;
use iommu::iommufd::{AttachHwpt, IommufdBackend, NestFormat};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Repetitions of the cheap measurements (the median is printed).
const REPS: usize = 7;
/// Guest RAM below the 32-bit MMIO hole ends here; the rest starts at 4 GiB.
const LOW_RAM_END: u64 = 3 * GIB;
const HIGH_RAM_START: u64 = 4 * GIB;
const EDU: DeviceId = DeviceId::pci(0, 0, 3, 0);

/// The guest RAM regions (GPA, memfd offset, length) of a guest of `size` bytes.
pub fn ram_regions(size: u64) -> Vec<(u64, u64, u64)> {
    let low = size.min(LOW_RAM_END);
    let mut regions = vec![(0, 0, low)];
    if size > low {
        regions.push((HIGH_RAM_START, low, size - low));
    }
    regions
}

fn to_usize(n: u64) -> Result<usize, Failure> {
    usize::try_from(n).map_err(|_| Failure(format!("{n:#x} bytes do not fit this address space")))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Registers every RAM region of `ram` with `backend` at IOVA = GPA.
fn add_ram(backend: &IommufdBackend, ram: &GuestRam) -> Result<(), Failure> {
    for (gpa, offset, len) in ram_regions(ram.size() as u64) {
        let host = ram.host_addr(offset, to_usize(len)?)?;
        // SAFETY: the caller drops the backend before `ram`; guest RAM is
        // only accessed through raw-pointer copies.
        unsafe { backend.add_ram_region(gpa, len, host)? };
    }
    Ok(())
}

/// Host calls so far: the backend's IOAS_MAP/UNMAP and attaches, plus the
/// two IOAS it allocates when created.
fn host_calls(backend: &IommufdBackend) -> u64 {
    let s = backend.stats();
    2 + s.maps + s.unmaps + s.attaches + s.invalidations
}

/// Runs every benchmark and prints the figures.
pub fn run() -> Result<(), Failure> {
    let fd = Iommufd::open()?;
    let ops = Arc::new(fd.clone());
    println!(
        "bench: direct attach through IommufdBackend, sparse memfd guest RAM, no device yet \
         (no pinning), median of {REPS}"
    );
    for gib in [1u64, 16, 64] {
        let ram = GuestRam::new(c"bench-ram", to_usize(gib * GIB)?)?;
        let mut times = Vec::with_capacity(REPS);
        let mut calls = 0;
        for _ in 0..REPS {
            let start = Instant::now();
            let backend = IommufdBackend::new(ops.clone(), NestFormat::VtdS1)?;
            add_ram(&backend, &ram)?;
            times.push(start.elapsed());
            calls = host_calls(&backend);
        }
        times.sort();
        println!(
            "bench:   {gib:>2} GiB: {} regions, {calls} ioctls, {:.0} us (min {:.0}, max {:.0})",
            ram_regions(gib * GIB).len(),
            us(times[REPS / 2]),
            us(times[0]),
            us(times[REPS - 1])
        );
    }

    let edu = pci::find_one(pci::EDU_VENDOR, pci::EDU_DEVICE)?;
    let dev = BoundDevice::open(&edu, &fd, false)?;
    let handle = || Arc::clone(&dev.device) as Arc<dyn AttachHwpt>;
    println!(
        "bench: direct attach with edu attached first: every page allocated (first touch), \
         pinned and mapped in VT-d"
    );
    for mib in [64u64, 256] {
        let ram = GuestRam::new(c"bench-ram", to_usize(mib * MIB)?)?;
        let backend = IommufdBackend::new(ops.clone(), NestFormat::VtdS1)?;
        backend.add_host_device(EDU, dev.dev_id, handle())?;
        backend.add_device(EDU)?;
        let before = host_calls(&backend);
        let start = Instant::now();
        add_ram(&backend, &ram)?;
        let t = start.elapsed();
        println!(
            "bench:   {mib:>3} MiB: {} ioctl, {:.0} ms, {:.0} MiB/s pinned+mapped",
            host_calls(&backend) - before,
            ms(t),
            mib as f64 / t.as_secs_f64()
        );
        backend.remove_device(EDU)?;
    }

    const PAGES: u64 = 10_000;
    const S2: u32 = 1;
    const BASE: u64 = 0x100_0000;
    let ram = GuestRam::new(c"bench-s2", to_usize(PAGES * PAGE)?)?;
    // Populate the RAM first: this measures mapping, not page allocation.
    for i in 0..PAGES {
        ram.write(i * PAGE, &[1])?;
    }
    let backend = IommufdBackend::new(ops.clone(), NestFormat::VtdS1)?;
    add_ram(&backend, &ram)?;
    backend.add_host_device(EDU, dev.dev_id, handle())?;
    backend.add_device(EDU)?;
    backend.create_domain(S2, DomainKind::S2)?;
    backend.attach(EDU, AttachTarget::Domain(S2))?;
    let run = |i: u64, pages: u64| MapRun {
        iova: BASE + i * PAGE,
        gpa: i * PAGE,
        len: pages * PAGE,
        perms: Perms::RW,
    };
    println!("bench: S2 path through IommufdBackend, {PAGES} pages, edu attached to the domain");
    let calls0 = host_calls(&backend);
    let start = Instant::now();
    for i in 0..PAGES {
        backend.map(S2, run(i, 1))?;
    }
    let map = start.elapsed();
    let start = Instant::now();
    for i in 0..PAGES {
        backend.unmap(S2, run(i, 1))?;
    }
    let unmap = start.elapsed();
    let calls1 = host_calls(&backend);
    println!(
        "bench:   page by page: {} ioctls; {PAGES} maps {:.1} ms ({:.1} us/page), \
         {PAGES} unmaps {:.1} ms ({:.1} us/page)",
        calls1 - calls0,
        ms(map),
        us(map) / PAGES as f64,
        ms(unmap),
        us(unmap) / PAGES as f64
    );
    let start = Instant::now();
    backend.map(S2, run(0, PAGES))?;
    let map_run = start.elapsed();
    let start = Instant::now();
    backend.unmap(S2, run(0, PAGES))?;
    let unmap_run = start.elapsed();
    println!(
        "bench:   one run:      {} ioctls; 1 map {:.1} ms, 1 unmap {:.1} ms; \
         page-by-page / run: map {:.1}x, unmap {:.1}x",
        host_calls(&backend) - calls1,
        ms(map_run),
        ms(unmap_run),
        map.as_secs_f64() / map_run.as_secs_f64(),
        unmap.as_secs_f64() / unmap_run.as_secs_f64()
    );
    backend.attach(EDU, AttachTarget::Identity)?;
    backend.destroy_domain(S2)?;
    backend.remove_device(EDU)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_regions_split_around_the_hole() {
        assert_eq!(ram_regions(GIB), vec![(0, 0, GIB)]);
        assert_eq!(ram_regions(3 * GIB), vec![(0, 0, 3 * GIB)]);
        assert_eq!(
            ram_regions(16 * GIB),
            vec![(0, 0, 3 * GIB), (4 * GIB, 3 * GIB, 13 * GIB)]
        );
        let total: u64 = ram_regions(64 * GIB).iter().map(|r| r.2).sum();
        assert_eq!(total, 64 * GIB);
    }
}
