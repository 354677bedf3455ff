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
use crate::runs::RunBudget;
use crate::s1table::{self, LeafRange, LeafWalkError, TableMemory};

const PAGE_SHIFT: u32 = 12;

/// Guest physical address width the shadow's walker assumes for the
/// reserved-bit check (bits 51:width). The backend does not know the VM's
/// configured width; with the widest one an entry the software model calls
/// reserved points above guest RAM instead, and is skipped all the same.
const SHADOW_PHYS_ADDR_WIDTH: u8 = 52;

/// Entries one shadow walk may read by default ([`IommufdBackend::set_walk_limit`]):
/// 64 Mi, the leaves of 256 GiB of 4 KiB pages, so that a table the guest
/// points back at itself ends in bounded time (about a second) instead of
/// walking 2^36 aliases.
pub const DEFAULT_WALK_LIMIT: u64 = 1 << 26;

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
    /// Walks of a guest S1 table for a shadow (one per set-up or flush).
    pub shadow_walks: u64,
    /// Table entries those walks read.
    pub shadow_entries_read: u64,
    /// Pages the guest's range flushes of shadowed domains covered.
    pub range_flush_pages: u64,
    /// Of those, pages whose translation had not changed (mapped before
    /// and after the same way): over-flushed. Pages unmapped before and
    /// after are not counted (the ranges may span unmapped space).
    pub range_flush_unchanged_pages: u64,
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
    /// The guest's settings, and while they translate and a device needs
    /// it, the host page table that holds its table ([`S1Table`]).
    S1 { config: S1Config, table: S1Table },
}

/// What holds an S1 domain's table on the host.
enum S1Table {
    /// Nothing yet (no device needs it, or the domain does not translate).
    None,
    /// A nested HWPT over the NEST_PARENT HWPT (the host walks the guest's
    /// table itself).
    Nested(u32),
    /// The host cannot nest: the guest's table copied into an IOAS.
    Shadow(Shadow),
}

impl S1Table {
    fn object(&self) -> Option<u32> {
        match self {
            S1Table::None => None,
            S1Table::Nested(id) => Some(*id),
            S1Table::Shadow(s) => Some(s.ioas),
        }
    }
}

/// The shadow of a guest S1 table: an IOAS that maps what the table
/// translated when it was last walked (at set-up, then over every flushed
/// range), as an IOTLB would cache it.
///
/// `maps` are the IOAS's mappings exactly as made (IOAS_UNMAP cannot split
/// one): runs contiguous in IOVA and GPA, one permission, inside one guest
/// RAM region, each charged as one run to the VM-wide [`RunBudget`].
/// `failed`: an IOAS_UNMAP failed, so the IOAS may map what the guest's
/// table no longer does; its devices are blocked and it is not used again
/// (a new table builds a new shadow).
struct Shadow {
    ioas: u32,
    maps: BTreeMap<u64, MapRun>,
    failed: bool,
}

/// Guest RAM as the shadow's walker reads it: through the regions' host
/// mappings.
struct RamTables<'a>(&'a BTreeMap<u64, Region>);

impl TableMemory for RamTables<'_> {
    #[allow(unsafe_code)]
    fn read_entries(&self, gpa: u64, out: &mut [u64]) -> bool {
        let len = (out.len() as u64) * 8;
        let Some(region) = self
            .0
            .range(..=gpa)
            .next_back()
            .map(|(_, r)| *r)
            .filter(|r| gpa - r.gpa < r.len && len <= r.len - (gpa - r.gpa))
        else {
            return false;
        };
        if gpa & 7 != 0 {
            return false;
        }
        let Some(base) = usize::try_from(gpa - region.gpa)
            .ok()
            .and_then(|off| region.host.checked_add(off))
        else {
            return false;
        };
        for (i, e) in out.iter_mut().enumerate() {
            // SAFETY: `[gpa, gpa + len)` lies in the region, whose host
            // mapping add_ram_region's caller keeps alive and accessed only
            // through raw pointers; the region's host address and `gpa` are
            // 8-byte aligned (page-aligned region, checked `gpa`), so each
            // read is an aligned u64 inside the mapping. The guest may write
            // it concurrently: a volatile read sees some value, as hardware
            // walking the table would.
            *e = u64::from_le(unsafe { std::ptr::read_volatile((base as *const u64).add(i)) });
        }
        true
    }
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
    /// Nested HWPTs are tried for S1 domains: false from the first time
    /// the host answered EOPNOTSUPP (or from the start, see
    /// [`IommufdBackend::without_nesting`]); S1 domains are then shadowed.
    nesting: bool,
    /// The VM-wide run limit shadows are charged to.
    budget: RunBudget,
    /// Entries one shadow walk may read.
    walk_limit: u64,
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
///   disabled) uses the direct IOAS itself; a blocked one the blocked IOAS.
///   Guest flushes become IOMMU_HWPT_INVALIDATE; when the host handles fewer
///   entries than passed (entry_num read back), the whole domain is flushed
///   instead.
/// - S1 domains where the host cannot nest (AMD, VT-d without scalable-mode
///   nesting, QEMU's VT-d: the HWPT allocation answers EOPNOTSUPP, or
///   [`IommufdBackend::without_nesting`]): a shadow, an IOAS of the domain's
///   own into which the VMM copies the guest's table (ABI section 7). The
///   table is walked when the domain is set up for a device and over every
///   flushed range (all of it for a full flush); the shadow unmaps what the
///   walk no longer finds (or finds changed) and maps what it finds, guest
///   RAM only, read-only where R/W is clear, before the call returns.
///   Runs the walk finds unchanged stay mapped. A run reaching past the
///   flushed range is unmapped whole and its outer part mapped again, so
///   DMA to that part may fault for the length of the call (closed, like
///   an S2 split). Shadow runs count against the VM-wide run limit.
///   A walk reads at most [`DEFAULT_WALK_LIMIT`] entries (a table pointing
///   back at itself), then fails closed: stale runs in the range are
///   unmapped, nothing new mapped.
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

/// IOAS_UNMAP of exactly `[iova, iova + len)`: an error, or fewer bytes
/// unmapped, is a failure (the callers fail closed on it).
fn unmap_exact(ops: &dyn IommufdOps, ioas: u32, iova: u64, len: u64) -> Result<(), BackendError> {
    match ops.ioas_unmap(ioas, iova, len) {
        Ok(n) if n == len => Ok(()),
        Ok(removed) => Err(BackendError::ShortUnmap { len, removed }),
        Err(e) => Err(host_err(e)),
    }
}

fn host_err(e: ioctl::Error) -> BackendError {
    match e.errno() {
        Some(libc::ENOMEM) | Some(libc::ENOSPC) => BackendError::NoResources,
        Some(libc::EOPNOTSUPP) => BackendError::Unsupported,
        _ => BackendError::Iommufd(e),
    }
}

/// Adds the guest RAM parts of `leaf` to `wanted` (ascending IOVA), merged
/// into the last run where they continue it in IOVA and GPA with the same
/// permission in the same region (`last_region`, the start of the last
/// run's region). A part outside guest RAM is skipped: DMA there faults.
/// Fails when a new run would make more than `allowance`.
fn push_leaf(
    regions: &BTreeMap<u64, Region>,
    wanted: &mut Vec<MapRun>,
    last_region: &mut u64,
    leaf: LeafRange,
    allowance: u64,
) -> Result<(), ()> {
    let perms = if leaf.writable { Perms::RW } else { Perms::R };
    let end = leaf.gpa.saturating_add(leaf.len);
    let mut cursor = leaf.gpa;
    while cursor < end {
        let containing = regions
            .range(..=cursor)
            .next_back()
            .map(|(_, r)| *r)
            .filter(|r| cursor - r.gpa < r.len);
        let Some(region) = containing else {
            // Skip the hole up to the next region, if it starts in the leaf.
            match regions.range(cursor..end).next() {
                Some((start, _)) => {
                    cursor = *start;
                    continue;
                }
                None => break,
            }
        };
        let piece_end = end.min(region.gpa + region.len);
        let iova = leaf.iova + (cursor - leaf.gpa);
        let len = piece_end - cursor;
        match wanted.last_mut() {
            Some(last)
                if *last_region == region.gpa
                    && last.iova_end() == iova
                    && last.gpa + last.len == cursor
                    && last.perms == perms =>
            {
                last.len += len;
            }
            _ => {
                if wanted.len() as u64 >= allowance {
                    return Err(());
                }
                wanted.push(MapRun {
                    iova,
                    gpa: cursor,
                    len,
                    perms,
                });
                *last_region = region.gpa;
            }
        }
        cursor = piece_end;
    }
    Ok(())
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
                nesting: true,
                budget: RunBudget::default(),
                walk_limit: DEFAULT_WALK_LIMIT,
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

    /// Never tries nested HWPTs: S1 domains are shadowed from the start
    /// (for a host known to have no nesting for the guest's format, which
    /// saves the failing allocation, and for tests).
    pub fn without_nesting(self) -> Self {
        self.lock().nesting = false;
        self
    }

    /// Whether S1 domains are shadowed (the host cannot nest).
    pub fn shadows_s1(&self) -> bool {
        !self.lock().nesting
    }

    /// Sets how many table entries one shadow walk may read
    /// ([`DEFAULT_WALK_LIMIT`]).
    pub fn set_walk_limit(&self, entries: u64) {
        self.lock().walk_limit = entries;
    }

    /// The nested HWPT that holds S1 domain `domain`'s table now, if any.
    pub fn s1_hwpt(&self, domain: DomainId) -> Option<u32> {
        match self.lock().domains.get(&domain) {
            Some(Domain::S1 {
                table: S1Table::Nested(n),
                ..
            }) => Some(*n),
            _ => None,
        }
    }

    /// The IOAS of S1 domain `domain`'s shadow now, if it is shadowed.
    pub fn s1_shadow_ioas(&self, domain: DomainId) -> Option<u32> {
        match self.lock().domains.get(&domain) {
            Some(Domain::S1 {
                table: S1Table::Shadow(s),
                ..
            }) => Some(s.ioas),
            _ => None,
        }
    }

    /// The runs S1 domain `domain`'s shadow maps now, by IOVA.
    pub fn s1_shadow_runs(&self, domain: DomainId) -> Vec<MapRun> {
        match self.lock().domains.get(&domain) {
            Some(Domain::S1 {
                table: S1Table::Shadow(s),
                ..
            }) => s.maps.values().copied().collect(),
            _ => Vec::new(),
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
                Domain::S1 { table, .. } => ids.extend(table.object()),
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
        let mut shadow_runs_gone = 0u64;
        for (id, dom) in inner.domains.iter_mut() {
            if let Domain::S1 {
                table: S1Table::Shadow(shadow),
                ..
            } = dom
            {
                let gone: Vec<MapRun> = shadow
                    .maps
                    .values()
                    .filter(|r| inside(r))
                    .copied()
                    .collect();
                for run in gone {
                    unmaps += 1;
                    match unmap_exact(&*self.ops, shadow.ioas, run.iova, run.len) {
                        Ok(()) => {
                            shadow.maps.remove(&run.iova);
                            shadow_runs_gone += 1;
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                            failed_domains.push(*id);
                        }
                    }
                }
            }
            if let Domain::S2 { ioas, runs, .. } = dom {
                let gone: Vec<MapRun> = runs.values().filter(|r| inside(r)).copied().collect();
                for run in gone {
                    unmaps += 1;
                    match unmap_exact(&*self.ops, *ioas, run.iova, run.len) {
                        Ok(()) => {
                            runs.remove(&run.iova);
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                            failed_domains.push(*id);
                        }
                    }
                }
            }
        }
        inner.budget.give_back(shadow_runs_gone);
        failed_domains.dedup();
        for id in failed_domains {
            self.fail_domain(&mut inner, id);
        }
        let direct = inner.direct;
        unmaps += 1;
        if let Err(e) = unmap_exact(&*self.ops, direct, region.gpa, region.len) {
            first_err.get_or_insert(e);
            self.fail_direct(&mut inner);
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
    /// nested HWPT of an S1 domain (and the parent), or building its shadow
    /// where the host cannot nest, on first need.
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
                Some(Domain::S1 { config, table }) => {
                    let shadowed = matches!(table, S1Table::Shadow(_));
                    match config.mode() {
                        // The shadow is an IOAS of its own, not over the
                        // direct one.
                        _ if inner.direct_failed && !shadowed => return Ok(inner.blocked),
                        S1Mode::Blocked => return Ok(inner.blocked),
                        // Identity: the default domain's IOAS (IOVA = GPA).
                        S1Mode::Identity if inner.direct_failed => return Ok(inner.blocked),
                        S1Mode::Identity => return Ok(inner.direct),
                        S1Mode::Translate => {}
                    }
                    match table {
                        S1Table::Nested(n) => return Ok(*n),
                        S1Table::Shadow(s) if s.failed => return Ok(inner.blocked),
                        S1Table::Shadow(s) => return Ok(s.ioas),
                        S1Table::None => {}
                    }
                    let config = *config;
                    if inner.nesting {
                        match self.alloc_nested(inner, dev_id, &config) {
                            Ok(n) => {
                                if let Some(Domain::S1 { table, .. }) = inner.domains.get_mut(&d) {
                                    *table = S1Table::Nested(n);
                                }
                                return Ok(n);
                            }
                            Err(BackendError::Unsupported) => {
                                log::info!(
                                    "IOMMUFD backend: the host IOMMU cannot nest; S1 domains are shadowed"
                                );
                                inner.nesting = false;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    let shadow = self.build_shadow(inner, &config)?;
                    let ioas = shadow.ioas;
                    if let Some(Domain::S1 { table, .. }) = inner.domains.get_mut(&d) {
                        *table = S1Table::Shadow(shadow);
                    }
                    Ok(ioas)
                }
            },
        }
    }

    /// A nested HWPT for `config` over the NEST_PARENT HWPT (allocated on
    /// first need).
    fn alloc_nested(
        &self,
        inner: &mut Inner,
        dev_id: u32,
        config: &S1Config,
    ) -> Result<u32, BackendError> {
        let parent = match inner.parent {
            Some(p) => p,
            None => {
                let p = self
                    .ops
                    .hwpt_alloc(dev_id, inner.direct, HWPT_ALLOC_NEST_PARENT, HwptData::None)
                    .map_err(host_err)?;
                inner.parent = Some(p);
                p
            }
        };
        self.ops
            .hwpt_alloc(dev_id, parent, 0, self.format.hwpt_data(config))
            .map_err(host_err)
    }

    /// A new shadow of `config`'s table: an IOAS with everything the table
    /// maps now. On failure nothing is left behind (IOAS destroyed, runs
    /// given back).
    fn build_shadow(&self, inner: &mut Inner, config: &S1Config) -> Result<Shadow, BackendError> {
        let ioas = self.ops.ioas_alloc().map_err(host_err)?;
        let mut shadow = Shadow {
            ioas,
            maps: BTreeMap::new(),
            failed: false,
        };
        match self.sync_shadow(
            inner,
            &mut shadow,
            config,
            0,
            s1table::reach(config.levels),
            false,
        ) {
            Ok(()) => Ok(shadow),
            Err(e) => {
                let _ = self.drop_shadow(inner, shadow);
                Err(e)
            }
        }
    }

    /// Destroys a shadow's IOAS (emptied and kept as a zombie if a device
    /// is stuck on it) and gives its runs back.
    fn drop_shadow(&self, inner: &mut Inner, shadow: Shadow) -> Result<(), BackendError> {
        inner.budget.give_back(shadow.maps.len() as u64);
        self.destroy_object(inner, shadow.ioas, true)
    }

    /// Brings `shadow` up to date with `config`'s table over
    /// `[start, end)` (page-aligned): a run the walk finds unchanged stays,
    /// a run it does not find (or finds changed) is unmapped whole and its
    /// part outside the range mapped again as it was (the guest did not
    /// flush it), and what the walk finds that is not mapped yet is mapped.
    /// Unmaps come first, so a stale translation is gone even if mapping the
    /// new ones fails; an unmap failure marks the shadow failed (the caller
    /// blocks its devices) and maps nothing.
    ///
    /// A walk that runs out of reads or of runs fails closed: every run in
    /// the range is unmapped, the outer parts mapped again, and the error
    /// returned ([`BackendError::WalkTooLong`], [`BackendError::OutOfRuns`]).
    #[allow(unsafe_code)]
    /// `range_flush`: the guest flushed `[start, end)` (counted in the
    /// stats' range-flush figures).
    #[allow(clippy::too_many_arguments)]
    fn sync_shadow(
        &self,
        inner: &mut Inner,
        shadow: &mut Shadow,
        config: &S1Config,
        start: u64,
        end: u64,
        range_flush: bool,
    ) -> Result<(), BackendError> {
        let end = end.min(s1table::reach(config.levels));
        if start >= end {
            return Ok(());
        }
        // The runs that overlap the range, by IOVA.
        let first = shadow
            .maps
            .range(..start)
            .next_back()
            .filter(|(_, r)| r.iova_end() > start)
            .map_or(start, |(k, _)| *k);
        let overlapping: Vec<MapRun> = shadow.maps.range(first..end).map(|(_, r)| *r).collect();

        // Walk: the runs the table maps in the range now, merged where
        // contiguous in IOVA and GPA with one permission in one region. No
        // more than the runs the budget could hold are collected.
        let allowance = inner
            .budget
            .available()
            .saturating_add(overlapping.len() as u64);
        let mut wanted: Vec<MapRun> = Vec::new();
        let mut wanted_region = 0u64;
        let mut reads = inner.walk_limit;
        let regions = &inner.regions;
        let walked = s1table::for_each_leaf(
            &RamTables(regions),
            config,
            start,
            end,
            SHADOW_PHYS_ADDR_WIDTH,
            &mut reads,
            |leaf| push_leaf(regions, &mut wanted, &mut wanted_region, leaf, allowance),
        );
        inner.stats.shadow_walks += 1;
        inner.stats.shadow_entries_read += inner.walk_limit - reads;
        let walk_result = match walked {
            Ok(()) => Ok(()),
            Err(LeafWalkError::ReadBudget) => Err(BackendError::WalkTooLong(inner.walk_limit)),
            Err(LeafWalkError::Stopped(())) => Err(BackendError::OutOfRuns),
        };
        if walk_result.is_err() {
            // What the walk found is incomplete: trust none of it.
            wanted.clear();
        }

        // Which runs stay: those the walk found translating the same way.
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut stale: Vec<MapRun> = Vec::new();
        let mut again: Vec<MapRun> = Vec::new();
        for run in overlapping {
            let (a, b) = (run.iova.max(start), run.iova_end().min(end));
            let k = wanted.partition_point(|w| w.iova_end() <= a);
            let same = wanted.get(k).is_some_and(|w| {
                w.iova <= a
                    && b <= w.iova_end()
                    && w.perms == run.perms
                    && w.gpa.wrapping_sub(w.iova) == run.gpa.wrapping_sub(run.iova)
            });
            if same {
                covered.push((a, b));
                continue;
            }
            stale.push(run);
            if run.iova < start {
                again.push(MapRun {
                    len: start - run.iova,
                    ..run
                });
            }
            if run.iova_end() > end {
                again.push(MapRun {
                    iova: end,
                    gpa: run.gpa + (end - run.iova),
                    len: run.iova_end() - end,
                    perms: run.perms,
                });
            }
        }
        for run in stale {
            inner.stats.unmaps += 1;
            if let Err(e) = unmap_exact(&*self.ops, shadow.ioas, run.iova, run.len) {
                shadow.failed = true;
                return Err(e);
            }
            shadow.maps.remove(&run.iova);
            inner.budget.give_back(1);
        }

        if range_flush {
            let pages = |a: u64, b: u64| (b - a) >> PAGE_SHIFT;
            inner.stats.range_flush_pages += pages(start, end);
            inner.stats.range_flush_unchanged_pages +=
                covered.iter().map(|&(a, b)| pages(a, b)).sum::<u64>();
        }

        // Map what is wanted and not covered by a run that stayed, and the
        // outer parts of the runs that went.
        let mut to_map = again;
        let mut c = covered.iter().peekable();
        for w in wanted {
            let mut cursor = w.iova;
            while cursor < w.iova_end() {
                while c.peek().is_some_and(|(_, b)| *b <= cursor) {
                    c.next();
                }
                let piece_end = match c.peek() {
                    Some(&&(a, b)) if a <= cursor => {
                        cursor = b.min(w.iova_end());
                        continue;
                    }
                    Some(&&(a, _)) => a.min(w.iova_end()),
                    None => w.iova_end(),
                };
                to_map.push(MapRun {
                    iova: cursor,
                    gpa: w.gpa + (cursor - w.iova),
                    len: piece_end - cursor,
                    perms: w.perms,
                });
                cursor = piece_end;
            }
        }
        to_map.sort_unstable_by_key(|r| r.iova);
        let mut result = walk_result;
        for run in to_map {
            if !inner.budget.try_take(1) {
                result = result.and(Err(BackendError::OutOfRuns));
                break;
            }
            let mapped = Self::host_addr(inner, run.gpa, run.len).and_then(|host| {
                // SAFETY: `host` lies in a region registered with
                // add_ram_region, whose caller guaranteed the mapping
                // outlives its use here.
                unsafe {
                    self.ops
                        .ioas_map(shadow.ioas, run.iova, host, run.len, run.perms)
                }
                .map_err(host_err)
            });
            match mapped {
                Ok(()) => {
                    inner.stats.maps += 1;
                    shadow.maps.insert(run.iova, run);
                }
                Err(e) => {
                    // Not mapped: DMA there faults, which is closed.
                    inner.budget.give_back(1);
                    result = result.and(Err(e));
                }
            }
        }
        result
    }

    /// Destroys what held an S1 domain's table (a nested HWPT, a shadow).
    fn drop_table(&self, inner: &mut Inner, table: S1Table) -> Result<(), BackendError> {
        match table {
            S1Table::None => Ok(()),
            S1Table::Nested(n) => self.destroy_object(inner, n, false),
            S1Table::Shadow(shadow) => self.drop_shadow(inner, shadow),
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
    ///
    /// The same for an S1 domain's shadow IOAS.
    fn fail_domain(&self, inner: &mut Inner, domain: DomainId) {
        let ioas = match inner.domains.get_mut(&domain) {
            Some(Domain::S2 { ioas, failed, .. })
            | Some(Domain::S1 {
                table: S1Table::Shadow(Shadow { ioas, failed, .. }),
                ..
            }) => {
                *failed = true;
                *ioas
            }
            _ => return,
        };
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

    /// Whether `pt` is the IOAS of a guest domain: an S2 domain's, or an S1
    /// domain's shadow (neither maps through the direct IOAS).
    fn is_s2_ioas(inner: &Inner, pt: u32) -> bool {
        inner.domains.values().any(|d| match d {
            Domain::S2 { ioas, .. } => *ioas == pt,
            Domain::S1 {
                table: S1Table::Shadow(s),
                ..
            } => s.ioas == pt,
            _ => false,
        })
    }

    /// The last resort when a device is stuck on an IOAS that must not
    /// translate: unmap everything from it (IOAS_UNMAP of 0..U64_MAX).
    fn empty_ioas(&self, inner: &mut Inner, ioas: u32) {
        inner.stats.unmaps += 1;
        match self.ops.ioas_unmap(ioas, 0, u64::MAX) {
            Ok(_) => {
                let mut shadow_runs = 0u64;
                for dom in inner.domains.values_mut() {
                    match dom {
                        Domain::S2 { ioas: i, runs, .. } if *i == ioas => runs.clear(),
                        Domain::S1 {
                            table: S1Table::Shadow(s),
                            ..
                        } if s.ioas == ioas => {
                            shadow_runs += s.maps.len() as u64;
                            s.maps.clear();
                        }
                        _ => {}
                    }
                }
                inner.budget.give_back(shadow_runs);
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

    fn set_run_budget(&self, budget: RunBudget) {
        let mut inner = self.lock();
        // Runs taken before (none in practice) move to the new budget.
        let held: u64 = inner
            .domains
            .values()
            .map(|d| match d {
                Domain::S1 {
                    table: S1Table::Shadow(s),
                    ..
                } => s.maps.len() as u64,
                _ => 0,
            })
            .sum();
        inner.budget.give_back(held);
        let _ = budget.try_take(held);
        inner.budget = budget;
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
                table: S1Table::None,
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
            Domain::S1 { table, .. } => self.drop_table(&mut inner, table),
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
        match unmap_exact(&*self.ops, ioas, run.iova, run.len) {
            Ok(()) => {
                if let Some(Domain::S2 { runs, .. }) = inner.domains.get_mut(&domain) {
                    runs.remove(&run.iova);
                }
                Ok(())
            }
            Err(e) => {
                self.fail_domain(&mut inner, domain);
                Err(e)
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
        // The old table stays in place until the devices have moved off it
        // (to the new one, or blocked).
        let old = match inner.domains.get_mut(&domain) {
            Some(Domain::S1 { config: c, table }) => {
                *c = config;
                std::mem::replace(table, S1Table::None)
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
        result.and(self.drop_table(&mut inner, old))
    }

    fn copies_s1_tables(&self) -> bool {
        self.shadows_s1()
    }

    fn resync(&self, domain: DomainId) -> Result<(), BackendError> {
        let shadowed = matches!(
            self.lock().domains.get(&domain),
            Some(Domain::S1 {
                table: S1Table::Shadow(_),
                ..
            })
        );
        if !shadowed {
            return Ok(());
        }
        self.invalidate(domain, Invalidation::All)
    }

    fn invalidate(&self, domain: DomainId, what: Invalidation) -> Result<(), BackendError> {
        let mut inner = self.lock();
        let hwpt = match inner.domains.get_mut(&domain) {
            // IOMMUFD flushes the IOTLB on IOAS_UNMAP; an S2 domain caches
            // nothing the guest could flush.
            Some(Domain::S2 { .. }) => return Ok(()),
            Some(Domain::S1 { config, table }) => match table {
                S1Table::Nested(n) => *n,
                // No host table yet: nothing cached. A failed shadow's
                // devices are blocked; it is not walked again.
                S1Table::None | S1Table::Shadow(Shadow { failed: true, .. }) => return Ok(()),
                S1Table::Shadow(_) => {
                    let config = *config;
                    let S1Table::Shadow(mut shadow) = std::mem::replace(table, S1Table::None)
                    else {
                        return Ok(());
                    };
                    let (start, end) = match what {
                        Invalidation::All => (0, s1table::reach(config.levels)),
                        Invalidation::Range { iova, len } => (iova, iova.saturating_add(len)),
                    };
                    let range_flush = matches!(what, Invalidation::Range { .. });
                    let result =
                        self.sync_shadow(&mut inner, &mut shadow, &config, start, end, range_flush);
                    let failed = shadow.failed;
                    if let Some(Domain::S1 { table, .. }) = inner.domains.get_mut(&domain) {
                        *table = S1Table::Shadow(shadow);
                    }
                    if failed {
                        self.fail_domain(&mut inner, domain);
                    }
                    return result;
                }
            },
            None => return Err(BackendError::UnknownDomain(domain)),
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
                table: S1Table::Nested(n),
                ..
            } = d
            {
                ids.push(*n);
            }
        }
        ids.extend(inner.parent);
        for d in inner.domains.values() {
            match d {
                Domain::S2 { ioas, .. }
                | Domain::S1 {
                    table: S1Table::Shadow(Shadow { ioas, .. }),
                    ..
                } => ids.push(*ioas),
                _ => {}
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
        /// (IOAS, IOVA) -> (host address, permissions) of the last map there.
        details: Mutex<HashMap<(u32, u64), (usize, Perms)>>,
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
            let maps = mapped.entry(ioas).or_default();
            // IOMMUFD refuses a map over a mapping (EEXIST).
            let overlaps = maps
                .range(..iova.saturating_add(len))
                .next_back()
                .is_some_and(|(i, l)| i + l > iova);
            if overlaps {
                return Err(fake_err("IOMMU_IOAS_MAP", libc::EEXIST));
            }
            maps.insert(iova, len);
            self.details
                .lock()
                .expect("lock")
                .insert((ioas, iova), (va as usize, perms));
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

    // ---- S1 shadowing (a host without nesting) ----

    /// Writes a guest page-table entry into the test's RAM at `host`.
    #[allow(unsafe_code)]
    fn pte_at(host: usize, ram: u64, table: u64, index: u64, value: u64) {
        let off = table + index * 8;
        assert!(off + 8 <= ram, "entry inside the test's RAM");
        // SAFETY: `host` is the start of the test's RAM buffer of `ram`
        // bytes (kept alive by the test), page-aligned, and the entry lies
        // inside it (checked above), 8-byte aligned.
        unsafe {
            std::ptr::write_volatile(
                (host + usize::try_from(off).expect("small")) as *mut u64,
                value,
            );
        }
    }

    const PF: u64 = 1 | 2 | 4; // P, R/W, U/S
    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;
    /// IOVA of PT entry 0: PML4[0], PDPT[1], PD[0].
    const BASE: u64 = 0x4000_0000;

    fn s1(root: u64) -> S1Config {
        S1Config {
            root,
            levels: PagingLevels::Four,
            translation_enabled: true,
            blocked: false,
        }
    }

    /// A backend whose host cannot nest (HWPT allocation: EOPNOTSUPP), with
    /// a 4-level table at PML4 whose PT maps BASE + n * 4K; returns the
    /// host address of RAM too.
    fn setup_shadow() -> (
        IommufdBackend,
        Arc<FakeOps>,
        Arc<FakeDevice>,
        Vec<u8>,
        usize,
    ) {
        let (b, ops, dev, ram) = setup(NestFormat::VtdS1);
        let host = host_of(&ops);
        *ops.no_nesting.lock().expect("lock") = true;
        let pte = |t, i, v| pte_at(host, RAM, t, i, v);
        pte(PML4, 0, PDPT | PF);
        pte(PDPT, 1, PD | PF);
        pte(PD, 0, PT | PF);
        ops.take();
        (b, ops, dev, ram, host)
    }

    /// What IOAS `ioas` maps: (IOVA, GPA, length, writable), GPA from the
    /// host address (RAM at GPA 0 is at `host`).
    fn view(ops: &FakeOps, ioas: u32, host: usize) -> Vec<(u64, u64, u64, bool)> {
        view_va(ops, ioas)
            .into_iter()
            .map(|(iova, va, len, write)| (iova, (va - host) as u64, len, write))
            .collect()
    }

    /// What IOAS `ioas` maps: (IOVA, host address, length, writable).
    fn view_va(ops: &FakeOps, ioas: u32) -> Vec<(u64, usize, u64, bool)> {
        let mapped = ops.mapped.lock().expect("lock");
        let details = ops.details.lock().expect("lock");
        mapped
            .get(&ioas)
            .map(|m| {
                m.iter()
                    .map(|(iova, len)| {
                        let (va, perms) = details[&(ioas, *iova)];
                        assert!(perms.read);
                        (*iova, va, *len, perms.write)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn range(iova: u64, len: u64) -> Invalidation {
        Invalidation::Range { iova, len }
    }

    /// ABI section 7: without nesting, CONFIGURE + ATTACH walk the guest's
    /// table into an IOAS of the domain's own: guest RAM only, contiguous
    /// leaves in one map, read-only leaves without write, supervisor-only
    /// leaves and leaves outside guest RAM not mapped.
    #[test]
    fn s1_shadow_maps_the_table_at_configure_and_attach() {
        let (b, ops, dev, _ram, host) = setup_shadow();
        let pte = |i, v| pte_at(host, RAM, PT, i, v);
        pte(0, 0x10000 | PF);
        pte(1, 0x11000 | 1 | 4); // read-only
        pte(2, 0x12000 | PF);
        pte(3, 0x20_0000 | PF); // outside guest RAM (1 MiB)
        pte(4, 0x14000 | 1 | 2); // supervisor-only
        pte(5, 0x15000 | PF);
        pte(6, 0x16000 | PF); // continues entry 5
        b.create_domain(6, DomainKind::S1).expect("create");
        b.set_s1(6, s1(PML4)).expect("no device yet");
        assert!(ops.take().is_empty(), "nothing built without a device");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        assert!(b.shadows_s1(), "EOPNOTSUPP switched to shadowing");
        let ioas = b.s1_shadow_ioas(6).expect("shadowed");
        assert_eq!(b.s1_hwpt(6), None);
        assert_eq!(dev.on(), Some(ioas));
        assert_eq!(
            view(&ops, ioas, host),
            [
                (BASE, 0x10000, 0x1000, true),
                (BASE + 0x1000, 0x11000, 0x1000, false),
                (BASE + 0x2000, 0x12000, 0x1000, true),
                (BASE + 0x5000, 0x15000, 0x2000, true),
            ]
        );
        assert_eq!(b.stats().shadow_walks, 1);
        assert!(b.object_ids().contains(&ioas));
        // The next S1 domain does not try nesting again.
        b.create_domain(7, DomainKind::S1).expect("create");
        b.set_s1(7, s1(PML4)).expect("configure");
        ops.take();
        b.attach(DEV, AttachTarget::Domain(7)).expect("attach");
        assert!(!ops
            .take()
            .iter()
            .any(|c| matches!(c, Call::HwptAlloc { .. })));
        // Identity and blocked S1 need no shadow.
        b.set_s1(7, S1Config::UNCONFIGURED).expect("blocked");
        assert_eq!(dev.on(), Some(2));
        b.set_s1(
            7,
            S1Config {
                blocked: false,
                ..S1Config::UNCONFIGURED
            },
        )
        .expect("identity");
        assert_eq!(dev.on(), Some(1));
        assert_eq!(b.s1_shadow_ioas(7), None);
    }

    /// A changed PTE is used once its range is flushed (not before: an
    /// IOTLB may keep it); a cleared and flushed PTE is gone from the IOAS;
    /// unchanged runs in the range are left alone (no host call).
    #[test]
    fn s1_shadow_follows_flushes() {
        let (b, ops, dev, _ram, host) = setup_shadow();
        let pte = |i, v| pte_at(host, RAM, PT, i, v);
        pte(0, 0x10000 | PF);
        pte(1, 0x11000 | PF);
        b.create_domain(6, DomainKind::S1).expect("create");
        b.set_s1(6, s1(PML4)).expect("configure");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        let ioas = b.s1_shadow_ioas(6).expect("shadowed");
        assert_eq!(view(&ops, ioas, host), [(BASE, 0x10000, 0x2000, true)]);
        ops.take();
        // Unchanged: a flush costs no host call, and its two pages are
        // over-flushed.
        b.invalidate(6, range(BASE, 0x2000)).expect("flush");
        assert!(ops.take().is_empty());
        let st = b.stats();
        assert_eq!(
            (st.range_flush_pages, st.range_flush_unchanged_pages),
            (2, 2)
        );
        // Change entry 1: nothing happens until it is flushed.
        pte(1, 0x30000 | PF);
        assert_eq!(view(&ops, ioas, host), [(BASE, 0x10000, 0x2000, true)]);
        b.invalidate(6, range(BASE + 0x1000, 0x1000))
            .expect("flush");
        // The changed page was needed: not over-flushed.
        let st = b.stats();
        assert_eq!(
            (st.range_flush_pages, st.range_flush_unchanged_pages),
            (3, 2)
        );
        // The run reached outside the range: it was unmapped whole and its
        // outer part (entry 0, not flushed) mapped again.
        assert_eq!(
            view(&ops, ioas, host),
            [
                (BASE, 0x10000, 0x1000, true),
                (BASE + 0x1000, 0x30000, 0x1000, true)
            ]
        );
        // A new entry appears with the flush of its range.
        pte(7, 0x40000 | PF);
        b.invalidate(6, range(BASE + 0x7000, 0x1000))
            .expect("flush");
        assert_eq!(view(&ops, ioas, host).len(), 3);
        // Cleared and flushed: gone.
        pte(0, 0);
        b.invalidate(6, range(BASE, 0x1000)).expect("flush");
        assert_eq!(
            view(&ops, ioas, host),
            [
                (BASE + 0x1000, 0x30000, 0x1000, true),
                (BASE + 0x7000, 0x40000, 0x1000, true)
            ]
        );
        // Made read-only and flushed: mapped without write.
        pte(7, 0x40000 | 1 | 4);
        // A full flush walks the whole table.
        b.invalidate(6, Invalidation::All).expect("flush all");
        assert_eq!(
            view(&ops, ioas, host),
            [
                (BASE + 0x1000, 0x30000, 0x1000, true),
                (BASE + 0x7000, 0x40000, 0x1000, false)
            ]
        );
        // The whole PD entry cleared: everything under it goes.
        pte_at(host, RAM, PD, 0, 0);
        b.invalidate(6, range(BASE, 0x20_0000)).expect("flush");
        assert_eq!(view(&ops, ioas, host), []);
        assert_eq!(dev.on(), Some(ioas));
        assert_eq!(b.s1_shadow_runs(6), []);
    }

    /// Linux's driver adds mappings without flushing them: `resync` (the
    /// VMM's, before a doorbell) copies the whole table again, new entries
    /// included; it does nothing for a domain that is not shadowed.
    #[test]
    fn s1_shadow_resync_takes_unflushed_new_entries() {
        let (b, ops, _dev, _ram, host) = setup_shadow();
        let pte = |i, v| pte_at(host, RAM, PT, i, v);
        pte(0, 0x10000 | PF);
        b.create_domain(6, DomainKind::S1).expect("create");
        b.set_s1(6, s1(PML4)).expect("configure");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        assert!(b.copies_s1_tables());
        let ioas = b.s1_shadow_ioas(6).expect("shadowed");
        // A new mapping, not flushed: not there until the resync.
        pte(3, 0x13000 | PF);
        assert_eq!(view(&ops, ioas, host), [(BASE, 0x10000, 0x1000, true)]);
        b.resync(6).expect("resync");
        assert_eq!(
            view(&ops, ioas, host),
            [
                (BASE, 0x10000, 0x1000, true),
                (BASE + 0x3000, 0x13000, 0x1000, true)
            ]
        );
        // Unchanged: a resync costs no host call.
        ops.take();
        b.resync(6).expect("resync");
        assert!(ops.take().is_empty());
        // Not shadowed (an S2 domain, an unknown one): nothing.
        b.create_domain(7, DomainKind::S2).expect("create");
        ops.take();
        b.resync(7).expect("S2");
        b.resync(99).expect("unknown");
        assert!(ops.take().is_empty());
    }

    /// 2 MiB and 1 GiB leaves: one IOAS map each where the GPA range is one
    /// RAM region, split at region boundaries, the parts outside RAM left
    /// out; a flush inside a large leaf keeps its unflushed parts mapped.
    #[test]
    #[allow(unsafe_code)]
    fn s1_shadow_large_leaves_and_region_boundaries() {
        let (b, ops, _dev, mut ram, host) = setup_shadow();
        // More RAM: [1 GiB, +2 MiB) and [1 GiB + 4 MiB, +2 MiB).
        let mut extra = vec![0u8; (5 << 20) + 0x1000];
        let off = extra.as_ptr().align_offset(0x1000);
        let xhost = extra[off..].as_mut_ptr();
        // SAFETY: `extra` outlives the backend's use (the test), the fake
        // never touches it, and the regions lie inside it.
        unsafe {
            b.add_ram_region(1 << 30, 2 << 20, xhost).expect("region");
            b.add_ram_region((1 << 30) + (4 << 20), 1 << 20, xhost.add(4 << 20))
                .expect("region");
        }
        let xhost = xhost as usize;
        // A 2 MiB leaf at PD[1] over GPA 0 (RAM is 1 MiB there).
        pte_at(host, RAM, PD, 1, PF | 0x80);
        // A 1 GiB leaf at PDPT[2] over GPA 1 GiB.
        pte_at(host, RAM, PDPT, 2, (1 << 30) | PF | 0x80);
        b.create_domain(6, DomainKind::S1).expect("create");
        b.set_s1(6, s1(PML4)).expect("configure");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        let ioas = b.s1_shadow_ioas(6).expect("shadowed");
        let g = |va: usize| -> u64 {
            if (xhost..xhost + (5 << 20)).contains(&va) {
                (1 << 30) + (va - xhost) as u64
            } else {
                (va - host) as u64
            }
        };
        // Host addresses, not offsets from `host`: `extra` may lie below it.
        let got: Vec<(u64, u64, u64)> = view_va(&ops, ioas)
            .into_iter()
            .map(|(iova, va, len, _)| (iova, g(va), len))
            .collect();
        assert_eq!(
            got,
            [
                // The 2 MiB leaf: the 1 MiB of it that is RAM.
                (BASE + 0x20_0000, 0, RAM),
                // The 1 GiB leaf: its two RAM pieces.
                (0x8000_0000, 1 << 30, 2 << 20),
                (0x8000_0000 + (4 << 20), (1 << 30) + (4 << 20), 1 << 20),
            ]
        );
        // Re-point the 2 MiB leaf and flush one page of it: the flushed page
        // and the rest of the leaf, re-walked or kept, stay consistent.
        pte_at(host, RAM, PD, 1, 0x4000_0000 | PF | 0x80); // now GPA 1 GiB
        b.invalidate(6, range(BASE + 0x20_1000, 0x1000))
            .expect("flush");
        let got: Vec<(u64, u64, u64)> = view_va(&ops, ioas)
            .into_iter()
            .filter(|(iova, ..)| *iova < 0x8000_0000)
            .map(|(iova, va, len, _)| (iova, g(va), len))
            .collect();
        assert_eq!(
            got,
            [
                (BASE + 0x20_0000, 0, 0x1000),
                (BASE + 0x20_1000, (1 << 30) + 0x1000, 0x1000),
                (BASE + 0x20_2000, 0x2000, RAM - 0x2000),
            ],
            "the flushed page follows the table, the rest is kept as cached"
        );
        drop(b);
        drop(extra);
        ram.clear();
    }

    /// Item 8 for shadows: a failed IOAS_UNMAP leaves the stale mapping in
    /// the shadow, so its devices are blocked.
    #[test]
    fn s1_shadow_unmap_failure_blocks_the_devices() {
        let (b, ops, dev, _ram, host) = setup_shadow();
        pte_at(host, RAM, PT, 0, 0x10000 | PF);
        b.create_domain(6, DomainKind::S1).expect("create");
        b.set_s1(6, s1(PML4)).expect("configure");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        let ioas = b.s1_shadow_ioas(6).expect("shadowed");
        pte_at(host, RAM, PT, 0, 0);
        *ops.fail_unmaps.lock().expect("lock") = 1;
        assert!(b.invalidate(6, range(BASE, 0x1000)).is_err());
        assert_eq!(view(&ops, ioas, host).len(), 1, "still mapped on the host");
        assert_eq!(dev.on(), Some(2), "so the device is blocked");
        assert_eq!(dev.reachable(&ops), []);
        // And stays blocked when attached again.
        b.attach(DEV, AttachTarget::Identity).expect("identity");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        assert_eq!(dev.on(), Some(2));
        // A new table builds a new shadow.
        b.set_s1(6, s1(PML4)).expect("configure");
        let fresh = b.s1_shadow_ioas(6).expect("shadowed");
        assert_ne!(fresh, ioas);
        assert_eq!(dev.on(), Some(fresh));
        assert!(!b.object_ids().contains(&ioas), "the old one is destroyed");
    }

    /// A table that points back at itself (every PML4 entry is the PML4)
    /// aliases 2^36 pages onto one; the walk stops at its read limit and
    /// fails closed: what the range mapped is unmapped, the error returned.
    #[test]
    fn s1_shadow_walk_of_a_self_referential_table_terminates() {
        let (b, ops, dev, _ram, host) = setup_shadow();
        pte_at(host, RAM, PT, 0, 0x10000 | PF);
        b.create_domain(6, DomainKind::S1).expect("create");
        b.set_s1(6, s1(PML4)).expect("configure");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        let ioas = b.s1_shadow_ioas(6).expect("shadowed");
        assert_eq!(view(&ops, ioas, host).len(), 1);
        for i in 0..512 {
            pte_at(host, RAM, PML4, i, PML4 | PF);
        }
        b.set_walk_limit(200_000);
        let read_before = b.stats().shadow_entries_read;
        let err = b.invalidate(6, Invalidation::All).expect_err("too long");
        assert!(
            matches!(
                err,
                BackendError::WalkTooLong(200_000) | BackendError::OutOfRuns
            ),
            "{err}"
        );
        assert!(b.stats().shadow_entries_read - read_before <= 200_000);
        // Nothing stale: the one run it had is gone; what is mapped is the
        // aliases of the PML4 page the walk found before it stopped, or
        // nothing.
        assert!(view(&ops, ioas, host)
            .iter()
            .all(|(_, gpa, _, _)| *gpa == PML4));
        assert_eq!(dev.on(), Some(ioas));
        // With the default limit too (the runs run out first here).
        b.set_walk_limit(DEFAULT_WALK_LIMIT);
        let budget = RunBudget::with_limit(1000);
        b.set_run_budget(budget.clone());
        let started = std::time::Instant::now();
        assert!(b.invalidate(6, Invalidation::All).is_err());
        assert!(budget.backend_runs() <= 1000);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "bounded"
        );
    }

    /// Shadow runs count against the VM-wide run limit: past it the flush
    /// fails with OutOfRuns (INSUFFICIENT_MEMORY for the guest), maps no
    /// more, and runs come back when the shadow goes.
    #[test]
    fn s1_shadow_runs_are_bounded_by_the_run_limit() {
        let (b, ops, dev, _ram, host) = setup_shadow();
        let budget = RunBudget::with_limit(4);
        b.set_run_budget(budget.clone());
        // 8 scattered pages: 8 runs.
        for i in 0..8 {
            pte_at(host, RAM, PT, i, (0x10000 + i * 0x2000) | PF);
        }
        b.create_domain(6, DomainKind::S1).expect("create");
        b.set_s1(6, s1(PML4)).expect("configure");
        assert!(matches!(
            b.attach(DEV, AttachTarget::Domain(6)),
            Err(BackendError::OutOfRuns)
        ));
        assert_eq!(dev.on(), Some(2), "fail closed: blocked");
        assert_eq!(
            budget.backend_runs(),
            0,
            "the failed shadow gave its runs back"
        );
        assert_eq!(b.object_ids(), [1, 2], "and its IOAS");
        // Within the limit, then past it with a flush.
        for i in 4..8 {
            pte_at(host, RAM, PT, i, 0);
        }
        b.attach(DEV, AttachTarget::Identity).expect("identity");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        let ioas = b.s1_shadow_ioas(6).expect("shadowed");
        assert_eq!(budget.backend_runs(), 4);
        pte_at(host, RAM, PT, 9, 0x50000 | PF);
        assert!(matches!(
            b.invalidate(6, range(BASE + 0x9000, 0x1000)),
            Err(BackendError::OutOfRuns)
        ));
        assert_eq!(view(&ops, ioas, host).len(), 4);
        assert_eq!(budget.backend_runs(), 4);
        b.attach(DEV, AttachTarget::Blocked).expect("blocked");
        b.destroy_domain(6).expect("destroy");
        assert_eq!(budget.backend_runs(), 0);
    }

    /// A new table replaces the shadow (built before the device moves, the
    /// old one destroyed after); removing a RAM region unmaps its shadow
    /// runs; the drop destroys every shadow IOAS.
    #[test]
    fn s1_shadow_follows_set_s1_region_removal_and_drop() {
        let (b, ops, dev, _ram, host) = setup_shadow();
        pte_at(host, RAM, PT, 0, 0x10000 | PF);
        b.create_domain(6, DomainKind::S1).expect("create");
        b.set_s1(6, s1(PML4)).expect("configure");
        b.attach(DEV, AttachTarget::Domain(6)).expect("attach");
        let first = b.s1_shadow_ioas(6).expect("shadowed");
        // A second table at 0x8000 (PML4) reusing PDPT and below.
        pte_at(host, RAM, 0x8000, 0, PDPT | PF);
        pte_at(host, RAM, PT, 0, 0x20000 | PF);
        b.set_s1(6, s1(0x8000)).expect("reconfigure");
        let second = b.s1_shadow_ioas(6).expect("shadowed");
        assert_ne!(first, second);
        assert_eq!(dev.on(), Some(second));
        assert_eq!(view(&ops, second, host), [(BASE, 0x20000, 0x1000, true)]);
        assert!(!b.object_ids().contains(&first));
        ops.take();
        b.remove_ram_region(0).expect("remove");
        assert_eq!(
            ops.take()[0],
            Call::Unmap {
                ioas: second,
                iova: BASE,
                len: 0x1000
            }
        );
        assert_eq!(b.s1_shadow_runs(6), []);
        drop(b);
        assert!(ops.take().contains(&Call::Destroy(second)));
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
