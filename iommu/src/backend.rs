//! The interface between the domain layer and whatever really translates DMA:
//! the software model (emulated devices), IOMMUFD (passthrough devices), or a
//! test double.
//!
//! # Who holds what
//!
//! The domain layer ([`crate::Iommu`]) keeps the authoritative state of every
//! guest domain (its runs, its S1 settings, its devices) and validates every
//! guest request before a backend hears of it. A backend only mirrors the
//! domains that one of *its* devices is attached to:
//!
//! - every device is registered with exactly one backend (emulated devices
//!   with the software backend, VFIO devices with the IOMMUFD backend);
//! - when the first device of backend B attaches to guest domain D, the domain
//!   layer calls `B.create_domain(D)`, replays D's state into it (one
//!   [`Backend::map`] per run, or [`Backend::set_s1`]) and then
//!   [`Backend::attach`]es the device; when B's last device leaves D, it calls
//!   `B.destroy_domain(D)`;
//! - while D is instantiated in several backends, every map, unmap, S1 change
//!   and invalidation fans out to each of them, in the order the guest asked.
//!
//! So a VM with both emulated and passthrough devices, even in the same guest
//! domain, needs nothing special, and a domain no device uses costs no host
//! work at all.
//!
//! # Runs
//!
//! A [`MapRun`] is a range contiguous in IOVA and in GPA with one set of
//! permissions, lying inside one guest RAM region (so a backend that maps host
//! virtual memory can map it with one host call). The domain layer issues one
//! `map` per run: a MAP_DEVICE_GPA_PAGES of 507 pages contiguous in IOVA and
//! GPA is one `map` call per backend instance.
//!
//! Backends never split mappings (IOMMUFD's IOAS_UNMAP cannot: it answers
//! ENOENT on a partial overlap). `unmap` is only ever given a run exactly as it
//! was given to `map`. When the guest unmaps part of a run, the domain layer
//! calls [`Backend::unmap_keep`] with the whole run and the pieces that stay
//! mapped; its default implementation unmaps the run and maps the pieces
//! again, a backend that can split atomically overrides it. Either way, when
//! the call returns no page the guest unmapped is mapped and every page it
//! still maps is.
//!
//! # Calls and concurrency
//!
//! The domain layer calls a backend with its own lock held, so calls about one
//! VM are serialized and ordered; a backend needs interior mutability only for
//! the state it shares with its data path (the software backend's translate).
//! Backend methods must not call back into [`crate::Iommu`].
//!
//! # Errors
//!
//! A backend error reaches the guest as NO_RESOURCES (the host could not do
//! it). A failed `map` leaves the run unmapped in every backend (the domain
//! layer undoes the instances that succeeded) and the rep that started the run
//! is the failing rep. A failed `unmap`, `unmap_keep`, `invalidate`, `attach`
//! or `destroy_domain` cannot be undone: the domain layer records it in
//! [`crate::IommuStats::backend_errors`], logs it, still applies the guest's
//! request to its own state and reports NO_RESOURCES; the backend is expected
//! to fail closed (leave the device blocked rather than mapped).

use pviommu_abi::DeviceId;

/// A guest domain as backends name it: the 32-bit id of `hv_device_domain_id`.
/// Ids 0 (default) and 0xFFFF_FFFF (null) never reach a backend as a domain;
/// they are [`AttachTarget::Identity`] and [`AttachTarget::Blocked`].
pub type DomainId = u32;

/// Host-side failure of a backend operation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The host ran out of a resource (memory, IOAS, domain ids).
    #[error("Host IOMMU resources exhausted")]
    NoResources,
    /// The domain is not instantiated in this backend.
    #[error("Domain {0} is not known to this backend")]
    UnknownDomain(DomainId),
    /// The device is not registered with this backend.
    #[error("Device {0:#x} is not known to this backend")]
    UnknownDevice(u64),
    /// The operation is not supported by this backend (for example S1 on a
    /// host without nesting).
    #[error("Operation not supported by this backend")]
    Unsupported,
    /// A host call failed.
    #[error("Host IOMMU operation failed")]
    Host(#[source] std::io::Error),
    /// An IOMMUFD call failed.
    #[error("Host IOMMU operation failed")]
    Iommufd(#[source] crate::iommufd::ioctl::Error),
    /// Guest RAM overlaps an IOVA range the host IOMMU reserves (the MSI
    /// window, or a device's reserved regions).
    #[error("Guest RAM overlaps an IOVA range the host IOMMU reserves")]
    ReservedOverlap,
    /// IOAS_UNMAP removed another length than the run's.
    #[error("IOAS_UNMAP removed {removed:#x} bytes of {len:#x}")]
    ShortUnmap {
        /// The run's length.
        len: u64,
        /// What the host removed.
        removed: u64,
    },
    /// The VM-wide run limit is reached: the guest gets INSUFFICIENT_MEMORY.
    #[error("The VM-wide mapping run limit is reached")]
    OutOfRuns,
    /// Walking the guest's S1 table read more entries than a walk may (a
    /// table that points back at itself, or an enormous one).
    #[error("The guest's S1 table walk read more than {0} entries")]
    WalkTooLong(u64),
    /// The host did not handle a full IOTLB flush.
    #[error("The host IOMMU did not handle a full flush")]
    FlushIgnored,
    /// The request contradicts what the backend was told before: a bug in
    /// its caller, not a host failure.
    #[error("Request inconsistent with the backend's state")]
    Invalid(#[source] InvalidRequest),
}

/// A request a backend refuses because it contradicts what it was told
/// before (see [`BackendError::Invalid`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// The device was already handed to the backend.
    #[error("Device {0:#x} was already handed to the backend")]
    DeviceExists(u64),
    /// A guest RAM region that wraps around, is empty or is not
    /// page-aligned.
    #[error("Guest RAM region {gpa:#x}+{len:#x} is empty, wraps or is not page-aligned")]
    BadRegion {
        /// First guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A guest RAM region that overlaps one already known.
    #[error("Guest RAM region {gpa:#x}+{len:#x} overlaps another")]
    RegionOverlaps {
        /// First guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// No guest RAM region starts at this address.
    #[error("No guest RAM region starts at {0:#x}")]
    NoRegion(u64),
    /// A run outside the guest RAM known to the backend.
    #[error("Run at GPA {gpa:#x}+{len:#x} lies outside the guest RAM known to the backend")]
    RunOutsideRam {
        /// First guest physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The domain is already instantiated.
    #[error("Domain {0} is already instantiated")]
    DomainExists(DomainId),
    /// A run already mapped at this IOVA.
    #[error("A run is already mapped at IOVA {0:#x}")]
    RunMapped(u64),
    /// An unmap of a run not mapped as given.
    #[error("No run is mapped at IOVA {0:#x} as given")]
    RunNotMapped(u64),
}

impl From<InvalidRequest> for BackendError {
    fn from(e: InvalidRequest) -> Self {
        BackendError::Invalid(e)
    }
}

/// The kind of a guest device domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DomainKind {
    /// The guest maps IOVA pages to GPAs with MAP/UNMAP hypercalls.
    S2,
    /// The guest owns a first-stage x86-64 page table (CONFIGURE).
    S1,
}

/// DMA permissions of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perms {
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

impl Perms {
    /// Read-only.
    pub const R: Self = Self {
        read: true,
        write: false,
    };
    /// Read and write.
    pub const RW: Self = Self {
        read: true,
        write: true,
    };
}

/// A mapping contiguous in IOVA and GPA with one set of permissions, inside
/// one guest RAM region. `iova`, `gpa` and `len` are multiples of 4 KiB,
/// `len > 0`, and neither range wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MapRun {
    /// First device address.
    pub iova: u64,
    /// First guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the device may do.
    pub perms: Perms,
}

impl MapRun {
    /// One past the last IOVA. The domain layer's runs lie below 2^57
    /// (the widest IOVA space), so this does not overflow for them; for a
    /// run that would end at 2^64 it saturates (see [`MapRun::iova_last`]).
    pub fn iova_end(&self) -> u64 {
        self.iova.saturating_add(self.len)
    }

    /// The last IOVA (inclusive), exact for every run.
    pub fn iova_last(&self) -> u64 {
        self.iova.saturating_add(self.len.saturating_sub(1))
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.len >> pviommu_abi::HV_PAGE_SHIFT
    }
}

/// First-stage paging depth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagingLevels {
    /// 4-level, 48-bit IOVA.
    Four,
    /// 5-level, 57-bit IOVA.
    Five,
}

/// The S1 settings of a domain (CONFIGURE_DEVICE_DOMAIN), already validated.
/// What they mean ([`S1Config::mode`]):
/// - `blocked`: all DMA is blocked (whatever `translation_enabled`; Linux's
///   blocking domain sets both);
/// - else `translation_enabled`: DMA goes through the guest's table at
///   `root`, a page-aligned GPA in guest RAM;
/// - else identity: IOVA = GPA, guest RAM only, like the default domain
///   (Linux's identity domain).
///
/// The domain layer passes `root` 0 and 4-level paging when the table is not
/// used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct S1Config {
    /// GPA of the top-level table.
    pub root: u64,
    /// 4- or 5-level.
    pub levels: PagingLevels,
    /// Translation through the guest's table is on (off: identity).
    pub translation_enabled: bool,
    /// All DMA is blocked.
    pub blocked: bool,
}

/// What an S1 domain does with DMA, from its [`S1Config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum S1Mode {
    /// All DMA blocked.
    Blocked,
    /// IOVA = GPA (guest RAM only), no table.
    Identity,
    /// Through the guest's first-stage table.
    Translate,
}

impl S1Config {
    /// The settings of an S1 domain the guest has not configured yet: blocked.
    pub const UNCONFIGURED: Self = Self {
        root: 0,
        levels: PagingLevels::Four,
        translation_enabled: false,
        blocked: true,
    };

    /// What the domain does with DMA.
    pub fn mode(&self) -> S1Mode {
        match (self.blocked, self.translation_enabled) {
            (true, _) => S1Mode::Blocked,
            (false, true) => S1Mode::Translate,
            (false, false) => S1Mode::Identity,
        }
    }

    /// Whether DMA goes through the guest's table.
    pub fn translates(&self) -> bool {
        self.mode() == S1Mode::Translate
    }
}

/// Where a device's DMA goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachTarget {
    /// The default domain (id 0): IOVA = GPA, guest RAM only.
    Identity,
    /// The null domain (id 0xFFFF_FFFF): everything blocked.
    Blocked,
    /// A guest device domain instantiated in this backend.
    Domain(DomainId),
}

/// What to invalidate in a domain's IOTLB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Invalidation {
    /// Every cached translation of the domain.
    All,
    /// The cached translations of `[iova, iova + len)`; page-aligned, no wrap.
    Range {
        /// First device address.
        iova: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// What the domain layer drives. See the module documentation for the
/// contract (runs, whole-run unmaps, fan-out, ordering, errors).
pub trait Backend: Send + Sync {
    /// A short name for logs and statistics ("software", "iommufd").
    fn name(&self) -> &'static str;

    /// A device joins this backend; it starts attached to
    /// [`AttachTarget::Identity`].
    fn add_device(&self, device: DeviceId) -> Result<(), BackendError>;

    /// A device leaves this backend (hot-remove). The domain layer has
    /// attached it to [`AttachTarget::Blocked`] first (never to
    /// [`AttachTarget::Identity`] on its way out) and destroyed the domain
    /// instance it leaves empty; the backend returns it to the state the host
    /// expects of a device the VM no longer uses, with its DMA still blocked,
    /// and forgets it.
    fn remove_device(&self, device: DeviceId) -> Result<(), BackendError>;

    /// Instantiates guest domain `domain` (empty: no runs; S1: blocked until
    /// [`Backend::set_s1`]).
    fn create_domain(&self, domain: DomainId, kind: DomainKind) -> Result<(), BackendError>;

    /// Destroys a domain no device of this backend is attached to, with every
    /// mapping and cached translation it still has.
    fn destroy_domain(&self, domain: DomainId) -> Result<(), BackendError>;

    /// Points `device`'s DMA at `target` (replacing its current attachment).
    fn attach(&self, device: DeviceId, target: AttachTarget) -> Result<(), BackendError>;

    /// Maps a run in an S2 domain. The run overlaps no mapped IOVA.
    fn map(&self, domain: DomainId, run: MapRun) -> Result<(), BackendError>;

    /// Unmaps a run exactly as it was passed to [`Backend::map`], and
    /// invalidates its cached translations.
    fn unmap(&self, domain: DomainId, run: MapRun) -> Result<(), BackendError>;

    /// Unmaps `run` (exactly as mapped) while `keep`, sub-runs of it in
    /// ascending IOVA order, stay mapped. The default unmaps the whole run and
    /// maps the pieces again; a backend that can split in place overrides it
    /// so that the pieces never become unmapped.
    fn unmap_keep(
        &self,
        domain: DomainId,
        run: MapRun,
        keep: &[MapRun],
    ) -> Result<(), BackendError> {
        self.unmap(domain, run)?;
        for piece in keep {
            self.map(domain, *piece)?;
        }
        Ok(())
    }

    /// Sets the S1 settings of an S1 domain; cached translations of the
    /// domain are dropped.
    fn set_s1(&self, domain: DomainId, config: S1Config) -> Result<(), BackendError>;

    /// Gives the backend the VM-wide run budget (called once, when the
    /// backend is added to an [`crate::Iommu`]). A backend that holds runs
    /// the domain layer does not count (the IOMMUFD backend's S1 shadows)
    /// charges them to it and answers [`BackendError::OutOfRuns`] when it is
    /// spent; the default ignores it.
    fn set_run_budget(&self, _budget: crate::RunBudget) {}

    /// Invalidates cached translations (the guest's FLUSH_DEVICE_DOMAIN and
    /// FLUSH_DEVICE_DOMAIN_LIST). The domain layer issues one call per merged
    /// range: a range is a maximal union of the guest's entries, exact (it
    /// covers no page outside them).
    fn invalidate(&self, domain: DomainId, what: Invalidation) -> Result<(), BackendError>;

    /// Whether the host copies S1 domains' tables ([`Backend::resync`]
    /// matters): the guest's new mappings reach the device only once
    /// copied. Default: no (the table is walked where it is).
    fn copies_s1_tables(&self) -> bool {
        false
    }

    /// Copies S1 domain `domain`'s whole table again, new mappings
    /// included (the guest does not flush a mapping it adds; a VMM that
    /// copies tables calls this before the guest starts a device's DMA).
    /// Default: nothing to copy.
    fn resync(&self, _domain: DomainId) -> Result<(), BackendError> {
        Ok(())
    }
}
