//! Opening a VFIO device cdev for a sysfs path and binding it to an iommufd,
//! with errors that say what is wrong.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_ioctls::{VfioDevice, VfioError, VfioIommufd};

use crate::iommufd::Iommufd;
use crate::pci;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is not a VFIO device (driver: {driver}): bind it to vfio-pci first")]
    NotVfioDevice { path: PathBuf, driver: String },
    #[error("{path} is already bound to an iommufd (opened by another user)")]
    AlreadyBound {
        path: PathBuf,
        #[source]
        source: VfioError,
    },
    #[error("VFIO set-up of {path} failed")]
    Vfio {
        path: PathBuf,
        #[source]
        source: VfioError,
    },
}

/// A VFIO device opened through its cdev and bound to an iommufd.
pub struct BoundDevice {
    // Field order is drop order: the device (detach, close, unbind) goes
    // before the VfioIommufd and the IOAS it owns.
    pub device: Arc<VfioDevice>,
    pub vfio: Arc<VfioIommufd>,
    pub dev_id: u32,
}

impl BoundDevice {
    /// Opens `/dev/vfio/devices/vfioN` of the PCI device at `sysfs`, binds it
    /// to `iommufd` and, if `attach`, attaches it to a new IOAS
    /// ([`Self::ioas_id`]), which lives as long as this value.
    pub fn open(sysfs: &Path, iommufd: &Iommufd, attach: bool) -> Result<Self, Error> {
        if !sysfs.join("vfio-dev").is_dir() {
            return Err(Error::NotVfioDevice {
                path: sysfs.to_path_buf(),
                driver: pci::driver(sysfs).unwrap_or_else(|| "none".into()),
            });
        }
        let vfio_err = |source| Error::Vfio {
            path: sysfs.to_path_buf(),
            source,
        };
        let vfio =
            Arc::new(VfioIommufd::new(Arc::clone(iommufd.inner()), None, None).map_err(vfio_err)?);
        let device =
            VfioDevice::new(sysfs, Arc::clone(&vfio) as _, attach).map_err(|e| match e {
                // VFIO_DEVICE_BIND_IOMMUFD answers EINVAL when the device is
                // already open and bound through another file (device_cdev.c).
                VfioError::VfioDeviceBindIommufd(ref s) if s.errno() == libc::EINVAL => {
                    Error::AlreadyBound {
                        path: sysfs.to_path_buf(),
                        source: e,
                    }
                }
                e => vfio_err(e),
            })?;
        let dev_id = device.iommufd_dev_id().ok_or_else(|| Error::Vfio {
            path: sysfs.to_path_buf(),
            source: VfioError::VfioDeviceGetInfoOther,
        })?;
        Ok(Self {
            device: Arc::new(device),
            vfio,
            dev_id,
        })
    }

    /// The IOAS that `open` allocated (attached to when `attach` was set).
    pub fn ioas_id(&self) -> u32 {
        self.vfio.ioas().id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_vfio_dev_is_refused_before_any_ioctl() {
        let dir = std::env::temp_dir().join(format!("hk-vfio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let fd = Iommufd::open_path(Path::new("/dev/null")).expect("any fd will do");
        let err = BoundDevice::open(&dir, &fd, true)
            .err()
            .expect("not a VFIO device");
        assert!(matches!(err, Error::NotVfioDevice { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("driver: none"), "{msg}");
        assert!(msg.contains("vfio-pci"), "{msg}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
