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
