//! An address bus (port I/O or MMIO) mapping ranges to devices.
//!
//! The vCPU threads look up the device for each access; ranges can be added,
//! moved and removed at run time (PCI BAR programming, hotplug). Lookups take
//! a read lock only long enough to clone the device handle, so a device may
//! change a bus (for example a PCI config write moving a BAR) while it is
//! being accessed through another bus.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::lock;

/// A device on a [`Bus`].
///
/// `base` is the start of the range through which the device is accessed
/// (a device can be on several ranges, such as the BARs of a PCI device) and
/// `offset` the offset of the access in it. The bus guarantees that
/// `offset + data.len()` is within the range; everything else (width,
/// alignment, register) is for the device to check. Reads must fill `data`.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `base + offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus set-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// Empty or wrapping range.
    #[error("Invalid bus range: base {base:#x}, length {len:#x}")]
    InvalidRange {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a range already on the bus.
    #[error("Bus range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
        /// Base of the range in the way.
        other_base: u64,
        /// Length of the range in the way.
        other_len: u64,
    },
    /// No range starts at this base with this length.
    #[error("No bus range at {base:#x}+{len:#x}")]
    NotFound {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// A set of non-overlapping address ranges, each backed by a device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(ranges.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

fn last(base: u64, len: u64) -> Result<u64, BusError> {
    len.checked_sub(1)
        .and_then(|l| base.checked_add(l))
        .ok_or(BusError::InvalidRange { base, len })
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn check_free(
        ranges: &BTreeMap<u64, Entry>,
        base: u64,
        len: u64,
        ignore: Option<u64>,
    ) -> Result<(), BusError> {
        let end = last(base, len)?;
        // The range starting at or before `end` with the highest base is the
        // only candidate that can reach into `base..=end` from below; any
        // range starting inside `base..=end` overlaps too.
        for (&b, e) in ranges.range(..=end).rev() {
            if Some(b) == ignore {
                continue;
            }
            if b >= base || b + (e.len - 1) >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base: b,
                    other_len: e.len,
                });
            }
            break;
        }
        Ok(())
    }

    /// Maps `base..base + len` to `device`.
    pub fn insert(&self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let mut ranges = lock::write(&self.ranges);
        Self::check_free(&ranges, base, len, None)?;
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Unmaps the range `base..base + len` and returns its device.
    pub fn remove(&self, base: u64, len: u64) -> Result<SharedBusDevice, BusError> {
        let mut ranges = lock::write(&self.ranges);
        match ranges.get(&base) {
            Some(e) if e.len == len => {}
            _ => return Err(BusError::NotFound { base, len }),
        }
        ranges
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound { base, len })
    }

    /// Moves the range at `old_base` (length `len`) to `new_base`, keeping
    /// its device. On error the bus is unchanged.
    pub fn relocate(&self, old_base: u64, len: u64, new_base: u64) -> Result<(), BusError> {
        let mut ranges = lock::write(&self.ranges);
        match ranges.get(&old_base) {
            Some(e) if e.len == len => {}
            _ => {
                return Err(BusError::NotFound {
                    base: old_base,
                    len,
                })
            }
        }
        Self::check_free(&ranges, new_base, len, Some(old_base))?;
        let entry = ranges.remove(&old_base).ok_or(BusError::NotFound {
            base: old_base,
            len,
        })?;
        ranges.insert(new_base, entry);
        Ok(())
    }

    /// The device and range covering all of `addr..addr + len`.
    pub fn resolve(&self, addr: u64, len: u64) -> Option<(u64, u64, SharedBusDevice)> {
        let ranges = lock::read(&self.ranges);
        let (&base, e) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        if len == 0 || offset.checked_add(len)? > e.len {
            return None;
        }
        Some((base, offset, e.device.clone()))
    }

    /// Dispatches a read. Returns false (and leaves `data` alone) when no
    /// device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len() as u64) {
            Some((base, offset, dev)) => {
                lock::mutex(&dev).read(base, offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device covers the whole
    /// access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len() as u64) {
            Some((base, offset, dev)) => {
                lock::mutex(&dev).write(base, offset, data);
                true
            }
            None => false,
        }
    }

    /// The ranges on the bus, `(base, len)`, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        lock::read(&self.ranges)
            .iter()
            .map(|(b, e)| (*b, e.len))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with the offset.
    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.last = Some((base, offset, vec![]));
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn dev() -> (Arc<Mutex<Recorder>>, SharedBusDevice) {
        let d = Arc::new(Mutex::new(Recorder::default()));
        (d.clone(), d)
    }

    #[test]
    fn dispatches_to_the_covering_range() {
        let bus = Bus::new();
        let (a, ad) = dev();
        let (b, bd) = dev();
        bus.insert(ad, 0x100, 0x10).unwrap();
        bus.insert(bd, 0x110, 0x10).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x104, &mut data));
        assert_eq!(data, [4, 4]);
        assert_eq!(a.lock().unwrap().last, Some((0x100, 4, vec![])));
        assert!(bus.write(0x11e, &[1, 2]));
        assert_eq!(b.lock().unwrap().last, Some((0x110, 0xe, vec![1, 2])));
    }

    #[test]
    fn misses_outside_and_across_ranges() {
        let bus = Bus::new();
        let (a, ad) = dev();
        bus.insert(ad, 0x100, 0x10).unwrap();
        let mut data = [0xaau8; 4];
        assert!(!bus.read(0xff, &mut data));
        assert!(!bus.read(0x110, &mut data));
        // Starts inside, ends outside.
        assert!(!bus.read(0x10e, &mut data));
        assert!(!bus.write(0x10d, &[0; 4]));
        assert!(!bus.read(u64::MAX, &mut data));
        assert!(!bus.read(0x100, &mut []));
        assert_eq!(data, [0xaa; 4]);
        assert!(a.lock().unwrap().last.is_none());
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let bus = Bus::new();
        bus.insert(dev().1, 0x100, 0x10).unwrap();
        for (base, len) in [
            (0x100, 1),
            (0xf0, 0x11),
            (0x10f, 1),
            (0x80, 0x100),
            (0x108, 2),
        ] {
            assert!(
                matches!(
                    bus.insert(dev().1, base, len),
                    Err(BusError::Overlap {
                        other_base: 0x100,
                        ..
                    })
                ),
                "{base:#x}+{len:#x}"
            );
        }
        assert!(bus.insert(dev().1, 0xf0, 0x10).is_ok());
        assert!(bus.insert(dev().1, 0x110, 0x10).is_ok());
        assert_eq!(
            bus.insert(dev().1, 0x200, 0),
            Err(BusError::InvalidRange {
                base: 0x200,
                len: 0
            })
        );
        assert!(bus.insert(dev().1, u64::MAX, 2).is_err());
        assert!(bus.insert(dev().1, u64::MAX, 1).is_ok());
        assert_eq!(bus.ranges().len(), 4);
    }

    #[test]
    fn relocate_and_remove() {
        let bus = Bus::new();
        let (a, ad) = dev();
        bus.insert(ad, 0x100, 0x10).unwrap();
        bus.insert(dev().1, 0x200, 0x10).unwrap();
        // Onto the other range: refused, unchanged.
        assert!(bus.relocate(0x100, 0x10, 0x1f8).is_err());
        assert_eq!(bus.ranges(), vec![(0x100, 0x10), (0x200, 0x10)]);
        // Overlapping itself is fine.
        bus.relocate(0x100, 0x10, 0x108).unwrap();
        assert!(bus.write(0x108, &[7]));
        assert_eq!(a.lock().unwrap().last, Some((0x108, 0, vec![7])));
        assert!(bus.relocate(0x100, 0x10, 0x300).is_err());
        assert!(bus.remove(0x108, 0x8).is_err());
        bus.remove(0x108, 0x10).unwrap();
        assert!(!bus.write(0x108, &[7]));
        assert_eq!(bus.ranges(), vec![(0x200, 0x10)]);
    }
}
