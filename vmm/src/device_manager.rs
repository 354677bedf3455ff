//! The VM's devices: the port-I/O and MMIO buses, COM1, the i8042, the ACPI
//! sleep registers, the PCI root (0xCF8 and ECAM), and the way to plug PCI
//! devices in at boot or at run time.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::sync::{Arc, Mutex};

use api::PciBus;
use devices::acpi_hotplug::{AcpiHotplug, HOTPLUG_PORT, HOTPLUG_SIZE};
use devices::bus::{Bus, BusDevice, SharedBusDevice};
use devices::interrupt::MsiSink;
use devices::ioapic::Ioapic;
use devices::legacy::{AcpiSleep, EventFdTrigger, ExitEvents, Serial, SerialOutput, I8042};
use devices::pci::{PciAddress, PciConfigIo, PciConfigMmio, PciDevice, PciRoot};
use kvm_ioctls::VmFd;
use resources::layout::{self, pio};
use resources::{BarKind, ErrorChain, SystemAllocator};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use iommu::Iommu;

use crate::config::SerialConfig;
use crate::error::{Error, Result};
use crate::kvm::{IrqRouting, KvmMsiSink, KvmPinRoutes, SharedIrqRouting};

/// An id pool that devices' hooks draw from while the VM runs.
pub type SharedIdPool = Arc<Mutex<resources::IdPool>>;

mod lifecycle;

pub use lifecycle::{pci_function_path, DeviceError, Plugged};

/// Every device of a VM and the resources they use: the platform devices,
/// and the table of pluggable PCI devices whose whole life it owns
/// (`lifecycle`: add, remove, list).
pub struct DeviceManager {
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    /// PCI bus 0.
    pci: Arc<Mutex<PciRoot>>,
    /// Address, GSI, slot and id allocators.
    allocator: SystemAllocator,
    serial: Arc<Mutex<Serial>>,
    exit_events: ExitEvents,
    /// GSI routing: the IOAPIC's pin routes and the MSI routes of
    /// irqfd-driven devices.
    irq_routing: SharedIrqRouting,
    /// KVM memory slot numbers for device memory (VFIO BAR mappings); RAM
    /// uses the first ones. Shared with the devices' [`crate::vfio`] hooks.
    kvm_slots: SharedIdPool,
    /// GSIs for MSI routes (above the IOAPIC pins), shared likewise.
    msi_gsis: SharedIdPool,
    /// ACPI PCI hotplug registers and GED events (see `crate::hotplug`).
    hotplug: Arc<Mutex<AcpiHotplug>>,
    /// The GED's interrupt (an IOAPIC pin, level-triggered, active high).
    hotplug_gsi: u32,
    /// Signalled when the guest ejects a slot (`AcpiHotplug::take_ejected`).
    hotplug_eject: EventFd,
    /// The GED's irqfd (kept registered for the VM's lifetime).
    _hotplug_irq: EventFd,
    /// BAR space allocated per PCI slot, freed on removal.
    pci_bars: HashMap<u8, Vec<(u64, u64, BarKind)>>,
    vm: Arc<VmFd>,
    memory: Arc<GuestMemoryMmap>,
    msi: Arc<KvmMsiSink>,
    /// COM1's irqfd (kept registered for the VM's lifetime).
    _serial_irq: EventFd,
    /// The VM's IOMMU, which every pluggable device is registered with.
    iommu: Arc<Iommu>,
    /// Whether the guest sees the pvIOMMU (the default mode of devices).
    pviommu: bool,
    /// The pluggable devices.
    table: lifecycle::Table,
    /// VMBus, for devices on vPCI buses.
    vmbus: Option<Arc<crate::vmbus::VmBus>>,
    /// Where a device whose request names no bus goes.
    default_bus: PciBus,
    /// The VM's vCPUs (vPCI interrupt targets).
    vcpus: u32,
    /// Guest RAM in bytes (where VMBus's windows are).
    mem_size: u64,
    /// vPCI buses plugged so far (each gets its own instance GUID).
    vpci_generation: u32,
    /// What the guest ejected over vPCI.
    vpci_ejections: Arc<crate::vpci::Ejections>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("pio_bus", &self.pio_bus)
            .field("mmio_bus", &self.mmio_bus)
            .finish_non_exhaustive()
    }
}

fn serial_output(cfg: &SerialConfig) -> Result<SerialOutput> {
    Ok(match cfg {
        SerialConfig::Stdout => Box::new(io::stdout()),
        SerialConfig::Off => Box::new(io::sink()),
        SerialConfig::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(p)
                .map_err(|e| Error::SerialFile(p.clone(), e))?,
        ),
    })
}

/// The last user memory slot number KVM accepts on x86 (32764 slots).
const KVM_MAX_USER_SLOT: u32 = 32763;

/// Puts `device` (`what`, for the error) on `bus` at `base..base + len`.
fn place(
    bus: &Bus,
    what: &'static str,
    device: SharedBusDevice,
    base: u64,
    len: u64,
) -> Result<()> {
    bus.insert(device, base, len)
        .map_err(|e| Error::Device(what, e))
}

fn evt(what: &'static str) -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io(what, e))
}

impl DeviceManager {
    /// Creates the platform devices of a VM with `mem_size` bytes of RAM,
    /// whose pluggable devices register with `iommu` (which the guest sees
    /// when `pviommu` is set).
    pub fn new(
        vm: Arc<VmFd>,
        memory: Arc<GuestMemoryMmap>,
        mem_size: u64,
        serial: &SerialConfig,
        iommu: Arc<Iommu>,
        pviommu: bool,
    ) -> Result<Self> {
        let pio_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let mut allocator = SystemAllocator::new(mem_size).map_err(Error::Memory)?;
        let irq_routing: SharedIrqRouting = Arc::new(Mutex::new(IrqRouting::new()));
        let ioapic = Ioapic::new(Box::new(KvmPinRoutes::new(vm.clone(), irq_routing.clone())));
        place(
            &mmio_bus,
            "the IOAPIC",
            Arc::new(Mutex::new(ioapic)),
            layout::IOAPIC_START,
            layout::IOAPIC_SIZE,
        )?;
        let exit_events = ExitEvents::new().map_err(|e| Error::Io("exit events", e))?;

        let serial_irq = evt("the serial interrupt")?;
        vm.register_irqfd(&serial_irq, pio::COM1_GSI)
            .map_err(|e| Error::Kvm("KVM_IRQFD (COM1)", e))?;
        let trigger =
            EventFdTrigger::try_clone_from(&serial_irq).map_err(|e| Error::Io("an event fd", e))?;
        let serial_dev = Arc::new(Mutex::new(Serial::new(trigger, serial_output(serial)?)));
        place(
            &pio_bus,
            "COM1",
            serial_dev.clone(),
            u64::from(pio::COM1_START),
            u64::from(pio::COM1_SIZE),
        )?;

        let reset = EventFdTrigger::try_clone_from(&exit_events.reset)
            .map_err(|e| Error::Io("an event fd", e))?;
        place(
            &pio_bus,
            "the i8042",
            Arc::new(Mutex::new(I8042::new(reset))),
            u64::from(pio::I8042_START),
            u64::from(pio::I8042_SIZE),
        )?;

        place(
            &pio_bus,
            "the CMOS RTC",
            Arc::new(Mutex::new(devices::cmos::Cmos::new())),
            u64::from(pio::CMOS_START),
            u64::from(pio::CMOS_SIZE),
        )?;

        let acpi_events = exit_events
            .try_clone()
            .map_err(|e| Error::Io("an event fd", e))?;
        place(
            &pio_bus,
            "the ACPI sleep registers",
            Arc::new(Mutex::new(AcpiSleep::new(acpi_events))),
            u64::from(layout::ACPI_SLEEP_PORT),
            u64::from(layout::ACPI_SLEEP_SIZE),
        )?;

        let pci = Arc::new(Mutex::new(PciRoot::new(mmio_bus.clone(), pio_bus.clone())));
        place(
            &pio_bus,
            "PCI configuration ports",
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            u64::from(pio::PCI_CONFIG_START),
            u64::from(pio::PCI_CONFIG_SIZE),
        )?;
        place(
            &mmio_bus,
            "PCI ECAM",
            Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
        )?;

        let hotplug_gsi = allocator.ioapic_pins.allocate().map_err(Error::Resource)?;
        let hotplug_irq = evt("the hotplug interrupt")?;
        vm.register_irqfd(&hotplug_irq, hotplug_gsi)
            .map_err(|e| Error::Kvm("KVM_IRQFD (GED)", e))?;
        let hotplug_eject = evt("the hotplug eject event")?;
        let vpci_ejections = Arc::new(crate::vpci::Ejections::new(
            hotplug_eject
                .try_clone()
                .map_err(|e| Error::Io("an event fd", e))?,
        ));
        let hotplug = Arc::new(Mutex::new(AcpiHotplug::new(
            EventFdTrigger::try_clone_from(&hotplug_irq)
                .map_err(|e| Error::Io("an event fd", e))?,
            hotplug_eject
                .try_clone()
                .map_err(|e| Error::Io("an event fd", e))?,
        )));
        place(
            &pio_bus,
            "the PCI hotplug registers",
            hotplug.clone(),
            u64::from(HOTPLUG_PORT),
            u64::from(HOTPLUG_SIZE),
        )?;

        let msi = Arc::new(KvmMsiSink::new(vm.clone()));
        let ram_slots = u32::try_from(memory.num_regions()).unwrap_or(u32::MAX);
        let pool = |name, first, last| {
            resources::IdPool::new(name, first, last)
                .map(|p| Arc::new(Mutex::new(p)))
                .map_err(Error::Resource)
        };
        Ok(Self {
            kvm_slots: pool("KVM memory slot", ram_slots, KVM_MAX_USER_SLOT)?,
            msi_gsis: pool(
                "MSI GSI",
                resources::alloc::MSI_GSI_START,
                resources::alloc::MSI_GSI_LAST,
            )?,
            pio_bus,
            mmio_bus,
            pci,
            allocator,
            serial: serial_dev,
            exit_events,
            irq_routing,
            hotplug,
            hotplug_gsi,
            hotplug_eject,
            _hotplug_irq: hotplug_irq,
            pci_bars: HashMap::new(),
            vm,
            memory,
            msi,
            _serial_irq: serial_irq,
            iommu,
            pviommu,
            table: lifecycle::Table::default(),
            vmbus: None,
            default_bus: PciBus::Root,
            vcpus: 1,
            mem_size,
            vpci_generation: 0,
            vpci_ejections,
        })
    }

    /// Lets devices sit on vPCI buses offered over `vmbus`, interrupting
    /// `vcpus` vCPUs. Before the first device is added.
    pub fn set_vmbus(&mut self, vmbus: Arc<crate::vmbus::VmBus>, vcpus: u32) {
        self.vmbus = Some(vmbus);
        self.vcpus = vcpus;
    }

    /// Where a device whose request names no bus goes (the VM's
    /// `pci_bus`); the ordinary root until set.
    pub fn set_default_bus(&mut self, bus: PciBus) {
        self.default_bus = bus;
    }

    /// The port-I/O bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio_bus
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// COM1 (for the console's input).
    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }

    /// Reset and poweroff events raised by devices.
    pub fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    /// The GED's interrupt (for the DSDT).
    pub fn hotplug_gsi(&self) -> u32 {
        self.hotplug_gsi
    }

    /// Signalled when the guest ejects a slot ([`DeviceManager::take_ejected`]).
    pub fn hotplug_eject(&self) -> &EventFd {
        &self.hotplug_eject
    }

    /// The VM's GSI routing table.
    pub(crate) fn irq_routing(&self) -> &SharedIrqRouting {
        &self.irq_routing
    }

    /// The pool of GSIs for MSI routes.
    pub(crate) fn msi_gsis(&self) -> &SharedIdPool {
        &self.msi_gsis
    }

    /// The pool of KVM memory slot numbers for device memory.
    pub(crate) fn kvm_slots(&self) -> &SharedIdPool {
        &self.kvm_slots
    }

    /// Plugs a PCI device into `slot` (or the first free slot), after giving
    /// each of its BARs an address from the allocators; `hidden` keeps it
    /// from the root's configuration mechanisms (for a vPCI bus). Returns
    /// its address. The guest enables decoding (and may move the BARs)
    /// itself.
    pub fn add_pci_device<T>(
        &mut self,
        dev: Arc<Mutex<T>>,
        slot: Option<u8>,
        hidden: bool,
    ) -> Result<PciAddress>
    where
        T: PciDevice + BusDevice + 'static,
    {
        let slot = match slot {
            Some(s) => {
                self.allocator
                    .reserve_pci_slot(s)
                    .map_err(Error::Resource)?;
                s
            }
            None => self
                .allocator
                .allocate_pci_slot()
                .map_err(Error::Resource)?,
        };
        let mut bars: Vec<(u64, u64, BarKind)> = Vec::new();
        let result = (|| {
            let declared = devices::lock::mutex(&dev).declared_bars();
            for (index, size, kind) in declared {
                // Memory BARs get at least a page so KVM can map them.
                let alloc_size = match kind {
                    BarKind::Io => size,
                    _ => size.max(layout::PAGE_SIZE),
                };
                let addr = self
                    .allocator
                    .allocate_bar(alloc_size, kind)
                    .map_err(Error::Resource)?;
                bars.push((addr, alloc_size, kind));
                devices::lock::mutex(&dev)
                    .set_bar_address(index, addr)
                    .map_err(Error::Pci)?;
            }
            let pci_dev: Arc<Mutex<dyn PciDevice>> = dev.clone();
            let bus_dev: SharedBusDevice = dev.clone();
            // Hidden in the same critical section: the guest's ECAM never
            // sees a device meant for a vPCI bus.
            let mut root = devices::lock::mutex(&self.pci);
            let addr = root
                .add_device(slot, pci_dev, bus_dev)
                .map_err(Error::Pci)?;
            if hidden {
                if let Err(e) = root.set_hidden(slot, true) {
                    let _ = root.remove_device(slot);
                    return Err(Error::Pci(e));
                }
            }
            Ok(addr)
        })();
        match result {
            Ok(a) => {
                self.pci_bars.insert(slot, bars);
                Ok(a)
            }
            Err(e) => {
                for (addr, size, kind) in bars {
                    let _ = self.allocator.free_bar(addr, size, kind);
                }
                let _ = self.allocator.free_pci_slot(slot);
                Err(e)
            }
        }
    }

    /// Unplugs the PCI device in `slot` and frees its slot and the BAR
    /// space allocated for it.
    pub fn remove_pci_device(&mut self, slot: u8) -> Result<Arc<Mutex<dyn PciDevice>>> {
        let dev = devices::lock::mutex(&self.pci)
            .remove_device(slot)
            .map_err(Error::Pci)?;
        for (addr, size, kind) in self.pci_bars.remove(&slot).unwrap_or_default() {
            if let Err(e) = self.allocator.free_bar(addr, size, kind) {
                log::error!(
                    "freeing BAR space {addr:#x}+{size:#x} of slot {slot}: {}",
                    ErrorChain(&e)
                );
            }
        }
        if let Err(e) = self.allocator.free_pci_slot(slot) {
            log::error!("freeing PCI slot {slot}: {}", ErrorChain(&e));
        }
        Ok(dev)
    }

    /// Delivers MSIs for emulated devices (KVM_SIGNAL_MSI).
    pub fn msi_sink(&self) -> Arc<dyn MsiSink> {
        self.msi.clone()
    }

    /// The VM (for irqfds, KVM memory slots of VFIO BARs, KVM devices).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.memory
    }
}
