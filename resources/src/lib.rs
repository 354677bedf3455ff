//! Guest physical layout and allocators (MMIO, GSI, PCI slot, device id).
//!
//! [`layout`] says where everything lives in the guest; [`alloc`] hands out
//! what devices need at run time ([`SystemAllocator`]). It also holds what
//! every crate shares that is not the guest's: [`ErrorChain`], how errors
//! are printed with their sources.

pub mod alloc;
mod chain;
pub mod layout;

pub use alloc::{BarKind, IdPool, RangeAllocator, SystemAllocator};
pub use chain::ErrorChain;
pub use layout::{memory_map, ram_regions, MemoryMapEntry, MemoryType, RamRegion};

/// Errors of the layout and the allocators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Guest memory below the minimum.
    #[error(
        "Memory size {} is too small: the guest needs at least {}",
        layout::human_size(*.size),
        layout::human_size(*.min)
    )]
    MemoryTooSmall {
        /// Requested size.
        size: u64,
        /// Minimum.
        min: u64,
    },
    /// Guest memory above the maximum.
    #[error(
        "Memory size {} is too large: the guest layout holds at most {}",
        layout::human_size(*.size),
        layout::human_size(*.max)
    )]
    MemoryTooLarge {
        /// Requested size.
        size: u64,
        /// Maximum.
        max: u64,
    },
    /// Guest memory not a whole number of pages.
    #[error("Memory size {} is not a multiple of 4 KiB", layout::human_size(*.0))]
    MemoryNotPageAligned(u64),
    /// A range that wraps or is empty.
    #[error("Invalid range: base {base:#x}, size {size:#x}")]
    InvalidRange {
        /// Base.
        base: u64,
        /// Size.
        size: u64,
    },
    /// An allocator refused (exhausted, overlap, double free...).
    #[error("{0} allocator")]
    Allocator(&'static str, #[source] vm_allocator::Error),
    /// Every PCI slot of bus 0 is in use.
    #[error("No free PCI slot on bus 0")]
    NoPciSlot,
    /// A PCI slot that cannot be reserved or freed in its current state.
    #[error("PCI slot {0} is out of range, the host bridge's, or not in the expected state")]
    PciSlot(u8),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
