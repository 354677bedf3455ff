//! A thin, checked layer over `/dev/iommu`: the ioctls `iommufd-ioctls`
//! wraps, plus the ones defined in [`crate::uapi`].
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_hwpt_alloc, iommu_hwpt_invalidate, iommu_ioas_alloc, iommu_ioas_iova_ranges,
    iommu_ioas_map, iommu_ioas_unmap, iommu_iova_range,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as MAP_WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::uapi::{size_u32, IommuTestCmd, TestPayload, IOMMU_IOAS_IOVA_RANGES, IOMMU_TEST_CMD};

/// Where the kernel puts the IOMMUFD character device.
pub const DEV_IOMMU: &str = "/dev/iommu";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("No {path}: this kernel has no IOMMUFD (CONFIG_IOMMUFD) or no IOMMU driver")]
    NoIommufd {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: errno::Error,
    },
    #[error("{op} rejected entry {index} of {count}")]
    Invalidate {
        op: &'static str,
        index: u32,
        count: u32,
        #[source]
        source: errno::Error,
    },
    #[error("Length {0:#x} does not fit the ioctl")]
    TooLong(usize),
    #[error("{0} entries are more than an ioctl takes")]
    TooMany(usize),
}

impl Error {
    /// The errno of a failed ioctl, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Ioctl { source, .. } | Error::Invalidate { source, .. } => Some(source.errno()),
            _ => None,
        }
    }

    fn from_crate(op: &'static str, e: IommufdError) -> Self {
        let source = match e {
            IommufdError::IommuDestroy(s)
            | IommufdError::IommuIoasAlloc(s)
            | IommufdError::IommuIoasMap(s)
            | IommufdError::IommuIoasUnmap(s)
            | IommufdError::IommuHwptAlloc(s)
            | IommufdError::IommuGetHwInfo(s)
            | IommufdError::IommuHwptInvalidate(s) => s,
            // The calls made here only produce the variants above.
            _ => errno::Error::new(libc::EIO),
        };
        Error::Ioctl { op, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// One allowed IOVA range of an IOAS, inclusive bounds as the kernel gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaRange {
    pub start: u64,
    pub last: u64,
}

impl IovaRange {
    /// Whether `[start, start + len)` lies inside this range.
    pub fn contains(&self, start: u64, len: u64) -> bool {
        len != 0
            && start >= self.start
            && start
                .checked_add(len - 1)
                .is_some_and(|last| last <= self.last)
    }
}

/// An open `/dev/iommu`. Objects are plain ids; nothing is destroyed on drop
/// but what the kernel frees when the last reference to the file goes.
#[derive(Clone)]
pub struct Iommufd {
    fd: Arc<IommuFd>,
}

impl Iommufd {
    /// Opens [`DEV_IOMMU`].
    pub fn open() -> Result<Self> {
        Self::open_path(Path::new(DEV_IOMMU))
    }

    /// Opens an IOMMUFD character device at `path`.
    pub fn open_path(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| {
                let path = path.display().to_string();
                if source.kind() == io::ErrorKind::NotFound {
                    Error::NoIommufd { path, source }
                } else {
                    Error::Open { path, source }
                }
            })?;
        Ok(Self {
            fd: Arc::new(IommuFd::new_from_fd(file)),
        })
    }

    /// The `iommufd-ioctls` handle, for `vfio-ioctls`.
    pub fn inner(&self) -> &Arc<IommuFd> {
        &self.fd
    }

    /// IOMMU_IOAS_ALLOC: a new, empty IO address space.
    pub fn ioas_alloc(&self) -> Result<u32> {
        let mut alloc = iommu_ioas_alloc {
            size: size_u32::<iommu_ioas_alloc>(),
            flags: 0,
            out_ioas_id: 0,
        };
        self.fd
            .alloc_iommu_ioas(&mut alloc)
            .map_err(|e| Error::from_crate("IOMMU_IOAS_ALLOC", e))?;
        Ok(alloc.out_ioas_id)
    }

    /// IOMMU_IOAS_MAP at a fixed IOVA of `len` bytes of this process's memory at `user_va`.
    ///
    /// # Safety
    ///
    /// `[user_va, user_va + len)` must stay a valid mapping until it is unmapped
    /// from the IOAS, and since devices may write it at any time, it must only be
    /// accessed through raw pointers (never a Rust reference) meanwhile.
    pub unsafe fn ioas_map(
        &self,
        ioas: u32,
        iova: u64,
        user_va: *mut u8,
        len: usize,
        writeable: bool,
    ) -> Result<()> {
        let mut flags = MAP_FIXED_IOVA | MAP_READABLE;
        if writeable {
            flags |= MAP_WRITEABLE;
        }
        let map = iommu_ioas_map {
            size: size_u32::<iommu_ioas_map>(),
            flags,
            ioas_id: ioas,
            __reserved: 0,
            user_va: user_va as u64,
            length: u64::try_from(len).map_err(|_| Error::TooLong(len))?,
            iova,
        };
        self.fd
            .map_iommu_ioas(&map)
            .map_err(|e| Error::from_crate("IOMMU_IOAS_MAP", e))
    }

    /// IOMMU_IOAS_UNMAP of `[iova, iova + len)`; returns the bytes unmapped.
    /// The range must cover whole mappings: the kernel cannot split one.
    pub fn ioas_unmap(&self, ioas: u32, iova: u64, len: u64) -> Result<u64> {
        let mut unmap = iommu_ioas_unmap {
            size: size_u32::<iommu_ioas_unmap>(),
            ioas_id: ioas,
            iova,
            length: len,
        };
        self.fd
            .unmap_iommu_ioas(&mut unmap)
            .map_err(|e| Error::from_crate("IOMMU_IOAS_UNMAP", e))?;
        Ok(unmap.length)
    }

    /// IOMMU_IOAS_IOVA_RANGES: the IOVA ranges the IOAS allows (after the
    /// reserved regions of every attached device), and the IOVA alignment.
    pub fn iova_ranges(&self, ioas: u32) -> Result<(Vec<IovaRange>, u64)> {
        let mut ranges: Vec<iommu_iova_range> = Vec::new();
        loop {
            let num_iovas =
                u32::try_from(ranges.len()).map_err(|_| Error::TooMany(ranges.len()))?;
            let mut cmd = iommu_ioas_iova_ranges {
                size: size_u32::<iommu_ioas_iova_ranges>(),
                ioas_id: ioas,
                num_iovas,
                __reserved: 0,
                allowed_iovas: ranges.as_mut_ptr() as u64,
                out_iova_alignment: 0,
            };
            // SAFETY: `cmd` is a valid iommu_ioas_iova_ranges; the kernel writes at
            // most `num_iovas` entries to `allowed_iovas`, which has that many.
            let ret = unsafe { ioctl_with_mut_ref(&*self.fd, IOMMU_IOAS_IOVA_RANGES(), &mut cmd) };
            if ret == 0 {
                ranges.truncate(cmd.num_iovas as usize);
                let out = ranges
                    .iter()
                    .map(|r| IovaRange {
                        start: r.start,
                        last: r.last,
                    })
                    .collect();
                return Ok((out, cmd.out_iova_alignment));
            }
            let err = errno::Error::last();
            if err.errno() != libc::EMSGSIZE || cmd.num_iovas as usize <= ranges.len() {
                return Err(Error::Ioctl {
                    op: "IOMMU_IOAS_IOVA_RANGES",
                    source: err,
                });
            }
            // Too small: the kernel told how many there are; ask again.
            ranges.resize(cmd.num_iovas as usize, iommu_iova_range::default());
        }
    }

    /// IOMMU_HWPT_ALLOC: a HW page table for device `dev_id` over `pt_id`, with
    /// optional driver data `data` of type `data_type`.
    pub fn hwpt_alloc<T>(
        &self,
        dev_id: u32,
        pt_id: u32,
        flags: u32,
        data_type: u32,
        data: Option<&T>,
    ) -> Result<u32> {
        let (data_len, data_uptr) = match data {
            Some(d) => (size_u32::<T>(), d as *const T as u64),
            None => (0, 0),
        };
        let mut alloc = iommu_hwpt_alloc {
            size: size_u32::<iommu_hwpt_alloc>(),
            flags,
            dev_id,
            pt_id,
            data_type,
            data_len,
            data_uptr,
            ..Default::default()
        };
        self.fd
            .alloc_iommu_hwpt(&mut alloc)
            .map_err(|e| Error::from_crate("IOMMU_HWPT_ALLOC", e))?;
        Ok(alloc.out_hwpt_id)
    }

    /// IOMMU_HWPT_INVALIDATE with `entries` of `data_type`. Returns how many
    /// entries the kernel handled; on an error, which entry failed.
    pub fn hwpt_invalidate<T>(&self, hwpt: u32, data_type: u32, entries: &[T]) -> Result<u32> {
        let count = u32::try_from(entries.len()).map_err(|_| Error::TooMany(entries.len()))?;
        let mut inv = iommu_hwpt_invalidate {
            size: size_u32::<iommu_hwpt_invalidate>(),
            hwpt_id: hwpt,
            data_uptr: entries.as_ptr() as u64,
            data_type,
            entry_len: size_u32::<T>(),
            entry_num: count,
            __reserved: 0,
        };
        match self.fd.invalidate_hwpt(&mut inv) {
            Ok(()) => Ok(inv.entry_num),
            Err(IommufdError::IommuHwptInvalidate(source)) => Err(Error::Invalidate {
                op: "IOMMU_HWPT_INVALIDATE",
                index: inv.entry_num,
                count,
                source,
            }),
            Err(e) => Err(Error::from_crate("IOMMU_HWPT_INVALIDATE", e)),
        }
    }

    /// IOMMU_DESTROY of object `id`.
    pub fn destroy(&self, id: u32) -> Result<()> {
        self.fd
            .destroy_iommu_object(id)
            .map_err(|e| Error::from_crate("IOMMU_DESTROY", e))
    }

    /// IOMMU_TEST_CMD (CONFIG_IOMMUFD_TEST's mock driver).
    pub fn test_cmd<P: TestPayload>(&self, cmd: &mut IommuTestCmd<P>) -> Result<()> {
        // SAFETY: `cmd` is a complete iommu_test_cmd of `cmd.size` bytes, valid
        // for reads and writes for the duration of the call.
        let ret = unsafe { ioctl_with_mut_ref(&*self.fd, IOMMU_TEST_CMD(), cmd) };
        if ret < 0 {
            return Err(Error::Ioctl {
                op: "IOMMU_TEST_CMD",
                source: errno::Error::last(),
            });
        }
        Ok(())
    }

    /// The raw file descriptor (for VFIO_DEVICE_BIND_IOMMUFD).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_node_gives_a_clear_error() {
        let err = Iommufd::open_path(Path::new("/nonexistent/iommu"))
            .err()
            .expect("opening a missing path fails");
        assert!(matches!(err, Error::NoIommufd { .. }), "{err:?}");
        assert!(err.to_string().contains("CONFIG_IOMMUFD"), "{err}");
    }

    #[test]
    fn a_regular_file_is_not_an_iommufd() {
        // Opening works; the first ioctl fails with ENOTTY, reported by name.
        let fd = Iommufd::open_path(Path::new("/dev/null")).expect("open /dev/null");
        let err = fd.ioas_alloc().expect_err("IOAS_ALLOC on /dev/null");
        assert_eq!(err.errno(), Some(libc::ENOTTY));
        assert_eq!(err.to_string(), "IOMMU_IOAS_ALLOC failed");
        let err = fd.iova_ranges(1).expect_err("IOVA_RANGES on /dev/null");
        assert_eq!(err.errno(), Some(libc::ENOTTY));
    }

    #[test]
    fn iova_range_contains() {
        let r = IovaRange {
            start: 0x1000,
            last: 0x1fff,
        };
        assert!(r.contains(0x1000, 0x1000));
        assert!(r.contains(0x1800, 0x800));
        assert!(!r.contains(0x1800, 0x801));
        assert!(!r.contains(0xfff, 2));
        assert!(!r.contains(0x1000, 0));
        let top = IovaRange {
            start: 0,
            last: u64::MAX,
        };
        assert!(top.contains(u64::MAX, 1));
        assert!(!top.contains(u64::MAX, 2));
    }
}
