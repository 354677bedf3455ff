//! The HTTP server: an axum router served by hyper's HTTP/1 connection
//! builder on a Unix socket, in a thread of its own with a current-thread
//! tokio runtime. Each request is parsed, handed to the VMM through the
//! [`ApiSender`] and answered with what the VMM responds.
//!
//! No client can hold the server's resources for long: a request's head must
//! arrive within [`ServerOptions::read_timeout`] (else hyper closes the
//! connection without an answer), its body within as long again (else 408),
//! and at most [`ServerOptions::max_connections`] connections are served at
//! once: one more is closed as soon as it is accepted. The socket path is
//! guarded by a lock file (see [`lock`]).

mod lock;

use std::error::Error as StdError;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use socket2::{Domain, SockAddr, Socket, Type};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinSet;

use self::lock::SocketLock;

use crate::actions::{self, ApiAction, HttpMethod, Operation, Route, Success, ROUTES};
use crate::request::{ApiSender, ChannelError, ErrorKind, Responder, VmmError};
use crate::types::ErrorBody;

/// How long a request waits for the VMM's answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client has to send a request's head, and then its body, by
/// default.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections are served at once by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// How long the server waits before accepting again after accept() failed
/// for want of resources (such as file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long open connections may finish their exchange once the server stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Mode of the API socket: only its owner may connect.
const SOCKET_MODE: libc::mode_t = 0o600;

/// Settings of the API server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How long a request waits for the VMM before it fails with 503.
    pub timeout: Duration,
    /// How long a client has to send a request's head, counted from the
    /// moment the connection awaits one (when it is accepted, or when the
    /// previous answer of a kept-alive connection is sent): a connection
    /// that misses it is closed without an answer. The body must then
    /// arrive within as long again, or the answer is 408 and the connection
    /// is closed.
    pub read_timeout: Duration,
    /// How many connections are served at once; a connection beyond them is
    /// closed as soon as it is accepted, without an answer. At least 1.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Errors of starting the API server.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error(
        "API socket {socket} is in use by another pvmm, which holds its lock file {lock}; \
         stop that pvmm or choose another path"
    )]
    Locked { socket: PathBuf, lock: PathBuf },
    #[error(
        "Cannot open the API socket's lock file {path}; check that its directory exists and \
         that you may write there"
    )]
    OpenLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket lock file {0} is not a regular file; remove it or choose another path")]
    LockNotAFile(PathBuf),
    #[error("Cannot lock the API socket's lock file {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket {0} is in use by a running process; stop it or choose another path")]
    SocketInUse(PathBuf),
    #[error("API socket path {0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("Cannot check the API socket path {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot remove the stale API socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot create the API socket")]
    Socket(#[source] io::Error),
    #[error("Cannot bind the API socket to {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot listen on the API socket")]
    Listen(#[source] io::Error),
    #[error("Cannot start the API server's runtime")]
    Runtime(#[source] io::Error),
    #[error("Cannot start the API server's thread")]
    Thread(#[source] io::Error),
}

/// Why a request failed; its [`status`](RequestError::status) and message
/// chain make the HTTP answer.
#[derive(Debug, Error)]
pub enum RequestError {
    #[error("Unknown endpoint {0}")]
    UnknownEndpoint(String),
    #[error("Method {method} is not allowed on {}; use {}", .route.path, .route.method.as_str())]
    MethodNotAllowed {
        method: String,
        route: &'static Route,
    },
    #[error("Request body is larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("Cannot read the request body")]
    BodyRead(#[source] Box<dyn StdError + Send + Sync>),
    #[error("The request body did not arrive within {0:?} of its head; send it at once")]
    BodyTimeout(Duration),
    #[error("Request body is missing")]
    MissingBody,
    #[error("Invalid request body")]
    BadBody(#[source] serde_json::Error),
    #[error(transparent)]
    Channel(ChannelError),
    #[error("The VMM did not answer within {0:?}")]
    Timeout(Duration),
    #[error("The VMM dropped the request without answering")]
    Unanswered,
    #[error("Cannot encode the VMM's answer")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Vmm(VmmError),
}

impl RequestError {
    /// The HTTP status of the answer: the one place errors become statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownEndpoint(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BodyRead(_) | Self::MissingBody | Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::Channel(ChannelError::Closed) | Self::Timeout(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Channel(_) | Self::Unanswered | Self::Encode(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::Vmm(error) => match error.kind() {
                ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                ErrorKind::Conflict => StatusCode::CONFLICT,
                ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody::from_chain(&self);
        if status.is_server_error() {
            log::warn!("API request failed: {body}");
        } else {
            log::debug!("API request refused: {body}");
        }
        // An ErrorBody is strings only: encoding it cannot fail.
        let mut response = json_response(status, serde_json::to_vec(&body).unwrap_or_default());
        if let Self::MethodNotAllowed { route, .. } = self {
            response.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static(route.method.as_str()),
            );
        }
        response
    }
}

fn json_response(status: StatusCode, json: Vec<u8>) -> Response {
    let content_type = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )];
    (status, content_type, json).into_response()
}

/// What every request handler shares.
struct Shared {
    sender: ApiSender,
    timeout: Duration,
    read_timeout: Duration,
}

/// The router of every route in [`ROUTES`]: the one place routes get handlers.
fn router(shared: Arc<Shared>) -> Router {
    let mut router = Router::new();
    for route in &ROUTES {
        let endpoint = match route.operation {
            Operation::VmmPing => endpoint::<actions::VmmPing>(),
            Operation::VmInfo => endpoint::<actions::VmInfo>(),
            Operation::VmAddDevice => endpoint::<actions::VmAddDevice>(),
            Operation::VmRemoveDevice => endpoint::<actions::VmRemoveDevice>(),
            Operation::IommuDomains => endpoint::<actions::IommuDomains>(),
            Operation::VmShutdown => endpoint::<actions::VmShutdown>(),
            Operation::VmmShutdown => endpoint::<actions::VmmShutdown>(),
        };
        router = router.route(route.path, endpoint);
    }
    router
        .fallback(|uri: Uri| async move {
            let path: String = uri.path().chars().take(200).collect();
            RequestError::UnknownEndpoint(path)
        })
        .with_state(shared)
}

/// The handler of `A`'s route, with a JSON 405 for the other methods.
fn endpoint<A: ApiAction>() -> MethodRouter<Arc<Shared>> {
    let route = A::route();
    let filter = match route.method {
        HttpMethod::Get => MethodFilter::GET,
        HttpMethod::Put => MethodFilter::PUT,
    };
    on(filter, handle::<A>).fallback(move |method: Method| async move {
        RequestError::MethodNotAllowed {
            method: method.to_string(),
            route,
        }
    })
}

async fn handle<A: ApiAction>(State(shared): State<Arc<Shared>>, body: Body) -> Response {
    let reply = match call::<A>(&shared, body).await {
        Ok(reply) => reply,
        Err(error) => return error.into_response(),
    };
    match A::route().success {
        Success::NoContent => StatusCode::NO_CONTENT.into_response(),
        Success::Json => match serde_json::to_vec(&reply) {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(e) => RequestError::Encode(e).into_response(),
        },
    }
}

/// Parses the request, hands it to the VMM and waits for the answer. If the
/// client goes away meanwhile, this future is dropped with the receiving end
/// of the answer, and the VMM's answer is dropped on arrival.
async fn call<A: ApiAction>(shared: &Shared, body: Body) -> Result<A::Reply, RequestError> {
    let bytes = read_body(body, shared.read_timeout).await?;
    let body = parse_body::<A::Body>(A::route(), &bytes)?;
    let (responder, answer) = Responder::new();
    shared
        .sender
        .send(A::request(body, responder))
        .map_err(RequestError::Channel)?;
    match tokio::time::timeout(shared.timeout, answer).await {
        Err(_) => Err(RequestError::Timeout(shared.timeout)),
        Ok(Err(_)) => Err(RequestError::Unanswered),
        Ok(Ok(result)) => result.map_err(RequestError::Vmm),
    }
}

/// Reads the whole body, which must arrive within `deadline`: a client that
/// stops halfway is answered 408, and hyper closes the connection since the
/// body was not read to its end.
async fn read_body(body: Body, deadline: Duration) -> Result<Bytes, RequestError> {
    let collect = Limited::new(body, MAX_BODY).collect();
    match tokio::time::timeout(deadline, collect).await {
        Err(_) => Err(RequestError::BodyTimeout(deadline)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(RequestError::BodyTooLarge),
        Ok(Err(e)) => Err(RequestError::BodyRead(e)),
    }
}

/// A route without a body takes none or `{}`; a route with one requires it.
fn parse_body<T: serde::de::DeserializeOwned>(
    route: &Route,
    bytes: &[u8],
) -> Result<T, RequestError> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        if route.has_body {
            return Err(RequestError::MissingBody);
        }
        b"{}".as_slice()
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(RequestError::BadBody)
}

/// The device and inode of a file: tells whether the socket file is still ours.
type FileIdentity = (u64, u64);

/// A running API server. Dropping it (or [`ApiServer::shutdown`]) stops the
/// server, gives open exchanges a moment to finish, removes the socket file
/// and then its lock file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    identity: FileIdentity,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    /// Released (after the socket file is removed) when the server is dropped.
    _lock: SocketLock,
}

impl ApiServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops the server and removes its socket file.
    pub fn shutdown(self) {}
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("The API server's thread panicked");
            }
        }
        // Leave the path alone if someone else has put a file there since.
        let still_ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.identity)
            .unwrap_or(false);
        if still_ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("Cannot remove the API socket {}: {e}", self.path.display());
            }
        }
    }
}

/// Starts the API server on `path` with the default options; requests go to
/// the VMM through `sender`.
pub fn start_server(path: &Path, sender: ApiSender) -> Result<ApiServer, ApiError> {
    start_server_with(path, sender, ServerOptions::default())
}

/// Starts the API server on `path`; requests go to the VMM through `sender`.
///
/// The server first takes the lock file `<path>.lock` and holds it for its
/// life: another server on the same path fails with [`ApiError::Locked`] and
/// touches nothing. The socket is created with mode 0600. A socket that a
/// live process answers on is refused; a stale one (nobody listening, nobody
/// holding the lock) is replaced.
pub fn start_server_with(
    path: &Path,
    sender: ApiSender,
    options: ServerOptions,
) -> Result<ApiServer, ApiError> {
    // Dropped on every failure below, which removes the lock file again.
    let lock = SocketLock::acquire(path)?;
    let (listener, identity) = bind_socket(path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ApiError::Runtime)?;
    let (stop, stopped) = watch::channel(false);
    let shared = Arc::new(Shared {
        sender,
        timeout: options.timeout,
        read_timeout: options.read_timeout,
    });
    let limits = Limits {
        read_timeout: options.read_timeout,
        max_connections: options.max_connections.max(1),
    };
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || runtime.block_on(serve(listener, router(shared), limits, stopped)))
        .map_err(ApiError::Thread);
    let thread = match thread {
        Ok(thread) => thread,
        Err(e) => {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    };
    Ok(ApiServer {
        path: path.to_owned(),
        identity,
        stop,
        thread: Some(thread),
        _lock: lock,
    })
}

/// What bounds the server's connections.
#[derive(Debug, Clone, Copy)]
struct Limits {
    read_timeout: Duration,
    max_connections: usize,
}

/// Resolves when the server is told to stop (or its [`ApiServer`] is gone).
async fn stop_signal(mut stopped: watch::Receiver<bool>) {
    // An error means the ApiServer is gone: stop as well.
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Serves until told to stop, then lets open exchanges finish for a moment.
async fn serve(
    listener: UnixListener,
    router: Router,
    limits: Limits,
    stopped: watch::Receiver<bool>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            log::error!("Cannot serve the API socket: {e}");
            return;
        }
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout);
    let service = TowerToHyperService::new(router);
    let mut connections = JoinSet::new();
    // Whether connections are being refused: warn once per episode, not once
    // per connection.
    let mut refusing = false;
    let mut stop = pin!(stop_signal(stopped.clone()));
    loop {
        let stream = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if !is_transient(&e) {
                        log::warn!("Cannot accept an API connection: {e}");
                        // Such as EMFILE: give connections time to end.
                        tokio::select! {
                            () = &mut stop => break,
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= limits.max_connections {
            if !refusing {
                log::warn!(
                    "{} API connections are open: closing new ones until some end",
                    limits.max_connections
                );
                refusing = true;
            }
            drop(stream);
            continue;
        }
        refusing = false;
        let connection = http.serve_connection(TokioIo::new(stream), service.clone());
        let stopped = stopped.clone();
        connections.spawn(async move {
            let mut connection = pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop_signal(stopped) => {
                    // Finish the exchange under way, if any, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                log::debug!("API connection ended: {e}");
            }
        });
    }
    // New connections are refused from here on.
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        log::warn!("API connections still open at shutdown were closed");
    }
    // Dropping `connections` aborts those that remain.
}

/// Whether an accept() error concerns only the connection being accepted.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Creates the listening socket at `path`, mode 0600 from the start.
fn bind_socket(path: &Path) -> Result<(UnixListener, FileIdentity), ApiError> {
    claim_path(path)?;
    let address = SockAddr::unix(path).map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(ApiError::Socket)?;
    // Linux creates the socket file with the socket inode's mode (less the
    // umask), so setting it before bind() leaves no moment at which another
    // user could connect.
    // SAFETY: fchmod() on a file descriptor we own; it touches no memory.
    #[allow(unsafe_code)]
    let result = unsafe { libc::fchmod(socket.as_raw_fd(), SOCKET_MODE) };
    if result != 0 {
        return Err(ApiError::Socket(io::Error::last_os_error()));
    }
    socket.bind(&address).map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let listen = || {
        socket.listen(128).map_err(ApiError::Listen)?;
        socket.set_nonblocking(true).map_err(ApiError::Listen)?;
        let metadata = std::fs::symlink_metadata(path).map_err(|source| ApiError::Inspect {
            path: path.to_owned(),
            source,
        })?;
        Ok((metadata.dev(), metadata.ino()))
    };
    match listen() {
        Ok(identity) => Ok((UnixListener::from(OwnedFd::from(socket)), identity)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Makes `path` free for a new socket: refuses a socket with a live server
/// behind it or a file that is not a socket, removes a stale socket. Called
/// with the path's lock held, so no other server of ours is between its own
/// check and bind: a socket that refuses connections is truly stale.
fn claim_path(path: &Path) -> Result<(), ApiError> {
    let inspect = |source| ApiError::Inspect {
        path: path.to_owned(),
        source,
    };
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(inspect(e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiError::SocketInUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| ApiError::RemoveStale {
                path: path.to_owned(),
                source,
            }),
        Err(e) => Err(inspect(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ChannelError;

    fn status(error: RequestError) -> u16 {
        error.status().as_u16()
    }

    fn json_error() -> serde_json::Error {
        serde_json::from_str::<u8>("x").expect_err("not a number")
    }

    #[test]
    fn every_error_has_its_status() {
        assert_eq!(status(RequestError::UnknownEndpoint("/x".into())), 404);
        let route = &ROUTES[0];
        assert_eq!(
            status(RequestError::MethodNotAllowed {
                method: "POST".into(),
                route
            }),
            405
        );
        assert_eq!(status(RequestError::BodyTooLarge), 413);
        assert_eq!(
            status(RequestError::BodyTimeout(Duration::from_secs(1))),
            408
        );
        assert_eq!(status(RequestError::BodyRead("reset".into())), 400);
        assert_eq!(status(RequestError::MissingBody), 400);
        assert_eq!(status(RequestError::BadBody(json_error())), 400);
        assert_eq!(status(RequestError::Channel(ChannelError::Closed)), 503);
        assert_eq!(
            status(RequestError::Channel(ChannelError::Wake(io::Error::other(
                "x"
            )))),
            500
        );
        assert_eq!(status(RequestError::Timeout(Duration::from_secs(1))), 503);
        assert_eq!(status(RequestError::Unanswered), 500);
        assert_eq!(status(RequestError::Encode(json_error())), 500);
        assert_eq!(
            status(RequestError::Vmm(VmmError::invalid_request("x"))),
            400
        );
        assert_eq!(status(RequestError::Vmm(VmmError::not_found("x"))), 404);
        assert_eq!(status(RequestError::Vmm(VmmError::conflict("x"))), 409);
        assert_eq!(status(RequestError::Vmm(VmmError::internal("x"))), 500);
    }

    #[test]
    fn vmm_errors_keep_their_own_message() {
        let error = RequestError::Vmm(VmmError::not_found("No device \"d7\""));
        let body = ErrorBody::from_chain(&error);
        assert_eq!(body.error, "No device \"d7\"");
        assert!(body.causes.is_empty());
    }

    #[test]
    fn bodies_are_required_only_where_routes_take_them() {
        let ping = actions::VmmPing::route();
        let add = actions::VmAddDevice::route();
        assert!(parse_body::<crate::NoBody>(ping, b"").is_ok());
        assert!(parse_body::<crate::NoBody>(ping, b" {} ").is_ok());
        assert!(matches!(
            parse_body::<crate::NoBody>(ping, br#"{"a":1}"#),
            Err(RequestError::BadBody(_))
        ));
        assert!(matches!(
            parse_body::<crate::AddDeviceRequest>(add, b"\n"),
            Err(RequestError::MissingBody)
        ));
        assert!(matches!(
            parse_body::<crate::AddDeviceRequest>(add, b"{"),
            Err(RequestError::BadBody(_))
        ));
    }
}
