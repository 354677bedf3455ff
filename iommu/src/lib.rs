//! The paravirtual IOMMU: hypercall dispatcher, device domains and backends.

pub mod backend;

pub use backend::{
    AttachTarget, Backend, BackendError, DomainId, DomainKind, Invalidation, MapRun, PagingLevels,
    Perms, S1Config,
};
pub use pviommu_abi as abi;
pub use pviommu_abi::DeviceId;
