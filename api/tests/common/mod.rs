//! A mock VMM for the API tests: an event-manager loop in its own thread that
//! drains the API channel with `ApiSubscriber`, as the real VMM does, and
//! keeps a small device table.
//!
//! Device ids steer its misbehaviour:
//! - `slow*`: the event loop takes [`SLOW`] to add the device;
//! - `silent*`: the request is dropped without an answer;
//! - `stuck*`: the request is kept and never answered.
//!
//! Adding the device at [`BROKEN_PATH`] fails with an internal error chain.

#![allow(dead_code)] // Each test binary uses a different part of it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use api::{
    AddDeviceRequest, AddDeviceResponse, ApiRequest, ApiServer, ApiSubscriber, Bdf, DeviceId,
    DeviceInfo, DeviceKind, DeviceSource, DomainInfo, DomainType, FlushCounters,
    IommuDomainsResponse, IommuMode, PingResponse, RemoveDeviceRequest, Responder, ServerOptions,
    VmConfigInfo, VmInfoResponse, VmState, VmmApi, VmmError, VmmResult,
};
use event_manager::{EventManager, SubscriberOps};
use thiserror::Error;

pub const SLOW: Duration = Duration::from_millis(400);
pub const BROKEN_PATH: &str = "/sys/bus/pci/devices/0000:00:1f.7";
pub const MOCK_VERSION: &str = "mock-1.0";

#[derive(Debug, Error)]
#[error("Cannot open /dev/vfio/devices/vfio3")]
struct OpenFailed(#[source] std::io::Error);

#[derive(Debug, Error)]
#[error("Cannot add device {0:?}")]
struct AddFailed(String, #[source] OpenFailed);

/// The mock VMM's state.
#[derive(Debug)]
pub struct MockVmm {
    pub state: VmState,
    pub devices: Vec<DeviceInfo>,
    /// Devices added so far, for generated ids and slots.
    added: usize,
    exit: Arc<AtomicBool>,
}

impl MockVmm {
    fn new(exit: Arc<AtomicBool>) -> Self {
        Self {
            state: VmState::Running,
            devices: Vec::new(),
            added: 0,
            exit,
        }
    }

    pub fn device(&self, id: &str) -> Option<&DeviceInfo> {
        self.devices.iter().find(|d| d.id.as_str() == id)
    }
}

impl VmmApi for MockVmm {
    fn vmm_ping(&mut self) -> VmmResult<PingResponse> {
        Ok(PingResponse::current(MOCK_VERSION))
    }

    fn vm_info(&mut self) -> VmmResult<VmInfoResponse> {
        Ok(VmInfoResponse {
            config: VmConfigInfo {
                cpus: 2,
                memory_bytes: 512 << 20,
                kernel: None,
                initrd: None,
                cmdline: "console=ttyS0".into(),
                pviommu: true,
                serial: "stdout".into(),
                pci_bus: api::PciBus::Root,
            },
            state: self.state,
            devices: self.devices.clone(),
        })
    }

    fn vm_add_device(&mut self, request: AddDeviceRequest) -> VmmResult<AddDeviceResponse> {
        if self.state != VmState::Running {
            return Err(VmmError::conflict("The VM is shut down"));
        }
        if request
            .id
            .as_ref()
            .is_some_and(|id| id.as_str().starts_with("slow"))
        {
            std::thread::sleep(SLOW);
        }
        let (kind, path) = match request.source {
            DeviceSource::Emulated(kind) => (DeviceKind::from(kind), None),
            DeviceSource::Vfio(path) => (DeviceKind::Vfio, Some(path)),
        };
        if path.as_deref() == Some(Path::new(BROKEN_PATH)) {
            let denied = std::io::Error::from_raw_os_error(libc::EACCES);
            return Err(VmmError::internal(AddFailed(
                BROKEN_PATH.into(),
                OpenFailed(denied),
            )));
        }
        if let Some(path) = &path {
            if self.devices.iter().any(|d| d.path.as_ref() == Some(path)) {
                return Err(VmmError::conflict(format!(
                    "Host device {} is already passed through",
                    path.display()
                )));
            }
        }
        let id = match request.id {
            Some(id) => id,
            None => {
                let prefix = if path.is_some() { "vfio" } else { "dma-test" };
                DeviceId::new(format!("{prefix}{}", self.added)).map_err(VmmError::internal)?
            }
        };
        if self.device(id.as_str()).is_some() {
            return Err(VmmError::conflict(format!(
                "Device id {:?} is already in use",
                id.as_str()
            )));
        }
        let slot = self.added;
        let bdf = Bdf::new(
            0,
            u8::try_from(slot / 31).map_err(VmmError::internal)?,
            u8::try_from(1 + slot % 31).map_err(VmmError::internal)?,
            0,
        )
        .map_err(VmmError::internal)?;
        self.added += 1;
        self.devices.push(DeviceInfo {
            id: id.clone(),
            kind,
            bdf,
            iommu: request.iommu.unwrap_or(IommuMode::Pviommu),
            path,
        });
        Ok(AddDeviceResponse { id, bdf })
    }

    fn vm_remove_device(&mut self, request: RemoveDeviceRequest, responder: Responder<()>) {
        let before = self.devices.len();
        self.devices.retain(|d| d.id != request.id);
        responder.respond(if self.devices.len() == before {
            Err(VmmError::not_found(format!(
                "No device with id {:?}",
                request.id.as_str()
            )))
        } else {
            Ok(())
        });
    }

    fn iommu_domains(&mut self) -> VmmResult<IommuDomainsResponse> {
        let ids = |mode| {
            self.devices
                .iter()
                .filter(move |d| d.iommu == mode)
                .map(|d| d.id.clone())
        };
        let mut domains = vec![
            DomainInfo {
                id: 0,
                domain_type: DomainType::Default,
                devices: ids(IommuMode::Direct).collect(),
                mapped_pages: 0,
                flushes: FlushCounters::default(),
                s1: None,
            },
            DomainInfo {
                id: u32::MAX,
                domain_type: DomainType::Null,
                devices: Vec::new(),
                mapped_pages: 0,
                flushes: FlushCounters::default(),
                s1: None,
            },
        ];
        // Each pvIOMMU device sits in an S2 domain of its own with 8 pages mapped.
        for (n, id) in ids(IommuMode::Pviommu).enumerate() {
            domains.push(DomainInfo {
                id: u32::try_from(n + 1).map_err(VmmError::internal)?,
                domain_type: DomainType::S2,
                devices: vec![id],
                mapped_pages: 8,
                flushes: FlushCounters {
                    full: 1,
                    ranges: 2,
                    pages: 8,
                },
                s1: None,
            });
        }
        Ok(IommuDomainsResponse {
            domains,
            faults: Vec::new(),
            hypercalls: Vec::new(),
        })
    }

    fn vm_shutdown(&mut self) -> VmmResult<()> {
        if self.state == VmState::Shutdown {
            return Err(VmmError::conflict("The VM is already shut down"));
        }
        self.state = VmState::Shutdown;
        Ok(())
    }

    fn vmm_shutdown(&mut self) -> VmmResult<()> {
        self.exit.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("pvmm-api-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test directory");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn id_starts_with(request: &AddDeviceRequest, prefix: &str) -> bool {
    request
        .id
        .as_ref()
        .is_some_and(|id| id.as_str().starts_with(prefix))
}

/// The API server and the mock VMM behind it.
pub struct Harness {
    pub socket: PathBuf,
    pub server: Option<ApiServer>,
    vmm: Arc<Mutex<MockVmm>>,
    received: Arc<AtomicUsize>,
    exit: Arc<AtomicBool>,
    event_loop: Option<JoinHandle<()>>,
    _dir: TestDir,
}

impl Harness {
    pub fn start() -> Self {
        Self::start_with(ServerOptions::default())
    }

    pub fn start_with(options: ServerOptions) -> Self {
        let dir = TestDir::new();
        let socket = dir.path().join("api.sock");
        let (sender, receiver) = api::channel().expect("API channel");
        let server = api::start_server_with(&socket, sender, options).expect("API server starts");
        let exit = Arc::new(AtomicBool::new(false));
        let vmm = Arc::new(Mutex::new(MockVmm::new(Arc::clone(&exit))));

        let received = Arc::new(AtomicUsize::new(0));
        let loop_received = Arc::clone(&received);
        let loop_vmm = Arc::clone(&vmm);
        let loop_exit = Arc::clone(&exit);
        let event_loop = std::thread::spawn(move || {
            let mut stuck: Vec<Responder<AddDeviceResponse>> = Vec::new();
            let handler_vmm = Arc::clone(&loop_vmm);
            let subscriber = ApiSubscriber::new(receiver, move |request| {
                loop_received.fetch_add(1, Ordering::SeqCst);
                let mut vmm = handler_vmm.lock().expect("mock VMM lock");
                match request {
                    ApiRequest::VmAddDevice(body, responder) if id_starts_with(&body, "silent") => {
                        drop(responder)
                    }
                    ApiRequest::VmAddDevice(body, responder) if id_starts_with(&body, "stuck") => {
                        stuck.push(responder)
                    }
                    request => request.handle(&mut *vmm),
                }
            });
            let mut events = EventManager::<ApiSubscriber<_>>::new().expect("event manager");
            events.add_subscriber(subscriber);
            while !loop_exit.load(Ordering::SeqCst) {
                events.run_with_timeout(50).expect("event loop");
            }
        });

        Self {
            socket,
            server: Some(server),
            vmm,
            received,
            exit,
            event_loop: Some(event_loop),
            _dir: dir,
        }
    }

    pub fn client(&self) -> api::client::Client {
        api::client::Client::new(&self.socket)
    }

    pub fn vmm(&self) -> MutexGuard<'_, MockVmm> {
        self.vmm.lock().expect("mock VMM lock")
    }

    /// Requests the VMM received, answered or not.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    /// Waits until the mock VMM's event loop has ended (after vmm.shutdown).
    pub fn wait_for_vmm_exit(&mut self) {
        if let Some(event_loop) = self.event_loop.take() {
            event_loop.join().expect("mock event loop ends cleanly");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.exit.store(true, Ordering::SeqCst);
        if let Some(event_loop) = self.event_loop.take() {
            let _ = event_loop.join();
        }
        drop(self.server.take());
    }
}

/// Sends `request` as raw bytes and returns everything the server answers.
pub fn raw_exchange(socket: &Path, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream.write_all(request).expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}
