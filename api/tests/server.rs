//! The API server end to end over its Unix socket, against the mock VMM.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use api::actions::{
    IommuDomains, VmAddDevice, VmInfo, VmRemoveDevice, VmShutdown, VmmPing, VmmShutdown,
};
use api::client::{parse_device_spec, Client, ClientError, RawResponse};
use api::{
    ApiError, DeviceId, DeviceKind, DomainType, ErrorBody, IommuMode, NoBody, RemoveDeviceRequest,
    ServerOptions, VmState, MAX_BODY,
};
use common::{raw_exchange, Harness, TestDir, BROKEN_PATH, MOCK_VERSION};

fn id(text: &str) -> DeviceId {
    DeviceId::new(text).expect("valid id")
}

/// Sends a raw request and checks that the answer is a JSON error with `status`.
async fn expect_error(
    client: &Client,
    method: &str,
    path: &str,
    body: &str,
    status: u16,
) -> ErrorBody {
    let body = (!body.is_empty()).then(|| body.as_bytes().to_vec());
    let answer: RawResponse = client.send(method, path, body).await.expect("exchange");
    assert_eq!(
        answer.status.as_u16(),
        status,
        "{method} {path}: {:?}",
        answer.body
    );
    serde_json::from_slice(&answer.body).expect("the error body is an ErrorBody")
}

fn server_error(result: Result<impl std::fmt::Debug, ClientError>) -> (u16, ErrorBody) {
    match result {
        Err(ClientError::Server { status, body }) => (status.as_u16(), body),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test]
async fn ping_answers_version_and_pid() {
    let harness = Harness::start();
    let pong = harness
        .client()
        .call::<VmmPing>(&NoBody {})
        .await
        .expect("ping");
    assert_eq!(pong.version, MOCK_VERSION);
    assert_eq!(pong.pid, std::process::id());
}

#[tokio::test]
async fn devices_are_added_listed_and_removed() {
    let harness = Harness::start();
    let client = harness.client();

    let info = client.call::<VmInfo>(&NoBody {}).await.expect("info");
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.config.cpus, 2);
    assert!(info.devices.is_empty());

    let spec = parse_device_spec("kind=dma-test,iommu=pviommu,id=dma1").expect("spec");
    let added = client
        .call::<VmAddDevice>(&spec)
        .await
        .expect("add dma-test");
    assert_eq!(added.id, id("dma1"));
    assert_eq!(added.bdf.to_string(), "0000:00:01.0");

    let spec =
        parse_device_spec("path=/sys/bus/pci/devices/0000:00:04.0,iommu=direct").expect("spec");
    let vfio = client.call::<VmAddDevice>(&spec).await.expect("add vfio");
    assert_eq!(vfio.id, id("vfio1"), "the VMM names a device without id");

    let info = client.call::<VmInfo>(&NoBody {}).await.expect("info");
    assert_eq!(info.devices.len(), 2);
    assert_eq!(info.devices[0].kind, DeviceKind::DmaTest);
    assert_eq!(info.devices[0].iommu, IommuMode::Pviommu);
    assert_eq!(info.devices[0].bdf, added.bdf);
    assert_eq!(info.devices[1].kind, DeviceKind::Vfio);
    assert_eq!(info.devices[1].iommu, IommuMode::Direct);
    assert_eq!(
        info.devices[1].path.as_deref(),
        Some(std::path::Path::new("/sys/bus/pci/devices/0000:00:04.0"))
    );

    let domains = client
        .call::<IommuDomains>(&NoBody {})
        .await
        .expect("domains");
    let s2: Vec<_> = domains
        .domains
        .iter()
        .filter(|d| d.domain_type == DomainType::S2)
        .collect();
    assert_eq!(s2.len(), 1);
    assert_eq!(s2[0].devices, [id("dma1")]);
    assert_eq!(s2[0].mapped_pages, 8);
    assert_eq!(domains.domains[0].devices, [id("vfio1")]);

    let remove = RemoveDeviceRequest { id: id("dma1") };
    client
        .call::<VmRemoveDevice>(&remove)
        .await
        .expect("remove");
    let info = client.call::<VmInfo>(&NoBody {}).await.expect("info");
    assert_eq!(info.devices.len(), 1);
    let domains = client
        .call::<IommuDomains>(&NoBody {})
        .await
        .expect("domains");
    assert!(domains
        .domains
        .iter()
        .all(|d| d.domain_type != DomainType::S2));

    let (status, body) = server_error(client.call::<VmRemoveDevice>(&remove).await);
    assert_eq!(status, 404);
    assert_eq!(body.error, "No device with id \"dma1\"");
}

#[tokio::test]
async fn no_content_routes_answer_204_without_a_body() {
    let harness = Harness::start();
    let client = harness.client();
    client
        .call::<VmAddDevice>(&parse_device_spec("kind=dma-test,id=d").expect("spec"))
        .await
        .expect("add");
    let answer = client
        .send(
            "PUT",
            "/api/v1/vm.remove-device",
            Some(br#"{"id": "d"}"#.to_vec()),
        )
        .await
        .expect("exchange");
    assert_eq!(answer.status.as_u16(), 204);
    assert!(answer.body.is_empty());
}

#[tokio::test]
async fn vm_shutdown_stops_the_vm_but_not_the_api() {
    let harness = Harness::start();
    let client = harness.client();
    client
        .call::<VmShutdown>(&NoBody {})
        .await
        .expect("shutdown");
    let info = client.call::<VmInfo>(&NoBody {}).await.expect("info");
    assert_eq!(info.state, VmState::Shutdown);

    let (status, body) = server_error(client.call::<VmShutdown>(&NoBody {}).await);
    assert_eq!(
        (status, body.error.as_str()),
        (409, "The VM is already shut down")
    );
    let spec = parse_device_spec("kind=dma-test").expect("spec");
    let (status, _) = server_error(client.call::<VmAddDevice>(&spec).await);
    assert_eq!(status, 409);
}

#[tokio::test]
async fn vmm_shutdown_answers_then_requests_find_no_vmm() {
    let mut harness = Harness::start();
    let client = harness.client();
    client
        .call::<VmmShutdown>(&NoBody {})
        .await
        .expect("vmm shutdown answered");
    harness.wait_for_vmm_exit();
    let (status, body) = server_error(client.call::<VmmPing>(&NoBody {}).await);
    assert_eq!(status, 503);
    assert_eq!(body.error, "The VMM no longer takes API requests");
}

#[tokio::test]
async fn bad_bodies_are_400_with_the_reason() {
    let harness = Harness::start();
    let client = harness.client();
    let add = "/api/v1/vm.add-device";
    let cases = [
        ("{", "EOF while parsing"),
        ("not json", "expected ident"),
        (
            r#"{"kind": "dma-test", "colour": "red"}"#,
            "unknown field `colour`",
        ),
        (
            r#"{"kind": "dma-test", "path": "/sys/x"}"#,
            "Exactly one of",
        ),
        (r#"{"id": "x"}"#, "Exactly one of"),
        (r#"{"kind": "gpu"}"#, "unknown variant `gpu`"),
        (
            r#"{"kind": "dma-test", "iommu": "none"}"#,
            "unknown variant `none`",
        ),
        (r#"{"kind": "dma-test", "id": ""}"#, "Device id is empty"),
        (
            r#"{"kind": "dma-test", "id": "a,b"}"#,
            "Device id contains ','",
        ),
        (r#"{"kind": "dma-test", "id": "-rf"}"#, "must start with"),
        (r#"{"path": "relative/path"}"#, "not an absolute"),
        (
            r#"{"kind": "dma-test", "id": 7}"#,
            "invalid type: integer `7`",
        ),
    ];
    for (body, reason) in cases {
        let error = expect_error(&client, "PUT", add, body, 400).await;
        assert_eq!(error.error, "Invalid request body", "{body}");
        assert!(
            error.causes.len() == 1 && error.causes[0].contains(reason),
            "{body}: {error:?}"
        );
    }
    let error = expect_error(&client, "PUT", add, "", 400).await;
    assert_eq!(error.error, "Request body is missing");

    let long_id = format!(r#"{{"id": "{}"}}"#, "x".repeat(65));
    let error = expect_error(&client, "PUT", "/api/v1/vm.remove-device", &long_id, 400).await;
    assert!(error.causes[0].contains("at most 64"), "{error:?}");
    // Routes without a body reject one with fields they do not know.
    let error = expect_error(
        &client,
        "PUT",
        "/api/v1/vm.shutdown",
        r#"{"force": true}"#,
        400,
    )
    .await;
    assert!(
        error.causes[0].contains("unknown field `force`"),
        "{error:?}"
    );
    assert_eq!(harness.received(), 0, "nothing invalid reaches the VMM");
    // ... but accept `{}`.
    let answer = client
        .send("PUT", "/api/v1/vm.shutdown", Some(b"{}".to_vec()))
        .await
        .expect("exchange");
    assert_eq!(answer.status.as_u16(), 204);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let harness = Harness::start();
    let body = format!(
        r#"{{"kind": "dma-test", "id": "{}"}}"#,
        "x".repeat(MAX_BODY)
    );
    let error = expect_error(
        &harness.client(),
        "PUT",
        "/api/v1/vm.add-device",
        &body,
        413,
    )
    .await;
    assert!(error.error.contains("larger than"), "{error:?}");
}

#[tokio::test]
async fn duplicates_are_409() {
    let harness = Harness::start();
    let client = harness.client();
    let spec = parse_device_spec("kind=dma-test,id=twin").expect("spec");
    client.call::<VmAddDevice>(&spec).await.expect("first");
    let (status, body) = server_error(client.call::<VmAddDevice>(&spec).await);
    assert_eq!(
        (status, body.error.as_str()),
        (409, "Device id \"twin\" is already in use")
    );

    let spec = parse_device_spec("path=/sys/bus/pci/devices/0000:00:04.0").expect("spec");
    client.call::<VmAddDevice>(&spec).await.expect("first");
    let (status, body) = server_error(client.call::<VmAddDevice>(&spec).await);
    assert_eq!(status, 409);
    assert!(body.error.contains("already passed through"), "{body:?}");
}

#[tokio::test]
async fn internal_errors_are_500_with_their_causes() {
    let harness = Harness::start();
    let spec = parse_device_spec(&format!("path={BROKEN_PATH}")).expect("spec");
    let (status, body) = server_error(harness.client().call::<VmAddDevice>(&spec).await);
    assert_eq!(status, 500);
    assert_eq!(body.error, format!("Cannot add device {BROKEN_PATH:?}"));
    assert_eq!(
        body.causes,
        [
            "Cannot open /dev/vfio/devices/vfio3",
            "Permission denied (os error 13)"
        ]
    );
}

#[tokio::test]
async fn a_request_the_vmm_drops_is_500() {
    let harness = Harness::start();
    let spec = parse_device_spec("kind=dma-test,id=silent1").expect("spec");
    let (status, body) = server_error(harness.client().call::<VmAddDevice>(&spec).await);
    assert_eq!(
        (status, body.error.as_str()),
        (500, "The VMM dropped the request without answering")
    );
}

#[tokio::test]
async fn a_request_the_vmm_never_answers_times_out_with_503() {
    let harness = Harness::start_with(ServerOptions {
        timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    });
    let client = harness.client();
    let spec = parse_device_spec("kind=dma-test,id=stuck1").expect("spec");
    let started = Instant::now();
    let (status, body) = server_error(client.call::<VmAddDevice>(&spec).await);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        (status, body.error.as_str()),
        (503, "The VMM did not answer within 300ms")
    );
    // The server and the VMM carry on.
    client
        .call::<VmmPing>(&NoBody {})
        .await
        .expect("ping after a time-out");
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow() {
    let harness = Harness::start();
    let client = harness.client();
    let error = expect_error(&client, "PUT", "/api/v1/vm.info", "", 405).await;
    assert_eq!(
        error.error,
        "Method PUT is not allowed on /api/v1/vm.info; use GET"
    );
    let error = expect_error(&client, "GET", "/api/v1/vm.add-device", "", 405).await;
    assert!(error.error.ends_with("use PUT"), "{error:?}");
    expect_error(&client, "DELETE", "/api/v1/vmm.shutdown", "", 405).await;
    expect_error(&client, "POST", "/api/v1/vmm.ping", "", 405).await;

    let answer = raw_exchange(
        &harness.socket,
        b"POST /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("allow: get\r\n"),
        "{answer}"
    );
    assert!(answer.contains("application/json"), "{answer}");
}

#[tokio::test]
async fn unknown_routes_are_404() {
    let harness = Harness::start();
    let client = harness.client();
    let error = expect_error(&client, "GET", "/api/v1/vm.reboot", "", 404).await;
    assert_eq!(error.error, "Unknown endpoint /api/v1/vm.reboot");
    expect_error(&client, "GET", "/", "", 404).await;
    expect_error(&client, "GET", "/api/v2/vmm.ping", "", 404).await;
}

#[tokio::test]
async fn fifty_concurrent_requests_are_all_answered() {
    let harness = Harness::start();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..50 {
        let client = harness.client();
        tasks.spawn(async move {
            if n % 5 == 0 {
                client.call::<VmmPing>(&NoBody {}).await.map(|_| None)
            } else {
                let spec = parse_device_spec(&format!("kind=dma-test,id=c{n}")).expect("spec");
                client.call::<VmAddDevice>(&spec).await.map(|r| Some(r.bdf))
            }
        });
    }
    let mut bdfs = Vec::new();
    while let Some(result) = tasks.join_next().await {
        if let Some(bdf) = result.expect("task").expect("request succeeds") {
            bdfs.push(bdf);
        }
    }
    assert_eq!(bdfs.len(), 40);
    bdfs.sort();
    bdfs.dedup();
    assert_eq!(bdfs.len(), 40, "every device got its own slot");
    let info = harness
        .client()
        .call::<VmInfo>(&NoBody {})
        .await
        .expect("info");
    assert_eq!(info.devices.len(), 40);
    assert_eq!(harness.received(), 51);
}

#[tokio::test]
async fn a_client_leaving_mid_request_does_not_disturb_the_vmm() {
    let harness = Harness::start();
    // The whole request is sent, then the client leaves while the VMM works.
    let body = br#"{"kind": "dma-test", "id": "slow1"}"#;
    let mut stream = UnixStream::connect(&harness.socket).expect("connect");
    write!(
        stream,
        "PUT /api/v1/vm.add-device HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .expect("send head");
    stream.write_all(body).expect("send body");
    while harness.received() == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(stream);

    // The server still answers, and the VMM did its work.
    let client = harness.client();
    client.call::<VmmPing>(&NoBody {}).await.expect("ping");
    assert!(harness.vmm().device("slow1").is_some());

    // A client that leaves halfway through its body never reaches the VMM.
    let requests = harness.received();
    let mut stream = UnixStream::connect(&harness.socket).expect("connect");
    stream
        .write_all(b"PUT /api/v1/vm.add-device HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"kind\"")
        .expect("send part");
    drop(stream);
    // Nor does one that sends garbage.
    let answer = raw_exchange(&harness.socket, b"\x00\x01garbage\r\n\r\n");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    client.call::<VmmPing>(&NoBody {}).await.expect("ping");
    assert_eq!(harness.received(), requests + 1, "only the ping arrived");
}

#[tokio::test]
async fn keep_alive_connections_serve_several_requests() {
    let harness = Harness::start();
    let request = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n";
    let last = b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(
        &harness.socket,
        &[&request[..], &request[..], &last[..]].concat(),
    );
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 3, "{answer}");
}

#[test]
fn the_socket_is_private() {
    let harness = Harness::start();
    let metadata = std::fs::metadata(&harness.socket).expect("socket exists");
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
}

const PING: &[u8] = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// The lock file the server holds beside `socket`.
fn lock_path(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".lock");
    PathBuf::from(path)
}

/// The inode of the file at `path`: tells whether it was replaced.
fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).expect("file exists").ino()
}

#[test]
fn a_live_socket_is_refused_and_left_alone() {
    // A process that is not a pvmm of this version (it holds no lock file)
    // serves on the path.
    let dir = TestDir::new();
    let socket = dir.path().join("api.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let (sender, _receiver) = api::channel().expect("channel");
    match api::start_server(&socket, sender) {
        Err(error @ ApiError::SocketInUse(_)) => {
            assert!(
                error.to_string().contains("in use by a running process"),
                "{error}"
            );
        }
        other => panic!("expected SocketInUse, got {other:?}"),
    }
    // Its socket still works, and the lock file is gone again.
    UnixStream::connect(&socket).expect("the socket is left alone");
    listener
        .accept()
        .expect("the listener still gets connections");
    assert!(!lock_path(&socket).exists());
}

#[test]
fn a_second_server_on_the_same_socket_fails_until_the_first_stops() {
    let mut harness = Harness::start();
    let socket = harness.socket.clone();
    let lock = lock_path(&socket);
    assert!(lock.is_file(), "the server holds {}", lock.display());
    let identity = inode(&socket);

    let (sender, _receiver) = api::channel().expect("channel");
    match api::start_server(&socket, sender) {
        Err(error @ ApiError::Locked { .. }) => {
            let message = error.to_string();
            assert!(message.contains("in use by another pvmm"), "{message}");
            assert!(message.contains(&*lock.to_string_lossy()), "{message}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    // The first server's socket was not touched, and it still serves.
    assert_eq!(inode(&socket), identity);
    let answer = raw_exchange(&socket, PING);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Once it has stopped, its socket and lock file are gone...
    drop(harness.server.take());
    assert!(!socket.exists());
    assert!(!lock.exists());
    // ... and a new server takes the path.
    let (sender, _receiver) = api::channel().expect("channel");
    let server = api::start_server(&socket, sender).expect("the path is free again");
    UnixStream::connect(&socket).expect("the new server listens");
    drop(server);
}

#[test]
fn a_socket_whose_server_holds_the_lock_is_never_unlinked() {
    // The race of two servers: the first has bound its socket but not yet
    // called listen(), so a connection to it is refused as to a stale socket.
    let harness = Harness::start();
    let socket = harness.socket.clone();
    std::fs::remove_file(&socket).expect("remove");
    let binding =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).expect("socket");
    binding
        .bind(&socket2::SockAddr::unix(&socket).expect("address"))
        .expect("bind");
    let refused = UnixStream::connect(&socket).expect_err("not listening yet");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let identity = inode(&socket);

    // The second server must not take it for stale and unlink it.
    let (sender, _receiver) = api::channel().expect("channel");
    let result = api::start_server(&socket, sender);
    assert!(matches!(result, Err(ApiError::Locked { .. })), "{result:?}");
    assert_eq!(
        inode(&socket),
        identity,
        "the first server's socket is left"
    );
}

#[test]
fn servers_racing_for_a_stale_socket_leave_one_winner() {
    const RACERS: usize = 8;
    for _round in 0..200 {
        let dir = TestDir::new();
        let socket = dir.path().join("api.sock");
        drop(UnixListener::bind(&socket).expect("bind"));
        let start = Arc::new(Barrier::new(RACERS));
        let racers: Vec<_> = (0..RACERS)
            .map(|_| {
                let socket = socket.clone();
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    let (sender, receiver) = api::channel().expect("channel");
                    start.wait();
                    api::start_server(&socket, sender).map(|server| (server, receiver))
                })
            })
            .collect();
        let results: Vec<_> = racers
            .into_iter()
            .map(|racer| racer.join().expect("racer"))
            .collect();
        let winners = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(winners, 1, "{results:?}");
        for result in &results {
            if let Err(error) = result {
                assert!(matches!(error, ApiError::Locked { .. }), "{error:?}");
            }
        }
        UnixStream::connect(&socket).expect("the winner's socket is in place");
    }
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = TestDir::new();
    let socket = dir.path().join("api.sock");
    drop(UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists(), "the stale socket file remains");
    // So does the lock file of a server that was killed; nobody holds it.
    std::fs::write(lock_path(&socket), "").expect("stale lock file");
    let (sender, _receiver) = api::channel().expect("channel");
    let server = api::start_server(&socket, sender).expect("stale socket replaced");
    UnixStream::connect(&socket).expect("the new server listens");
    drop(server);
    assert!(!socket.exists(), "the socket file is removed on shutdown");
    assert!(!lock_path(&socket).exists(), "so is the lock file");
}

#[test]
fn a_symbolic_link_as_lock_file_is_not_followed() {
    let dir = TestDir::new();
    let socket = dir.path().join("api.sock");
    let target = dir.path().join("elsewhere");
    std::os::unix::fs::symlink(&target, lock_path(&socket)).expect("symlink");
    let (sender, _receiver) = api::channel().expect("channel");
    let result = api::start_server(&socket, sender);
    assert!(
        matches!(result, Err(ApiError::OpenLock { .. })),
        "{result:?}"
    );
    assert!(!target.exists());
    assert!(!socket.exists());
}

#[test]
fn a_file_that_is_not_a_socket_is_refused() {
    let dir = TestDir::new();
    let path = dir.path().join("api.sock");
    std::fs::write(&path, "precious").expect("write");
    let (sender, _receiver) = api::channel().expect("channel");
    assert!(matches!(
        api::start_server(&path, sender),
        Err(ApiError::NotASocket(_))
    ));
    assert_eq!(
        std::fs::read_to_string(&path).expect("untouched"),
        "precious"
    );
}

#[test]
fn a_bad_socket_path_is_a_clear_error() {
    let dir = TestDir::new();
    let (sender, _receiver) = api::channel().expect("channel");
    let missing = dir.path().join("no/such/dir/api.sock");
    let error = api::start_server(&missing, sender).expect_err("no such directory");
    // The lock file beside the socket is the first thing created there.
    assert!(matches!(error, ApiError::OpenLock { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("Cannot open the API socket's lock file"),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("check that its directory exists"),
        "{error}"
    );

    // A path too long for a Unix socket address.
    let (sender, _receiver) = api::channel().expect("channel");
    let long = dir.path().join("x".repeat(120));
    let error = api::start_server(&long, sender).expect_err("path too long");
    assert!(matches!(error, ApiError::Bind { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("Cannot bind the API socket to"),
        "{error}"
    );
    assert!(!lock_path(&long).exists(), "the lock file is removed again");
}

#[test]
fn shutdown_leaves_a_replaced_socket_file_alone() {
    let dir = TestDir::new();
    let socket = dir.path().join("api.sock");
    let (sender, _receiver) = api::channel().expect("channel");
    let server = api::start_server(&socket, sender).expect("server");
    std::fs::remove_file(&socket).expect("remove");
    std::fs::write(&socket, "someone else's").expect("replace");
    server.shutdown();
    assert!(socket.exists());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn the_vmm_shutdown_answer_arrives_although_the_server_stops_at_once() {
    let mut harness = Harness::start();
    let client = harness.client();
    let call =
        std::thread::spawn(move || runtime().block_on(client.call::<VmmShutdown>(&NoBody {})));
    // What the VMM does: answer, leave the event loop, drop the server.
    harness.wait_for_vmm_exit();
    drop(harness.server.take());
    call.join()
        .expect("client thread")
        .expect("the answer arrived");
}

#[test]
fn stopping_the_server_does_not_wait_for_an_unanswered_request() {
    let mut harness = Harness::start();
    let client = harness.client();
    let call = std::thread::spawn(move || {
        let spec = parse_device_spec("kind=dma-test,id=stuck2").expect("spec");
        runtime().block_on(client.call::<VmAddDevice>(&spec))
    });
    while harness.received() == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    drop(harness.server.take());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!harness.socket.exists());
    let result = call.join().expect("client thread");
    assert!(matches!(result, Err(ClientError::Http(_))), "{result:?}");
}

/// A connection to `socket` whose reads give up after a while.
fn connect(socket: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
}

/// Reads until the server closes `stream` and returns what it sent; panics
/// if it keeps the connection open.
fn read_until_closed(stream: &mut UnixStream) -> String {
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "the server kept the connection open ({e}) after sending {:?}",
            String::from_utf8_lossy(&answer)
        ),
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_half_sent_request_is_cut_off_while_others_are_served() {
    const READ_TIMEOUT: Duration = Duration::from_millis(300);
    let harness = Harness::start_with(ServerOptions {
        read_timeout: READ_TIMEOUT,
        ..ServerOptions::default()
    });
    let started = Instant::now();
    // A client that connects and sends nothing...
    let mut silent = connect(&harness.socket);
    // ... one that sends half a head...
    let mut half_head = connect(&harness.socket);
    half_head
        .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n")
        .expect("send part");
    // ... and one that sends the head and half the body.
    let mut half_body = connect(&harness.socket);
    half_body
        .write_all(
            b"PUT /api/v1/vm.add-device HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"kind\"",
        )
        .expect("send part");

    // Meanwhile the API answers others.
    let client = harness.client();
    client.call::<VmmPing>(&NoBody {}).await.expect("ping");

    // The first two are closed without an answer once the time is up.
    assert_eq!(read_until_closed(&mut silent), "");
    assert_eq!(read_until_closed(&mut half_head), "");
    assert!(started.elapsed() >= READ_TIMEOUT);
    // The third is told why, then closed.
    let answer = read_until_closed(&mut half_body);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("The request body did not arrive within 300ms of its head"),
        "{answer}"
    );
    client.call::<VmmPing>(&NoBody {}).await.expect("ping");
    assert_eq!(harness.received(), 2, "only the pings reached the VMM");
}

#[tokio::test]
async fn idle_connections_beyond_the_cap_do_not_lock_clients_out() {
    const CAP: usize = 4;
    const READ_TIMEOUT: Duration = Duration::from_secs(1);
    let harness = Harness::start_with(ServerOptions {
        read_timeout: READ_TIMEOUT,
        max_connections: CAP,
        ..ServerOptions::default()
    });
    let client = harness.client();
    let started = Instant::now();
    let mut idle: Vec<UnixStream> = (0..5 * CAP).map(|_| connect(&harness.socket)).collect();

    // The server serves CAP of them and closes the others at once, so they
    // hold none of its file descriptors.
    for stream in &mut idle[CAP..] {
        assert_eq!(read_until_closed(stream), "");
    }
    assert!(started.elapsed() < READ_TIMEOUT, "closed at once");
    // While CAP connections are open, a new one is closed as well.
    let refused = client.call::<VmmPing>(&NoBody {}).await;
    assert!(matches!(refused, Err(ClientError::Http(_))), "{refused:?}");

    // The idle ones time out, and then a client is served again.
    for stream in &mut idle[..CAP] {
        assert_eq!(read_until_closed(stream), "");
    }
    assert!(started.elapsed() >= READ_TIMEOUT);
    client
        .call::<VmmPing>(&NoBody {})
        .await
        .expect("served once the idle connections timed out");
    assert_eq!(harness.received(), 1);
}
