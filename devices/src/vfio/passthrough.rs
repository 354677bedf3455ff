//! The host side of VFIO passthrough for one VM ([`Passthrough`]):
//! `/dev/iommu`, the IOMMUFD backend that mirrors the guest's pvIOMMU
//! domains for passthrough devices, and the VM's RAM mapped in it at
//! IOVA = GPA.
//!
//! A device's pvIOMMU name is its PCI address, which the VMM knows only
//! once the device has a slot, so adding one is two steps:
//! [`Passthrough::open_device`], then [`Passthrough::register`]. Before the
//! device is dropped, [`Passthrough::unregister`] detaches it from its
//! domain and from the host IOMMU page tables.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use iommu::iommufd::{ioctl, Iommufd, IommufdBackend, NestFormat};
use iommu::{Backend, BackendError, BackendId, DeviceId, Iommu, IommuError};
use vm_memory::GuestMemoryMmap;

use super::{VfioHooks, VfioPciDevice, VfioPciError};

/// Errors of passthrough set-up.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// `/dev/iommu` is missing or cannot be opened.
    #[error("Cannot open {path}: VFIO devices are passed through with IOMMUFD, which this host lacks or refuses")]
    Iommufd {
        /// The IOMMUFD device path.
        path: PathBuf,
        /// Why.
        #[source]
        source: ioctl::Error,
    },
    /// The IOMMUFD backend could not be set up (IOAS, guest RAM mapping).
    #[error("Cannot map guest RAM for device DMA (IOMMUFD)")]
    Backend(#[source] BackendError),
    /// Opening the device failed.
    #[error(transparent)]
    Device(#[from] VfioPciError),
    /// The device was not opened through this passthrough's iommufd.
    #[error("The device is not bound to an iommufd")]
    NotIommufd,
    /// The device could not be registered with the pvIOMMU.
    #[error("Cannot attach the device to the guest's IOMMU domains")]
    Register(#[source] IommuError),
}

/// `/dev/iommu` and the IOMMUFD backend of one VM.
pub struct Passthrough {
    iommufd: Iommufd,
    backend: Arc<IommufdBackend>,
    backend_id: BackendId,
}

impl std::fmt::Debug for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passthrough")
            .field("backend_id", &self.backend_id)
            .finish_non_exhaustive()
    }
}

impl Passthrough {
    /// Opens the IOMMUFD device `dev_iommu`, maps all of `memory` in a new
    /// IOMMUFD backend at IOVA = GPA and adds that backend to `iommu`.
    /// `format` is the host IOMMU's nested page table format (S1 domains).
    pub fn open(
        dev_iommu: &Path,
        iommu: &Iommu,
        memory: Arc<GuestMemoryMmap>,
        format: NestFormat,
    ) -> Result<Self, PassthroughError> {
        let iommufd =
            Iommufd::open_path(dev_iommu).map_err(|source| PassthroughError::Iommufd {
                path: dev_iommu.to_path_buf(),
                source,
            })?;
        let backend = Arc::new(
            IommufdBackend::new(Arc::new(iommufd.clone()), format)
                .map_err(PassthroughError::Backend)?,
        );
        backend
            .add_guest_memory(memory)
            .map_err(PassthroughError::Backend)?;
        let backend_id = iommu.add_backend(Arc::clone(&backend) as Arc<dyn Backend>);
        Ok(Self {
            iommufd,
            backend,
            backend_id,
        })
    }

    /// Opens the PCI function at `sysfs` (bound to vfio-pci) and binds it to
    /// this VM's iommufd; its DMA stays blocked until [`Self::register`].
    pub fn open_device(
        &self,
        sysfs: &Path,
        hooks: VfioHooks,
    ) -> Result<VfioPciDevice, PassthroughError> {
        Ok(VfioPciDevice::open(
            sysfs,
            Arc::clone(self.iommufd.inner()),
            hooks,
        )?)
    }

    /// Hands `dev` to the IOMMUFD backend and registers it with `iommu` as
    /// `id`: it starts in the guest's default domain (IOVA = GPA), and the
    /// guest may move it to domains of its own.
    pub fn register(
        &self,
        iommu: &Iommu,
        id: DeviceId,
        dev: &VfioPciDevice,
    ) -> Result<(), PassthroughError> {
        self.register_as(iommu, id, dev, true)
    }

    /// [`Passthrough::register`] for a device the guest may not move: it
    /// stays in the default domain (direct attach, IOVA = GPA).
    pub fn register_direct(
        &self,
        iommu: &Iommu,
        id: DeviceId,
        dev: &VfioPciDevice,
    ) -> Result<(), PassthroughError> {
        self.register_as(iommu, id, dev, false)
    }

    fn register_as(
        &self,
        iommu: &Iommu,
        id: DeviceId,
        dev: &VfioPciDevice,
        guest_visible: bool,
    ) -> Result<(), PassthroughError> {
        let (Some(dev_id), Some(handle)) = (dev.iommufd_dev_id(), dev.attach_handle()) else {
            return Err(PassthroughError::NotIommufd);
        };
        self.backend
            .add_host_device(id, dev_id, handle)
            .map_err(PassthroughError::Backend)?;
        let registered = if guest_visible {
            iommu.register_device(id, self.backend_id)
        } else {
            iommu.register_direct_device(id, self.backend_id)
        };
        if let Err(e) = registered {
            // Undo the hand-over; the device stays blocked.
            let _ = self.backend.remove_device(id);
            return Err(PassthroughError::Register(e));
        }
        Ok(())
    }

    /// Detaches `id` from its guest domain and from the host page tables
    /// (its DMA is blocked again) and forgets it.
    pub fn unregister(&self, iommu: &Iommu, id: DeviceId) -> Result<(), IommuError> {
        iommu.unregister_device(id)
    }

    /// The IOMMUFD backend (statistics, object ids).
    pub fn backend(&self) -> &Arc<IommufdBackend> {
        &self.backend
    }
}
