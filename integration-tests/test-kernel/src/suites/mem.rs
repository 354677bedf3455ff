//! mem: the memory map is sane and adds up to `tk.mem`; every RAM region's
//! last qword is really there (written, read back, restored).

use crate::bootinfo::E820_RAM;
use crate::rules::{self, check_memory_map, MapError, Region};
use crate::tap::Msg;
use crate::{diag, fail, paging, x86, Ctx};

fn kind_name(kind: u32) -> &'static str {
    match kind {
        1 => "RAM",
        2 => "reserved",
        3 => "ACPI",
        4 => "NVS",
        5 => "unusable",
        7 => "persistent",
        _ => "other",
    }
}

pub fn run(ctx: &Ctx) -> Result<(), Msg> {
    let boot = ctx.boot;
    if let Some(e) = boot.mem_error {
        fail!("{}", e);
    }
    let mut regions = [Region::default(); crate::bootinfo::MAX_MEM_ENTRIES];
    for (i, e) in boot.mem().iter().enumerate() {
        diag!(
            "memory map {:2}: {:#014x}-{:#014x} {} ({})",
            i,
            e.addr,
            e.end(),
            kind_name(e.kind),
            e.kind
        );
        regions[i] = Region {
            addr: e.addr,
            size: e.size,
            kind: e.kind,
        };
    }
    let map = &regions[..boot.mem_len];
    let summary = match check_memory_map(map) {
        Ok(s) => s,
        Err(MapError::BadEntry(i)) => fail!("entry {} wraps past 2^64", i),
        Err(MapError::Overlap(i, j)) => {
            fail!("RAM entry overlaps another: entries {} and {}", i, j)
        }
        Err(MapError::NoRam) => fail!("no RAM in the memory map"),
    };
    diag!(
        "RAM {} bytes ({} MiB) + legacy hole {} bytes = {} bytes",
        summary.ram,
        summary.ram >> 20,
        summary.legacy_hole,
        summary.total()
    );

    // The kernel itself must sit in RAM.
    extern "C" {
        static __kernel_start: u8;
        static __kernel_end: u8;
    }
    let (ks, ke) = (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    );
    if !map
        .iter()
        .any(|e| e.kind == E820_RAM && e.addr <= ks && ke <= e.addr + e.size)
    {
        fail!(
            "the kernel image {:#x}-{:#x} is not inside one RAM entry",
            ks,
            ke
        );
    }

    // Touch the last qword of every RAM region.
    for e in map.iter().filter(|e| e.kind == E820_RAM && e.size != 0) {
        let a = (e.addr + e.size - 8) & !7;
        if a < e.addr {
            continue; // a region smaller than 8 bytes
        }
        if !paging::is_mapped(a, 8) {
            fail!("RAM at {:#x} is beyond the kernel's identity map", a);
        }
        let pattern = 0x5a5a_0000_0000_a5a5 ^ a;
        // SAFETY: the address is RAM according to the map (the kernel image,
        // stacks and boot data are not in the last qword of a region, and the
        // old value is put back); no other CPU runs.
        let back = unsafe {
            let old: u64 = x86::mmio_read(a);
            x86::mmio_write(a, pattern);
            let back: u64 = x86::mmio_read(a);
            x86::mmio_write(a, old);
            back
        };
        if back != pattern {
            fail!(
                "RAM at {:#x} does not hold what was written ({:#x} read back)",
                a,
                back
            );
        }
    }

    match ctx.arg("tk.mem") {
        None => diag!("no tk.mem given: size not checked"),
        Some(s) => {
            let Some(want) = rules::parse_size(s) else {
                fail!("tk.mem={} is not a size", s)
            };
            if summary.total() != want {
                fail!(
                    "memory map totals {} bytes (RAM {} + legacy hole {}), tk.mem is {}",
                    summary.total(),
                    summary.ram,
                    summary.legacy_hole,
                    want
                );
            }
        }
    }
    Ok(())
}
