//! Measures the VMM heap one mapping run costs (the bound behind
//! `IommuConfig::max_map_runs`) and checks it against `MAP_RUN_BYTES`.
//!
//! A counting global allocator sees every allocation of this test binary,
//! which holds this one test only, so nothing else allocates meanwhile.
#![allow(unsafe_code)]

#[path = "../benches/common/mod.rs"]
mod common;

use common::{dev, Guest, Rng, INPUT, P};
use iommu::abi::{DeviceDomainType, HvStatus};
use iommu::{IommuConfig, MAP_RUN_BYTES};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments, so
// `System`'s guarantees hold; the counter has no effect on the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout_bytes(layout), Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout_bytes(layout), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `alloc` above with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            i64::try_from(new_size).unwrap_or(i64::MAX) - layout_bytes(layout),
            Ordering::Relaxed,
        );
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The bytes an allocation takes: its size plus the allocator's per-chunk
/// header (glibc malloc: 8 bytes, chunks rounded to 16).
fn layout_bytes(layout: Layout) -> i64 {
    let chunk = (layout.size() + 8).next_multiple_of(16);
    i64::try_from(chunk).unwrap_or(i64::MAX)
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Maps `runs` single-page runs (alternating GPNs, 507 reps per call) into
/// S2 domain `id`, call bases in `order`; returns the heap they added.
fn map_runs(g: &Guest, id: u32, bases: &[u64]) -> i64 {
    let gpns: Vec<u64> = (0..507).map(|i| 0x1000 + 2 * i).collect();
    // Input pages prepared before measuring: one per call.
    let before = live();
    for (n, &base) in bases.iter().enumerate() {
        let rcx = g.prepare_map(INPUT, id, base, &gpns);
        let res = g.dispatch(rcx, INPUT, 0);
        assert_eq!(res, (HvStatus::SUCCESS, 507), "call {n}");
    }
    live() - before
}

#[test]
fn one_run_costs_at_most_map_run_bytes_per_copy() {
    let calls = 128u64; // 64,896 runs, just under the default floor
    let runs = i64::try_from(calls * 507).expect("small");
    let ascending: Vec<u64> = (0..calls).map(|c| c * 2 * 507 * P).collect();
    let mut random = ascending.clone();
    let mut rng = Rng(7);
    for i in (1..random.len()).rev() {
        let j = usize::try_from(rng.below(i as u64 + 1)).expect("index");
        random.swap(i, j);
    }
    let mut report = Vec::new();
    for (order, bases) in [("ascending", &ascending), ("random", &random)] {
        // The domain layer alone (no device: no backend instance).
        let g = Guest::new(IommuConfig::default());
        g.create(DeviceDomainType::S2, 1);
        let domain_layer = map_runs(&g, 1, bases);
        // The domain layer and the software backend's instance.
        let g = Guest::new(IommuConfig::default());
        g.create(DeviceDomainType::S2, 1);
        g.attach(DeviceDomainType::S2, 1, dev(1));
        let with_instance = map_runs(&g, 1, bases);
        assert_eq!(g.iommu.stats().map_runs, calls * 507);
        let per_run = |bytes: i64| bytes as f64 / runs as f64;
        let (a, b) = (per_run(domain_layer), per_run(with_instance));
        report.push(format!(
            "{order}: domain layer {a:.1} B/run, with the software instance {b:.1} B/run"
        ));
        assert!(a <= MAP_RUN_BYTES as f64, "{a} > {MAP_RUN_BYTES}");
        assert!(b <= 2.0 * MAP_RUN_BYTES as f64, "{b} > 2 * {MAP_RUN_BYTES}");
    }
    // Thinned: twice the runs, then every other one unmapped, which leaves
    // B-tree nodes as empty as they get.
    let g = Guest::new(IommuConfig::default());
    g.create(DeviceDomainType::S2, 1);
    g.attach(DeviceDomainType::S2, 1, dev(1));
    let gpns: Vec<u64> = (0..507).map(|i| 0x1000 + 2 * i).collect();
    let before = live();
    for c in 0..2 * calls {
        let rcx = g.prepare_map(INPUT, 1, c * 2 * 507 * P, &gpns);
        assert_eq!(g.dispatch(rcx, INPUT, 0), (HvStatus::SUCCESS, 507));
    }
    for c in 0..2 * calls {
        for i in (0..507).step_by(2) {
            let rcx = g.prepare_unmap(INPUT, 1, (c * 2 * 507 + i) * P, 1);
            assert_eq!(g.dispatch(rcx, INPUT, 0), (HvStatus::SUCCESS, 1));
        }
    }
    let left = g.iommu.stats().map_runs;
    let thinned = (live() - before) as f64 / left as f64;
    report.push(format!(
        "thinned ({left} runs left): with the software instance {thinned:.1} B/run"
    ));
    assert!(thinned <= 2.0 * MAP_RUN_BYTES as f64, "{thinned}");
    let cfg = IommuConfig::default();
    for (ram_mib, label) in [(64u64, "64 MiB"), (64 << 10, "64 GiB")] {
        let limit = cfg.max_map_runs(ram_mib << 20);
        report.push(format!(
            "{label} of guest RAM: at most {limit} runs, {} MiB per copy (domain layer, each instance)",
            (limit * MAP_RUN_BYTES) >> 20
        ));
    }
    eprintln!("{}", report.join("\n"));
}
