//! ACPI table discovery: RSDP (from the loader or by scanning the BIOS
//! area), then XSDT (or RSDT), every table's checksum checked.

use crate::paging;
use crate::rules::{checksum_ok, le32, le64};
use crate::x86::phys_read;

pub const MAX_TABLES: usize = 32;
/// Tables larger than this are refused (a guard against a bad length).
const MAX_TABLE_LEN: u32 = 1 << 20;

#[derive(Clone, Copy)]
pub struct Table {
    pub sig: [u8; 4],
    pub addr: u64,
    pub len: u32,
}

impl Table {
    /// The table's bytes.
    pub fn bytes(&self) -> &'static [u8] {
        // SAFETY: `discover` checked the whole table is mapped; ACPI tables
        // are in RAM (or reserved RAM) that nothing writes while we run.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len as usize) }
    }
}

pub struct Acpi {
    pub rsdp: u64,
    pub revision: u8,
    /// "XSDT" or "RSDT".
    pub root_sig: [u8; 4],
    pub root: u64,
    pub tables: [Table; MAX_TABLES],
    pub count: usize,
}

/// Reads a table header at `addr` and checks length and checksum.
fn load(addr: u64) -> Result<Table, &'static str> {
    if !paging::is_mapped(addr, 36) {
        return Err("ACPI table pointer outside the mapped range");
    }
    // SAFETY: the header was checked mapped.
    let (sig, len): ([u8; 4], u32) = unsafe { (phys_read(addr), phys_read(addr + 4)) };
    if !(36..=MAX_TABLE_LEN).contains(&len) || !paging::is_mapped(addr, u64::from(len)) {
        return Err("ACPI table length out of range");
    }
    let t = Table { sig, addr, len };
    if !checksum_ok(t.bytes()) {
        return Err("ACPI table checksum is wrong");
    }
    Ok(t)
}

fn rsdp_valid(addr: u64) -> bool {
    if !paging::is_mapped(addr, 36) {
        return false;
    }
    // SAFETY: checked mapped.
    let head = unsafe { core::slice::from_raw_parts(addr as *const u8, 20) };
    head.starts_with(b"RSD PTR ") && checksum_ok(head)
}

/// Looks for the RSDP in the EBDA's first KiB and in 0xe0000-0xfffff.
fn scan_rsdp() -> Option<u64> {
    // SAFETY: the BDA is in the first page, mapped.
    let ebda = u64::from(unsafe { phys_read::<u16>(0x40e) }) << 4;
    let ebda_range = if (0x8_0000..0xa_0000).contains(&ebda) {
        ebda..ebda + 1024
    } else {
        0..0
    };
    ebda_range
        .chain(0xe_0000..0x10_0000)
        .step_by(16)
        .find(|&a| {
            // SAFETY: low memory is mapped.
            let sig: [u8; 8] = unsafe { phys_read(a) };
            &sig == b"RSD PTR " && rsdp_valid(a)
        })
}

impl Acpi {
    /// Finds and checks the tables. `given` is the loader's RSDP pointer.
    pub fn discover(given: Option<u64>) -> Result<Acpi, &'static str> {
        let rsdp = match given {
            Some(a) if rsdp_valid(a) => a,
            Some(_) => return Err("RSDP from the loader is invalid (signature or checksum)"),
            None => scan_rsdp().ok_or("no RSDP (none given, none in the BIOS area)")?,
        };
        // SAFETY: rsdp_valid checked 36 bytes mapped.
        let head = unsafe { core::slice::from_raw_parts(rsdp as *const u8, 36) };
        let revision = head[15];
        let xsdt = if revision >= 2 {
            if !checksum_ok(head) {
                return Err("RSDP extended checksum is wrong");
            }
            le64(head, 24).filter(|&a| a != 0)
        } else {
            None
        };
        let (root, entry_size) = match xsdt {
            Some(a) => (a, 8),
            None => (u64::from(le32(head, 16).unwrap_or(0)), 4),
        };
        let root_t = load(root)?;
        let expect: &[u8; 4] = if entry_size == 8 { b"XSDT" } else { b"RSDT" };
        if &root_t.sig != expect {
            return Err("root table signature does not match the RSDP (XSDT/RSDT)");
        }
        let mut acpi = Acpi {
            rsdp,
            revision,
            root_sig: root_t.sig,
            root,
            tables: [Table {
                sig: [0; 4],
                addr: 0,
                len: 0,
            }; MAX_TABLES],
            count: 0,
        };
        let body = &root_t.bytes()[36..];
        for chunk in body.chunks_exact(entry_size) {
            let addr = if entry_size == 8 {
                le64(chunk, 0)
            } else {
                le32(chunk, 0).map(u64::from)
            };
            let t = load(addr.unwrap_or(0))?;
            if acpi.count == MAX_TABLES {
                return Err("more than 32 ACPI tables");
            }
            acpi.tables[acpi.count] = t;
            acpi.count += 1;
            // The DSDT hangs off the FADT.
            if &t.sig == b"FACP" {
                if let Some(f) = crate::rules::parse_fadt(t.bytes()) {
                    if acpi.count < MAX_TABLES {
                        acpi.tables[acpi.count] = load(f.dsdt)?;
                        acpi.count += 1;
                    }
                }
            }
        }
        Ok(acpi)
    }

    /// The first table with signature `sig`.
    pub fn find(&self, sig: &[u8; 4]) -> Option<Table> {
        self.tables[..self.count]
            .iter()
            .find(|t| &t.sig == sig)
            .copied()
    }

    /// Every table found.
    pub fn tables(&self) -> &[Table] {
        &self.tables[..self.count]
    }
}
