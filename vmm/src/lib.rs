//! The pvmm virtual machine monitor: KVM VM, vCPUs, boot, ACPI, CLI.
//!
//! [`Vmm::new`] builds a VM from a [`VmConfig`] (KVM VM, guest RAM, devices,
//! kernel, ACPI tables, configured vCPUs); before [`Vmm::run`], callers may
//! plug PCI devices in ([`Vmm::devices`]) and add event-loop subscribers
//! ([`Vmm::event_manager`]). [`run`] does both steps for a plain VM.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod device_manager;
pub mod error;
pub mod event_loop;
pub mod hooks;
pub mod hotplug;
pub mod hyperv;
pub mod kvm;
pub mod processors;
pub mod pviommu;
pub mod removal;
pub mod rest;
pub mod vcpu;
pub mod vfio;
pub mod vmbus;
pub mod vpci;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use vm_memory::GuestMemoryMmap;

pub use config::{BootProtocol, Hypervisor, KernelSource, SerialConfig, VmConfig};
pub use device_manager::DeviceManager;
pub use error::{Error, Result, VcpuExitError};
pub use hooks::{
    HypercallAction, HypercallExit, HypercallRegs, MsrContext, MsrHandler, PortIoHypercall, VmHooks,
};

use boot::KernelImage;
use cpu::Entry;
use event_loop::{ExitWatcher, StateRequests, StdinInput};
use vcpu::{ExitSlot, Vcpu, VcpuShared, VcpuThreads};

/// Why a VM ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042).
    Reset,
    /// The guest triple-faulted (a reset, too).
    TripleFault,
    /// `vm.shutdown` or `vmm.shutdown` through the API.
    ApiShutdown,
}

impl ExitReason {
    /// The line pvmm prints on stderr.
    pub fn message(&self) -> &'static str {
        match self {
            Self::PowerOff => "pvmm: guest powered off",
            Self::Reset => "pvmm: guest requested reset",
            Self::TripleFault => "pvmm: guest reset (triple fault)",
            Self::ApiShutdown => "pvmm: shut down through the API",
        }
    }
}

/// Subscribers of the VMM's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A VM ready to run.
pub struct Vmm {
    config: VmConfig,
    vm: Arc<VmFd>,
    memory: Arc<GuestMemoryMmap>,
    devices: Arc<Mutex<DeviceManager>>,
    vcpus: Vec<Vcpu>,
    hooks: VmHooks,
    exit: Arc<ExitSlot>,
    event_manager: EventManager<Subscriber>,
    /// Raised by SIGUSR2 ([`StateRequests`]): the vCPUs log their state.
    state_requested: Arc<AtomicBool>,
    iommu: Arc<iommu::Iommu>,
    _kvm: Kvm,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("config", &self.config)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// Checks `ranges` against what KVM's MSR filter takes.
fn check_msr_ranges(ranges: &[std::ops::Range<u32>]) -> Result<()> {
    let fits = ranges.len() <= hooks::MAX_MSR_RANGES
        && ranges
            .iter()
            .all(|r| !r.is_empty() && r.len() <= hooks::MAX_MSRS_PER_RANGE as usize);
    if fits {
        Ok(())
    } else {
        Err(Error::MsrFilter {
            ranges: ranges.len(),
            max_ranges: hooks::MAX_MSR_RANGES,
            max_msrs: hooks::MAX_MSRS_PER_RANGE,
        })
    }
}

/// Takes the MSRs of `ranges` out of KVM so that they exit to user space,
/// all but those of `kernel` (which KVM keeps serving).
fn install_msr_filter(vm: &VmFd, ranges: &[std::ops::Range<u32>], kernel: &[u32]) -> Result<()> {
    check_msr_ranges(ranges)?;
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| Error::Kvm("KVM_CAP_X86_USER_SPACE_MSR", e))?;
    // A clear bit denies the MSR to the guest in KVM, so the access exits to
    // user space; a set bit leaves it to KVM.
    let bitmaps: Vec<Vec<u8>> = ranges
        .iter()
        .map(|r| {
            let mut bitmap = vec![0u8; r.len().div_ceil(8)];
            for m in kernel.iter().filter(|m| r.contains(m)) {
                let bit = (m - r.start) as usize;
                bitmap[bit / 8] |= 1 << (bit % 8);
            }
            bitmap
        })
        .collect();
    let ranges: Vec<MsrFilterRange<'_>> = ranges
        .iter()
        .zip(&bitmaps)
        .map(|(r, bitmap)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: r.start,
            msr_count: r.end - r.start,
            bitmap,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(|e| Error::Kvm("KVM_X86_SET_MSR_FILTER", e))
}

impl Vmm {
    /// Builds the VM described by `config`, with `hooks` in its vCPU loops.
    pub fn new(config: VmConfig, hooks: VmHooks) -> Result<Self> {
        // Everything that can be checked without KVM first.
        config.validate()?;
        resources::layout::check_memory_size(config.memory).map_err(Error::Memory)?;
        if config.cpus == 0 {
            return Err(Error::NoCpus);
        }
        let image = match &config.kernel {
            KernelSource::Path(p) => KernelImage::open(p)?,
            KernelSource::Embedded => KernelImage::embedded()?,
        };
        if let Some(p) = &config.initrd {
            std::fs::metadata(p).map_err(|e| Error::InitrdOpen(p.clone(), e))?;
        }
        let cmdline = config.effective_cmdline();

        let kvm = kvm::open_kvm()?;
        kvm::check_capabilities(&kvm)?;
        kvm::check_vcpus(&kvm, u32::from(config.cpus))?;

        // One IOMMU per VM (devices start in the default domain, GPA); the
        // guest reaches it through the Hyper-V interface (crate::hyperv,
        // crate::pviommu), unless the caller brought hooks of its own.
        let iommu = Arc::new(
            iommu::Iommu::new(iommu::IommuConfig {
                rep_budget: config
                    .pviommu_rep_budget
                    .unwrap_or(iommu::IommuConfig::default().rep_budget),
                ..Default::default()
            })
            .map_err(Error::Iommu)?,
        );
        let hyperv = config.hypervisor == Hypervisor::HyperV
            && hooks.hypercall.is_none()
            && hooks.msr.is_none()
            && hooks.cpuid.is_none();
        // Devices default to the pvIOMMU only where the guest can see it.
        let pv_devices = hyperv && config.pviommu;
        let msr_ranges = if hyperv {
            vec![hyperv::MSR_RANGE]
        } else {
            hooks
                .msr
                .as_ref()
                .map(|h| h.msr_ranges())
                .unwrap_or_default()
        };
        check_msr_ranges(&msr_ranges)?;
        // KVM's own Hyper-V clock where it has one (see hyperv.rs).
        let kernel_clock = hyperv && kvm.check_extension(kvm_ioctls::Cap::HypervTime);
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let invariant_tsc = hyperv::invariant_tsc(supported.as_slice());
        let kernel_msrs: &[u32] = if kernel_clock {
            hyperv::kernel_clock_msrs(invariant_tsc)
        } else {
            &[]
        };

        let memory = Arc::new(kvm::create_guest_memory(config.memory)?);
        let vm = Arc::new(kvm::create_vm(&kvm, &memory, |vm| {
            if msr_ranges.is_empty() {
                Ok(())
            } else {
                install_msr_filter(vm, &msr_ranges, kernel_msrs)
            }
        })?);
        let mut devices = DeviceManager::new(
            vm.clone(),
            memory.clone(),
            config.memory,
            &config.serial,
            iommu.clone(),
            pv_devices,
        )?;
        // VMBus exists before the devices: those on vPCI buses are its
        // offers.
        let vmbus = hyperv && config.vmbus;
        let count = u32::from(config.cpus);
        let msi = Arc::new(kvm::KvmMsiSink::new(vm.clone()));
        let vmbus_server =
            vmbus.then(|| Arc::new(crate::vmbus::VmBus::new(count, memory.clone(), msi.clone())));
        if let Some(v) = &vmbus_server {
            devices.set_vmbus(v.clone(), count);
        }
        if config.pci_bus == api::PciBus::Vpci && !vmbus {
            // VMBus asked for, but the caller's hooks replace Hyper-V's.
            return Err(Error::VpciNeedsVmbus);
        }
        devices.set_default_bus(config.pci_bus);
        // The command line's devices take the path of the API's.
        for d in &config.devices {
            devices
                .add_device(d)
                .map_err(|e| Error::AddDevice(Box::new(e)))?;
        }

        // Kernel, command line, initrd, ACPI, boot information.
        let kernel = boot::load_kernel(&memory, image, config.boot_protocol)?;
        let cmdline_len = boot::write_cmdline(&memory, &cmdline)?;
        let initrd = match &config.initrd {
            Some(p) => {
                let max = kernel
                    .setup_header
                    .map(|h| u64::from(h.initrd_addr_max) + 1);
                Some(boot::load_initrd(
                    &memory,
                    p,
                    config.memory,
                    kernel.kernel_end,
                    max,
                )?)
            }
            None => None,
        };
        let tables = acpi::write_tables(
            &memory,
            config.memory,
            config.cpus,
            devices.hotplug_gsi(),
            vmbus,
        )?;
        acpi::write_reset_vector(&memory)?;
        let map = resources::memory_map(config.memory).map_err(Error::Memory)?;
        let boot_info = match kernel.entry {
            Entry::Linux64 { .. } => {
                boot::write_boot_params(&memory, &kernel, cmdline_len, initrd, tables.rsdp, &map)?
            }
            Entry::Pvh { .. } => boot::write_pvh_info(&memory, initrd, tables.rsdp, &map)?,
        };

        // vCPUs.
        let mut hooks = hooks;
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..count {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            if hyperv && index == 0 {
                // The reference clock starts with the boot vCPU's TSC (KVM
                // keeps the others in step) at the frequency KVM gives it.
                let params = hyperv::HvParams {
                    vcpus: count,
                    host_cpus: std::thread::available_parallelism()
                        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
                    tsc_khz: fd.get_tsc_khz().ok().filter(|&khz| khz != 0),
                    tsc_at_start: vcpu::guest_tsc(&fd).unwrap_or(0),
                    invariant_tsc,
                    pviommu: config.pviommu,
                    kernel_clock,
                };
                // Cluster IPIs and GUEST_IDLE, for VMs of up to
                // processors::MAX_VPS vCPUs.
                let mut partition = hyperv::Partition::new(params);
                if let Some(p) = processors::Processors::new(count, msi.clone()) {
                    partition = partition.with_processors(Arc::new(p));
                }
                if let Some(v) = &vmbus_server {
                    partition = partition.with_vmbus(v.clone());
                }
                log::info!(
                    "Hyper-V interface: privileges {:#x} {:#x}, features {:#x}, TSC {} Hz, VMBus {}, reference TSC page {}",
                    partition.privileges(),
                    partition.features_ebx(),
                    partition.features_edx(),
                    partition.tsc_hz().unwrap_or(0),
                    if vmbus { "on" } else { "off" },
                    if partition.kernel_clock() && partition.reference_tsc_available() {
                        "KVM's (KVM serves the page, the reference counter and the frequencies)"
                    } else if partition.kernel_clock() {
                        "not offered (no invariant TSC): KVM serves the reference counter and the frequencies"
                    } else if partition.reference_tsc_available() {
                        "offered"
                    } else {
                        "not offered (no invariant TSC): TIME_REF_COUNT follows the host clock"
                    }
                );
                hooks = Arc::new(pviommu::Pviommu::new(iommu.clone(), partition)).hooks();
            }
            let entries =
                cpu::vcpu_cpuid(supported.as_slice(), index, count, hooks.cpuid.as_deref());
            fd.set_cpuid2(&cpu::to_cpuid(&entries)?)
                .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
            cpu::setup_msrs(&fd)?;
            cpu::setup_fpu(&fd)?;
            cpu::setup_lapic(&fd)?;
            if index == 0 {
                cpu::setup_boot_cpu(&fd, &memory, kernel.entry, boot_info)?;
            }
            vcpus.push(Vcpu { index, fd });
        }

        let exit = Arc::new(ExitSlot::new()?);
        let mut event_manager = EventManager::<Subscriber>::new().map_err(Error::EventLoop)?;
        let watcher = {
            let ev = devices.exit_events();
            let clone = |e: &vmm_sys_util::eventfd::EventFd| {
                e.try_clone().map_err(|err| Error::Io("an event fd", err))
            };
            ExitWatcher::new(clone(&ev.reset)?, clone(&ev.poweroff)?, exit.clone())
        };
        event_manager.add_subscriber(Arc::new(Mutex::new(watcher)));
        event_manager.add_subscriber(Arc::new(Mutex::new(StdinInput::new(
            devices.serial().clone(),
        ))));
        let state_requested = Arc::new(AtomicBool::new(false));
        event_manager.add_subscriber(Arc::new(Mutex::new(StateRequests::new(
            state_requested.clone(),
        )?)));

        Ok(Self {
            config,
            vm,
            memory,
            devices: Arc::new(Mutex::new(devices)),
            vcpus,
            hooks,
            exit,
            event_manager,
            state_requested,
            iommu,
            _kvm: kvm,
        })
    }

    /// The devices (to plug PCI devices in before or while running).
    pub fn devices(&self) -> &Arc<Mutex<DeviceManager>> {
        &self.devices
    }

    /// The event loop (to add subscribers before running).
    pub fn event_manager(&mut self) -> &mut EventManager<Subscriber> {
        &mut self.event_manager
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The VM's IOMMU (for devices plugged in later, and its statistics).
    pub fn iommu(&self) -> &Arc<iommu::Iommu> {
        &self.iommu
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Starts the vCPUs and runs the event loop until the guest powers off
    /// or resets (`Ok`) or something fails (`Err`); stops every vCPU before
    /// returning.
    pub fn run(mut self) -> Result<ExitReason> {
        self.run_until_exit()
    }

    /// [`Vmm::run`], leaving the event loop usable afterwards (the API
    /// keeps serving after `vm.shutdown`).
    pub(crate) fn run_until_exit(&mut self) -> Result<ExitReason> {
        let (pio_bus, mmio_bus) = {
            let d = devices::lock::mutex(&self.devices);
            (d.pio_bus().clone(), d.mmio_bus().clone())
        };
        let shared = Arc::new(VcpuShared {
            pio_bus,
            mmio_bus,
            memory: self.memory.clone(),
            hooks: self.hooks.clone(),
            stop: AtomicBool::new(false),
            state_requests: AtomicU64::new(0),
            exit: self.exit.clone(),
        });
        let threads = VcpuThreads::start(std::mem::take(&mut self.vcpus), shared)?;
        let result = loop {
            if let Some(r) = self.exit.take() {
                break r;
            }
            if let Err(e) = self.event_manager.run() {
                break Err(Error::EventLoop(e));
            }
            if self.state_requested.swap(false, Ordering::AcqRel) {
                threads.log_states();
            }
        };
        threads.stop();
        let stats = self.iommu.stats();
        let calls = stats.hypercalls;
        if calls.total > 0 {
            log::info!(
                "pvIOMMU: {} hypercalls, {} failed, {} time-sliced restarts",
                calls.total,
                calls.errors,
                calls.continuations
            );
        }
        if let Some(s) = devices::lock::mutex(&self.devices).passthrough_stats() {
            log::info!(
                "IOMMUFD: {} maps, {} unmaps, {} invalidations; {} shadow walks ({} entries read); the guest's range flushes of shadowed domains covered {} pages, {} of them unchanged (over-flushed)",
                s.maps,
                s.unmaps,
                s.invalidations,
                s.shadow_walks,
                s.shadow_entries_read,
                s.range_flush_pages,
                s.range_flush_unchanged_pages
            );
        }
        if stats.guest_log.dropped > 0 {
            log::warn!(
                "{} guest-caused log lines were dropped ({} logged)",
                stats.guest_log.dropped,
                stats.guest_log.emitted
            );
        }
        result
    }
}

/// Builds and runs a VM without hooks.
pub fn run(config: VmConfig) -> Result<ExitReason> {
    Vmm::new(config, VmHooks::default())?.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_filter_ranges_are_checked() {
        assert!(check_msr_ranges(&[]).is_ok());
        assert!(check_msr_ranges(&[hyperv::MSR_RANGE]).is_ok());
        let sixteen: Vec<_> = (0..16u32).map(|i| i * 0x100..i * 0x100 + 1).collect();
        assert!(check_msr_ranges(&sixteen).is_ok());
        let seventeen: Vec<_> = (0..17u32).map(|i| i * 0x100..i * 0x100 + 1).collect();
        assert!(matches!(
            check_msr_ranges(&seventeen),
            Err(Error::MsrFilter { ranges: 17, .. })
        ));
        let empty = 5..5;
        assert!(check_msr_ranges(&[empty]).is_err());
        let whole_bitmap = 0..hooks::MAX_MSRS_PER_RANGE;
        assert!(check_msr_ranges(&[whole_bitmap]).is_ok());
        let too_long = 0..hooks::MAX_MSRS_PER_RANGE + 1;
        assert!(check_msr_ranges(&[too_long]).is_err());
    }
}
