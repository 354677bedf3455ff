//! irq: a legacy line through the VMM's IOAPIC (the MADT's), end to end.
//!
//! COM1 (ISA IRQ 4 = GSI 4) raises its transmitter-empty interrupt as soon
//! as IER enables it. With the pin masked, nothing may arrive; routed to
//! this CPU's APIC id at vector [`idt::LINE_VECTOR`], edge triggered, the
//! interrupt must arrive once; masked again, nothing more.

use crate::idt;
use crate::smp::{self, Lapic};
use crate::tap::Msg;
use crate::{diag, fail, x86, Ctx};
use core::sync::atomic::Ordering;

const COM1_IER: u16 = 0x3f9;
const COM1_IIR: u16 = 0x3fa;
const IER_THRE: u8 = 0x02;
const COM1_GSI: u32 = 4;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const MASKED: u32 = 1 << 16;

struct Ioapic(u64);

impl Ioapic {
    fn read(&self, reg: u32) -> u32 {
        // SAFETY: the IOAPIC's registers are MMIO inside the identity map
        // (checked by `run`).
        unsafe {
            x86::mmio_write::<u32>(self.0 + IOREGSEL, reg);
            x86::mmio_read::<u32>(self.0 + IOWIN)
        }
    }

    fn write(&self, reg: u32, value: u32) {
        // SAFETY: as in `read`.
        unsafe {
            x86::mmio_write::<u32>(self.0 + IOREGSEL, reg);
            x86::mmio_write::<u32>(self.0 + IOWIN, value);
        }
    }

    /// Writes pin `pin`'s entry: destination (high half) first, as Linux
    /// does, so that the entry is never unmasked with a stale destination.
    fn set_entry(&self, pin: u32, low: u32, destination: u8) {
        self.write(0x11 + 2 * pin, u32::from(destination) << 24);
        self.write(0x10 + 2 * pin, low);
    }
}

/// Enables COM1's transmitter-empty interrupt with IF set, waits up to
/// `ms`, and returns how many line interrupts arrived.
fn pulse_com1(ms: u64) -> u64 {
    let before = idt::LINE_INTERRUPTS.load(Ordering::Acquire);
    x86::sti();
    x86::outb(COM1_IER, IER_THRE);
    let start = x86::rdtsc();
    while idt::LINE_INTERRUPTS.load(Ordering::Acquire) == before
        && x86::rdtsc().wrapping_sub(start) < ms * x86::TSC_PER_MS
    {
        core::hint::spin_loop();
    }
    x86::outb(COM1_IER, 0);
    x86::cli();
    // Reading IIR acknowledges the transmitter-empty condition.
    let _ = x86::inb(COM1_IIR);
    idt::LINE_INTERRUPTS.load(Ordering::Acquire) - before
}

pub fn run(ctx: &Ctx) -> Result<(), Msg> {
    let acpi = match ctx.acpi {
        Ok(a) => a,
        Err(e) => fail!("no ACPI tables: {}", e),
    };
    let Some(madt) = acpi.find(b"APIC") else {
        fail!("no MADT");
    };
    let Some((addr, gsi_base)) = crate::rules::madt_ioapic(madt.bytes()) else {
        fail!("the MADT lists no IOAPIC");
    };
    if gsi_base != 0 {
        fail!("the IOAPIC's GSI base is {}, not 0", gsi_base);
    }
    let ioapic = Ioapic(u64::from(addr));
    if !crate::paging::is_mapped(ioapic.0, 0x20) {
        fail!("the IOAPIC at {:#x} is outside the identity map", addr);
    }
    let version = ioapic.read(1);
    let pins = ((version >> 16) & 0xff) + 1;
    diag!(
        "irq: IOAPIC at {:#x}, version {:#x}, {} pins",
        addr,
        version & 0xff,
        pins
    );
    if pins <= COM1_GSI {
        fail!("the IOAPIC has {} pins: no GSI {}", pins, COM1_GSI);
    }
    for pin in 0..pins {
        if ioapic.read(0x10 + 2 * pin) & MASKED == 0 {
            fail!("pin {} is not masked at reset", pin);
        }
    }

    let lapic = Lapic::current();
    if !smp::lapic_mapped(lapic) {
        fail!("the local APIC is outside the identity map");
    }
    lapic.enable();
    smp::set_eoi(lapic);
    let apic_id = smp::cpuid_apic_id();
    let Ok(dest) = u8::try_from(apic_id) else {
        fail!("APIC id {} does not fit an IOAPIC destination", apic_id);
    };
    let vector = idt::LINE_VECTOR as u32;

    // Masked: the edge is lost.
    ioapic.set_entry(COM1_GSI, MASKED | vector, dest);
    let n = pulse_com1(20);
    if n != 0 {
        fail!("{} interrupt(s) arrived through a masked pin", n);
    }
    // Routed: exactly one.
    ioapic.set_entry(COM1_GSI, vector, dest);
    let n = pulse_com1(2000);
    ioapic.set_entry(COM1_GSI, MASKED | vector, dest);
    if n != 1 {
        fail!(
            "COM1 through GSI {}: {} interrupts, expected 1",
            COM1_GSI,
            n
        );
    }
    if ioapic.read(0x10 + 2 * COM1_GSI) != MASKED | vector {
        fail!("pin {}'s entry does not read back", COM1_GSI);
    }
    // Masked again: nothing more.
    let n = pulse_com1(20);
    if n != 0 {
        fail!("{} interrupt(s) after masking the pin again", n);
    }
    diag!(
        "irq: COM1 -> IOAPIC pin {} -> APIC {} vector {:#x}: delivered once, none while masked",
        COM1_GSI,
        dest,
        vector
    );
    Ok(())
}
