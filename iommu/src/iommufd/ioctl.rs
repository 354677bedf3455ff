//! The IOMMUFD calls the backend makes, behind a trait ([`IommufdOps`]) so
//! that the backend's logic can be tested with a recording fake, and their
//! implementation on `/dev/iommu` ([`Iommufd`]).
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_hwpt_alloc, iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE as HWPT_DATA_NONE,
    iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1 as HWPT_DATA_VTD_S1, iommu_hwpt_invalidate,
    iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 as INVALIDATE_DATA_VTD_S1,
    iommu_hwpt_vtd_s1, iommu_hwpt_vtd_s1_invalidate, iommu_ioas_alloc, iommu_ioas_iova_ranges,
    iommu_ioas_map, iommu_ioas_unmap, iommu_iova_range,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as MAP_WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::uapi::{
    size_u32, HwptInvalidateSelftest, HwptSelftest, IommuTestCmd, TestPayload,
    IOMMU_HWPT_DATA_SELFTEST, IOMMU_HWPT_INVALIDATE_DATA_SELFTEST, IOMMU_IOAS_IOVA_RANGES,
    IOMMU_TEST_CMD,
};
use super::Perms;

/// Where the kernel puts the IOMMUFD character device.
pub const DEV_IOMMU: &str = "/dev/iommu";

/// Errors of IOMMUFD calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device node is missing.
    #[error("No {path}: this kernel has no IOMMUFD (CONFIG_IOMMUFD) or no IOMMU driver")]
    NoIommufd {
        /// The path tried.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The device node exists but cannot be opened.
    #[error("Cannot open {path}")]
    Open {
        /// The path tried.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The kernel's answer.
        #[source]
        source: errno::Error,
    },
    /// IOMMU_HWPT_INVALIDATE stopped at entry `index`.
    #[error("IOMMU_HWPT_INVALIDATE rejected entry {index} of {count}")]
    Invalidate {
        /// The first entry not handled (entry_num read back).
        index: u32,
        /// Entries passed.
        count: u32,
        /// The kernel's answer.
        #[source]
        source: errno::Error,
    },
    /// `iommufd-ioctls` failed in a way that carries no errno.
    #[error("{op} failed")]
    Crate {
        /// The call.
        op: &'static str,
        /// What the crate said.
        #[source]
        source: IommufdError,
    },
    /// A length or count does not fit the ioctl's fields.
    #[error("{0:#x} does not fit the ioctl")]
    TooLarge(u64),
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
        match e {
            IommufdError::IommuDestroy(source)
            | IommufdError::IommuIoasAlloc(source)
            | IommufdError::IommuIoasMap(source)
            | IommufdError::IommuIoasUnmap(source)
            | IommufdError::IommuHwptAlloc(source)
            | IommufdError::IommuGetHwInfo(source)
            | IommufdError::IommuHwptInvalidate(source) => Error::Ioctl { op, source },
            // The calls made here produce only the variants above.
            source => Error::Crate { op, source },
        }
    }
}

/// Result of IOMMUFD calls.
pub type Result<T> = std::result::Result<T, Error>;

/// One allowed IOVA range of an IOAS, inclusive bounds as the kernel gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaRange {
    /// First allowed IOVA.
    pub start: u64,
    /// Last allowed IOVA.
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

/// Driver data of IOMMU_HWPT_ALLOC.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HwptData {
    /// A paging HWPT (`IOMMU_HWPT_DATA_NONE`).
    None,
    /// An Intel VT-d first-stage table (`IOMMU_HWPT_DATA_VTD_S1`).
    VtdS1(iommu_hwpt_vtd_s1),
    /// The selftest mock's nested domain (`IOMMU_HWPT_DATA_SELFTEST`).
    Selftest(HwptSelftest),
}

/// Entries of IOMMU_HWPT_INVALIDATE.
#[derive(Debug, Clone, Copy)]
pub enum InvalidateEntries<'a> {
    /// `IOMMU_HWPT_INVALIDATE_DATA_VTD_S1`.
    VtdS1(&'a [iommu_hwpt_vtd_s1_invalidate]),
    /// `IOMMU_HWPT_INVALIDATE_DATA_SELFTEST`.
    Selftest(&'a [HwptInvalidateSelftest]),
}

impl InvalidateEntries<'_> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            InvalidateEntries::VtdS1(e) => e.len(),
            InvalidateEntries::Selftest(e) => e.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The IOMMUFD calls the backend makes.
pub trait IommufdOps: Send + Sync {
    /// IOMMU_IOAS_ALLOC.
    fn ioas_alloc(&self) -> Result<u32>;

    /// IOMMU_IOAS_MAP at a fixed IOVA of `len` bytes of this process's memory.
    ///
    /// # Safety
    ///
    /// `[user_va, user_va + len)` must stay mapped until it is unmapped from
    /// the IOAS (or the IOAS is destroyed), and it must only be accessed
    /// through raw pointers meanwhile: devices write it behind Rust's back.
    unsafe fn ioas_map(
        &self,
        ioas: u32,
        iova: u64,
        user_va: *mut u8,
        len: u64,
        perms: Perms,
    ) -> Result<()>;

    /// IOMMU_IOAS_UNMAP of `[iova, iova + len)`; returns the bytes unmapped.
    fn ioas_unmap(&self, ioas: u32, iova: u64, len: u64) -> Result<u64>;

    /// IOMMU_IOAS_IOVA_RANGES: the IOVA ranges the IOAS allows.
    fn iova_ranges(&self, ioas: u32) -> Result<Vec<IovaRange>>;

    /// IOMMU_HWPT_ALLOC for device `dev_id` over `pt_id`.
    fn hwpt_alloc(&self, dev_id: u32, pt_id: u32, flags: u32, data: HwptData) -> Result<u32>;

    /// IOMMU_HWPT_INVALIDATE; returns the entries handled. On an error the
    /// kernel's entry_num is in [`Error::Invalidate`].
    fn hwpt_invalidate(&self, hwpt: u32, entries: InvalidateEntries<'_>) -> Result<u32>;

    /// IOMMU_DESTROY.
    fn destroy(&self, id: u32) -> Result<()>;
}

/// An open `/dev/iommu`.
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

    /// The `iommufd-ioctls` handle (for `vfio-ioctls`).
    pub fn inner(&self) -> &Arc<IommuFd> {
        &self.fd
    }

    /// The raw file descriptor (for VFIO_DEVICE_BIND_IOMMUFD).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
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
}

impl IommufdOps for Iommufd {
    fn ioas_alloc(&self) -> Result<u32> {
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

    unsafe fn ioas_map(
        &self,
        ioas: u32,
        iova: u64,
        user_va: *mut u8,
        len: u64,
        perms: Perms,
    ) -> Result<()> {
        let mut flags = MAP_FIXED_IOVA;
        if perms.read {
            flags |= MAP_READABLE;
        }
        if perms.write {
            flags |= MAP_WRITEABLE;
        }
        let map = iommu_ioas_map {
            size: size_u32::<iommu_ioas_map>(),
            flags,
            ioas_id: ioas,
            __reserved: 0,
            user_va: user_va as u64,
            length: len,
            iova,
        };
        self.fd
            .map_iommu_ioas(&map)
            .map_err(|e| Error::from_crate("IOMMU_IOAS_MAP", e))
    }

    fn ioas_unmap(&self, ioas: u32, iova: u64, len: u64) -> Result<u64> {
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

    fn iova_ranges(&self, ioas: u32) -> Result<Vec<IovaRange>> {
        let mut ranges: Vec<iommu_iova_range> = Vec::new();
        loop {
            let num_iovas =
                u32::try_from(ranges.len()).map_err(|_| Error::TooLarge(ranges.len() as u64))?;
            let mut cmd = iommu_ioas_iova_ranges {
                size: size_u32::<iommu_ioas_iova_ranges>(),
                ioas_id: ioas,
                num_iovas,
                __reserved: 0,
                allowed_iovas: ranges.as_mut_ptr() as u64,
                out_iova_alignment: 0,
            };
            // SAFETY: `cmd` is a valid iommu_ioas_iova_ranges; the kernel writes
            // at most `num_iovas` entries to `allowed_iovas`, which has that many.
            let ret = unsafe { ioctl_with_mut_ref(&*self.fd, IOMMU_IOAS_IOVA_RANGES(), &mut cmd) };
            if ret == 0 {
                ranges.truncate(cmd.num_iovas as usize);
                return Ok(ranges
                    .iter()
                    .map(|r| IovaRange {
                        start: r.start,
                        last: r.last,
                    })
                    .collect());
            }
            let err = errno::Error::last();
            if err.errno() != libc::EMSGSIZE || cmd.num_iovas as usize <= ranges.len() {
                return Err(Error::Ioctl {
                    op: "IOMMU_IOAS_IOVA_RANGES",
                    source: err,
                });
            }
            // Too small: the kernel said how many there are; ask again.
            ranges.resize(cmd.num_iovas as usize, iommu_iova_range::default());
        }
    }

    fn hwpt_alloc(&self, dev_id: u32, pt_id: u32, flags: u32, data: HwptData) -> Result<u32> {
        let (data_type, data_len, data_uptr) = match &data {
            HwptData::None => (HWPT_DATA_NONE, 0, 0),
            HwptData::VtdS1(d) => (
                HWPT_DATA_VTD_S1,
                size_u32::<iommu_hwpt_vtd_s1>(),
                d as *const iommu_hwpt_vtd_s1 as u64,
            ),
            HwptData::Selftest(d) => (
                IOMMU_HWPT_DATA_SELFTEST,
                size_u32::<HwptSelftest>(),
                d as *const HwptSelftest as u64,
            ),
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
        // `data` (and so `data_uptr`) lives until the call returns.
        self.fd
            .alloc_iommu_hwpt(&mut alloc)
            .map_err(|e| Error::from_crate("IOMMU_HWPT_ALLOC", e))?;
        Ok(alloc.out_hwpt_id)
    }

    fn hwpt_invalidate(&self, hwpt: u32, entries: InvalidateEntries<'_>) -> Result<u32> {
        let (data_type, entry_len, data_uptr) = match entries {
            InvalidateEntries::VtdS1(e) => (
                INVALIDATE_DATA_VTD_S1,
                size_u32::<iommu_hwpt_vtd_s1_invalidate>(),
                e.as_ptr() as u64,
            ),
            InvalidateEntries::Selftest(e) => (
                IOMMU_HWPT_INVALIDATE_DATA_SELFTEST,
                size_u32::<HwptInvalidateSelftest>(),
                e.as_ptr() as u64,
            ),
        };
        let count =
            u32::try_from(entries.len()).map_err(|_| Error::TooLarge(entries.len() as u64))?;
        let mut inv = iommu_hwpt_invalidate {
            size: size_u32::<iommu_hwpt_invalidate>(),
            hwpt_id: hwpt,
            data_uptr,
            data_type,
            entry_len,
            entry_num: count,
            __reserved: 0,
        };
        match self.fd.invalidate_hwpt(&mut inv) {
            Ok(()) => Ok(inv.entry_num),
            Err(IommufdError::IommuHwptInvalidate(source)) => Err(Error::Invalidate {
                index: inv.entry_num,
                count,
                source,
            }),
            Err(e) => Err(Error::from_crate("IOMMU_HWPT_INVALIDATE", e)),
        }
    }

    fn destroy(&self, id: u32) -> Result<()> {
        self.fd
            .destroy_iommu_object(id)
            .map_err(|e| Error::from_crate("IOMMU_DESTROY", e))
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
        // Opening works; every ioctl fails with ENOTTY, reported by name.
        let fd = Iommufd::open_path(Path::new("/dev/null")).expect("open /dev/null");
        let err = fd.ioas_alloc().expect_err("IOAS_ALLOC on /dev/null");
        assert_eq!(err.errno(), Some(libc::ENOTTY));
        assert_eq!(err.to_string(), "IOMMU_IOAS_ALLOC failed");
        assert_eq!(
            fd.iova_ranges(1).expect_err("ranges").errno(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            fd.ioas_unmap(1, 0, 4096).expect_err("unmap").errno(),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            fd.destroy(1).expect_err("destroy").errno(),
            Some(libc::ENOTTY)
        );
        let err = fd
            .hwpt_alloc(1, 2, 0, HwptData::None)
            .expect_err("hwpt alloc");
        assert_eq!(err.errno(), Some(libc::ENOTTY));
        let entries = [HwptInvalidateSelftest::default()];
        match fd.hwpt_invalidate(3, InvalidateEntries::Selftest(&entries)) {
            Err(Error::Invalidate {
                count: 1, source, ..
            }) => {
                assert_eq!(source.errno(), libc::ENOTTY)
            }
            other => panic!("{other:?}"),
        }
        let mut buf = [0u8; 4096];
        // SAFETY: a stack buffer; the ioctl fails before the kernel looks at it.
        let err = unsafe { fd.ioas_map(1, 0, buf.as_mut_ptr(), 4096, Perms::RW) }.expect_err("map");
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

    #[test]
    fn invalidate_entries_count() {
        let v = [iommu_hwpt_vtd_s1_invalidate::default(); 3];
        assert_eq!(InvalidateEntries::VtdS1(&v).len(), 3);
        assert!(InvalidateEntries::Selftest(&[]).is_empty());
    }
}
