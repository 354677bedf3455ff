//! The IOMMUFD backend: the pvIOMMU's domains for VFIO passthrough devices,
//! mirrored into a host IOMMU through `/dev/iommu` ([`IommufdBackend`]).
//!
//! - [`ioctl`]: the IOMMUFD calls ([`IommufdOps`]) and their implementation
//!   on `/dev/iommu` ([`Iommufd`]);
//! - [`uapi`]: the ioctls and structures `iommufd-ioctls` does not wrap
//!   (IOAS_IOVA_RANGES, the selftest mock's IOMMU_TEST_CMD), with layout tests.
//!
//! The host-kernel harness (integration-tests/host-kernel) runs this module
//! against a real kernel's IOMMUFD through the `iommu` crate.

mod host;
pub mod ioctl;
pub mod uapi;

pub use host::{IommufdBackend, IommufdStats, NestFormat, MSI_WINDOW};
pub use ioctl::{Iommufd, IommufdOps, IovaRange, DEV_IOMMU};
pub use iommufd_ioctls::AttachHwpt;

use super::backend::{
    AttachTarget, Backend, BackendError, DomainId, DomainKind, InvalidRequest, Invalidation,
    MapRun, PagingLevels, Perms, S1Config, S1Mode,
};
use super::DeviceId;
