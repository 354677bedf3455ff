//! A memfd-backed stand-in for guest RAM, mapped shared into this process.
//!
//! Devices write it by DMA behind Rust's back, so it is only touched through
//! raw pointers, never through a reference.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;

/// Errors of [`GuestRam`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("memfd_create failed")]
    Create(#[source] io::Error),
    #[error("Cannot size the memfd to {size:#x} bytes")]
    Truncate {
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("Cannot map {size:#x} bytes of the memfd")]
    Map {
        size: usize,
        #[source]
        source: io::Error,
    },
    #[error("Range {offset:#x}+{len:#x} is outside the {size:#x}-byte RAM")]
    OutOfRange {
        offset: u64,
        len: usize,
        size: usize,
    },
}

/// Guest RAM: a memfd of `size` bytes, mapped shared. Pages are allocated
/// on first touch, so a large, untouched RAM costs nothing.
pub struct GuestRam {
    file: File,
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain shared memory owned by this struct; every
// access goes through raw-pointer copies, which are as thread-safe as the
// device's concurrent DMA already requires callers to be.
unsafe impl Send for GuestRam {}
// SAFETY: see `Send`: no method hands out references into the mapping.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// A new RAM of `size` bytes (a multiple of the page size).
    pub fn new(name: &CStr, size: usize) -> Result<Self, Error> {
        // SAFETY: `name` is a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)
            .map_err(|source| Error::Truncate {
                size: size as u64,
                source,
            })?;
        // SAFETY: a fresh shared mapping of the whole file; the kernel picks
        // the address, and the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Map {
                size,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Error::Map {
            size,
            source: io::Error::other("mmap returned NULL"),
        })?;
        Ok(Self { file, ptr, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The memfd.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Host address of byte `offset`, for IOMMU mappings.
    pub fn host_addr(&self, offset: u64, len: usize) -> Result<*mut u8, Error> {
        let offset = self.check(offset, len)?;
        // SAFETY: `check` proved `offset + len <= size`, so the result stays
        // inside the mapping.
        Ok(unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// Copies `data` into the RAM at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let dst = self.host_addr(offset, data.len())?;
        // SAFETY: `dst..dst+len` is inside the mapping (host_addr checked it)
        // and cannot overlap `data`, a Rust slice outside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` out of the RAM.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let src = self.host_addr(offset, buf.len())?;
        // SAFETY: as in `write`, with the roles swapped.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// `offset` as a usize, if `[offset, offset + len)` lies inside the RAM.
    fn check(&self, offset: u64, len: usize) -> Result<usize, Error> {
        let start = usize::try_from(offset).ok();
        match start.and_then(|o| Some((o, o.checked_add(len)?))) {
            Some((start, end)) if end <= self.size => Ok(start),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` are exactly the mapping made in `new`, and no
        // reference into it can outlive `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_back() {
        let ram = GuestRam::new(c"test", 0x4000).expect("memfd");
        assert_eq!(ram.size(), 0x4000);
        ram.write(0x1ffe, &[1, 2, 3, 4]).expect("write");
        let mut buf = [0u8; 4];
        ram.read(0x1ffe, &mut buf).expect("read");
        assert_eq!(buf, [1, 2, 3, 4]);
        assert_eq!(ram.file().metadata().expect("stat").len(), 0x4000);
    }

    #[test]
    fn out_of_range_is_refused() {
        let ram = GuestRam::new(c"test", 0x1000).expect("memfd");
        assert!(matches!(
            ram.write(0xffd, &[0; 4]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(ram.read(u64::MAX, &mut [0; 1]).is_err());
        assert!(ram.host_addr(0x1000, 1).is_err());
        assert!(ram.host_addr(0x1000, 0).is_ok());
    }

    #[test]
    fn large_sparse_ram_costs_no_memory() {
        use std::os::unix::fs::MetadataExt;
        // 64 GiB of address space, never touched: nothing is allocated.
        let ram = GuestRam::new(c"sparse", 64 << 30).expect("sparse memfd");
        assert_eq!(ram.file().metadata().expect("stat").blocks(), 0);
    }
}
