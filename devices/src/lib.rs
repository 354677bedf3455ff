//! Devices the guest talks to: serial, i8042, PCI, DMA test device, VFIO passthrough.
//!
//! Every device sits on a [`bus::Bus`] (port I/O or MMIO) as a
//! [`bus::BusDevice`]; PCI devices also implement [`pci::PciDevice`] and are
//! plugged into the [`pci::PciRoot`]. Guest accesses are validated by the
//! device (width, offset) and never panic.

pub mod acpi_hotplug;
pub mod bus;
pub mod cmos;
pub mod dma_test;
pub mod interrupt;
pub mod ioapic;
pub mod legacy;
pub mod lock;
pub mod pci;
pub mod ratelimit;
pub mod vfio;

pub use bus::{Bus, BusDevice, BusError, SharedBusDevice};
