//! The `iommu` crate's IOMMUFD backend, compiled here by path: `iommu`'s
//! lib.rs does not declare `pub mod iommufd` yet. The module names the rest
//! of its crate only through `super::`, which these re-exports stand in for.
//! Once `iommu::iommufd` exists, this file becomes `pub use iommu::iommufd;`.

pub use iommu::backend;
pub use iommu::DeviceId;

#[path = "../../../../iommu/src/iommufd/mod.rs"]
pub mod iommufd;
