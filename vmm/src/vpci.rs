//! Hyper-V virtual PCI buses (issue 13): where Linux's pvIOMMU driver
//! manages a device.
//!
//! A device on vPCI (`bus=vpci`, or no bus with `--pci-bus vpci`, the
//! default with VMBus and `--kernel`) sits on a vPCI bus of its own, as
//! Hyper-V presents an assigned device: a VMBus channel of class
//! [`vmbus::abi::VPCI_INTERFACE_TYPE`] whose instance GUID
//! ([`instance_guid`]) names the bus, served by [`vmbus::vpci::Vpci`].
//! Linux's pci-hyperv makes a PCI domain of it and registers the bus's
//! logical device id prefix with the pvIOMMU driver, which then manages
//! the device under the logical id `prefix | function`
//! ([`iommu::DeviceId::logical_vpci`]): the id pvmm registers the device
//! under.
//!
//! The device itself stays in the device manager's PCI root, hidden from
//! its configuration mechanisms ([`devices::pci::PciRoot::set_hidden`]):
//! the root keeps mapping its BARs wherever the guest programs them, and
//! its configuration space is reached through the bus's config window,
//! which the guest places in VMBus's MMIO window at D0 entry
//! ([`VpciFunction::set_config_window`]). Its MSI-X messages are the x86
//! messages the vPCI server composes, so they reach the guest as they are.
//!
//! Hot add offers a new bus (VMBus sends the offer at once); removal asks
//! the guest to eject the function (PCI_EJECT), and once it did
//! (PCI_EJECTION_COMPLETE: [`Ejections`]) or the eject timeout passed, the
//! device manager blocks the device's DMA, rescinds the bus's offer and
//! unplugs the device.
//!
//! Not yet: retargeting an interrupt to another vector or VP than the one
//! it was created for ([`vmbus::vpci::Vpci::translate`] is not applied to
//! the device's messages).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use devices::bus::{Bus, BusDevice, SharedBusDevice};
use devices::pci::PciRoot;
use resources::layout;
use resources::BarKind;
use vmbus::abi::vpci::WinSlot;
use vmbus::abi::Guid;
use vmbus::vpci::{Function, Vpci, VpciFunctions};

/// pci-hyperv's config window: a page to select the function, a page of
/// its configuration space.
const WINDOW_SIZE: u64 = 0x2000;

/// The PCI domain Linux gives the vPCI bus of the device in root slot
/// `slot` (from [`instance_guid`]'s bytes 4 and 5).
pub fn domain(slot: u8) -> u16 {
    0x5600 | u16::from(slot)
}

/// The instance GUID of the vPCI bus of the device in root slot `slot`,
/// the `generation`th bus pvmm made. Linux takes the bus's PCI domain from
/// bytes 4 and 5 (here `0x5600 | slot`: never 0, never the root's, one per
/// slot) and the logical device id prefix from bytes 4 to 7: the
/// generation's low 13 bits go in bytes 6 and 7 (byte 6's low 3 bits are
/// the function's in the id), so a bus and the one that replaces it in a
/// slot differ in instance and in logical id while the guest may still
/// hold the old one.
pub fn instance_guid(slot: u8, generation: u32) -> Guid {
    let g = generation.to_be_bytes();
    // The casts keep the generation's low bits on purpose.
    #[allow(clippy::cast_possible_truncation)]
    let (b6, b7) = (((generation & 0x1f) << 3) as u8, (generation >> 5) as u8);
    Guid([
        0x70, 0x76, 0x6d, 0x6d, // "pvmm"
        slot, 0x56, b6, b7, // domain(slot); prefix 0x56SS_gggg
        0x76, 0x70, 0x63, 0x69, g[0], g[1], g[2], g[3],
    ])
}

/// The pvIOMMU's name (logical id) of the device of `instance`'s vPCI bus
/// (its function 0).
pub fn logical_id(instance: &Guid) -> iommu::DeviceId {
    iommu::DeviceId::logical_vpci(&instance.0, 0)
}

/// The slots whose vPCI device the guest ejected (PCI_EJECTION_COMPLETE),
/// and the event that tells the VMM's event loop (the ACPI hotplug's eject
/// event: the removals of both kinds end on it).
#[derive(Debug)]
pub struct Ejections {
    slots: AtomicU32,
    event: EventFd,
}

impl Ejections {
    /// Ejections signalled on `event`.
    pub fn new(event: EventFd) -> Self {
        Self {
            slots: AtomicU32::new(0),
            event,
        }
    }

    /// The slots ejected since the last call (bit n: slot n).
    pub fn take(&self) -> u32 {
        self.slots.swap(0, Ordering::AcqRel)
    }

    /// Slot `slot`'s device is ejected (or the guest never had it).
    pub fn ejected(&self, slot: u8) {
        self.slots.fetch_or(1 << (slot % 32), Ordering::AcqRel);
        if let Err(e) = self.event.write(1) {
            log::error!("vPCI: cannot signal the ejection of slot {slot}: {e}");
        }
    }
}

/// The one function of a device's vPCI bus: the device in root slot
/// `slot`, at the bus's slot 0.
pub struct VpciFunction {
    root: Arc<Mutex<PciRoot>>,
    slot: u8,
    mmio_bus: Arc<Bus>,
    mem_size: u64,
    /// Where the guest put the config window, once mapped.
    window: Mutex<Option<u64>>,
    /// The window's device (the bus's server), set once it exists and
    /// dropped when the bus goes ([`VpciFunction::detach`]): it holds the
    /// server, which holds this function.
    window_dev: Mutex<Option<SharedBusDevice>>,
    /// Where the guest's ejection goes.
    ejections: Arc<Ejections>,
}

impl std::fmt::Debug for VpciFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VpciFunction")
            .field("slot", &self.slot)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl VpciFunction {
    /// The function for the (hidden) device in root slot `slot`; its
    /// config window goes on `mmio_bus`, inside VMBus's windows for
    /// `mem_size` bytes of RAM; its ejection is told to `ejections`.
    pub fn new(
        root: Arc<Mutex<PciRoot>>,
        slot: u8,
        mmio_bus: Arc<Bus>,
        mem_size: u64,
        ejections: Arc<Ejections>,
    ) -> Self {
        Self {
            root,
            slot,
            mmio_bus,
            mem_size,
            window: Mutex::new(None),
            window_dev: Mutex::new(None),
            ejections,
        }
    }

    /// The bus: the server for this function, with its config window.
    pub fn bus(self, vcpus: u32) -> Vpci<Self> {
        let function = Arc::new(self);
        let vpci = Vpci::new(function.clone(), vcpus);
        let window: SharedBusDevice = Arc::new(Mutex::new(ConfigWindow(vpci.clone())));
        *devices::lock::mutex(&function.window_dev) = Some(window);
        vpci
    }

    /// The bus goes: its window is unmapped and its device dropped (which
    /// frees the server).
    pub fn detach(&self) {
        let _ = self.set_config_window(None);
        devices::lock::mutex(&self.window_dev).take();
    }

    fn read32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        devices::lock::mutex(&self.root).vpci_config_read(self.slot, offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Whether `base..base + WINDOW_SIZE` lies in one of VMBus's windows.
    fn in_vmbus_window(&self, base: u64) -> bool {
        let inside = |start: u64, size: u64| {
            base >= start
                && base
                    .checked_add(WINDOW_SIZE)
                    .is_some_and(|end| end <= start + size)
        };
        inside(layout::VMBUS_MMIO32_START, layout::VMBUS_MMIO32_SIZE)
            || layout::vmbus_mmio64_window(self.mem_size).is_ok_and(|(s, l)| inside(s, l))
    }
}

impl VpciFunctions for VpciFunction {
    fn functions(&self) -> Vec<Function> {
        let ids = self.read32(0x00);
        let class = self.read32(0x08);
        let subsystem = self.read32(0x2c);
        // Identity fields: the casts keep the bytes on purpose.
        #[allow(clippy::cast_possible_truncation)]
        let function = Function {
            slot: WinSlot::new(),
            vendor_id: ids as u16,
            device_id: (ids >> 16) as u16,
            revision: class as u8,
            prog_if: (class >> 8) as u8,
            subclass: (class >> 16) as u8,
            class: (class >> 24) as u8,
            subsystem_id: subsystem,
            serial: u32::from(self.slot),
        };
        vec![function]
    }

    fn probed_bars(&self, slot: WinSlot) -> Option<[u32; 6]> {
        if slot != WinSlot::new() {
            return None;
        }
        let dev = devices::lock::mutex(&self.root).device(self.slot)?;
        let declared = devices::lock::mutex(&dev).declared_bars();
        let mut bars = [0u32; 6];
        for (index, size, kind) in declared {
            // What a sizing read gives: the size's mask and the type bits.
            let reg = u16::try_from(0x10 + 4 * index).ok()?;
            let flags = self.read32(reg) & 0xf;
            let mask = !(size.max(16) - 1);
            // The halves of the 64-bit mask.
            #[allow(clippy::cast_possible_truncation)]
            match kind {
                BarKind::Mmio32 => *bars.get_mut(index)? = mask as u32 | flags,
                BarKind::Mmio64 => {
                    *bars.get_mut(index)? = mask as u32 | flags;
                    *bars.get_mut(index + 1)? = (mask >> 32) as u32;
                }
                // pci-hyperv has no I/O space: the BAR reads as absent.
                BarKind::Io => {}
            }
        }
        Some(bars)
    }

    fn config_read(&self, slot: WinSlot, offset: u16, data: &mut [u8]) {
        if slot == WinSlot::new() {
            devices::lock::mutex(&self.root).vpci_config_read(self.slot, offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn config_write(&self, slot: WinSlot, offset: u16, data: &[u8]) {
        if slot == WinSlot::new() {
            devices::lock::mutex(&self.root).vpci_config_write(self.slot, offset, data);
        }
    }

    fn set_config_window(&self, base: Option<u64>) -> bool {
        let mut window = devices::lock::mutex(&self.window);
        if let Some(old) = window.take() {
            let _ = self.mmio_bus.remove(old, WINDOW_SIZE);
        }
        let Some(base) = base else {
            return true;
        };
        let Some(dev) = devices::lock::mutex(&self.window_dev).clone() else {
            return false;
        };
        if !self.in_vmbus_window(base) {
            devices::guest_warn!(
                "vPCI slot {}: config window at {base:#x} is outside VMBus's MMIO windows",
                self.slot
            );
            return false;
        }
        match self.mmio_bus.insert(dev, base, WINDOW_SIZE) {
            Ok(()) => {
                *window = Some(base);
                true
            }
            Err(e) => {
                devices::guest_warn!(
                    "vPCI slot {}: config window at {base:#x} not mapped: {e}",
                    self.slot
                );
                false
            }
        }
    }

    fn ejected(&self, _slot: WinSlot) {
        self.ejections.ejected(self.slot);
    }
}

/// A vPCI bus's config window on the MMIO bus.
struct ConfigWindow(Vpci<VpciFunction>);

impl BusDevice for ConfigWindow {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.0.window_read(offset, data)
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.0.window_write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GUID's bytes give Linux's domain and the pvIOMMU prefix.
    #[test]
    fn instance_guids_name_one_domain_per_slot() {
        let g = instance_guid(3, 0);
        assert_eq!(u16::from(g.0[5]) << 8 | u16::from(g.0[4]), domain(3));
        assert_eq!(logical_id(&g), iommu::DeviceId::logical(0x5603_0000));
        assert_ne!(instance_guid(4, 0), g);
        // A later bus in the same slot: the same domain, another instance
        // and logical id (generation 33: 1 << 3 in byte 6, 1 in byte 7).
        let later = instance_guid(3, 33);
        assert_eq!(later.0[4..6], g.0[4..6]);
        assert_ne!(later, g);
        assert_eq!(logical_id(&later), iommu::DeviceId::logical(0x5603_0108));
    }
}
