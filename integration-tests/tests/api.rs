//! The REST API against a running test-kernel guest (`tk.tests=hotplug`):
//! a dma-test device is hot-added, found by the guest, used for a DMA fill
//! and hot-removed (the guest ejects it; it leaves every pvIOMMU domain);
//! on the way, abuse: bad JSON, unknown and duplicate ids, 50 concurrent
//! requests, a client that hangs up mid-request. The VM keeps running
//! throughout and powers off by itself at the end.
//!
//! Plain HTTP/1.1 over `std::os::unix::net::UnixStream`, so that the test
//! also checks the wire format.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::api_vm::{iommu_domains, request, ApiVm as Vm};
use integration_tests::run;

/// The domain (from iommu.domains) that device `id` is attached to.
fn domain_of(socket: &Path, id: &str) -> Option<api::DomainInfo> {
    iommu_domains(socket).domain_of(id).cloned()
}

#[test]
fn hotplug_through_the_api_with_abuse_on_the_way() {
    let _lock = run::vm_lock();
    let vm = Vm::start("hotplug", "console=ttyS0 tk.tests=hotplug tk.hotplug=2");
    vm.wait_for("# hotplug: ready", Duration::from_secs(60));
    vm.ping_ok();
    let socket = &vm.socket;

    // Add: 200 with the id and address; the guest finds it and does a DMA.
    let (code, body) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test","id":"hp0","iommu":"pviommu"}"#),
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(r#""id":"hp0""#) && body.contains(r#""bdf":"0000:00:"#),
        "{body}"
    );
    vm.wait_for("# hotplug: dma ok", Duration::from_secs(30));
    let (code, body) = request(socket, "GET", "vm.info", None);
    assert_eq!(code, 200);
    assert!(
        body.contains(r#""id":"hp0""#) && body.contains(r#""kind":"dma-test""#),
        "{body}"
    );
    // The embedded test kernel's VM puts devices on the ordinary root.
    assert!(body.contains(r#""pci_bus":"root""#), "{body}");
    // Then the guest gives it an S2 domain of its own (0x100 + slot) with
    // one page mapped, and DMAs through it.
    vm.wait_for("# hotplug: s2 dma ok", Duration::from_secs(30));
    let s2 = domain_of(socket, "hp0").unwrap_or_else(|| panic!("hp0 is in no domain"));
    assert_eq!(s2.domain_type, api::DomainType::S2, "{s2:?}");
    assert!(s2.id > 0x100, "{s2:?}");
    assert_eq!(s2.mapped_pages, 1, "{s2:?}");

    // Abuse: the right codes, and the VM keeps running.
    let (code, body) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test","id":"hp0"}"#),
    );
    assert_eq!(code, 409, "duplicate id: {body}");
    let (code, body) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test""#),
    );
    assert_eq!(code, 400, "bad JSON: {body}");
    let (code, body) = request(socket, "PUT", "vm.add-device", Some(r#"{"kind":"nvme"}"#));
    assert_eq!(code, 400, "bad kind: {body}");
    let (code, body) = request(socket, "PUT", "vm.remove-device", Some(r#"{"id":"nope"}"#));
    assert_eq!(code, 404, "unknown id: {body}");
    let (code, body) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"path":"/sys/bus/pci/devices/0000:99:00.0"}"#),
    );
    assert_eq!(code, 400, "a VFIO path that does not exist: {body}");
    // A path that exists but is no PCI function.
    let not_vfio = std::env::temp_dir();
    let (code, body) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(&format!(
            r#"{{"path":{:?}}}"#,
            not_vfio.display().to_string()
        )),
    );
    assert_eq!(code, 400, "a path that is no PCI function: {body}");
    assert!(body.contains("is not a PCI function"), "{body}");
    // A PCI function bound to another driver (or none), if this machine
    // has one: refused before /dev/iommu is opened, the same on every host.
    if let Some(f) = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_link(e.path().join("driver"))
                .map(|d| !d.ends_with("vfio-pci"))
                .unwrap_or(true)
        })
    {
        let body = format!(r#"{{"path":{:?}}}"#, f.path().display().to_string());
        let (code, answer) = request(socket, "PUT", "vm.add-device", Some(&body));
        assert_eq!(code, 400, "a function not bound to vfio-pci: {answer}");
        assert!(answer.contains("bind it to vfio-pci first"), "{answer}");
    }
    vm.ping_ok();

    // 50 concurrent requests.
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let route = if i % 2 == 0 { "vmm.ping" } else { "vm.info" };
                request(&socket, "GET", route, None).0
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("client thread"), 200);
    }

    // A client that hangs up mid-request.
    {
        let mut s = UnixStream::connect(socket).expect("connect");
        s.write_all(b"PUT /api/v1/vm.add-device HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"ki")
            .expect("send");
    }
    vm.ping_ok();

    // Remove: the guest ejects it, 204, and it is in no domain any more.
    let (code, body) = request(socket, "PUT", "vm.remove-device", Some(r#"{"id":"hp0"}"#));
    assert_eq!(code, 204, "{body}");
    vm.wait_for("# hotplug: ejected", Duration::from_secs(5));
    let (code, body) = request(socket, "GET", "iommu.domains", None);
    assert_eq!(code, 200);
    assert!(!body.contains(r#""hp0""#), "hp0 left every domain: {body}");
    // Detached by the VMM, the guest's domain can go: the guest deletes it,
    // and its mapping goes with it.
    vm.wait_for("# hotplug: domain", Duration::from_secs(10));
    let after = iommu_domains(socket);
    assert!(
        !after.domains.iter().any(|d| d.id == s2.id),
        "domain {} is still there: {after:?}",
        s2.id
    );

    // A second device, removed last: the guest then powers off.
    let (code, body) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test"}"#),
    );
    assert_eq!(code, 200, "{body}");
    let id = body
        .split(r#""id":""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("an id")
        .to_string();
    let start = Instant::now();
    while vm.serial().matches("# hotplug: dma ok").count() < 2 {
        assert!(start.elapsed() < Duration::from_secs(30), "{}", vm.serial());
        std::thread::sleep(Duration::from_millis(2));
    }
    let (code, body) = request(
        socket,
        "PUT",
        "vm.remove-device",
        Some(&format!(r#"{{"id":"{id}"}}"#)),
    );
    assert_eq!(code, 204, "{body}");
    vm.wait_for("ok 1 - hotplug", Duration::from_secs(30));
    assert!(vm.serial().contains("2 added, 2 DMA checked, 2 ejected"));
    assert_eq!(vm.serial().matches("# hotplug: domain").count(), 2);
}

/// `kill -USR2` has every vCPU log its state on stderr (for a guest that
/// hangs), and the VM runs on: a device hot-added afterwards is found and
/// used for DMA.
#[test]
fn sigusr2_logs_each_vcpus_state_and_the_vm_runs_on() {
    let _lock = run::vm_lock();
    let vm = Vm::start_with(
        "states",
        "console=ttyS0 tk.tests=hotplug tk.hotplug=1 tk.hotplug_ack=0",
        &["--cpus", "2"],
    );
    vm.wait_for("# hotplug: ready", Duration::from_secs(60));
    vm.signal(libc::SIGUSR2);
    let (code, body) = vm.request(
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test","id":"after"}"#),
    );
    assert_eq!(code, 200, "{body}");
    vm.wait_for("# hotplug: s2 dma ok", Duration::from_secs(30));
    let stderr = vm.kill_for_stderr();
    for vp in 0..2 {
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("vCPU {vp}: RIP 0x")))
            .unwrap_or_else(|| panic!("no state of vCPU {vp}:\n{stderr}"));
        for part in ["CR3 0x", "APIC TPR", "IRR [", "KVM_RUN returns: "] {
            assert!(line.contains(part), "no `{part}` in {line}");
        }
        assert!(!line.contains("unreadable"), "{line}");
        assert!(!line.contains("outside guest RAM"), "{line}");
    }
}

#[test]
fn removal_is_forced_when_the_guest_does_not_eject() {
    let _lock = run::vm_lock();
    let vm = Vm::start(
        "forced",
        "console=ttyS0 tk.tests=hotplug tk.hotplug=1 tk.hotplug_ack=0",
    );
    vm.wait_for("# hotplug: ready", Duration::from_secs(60));
    let socket = &vm.socket;
    let (code, body) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test","id":"stuck"}"#),
    );
    assert_eq!(code, 200, "{body}");
    vm.wait_for("# hotplug: s2 dma ok", Duration::from_secs(30));

    // The removal waits for an eject that never comes; the VMM keeps
    // answering meanwhile.
    let remover = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let r = request(
                &socket,
                "PUT",
                "vm.remove-device",
                Some(r#"{"id":"stuck"}"#),
            );
            (r, start.elapsed())
        })
    };
    vm.wait_for(
        "# hotplug: ignoring the eject request",
        Duration::from_secs(10),
    );
    vm.ping_ok();
    let (code, body) = request(socket, "GET", "vm.info", None);
    assert_eq!(code, 200);
    assert!(
        body.contains(r#""stuck""#),
        "still there until forced: {body}"
    );
    let ((code, body), waited) = remover.join().expect("remover thread");
    assert_eq!(code, 204, "{body}");
    assert!(
        waited >= vmm::rest::EJECT_TIMEOUT - Duration::from_millis(500),
        "answered after {waited:?}, before the eject timeout"
    );
    let (_, body) = request(socket, "GET", "vm.info", None);
    assert!(!body.contains(r#""stuck""#), "removed: {body}");
    assert!(domain_of(socket, "stuck").is_none());
    // The guest sees the slot empty and can delete the device's domain: the
    // forced path detached it too.
    vm.wait_for("# hotplug: removed without eject", Duration::from_secs(10));
    vm.wait_for("ok 1 - hotplug", Duration::from_secs(30));
    assert!(vm.serial().contains("# hotplug: domain"), "{}", vm.serial());
}

/// Devices given on the command line take the API's path: `vm.info` lists
/// them, names never clash with the ones the API hands out, and the API
/// removes them like any other (the guest ejects).
#[test]
fn command_line_devices_are_listed_and_removable() {
    let _lock = run::vm_lock();
    let vm = Vm::start_with(
        "cmdline",
        "console=ttyS0 tk.tests=hotplug tk.hotplug=2",
        &["--device", "dma-test", "--device", "dma-test,id=named"],
    );
    vm.wait_for("# hotplug: ready", Duration::from_secs(60));
    let socket = &vm.socket;
    let (code, body) = request(socket, "GET", "vm.info", None);
    assert_eq!(code, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let ids: Vec<&str> = info["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["dma-test0", "named"], "{body}");
    // An API device without an id gets a name of its own.
    let (code, body) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test"}"#),
    );
    assert_eq!(code, 200, "{body}");
    let added: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let new_id = added["id"].as_str().expect("id").to_string();
    assert!(!["dma-test0", "named"].contains(&new_id.as_str()), "{body}");
    vm.wait_for("# hotplug: dma ok", Duration::from_secs(30));
    // The boot device leaves through the API, acked by the guest.
    for id in ["dma-test0", new_id.as_str()] {
        let body = format!(r#"{{"id":"{id}"}}"#);
        let (code, answer) = request(socket, "PUT", "vm.remove-device", Some(&body));
        assert_eq!(code, 204, "{id}: {answer}");
    }
    vm.wait_for("ok 1 - hotplug", Duration::from_secs(30));
    let (_, body) = request(socket, "GET", "vm.info", None);
    let info: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let ids: Vec<&str> = info["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["named"], "{body}");
    assert_eq!(vm.serial().matches("# hotplug: ejected").count(), 2);
}

/// `"iommu": "direct"` means what api/openapi.json says: the device stays in
/// the default domain (IOVA = GPA) and the guest cannot move it. The guest
/// tries (ATTACH to a domain of its own) and is refused.
#[test]
fn a_direct_device_stays_where_the_vmm_put_it() {
    let _lock = run::vm_lock();
    let vm = Vm::start("direct", "console=ttyS0 tk.tests=hotplug tk.hotplug=1");
    vm.wait_for("# hotplug: ready", Duration::from_secs(60));
    let socket = &vm.socket;
    let (code, body) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test","id":"pinned","iommu":"direct"}"#),
    );
    assert_eq!(code, 200, "{body}");
    vm.wait_for(
        "stays at IOVA = GPA: ATTACH refused (INVALID_DEVICE_ID)",
        Duration::from_secs(30),
    );
    assert!(vm.serial().contains("# hotplug: dma ok"), "{}", vm.serial());
    let d = domain_of(socket, "pinned").expect("in a domain");
    assert_eq!(d.domain_type, api::DomainType::Default, "{d:?}");
    let (code, body) = request(socket, "GET", "vm.info", None);
    assert_eq!(code, 200);
    assert!(body.contains(r#""iommu":"direct""#), "{body}");
    let (code, body) = request(
        socket,
        "PUT",
        "vm.remove-device",
        Some(r#"{"id":"pinned"}"#),
    );
    assert_eq!(code, 204, "{body}");
    vm.wait_for("ok 1 - hotplug", Duration::from_secs(30));
}

/// `bus=vpci` devices (each on its own Hyper-V virtual PCI bus, offered
/// over VMBus; Linux's tests are `linux_vpci_device_behind_the_pviommu`
/// and `linux_vpci_hotplug_through_the_api`): listed at their bus's domain,
/// absent from the root the test kernel scans; added and removed through
/// the API (this guest never connects to VMBus, so there is nothing to
/// eject and the removal is immediate); a bad `bus` is a 400. The root
/// keeps working beside them.
#[test]
fn a_vpci_device_is_listed_on_its_own_bus() {
    let _lock = run::vm_lock();
    let vm = Vm::start_with(
        "vpci",
        "console=ttyS0 tk.tests=hotplug tk.hotplug=1",
        &["--device", "dma-test,id=vp0,bus=vpci"],
    );
    vm.wait_for("# hotplug: ready", Duration::from_secs(60));
    let socket = &vm.socket;
    let (code, body) = request(socket, "GET", "vm.info", None);
    assert_eq!(code, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let bdfs: Vec<&str> = info["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["bdf"].as_str())
        .collect();
    // Root slot 1, hidden there: its bus's domain is 0x5601.
    assert_eq!(bdfs, ["5601:00:00.0"], "{body}");
    let (code, answer) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test","id":"vp1","bus":"vpci"}"#),
    );
    assert_eq!(code, 200, "{answer}");
    assert!(answer.contains(r#""bdf":"5602:00:00.0""#), "{answer}");
    for id in ["vp0", "vp1"] {
        let start = Instant::now();
        let body = format!(r#"{{"id":"{id}"}}"#);
        let (code, answer) = request(socket, "PUT", "vm.remove-device", Some(&body));
        assert_eq!(code, 204, "{id}: {answer}");
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{id}: waited for an eject"
        );
    }
    let (_, body) = request(socket, "GET", "vm.info", None);
    assert!(!body.contains("vp0") && !body.contains("vp1"), "{body}");
    let (code, answer) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test","bus":"pci"}"#),
    );
    assert_eq!(code, 400, "{answer}");
    // A root device beside it: hot-added, found, used, ejected.
    let (code, answer) = request(
        socket,
        "PUT",
        "vm.add-device",
        Some(r#"{"kind":"dma-test","id":"r0","bus":"root"}"#),
    );
    assert_eq!(code, 200, "{answer}");
    vm.wait_for("# hotplug: dma ok", Duration::from_secs(30));
    let (code, answer) = request(socket, "PUT", "vm.remove-device", Some(r#"{"id":"r0"}"#));
    assert_eq!(code, 204, "{answer}");
    vm.wait_for("ok 1 - hotplug", Duration::from_secs(30));
}
