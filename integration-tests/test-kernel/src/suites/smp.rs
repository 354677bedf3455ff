//! smp: every enabled CPU in the MADT comes up through INIT-SIPI-SIPI,
//! enters long mode and reports its APIC id; the count matches `tk.cpus`.

use crate::rules::{parse_madt, MadtCpu};
use crate::smp::{self, Lapic, Started, MAX_CPUS};
use crate::tap::Msg;
use crate::{diag, fail, x86, Ctx};
use core::sync::atomic::{AtomicU64, Ordering};

/// What `echo_apic_id` last wrote: (index << 32) | APIC id.
static ECHO: AtomicU64 = AtomicU64::new(0);

extern "C" fn echo_apic_id(index: u64) {
    ECHO.store(
        index << 32 | u64::from(smp::cpuid_apic_id()),
        Ordering::SeqCst,
    );
}

pub fn run(ctx: &Ctx) -> Result<(), Msg> {
    let acpi = match ctx.acpi {
        Ok(a) => a,
        Err(e) => fail!("no ACPI tables: {}", e),
    };
    let Some(madt) = acpi.find(b"APIC") else {
        fail!("no MADT")
    };
    let mut ids = [0u32; MAX_CPUS];
    let (mut n, mut listed, mut too_many) = (0, 0, false);
    let lapic_addr = parse_madt(madt.bytes(), |c: MadtCpu| {
        listed += 1;
        if c.enabled {
            if n < MAX_CPUS {
                ids[n] = c.apic_id;
                n += 1;
            } else {
                too_many = true;
            }
        }
    });
    let Some(lapic_addr) = lapic_addr else {
        fail!("MADT is malformed (short table or bad entry length)")
    };
    if too_many {
        fail!("more than {} enabled CPUs in the MADT", MAX_CPUS);
    }
    let ids = &ids[..n];
    diag!(
        "MADT: local APIC at {:#x}, {} CPU entries, {} enabled, APIC ids {:?}",
        lapic_addr,
        listed,
        n,
        ids
    );
    if let Some((i, _)) = ids
        .iter()
        .enumerate()
        .find(|&(i, id)| ids[..i].contains(id))
    {
        fail!("APIC id {} listed twice in the MADT", ids[i]);
    }
    let bsp = smp::cpuid_apic_id();
    if !ids.contains(&bsp) {
        fail!(
            "the boot CPU (APIC id {}) is not an enabled MADT entry",
            bsp
        );
    }
    // From here on the local APIC, IPIs and the APs: ring 0.
    crate::ring::ring0(|| bring_up(ctx, acpi, ids, bsp))?;
    if let Some(s) = ctx.arg("tk.cpus") {
        let Ok(want) = s.parse::<usize>() else {
            fail!("tk.cpus={} is not a number", s)
        };
        if want != n {
            fail!("the MADT lists {} enabled CPUs, tk.cpus is {}", n, want);
        }
    }
    Ok(())
}

/// Enables the boot CPU's local APIC, starts every other enabled CPU of
/// the MADT and has each run work sent with a wake-up IPI (ring 0).
fn bring_up(ctx: &Ctx, acpi: &crate::acpi::Acpi, ids: &[u32], bsp: u32) -> Result<(), Msg> {
    let n = ids.len();
    let lapic = Lapic::current();
    if !smp::lapic_mapped(lapic) {
        fail!("the local APIC is outside the identity map");
    }
    lapic.enable();
    smp::set_eoi(lapic);
    smp::set_apic_id(0, bsp);
    match lapic {
        Lapic::X2apic => diag!("boot CPU: APIC id {} (x2APIC mode)", bsp),
        Lapic::Xapic(base) => {
            let mmio = lapic.mmio_id().unwrap_or(u32::MAX);
            diag!(
                "boot CPU: APIC id {} (xAPIC at {:#x}, id register {})",
                bsp,
                base,
                mmio
            );
            if mmio != bsp & 0xff {
                fail!(
                    "boot CPU: CPUID says APIC id {}, the xAPIC id register {}",
                    bsp,
                    mmio
                );
            }
        }
    }

    let mut up = 1;
    // APIC id of each started CPU, by index.
    let mut ids_started = [0u32; MAX_CPUS];
    ids_started[0] = bsp;
    if n > 1 {
        // Keep the trampoline off ACPI tables.
        let mut avoid = [(0u64, 0u64); crate::acpi::MAX_TABLES + 1];
        for (slot, t) in avoid.iter_mut().zip(acpi.tables()) {
            *slot = (t.addr, t.addr + u64::from(t.len));
        }
        avoid[crate::acpi::MAX_TABLES] = (acpi.rsdp, acpi.rsdp + 36);
        let Some(page) = smp::trampoline_page(ctx.boot, &avoid) else {
            fail!("no free RAM page below 1 MiB for the AP trampoline");
        };
        let len = smp::install_trampoline(page);
        diag!(
            "AP trampoline: {} bytes at {:#x} (SIPI vector {:#x})",
            len,
            page,
            page >> 12
        );
        let mut first_error: Option<Msg> = None;
        for (index, &id) in ids.iter().filter(|&&id| id != bsp).enumerate() {
            let index = index + 1;
            match smp::start_ap(lapic, id, index, page) {
                Started::Yes {
                    cpuid_id,
                    mmio_id,
                    ticks,
                } => {
                    diag!(
                        "cpu {}: APIC id {} up after {} µs (TSC at 3 GHz), reports CPUID id {}{}",
                        index,
                        id,
                        ticks * 1000 / x86::TSC_PER_MS,
                        cpuid_id,
                        if mmio_id.is_some() {
                            ", xAPIC id register matches"
                        } else {
                            ""
                        }
                    );
                    if cpuid_id != id {
                        first_error.get_or_insert(Msg::new(format_args!(
                            "APIC id {} reports CPUID APIC id {}",
                            id, cpuid_id
                        )));
                    } else if mmio_id.is_some_and(|m| m != id & 0xff) {
                        first_error.get_or_insert(Msg::new(format_args!(
                            "APIC id {} reads {:?} from its xAPIC id register",
                            id, mmio_id
                        )));
                    } else {
                        smp::set_apic_id(index, id);
                        ids_started[index] = id;
                        up += 1;
                    }
                }
                Started::Timeout => {
                    diag!("cpu {}: APIC id {} did not come up", index, id);
                    first_error
                        .get_or_insert(Msg::new(format_args!("APIC id {} did not come up", id)));
                }
                Started::IpiFailed => {
                    first_error.get_or_insert(Msg::new(format_args!(
                        "the IPI to APIC id {} stayed pending",
                        id
                    )));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
    }
    diag!("{} of {} CPUs up", up, n);
    // Wake every AP with a fixed IPI and have it report again from the
    // work it was given: interrupts reach running CPUs.
    for (index, &id) in ids_started.iter().enumerate().take(up).skip(1) {
        ECHO.store(0, Ordering::SeqCst);
        if !smp::run_on(index, echo_apic_id, index as u64) || !smp::wait(index, 3000) {
            fail!("cpu {} did not run work sent with a wake-up IPI", index);
        }
        let got = ECHO.load(Ordering::SeqCst);
        if got != (index as u64) << 32 | u64::from(id) {
            fail!("cpu {} ran the work but reported {:#x}", index, got);
        }
    }
    if up > 1 {
        diag!("wake-up IPIs: {} AP(s) ran work and reported back", up - 1);
    }
    Ok(())
}
