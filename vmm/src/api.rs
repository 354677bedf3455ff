//! The VMM's side of the REST API (`pvmm --api-socket PATH`): [`ApiVmm`]
//! implements [`api::VmmApi`] on the VM's device manager and pvIOMMU, and
//! [`run`] serves it from the VMM's event loop.
//!
//! Hot-add: slot and BARs from the allocators, the device on the PCI root,
//! its registration with the pvIOMMU (mode `pviommu`), then PCIU and the
//! GED interrupt (`devices::acpi_hotplug`, AML in [`crate::hotplug`]). The
//! answer is sent at once: the guest finds the device when it handles the
//! event.
//!
//! Hot-remove does not block the event loop: `vm.remove-device` sets PCID,
//! raises the GED and keeps the request's [`Responder`]. The guest's `_EJ0`
//! writes B0EJ, which signals the eject EventFd; [`EjectWatcher`] then
//! finishes the removal (pvIOMMU detach and unregister, PCI root, slot and
//! BARs freed) and answers 204. If the guest has not ejected after
//! [`EJECT_TIMEOUT`], a TimerFd fires and the device is removed anyway (the
//! forced path), still answering 204; the log says so. Meanwhile other
//! requests are served, and a second removal of the same id is a 409.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{
    AddDeviceRequest, AddDeviceResponse, ApiRequest, ApiSubscriber, Bdf, DeviceId, DeviceInfo,
    DeviceKind, DeviceSource, DmaAccess, DomainInfo, DomainType, EmulatedKind, FaultInfo,
    FlushCounters, IommuDomainsResponse, IommuMode, PingResponse, RemoveDeviceRequest, Responder,
    VmConfigInfo, VmInfoResponse, VmState, VmmApi, VmmError, VmmResult,
};
use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use iommu::{BackendId, Iommu};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{KernelSource, VmConfig};
use crate::device_manager::DeviceManager;
use crate::error::{Error, Result};
use crate::vcpu::ExitSlot;
use crate::{ExitReason, Vmm};

/// How long a removal waits for the guest's eject before forcing it.
pub const EJECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A device plugged in through the API.
#[derive(Debug)]
struct Plugged {
    slot: u8,
    kind: DeviceKind,
    iommu: IommuMode,
    path: Option<PathBuf>,
    /// Its pvIOMMU name, when registered.
    iommu_id: Option<iommu::DeviceId>,
}

/// A removal waiting for the guest's eject.
#[derive(Debug)]
struct PendingRemoval {
    id: DeviceId,
    slot: u8,
    deadline: Instant,
    responder: Option<Responder<()>>,
}

/// The API's view of one VM.
pub struct ApiVmm {
    config: VmConfig,
    devices: Arc<Mutex<DeviceManager>>,
    iommu: Arc<Iommu>,
    /// Whether the guest sees the pvIOMMU.
    pviommu: bool,
    exit: Arc<ExitSlot>,
    state: VmState,
    plugged: BTreeMap<DeviceId, Plugged>,
    pending: Vec<PendingRemoval>,
    timer: TimerFd,
    next_id: u32,
    /// `vmm.shutdown` was asked for.
    quit: bool,
    /// `/dev/iommu` and the IOMMUFD backend, from the first VFIO device on.
    passthrough: Option<devices::vfio::Passthrough>,
}

impl std::fmt::Debug for ApiVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiVmm")
            .field("state", &self.state)
            .field("plugged", &self.plugged)
            .finish_non_exhaustive()
    }
}

fn bdf(slot: u8) -> Bdf {
    Bdf::new(0, 0, slot & 0x1f, 0).expect("device 0-31, function 0 is a valid address")
}

fn internal(e: impl std::error::Error + Send + Sync + 'static) -> VmmError {
    VmmError::internal(e)
}

impl ApiVmm {
    /// The API's view of `vmm` (before it runs).
    pub fn new(vmm: &Vmm) -> Result<Self> {
        Ok(Self {
            config: vmm.config.clone(),
            devices: vmm.devices.clone(),
            iommu: vmm.iommu().clone(),
            pviommu: vmm.config.pviommu,
            exit: vmm.exit.clone(),
            state: VmState::Running,
            plugged: BTreeMap::new(),
            pending: Vec::new(),
            timer: TimerFd::new().map_err(|e| Error::Io("the eject timer", e.into()))?,
            next_id: 0,
            quit: false,
            passthrough: None,
        })
    }

    fn fresh_id(&mut self, prefix: &str) -> VmmResult<DeviceId> {
        loop {
            let id = DeviceId::new(format!("{prefix}{}", self.next_id)).map_err(internal)?;
            self.next_id = self.next_id.wrapping_add(1);
            if !self.plugged.contains_key(&id) {
                return Ok(id);
            }
        }
    }

    fn dm(&self) -> std::sync::MutexGuard<'_, DeviceManager> {
        devices::lock::mutex(&self.devices)
    }

    /// Plugs `dev` in, registers it with the IOMMU under its PCI address
    /// (`register`: the software backend for emulated devices, which
    /// translate every DMA through it, or the IOMMUFD backend for VFIO
    /// devices; either way it starts in the default domain, IOVA = GPA) and
    /// tells the guest.
    fn plug<T>(
        &mut self,
        dev: Arc<Mutex<T>>,
        register: impl FnOnce(&Self, &mut T, iommu::DeviceId) -> VmmResult<()>,
        id: DeviceId,
        kind: DeviceKind,
        mode: IommuMode,
        path: Option<PathBuf>,
    ) -> VmmResult<AddDeviceResponse>
    where
        T: devices::pci::PciDevice + devices::bus::BusDevice + 'static,
    {
        let addr = self
            .dm()
            .add_pci_device(dev.clone(), None)
            .map_err(|e| match e {
                Error::Resource(_) => VmmError::conflict(e),
                e => VmmError::internal(e),
            })?;
        let slot = addr.device;
        let iid = iommu::DeviceId::pci(0, addr.bus, addr.device, addr.function);
        if let Err(e) = register(self, &mut devices::lock::mutex(&dev), iid) {
            let _ = self.dm().remove_pci_device(slot);
            return Err(e);
        }
        let iommu_id = Some(iid);
        self.plugged.insert(
            id.clone(),
            Plugged {
                slot,
                kind,
                iommu: mode,
                path,
                iommu_id,
            },
        );
        devices::lock::mutex(&self.dm().hotplug).slot_added(slot);
        log::info!("api: {id} plugged in at {addr}");
        Ok(AddDeviceResponse { id, bdf: bdf(slot) })
    }

    /// Takes the device out: pvIOMMU, PCI root, slot and BARs.
    fn unplug(&mut self, id: &DeviceId) -> VmmResult<()> {
        let Some(p) = self.plugged.remove(id) else {
            return Err(VmmError::not_found(format!("No device \"{id}\"")));
        };
        let dm = self.dm();
        devices::lock::mutex(&dm.hotplug).cancel_eject(p.slot);
        if let Some(iid) = p.iommu_id {
            if let Err(e) = self.iommu.unregister_device(iid) {
                log::error!("api: unregistering {id} from the pvIOMMU: {e}");
            }
        }
        drop(dm);
        self.dm()
            .remove_pci_device(p.slot)
            .map_err(VmmError::internal)?;
        log::info!("api: {id} removed from slot {}", p.slot);
        Ok(())
    }

    /// Starts a removal that the guest acknowledges: answered by
    /// [`Self::complete_ejects`] or [`Self::expire`].
    pub fn start_removal(&mut self, request: RemoveDeviceRequest, responder: Responder<()>) {
        let id = request.id;
        let Some(slot) = self.plugged.get(&id).map(|p| p.slot) else {
            responder.respond(Err(VmmError::not_found(format!("No device \"{id}\""))));
            return;
        };
        if self.pending.iter().any(|p| p.id == id) {
            responder.respond(Err(VmmError::conflict(format!(
                "Device \"{id}\" is already being removed"
            ))));
            return;
        }
        if self.state != VmState::Running {
            // Nobody to ask: remove at once.
            responder.respond(self.unplug(&id));
            return;
        }
        devices::lock::mutex(&self.dm().hotplug).request_eject(slot);
        self.pending.push(PendingRemoval {
            id,
            slot,
            deadline: Instant::now() + EJECT_TIMEOUT,
            responder: Some(responder),
        });
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        let Some(next) = self.pending.iter().map(|p| p.deadline).min() else {
            let _ = self.timer.clear();
            return;
        };
        let wait = next
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if let Err(e) = self.timer.reset(wait, None) {
            log::error!("api: cannot arm the eject timer: {e}");
        }
    }

    fn finish(&mut self, index: usize, forced: bool) {
        let mut p = self.pending.swap_remove(index);
        if forced {
            log::warn!(
                "api: the guest did not eject {} within {EJECT_TIMEOUT:?}; removing it anyway",
                p.id
            );
        }
        let result = self.unplug(&p.id);
        if let Some(r) = p.responder.take() {
            r.respond(result);
        }
    }

    /// Finishes the removals whose slots the guest ejected.
    pub fn complete_ejects(&mut self) {
        let ejected = devices::lock::mutex(&self.dm().hotplug).take_ejected();
        while let Some(i) = self
            .pending
            .iter()
            .position(|p| ejected & (1u32 << (p.slot & 0x1f)) != 0)
        {
            self.finish(i, false);
        }
        self.arm_timer();
    }

    /// Forces the removals whose deadline has passed.
    pub fn expire(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        while let Some(i) = self.pending.iter().position(|p| p.deadline <= now) {
            self.finish(i, true);
        }
        self.arm_timer();
    }

    /// The VM stopped: removals in flight complete at once.
    fn vm_stopped(&mut self) {
        self.state = VmState::Shutdown;
        while !self.pending.is_empty() {
            self.finish(0, false);
        }
    }

    fn add_emulated(
        &mut self,
        kind: EmulatedKind,
        id: DeviceId,
        mode: IommuMode,
    ) -> VmmResult<AddDeviceResponse> {
        match kind {
            EmulatedKind::DmaTest => {
                let dev = {
                    let dm = self.dm();
                    devices::dma_test::DmaTest::new(
                        id.as_str(),
                        self.iommu.clone(),
                        dm.memory().clone(),
                        dm.msi_sink(),
                    )
                    .map_err(internal)?
                };
                self.plug(
                    Arc::new(Mutex::new(dev)),
                    |vmm, d, iid| {
                        vmm.iommu
                            .register_device(iid, BackendId::SOFTWARE)
                            .map_err(internal)?;
                        d.set_device_id(iid);
                        Ok(())
                    },
                    id,
                    DeviceKind::DmaTest,
                    mode,
                    None,
                )
            }
        }
    }

    /// `/dev/iommu` and the IOMMUFD backend with guest RAM mapped, opened
    /// for the first VFIO device.
    fn passthrough(&mut self) -> VmmResult<&devices::vfio::Passthrough> {
        if self.passthrough.is_none() {
            let memory = self.dm().memory().clone();
            let pt = devices::vfio::Passthrough::open(
                Path::new(iommu::iommufd::DEV_IOMMU),
                &self.iommu,
                memory,
                // S1 domains nest in VT-d's first-stage format (the only
                // nesting the host side implements).
                iommu::iommufd::NestFormat::VtdS1,
            )
            .map_err(internal)?;
            log::info!(
                "api: VFIO passthrough through {}",
                iommu::iommufd::DEV_IOMMU
            );
            self.passthrough = Some(pt);
        }
        self.opened_passthrough()
    }

    /// The passthrough [`Self::passthrough`] opened.
    fn opened_passthrough(&self) -> VmmResult<&devices::vfio::Passthrough> {
        self.passthrough
            .as_ref()
            .ok_or_else(|| VmmError::internal("VFIO passthrough is not set up"))
    }

    /// Passes the host PCI function at `path` (bound to vfio-pci) through:
    /// opened on the VM's iommufd with KVM hooks (MSI routes, BAR slots),
    /// plugged in, registered with the pvIOMMU's IOMMUFD backend.
    fn add_vfio(
        &mut self,
        path: &Path,
        id: DeviceId,
        mode: IommuMode,
    ) -> VmmResult<AddDeviceResponse> {
        if !path.exists() {
            return Err(VmmError::invalid_request(format!(
                "Device path {} does not exist",
                path.display()
            )));
        }
        // Before /dev/iommu: a device not bound to vfio-pci is the caller's
        // mistake on any host.
        devices::vfio::check_vfio_pci(path)
            .map_err(|e| VmmError::invalid_request(e.to_string()))?;
        let hooks = crate::vfio::hooks(&self.dm());
        let dev = self
            .passthrough()?
            .open_device(path, hooks)
            .map_err(|e| match e {
                devices::vfio::PassthroughError::Device(
                    ref d @ devices::vfio::VfioPciError::NotVfioDevice { .. },
                ) => VmmError::invalid_request(d.to_string()),
                devices::vfio::PassthroughError::Device(
                    devices::vfio::VfioPciError::AlreadyBound { .. },
                ) => VmmError::conflict(e),
                e => VmmError::internal(e),
            })?;
        self.plug(
            Arc::new(Mutex::new(dev)),
            |vmm, d, iid| {
                vmm.opened_passthrough()?
                    .register(&vmm.iommu, iid, d)
                    .map_err(internal)
            },
            id,
            DeviceKind::Vfio,
            mode,
            Some(path.to_path_buf()),
        )
    }
}

fn domain_type(kind: iommu::DomainInfoKind) -> DomainType {
    match kind {
        iommu::DomainInfoKind::Default => DomainType::Default,
        iommu::DomainInfoKind::Null => DomainType::Null,
        iommu::DomainInfoKind::S2 => DomainType::S2,
        iommu::DomainInfoKind::S1 => DomainType::S1,
    }
}

impl VmmApi for ApiVmm {
    fn vmm_ping(&mut self) -> VmmResult<PingResponse> {
        Ok(PingResponse::current(env!("CARGO_PKG_VERSION")))
    }

    fn vm_info(&mut self) -> VmmResult<VmInfoResponse> {
        let c = &self.config;
        let config = VmConfigInfo {
            cpus: u32::from(c.cpus),
            memory_bytes: c.memory,
            kernel: match &c.kernel {
                KernelSource::Path(p) => Some(p.clone()),
                KernelSource::Embedded => None,
            },
            initrd: c.initrd.clone(),
            cmdline: c.effective_cmdline(),
            pviommu: self.pviommu,
            serial: c.serial.to_string(),
        };
        let devices = self
            .plugged
            .iter()
            .map(|(id, p)| DeviceInfo {
                id: id.clone(),
                kind: p.kind,
                bdf: bdf(p.slot),
                iommu: p.iommu,
                path: p.path.clone(),
            })
            .collect();
        Ok(VmInfoResponse {
            config,
            state: self.state,
            devices,
        })
    }

    fn vm_add_device(&mut self, request: AddDeviceRequest) -> VmmResult<AddDeviceResponse> {
        if self.state != VmState::Running {
            return Err(VmmError::conflict("The VM is not running"));
        }
        if let Some(id) = &request.id {
            if self.plugged.contains_key(id) {
                return Err(VmmError::conflict(format!("Device id \"{id}\" is in use")));
            }
        }
        let mode = match (request.iommu, self.pviommu) {
            (Some(IommuMode::Pviommu), false) => {
                return Err(VmmError::invalid_request(
                    "\"iommu\": \"pviommu\" needs a VM with the pvIOMMU (--pviommu on)",
                ))
            }
            (Some(m), _) => m,
            (None, true) => IommuMode::Pviommu,
            (None, false) => IommuMode::Direct,
        };
        match request.source {
            DeviceSource::Emulated(kind) => {
                let id = match request.id {
                    Some(id) => id,
                    None => self.fresh_id("dma-test")?,
                };
                self.add_emulated(kind, id, mode)
            }
            DeviceSource::Vfio(path) => {
                if self
                    .plugged
                    .values()
                    .any(|p| p.path.as_ref() == Some(&path))
                {
                    return Err(VmmError::conflict(format!(
                        "Device {} is already passed through",
                        path.display()
                    )));
                }
                let id = match request.id {
                    Some(id) => id,
                    None => self.fresh_id("vfio")?,
                };
                self.add_vfio(&path, id, mode)
            }
        }
    }

    /// Removes at once, without waiting for the guest (the event loop uses
    /// [`ApiVmm::start_removal`] instead).
    fn vm_remove_device(&mut self, request: RemoveDeviceRequest) -> VmmResult<()> {
        if let Some(i) = self.pending.iter().position(|p| p.id == request.id) {
            self.finish(i, true);
            return Ok(());
        }
        self.unplug(&request.id)
    }

    fn iommu_domains(&mut self) -> VmmResult<IommuDomainsResponse> {
        let stats = self.iommu.stats();
        let name = |d: iommu::DeviceId| -> Option<DeviceId> {
            let api_name = self
                .plugged
                .iter()
                .find(|(_, p)| p.iommu_id == Some(d))
                .map(|(id, _)| id.clone());
            api_name.or_else(|| DeviceId::new(d.to_string().replace(':', "-")).ok())
        };
        let domains = stats
            .domains
            .iter()
            .map(|d| DomainInfo {
                id: d.id,
                domain_type: domain_type(d.kind),
                devices: d.devices.iter().filter_map(|&x| name(x)).collect(),
                mapped_pages: d.mapped_pages,
                flushes: FlushCounters {
                    full: d.flushes.full,
                    ranges: d.flushes.ranges,
                    pages: d.flushes.pages,
                },
            })
            .collect();
        let faults = stats
            .faults
            .last
            .iter()
            .filter_map(|f| {
                Some(FaultInfo {
                    device: name(f.device)?,
                    iova: f.iova,
                    access: match f.access {
                        iommu::Access::Read => DmaAccess::Read,
                        iommu::Access::Write => DmaAccess::Write,
                    },
                    reason: f.reason.to_string(),
                })
            })
            .collect();
        Ok(IommuDomainsResponse { domains, faults })
    }

    fn vm_shutdown(&mut self) -> VmmResult<()> {
        if self.state != VmState::Running {
            return Err(VmmError::conflict("The VM is not running"));
        }
        self.exit.report(Ok(ExitReason::ApiShutdown));
        Ok(())
    }

    fn vmm_shutdown(&mut self) -> VmmResult<()> {
        self.quit = true;
        self.exit.report(Ok(ExitReason::ApiShutdown));
        Ok(())
    }
}

/// Finishes removals on the guest's eject and on the timeout.
struct EjectWatcher {
    vmm: Arc<Mutex<ApiVmm>>,
    eject: EventFd,
    timer_fd: i32,
}

impl MutEventSubscriber for EjectWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut vmm = devices::lock::mutex(&self.vmm);
        if events.fd() == self.eject.as_raw_fd() {
            let _ = self.eject.read();
            vmm.complete_ejects();
        } else if events.fd() == self.timer_fd {
            vmm.expire();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.eject.as_raw_fd(), self.timer_fd] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("api: cannot watch the hotplug events: {e:?}");
            }
        }
    }
}

/// Errors of serving the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiRunError {
    /// The channel to the event loop.
    #[error("Cannot set up the API channel")]
    Channel(#[source] api::ChannelError),
    /// The socket.
    #[error("Cannot start the API server")]
    Server(#[source] api::ApiError),
}

/// Builds the VM of `config` and runs it with the API on `socket`.
pub fn run_config(config: VmConfig, socket: &Path) -> Result<ExitReason> {
    run(Vmm::new(config, crate::VmHooks::default())?, socket)
}

/// Runs `vmm` with the API on `socket`.
/// Returns when the guest powers off or resets, or on `vmm.shutdown`; after
/// `vm.shutdown` the VMM keeps serving the API until `vmm.shutdown`.
pub fn run(mut vmm: Vmm, socket: &Path) -> Result<ExitReason> {
    let (sender, receiver) =
        api::channel().map_err(|e| Error::Api(Box::new(ApiRunError::Channel(e))))?;
    let server = api::start_server(socket, sender)
        .map_err(|e| Error::Api(Box::new(ApiRunError::Server(e))))?;
    let shared = Arc::new(Mutex::new(ApiVmm::new(&vmm)?));
    let eject = devices::lock::mutex(&vmm.devices)
        .hotplug_eject
        .try_clone()
        .map_err(|e| Error::Io("an event fd", e))?;
    let timer_fd = devices::lock::mutex(&shared).timer.as_raw_fd();
    let handler_vmm = shared.clone();
    let subscriber = ApiSubscriber::new(receiver, move |request: ApiRequest| {
        let mut v = devices::lock::mutex(&handler_vmm);
        match request {
            ApiRequest::VmRemoveDevice(body, r) => v.start_removal(body, r),
            other => other.handle(&mut *v),
        }
    });
    vmm.event_manager
        .add_subscriber(Arc::new(Mutex::new(subscriber)));
    vmm.event_manager
        .add_subscriber(Arc::new(Mutex::new(EjectWatcher {
            vmm: shared.clone(),
            eject,
            timer_fd,
        })));

    let result = vmm.run_until_exit();
    devices::lock::mutex(&shared).vm_stopped();
    let quit = devices::lock::mutex(&shared).quit;
    if matches!(result, Ok(ExitReason::ApiShutdown)) && !quit {
        eprintln!("pvmm: VM shut down through the API; serving it until vmm.shutdown");
        while !devices::lock::mutex(&shared).quit {
            if let Err(e) = vmm.event_manager.run() {
                drop(server);
                return Err(Error::EventLoop(e));
            }
        }
    }
    drop(server);
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bdfs_of_slots() {
        assert_eq!(bdf(3).to_string(), "0000:00:03.0");
        assert_eq!(bdf(31).to_string(), "0000:00:1f.0");
    }

    #[test]
    fn domain_types_map() {
        assert_eq!(
            domain_type(iommu::DomainInfoKind::Default),
            DomainType::Default
        );
        assert_eq!(domain_type(iommu::DomainInfoKind::S1), DomainType::S1);
    }
}
