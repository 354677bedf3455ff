//! VFIO passthrough devices in a KVM VM: the KVM side of
//! `devices::vfio`'s hooks.
//!
//! - [`KvmMsiRoutes`]: each MSI or MSI-X vector the guest enables gets a GSI
//!   of its own (from the device manager's pool), a KVM MSI route to the
//!   address and data the guest wrote, and an irqfd on the vector's
//!   eventfd, so the host kernel delivers the device's interrupts without
//!   the VMM. Disabling the vector removes both.
//! - [`KvmBarSlots`]: the BAR areas VFIO lets pvmm mmap become KVM memory
//!   slots wherever the guest puts the BAR, so the guest reaches them
//!   without exits.
//!
//! Both are called with the device's lock held (from a vCPU's config space
//! write, or from the device's drop); they take only the pool and routing
//! locks, which are never held while taking a device's.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use devices::vfio::{BarSlots, MsiRoutes, VfioHooks};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::{DeviceManager, SharedIdPool};
use crate::kvm::{RoutingError, SharedIrqRouting};

/// Why a hook failed. `devices` takes hook errors as `io::Error`s; this one
/// travels inside, with its sources.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// No GSI left for an MSI vector.
    #[error("No GSI left for the vector")]
    NoGsi(#[source] resources::Error),
    /// The vector's MSI route could not be set.
    #[error("Cannot route the vector")]
    Route(#[source] RoutingError),
    /// KVM_IRQFD failed.
    #[error("KVM KVM_IRQFD failed")]
    Irqfd(#[source] kvm_ioctls::Error),
    /// No memory slot number left for a BAR area.
    #[error("No KVM memory slot left")]
    NoSlot(#[source] resources::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("KVM KVM_SET_USER_MEMORY_REGION failed")]
    Slot(#[source] kvm_ioctls::Error),
}

impl From<HookError> for io::Error {
    fn from(e: HookError) -> Self {
        io::Error::other(e)
    }
}

/// The hooks for a VFIO device in the VM of `dm`.
pub fn hooks(dm: &DeviceManager) -> VfioHooks {
    VfioHooks {
        msi: Some(Arc::new(KvmMsiRoutes::new(
            dm.vm_fd().clone(),
            dm.irq_routing().clone(),
            dm.msi_gsis().clone(),
        ))),
        bar_slots: Some(Arc::new(KvmBarSlots::new(
            dm.vm_fd().clone(),
            dm.kvm_slots().clone(),
        ))),
        dma_sync: None,
    }
}

/// Before a doorbell of a VFIO device behind Linux's pvIOMMU driver: the
/// S1 table its domain has, copied again where the host copies tables
/// ([`iommu::Iommu::sync_device`]): Linux adds mappings without flushing.
pub struct SyncBeforeDoorbell {
    iommu: Arc<iommu::Iommu>,
    device: std::sync::OnceLock<iommu::DeviceId>,
    /// A sync failed (the first is logged).
    failed: std::sync::atomic::AtomicBool,
}

impl SyncBeforeDoorbell {
    /// For a device of `iommu`'s, named later ([`Self::set_device`]).
    pub fn new(iommu: Arc<iommu::Iommu>) -> Self {
        Self {
            iommu,
            device: std::sync::OnceLock::new(),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The device's name at the pvIOMMU, once registered.
    pub fn set_device(&self, device: iommu::DeviceId) {
        let _ = self.device.set(device);
    }
}

impl devices::vfio::DmaSync for SyncBeforeDoorbell {
    fn sync(&self) {
        let Some(&device) = self.device.get() else {
            return;
        };
        if let Err(e) = self.iommu.sync_device(device) {
            if !self.failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                log::warn!(
                    "{device}: syncing its translations before a doorbell: {} (later failures are not logged)",
                    resources::ErrorChain(&e)
                );
            }
        }
    }
}

/// One device's MSI vectors as KVM GSI routes and irqfds.
pub struct KvmMsiRoutes {
    vm: Arc<VmFd>,
    routing: SharedIrqRouting,
    gsis: SharedIdPool,
    /// Vector -> its GSI, while routed.
    routed: Mutex<HashMap<u32, u32>>,
}

impl KvmMsiRoutes {
    /// Routes in `vm`'s table `routing`, GSIs from `gsis`.
    pub fn new(vm: Arc<VmFd>, routing: SharedIrqRouting, gsis: SharedIdPool) -> Self {
        Self {
            vm,
            routing,
            gsis,
            routed: Mutex::new(HashMap::new()),
        }
    }

    /// The GSI vector `vector` is routed through, if it is.
    pub fn gsi(&self, vector: u32) -> Option<u32> {
        devices::lock::mutex(&self.routed).get(&vector).copied()
    }

    fn release(&self, gsi: u32) {
        let _ = devices::lock::mutex(&self.routing).remove_msi_route(&self.vm, gsi);
        let _ = devices::lock::mutex(&self.gsis).free(gsi);
    }
}

impl MsiRoutes for KvmMsiRoutes {
    fn route(&self, vector: u32, address: u64, data: u32, eventfd: &EventFd) -> io::Result<()> {
        let mut routed = devices::lock::mutex(&self.routed);
        if let Some(&gsi) = routed.get(&vector) {
            // A new address or data for a routed vector: the irqfd stays.
            return devices::lock::mutex(&self.routing)
                .set_msi_route(&self.vm, gsi, address, data)
                .map_err(|e| HookError::Route(e).into());
        }
        let gsi = devices::lock::mutex(&self.gsis)
            .allocate()
            .map_err(HookError::NoGsi)?;
        let result = devices::lock::mutex(&self.routing)
            .set_msi_route(&self.vm, gsi, address, data)
            .map_err(HookError::Route)
            .and_then(|()| {
                self.vm
                    .register_irqfd(eventfd, gsi)
                    .map_err(HookError::Irqfd)
            });
        if let Err(e) = result {
            self.release(gsi);
            return Err(e.into());
        }
        routed.insert(vector, gsi);
        Ok(())
    }

    fn unroute(&self, vector: u32, eventfd: &EventFd) -> io::Result<()> {
        let Some(gsi) = devices::lock::mutex(&self.routed).remove(&vector) else {
            return Ok(());
        };
        let result = self.vm.unregister_irqfd(eventfd, gsi);
        self.release(gsi);
        result.map_err(|e| HookError::Irqfd(e).into())
    }
}

impl Drop for KvmMsiRoutes {
    /// Routes the device left behind (its eventfds, closed with it, end
    /// their irqfds in KVM).
    fn drop(&mut self) {
        let routed = std::mem::take(&mut *devices::lock::mutex(&self.routed));
        for gsi in routed.into_values() {
            self.release(gsi);
        }
    }
}

/// One device's mmapped BAR areas as KVM memory slots.
pub struct KvmBarSlots {
    vm: Arc<VmFd>,
    slots: SharedIdPool,
}

impl KvmBarSlots {
    /// Slots of `vm`, numbers from `slots`.
    pub fn new(vm: Arc<VmFd>, slots: SharedIdPool) -> Self {
        Self { vm, slots }
    }

    /// Sets (or, with `size` 0, deletes) slot `slot`.
    ///
    /// # Safety
    /// `[host, host + size)` must stay mapped in this process until the
    /// slot is deleted.
    #[allow(unsafe_code)]
    unsafe fn set(&self, slot: u32, gpa: u64, size: u64, host: u64) -> Result<(), HookError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: guaranteed by the caller; KVM checks the slot against the
        // others (an overlap is EEXIST).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(HookError::Slot)
    }
}

impl BarSlots for KvmBarSlots {
    #[allow(unsafe_code)]
    unsafe fn add(&self, gpa: u64, size: u64, host: *mut u8) -> io::Result<u32> {
        let slot = devices::lock::mutex(&self.slots)
            .allocate()
            .map_err(HookError::NoSlot)?;
        // SAFETY: the caller keeps `[host, host + size)` mapped until the
        // slot is removed (`BarSlots::add`'s contract).
        if let Err(e) = unsafe { self.set(slot, gpa, size, host as u64) } {
            let _ = devices::lock::mutex(&self.slots).free(slot);
            return Err(e.into());
        }
        Ok(slot)
    }

    #[allow(unsafe_code)]
    fn remove(&self, slot: u32) -> io::Result<()> {
        // SAFETY: deleting a slot maps nothing.
        let result = unsafe { self.set(slot, 0, 0, 0) };
        if result.is_ok() {
            let _ = devices::lock::mutex(&self.slots).free(slot);
        }
        result.map_err(io::Error::from)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kvm;
    use kvm_ioctls::Kvm;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    /// A VM with 2 MiB of RAM, a split irqchip, a routing table, three
    /// GSIs and two memory slot numbers.
    fn vm() -> (Arc<VmFd>, SharedIrqRouting, SharedIdPool, SharedIdPool) {
        let kvm = Kvm::new().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let vm = Arc::new(kvm::create_vm(&kvm, &mem, |_| Ok(())).unwrap());
        let pool = |first, last| {
            Arc::new(Mutex::new(
                resources::IdPool::new("test", first, last).unwrap(),
            ))
        };
        (
            vm,
            Arc::new(Mutex::new(kvm::IrqRouting::new())),
            pool(24, 26),
            pool(1, 2),
        )
    }

    #[test]
    fn msi_vectors_get_a_gsi_each_and_give_it_back() {
        let (vm, routing, gsis, _) = vm();
        let routes = KvmMsiRoutes::new(vm, routing, gsis.clone());
        let fds: Vec<EventFd> = (0..4).map(|_| EventFd::new(0).unwrap()).collect();
        routes.route(0, 0xfee0_0000, 0x41, &fds[0]).unwrap();
        routes.route(1, 0xfee0_0000, 0x42, &fds[1]).unwrap();
        assert_eq!((routes.gsi(0), routes.gsi(1)), (Some(24), Some(25)));
        // A new message for a routed vector keeps its GSI.
        routes.route(0, 0xfee0_1000, 0x51, &fds[0]).unwrap();
        assert_eq!(routes.gsi(0), Some(24));
        routes.route(2, 0xfee0_0000, 0x43, &fds[2]).unwrap();
        // The pool (three GSIs) is empty: a clear error, nothing leaked.
        assert!(routes.route(3, 0xfee0_0000, 0x44, &fds[3]).is_err());
        assert_eq!(routes.gsi(3), None);
        routes.unroute(1, &fds[1]).unwrap();
        assert_eq!(routes.gsi(1), None);
        assert!(!devices::lock::mutex(&gsis).is_allocated(25));
        // Unrouting twice is harmless.
        routes.unroute(1, &fds[1]).unwrap();
        // Interrupts on a routed vector reach KVM through the irqfd.
        fds[0].write(1).unwrap();
        drop(routes);
        for gsi in 24..=26 {
            assert!(!devices::lock::mutex(&gsis).is_allocated(gsi), "{gsi}");
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn bar_slots_map_and_unmap() {
        let (vm, _, _, slots) = vm();
        // Stands in for a BAR's mmap: page-aligned memory of this process.
        let bar = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let host = bar.get_host_address(GuestAddress(0)).unwrap();
        let s = KvmBarSlots::new(vm, slots.clone());
        // SAFETY: `bar` outlives `s` and its VM (declared before them, so
        // dropped after), and no vCPU ever runs to touch it.
        let add = |gpa| unsafe { s.add(gpa, 0x1000, host) };
        let a = add(0xc000_0000).unwrap();
        // KVM refuses an overlap; the slot number goes back.
        assert!(add(0xc000_0000).is_err());
        let b = add(0xc000_1000).unwrap();
        assert_ne!(a, b);
        // No slot numbers left.
        assert!(add(0xc000_2000).is_err());
        s.remove(a).unwrap();
        let c = add(0xc000_0000).unwrap();
        assert_eq!(c, a, "the freed number is used again");
        s.remove(b).unwrap();
        s.remove(c).unwrap();
        assert!(!devices::lock::mutex(&slots).is_allocated(a));
    }
}
