//! What the passthrough device needs of VFIO ([`VfioHw`]), its
//! implementation on a `VfioDevice` (region reads and writes with
//! pread/pwrite, interrupts, reset, the mmappable areas of a region), and
//! [`HostMapping`], a region area mmapped into this process.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use vfio_ioctls::{VfioDevice, VfioError, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

/// VFIO region index of the configuration space (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const CONFIG_REGION: u32 = 7;
/// VFIO region index of the expansion ROM (`VFIO_PCI_ROM_REGION_INDEX`).
pub const ROM_REGION: u32 = 6;

/// `VFIO_REGION_INFO_FLAG_MMAP`: the region may be mmapped.
const REGION_FLAG_MMAP: u32 = 1 << 2;

/// The VFIO region index of BAR `index` (`VFIO_PCI_BAR0_REGION_INDEX` + index).
pub(super) fn bar_region(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}

/// What the passthrough device needs from VFIO (a trait so that the
/// configuration logic can be tested without a device).
pub trait VfioHw: Send + Sync {
    /// Size of VFIO region `index` (0 when absent).
    fn region_size(&self, index: u32) -> u64;
    /// Reads `buf.len()` bytes at `offset` of region `index`.
    fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset` of region `index`.
    fn write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    /// VFIO_DEVICE_SET_IRQS: MSI vectors signal `fds`.
    fn enable_msi(&self, fds: &[&EventFd]) -> io::Result<()>;
    /// VFIO_DEVICE_SET_IRQS: MSI off.
    fn disable_msi(&self) -> io::Result<()>;
    /// VFIO_DEVICE_SET_IRQS: MSI-X vectors signal `fds`.
    fn enable_msix(&self, fds: &[&EventFd]) -> io::Result<()>;
    /// VFIO_DEVICE_SET_IRQS: MSI-X off.
    fn disable_msix(&self) -> io::Result<()>;
    /// VFIO_DEVICE_RESET, if the device supports it.
    fn reset(&self);
    /// The parts `(offset, size)` of region `index` that may be mmapped.
    fn mmap_areas(&self, index: u32) -> Vec<(u64, u64)>;
    /// Maps `size` bytes at `offset` of region `index` into this process.
    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<HostMapping>;
}

/// A shared mapping in this process, unmapped on drop.
#[derive(Debug)]
pub struct HostMapping {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
}

// SAFETY: the mapping is plain shared memory (device MMIO) owned by this
// value; it is only accessed through raw pointers by whoever holds them.
#[allow(unsafe_code)]
unsafe impl Send for HostMapping {}
// SAFETY: as for Send: no references into the mapping are handed out.
#[allow(unsafe_code)]
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `len` bytes of `fd` at `offset`, shared and read-write.
    #[allow(unsafe_code)]
    pub fn map_fd(fd: i32, offset: u64, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: a new mapping chosen by the kernel; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len })
    }

    /// First byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mmap refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostMapping {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map_fd`, owned by `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn vfio_io(e: VfioError) -> io::Error {
    io::Error::other(e)
}

impl VfioHw for VfioDevice {
    fn region_size(&self, index: u32) -> u64 {
        self.get_region_size(index)
    }

    #[allow(unsafe_code)]
    fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let pos = region_pos(self, index, offset, buf.len())?;
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes, the fd is
        // the open VFIO device, and the result is checked.
        let n = unsafe { libc::pread(self.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), pos) };
        check_len(n, buf.len())
    }

    #[allow(unsafe_code)]
    fn write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let pos = region_pos(self, index, offset, data.len())?;
        // SAFETY: `data` is valid for `data.len()` bytes of reads, the fd is
        // the open VFIO device, and the result is checked.
        let n = unsafe { libc::pwrite(self.as_raw_fd(), data.as_ptr().cast(), data.len(), pos) };
        check_len(n, data.len())
    }

    fn enable_msi(&self, fds: &[&EventFd]) -> io::Result<()> {
        VfioDevice::enable_msi(self, fds.to_vec()).map_err(vfio_io)
    }

    fn disable_msi(&self) -> io::Result<()> {
        VfioDevice::disable_msi(self).map_err(vfio_io)
    }

    fn enable_msix(&self, fds: &[&EventFd]) -> io::Result<()> {
        VfioDevice::enable_msix(self, fds.to_vec()).map_err(vfio_io)
    }

    fn disable_msix(&self) -> io::Result<()> {
        VfioDevice::disable_msix(self).map_err(vfio_io)
    }

    fn reset(&self) {
        VfioDevice::reset(self);
    }

    fn mmap_areas(&self, index: u32) -> Vec<(u64, u64)> {
        if self.get_region_flags(index) & REGION_FLAG_MMAP == 0 {
            return Vec::new();
        }
        let sparse = self
            .get_region_caps(index)
            .into_iter()
            .find_map(|c| match c {
                VfioRegionInfoCap::SparseMmap(s) => Some(s.areas),
                _ => None,
            });
        match sparse {
            Some(areas) => areas.iter().map(|a| (a.offset, a.size)).collect(),
            None => vec![(0, self.get_region_size(index))],
        }
    }

    fn mmap(&self, index: u32, offset: u64, size: u64) -> io::Result<HostMapping> {
        let start = self
            .get_region_offset(index)
            .checked_add(offset)
            .ok_or_else(|| io::Error::other("region offset overflows"))?;
        HostMapping::map_fd(self.as_raw_fd(), start, size)
    }
}

/// The file offset of `offset` in region `index`, range-checked.
fn region_pos(dev: &VfioDevice, index: u32, offset: u64, len: usize) -> io::Result<i64> {
    let size = dev.get_region_size(index);
    offset
        .checked_add(len as u64)
        .filter(|end| *end <= size)
        .and_then(|_| dev.get_region_offset(index).checked_add(offset))
        .and_then(|p| i64::try_from(p).ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "access outside the VFIO region",
            )
        })
}

fn check_len(n: isize, want: usize) -> io::Result<()> {
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n.unsigned_abs() != want {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short VFIO region access",
        ));
    }
    Ok(())
}
