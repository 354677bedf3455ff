//! A user-space IOAPIC (82093AA register model, 24 pins) for KVM's split
//! irqchip.
//!
//! The LAPICs stay in the kernel; this device only keeps the redirection
//! table. Devices raise their pins through irqfds on GSI = pin, so the
//! interrupt itself never passes through here: every time the guest changes
//! a redirection entry, the entry's MSI form (or nothing, when masked) is
//! handed to [`PinRoutes`], which installs it as the pin's GSI route. An
//! edge that arrives while the pin is masked is lost, as on the hardware.
//!
//! Level-triggered entries are routed as level MSIs; KVM then exits on their
//! EOI (KVM_EXIT_IOAPIC_EOI), which needs nothing from this device: pins
//! are only ever pulsed (irqfd), so there is no line to sample again, and
//! Remote IRR reads 0.

use std::io;

use bitfield_struct::bitfield;

use crate::bus::BusDevice;
use crate::guest_warn;
use crate::interrupt::MsiMessage;
use resources::ErrorChain;

/// Number of pins (redirection entries).
pub const PINS: u32 = 24;
/// IOREGSEL: the index of the register IOWIN accesses.
const IOREGSEL: u64 = 0x00;
/// IOWIN: the window onto the selected register.
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_TABLE: u32 = 0x10;
/// Version 0x11 (82093AA: no EOI register), highest entry index in 23:16.
const VERSION: u32 = 0x11 | ((PINS - 1) << 16);

/// A redirection table entry.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct RedirectionEntry {
    pub vector: u8,
    #[bits(3)]
    pub delivery_mode: u8,
    /// Logical (1) or physical (0) destination.
    pub logical: bool,
    /// Read-only: a message is pending (never here).
    pub delivery_status: bool,
    pub active_low: bool,
    /// Read-only: a level interrupt was accepted and awaits its EOI.
    pub remote_irr: bool,
    pub level: bool,
    pub masked: bool,
    #[bits(31)]
    _reserved: u64,
    /// Bits 55:48 of an extended (15-bit) destination id; unused here.
    pub extended_destination: u8,
    pub destination: u8,
}

/// Bits the guest can write: everything but delivery status, Remote IRR and
/// the reserved bits.
const WRITABLE: u64 = !((1 << 12) | (1 << 14) | (((1 << 31) - 1) << 17));

impl RedirectionEntry {
    /// The entry at reset: masked, everything else 0.
    pub fn reset() -> Self {
        Self::new().with_masked(true)
    }

    /// The MSI that delivers this entry, or None when it is masked.
    pub fn msi(self) -> Option<MsiMessage> {
        if self.masked() {
            return None;
        }
        let address =
            0xfee0_0000 | (u64::from(self.destination()) << 12) | (u64::from(self.logical()) << 2);
        let mut data = u32::from(self.vector()) | (u32::from(self.delivery_mode()) << 8);
        if self.level() {
            // Trigger mode level, level asserted.
            data |= (1 << 15) | (1 << 14);
        }
        Some(MsiMessage { address, data })
    }
}

/// Where the IOAPIC puts each pin's route (the VMM: KVM GSI routing).
pub trait PinRoutes: Send {
    /// Routes GSI `pin` to `msi`, or removes its route (None).
    fn route_pin(&mut self, pin: u32, msi: Option<MsiMessage>) -> io::Result<()>;
}

/// The IOAPIC.
pub struct Ioapic {
    id: u32,
    select: u32,
    table: [RedirectionEntry; PINS as usize],
    routes: Box<dyn PinRoutes>,
}

impl Ioapic {
    /// An IOAPIC with every pin masked (no routes).
    pub fn new(routes: Box<dyn PinRoutes>) -> Self {
        Self {
            id: 0,
            select: 0,
            table: [RedirectionEntry::reset(); PINS as usize],
            routes,
        }
    }

    /// The entry of `pin`.
    pub fn entry(&self, pin: u32) -> Option<RedirectionEntry> {
        self.table.get(pin as usize).copied()
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID => self.id,
            REG_VERSION => VERSION,
            REG_ARBITRATION => self.id,
            r @ REG_TABLE.. => match self.entry((r - REG_TABLE) / 2) {
                // Truncation intended: the low or high half.
                #[allow(clippy::cast_possible_truncation)]
                Some(e) if r % 2 == 0 => e.into_bits() as u32,
                Some(e) => (e.into_bits() >> 32) as u32,
                None => 0,
            },
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & 0x0f00_0000,
            r @ REG_TABLE.. => {
                let pin = (r - REG_TABLE) / 2;
                let Some(old) = self.entry(pin) else { return };
                let bits = old.into_bits();
                let new = if r % 2 == 0 {
                    (bits & !0xffff_ffff) | u64::from(value)
                } else {
                    (bits & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let new = RedirectionEntry::from_bits((new & WRITABLE) | (bits & !WRITABLE));
                self.table[pin as usize] = new;
                if new.msi() != old.msi() {
                    if let Err(e) = self.routes.route_pin(pin, new.msi()) {
                        guest_warn!("IOAPIC: cannot route pin {pin}: {}", ErrorChain(&e));
                    }
                }
            }
            // Version and arbitration are read-only.
            _ => {}
        }
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => self.select,
            (IOWIN, 4) => self.read_register(),
            _ => {
                data.fill(0);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => self.write_register(value),
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<(u32, Option<MsiMessage>)>>>;

    struct Recorder(Log);
    impl PinRoutes for Recorder {
        fn route_pin(&mut self, pin: u32, msi: Option<MsiMessage>) -> io::Result<()> {
            self.0.lock().unwrap().push((pin, msi));
            Ok(())
        }
    }

    fn ioapic() -> (Ioapic, Log) {
        let log = Log::default();
        (Ioapic::new(Box::new(Recorder(log.clone()))), log)
    }

    fn write(io: &mut Ioapic, reg: u32, value: u32) {
        io.write(0, IOREGSEL, &reg.to_le_bytes());
        io.write(0, IOWIN, &value.to_le_bytes());
    }

    fn read(io: &mut Ioapic, reg: u32) -> u32 {
        io.write(0, IOREGSEL, &reg.to_le_bytes());
        let mut d = [0u8; 4];
        io.read(0, IOWIN, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn entry_layout() {
        let e = RedirectionEntry::new()
            .with_vector(0x31)
            .with_delivery_mode(1)
            .with_logical(true)
            .with_active_low(true)
            .with_level(true)
            .with_masked(true)
            .with_destination(0xab);
        assert_eq!(e.into_bits(), 0xab00_0000_0001_a931);
        assert_eq!(RedirectionEntry::reset().into_bits(), 1 << 16);
        assert_eq!(WRITABLE, 0xffff_0000_0001_afff);
    }

    #[test]
    fn version_and_reset_state() {
        let (mut io, log) = ioapic();
        assert_eq!(read(&mut io, REG_VERSION), 0x0017_0011);
        for pin in 0..PINS {
            assert_eq!(read(&mut io, REG_TABLE + 2 * pin), 1 << 16, "pin {pin}");
            assert_eq!(read(&mut io, REG_TABLE + 2 * pin + 1), 0);
        }
        write(&mut io, REG_ID, 0xffff_ffff);
        assert_eq!(read(&mut io, REG_ID), 0x0f00_0000);
        write(&mut io, REG_VERSION, 0);
        assert_eq!(read(&mut io, REG_VERSION), 0x0017_0011);
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn unmasking_routes_the_pin_and_masking_removes_it() {
        let (mut io, log) = ioapic();
        // Linux's order: destination (high half) first, then the low half.
        write(&mut io, REG_TABLE + 2 * 4 + 1, 0x0200_0000);
        assert!(log.lock().unwrap().is_empty(), "still masked: no route");
        write(&mut io, REG_TABLE + 2 * 4, 0x0000_0024);
        let msi = MsiMessage {
            address: 0xfee0_2000,
            data: 0x24,
        };
        assert_eq!(log.lock().unwrap().as_slice(), &[(4, Some(msi))]);
        // The same entry again: no new route.
        write(&mut io, REG_TABLE + 2 * 4, 0x0000_0024);
        assert_eq!(log.lock().unwrap().len(), 1);
        write(&mut io, REG_TABLE + 2 * 4, 0x0001_0024);
        assert_eq!(log.lock().unwrap().last(), Some(&(4, None)));
    }

    #[test]
    fn level_logical_entry_and_read_only_bits() {
        let (mut io, log) = ioapic();
        write(&mut io, REG_TABLE + 2 * 9 + 1, 0x0100_0000);
        // Level, active high, logical, fixed, vector 0x41; try to set
        // delivery status and Remote IRR too.
        write(&mut io, REG_TABLE + 2 * 9, 0x0000_d841);
        assert_eq!(read(&mut io, REG_TABLE + 2 * 9), 0x0000_8841);
        let msi = MsiMessage {
            address: 0xfee0_1004,
            data: 0xc041,
        };
        assert_eq!(log.lock().unwrap().as_slice(), &[(9, Some(msi))]);
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let (mut io, log) = ioapic();
        // Registers past the table, odd sizes and offsets.
        write(&mut io, REG_TABLE + 2 * PINS, 0x24);
        assert_eq!(read(&mut io, REG_TABLE + 2 * PINS), 0);
        assert_eq!(read(&mut io, 0xff), 0);
        io.write(0, IOWIN, &[0x24]);
        io.write(0, 0x20, &0u32.to_le_bytes());
        let mut d = [0xaa_u8; 2];
        io.read(0, IOWIN, &mut d);
        assert_eq!(d, [0, 0]);
        assert!(log.lock().unwrap().is_empty());
    }
}
