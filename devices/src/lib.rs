//! Devices the guest talks to: serial, i8042, PCI, DMA test device, VFIO passthrough.
