//! How a passthrough device reaches the VMM ([`VfioHooks`]): MSI routes
//! ([`MsiRoutes`]) and guest memory slots for mmapped BAR areas
//! ([`BarSlots`]). pvmm implements both with KVM (`vmm::vfio`).

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Where MSI vectors go: the VMM routes each eventfd to the guest's MSI
/// (KVM_SET_GSI_ROUTING with the address and data, plus KVM_IRQFD).
pub trait MsiRoutes: Send + Sync {
    /// Vector `vector` signals `eventfd`; deliver it as the MSI `data` to `address`.
    fn route(&self, vector: u32, address: u64, data: u32, eventfd: &EventFd) -> io::Result<()>;
    /// Vector `vector` is off; forget its route.
    fn unroute(&self, vector: u32, eventfd: &EventFd) -> io::Result<()>;
}

/// Guest memory slots for BAR areas the guest accesses without exits (the
/// VMM implements it with KVM_SET_USER_MEMORY_REGION).
pub trait BarSlots: Send + Sync {
    /// Maps `size` bytes of this process's memory at `host` at guest-physical
    /// `gpa`; returns a handle for [`BarSlots::remove`].
    ///
    /// # Safety
    ///
    /// `[host, host + size)` must be a mapping of this process that stays
    /// mapped until [`BarSlots::remove`] has removed the slot (returned
    /// `Ok`): the guest reaches it without the VMM, so unmapping it earlier
    /// would give the guest whatever this process maps there next. While the
    /// slot exists, the memory must only be accessed through raw pointers
    /// (the guest writes it behind Rust's back).
    #[allow(unsafe_code)]
    unsafe fn add(&self, gpa: u64, size: u64, host: *mut u8) -> io::Result<u32>;
    /// Removes a slot that [`BarSlots::add`] returned.
    fn remove(&self, slot: u32) -> io::Result<()>;
}

/// What the VMM does before the guest's write reaches a BAR of the device
/// (a doorbell): brings the host's DMA translations up to date with the
/// guest's, where the host keeps a shadow of the guest's table that the
/// guest does not flush on map (the pvIOMMU's shadowed S1 domains). A
/// device with one traps every BAR access.
pub trait DmaSync: Send + Sync {
    /// Before a BAR write.
    fn sync(&self);
}

/// How the device reaches the VMM (all optional: without them, MSI is not
/// delivered and every BAR access is trapped).
#[derive(Clone, Default)]
pub struct VfioHooks {
    /// MSI routes (KVM GSI routing and irqfd).
    pub msi: Option<Arc<dyn MsiRoutes>>,
    /// Memory slots for mmapped BAR areas (not used with `dma_sync`).
    pub bar_slots: Option<Arc<dyn BarSlots>>,
    /// Translations to sync before each BAR write.
    pub dma_sync: Option<Arc<dyn DmaSync>>,
}
