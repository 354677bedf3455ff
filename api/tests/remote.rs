//! `pvmm-remote` end to end against the mock VMM.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Harness, BROKEN_PATH, MOCK_VERSION};
use serde_json::Value;

fn remote(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pvmm-remote"))
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("pvmm-remote runs")
}

/// Runs a command that must succeed and returns its JSON output (Null when empty).
fn json(socket: &Path, args: &[&str]) -> Value {
    let output = remote(socket, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?} failed: {stderr}");
    assert!(stderr.is_empty(), "{args:?} wrote to stderr: {stderr}");
    if output.stdout.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(&output.stdout).expect("pvmm-remote prints JSON")
}

/// Runs a command that must fail with exit status 1 and returns its stderr.
fn failure(socket: &Path, args: &[&str]) -> String {
    let output = remote(socket, args);
    assert_eq!(output.status.code(), Some(1), "{args:?}");
    assert!(output.stdout.is_empty(), "{args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn every_command_works() {
    let harness = Harness::start();
    let socket = harness.socket.as_path();

    let pong = json(socket, &["ping"]);
    assert_eq!(pong["version"], MOCK_VERSION);
    assert_eq!(pong["pid"], std::process::id());

    let added = json(socket, &["add-device", "kind=dma-test,iommu=pviommu,id=d1"]);
    assert_eq!(
        added,
        serde_json::json!({"id": "d1", "bdf": "0000:00:01.0"})
    );
    let added = json(
        socket,
        &[
            "add-device",
            "path=/sys/bus/pci/devices/0000:00:04.0,iommu=direct",
        ],
    );
    assert_eq!(added["id"], "vfio1");

    let info = json(socket, &["info"]);
    assert_eq!(info["state"], "running");
    assert_eq!(info["devices"][0]["id"], "d1");
    assert_eq!(info["devices"][0]["iommu"], "pviommu");
    assert_eq!(info["devices"][1]["kind"], "vfio");

    let domains = json(socket, &["domains"]);
    assert_eq!(domains["domains"][0]["type"], "default");
    assert_eq!(domains["domains"][0]["devices"][0], "vfio1");
    assert_eq!(domains["domains"][2]["devices"][0], "d1");

    assert_eq!(json(socket, &["remove-device", "d1"]), Value::Null);
    assert_eq!(
        json(socket, &["info"])["devices"].as_array().map(Vec::len),
        Some(1)
    );

    assert_eq!(json(socket, &["shutdown-vm"]), Value::Null);
    assert_eq!(json(socket, &["info"])["state"], "shutdown");
    assert_eq!(json(socket, &["shutdown-vmm"]), Value::Null);
}

#[test]
fn server_errors_exit_non_zero_with_the_message() {
    let harness = Harness::start();
    let socket = harness.socket.as_path();
    let stderr = failure(socket, &["remove-device", "ghost"]);
    assert_eq!(
        stderr.trim_end(),
        "Error: 404 Not Found: No device with id \"ghost\""
    );

    json(socket, &["add-device", "kind=dma-test,id=twin"]);
    let stderr = failure(socket, &["add-device", "kind=dma-test,id=twin"]);
    assert!(
        stderr.starts_with("Error: 409 Conflict: Device id \"twin\""),
        "{stderr}"
    );

    let stderr = failure(socket, &["add-device", &format!("path={BROKEN_PATH}")]);
    assert!(
        stderr.starts_with("Error: 500 Internal Server Error: Cannot add device"),
        "{stderr}"
    );
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

#[test]
fn a_missing_socket_is_a_clear_error() {
    let dir = common::TestDir::new();
    let socket = dir.path().join("nobody.sock");
    let stderr = failure(&socket, &["ping"]);
    assert!(
        stderr.starts_with("Error: Cannot connect to the API socket"),
        "{stderr}"
    );
    assert!(
        stderr.contains("caused by: No such file or directory"),
        "{stderr}"
    );
}

#[test]
fn bad_arguments_are_refused_before_sending() {
    let harness = Harness::start();
    let socket = harness.socket.as_path();
    for (args, reason) in [
        (
            &["add-device", "kind=gpu"][..],
            "Unknown device kind \"gpu\"",
        ),
        (
            &["add-device", "kind=dma-test,colour=red"][..],
            "Unknown key \"colour\"",
        ),
        (&["add-device", "iommu=direct"][..], "Exactly one of"),
        (&["remove-device", "a,b"][..], "Device id contains ','"),
        (&["reboot"][..], "unrecognized subcommand"),
    ] {
        let output = remote(socket, args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    assert_eq!(harness.received(), 0);
}

#[test]
fn a_closed_stdout_ends_the_client_quietly() {
    let harness = Harness::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pvmm-remote"))
        .arg("--api-socket")
        .arg(&harness.socket)
        // The mock VMM takes common::SLOW to add a `slow*` device, so the
        // pipe is closed long before the answer is printed.
        .args(["add-device", "kind=dma-test,id=slow1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pvmm-remote runs");
    // What `pvmm-remote ... | head` sees once head has exited: the read end
    // of its stdout pipe is closed.
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("pvmm-remote ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        harness.vmm().device("slow1").is_some(),
        "the request was carried out"
    );
}
