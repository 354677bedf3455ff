//! Legacy platform devices: COM1 (8250/16550A), the i8042 reset line and the
//! ACPI hardware-reduced sleep/reset registers.

use std::io;

use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::guest_warn;

/// A [`Trigger`] that signals an [`EventFd`] (an irqfd or an exit event).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl EventFdTrigger {
    /// Wraps a clone of `evt`.
    pub fn try_clone_from(evt: &EventFd) -> io::Result<Self> {
        Ok(Self(evt.try_clone()?))
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The events by which devices ask the VMM to end the VM.
#[derive(Debug)]
pub struct ExitEvents {
    /// Signalled when the guest asks for a reset (reboot).
    pub reset: EventFd,
    /// Signalled when the guest powers off.
    pub poweroff: EventFd,
}

impl ExitEvents {
    /// Two fresh non-blocking event fds.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            reset: EventFd::new(libc::EFD_NONBLOCK)?,
            poweroff: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Clones both fds.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            reset: self.reset.try_clone()?,
            poweroff: self.poweroff.try_clone()?,
        })
    }
}

/// Where the serial port's output goes.
pub type SerialOutput = Box<dyn io::Write + Send>;

/// COM1: a 16550A UART (vm-superio) whose interrupt is an irqfd.
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, SerialOutput>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART raising `interrupt` and writing to `out`.
    pub fn new(interrupt: EventFdTrigger, out: SerialOutput) -> Self {
        Self {
            uart: vm_superio::Serial::new(interrupt, out),
        }
    }

    /// Queues input for the guest; returns how many bytes fitted in the FIFO
    /// (the rest is dropped, as a real UART drops on overrun).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                guest_warn!("serial: input lost: {e:?}");
                0
            }
        }
    }

    /// Room left in the input FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.uart.read(off),
            _ => {
                guest_warn!("serial: bad read at offset {offset}, {} bytes", data.len());
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (data, u8::try_from(offset)) {
            (&[value], Ok(off)) => {
                if let Err(e) = self.uart.write(off, value) {
                    // Output errors (a closed pipe, a full disk) must not stop
                    // the guest.
                    guest_warn!("serial: write failed: {e:?}");
                }
            }
            _ => guest_warn!("serial: bad write at offset {offset}, {} bytes", data.len()),
        }
    }
}

/// The i8042 controller, for its CPU reset command (0xFE to port 0x64).
#[derive(Debug)]
pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset` on the reset command.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.dev.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (&[value], Ok(off)) = (data, u8::try_from(offset)) {
            log::trace!("i8042: {value:#x} to port {:#x}", 0x60 + u64::from(off));
            if let Err(e) = self.dev.write(off, value) {
                log::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

/// Sleep control register offset.
pub const SLEEP_CONTROL: u64 = 0;
/// Sleep status register offset.
pub const SLEEP_STATUS: u64 = 1;
/// Reset register offset.
pub const RESET_REGISTER: u64 = 2;
/// Value to write to the reset register (FADT RESET_VALUE).
pub const RESET_VALUE: u8 = 0x42;
/// SLP_EN in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// SLP_TYP field shift in the sleep control register.
pub const SLP_TYP_SHIFT: u8 = 2;
/// SLP_TYP field mask (after the shift).
pub const SLP_TYP_MASK: u8 = 0x7;
/// SLP_TYP of S5 (soft off), as declared by the DSDT's `_S5_` object.
pub const SLP_TYP_S5: u8 = 5;
/// WAK_STS in the sleep status register.
pub const WAK_STS: u8 = 1 << 7;

/// ACPI hardware-reduced sleep control/status and reset registers (FADT
/// SLEEP_CONTROL_REG, SLEEP_STATUS_REG, RESET_REG), one byte each.
///
/// Writing `SLP_EN | S5 << 2` to the sleep control register powers off;
/// writing [`RESET_VALUE`] to the reset register resets. Other sleep states
/// are not supported and ignored.
#[derive(Debug)]
pub struct AcpiSleep {
    exit: ExitEvents,
}

impl AcpiSleep {
    /// The registers, signalling `exit`.
    pub fn new(exit: ExitEvents) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status reads 0: never woken, nothing pending.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let &[value] = data else {
            guest_warn!("acpi: {}-byte write to offset {offset} ignored", data.len());
            return;
        };
        let res = match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if typ == SLP_TYP_S5 {
                    self.exit.poweroff.write(1)
                } else {
                    guest_warn!("acpi: sleep type {typ} is not supported");
                    Ok(())
                }
            }
            RESET_REGISTER if value == RESET_VALUE => {
                log::debug!("acpi: reset register written");
                self.exit.reset.write(1)
            }
            _ => Ok(()),
        };
        if let Err(e) = res {
            log::error!("acpi: cannot signal the VMM: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl io::Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn nonblocking() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn pending(e: &EventFd) -> bool {
        e.read().is_ok()
    }

    #[test]
    fn serial_output_input_and_interrupts() {
        let irq = nonblocking();
        let out = SharedBuf::default();
        let mut s = Serial::new(
            EventFdTrigger::try_clone_from(&irq).unwrap(),
            Box::new(out.clone()),
        );
        // Enable the receive-data interrupt (IER bit 0).
        s.write(0x3f8, 1, &[1]);
        assert!(!pending(&irq));
        for b in b"hi\n" {
            s.write(0x3f8, 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert!(pending(&irq));
        // LSR says data ready; read it back.
        let mut d = [0u8];
        s.read(0x3f8, 5, &mut d);
        assert_eq!(d[0] & 1, 1);
        s.read(0x3f8, 0, &mut d);
        assert_eq!(d[0], b'o');
        s.read(0x3f8, 0, &mut d);
        assert_eq!(d[0], b'k');
    }

    #[test]
    fn serial_input_overrun_drops() {
        let mut s = Serial::new(EventFdTrigger(nonblocking()), Box::new(io::sink()));
        let room = s.input_room();
        assert_eq!(s.enqueue_input(&vec![b'x'; room + 10]), room);
        assert_eq!(s.enqueue_input(b"y"), 0);
        assert_eq!(s.input_room(), 0);
    }

    #[test]
    fn serial_rejects_bad_widths_and_offsets() {
        let out = SharedBuf::default();
        let mut s = Serial::new(EventFdTrigger(nonblocking()), Box::new(out.clone()));
        s.write(0x3f8, 0, b"ab");
        s.write(0x3f8, 0x1_0000, b"a");
        let mut d = [0u8; 2];
        s.read(0x3f8, 0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        assert!(out.0.lock().unwrap().is_empty());
    }

    #[test]
    fn serial_survives_a_broken_output() {
        struct Broken;
        impl io::Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("broken"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut s = Serial::new(EventFdTrigger(nonblocking()), Box::new(Broken));
        for _ in 0..100 {
            s.write(0x3f8, 0, b"a");
        }
    }

    #[test]
    fn i8042_reset_command() {
        let reset = nonblocking();
        let mut k = I8042::new(EventFdTrigger::try_clone_from(&reset).unwrap());
        k.write(0x60, 4, &[0x01]);
        k.write(0x60, 0, &[0xfe]);
        k.write(0x60, 4, &[0xfe, 0]);
        assert!(!pending(&reset));
        k.write(0x60, 4, &[0xfe]);
        assert!(pending(&reset));
        let mut d = [0u8; 4];
        k.read(0x60, 0, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn acpi_poweroff_and_reset() {
        let exit = ExitEvents::new().unwrap();
        let mut a = AcpiSleep::new(exit.try_clone().unwrap());
        // S3 and writes without SLP_EN do nothing.
        a.write(0x600, SLEEP_CONTROL, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        a.write(0x600, SLEEP_CONTROL, &[SLP_TYP_S5 << SLP_TYP_SHIFT]);
        a.write(0x600, SLEEP_STATUS, &[WAK_STS]);
        a.write(0x600, RESET_REGISTER, &[1]);
        // Wrong width.
        a.write(
            0x600,
            SLEEP_CONTROL,
            &[(SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN, 0],
        );
        assert!(!pending(&exit.poweroff) && !pending(&exit.reset));
        a.write(
            0x600,
            SLEEP_CONTROL,
            &[(SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN],
        );
        assert!(pending(&exit.poweroff));
        a.write(0x600, RESET_REGISTER, &[RESET_VALUE]);
        assert!(pending(&exit.reset));
        let mut d = [0xffu8];
        a.read(0x600, SLEEP_STATUS, &mut d);
        assert_eq!(d, [0]);
    }
}
