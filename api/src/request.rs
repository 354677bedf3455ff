//! The VMM's side of the API: requests arrive over a channel, with an EventFd
//! to wake the VMM's event loop, and are answered through a [`Responder`].
//!
//! ```text
//!   API thread                               VMM event loop
//!   ApiSender::send(ApiRequest) ──mpsc──▶ ApiReceiver::drain()
//!              └── EventFd::write(1) ──epoll──┘      │
//!   HTTP answer ◀──────── oneshot ◀──── Responder::respond(result)
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use thiserror::Error;
use tokio::sync::oneshot;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::types::{
    AddDeviceRequest, AddDeviceResponse, IommuDomainsResponse, PingResponse, RemoveDeviceRequest,
    VmInfoResponse,
};

/// What went wrong in the VMM, as far as the client is concerned: decides the
/// HTTP status (see [`crate::RequestError::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request cannot be carried out as asked (400).
    InvalidRequest,
    /// The request names a device that does not exist (404).
    NotFound,
    /// The request clashes with the VM's state: duplicate id or path, VM not running (409).
    Conflict,
    /// The VMM failed (500).
    Internal,
}

/// An error the VMM answers a request with: a kind and the VMM's own error,
/// whose source chain becomes the `causes` of the HTTP answer.
#[derive(Debug)]
pub struct VmmError {
    kind: ErrorKind,
    error: Box<dyn StdError + Send + Sync + 'static>,
}

impl VmmError {
    /// `error` (any error type, or a message) answered with `kind`.
    pub fn new(
        kind: ErrorKind,
        error: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            kind,
            error: error.into(),
        }
    }

    pub fn invalid_request(error: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        Self::new(ErrorKind::InvalidRequest, error)
    }

    pub fn not_found(error: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        Self::new(ErrorKind::NotFound, error)
    }

    pub fn conflict(error: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        Self::new(ErrorKind::Conflict, error)
    }

    pub fn internal(error: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        Self::new(ErrorKind::Internal, error)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for VmmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl StdError for VmmError {
    // The wrapped error is shown as this one, so the chain continues with its source.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.error.source()
    }
}

/// The VMM's answer to one request.
pub type VmmResult<T> = Result<T, VmmError>;

/// Where the answer to one request goes. Answering a client that has gone
/// away (disconnected, timed out) is harmless: the answer is dropped.
#[derive(Debug)]
#[must_use = "the client waits until the request is answered"]
pub struct Responder<T>(oneshot::Sender<VmmResult<T>>);

impl<T> Responder<T> {
    /// A responder and the receiving end that the HTTP side awaits.
    pub(crate) fn new() -> (Self, oneshot::Receiver<VmmResult<T>>) {
        let (sender, receiver) = oneshot::channel();
        (Self(sender), receiver)
    }

    pub fn respond(self, result: VmmResult<T>) {
        if self.0.send(result).is_err() {
            log::debug!("API client went away before its answer");
        }
    }
}

/// One API operation for the VMM to carry out, with its typed body and the
/// responder for its typed answer.
#[derive(Debug)]
pub enum ApiRequest {
    VmmPing(Responder<PingResponse>),
    VmInfo(Responder<VmInfoResponse>),
    VmAddDevice(AddDeviceRequest, Responder<AddDeviceResponse>),
    VmRemoveDevice(RemoveDeviceRequest, Responder<()>),
    IommuDomains(Responder<IommuDomainsResponse>),
    VmShutdown(Responder<()>),
    VmmShutdown(Responder<()>),
}

/// The operations a VMM implements to serve the API, one method per request.
///
/// [`ApiRequest::handle`] calls them and sends their answers; removal gets
/// its [`Responder`] instead, because it answers once the guest has ejected
/// the device, which may be after other requests were served.
pub trait VmmApi {
    fn vmm_ping(&mut self) -> VmmResult<PingResponse>;
    fn vm_info(&mut self) -> VmmResult<VmInfoResponse>;
    fn vm_add_device(&mut self, request: AddDeviceRequest) -> VmmResult<AddDeviceResponse>;
    /// Starts removing a device; answers through `responder`, now or later.
    fn vm_remove_device(&mut self, request: RemoveDeviceRequest, responder: Responder<()>);
    fn iommu_domains(&mut self) -> VmmResult<IommuDomainsResponse>;
    fn vm_shutdown(&mut self) -> VmmResult<()>;
    /// Answer, then leave the event loop (the answer is sent before the
    /// server stops, see [`crate::ApiServer::shutdown`]).
    fn vmm_shutdown(&mut self) -> VmmResult<()>;
}

impl ApiRequest {
    /// Carries out the request on `vmm` and answers it.
    pub fn handle<V: VmmApi + ?Sized>(self, vmm: &mut V) {
        match self {
            Self::VmmPing(r) => r.respond(vmm.vmm_ping()),
            Self::VmInfo(r) => r.respond(vmm.vm_info()),
            Self::VmAddDevice(body, r) => r.respond(vmm.vm_add_device(body)),
            Self::VmRemoveDevice(body, r) => vmm.vm_remove_device(body, r),
            Self::IommuDomains(r) => r.respond(vmm.iommu_domains()),
            Self::VmShutdown(r) => r.respond(vmm.vm_shutdown()),
            Self::VmmShutdown(r) => r.respond(vmm.vmm_shutdown()),
        }
    }
}

/// Errors of the channel between the API server and the VMM.
#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("Cannot create the API wake-up EventFd")]
    EventFd(#[source] std::io::Error),
    #[error("The VMM no longer takes API requests")]
    Closed,
    #[error("Cannot wake up the VMM's event loop")]
    Wake(#[source] std::io::Error),
}

/// The API server's end of the channel: queues a request and wakes the VMM.
#[derive(Debug)]
pub struct ApiSender {
    sender: mpsc::Sender<ApiRequest>,
    wake: EventFd,
}

impl ApiSender {
    pub fn send(&self, request: ApiRequest) -> Result<(), ChannelError> {
        self.sender
            .send(request)
            .map_err(|_| ChannelError::Closed)?;
        self.wake.write(1).map_err(ChannelError::Wake)
    }
}

/// The VMM's end of the channel. Register [`ApiReceiver::event_fd`] for
/// `EventSet::IN` in the event loop and call [`ApiReceiver::drain`] when it
/// fires, or hand the receiver to an [`ApiSubscriber`].
#[derive(Debug)]
pub struct ApiReceiver {
    receiver: mpsc::Receiver<ApiRequest>,
    wake: EventFd,
}

impl ApiReceiver {
    /// The EventFd that becomes readable when requests are queued.
    pub fn event_fd(&self) -> &EventFd {
        &self.wake
    }

    /// The queued requests. The wake-up is consumed first, so a request
    /// queued while these are handled wakes the loop again.
    pub fn drain(&self) -> mpsc::TryIter<'_, ApiRequest> {
        // EAGAIN only says the counter was already zero.
        let _ = self.wake.read();
        self.receiver.try_iter()
    }
}

impl AsRawFd for ApiReceiver {
    fn as_raw_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

/// The channel from the API server ([`crate::start_server`]) to the VMM.
pub fn channel() -> Result<(ApiSender, ApiReceiver), ChannelError> {
    let wake = EventFd::new(EFD_NONBLOCK).map_err(ChannelError::EventFd)?;
    let wake_sender = wake.try_clone().map_err(ChannelError::EventFd)?;
    let (sender, receiver) = mpsc::channel();
    Ok((
        ApiSender {
            sender,
            wake: wake_sender,
        },
        ApiReceiver { receiver, wake },
    ))
}

/// An event-manager subscriber that drains the API channel into `handler`.
///
/// ```no_run
/// # use api::{ApiRequest, ApiSubscriber};
/// # use event_manager::SubscriberOps;
/// # fn demo(receiver: api::ApiReceiver, vmm: std::sync::Arc<std::sync::Mutex<impl api::VmmApi + Send + 'static>>) {
/// let mut event_manager = event_manager::EventManager::<Box<dyn event_manager::MutEventSubscriber + Send>>::new().unwrap();
/// event_manager.add_subscriber(Box::new(ApiSubscriber::new(receiver, move |request: ApiRequest| {
///     if let Ok(mut vmm) = vmm.lock() {
///         request.handle(&mut *vmm);
///     }
/// })));
/// # }
/// ```
pub struct ApiSubscriber<F> {
    receiver: ApiReceiver,
    handler: F,
}

impl<F: FnMut(ApiRequest)> ApiSubscriber<F> {
    pub fn new(receiver: ApiReceiver, handler: F) -> Self {
        Self { receiver, handler }
    }
}

impl<F: FnMut(ApiRequest)> MutEventSubscriber for ApiSubscriber<F> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.receiver, EventSet::IN)) {
            log::error!("Cannot register the API EventFd with the event loop: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            for request in self.receiver.drain() {
                (self.handler)(request);
            }
        } else {
            // An eventfd never hangs up; drop it rather than spin on an error.
            log::error!(
                "API EventFd reported {:?}; no longer watched",
                events.event_set()
            );
            let _ = ops.remove(events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn requests_wake_and_drain() {
        let (sender, receiver) = channel().expect("channel");
        assert_eq!(receiver.drain().count(), 0);
        let (responder, mut answer) = Responder::new();
        sender.send(ApiRequest::VmmPing(responder)).expect("send");
        let (responder, _) = Responder::new();
        sender
            .send(ApiRequest::VmShutdown(responder))
            .expect("send");
        assert_eq!(receiver.event_fd().read().expect("woken"), 2);

        let requests: Vec<_> = receiver.drain().collect();
        assert_eq!(requests.len(), 2);
        for request in requests {
            if let ApiRequest::VmmPing(r) = request {
                r.respond(Ok(PingResponse::current("1.0")));
            }
        }
        let pong = answer.try_recv().expect("answered").expect("ping succeeds");
        assert_eq!(pong.pid, std::process::id());
    }

    #[test]
    fn answering_a_gone_client_is_harmless() {
        let (responder, answer) = Responder::<()>::new();
        drop(answer);
        responder.respond(Err(VmmError::internal("nobody listens")));
    }

    #[test]
    fn sending_to_a_gone_vmm_fails() {
        let (sender, receiver) = channel().expect("channel");
        drop(receiver);
        let (responder, _) = Responder::new();
        assert!(matches!(
            sender.send(ApiRequest::VmInfo(responder)),
            Err(ChannelError::Closed)
        ));
    }

    #[test]
    fn vmm_error_keeps_kind_and_chain() {
        #[derive(Debug, Error)]
        #[error("Cannot open the device")]
        struct Open(#[source] std::io::Error);
        let error = VmmError::conflict(Open(std::io::Error::other("busy")));
        assert_eq!(error.kind(), ErrorKind::Conflict);
        let body = crate::types::ErrorBody::from_chain(&error);
        assert_eq!(body.error, "Cannot open the device");
        assert_eq!(body.causes, ["busy"]);
        let error = VmmError::not_found("No device \"x\"");
        assert_eq!(error.to_string(), "No device \"x\"");
        assert!(error.source().is_none());
    }

    #[test]
    fn subscriber_hands_requests_to_the_handler() {
        let (sender, receiver) = channel().expect("channel");
        let seen = Rc::new(RefCell::new(0));
        let seen_in_handler = Rc::clone(&seen);
        let subscriber = ApiSubscriber::new(receiver, move |request: ApiRequest| {
            *seen_in_handler.borrow_mut() += 1;
            if let ApiRequest::VmShutdown(r) = request {
                r.respond(Ok(()));
            }
        });
        let mut manager = EventManager::<ApiSubscriber<_>>::new().expect("event manager");
        manager.add_subscriber(subscriber);
        assert_eq!(manager.run_with_timeout(0).expect("run"), 0);

        let (responder, mut answer) = Responder::new();
        sender
            .send(ApiRequest::VmShutdown(responder))
            .expect("send");
        assert_eq!(manager.run_with_timeout(1000).expect("run"), 1);
        assert_eq!(*seen.borrow(), 1);
        assert!(answer.try_recv().expect("answered").is_ok());
        // The wake-up was consumed: nothing is pending.
        assert_eq!(manager.run_with_timeout(0).expect("run"), 0);
    }
}
