//! The VMM's side of the REST API (`pvmm --api-socket PATH`): [`RestVmm`]
//! implements [`api::VmmApi`] as a thin adapter over the device manager
//! (which owns every device's life: `device_manager::lifecycle`) and the
//! pvIOMMU, and [`run`] serves it from the VMM's event loop.
//!
//! Hot-add: the device manager adds the device, then announces it (PCIU and
//! the GED interrupt: `devices::acpi_hotplug`, AML in [`crate::hotplug`]).
//! The answer is sent at once: the guest finds the device when it handles
//! the event.
//!
//! Hot-remove does not block the event loop: `vm.remove-device` starts a
//! [`Removals`] entry (PCID, the GED) that keeps the request's
//! [`Responder`]. The guest's `_EJ0` writes B0EJ, which signals the eject
//! EventFd; [`EjectWatcher`] then has the device manager remove the device
//! and answers 204. If the guest has not ejected after [`EJECT_TIMEOUT`], a
//! TimerFd fires and the device is removed anyway (the forced path), still
//! answering 204; the log says so. Meanwhile other requests are served, and
//! a second removal of the same id is a 409.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{
    AddDeviceRequest, AddDeviceResponse, ApiRequest, ApiSubscriber, Bdf, DeviceId, DeviceInfo,
    DmaAccess, DomainInfo, DomainType, FaultInfo, FlushCounters, HypercallStatusCount,
    IommuDomainsResponse, PingResponse, RemoveDeviceRequest, Responder, S1Mode, S1Settings,
    VmConfigInfo, VmInfoResponse, VmState, VmmApi, VmmError, VmmResult,
};
use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use iommu::Iommu;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{KernelSource, VmConfig};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::error::{Error, Result};
use crate::removal::{EjectRegs, Ended, Removals};
use crate::vcpu::ExitSlot;
use crate::{ExitReason, Vmm};

/// How long a removal waits for the guest's eject before forcing it.
pub const EJECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The API's view of one VM.
pub struct RestVmm {
    config: VmConfig,
    devices: Arc<Mutex<DeviceManager>>,
    iommu: Arc<Iommu>,
    exit: Arc<ExitSlot>,
    state: VmState,
    removals: Removals<Responder<()>>,
    timer: TimerFd,
    /// `vmm.shutdown` was asked for.
    quit: bool,
}

impl std::fmt::Debug for RestVmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestVmm")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// A device's address as the guest sees it (`Plugged::guest_address`).
fn bdf((segment, addr): (u16, devices::pci::PciAddress)) -> VmmResult<Bdf> {
    Bdf::new(segment, addr.bus, addr.device, addr.function).map_err(VmmError::internal)
}

/// A device manager error as the API answers it.
fn api_error(e: DeviceError) -> VmmError {
    VmmError::new(e.kind(), e)
}

impl EjectRegs for DeviceManager {
    fn request_eject(&mut self, slot: u8) {
        DeviceManager::request_eject(self, slot);
    }
}

impl RestVmm {
    /// The API's view of `vmm` (before it runs).
    pub fn new(vmm: &Vmm) -> Result<Self> {
        Ok(Self {
            config: vmm.config.clone(),
            devices: vmm.devices.clone(),
            iommu: vmm.iommu().clone(),
            exit: vmm.exit.clone(),
            state: VmState::Running,
            removals: Removals::new(EJECT_TIMEOUT),
            timer: TimerFd::new().map_err(|e| Error::Io("the eject timer", e.into()))?,
            quit: false,
        })
    }

    fn dm(&self) -> std::sync::MutexGuard<'_, DeviceManager> {
        devices::lock::mutex(&self.devices)
    }

    fn arm_timer(&mut self) {
        let Some(next) = self.removals.next_deadline() else {
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

    /// Removes the devices of ended removals and answers their requests.
    fn finish(&mut self, ended: Vec<Ended<Responder<()>>>) {
        for e in ended {
            if e.forced {
                log::warn!(
                    "api: the guest did not eject {} within {:?}; removing it anyway",
                    e.id,
                    self.removals.timeout()
                );
            }
            let result = self.dm().remove_device(&e.id).map_err(api_error);
            e.token.respond(result);
        }
        self.arm_timer();
    }

    /// Finishes the removals whose slots the guest ejected.
    pub fn complete_ejects(&mut self) {
        let ejected = self.dm().take_ejected();
        let ended = self.removals.ejected(ejected);
        self.finish(ended);
    }

    /// Forces the removals whose deadline has passed.
    pub fn expire(&mut self) {
        let _ = self.timer.wait();
        let ended = self.removals.expired(Instant::now());
        self.finish(ended);
    }

    /// The VM stopped: removals in flight complete at once.
    fn vm_stopped(&mut self) {
        self.state = VmState::Shutdown;
        let ended = self.removals.drain();
        self.finish(ended);
    }
}

/// The API's view of an S1 domain's settings.
fn s1_settings(c: iommu::S1Config) -> S1Settings {
    S1Settings {
        mode: match c.mode() {
            iommu::S1Mode::Blocked => S1Mode::Blocked,
            iommu::S1Mode::Identity => S1Mode::Identity,
            iommu::S1Mode::Translate => S1Mode::Translate,
        },
        root: c.root,
        levels: match c.levels {
            iommu::PagingLevels::Four => 4,
            iommu::PagingLevels::Five => 5,
        },
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

impl VmmApi for RestVmm {
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
            pviommu: c.pviommu,
            serial: c.serial.to_string(),
            pci_bus: c.pci_bus,
        };
        let devices = self
            .dm()
            .plugged()
            .map(|p| {
                Ok(DeviceInfo {
                    id: p.id.clone(),
                    kind: p.kind,
                    bdf: bdf(p.guest_address())?,
                    iommu: p.mode,
                    path: p.path.clone(),
                })
            })
            .collect::<VmmResult<_>>()?;
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
        let mut dm = self.dm();
        let p = dm.add_device(&request).map_err(api_error)?;
        dm.announce(&p);
        Ok(AddDeviceResponse {
            bdf: bdf(p.guest_address())?,
            id: p.id,
        })
    }

    fn vm_remove_device(&mut self, request: RemoveDeviceRequest, responder: Responder<()>) {
        let id = request.id;
        let Some(slot) = self.dm().device(&id).map(|p| p.addr.device) else {
            responder.respond(Err(VmmError::not_found(format!("No device \"{id}\""))));
            return;
        };
        if self.state != VmState::Running {
            // Nobody to ask: remove at once.
            responder.respond(self.dm().remove_device(&id).map_err(api_error));
            return;
        }
        let devices = self.devices.clone();
        let started = self.removals.start(
            &mut *devices::lock::mutex(&devices),
            id,
            slot,
            responder,
            Instant::now(),
        );
        match started {
            Ok(()) => self.arm_timer(),
            Err((e, responder)) => responder.respond(Err(VmmError::conflict(e))),
        }
    }

    fn iommu_domains(&mut self) -> VmmResult<IommuDomainsResponse> {
        let stats = self.iommu.stats();
        let dm = self.dm();
        let name = |d: iommu::DeviceId| -> Option<DeviceId> {
            dm.name_of(d)
                .cloned()
                .or_else(|| DeviceId::new(d.to_string().replace(':', "-")).ok())
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
                s1: d.s1.map(s1_settings),
            })
            .collect();
        let hypercalls = stats
            .hypercalls
            .by_status
            .iter()
            .map(|c| HypercallStatusCount {
                call: c
                    .code
                    .and_then(|code| code.name())
                    .unwrap_or("unknown")
                    .to_string(),
                status: c.status.to_string(),
                count: c.count,
            })
            .collect();
        let faults = stats
            .faults
            .recent
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
        Ok(IommuDomainsResponse {
            domains,
            faults,
            hypercalls,
        })
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
    vmm: Arc<Mutex<RestVmm>>,
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
    let shared = Arc::new(Mutex::new(RestVmm::new(&vmm)?));
    let eject = devices::lock::mutex(&vmm.devices)
        .hotplug_eject()
        .try_clone()
        .map_err(|e| Error::Io("an event fd", e))?;
    let timer_fd = devices::lock::mutex(&shared).timer.as_raw_fd();
    let handler_vmm = shared.clone();
    let subscriber = ApiSubscriber::new(receiver, move |request: ApiRequest| {
        request.handle(&mut *devices::lock::mutex(&handler_vmm));
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
    use api::ErrorKind;

    #[test]
    fn bdfs_of_addresses() {
        let a = devices::pci::PciAddress {
            bus: 0,
            device: 31,
            function: 0,
        };
        assert_eq!(bdf((0, a)).unwrap().to_string(), "0000:00:1f.0");
        assert_eq!(
            bdf((0x5601, devices::pci::PciAddress::slot(0)))
                .unwrap()
                .to_string(),
            "5601:00:00.0"
        );
    }

    #[test]
    fn device_errors_map_to_their_status() {
        let id = DeviceId::new("x").unwrap();
        let cases = [
            (DeviceError::IdInUse(id.clone()), ErrorKind::Conflict),
            (DeviceError::NotFound(id), ErrorKind::NotFound),
            (DeviceError::NoPviommu, ErrorKind::InvalidRequest),
            (
                DeviceError::NotPciFunction("/tmp".into()),
                ErrorKind::InvalidRequest,
            ),
        ];
        for (e, kind) in cases {
            let text = e.to_string();
            let v = api_error(e);
            assert_eq!(v.kind(), kind, "{text}");
            assert_eq!(v.to_string(), text);
        }
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
