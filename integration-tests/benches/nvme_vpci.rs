//! NVMe through Linux's pvIOMMU driver on a vPCI bus (issue 13), not a
//! timed test: boots Linux 7.2 with the pvIOMMU series twice with the L1's
//! NVMe controller passed through on a vPCI bus (`bus=vpci`), once with its
//! default DMA domain an identity domain (`iommu.passthrough=1`) and once a
//! paging (S1) domain, reads 4 MiB of the namespace in 4 KiB O_DIRECT reads
//! (each one NVMe command: a doorbell, a table sync on hosts that copy S1
//! tables, an interrupt), and prints the time of each and their ratio,
//! measured in the same run. Sequential reads: BusyBox's dd is what the
//! initramfs has, and one process per random read would measure fork.
//!
//! Needs a standard KVM and an NVMe controller bound to vfio-pci: the
//! nested harness runs it. Run: `cargo bench -p integration-tests --bench
//! nvme_vpci`.

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::linux::{self, Console, BOOT_DEADLINE};
use integration_tests::{artifacts, run};

/// The guest script: 1024 reads of 4 KiB, timed with /proc/uptime (10 ms).
const SCRIPT: &str = r#"
i=0
while [ ! -b /dev/nvme0n1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
cs() { read u _ </proc/uptime; echo "${u%.*}${u#*.}"; }
dd if=/dev/nvme0n1 of=/dev/null bs=4096 count=256 iflag=direct 2>/dev/null
a=$(cs)
dd if=/dev/nvme0n1 of=/dev/null bs=4096 count=1024 iflag=direct 2>/dev/null
b=$(cs)
echo "PVMM-BENCH reads=1024 cs=$((b - a))"
"#;

/// The NVMe controller (QEMU's, 1b36:0010) bound to vfio-pci, if any.
fn nvme() -> Option<PathBuf> {
    std::fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let id = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            id("vendor").trim() == "0x1b36"
                && id("device").trim() == "0x0010"
                && std::fs::read_link(p.join("driver")).is_ok_and(|d| d.ends_with("vfio-pci"))
        })
}

/// Centiseconds of the 1024 reads with the default domain `identity`.
fn run_once(nvme: &std::path::Path, identity: bool) -> u64 {
    let bzimage = linux::hv_pviommu_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = std::env::temp_dir().join(format!(
        "pvmm-bench-nvme-{}-{identity}.cpio",
        std::process::id()
    ));
    linux::initramfs(&initrd, &[("bench.sh", 0o755, SCRIPT.as_bytes())])
        .unwrap_or_else(|e| panic!("initramfs: {e}"));
    let cmdline = format!(
        "console=ttyS0 panic=-1 pvmm.run=bench.sh pvmm.end=poweroff{}",
        if identity { " iommu.passthrough=1" } else { "" }
    );
    let device = format!("vfio,path={},id=nvme0,bus=vpci", nvme.display());
    let _lock = run::vm_lock();
    let mut c = Console::start(
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
            "--cmdline",
            &cmdline,
        ],
    )
    .expect("pvmm starts");
    let r = c.wait_for("PVMM-BENCH", BOOT_DEADLINE);
    let line = c.seen.last().cloned().unwrap_or_default();
    let (code, stderr, lines) = c.finish(Duration::from_secs(60));
    std::fs::remove_file(&initrd).ok();
    r.unwrap_or_else(|e| panic!("{e}\n{stderr}\n{}", lines.join("\n")));
    assert_eq!(code, Some(0), "{stderr}");
    line.split("cs=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no time in {line:?}"))
}

fn main() {
    if !artifacts::require_kvm() {
        return;
    }
    let nvme = nvme();
    // The nested harness's L1 has one; under CI=true a missing one fails.
    if !artifacts::require(
        nvme.is_some(),
        "no NVMe controller (1b36:0010) bound to vfio-pci: the nested harness runs this",
    ) {
        return;
    }
    let Some(nvme) = nvme else {
        return;
    };
    let identity = run_once(&nvme, true).max(1);
    let paging = run_once(&nvme, false).max(1);
    let rate = |cs: u64| 1024 * 100 / cs;
    println!(
        "NVMe on vPCI, 1024 reads of 4 KiB (O_DIRECT): identity domain {} ms ({} reads/s), paging S1 domain {} ms ({} reads/s); ratio paging/identity {:.2}",
        identity * 10,
        rate(identity),
        paging * 10,
        rate(paging),
        paging as f64 / identity as f64
    );
}
