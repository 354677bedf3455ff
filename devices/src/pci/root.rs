//! The root PCI bus (segment 0, bus 0), its host bridge, and the two
//! configuration mechanisms.

use std::sync::{Arc, Mutex};

use resources::BarKind;

use super::{
    check_config_access, PciAddress, PciBarRegion, PciConfiguration, PciDevice, PciError,
    PciHeader, CONFIG_SPACE_SIZE, LEGACY_CONFIG_SPACE_SIZE, SLOTS,
};
use crate::bus::{Bus, BusDevice, SharedBusDevice};
use crate::{guest_warn, lock};

/// Host bridge vendor (Intel) and device id, as Cloud Hypervisor uses.
const HOST_BRIDGE_VENDOR: u16 = 0x8086;
const HOST_BRIDGE_DEVICE: u16 = 0x0d57;

/// The host bridge at 00:00.0: identity only, no BARs.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    /// A host bridge (class 06, subclass 00).
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR,
                device_id: HOST_BRIDGE_DEVICE,
                class: 0x06,
                subclass: 0x00,
                ..Default::default()
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

impl BusDevice for HostBridge {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

struct Slot {
    dev: Arc<Mutex<dyn PciDevice>>,
    bus_dev: SharedBusDevice,
    mapped: Vec<PciBarRegion>,
    /// Behind a Hyper-V virtual PCI bus: absent from this bus's
    /// configuration mechanisms, configured through [`PciRoot::vpci_config_read`]
    /// and [`PciRoot::vpci_config_write`] (its BARs stay this bus's to map).
    hidden: bool,
}

/// Bus 0 of segment 0: up to 32 single-function devices, slot 0 being the
/// host bridge. Keeps every device's decoded BARs mapped on the MMIO and I/O
/// buses.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    mmio_bus: Arc<Bus>,
    io_bus: Arc<Bus>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("slots", &self.occupied_slots())
            .finish_non_exhaustive()
    }
}

impl PciRoot {
    /// A bus with the host bridge at slot 0, mapping BARs on `mmio_bus` and
    /// `io_bus`.
    pub fn new(mmio_bus: Arc<Bus>, io_bus: Arc<Bus>) -> Self {
        let mut root = Self {
            slots: (0..SLOTS).map(|_| None).collect(),
            mmio_bus,
            io_bus,
        };
        let bridge = Arc::new(Mutex::new(HostBridge::new()));
        root.slots[0] = Some(Slot {
            dev: bridge.clone(),
            bus_dev: bridge,
            mapped: Vec::new(),
            hidden: false,
        });
        root
    }

    /// Plugs `dev` into `slot`. `bus_dev` is the same device seen from the
    /// buses (BAR accesses); a device type `T: PciDevice + BusDevice` passes
    /// two clones of its `Arc<Mutex<T>>`. BARs the device already decodes are
    /// mapped at once.
    pub fn add_device(
        &mut self,
        slot: u8,
        dev: Arc<Mutex<dyn PciDevice>>,
        bus_dev: SharedBusDevice,
    ) -> Result<PciAddress, PciError> {
        let entry = self
            .slots
            .get_mut(usize::from(slot))
            .ok_or(PciError::InvalidSlot(slot))?;
        if entry.is_some() {
            return Err(PciError::SlotInUse(slot));
        }
        // Map what the device decodes from the start; refuse the device if
        // that is impossible (the VMM picked the addresses, so it is a bug
        // or a resource clash worth reporting).
        let regions = lock::mutex(&dev).bar_regions();
        let mut mapped = Vec::with_capacity(regions.len());
        for r in regions {
            if let Err(source) = self.bus_for(r.kind).insert(bus_dev.clone(), r.addr, r.size) {
                for m in &mapped {
                    let m: &PciBarRegion = m;
                    let _ = self.bus_for(m.kind).remove(m.addr, m.size);
                }
                return Err(PciError::MapBar {
                    index: r.index,
                    addr: r.addr,
                    source,
                });
            }
            mapped.push(r);
        }
        let moved: Vec<_> = mapped
            .iter()
            .map(|r| (r.index, None, Some(r.addr)))
            .collect();
        self.slots[usize::from(slot)] = Some(Slot {
            dev: dev.clone(),
            bus_dev,
            mapped,
            hidden: false,
        });
        let mut d = lock::mutex(&dev);
        for (index, old, new) in moved {
            d.bar_moved(index, old, new);
        }
        Ok(PciAddress::slot(slot))
    }

    /// The entry of `slot`, a slot a device may be plugged into (not the
    /// host bridge's, not past the bus).
    fn pluggable(&mut self, slot: u8) -> Result<&mut Option<Slot>, PciError> {
        if slot == 0 {
            return Err(PciError::InvalidSlot(slot));
        }
        self.slots
            .get_mut(usize::from(slot))
            .ok_or(PciError::InvalidSlot(slot))
    }

    /// Unplugs the device in `slot` (not the host bridge), unmapping its BARs.
    pub fn remove_device(&mut self, slot: u8) -> Result<Arc<Mutex<dyn PciDevice>>, PciError> {
        let s = self
            .pluggable(slot)?
            .take()
            .ok_or(PciError::SlotEmpty(slot))?;
        for r in &s.mapped {
            if let Err(e) = self.bus_for(r.kind).remove(r.addr, r.size) {
                guest_warn!("pci: unmapping BAR {} of slot {slot}: {e}", r.index);
            }
        }
        let mut d = lock::mutex(&s.dev);
        for r in &s.mapped {
            d.bar_moved(r.index, Some(r.addr), None);
        }
        drop(d);
        Ok(s.dev)
    }

    /// The device in `slot`.
    pub fn device(&self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.slots
            .get(usize::from(slot))?
            .as_ref()
            .map(|s| s.dev.clone())
    }

    /// Slots in use, in order (0 is the host bridge).
    pub fn occupied_slots(&self) -> Vec<u8> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .filter_map(|(i, _)| u8::try_from(i).ok())
            .collect()
    }

    /// The BARs of `slot` mapped on the buses now.
    pub fn mapped_bars(&self, slot: u8) -> Vec<PciBarRegion> {
        self.slots
            .get(usize::from(slot))
            .and_then(|s| s.as_ref())
            .map(|s| s.mapped.clone())
            .unwrap_or_default()
    }

    fn bus_for(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.io_bus,
            BarKind::Mmio32 | BarKind::Mmio64 => &self.mmio_bus,
        }
    }

    /// Hides the device in `slot` from this bus's configuration mechanisms
    /// (it moves behind a Hyper-V virtual PCI bus), or shows it again.
    pub fn set_hidden(&mut self, slot: u8, hidden: bool) -> Result<(), PciError> {
        let s = self
            .pluggable(slot)?
            .as_mut()
            .ok_or(PciError::SlotEmpty(slot))?;
        s.hidden = hidden;
        Ok(())
    }

    /// The slot at `addr` as the configuration mechanisms see it (a hidden
    /// device is absent), or the hidden device in slot `addr.device` for
    /// its virtual PCI bus.
    fn slot_of(&mut self, addr: PciAddress, vpci: bool) -> Option<&mut Slot> {
        if addr.bus != 0 || addr.function != 0 {
            return None;
        }
        self.slots
            .get_mut(usize::from(addr.device))?
            .as_mut()
            .filter(|s| s.hidden == vpci)
    }

    /// Configuration read; `offset` and `data.len()` must pass
    /// [`check_config_access`] for 4096 bytes (else all ones are returned).
    /// Absent (and hidden) functions read as all ones.
    pub fn config_read(&mut self, addr: PciAddress, offset: u16, data: &mut [u8]) {
        self.read(addr, offset, data, false)
    }

    /// Configuration read of the hidden device in `slot`, for its virtual
    /// PCI bus; as [`Self::config_read`] otherwise.
    pub fn vpci_config_read(&mut self, slot: u8, offset: u16, data: &mut [u8]) {
        self.read(PciAddress::slot(slot), offset, data, true)
    }

    fn read(&mut self, addr: PciAddress, offset: u16, data: &mut [u8], vpci: bool) {
        if !check_config_access(u64::from(offset), data.len(), CONFIG_SPACE_SIZE) {
            data.fill(0xff);
            return;
        }
        match self.slot_of(addr, vpci) {
            Some(s) => lock::mutex(&s.dev).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Configuration write; invalid accesses and absent (and hidden)
    /// functions are ignored. Follows any BAR change the write causes.
    pub fn config_write(&mut self, addr: PciAddress, offset: u16, data: &[u8]) {
        self.write(addr, offset, data, false)
    }

    /// Configuration write of the hidden device in `slot`, for its virtual
    /// PCI bus; as [`Self::config_write`] otherwise.
    pub fn vpci_config_write(&mut self, slot: u8, offset: u16, data: &[u8]) {
        self.write(PciAddress::slot(slot), offset, data, true)
    }

    fn write(&mut self, addr: PciAddress, offset: u16, data: &[u8], vpci: bool) {
        if !check_config_access(u64::from(offset), data.len(), CONFIG_SPACE_SIZE) {
            return;
        }
        let Some(s) = self.slot_of(addr, vpci) else {
            return;
        };
        let desired = {
            let mut d = lock::mutex(&s.dev);
            d.write_config(offset, data);
            d.bar_regions()
        };
        if desired != s.mapped {
            self.sync_bars(addr.device, desired);
        }
    }

    /// Brings the bus mappings of `slot` in line with `desired`.
    fn sync_bars(&mut self, slot: u8, desired: Vec<PciBarRegion>) {
        let Some(s) = self.slots.get_mut(usize::from(slot)).and_then(|s| s.take()) else {
            return;
        };
        let Slot {
            dev,
            bus_dev,
            mut mapped,
            hidden,
        } = s;
        // Unmap every BAR that changes first, then map the new places, so
        // that BARs of one device can trade places.
        let mut changes = Vec::new();
        for index in 0..super::NUM_BARS {
            let old = mapped
                .iter()
                .position(|r| r.index == index)
                .map(|i| mapped.remove(i));
            let new = desired.iter().find(|r| r.index == index).copied();
            if old == new {
                mapped.extend(old);
                continue;
            }
            if let Some(o) = old {
                if let Err(e) = self.bus_for(o.kind).remove(o.addr, o.size) {
                    guest_warn!("pci: unmapping BAR {index} of slot {slot}: {e}");
                }
            }
            changes.push((index, old.map(|o| o.addr), new));
        }
        let mut moves = Vec::new();
        for (index, old_addr, new) in changes {
            let mut new_addr = None;
            if let Some(n) = new {
                match self.bus_for(n.kind).insert(bus_dev.clone(), n.addr, n.size) {
                    Ok(()) => {
                        mapped.push(n);
                        new_addr = Some(n.addr);
                    }
                    Err(e) => guest_warn!("pci: slot {slot} BAR {index} left unmapped: {e}"),
                }
            }
            if old_addr != new_addr {
                moves.push((index, old_addr, new_addr));
            }
        }
        mapped.sort_by_key(|r| r.index);
        if !moves.is_empty() {
            let mut d = lock::mutex(&dev);
            for (index, old, new) in moves {
                d.bar_moved(index, old, new);
            }
        }
        self.slots[usize::from(slot)] = Some(Slot {
            dev,
            bus_dev,
            mapped,
            hidden,
        });
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 and the data
/// window at 0xCFC..0xCFF (256 bytes of configuration space per function).
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl std::fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigIo")
            .field("address", &format_args!("{:#x}", self.address))
            .finish_non_exhaustive()
    }
}

/// Enable bit of the 0xCF8 address register.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Writable bits of the 0xCF8 address register: enable, bus, device,
/// function, dword register.
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;

impl PciConfigIo {
    /// The ports, for `root`. Map at 0xCF8 with length 8.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root, address: 0 }
    }

    /// The function and register selected by the address register, if
    /// enabled.
    // Field extraction: the casts keep the masked bits on purpose.
    #[allow(clippy::cast_possible_truncation)]
    fn target(&self, data_offset: u64) -> Option<(PciAddress, u16)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        let addr = PciAddress {
            bus: (a >> 16) as u8,
            device: ((a >> 11) & 0x1f) as u8,
            function: ((a >> 8) & 0x7) as u8,
        };
        Some((addr, (a & 0xfc) as u16 + data_offset as u16))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if check_config_access(offset - 4, data.len(), 4) => {
                match self.target(offset - 4) {
                    Some((addr, reg)) if usize::from(reg) < LEGACY_CONFIG_SPACE_SIZE => {
                        lock::mutex(&self.root).config_read(addr, reg, data)
                    }
                    _ => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[a, b, c, d]) => {
                self.address = u32::from_le_bytes([a, b, c, d]) & CONFIG_ADDRESS_MASK
            }
            (4..=7, _) if check_config_access(offset - 4, data.len(), 4) => {
                if let Some((addr, reg)) = self.target(offset - 4) {
                    lock::mutex(&self.root).config_write(addr, reg, data);
                }
            }
            _ => guest_warn!(
                "pci: bad {}-byte access at 0xcf8+{offset} ignored",
                data.len()
            ),
        }
    }
}

/// PCI Express ECAM: bus << 20 | device << 15 | function << 12 | register.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl std::fmt::Debug for PciConfigMmio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfigMmio").finish_non_exhaustive()
    }
}

impl PciConfigMmio {
    /// The ECAM window for `root`. Map with 1 MiB per bus.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }

    // Field extraction: the casts keep the masked bits on purpose.
    #[allow(clippy::cast_possible_truncation)]
    fn decode(offset: u64) -> (PciAddress, u16) {
        (
            PciAddress {
                bus: ((offset >> 20) & 0xff) as u8,
                device: ((offset >> 15) & 0x1f) as u8,
                function: ((offset >> 12) & 0x7) as u8,
            },
            (offset & 0xfff) as u16,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let (addr, reg) = Self::decode(offset);
        lock::mutex(&self.root).config_read(addr, reg, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (addr, reg) = Self::decode(offset);
        lock::mutex(&self.root).config_write(addr, reg, data);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pci::{reg, COMMAND_IO, COMMAND_MEMORY};

    /// A device with a 4 KiB MMIO BAR 0 and a 16-byte I/O BAR 1 that
    /// records BAR moves and accesses.
    struct TestDev {
        config: PciConfiguration,
        moves: Vec<(usize, Option<u64>, Option<u64>)>,
        accesses: Vec<(u64, u64)>,
    }

    impl TestDev {
        fn new() -> Self {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1234,
                device_id: 0x11e8,
                class: 0xff,
                ..Default::default()
            });
            config.add_bar(0, 0x1000, BarKind::Mmio32, false).unwrap();
            config.add_bar(1, 0x10, BarKind::Io, false).unwrap();
            config.set_bar_address(0, 0xc000_0000).unwrap();
            config.set_bar_address(1, 0x1000).unwrap();
            Self {
                config,
                moves: Vec::new(),
                accesses: Vec::new(),
            }
        }
    }

    impl PciDevice for TestDev {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn bar_moved(&mut self, index: usize, old: Option<u64>, new: Option<u64>) {
            self.moves.push((index, old, new));
        }
    }

    impl BusDevice for TestDev {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            self.accesses.push((base, offset));
            data.fill(0x5a);
        }
        fn write(&mut self, base: u64, offset: u64, _data: &[u8]) {
            self.accesses.push((base, offset));
        }
    }

    struct Fixture {
        mmio: Arc<Bus>,
        io: Arc<Bus>,
        root: Arc<Mutex<PciRoot>>,
        dev: Arc<Mutex<TestDev>>,
        cf8: PciConfigIo,
        ecam: PciConfigMmio,
    }

    fn fixture() -> Fixture {
        let mmio = Arc::new(Bus::new());
        let io = Arc::new(Bus::new());
        let root = Arc::new(Mutex::new(PciRoot::new(mmio.clone(), io.clone())));
        let dev = Arc::new(Mutex::new(TestDev::new()));
        let a = root
            .lock()
            .unwrap()
            .add_device(3, dev.clone(), dev.clone())
            .unwrap();
        assert_eq!(a, PciAddress::slot(3));
        Fixture {
            mmio,
            io,
            cf8: PciConfigIo::new(root.clone()),
            ecam: PciConfigMmio::new(root.clone()),
            root,
            dev,
        }
    }

    fn cf8_read(f: &mut Fixture, dev: u8, reg: u8, len: usize) -> u32 {
        let a = 0x8000_0000u32 | u32::from(dev) << 11 | u32::from(reg & 0xfc);
        f.cf8.write(0xcf8, 0, &a.to_le_bytes());
        let mut d = [0u8; 4];
        f.cf8.read(0xcf8, 4 + u64::from(reg & 3), &mut d[..len]);
        u32::from_le_bytes(d)
    }

    fn ecam_write(f: &mut Fixture, dev: u8, reg: u16, data: &[u8]) {
        f.ecam
            .write(0xe000_0000, u64::from(dev) << 15 | u64::from(reg), data);
    }

    fn ecam_read32(f: &mut Fixture, dev: u8, reg: u16) -> u32 {
        let mut d = [0u8; 4];
        f.ecam
            .read(0xe000_0000, u64::from(dev) << 15 | u64::from(reg), &mut d);
        u32::from_le_bytes(d)
    }

    /// A device behind a virtual PCI bus: gone from ECAM, configured (and
    /// its BARs mapped) through the vPCI accessors; shown again, the other
    /// way round.
    #[test]
    fn hidden_devices_answer_only_their_virtual_bus() {
        let mut f = fixture();
        let id = ecam_read32(&mut f, 3, 0);
        f.root.lock().unwrap().set_hidden(3, true).unwrap();
        assert_eq!(ecam_read32(&mut f, 3, 0), u32::MAX);
        let mut d = [0u8; 4];
        f.root.lock().unwrap().vpci_config_read(3, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), id);
        // ECAM writes are ignored, vPCI writes decode the BARs.
        ecam_write(&mut f, 3, reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert!(f.mmio.ranges().is_empty());
        f.root
            .lock()
            .unwrap()
            .vpci_config_write(3, reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(f.mmio.ranges(), vec![(0xc000_0000, 0x1000)]);
        f.root.lock().unwrap().set_hidden(3, false).unwrap();
        f.root.lock().unwrap().vpci_config_read(3, 0, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(ecam_read32(&mut f, 3, 0), id);
        assert!(f.root.lock().unwrap().set_hidden(0, true).is_err());
        assert!(f.root.lock().unwrap().set_hidden(9, true).is_err());
    }

    #[test]
    fn enumeration_through_both_mechanisms() {
        let mut f = fixture();
        assert_eq!(cf8_read(&mut f, 0, 0, 4), 0x0d57_8086);
        assert_eq!(cf8_read(&mut f, 0, 0x0b, 1), 0x06);
        assert_eq!(cf8_read(&mut f, 3, 0, 4), 0x11e8_1234);
        assert_eq!(cf8_read(&mut f, 3, 2, 2), 0x11e8);
        assert_eq!(cf8_read(&mut f, 1, 0, 4), 0xffff_ffff);
        assert_eq!(ecam_read32(&mut f, 3, 0), 0x11e8_1234);
        assert_eq!(ecam_read32(&mut f, 4, 0), 0xffff_ffff);
        // Function 1 and bus 1 are empty.
        assert_eq!(ecam_read32(&mut f, 3, 1 << 12), 0xffff_ffff);
        let mut d = [0u8; 4];
        f.ecam.read(0xe000_0000, 1 << 20, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(f.root.lock().unwrap().occupied_slots(), vec![0, 3]);
    }

    #[test]
    fn address_register_and_bad_accesses() {
        let mut f = fixture();
        f.cf8.write(0xcf8, 0, &0xffff_ffffu32.to_le_bytes());
        let mut d = [0u8; 4];
        f.cf8.read(0xcf8, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x80ff_fffc);
        // Disabled: data reads all ones.
        f.cf8.write(0xcf8, 0, &(3u32 << 11).to_le_bytes());
        f.cf8.read(0xcf8, 4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Misaligned or oversize accesses.
        f.cf8
            .write(0xcf8, 0, &(0x8000_0000u32 | 3 << 11).to_le_bytes());
        let mut two = [0u8; 2];
        f.cf8.read(0xcf8, 5, &mut two);
        assert_eq!(two, [0xff; 2]);
        f.cf8.read(0xcf8, 2, &mut two);
        assert_eq!(two, [0xff; 2]);
        f.cf8.write(0xcf8, 2, &[0, 0]);
        f.cf8.write(0xcf8, 6, &[1, 2, 3, 4]);
        let mut eight = [0u8; 8];
        f.ecam.read(0xe000_0000, 3 << 15, &mut eight);
        assert_eq!(eight, [0xff; 8]);
        f.ecam.read(0xe000_0000, (3 << 15) | 2, &mut d);
        assert_eq!(d, [0xff; 4]);
        f.ecam.read(0xe000_0000, (3 << 15) | 0xffe, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Still intact.
        assert_eq!(ecam_read32(&mut f, 3, 0), 0x11e8_1234);
    }

    #[test]
    fn bars_follow_decoding_and_moves() {
        let mut f = fixture();
        // Nothing decoded yet.
        assert!(f.mmio.ranges().is_empty() && f.io.ranges().is_empty());
        ecam_write(
            &mut f,
            3,
            reg::COMMAND,
            &(COMMAND_MEMORY | COMMAND_IO).to_le_bytes(),
        );
        assert_eq!(f.mmio.ranges(), vec![(0xc000_0000, 0x1000)]);
        assert_eq!(f.io.ranges(), vec![(0x1000, 0x10)]);
        let mut d = [0u8; 4];
        assert!(f.mmio.read(0xc000_0010, &mut d));
        assert_eq!(d, [0x5a; 4]);
        // Move BAR 0 (Linux disables decoding first; here it stays on).
        ecam_write(&mut f, 3, 0x10, &0xc010_0000u32.to_le_bytes());
        assert_eq!(f.mmio.ranges(), vec![(0xc010_0000, 0x1000)]);
        assert!(f.mmio.write(0xc010_0008, &[1]));
        assert!(!f.mmio.write(0xc000_0008, &[1]));
        // Decoding off unmaps both.
        ecam_write(&mut f, 3, reg::COMMAND, &0u16.to_le_bytes());
        assert!(f.mmio.ranges().is_empty() && f.io.ranges().is_empty());
        let dev = f.dev.lock().unwrap();
        assert_eq!(
            dev.moves,
            vec![
                (0, None, Some(0xc000_0000)),
                (1, None, Some(0x1000)),
                (0, Some(0xc000_0000), Some(0xc010_0000)),
                (0, Some(0xc010_0000), None),
                (1, Some(0x1000), None),
            ]
        );
        assert_eq!(dev.accesses, vec![(0xc000_0000, 0x10), (0xc010_0000, 8)]);
    }

    #[test]
    fn a_bar_moved_onto_another_device_stays_unmapped() {
        let mut f = fixture();
        f.mmio
            .insert(Arc::new(Mutex::new(HostBridge::new())), 0xd000_0000, 0x1000)
            .unwrap();
        ecam_write(&mut f, 3, reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
        ecam_write(&mut f, 3, 0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(f.mmio.ranges(), vec![(0xd000_0000, 0x1000)]);
        assert!(f.root.lock().unwrap().mapped_bars(3).is_empty());
        // Moving it somewhere free maps it again.
        ecam_write(&mut f, 3, 0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(f.root.lock().unwrap().mapped_bars(3).len(), 1);
        assert_eq!(f.mmio.ranges().len(), 2);
    }

    #[test]
    fn add_and_remove_devices() {
        let f = fixture();
        let mut root = f.root.lock().unwrap();
        let other = Arc::new(Mutex::new(TestDev::new()));
        assert_eq!(
            root.add_device(3, other.clone(), other.clone()).err(),
            Some(PciError::SlotInUse(3))
        );
        assert_eq!(
            root.add_device(32, other.clone(), other.clone()).err(),
            Some(PciError::InvalidSlot(32))
        );
        // A device decoding at a taken address is refused, nothing mapped.
        root.config_write(
            PciAddress::slot(3),
            reg::COMMAND,
            &COMMAND_MEMORY.to_le_bytes(),
        );
        other
            .lock()
            .unwrap()
            .config
            .write(reg::COMMAND, &(COMMAND_MEMORY | COMMAND_IO).to_le_bytes());
        assert!(matches!(
            root.add_device(4, other.clone(), other.clone()),
            Err(PciError::MapBar { index: 0, .. })
        ));
        assert!(f.io.ranges().is_empty());
        other
            .lock()
            .unwrap()
            .config
            .set_bar_address(0, 0xc000_1000)
            .unwrap();
        root.add_device(4, other.clone(), other.clone()).unwrap();
        assert_eq!(f.mmio.ranges().len(), 2);
        assert_eq!(f.io.ranges(), vec![(0x1000, 0x10)]);
        assert!(root.device(4).is_some());
        assert_eq!(
            root.device(4).unwrap().lock().unwrap().declared_bars(),
            vec![(0, 0x1000, BarKind::Mmio32), (1, 0x10, BarKind::Io)]
        );
        root.remove_device(4).unwrap();
        assert_eq!(f.mmio.ranges(), vec![(0xc000_0000, 0x1000)]);
        assert!(f.io.ranges().is_empty());
        assert_eq!(root.remove_device(4).err(), Some(PciError::SlotEmpty(4)));
        assert_eq!(root.remove_device(0).err(), Some(PciError::InvalidSlot(0)));
        assert_eq!(
            other.lock().unwrap().moves,
            vec![
                (0, None, Some(0xc000_1000)),
                (1, None, Some(0x1000)),
                (0, Some(0xc000_1000), None),
                (1, Some(0x1000), None),
            ]
        );
    }
}
