//! Guest RAM checks on a vm-memory `GuestMemory`, with checked arithmetic.

use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Permissions,
};

/// Whether `[gpa, gpa + len)` is entirely guest RAM (`len` > 0, no wrap).
pub(crate) fn in_ram<M: GuestMemory + ?Sized>(mem: &M, gpa: u64, len: u64) -> bool {
    let Ok(count) = usize::try_from(len) else {
        return false;
    };
    len != 0
        && gpa.checked_add(len - 1).is_some()
        && mem.check_range(GuestAddress(gpa), count, Permissions::Read)
}

/// The guest RAM region `[start, end)` that holds all of `[gpa, gpa + len)`,
/// or `None` if that range is not inside one region. Memory without a
/// physical view (behind a vm-memory IOMMU) counts as one region.
pub(crate) fn region_of<M: GuestMemory + ?Sized>(
    mem: &M,
    gpa: u64,
    len: u64,
) -> Option<(u64, u64)> {
    let last = gpa.checked_add(len.checked_sub(1)?)?;
    match mem.physical_memory() {
        Some(phys) => {
            let region = phys.find_region(GuestAddress(gpa))?;
            let start = region.start_addr().0;
            let end = start.checked_add(region.len())?;
            (last < end).then_some((start, end))
        }
        None => in_ram(mem, gpa, len).then_some((0, u64::MAX)),
    }
}

/// Bytes of guest RAM: the sum of the region sizes (0 for memory without a
/// physical view).
pub(crate) fn total_bytes<M: GuestMemory + ?Sized>(mem: &M) -> u64 {
    mem.physical_memory().map_or(0, |phys| {
        phys.iter().fold(0u64, |sum, r| sum.saturating_add(r.len()))
    })
}

/// Reads exactly `buf.len()` bytes of guest RAM at `gpa`.
pub(crate) fn read<M: GuestMemory + ?Sized>(mem: &M, gpa: u64, buf: &mut [u8]) -> bool {
    mem.read_slice(buf, GuestAddress(gpa)).is_ok()
}

/// Writes all of `buf` to guest RAM at `gpa`.
pub(crate) fn write<M: GuestMemory + ?Sized>(mem: &M, gpa: u64, buf: &[u8]) -> bool {
    mem.write_slice(buf, GuestAddress(gpa)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn ranges_and_regions() {
        let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x4000), 0x2000),
        ])
        .expect("memory");
        assert!(
            in_ram(&mem, 0, 0x6000),
            "adjacent regions form one RAM range"
        );
        assert!(!in_ram(&mem, 0x5000, 0x2000));
        assert!(!in_ram(&mem, 0, 0));
        assert!(!in_ram(&mem, u64::MAX, 2));
        assert_eq!(region_of(&mem, 0x3000, 0x1000), Some((0, 0x4000)));
        assert_eq!(region_of(&mem, 0x4000, 0x1000), Some((0x4000, 0x6000)));
        assert_eq!(
            region_of(&mem, 0x3000, 0x2000),
            None,
            "straddles two regions"
        );
        assert_eq!(region_of(&mem, 0x6000, 0x1000), None);
        assert_eq!(region_of(&mem, 0x1000, 0), None);
        let mut b = [0u8; 8];
        assert!(write(&mem, 0x5ff8, &[7; 8]));
        assert!(read(&mem, 0x5ff8, &mut b));
        assert_eq!(b, [7; 8]);
        assert!(!read(&mem, 0x5ffc, &mut b), "partly outside RAM");
        assert_eq!(total_bytes(&mem), 0x6000);
    }
}
