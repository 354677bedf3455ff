//! PCI: the [`PciDevice`] trait, emulated configuration space
//! ([`PciConfiguration`]), and the root bus ([`PciRoot`]) with its host
//! bridge, reached through ports 0xCF8/0xCFC ([`PciConfigIo`]) and ECAM
//! ([`PciConfigMmio`]).
//!
//! Adding a device: create it, allocate its slot and BAR addresses
//! (`resources::SystemAllocator`), program them into its configuration
//! space, then [`PciRoot::add_device`]. The root maps each BAR on the MMIO
//! (or I/O) bus while the guest has decoding enabled, follows the guest when
//! it moves a BAR, and tells the device through [`PciDevice::bar_moved`].

mod config;
mod root;

pub use config::{
    reg, PciConfiguration, PciHeader, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO,
    COMMAND_MEMORY, NUM_BARS, STATUS_CAP_LIST,
};
pub use resources::BarKind;
pub use root::{HostBridge, PciConfigIo, PciConfigMmio, PciRoot};

/// Size of a function's configuration space (PCI Express).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the legacy configuration space reachable through 0xCF8/0xCFC.
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;
/// Number of device slots on a bus.
pub const SLOTS: usize = 32;

/// A PCI function on bus 0 (function 0 only: no multi-function devices).
pub trait PciDevice: Send {
    /// The device's configuration space as the guest programs it (header,
    /// BARs, command register, capabilities). The other methods' default
    /// implementations serve the guest from it.
    fn config(&self) -> &PciConfiguration;

    /// The same, to change.
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// Guest configuration read: `offset` is aligned to `data.len()`, which
    /// is 1, 2 or 4, and `offset + data.len() <= 4096`.
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config().read(offset, data)
    }

    /// Guest configuration write, with the same guarantees. After it, the
    /// root calls [`bar_regions`](Self::bar_regions) to follow BAR changes.
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config_mut().write(offset, data)
    }

    /// The BARs the device decodes now (guest-programmed address, decoding
    /// enabled): [`PciConfiguration::decoded_bars`].
    fn bar_regions(&self) -> Vec<PciBarRegion> {
        self.config().decoded_bars()
    }

    /// The BARs the device has, `(index, size, kind)`, so that the VMM can
    /// give them addresses before plugging the device in.
    fn declared_bars(&self) -> Vec<(usize, u64, BarKind)> {
        self.config().declared_bars()
    }

    /// Programs BAR `index` with `addr`, as firmware would. The guest may
    /// move it later.
    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        self.config_mut().set_bar_address(index, addr)
    }

    /// BAR `index` was mapped (`old == None`), moved, or unmapped
    /// (`new == None`) on the bus. Accesses through the bus reach the
    /// device's [`BusDevice`](crate::bus::BusDevice) side with `base` equal to the
    /// new address. A VFIO device moves its KVM memory slots here.
    fn bar_moved(&mut self, _index: usize, _old: Option<u64>, _new: Option<u64>) {}
}

/// A BAR as mapped on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBarRegion {
    /// BAR index (0-5).
    pub index: usize,
    /// Guest address (memory or port).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Memory (32/64-bit) or I/O.
    pub kind: BarKind,
}

/// Bus, device and function numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// Bus (0-255).
    pub bus: u8,
    /// Device (0-31).
    pub device: u8,
    /// Function (0-7).
    pub function: u8,
}

impl PciAddress {
    /// Function 0 of `device` on bus 0.
    pub fn slot(device: u8) -> Self {
        Self {
            bus: 0,
            device: device & 0x1f,
            function: 0,
        }
    }

    /// The 16-bit requester id (bus << 8 | device << 3 | function).
    pub fn requester_id(&self) -> u16 {
        u16::from(self.bus) << 8 | u16::from(self.device & 0x1f) << 3 | u16::from(self.function & 7)
    }
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{}",
            self.bus, self.device, self.function
        )
    }
}

/// Errors of PCI set-up (never caused by guest accesses, which are checked
/// and ignored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    /// Bad BAR index or BAR already declared.
    #[error("Invalid or already used BAR index {0}")]
    BarIndex(usize),
    /// BAR size not a power of two or out of range for its kind.
    #[error("Invalid BAR size {0:#x}")]
    BarSize(u64),
    /// BAR address not aligned to its size or too high for its kind.
    #[error("Invalid BAR address {0:#x}")]
    BarAddress(u64),
    /// No room left for a capability.
    #[error("No room left in configuration space for the capability")]
    CapabilitySpace,
    /// Slot number out of range.
    #[error("Invalid PCI slot {0}")]
    InvalidSlot(u8),
    /// Slot already taken.
    #[error("PCI slot {0} is already in use")]
    SlotInUse(u8),
    /// Slot empty.
    #[error("PCI slot {0} is empty")]
    SlotEmpty(u8),
    /// A BAR could not be mapped on the bus.
    #[error("Cannot map BAR {index} at {addr:#x}")]
    MapBar {
        /// BAR index.
        index: usize,
        /// Address.
        addr: u64,
        /// Why.
        #[source]
        source: crate::bus::BusError,
    },
}

/// Whether a configuration access of `len` bytes at `offset` is valid:
/// 1, 2 or 4 bytes, naturally aligned, inside `space` bytes.
pub fn check_config_access(offset: u64, len: usize, space: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && offset % len as u64 == 0
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= space as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_access_checks() {
        assert!(check_config_access(0, 4, 256));
        assert!(check_config_access(252, 4, 256));
        assert!(!check_config_access(254, 4, 256));
        assert!(!check_config_access(2, 4, 4096));
        assert!(check_config_access(3, 1, 4096));
        assert!(!check_config_access(4096, 1, 4096));
        assert!(!check_config_access(0, 3, 4096));
        assert!(!check_config_access(0, 8, 4096));
        assert!(!check_config_access(u64::MAX, 1, 4096));
    }

    #[test]
    fn address_formats() {
        let a = PciAddress::slot(3);
        assert_eq!(a.requester_id(), 0x18);
        assert_eq!(a.to_string(), "0000:00:03.0");
        let b = PciAddress {
            bus: 1,
            device: 31,
            function: 7,
        };
        assert_eq!(b.requester_id(), 0x1ff);
    }
}
