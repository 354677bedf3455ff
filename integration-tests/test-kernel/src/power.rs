//! Poweroff: ACPI S5 through the FADT (hardware-reduced sleep control
//! register, else the PM1a control block), then an i8042 reset, then halt.

use crate::acpi::Acpi;
use crate::rules::{find_s5_sleep_type, parse_fadt, Gas};
use crate::x86;
use crate::{paging, println};

/// S5's SLP_TYP for a hardware-reduced platform without a usable \_S5
/// (what pvmm and QEMU's GED expect).
const S5_DEFAULT: u8 = 5;
const SLP_EN_HW_REDUCED: u64 = 1 << 5;
const SLP_EN_PM1: u64 = 1 << 13;

fn gas_write(g: &Gas, value: u64) -> bool {
    let value = value << g.bit_offset;
    match g.space {
        0 => {
            let w = u64::from(g.width());
            if !paging::is_mapped(g.address, w) || !g.address.is_multiple_of(w) {
                return false;
            }
            #[allow(clippy::cast_possible_truncation)]
            // SAFETY: the firmware names this register for sleep control; the
            // address is mapped and aligned; writing it is the point.
            unsafe {
                match w {
                    1 => x86::mmio_write(g.address, value as u8),
                    2 => x86::mmio_write(g.address, value as u16),
                    4 => x86::mmio_write(g.address, value as u32),
                    _ => x86::mmio_write(g.address, value),
                }
            }
            true
        }
        1 => {
            let Ok(port) = u16::try_from(g.address) else {
                return false;
            };
            #[allow(clippy::cast_possible_truncation)]
            match g.width() {
                1 => x86::outb(port, value as u8),
                2 => x86::outw(port, value as u16),
                _ => x86::outl(port, value as u32),
            }
            true
        }
        _ => false,
    }
}

fn space_name(g: &Gas) -> &'static str {
    match g.space {
        0 => "mmio",
        1 => "io",
        _ => "unsupported space",
    }
}

/// Powers the machine off; never returns.
pub fn poweroff(acpi: Option<&Acpi>) -> ! {
    let fadt = acpi
        .and_then(|a| a.find(b"FACP"))
        .and_then(|t| parse_fadt(t.bytes()));
    if let Some(f) = fadt {
        let s5 = acpi
            .and_then(|a| a.find(b"DSDT"))
            .and_then(|t| find_s5_sleep_type(t.bytes().get(36..).unwrap_or(&[])));
        if let Some(g) = f.sleep_control {
            let typ = s5.unwrap_or(S5_DEFAULT);
            let v = (u64::from(typ & 7) << 2) | SLP_EN_HW_REDUCED;
            crate::diag!(
                "poweroff: FADT sleep control register ({} {:#x}, {} byte(s)) <- {:#x} (SLP_TYP {} {}, SLP_EN)",
                space_name(&g),
                g.address,
                g.width(),
                v,
                typ,
                if s5.is_some() { "from \\_S5" } else { "default" }
            );
            if gas_write(&g, v) {
                x86::delay_ticks(100 * x86::TSC_PER_MS);
            }
            println!("# poweroff: still running after the sleep control write");
        }
        if let Some(g) = f.pm1a_control {
            let typ = s5.unwrap_or(if f.hw_reduced { S5_DEFAULT } else { 0 });
            let v = (u64::from(typ & 7) << 10) | SLP_EN_PM1;
            println!(
                "# poweroff: FADT PM1a control ({} {:#x}) <- {:#x} (SLP_TYP {}, SLP_EN)",
                space_name(&g),
                g.address,
                v,
                typ
            );
            if gas_write(&g, v) {
                x86::delay_ticks(100 * x86::TSC_PER_MS);
            }
            println!("# poweroff: still running after the PM1a write");
        }
        if f.sleep_control.is_none() && f.pm1a_control.is_none() {
            println!("# poweroff: the FADT has neither a sleep control register nor PM1a");
        }
    } else {
        println!("# poweroff: no FADT");
    }
    println!("# poweroff: resetting through the i8042 (port 0x64 <- 0xfe)");
    x86::outb(0x64, 0xfe);
    x86::delay_ticks(100 * x86::TSC_PER_MS);
    println!("# poweroff: reset failed; halting");
    x86::halt_forever()
}
