//! The guest's view of a passthrough device's MSI-X: the capability's
//! control word and a shadow of the vector table. The real table is
//! programmed by the host kernel (VFIO_DEVICE_SET_IRQS); what the guest
//! writes only decides where each vector's eventfd is routed.

/// Message Control: MSI-X enable.
const CTRL_ENABLE: u16 = 1 << 15;
/// Message Control: function mask.
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Message Control: table size - 1.
const CTRL_TABLE_SIZE: u16 = 0x7ff;
/// Bytes of a table entry.
const ENTRY_LEN: usize = 16;
const ENTRY_SIZE: u64 = ENTRY_LEN as u64;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;
const PAGE_SIZE: u64 = 4096;

/// MSI-X state of one device.
#[derive(Debug, Clone)]
pub(super) struct Msix {
    /// Offset of the capability in configuration space.
    pub cap: u16,
    control: u16,
    /// BAR holding the table, and the table's offset in it.
    pub table_bar: usize,
    pub table_offset: u64,
    /// BAR holding the pending-bit array, and its offset.
    pub pba_bar: usize,
    pub pba_offset: u64,
    entries: Vec<[u8; ENTRY_LEN]>,
}

impl Msix {
    /// Parses the capability at `cap` of a 256-byte configuration space.
    /// Every vector starts masked, MSI-X disabled.
    pub fn parse(cap: u16, raw: &[u8; 256]) -> Option<Self> {
        let o = usize::from(cap);
        let u16_at = |o: usize| Some(u16::from_le_bytes([*raw.get(o)?, *raw.get(o + 1)?]));
        let u32_at = |o: usize| {
            Some(u32::from_le_bytes([
                *raw.get(o)?,
                *raw.get(o + 1)?,
                *raw.get(o + 2)?,
                *raw.get(o + 3)?,
            ]))
        };
        let control = u16_at(o + 2)? & CTRL_TABLE_SIZE;
        let table = u32_at(o + 4)?;
        let pba = u32_at(o + 8)?;
        let n = usize::from(control & CTRL_TABLE_SIZE) + 1;
        let mut masked = [0u8; ENTRY_LEN];
        masked[12] = 1;
        Some(Self {
            cap,
            control,
            table_bar: (table & 0x7) as usize,
            table_offset: u64::from(table & !0x7),
            pba_bar: (pba & 0x7) as usize,
            pba_offset: u64::from(pba & !0x7),
            entries: vec![masked; n],
        })
    }

    /// Number of vectors.
    pub fn vectors(&self) -> usize {
        self.entries.len()
    }

    /// MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.control & CTRL_ENABLE != 0
    }

    fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    fn pba_len(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// Whether `[offset, offset + len)` of BAR `bar` touches the table.
    pub fn in_table(&self, bar: usize, offset: u64, len: usize) -> bool {
        bar == self.table_bar
            && offset < self.table_offset + self.table_len()
            && offset + len as u64 > self.table_offset
    }

    /// Page-rounded ranges `(bar, start, end)` that must stay trapped (not
    /// mapped into the guest): the table, and the PBA.
    pub fn holes(&self) -> [(usize, u64, u64); 2] {
        let round = |start: u64, len: u64| {
            (
                start / PAGE_SIZE * PAGE_SIZE,
                (start + len).div_ceil(PAGE_SIZE) * PAGE_SIZE,
            )
        };
        let (ts, te) = round(self.table_offset, self.table_len());
        let (ps, pe) = round(self.pba_offset, self.pba_len());
        [(self.table_bar, ts, te), (self.pba_bar, ps, pe)]
    }

    /// The capability's header dword as the guest reads it: the device's
    /// id and next pointer, the shadowed control word.
    pub fn read_header(&self, hw_header: u32) -> u32 {
        (hw_header & 0xffff) | u32::from(self.control) << 16
    }

    /// A guest write of the control word (only enable and function mask are
    /// writable). Returns whether anything changed.
    pub fn write_control(&mut self, value: u16) -> bool {
        let writable = CTRL_ENABLE | CTRL_FUNCTION_MASK;
        let new = (self.control & !writable) | (value & writable);
        let changed = new != self.control;
        self.control = new;
        changed
    }

    /// A guest read of the table at `offset` in its BAR.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.table_byte(offset + i as u64).unwrap_or(0xff);
        }
    }

    fn table_byte(&self, offset: u64) -> Option<u8> {
        let rel = offset.checked_sub(self.table_offset)?;
        let entry = self.entries.get(usize::try_from(rel / ENTRY_SIZE).ok()?)?;
        entry.get(usize::try_from(rel % ENTRY_SIZE).ok()?).copied()
    }

    /// A guest write of the table at `offset` in its BAR; returns the
    /// vectors it touched, in order.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<usize> {
        let mut touched: Vec<usize> = Vec::new();
        for (i, b) in data.iter().enumerate() {
            let Some(rel) = (offset + i as u64).checked_sub(self.table_offset) else {
                continue;
            };
            let (Ok(v), Ok(byte)) = (
                usize::try_from(rel / ENTRY_SIZE),
                usize::try_from(rel % ENTRY_SIZE),
            ) else {
                continue;
            };
            if let Some(slot) = self.entries.get_mut(v).and_then(|e| e.get_mut(byte)) {
                *slot = *b;
                if touched.last() != Some(&v) {
                    touched.push(v);
                }
            }
        }
        touched
    }

    /// Where vector `v` must be delivered now: `(address, data)` when MSI-X
    /// is enabled, the function is not masked and the vector is not masked.
    pub fn route_of(&self, v: usize) -> Option<(u64, u32)> {
        let e = self.entries.get(v)?;
        let word = |o: usize| u32::from_le_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]);
        let live = self.enabled()
            && self.control & CTRL_FUNCTION_MASK == 0
            && word(12) & VECTOR_MASKED == 0;
        live.then(|| (u64::from(word(0)) | u64::from(word(4)) << 32, word(8)))
    }
}

/// Removes the `holes` of BAR `bar` from the mappable `(offset, size)`
/// areas, keeping page-aligned pieces.
pub(super) fn subtract_holes(
    bar: usize,
    areas: Vec<(u64, u64)>,
    holes: &[(usize, u64, u64)],
) -> Vec<(u64, u64)> {
    let mut out = areas;
    for &(hbar, hs, he) in holes.iter().filter(|h| h.0 == bar) {
        debug_assert_eq!(hbar, bar);
        out = out
            .into_iter()
            .flat_map(|(off, size)| {
                let end = off + size;
                let mut pieces = Vec::new();
                if he <= off || hs >= end {
                    pieces.push((off, size));
                } else {
                    if hs > off {
                        pieces.push((off, hs - off));
                    }
                    if he < end {
                        pieces.push((he, end - he));
                    }
                }
                pieces
            })
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 vectors; table in BAR 1 at 0x2000, PBA in BAR 1 at 0x3000.
    fn msix() -> Msix {
        let mut raw = [0u8; 256];
        raw[0x50] = 0x11;
        raw[0x52..0x54].copy_from_slice(&3u16.to_le_bytes());
        raw[0x54..0x58].copy_from_slice(&(0x2000u32 | 1).to_le_bytes());
        raw[0x58..0x5c].copy_from_slice(&(0x3000u32 | 1).to_le_bytes());
        Msix::parse(0x50, &raw).expect("parse")
    }

    #[test]
    fn parses_the_capability() {
        let m = msix();
        assert_eq!(m.vectors(), 4);
        assert_eq!(
            (m.table_bar, m.table_offset, m.pba_bar, m.pba_offset),
            (1, 0x2000, 1, 0x3000)
        );
        assert!(!m.enabled());
        assert_eq!(m.read_header(0x0000_6011), 0x0003_6011);
        assert!(m.in_table(1, 0x2030, 4));
        assert!(!m.in_table(1, 0x2040, 4));
        assert!(!m.in_table(0, 0x2000, 4));
        assert_eq!(m.holes(), [(1, 0x2000, 0x3000), (1, 0x3000, 0x4000)]);
    }

    #[test]
    fn routes_follow_enable_function_mask_and_vector_mask() {
        let mut m = msix();
        // Vector 2: address 0xfee0_2000, data 0x41, unmasked.
        m.write_table(0x2020, &0xfee0_2000u32.to_le_bytes());
        m.write_table(0x2024, &0u32.to_le_bytes());
        assert_eq!(m.write_table(0x2028, &[0x41, 0, 0, 0, 0, 0, 0, 0]), vec![2]);
        assert_eq!(m.route_of(2), None, "MSI-X still disabled");
        assert!(m.write_control(CTRL_ENABLE | 0x7ff));
        assert_eq!(
            m.read_header(0x11) >> 16,
            u32::from(CTRL_ENABLE | 3),
            "table size read-only"
        );
        assert_eq!(m.route_of(2), Some((0xfee0_2000, 0x41)));
        assert_eq!(m.route_of(0), None, "masked since reset");
        assert!(m.write_control(CTRL_ENABLE | CTRL_FUNCTION_MASK));
        assert_eq!(m.route_of(2), None, "function masked");
        assert!(!m.write_control(CTRL_ENABLE | CTRL_FUNCTION_MASK));
        m.write_control(CTRL_ENABLE);
        m.write_table(0x202c, &1u32.to_le_bytes());
        assert_eq!(m.route_of(2), None, "vector masked");
        let mut b = [0u8; 4];
        m.read_table(0x2020, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xfee0_2000);
        m.read_table(0x2040, &mut b);
        assert_eq!(b, [0xff; 4], "past the table");
        assert!(m.write_table(0x2040, &[1, 2]).is_empty());
        assert_eq!(m.route_of(9), None);
    }

    #[test]
    fn holes_are_cut_out_of_mappable_areas() {
        let holes = [(1, 0x2000, 0x3000), (1, 0x3000, 0x4000)];
        assert_eq!(
            subtract_holes(1, vec![(0, 0x10000)], &holes),
            vec![(0, 0x2000), (0x4000, 0xc000)]
        );
        assert_eq!(
            subtract_holes(0, vec![(0, 0x10000)], &holes),
            vec![(0, 0x10000)]
        );
        assert_eq!(subtract_holes(1, vec![(0x2000, 0x2000)], &holes), vec![]);
    }

    #[test]
    fn a_truncated_capability_is_refused() {
        let raw = [0u8; 256];
        assert!(Msix::parse(0xfc, &raw).is_none());
    }
}
