//! `hk-guest`: tests and benchmarks of VFIO passthrough through IOMMUFD that
//! run inside a real Linux host kernel (6.12, built by ../build-kernel.sh)
//! under QEMU TCG with an emulated VT-d and QEMU's edu DMA device. The binary
//! is statically linked into an initramfs; results come back as TAP over the
//! serial console to the cargo test in tests/harness.rs.

pub mod bench;
pub mod edu;
pub mod kmsg;
pub mod pci;
pub mod ram;
pub mod suite;
pub mod tap;
pub mod vfio;

/// The IOMMUFD calls (and their extra uapi) of the `iommu` crate's backend.
pub use iommu::iommufd::{ioctl as iommufd, uapi};
