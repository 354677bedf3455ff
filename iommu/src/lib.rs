//! The paravirtual IOMMU: hypercall dispatcher, device domains and backends.
