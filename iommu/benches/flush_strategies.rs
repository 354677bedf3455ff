//! Flush entries and over-flushed pages: the Linux guest driver's v1 (exact
//! 2^N blocks) and v2 (one covering 2^N block) strategies on the same random
//! workloads, sent through the real dispatcher; pvmm merges each call's
//! entries into maximal exact ranges, one host invalidation each.
//! `cargo bench -p iommu --bench flush_strategies`.

// Benchmark arithmetic on small known values.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{dev, Guest, Rng, OUTPUT, P};
use iommu::abi::{DeviceDomainType, HvStatus, FLUSH_LIST_MAX_REPS_PER_PAGE};
use iommu::flush::{linux_v1_entries, linux_v2_entry, merge_ranges, PageRange};
use iommu::testing::Call;
use iommu::{Invalidation, IommuConfig};

const FLUSH_GPA: u64 = 0x5000;

#[derive(Default)]
struct Totals {
    calls: u64,
    entries: u64,
    host_invalidations: u64,
    flushed_pages: u64,
    exact_pages: u64,
}

/// Sends `entries` for one guest flush (split into pages of 508), and counts
/// what the host did.
fn send(g: &Guest, entries: &[u64], exact_pages: u64, t: &mut Totals) {
    for chunk in entries.chunks(usize::from(FLUSH_LIST_MAX_REPS_PER_PAGE)) {
        let rcx = g.prepare_flush_list(FLUSH_GPA, DeviceDomainType::S1, 2, chunk);
        let (status, reps) = g.dispatch(rcx, FLUSH_GPA, OUTPUT);
        assert_eq!(
            (status, usize::from(reps)),
            (HvStatus::SUCCESS, chunk.len())
        );
        t.calls += 1;
    }
    t.entries += entries.len() as u64;
    t.exact_pages += exact_pages;
    for call in g.rec.take_calls() {
        if let Call::Invalidate(_, Invalidation::Range { len, .. }) = call {
            t.host_invalidations += 1;
            t.flushed_pages += len / P;
        }
    }
}

/// A workload: a list of guest flushes, each a list of page ranges.
fn run(name: &str, flushes: &[Vec<(u64, u64)>]) {
    let g = Guest::new(IommuConfig::default());
    g.create(DeviceDomainType::S1, 2);
    g.attach(DeviceDomainType::S1, 2, dev(9));
    g.rec.take_calls();
    let (mut v1, mut v2) = (Totals::default(), Totals::default());
    for ranges in flushes {
        // The pages this flush must cover: the union of its ranges.
        let mut union: Vec<PageRange> = ranges
            .iter()
            .map(|&(start, n)| PageRange {
                start,
                end: start + n,
            })
            .collect();
        let n = merge_ranges(&mut union);
        let exact: u64 = union[..n].iter().map(PageRange::pages).sum();
        let mut e1 = vec![];
        for &(start, pages) in ranges {
            linux_v1_entries(start, pages, |e| e1.push(e.into_bits()));
        }
        send(&g, &e1, exact, &mut v1);
        let e2: Vec<u64> = ranges
            .iter()
            .map(|&(s, n)| linux_v2_entry(s, n).into_bits())
            .collect();
        send(&g, &e2, exact, &mut v2);
    }
    let ranges: usize = flushes.iter().map(Vec::len).sum();
    println!(
        "\n{name}: {} guest flushes, {ranges} unmapped ranges, {} pages",
        flushes.len(),
        v1.exact_pages
    );
    println!(
        "  {:<36} {:>10} {:>12} {:>14} {:>12}",
        "strategy", "entries", "host inval.", "pages flushed", "over-flush"
    );
    let pct = |t: &Totals| 100.0 * (t.flushed_pages - t.exact_pages) as f64 / t.exact_pages as f64;
    println!(
        "  {:<36} {:>10} {:>12} {:>14} {:>11.1}%",
        "Linux v1, host forwards each entry", v1.entries, v1.entries, v1.exact_pages, 0.0
    );
    println!(
        "  {:<36} {:>10} {:>12} {:>14} {:>11.1}%",
        "Linux v1 + pvmm merge (exact)",
        v1.entries,
        v1.host_invalidations,
        v1.flushed_pages,
        pct(&v1)
    );
    println!(
        "  {:<36} {:>10} {:>12} {:>14} {:>11.1}%",
        "Linux v2 (one covering block)",
        v2.entries,
        v2.host_invalidations,
        v2.flushed_pages,
        pct(&v2)
    );
    println!(
        "  over-flushed pages: v1+merge {}, v2 {}; host invalidations v1+merge/v1 entries = {:.2}",
        v1.flushed_pages - v1.exact_pages,
        v2.flushed_pages - v2.exact_pages,
        v1.host_invalidations as f64 / v1.entries as f64
    );
    assert_eq!(
        v1.flushed_pages, v1.exact_pages,
        "merging never over-flushes"
    );
}

fn length(rng: &mut Rng) -> u64 {
    match rng.below(100) {
        0..=69 => 1 + rng.below(16),
        70..=94 => 17 + rng.below(496),
        _ => 513 + rng.below(3584),
    }
}

fn main() {
    let mut rng = Rng(2026);
    // Independent unmaps, one flush each, anywhere in a 64 GiB IOVA space.
    let single: Vec<Vec<(u64, u64)>> = (0..2000)
        .map(|_| vec![(rng.below(1 << 24), length(&mut rng))])
        .collect();
    run("random unmaps, one flush per unmap", &single);
    // A streaming driver: consecutive buffers unmapped, 16 per flush.
    let mut cursor = 0x10_0000;
    let streaming: Vec<Vec<(u64, u64)>> = (0..500)
        .map(|_| {
            (0..16)
                .map(|_| {
                    let n = 1 + rng.below(16);
                    let r = (cursor, n);
                    cursor += n;
                    r
                })
                .collect()
        })
        .collect();
    run(
        "streaming unmaps, 16 consecutive ranges per flush",
        &streaming,
    );
    // Batched random unmaps, 8 per flush.
    let batched: Vec<Vec<(u64, u64)>> = (0..500)
        .map(|_| {
            (0..8)
                .map(|_| (rng.below(1 << 24), length(&mut rng)))
                .collect()
        })
        .collect();
    run("random unmaps, 8 per flush", &batched);
}
