//! The tests, one module each; each `run` returns Ok or a failure reason.

pub mod cmdline;
pub mod dma;
pub mod edu;
pub mod hotplug;
pub mod hvbench;
pub mod hvclock;
pub mod irq;
pub mod mem;
pub mod pci;
pub mod pviommu;
pub mod runflood;
pub mod smp;
pub mod vmbus;

/// The median of `v` (sorted in place; `v` is not empty).
pub fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// `a / b` with two decimals, for printing: (whole part, hundredths).
pub fn ratio(a: u64, b: u64) -> (u64, u64) {
    let r = a * 100 / b.max(1);
    (r / 100, r % 100)
}
