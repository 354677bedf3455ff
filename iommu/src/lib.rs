//! The paravirtual IOMMU: hypercall dispatcher, device domains and backends.
//!
//! One [`Iommu`] per VM, shared by every vCPU thread and device through an
//! `Arc`:
//!
//! - vCPU threads call [`Iommu::dispatch_from`] on a hypercall exit and apply
//!   the [`HypercallOutcome`] (RAX, or RCX plus a restart at the hypercall
//!   page's stub for time slicing);
//! - emulated devices call [`Iommu::translate`] before each DMA access and
//!   get guest-physical [`Segments`] or a [`Fault`];
//! - the device manager registers devices with [`Iommu::register_device`]
//!   (with the software backend, [`BackendId::SOFTWARE`], or a backend added
//!   with [`Iommu::add_backend`], such as IOMMUFD), gives a device offered on
//!   a vPCI bus its LOGICAL id too with [`Iommu::register_device_alias`], and
//!   unregisters them on removal (blocked first);
//! - the API reads [`Iommu::stats`].
//!
//! # Wiring (VMM side)
//!
//! ```
//! use iommu::abi::{hypercall_restart_rip, HYPERCALL_PORT};
//! use iommu::{Access, BackendId, Caller, DeviceId, HypercallOutcome, HypercallRegs, Iommu, IommuConfig};
//! use std::sync::Arc;
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let iommu = Arc::new(Iommu::new(IommuConfig::default()).unwrap());
//!
//! // Device manager: an emulated PCI device at 0000:00:03.0.
//! let dma_test = DeviceId::pci(0, 0, 3, 0);
//! iommu.register_device(dma_test, BackendId::SOFTWARE).unwrap();
//!
//! // vCPU thread, on a port-I/O exit for `out HYPERCALL_PORT, al` (with
//! // the hypercall page enabled), CPL from the segment registers:
//! # let (rcx, rdx, r8, mut rip, mut rax, cpl) = (0x0001u64, 0u64, 0u64, 0x1005u64, 0u64, 0u8);
//! # let mut new_rcx = rcx;
//! let restart = hypercall_restart_rip(rip);
//! let caller = Caller { vp_index: 0, cpl, restartable: restart.is_some() };
//! match iommu.dispatch_from(&mem, caller, HypercallRegs { rcx, rdx, r8 }) {
//!     HypercallOutcome::Complete { rax: value } => rax = value,
//!     HypercallOutcome::Continue { rcx: value } => {
//!         new_rcx = value; // write RCX,
//!         rip = restart.unwrap(); // and re-execute the stub's `out`
//!     }
//! }
//! # assert_eq!(rax, 2); // INVALID_HYPERCALL_CODE for code 1
//! # let _ = (new_rcx, rip, HYPERCALL_PORT);
//!
//! // Device emulation, before each DMA access (no lock is held afterwards):
//! match iommu.translate(&mem, dma_test, 0x8000, 512, Access::Read) {
//!     Ok(segments) => {
//!         for s in &segments {
//!             // read s.len bytes of guest memory at s.gpa
//! #           assert_eq!((s.gpa, s.len), (0x8000, 512));
//!         }
//!     }
//!     Err(fault) => { /* report fault.iova and fault.reason in the device */ }
//! }
//! ```
//!
//! Locking: one mutex holds the domain layer's state; hypercalls take it for
//! the duration of the typed handler (after the input has been copied in and
//! before the output is written back), and call backends under it. The
//! software backend has its own mutex, taken by `translate` only while it
//! looks up a translation; no lock is held while a device touches guest
//! memory, and `translate` never takes the state lock on its fast path, so
//! DMA cannot deadlock against hypercalls. The fault log has a small lock of
//! its own. Lock order: state, then backend or fault log.

pub mod backend;
mod config;
mod dispatch;
mod domains;
pub mod flush;
#[cfg(any(test, feature = "testing"))]
pub mod fuzzing;
pub mod guest_log;
pub mod iommufd;
mod ram;
mod runs;
mod s1table;
mod software;
mod stats;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod translate;

pub use backend::{
    AttachTarget, Backend, BackendError, DomainId, DomainKind, InvalidRequest, Invalidation,
    MapRun, PagingLevels, Perms, S1Config, S1Mode,
};
pub use config::{
    IommuConfig, IommuError, DEFAULT_MAP_RUNS_FLOOR, DEFAULT_MAP_RUNS_PER_MIB,
    DEFAULT_PGSIZE_BITMAP, MAP_RUN_BYTES,
};
pub use dispatch::{Caller, HypercallOutcome, HypercallRegs, Processors};
pub use domains::{Attachment, FlushStats};
pub use pviommu_abi as abi;
pub use pviommu_abi::DeviceId;
pub use runs::RunBudget;
pub use software::{IotlbStats, SoftwareBackend};
pub use stats::{
    DeviceInfo, DomainInfo, DomainInfoKind, FaultStats, HypercallStats, IommuStats, StatusCount,
    RECENT_FAULTS,
};
pub use translate::{Access, Fault, FaultReason, Segment, Segments};

use dispatch::Counters;
use domains::{DeviceEntry, State};
use pviommu_abi::{DeviceDomainId, HypercallCode};
use stats::FaultLog;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use vm_memory::GuestMemory;

/// A backend of an [`Iommu`], as returned by [`Iommu::add_backend`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(usize);

impl BackendId {
    /// The built-in software backend (emulated devices).
    pub const SOFTWARE: Self = Self(0);
}

impl fmt::Debug for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendId({})", self.0)
    }
}

/// One VM's pvIOMMU. Send + Sync.
pub struct Iommu {
    config: IommuConfig,
    software: Arc<SoftwareBackend>,
    state: Mutex<State>,
    counters: Counters,
    faults: Mutex<FaultLog>,
    /// Emulated DMA in flight holds this for reading ([`Iommu::dma_pin`]);
    /// a call that can take translations away takes it for writing once it
    /// is done, so that it returns only after every DMA that may still use
    /// an old translation has finished.
    dma_inflight: RwLock<()>,
}

/// An emulated device's DMA in flight: while it lives, no hypercall that
/// takes a translation away (UNMAP, a flush, DETACH, ...) returns, and no
/// device is unregistered. Hold it from [`Iommu::translate`] until the last
/// byte of the access has been read or written.
#[derive(Debug)]
pub struct DmaPin<'a>(#[allow(dead_code)] RwLockReadGuard<'a, ()>);

impl fmt::Debug for Iommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iommu")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Iommu {
    /// A pvIOMMU with `config`'s limits and the built-in software backend.
    /// Guest RAM is taken from the `GuestMemory` given to each call, so
    /// memory hotplug needs nothing here.
    pub fn new(config: IommuConfig) -> Result<Self, IommuError> {
        config.validate()?;
        let software = Arc::new(SoftwareBackend::new(&config));
        let state = State::new(Arc::clone(&software) as Arc<dyn Backend>);
        let faults = FaultLog::new(config.max_domains);
        Ok(Self {
            config,
            software,
            state: Mutex::new(state),
            counters: Counters::default(),
            faults: Mutex::new(faults),
            dma_inflight: RwLock::new(()),
        })
    }

    /// Marks an emulated device's DMA in flight (see [`DmaPin`]).
    pub fn dma_pin(&self) -> DmaPin<'_> {
        DmaPin(self.dma_inflight.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits for every emulated DMA in flight to finish. Called with no lock
    /// held: a DMA may take the state lock (its fault path) while pinned.
    pub(crate) fn dma_barrier(&self) {
        drop(self.dma_inflight.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// The configuration.
    pub fn config(&self) -> &IommuConfig {
        &self.config
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn lock_faults(&self) -> MutexGuard<'_, FaultLog> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a backend (for example IOMMUFD) for devices registered with the
    /// returned id.
    pub fn add_backend(&self, backend: Arc<dyn Backend>) -> BackendId {
        let mut state = self.lock_state();
        backend.set_run_budget(state.budget.clone());
        state.backends.push(backend);
        BackendId(state.backends.len() - 1)
    }

    /// Registers a device (PCI form of `hv_device_id`, every other field
    /// zero) with a backend; it starts in the default domain. The guest can
    /// only name registered devices.
    pub fn register_device(&self, device: DeviceId, backend: BackendId) -> Result<(), IommuError> {
        self.register(device, backend, true)
    }

    /// Registers `device` like [`Iommu::register_device`], in the default
    /// domain (IOVA = GPA), but hidden from the guest (direct attach: the
    /// guest's pvIOMMU driver cannot name it, so it cannot move it to a
    /// domain of its own; GET_LOGICAL_DEVICE_PROPERTY, ATTACH and DETACH
    /// answer INVALID_DEVICE_ID).
    pub fn register_direct_device(
        &self,
        device: DeviceId,
        backend: BackendId,
    ) -> Result<(), IommuError> {
        self.register(device, backend, false)
    }

    fn register(
        &self,
        device: DeviceId,
        backend: BackendId,
        guest_visible: bool,
    ) -> Result<(), IommuError> {
        if !device.is_plain_pci() {
            return Err(IommuError::NotPciDevice(device.into_bits()));
        }
        let mut state = self.lock_state();
        if state.devices.contains_key(&device) {
            return Err(IommuError::DeviceExists(device));
        }
        let b = state
            .backends
            .get(backend.0)
            .cloned()
            .ok_or(IommuError::UnknownBackend(backend))?;
        b.add_device(device).map_err(IommuError::Backend)?;
        state.devices.insert(
            device,
            DeviceEntry {
                backend,
                attached: Attachment::Default,
                logical: None,
                guest_visible,
            },
        );
        Ok(())
    }

    /// Gives registered device `pci` its LOGICAL id too (a device offered on
    /// a vPCI bus: `logical` is [`DeviceId::logical_vpci`] of its bus's
    /// channel and its function). The guest may then name the device by
    /// either id in GET_LOGICAL_DEVICE_PROPERTY, ATTACH and DETACH; the
    /// registry, statistics and [`Iommu::translate`] keep using the PCI id.
    /// [`Iommu::unregister_device`] drops the alias with the device.
    pub fn register_device_alias(
        &self,
        logical: DeviceId,
        pci: DeviceId,
    ) -> Result<(), IommuError> {
        if !logical.is_logical() {
            return Err(IommuError::NotLogicalDevice(logical.into_bits()));
        }
        let mut state = self.lock_state();
        if state.aliases.contains_key(&logical) || state.devices.contains_key(&logical) {
            return Err(IommuError::DeviceExists(logical));
        }
        let Some(entry) = state.devices.get_mut(&pci) else {
            return Err(IommuError::UnknownDevice(pci));
        };
        if let Some(old) = entry.logical {
            return Err(IommuError::AliasExists {
                device: pci,
                logical: old,
            });
        }
        entry.logical = Some(logical);
        state.aliases.insert(logical, pci);
        Ok(())
    }

    /// Unregisters a device on its way out of the VM (hot-remove): blocks its
    /// DMA first (the null domain: never the default, IOVA = GPA domain, not
    /// even for a moment), then takes it off its domain (its backend drops
    /// the domain if no other of its devices uses it), then tells its
    /// backend the device is gone. The guest's domain and its mappings stay:
    /// they are the guest's. Every step runs even if an earlier one failed
    /// (each backend fails closed); the first failure is returned.
    pub fn unregister_device(&self, device: DeviceId) -> Result<(), IommuError> {
        let result = {
            let mut state = self.lock_state();
            if !state.devices.contains_key(&device) {
                return Err(IommuError::UnknownDevice(device));
            }
            state.remove_device(device).map_err(IommuError::Backend)
        };
        // Its DMA in flight ends before the caller unplugs it.
        self.dma_barrier();
        result
    }

    /// Whether `device`'s backend copies S1 tables (the IOMMUFD backend on a
    /// host that cannot nest): its DMA then needs [`Iommu::sync_device`]
    /// before the guest starts it.
    pub fn copies_s1_tables(&self, device: DeviceId) -> bool {
        let state = self.lock_state();
        state
            .devices
            .get(&device)
            .and_then(|e| state.backends.get(e.backend.0))
            .is_some_and(|b| b.copies_s1_tables())
    }

    /// Brings the host's copy of the S1 table `device` is attached to up to
    /// date with the guest's, new mappings included: Linux's driver does not
    /// flush a mapping it adds, so a host that copies tables learns of it
    /// only here, before the device is told to use it (its doorbell).
    /// Nothing for other attachments and backends.
    pub fn sync_device(&self, device: DeviceId) -> Result<(), IommuError> {
        let state = self.lock_state();
        let entry = state
            .devices
            .get(&device)
            .ok_or(IommuError::UnknownDevice(device))?;
        let Attachment::Domain(id) = entry.attached else {
            return Ok(());
        };
        let backend = state
            .backends
            .get(entry.backend.0)
            .ok_or(IommuError::UnknownBackend(entry.backend))?;
        backend.resync(id).map_err(IommuError::Backend)
    }

    /// Where a registered device's DMA goes now.
    pub fn device_attachment(&self, device: DeviceId) -> Option<Attachment> {
        self.lock_state().devices.get(&device).map(|e| e.attached)
    }

    /// Translates a DMA access of an emulated (software-backend) device:
    /// `[iova, iova + len)` becomes guest-physical segments, all in guest RAM,
    /// or a fault that is recorded (see [`Iommu::stats`]) and returned. No
    /// lock is held when this returns; up to 8 segments need no allocation.
    pub fn translate<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        device: DeviceId,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Segments, Fault> {
        let raw = match self.software.translate(mem, device, iova, len, access) {
            Ok(segments) => return Ok(segments),
            Err(raw) => raw,
        };
        let mut reason = raw.reason;
        if reason == FaultReason::UnknownDevice && self.lock_state().devices.contains_key(&device) {
            reason = FaultReason::NotSoftwareDevice;
        }
        let fault = Fault {
            device,
            domain: raw.domain,
            iova: raw.iova,
            access,
            reason,
        };
        self.lock_faults().record(fault);
        guest_log!(Debug, "pvIOMMU: {fault}");
        Err(fault)
    }

    /// A snapshot of domains, devices, hypercall and fault counters.
    pub fn stats(&self) -> IommuStats {
        // Lock order: state, then faults.
        let state = self.lock_state();
        let log = self.lock_faults();
        let faults = log.snapshot();
        let fault_count = |id: u32| log.of_domain(id);

        let mut devices: Vec<DeviceInfo> = state
            .devices
            .iter()
            .map(|(id, e)| DeviceInfo {
                id: *id,
                logical: e.logical,
                backend: state.backends[e.backend.0].name(),
                attachment: e.attached,
            })
            .collect();
        devices.sort_by_key(|d| d.id);
        let in_att = |a: Attachment| {
            devices
                .iter()
                .filter(|d| d.attachment == a)
                .map(|d| d.id)
                .collect::<Vec<_>>()
        };
        let special = |id: u32, kind, devices| DomainInfo {
            id,
            kind,
            devices,
            mapped_pages: 0,
            runs: 0,
            s1: None,
            flushes: FlushStats::default(),
            faults: fault_count(id),
            iotlb: None,
            backends: Vec::new(),
        };
        let mut domains = vec![
            special(
                DeviceDomainId::ID_DEFAULT,
                DomainInfoKind::Default,
                in_att(Attachment::Default),
            ),
            special(
                DeviceDomainId::ID_NULL,
                DomainInfoKind::Null,
                in_att(Attachment::Null),
            ),
        ];
        let mut ids: Vec<u32> = state.domains.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(d) = state.domains.get(&id) else {
                continue;
            };
            domains.push(DomainInfo {
                id,
                kind: d.kind.into(),
                devices: d.devices.clone(),
                mapped_pages: d.runs.pages(),
                runs: u64::try_from(d.runs.len()).unwrap_or(u64::MAX),
                s1: (d.kind == DomainKind::S1).then_some(d.s1),
                flushes: d.flush,
                faults: fault_count(id),
                iotlb: self.software.iotlb_stats(id),
                backends: d
                    .instances
                    .iter()
                    .map(|i| state.backends[i.backend.0].name())
                    .collect(),
            });
        }
        let load = |slot: usize| self.counters.calls[slot].load(Ordering::Relaxed);
        let by_code: Vec<(HypercallCode, u64)> = HypercallCode::ALL
            .iter()
            .map(|c| (*c, load(Counters::slot(*c))))
            .collect();
        let unknown = load(HypercallCode::ALL.len());
        let mut by_status = Vec::new();
        for (code_slot, statuses) in self.counters.statuses.iter().enumerate() {
            let code = HypercallCode::ALL.get(code_slot).copied();
            for (status_slot, n) in statuses.iter().enumerate() {
                let count = n.load(Ordering::Relaxed);
                if let (true, Some(status)) = (count > 0, Counters::status_of(status_slot)) {
                    by_status.push(StatusCount {
                        code,
                        status,
                        count,
                    });
                }
            }
        }
        IommuStats {
            domains,
            devices,
            hypercalls: HypercallStats {
                total: by_code.iter().map(|(_, n)| n).sum::<u64>() + unknown,
                by_code,
                unknown,
                errors: self.counters.errors.load(Ordering::Relaxed),
                by_status,
                continuations: self.counters.continuations.load(Ordering::Relaxed),
            },
            faults,
            backend_errors: state.backend_errors,
            map_runs: state.runs_total.saturating_add(state.budget.backend_runs()),
            guest_log: guest_log::counts(),
        }
    }

    /// The domains part of [`Iommu::stats`].
    pub fn domains_info(&self) -> Vec<DomainInfo> {
        self.stats().domains
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iommu_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Iommu>();
        check::<Arc<Iommu>>();
    }

    #[test]
    fn bad_config_is_refused() {
        let err = Iommu::new(IommuConfig {
            rep_budget: 0,
            ..Default::default()
        })
        .expect_err("invalid");
        assert_eq!(err.to_string(), "Rep budget must be at least 1");
    }

    #[test]
    fn devices_register_once_in_pci_form() {
        let iommu = Iommu::new(IommuConfig::default()).expect("iommu");
        let dev = DeviceId::pci(0, 0, 3, 0);
        iommu
            .register_device(dev, BackendId::SOFTWARE)
            .expect("register");
        assert!(matches!(
            iommu.register_device(dev, BackendId::SOFTWARE),
            Err(IommuError::DeviceExists(_))
        ));
        assert!(matches!(
            iommu.register_device(DeviceId::from_bits(0x1234), BackendId::SOFTWARE),
            Err(IommuError::NotPciDevice(0x1234))
        ));
        assert!(matches!(
            iommu.register_device(dev.with_source_shadow(true), BackendId::SOFTWARE),
            Err(IommuError::NotPciDevice(_))
        ));
        assert!(matches!(
            iommu.register_device(DeviceId::pci(0, 0, 4, 0), BackendId(7)),
            Err(IommuError::UnknownBackend(BackendId(7)))
        ));
        assert_eq!(iommu.device_attachment(dev), Some(Attachment::Default));
        iommu.unregister_device(dev).expect("unregister");
        assert_eq!(iommu.device_attachment(dev), None);
        let err = iommu.unregister_device(dev).expect_err("gone");
        assert_eq!(err.to_string(), "Device 0000:00:03.0 is not registered");
    }
}
