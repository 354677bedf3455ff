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
    /// A table for KVM (CPUID, MSRs) has more entries than KVM takes.
    #[error("The {0} has too many entries for KVM")]
    KvmTable(&'static str, #[source] vmm_sys_util::fam::Error),
    /// The pvIOMMU asked for without the Hyper-V interface.
    #[error(
        "The pvIOMMU is reached through the Hyper-V interface: --hypervisor kvm needs \
         --pviommu off (or use --hypervisor hyperv, the default)"
    )]
    PviommuNeedsHyperV,
    /// VMBus asked for without the Hyper-V interface.
    #[error(
        "VMBus is Hyper-V's device bus: KVM's interface (--hypervisor kvm, or \
         --pviommu off alone) cannot have it; use --hypervisor hyperv with --vmbus on"
    )]
    VmbusNeedsHyperV,
    /// Devices put on vPCI buses by default without VMBus.
    #[error(
        "vPCI buses are offered over VMBus: --pci-bus vpci needs the Hyper-V interface \
         (--hypervisor hyperv, the default) with --vmbus on"
    )]
    VpciNeedsVmbus,
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
        "Kernel {} has an unknown format: pvmm boots an ELF vmlinux (with or without a PVH \
         note) or a bzImage, not {found}",
        .path.display()
    )]
    KernelFormat {
        /// The kernel.
        path: PathBuf,
        /// What it is instead.
        found: crate::boot::UnknownFormat,
    },
    /// The embedded test kernel was not built into this pvmm.
    #[error(
        "This pvmm was built without its test kernel ({0}); pass --kernel, or install the \
         x86_64-unknown-none target (rustup target add x86_64-unknown-none) and rebuild"
    )]
    EmbeddedKernelMissing(&'static str),
    /// A bzImage too old or 32-bit only.
    #[error(
        "Kernel {} cannot be booted in 64-bit mode (boot protocol {version:#x}, no \
         XLF_KERNEL_64); pvmm needs an x86-64 kernel with boot protocol 2.12 or later",
        .path.display()
    )]
    KernelNot64Bit {
        /// The kernel.
        path: PathBuf,
        /// Its boot protocol version.
        version: u16,
    },
    /// The loader failed (typically: the kernel does not fit in RAM).
    #[error(
        "Cannot load kernel {} into guest memory: is it an x86-64 kernel, and is --memory large \
         enough?",
        .0.display()
    )]
    KernelLoad(PathBuf, #[source] linux_loader::loader::Error),
    /// The initrd could not be opened.
    #[error("Cannot read initrd {}", .0.display())]
    InitrdOpen(PathBuf, #[source] io::Error),
    /// The initrd could not be read into guest memory.
    #[error("Cannot read initrd {}", .0.display())]
    InitrdRead(PathBuf, #[source] vm_memory::GuestMemoryError),
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
    #[error("Invalid kernel command line: {start} (at most {max} bytes, no NUL)")]
    Cmdline {
        /// Its first characters.
        start: String,
        /// The longest command line.
        max: usize,
        /// Why linux-loader refused it.
        #[source]
        source: linux_loader::cmdline::Error,
    },
    /// The command line could not be written into guest memory.
    #[error("Cannot write the kernel command line into guest memory")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// A boot structure does not fit where it goes.
    #[error("Cannot write {0} into guest memory")]
    BootWrite(&'static str),
    /// Writing a boot structure into guest memory failed.
    #[error("Cannot write {0} into guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
    /// linux-loader could not write the boot information.
    #[error("Cannot write {0} into guest memory")]
    BootInfo(&'static str, #[source] linux_loader::configurator::Error),
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
    #[error("vCPU {index} stopped at RIP {rip:#x} (RSP {rsp:#x})")]
    VcpuFailed {
        /// vCPU index.
        index: u32,
        /// Where the guest was.
        rip: u64,
        /// Its stack pointer.
        rsp: u64,
        /// What happened.
        #[source]
        source: VcpuExitError,
    },
}

/// Why a vCPU stopped: an exit or a KVM_RUN failure the VMM cannot handle.
#[derive(Debug, thiserror::Error)]
pub enum VcpuExitError {
    /// An exit of a kind pvmm does not expect (HLT among them: pvmm's guests
    /// run with the in-kernel LAPIC, which handles HLT).
    #[error("Unexpected exit {}", exit_name(*.0))]
    UnexpectedExit(u32),
    /// A KVM_EXIT_SYSTEM_EVENT other than shutdown and reset.
    #[error("Unexpected system event {0}")]
    SystemEvent(u32),
    /// KVM_EXIT_INTERNAL_ERROR.
    #[error(
        "KVM {}, suberror {suberror}, data {data:x?}",
        internal_error_name(*.suberror)
    )]
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// `kvm_run.internal.data[..ndata]`.
        data: Vec<u64>,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    #[error("KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})")]
    FailedEntry {
        /// The hardware's entry failure reason.
        reason: u64,
        /// The host CPU it happened on.
        cpu: u32,
    },
    /// KVM_RUN itself failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// The registers of a hypercall exit could not be read or written.
    #[error("KVM {0} failed on a hypercall exit")]
    Registers(&'static str, #[source] kvm_ioctls::Error),
}

/// The name of a KVM exit reason (`KVM_EXIT_*`), for messages.
fn exit_name(reason: u32) -> String {
    use kvm_bindings as k;
    let name = match reason {
        k::KVM_EXIT_UNKNOWN => "KVM_EXIT_UNKNOWN",
        k::KVM_EXIT_EXCEPTION => "KVM_EXIT_EXCEPTION",
        k::KVM_EXIT_IO => "KVM_EXIT_IO",
        k::KVM_EXIT_HYPERCALL => "KVM_EXIT_HYPERCALL",
        k::KVM_EXIT_DEBUG => "KVM_EXIT_DEBUG",
        k::KVM_EXIT_HLT => "KVM_EXIT_HLT",
        k::KVM_EXIT_MMIO => "KVM_EXIT_MMIO",
        k::KVM_EXIT_IRQ_WINDOW_OPEN => "KVM_EXIT_IRQ_WINDOW_OPEN",
        k::KVM_EXIT_SHUTDOWN => "KVM_EXIT_SHUTDOWN",
        k::KVM_EXIT_FAIL_ENTRY => "KVM_EXIT_FAIL_ENTRY",
        k::KVM_EXIT_INTR => "KVM_EXIT_INTR",
        k::KVM_EXIT_SET_TPR => "KVM_EXIT_SET_TPR",
        k::KVM_EXIT_TPR_ACCESS => "KVM_EXIT_TPR_ACCESS",
        k::KVM_EXIT_NMI => "KVM_EXIT_NMI",
        k::KVM_EXIT_INTERNAL_ERROR => "KVM_EXIT_INTERNAL_ERROR",
        k::KVM_EXIT_SYSTEM_EVENT => "KVM_EXIT_SYSTEM_EVENT",
        k::KVM_EXIT_IOAPIC_EOI => "KVM_EXIT_IOAPIC_EOI",
        k::KVM_EXIT_HYPERV => "KVM_EXIT_HYPERV",
        k::KVM_EXIT_X86_RDMSR => "KVM_EXIT_X86_RDMSR",
        k::KVM_EXIT_X86_WRMSR => "KVM_EXIT_X86_WRMSR",
        k::KVM_EXIT_DIRTY_RING_FULL => "KVM_EXIT_DIRTY_RING_FULL",
        k::KVM_EXIT_AP_RESET_HOLD => "KVM_EXIT_AP_RESET_HOLD",
        k::KVM_EXIT_X86_BUS_LOCK => "KVM_EXIT_X86_BUS_LOCK",
        k::KVM_EXIT_XEN => "KVM_EXIT_XEN",
        k::KVM_EXIT_NOTIFY => "KVM_EXIT_NOTIFY",
        k::KVM_EXIT_MEMORY_FAULT => "KVM_EXIT_MEMORY_FAULT",
        _ => return format!("reason {reason}"),
    };
    format!("{name} ({reason})")
}

/// What a KVM internal error's suberror means.
fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
            "emulation failure (an instruction KVM cannot emulate here)"
        }
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failure",
        _ => "internal error",
    }
}

/// Result of the VMM.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use resources::ErrorChain;

    #[test]
    fn chains_are_joined() {
        let e = Error::KernelOpen("/nope".into(), io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "Cannot read kernel /nope: No such file or directory (os error 2)"
        );
        let e = Error::Memory(resources::Error::MemoryTooSmall {
            size: 1 << 20,
            min: 8 << 20,
        });
        assert_eq!(
            ErrorChain(&e).to_string(),
            "Invalid --memory: Memory size 1 MiB is too small: the guest needs at least 8 MiB"
        );
    }

    #[test]
    fn vcpu_failures_say_what_and_where() {
        let e = Error::VcpuFailed {
            index: 1,
            rip: 0x10_0000,
            rsp: 0x8000,
            source: VcpuExitError::UnexpectedExit(kvm_bindings::KVM_EXIT_HLT),
        };
        assert_eq!(
            ErrorChain(&e).to_string(),
            "vCPU 1 stopped at RIP 0x100000 (RSP 0x8000): Unexpected exit KVM_EXIT_HLT (5)"
        );
        let e = VcpuExitError::InternalError {
            suberror: kvm_bindings::KVM_INTERNAL_ERROR_EMULATION,
            data: vec![0x10, 0xab],
        };
        assert_eq!(
            e.to_string(),
            "KVM emulation failure (an instruction KVM cannot emulate here), suberror 1, \
             data [10, ab]"
        );
        assert_eq!(
            VcpuExitError::UnexpectedExit(1000).to_string(),
            "Unexpected exit reason 1000"
        );
    }
}
