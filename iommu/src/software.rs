//! The software backend: the IOMMU model for emulated devices (and tests).
//!
//! It mirrors the domains its devices use, like any backend: S2 domains as a
//! run map (always current: an unmap takes effect at once), S1 domains as the
//! guest's settings plus an IOTLB. The S1 walker reads the guest's x86-64
//! 4- or 5-level table from guest memory; a translation it finds is cached
//! per 4 KiB page until the guest flushes it (FLUSH_DEVICE_DOMAIN(_LIST)) or
//! reconfigures the domain, so a PTE changed without a flush may still be
//! used, as on hardware.
//!
//! S1 rules (VT-d first-stage, requests without PASID): every level must be
//! present; a write needs R/W at every level; U/S must be set at every level
//! (DMA is a user-mode access; Linux sets U/S in first-stage tables); PS makes
//! a 1 GiB leaf at level 3 and a 2 MiB leaf at level 2 and is reserved at
//! levels 4 and 5; bits 51:phys_addr_width of every entry and the low
//! reserved bits of a large leaf (29:13, 20:13) must be zero. Accessed and
//! dirty bits are not written. A table that is not in guest RAM is a fault.
//!
//! Whatever the domain, every segment [`SoftwareBackend::translate`] returns
//! is checked to lie in guest RAM before it is returned.

use crate::backend::{
    AttachTarget, Backend, BackendError, DomainId, DomainKind, InvalidRequest, Invalidation,
    MapRun, S1Config, S1Mode,
};
use crate::config::{IommuConfig, PAGE_SHIFT, PAGE_SIZE};
use crate::ram;
use crate::runs::RunMap;
use crate::translate::{Access, FaultReason, Segments};
use pviommu_abi::{DeviceDomainId, DeviceId};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use vm_memory::GuestMemory;

/// A translation failure before the domain layer adds the device and access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawFault {
    pub iova: u64,
    pub reason: FaultReason,
    pub domain: Option<u32>,
}

/// IOTLB counters of one S1 domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbStats {
    /// Cached 4 KiB translations now.
    pub entries: u64,
    /// Lookups answered from the IOTLB.
    pub hits: u64,
    /// Lookups that walked the guest's table.
    pub misses: u64,
}

#[derive(Clone, Copy, Debug)]
struct IotlbEntry {
    gpa_page: u64,
    writable: bool,
}

#[derive(Debug)]
struct SwDomain {
    kind: DomainKind,
    runs: RunMap,
    s1: S1Config,
    iotlb: HashMap<u64, IotlbEntry>,
    stats: IotlbStats,
}

#[derive(Debug, Default)]
struct SwState {
    devices: HashMap<DeviceId, AttachTarget>,
    domains: HashMap<DomainId, SwDomain>,
}

/// The software IOMMU model. Send + Sync.
///
/// Every [`crate::Iommu`] has one built in, [`crate::BackendId::SOFTWARE`];
/// register emulated devices with that id: [`crate::Iommu::translate`] serves
/// the built-in instance only. Another instance added with
/// [`crate::Iommu::add_backend`] mirrors domains like any backend (useful in
/// tests of the trait) but its devices' DMA cannot be translated.
#[derive(Debug)]
pub struct SoftwareBackend {
    state: Mutex<SwState>,
    iotlb_capacity: usize,
    phys_addr_width: u8,
    iova_limit: u128,
}

pub(crate) use crate::s1table::S1Leaf;
#[cfg(test)]
use crate::s1table::{PTE_P, PTE_PS, PTE_RW, PTE_US};

/// Walks the guest's first-stage table for `iova` (the rules are
/// [`crate::s1table`]'s, shared with the IOMMUFD backend's shadow).
pub(crate) fn walk_s1<M: GuestMemory + ?Sized>(
    mem: &M,
    config: &S1Config,
    iova: u64,
    phys_addr_width: u8,
) -> Result<S1Leaf, FaultReason> {
    crate::s1table::walk(
        &crate::s1table::GuestTables(mem),
        config,
        iova,
        phys_addr_width,
    )
}

impl SoftwareBackend {
    /// A software backend with `config`'s IOTLB size, IOVA width and
    /// physical address width.
    pub fn new(config: &IommuConfig) -> Self {
        Self {
            state: Mutex::new(SwState::default()),
            iotlb_capacity: config.iotlb_entries.max(1),
            phys_addr_width: config.phys_addr_width,
            iova_limit: config.iova_limit(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SwState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `device` is registered here.
    pub fn has_device(&self, device: DeviceId) -> bool {
        self.lock().devices.contains_key(&device)
    }

    /// IOTLB counters of an S1 domain instantiated here.
    pub fn iotlb_stats(&self, domain: DomainId) -> Option<IotlbStats> {
        let state = self.lock();
        let d = state.domains.get(&domain)?;
        (d.kind == DomainKind::S1).then_some(IotlbStats {
            entries: u64::try_from(d.iotlb.len()).unwrap_or(u64::MAX),
            ..d.stats
        })
    }

    /// Translates `[iova, iova + len)` for `device`. No lock is held once this
    /// returns; the segments are in guest RAM.
    pub(crate) fn translate<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        device: DeviceId,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Segments, RawFault> {
        let mut segments = Segments::new();
        let fault = |iova, reason, domain| RawFault {
            iova,
            reason,
            domain,
        };
        let domain_id;
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(&target) = state.devices.get(&device) else {
                return Err(fault(iova, FaultReason::UnknownDevice, None));
            };
            domain_id = Some(match target {
                AttachTarget::Identity => DeviceDomainId::ID_DEFAULT,
                AttachTarget::Blocked => DeviceDomainId::ID_NULL,
                AttachTarget::Domain(d) => d,
            });
            if len == 0 {
                return Ok(segments);
            }
            let Some(end) = iova.checked_add(len) else {
                return Err(fault(iova, FaultReason::AddressOverflow, domain_id));
            };
            if u128::from(end) > self.iova_limit {
                let first_bad = u64::try_from(self.iova_limit).map_or(iova, |l| l.max(iova));
                return Err(fault(first_bad, FaultReason::IovaOutOfRange, domain_id));
            }
            match target {
                AttachTarget::Identity => segments.push(iova, len),
                AttachTarget::Blocked => {
                    return Err(fault(iova, FaultReason::Blocked, domain_id));
                }
                AttachTarget::Domain(d) => {
                    // A device attached to a domain this backend does not
                    // have fails closed.
                    let Some(dom) = state.domains.get_mut(&d) else {
                        return Err(fault(iova, FaultReason::Blocked, domain_id));
                    };
                    match dom.kind {
                        DomainKind::S2 => {
                            translate_s2(&dom.runs, iova, end, access, &mut segments)
                                .map_err(|(at, r)| fault(at, r, domain_id))?;
                        }
                        DomainKind::S1 => self
                            .translate_s1(mem, dom, iova, end, access, &mut segments)
                            .map_err(|(at, r)| fault(at, r, domain_id))?,
                    }
                }
            }
        }
        // The last line of defence: nothing outside guest RAM leaves here.
        let mut seg_iova = iova;
        for seg in segments.iter() {
            if !ram::in_ram(mem, seg.gpa, seg.len) {
                let mut off = 0;
                while off < seg.len {
                    let chunk =
                        (PAGE_SIZE - ((seg.gpa + off) & (PAGE_SIZE - 1))).min(seg.len - off);
                    if !ram::in_ram(mem, seg.gpa + off, chunk) {
                        break;
                    }
                    off += chunk;
                }
                return Err(fault(seg_iova + off, FaultReason::GpaOutsideRam, domain_id));
            }
            seg_iova += seg.len;
        }
        Ok(segments)
    }

    fn translate_s1<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        dom: &mut SwDomain,
        iova: u64,
        end: u64,
        access: Access,
        segments: &mut Segments,
    ) -> Result<(), (u64, FaultReason)> {
        match dom.s1.mode() {
            S1Mode::Blocked => return Err((iova, FaultReason::Blocked)),
            S1Mode::Identity => {
                // IOVA = GPA; the guard in translate keeps it in guest RAM.
                segments.push(iova, end - iova);
                return Ok(());
            }
            S1Mode::Translate => {}
        }
        let mut cursor = iova;
        while cursor < end {
            let page = cursor >> PAGE_SHIFT;
            let entry = match dom.iotlb.get(&page) {
                Some(e) => {
                    dom.stats.hits += 1;
                    *e
                }
                None => {
                    dom.stats.misses += 1;
                    let leaf = walk_s1(mem, &dom.s1, cursor, self.phys_addr_width)
                        .map_err(|r| (cursor, r))?;
                    if !leaf.user {
                        return Err((cursor, FaultReason::SupervisorOnly));
                    }
                    let e = IotlbEntry {
                        gpa_page: leaf.gpa_page,
                        writable: leaf.writable,
                    };
                    if dom.iotlb.len() >= self.iotlb_capacity {
                        dom.iotlb.clear();
                    }
                    dom.iotlb.insert(page, e);
                    e
                }
            };
            if access == Access::Write && !entry.writable {
                return Err((cursor, FaultReason::WriteDenied));
            }
            let offset = cursor & (PAGE_SIZE - 1);
            let chunk = (PAGE_SIZE - offset).min(end - cursor);
            segments.push((entry.gpa_page << PAGE_SHIFT) | offset, chunk);
            cursor += chunk;
        }
        Ok(())
    }

    fn domain_mut(state: &mut SwState, domain: DomainId) -> Result<&mut SwDomain, BackendError> {
        state
            .domains
            .get_mut(&domain)
            .ok_or(BackendError::UnknownDomain(domain))
    }
}

fn translate_s2(
    runs: &RunMap,
    iova: u64,
    end: u64,
    access: Access,
    segments: &mut Segments,
) -> Result<(), (u64, FaultReason)> {
    let mut cursor = iova;
    while cursor < end {
        let Some(run) = runs.lookup(cursor) else {
            return Err((cursor, FaultReason::NotMapped));
        };
        if access == Access::Write && !run.perms.write {
            return Err((cursor, FaultReason::WriteDenied));
        }
        let chunk_end = run.iova_end().min(end);
        segments.push(run.gpa + (cursor - run.iova), chunk_end - cursor);
        cursor = chunk_end;
    }
    Ok(())
}

impl Backend for SoftwareBackend {
    fn name(&self) -> &'static str {
        "software"
    }

    fn add_device(&self, device: DeviceId) -> Result<(), BackendError> {
        self.lock().devices.insert(device, AttachTarget::Identity);
        Ok(())
    }

    fn remove_device(&self, device: DeviceId) -> Result<(), BackendError> {
        self.lock()
            .devices
            .remove(&device)
            .map(|_| ())
            .ok_or(BackendError::UnknownDevice(device.into_bits()))
    }

    fn create_domain(&self, domain: DomainId, kind: DomainKind) -> Result<(), BackendError> {
        self.lock().domains.insert(
            domain,
            SwDomain {
                kind,
                runs: RunMap::default(),
                s1: S1Config::UNCONFIGURED,
                iotlb: HashMap::new(),
                stats: IotlbStats::default(),
            },
        );
        Ok(())
    }

    fn destroy_domain(&self, domain: DomainId) -> Result<(), BackendError> {
        let mut state = self.lock();
        state
            .domains
            .remove(&domain)
            .ok_or(BackendError::UnknownDomain(domain))?;
        // Fail closed if the domain layer ever destroys a domain in use.
        for target in state.devices.values_mut() {
            if *target == AttachTarget::Domain(domain) {
                *target = AttachTarget::Blocked;
            }
        }
        Ok(())
    }

    fn attach(&self, device: DeviceId, target: AttachTarget) -> Result<(), BackendError> {
        let mut state = self.lock();
        if let AttachTarget::Domain(d) = target {
            Self::domain_mut(&mut state, d)?;
        }
        let slot = state
            .devices
            .get_mut(&device)
            .ok_or(BackendError::UnknownDevice(device.into_bits()))?;
        *slot = target;
        Ok(())
    }

    fn map(&self, domain: DomainId, run: MapRun) -> Result<(), BackendError> {
        let mut state = self.lock();
        let dom = Self::domain_mut(&mut state, domain)?;
        if dom.kind != DomainKind::S2 {
            return Err(BackendError::Unsupported);
        }
        dom.runs.insert(run);
        Ok(())
    }

    fn unmap(&self, domain: DomainId, run: MapRun) -> Result<(), BackendError> {
        self.unmap_keep(domain, run, &[])
    }

    fn unmap_keep(
        &self,
        domain: DomainId,
        run: MapRun,
        keep: &[MapRun],
    ) -> Result<(), BackendError> {
        // Atomic split: translate never sees the kept pieces unmapped.
        let mut state = self.lock();
        let dom = Self::domain_mut(&mut state, domain)?;
        match dom.runs.lookup(run.iova) {
            Some(r) if *r == run => {}
            _ => return Err(InvalidRequest::RunNotMapped(run.iova).into()),
        }
        dom.runs.remove(run.iova);
        for piece in keep {
            dom.runs.insert(*piece);
        }
        Ok(())
    }

    fn set_s1(&self, domain: DomainId, config: S1Config) -> Result<(), BackendError> {
        let mut state = self.lock();
        let dom = Self::domain_mut(&mut state, domain)?;
        if dom.kind != DomainKind::S1 {
            return Err(BackendError::Unsupported);
        }
        dom.s1 = config;
        dom.iotlb.clear();
        Ok(())
    }

    fn invalidate(&self, domain: DomainId, what: Invalidation) -> Result<(), BackendError> {
        let mut state = self.lock();
        let dom = Self::domain_mut(&mut state, domain)?;
        match what {
            Invalidation::All => dom.iotlb.clear(),
            Invalidation::Range { iova, len } => {
                let first = iova >> PAGE_SHIFT;
                let pages = len.div_ceil(PAGE_SIZE);
                let last = first.saturating_add(pages);
                if pages <= u64::try_from(dom.iotlb.len()).unwrap_or(u64::MAX) {
                    for page in first..last {
                        dom.iotlb.remove(&page);
                    }
                } else {
                    dom.iotlb.retain(|&page, _| page < first || page >= last);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{PagingLevels, Perms};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MB: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 << 20),
            (GuestAddress(32 * MB), 4 << 20),
        ])
        .expect("memory")
    }

    fn dev() -> DeviceId {
        DeviceId::pci(0, 0, 5, 0)
    }

    fn backend() -> SoftwareBackend {
        SoftwareBackend::new(&IommuConfig::default())
    }

    fn pte(mem: &GuestMemoryMmap<()>, table: u64, index: u64, value: u64) {
        mem.write_obj(value, GuestAddress(table + index * 8))
            .expect("pte");
    }

    const F: u64 = PTE_P | PTE_RW | PTE_US;

    /// A 4-level table at 0x10000 mapping IOVA 0x4000_0000 + n * 4K.
    fn build_s1(mem: &GuestMemoryMmap<()>) -> S1Config {
        let (pml4, pdpt, pd, pt) = (0x10000, 0x11000, 0x12000, 0x13000);
        pte(mem, pml4, 0, pdpt | F);
        pte(mem, pdpt, 1, pd | F); // 1 GiB
        pte(mem, pd, 0, pt | F);
        pte(mem, pt, 0, 0x20_0000 | F);
        pte(mem, pt, 1, 0x30_0000 | PTE_P | PTE_US); // read-only
        S1Config {
            root: pml4,
            levels: PagingLevels::Four,
            translation_enabled: true,
            blocked: false,
        }
    }

    fn gpas(s: &Segments) -> Vec<(u64, u64)> {
        s.iter().map(|s| (s.gpa, s.len)).collect()
    }

    #[test]
    fn identity_blocked_and_unknown() {
        let m = mem();
        let b = backend();
        let err = b
            .translate(&m, dev(), 0, 1, Access::Read)
            .expect_err("unknown");
        assert_eq!(err.reason, FaultReason::UnknownDevice);
        b.add_device(dev()).expect("add");
        let s = b
            .translate(&m, dev(), 0x1234, 0x100, Access::Write)
            .expect("identity");
        assert_eq!(gpas(&s), [(0x1234, 0x100)]);
        let err = b
            .translate(&m, dev(), 16 * MB - 8, 16, Access::Read)
            .expect_err("hole");
        assert_eq!(
            (err.reason, err.iova),
            (FaultReason::GpaOutsideRam, 16 * MB)
        );
        let err = b
            .translate(&m, dev(), u64::MAX, 2, Access::Read)
            .expect_err("wrap");
        assert_eq!(err.reason, FaultReason::AddressOverflow);
        let err = b
            .translate(&m, dev(), (1 << 48) - 4, 8, Access::Read)
            .expect_err("width");
        assert_eq!(
            (err.reason, err.iova),
            (FaultReason::IovaOutOfRange, 1 << 48)
        );
        assert!(b
            .translate(&m, dev(), 7, 0, Access::Read)
            .expect("empty")
            .is_empty());
        b.attach(dev(), AttachTarget::Blocked).expect("attach");
        let err = b
            .translate(&m, dev(), 0, 1, Access::Read)
            .expect_err("blocked");
        assert_eq!(
            (err.reason, err.domain),
            (FaultReason::Blocked, Some(DeviceDomainId::ID_NULL))
        );
    }

    #[test]
    fn s2_runs_permissions_and_atomic_split() {
        let m = mem();
        let b = backend();
        b.add_device(dev()).expect("add");
        b.create_domain(3, DomainKind::S2).expect("create");
        b.attach(dev(), AttachTarget::Domain(3)).expect("attach");
        let run = MapRun {
            iova: 0x10_0000,
            gpa: 0x40_0000,
            len: 0x4000,
            perms: Perms::R,
        };
        b.map(3, run).expect("map");
        b.map(
            3,
            MapRun {
                iova: 0x10_4000,
                gpa: 32 * MB,
                len: 0x1000,
                perms: Perms::RW,
            },
        )
        .expect("map");
        let s = b
            .translate(&m, dev(), 0x10_0800, 0x4000, Access::Read)
            .expect("s2");
        assert_eq!(gpas(&s), [(0x40_0800, 0x3800), (32 * MB, 0x800)]);
        let err = b
            .translate(&m, dev(), 0x10_0000, 8, Access::Write)
            .expect_err("ro");
        assert_eq!(err.reason, FaultReason::WriteDenied);
        let err = b
            .translate(&m, dev(), 0x10_4800, 0x1000, Access::Write)
            .expect_err("end");
        assert_eq!((err.reason, err.iova), (FaultReason::NotMapped, 0x10_5000));
        let left = MapRun { len: 0x1000, ..run };
        let right = MapRun {
            iova: 0x10_3000,
            gpa: 0x40_3000,
            len: 0x1000,
            ..run
        };
        b.unmap_keep(3, run, &[left, right]).expect("split");
        assert!(b
            .translate(&m, dev(), 0x10_0000, 0x1000, Access::Read)
            .is_ok());
        let err = b
            .translate(&m, dev(), 0x10_1000, 1, Access::Read)
            .expect_err("gone");
        assert_eq!(err.reason, FaultReason::NotMapped);
        assert!(b.unmap(3, run).is_err(), "only exact runs can be unmapped");
        b.unmap(3, left).expect("unmap");
        b.destroy_domain(3).expect("destroy");
        let err = b
            .translate(&m, dev(), 0x10_3000, 1, Access::Read)
            .expect_err("closed");
        assert_eq!(err.reason, FaultReason::Blocked);
    }

    #[test]
    fn s1_walk_iotlb_is_stale_until_flushed() {
        let m = mem();
        let b = backend();
        b.add_device(dev()).expect("add");
        b.create_domain(9, DomainKind::S1).expect("create");
        b.attach(dev(), AttachTarget::Domain(9)).expect("attach");
        let err = b
            .translate(&m, dev(), 0x4000_0000, 8, Access::Read)
            .expect_err("unconf");
        assert_eq!(err.reason, FaultReason::Blocked, "unconfigured: blocked");
        b.set_s1(
            9,
            S1Config {
                blocked: false,
                ..S1Config::UNCONFIGURED
            },
        )
        .expect("identity");
        let s = b
            .translate(&m, dev(), 0x4000, 8, Access::Write)
            .expect("identity");
        assert_eq!(gpas(&s), [(0x4000, 8)]);
        let cfg = build_s1(&m);
        b.set_s1(9, cfg).expect("configure");
        let s = b
            .translate(&m, dev(), 0x4000_0010, 0x1ff0, Access::Read)
            .expect("walk");
        assert_eq!(gpas(&s), [(0x20_0010, 0xff0), (0x30_0000, 0x1000)]);
        let err = b
            .translate(&m, dev(), 0x4000_1000, 8, Access::Write)
            .expect_err("ro");
        assert_eq!(err.reason, FaultReason::WriteDenied);
        // Change the PTE without a flush: the stale translation is used.
        pte(&m, 0x13000, 0, 0x50_0000 | F);
        let s = b
            .translate(&m, dev(), 0x4000_0000, 8, Access::Read)
            .expect("stale");
        assert_eq!(gpas(&s), [(0x20_0000, 8)]);
        // A flush of another range does not help.
        b.invalidate(
            9,
            Invalidation::Range {
                iova: 0x4000_2000,
                len: 0x1000,
            },
        )
        .expect("flush");
        let s = b
            .translate(&m, dev(), 0x4000_0000, 8, Access::Read)
            .expect("stale");
        assert_eq!(gpas(&s), [(0x20_0000, 8)]);
        b.invalidate(
            9,
            Invalidation::Range {
                iova: 0x4000_0000,
                len: 0x1000,
            },
        )
        .expect("flush");
        let s = b
            .translate(&m, dev(), 0x4000_0000, 8, Access::Read)
            .expect("fresh");
        assert_eq!(gpas(&s), [(0x50_0000, 8)]);
        // Clearing a PTE: still cached until a full flush.
        pte(&m, 0x13000, 0, 0);
        assert!(b.translate(&m, dev(), 0x4000_0000, 8, Access::Read).is_ok());
        b.invalidate(9, Invalidation::All).expect("flush all");
        let err = b
            .translate(&m, dev(), 0x4000_0000, 8, Access::Read)
            .expect_err("np");
        assert_eq!(
            (err.reason, err.iova, err.domain),
            (FaultReason::S1NotPresent { level: 1 }, 0x4000_0000, Some(9))
        );
        let stats = b.iotlb_stats(9).expect("s1 stats");
        assert!(stats.hits >= 3 && stats.misses >= 4, "{stats:?}");
        // Blocked wins over translation.
        b.set_s1(
            9,
            S1Config {
                blocked: true,
                ..cfg
            },
        )
        .expect("configure");
        let err = b
            .translate(&m, dev(), 0x4000_1000, 8, Access::Read)
            .expect_err("blocked");
        assert_eq!(err.reason, FaultReason::Blocked);
    }

    #[test]
    fn s1_large_pages_reserved_bits_and_tables_outside_ram() {
        let m = mem();
        let cfg = build_s1(&m);
        let walk = |iova| walk_s1(&m, &cfg, iova, 46);
        // 2 MiB leaf at PD index 1 -> GPA 0x60_0000.
        pte(&m, 0x12000, 1, 0x60_0000 | F | PTE_PS);
        assert_eq!(walk(0x4020_5000).map(|l| l.gpa_page), Ok(0x605));
        pte(&m, 0x12000, 1, 0x60_0000 | F | PTE_PS | 1 << 13);
        assert_eq!(walk(0x4020_5000), Err(FaultReason::S1Reserved { level: 2 }));
        pte(&m, 0x12000, 1, 0x60_0000 | F | PTE_PS | 1 << 12); // PAT is fine
        assert!(walk(0x4020_5000).is_ok());
        // 1 GiB leaf at PDPT index 2 -> GPA 0 (+ offset).
        pte(&m, 0x11000, 2, F | PTE_PS);
        assert_eq!(walk(0x8000_3000).map(|l| l.gpa_page), Ok(3));
        pte(&m, 0x11000, 2, F | PTE_PS | 1 << 29);
        assert_eq!(walk(0x8000_3000), Err(FaultReason::S1Reserved { level: 3 }));
        // PS at level 4 is reserved.
        pte(&m, 0x10000, 1, F | PTE_PS);
        assert_eq!(walk(1 << 39), Err(FaultReason::S1Reserved { level: 4 }));
        // Bits above phys_addr_width are reserved.
        pte(&m, 0x13000, 2, 1 << 47 | F);
        assert_eq!(walk(0x4000_2000), Err(FaultReason::S1Reserved { level: 1 }));
        // A table outside RAM.
        pte(&m, 0x13000, 3, F);
        pte(&m, 0x12000, 2, (20 * MB) | F);
        assert_eq!(
            walk(0x4040_0000),
            Err(FaultReason::S1TableOutsideRam { level: 1 })
        );
        // Supervisor-only entry.
        pte(&m, 0x13000, 4, 0x70_0000 | PTE_P | PTE_RW);
        assert_eq!(walk(0x4000_4000).map(|l| l.user), Ok(false));
        // Past the 4-level reach.
        assert_eq!(walk(1 << 48), Err(FaultReason::IovaOutOfRange));
        // A leaf outside RAM is refused by translate's guard.
        let b = backend();
        b.add_device(dev()).expect("add");
        b.create_domain(1, DomainKind::S1).expect("create");
        b.attach(dev(), AttachTarget::Domain(1)).expect("attach");
        b.set_s1(1, cfg).expect("configure");
        pte(&m, 0x13000, 5, (20 * MB) | F);
        let err = b
            .translate(&m, dev(), 0x4000_5000, 8, Access::Read)
            .expect_err("hole");
        assert_eq!(err.reason, FaultReason::GpaOutsideRam);
        let err = b
            .translate(&m, dev(), 0x4000_4000, 8, Access::Read)
            .expect_err("us");
        assert_eq!(err.reason, FaultReason::SupervisorOnly);
    }

    #[test]
    fn five_level_walk() {
        let m = mem();
        let (pml5, pml4, pdpt, pd) = (0x20000, 0x21000, 0x22000, 0x23000);
        pte(&m, pml5, 1, pml4 | F);
        pte(&m, pml4, 0, pdpt | F);
        pte(&m, pdpt, 0, pd | F);
        pte(&m, pd, 0, 0x80_0000 | F | PTE_PS);
        let cfg = S1Config {
            root: pml5,
            levels: PagingLevels::Five,
            translation_enabled: true,
            blocked: false,
        };
        assert_eq!(
            walk_s1(&m, &cfg, (1 << 48) | 0x1000, 46).map(|l| l.gpa_page),
            Ok(0x801)
        );
        assert_eq!(
            walk_s1(&m, &cfg, 0x1000, 46),
            Err(FaultReason::S1NotPresent { level: 5 })
        );
        assert_eq!(
            walk_s1(&m, &cfg, 1 << 57, 46),
            Err(FaultReason::IovaOutOfRange)
        );
    }

    #[test]
    fn iotlb_capacity_bounds_the_cache() {
        let m = mem();
        let b = SoftwareBackend::new(&IommuConfig {
            iotlb_entries: 2,
            ..Default::default()
        });
        b.add_device(dev()).expect("add");
        b.create_domain(1, DomainKind::S1).expect("create");
        b.attach(dev(), AttachTarget::Domain(1)).expect("attach");
        let cfg = build_s1(&m);
        for i in 2..6 {
            pte(&m, 0x13000, i, (0x20_0000 + i * PAGE_SIZE) | F);
        }
        b.set_s1(1, cfg).expect("configure");
        b.translate(&m, dev(), 0x4000_0000, 6 * PAGE_SIZE, Access::Read)
            .expect("walk");
        assert!(b.iotlb_stats(1).expect("stats").entries <= 2);
    }
}
