//! Host (backend) calls per MAP and UNMAP: contiguous, scattered and mixed
//! pages, counted on a backend with IOMMUFD's rules.
//! `cargo bench -p iommu --bench backend_calls`.

// Benchmark arithmetic on small known values.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{dev, Guest, Rng, INPUT, OUTPUT, P};
use iommu::abi::{DeviceDomainType, HvStatus};
use iommu::testing::Call;
use iommu::IommuConfig;

fn counts(calls: &[Call]) -> (usize, usize) {
    let maps = calls.iter().filter(|c| matches!(c, Call::Map(..))).count();
    let unmaps = calls
        .iter()
        .filter(|c| matches!(c, Call::Unmap(..)))
        .count();
    (maps, unmaps)
}

fn guest(budget: u16) -> Guest {
    let g = Guest::new(IommuConfig {
        rep_budget: budget,
        ..Default::default()
    });
    g.create(DeviceDomainType::S2, 1);
    g.attach(DeviceDomainType::S2, 1, dev(9));
    g.rec.take_calls();
    g
}

fn map(g: &Guest, iova: u64, gpns: &[u64]) -> (usize, usize) {
    let rcx = g.prepare_map(INPUT, 1, iova, gpns);
    assert_eq!(
        g.dispatch(rcx, INPUT, OUTPUT),
        (HvStatus::SUCCESS, gpns.len() as u16)
    );
    counts(&g.rec.take_calls())
}

fn unmap(g: &Guest, iova: u64, pages: usize) -> (usize, usize) {
    let rcx = g.prepare_unmap(INPUT, 1, iova, pages);
    assert_eq!(
        g.dispatch(rcx, INPUT, OUTPUT),
        (HvStatus::SUCCESS, pages as u16)
    );
    counts(&g.rec.take_calls())
}

fn main() {
    let mut rng = Rng(42);
    let contiguous: Vec<u64> = (0x1000..0x1000 + 507).collect();
    // Distinct, never adjacent GPNs.
    let scattered: Vec<u64> = (0..507u64)
        .map(|i| 0x1000 + i * 3 + rng.below(2))
        .rev()
        .collect();
    // Runs of 1..=64 contiguous pages at random places (an allocator's view).
    let mut mixed = Vec::new();
    let mut runs = 0;
    while mixed.len() < 507 {
        let len = (1 + rng.below(64)).min(507 - mixed.len() as u64);
        let start = 0x1000 + rng.below(3000) * 64;
        mixed.extend(start..start + len);
        runs += 1;
    }

    println!("Backend (host) calls per guest call; IOMMUFD rules: no overlap, whole-run unmaps");
    println!(
        "  {:<46} {:>6} {:>8} {:>8}",
        "guest call", "reps", "maps", "unmaps"
    );
    let row = |what: &str, reps: usize, (m, u): (usize, usize)| {
        println!("  {what:<46} {reps:>6} {m:>8} {u:>8}");
    };

    let g = guest(512);
    let c = map(&g, 0, &contiguous);
    row("MAP 507 pages contiguous in IOVA and GPA", 507, c);
    row(
        "UNMAP 10 pages in the middle of that run",
        10,
        unmap(&g, 100 * P, 10),
    );
    row("UNMAP the rest (2 runs)", 497, {
        let a = unmap(&g, 0, 100);
        let b = unmap(&g, 110 * P, 397);
        (a.0 + b.0, a.1 + b.1)
    });
    let sc = map(&g, 0, &scattered);
    row("MAP 507 pages scattered in GPA", 507, sc);
    row("UNMAP those 507 pages", 507, unmap(&g, 0, 507));
    let label = format!("MAP 507 pages in {runs} contiguous GPA runs");
    row(&label, 507, map(&g, 0, &mixed));
    row("UNMAP those 507 pages", 507, unmap(&g, 0, 507));
    let g = guest(64);
    row(
        "MAP 507 contiguous, rep budget 64 (8 slices)",
        507,
        map(&g, 0, &contiguous),
    );
    row("UNMAP those 507 pages", 507, unmap(&g, 0, 507));
    println!(
        "  host maps per MAP: contiguous {}, scattered {}: ratio {:.0}x (O(runs), not O(pages))",
        c.0,
        sc.0,
        sc.0 as f64 / c.0 as f64
    );
}
