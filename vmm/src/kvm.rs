//! The KVM VM: capability checks, guest RAM, interrupt controllers and GSI
//! routing.
//!
//! # Split irqchip
//!
//! pvmm uses KVM's split irqchip: the LAPICs are in the kernel, the IOAPIC
//! is pvmm's ([`devices::ioapic`]), and there is no PIC and no PIT (the
//! MADT says so: no PCAT_COMPAT flag; guests time with the TSC and the LAPIC
//! timer). PCI devices interrupt with MSIs, which work the same with either
//! model: an emulated device calls KVM_SIGNAL_MSI ([`KvmMsiSink`]), and a
//! VFIO device's interrupts become MSI routes in the GSI routing table with
//! an irqfd each ([`IrqRouting`]), delivered by the kernel without a VMM
//! exit. Legacy lines (COM1, the ACPI GED) are irqfds on GSI = IOAPIC pin;
//! the user-space IOAPIC turns each redirection entry into that GSI's MSI
//! route when the guest programs it, so they too are delivered in the kernel.
//!
//! Why not the in-kernel irqchip and PIT: PCI MSI does not need them, and on
//! the development machine destroying a VM that has them takes 14-23 ms
//! (SRCU grace periods as the PIC, IOAPIC and PIT leave the I/O buses),
//! against under 1 ms with the split irqchip: most of a short-lived VM's
//! wall time (see the boot benchmark).

use std::io;
use std::sync::{Arc, Mutex};

use devices::interrupt::MsiMessage;
use devices::ioapic::PinRoutes;
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_msi, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use resources::layout;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::MAX_VCPUS;
use crate::error::{Error, Result};

/// Opens /dev/kvm with an error that says what to fix.
pub fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        n => Error::KvmOpen(io::Error::from_raw_os_error(n)),
    })
}

/// The capabilities pvmm relies on.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (
        Cap::SplitIrqchip,
        "the split irqchip (KVM_CAP_SPLIT_IRQCHIP)",
    ),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
    (Cap::IrqRouting, "GSI routing (KVM_CAP_IRQ_ROUTING)"),
    (Cap::SignalMsi, "KVM_SIGNAL_MSI"),
    (Cap::SetTssAddr, "KVM_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_SET_IDENTITY_MAP_ADDR"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    (Cap::SyncRegs, "KVM_CAP_SYNC_REGS"),
];

/// Checks KVM's API version and the capabilities pvmm needs.
pub fn check_capabilities(kvm: &Kvm) -> Result<()> {
    if kvm.get_api_version() != 12 {
        return Err(Error::KvmCapability("the stable API (version 12)"));
    }
    for (cap, what) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(Error::KvmCapability(what));
        }
    }
    Ok(())
}

/// Most vCPUs this host allows (KVM's limit and 254 xAPIC ids).
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    let kvm_max = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
    kvm_max.min(u32::from(MAX_VCPUS))
}

/// Checks a vCPU count against this host.
pub fn check_vcpus(kvm: &Kvm, cpus: u32) -> Result<()> {
    let max = max_vcpus(kvm);
    if cpus == 0 {
        Err(Error::NoCpus)
    } else if cpus > max {
        Err(Error::TooManyCpus {
            requested: cpus,
            max,
        })
    } else {
        Ok(())
    }
}

/// Allocates guest RAM for `mem_size` bytes laid out by `resources`.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap> {
    let regions = resources::ram_regions(mem_size).map_err(Error::Memory)?;
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|r| {
            usize::try_from(r.size)
                .map(|s| (GuestAddress(r.start), s))
                .map_err(|_| {
                    Error::Memory(resources::Error::MemoryTooLarge {
                        size: mem_size,
                        max: layout::MAX_MEMORY,
                    })
                })
        })
        .collect::<Result<_>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::GuestMemory(mem_size, e))
}

/// Creates the VM: `before_memory` (the MSR filter), identity map and TSS,
/// the memory slots for `memory`, then the split irqchip (in-kernel LAPICs,
/// GSIs 0-23 reserved for the user-space IOAPIC's pins).
///
/// The order matters for start-up time: on this machine's KVM, every memory
/// slot added after the irqchip waits for an SRCU grace period (about 10 ms
/// for a 512 MiB VM), against 0.5 ms before it; and KVM_X86_SET_MSR_FILTER
/// (a synchronize_srcu) takes about 15 ms once memory slots exist, against
/// well under 1 ms on a VM that has never had one. A split irqchip starts
/// with an empty GSI routing table; [`IrqRouting`] sends the first
/// KVM_SET_GSI_ROUTING when the guest unmasks an IOAPIC pin or a device
/// asks for an MSI route.
pub fn create_vm(
    kvm: &Kvm,
    memory: &GuestMemoryMmap,
    before_memory: impl FnOnce(&VmFd) -> Result<()>,
) -> Result<VmFd> {
    let vm = kvm.create_vm().map_err(|e| Error::Kvm("VM creation", e))?;
    before_memory(&vm)?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
        .map_err(|e| Error::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.set_tss_address(usize::try_from(layout::KVM_TSS_START).unwrap_or(usize::MAX))
        .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| Error::GuestWrite("the memory slot table", e))?;
        let mr = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the
        // VMM keeps for as long as the VM exists; KVM only accesses it as
        // guest RAM, never as Rust objects.
        #[allow(unsafe_code)]
        let r = unsafe { vm.set_user_memory_region(mr) };
        r.map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    let mut split = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    split.args[0] = u64::from(layout::IOAPIC_PINS);
    vm.enable_cap(&split)
        .map_err(|e| Error::Kvm("KVM_CAP_SPLIT_IRQCHIP", e))?;
    Ok(vm)
}

/// Why a route could not be set.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The IOAPIC has no such pin.
    #[error("IOAPIC pin {0} does not exist")]
    NoSuchPin(u32),
    /// MSI routes use the GSIs above the IOAPIC's pins.
    #[error("GSI {0} is an IOAPIC pin's, not an MSI route's")]
    PinGsi(u32),
    /// More routes than KVM's table holds.
    #[error("The GSI routing table has too many entries for KVM")]
    TooManyRoutes(#[source] vmm_sys_util::fam::Error),
    /// KVM refused the table.
    #[error("KVM KVM_SET_GSI_ROUTING failed")]
    Set(#[source] kvm_ioctls::Error),
}

/// The GSI routing table: the IOAPIC pins' routes (GSI = pin, set by the
/// user-space IOAPIC from its redirection entries) and the MSI routes of
/// irqfd-driven devices (GSIs from `SystemAllocator::msi_gsis`).
/// KVM_SET_GSI_ROUTING replaces the whole table, so every change sends it
/// all; a change that changes nothing sends nothing.
#[derive(Debug, Default)]
pub struct IrqRouting {
    pins: [Option<MsiMessage>; layout::IOAPIC_PINS as usize],
    msi: Vec<(u32, MsiMessage)>,
    /// Tables sent to KVM so far.
    commits: u64,
}

fn msi_route(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    // Truncation intended: the two halves of the address.
    #[allow(clippy::cast_possible_truncation)]
    {
        e.u.msi.address_lo = m.address as u32;
        e.u.msi.address_hi = (m.address >> 32) as u32;
    }
    e.u.msi.data = m.data;
    e
}

impl IrqRouting {
    /// No routes (KVM's table for a split irqchip starts empty).
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let pins = (0..layout::IOAPIC_PINS)
            .zip(self.pins.iter())
            .filter_map(|(gsi, m)| m.map(|m| msi_route(gsi, m)));
        let msi = self.msi.iter().map(|&(gsi, m)| msi_route(gsi, m));
        pins.chain(msi).collect()
    }

    /// How many times the table went to KVM (each is one KVM_SET_GSI_ROUTING
    /// of the whole table).
    pub fn commits(&self) -> u64 {
        self.commits
    }

    fn commit(&mut self, vm: &VmFd) -> std::result::Result<(), RoutingError> {
        self.commits += 1;
        let routing =
            KvmIrqRouting::from_entries(&self.entries()).map_err(RoutingError::TooManyRoutes)?;
        vm.set_gsi_routing(&routing).map_err(RoutingError::Set)
    }

    /// Routes IOAPIC pin `pin` (GSI `pin`) to `msi`, or removes its route.
    pub fn set_pin_route(
        &mut self,
        vm: &VmFd,
        pin: u32,
        msi: Option<MsiMessage>,
    ) -> std::result::Result<(), RoutingError> {
        let Some(slot) = self.pins.get_mut(pin as usize) else {
            return Err(RoutingError::NoSuchPin(pin));
        };
        if *slot == msi {
            return Ok(());
        }
        let old = std::mem::replace(slot, msi);
        self.commit(vm)
            .inspect_err(|_| self.pins[pin as usize] = old)
    }

    /// Routes `gsi` (from `SystemAllocator::msi_gsis`) to the MSI
    /// `address`/`data`, replacing any route it had. Pair it with an irqfd
    /// (`VmFd::register_irqfd`) so that the kernel delivers it.
    pub fn set_msi_route(
        &mut self,
        vm: &VmFd,
        gsi: u32,
        address: u64,
        data: u32,
    ) -> std::result::Result<(), RoutingError> {
        if gsi < layout::IOAPIC_PINS {
            return Err(RoutingError::PinGsi(gsi));
        }
        let route = (gsi, MsiMessage { address, data });
        if self.msi.contains(&route) {
            // The guest rewrote what it had: nothing for KVM.
            return Ok(());
        }
        let old = self.msi.clone();
        self.msi.retain(|r| r.0 != gsi);
        self.msi.push(route);
        self.commit(vm).inspect_err(|_| self.msi = old)
    }

    /// Removes the MSI route of `gsi`.
    pub fn remove_msi_route(
        &mut self,
        vm: &VmFd,
        gsi: u32,
    ) -> std::result::Result<(), RoutingError> {
        if !self.msi.iter().any(|r| r.0 == gsi) {
            return Ok(());
        }
        let old = self.msi.clone();
        self.msi.retain(|r| r.0 != gsi);
        self.commit(vm).inspect_err(|_| self.msi = old)
    }
}

/// The IOAPIC's pin routes, in the VM's GSI routing table.
pub struct KvmPinRoutes {
    vm: Arc<VmFd>,
    routing: SharedIrqRouting,
}

impl KvmPinRoutes {
    /// Pin routes of `vm`, kept in `routing`.
    pub fn new(vm: Arc<VmFd>, routing: SharedIrqRouting) -> Self {
        Self { vm, routing }
    }
}

impl PinRoutes for KvmPinRoutes {
    fn route_pin(&mut self, pin: u32, msi: Option<MsiMessage>) -> io::Result<()> {
        let mut routing = devices::lock::mutex(&self.routing);
        routing
            .set_pin_route(&self.vm, pin, msi)
            .map_err(io::Error::other)
    }
}

/// Delivers MSIs from emulated devices with KVM_SIGNAL_MSI.
#[derive(Debug, Clone)]
pub struct KvmMsiSink {
    vm: Arc<VmFd>,
}

impl KvmMsiSink {
    /// A sink for `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl devices::interrupt::MsiSink for KvmMsiSink {
    // Truncation intended: the two halves of the address.
    #[allow(clippy::cast_possible_truncation)]
    fn signal_msi(&self, address: u64, data: u32) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            // 0: the guest masked it. Not an error either: KVM returns -1
            // (seen as EPERM) when no vCPU is a destination of the message,
            // which the guest controls.
            Ok(_) => Ok(()),
            Err(e) if e.errno() == libc::EPERM => Ok(()),
            Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
}

/// Shared, lockable routing table.
pub type SharedIrqRouting = Arc<Mutex<IrqRouting>>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msi(address: u64, data: u32) -> MsiMessage {
        MsiMessage { address, data }
    }

    #[test]
    fn routing_table_has_pins_then_msi_routes() {
        let mut r = IrqRouting::new();
        assert!(r.entries().is_empty());
        r.pins[4] = Some(msi(0xfee0_0000, 0x24));
        r.pins[9] = Some(msi(0xfee0_1004, 0xc041));
        r.msi.push((24, msi(0xfee0_0000, 0x41)));
        let got: Vec<(u32, u32, u32, u32, u32)> = r
            .entries()
            .iter()
            .map(|e| {
                #[allow(unsafe_code)]
                // SAFETY: every entry is an MSI route, written through `u.msi`.
                let m = unsafe { e.u.msi };
                (e.gsi, e.type_, m.address_lo, m.address_hi, m.data)
            })
            .collect();
        let t = KVM_IRQ_ROUTING_MSI;
        assert_eq!(
            got,
            vec![
                (4, t, 0xfee0_0000, 0, 0x24),
                (9, t, 0xfee0_1004, 0, 0xc041),
                (24, t, 0xfee0_0000, 0, 0x41),
            ]
        );
    }
}

/// Tests that need /dev/kvm.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod kvm_tests {
    use super::*;

    fn msi(address: u64, data: u32) -> MsiMessage {
        MsiMessage { address, data }
    }

    #[test]
    fn vcpu_limits_follow_kvm() {
        let kvm = open_kvm().unwrap();
        check_capabilities(&kvm).unwrap();
        let max = max_vcpus(&kvm);
        assert!((1..=u32::from(MAX_VCPUS)).contains(&max));
        assert!(u32::try_from(kvm.get_max_vcpus()).unwrap() >= max);
        check_vcpus(&kvm, 1).unwrap();
        check_vcpus(&kvm, max).unwrap();
        match check_vcpus(&kvm, max + 1) {
            Err(Error::TooManyCpus { requested, max: m }) => {
                assert_eq!((requested, m), (max + 1, max));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(check_vcpus(&kvm, 0), Err(Error::NoCpus)));
    }

    #[test]
    fn vm_with_memory_above_4_gib() {
        let kvm = open_kvm().unwrap();
        let mem = create_guest_memory(5 << 30).unwrap();
        let vm = create_vm(&kvm, &mem, |_| Ok(())).unwrap();
        let mut routing = IrqRouting::new();
        routing.set_msi_route(&vm, 24, 0xfee0_0000, 0x30).unwrap();
        routing.set_msi_route(&vm, 24, 0xfee0_1000, 0x31).unwrap();
        assert_eq!(routing.msi, vec![(24, msi(0xfee0_1000, 0x31))]);
        assert_eq!(routing.commits(), 2);
        // A guest that rewrites an MSI-X entry with what it holds (in a
        // loop, say) costs no KVM_SET_GSI_ROUTING.
        for _ in 0..1000 {
            routing.set_msi_route(&vm, 24, 0xfee0_1000, 0x31).unwrap();
        }
        assert_eq!(routing.commits(), 2, "unchanged routes went to KVM");
        assert!(routing.set_msi_route(&vm, 4, 0xfee0_0000, 0x30).is_err());
        routing.remove_msi_route(&vm, 24).unwrap();
        assert!(routing.msi.is_empty());
        routing.remove_msi_route(&vm, 24).unwrap();
        assert_eq!(routing.commits(), 3, "removing no route sends nothing");
        // IOAPIC pins: routed, unrouted, a pin that does not exist.
        routing
            .set_pin_route(&vm, 4, Some(msi(0xfee0_0000, 0x24)))
            .unwrap();
        assert_eq!(routing.pins[4], Some(msi(0xfee0_0000, 0x24)));
        routing.set_pin_route(&vm, 4, None).unwrap();
        assert_eq!(routing.pins[4], None);
        assert!(routing.set_pin_route(&vm, 24, None).is_err());
        let sink = KvmMsiSink::new(Arc::new(vm));
        // No vCPU has the vector enabled: delivered nowhere, but not an error.
        devices::interrupt::MsiSink::signal_msi(&sink, 0xfee0_0000, 0x30).unwrap();
    }

    #[test]
    fn missing_memory_size_checks() {
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(Error::Memory(resources::Error::MemoryTooSmall { .. }))
        ));
    }
}
