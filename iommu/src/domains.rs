//! The domain layer: the authoritative state of every device and guest
//! domain, one typed handler per hypercall, and the fan-out to backends.
//!
//! Handlers get inputs the dispatcher has already copied out of guest memory
//! and shaped (control word, alignment, sizes); they check every field
//! themselves (partition id, VTLs, padding, reserved bits, flags, ids,
//! addresses) and answer with a guest-visible status.

use crate::backend::{
    AttachTarget, Backend, BackendError, DomainKind, Invalidation, MapRun, PagingLevels, Perms,
    S1Config,
};
use crate::config::{IommuConfig, PAGE_SHIFT, PAGE_SIZE};
use crate::flush::{decode_entry, merge_ranges, PageRange};
use crate::ram;
use crate::runs::{RunBudget, RunMap, UnmapOp};
use crate::BackendId;
use pviommu_abi::register;
use pviommu_abi::{
    device_property, CreateDeviceDomainFlags, DeviceDomainId, DeviceDomainSettingsFlags,
    DeviceDomainType, DeviceId, DeviceIommuProperty, FlushListEntry, FlushListFlags, HvError,
    InputAttachDeviceDomain, InputConfigureDeviceDomain, InputCreateDeviceDomain,
    InputDeleteDeviceDomain, InputDetachDeviceDomain, InputDeviceDomain, InputFlushDeviceDomain,
    InputFlushDeviceDomainList, InputGetIommuCapabilities, InputGetLogicalDeviceProperty,
    InputGetVpRegisters, InputMapDeviceGpaPages, InputUnmapDeviceGpaPages, InputVtl,
    IommuCapabilities, MapFlags, OutputGetIommuCapabilities, OutputGetLogicalDeviceProperty,
    RegisterValue, HV_PARTITION_ID_SELF, HV_VP_INDEX_SELF,
};
use resources::ErrorChain;
use std::collections::HashMap;
use std::sync::Arc;
use vm_memory::GuestMemory;
use zerocopy::little_endian::{U16, U32, U64};

/// Size of OutputGetIommuCapabilities, reported in its `size` field.
pub(crate) const CAPABILITIES_SIZE: u32 = {
    let size = size_of::<OutputGetIommuCapabilities>();
    assert!(size <= u32::MAX as usize);
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let size = size as u32;
    size
};

/// Result of a simple call.
pub(crate) type HvResult<T> = Result<T, HvError>;

/// A rep call stopped at rep `done` (relative to the slice) with `error`;
/// the reps before it are done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RepError {
    pub done: usize,
    pub error: HvError,
}

impl RepError {
    fn at(done: usize, error: HvError) -> Self {
        Self { done, error }
    }
}

impl From<HvError> for RepError {
    fn from(error: HvError) -> Self {
        Self { done: 0, error }
    }
}

/// Where a device's DMA goes, as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Attachment {
    /// The default domain (id 0): identity.
    Default,
    /// The null domain (id 0xFFFF_FFFF): blocked.
    Null,
    /// A guest-created domain.
    Domain(u32),
}

impl Attachment {
    /// The guest's domain id for this attachment.
    pub fn domain_id(self) -> u32 {
        match self {
            Self::Default => DeviceDomainId::ID_DEFAULT,
            Self::Null => DeviceDomainId::ID_NULL,
            Self::Domain(id) => id,
        }
    }
}

/// Flush counters of a domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// FLUSH_DEVICE_DOMAIN calls.
    pub full: u64,
    /// FLUSH_DEVICE_DOMAIN_LIST entries received.
    pub entries: u64,
    /// Merged ranges (one backend invalidation each, per backend instance).
    pub ranges: u64,
    /// Pages in the merged ranges.
    pub pages: u64,
}

#[derive(Debug)]
pub(crate) struct DeviceEntry {
    pub backend: BackendId,
    pub attached: Attachment,
    /// The device's LOGICAL id, if it has one (a device on a vPCI bus).
    pub logical: Option<DeviceId>,
    /// Whether the guest may name it (ATTACH, DETACH, property): not for a
    /// device the VMM keeps in the default domain (direct attach).
    pub guest_visible: bool,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Instance {
    pub backend: BackendId,
    pub devices: u32,
}

#[derive(Debug)]
pub(crate) struct Domain {
    pub kind: DomainKind,
    pub runs: RunMap,
    pub s1: S1Config,
    pub devices: Vec<DeviceId>,
    pub instances: Vec<Instance>,
    pub flush: FlushStats,
}

/// Everything behind the Iommu's state lock.
pub(crate) struct State {
    pub backends: Vec<Arc<dyn Backend>>,
    /// Registered devices by their PCI id.
    pub devices: HashMap<DeviceId, DeviceEntry>,
    /// LOGICAL id -> PCI id of the devices that have one.
    pub aliases: HashMap<DeviceId, DeviceId>,
    pub domains: HashMap<u32, Domain>,
    pub backend_errors: u64,
    /// Runs of every guest domain (the sum of their `runs.len()`), held
    /// under [`IommuConfig::max_map_runs`] with the backends' own runs.
    pub runs_total: u64,
    /// The run limit shared with backends (S1 shadows).
    pub budget: RunBudget,
}

enum DomainRef {
    Default,
    Null,
    Guest(u32),
}

fn check_partition(partition_id: U64) -> HvResult<()> {
    if partition_id.get() == HV_PARTITION_ID_SELF {
        Ok(())
    } else {
        Err(HvError::INVALID_PARTITION_ID)
    }
}

/// Checks the common header and returns the domain id word.
fn check_header(hdr: &InputDeviceDomain) -> HvResult<DeviceDomainId> {
    check_partition(hdr.partition_id)?;
    if !hdr.owner_vtl().is_vtl0() || hdr.padding != [0; 7] {
        return Err(HvError::INVALID_PARAMETER);
    }
    let domain = hdr.domain();
    if domain.reserved() != 0 {
        return Err(HvError::INVALID_PARAMETER);
    }
    match domain.domain_type() {
        DeviceDomainType::S2 | DeviceDomainType::S1 => Ok(domain),
        _ => Err(HvError::INVALID_PARAMETER),
    }
}

fn kind_of(t: DeviceDomainType) -> DomainKind {
    if t == DeviceDomainType::S1 {
        DomainKind::S1
    } else {
        DomainKind::S2
    }
}

fn record(
    errors: &mut u64,
    backend: &dyn Backend,
    what: &str,
    result: Result<(), BackendError>,
) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => {
            *errors += 1;
            crate::guest_log!(
                Warn,
                "pvIOMMU {} backend: {what} failed: {}",
                backend.name(),
                ErrorChain(&e)
            );
            false
        }
    }
}

/// The status a backend failure gives the guest: INSUFFICIENT_MEMORY when
/// the VM-wide run limit stopped it (ABI section 6: the guest can free runs
/// by unmapping), NO_RESOURCES for anything else.
fn status_of(e: &BackendError) -> HvError {
    match e {
        BackendError::OutOfRuns => HvError::INSUFFICIENT_MEMORY,
        _ => HvError::NO_RESOURCES,
    }
}

/// [`record`], giving the guest's status of a failure.
fn record_status(
    errors: &mut u64,
    backend: &dyn Backend,
    what: &str,
    result: Result<(), BackendError>,
) -> HvResult<()> {
    let status = result.as_ref().err().map(status_of);
    if record(errors, backend, what, result) {
        Ok(())
    } else {
        Err(status.unwrap_or(HvError::NO_RESOURCES))
    }
}

/// Maps `run` in every instance, or in none.
fn map_everywhere(
    backends: &[Arc<dyn Backend>],
    instances: &[Instance],
    id: u32,
    run: MapRun,
    errors: &mut u64,
) -> Result<(), BackendError> {
    for (k, inst) in instances.iter().enumerate() {
        if let Err(e) = backends[inst.backend.0].map(id, run) {
            *errors += 1;
            crate::guest_log!(
                Warn,
                "pvIOMMU {} backend: map failed: {}",
                backends[inst.backend.0].name(),
                ErrorChain(&e)
            );
            for prev in &instances[..k] {
                let b = &*backends[prev.backend.0];
                record(errors, b, "undo map", b.unmap(id, run));
            }
            return Err(e);
        }
    }
    Ok(())
}

impl State {
    pub(crate) fn new(software: Arc<dyn Backend>) -> Self {
        Self {
            backends: vec![software],
            devices: HashMap::new(),
            aliases: HashMap::new(),
            domains: HashMap::new(),
            backend_errors: 0,
            runs_total: 0,
            budget: RunBudget::default(),
        }
    }

    /// Brings the shared run budget up to date (the limit for this guest
    /// RAM, the domain layer's runs); called before every hypercall.
    pub(crate) fn sync_budget<M: GuestMemory + ?Sized>(&self, config: &IommuConfig, mem: &M) {
        self.budget
            .sync(config.max_map_runs(ram::total_bytes(mem)), self.runs_total);
    }

    /// The registered device a guest's `hv_device_id` names, in its PCI
    /// form or its LOGICAL form (compared whole).
    /// A device the VMM attached directly is not the guest's to name.
    pub(crate) fn device_named(&self, raw: u64) -> HvResult<DeviceId> {
        let id = DeviceId::from_bits(raw);
        let id = if self.devices.contains_key(&id) {
            id
        } else {
            self.aliases
                .get(&id)
                .copied()
                .ok_or(HvError::INVALID_DEVICE_ID)?
        };
        match self.devices.get(&id) {
            Some(e) if e.guest_visible => Ok(id),
            _ => Err(HvError::INVALID_DEVICE_ID),
        }
    }

    fn resolve(&self, domain: DeviceDomainId) -> HvResult<DomainRef> {
        match domain.id() {
            DeviceDomainId::ID_DEFAULT => Ok(DomainRef::Default),
            DeviceDomainId::ID_NULL => Ok(DomainRef::Null),
            id => match self.domains.get(&id) {
                Some(d) if d.kind == kind_of(domain.domain_type()) => Ok(DomainRef::Guest(id)),
                _ => Err(HvError::INVALID_PARAMETER),
            },
        }
    }

    /// A guest-created domain of `kind` named by `hdr`.
    fn guest_domain(&self, hdr: &InputDeviceDomain, kind: DomainKind) -> HvResult<u32> {
        let domain = check_header(hdr)?;
        match self.resolve(domain)? {
            DomainRef::Guest(id) if self.domains.get(&id).is_some_and(|d| d.kind == kind) => Ok(id),
            _ => Err(HvError::INVALID_PARAMETER),
        }
    }

    // ---- simple calls ----

    /// GET_VP_REGISTERS, reps `0..names.len()` of this chunk: the value of
    /// each named register of the calling VP, one [`RegisterValue`] each in
    /// `output`. Only HV_REGISTER_VSM_VP_STATUS is known: 0 (VTL 0 active,
    /// no other VTL enabled); any other name is INVALID_PARAMETER at its
    /// rep. VMM choice: the VP is [`HV_VP_INDEX_SELF`] or the caller's own
    /// index (no other VP's registers).
    pub(crate) fn get_vp_registers(
        &self,
        caller_vp: u32,
        input: &InputGetVpRegisters,
        names: &[U32],
        output: &mut [RegisterValue],
    ) -> Result<(), RepError> {
        check_partition(input.partition_id)?;
        let vp = input.vp_index.get();
        if (vp != HV_VP_INDEX_SELF && vp != caller_vp)
            || !InputVtl::from_bits(input.input_vtl).is_vtl0()
            || input.padding != [0; 3]
        {
            return Err(HvError::INVALID_PARAMETER.into());
        }
        for (k, (name, out)) in names.iter().zip(output.iter_mut()).enumerate() {
            *out = match name.get() {
                register::VSM_VP_STATUS => RegisterValue::default(),
                _ => return Err(RepError::at(k, HvError::INVALID_PARAMETER)),
            };
        }
        Ok(())
    }

    pub(crate) fn get_capabilities(
        &self,
        config: &IommuConfig,
        input: &InputGetIommuCapabilities,
    ) -> HvResult<OutputGetIommuCapabilities> {
        check_partition(input.partition_id)?;
        if input.reserved.get() != 0 {
            return Err(HvError::INVALID_PARAMETER);
        }
        let caps = IommuCapabilities::new()
            .with_present(true)
            .with_s2(true)
            .with_s1(config.s1)
            .with_s1_5lvl(config.s1_5level);
        Ok(OutputGetIommuCapabilities {
            size: U32::new(CAPABILITIES_SIZE),
            reserved: U16::new(0),
            max_iova_width: config.max_iova_width,
            max_pasid_width: 0,
            iommu_cap: U64::new(caps.into_bits()),
            pgsize_bitmap: U64::new(config.pgsize_bitmap),
        })
    }

    pub(crate) fn get_device_property(
        &self,
        input: &InputGetLogicalDeviceProperty,
    ) -> HvResult<OutputGetLogicalDeviceProperty> {
        check_partition(input.partition_id)?;
        if input.reserved.get() != 0 || input.code.get() != device_property::PVIOMMU {
            return Err(HvError::INVALID_PARAMETER);
        }
        self.device_named(input.logical_device_id.get())?;
        Ok(OutputGetLogicalDeviceProperty {
            device_iommu: U64::new(DeviceIommuProperty::new().with_enabled(true).into_bits()),
            reserved: U64::new(0),
        })
    }

    pub(crate) fn create_domain(
        &mut self,
        config: &IommuConfig,
        input: &InputCreateDeviceDomain,
    ) -> HvResult<u32> {
        let domain = check_header(&input.device_domain)?;
        let flags = CreateDeviceDomainFlags::from_bits(input.create_device_domain_flags.get());
        if flags.reserved() != 0 {
            return Err(HvError::INVALID_PARAMETER);
        }
        let kind = kind_of(domain.domain_type());
        if kind == DomainKind::S1 && !config.s1 {
            return Err(HvError::INVALID_PARAMETER);
        }
        let id = domain.id();
        if id == DeviceDomainId::ID_DEFAULT
            || id == DeviceDomainId::ID_NULL
            || self.domains.contains_key(&id)
        {
            return Err(HvError::INVALID_PARAMETER);
        }
        if self.domains.len() >= usize::try_from(config.max_domains).unwrap_or(usize::MAX) {
            return Err(HvError::INSUFFICIENT_DEVICE_DOMAINS);
        }
        self.domains.insert(
            id,
            Domain {
                kind,
                runs: RunMap::default(),
                s1: S1Config::UNCONFIGURED,
                devices: Vec::new(),
                instances: Vec::new(),
                flush: FlushStats::default(),
            },
        );
        Ok(id)
    }

    /// DELETE_DEVICE_DOMAIN; returns the id of the deleted domain.
    pub(crate) fn delete_domain(&mut self, input: &InputDeleteDeviceDomain) -> HvResult<u32> {
        let domain = check_header(&input.device_domain)?;
        let DomainRef::Guest(id) = self.resolve(domain)? else {
            return Err(HvError::INVALID_PARAMETER);
        };
        if self.domains.get(&id).is_some_and(|d| !d.devices.is_empty()) {
            return Err(HvError::OPERATION_DENIED);
        }
        // No device attached means no backend instance: nothing to tear down.
        if let Some(dom) = self.domains.remove(&id) {
            let runs = u64::try_from(dom.runs.len()).unwrap_or(u64::MAX);
            self.runs_total = self.runs_total.saturating_sub(runs);
        }
        Ok(id)
    }

    pub(crate) fn attach(&mut self, input: &InputAttachDeviceDomain) -> HvResult<()> {
        let domain = check_header(&input.device_domain)?;
        let target = match self.resolve(domain)? {
            DomainRef::Default => Attachment::Default,
            DomainRef::Null => Attachment::Null,
            DomainRef::Guest(id) => Attachment::Domain(id),
        };
        let device = self.device_named(input.device_id.get())?;
        let Some(entry) = self.devices.get(&device) else {
            return Err(HvError::INVALID_DEVICE_ID);
        };
        // ATTACH replaces (Linux's driver never DETACHes): a device in
        // another domain moves there in one step.
        if entry.attached == target {
            return Err(HvError::DEVICE_ALREADY_IN_DOMAIN);
        }
        self.move_device(device, target).map_err(|e| {
            crate::guest_log!(
                Warn,
                "pvIOMMU: attach of {device} to domain {target:?} failed: {}",
                ErrorChain(&e)
            );
            status_of(&e)
        })
    }

    /// Points a registered device's DMA at `to` with one backend call (a
    /// replace: the device never passes through another domain), creating
    /// the backend's instance of a guest domain first if needed (replaying
    /// its state), then leaves its previous domain (the backend's instance
    /// of it goes with its last device). If the backend refuses, nothing
    /// changes here (the backend fails closed: the device is blocked).
    pub(crate) fn move_device(
        &mut self,
        device: DeviceId,
        to: Attachment,
    ) -> Result<(), BackendError> {
        let Some(entry) = self.devices.get(&device) else {
            return Err(BackendError::UnknownDevice(device.into_bits()));
        };
        let backend_id = entry.backend;
        let backend = Arc::clone(&self.backends[backend_id.0]);
        let target = match to {
            Attachment::Default => AttachTarget::Identity,
            Attachment::Null => AttachTarget::Blocked,
            Attachment::Domain(id) => AttachTarget::Domain(id),
        };
        let created = match to {
            Attachment::Domain(id) => self.instantiate(id, backend_id)?,
            _ => false,
        };
        if let Err(e) = backend.attach(device, target) {
            self.backend_errors += 1;
            if let (true, Attachment::Domain(id)) = (created, to) {
                if let Some(dom) = self.domains.get_mut(&id) {
                    dom.instances.retain(|i| i.backend != backend_id);
                }
                record(
                    &mut self.backend_errors,
                    &*backend,
                    "destroy",
                    backend.destroy_domain(id),
                );
            }
            return Err(e);
        }
        if let Attachment::Domain(id) = to {
            if let Some(dom) = self.domains.get_mut(&id) {
                if let Some(inst) = dom.instances.iter_mut().find(|i| i.backend == backend_id) {
                    inst.devices += 1;
                }
                dom.devices.push(device);
            }
        }
        let from = self
            .devices
            .get_mut(&device)
            .map(|e| std::mem::replace(&mut e.attached, to));
        match from {
            Some(Attachment::Domain(old)) => self.leave_domain(device, backend_id, old),
            _ => Ok(()),
        }
    }

    /// Instantiates domain `id` in backend `backend_id` if it is not yet
    /// (replaying its runs or S1 settings); returns whether it did.
    fn instantiate(&mut self, id: u32, backend_id: BackendId) -> Result<bool, BackendError> {
        let backend = Arc::clone(&self.backends[backend_id.0]);
        let Some(dom) = self.domains.get_mut(&id) else {
            return Err(BackendError::UnknownDomain(id));
        };
        if dom.instances.iter().any(|i| i.backend == backend_id) {
            return Ok(false);
        }
        backend.create_domain(id, dom.kind)?;
        let replay = match dom.kind {
            DomainKind::S2 => dom.runs.iter().try_for_each(|r| backend.map(id, *r)),
            DomainKind::S1 => backend.set_s1(id, dom.s1),
        };
        if let Err(e) = replay {
            record(
                &mut self.backend_errors,
                &*backend,
                "destroy",
                backend.destroy_domain(id),
            );
            return Err(e);
        }
        dom.instances.push(Instance {
            backend: backend_id,
            devices: 0,
        });
        Ok(true)
    }

    /// Takes `device` off guest domain `id`'s books; destroys the backend's
    /// instance of the domain if that was the backend's last device there.
    /// The device's DMA must already point elsewhere. The error is the
    /// destroy's (recorded; the instance is gone from the books anyway).
    fn leave_domain(
        &mut self,
        device: DeviceId,
        backend_id: BackendId,
        id: u32,
    ) -> Result<(), BackendError> {
        let Some(dom) = self.domains.get_mut(&id) else {
            return Ok(());
        };
        dom.devices.retain(|d| *d != device);
        let Some(pos) = dom.instances.iter().position(|i| i.backend == backend_id) else {
            return Ok(());
        };
        dom.instances[pos].devices = dom.instances[pos].devices.saturating_sub(1);
        if dom.instances[pos].devices > 0 {
            return Ok(());
        }
        dom.instances.remove(pos);
        let backend = Arc::clone(&self.backends[backend_id.0]);
        backend.destroy_domain(id).inspect_err(|e| {
            self.backend_errors += 1;
            crate::guest_log!(
                Warn,
                "pvIOMMU {} backend: destroy failed: {}",
                backend.name(),
                ErrorChain(&e)
            );
        })
    }

    /// Removes a device from the registry on its way out of the VM: blocks
    /// its DMA first (never through the default, IOVA = GPA domain), then
    /// drops it from its domain (and the backend's instance with its last
    /// device), then tells its backend it is gone. Every step runs even if
    /// an earlier one failed; the first failure is returned.
    pub(crate) fn remove_device(&mut self, device: DeviceId) -> Result<(), BackendError> {
        let Some(entry) = self.devices.get(&device) else {
            return Err(BackendError::UnknownDevice(device.into_bits()));
        };
        let backend_id = entry.backend;
        let mut result = match self.move_device(device, Attachment::Null) {
            Ok(()) => Ok(()),
            Err(e) => {
                // The backend failed closed; take the device off its
                // domain's books all the same.
                crate::guest_log!(
                    Warn,
                    "pvIOMMU: blocking {device} for removal failed: {}",
                    ErrorChain(&e)
                );
                let from = self
                    .devices
                    .get_mut(&device)
                    .map(|e| std::mem::replace(&mut e.attached, Attachment::Null));
                if let Some(Attachment::Domain(old)) = from {
                    let _ = self.leave_domain(device, backend_id, old);
                }
                Err(e)
            }
        };
        if let Some(logical) = self.devices.remove(&device).and_then(|e| e.logical) {
            self.aliases.remove(&logical);
        }
        let backend = Arc::clone(&self.backends[backend_id.0]);
        if let Err(e) = backend.remove_device(device) {
            self.backend_errors += 1;
            result = result.and(Err(e));
        }
        result
    }

    pub(crate) fn detach(&mut self, input: &InputDetachDeviceDomain) -> HvResult<()> {
        check_partition(input.partition_id)?;
        let device = self.device_named(input.device_id.get())?;
        let Some(entry) = self.devices.get(&device) else {
            return Err(HvError::INVALID_DEVICE_ID);
        };
        // Detaching a device that is in the default domain is a no-op.
        if entry.attached == Attachment::Default {
            return Ok(());
        }
        self.move_device(device, Attachment::Default).map_err(|e| {
            crate::guest_log!(
                Warn,
                "pvIOMMU: detach of {device} failed: {}",
                ErrorChain(&e)
            );
            HvError::NO_RESOURCES
        })
    }

    pub(crate) fn configure<M: GuestMemory + ?Sized>(
        &mut self,
        config: &IommuConfig,
        mem: &M,
        input: &InputConfigureDeviceDomain,
    ) -> HvResult<()> {
        let id = self.guest_domain(&input.device_domain, DomainKind::S1)?;
        let flags = DeviceDomainSettingsFlags::from_bits(input.settings.flags.get());
        if flags.reserved() != 0 {
            return Err(HvError::INVALID_PARAMETER);
        }
        let root = input.settings.page_table_root.get();
        let s1 = if flags.blocked() || !flags.translation_enabled() {
            // Blocked (Linux's blocking domain: translation_enabled = 1,
            // blocked = 1) or identity (translation_enabled = 0): no table,
            // the root is ignored (Linux sends 0).
            S1Config {
                root: 0,
                levels: PagingLevels::Four,
                translation_enabled: flags.translation_enabled(),
                blocked: flags.blocked(),
            }
        } else {
            if flags.first_stage_paging_mode() && !config.s1_5level {
                return Err(HvError::INVALID_PARAMETER);
            }
            if root & (PAGE_SIZE - 1) != 0 || !ram::in_ram(mem, root, PAGE_SIZE) {
                return Err(HvError::INVALID_PARAMETER);
            }
            S1Config {
                root,
                levels: if flags.first_stage_paging_mode() {
                    PagingLevels::Five
                } else {
                    PagingLevels::Four
                },
                translation_enabled: true,
                blocked: false,
            }
        };
        let State {
            backends,
            domains,
            backend_errors,
            ..
        } = self;
        let Some(dom) = domains.get_mut(&id) else {
            return Err(HvError::INVALID_PARAMETER);
        };
        dom.s1 = s1;
        let mut status = Ok(());
        for inst in &dom.instances {
            let b = &*backends[inst.backend.0];
            status = status.and(record_status(backend_errors, b, "set_s1", b.set_s1(id, s1)));
        }
        status
    }

    pub(crate) fn flush(&mut self, input: &InputFlushDeviceDomain) -> HvResult<()> {
        let domain = check_header(&input.device_domain)?;
        let target = self.resolve(domain)?;
        if input.flags.get() != 0 || input.reserved.get() != 0 {
            return Err(HvError::INVALID_PARAMETER);
        }
        let DomainRef::Guest(id) = target else {
            return Ok(()); // nothing is cached for the default and null domains
        };
        let State {
            backends,
            domains,
            backend_errors,
            ..
        } = self;
        let Some(dom) = domains.get_mut(&id) else {
            return Err(HvError::INVALID_PARAMETER);
        };
        dom.flush.full += 1;
        let mut status = Ok(());
        for inst in &dom.instances {
            let b = &*backends[inst.backend.0];
            status = status.and(record_status(
                backend_errors,
                b,
                "invalidate all",
                b.invalidate(id, Invalidation::All),
            ));
        }
        status
    }

    // ---- rep calls ----

    /// MAP_DEVICE_GPA_PAGES, reps `first_rep..first_rep + gpns.len()`.
    pub(crate) fn map<M: GuestMemory + ?Sized>(
        &mut self,
        config: &IommuConfig,
        mem: &M,
        hdr: &InputMapDeviceGpaPages,
        first_rep: u16,
        gpns: &[U64],
    ) -> Result<(), RepError> {
        let id = self.guest_domain(&hdr.device_domain, DomainKind::S2)?;
        let flags = MapFlags::from_bits(hdr.map_flags.get());
        if !InputVtl::from_bits(hdr.target_vtl).is_vtl0()
            || hdr.padding != [0; 3]
            || flags.reserved() != 0
            || !flags.readable()
        {
            return Err(HvError::INVALID_PARAMETER.into());
        }
        let base = hdr.target_device_va_base.get();
        if base & (PAGE_SIZE - 1) != 0 {
            return Err(HvError::INVALID_PARAMETER.into());
        }
        let perms = Perms {
            read: true,
            write: flags.writable(),
        };
        let limit = config.iova_limit();
        let max_pages = config.max_mapped_pages_per_domain;
        let max_runs = config
            .max_map_runs(ram::total_bytes(mem))
            .saturating_sub(self.budget.backend_runs());
        let State {
            backends,
            domains,
            backend_errors,
            runs_total,
            ..
        } = self;
        let Some(dom) = domains.get_mut(&id) else {
            return Err(HvError::INVALID_PARAMETER.into());
        };
        let first_iova = base.checked_add(u64::from(first_rep) << PAGE_SHIFT);
        // IOVAs only go up in one call, so the first mapped page at or above
        // the first IOVA is the only one this slice can run into.
        let blocker = first_iova
            .and_then(|iova| dom.runs.first_ending_after(iova))
            .map(|r| r.iova);
        // The run being built: (run, index of its first rep in the slice).
        let mut pending: Option<(MapRun, usize)> = None;
        let mut region: Option<(u64, u64)> = None;

        let mut commit =
            |dom: &mut Domain, runs_total: &mut u64, pending: &mut Option<(MapRun, usize)>| {
                if let Some((run, k)) = pending.take() {
                    if map_everywhere(backends, &dom.instances, id, run, backend_errors).is_err() {
                        return Err(RepError::at(k, HvError::NO_RESOURCES));
                    }
                    dom.runs.insert(run);
                    *runs_total += 1;
                }
                Ok(())
            };

        for (k, gpn) in gpns.iter().enumerate() {
            let rep = u64::from(first_rep) + u64::try_from(k).unwrap_or(u64::MAX);
            let check = || -> HvResult<(u64, u64, (u64, u64))> {
                let iova = base
                    .checked_add(rep << PAGE_SHIFT)
                    .filter(|&iova| u128::from(iova) + u128::from(PAGE_SIZE) <= limit)
                    .ok_or(HvError::INVALID_PARAMETER)?;
                if blocker.is_some_and(|b| iova >= b) {
                    return Err(HvError::INVALID_PARAMETER); // already mapped
                }
                let gpn = gpn.get();
                if gpn >> (64 - PAGE_SHIFT) != 0 {
                    return Err(HvError::INVALID_PARAMETER);
                }
                let gpa = gpn << PAGE_SHIFT;
                let reg = match region {
                    Some((start, end)) if gpa >= start && gpa < end && end - gpa >= PAGE_SIZE => {
                        (start, end)
                    }
                    _ => ram::region_of(mem, gpa, PAGE_SIZE).ok_or(HvError::INVALID_PARAMETER)?,
                };
                Ok((iova, gpa, reg))
            };
            let (iova, gpa, reg) = match check() {
                Ok(v) => v,
                Err(e) => {
                    commit(dom, runs_total, &mut pending)?;
                    return Err(RepError::at(k, e));
                }
            };
            let pending_pages = pending.as_ref().map_or(0, |(r, _)| r.pages());
            if dom.runs.pages() + pending_pages >= max_pages {
                commit(dom, runs_total, &mut pending)?;
                return Err(RepError::at(k, HvError::INSUFFICIENT_MEMORY));
            }
            let same_region = region == Some(reg);
            region = Some(reg);
            match &mut pending {
                Some((run, _))
                    if same_region
                        && run.iova_end() == iova
                        && run.gpa + run.len == gpa
                        && run.perms == perms =>
                {
                    run.len += PAGE_SIZE;
                }
                _ => {
                    commit(dom, runs_total, &mut pending)?;
                    // A new run: the VM-wide limit keeps the VMM's memory
                    // bounded whatever the guest maps (MAP_RUN_BYTES each).
                    if *runs_total >= max_runs {
                        return Err(RepError::at(k, HvError::INSUFFICIENT_MEMORY));
                    }
                    pending = Some((
                        MapRun {
                            iova,
                            gpa,
                            len: PAGE_SIZE,
                            perms,
                        },
                        k,
                    ));
                }
            }
        }
        commit(dom, runs_total, &mut pending)
    }

    /// UNMAP_DEVICE_GPA_PAGES, reps `first_rep..first_rep + count`.
    pub(crate) fn unmap<M: GuestMemory + ?Sized>(
        &mut self,
        config: &IommuConfig,
        mem: &M,
        hdr: &InputUnmapDeviceGpaPages,
        first_rep: u16,
        count: usize,
    ) -> Result<(), RepError> {
        let id = self.guest_domain(&hdr.device_domain, DomainKind::S2)?;
        let base = hdr.target_device_va_base.get();
        if base & (PAGE_SIZE - 1) != 0 {
            return Err(HvError::INVALID_PARAMETER.into());
        }
        let max_runs = config
            .max_map_runs(ram::total_bytes(mem))
            .saturating_sub(self.budget.backend_runs());
        let State {
            backends,
            domains,
            backend_errors,
            runs_total,
            ..
        } = self;
        let Some(dom) = domains.get_mut(&id) else {
            return Err(HvError::INVALID_PARAMETER.into());
        };
        let count64 = u64::try_from(count).unwrap_or(u64::MAX);
        let Some(start) = base.checked_add(u64::from(first_rep) << PAGE_SHIFT) else {
            return Err(HvError::INVALID_PARAMETER.into());
        };
        // Pages past 2^64 cannot be mapped: they end the prefix.
        let end = start
            .checked_add(count64 << PAGE_SHIFT)
            .unwrap_or(!(PAGE_SIZE - 1));
        let mut first_failure: Option<u64> = None;
        let instances = &dom.instances;
        let runs_before = dom.runs.len();
        let mut spare = max_runs.saturating_sub(*runs_total);
        let prefix = dom.runs.unmap_prefix(start, end, &mut spare, |op| {
            let (result_iova, ok) = match op {
                UnmapOp::Whole(run) => {
                    let mut ok = true;
                    for inst in instances {
                        let b = &*backends[inst.backend.0];
                        ok &= record(backend_errors, b, "unmap", b.unmap(id, run));
                    }
                    (run.iova.max(start), ok)
                }
                UnmapOp::Split { run, keep } => {
                    let mut pieces = [run; 2];
                    let mut n = 0;
                    for piece in keep.into_iter().flatten() {
                        pieces[n] = piece;
                        n += 1;
                    }
                    let mut ok = true;
                    for inst in instances {
                        let b = &*backends[inst.backend.0];
                        ok &= record(
                            backend_errors,
                            b,
                            "unmap_keep",
                            b.unmap_keep(id, run, &pieces[..n]),
                        );
                    }
                    (run.iova.max(start), ok)
                }
            };
            if !ok && first_failure.is_none() {
                first_failure = Some(result_iova);
            }
        });
        let runs_after = dom.runs.len();
        *runs_total = runs_total
            .saturating_add(u64::try_from(runs_after).unwrap_or(u64::MAX))
            .saturating_sub(u64::try_from(runs_before).unwrap_or(u64::MAX));
        let done = |iova: u64| usize::try_from((iova - start) >> PAGE_SHIFT).unwrap_or(usize::MAX);
        if let Some(at) = first_failure {
            return Err(RepError::at(done(at), HvError::NO_RESOURCES));
        }
        let done_pages = done(prefix.end);
        if prefix.out_of_runs {
            // Cutting a hole in a run would make one more run than the VM
            // may hold; the guest can unmap the whole run instead.
            return Err(RepError::at(done_pages, HvError::INSUFFICIENT_MEMORY));
        }
        if done_pages < count {
            return Err(RepError::at(done_pages, HvError::INVALID_PARAMETER));
        }
        Ok(())
    }

    /// FLUSH_DEVICE_DOMAIN_LIST, entries `first_rep..`.
    pub(crate) fn flush_list(
        &mut self,
        config: &IommuConfig,
        hdr: &InputFlushDeviceDomainList,
        entries: &[U64],
    ) -> Result<(), RepError> {
        let domain = check_header(&hdr.device_domain)?;
        let target = self.resolve(domain)?;
        if FlushListFlags::from_bits(hdr.flags.get()).reserved() != 0 || hdr.reserved.get() != 0 {
            return Err(HvError::INVALID_PARAMETER.into());
        }
        const CHUNK: usize = 512;
        let mut ranges = [PageRange::default(); CHUNK];
        let mut failed = None;
        for (c, chunk) in entries.chunks(CHUNK).enumerate() {
            let mut n = 0;
            for (k, raw) in chunk.iter().enumerate() {
                match decode_entry(FlushListEntry::from_bits(raw.get()), config.max_iova_width) {
                    // Clamped to the aperture: a block past it flushes nothing.
                    Some(r) if r.pages() == 0 => {}
                    Some(r) => {
                        ranges[n] = r;
                        n += 1;
                    }
                    None => {
                        failed = Some(c * CHUNK + k);
                        break;
                    }
                }
            }
            let merged = merge_ranges(&mut ranges[..n]);
            if let DomainRef::Guest(id) = target {
                if let Err(status) = self.invalidate_ranges(id, n, &ranges[..merged]) {
                    return Err(RepError::at(c * CHUNK, status));
                }
            }
            if failed.is_some() {
                break;
            }
        }
        match failed {
            Some(k) => Err(RepError::at(k, HvError::INVALID_PARAMETER)),
            None => Ok(()),
        }
    }

    /// One invalidation per range per backend instance; the status of the
    /// first that failed.
    fn invalidate_ranges(&mut self, id: u32, entries: usize, ranges: &[PageRange]) -> HvResult<()> {
        let State {
            backends,
            domains,
            backend_errors,
            ..
        } = self;
        let Some(dom) = domains.get_mut(&id) else {
            return Ok(());
        };
        dom.flush.entries += u64::try_from(entries).unwrap_or(u64::MAX);
        let mut status = Ok(());
        for r in ranges {
            dom.flush.ranges += 1;
            dom.flush.pages += r.pages();
            // Ranges lie in the aperture (at most 2^57 bytes): no overflow,
            // and never an empty range for a non-empty one.
            let (Some(iova), Some(len)) = (
                r.start.checked_mul(PAGE_SIZE),
                r.pages().checked_mul(PAGE_SIZE),
            ) else {
                status = status.and(Err(HvError::NO_RESOURCES));
                continue;
            };
            let what = Invalidation::Range { iova, len };
            for inst in &dom.instances {
                let b = &*backends[inst.backend.0];
                status = status.and(record_status(
                    backend_errors,
                    b,
                    "invalidate",
                    b.invalidate(id, what),
                ));
            }
        }
        status
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    //! Map, unmap and flush against a plain page-by-page reference model.

    use crate::dispatch::tests::{dev, entry, ok, Guest, HIGH_RAM, P, R, RAM_TOP, RW, S2};
    use crate::testing::Call;
    use crate::{Access, Invalidation, IommuConfig};
    use proptest::prelude::*;
    use pviommu_abi::HvStatus;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Clone, Debug)]
    enum Op {
        Map {
            iova: u64,
            gpns: Vec<u64>,
            writable: bool,
        },
        Unmap {
            iova: u64,
            pages: u16,
        },
        FlushList {
            entries: Vec<(u64, u16)>,
        },
        Reattach,
    }

    /// GPA pages: mostly RAM, some in the hole, some in high RAM.
    fn gpn() -> impl Strategy<Value = u64> {
        prop_oneof![
            8 => 0x100u64..0x140,
            1 => Just(RAM_TOP / P),
            1 => (HIGH_RAM / P)..(HIGH_RAM / P + 4),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..48, prop::collection::vec(gpn(), 1..24), any::<bool>()).prop_map(|(iova, gpns, writable)| {
                // Half the time, make the pages contiguous.
                Op::Map { iova, gpns, writable }
            }),
            2 => (0u64..48, 0x100u64..0x140, 1usize..24, any::<bool>()).prop_map(|(iova, g, n, writable)| Op::Map {
                iova,
                gpns: (g..g + n as u64).collect(),
                writable,
            }),
            3 => (0u64..64, 1u16..32).prop_map(|(iova, pages)| Op::Unmap { iova, pages }),
            2 => prop::collection::vec((0u64..80, 0u16..4), 1..12).prop_map(|entries| Op::FlushList { entries }),
            1 => Just(Op::Reattach),
        ]
    }

    fn in_ram(gpn: u64) -> bool {
        gpn < RAM_TOP / P || (HIGH_RAM / P..HIGH_RAM / P + 1024).contains(&gpn)
    }

    #[derive(Default)]
    struct Model {
        pages: BTreeMap<u64, (u64, bool)>,
    }

    impl Model {
        fn map(&mut self, iova: u64, gpns: &[u64], writable: bool, limit: u64) -> (HvStatus, u16) {
            for (i, g) in gpns.iter().enumerate() {
                let page = iova + i as u64;
                if !in_ram(*g) || self.pages.contains_key(&page) {
                    return (HvStatus::INVALID_PARAMETER, i as u16);
                }
                if self.pages.len() as u64 >= limit {
                    return (HvStatus::INSUFFICIENT_MEMORY, i as u16);
                }
                self.pages.insert(page, (*g, writable));
            }
            (HvStatus::SUCCESS, gpns.len() as u16)
        }

        fn unmap(&mut self, iova: u64, pages: u16) -> (HvStatus, u16) {
            for i in 0..pages {
                if self.pages.remove(&(iova + u64::from(i))).is_none() {
                    return (HvStatus::INVALID_PARAMETER, i);
                }
            }
            (HvStatus::SUCCESS, pages)
        }
    }

    fn check_state(g: &Guest, model: &Model, attached: bool) -> Result<(), TestCaseError> {
        let info = &g.iommu.domains_info()[2];
        prop_assert_eq!(info.mapped_pages, model.pages.len() as u64);
        prop_assert_eq!(g.iommu.stats().backend_errors, 0, "IOMMUFD rules held");
        if attached {
            prop_assert_eq!(g.rec.pages(5).expect("instance"), model.pages.clone());
        } else {
            prop_assert!(g.rec.pages(5).is_none(), "instance destroyed");
        }
        // The software backend (dev 1) agrees page by page.
        for page in 0..100u64 {
            let want = model.pages.get(&page);
            let got = g.translate(dev(1), page * P + 8, 8, Access::Read);
            match want {
                Some((gpn, writable)) => {
                    prop_assert_eq!(got, Ok(vec![(gpn * P + 8, 8)]));
                    let w = g.translate(dev(1), page * P, 1, Access::Write).is_ok();
                    prop_assert_eq!(w, *writable);
                }
                None => prop_assert!(got.is_err()),
            }
        }
        Ok(())
    }

    fn run(ops: Vec<Op>, budget: u16, limit: u64) -> Result<(), TestCaseError> {
        let g = Guest::with(IommuConfig {
            rep_budget: budget,
            max_mapped_pages_per_domain: limit,
            ..Default::default()
        });
        prop_assert_eq!(g.create(S2, 5), ok());
        prop_assert_eq!(g.attach(S2, 5, dev(1)), ok());
        prop_assert_eq!(g.attach(S2, 5, dev(9)), ok());
        let mut attached = true;
        let mut model = Model::default();
        for op in ops {
            g.rec.take_calls();
            match op {
                Op::Map {
                    iova,
                    gpns,
                    writable,
                } => {
                    let got = g.map(5, iova * P, &gpns, if writable { RW } else { R });
                    prop_assert_eq!(got, model.map(iova, &gpns, writable, limit));
                }
                Op::Unmap { iova, pages } => {
                    prop_assert_eq!(g.unmap(5, iova * P, pages), model.unmap(iova, pages));
                }
                Op::FlushList { entries } => {
                    let raw: Vec<u64> = entries.iter().map(|&(p, s)| entry(p, s)).collect();
                    let valid = entries
                        .iter()
                        .take_while(|(p, s)| p % (1 << s) == 0)
                        .count();
                    let want = if valid == entries.len() {
                        (HvStatus::SUCCESS, valid as u16)
                    } else {
                        (HvStatus::INVALID_PARAMETER, valid as u16)
                    };
                    prop_assert_eq!(g.flush_list(S2, 5, &raw), want);
                    let mut union = BTreeSet::new();
                    for &(p, s) in &entries[..valid] {
                        union.extend(p..p + (1 << s));
                    }
                    let mut flushed = BTreeSet::new();
                    let mut ranges = vec![];
                    for call in g.rec.take_calls() {
                        if let Call::Invalidate(5, Invalidation::Range { iova, len }) = call {
                            let (a, b) = (iova / P, (iova + len) / P);
                            flushed.extend(a..b);
                            ranges.push((a, b));
                        }
                    }
                    if attached {
                        prop_assert_eq!(&flushed, &union, "exact: nothing more, nothing less");
                        if usize::from(budget) >= entries.len() {
                            // One slice: disjoint and maximal, no two ranges touch.
                            ranges.sort_unstable();
                            prop_assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0));
                        }
                    } else {
                        prop_assert!(ranges.is_empty());
                    }
                }
                Op::Reattach => {
                    if attached {
                        prop_assert_eq!(g.detach(dev(9)), ok());
                    } else {
                        prop_assert_eq!(g.attach(S2, 5, dev(9)), ok());
                    }
                    attached = !attached;
                }
            }
            check_state(&g, &model, attached)?;
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn map_unmap_flush_match_the_model(ops in prop::collection::vec(op(), 1..40), small in any::<bool>()) {
            run(ops, if small { 5 } else { 512 }, 1 << 20)?;
        }

        #[test]
        fn the_page_limit_matches_the_model(ops in prop::collection::vec(op(), 1..30)) {
            run(ops, 512, 24)?;
        }
    }
}
