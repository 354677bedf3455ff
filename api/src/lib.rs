//! REST API of the VMM on a Unix socket, its types and a client.
//!
//! The VMM wires it in with a channel, a server and an event-loop subscriber:
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//!
//! fn wire(vmm: Arc<Mutex<impl api::VmmApi + Send + 'static>>) -> Result<(), Box<dyn std::error::Error>> {
//!     let (sender, receiver) = api::channel()?;
//!     let _server = api::start_server("/run/pvmm.sock".as_ref(), sender)?;
//!     let mut events = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()?;
//!     events.add_subscriber(Box::new(api::ApiSubscriber::new(receiver, move |request| {
//!         if let Ok(mut vmm) = vmm.lock() {
//!             request.handle(&mut *vmm);
//!         }
//!     })));
//!     loop {
//!         events.run()?;
//!     }
//! }
//! ```
//!
//! Routes, bodies and errors are described by `api/openapi.json` ([`OPENAPI`]).

pub mod actions;
pub mod client;
mod openapi;
mod request;
mod server;
pub mod types;

pub use actions::{ApiAction, HttpMethod, Operation, Route, Success, ROUTES};
pub use openapi::OPENAPI;
pub use request::{
    channel, ApiReceiver, ApiRequest, ApiSender, ApiSubscriber, ChannelError, ErrorKind, Responder,
    VmmApi, VmmError, VmmResult,
};
pub use server::{
    start_server, start_server_with, ApiError, ApiServer, RequestError, ServerOptions,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT, DEFAULT_TIMEOUT, MAX_BODY,
};
pub use types::{
    AddDeviceRequest, AddDeviceResponse, Bdf, DeviceId, DeviceInfo, DeviceKind, DeviceSource,
    DmaAccess, DomainInfo, DomainType, EmulatedKind, ErrorBody, FaultInfo, FlushCounters,
    HypercallStatusCount, IommuDomainsResponse, IommuMode, NoBody, PciBus, PciBusError,
    PingResponse, RemoveDeviceRequest, S1Mode, S1Settings, VmConfigInfo, VmInfoResponse, VmState,
};
