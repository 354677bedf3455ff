//! Dispatch cost of a null call, a 507-page MAP and UNMAP and a 508-entry
//! FLUSH_DEVICE_DOMAIN_LIST, measured in one run, with their ratios; and the
//! cost of a DMA translation. `cargo bench -p iommu --bench dispatch`.

// Benchmark arithmetic on small known values.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{dev, Guest, Rng, INPUT, OUTPUT, P};
use iommu::abi::{Control, DeviceDomainType, FlushListEntry, HvStatus, HypercallCode};
use iommu::{Access, HypercallOutcome, HypercallRegs, IommuConfig};
use std::hint::black_box;
use std::time::Instant;

const BATCHES: usize = 15;

fn main() {
    let g = Guest::new(IommuConfig::default());
    let call = |rcx: u64, rdx: u64, r8: u64| {
        let out = g.iommu.dispatch(&g.mem, 0, HypercallRegs { rcx, rdx, r8 });
        black_box(out)
    };

    // Null calls: a fast DETACH of a device in the default domain (full
    // validation, the state lock, no guest memory), and an unknown code.
    let detach = Control::new()
        .with_code(HypercallCode::DETACH_DEVICE_DOMAIN.0)
        .with_fast(true)
        .into_bits();
    assert_eq!(
        call(detach, u64::MAX, dev(1).into_bits()),
        HypercallOutcome::Complete { rax: 0 }
    );
    let null = common::time_ns(BATCHES, 20_000, || {
        call(detach, u64::MAX, dev(1).into_bits());
    });
    let unknown = Control::new().with_code(0x0001).into_bits();
    let invalid = common::time_ns(BATCHES, 20_000, || {
        call(unknown, 0, 0);
    });

    // 507-page MAP and UNMAP in an S2 domain with an emulated device.
    g.create(DeviceDomainType::S2, 1);
    g.attach(DeviceDomainType::S2, 1, dev(1));
    let contiguous: Vec<u64> = (0x1000..0x1000 + 507).collect();
    let mut rng = Rng(7);
    let scattered: Vec<u64> = (0..507).map(|_| 0x1000 + rng.below(100_000) * 2).collect();
    let unmap_gpa = 0x3000;
    let unmap_rcx = g.prepare_unmap(unmap_gpa, 1, 0x4000_0000, 507);
    let map_unmap = |gpns: &[u64]| {
        let map_rcx = g.prepare_map(INPUT, 1, 0x4000_0000, gpns);
        let (mut tmap, mut tunmap) = (vec![], vec![]);
        for batch in 0..=BATCHES {
            let iters = 300;
            let (mut m, mut u) = (0u128, 0u128);
            for _ in 0..iters {
                let t = Instant::now();
                let out = call(map_rcx, INPUT, OUTPUT);
                m += t.elapsed().as_nanos();
                debug_assert_eq!(out, HypercallOutcome::Complete { rax: 507 << 32 });
                let t = Instant::now();
                let out = call(unmap_rcx, unmap_gpa, OUTPUT);
                u += t.elapsed().as_nanos();
                debug_assert_eq!(out, HypercallOutcome::Complete { rax: 507 << 32 });
            }
            if batch > 0 {
                tmap.push(m as f64 / iters as f64);
                tunmap.push(u as f64 / iters as f64);
            }
        }
        (median(tmap), median(tunmap))
    };
    assert_eq!(
        g.dispatch(
            g.prepare_map(INPUT, 1, 0x4000_0000, &contiguous),
            INPUT,
            OUTPUT
        ),
        (HvStatus::SUCCESS, 507)
    );
    assert_eq!(
        g.dispatch(unmap_rcx, unmap_gpa, OUTPUT),
        (HvStatus::SUCCESS, 507)
    );
    let scattered_rcx = g.prepare_map(INPUT, 1, 0x4000_0000, &scattered);
    assert_eq!(
        g.dispatch(scattered_rcx, INPUT, OUTPUT),
        (HvStatus::SUCCESS, 507)
    );
    assert_eq!(
        g.dispatch(unmap_rcx, unmap_gpa, OUTPUT),
        (HvStatus::SUCCESS, 507)
    );
    let (map_c, unmap_c) = map_unmap(&contiguous);
    let (map_s, unmap_s) = map_unmap(&scattered);

    // 508-entry FLUSH_LIST on an S1 domain with an emulated device and a warm
    // IOTLB.
    g.create(DeviceDomainType::S1, 2);
    g.attach(DeviceDomainType::S1, 2, dev(2));
    let entries: Vec<u64> = (0..508)
        .map(|_| {
            let shift = rng.below(4) as u16;
            let page = (rng.below(1 << 20) >> shift) << shift;
            FlushListEntry::new()
                .with_page_mask_shift(shift)
                .with_page_number(page)
                .into_bits()
        })
        .collect();
    let flush_rcx = g.prepare_flush_list(0x5000, DeviceDomainType::S1, 2, &entries);
    assert_eq!(
        g.dispatch(flush_rcx, 0x5000, OUTPUT),
        (HvStatus::SUCCESS, 508)
    );
    let flush = common::time_ns(BATCHES, 300, || {
        call(flush_rcx, 0x5000, OUTPUT);
    });

    // DMA translation of 4 KiB through an S2 run (emulated device).
    assert_eq!(
        g.dispatch(
            g.prepare_map(INPUT, 1, 0x4000_0000, &contiguous),
            INPUT,
            OUTPUT
        ),
        (HvStatus::SUCCESS, 507)
    );
    let translate = common::time_ns(BATCHES, 20_000, || {
        let s = g
            .iommu
            .translate(&g.mem, dev(1), 0x4001_0000, P, Access::Write);
        black_box(s).ok();
    });

    println!("pvIOMMU dispatch cost (median of {BATCHES} batches, this machine, one run)");
    println!("  null call (fast DETACH, default domain) {null:>10.0} ns   1.00x");
    println!(
        "  unknown call code                       {invalid:>10.0} ns   {:.2}x",
        invalid / null
    );
    println!(
        "  MAP 507 pages, contiguous (1 run)       {map_c:>10.0} ns   {:.2}x null   {:.1} ns/page",
        map_c / null,
        map_c / 507.0
    );
    println!("  UNMAP 507 pages, contiguous             {unmap_c:>10.0} ns   {:.2}x null   {:.1} ns/page", unmap_c / null, unmap_c / 507.0);
    println!(
        "  MAP 507 pages, scattered (507 runs)     {map_s:>10.0} ns   {:.2}x null   {:.1} ns/page",
        map_s / null,
        map_s / 507.0
    );
    println!("  UNMAP 507 pages, scattered              {unmap_s:>10.0} ns   {:.2}x null   {:.1} ns/page", unmap_s / null, unmap_s / 507.0);
    println!(
        "  FLUSH_LIST 508 entries                  {flush:>10.0} ns   {:.2}x null   {:.1} ns/entry",
        flush / null,
        flush / 508.0
    );
    println!(
        "  translate 4 KiB via S2 (emulated DMA)   {translate:>10.0} ns   {:.2}x null",
        translate / null
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
