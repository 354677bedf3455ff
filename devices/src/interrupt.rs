//! How devices interrupt the guest without knowing about KVM.

use std::io;

/// An MSI: address (0xFEEx_xxxx) and data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Delivers message-signalled interrupts (the VMM implements it with
/// KVM_SIGNAL_MSI or GSI routes and irqfds).
pub trait MsiSink: Send + Sync {
    /// Sends the MSI `data` to `address` (0xFEEx_xxxx).
    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()>;
}
