//! A guest that makes the host log on every hypercall cannot flood the
//! host's log: a backend that fails every map (a host IOMMU out of
//! resources, say) makes each of 20,000 MAP calls fail, and each failure is
//! a warning. The lines that reach the logger stay within the process's
//! one limiter (a burst, then a rate), and every line is counted, sent or
//! dropped. This test binary holds this test only: its logger sees nothing
//! else.

#[path = "../benches/common/mod.rs"]
mod common;

use common::{dev, Guest, INPUT};
use iommu::abi::{DeviceDomainType, HvStatus};
use iommu::guest_log;
use iommu::IommuConfig;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts the lines that reach it.
struct Counter;

static LINES: AtomicU64 = AtomicU64::new(0);

impl log::Log for Counter {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, _: &log::Record) {
        LINES.fetch_add(1, Ordering::Relaxed);
    }
    fn flush(&self) {}
}

#[test]
fn a_guest_cannot_flood_the_host_log() {
    log::set_logger(&Counter).expect("the only logger");
    log::set_max_level(log::LevelFilter::Trace);
    let g = Guest::new(IommuConfig::default());
    g.create(DeviceDomainType::S2, 4);
    g.attach(DeviceDomainType::S2, 4, dev(9));
    const CALLS: u64 = 20_000;
    g.rec.fail_next_maps(usize::MAX);
    let before = guest_log::counts();
    let start = Instant::now();
    for n in 0..CALLS {
        let rcx = g.prepare_map(INPUT, 4, 0x10_0000, &[0x2000 + n % 8]);
        let (status, done) = g.dispatch(rcx, INPUT, 0);
        assert_eq!((status, done), (HvStatus::NO_RESOURCES, 0), "call {n}");
    }
    let secs = start.elapsed().as_secs() + 1;
    let after = guest_log::counts();
    let lines = LINES.load(Ordering::Relaxed);
    let bound = guest_log::BURST + guest_log::PER_SECOND * secs;
    // A "lines suppressed" note may go with each allowed line.
    assert!(
        lines <= 2 * bound,
        "{lines} log lines for {CALLS} failing calls in {secs} s (bound {bound})"
    );
    let through = (after.emitted - before.emitted) + (after.dropped - before.dropped);
    assert!(
        through >= CALLS,
        "only {through} of {CALLS} lines were counted"
    );
}
