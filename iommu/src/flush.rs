//! FLUSH_DEVICE_DOMAIN_LIST entries: decoding, merging into maximal exact
//! ranges, and the two Linux guest strategies (for comparisons).

use pviommu_abi::FlushListEntry;

/// A range of 4 KiB pages, `[start, end)` in page numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRange {
    /// First page number.
    pub start: u64,
    /// One past the last page number.
    pub end: u64,
}

impl PageRange {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.end - self.start
    }
}

/// Decodes one entry: the naturally aligned block of 2^shift pages at
/// page_number, clamped to the aperture `[0, 2^iova_width)`. `None` if the
/// block is not naturally aligned (the guest gets INVALID_PARAMETER). A
/// block reaching past the aperture is clamped to it, not refused: Linux's
/// empty gather arrives as (page 0, shift 52) and means the whole aperture;
/// a block wholly past it gives an empty range. The result's end is at most
/// 2^52 pages, so neither it nor (for widths up to 57) its byte address
/// overflows.
pub fn decode_entry(entry: FlushListEntry, iova_width: u8) -> Option<PageRange> {
    let shift = u32::from(entry.page_mask_shift()).min(64);
    let start = entry.page_number();
    let misaligned = if shift < 64 {
        start & ((1u64 << shift) - 1) != 0
    } else {
        start != 0
    };
    if misaligned {
        return None;
    }
    let aperture = 1u128 << u32::from(iova_width.saturating_sub(12)).min(52);
    let clamp = |page: u128| u64::try_from(page.min(aperture)).unwrap_or(u64::MAX);
    Some(PageRange {
        start: clamp(u128::from(start)),
        end: clamp(u128::from(start) + (1u128 << shift)),
    })
}

/// Sorts `ranges` and merges overlapping or adjacent ones in place; returns
/// how many maximal ranges are left at the front. The union is unchanged:
/// no page is added.
pub fn merge_ranges(ranges: &mut [PageRange]) -> usize {
    if ranges.is_empty() {
        return 0;
    }
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out = 0;
    for i in 1..ranges.len() {
        let next = ranges[i];
        if next.start <= ranges[out].end {
            ranges[out].end = ranges[out].end.max(next.end);
        } else {
            out += 1;
            ranges[out] = next;
        }
    }
    out + 1
}

/// Linux guest driver v1: the range `[start, start + pages)` as exact,
/// naturally aligned 2^N blocks (no over-flush, several entries).
pub fn linux_v1_entries(start: u64, pages: u64, mut emit: impl FnMut(FlushListEntry)) {
    let mut cur = start;
    let end = start.saturating_add(pages);
    while cur < end {
        let align = if cur == 0 { 63 } else { cur.trailing_zeros() };
        let fit = 63 - (end - cur).leading_zeros();
        let shift = align.min(fit);
        emit(entry(cur, shift));
        cur += 1 << shift;
    }
}

/// Linux guest driver v2: the smallest naturally aligned 2^N block covering
/// `[start, start + pages)` (one entry, may over-flush). `pages` > 0.
pub fn linux_v2_entry(start: u64, pages: u64) -> FlushListEntry {
    let last = start.saturating_add(pages.max(1) - 1);
    let shift = 64 - (start ^ last).leading_zeros();
    let shift = shift.min(52);
    entry(start & !((1u64 << shift) - 1), shift)
}

fn entry(page: u64, shift: u32) -> FlushListEntry {
    let shift = u16::try_from(shift).unwrap_or(u16::MAX);
    FlushListEntry::new()
        .with_page_mask_shift(shift)
        .with_page_number(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn e(page: u64, shift: u16) -> FlushListEntry {
        FlushListEntry::new()
            .with_page_mask_shift(shift)
            .with_page_number(page)
    }

    #[test]
    fn decode_checks_alignment_and_clamps_to_the_aperture() {
        let r = |start, end| Some(PageRange { start, end });
        assert_eq!(decode_entry(e(8, 3), 48), r(8, 16));
        assert_eq!(decode_entry(e(7, 0), 48), r(7, 8));
        assert_eq!(decode_entry(e(4, 3), 48), None, "misaligned block");
        assert_eq!(decode_entry(e(0, 36), 48), r(0, 1 << 36));
        assert_eq!(decode_entry(e(0, 37), 48), r(0, 1 << 36), "clamped");
        assert_eq!(
            decode_entry(e((1 << 36) - 1, 0), 48),
            r((1 << 36) - 1, 1 << 36)
        );
        assert_eq!(
            decode_entry(e(1 << 36, 0), 48),
            r(1 << 36, 1 << 36),
            "wholly past the aperture: empty"
        );
        // Linux's empty gather: the whole aperture, never an empty range.
        assert_eq!(decode_entry(e(0, 52), 48), r(0, 1 << 36));
        assert_eq!(decode_entry(e(0, 52), 57), r(0, 1 << 45));
        assert_eq!(decode_entry(e(0, 64), 57), r(0, 1 << 45));
        assert_eq!(decode_entry(e(0, 0xFFF), 57), r(0, 1 << 45));
        assert_eq!(decode_entry(e(1 << 40, 0xFFF), 57), None, "misaligned");
        // Widths the config refuses still cannot overflow.
        assert_eq!(decode_entry(e(0, 52), 64), r(0, 1 << 52));
        assert_eq!(
            decode_entry(e((1 << 52) - 1, 0), 64),
            r((1 << 52) - 1, 1 << 52)
        );
        assert_eq!(decode_entry(e(0, 52), 200), r(0, 1 << 52));
    }

    #[test]
    fn merge_joins_adjacent_and_overlapping() {
        let mut r = [
            PageRange { start: 8, end: 16 },
            PageRange { start: 0, end: 4 },
            PageRange { start: 4, end: 8 },
            PageRange { start: 32, end: 33 },
            PageRange { start: 12, end: 14 },
        ];
        let n = merge_ranges(&mut r);
        assert_eq!(
            &r[..n],
            [
                PageRange { start: 0, end: 16 },
                PageRange { start: 32, end: 33 }
            ]
        );
        assert_eq!(merge_ranges(&mut []), 0);
    }

    #[test]
    fn linux_strategies() {
        let mut v1 = vec![];
        linux_v1_entries(3, 10, |x| v1.push(x));
        // 3 | 4..8 | 8..12 | 12 = [3,13)
        assert_eq!(v1, [e(3, 0), e(4, 2), e(8, 2), e(12, 0)]);
        assert_eq!(linux_v2_entry(3, 10), e(0, 4));
        assert_eq!(linux_v2_entry(8, 8), e(8, 3));
        assert_eq!(linux_v2_entry(5, 1), e(5, 0));
    }

    proptest! {
        #[test]
        fn v1_is_exact_and_v2_covers(start in 0u64..1 << 30, pages in 1u64..5000) {
            let mut covered = vec![];
            linux_v1_entries(start, pages, |x| covered.push(decode_entry(x, 64).expect("aligned")));
            let n = merge_ranges(&mut covered);
            prop_assert_eq!(&covered[..n], &[PageRange { start, end: start + pages }]);
            let v2 = decode_entry(linux_v2_entry(start, pages), 64).expect("aligned");
            prop_assert!(v2.start <= start && v2.end >= start + pages);
            // The smallest such block: no aligned block of half the size covers.
            let half = v2.pages() / 2;
            prop_assert!(half == 0 || start / half != (start + pages - 1) / half);
        }

        #[test]
        fn merge_keeps_the_union(ranges in proptest::collection::vec((0u64..200, 1u64..20), 0..50)) {
            let mut rs: Vec<PageRange> = ranges.iter().map(|&(s, l)| PageRange { start: s, end: s + l }).collect();
            let mut union = std::collections::BTreeSet::new();
            for r in &rs { union.extend(r.start..r.end); }
            let n = merge_ranges(&mut rs);
            let mut merged = std::collections::BTreeSet::new();
            for w in rs[..n].windows(2) {
                prop_assert!(w[0].end < w[1].start, "maximal and sorted");
            }
            for r in &rs[..n] { merged.extend(r.start..r.end); }
            prop_assert_eq!(union, merged);
        }
    }
}
