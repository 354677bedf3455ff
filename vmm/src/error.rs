//! The VMM's errors: each message says what went wrong and, where the user
//! can do something about it, what to do.

use std::io;
use std::path::PathBuf;

use resources::layout::human_size;

/// Errors of building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No /dev/kvm.
    #[error(
        "/dev/kvm does not exist: this host has no KVM (load the kvm_intel or kvm_amd module, \
         or enable virtualization in the firmware)"
    )]
    KvmMissing,
    /// /dev/kvm not accessible.
    #[error("Permission denied on /dev/kvm: add your user to the kvm group (or run as root)")]
    KvmPermission,
    /// /dev/kvm could not be opened for another reason.
    #[error("Cannot open /dev/kvm")]
    KvmOpen(#[source] io::Error),
    /// KVM lacks something pvmm needs.
    #[error("This host's KVM lacks {0}, which pvmm needs: use a newer host kernel")]
    KvmCapability(&'static str),
    /// A KVM call failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The pvIOMMU asked for without the Hyper-V interface.
    #[error(
        "The pvIOMMU is reached through the Hyper-V interface: --hypervisor kvm needs \
         --pviommu off (or use --hypervisor hyperv, the default)"
    )]
    PviommuNeedsHyperV,
    /// MSR hooks asked for more than KVM's MSR filter takes.
    #[error(
        "The MSR hooks ask for {ranges} MSR ranges (KVM's filter takes at most {max_ranges} \
         non-empty ranges of at most {max_msrs} MSRs)"
    )]
    MsrFilter {
        /// Ranges asked for.
        ranges: usize,
        /// KVM's limit on ranges.
        max_ranges: usize,
        /// KVM's limit on MSRs per range.
        max_msrs: u32,
    },
    /// Zero vCPUs.
    #[error("--cpus must be at least 1")]
    NoCpus,
    /// More vCPUs than KVM or the layout allow.
    #[error("--cpus {requested} is too many: this host allows at most {max} vCPUs")]
    TooManyCpus {
        /// Asked for.
        requested: u32,
        /// Limit (KVM's maximum, and 254 for xAPIC ids).
        max: u32,
    },
    /// --memory does not fit the layout.
    #[error("Invalid --memory")]
    Memory(#[source] resources::Error),
    /// Guest memory allocation failed.
    #[error("Cannot allocate {} of guest memory", human_size(*.0))]
    GuestMemory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// The kernel file could not be opened or read.
    #[error("Cannot read kernel {}", .0.display())]
    KernelOpen(PathBuf, #[source] io::Error),
    /// The kernel is neither an ELF nor a bzImage.
    #[error(
        "Kernel {0} has an unknown format: pvmm boots an ELF vmlinux (with or without a PVH \
         note) or a bzImage"
    )]
    KernelFormat(String),
    /// The embedded test kernel was not built into this pvmm.
    #[error(
        "This pvmm was built without its test kernel ({0}); pass --kernel, or install the \
         x86_64-unknown-none target (rustup target add x86_64-unknown-none) and rebuild"
    )]
    EmbeddedKernelMissing(&'static str),
    /// A bzImage too old or 32-bit only.
    #[error(
        "Kernel {0} cannot be booted in 64-bit mode (boot protocol {1:#x}, no XLF_KERNEL_64); \
         pvmm needs an x86-64 kernel with boot protocol 2.12 or later"
    )]
    KernelNot64Bit(String, u16),
    /// The loader failed (typically: the kernel does not fit in RAM).
    #[error("Cannot load kernel {0} into guest memory: is it an x86-64 kernel, and is --memory large enough?")]
    KernelLoad(String, #[source] linux_loader::loader::Error),
    /// The initrd could not be read.
    #[error("Cannot read initrd {}", .0.display())]
    InitrdOpen(PathBuf, #[source] io::Error),
    /// The initrd does not fit.
    #[error(
        "Initrd {} is too big ({}): at most {} fit between the kernel and the top of low RAM; \
         raise --memory",
        .path.display(),
        human_size(*.size),
        human_size(*.room)
    )]
    InitrdTooBig {
        /// File.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room available.
        room: u64,
    },
    /// The command line is too long or has a NUL.
    #[error("Invalid kernel command line: {0} (at most {1} bytes, no NUL)")]
    Cmdline(String, usize),
    /// Writing boot structures into guest memory failed.
    #[error("Cannot write {0} into guest memory")]
    BootWrite(&'static str),
    /// The serial output file could not be opened.
    #[error("Cannot open serial output file {}", .0.display())]
    SerialFile(PathBuf, #[source] io::Error),
    /// An event fd or epoll set could not be created.
    #[error("Cannot create {0}")]
    Io(&'static str, #[source] io::Error),
    /// A device could not be set up.
    #[error("Cannot set up {0}")]
    Device(&'static str, #[source] devices::BusError),
    /// The pvIOMMU could not be set up.
    #[error("Cannot set up the pvIOMMU")]
    Iommu(#[source] iommu::IommuError),
    /// The API could not be served.
    #[error("Cannot serve the API")]
    Api(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A PCI device could not be plugged in.
    #[error("Cannot plug the PCI device in")]
    Pci(#[source] devices::pci::PciError),
    /// A `--device` could not be added.
    #[error("Cannot add the device")]
    AddDevice(#[source] Box<crate::device_manager::DeviceError>),
    /// No room for a resource (BAR space, PCI slot, GSI).
    #[error("Out of guest resources")]
    Resource(#[source] resources::Error),
    /// The event loop failed.
    #[error("Event loop failure")]
    EventLoop(#[source] event_manager::Error),
    /// A vCPU thread could not be started.
    #[error("Cannot start vCPU thread {0}")]
    VcpuSpawn(u32, #[source] io::Error),
    /// A vCPU stopped on something the VMM cannot handle.
    #[error("vCPU {index} stopped: {reason}")]
    VcpuFailed {
        /// vCPU index.
        index: u32,
        /// What happened (exit reason, registers).
        reason: String,
    },
}

/// Result of the VMM.
pub type Result<T> = std::result::Result<T, Error>;

/// The whole chain of an error, `outer: inner: innermost`, for one line on
/// stderr.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let msg = inner.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_are_joined() {
        let e = Error::KernelOpen("/nope".into(), io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            error_chain(&e),
            "Cannot read kernel /nope: No such file or directory (os error 2)"
        );
        let e = Error::Memory(resources::Error::MemoryTooSmall {
            size: 1 << 20,
            min: 8 << 20,
        });
        assert_eq!(
            error_chain(&e),
            "Invalid --memory: Memory size 1 MiB is too small: the guest needs at least 8 MiB"
        );
    }
}
