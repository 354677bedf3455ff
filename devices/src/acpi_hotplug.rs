//! ACPI PCI hotplug registers and the generic event device's (GED) event
//! register, in the manner of QEMU's and Cloud Hypervisor's `acpi-pcihp`.
//!
//! One port-I/O block of [`HOTPLUG_SIZE`] bytes at [`HOTPLUG_PORT`], four
//! 32-bit registers (4-byte accesses only; anything else reads all ones and
//! writes nothing):
//!
//! | offset | name | guest read | guest write |
//! |---|---|---|---|
//! | 0x0 | PCIU | slots added since the last read (cleared by the read) | ignored |
//! | 0x4 | PCID | slots the VMM wants removed (until ejected) | ignored |
//! | 0x8 | B0EJ | 0 | eject the slots whose bits are set (only pending removals count) |
//! | 0xC | GEDS | pending GED events, [`GED_PCI_HOTPLUG`] (cleared by the read) | ignored |
//!
//! The VMM calls [`AcpiHotplug::slot_added`] or
//! [`AcpiHotplug::request_eject`]: the bit is set, [`GED_PCI_HOTPLUG`] is
//! raised and the GED interrupt fires. The DSDT's GED `_EVT` reads GEDS and
//! PCIU/PCID and notifies the slot objects (device check, eject request); the
//! guest's `_EJ0` writes B0EJ, which signals the VMM's eject event.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::guest_warn;
use crate::legacy::EventFdTrigger;
use vm_superio::Trigger;

/// Base port of the register block (below the PCI I/O window, beside the
/// ACPI sleep registers at 0x600).
pub const HOTPLUG_PORT: u16 = 0x610;
/// Size of the register block.
pub const HOTPLUG_SIZE: u16 = 16;

/// Offset of PCIU (slots up).
pub const PCIU: u64 = 0x0;
/// Offset of PCID (slots down).
pub const PCID: u64 = 0x4;
/// Offset of B0EJ (eject).
pub const B0EJ: u64 = 0x8;
/// Offset of GEDS (GED event selector).
pub const GEDS: u64 = 0xc;

/// GEDS bit: PCIU or PCID changed.
pub const GED_PCI_HOTPLUG: u32 = 1 << 0;

/// The hotplug registers of bus 0's 32 slots and the GED event register.
#[derive(Debug)]
pub struct AcpiHotplug {
    up: u32,
    down: u32,
    events: u32,
    /// Slots the guest ejected and the VMM has not collected yet.
    ejected: u32,
    interrupt: EventFdTrigger,
    eject: EventFd,
}

fn bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

impl AcpiHotplug {
    /// Registers that raise `interrupt` (the GED's irqfd) and signal `eject`
    /// when the guest ejects a slot.
    pub fn new(interrupt: EventFdTrigger, eject: EventFd) -> Self {
        Self {
            up: 0,
            down: 0,
            events: 0,
            ejected: 0,
            interrupt,
            eject,
        }
    }

    fn raise(&mut self) {
        self.events |= GED_PCI_HOTPLUG;
        if let Err(e) = self.interrupt.trigger() {
            log::error!("hotplug: cannot raise the GED interrupt: {e}");
        }
    }

    /// A device was plugged into `slot` (0-31): tell the guest.
    pub fn slot_added(&mut self, slot: u8) {
        let b = bit(slot);
        self.down &= !b;
        self.ejected &= !b;
        self.up |= b;
        self.raise();
    }

    /// Ask the guest to release and eject the device in `slot` (0-31).
    pub fn request_eject(&mut self, slot: u8) {
        let b = bit(slot);
        self.up &= !b;
        self.down |= b;
        self.raise();
    }

    /// Forgets a pending removal of `slot` (the VMM removed it without the
    /// guest's eject); returns whether the guest had ejected it meanwhile.
    pub fn cancel_eject(&mut self, slot: u8) -> bool {
        let b = bit(slot);
        self.down &= !b;
        let done = self.ejected & b != 0;
        self.ejected &= !b;
        done
    }

    /// Slots the guest ejected since the last call.
    pub fn take_ejected(&mut self) -> u32 {
        std::mem::take(&mut self.ejected)
    }

    /// Slots whose removal is pending (for tests and `vm.info`).
    pub fn pending_ejects(&self) -> u32 {
        self.down
    }
}

impl BusDevice for AcpiHotplug {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 4 {
            guest_warn!("hotplug: {}-byte read at {offset:#x}", data.len());
            data.fill(0xff);
            return;
        }
        let value = match offset {
            PCIU => std::mem::take(&mut self.up),
            PCID => self.down,
            GEDS => std::mem::take(&mut self.events),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!("hotplug: {}-byte write at {offset:#x}", data.len());
            return;
        };
        if offset != B0EJ {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        let done = value & self.down;
        if done != value {
            guest_warn!(
                "hotplug: eject of slots {:#x} that the VMM did not ask to remove ignored",
                value & !self.down
            );
        }
        if done == 0 {
            return;
        }
        self.down &= !done;
        self.ejected |= done;
        if let Err(e) = self.eject.write(1) {
            log::error!("hotplug: cannot signal an eject: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn device() -> (AcpiHotplug, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let eject = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = AcpiHotplug::new(
            EventFdTrigger::try_clone_from(&irq).unwrap(),
            eject.try_clone().unwrap(),
        );
        (dev, irq, eject)
    }

    fn read(d: &mut AcpiHotplug, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(u64::from(HOTPLUG_PORT), offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(d: &mut AcpiHotplug, offset: u64, v: u32) {
        d.write(u64::from(HOTPLUG_PORT), offset, &v.to_le_bytes());
    }

    #[test]
    fn add_raises_the_ged_and_pciu_clears_on_read() {
        let (mut d, irq, _) = device();
        assert!(irq.read().is_err(), "no interrupt before an event");
        d.slot_added(3);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut d, GEDS), GED_PCI_HOTPLUG);
        assert_eq!(read(&mut d, GEDS), 0);
        assert_eq!(read(&mut d, PCIU), 1 << 3);
        assert_eq!(read(&mut d, PCIU), 0);
        assert_eq!(read(&mut d, PCID), 0);
    }

    #[test]
    fn eject_completes_only_requested_slots() {
        let (mut d, irq, eject) = device();
        d.request_eject(5);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut d, PCID), 1 << 5);
        // PCID stays set until the eject.
        assert_eq!(read(&mut d, PCID), 1 << 5);
        // A slot nobody asked to remove: ignored, no event.
        write(&mut d, B0EJ, 1 << 6);
        assert!(eject.read().is_err());
        assert_eq!(d.take_ejected(), 0);
        write(&mut d, B0EJ, 1 << 5 | 1 << 6);
        assert_eq!(eject.read().unwrap(), 1);
        assert_eq!(read(&mut d, PCID), 0);
        assert_eq!(d.take_ejected(), 1 << 5);
        assert_eq!(d.take_ejected(), 0);
        assert_eq!(read(&mut d, B0EJ), 0);
    }

    #[test]
    fn cancel_and_readd() {
        let (mut d, _, _) = device();
        d.request_eject(7);
        assert!(!d.cancel_eject(7));
        assert_eq!(d.pending_ejects(), 0);
        d.request_eject(7);
        write(&mut d, B0EJ, 1 << 7);
        assert!(d.cancel_eject(7), "the guest ejected it in time");
        d.request_eject(9);
        d.slot_added(9);
        assert_eq!(read(&mut d, PCID), 0);
        assert_eq!(read(&mut d, PCIU), 1 << 9);
    }

    #[test]
    fn bad_widths_and_offsets() {
        let (mut d, _, eject) = device();
        d.request_eject(1);
        let mut b = [0u8; 2];
        d.read(0, PCID, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        d.write(0, B0EJ, &[2, 0]);
        d.write(0, B0EJ, &[2]);
        assert!(eject.read().is_err());
        write(&mut d, PCID, 0);
        assert_eq!(read(&mut d, PCID), 1 << 1);
        // Slot numbers past 31 are nobody's.
        d.slot_added(40);
        assert_eq!(read(&mut d, PCIU), 0);
    }
}
