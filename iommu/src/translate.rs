//! The DMA path's types: what a device asks for, the GPA segments it gets,
//! and the fault record it gets instead.

use pviommu_abi::DeviceId;
use std::fmt;

/// What a device does with the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The device reads guest memory (DMA to the device).
    Read,
    /// The device writes guest memory (DMA from the device).
    Write,
}

/// A piece of a translated DMA range: `len` bytes at guest physical `gpa`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes (> 0).
    pub len: u64,
}

const INLINE_SEGMENTS: usize = 8;

/// The GPA segments of a translated range, in IOVA order, adjacent segments
/// merged. Up to 8 segments live inline (no heap allocation); more spill to
/// the heap. Every segment lies in guest RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments {
    inline: [Segment; INLINE_SEGMENTS],
    count: usize,
    heap: Vec<Segment>,
}

impl Segments {
    /// No segments.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a piece, merging it with the last one if they touch in GPA.
    pub(crate) fn push(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.last_mut() {
            if last.gpa.checked_add(last.len) == Some(gpa) {
                last.len += len;
                return;
            }
        }
        let seg = Segment { gpa, len };
        if !self.heap.is_empty() {
            self.heap.push(seg);
        } else if self.count < INLINE_SEGMENTS {
            self.inline[self.count] = seg;
            self.count += 1;
        } else {
            self.heap.reserve(INLINE_SEGMENTS * 2);
            self.heap.extend_from_slice(&self.inline);
            self.heap.push(seg);
            self.count = 0;
        }
    }

    fn last_mut(&mut self) -> Option<&mut Segment> {
        if self.heap.is_empty() {
            self.inline[..self.count].last_mut()
        } else {
            self.heap.last_mut()
        }
    }

    /// The segments.
    pub fn as_slice(&self) -> &[Segment] {
        if self.heap.is_empty() {
            &self.inline[..self.count]
        } else {
            &self.heap
        }
    }

    /// Number of segments.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether there is no segment (a zero-length request).
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// Total bytes.
    pub fn total_len(&self) -> u64 {
        self.as_slice().iter().map(|s| s.len).sum()
    }

    /// Whether the segments spilled to the heap.
    pub fn spilled(&self) -> bool {
        !self.heap.is_empty()
    }

    /// Iterates over the segments.
    pub fn iter(&self) -> std::slice::Iter<'_, Segment> {
        self.as_slice().iter()
    }
}

impl<'a> IntoIterator for &'a Segments {
    type Item = &'a Segment;
    type IntoIter = std::slice::Iter<'a, Segment>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Why a DMA access faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// The device is not registered.
    UnknownDevice,
    /// The device is registered with a backend other than the software one.
    NotSoftwareDevice,
    /// `iova + len` wraps around.
    AddressOverflow,
    /// The IOVA is at or past 2^max_iova_width (or past the S1 table's reach).
    IovaOutOfRange,
    /// The device is in the null domain or a blocked S1 domain.
    Blocked,
    /// Not produced any more (an S1 domain with translation disabled is
    /// identity, an unconfigured one blocked); kept for its index and name.
    TranslationDisabled,
    /// No S2 mapping at this IOVA.
    NotMapped,
    /// A write to a page mapped read-only (S2) or with R/W clear (S1).
    WriteDenied,
    /// An S1 entry has U/S clear: DMA is a user-mode access.
    SupervisorOnly,
    /// An S1 entry is not present (level 5..1, 1 = PTE).
    S1NotPresent {
        /// Paging level of the entry.
        level: u8,
    },
    /// An S1 entry has reserved bits set.
    S1Reserved {
        /// Paging level of the entry.
        level: u8,
    },
    /// An S1 table (root or from an entry) is not in guest RAM.
    S1TableOutsideRam {
        /// Paging level of the table.
        level: u8,
    },
    /// The translated GPA is not in guest RAM.
    GpaOutsideRam,
}

impl FaultReason {
    /// Number of distinct [`FaultReason::index`] values.
    pub const COUNT: usize = 13;

    /// A stable small index (for counters), levels folded.
    pub fn index(self) -> usize {
        match self {
            Self::UnknownDevice => 0,
            Self::NotSoftwareDevice => 1,
            Self::AddressOverflow => 2,
            Self::IovaOutOfRange => 3,
            Self::Blocked => 4,
            Self::TranslationDisabled => 5,
            Self::NotMapped => 6,
            Self::WriteDenied => 7,
            Self::SupervisorOnly => 8,
            Self::S1NotPresent { .. } => 9,
            Self::S1Reserved { .. } => 10,
            Self::S1TableOutsideRam { .. } => 11,
            Self::GpaOutsideRam => 12,
        }
    }

    /// Short name of the reason (levels folded), for statistics.
    pub fn name(self) -> &'static str {
        Self::NAMES[self.index()]
    }

    /// Names by [`FaultReason::index`].
    pub const NAMES: [&'static str; Self::COUNT] = [
        "unknown_device",
        "not_software_device",
        "address_overflow",
        "iova_out_of_range",
        "blocked",
        "translation_disabled",
        "not_mapped",
        "write_denied",
        "supervisor_only",
        "s1_not_present",
        "s1_reserved_bits",
        "s1_table_outside_ram",
        "gpa_outside_ram",
    ];
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::S1NotPresent { level } => write!(f, "s1_not_present (level {level})"),
            Self::S1Reserved { level } => write!(f, "s1_reserved_bits (level {level})"),
            Self::S1TableOutsideRam { level } => {
                write!(f, "s1_table_outside_ram (level {level})")
            }
            _ => f.write_str(self.name()),
        }
    }
}

/// A DMA fault: the device, the first IOVA that could not be translated,
/// the access, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fault {
    /// The device that did the access.
    pub device: DeviceId,
    /// Guest domain id the device was in (0 default, 0xFFFF_FFFF null), if
    /// known.
    pub domain: Option<u32>,
    /// First faulting device address.
    pub iova: u64,
    /// What the device tried.
    pub access: Access,
    /// Why it failed.
    pub reason: FaultReason,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DMA {:?} fault by {} at IOVA {:#x}: {}",
            self.access, self.device, self.iova, self.reason
        )
    }
}

impl std::error::Error for Fault {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_merge_and_spill() {
        let mut s = Segments::new();
        assert!(s.is_empty());
        s.push(0x1000, 0x1000);
        s.push(0x2000, 0x1000);
        assert_eq!(
            s.as_slice(),
            [Segment {
                gpa: 0x1000,
                len: 0x2000
            }]
        );
        for i in 0..7 {
            s.push(0x10_0000 * (i + 1), 0x1000);
        }
        assert_eq!(s.len(), 8);
        assert!(!s.spilled(), "8 segments stay inline");
        s.push(0x900_0000, 0x10);
        assert!(s.spilled());
        assert_eq!(s.len(), 9);
        s.push(0x900_0010, 0x10);
        assert_eq!(s.len(), 9, "merged after spilling too");
        assert_eq!(s.total_len(), 0x2000 + 7 * 0x1000 + 0x20);
        assert_eq!(
            s.iter().next(),
            Some(&Segment {
                gpa: 0x1000,
                len: 0x2000
            })
        );
        assert_eq!(
            (&s).into_iter().last(),
            Some(&Segment {
                gpa: 0x900_0000,
                len: 0x20
            })
        );
    }

    #[test]
    fn reasons_have_distinct_indices_and_names() {
        let all = [
            FaultReason::UnknownDevice,
            FaultReason::NotSoftwareDevice,
            FaultReason::AddressOverflow,
            FaultReason::IovaOutOfRange,
            FaultReason::Blocked,
            FaultReason::TranslationDisabled,
            FaultReason::NotMapped,
            FaultReason::WriteDenied,
            FaultReason::SupervisorOnly,
            FaultReason::S1NotPresent { level: 1 },
            FaultReason::S1Reserved { level: 2 },
            FaultReason::S1TableOutsideRam { level: 4 },
            FaultReason::GpaOutsideRam,
        ];
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        assert_eq!(
            FaultReason::S1NotPresent { level: 3 }.to_string(),
            "s1_not_present (level 3)"
        );
        let f = Fault {
            device: DeviceId::pci(0, 0, 4, 0),
            domain: Some(3),
            iova: 0x5000,
            access: Access::Write,
            reason: FaultReason::NotMapped,
        };
        assert_eq!(
            f.to_string(),
            "DMA Write fault by 0000:00:04.0 at IOVA 0x5000: not_mapped"
        );
    }
}
