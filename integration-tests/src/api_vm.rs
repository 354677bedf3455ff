//! A `pvmm` with `--api-socket` and its serial port in a file, for the API
//! tests and the hotplug benchmark: start it, send requests (plain HTTP/1.1
//! over a `UnixStream`, so that the wire format is checked too), and watch
//! the guest's serial output.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::artifacts;

/// `GET iommu.domains`, typed; panics (with the answer) unless it is a 200
/// with a body of that type.
pub fn iommu_domains(socket: &Path) -> api::IommuDomainsResponse {
    let (status, body) = request(socket, "GET", "iommu.domains", None);
    assert_eq!(status, 200, "iommu.domains: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("iommu.domains: {e}: {body}"))
}

/// `PUT vm.remove-device` of `id`, which must be answered 204; how long the
/// answer took (a removal waits for the guest's eject, or for its timeout).
pub fn remove_device(socket: &Path, id: &str) -> Duration {
    let start = Instant::now();
    let body = format!(r#"{{"id": "{id}"}}"#);
    let (status, answer) = request(socket, "PUT", "vm.remove-device", Some(&body));
    let took = start.elapsed();
    assert_eq!(status, 204, "remove-device {id}: {answer}");
    took
}

/// Sends one request to `/api/v1/<route>`; returns the status code and the
/// body. Panics if the socket does not answer with a status line.
pub fn request(socket: &Path, method: &str, route: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let body = body.unwrap_or("");
    let head = format!(
        "{method} /api/v1/{route} HTTP/1.1\r\nHost: pvmm\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send");
    s.write_all(body.as_bytes()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A running `pvmm` (the embedded test kernel) with an API socket; killed
/// and cleaned up when dropped.
pub struct ApiVm {
    child: Child,
    pub socket: PathBuf,
    pub serial: PathBuf,
}

impl ApiVm {
    /// Starts `pvmm` with `cmdline`; `tag` names its socket and serial file.
    pub fn start(tag: &str, cmdline: &str) -> Self {
        Self::start_with(tag, cmdline, &[])
    }

    /// [`ApiVm::start`] with more pvmm arguments.
    pub fn start_with(tag: &str, cmdline: &str, args: &[&str]) -> Self {
        let dir = std::env::temp_dir();
        let id = format!("{tag}-{}", std::process::id());
        let socket = dir.join(format!("pvmm-api-{id}.sock"));
        let serial = dir.join(format!("pvmm-api-{id}.log"));
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&serial);
        let bin = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(bin)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .args(["--cmdline", cmdline])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pvmm starts");
        Self {
            child,
            socket,
            serial,
        }
    }

    /// `request` on this VM's socket.
    pub fn request(&self, method: &str, route: &str, body: Option<&str>) -> (u16, String) {
        request(&self.socket, method, route, body)
    }

    /// Everything the guest printed so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// How many times the guest printed `text`.
    pub fn count(&self, text: &str) -> usize {
        self.serial().matches(text).count()
    }

    /// Polls the serial output until `text` occurs more than `seen` times;
    /// returns when it saw it. Panics with the output after `timeout`.
    pub fn wait_count(&self, text: &str, seen: usize, timeout: Duration) -> Instant {
        let start = Instant::now();
        loop {
            if self.count(text) > seen {
                return Instant::now();
            }
            assert!(
                start.elapsed() < timeout,
                "no new {text:?} on the serial port:\n{}",
                self.serial()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits until the serial output contains `text`.
    pub fn wait_for(&self, text: &str, timeout: Duration) -> Instant {
        self.wait_count(text, 0, timeout)
    }

    /// GET vmm.ping answers 200.
    pub fn ping_ok(&self) {
        let (code, body) = self.request("GET", "vmm.ping", None);
        assert_eq!(code, 200, "{body}");
    }

    /// Sends `signal` to `pvmm`.
    pub fn signal(&self, signal: libc::c_int) {
        crate::run::signal(&self.child, signal)
            .unwrap_or_else(|e| panic!("signal {signal} to pvmm: {e}"));
    }

    /// Kills `pvmm` and returns what it wrote on stderr.
    pub fn kill_for_stderr(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        stderr
    }

    /// Waits for `pvmm` to end by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.child.wait().expect("pvmm ends")
    }
}

impl Drop for ApiVm {
    fn drop(&mut self) {
        let exited = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what pvmm said, and the guest's console.
        if std::thread::panicking() {
            let mut stderr = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            eprintln!(
                "--- pvmm ({}) stderr ---\n{stderr}\n--- guest console ---\n{}",
                exited.map_or("killed".to_string(), |s| format!("exited: {s}")),
                self.serial()
            );
        }
        let _ = std::fs::remove_file(&self.serial);
        let _ = std::fs::remove_file(&self.socket);
        // The server's lock file beside the socket (api::server).
        let mut lock = self.socket.clone().into_os_string();
        lock.push(".lock");
        let _ = std::fs::remove_file(lock);
    }
}
