//! What the loader told us, from either boot protocol, copied into the
//! kernel so that the loader's pages can be reused (the AP trampoline).
//!
//! The loader is the system under test: every pointer and count it gives is
//! checked, and a bad one is recorded as an error for the tests to report.

use crate::paging;
use crate::rules::{le32, le64};
use crate::x86::{phys_bytes, phys_read};

/// Boot protocol entry kinds passed by boot.S.
pub const BOOT_PVH: u64 = 1;
pub const BOOT_LINUX64: u64 = 2;

pub const MAX_MEM_ENTRIES: usize = 128;
pub const MAX_CMDLINE: usize = 4096;
/// Boot-data ranges the AP trampoline must not overwrite.
pub const MAX_RESERVED: usize = 8;

/// hvm_start_info magic.
const PVH_MAGIC: u32 = 0x336e_c578;

/// E820 / PVH memory map types.
pub const E820_RAM: u32 = 1;

#[derive(Clone, Copy, Default)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemEntry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pvh,
    Linux64,
}

pub struct BootInfo {
    pub protocol: Protocol,
    /// Physical address of hvm_start_info or boot_params.
    pub info_addr: u64,
    pub mem: [MemEntry; MAX_MEM_ENTRIES],
    pub mem_len: usize,
    /// A problem with the memory map as given (count out of range, unmapped).
    pub mem_error: Option<&'static str>,
    pub cmdline: [u8; MAX_CMDLINE],
    pub cmdline_len: usize,
    pub cmdline_addr: u64,
    pub cmdline_error: Option<&'static str>,
    pub rsdp: Option<u64>,
    /// Ranges holding boot data: [start, end).
    pub reserved: [(u64, u64); MAX_RESERVED],
    pub reserved_len: usize,
}

impl BootInfo {
    fn empty(protocol: Protocol, info_addr: u64) -> Self {
        BootInfo {
            protocol,
            info_addr,
            mem: [MemEntry::default(); MAX_MEM_ENTRIES],
            mem_len: 0,
            mem_error: None,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            cmdline_addr: 0,
            cmdline_error: None,
            rsdp: None,
            reserved: [(0, 0); MAX_RESERVED],
            reserved_len: 0,
        }
    }

    /// The memory map entries.
    pub fn mem(&self) -> &[MemEntry] {
        &self.mem[..self.mem_len]
    }

    /// The command line (lossy: invalid UTF-8 gives an empty string, and the
    /// cmdline test reports it).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// The raw command line bytes.
    pub fn cmdline_bytes(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    fn reserve(&mut self, start: u64, len: u64) {
        if self.reserved_len < MAX_RESERVED && len > 0 {
            self.reserved[self.reserved_len] = (start, start.saturating_add(len));
            self.reserved_len += 1;
        }
    }

    /// Whether `[start, end)` overlaps boot data.
    pub fn overlaps_boot_data(&self, start: u64, end: u64) -> bool {
        self.reserved[..self.reserved_len]
            .iter()
            .any(|&(s, e)| start < e && s < end)
    }

    fn read_cmdline(&mut self, addr: u64) {
        self.cmdline_addr = addr;
        if addr == 0 {
            return; // no command line: empty
        }
        let mut len = 0;
        loop {
            let a = addr + len as u64;
            if !paging::is_mapped(a, 1) {
                self.cmdline_error = Some("command line not in mapped memory");
                break;
            }
            // SAFETY: checked mapped; the loader put the string in RAM.
            let b: u8 = unsafe { phys_read(a) };
            if b == 0 {
                break;
            }
            if len == MAX_CMDLINE {
                self.cmdline_error =
                    Some("command line longer than 4096 bytes or not NUL-terminated");
                break;
            }
            self.cmdline[len] = b;
            len += 1;
        }
        self.cmdline_len = len;
        self.reserve(addr, len as u64 + 1);
    }

    /// Copies `count` memory map entries of `stride` bytes (addr u64 @0,
    /// size u64 @8, type u32 @16) from `table`.
    fn read_map(&mut self, table: &[u8], count: usize, stride: usize) {
        for (i, e) in table.chunks_exact(stride).take(count).enumerate() {
            self.mem[i] = MemEntry {
                addr: le64(e, 0).unwrap_or(0),
                size: le64(e, 8).unwrap_or(0),
                kind: le32(e, 16).unwrap_or(0),
            };
        }
        self.mem_len = count.min(table.len() / stride);
    }

    /// Parses hvm_start_info at `addr` (PVH).
    pub fn from_pvh(addr: u64) -> Result<Self, &'static str> {
        const INFO_SIZE: usize = 56;
        const ENTRY: usize = 24;
        let mut bi = BootInfo::empty(Protocol::Pvh, addr);
        if addr == 0 || !paging::is_mapped(addr, INFO_SIZE as u64) {
            return Err("hvm_start_info pointer (EBX) is null or unmapped");
        }
        // SAFETY: checked mapped; the loader's structure stays untouched
        // while it is parsed.
        let info = unsafe { phys_bytes(addr, INFO_SIZE) };
        if le32(info, 0) != Some(PVH_MAGIC) {
            return Err("hvm_start_info magic is not 0x336ec578");
        }
        bi.reserve(addr, INFO_SIZE as u64);
        let rsdp = le64(info, 32).unwrap_or(0);
        bi.rsdp = (rsdp != 0).then_some(rsdp);
        bi.read_cmdline(le64(info, 24).unwrap_or(0));
        if le32(info, 4).unwrap_or(0) < 1 {
            bi.mem_error = Some("hvm_start_info version 0 has no memory map");
            return Ok(bi);
        }
        let map = le64(info, 40).unwrap_or(0);
        let count = le32(info, 48).unwrap_or(0) as usize;
        let bytes = (count * ENTRY) as u64;
        if map == 0 || count == 0 {
            bi.mem_error = Some("hvm_start_info has no memory map");
        } else if count > MAX_MEM_ENTRIES {
            bi.mem_error = Some("hvm_start_info memmap_entries > 128");
        } else if !paging::is_mapped(map, bytes) {
            bi.mem_error = Some("hvm_start_info memmap not in mapped memory");
        } else {
            // SAFETY: the table was checked mapped.
            let table = unsafe { phys_bytes(map, count * ENTRY) };
            bi.read_map(table, count, ENTRY);
            bi.reserve(map, bytes);
        }
        Ok(bi)
    }

    /// Parses boot_params (the zero page) at `addr` (Linux 64-bit boot).
    pub fn from_linux(addr: u64) -> Result<Self, &'static str> {
        const ZERO_PAGE: usize = 4096;
        const E820_TABLE: usize = 0x2d0;
        const ENTRY: usize = 20;
        let mut bi = BootInfo::empty(Protocol::Linux64, addr);
        if addr == 0 || !paging::is_mapped(addr, ZERO_PAGE as u64) {
            return Err("boot_params pointer (RSI) is null or unmapped");
        }
        bi.reserve(addr, ZERO_PAGE as u64);
        // SAFETY: the zero page was checked mapped and stays untouched while
        // it is parsed.
        let zp = unsafe { phys_bytes(addr, ZERO_PAGE) };
        let rsdp = le64(zp, 0x70).unwrap_or(0);
        bi.rsdp = (rsdp != 0).then_some(rsdp);
        let ext_cmdline = u64::from(le32(zp, 0xc8).unwrap_or(0));
        let cmdline = u64::from(le32(zp, 0x228).unwrap_or(0));
        bi.read_cmdline((ext_cmdline << 32) | cmdline);
        let count = usize::from(zp[0x1e8]);
        if count == 0 {
            bi.mem_error = Some("boot_params has no e820 entries");
        } else if count > MAX_MEM_ENTRIES {
            bi.mem_error = Some("boot_params e820_entries > 128");
        } else {
            bi.read_map(&zp[E820_TABLE..], count, ENTRY);
        }
        Ok(bi)
    }

    /// Highest end address of any RAM entry.
    pub fn ram_end(&self) -> u64 {
        self.mem()
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(MemEntry::end)
            .max()
            .unwrap_or(0)
    }
}
