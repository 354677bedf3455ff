//! Snapshots for the API and tests: domains, devices, counters, faults.

use crate::backend::{DomainKind, S1Config};
use crate::domains::{Attachment, FlushStats};
use crate::software::IotlbStats;
use crate::translate::{Fault, FaultReason};
use pviommu_abi::{DeviceId, HvStatus, HypercallCode};
use std::collections::{HashMap, VecDeque};

/// What kind of domain a [`DomainInfo`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DomainInfoKind {
    /// The default domain (id 0).
    Default,
    /// The null domain (id 0xFFFF_FFFF).
    Null,
    /// A guest-created S2 domain.
    S2,
    /// A guest-created S1 domain.
    S1,
}

impl From<DomainKind> for DomainInfoKind {
    fn from(k: DomainKind) -> Self {
        match k {
            DomainKind::S2 => Self::S2,
            DomainKind::S1 => Self::S1,
        }
    }
}

/// One domain as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    /// Guest domain id.
    pub id: u32,
    /// Kind.
    pub kind: DomainInfoKind,
    /// Attached devices, in attach order (for the default domain: every
    /// device not attached elsewhere, in id order).
    pub devices: Vec<DeviceId>,
    /// Mapped 4 KiB pages (S2).
    pub mapped_pages: u64,
    /// Runs, i.e. host mappings per backend instance (S2).
    pub runs: u64,
    /// S1 settings (S1).
    pub s1: Option<S1Config>,
    /// Flush counters.
    pub flushes: FlushStats,
    /// DMA faults of devices while in this domain.
    pub faults: u64,
    /// Software IOTLB counters (S1 domains instantiated in the software
    /// backend).
    pub iotlb: Option<IotlbStats>,
    /// Names of the backends the domain is instantiated in.
    pub backends: Vec<&'static str>,
}

/// One registered device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id (PCI form).
    pub id: DeviceId,
    /// Its LOGICAL id, if it has one ([`crate::Iommu::register_device_alias`]).
    pub logical: Option<DeviceId>,
    /// Name of its backend.
    pub backend: &'static str,
    /// Where its DMA goes.
    pub attachment: Attachment,
}

/// Completed calls of one call code that ended with one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusCount {
    /// The call code (`None`: codes outside the contract).
    pub code: Option<HypercallCode>,
    /// The final status.
    pub status: HvStatus,
    /// How many calls.
    pub count: u64,
}

/// Hypercall counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HypercallStats {
    /// Dispatches (a time-sliced call counts once per slice).
    pub total: u64,
    /// Dispatches per known call code (zero counts included).
    pub by_code: Vec<(HypercallCode, u64)>,
    /// Dispatches with an unknown code.
    pub unknown: u64,
    /// Calls that ended with an error status.
    pub errors: u64,
    /// Completed calls per code and final status, successes included; only
    /// non-zero counts, by code (as in [`HypercallCode::ALL`], unknown codes
    /// last) then status.
    pub by_status: Vec<StatusCount>,
    /// Slices that ended with "continue".
    pub continuations: u64,
}

impl HypercallStats {
    /// Completed calls of `code` (`None`: unknown codes) that ended with
    /// `status`.
    pub fn count(&self, code: Option<HypercallCode>, status: HvStatus) -> u64 {
        self.by_status
            .iter()
            .filter(|s| s.code == code && s.status == status)
            .map(|s| s.count)
            .sum()
    }

    /// Completed calls of `code` that ended with an error status.
    pub fn errors_of(&self, code: Option<HypercallCode>) -> u64 {
        self.by_status
            .iter()
            .filter(|s| s.code == code && !s.status.is_success())
            .map(|s| s.count)
            .sum()
    }

    /// The (code, status) pairs that ended with an error, with their counts:
    /// empty when no hypercall got an error (for example a Linux guest's
    /// boot, as the VMM reports it).
    pub fn error_counts(&self) -> impl Iterator<Item = &StatusCount> {
        self.by_status.iter().filter(|s| !s.status.is_success())
    }
}

/// DMA fault counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// All faults.
    pub total: u64,
    /// Faults per reason name (zero counts included).
    pub by_reason: Vec<(&'static str, u64)>,
    /// The most recent faults (at most [`RECENT_FAULTS`]), oldest first.
    pub recent: Vec<Fault>,
}

impl FaultStats {
    /// The most recent fault.
    pub fn last(&self) -> Option<&Fault> {
        self.recent.last()
    }
}

/// How many of the most recent faults a snapshot lists.
pub const RECENT_FAULTS: usize = 16;

/// A snapshot of one VM's pvIOMMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuStats {
    /// The default and null domains, then guest domains by id.
    pub domains: Vec<DomainInfo>,
    /// Registered devices by id.
    pub devices: Vec<DeviceInfo>,
    /// Hypercall counters.
    pub hypercalls: HypercallStats,
    /// DMA faults.
    pub faults: FaultStats,
    /// Backend operations that failed.
    pub backend_errors: u64,
    /// Mapping runs of every guest domain together (held under
    /// [`crate::IommuConfig::max_map_runs`]).
    pub map_runs: u64,
    /// Guest-caused log lines of the whole VMM, sent and dropped by the one
    /// limiter ([`crate::guest_log`]).
    pub guest_log: crate::guest_log::Counts,
}

/// Fault bookkeeping behind its own small lock (faults are rare). Lock
/// order: the Iommu's state lock, then this one.
#[derive(Debug)]
pub(crate) struct FaultLog {
    pub total: u64,
    pub by_reason: [u64; FaultReason::COUNT],
    /// Faults per guest domain id, for the domains that exist (DELETE
    /// forgets a domain's count, so a reused id starts from zero). At most
    /// `domain_capacity` ids: a fault recorded for a domain deleted meanwhile
    /// (DMA racing the guest's DELETE) cannot grow it past the number of
    /// domains that can exist.
    pub by_domain: HashMap<u32, u64>,
    domain_capacity: usize,
    /// The last [`RECENT_FAULTS`] faults, oldest first.
    recent: VecDeque<Fault>,
}

impl FaultLog {
    /// A log that counts faults for at most `domains` guest domains plus the
    /// default and null domains.
    pub(crate) fn new(domains: u32) -> Self {
        Self {
            total: 0,
            by_reason: [0; FaultReason::COUNT],
            by_domain: HashMap::new(),
            domain_capacity: usize::try_from(domains)
                .unwrap_or(usize::MAX)
                .saturating_add(2),
            recent: VecDeque::with_capacity(RECENT_FAULTS),
        }
    }

    pub(crate) fn record(&mut self, fault: Fault) {
        self.total += 1;
        self.by_reason[fault.reason.index()] += 1;
        if let Some(d) = fault.domain {
            let room = self.by_domain.len() < self.domain_capacity;
            match self.by_domain.get_mut(&d) {
                Some(n) => *n += 1,
                None if room => {
                    self.by_domain.insert(d, 1);
                }
                None => {} // still in `total` and `by_reason`
            }
        }
        if self.recent.len() == RECENT_FAULTS {
            self.recent.pop_front();
        }
        self.recent.push_back(fault);
    }

    /// Faults of devices while in domain `id`.
    pub(crate) fn of_domain(&self, id: u32) -> u64 {
        self.by_domain.get(&id).copied().unwrap_or(0)
    }

    /// Forgets the count of a domain that is deleted (or created: a fault
    /// that raced the delete of an earlier domain with the same id).
    pub(crate) fn forget_domain(&mut self, id: u32) {
        self.by_domain.remove(&id);
    }

    pub(crate) fn snapshot(&self) -> FaultStats {
        FaultStats {
            total: self.total,
            by_reason: FaultReason::NAMES
                .iter()
                .zip(self.by_reason)
                .map(|(n, c)| (*n, c))
                .collect(),
            recent: self.recent.iter().copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Access;

    #[test]
    fn the_most_recent_faults_are_kept_oldest_first() {
        let mut log = FaultLog::new(4);
        assert!(log.snapshot().recent.is_empty());
        for i in 0..RECENT_FAULTS as u64 + 3 {
            log.record(Fault {
                device: DeviceId::pci(0, 0, 3, 0),
                domain: Some(1),
                iova: i << 12,
                access: Access::Read,
                reason: FaultReason::NotMapped,
            });
        }
        let s = log.snapshot();
        assert_eq!(s.total, RECENT_FAULTS as u64 + 3);
        let iovas: Vec<u64> = s.recent.iter().map(|f| f.iova >> 12).collect();
        assert_eq!(iovas, (3..RECENT_FAULTS as u64 + 3).collect::<Vec<_>>());
        assert_eq!(
            s.last().map(|f| f.iova),
            Some((RECENT_FAULTS as u64 + 2) << 12)
        );
    }
}
