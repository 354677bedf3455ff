//! Benchmarks inside the QEMU guest (TCG: absolute times are emulated; the
//! ioctl counts and the ratios between runs are the useful part).
//!
//! - direct attach: IOAS set-up and one IOAS_MAP per guest RAM region for
//!   sparse memfd guests of 1, 16 and 64 GiB. The IOAS has no device yet, as
//!   when a VMM builds it before attaching: IOMMUFD pins nothing until a
//!   domain needs the pages, so this is the bookkeeping cost. The pinning cost
//!   is measured apart, on guests small enough to be pinned in this guest.
//! - S2 path: 10^4 single-page IOAS_MAP then IOAS_UNMAP through an IOAS with
//!   the edu device attached (real VT-d page-table updates and IOTLB flushes),
//!   against one map and one unmap of the same 10^4 pages as a single run.
// IOAS_MAP of guest RAM is unsafe (see `Iommufd::ioas_map`).
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

use crate::iommufd::{Iommufd, IommufdOps};
use crate::pci;
use crate::ram::GuestRam;
use crate::suite::Failure;
use crate::vfio::BoundDevice;
use iommu::backend::Perms;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Repetitions of the cheap measurements (the median is printed).
const REPS: usize = 7;
/// Guest RAM below the 32-bit MMIO hole ends here; the rest starts at 4 GiB.
const LOW_RAM_END: u64 = 3 * GIB;
const HIGH_RAM_START: u64 = 4 * GIB;

/// The guest RAM regions (GPA, memfd offset, length) of a guest of `size` bytes.
pub fn ram_regions(size: u64) -> Vec<(u64, u64, u64)> {
    let low = size.min(LOW_RAM_END);
    let mut regions = vec![(0, 0, low)];
    if size > low {
        regions.push((HIGH_RAM_START, low, size - low));
    }
    regions
}

struct Figures {
    ioctls: u32,
    time: Duration,
}

/// Allocates an IOAS, reads its IOVA ranges and maps every RAM region at
/// IOVA = GPA, optionally after attaching `dev`.
fn direct_attach(
    fd: &Iommufd,
    ram: &GuestRam,
    dev: Option<&BoundDevice>,
) -> Result<(u32, Figures), Failure> {
    let start = Instant::now();
    let mut ioctls = 0;
    let ioas = fd.ioas_alloc()?;
    ioctls += 1;
    if let Some(dev) = dev {
        dev.device.attach_hwpt(ioas)?;
        ioctls += 1;
    }
    fd.iova_ranges(ioas)?;
    ioctls += 1;
    for (gpa, offset, len) in ram_regions(ram.size() as u64) {
        let len = to_usize(len)?;
        // SAFETY: the mapping belongs to `ram`, which outlives the IOAS (the
        // caller destroys it before dropping `ram`) and is only accessed
        // through raw-pointer copies.
        unsafe {
            fd.ioas_map(
                ioas,
                gpa,
                ram.host_addr(offset, len)?,
                len as u64,
                Perms::RW,
            )?
        };
        ioctls += 1;
    }
    Ok((
        ioas,
        Figures {
            ioctls,
            time: start.elapsed(),
        },
    ))
}

fn to_usize(n: u64) -> Result<usize, Failure> {
    usize::try_from(n).map_err(|_| Failure(format!("{n:#x} bytes do not fit this address space")))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs every benchmark and prints the figures; returns an error if one
/// could not run.
pub fn run() -> Result<(), Failure> {
    let fd = Iommufd::open()?;
    println!(
        "bench: direct attach, sparse memfd guest RAM, IOAS without a device (no pinning), \
         median of {REPS}"
    );
    for gib in [1u64, 16, 64] {
        let ram = GuestRam::new(c"bench-ram", to_usize(gib * GIB)?)?;
        let mut times = Vec::with_capacity(REPS);
        let mut ioctls = 0;
        for _ in 0..REPS {
            let (ioas, f) = direct_attach(&fd, &ram, None)?;
            fd.destroy(ioas)?;
            times.push(f.time);
            ioctls = f.ioctls;
        }
        times.sort();
        println!(
            "bench:   {gib:>2} GiB: {} regions, {ioctls} ioctls, {:.0} us (min {:.0}, max {:.0})",
            ram_regions(gib * GIB).len(),
            us(times[REPS / 2]),
            us(times[0]),
            us(times[REPS - 1])
        );
    }

    let edu = pci::find_one(pci::EDU_VENDOR, pci::EDU_DEVICE)?;
    let dev = BoundDevice::open(&edu, &fd, false)?;
    println!(
        "bench: direct attach with edu attached first: every page allocated (first touch), \
         pinned and mapped in VT-d"
    );
    for mib in [64u64, 256] {
        let ram = GuestRam::new(c"bench-ram", to_usize(mib * MIB)?)?;
        let (ioas, f) = direct_attach(&fd, &ram, Some(&dev))?;
        // Back to the IOAS of `dev` so that this one can go.
        dev.device.attach_hwpt(dev.ioas_id())?;
        fd.destroy(ioas)?;
        println!(
            "bench:   {mib:>3} MiB: {} ioctls, {:.0} ms, {:.0} MiB/s pinned+mapped",
            f.ioctls,
            f.time.as_secs_f64() * 1e3,
            mib as f64 / f.time.as_secs_f64()
        );
    }

    const PAGES: u64 = 10_000;
    let len = to_usize(PAGES * PAGE)?;
    let ram = GuestRam::new(c"bench-s2", len)?;
    // Populate the RAM first: this measures mapping, not page allocation.
    for i in 0..PAGES {
        ram.write(i * PAGE, &[1])?;
    }
    let s2 = fd.ioas_alloc()?;
    dev.device.attach_hwpt(s2)?;
    let base = 0x100_0000u64;
    println!("bench: S2 path, {PAGES} pages through an IOAS with edu attached");
    let start = Instant::now();
    for i in 0..PAGES {
        // SAFETY: as in direct_attach; everything is unmapped below.
        unsafe {
            fd.ioas_map(
                s2,
                base + i * PAGE,
                ram.host_addr(i * PAGE, 4096)?,
                4096,
                Perms::RW,
            )?
        };
    }
    let map = start.elapsed();
    let start = Instant::now();
    for i in 0..PAGES {
        fd.ioas_unmap(s2, base + i * PAGE, PAGE)?;
    }
    let unmap = start.elapsed();
    println!(
        "bench:   page by page: {PAGES} maps {:.1} ms ({:.1} us/page), {PAGES} unmaps {:.1} ms ({:.1} us/page)",
        map.as_secs_f64() * 1e3,
        us(map) / PAGES as f64,
        unmap.as_secs_f64() * 1e3,
        us(unmap) / PAGES as f64
    );
    let start = Instant::now();
    // SAFETY: as above.
    unsafe { fd.ioas_map(s2, base, ram.host_addr(0, len)?, len as u64, Perms::RW)? };
    let map_run = start.elapsed();
    let start = Instant::now();
    fd.ioas_unmap(s2, base, PAGES * PAGE)?;
    let unmap_run = start.elapsed();
    println!(
        "bench:   one run:      1 map {:.1} ms, 1 unmap {:.1} ms; page-by-page / run: map {:.1}x, unmap {:.1}x",
        map_run.as_secs_f64() * 1e3,
        unmap_run.as_secs_f64() * 1e3,
        map.as_secs_f64() / map_run.as_secs_f64(),
        unmap.as_secs_f64() / unmap_run.as_secs_f64()
    );
    dev.device.attach_hwpt(dev.ioas_id())?;
    fd.destroy(s2)?;
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
