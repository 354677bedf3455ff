//! Guest physical layout and allocators (MMIO, GSI, PCI slot, device id).
