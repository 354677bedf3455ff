//! [`IommufdBackend`]: the guest's domains mirrored into IOMMUFD objects.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use iommufd_bindings::iommufd::{
    iommu_hwpt_vtd_s1, iommu_hwpt_vtd_s1_invalidate,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT as HWPT_ALLOC_NEST_PARENT,
};
use iommufd_ioctls::AttachHwpt;
use resources::ErrorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::ioctl::{self, HwptData, InvalidateEntries, IommufdOps, IovaRange};
use super::uapi::{
    HwptInvalidateSelftest, HwptSelftest, IOMMU_TEST_INVALIDATE_FLAG_ALL, IOMMU_TEST_IOTLB_DEFAULT,
    MOCK_NESTED_DOMAIN_IOTLB_NUM,
};
use super::{
    AttachTarget, Backend, BackendError, DeviceId, DomainId, DomainKind, InvalidRequest,
    Invalidation, MapRun, PagingLevels, Perms, S1Config, S1Mode,
};

const PAGE_SHIFT: u32 = 12;

/// The x86 MSI window, which VT-d reserves in every device's IOVA space: it
/// must not be guest RAM, or direct attach could not map it.
pub const MSI_WINDOW: IovaRange = IovaRange {
    start: 0xfee0_0000,
    last: 0xfeef_ffff,
};

/// How first-stage (S1) tables and their invalidations are described to the
/// host IOMMU driver for nested HWPTs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NestFormat {
    /// Intel VT-d: `IOMMU_HWPT_DATA_VTD_S1` (the guest's x86-64 page table
    /// root and address width) and `IOMMU_HWPT_INVALIDATE_DATA_VTD_S1`.
    VtdS1,
    /// The kernel's selftest mock driver (CONFIG_IOMMUFD_TEST), for tests: a
    /// nested HWPT with a 4-entry mock IOTLB; a range invalidates the entries
    /// its pages index (page number mod 4).
    Selftest,
}

/// Invalidation entries in a [`NestFormat`].
enum Entries {
    VtdS1(Vec<iommu_hwpt_vtd_s1_invalidate>),
    Selftest(Vec<HwptInvalidateSelftest>),
}

impl Entries {
    fn as_entries(&self) -> InvalidateEntries<'_> {
        match self {
            Entries::VtdS1(e) => InvalidateEntries::VtdS1(e),
            Entries::Selftest(e) => InvalidateEntries::Selftest(e),
        }
    }

    fn len(&self) -> usize {
        self.as_entries().len()
    }
}

impl NestFormat {
    fn hwpt_data(self, s1: &S1Config) -> HwptData {
        match self {
            NestFormat::VtdS1 => HwptData::VtdS1(iommu_hwpt_vtd_s1 {
                flags: 0,
                pgtbl_addr: s1.root,
                addr_width: match s1.levels {
                    PagingLevels::Four => 48,
                    PagingLevels::Five => 57,
                },
                __reserved: 0,
            }),
            NestFormat::Selftest => HwptData::Selftest(HwptSelftest {
                iotlb: IOMMU_TEST_IOTLB_DEFAULT,
            }),
        }
    }

    fn entries(self, what: Invalidation) -> Entries {
        match (self, what) {
            (NestFormat::VtdS1, Invalidation::All) => {
                Entries::VtdS1(vec![iommu_hwpt_vtd_s1_invalidate {
                    addr: 0,
                    npages: u64::MAX,
                    flags: 0,
                    __reserved: 0,
                }])
            }
            (NestFormat::VtdS1, Invalidation::Range { iova, len }) => {
                Entries::VtdS1(vec![iommu_hwpt_vtd_s1_invalidate {
                    addr: iova,
                    npages: len >> PAGE_SHIFT,
                    flags: 0,
                    __reserved: 0,
                }])
            }
            (NestFormat::Selftest, Invalidation::All) => {
                Entries::Selftest(vec![HwptInvalidateSelftest {
                    flags: IOMMU_TEST_INVALIDATE_FLAG_ALL,
                    iotlb_id: 0,
                }])
            }
            (NestFormat::Selftest, Invalidation::Range { iova, len }) => {
                let first = iova >> PAGE_SHIFT;
                let pages = (len >> PAGE_SHIFT).clamp(1, u64::from(MOCK_NESTED_DOMAIN_IOTLB_NUM));
                let mut ids: Vec<u32> = (first..first + pages)
                    .map(|p| {
                        u32::try_from(p % u64::from(MOCK_NESTED_DOMAIN_IOTLB_NUM)).unwrap_or(0)
                    })
                    .collect();
                ids.sort_unstable();
                Entries::Selftest(
                    ids.into_iter()
                        .map(|iotlb_id| HwptInvalidateSelftest { flags: 0, iotlb_id })
                        .collect(),
                )
            }
        }
    }
}

/// Counters of the backend's host work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IommufdStats {
    /// IOMMU_IOAS_MAP calls.
    pub maps: u64,
    /// IOMMU_IOAS_UNMAP calls.
    pub unmaps: u64,
    /// Device attachments (VFIO_DEVICE_ATTACH_IOMMUFD_PT or equivalent).
    pub attaches: u64,
    /// IOMMU_HWPT_INVALIDATE calls, full-flush fallbacks included.
    pub invalidations: u64,
    /// Invalidations the host refused in part, answered by a full flush.
    pub full_flush_fallbacks: u64,
}

/// A guest RAM region: `len` bytes at guest-physical `gpa`, mapped in this
/// process at `host`.
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    len: u64,
    host: usize,
}

struct Device {
    dev_id: u32,
    handle: Arc<dyn AttachHwpt>,
    /// Where the domain layer put the device: None until it adds the
    /// device; Blocked after an attach failed (fail closed).
    target: Option<AttachTarget>,
    /// The page table the device is attached to on the host, as far as the
    /// host said yes: None while detached (VFIO then blocks its DMA).
    pt: Option<u32>,
}

enum Domain {
    /// Its own IOAS; `runs` by IOVA, exactly as mapped on the host.
    /// `failed`: a host unmap failed (or a split could not be rebuilt), so
    /// the IOAS may map what the guest unmapped: no device uses it again
    /// (they are blocked) until the domain is destroyed.
    S2 {
        ioas: u32,
        runs: BTreeMap<u64, MapRun>,
        failed: bool,
    },
    /// A nested HWPT over the NEST_PARENT HWPT, while the guest's settings
    /// translate and a device needs it.
    S1 {
        config: S1Config,
        nested: Option<u32>,
    },
}

struct Inner {
    regions: BTreeMap<u64, Region>,
    /// Every guest RAM region at IOVA = GPA (the default domain).
    direct: u32,
    /// Nothing mapped (the null domain, and fail-closed).
    blocked: u32,
    /// NEST_PARENT HWPT over `direct`, for nested S1 HWPTs.
    parent: Option<u32>,
    /// The IOVA ranges `direct` allows, read after each attach to it.
    allowed: Option<Vec<IovaRange>>,
    devices: HashMap<DeviceId, Device>,
    domains: HashMap<DomainId, Domain>,
    /// Objects whose IOMMU_DESTROY failed (a device was stuck on them),
    /// emptied of mappings where possible; destroyed again once the device
    /// is gone, or on drop.
    zombies: Vec<u32>,
    /// An unmap from the direct IOAS failed: it may still map a removed RAM
    /// region, so no device uses it (or a nested HWPT over it) again.
    direct_failed: bool,
    stats: IommufdStats,
}

/// The IOMMUFD backend of the pvIOMMU, for VFIO passthrough devices.
///
/// - Default domain (direct attach): one IOAS holds every guest RAM region at
///   IOVA = GPA ([`IommufdBackend::add_ram_region`]); its allowed IOVA ranges
///   are read again after every attach to it.
/// - S2 domains: an IOAS each; runs are mapped and unmapped exactly as the
///   domain layer passes them (IOAS_UNMAP cannot split a mapping, and the
///   domain layer never asks it to).
/// - S1 domains: a nested HWPT (the guest's table, [`NestFormat`]) over one
///   NEST_PARENT HWPT of the direct IOAS, so the guest's table and the
///   addresses in it are GPAs. An S1 domain in identity mode (translation
///   disabled) uses the direct IOAS itself; a blocked one the blocked IOAS. Guest flushes become IOMMU_HWPT_INVALIDATE;
///   when the host handles fewer entries than passed (entry_num read back),
///   the whole domain is flushed instead.
/// - Null domain and fail-closed: an empty IOAS.
///
/// Failures fail closed: a device whose attach fails is put on the blocked
/// IOAS (or detached, which VFIO blocks); a run is forgotten only once
/// IOAS_UNMAP has removed it, and when an unmap fails the IOAS may still map
/// what the guest unmapped, so every device of that domain is blocked and the
/// domain is never attached again (the default domain too, for the direct
/// IOAS); an object that cannot be destroyed because a device is stuck on it
/// is emptied (IOAS_UNMAP of everything) and destroyed again later. IOAS_UNMAP
/// cannot split a mapping, so a partial unmap unmaps the run and maps the
/// kept pieces again: in between, the kept pages fault (closed), never the
/// other way round.
///
/// Devices are handed to the backend with [`IommufdBackend::add_host_device`]
/// (their iommufd device id and a way to attach them) before the domain
/// layer registers them. Dropping the backend destroys every IOMMUFD object
/// it created; [`IommufdBackend::object_ids`] lists them.
pub struct IommufdBackend {
    ops: Arc<dyn IommufdOps>,
    format: NestFormat,
    inner: Mutex<Inner>,
    /// Guest memory given with [`IommufdBackend::add_guest_memory`], kept
    /// mapped as long as the IOAS map it.
    memory: Mutex<Vec<Arc<GuestMemoryMmap>>>,
}

fn host_err(e: ioctl::Error) -> BackendError {
    match e.errno() {
        Some(libc::ENOMEM) | Some(libc::ENOSPC) => BackendError::NoResources,
        Some(libc::EOPNOTSUPP) => BackendError::Unsupported,
        _ => BackendError::Iommufd(e),
    }
}

impl IommufdBackend {
    /// A backend on `ops` (an open [`super::Iommufd`] in production): allocates
    /// the direct-attach and the blocked IOAS.
    pub fn new(ops: Arc<dyn IommufdOps>, format: NestFormat) -> Result<Self, BackendError> {
        let direct = ops.ioas_alloc().map_err(host_err)?;
        let blocked = match ops.ioas_alloc() {
            Ok(id) => id,
            Err(e) => {
                let _ = ops.destroy(direct);
                return Err(host_err(e));
            }
        };
        Ok(Self {
            ops,
            format,
            inner: Mutex::new(Inner {
                regions: BTreeMap::new(),
                direct,
                blocked,
                parent: None,
                allowed: None,
                devices: HashMap::new(),
                domains: HashMap::new(),
                zombies: Vec::new(),
                direct_failed: false,
                stats: IommufdStats::default(),
            }),
            memory: Mutex::new(Vec::new()),
        })
    }

    /// Mirrors every region of the VM's RAM into the direct-attach IOAS
    /// (IOVA = GPA) and keeps `memory` alive as long as the backend. On an
    /// error, the regions added by this call are removed again.
    #[allow(unsafe_code)]
    pub fn add_guest_memory(&self, memory: Arc<GuestMemoryMmap>) -> Result<(), BackendError> {
        let mut added = Vec::new();
        for region in memory.iter() {
            let gpa = region.start_addr().0;
            // SAFETY: `region` is a live mmap of guest RAM, which is only
            // ever accessed through raw pointers (vm-memory); the backend
            // keeps `memory`, so the mapping outlives the IOAS mapping.
            let result = unsafe { self.add_ram_region(gpa, region.len(), region.as_ptr()) };
            if let Err(e) = result {
                for gpa in added {
                    let _ = self.remove_ram_region(gpa);
                }
                return Err(e);
            }
            added.push(gpa);
        }
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(memory);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The IOAS that maps guest RAM at IOVA = GPA.
    pub fn direct_ioas(&self) -> u32 {
        self.lock().direct
    }

    /// Counters.
    pub fn stats(&self) -> IommufdStats {
        self.lock().stats
    }

    /// The nested HWPT that holds S1 domain `domain`'s table now, if any.
    pub fn s1_hwpt(&self, domain: DomainId) -> Option<u32> {
        match self.lock().domains.get(&domain) {
            Some(Domain::S1 { nested, .. }) => *nested,
            _ => None,
        }
    }

    /// Every IOMMUFD object this backend holds now (IOAS and HWPT ids).
    pub fn object_ids(&self) -> Vec<u32> {
        let inner = self.lock();
        let mut ids = vec![inner.direct, inner.blocked];
        ids.extend(inner.parent);
        ids.extend(inner.zombies.iter().copied());
        for d in inner.domains.values() {
            match d {
                Domain::S2 { ioas, .. } => ids.push(*ioas),
                Domain::S1 { nested, .. } => ids.extend(*nested),
            }
        }
        ids.sort_unstable();
        ids
    }

    /// Hands a VFIO device (bound to this backend's iommufd as `dev_id`) to
    /// the backend, before `Iommu::register_device` adds it.
    pub fn add_host_device(
        &self,
        device: DeviceId,
        dev_id: u32,
        handle: Arc<dyn AttachHwpt>,
    ) -> Result<(), BackendError> {
        let mut inner = self.lock();
        if inner.devices.contains_key(&device) {
            return Err(InvalidRequest::DeviceExists(device.into_bits()).into());
        }
        inner.devices.insert(
            device,
            Device {
                dev_id,
                handle,
                target: None,
                pt: None,
            },
        );
        Ok(())
    }

    /// Mirrors a new guest RAM region into the direct-attach IOAS.
    ///
    /// # Safety
    ///
    /// `[host, host + len)` must be this process's mapping of the region and
    /// stay mapped until [`Self::remove_ram_region`] or the backend's drop,
    /// and it must only be accessed through raw pointers (guest memory is).
    #[allow(unsafe_code)]
    pub unsafe fn add_ram_region(
        &self,
        gpa: u64,
        len: u64,
        host: *mut u8,
    ) -> Result<(), BackendError> {
        let page = (1u64 << PAGE_SHIFT) - 1;
        let Some(last) = gpa.checked_add(len).and_then(|end| end.checked_sub(1)) else {
            return Err(InvalidRequest::BadRegion { gpa, len }.into());
        };
        if len == 0 || gpa & page != 0 || len & page != 0 || host as u64 & page != 0 {
            return Err(InvalidRequest::BadRegion { gpa, len }.into());
        }
        let mut inner = self.lock();
        let overlaps = |r: &Region| gpa <= r.gpa + (r.len - 1) && r.gpa <= last;
        if inner.regions.values().any(overlaps) {
            return Err(InvalidRequest::RegionOverlaps { gpa, len }.into());
        }
        let allowed = match &inner.allowed {
            Some(ranges) => ranges.iter().any(|r| r.contains(gpa, len)),
            None => last < MSI_WINDOW.start || gpa > MSI_WINDOW.last,
        };
        if !allowed {
            return Err(BackendError::ReservedOverlap);
        }
        let direct = inner.direct;
        // SAFETY: the caller guarantees the mapping's lifetime and use.
        unsafe { self.ops.ioas_map(direct, gpa, host, len, Perms::RW) }.map_err(host_err)?;
        inner.stats.maps += 1;
        inner.regions.insert(
            gpa,
            Region {
                gpa,
                len,
                host: host as usize,
            },
        );
        Ok(())
    }

    /// Removes the guest RAM region that starts at `gpa` from every IOAS:
    /// the direct one, and the S2 runs that map it. A run is forgotten only
    /// once unmapped; where an unmap fails, the domain (or, for the direct
    /// IOAS, the default domain and every S1 domain nested over it) fails
    /// closed: its devices are blocked.
    pub fn remove_ram_region(&self, gpa: u64) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let region = inner
            .regions
            .get(&gpa)
            .copied()
            .ok_or(InvalidRequest::NoRegion(gpa))?;
        let mut first_err = None;
        let inside = |r: &MapRun| r.gpa >= region.gpa && r.gpa + r.len <= region.gpa + region.len;
        let mut unmaps = 0;
        let mut failed_domains = Vec::new();
        for (id, dom) in inner.domains.iter_mut() {
            if let Domain::S2 { ioas, runs, .. } = dom {
                let gone: Vec<MapRun> = runs.values().filter(|r| inside(r)).copied().collect();
                for run in gone {
                    unmaps += 1;
                    match self.ops.ioas_unmap(*ioas, run.iova, run.len) {
                        Ok(n) if n == run.len => {
                            runs.remove(&run.iova);
                        }
                        Ok(removed) => {
                            first_err.get_or_insert(BackendError::ShortUnmap {
                                len: run.len,
                                removed,
                            });
                            failed_domains.push(*id);
                        }
                        Err(e) => {
                            first_err.get_or_insert(host_err(e));
                            failed_domains.push(*id);
                        }
                    }
                }
            }
        }
        for id in failed_domains {
            self.fail_domain(&mut inner, id);
        }
        let direct = inner.direct;
        unmaps += 1;
        match self.ops.ioas_unmap(direct, region.gpa, region.len) {
            Ok(n) if n == region.len => {}
            result => {
                first_err.get_or_insert(match result {
                    Err(e) => host_err(e),
                    Ok(removed) => BackendError::ShortUnmap {
                        len: region.len,
                        removed,
                    },
                });
                self.fail_direct(&mut inner);
            }
        }
        inner.stats.unmaps += unmaps;
        inner.regions.remove(&gpa);
        first_err.map_or(Ok(()), Err)
    }

    fn host_addr(inner: &Inner, gpa: u64, len: u64) -> Result<*mut u8, BackendError> {
        let region = inner
            .regions
            .range(..=gpa)
            .next_back()
            .map(|(_, r)| *r)
            .filter(|r| gpa - r.gpa <= r.len && len <= r.len - (gpa - r.gpa))
            .ok_or(InvalidRequest::RunOutsideRam { gpa, len })?;
        // A region's host range lies in this address space (add_ram_region
        // took it from a live mapping), so this does not fail for a run in it.
        usize::try_from(gpa - region.gpa)
            .ok()
            .and_then(|off| region.host.checked_add(off))
            .map(|addr| addr as *mut u8)
            .ok_or_else(|| InvalidRequest::RunOutsideRam { gpa, len }.into())
    }

    /// The page table a device attached to `target` uses, allocating the
    /// nested HWPT of an S1 domain (and the parent) on first need.
    fn pt_for(
        &self,
        inner: &mut Inner,
        dev_id: u32,
        target: AttachTarget,
    ) -> Result<u32, BackendError> {
        match target {
            AttachTarget::Identity if inner.direct_failed => Ok(inner.blocked),
            AttachTarget::Identity => Ok(inner.direct),
            AttachTarget::Blocked => Ok(inner.blocked),
            AttachTarget::Domain(d) => match inner.domains.get(&d) {
                None => Err(BackendError::UnknownDomain(d)),
                Some(Domain::S2 { failed: true, .. }) => Ok(inner.blocked),
                Some(Domain::S2 { ioas, .. }) => Ok(*ioas),
                Some(Domain::S1 { config, nested }) => {
                    match config.mode() {
                        _ if inner.direct_failed => return Ok(inner.blocked),
                        S1Mode::Blocked => return Ok(inner.blocked),
                        // Identity: the default domain's IOAS (IOVA = GPA).
                        S1Mode::Identity => return Ok(inner.direct),
                        S1Mode::Translate => {}
                    }
                    if let Some(n) = nested {
                        return Ok(*n);
                    }
                    let config = *config;
                    let parent = match inner.parent {
                        Some(p) => p,
                        None => {
                            let p = self
                                .ops
                                .hwpt_alloc(
                                    dev_id,
                                    inner.direct,
                                    HWPT_ALLOC_NEST_PARENT,
                                    HwptData::None,
                                )
                                .map_err(host_err)?;
                            inner.parent = Some(p);
                            p
                        }
                    };
                    let n = self
                        .ops
                        .hwpt_alloc(dev_id, parent, 0, self.format.hwpt_data(&config))
                        .map_err(host_err)?;
                    if let Some(Domain::S1 { nested, .. }) = inner.domains.get_mut(&d) {
                        *nested = Some(n);
                    }
                    Ok(n)
                }
            },
        }
    }

    /// Attaches `device` to `pt`; on failure, fails closed (blocked).
    fn attach_pt(&self, inner: &mut Inner, device: DeviceId, pt: u32) -> Result<(), BackendError> {
        let handle = inner
            .devices
            .get(&device)
            .map(|d| Arc::clone(&d.handle))
            .ok_or(BackendError::UnknownDevice(device.into_bits()))?;
        inner.stats.attaches += 1;
        if let Err(e) = handle.attach_hwpt(pt) {
            self.block_device(inner, device);
            if let Some(d) = inner.devices.get_mut(&device) {
                d.target = Some(AttachTarget::Blocked);
            }
            return Err(BackendError::Host(e));
        }
        if let Some(d) = inner.devices.get_mut(&device) {
            d.pt = Some(pt);
        }
        if pt == inner.direct {
            // A device's reserved regions shrink what the IOAS allows.
            let ranges = self.ops.iova_ranges(pt).map_err(host_err)?;
            let ok = inner
                .regions
                .values()
                .all(|r| ranges.iter().any(|a| a.contains(r.gpa, r.len)));
            inner.allowed = Some(ranges);
            if !ok {
                self.block_device(inner, device);
                if let Some(d) = inner.devices.get_mut(&device) {
                    d.target = Some(AttachTarget::Blocked);
                }
                return Err(BackendError::ReservedOverlap);
            }
        }
        Ok(())
    }

    /// Stops a device's DMA after a failure: the blocked IOAS, else a
    /// detach (VFIO blocks a detached device). False if both failed: the
    /// device is then still on the page table it was on (`pt`). Leaves
    /// `target` alone.
    fn block_device(&self, inner: &mut Inner, device: DeviceId) -> bool {
        let blocked = inner.blocked;
        let Some(d) = inner.devices.get_mut(&device) else {
            return true;
        };
        inner.stats.attaches += 1;
        if d.handle.attach_hwpt(blocked).is_ok() {
            d.pt = Some(blocked);
            return true;
        }
        if d.handle.detach_hwpt().is_ok() {
            d.pt = None;
            return true;
        }
        log::error!(
            "IOMMUFD backend: device {device} can be neither blocked nor detached; it stays on page table {:?}",
            d.pt
        );
        false
    }

    /// The devices that use page table `pt` on the host, or that the domain
    /// layer put on `target`.
    fn devices_using(inner: &Inner, pt: Option<u32>, target: AttachTarget) -> Vec<DeviceId> {
        let mut v: Vec<DeviceId> = inner
            .devices
            .iter()
            .filter(|(_, d)| d.target == Some(target) || (pt.is_some() && d.pt == pt))
            .map(|(id, _)| *id)
            .collect();
        v.sort_unstable_by_key(|d| d.into_bits());
        v
    }

    /// An unmap from S2 domain `domain`'s IOAS failed (or a split could not
    /// be rebuilt): the IOAS may map what the guest unmapped. Blocks every
    /// device on it, marks the domain so that none is attached to it again,
    /// and if a device cannot be moved off, empties the IOAS.
    fn fail_domain(&self, inner: &mut Inner, domain: DomainId) {
        let Some(Domain::S2 { ioas, failed, .. }) = inner.domains.get_mut(&domain) else {
            return;
        };
        *failed = true;
        let ioas = *ioas;
        log::error!("IOMMUFD backend: an unmap of domain {domain} failed; its devices are blocked");
        let mut stuck = false;
        for device in Self::devices_using(inner, Some(ioas), AttachTarget::Domain(domain)) {
            stuck |= !self.block_device(inner, device);
        }
        if stuck {
            self.empty_ioas(inner, ioas);
        }
    }

    /// An unmap from the direct IOAS failed: it may still map a removed RAM
    /// region. Blocks every device using it, directly or through a nested
    /// S1 HWPT (whose second stage it is), for good.
    fn fail_direct(&self, inner: &mut Inner) {
        inner.direct_failed = true;
        log::error!("IOMMUFD backend: an unmap of the direct IOAS failed; its devices are blocked");
        let (direct, blocked) = (inner.direct, inner.blocked);
        let mut users: Vec<DeviceId> = inner
            .devices
            .iter()
            .filter(|(_, d)| {
                d.pt.is_some_and(|pt| pt != blocked && !Self::is_s2_ioas(inner, pt))
            })
            .map(|(id, _)| *id)
            .collect();
        users.sort_unstable_by_key(|d| d.into_bits());
        let mut stuck = false;
        for device in users {
            stuck |= !self.block_device(inner, device);
        }
        if stuck {
            self.empty_ioas(inner, direct);
        }
    }

    fn is_s2_ioas(inner: &Inner, pt: u32) -> bool {
        inner
            .domains
            .values()
            .any(|d| matches!(d, Domain::S2 { ioas, .. } if *ioas == pt))
    }

    /// The last resort when a device is stuck on an IOAS that must not
    /// translate: unmap everything from it (IOAS_UNMAP of 0..U64_MAX).
    fn empty_ioas(&self, inner: &mut Inner, ioas: u32) {
        inner.stats.unmaps += 1;
        match self.ops.ioas_unmap(ioas, 0, u64::MAX) {
            Ok(_) => {
                for dom in inner.domains.values_mut() {
                    if let Domain::S2 { ioas: i, runs, .. } = dom {
                        if *i == ioas {
                            runs.clear();
                        }
                    }
                }
            }
            Err(e) => log::error!(
                "IOMMUFD backend: cannot empty IOAS {ioas}: {}",
                ErrorChain(&e)
            ),
        }
    }

    /// Destroys an object no device should use any more. A device stuck on
    /// it (its moves failed) is blocked again; if the object still cannot be
    /// destroyed, an IOAS is emptied, and the object is kept to be destroyed
    /// later ([`Inner::zombies`]).
    fn destroy_object(
        &self,
        inner: &mut Inner,
        id: u32,
        is_ioas: bool,
    ) -> Result<(), BackendError> {
        let stuck: Vec<DeviceId> = inner
            .devices
            .iter()
            .filter(|(_, d)| d.pt == Some(id))
            .map(|(dev, _)| *dev)
            .collect();
        for device in stuck {
            self.block_device(inner, device);
        }
        match self.ops.destroy(id) {
            Ok(()) => Ok(()),
            Err(e) => {
                log::error!(
                    "IOMMUFD backend: cannot destroy object {id}: {}",
                    ErrorChain(&e)
                );
                if is_ioas {
                    self.empty_ioas(inner, id);
                }
                inner.zombies.push(id);
                Err(host_err(e))
            }
        }
    }

    /// Destroys the objects whose destroy failed before, where it now works.
    fn reap_zombies(&self, inner: &mut Inner) {
        let ops = &self.ops;
        inner.zombies.retain(|id| ops.destroy(*id).is_err());
    }

    fn devices_on(inner: &Inner, target: AttachTarget) -> Vec<DeviceId> {
        let mut v: Vec<DeviceId> = inner
            .devices
            .iter()
            .filter(|(_, d)| d.target == Some(target))
            .map(|(id, _)| *id)
            .collect();
        v.sort_unstable_by_key(|d| d.into_bits());
        v
    }
}

impl Backend for IommufdBackend {
    fn name(&self) -> &'static str {
        "iommufd"
    }

    fn add_device(&self, device: DeviceId) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let direct = inner.direct;
        self.attach_pt(&mut inner, device, direct)?;
        if let Some(d) = inner.devices.get_mut(&device) {
            d.target = Some(AttachTarget::Identity);
        }
        Ok(())
    }

    fn remove_device(&self, device: DeviceId) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let dev = inner
            .devices
            .remove(&device)
            .ok_or(BackendError::UnknownDevice(device.into_bits()))?;
        // Detached, VFIO leaves the device's DMA blocked and uses none of
        // this backend's objects, so they can all be destroyed. Where
        // detaching is not possible, the blocked IOAS keeps it safe (and
        // busy until the device is closed).
        if dev.handle.detach_hwpt().is_ok() {
            self.reap_zombies(&mut inner);
            return Ok(());
        }
        inner.stats.attaches += 1;
        let blocked = dev.handle.attach_hwpt(inner.blocked);
        if blocked.is_ok() {
            self.reap_zombies(&mut inner);
        } else if let Some(pt) = dev.pt {
            // Stuck where it was: that page table must not translate.
            if pt != inner.blocked && pt != inner.direct && Self::is_s2_ioas(&inner, pt) {
                self.empty_ioas(&mut inner, pt);
            }
        }
        blocked.map_err(BackendError::Host)
    }

    fn create_domain(&self, domain: DomainId, kind: DomainKind) -> Result<(), BackendError> {
        let mut inner = self.lock();
        if inner.domains.contains_key(&domain) {
            return Err(InvalidRequest::DomainExists(domain).into());
        }
        let dom = match kind {
            DomainKind::S2 => Domain::S2 {
                ioas: self.ops.ioas_alloc().map_err(host_err)?,
                runs: BTreeMap::new(),
                failed: false,
            },
            DomainKind::S1 => Domain::S1 {
                config: S1Config::UNCONFIGURED,
                nested: None,
            },
        };
        inner.domains.insert(domain, dom);
        Ok(())
    }

    fn destroy_domain(&self, domain: DomainId) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let dom = inner
            .domains
            .remove(&domain)
            .ok_or(BackendError::UnknownDomain(domain))?;
        match dom {
            Domain::S2 { ioas, .. } => self.destroy_object(&mut inner, ioas, true),
            Domain::S1 {
                nested: Some(n), ..
            } => self.destroy_object(&mut inner, n, false),
            Domain::S1 { nested: None, .. } => Ok(()),
        }
    }

    fn attach(&self, device: DeviceId, target: AttachTarget) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let dev_id = inner
            .devices
            .get(&device)
            .map(|d| d.dev_id)
            .ok_or(BackendError::UnknownDevice(device.into_bits()))?;
        let pt = match self.pt_for(&mut inner, dev_id, target) {
            Ok(pt) => pt,
            Err(e) => {
                // Fail closed: the device must not keep its old translation.
                self.block_device(&mut inner, device);
                if let Some(d) = inner.devices.get_mut(&device) {
                    d.target = Some(AttachTarget::Blocked);
                }
                return Err(e);
            }
        };
        self.attach_pt(&mut inner, device, pt)?;
        if let Some(d) = inner.devices.get_mut(&device) {
            d.target = Some(target);
        }
        Ok(())
    }

    #[allow(unsafe_code)]
    fn map(&self, domain: DomainId, run: MapRun) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let host = Self::host_addr(&inner, run.gpa, run.len)?;
        let Some(Domain::S2 { ioas, runs, .. }) = inner.domains.get_mut(&domain) else {
            return Err(BackendError::UnknownDomain(domain));
        };
        if runs.contains_key(&run.iova) {
            return Err(InvalidRequest::RunMapped(run.iova).into());
        }
        // SAFETY: `host` lies in a region registered with add_ram_region,
        // whose caller guaranteed the mapping outlives its use here.
        unsafe { self.ops.ioas_map(*ioas, run.iova, host, run.len, run.perms) }
            .map_err(host_err)?;
        runs.insert(run.iova, run);
        inner.stats.maps += 1;
        Ok(())
    }

    fn unmap(&self, domain: DomainId, run: MapRun) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let in_ram = Self::host_addr(&inner, run.gpa, run.len).is_ok();
        let Some(Domain::S2 { ioas, runs, .. }) = inner.domains.get_mut(&domain) else {
            return Err(BackendError::UnknownDomain(domain));
        };
        match runs.get(&run.iova) {
            Some(r) if *r == run => {}
            // Its RAM region was removed, and the run with it.
            None if !in_ram => return Ok(()),
            _ => return Err(InvalidRequest::RunNotMapped(run.iova).into()),
        }
        let ioas = *ioas;
        inner.stats.unmaps += 1;
        // The run is forgotten only once the host has unmapped it.
        match self.ops.ioas_unmap(ioas, run.iova, run.len) {
            Ok(n) if n == run.len => {
                if let Some(Domain::S2 { runs, .. }) = inner.domains.get_mut(&domain) {
                    runs.remove(&run.iova);
                }
                Ok(())
            }
            result => {
                self.fail_domain(&mut inner, domain);
                Err(match result {
                    Err(e) => host_err(e),
                    Ok(removed) => BackendError::ShortUnmap {
                        len: run.len,
                        removed,
                    },
                })
            }
        }
    }

    fn unmap_keep(
        &self,
        domain: DomainId,
        run: MapRun,
        keep: &[MapRun],
    ) -> Result<(), BackendError> {
        // IOAS_UNMAP cannot split a mapping: unmap the run (a failure blocks
        // the domain's devices), then map the kept pieces again; in between
        // they fault, which is closed. A piece that cannot be mapped again
        // leaves the IOAS short of what the guest maps: the domain fails
        // closed as well.
        self.unmap(domain, run)?;
        let mut result = Ok(());
        for piece in keep {
            if let Err(e) = self.map(domain, *piece) {
                result = result.and(Err(e));
            }
        }
        if result.is_err() {
            self.fail_domain(&mut self.lock(), domain);
        }
        result
    }

    fn set_s1(&self, domain: DomainId, config: S1Config) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let old = match inner.domains.get_mut(&domain) {
            Some(Domain::S1 { config: c, nested }) => {
                *c = config;
                nested.take()
            }
            _ => return Err(BackendError::UnknownDomain(domain)),
        };
        let target = AttachTarget::Domain(domain);
        let devices = Self::devices_on(&inner, target);
        let mut result = Ok(());
        if let Some(first) = devices.first() {
            let dev_id = inner.devices[first].dev_id;
            match self.pt_for(&mut inner, dev_id, target) {
                Ok(pt) => {
                    for d in &devices {
                        if let Err(e) = self.attach_pt(&mut inner, *d, pt) {
                            result = result.and(Err(e));
                        }
                    }
                }
                Err(e) => {
                    // Fail closed: no device may keep using the old table.
                    let blocked = inner.blocked;
                    for d in &devices {
                        let _ = self.attach_pt(&mut inner, *d, blocked);
                    }
                    result = Err(e);
                }
            }
        }
        if let Some(old) = old {
            if let Err(e) = self.ops.destroy(old) {
                result = result.and(Err(host_err(e)));
            }
        }
        result
    }

    fn invalidate(&self, domain: DomainId, what: Invalidation) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let nested = match inner.domains.get(&domain) {
            // IOMMUFD flushes the IOTLB on IOAS_UNMAP; an S2 domain caches
            // nothing the guest could flush.
            Some(Domain::S2 { .. }) => return Ok(()),
            Some(Domain::S1 { nested, .. }) => *nested,
            None => return Err(BackendError::UnknownDomain(domain)),
        };
        let Some(hwpt) = nested else {
            return Ok(()); // no host table yet: nothing cached
        };
        let entries = self.format.entries(what);
        inner.stats.invalidations += 1;
        let handled = self.ops.hwpt_invalidate(hwpt, entries.as_entries());
        if matches!(handled, Ok(n) if n as usize == entries.len()) {
            return Ok(());
        }
        // Part of it was refused (entry_num read back): flush everything.
        let all = self.format.entries(Invalidation::All);
        inner.stats.invalidations += 1;
        inner.stats.full_flush_fallbacks += 1;
        match self.ops.hwpt_invalidate(hwpt, all.as_entries()) {
            Ok(1) => Ok(()),
            Ok(_) => Err(BackendError::FlushIgnored),
            Err(e) => Err(host_err(e)),
        }
    }
}

impl Drop for IommufdBackend {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Children before parents: nested HWPTs, the parent, then the IOAS.
        let mut ids = Vec::new();
        for d in inner.domains.values() {
            if let Domain::S1 {
                nested: Some(n), ..
            } = d
            {
                ids.push(*n);
            }
        }
        ids.extend(inner.parent);
        for d in inner.domains.values() {
            if let Domain::S2 { ioas, .. } = d {
                ids.push(*ioas);
            }
        }
        ids.extend(inner.zombies.iter().copied());
        ids.extend([inner.blocked, inner.direct]);
        for id in ids {
            if let Err(e) = self.ops.destroy(id) {
                log::warn!(
                    "IOMMUFD backend: cannot destroy object {id}: {}",
                    ErrorChain(&e)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vmm_sys_util::errno;

    #[derive(Debug, Clone, PartialEq)]
    enum Call {
        IoasAlloc(u32),
        Map {
            ioas: u32,
            iova: u64,
            va: usize,
            len: u64,
            perms: Perms,
        },
        Unmap {
            ioas: u32,
            iova: u64,
            len: u64,
        },
        Ranges(u32),
        HwptAlloc {
            dev_id: u32,
            pt_id: u32,
            flags: u32,
            data: HwptData,
            out: u32,
        },
        InvalidateVtd {
            hwpt: u32,
            entries: Vec<(u64, u64)>,
        },
        InvalidateMock {
            hwpt: u32,
            entries: Vec<(u32, u32)>,
        },
        Destroy(u32),
    }

    /// Records every call; ids count up from 1; keeps what each IOAS maps
    /// (IOAS_UNMAP of an exact mapping or of everything) and refuses to
    /// destroy an object a device is attached to (EBUSY); can refuse
    /// invalidations and unmaps.
    #[derive(Default)]
    struct FakeOps {
        calls: Mutex<Vec<Call>>,
        next: AtomicU32,
        /// `Some(n)`: the next invalidation handles `n` entries, then fails.
        invalidate_stops_at: Mutex<Option<u32>>,
        /// HWPT allocation fails (a host IOMMU without nesting).
        no_nesting: Mutex<bool>,
        ranges: Mutex<Vec<IovaRange>>,
        /// IOAS -> IOVA -> length, as the host maps it.
        mapped: Mutex<HashMap<u32, BTreeMap<u64, u64>>>,
        /// The next `n` IOAS_UNMAPs fail (EIO) and unmap nothing.
        fail_unmaps: Mutex<u32>,
        /// The next `n` IOAS_MAPs fail (ENOMEM).
        fail_maps: Mutex<u32>,
        /// The devices, for EBUSY on destroy.
        devices: Mutex<Vec<Arc<FakeDevice>>>,
    }

    impl FakeOps {
        fn new() -> Arc<Self> {
            let f = Self::default();
            *f.ranges.lock().expect("lock") = vec![
                IovaRange {
                    start: 0,
                    last: MSI_WINDOW.start - 1,
                },
                IovaRange {
                    start: MSI_WINDOW.last + 1,
                    last: (1 << 39) - 1,
                },
            ];
            Arc::new(f)
        }
        fn push(&self, c: Call) {
            self.calls.lock().expect("lock").push(c);
        }
        fn take(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().expect("lock"))
        }
        fn id(&self) -> u32 {
            self.next.fetch_add(1, Ordering::Relaxed) + 1
        }
    }

    impl IommufdOps for FakeOps {
        fn ioas_alloc(&self) -> ioctl::Result<u32> {
            let id = self.id();
            self.push(Call::IoasAlloc(id));
            Ok(id)
        }
        #[allow(unsafe_code)]
        unsafe fn ioas_map(
            &self,
            ioas: u32,
            iova: u64,
            va: *mut u8,
            len: u64,
            perms: Perms,
        ) -> ioctl::Result<()> {
            self.push(Call::Map {
                ioas,
                iova,
                va: va as usize,
                len,
                perms,
            });
            if take_one(&self.fail_maps) {
                return Err(fake_err("IOMMU_IOAS_MAP", libc::ENOMEM));
            }
            let mut mapped = self.mapped.lock().expect("lock");
            mapped.entry(ioas).or_default().insert(iova, len);
            Ok(())
        }
        fn ioas_unmap(&self, ioas: u32, iova: u64, len: u64) -> ioctl::Result<u64> {
            self.push(Call::Unmap { ioas, iova, len });
            if take_one(&self.fail_unmaps) {
                return Err(fake_err("IOMMU_IOAS_UNMAP", libc::EIO));
            }
            let mut mapped = self.mapped.lock().expect("lock");
            let maps = mapped.entry(ioas).or_default();
            if (iova, len) == (0, u64::MAX) {
                let all = maps.values().sum();
                maps.clear();
                return Ok(all);
            }
            match maps.get(&iova) {
                Some(l) if *l == len => {
                    maps.remove(&iova);
                    Ok(len)
                }
                _ => Err(fake_err("IOMMU_IOAS_UNMAP", libc::ENOENT)),
            }
        }
        fn iova_ranges(&self, ioas: u32) -> ioctl::Result<Vec<IovaRange>> {
            self.push(Call::Ranges(ioas));
            Ok(self.ranges.lock().expect("lock").clone())
        }
        fn hwpt_alloc(
            &self,
            dev_id: u32,
            pt_id: u32,
            flags: u32,
            data: HwptData,
        ) -> ioctl::Result<u32> {
            if *self.no_nesting.lock().expect("lock") {
                return Err(ioctl::Error::Ioctl {
                    op: "IOMMU_HWPT_ALLOC",
                    source: errno::Error::new(libc::EOPNOTSUPP),
                });
            }
            let out = self.id();
            self.push(Call::HwptAlloc {
                dev_id,
                pt_id,
                flags,
                data,
                out,
            });
            Ok(out)
        }
        fn hwpt_invalidate(&self, hwpt: u32, entries: InvalidateEntries<'_>) -> ioctl::Result<u32> {
            let count = u32::try_from(entries.len()).expect("few entries");
            self.push(match entries {
                InvalidateEntries::VtdS1(e) => Call::InvalidateVtd {
                    hwpt,
                    entries: e.iter().map(|e| (e.addr, e.npages)).collect(),
                },
                InvalidateEntries::Selftest(e) => Call::InvalidateMock {
                    hwpt,
                    entries: e.iter().map(|e| (e.flags, e.iotlb_id)).collect(),
                },
            });
            match self.invalidate_stops_at.lock().expect("lock").take() {
                Some(index) => Err(ioctl::Error::Invalidate {
                    index,
                    count,
                    source: errno::Error::new(libc::EINVAL),
                }),
                None => Ok(count),
            }
        }
        fn destroy(&self, id: u32) -> ioctl::Result<()> {
            self.push(Call::Destroy(id));
            let devices = self.devices.lock().expect("lock");
            if devices.iter().any(|d| d.on() == Some(id)) {
                return Err(fake_err("IOMMU_DESTROY", libc::EBUSY));
            }
            self.mapped.lock().expect("lock").remove(&id);
            Ok(())
        }
    }

    fn take_one(counter: &Mutex<u32>) -> bool {
        let mut n = counter.lock().expect("lock");
        let hit = *n > 0;
        *n = n.saturating_sub(1);
        hit
    }

    fn fake_err(op: &'static str, errno: i32) -> ioctl::Error {
        ioctl::Error::Ioctl {
            op,
            source: errno::Error::new(errno),
        }
    }

    /// A device that records the page tables it is attached to
    /// ([`DETACHED`] for a detach).
    #[derive(Default)]
    struct FakeDevice {
        pts: Mutex<Vec<u32>>,
        /// Page tables it cannot be attached to.
        refuse: Mutex<Vec<u32>>,
        no_detach: Mutex<bool>,
    }

    impl FakeDevice {
        /// The page table the device is on now.
        fn on(&self) -> Option<u32> {
            self.pts
                .lock()
                .expect("lock")
                .last()
                .copied()
                .filter(|pt| *pt != DETACHED)
        }

        /// What its DMA reaches now: (IOVA, length) of the host mappings
        /// of the IOAS it is on (a nested HWPT counts as its own id).
        fn reachable(&self, ops: &FakeOps) -> Vec<(u64, u64)> {
            let Some(pt) = self.on() else {
                return vec![];
            };
            let mapped = ops.mapped.lock().expect("lock");
            mapped
                .get(&pt)
                .map(|m| m.iter().map(|(i, l)| (*i, *l)).collect())
                .unwrap_or_default()
        }
    }

    const DETACHED: u32 = u32::MAX;

    impl AttachHwpt for FakeDevice {
        fn attach_hwpt(&self, pt_id: u32) -> io::Result<()> {
            if self.refuse.lock().expect("lock").contains(&pt_id) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.pts.lock().expect("lock").push(pt_id);
            Ok(())
        }
        fn detach_hwpt(&self) -> io::Result<()> {
            if *self.no_detach.lock().expect("lock") {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            self.pts.lock().expect("lock").push(DETACHED);
            Ok(())
        }
    }

    const DEV: DeviceId = DeviceId::pci(0, 0, 3, 0);
    const RAM: u64 = 0x10_0000;

    /// A backend (direct IOAS 1, blocked IOAS 2) with 1 MiB of RAM at GPA 0
    /// and one device (dev_id 77) added.
    #[allow(unsafe_code)]
    fn setup(format: NestFormat) -> (IommufdBackend, Arc<FakeOps>, Arc<FakeDevice>, Vec<u8>) {
        let ops = FakeOps::new();
        let b = IommufdBackend::new(ops.clone(), format).expect("backend");
        let mut ram = vec![0u8; usize::try_from(RAM).expect("small") + 0x1000];
        let off = ram.as_ptr().align_offset(0x1000);
        let host = ram[off..].as_mut_ptr();
        // SAFETY: the fake never touches the memory.
        unsafe { b.add_ram_region(0, RAM, host) }.expect("region");
        let dev = Arc::new(FakeDevice::default());
        ops.devices.lock().expect("lock").push(dev.clone());
        b.add_host_device(DEV, 77, dev.clone()).expect("hand over");
        b.add_device(DEV).expect("add");
        (b, ops, dev, ram)
    }

    fn host_of(ops: &FakeOps) -> usize {
        match ops.calls.lock().expect("lock")[2] {
            Call::Map { va, .. } => va,
            ref c => panic!("{c:?}"),
        }
    }

    #[test]
    fn ram_is_mapped_at_gpa_and_devices_start_on_it() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        let calls = ops.take();
        assert_eq!(calls[..2], [Call::IoasAlloc(1), Call::IoasAlloc(2)]);
        assert!(matches!(
            calls[2],
            Call::Map {
                ioas: 1,
                iova: 0,
                len: RAM,
                perms: Perms::RW,
                ..
            }
        ));
        // The IOVA ranges are read again after the attach.
        assert_eq!(calls[3..], [Call::Ranges(1)]);
        assert_eq!(*dev.pts.lock().expect("lock"), [1]);
        assert_eq!(b.direct_ioas(), 1);
        assert_eq!(b.object_ids(), [1, 2]);
    }

    #[test]
    #[allow(unsafe_code)]
    fn bad_regions_are_refused() {
        let (b, ops, _dev, mut ram) = setup(NestFormat::VtdS1);
        ops.take();
        // Page-aligned, so that only what each case tests is wrong.
        let off = ram.as_ptr().align_offset(0x1000);
        let host = ram[off..].as_mut_ptr();
        let add = |gpa, len| {
            // SAFETY: every call here is refused before the backend keeps
            // `host`, and the fake host never touches memory anyway.
            unsafe { b.add_ram_region(gpa, len, host) }
        };
        let err = add(0x8_0000, 0x1000).expect_err("overlap");
        assert!(
            matches!(
                err,
                BackendError::Invalid(InvalidRequest::RegionOverlaps { .. })
            ),
            "{err}"
        );
        assert!(
            matches!(add(0xfee0_0000, 0x1000), Err(BackendError::ReservedOverlap)),
            "MSI window"
        );
        let bad = |r: Result<(), BackendError>| {
            matches!(
                r,
                Err(BackendError::Invalid(InvalidRequest::BadRegion { .. }))
            )
        };
        assert!(bad(add(0x20_0800, 0x1000)), "misaligned");
        assert!(bad(add(u64::MAX - 0xfff, 0x2000)), "wraps");
        assert!(bad(add(0x20_0000, 0)), "empty");
        assert!(ops.take().is_empty());
        assert!(
            matches!(
                b.remove_ram_region(0x1000),
                Err(BackendError::Invalid(InvalidRequest::NoRegion(0x1000)))
            ),
            "no region starts there"
        );
    }

    #[test]
    fn s2_runs_are_mirrored_exactly() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        let host = host_of(&ops);
        ops.take();
        b.create_domain(5, DomainKind::S2).expect("create");
        let run = MapRun {
            iova: 0x40_0000,
            gpa: 0x3000,
            len: 0x2000,
            perms: Perms::R,
        };
        b.map(5, run).expect("map");
        b.attach(DEV, AttachTarget::Domain(5)).expect("attach");
        assert_eq!(
            ops.take(),
            [
                Call::IoasAlloc(3),
                Call::Map {
                    ioas: 3,
                    iova: 0x40_0000,
                    va: host + 0x3000,
                    len: 0x2000,
                    perms: Perms::R
                },
            ]
        );
        assert_eq!(*dev.pts.lock().expect("lock"), [1, 3]);
        assert!(b.map(5, run).is_err(), "same run twice");
        let outside = MapRun {
            gpa: RAM - 0x1000,
            ..run
        };
        assert!(b.map(5, outside).is_err(), "run leaves guest RAM");
        assert!(b.map(9, run).is_err(), "unknown domain");
        let partial = MapRun { len: 0x1000, ..run };
        assert!(b.unmap(5, partial).is_err(), "only whole runs");
        assert!(ops.take().is_empty(), "nothing reached the host");
        b.unmap(5, run).expect("unmap");
        assert_eq!(
            ops.take(),
            [Call::Unmap {
                ioas: 3,
                iova: 0x40_0000,
                len: 0x2000
            }]
        );
        // S2 mappings cache nothing the guest flushes.
        b.invalidate(5, Invalidation::All).expect("flush");
        assert!(ops.take().is_empty());
        b.attach(DEV, AttachTarget::Blocked).expect("blocked");
        b.destroy_domain(5).expect("destroy");
        assert_eq!(ops.take(), [Call::Destroy(3)]);
        assert_eq!(*dev.pts.lock().expect("lock"), [1, 3, 2]);
        assert_eq!(b.stats().maps, 2);
        assert_eq!(b.stats().unmaps, 1);
    }

    #[test]
    fn removing_a_region_unmaps_it_everywhere() {
        let (b, ops, _dev, _ram) = setup(NestFormat::VtdS1);
        b.create_domain(5, DomainKind::S2).expect("create");
        let run = MapRun {
            iova: 0x40_0000,
            gpa: 0x3000,
            len: 0x1000,
            perms: Perms::RW,
        };
        b.map(5, run).expect("map");
        ops.take();
        b.remove_ram_region(0).expect("remove");
        assert_eq!(
            ops.take(),
            [
                Call::Unmap {
                    ioas: 3,
                    iova: 0x40_0000,
                    len: 0x1000
                },
                Call::Unmap {
                    ioas: 1,
                    iova: 0,
                    len: RAM
                },
            ]
        );
        // The domain layer's later unmap of that run is a no-op.
        b.unmap(5, run).expect("already gone");
        assert!(ops.take().is_empty());
        assert!(b.map(5, run).is_err(), "no RAM there any more");
    }

    #[test]
    fn s1_nests_over_the_direct_ioas_and_follows_set_s1() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        ops.take();
        b.create_domain(6, DomainKind::S1).expect("create");
        // Unconfigured S1 blocks DMA.
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        assert_eq!(*dev.pts.lock().expect("lock"), [1, 2]);
        assert!(ops.take().is_empty());
        // Nothing cached yet.
        b.invalidate(6, Invalidation::All).expect("flush");
        assert!(ops.take().is_empty());

        let cfg = S1Config {
            root: 0x5000,
            levels: PagingLevels::Four,
            translation_enabled: true,
            blocked: false,
        };
        b.set_s1(6, cfg).expect("set_s1");
        let vtd = |root, width| {
            HwptData::VtdS1(iommu_hwpt_vtd_s1 {
                flags: 0,
                pgtbl_addr: root,
                addr_width: width,
                __reserved: 0,
            })
        };
        assert_eq!(
            ops.take(),
            [
                Call::HwptAlloc {
                    dev_id: 77,
                    pt_id: 1,
                    flags: HWPT_ALLOC_NEST_PARENT,
                    data: HwptData::None,
                    out: 3
                },
                Call::HwptAlloc {
                    dev_id: 77,
                    pt_id: 3,
                    flags: 0,
                    data: vtd(0x5000, 48),
                    out: 4
                },
            ]
        );
        assert_eq!(*dev.pts.lock().expect("lock"), [1, 2, 4]);

        // A new table: a new nested HWPT, the device moves, the old one goes.
        let cfg5 = S1Config {
            root: 0x6000,
            levels: PagingLevels::Five,
            ..cfg
        };
        b.set_s1(6, cfg5).expect("set_s1 again");
        assert_eq!(
            ops.take(),
            [
                Call::HwptAlloc {
                    dev_id: 77,
                    pt_id: 3,
                    flags: 0,
                    data: vtd(0x6000, 57),
                    out: 5
                },
                Call::Destroy(4),
            ]
        );
        assert_eq!(*dev.pts.lock().expect("lock"), [1, 2, 4, 5]);
        assert_eq!(b.object_ids(), [1, 2, 3, 5]);
        assert_eq!(b.s1_hwpt(6), Some(5));

        b.invalidate(
            6,
            Invalidation::Range {
                iova: 0x7000,
                len: 0x3000,
            },
        )
        .expect("range");
        b.invalidate(6, Invalidation::All).expect("all");
        assert_eq!(
            ops.take(),
            [
                Call::InvalidateVtd {
                    hwpt: 5,
                    entries: vec![(0x7000, 3)]
                },
                Call::InvalidateVtd {
                    hwpt: 5,
                    entries: vec![(0, u64::MAX)]
                },
            ]
        );
        // Translation off: blocked, the nested HWPT goes.
        b.set_s1(
            6,
            S1Config {
                blocked: true,
                ..cfg5
            },
        )
        .expect("block");
        assert_eq!(ops.take(), [Call::Destroy(5)]);
        assert_eq!(dev.pts.lock().expect("lock").last(), Some(&2));
    }

    #[test]
    fn a_refused_invalidation_falls_back_to_a_full_flush() {
        let (b, ops, _dev, _ram) = setup(NestFormat::Selftest);
        b.create_domain(6, DomainKind::S1).expect("create");
        let cfg = S1Config {
            root: 0x5000,
            levels: PagingLevels::Four,
            translation_enabled: true,
            blocked: false,
        };
        b.set_s1(6, cfg)
            .expect("set_s1 (no device: nothing allocated)");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        let nested = match ops.take().last() {
            Some(Call::HwptAlloc {
                data: HwptData::Selftest(d),
                out,
                ..
            }) => {
                assert_eq!(d.iotlb, IOMMU_TEST_IOTLB_DEFAULT);
                *out
            }
            other => panic!("{other:?}"),
        };
        // Pages 5..=7 index mock IOTLB entries 1, 2, 3.
        b.invalidate(
            6,
            Invalidation::Range {
                iova: 0x5000,
                len: 0x3000,
            },
        )
        .expect("range");
        assert_eq!(
            ops.take(),
            [Call::InvalidateMock {
                hwpt: nested,
                entries: vec![(0, 1), (0, 2), (0, 3)]
            }]
        );
        *ops.invalidate_stops_at.lock().expect("lock") = Some(1);
        b.invalidate(
            6,
            Invalidation::Range {
                iova: 0x5000,
                len: 0x3000,
            },
        )
        .expect("fallback");
        assert_eq!(
            ops.take(),
            [
                Call::InvalidateMock {
                    hwpt: nested,
                    entries: vec![(0, 1), (0, 2), (0, 3)]
                },
                Call::InvalidateMock {
                    hwpt: nested,
                    entries: vec![(IOMMU_TEST_INVALIDATE_FLAG_ALL, 0)]
                },
            ]
        );
        let s = b.stats();
        assert_eq!((s.invalidations, s.full_flush_fallbacks), (3, 1));
    }

    #[test]
    fn a_failed_attach_fails_closed() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        b.create_domain(5, DomainKind::S2).expect("create");
        ops.take();
        *dev.refuse.lock().expect("lock") = vec![3];
        assert!(matches!(
            b.attach(DEV, AttachTarget::Domain(5)),
            Err(BackendError::Host(_))
        ));
        assert_eq!(
            *dev.pts.lock().expect("lock"),
            [1, 2],
            "blocked after the failure"
        );
        assert!(matches!(
            b.attach(DeviceId::pci(0, 0, 9, 0), AttachTarget::Identity),
            Err(BackendError::UnknownDevice(_))
        ));
        assert!(matches!(
            b.attach(DEV, AttachTarget::Domain(8)),
            Err(BackendError::UnknownDomain(8))
        ));
        assert!(
            b.add_host_device(DEV, 1, dev.clone()).is_err(),
            "handed over twice"
        );
    }

    #[test]
    fn a_device_that_cannot_detach_is_left_blocked() {
        let (b, _ops, dev, _ram) = setup(NestFormat::Selftest);
        *dev.no_detach.lock().expect("lock") = true;
        b.remove_device(DEV).expect("remove");
        assert_eq!(*dev.pts.lock().expect("lock"), [1, 2]);
    }

    #[test]
    fn s1_without_host_nesting_fails_closed() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        *ops.no_nesting.lock().expect("lock") = true;
        b.create_domain(6, DomainKind::S1).expect("create");
        let cfg = S1Config {
            root: 0x5000,
            levels: PagingLevels::Four,
            translation_enabled: true,
            blocked: false,
        };
        b.set_s1(6, cfg)
            .expect("no device yet: nothing to allocate");
        assert!(matches!(
            b.attach(DEV, AttachTarget::Domain(6)),
            Err(BackendError::Unsupported) | Err(BackendError::Iommufd(_))
        ));
        assert_eq!(
            *dev.pts.lock().expect("lock"),
            [1, 2],
            "left blocked, not on IOVA = GPA"
        );
        // Attached to the S1 domain through a table change: blocked as well.
        b.attach(DEV, AttachTarget::Identity).expect("identity");
        b.set_s1(6, S1Config::UNCONFIGURED).expect("unconfigure");
        b.attach(DEV, AttachTarget::Domain(6)).expect("blocked S1");
        assert!(b.set_s1(6, cfg).is_err());
        assert_eq!(dev.pts.lock().expect("lock").last(), Some(&2));
    }

    #[test]
    fn reserved_ranges_that_cover_ram_make_the_attach_fail_closed() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        *ops.ranges.lock().expect("lock") = vec![IovaRange {
            start: 0x8_0000,
            last: u64::MAX,
        }];
        b.attach(DEV, AttachTarget::Blocked).expect("blocked");
        assert!(b.attach(DEV, AttachTarget::Identity).is_err());
        assert_eq!(dev.pts.lock().expect("lock").last(), Some(&2));
    }

    #[test]
    fn removal_and_drop_destroy_every_object() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        b.create_domain(5, DomainKind::S2).expect("s2");
        b.create_domain(6, DomainKind::S1).expect("s1");
        let cfg = S1Config {
            root: 0x5000,
            levels: PagingLevels::Four,
            translation_enabled: true,
            blocked: false,
        };
        b.set_s1(6, cfg).expect("set_s1");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        b.remove_device(DEV).expect("remove");
        assert_eq!(dev.pts.lock().expect("lock").last(), Some(&DETACHED));
        assert!(matches!(
            b.remove_device(DEV),
            Err(BackendError::UnknownDevice(_))
        ));
        let ids = b.object_ids();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        ops.take();
        drop(b);
        let destroyed: Vec<u32> = ops
            .take()
            .into_iter()
            .map(|c| match c {
                Call::Destroy(id) => id,
                c => panic!("{c:?}"),
            })
            .collect();
        // Nested (5), parent (4), S2 IOAS (3), blocked (2), direct (1).
        assert_eq!(destroyed, [5, 4, 3, 2, 1]);
    }

    fn s2_run(iova: u64, len: u64) -> MapRun {
        MapRun {
            iova,
            gpa: 0x3000,
            len,
            perms: Perms::RW,
        }
    }

    /// Item 8: a run is forgotten only once IOAS_UNMAP removed it; when the
    /// unmap fails, the IOAS may still map it, so the domain's devices are
    /// blocked and stay blocked (the domain is never attached again).
    #[test]
    fn a_failed_unmap_blocks_the_domains_devices() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        b.create_domain(5, DomainKind::S2).expect("create");
        let run = s2_run(0x40_0000, 0x2000);
        b.map(5, run).expect("map");
        b.attach(DEV, AttachTarget::Domain(5)).expect("attach");
        assert_eq!(dev.reachable(&ops), [(0x40_0000, 0x2000)]);
        *ops.fail_unmaps.lock().expect("lock") = 1;
        assert!(b.unmap(5, run).is_err());
        assert_eq!(
            dev.reachable(&ops),
            [],
            "the stale mapping is not reachable"
        );
        assert_eq!(dev.on(), Some(2), "blocked");
        // The domain stays closed, even when attached to again.
        b.attach(DEV, AttachTarget::Identity).expect("identity");
        b.attach(DEV, AttachTarget::Domain(5)).expect("attach");
        assert_eq!(dev.on(), Some(2));
        // The run is still known, so a later unmap or the destroy removes it.
        b.unmap(5, run).expect("unmap again");
        b.attach(DEV, AttachTarget::Blocked).expect("blocked");
        b.destroy_domain(5).expect("destroy");
        assert_eq!(b.object_ids(), [1, 2]);
    }

    /// Item 8: a partial unmap (split) leaves the hole unreachable at every
    /// step; a failed unmap or a kept piece that cannot be mapped again
    /// blocks the domain's devices.
    #[test]
    fn a_failed_split_fails_closed() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        b.create_domain(5, DomainKind::S2).expect("create");
        let run = s2_run(0x40_0000, 0x3000);
        b.map(5, run).expect("map");
        b.attach(DEV, AttachTarget::Domain(5)).expect("attach");
        let left = MapRun { len: 0x1000, ..run };
        let right = MapRun {
            iova: 0x40_2000,
            gpa: 0x5000,
            len: 0x1000,
            ..run
        };
        b.unmap_keep(5, run, &[left, right]).expect("split");
        assert_eq!(
            dev.reachable(&ops),
            [(0x40_0000, 0x1000), (0x40_2000, 0x1000)],
            "the hole is gone, the pieces stay"
        );
        // The unmap of a split fails: blocked.
        let run2 = s2_run(0x50_0000, 0x3000);
        b.map(5, run2).expect("map");
        *ops.fail_unmaps.lock().expect("lock") = 1;
        let piece = MapRun {
            len: 0x1000,
            ..run2
        };
        assert!(b.unmap_keep(5, run2, &[piece]).is_err());
        assert_eq!(dev.reachable(&ops), []);
        // A kept piece that cannot be mapped again: blocked too.
        b.create_domain(6, DomainKind::S2).expect("create");
        b.map(6, run).expect("map");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        *ops.fail_maps.lock().expect("lock") = 1;
        assert!(b.unmap_keep(6, run, &[left, right]).is_err());
        assert_eq!(dev.reachable(&ops), []);
        assert_eq!(dev.on(), Some(2));
    }

    /// Item 8: the domain layer's removal of a device whose moves all fail
    /// (blocked IOAS refused, detach refused) destroys its domain under it:
    /// the IOAS cannot be destroyed (EBUSY), so it is emptied and kept to be
    /// destroyed later, and nothing stays reachable.
    #[test]
    fn a_double_failure_on_detach_leaves_nothing_reachable() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        b.create_domain(5, DomainKind::S2).expect("create");
        b.map(5, s2_run(0x40_0000, 0x2000)).expect("map");
        b.attach(DEV, AttachTarget::Domain(5)).expect("attach");
        *dev.refuse.lock().expect("lock") = vec![1, 2];
        *dev.no_detach.lock().expect("lock") = true;
        // What Iommu::unregister_device does: block, drop the domain's
        // instance, remove the device.
        assert!(b.attach(DEV, AttachTarget::Blocked).is_err());
        assert_eq!(dev.on(), Some(3), "stuck on the S2 IOAS");
        assert!(b.destroy_domain(5).is_err(), "EBUSY");
        assert_eq!(dev.reachable(&ops), [], "the stuck IOAS was emptied");
        assert_eq!(b.object_ids(), [1, 2, 3], "kept, not orphaned");
        assert!(b.remove_device(DEV).is_err());
        assert_eq!(dev.reachable(&ops), []);
        ops.take();
        drop(b);
        assert!(
            ops.take().contains(&Call::Destroy(3)),
            "destroyed again on drop"
        );
    }

    /// Item 8: when only the blocked IOAS is refused, the device is detached
    /// (VFIO blocks its DMA) and everything is destroyed at once; an object
    /// left behind is destroyed once the device has gone.
    #[test]
    fn a_device_that_cannot_be_blocked_is_detached() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        b.create_domain(5, DomainKind::S2).expect("create");
        b.map(5, s2_run(0x40_0000, 0x2000)).expect("map");
        b.attach(DEV, AttachTarget::Domain(5)).expect("attach");
        *dev.refuse.lock().expect("lock") = vec![2];
        assert!(b.attach(DEV, AttachTarget::Blocked).is_err());
        assert_eq!(dev.on(), None, "detached");
        b.destroy_domain(5).expect("nothing on it");
        assert_eq!(b.object_ids(), [1, 2]);
        // A stuck device whose removal can detach it lets its zombie go.
        b.create_domain(6, DomainKind::S2).expect("create");
        b.map(6, s2_run(0x40_0000, 0x2000)).expect("map");
        *dev.refuse.lock().expect("lock") = vec![];
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        *dev.refuse.lock().expect("lock") = vec![1, 2];
        *dev.no_detach.lock().expect("lock") = true;
        assert!(b.attach(DEV, AttachTarget::Identity).is_err());
        assert!(b.destroy_domain(6).is_err());
        assert_eq!(dev.reachable(&ops), []);
        *dev.no_detach.lock().expect("lock") = false;
        b.remove_device(DEV).expect("detached");
        assert_eq!(b.object_ids(), [1, 2], "the zombie is destroyed");
    }

    /// Item 8: a RAM region whose unmap fails (from an S2 IOAS or from the
    /// direct IOAS) leaves no device able to reach it.
    #[test]
    fn a_failed_region_unmap_blocks_its_users() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        b.create_domain(5, DomainKind::S2).expect("create");
        b.map(5, s2_run(0x40_0000, 0x2000)).expect("map");
        b.attach(DEV, AttachTarget::Domain(5)).expect("attach");
        *ops.fail_unmaps.lock().expect("lock") = 1;
        assert!(b.remove_ram_region(0).is_err());
        assert_eq!(dev.reachable(&ops), [], "S2 domain blocked");
        // The direct IOAS.
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        assert_eq!(dev.reachable(&ops), [(0, RAM)]);
        *ops.fail_unmaps.lock().expect("lock") = 1;
        assert!(b.remove_ram_region(0).is_err());
        assert_eq!(dev.reachable(&ops), [], "default domain blocked");
        b.attach(DEV, AttachTarget::Identity).expect("identity");
        assert_eq!(dev.on(), Some(2), "and stays blocked");
    }

    /// Linux's identity S1 domain (translation disabled) is the direct IOAS
    /// (IOVA = GPA), its blocking domain the blocked IOAS; no HWPT needed.
    #[test]
    fn s1_identity_is_the_direct_ioas() {
        let (b, ops, dev, _ram) = setup(NestFormat::VtdS1);
        b.create_domain(1, DomainKind::S1).expect("create");
        b.create_domain(2, DomainKind::S1).expect("create");
        let identity = S1Config {
            blocked: false,
            ..S1Config::UNCONFIGURED
        };
        b.set_s1(1, identity).expect("identity");
        b.set_s1(
            2,
            S1Config {
                translation_enabled: true,
                ..S1Config::UNCONFIGURED
            },
        )
        .expect("blocking");
        ops.take();
        b.attach(DEV, AttachTarget::Domain(2)).expect("blocking");
        assert_eq!(dev.on(), Some(2));
        b.attach(DEV, AttachTarget::Domain(1)).expect("identity");
        assert_eq!(dev.on(), Some(1));
        assert_eq!(dev.reachable(&ops), [(0, RAM)]);
        assert!(
            !ops.take()
                .iter()
                .any(|c| matches!(c, Call::HwptAlloc { .. })),
            "no nested HWPT"
        );
    }
}
