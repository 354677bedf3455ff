//! The guest's x86-64 first-stage (S1) page table, as both S1 users read it:
//! the software backend walks it one IOVA at a time ([`walk`]), the IOMMUFD
//! backend's shadow walks every leaf of an IOVA range ([`for_each_leaf`]).
//! One set of entry rules serves both, so a page the software model
//! translates is a page the shadow maps, and the other way round.
//!
//! Entry rules (VT-d first-stage, requests without PASID): every level must
//! be present; a write needs R/W at every level; U/S must be set at every
//! level (DMA is a user-mode access); PS makes a 1 GiB leaf at level 3 and a
//! 2 MiB leaf at level 2 and is reserved at levels 4 and 5; bits
//! 51:phys_addr_width of every entry and the low reserved bits of a large
//! leaf (29:13, 20:13) must be zero. Accessed and dirty bits are not written.
//!
//! Every table address comes from the guest, so every read goes through a
//! [`TableMemory`] that answers only for guest RAM. A table may point
//! anywhere, itself included: walks are bounded by the paging depth and, for
//! range walks, by a read budget the caller gives.

use crate::backend::{PagingLevels, S1Config};
use crate::config::{PAGE_SHIFT, PAGE_SIZE};
use crate::ram;
use crate::translate::FaultReason;
use vm_memory::GuestMemory;

pub(crate) const PTE_P: u64 = 1 << 0;
pub(crate) const PTE_RW: u64 = 1 << 1;
pub(crate) const PTE_US: u64 = 1 << 2;
pub(crate) const PTE_PS: u64 = 1 << 7;

/// Entries per table.
const ENTRIES: usize = 512;

/// Guest memory as the walkers read it: 8-byte entries of tables in guest
/// RAM.
pub(crate) trait TableMemory {
    /// Reads `out.len()` consecutive entries at `gpa` (8-byte aligned, in
    /// one 4 KiB table); false if any of them is not in guest RAM.
    fn read_entries(&self, gpa: u64, out: &mut [u64]) -> bool;
}

/// A vm-memory `GuestMemory` as [`TableMemory`].
pub(crate) struct GuestTables<'a, M: ?Sized>(pub &'a M);

impl<M: GuestMemory + ?Sized> TableMemory for GuestTables<'_, M> {
    fn read_entries(&self, gpa: u64, out: &mut [u64]) -> bool {
        let mut buf = [0u8; 8 * ENTRIES];
        let Some(bytes) = buf.get_mut(..out.len() * 8) else {
            return false;
        };
        if !ram::read(self.0, gpa, bytes) {
            return false;
        }
        for (e, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            *e = u64::from_le_bytes(le);
        }
        true
    }
}

/// Masks that depend on the guest's physical address width.
#[derive(Clone, Copy)]
struct Masks {
    /// Address bits of an entry (12..width).
    addr: u64,
    /// Bits 51:width, reserved.
    reserved_high: u64,
}

impl Masks {
    fn new(phys_addr_width: u8) -> Self {
        let width = u32::from(phys_addr_width.clamp(12, 52));
        Self {
            addr: ((1u64 << width) - 1) & !(PAGE_SIZE - 1),
            reserved_high: ((1u64 << 52) - 1) & !((1u64 << width) - 1),
        }
    }
}

fn depth(levels: PagingLevels) -> u32 {
    match levels {
        PagingLevels::Four => 4,
        PagingLevels::Five => 5,
    }
}

/// One past the last IOVA a table of `levels` reaches (2^48 or 2^57).
pub(crate) fn reach(levels: PagingLevels) -> u64 {
    1u64 << (PAGE_SHIFT + 9 * depth(levels))
}

/// Bytes one entry of `level` covers.
fn span(level: u32) -> u64 {
    1u64 << (PAGE_SHIFT + 9 * (level - 1))
}

/// What one entry is, by the rules above.
enum Entry {
    /// Not present, or reserved bits set: nothing below it translates.
    Fault(FaultReason),
    /// The next table's GPA.
    Table(u64),
    /// A leaf of `span(level)` bytes at this GPA (aligned to its size).
    Leaf(u64),
}

fn decode(pte: u64, level: u32, masks: Masks) -> Entry {
    let lvl = u8::try_from(level).unwrap_or(u8::MAX);
    if pte & PTE_P == 0 {
        return Entry::Fault(FaultReason::S1NotPresent { level: lvl });
    }
    if pte & masks.reserved_high != 0 {
        return Entry::Fault(FaultReason::S1Reserved { level: lvl });
    }
    let large = level > 1 && pte & PTE_PS != 0;
    if large && level > 3 {
        return Entry::Fault(FaultReason::S1Reserved { level: lvl });
    }
    if level == 1 || large {
        let size_mask = span(level) - 1;
        // Bit 12 is PAT; bits size-1..13 of a large leaf are reserved.
        if large && pte & size_mask & !((1u64 << 13) - 1) != 0 {
            return Entry::Fault(FaultReason::S1Reserved { level: lvl });
        }
        return Entry::Leaf(pte & masks.addr & !size_mask);
    }
    Entry::Table(pte & masks.addr)
}

/// A leaf found by [`walk`]: the 4 KiB GPA page of the IOVA and the
/// effective rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct S1Leaf {
    pub gpa_page: u64,
    pub writable: bool,
    pub user: bool,
}

/// Walks the guest's table for one `iova`.
pub(crate) fn walk<T: TableMemory + ?Sized>(
    mem: &T,
    config: &S1Config,
    iova: u64,
    phys_addr_width: u8,
) -> Result<S1Leaf, FaultReason> {
    let levels = depth(config.levels);
    if iova >= reach(config.levels) {
        return Err(FaultReason::IovaOutOfRange);
    }
    let masks = Masks::new(phys_addr_width);
    let mut table = config.root;
    let (mut writable, mut user) = (true, true);
    for level in (1..=levels).rev() {
        let lvl = u8::try_from(level).unwrap_or(u8::MAX);
        let index = (iova >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF;
        let mut pte = [0u64];
        let read = table
            .checked_add(index * 8)
            .is_some_and(|gpa| mem.read_entries(gpa, &mut pte));
        if !read {
            return Err(FaultReason::S1TableOutsideRam { level: lvl });
        }
        let pte = pte[0];
        match decode(pte, level, masks) {
            Entry::Fault(reason) => return Err(reason),
            Entry::Table(next) => table = next,
            Entry::Leaf(base) => {
                writable &= pte & PTE_RW != 0;
                user &= pte & PTE_US != 0;
                let offset = iova & (span(level) - 1) & !(PAGE_SIZE - 1);
                return Ok(S1Leaf {
                    gpa_page: (base | offset) >> PAGE_SHIFT,
                    writable,
                    user,
                });
            }
        }
        writable &= pte & PTE_RW != 0;
        user &= pte & PTE_US != 0;
    }
    // Unreachable: level 1 is always a leaf or a fault.
    Err(FaultReason::S1NotPresent { level: 1 })
}

/// A usable piece of a leaf inside the walked range: `len` bytes at `iova`
/// translate to `gpa` (all page-aligned); readable (present), writable if
/// R/W is set at every level. Supervisor-only leaves are not reported (DMA
/// would fault on them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeafRange {
    pub iova: u64,
    pub gpa: u64,
    pub len: u64,
    pub writable: bool,
}

/// Why [`for_each_leaf`] stopped early.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LeafWalkError<E> {
    /// The read budget ran out (a table that loops back on itself, or a
    /// range with more entries than the caller allows).
    ReadBudget,
    /// The callback stopped the walk.
    Stopped(E),
}

#[derive(Clone, Copy)]
struct Frame {
    level: u32,
    /// IOVA of entry 0 of this table.
    base: u64,
    /// Next entry to look at.
    next: usize,
    /// One past the last entry inside the walked range.
    stop: usize,
    writable: bool,
    entries: [u64; ENTRIES],
}

/// Calls `f` for every usable leaf of `config`'s table that overlaps
/// `[start, end)` (page-aligned), clipped to the range, in ascending IOVA
/// order. Entries that would fault (not present, reserved bits, a table
/// outside guest RAM, U/S clear) are skipped with their whole subtree, so
/// the work is proportional to the present entries in the range, never to
/// its size. Every entry read costs one unit of `reads_left`; when it runs
/// out the walk stops with [`LeafWalkError::ReadBudget`], which bounds a
/// walk of a table that points back at itself.
pub(crate) fn for_each_leaf<T: TableMemory + ?Sized, E>(
    mem: &T,
    config: &S1Config,
    start: u64,
    end: u64,
    phys_addr_width: u8,
    reads_left: &mut u64,
    mut f: impl FnMut(LeafRange) -> Result<(), E>,
) -> Result<(), LeafWalkError<E>> {
    let end = end.min(reach(config.levels));
    if start >= end {
        return Ok(());
    }
    let masks = Masks::new(phys_addr_width);
    let top = depth(config.levels);
    // The frames of the current path, root first; at most 5 deep.
    let mut stack: Vec<Frame> = Vec::with_capacity(5);
    // Enters the table at `table` whose entry 0 maps `base`: reads the
    // entries that overlap the range, charged to the budget. None if the
    // table is not in guest RAM (its whole subtree would fault).
    let enter = |table: u64,
                 level: u32,
                 base: u64,
                 writable: bool,
                 reads_left: &mut u64|
     -> Result<Option<Frame>, LeafWalkError<E>> {
        let sp = span(level);
        let first = if start > base {
            usize::try_from((start - base) / sp).unwrap_or(ENTRIES)
        } else {
            0
        };
        let stop = usize::try_from((end - 1 - base.min(end - 1)) / sp)
            .unwrap_or(ENTRIES)
            .min(ENTRIES - 1)
            + 1;
        let count = stop.saturating_sub(first);
        let cost = u64::try_from(count).unwrap_or(u64::MAX);
        if *reads_left < cost {
            *reads_left = 0;
            return Err(LeafWalkError::ReadBudget);
        }
        *reads_left -= cost;
        let mut frame = Frame {
            level,
            base,
            next: first,
            stop,
            writable,
            entries: [0; ENTRIES],
        };
        let gpa = table.checked_add(u64::try_from(first).unwrap_or(0) * 8);
        let ok = count > 0
            && gpa.is_some_and(|gpa| mem.read_entries(gpa, &mut frame.entries[first..stop]));
        Ok(ok.then_some(frame))
    };
    if let Some(root) = enter(config.root, top, 0, true, reads_left)? {
        stack.push(root);
    }
    while let Some(frame) = stack.last_mut() {
        if frame.next >= frame.stop {
            stack.pop();
            continue;
        }
        let index = frame.next;
        frame.next += 1;
        let pte = frame.entries[index];
        let level = frame.level;
        let sp = span(level);
        let entry_iova = frame.base + u64::try_from(index).unwrap_or(0) * sp;
        let writable = frame.writable && pte & PTE_RW != 0;
        // U/S clear anywhere on the path: nothing below is usable by DMA.
        if pte & PTE_US == 0 {
            continue;
        }
        match decode(pte, level, masks) {
            Entry::Fault(_) => {}
            Entry::Table(next) => {
                if let Some(child) = enter(next, level - 1, entry_iova, writable, reads_left)? {
                    stack.push(child);
                }
            }
            Entry::Leaf(gpa) => {
                let lo = entry_iova.max(start);
                let hi = entry_iova.saturating_add(sp).min(end);
                f(LeafRange {
                    iova: lo,
                    gpa: gpa + (lo - entry_iova),
                    len: hi - lo,
                    writable,
                })
                .map_err(LeafWalkError::Stopped)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const F: u64 = PTE_P | PTE_RW | PTE_US;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("memory")
    }

    fn pte(m: &GuestMemoryMmap<()>, table: u64, index: u64, value: u64) {
        m.write_obj(value, GuestAddress(table + index * 8))
            .expect("pte");
    }

    fn cfg(root: u64) -> S1Config {
        S1Config {
            root,
            levels: PagingLevels::Four,
            translation_enabled: true,
            blocked: false,
        }
    }

    fn leaves(m: &GuestMemoryMmap<()>, c: &S1Config, start: u64, end: u64) -> Vec<LeafRange> {
        let mut v = vec![];
        let mut budget = 1 << 20;
        for_each_leaf(&GuestTables(m), c, start, end, 46, &mut budget, |l| {
            v.push(l);
            Ok::<(), ()>(())
        })
        .expect("walk");
        v
    }

    #[test]
    fn range_walk_agrees_with_single_walks_and_clips_large_leaves() {
        let m = mem();
        let (pml4, pdpt, pd, pt) = (0x10000, 0x11000, 0x12000, 0x13000);
        pte(&m, pml4, 0, pdpt | F);
        pte(&m, pdpt, 1, pd | F);
        pte(&m, pd, 0, pt | F);
        pte(&m, pt, 3, 0x20_0000 | F);
        pte(&m, pt, 4, 0x30_0000 | PTE_P | PTE_US); // read-only
        pte(&m, pt, 5, 0x31_0000 | PTE_P | PTE_RW); // supervisor-only
        pte(&m, pd, 1, 0x60_0000 | F | PTE_PS); // 2 MiB
        pte(&m, pdpt, 2, F | PTE_PS); // 1 GiB at GPA 0
        let c = cfg(pml4);
        let got = leaves(&m, &c, 0, 1 << 48);
        let l = |iova: u64, gpa: u64, len: u64, writable| LeafRange {
            iova,
            gpa,
            len,
            writable,
        };
        assert_eq!(
            got,
            [
                l(0x4000_3000, 0x20_0000, 0x1000, true),
                l(0x4000_4000, 0x30_0000, 0x1000, false),
                l(0x4020_0000, 0x60_0000, 0x20_0000, true),
                l(0x8000_0000, 0, 0x4000_0000, true),
            ]
        );
        for leaf in &got {
            let w = walk(&GuestTables(&m), &c, leaf.iova, 46).expect("walk");
            assert_eq!(w.gpa_page << PAGE_SHIFT, leaf.gpa);
        }
        // Clipped to the range, inside a 2 MiB and a 1 GiB leaf.
        assert_eq!(
            leaves(&m, &c, 0x4020_1000, 0x4020_3000),
            [l(0x4020_1000, 0x60_1000, 0x2000, true)]
        );
        assert_eq!(
            leaves(&m, &c, 0x8000_5000, 0x8000_6000),
            [l(0x8000_5000, 0x5000, 0x1000, true)]
        );
        assert!(leaves(&m, &c, 0x4000_5000, 0x4020_0000).is_empty());
    }

    #[test]
    fn a_sparse_range_reads_few_entries() {
        let m = mem();
        let (pml4, pdpt, pd, pt) = (0x10000, 0x11000, 0x12000, 0x13000);
        pte(&m, pml4, 0, pdpt | F);
        pte(&m, pdpt, 0, pd | F);
        pte(&m, pd, 0, pt | F);
        pte(&m, pt, 0, 0x20_0000 | F);
        let mut budget = u64::MAX;
        let mut n = 0;
        for_each_leaf(
            &GuestTables(&m),
            &cfg(pml4),
            0,
            1 << 30,
            46,
            &mut budget,
            |_| {
                n += 1;
                Ok::<(), ()>(())
            },
        )
        .expect("walk");
        assert_eq!(n, 1);
        // 1 PML4 + 1 PDPT + 512 PD + 512 PT entries.
        assert_eq!(u64::MAX - budget, 1 + 1 + 512 + 512);
    }

    #[test]
    fn a_table_pointing_at_itself_exhausts_the_budget() {
        let m = mem();
        let pml4 = 0x10000;
        for i in 0..512 {
            pte(&m, pml4, i, pml4 | F);
        }
        let mut budget = 100_000;
        let mut n = 0u64;
        let r = for_each_leaf(
            &GuestTables(&m),
            &cfg(pml4),
            0,
            1 << 48,
            46,
            &mut budget,
            |_| {
                n += 1;
                Ok::<(), ()>(())
            },
        );
        assert_eq!(r, Err(LeafWalkError::ReadBudget));
        assert!(n <= 100_000);
        // The single walk of one IOVA ends after 4 levels.
        let leaf = walk(&GuestTables(&m), &cfg(pml4), 0x1234_5000, 46).expect("walk");
        assert_eq!(leaf.gpa_page << PAGE_SHIFT, pml4);
    }
}
