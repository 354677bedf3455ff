//! VFIO passthrough end to end with pvmm's own code, on a host that has
//! both a standard KVM and VFIO devices: the nested harness's L1
//! (tests/nested.rs), where QEMU's edu and an NVMe controller are bound to
//! vfio-pci. `#[ignore]`d elsewhere (no machine here has both).
//!
//! - edu, hot-added through the API into a running test kernel twice: the
//!   kernel drives its DMA engine and MSI in the default domain and in an
//!   S2 domain of its own, where a DMA after UNMAP is refused and the host
//!   (L1) kernel logs the IOMMU fault; hot-removed (the guest ejects); the
//!   function is free again (another program can bind it) once pvmm let go.
//! - NVMe, given on the command line and hot-added through the API: Linux's
//!   nvme driver writes a pattern and reads it back with its interrupts
//!   (MSI-X) delivered; the harness checks the disk image afterwards
//!   (`PVMM_NVME_TOKEN` names the pattern).
//! - NVMe on a Hyper-V virtual PCI bus behind Linux's own pvIOMMU driver,
//!   given on the command line and then hot-removed and hot-added over
//!   vPCI three times through the API.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::api_vm::{iommu_domains, remove_device, request, ApiVm};
use integration_tests::linux::{self, nested_retry, Console, BOOT_DEADLINE, USERSPACE};
use integration_tests::{artifacts, run};

/// The sysfs path of the PCI function `vendor:device`, which must be bound
/// to vfio-pci.
fn vfio_function(vendor: u16, device: u16) -> PathBuf {
    let want = format!("{vendor:#06x}:{device:#06x}");
    let found = std::fs::read_dir("/sys/bus/pci/devices")
        .expect("/sys/bus/pci/devices")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let id = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            format!("{}:{}", id("vendor").trim(), id("device").trim()) == want
        })
        .unwrap_or_else(|| panic!("no PCI function {want} on this host"));
    let driver = std::fs::read_link(found.join("driver")).unwrap_or_default();
    assert!(
        driver.ends_with("vfio-pci"),
        "{} is bound to {driver:?}, not vfio-pci",
        found.display()
    );
    found
}

/// Whether another program could bind `sysfs` now: it opens the function
/// on an iommufd of its own (and closes it again).
fn free_for_others(sysfs: &Path) -> Result<(), String> {
    let host = devices::vfio::HostIommu::open().map_err(|e| e.to_string())?;
    devices::vfio::VfioPciDevice::open_with(sysfs, &host, Default::default())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The host kernel's log from now on (/dev/kmsg, read without blocking).
struct Kmsg(std::fs::File);

impl Kmsg {
    fn open() -> Self {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .expect("/dev/kmsg");
        f.seek(SeekFrom::End(0)).expect("seek /dev/kmsg");
        Self(f)
    }

    /// The records logged since the last call.
    fn read(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        // One record per read; EAGAIN at the end.
        while let Ok(n) = self.0.read(&mut buf) {
            if n == 0 {
                break;
            }
            let rec = String::from_utf8_lossy(&buf[..n]);
            if let Some((_, msg)) = rec.split_once(';') {
                out.push(msg.trim_end().to_string());
            }
        }
        out
    }
}

#[test]
#[ignore = "needs a standard KVM and an edu device bound to vfio-pci: the nested harness runs it"]
fn vfio_edu_hot_added_into_the_test_kernel() {
    let edu = vfio_function(0x1234, 0x11e8);
    let bdf = edu
        .file_name()
        .and_then(|n| n.to_str())
        .expect("BDF")
        .trim_start_matches("0000:")
        .to_string();
    let mut kmsg = Kmsg::open();
    let _lock = run::vm_lock();
    let vm = ApiVm::start(
        "edu",
        "console=ttyS0 tk.tests=hotplug tk.hotplug=2 tk.hotplug_ms=600000",
    );
    vm.wait_for("# hotplug: ready", Duration::from_secs(120));
    let body = format!(r#"{{"path":{:?},"id":"edu"}}"#, edu.display().to_string());
    for round in 0..2 {
        let (code, answer) = vm.request("PUT", "vm.add-device", Some(&body));
        assert_eq!(code, 200, "round {round}: {answer}");
        // The same function under another spelling is the same device.
        let canonical = edu.canonicalize().expect("canonical path");
        assert_ne!(canonical, edu);
        let again = format!(
            r#"{{"path":{:?},"id":"edu-again"}}"#,
            canonical.display().to_string()
        );
        let (code, answer) = vm.request("PUT", "vm.add-device", Some(&again));
        assert_eq!(
            code, 409,
            "round {round}: the same function twice: {answer}"
        );
        // pvmm holds it now: nobody else can bind it.
        let held = free_for_others(&edu);
        assert!(
            held.is_err(),
            "round {round}: edu is free while passed through"
        );
        vm.wait_count("# hotplug: edu ok", round, Duration::from_secs(120));
        let serial = vm.serial();
        assert!(
            serial.contains("DMA through IOVA 0xa000000 checked; after UNMAP the DMA was refused"),
            "{serial}"
        );
        // The refused DMA is a fault of the host's IOMMU.
        let log = kmsg.read();
        let fault = log
            .iter()
            .find(|l| l.contains("DMAR") && l.contains(&bdf) && l.contains("fault addr 0xa000000"));
        assert!(
            fault.is_some(),
            "round {round}: no DMAR fault of {bdf} at 0xa000000 in the host's log:\n{}",
            log.join("\n")
        );
        println!(
            "round {round}: {}",
            fault.map(String::as_str).unwrap_or_default()
        );
        let (code, domains) = vm.request("GET", "iommu.domains", None);
        assert_eq!(code, 200);
        assert!(domains.contains(r#""edu""#), "{domains}");
        let (code, answer) = vm.request("PUT", "vm.remove-device", Some(r#"{"id":"edu"}"#));
        assert_eq!(code, 204, "round {round}: {answer}");
        vm.wait_count("# hotplug: ejected", round, Duration::from_secs(30));
        // pvmm let go of it: another program can bind it, and close it.
        free_for_others(&edu).unwrap_or_else(|e| panic!("round {round}: edu is still held: {e}"));
        let (_, info) = vm.request("GET", "vm.info", None);
        assert!(!info.contains(r#""edu""#), "{info}");
    }
    vm.wait_for("ok 1 - hotplug", Duration::from_secs(60));
    assert_eq!(vm.count("# hotplug: domain"), 2, "{}", vm.serial());
}

/// The L2 script that writes a pattern to the NVMe namespace at
/// `pvmm.nvme_mib=` MiB and reads it back (O_DIRECT both ways), then
/// reports the nvme interrupts. With `pvmm.nvme_rounds=N` it does that for
/// N controllers one after the other (hot-plugged), each time saying
/// `PVMM-NVME-ROUND r` when done and `PVMM-NVME-GONE r` once the
/// controller left.
const NVME_SCRIPT: &str = r#"
rounds=1
for a in $(cat /proc/cmdline); do
    case "$a" in
    pvmm.token=*) token=${a#pvmm.token=} ;;
    pvmm.nvme_mib=*) mib=${a#pvmm.nvme_mib=} ;;
    pvmm.nvme_rounds=*) rounds=${a#pvmm.nvme_rounds=} ;;
    esac
done
yes "pvmm-nvme-$token" | head -c 1048576 >/tmp/pattern
# The namespace of whichever controller is there (a hot-added one may
# get another number).
disk() { for d in /dev/nvme*n1; do [ -b "$d" ] && echo "$d" && return; done; }
r=0
while [ $r -lt $rounds ]; do
    i=0
    while [ -z "$(disk)" ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i + 1)); done
    ns=$(disk)
    if [ -z "$ns" ]; then echo "PVMM-NVME no namespace"; exit; fi
    rm -f /tmp/back
    dd if=/tmp/pattern of=$ns bs=65536 seek=$((mib * 16)) oflag=direct conv=fsync 2>/dev/null
    dd if=$ns of=/tmp/back bs=65536 skip=$((mib * 16)) count=16 iflag=direct 2>/dev/null
    if cmp -s /tmp/pattern /tmp/back; then echo "PVMM-NVME pattern written and read back"; else echo "PVMM-NVME mismatch"; fi
    grep nvme /proc/interrupts | while read -r line; do
        n=0
        for f in $line; do case "$f" in *[!0-9]*) ;; *) n=$((n + f)) ;; esac; done
        echo "PVMM-NVME-IRQ $n ${line##* }"
    done
    if [ $rounds -gt 1 ]; then
        echo "PVMM-NVME-ROUND $r"
        i=0
        while [ -b "$ns" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
        if [ -b "$ns" ]; then echo "PVMM-NVME $ns stayed"; exit; fi
        echo "PVMM-NVME-GONE $r"
    fi
    r=$((r + 1))
done
"#;

/// The pattern the harness looks for in the disk image.
fn nvme_token() -> String {
    std::env::var("PVMM_NVME_TOKEN").unwrap_or_else(|_| artifacts::random_token())
}

/// Checks the console of a guest that ran [`NVME_SCRIPT`].
fn check_nvme(lines: &[String]) {
    let text = lines.join("\n");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("PVMM-NVME pattern written and read back")),
        "{text}"
    );
    // Queue interrupts (MSI-X) arrived.
    let irqs: u64 = lines
        .iter()
        .filter_map(|l| {
            l.split_once("PVMM-NVME-IRQ ")?
                .1
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(irqs > 0, "no nvme interrupts:\n{text}");
    println!("nvme interrupts in the guest: {irqs}");
}

fn nvme_initrd(tag: &str) -> PathBuf {
    let initrd = std::env::temp_dir().join(format!("pvmm-nvme-{tag}-{}.cpio", std::process::id()));
    linux::initramfs(&initrd, &[("nvme.sh", 0o755, NVME_SCRIPT.as_bytes())])
        .unwrap_or_else(|e| panic!("initramfs: {e}"));
    initrd
}

#[test]
#[ignore = "needs a standard KVM and an NVMe controller bound to vfio-pci: the nested harness runs it"]
fn nvme_on_the_command_line() {
    nested_retry("NVMe on the command line", nvme_on_the_command_line_once);
}

fn nvme_on_the_command_line_once() {
    let nvme = vfio_function(0x1b36, 0x0010);
    let k = linux::debian_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = nvme_initrd("cmdline");
    let cmdline = format!(
        "console=ttyS0 panic=-1 pvmm.run=nvme.sh pvmm.token={} pvmm.nvme_mib=0",
        nvme_token()
    );
    // On the ordinary root: Debian's kernel has VMBus and vPCI as modules,
    // which this initramfs does not load.
    let device = format!("vfio,path={},id=nvme0,bus=root", nvme.display());
    let _lock = run::vm_lock();
    let mut c = Console::start(
        &artifacts::pvmm().unwrap_or_else(|e| panic!("{e}")),
        &[
            "--kernel",
            k.bzimage.to_str().expect("utf-8"),
            "--initrd",
            initrd.to_str().expect("utf-8"),
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--device",
            &device,
            "--cmdline",
            &cmdline,
        ],
    )
    .expect("pvmm starts");
    let r = c.wait_for(USERSPACE, BOOT_DEADLINE);
    let (code, stderr, lines) = c.finish(Duration::from_secs(180));
    std::fs::remove_file(&initrd).ok();
    r.unwrap_or_else(|e| panic!("{e}\n{stderr}\n{}", lines.join("\n")));
    assert_eq!(code, Some(0), "{stderr}\n{}", lines.join("\n"));
    check_nvme(&lines);
}

/// The NVMe controller passed through on a Hyper-V virtual PCI bus
/// (`bus=vpci`) to Linux 7.2 with its own pvIOMMU driver (unmodified):
/// pci-hyperv finds it, the pvIOMMU driver puts it in its default DMA
/// domain (a paging S1 domain of the guest's), and the nvme driver writes
/// and reads back the pattern at 16 MiB through its DMA-API mappings: every
/// DMA goes through the guest's S1 tables, which pvmm copies into IOMMUFD
/// on L1's VT-d (it cannot nest): at each doorbell for the mappings Linux
/// adds, and at each of the guest's flushes for those it removes. The
/// guest runs in strict mode (`iommu.strict=1`), so every unmap is a
/// page-selective flush (FLUSH_DEVICE_DOMAIN_LIST). The harness checks the
/// disk image afterwards; the test prints the flush figures: the guest's
/// calls, the ranges and pages they covered, and how many of those pages
/// had not changed (over-flushed), from pvmm's IOMMUFD counters. Then,
/// three times, the controller is removed through the API (PCI_EJECT:
/// Linux ejects it well before pvmm's forced-removal timeout) and
/// hot-added again over vPCI, where Linux's nvme driver writes and reads
/// back the pattern through a new S1 paging domain.
#[test]
#[ignore = "needs a standard KVM and an NVMe controller bound to vfio-pci: the nested harness runs it"]
fn nvme_on_vpci_behind_the_pviommu() {
    nested_retry("NVMe on vPCI", nvme_on_vpci_once);
}

fn nvme_on_vpci_once() {
    let nvme = vfio_function(0x1b36, 0x0010);
    let bzimage = linux::hv_pviommu_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = nvme_initrd("vpci");
    let socket = std::env::temp_dir().join(format!("pvmm-nvme-vpci-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let cmdline = format!(
        "console=ttyS0 panic=-1 iommu.strict=1 pvmm.run=nvme.sh pvmm.end=wait pvmm.token={} pvmm.nvme_mib=16 pvmm.nvme_rounds=4",
        nvme_token()
    );
    let device = format!("vfio,path={},id=nvme0,bus=vpci", nvme.display());
    let _lock = run::vm_lock();
    let mut c = Console::start_with_env(
        &artifacts::pvmm().unwrap_or_else(|e| panic!("{e}")),
        &[
            "--kernel",
            bzimage.to_str().expect("utf-8"),
            "--initrd",
            initrd.to_str().expect("utf-8"),
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--device",
            &device,
            "--api-socket",
            socket.to_str().expect("utf-8"),
            "--cmdline",
            &cmdline,
        ],
        // pvmm's counters at exit (info).
        &[("RUST_LOG", "info")],
    )
    .expect("pvmm starts");
    if let Err(e) = c.wait_for("PVMM-NVME-ROUND 0", BOOT_DEADLINE) {
        c.fail(&e);
    }
    // The flush figures are those of the controller given at boot.
    let (status, domains) = request(&socket, "GET", "iommu.domains", None);
    // Then three times: removed over vPCI through the API (Linux ejects
    // it), and hot-added again, a new controller for Linux's nvme driver.
    for round in 1..4 {
        let gone = format!("nvme{}", round - 1);
        let took = remove_device(&socket, &gone);
        assert!(
            took < vmm::rest::EJECT_TIMEOUT,
            "round {round}: the removal took {took:?}: Linux did not eject\n{}",
            c.text()
        );
        if let Err(e) = c.wait_for(
            &format!("PVMM-NVME-GONE {}", round - 1),
            Duration::from_secs(60),
        ) {
            c.fail(&e);
        }
        let id = format!("nvme{round}");
        let body = format!(
            r#"{{"path":{:?},"id":"{id}","bus":"vpci"}}"#,
            nvme.display().to_string()
        );
        let (code, answer) = request(&socket, "PUT", "vm.add-device", Some(&body));
        assert_eq!(code, 200, "round {round}: {answer}");
        if let Err(e) = c.wait_for(
            &format!("PVMM-NVME-ROUND {round}"),
            Duration::from_secs(180),
        ) {
            c.fail(&e);
        }
        let now = iommu_domains(&socket);
        assert!(
            now.domain_of(&id)
                .is_some_and(api::DomainInfo::is_s1_paging),
            "round {round}: {id} is not in a paging S1 domain: {now:?}"
        );
        let failed = now.failed_calls();
        assert!(
            failed.is_empty(),
            "round {round}: calls that failed: {failed:?}"
        );
        println!("round {round}: {gone} ejected by Linux in {took:.2?}; {id} hot-added over vPCI, pattern written and read back");
    }
    remove_device(&socket, "nvme3");
    if let Err(e) = c.wait_for("PVMM-NVME-GONE 3", Duration::from_secs(60)) {
        c.fail(&e);
    }
    let last = iommu_domains(&socket);
    let failed = last.failed_calls();
    assert!(
        failed.is_empty(),
        "after the last removal, calls that failed: {failed:?}"
    );
    let (stop, _) = request(&socket, "PUT", "vmm.shutdown", None);
    let (code, stderr, lines) = c.finish(Duration::from_secs(60));
    std::fs::remove_file(&initrd).ok();
    std::fs::remove_file(&socket).ok();
    let text = lines.join("\n");
    assert_eq!(
        (status, stop, code),
        (200, 204, Some(0)),
        "{stderr}\n{text}"
    );
    check_nvme(&lines);
    let rounds = lines
        .iter()
        .filter(|l| l.contains("PVMM-NVME pattern written and read back"))
        .count();
    assert_eq!(rounds, 4, "{text}");
    for l in lines
        .iter()
        .filter(|l| l.contains("hv_pci") || l.contains("iommu group"))
    {
        println!("  {l}");
    }
    let v: api::IommuDomainsResponse =
        serde_json::from_str(&domains).unwrap_or_else(|e| panic!("{e}: {domains}"));
    let home = v
        .domain_of("nvme0")
        .unwrap_or_else(|| panic!("nvme0 is in no domain: {domains}"));
    assert!(
        home.is_s1_paging(),
        "nvme0 is not in a paging S1 domain: {domains}"
    );
    let failed = v.failed_calls();
    assert!(failed.is_empty(), "calls that failed: {failed:?}\n{text}");
    let flush = &home.flushes;
    // Strict mode: every unmap is a page-selective flush, forwarded.
    assert!(v.calls("FLUSH_DEVICE_DOMAIN_LIST") > 0, "{domains}");
    println!(
        "NVMe on vPCI, S1 domain {}: guest flush calls {} (domain) + {} (list); flushed: {} full, {} ranges, {} pages",
        home.id,
        v.calls("FLUSH_DEVICE_DOMAIN"),
        v.calls("FLUSH_DEVICE_DOMAIN_LIST"),
        flush.full,
        flush.ranges,
        flush.pages
    );
    let host = stderr
        .lines()
        .find(|l| l.contains("IOMMUFD: "))
        .unwrap_or_else(|| panic!("no IOMMUFD counters from pvmm:\n{stderr}"));
    println!(
        "NVMe on vPCI, host side: {}",
        &host[host.find("IOMMUFD: ").unwrap_or(0)..]
    );
}

#[test]
#[ignore = "needs a standard KVM and an NVMe controller bound to vfio-pci: the nested harness runs it"]
fn nvme_hot_added_through_the_api() {
    nested_retry(
        "NVMe hot-added through the API",
        nvme_hot_added_through_the_api_once,
    );
}

fn nvme_hot_added_through_the_api_once() {
    let nvme = vfio_function(0x1b36, 0x0010);
    let k = linux::debian_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = nvme_initrd("api");
    let dir = std::env::temp_dir();
    let socket = dir.join(format!("pvmm-nvme-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let cmdline = format!(
        "console=ttyS0 panic=-1 pvmm.run=nvme.sh pvmm.token={} pvmm.nvme_mib=8 pvmm.end=wait",
        nvme_token()
    );
    let _lock = run::vm_lock();
    let mut c = Console::start(
        &artifacts::pvmm().unwrap_or_else(|e| panic!("{e}")),
        &[
            "--kernel",
            k.bzimage.to_str().expect("utf-8"),
            "--initrd",
            initrd.to_str().expect("utf-8"),
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--api-socket",
            socket.to_str().expect("utf-8"),
            // ACPI hotplug on the ordinary root (Debian's kernel has VMBus
            // and vPCI as modules, which this initramfs does not load).
            "--pci-bus",
            "root",
            "--cmdline",
            &cmdline,
        ],
    )
    .expect("pvmm starts");
    if let Err(e) = c.wait_for(USERSPACE, BOOT_DEADLINE) {
        c.fail(&e);
    }
    let body = format!(
        r#"{{"path":{:?},"id":"nvme0"}}"#,
        nvme.display().to_string()
    );
    let (code, answer) = request(&socket, "PUT", "vm.add-device", Some(&body));
    assert_eq!(code, 200, "{answer}");
    if let Err(e) = c.wait_for("PVMM-END", Duration::from_secs(180)) {
        c.fail(&e);
    }
    remove_device(&socket, "nvme0");
    let (code, _) = request(&socket, "PUT", "vmm.shutdown", None);
    assert_eq!(code, 204);
    let (_, stderr, lines) = c.finish(Duration::from_secs(30));
    std::fs::remove_file(&initrd).ok();
    std::fs::remove_file(&socket).ok();
    assert!(
        !stderr.contains("did not eject"),
        "Linux did not eject the NVMe controller: {stderr}"
    );
    check_nvme(&lines);
}
