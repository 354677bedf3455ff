//! Limits and offered features of one VM's pvIOMMU, and the host-side errors.

use crate::backend::BackendError;
use crate::BackendId;
use pviommu_abi::DeviceId;

/// 4 KiB page.
pub(crate) const PAGE_SIZE: u64 = pviommu_abi::HV_PAGE_SIZE;
pub(crate) const PAGE_SHIFT: u32 = pviommu_abi::HV_PAGE_SHIFT;

/// Page sizes the default configuration reports: 4 KiB, 2 MiB, 1 GiB.
pub const DEFAULT_PGSIZE_BITMAP: u64 = (1 << 12) | (1 << 21) | (1 << 30);

/// Default [`IommuConfig::map_runs_per_mib`]: one run per 4 KiB page of
/// guest RAM (every page of the guest mapped once, no two pages adjacent).
pub const DEFAULT_MAP_RUNS_PER_MIB: u64 = 256;
/// Default [`IommuConfig::map_runs_floor`].
pub const DEFAULT_MAP_RUNS_FLOOR: u64 = 65_536;
/// Upper bound of the VMM heap one mapping run costs per copy: the domain
/// layer keeps one copy of every run, and each backend instance of its domain
/// one more (the software model's run map, IOMMUFD's run table), each a
/// `BTreeMap<u64, MapRun>` entry. Measured by tests/run_memory.rs, which
/// checks this bound: 79 B per copy whatever the insertion order; 112 B
/// covers B-tree nodes at their minimum fill (5 of 11 entries) and the
/// allocator's chunk headers.
///
/// The VM-wide bound is `max_map_runs(guest RAM) * MAP_RUN_BYTES * (1 +
/// instances per domain)`, at most one instance per backend. With the
/// defaults: 64 MiB of guest RAM allows 65,536 runs, at most 7 MiB per copy,
/// 14 MiB with one backend instance (measured: 4.9 MiB per copy); 64 GiB
/// allows 16 Mi runs, at most 1.75 GiB per copy, 3.5 GiB with one instance
/// (measured: 1.2 GiB per copy), under 6% of the guest's RAM.
pub const MAP_RUN_BYTES: u64 = 112;

/// Limits and features of one VM's pvIOMMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuConfig {
    /// Device domains the guest may create (the default and null domains are
    /// not counted). Past it CREATE answers INSUFFICIENT_DEVICE_DOMAINS.
    pub max_domains: u32,
    /// Pages one S2 domain may map. Past it MAP answers INSUFFICIENT_MEMORY.
    pub max_mapped_pages_per_domain: u64,
    /// Mapping runs the whole VM may hold, per MiB of guest RAM (see
    /// [`IommuConfig::max_map_runs`]). A run is one host mapping: pages
    /// contiguous in IOVA and GPA mapped by one MAP call, or a piece of one
    /// left by an UNMAP. Past the limit MAP (and an UNMAP that would split a
    /// run in two) answers INSUFFICIENT_MEMORY.
    pub map_runs_per_mib: u64,
    /// The floor of the VM-wide run limit, whatever the guest RAM size.
    pub map_runs_floor: u64,
    /// Reps one dispatch runs before it asks the VMM to restart the call
    /// (time slicing). At least 1.
    pub rep_budget: u16,
    /// Width of the device address space in bits, reported by
    /// GET_IOMMU_CAPABILITIES: 32..=48 (what 4-level x86 page tables
    /// address), or up to 57 with `s1_5level`. IOVAs at or past 2^width are
    /// refused; flushes are clamped to it.
    pub max_iova_width: u8,
    /// S1 (guest page table) domains are offered.
    pub s1: bool,
    /// 5-level S1 page tables are offered (needs `s1`).
    pub s1_5level: bool,
    /// Page sizes reported by GET_IOMMU_CAPABILITIES (must include 4 KiB).
    pub pgsize_bitmap: u64,
    /// Guest physical address width for the S1 walker's reserved-bit check
    /// (PTE bits 51:width must be zero), 32..=52.
    pub phys_addr_width: u8,
    /// Capacity of the software backend's IOTLB, per domain, in 4 KiB
    /// entries. When it is full the domain's IOTLB starts over. At least 1.
    pub iotlb_entries: usize,
}

impl Default for IommuConfig {
    fn default() -> Self {
        Self {
            max_domains: 256,
            max_mapped_pages_per_domain: 1 << 20,
            map_runs_per_mib: DEFAULT_MAP_RUNS_PER_MIB,
            map_runs_floor: DEFAULT_MAP_RUNS_FLOOR,
            rep_budget: 512,
            max_iova_width: 48,
            s1: true,
            s1_5level: true,
            pgsize_bitmap: DEFAULT_PGSIZE_BITMAP,
            phys_addr_width: 46,
            iotlb_entries: 4096,
        }
    }
}

impl IommuConfig {
    /// Checks the values a user may have got wrong.
    pub fn validate(&self) -> Result<(), IommuError> {
        let max_width = if self.s1_5level { 57 } else { 48 };
        if !(32..=max_width).contains(&self.max_iova_width) {
            return Err(IommuError::IovaWidth(self.max_iova_width));
        }
        if !(32..=52).contains(&self.phys_addr_width) {
            return Err(IommuError::PhysAddrWidth(self.phys_addr_width));
        }
        if self.rep_budget == 0 {
            return Err(IommuError::ZeroRepBudget);
        }
        if self.s1_5level && !self.s1 {
            return Err(IommuError::FiveLevelWithoutS1);
        }
        if self.pgsize_bitmap & PAGE_SIZE == 0 {
            return Err(IommuError::PageSizes(self.pgsize_bitmap));
        }
        if self.iotlb_entries == 0 {
            return Err(IommuError::ZeroIotlb);
        }
        Ok(())
    }

    /// The VM-wide limit on mapping runs for `guest_ram_bytes` of guest RAM:
    /// `max(map_runs_floor, map_runs_per_mib * guest RAM in MiB)`. Every run
    /// costs the VMM up to [`MAP_RUN_BYTES`] per copy (the domain layer's,
    /// and one per backend instance of its domain), so this bounds the
    /// memory a guest can make the VMM spend on mappings.
    pub fn max_map_runs(&self, guest_ram_bytes: u64) -> u64 {
        (guest_ram_bytes >> 20)
            .saturating_mul(self.map_runs_per_mib)
            .max(self.map_runs_floor)
    }

    /// One past the highest IOVA the guest may use (at most 2^57, so it
    /// and every page number below it fit a u64 with room to spare).
    pub(crate) fn iova_limit(&self) -> u128 {
        1u128 << self.max_iova_width
    }
}

/// Host-side errors of the iommu crate (configuration, device management).
/// Guest-visible results are [`pviommu_abi::HvStatus`] instead.
#[derive(Debug, thiserror::Error)]
pub enum IommuError {
    /// max_iova_width out of range.
    #[error("IOVA width {0} is not between 32 and 48 bits (57 with 5-level S1 tables)")]
    IovaWidth(u8),
    /// phys_addr_width out of range.
    #[error("Physical address width {0} is not between 32 and 52 bits")]
    PhysAddrWidth(u8),
    /// rep_budget is zero.
    #[error("Rep budget must be at least 1")]
    ZeroRepBudget,
    /// s1_5level without s1.
    #[error("5-level S1 needs S1 domains to be offered")]
    FiveLevelWithoutS1,
    /// pgsize_bitmap without 4 KiB.
    #[error("Page size bitmap {0:#x} does not include 4 KiB")]
    PageSizes(u64),
    /// iotlb_entries is zero.
    #[error("IOTLB capacity must be at least 1")]
    ZeroIotlb,
    /// register_device of a device already registered.
    #[error("Device {0} is already registered")]
    DeviceExists(DeviceId),
    /// A device id that is not registered.
    #[error("Device {0} is not registered")]
    UnknownDevice(DeviceId),
    /// A device id that is not in the PCI form.
    #[error("Device id {0:#x} is not in the PCI form")]
    NotPciDevice(u64),
    /// A device id that is not in the LOGICAL form.
    #[error("Device id {0:#x} is not in the LOGICAL form")]
    NotLogicalDevice(u64),
    /// register_device_alias of a device that has a LOGICAL id already.
    #[error("Device {device} already has the LOGICAL id {logical}")]
    AliasExists {
        /// The device (PCI form).
        device: DeviceId,
        /// Its LOGICAL id.
        logical: DeviceId,
    },
    /// A backend id that was never added.
    #[error("Backend {0:?} does not exist")]
    UnknownBackend(BackendId),
    /// The device's backend refused the operation.
    #[error("Backend operation failed")]
    Backend(#[source] BackendError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        IommuConfig::default().validate().expect("default config");
        let widest = IommuConfig {
            max_iova_width: 57,
            ..Default::default()
        };
        widest.validate().expect("57 bits with 5-level tables");
    }

    #[test]
    fn bad_values_are_refused_with_a_message() {
        let cases: [(IommuConfig, &str); 9] = [
            (
                IommuConfig {
                    max_iova_width: 31,
                    ..Default::default()
                },
                "IOVA width 31",
            ),
            (
                IommuConfig {
                    max_iova_width: 64,
                    ..Default::default()
                },
                "IOVA width 64",
            ),
            (
                IommuConfig {
                    max_iova_width: 58,
                    ..Default::default()
                },
                "IOVA width 58",
            ),
            (
                IommuConfig {
                    max_iova_width: 49,
                    s1_5level: false,
                    ..Default::default()
                },
                "IOVA width 49",
            ),
            (
                IommuConfig {
                    phys_addr_width: 53,
                    ..Default::default()
                },
                "Physical address width 53",
            ),
            (
                IommuConfig {
                    rep_budget: 0,
                    ..Default::default()
                },
                "Rep budget",
            ),
            (
                IommuConfig {
                    s1: false,
                    s1_5level: true,
                    ..Default::default()
                },
                "5-level",
            ),
            (
                IommuConfig {
                    pgsize_bitmap: 1 << 21,
                    ..Default::default()
                },
                "4 KiB",
            ),
            (
                IommuConfig {
                    iotlb_entries: 0,
                    ..Default::default()
                },
                "IOTLB",
            ),
        ];
        for (config, text) in cases {
            let err = config.validate().expect_err("invalid config");
            assert!(err.to_string().contains(text), "{err} lacks {text}");
        }
    }
}
