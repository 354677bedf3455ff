//! Pure parsing and checking rules of the test kernel, free of hardware
//! access so that the host can unit-test them: the host crate
//! `integration-tests` compiles this file too (`#[path]`) and runs its tests.

/// Reads a little-endian u16 at `off`, if in bounds.
pub fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

/// Reads a little-endian u32 at `off`, if in bounds.
pub fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Reads a little-endian u64 at `off`, if in bounds.
pub fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// ACPI checksum: the bytes sum to 0 modulo 256.
pub fn checksum_ok(b: &[u8]) -> bool {
    // Eight bytes a step, in 16-bit lanes (ring 0 is emulated instruction
    // by instruction on the development machines, and the DSDT is KiBs):
    // a step adds at most 2 * 255 to a lane, so 128 steps cannot carry out
    // of it; a lane's low byte is its sum mod 256.
    const LANES: u64 = 0x00ff_00ff_00ff_00ff;
    let mut words = b.chunks_exact(8);
    let mut sum = 0u8;
    loop {
        let (mut lanes, mut steps) = (0u64, 0);
        for w in words.by_ref().take(128) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(w);
            let w = u64::from_le_bytes(bytes);
            lanes += (w & LANES) + ((w >> 8) & LANES);
            steps += 1;
        }
        let l = lanes.to_le_bytes();
        sum = sum
            .wrapping_add(l[0])
            .wrapping_add(l[2])
            .wrapping_add(l[4])
            .wrapping_add(l[6]);
        if steps < 128 {
            break;
        }
    }
    words
        .remainder()
        .iter()
        .fold(sum, |acc, &x| acc.wrapping_add(x))
        == 0
}

/// The value of `key=value` among the whitespace-separated words of a
/// command line; a bare `key` gives `Some("")`; the last occurrence wins.
pub fn cmdline_arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    let mut found = None;
    for word in cmdline.split_ascii_whitespace() {
        match word.split_once('=') {
            Some((k, v)) if k == key => found = Some(v),
            None if word == key => found = Some(""),
            _ => {}
        }
    }
    found
}

/// Parses a size: decimal or 0x-hex bytes, with an optional K, M, G or T
/// suffix (powers of 1024). None on junk or overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        b'T' | b't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n = match num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => num.parse::<u64>().ok()?,
    };
    n.checked_mul(1u64 << shift)
}

/// One memory map entry: [addr, addr + size), E820 type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// E820 type of usable RAM.
pub const RAM: u32 = 1;
/// Start of the memory above the legacy area.
pub const ONE_MIB: u64 = 0x10_0000;

/// What the memory map adds up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemSummary {
    /// Bytes in RAM entries.
    pub ram: u64,
    /// The legacy hole [end of the RAM entry at 0, 1 MiB) when that entry
    /// ends below 1 MiB (VGA/BIOS area, reserved on every PC); else 0.
    pub legacy_hole: u64,
}

impl MemSummary {
    /// The memory size the VM was given, by the kernel's rule: RAM entries
    /// plus the legacy hole; nothing else may be missing.
    pub fn total(&self) -> u64 {
        self.ram.saturating_add(self.legacy_hole)
    }
}

/// A defect of a memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// An entry that wraps past 2^64 (index).
    BadEntry(usize),
    /// A RAM entry overlaps another entry (indices).
    Overlap(usize, usize),
    /// No RAM at all.
    NoRam,
}

/// Checks a memory map (any order) and sums it up: no entry wraps past
/// 2^64, and no RAM entry overlaps any other entry. Empty entries (QEMU's
/// qboot adds one) are ignored, as Linux ignores them.
pub fn check_memory_map(map: &[Region]) -> Result<MemSummary, MapError> {
    for (i, e) in map.iter().enumerate() {
        if e.addr.checked_add(e.size).is_none() {
            return Err(MapError::BadEntry(i));
        }
    }
    for (i, a) in map.iter().enumerate() {
        if a.kind != RAM || a.size == 0 {
            continue;
        }
        for (j, b) in map.iter().enumerate() {
            if i != j && b.size != 0 && a.addr < b.addr + b.size && b.addr < a.addr + a.size {
                return Err(MapError::Overlap(i.min(j), i.max(j)));
            }
        }
    }
    let ram: u64 = map.iter().filter(|e| e.kind == RAM).map(|e| e.size).sum();
    if ram == 0 {
        return Err(MapError::NoRam);
    }
    let legacy_hole = map
        .iter()
        .find(|e| e.kind == RAM && e.addr == 0 && e.size != 0)
        .map(|e| e.addr + e.size)
        .filter(|&end| end < ONE_MIB)
        .map_or(0, |end| ONE_MIB - end);
    Ok(MemSummary { ram, legacy_hole })
}

/// A CPU listed in the MADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MadtCpu {
    pub apic_id: u32,
    /// Flags bit 0: enabled (bit 1, online capable, is not "present").
    pub enabled: bool,
}

/// The first IOAPIC (type 1) of a MADT given as the whole table: its
/// address and GSI base.
pub fn madt_ioapic(t: &[u8]) -> Option<(u32, u32)> {
    let mut off = 44;
    while off + 2 <= t.len() {
        let len = usize::from(t[off + 1]);
        if len < 2 || off + len > t.len() {
            return None;
        }
        let e = &t[off..off + len];
        if e[0] == 1 && len >= 12 {
            return Some((le32(e, 4)?, le32(e, 8)?));
        }
        off += len;
    }
    None
}

/// Calls `f` for each CPU (types 0 and 9) of a MADT given as the whole
/// table; returns the local APIC address, or None if the table is short or
/// an entry's length is bad.
pub fn parse_madt(t: &[u8], mut f: impl FnMut(MadtCpu)) -> Option<u32> {
    let lapic = le32(t, 36)?;
    let mut off = 44;
    while off + 2 <= t.len() {
        let kind = t[off];
        let len = usize::from(t[off + 1]);
        if len < 2 || off + len > t.len() {
            return None;
        }
        let e = &t[off..off + len];
        match kind {
            0 if len >= 8 => f(MadtCpu {
                apic_id: u32::from(e[3]),
                enabled: le32(e, 4)? & 1 != 0,
            }),
            9 if len >= 16 => f(MadtCpu {
                apic_id: le32(e, 4)?,
                enabled: le32(e, 8)? & 1 != 0,
            }),
            _ => {}
        }
        off += len;
    }
    Some(lapic)
}

/// One MCFG allocation: ECAM base for a segment's bus range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McfgEntry {
    pub base: u64,
    pub segment: u16,
    pub bus_start: u8,
    pub bus_end: u8,
}

/// Calls `f` for each MCFG allocation (the table starts at offset 0).
pub fn parse_mcfg(t: &[u8], mut f: impl FnMut(McfgEntry)) {
    let mut off = 44;
    while off + 16 <= t.len() {
        if let (Some(base), Some(segment)) = (le64(t, off), le16(t, off + 8)) {
            f(McfgEntry {
                base,
                segment,
                bus_start: t[off + 10],
                bus_end: t[off + 11],
            });
        }
        off += 16;
    }
}

/// An ACPI generic address structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gas {
    /// 0 = system memory, 1 = system I/O.
    pub space: u8,
    pub bit_width: u8,
    pub bit_offset: u8,
    /// 0 = undefined (use bit_width), 1 = byte ... 4 = qword.
    pub access_size: u8,
    pub address: u64,
}

impl Gas {
    /// Reads a GAS at `off`; None when out of bounds or the address is 0.
    pub fn parse(b: &[u8], off: usize) -> Option<Gas> {
        let g = Gas {
            space: *b.get(off)?,
            bit_width: *b.get(off + 1)?,
            bit_offset: *b.get(off + 2)?,
            access_size: *b.get(off + 3)?,
            address: le64(b, off + 4)?,
        };
        (g.address != 0).then_some(g)
    }

    /// Access width in bytes (1, 2, 4 or 8).
    pub fn width(&self) -> u8 {
        match self.access_size {
            1 => 1,
            2 => 2,
            3 => 4,
            4 => 8,
            _ => match self.bit_width {
                0..=8 => 1,
                9..=16 => 2,
                17..=32 => 4,
                _ => 8,
            },
        }
    }
}

/// What poweroff needs from the FADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FadtInfo {
    /// Flags bit 20: HW_REDUCED_ACPI.
    pub hw_reduced: bool,
    /// SLEEP_CONTROL_REG (offset 244; FADT revision 5+).
    pub sleep_control: Option<Gas>,
    /// PM1a control block: X_PM1a_CNT_BLK (offset 172) or PM1a_CNT_BLK (64).
    pub pm1a_control: Option<Gas>,
    /// X_DSDT (140) or DSDT (40).
    pub dsdt: u64,
}

/// Parses the FADT fields poweroff needs from the whole table.
pub fn parse_fadt(t: &[u8]) -> Option<FadtInfo> {
    let flags = le32(t, 112).unwrap_or(0);
    let pm1a = Gas::parse(t, 172).or_else(|| {
        let port = le32(t, 64)?;
        (port != 0).then_some(Gas {
            space: 1,
            bit_width: 16,
            bit_offset: 0,
            access_size: 2,
            address: u64::from(port),
        })
    });
    let dsdt = le64(t, 140)
        .filter(|&a| a != 0)
        .or_else(|| le32(t, 40).map(u64::from))?;
    Some(FadtInfo {
        hw_reduced: flags & (1 << 20) != 0,
        sleep_control: Gas::parse(t, 244),
        pm1a_control: pm1a,
        dsdt,
    })
}

/// Finds the S5 sleep type (first element of `Name(_S5_, Package(){...})`)
/// in AML bytes by pattern: `_S5_` PackageOp PkgLength NumElements then a
/// ZeroOp, OneOp or BytePrefix value.
pub fn find_s5_sleep_type(aml: &[u8]) -> Option<u8> {
    let pos = aml.windows(5).position(|w| w == b"_S5_\x12")?;
    let mut i = pos + 5;
    let lead = *aml.get(i)?;
    i += 1 + usize::from(lead >> 6); // PkgLength: 1 + (bits 7:6) bytes
    i += 1; // NumElements
    match *aml.get(i)? {
        0x00 => Some(0),
        0x01 => Some(1),
        0x0a => aml.get(i + 1).copied(),
        _ => None,
    }
}

/// Which tests the command line selects, by name, from `tk.tests=a,b,c`.
/// None means all.
pub fn selected(cmdline: &str) -> Option<impl Iterator<Item = &str>> {
    cmdline_arg(cmdline, "tk.tests").map(|v| v.split(',').filter(|s| !s.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_args() {
        let c = "console=ttyS0 tk.tests=mem,smp  tk.echo=abc tk.flag tk.echo=def";
        assert_eq!(cmdline_arg(c, "tk.tests"), Some("mem,smp"));
        assert_eq!(cmdline_arg(c, "tk.echo"), Some("def"));
        assert_eq!(cmdline_arg(c, "tk.flag"), Some(""));
        assert_eq!(cmdline_arg(c, "tk.mem"), None);
        assert_eq!(cmdline_arg(c, "tk"), None);
        let sel: Vec<&str> = selected(c).unwrap().collect();
        assert_eq!(sel, ["mem", "smp"]);
        assert!(selected("quiet").is_none());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("134217728"), Some(128 << 20));
        assert_eq!(parse_size("128M"), Some(128 << 20));
        assert_eq!(parse_size("3g"), Some(3 << 30));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("12x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    fn r(addr: u64, size: u64, kind: u32) -> Region {
        Region { addr, size, kind }
    }

    #[test]
    fn memory_map_rule() {
        // Firecracker/QEMU style: low RAM to 639 KiB, hole to 1 MiB.
        let map = [
            r(0, 0x9fc00, RAM),
            r(0x9fc00, 0x400, 2),
            r(0xf0000, 0x10000, 2),
            r(ONE_MIB, (128 << 20) - ONE_MIB, RAM),
        ];
        let s = check_memory_map(&map).unwrap();
        assert_eq!(s.legacy_hole, ONE_MIB - 0x9fc00);
        assert_eq!(s.total(), 128 << 20);
        // RAM reported everywhere: no hole.
        let map = [r(0, 128 << 20, RAM)];
        assert_eq!(
            check_memory_map(&map).unwrap(),
            MemSummary {
                ram: 128 << 20,
                legacy_hole: 0
            }
        );
        // Above 4 GiB, with an MMIO hole that is not counted.
        let map = [
            r(0, 3 << 30, RAM),
            r(0xfee0_0000, 0x1000, 2),
            r(4 << 30, 1 << 30, RAM),
        ];
        assert_eq!(check_memory_map(&map).unwrap().total(), 4 << 30);
        // A RAM entry overlapping a reserved one.
        let map = [r(0, 0x10_0000, RAM), r(0xf_0000, 0x1000, 2)];
        assert_eq!(check_memory_map(&map), Err(MapError::Overlap(0, 1)));
        // Overlapping RAM entries.
        let map = [r(ONE_MIB, 0x1000, RAM), r(0, 0x10_0800, RAM)];
        assert_eq!(check_memory_map(&map), Err(MapError::Overlap(0, 1)));
        // Reserved entries may overlap each other.
        let map = [
            r(0, 0x1000, RAM),
            r(0x2000, 0x1000, 2),
            r(0x2800, 0x1000, 3),
        ];
        assert!(check_memory_map(&map).is_ok());
        // Empty entries are ignored (qboot), even at 0 or inside RAM.
        let map = [r(0, 0x1000, RAM), r(0, 0, 0), r(0x800, 0, 2)];
        assert_eq!(check_memory_map(&map).unwrap().ram, 0x1000);
        assert_eq!(check_memory_map(&[r(0, 0, RAM)]), Err(MapError::NoRam));
        assert_eq!(
            check_memory_map(&[r(u64::MAX, 2, RAM)]),
            Err(MapError::BadEntry(0))
        );
        assert_eq!(check_memory_map(&[r(0, 10, 2)]), Err(MapError::NoRam));
        // A missing low page is not excused by the rule.
        let map = [r(0x1000, 0x9e000, RAM), r(ONE_MIB, 0x100000, RAM)];
        assert_eq!(check_memory_map(&map).unwrap().total(), 0x9e000 + 0x100000);
    }

    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(sig);
        t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
        t.extend_from_slice(&[0u8; 28]);
        t.extend_from_slice(body);
        let sum = t.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    #[test]
    fn checksum_matches_a_byte_by_byte_sum() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let bytes: Vec<u8> = (0..2100)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        for len in (0..bytes.len()).step_by(7).chain([1023, 1024, 1025, 2048]) {
            let mut b = bytes[..len].to_vec();
            if len == 0 {
                assert!(checksum_ok(&b));
                continue;
            }
            b[len - 1] = b[len - 1].wrapping_sub(naive_sum(&bytes[..len]));
            assert!(checksum_ok(&b), "length {len}");
            b[len - 1] ^= 0x10;
            assert!(!checksum_ok(&b), "length {len}, corrupted");
        }
        // All 0xff: every lane at its largest.
        let mut b = vec![0xffu8; 4096];
        let rest = naive_sum(&b[1..]);
        b[0] = 0u8.wrapping_sub(rest);
        assert!(checksum_ok(&b));
    }

    fn naive_sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn madt() {
        let mut body = Vec::new();
        body.extend_from_slice(&0xfee0_0000u32.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]); // cpu 0, apic 0, enabled
        body.extend_from_slice(&[0, 8, 1, 2, 2, 0, 0, 0]); // apic 2, online capable only
        body.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]); // IOAPIC
        let mut x2 = vec![9, 16, 0, 0];
        x2.extend_from_slice(&300u32.to_le_bytes());
        x2.extend_from_slice(&1u32.to_le_bytes());
        x2.extend_from_slice(&7u32.to_le_bytes());
        body.extend_from_slice(&x2);
        let t = table(b"APIC", &body);
        assert!(checksum_ok(&t));
        let mut cpus = Vec::new();
        assert_eq!(parse_madt(&t, |c| cpus.push(c)), Some(0xfee0_0000));
        assert_eq!(
            cpus,
            [
                MadtCpu {
                    apic_id: 0,
                    enabled: true
                },
                MadtCpu {
                    apic_id: 2,
                    enabled: false
                },
                MadtCpu {
                    apic_id: 300,
                    enabled: true
                }
            ]
        );
        assert_eq!(madt_ioapic(&t), Some((0xfec0_0000, 0)));
        // A zero-length entry would loop forever: rejected.
        let mut bad = t.clone();
        bad[45] = 0;
        assert_eq!(parse_madt(&bad, |_| {}), None);
        assert_eq!(madt_ioapic(&bad), None);
        // An entry running past the end.
        let mut bad = t.clone();
        bad[45] = 200;
        assert_eq!(parse_madt(&bad, |_| {}), None);
        let mut bad = t;
        bad[9] ^= 1;
        assert!(!checksum_ok(&bad));
    }

    #[test]
    fn mcfg() {
        let mut body = vec![0u8; 8];
        body.extend_from_slice(&0xe000_0000u64.to_le_bytes());
        body.extend_from_slice(&[0, 0, 0, 0xff, 0, 0, 0, 0]);
        let t = table(b"MCFG", &body);
        let mut v = Vec::new();
        parse_mcfg(&t, |e| v.push(e));
        assert_eq!(
            v,
            [McfgEntry {
                base: 0xe000_0000,
                segment: 0,
                bus_start: 0,
                bus_end: 0xff
            }]
        );
    }

    #[test]
    fn fadt_and_gas() {
        let mut t = vec![0u8; 276];
        t[112..116].copy_from_slice(&(1u32 << 20).to_le_bytes());
        t[140..148].copy_from_slice(&0x1234u64.to_le_bytes());
        // Sleep control: I/O port 0x3c0, 8 bits, byte access.
        t[244] = 1;
        t[245] = 8;
        t[247] = 1;
        t[248..256].copy_from_slice(&0x3c0u64.to_le_bytes());
        let f = parse_fadt(&t).unwrap();
        assert!(f.hw_reduced);
        assert_eq!(f.dsdt, 0x1234);
        let g = f.sleep_control.unwrap();
        assert_eq!((g.space, g.address, g.width()), (1, 0x3c0, 1));
        assert_eq!(f.pm1a_control, None);
        // Old FADT: PM1a_CNT_BLK port, 32-bit DSDT.
        let mut t = vec![0u8; 116];
        t[40..44].copy_from_slice(&0x5678u32.to_le_bytes());
        t[64..68].copy_from_slice(&0x604u32.to_le_bytes());
        let f = parse_fadt(&t).unwrap();
        assert!(!f.hw_reduced);
        assert_eq!(f.dsdt, 0x5678);
        assert_eq!(f.sleep_control, None);
        assert_eq!(f.pm1a_control.unwrap().address, 0x604);
        assert_eq!(f.pm1a_control.unwrap().width(), 2);
        assert_eq!(parse_fadt(&[0u8; 20]), None);
    }

    #[test]
    fn s5() {
        assert_eq!(
            find_s5_sleep_type(b"xx\x08_S5_\x12\x06\x04\x0a\x05\x00\x00\x00"),
            Some(5)
        );
        assert_eq!(
            find_s5_sleep_type(b"\x08_S5_\x12\x05\x04\x00\x00\x00\x00"),
            Some(0)
        );
        assert_eq!(find_s5_sleep_type(b"\x08_S5_\x12\x45\x00\x04\x01"), Some(1));
        assert_eq!(find_s5_sleep_type(b"\x08_S5_\x12"), None);
        assert_eq!(find_s5_sleep_type(b"\x08_S4_\x12\x06\x04\x0a\x05"), None);
    }
}
