//! A VFIO device opened through the `devices` crate (cdev, bound to an
//! iommufd) plus an IOAS of its own, as the tests use it.

use std::path::Path;
use std::sync::Arc;

use vfio_ioctls::VfioDevice;

use crate::iommufd::{self, Iommufd, IommufdOps};
use devices::vfio::{VfioHooks, VfioPciDevice, VfioPciError};

/// Errors of [`BoundDevice::open`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Vfio(#[from] VfioPciError),
    #[error("Cannot allocate the device's IOAS")]
    Iommufd(#[from] iommufd::Error),
    #[error("The device has no iommufd device id")]
    NoDevId,
}

/// A passthrough device (`devices::vfio`) bound to an iommufd, with an
/// IOAS allocated for it (attached when `open` was asked to).
pub struct BoundDevice {
    pub pci: VfioPciDevice,
    pub device: Arc<VfioDevice>,
    pub dev_id: u32,
    ioas: u32,
    fd: Iommufd,
}

impl BoundDevice {
    /// Opens the VFIO cdev of the PCI function at `sysfs` through
    /// `devices::vfio::VfioPciDevice`, binds it to `fd`, allocates an IOAS
    /// ([`Self::ioas_id`]) and, if `attach`, attaches the device to it.
    pub fn open(sysfs: &Path, fd: &Iommufd, attach: bool) -> Result<Self, Error> {
        let pci = VfioPciDevice::open(sysfs, Arc::clone(fd.inner()), VfioHooks::default())?;
        let device = pci.vfio_device().cloned().ok_or(Error::NoDevId)?;
        let dev_id = pci.iommufd_dev_id().ok_or(Error::NoDevId)?;
        let ioas = fd.ioas_alloc()?;
        let dev = Self {
            pci,
            device,
            dev_id,
            ioas,
            fd: fd.clone(),
        };
        if attach {
            dev.device.attach_hwpt(ioas).map_err(|e| {
                Error::Vfio(VfioPciError::Vfio {
                    path: sysfs.to_path_buf(),
                    source: e,
                })
            })?;
        }
        Ok(dev)
    }

    /// The device's own IOAS.
    pub fn ioas_id(&self) -> u32 {
        self.ioas
    }
}

impl Drop for BoundDevice {
    fn drop(&mut self) {
        // Detach first, or the IOAS is busy. The cdev is closed (and the
        // device unbound) when the last reference to `device` goes.
        let _ = self.device.detach_hwpt();
        let _ = self.fd.destroy(self.ioas);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_not_bound_to_vfio_pci_is_refused_before_any_ioctl() {
        let dir = std::env::temp_dir().join(format!("hk-vfio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let fd = Iommufd::open_path(Path::new("/dev/null")).expect("any fd will do");
        let err = BoundDevice::open(&dir, &fd, true)
            .err()
            .expect("not a VFIO device");
        assert!(
            matches!(err, Error::Vfio(VfioPciError::NotVfioDevice { .. })),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("driver: none"), "{msg}");
        assert!(msg.contains("vfio-pci"), "{msg}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
