//! Opening a host PCI function bound to vfio-pci: through its VFIO cdev
//! and an iommufd ([`VfioPciDevice::open`]), or where `/dev/iommu` is
//! missing through the legacy VFIO container and group
//! ([`VfioPciDevice::open_legacy`]); [`HostIommu::open`] picks one.

use std::io;
use std::path::Path;
use std::sync::Arc;

use iommufd_ioctls::{IommuFd, IommufdError};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioIommufd};

use super::{VfioHooks, VfioHw, VfioPciDevice, VfioPciError};

/// How VFIO devices reach the host IOMMU.
#[derive(Clone)]
pub enum HostIommu {
    /// IOMMUFD (`/dev/iommu`): devices are bound with their cdev.
    Iommufd(Arc<IommuFd>),
    /// The legacy VFIO container (`/dev/vfio/vfio`) and groups.
    Container(Arc<VfioContainer>),
}

impl HostIommu {
    /// `/dev/iommu` when the kernel has it, else the legacy container.
    pub fn open() -> Result<Self, VfioPciError> {
        match IommuFd::new() {
            Ok(fd) => Ok(HostIommu::Iommufd(Arc::new(fd))),
            Err(IommufdError::OpenIommufd(e)) if e.kind() == io::ErrorKind::NotFound => {
                VfioContainer::new(None)
                    .map(|c| HostIommu::Container(Arc::new(c)))
                    .map_err(VfioPciError::NoHostIommu)
            }
            Err(e) => Err(VfioPciError::OpenIommufd(e)),
        }
    }
}

/// Refuses a sysfs path whose device is not bound to vfio-pci.
pub fn check_vfio_pci(sysfs: &Path) -> Result<(), VfioPciError> {
    let driver = std::fs::read_link(sysfs.join("driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    Err(VfioPciError::NotVfioDevice {
        path: sysfs.to_path_buf(),
        driver: driver.unwrap_or_else(|| "none".into()),
    })
}

impl VfioPciDevice {
    /// Opens the PCI function at `sysfs` through `host`: [`Self::open`] or
    /// [`Self::open_legacy`].
    pub fn open_with(
        sysfs: &Path,
        host: &HostIommu,
        hooks: VfioHooks,
    ) -> Result<Self, VfioPciError> {
        match host {
            HostIommu::Iommufd(fd) => Self::open(sysfs, Arc::clone(fd), hooks),
            HostIommu::Container(c) => Self::open_legacy(sysfs, Arc::clone(c), hooks),
        }
    }

    /// Opens the VFIO cdev of the PCI function at `sysfs` (bound to
    /// vfio-pci) and binds it to `iommufd`, not attached to any page table
    /// yet: the IOMMUFD backend attaches it (see [`Self::attach_handle`]).
    pub fn open(
        sysfs: &Path,
        iommufd: Arc<IommuFd>,
        hooks: VfioHooks,
    ) -> Result<Self, VfioPciError> {
        check_vfio_pci(sysfs)?;
        let err = |source| VfioPciError::Vfio {
            path: sysfs.to_path_buf(),
            source,
        };
        let vfio = Arc::new(VfioIommufd::new(iommufd, None, None).map_err(err)?);
        let device =
            VfioDevice::new(sysfs, Arc::clone(&vfio) as _, false).map_err(|e| match e {
                // VFIO_DEVICE_BIND_IOMMUFD answers EINVAL when the device is
                // already open and bound through another file (device_cdev.c).
                VfioError::VfioDeviceBindIommufd(ref s) if s.errno() == libc::EINVAL => {
                    VfioPciError::AlreadyBound {
                        path: sysfs.to_path_buf(),
                        source: e,
                    }
                }
                e => err(e),
            })?;
        let dev_id = device.iommufd_dev_id();
        let device = Arc::new(device);
        let mut dev = Self::from_hw(Arc::clone(&device) as Arc<dyn VfioHw>, hooks)?;
        dev.device = Some(device);
        dev._owner = Some(vfio);
        dev.dev_id = dev_id;
        Ok(dev)
    }

    /// Opens the PCI function at `sysfs` through the legacy VFIO group and
    /// `container` (for hosts without `/dev/iommu`). The VMM maps guest RAM
    /// with `container.vfio_dma_map` (direct attach only).
    pub fn open_legacy(
        sysfs: &Path,
        container: Arc<VfioContainer>,
        hooks: VfioHooks,
    ) -> Result<Self, VfioPciError> {
        check_vfio_pci(sysfs)?;
        let device =
            VfioDevice::new(sysfs, Arc::clone(&container) as _, false).map_err(|source| {
                VfioPciError::Vfio {
                    path: sysfs.to_path_buf(),
                    source,
                }
            })?;
        let device = Arc::new(device);
        let mut dev = Self::from_hw(Arc::clone(&device) as Arc<dyn VfioHw>, hooks)?;
        dev.device = Some(device);
        dev._owner = Some(container);
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sysfs_path_not_bound_to_vfio_pci_is_refused() {
        let dir = std::env::temp_dir().join(format!("vfio-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let err = check_vfio_pci(&dir).expect_err("no driver");
        assert_eq!(
            err.to_string(),
            format!(
                "{} is not a VFIO device (driver: none): bind it to vfio-pci first",
                dir.display()
            )
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
