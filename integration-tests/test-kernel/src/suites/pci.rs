//! pci: the host bridge enumerates. ECAM from the MCFG is scanned on bus 0
//! (every function printed); configuration mechanism #1 (0xcf8/0xcfc) is
//! tried and, where it answers, must agree with ECAM; 00:00.0 must be a host
//! bridge (class 06, subclass 00).

use crate::rules::{parse_mcfg, McfgEntry};
use crate::tap::Msg;
use crate::{diag, fail, paging, x86, Ctx};

const CF8: u16 = 0xcf8;
const CFC: u16 = 0xcfc;

/// A configuration space reader for bus 0.
trait Config {
    fn read32(&self, dev: u8, func: u8, reg: u16) -> u32;
}

struct Ecam(u64);

impl Config for Ecam {
    fn read32(&self, dev: u8, func: u8, reg: u16) -> u32 {
        let a = self.0 + (u64::from(dev) << 15 | u64::from(func) << 12 | u64::from(reg & 0xffc));
        // SAFETY: bus 0's 1 MiB of ECAM was checked mapped; config reads
        // have no side effects on a well-behaved device.
        unsafe { x86::mmio_read::<u32>(a) }
    }
}

struct Cf8;

impl Config for Cf8 {
    fn read32(&self, dev: u8, func: u8, reg: u16) -> u32 {
        let addr =
            0x8000_0000 | u32::from(dev) << 11 | u32::from(func) << 8 | u32::from(reg & 0xfc);
        x86::outl(CF8, addr);
        x86::inl(CFC)
    }
}

/// One function found on bus 0.
#[derive(Clone, Copy, Default)]
struct Func {
    dev: u8,
    func: u8,
    id: u32,
    class: u32,
}

/// Scans bus 0; returns the count (`out` holds the first 64).
fn scan(cfg: &dyn Config, out: &mut [Func; 64]) -> Result<usize, Msg> {
    let mut n = 0;
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let id = cfg.read32(dev, func, 0);
            let vendor = id & 0xffff;
            if vendor == 0xffff {
                if func == 0 {
                    break;
                }
                continue;
            }
            if vendor == 0 {
                fail!(
                    "00:{:02x}.{} reads vendor id 0000 (absent functions must read ffff)",
                    dev,
                    func
                );
            }
            let class = cfg.read32(dev, func, 8);
            if n < out.len() {
                out[n] = Func {
                    dev,
                    func,
                    id,
                    class,
                };
            }
            n += 1;
            let header = (cfg.read32(dev, func, 0xc) >> 16) & 0xff;
            if func == 0 && header & 0x80 == 0 {
                break; // single-function device
            }
        }
    }
    Ok(n)
}

fn print(kind: &str, f: &Func) {
    diag!(
        "{} 00:{:02x}.{} [{:04x}:{:04x}] class {:02x}.{:02x}.{:02x} rev {:02x}",
        kind,
        f.dev,
        f.func,
        f.id & 0xffff,
        f.id >> 16,
        f.class >> 24,
        (f.class >> 16) & 0xff,
        (f.class >> 8) & 0xff,
        f.class & 0xff
    );
}

pub fn run(ctx: &Ctx) -> Result<(), Msg> {
    let acpi = match ctx.acpi {
        Ok(a) => a,
        Err(e) => fail!("no ACPI tables: {}", e),
    };
    let Some(mcfg) = acpi.find(b"MCFG") else {
        fail!("no MCFG table")
    };
    let mut bus0: Option<McfgEntry> = None;
    parse_mcfg(mcfg.bytes(), |e| {
        diag!(
            "MCFG: segment {} buses {}-{} ECAM at {:#x}",
            e.segment,
            e.bus_start,
            e.bus_end,
            e.base
        );
        if e.segment == 0 && e.bus_start == 0 && bus0.is_none() {
            bus0 = Some(e);
        }
    });
    let Some(e) = bus0 else {
        fail!("the MCFG has no allocation for segment 0 bus 0")
    };
    if e.base % (1 << 20) != 0 {
        fail!("ECAM base {:#x} is not 1 MiB aligned", e.base);
    }
    let Some(end) = e.base.checked_add(1 << 20) else {
        fail!("ECAM base {:#x} wraps", e.base)
    };
    if !paging::is_mapped(e.base, 1 << 20) && paging::map_up_to(end) < end {
        fail!("ECAM at {:#x} cannot be mapped", e.base);
    }
    let mut found = [Func::default(); 64];
    let n = scan(&Ecam(e.base), &mut found)?;
    for f in &found[..n.min(64)] {
        print("ecam", f);
    }
    let Some(host) = found[..n.min(64)]
        .iter()
        .find(|f| f.dev == 0 && f.func == 0)
    else {
        fail!("no device at 00:00.0 (ECAM)");
    };
    if host.class >> 16 != 0x0600 {
        fail!(
            "00:00.0 is class {:02x}.{:02x}, not a host bridge (06.00)",
            host.class >> 24,
            (host.class >> 16) & 0xff
        );
    }

    // Configuration mechanism #1.
    let cf8_id = Cf8.read32(0, 0, 0);
    if cf8_id & 0xffff == 0xffff {
        diag!("0xcf8/0xcfc: no device at 00:00.0 (mechanism #1 absent)");
        if ctx.arg("tk.cf8") == Some("1") {
            fail!("tk.cf8=1 but 0xcf8/0xcfc does not reach the host bridge");
        }
        return Ok(());
    }
    let mut by_port = [Func::default(); 64];
    let m = scan(&Cf8, &mut by_port)?;
    for f in &by_port[..m.min(64)] {
        print("cf8 ", f);
    }
    if m != n
        || found[..n.min(64)]
            .iter()
            .zip(&by_port[..m.min(64)])
            .any(|(a, b)| (a.dev, a.func, a.id, a.class) != (b.dev, b.func, b.id, b.class))
    {
        fail!("0xcf8/0xcfc and ECAM disagree ({} and {} functions)", m, n);
    }
    diag!("{} function(s) on bus 0; ECAM and 0xcf8/0xcfc agree", n);
    Ok(())
}
