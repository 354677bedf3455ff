//! The nested-KVM harness: pvmm on a standard KVM (kvm_amd), the KVM every
//! user runs, here nested under QEMU TCG with `-cpu EPYC,+svm,+npt`.
//!
//! The L1 guest is the host-kernel harness's Linux (host-kernel/
//! build-kernel.sh: IOMMUFD, VFIO, intel-iommu, and KVM/kvm_amd), on a q35
//! with an emulated VT-d, QEMU's edu DMA device and an NVMe controller
//! backed by a disk image; both devices are bound to vfio-pci in L1. Its
//! initramfs carries busybox, pvmm, pvmm-remote, the test kernel, Debian's
//! Linux (bzImage and vmlinux), Linux 7.2 with Linux's own Hyper-V pvIOMMU
//! driver (linux-hv-pviommu/) and this workspace's own test executables,
//! each at the absolute path it has on the host (so the paths compiled into
//! them hold in L1), with the shared libraries they link. L1's `/init` runs
//! the [`PLAN`]: the same test binaries that run on the host, with
//! `--include-ignored` where their tests need a standard KVM (full Linux
//! boots, Linux's ACPI hotplug, VFIO and NVMe passthrough), and the
//! guest-driven hypercall benchmark, one test per run of its binary (a
//! [`Unit`]). Every unit's libtest output comes back over the serial
//! console; each unit must exit 0, and the NVMe pattern the L2 Linux wrote
//! must be in the disk image after QEMU exits. A unit that fails or never
//! ends (the nested emulator's own failures) runs again in a fresh L1,
//! within a time [`BUDGET`].
//!
//! Without QEMU, busybox or the kernel's build tools (.ci/setup installs
//! them) the test fails under CI=true and is skipped otherwise.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::linux::{self, Cpio};
use integration_tests::{artifacts, run};

/// One step of the plan: a test or bench target of the workspace, the
/// flags its tests run with, and the tests it leaves out.
struct Step {
    kind: &'static str,
    target: &'static str,
    flags: &'static [&'static str],
    skip: &'static [&'static str],
}

const fn tests(target: &'static str, flags: &'static [&'static str]) -> Step {
    Step {
        kind: "test",
        target,
        flags,
        skip: &[],
    }
}

/// What L1 runs, in order, one test at a time (each its own [`Unit`]).
/// One VM at a time: L1 has two vCPUs.
const PLAN: &[Step] = &[
    // vmm: the embedded test kernel's suites, exits, hooks (the restart of
    // a time-sliced hypercall), PCI.
    tests("boot", &[]),
    tests("exits", &[]),
    tests("hooks", &[]),
    tests("pci", &[]),
    // integration-tests: every test-kernel suite at 1, 2 and 4 vCPUs, the
    // pvIOMMU suites with a rep budget of 64, the API and hotplug.
    tests("pvmm", &[]),
    tests("pviommu", &[]),
    tests("api", &[]),
    // Linux: full boots, ACPI hotplug, the pvIOMMU driver. Not the banner
    // and 64-bit entry tests, made for a KVM where Linux stops early
    // (kvm_pvm): every full boot here checks the banner and e820 map.
    Step {
        kind: "test",
        target: "linux",
        flags: &["--include-ignored", "--nocapture"],
        skip: &["banner_and_e820", "bzimage_64_bit_entry"],
    },
    // VFIO: edu into the test kernel, NVMe into Linux.
    tests("passthrough", &["--include-ignored", "--nocapture"]),
    // The README's examples (.ci/main needs cargo: it runs on the host).
    Step {
        kind: "test",
        target: "readme",
        flags: &["--include-ignored"],
        skip: &["the_main_command_as_written"],
    },
    // The guest-driven hypercall benchmark, as ratios.
    Step {
        kind: "bench",
        target: "pviommu_guest",
        flags: &[],
        skip: &[],
    },
    // NVMe reads on vPCI, identity against paging domain.
    Step {
        kind: "bench",
        target: "nvme_vpci",
        flags: &[],
        skip: &[],
    },
];

/// What L1's `/init` runs and the harness retries: one test of a step
/// (`--exact`), or a whole bench target.
struct Unit {
    label: String,
    exe: PathBuf,
    args: Vec<String>,
}

/// The units of `step`, whose executable is `exe`: one per test that
/// `exe --list` names (less the step's skips; with `filter`, a test-name
/// filter, only those it matches), or the bench target as one.
fn units(step: &Step, exe: &Path, filter: Option<&str>) -> Vec<Unit> {
    let flags = step.flags.iter().map(|f| f.to_string());
    if step.kind == "bench" {
        return vec![Unit {
            label: format!("bench {}", step.target),
            exe: exe.to_path_buf(),
            args: flags.collect(),
        }];
    }
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .args(filter.into_iter().flat_map(str::split_whitespace))
        .output()
        .unwrap_or_else(|e| panic!("{} --list: {e}", exe.display()));
    assert!(out.status.success(), "{} --list failed", exe.display());
    let names = test_names(&String::from_utf8_lossy(&out.stdout));
    assert!(
        filter.is_some() || !names.is_empty(),
        "{} lists no tests",
        exe.display()
    );
    names
        .into_iter()
        .filter(|n| !step.skip.contains(&n.as_str()))
        .map(|name| Unit {
            label: format!("test {} {name}", step.target),
            exe: exe.to_path_buf(),
            args: flags
                .clone()
                .chain(["--exact".to_string(), name.clone()])
                .collect(),
        })
        .collect()
}

/// The test names in libtest's `--list --format terse` output
/// (`name: test` lines; benches and anything else are not tests).
fn test_names(list: &str) -> Vec<String> {
    list.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

/// How long one L1 run may take, all its units included.
const L1_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// L1's RAM: one L2 guest at a time, the largest with 5 GiB reserved
/// (vmm's boot test with memory above 4 GiB), which the kernel's overcommit
/// check must allow.
const L1_MEMORY: &str = "8G";

fn harness_dir() -> PathBuf {
    artifacts::workspace_root().join("integration-tests/host-kernel")
}

/// The L1 kernel (host-kernel/build-kernel.sh, cached); `None` after a
/// SKIP line when a Debian package is missing outside CI.
fn l1_kernel() -> Option<PathBuf> {
    let script = harness_dir().join("build-kernel.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        artifacts::require(false, &format!("the L1 kernel cannot be built:\n{stderr}"));
        return None;
    }
    assert!(out.status.success(), "build-kernel.sh failed:\n{stderr}");
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The shared libraries `elf` loads (its interpreter included), from ldd.
fn libraries(elf: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(elf).output().expect("ldd runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `elf` without its debug information (test binaries are large).
fn stripped(elf: &Path, work: &Path) -> Vec<u8> {
    let out = work.join("stripped");
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(elf)
        .status()
        .expect("strip runs");
    assert!(status.success(), "strip {}", elf.display());
    std::fs::read(&out).expect("stripped binary")
}

/// The files of the L1 initramfs, by absolute path.
struct Tree {
    cpio: Cpio,
    dirs: BTreeSet<String>,
}

impl Tree {
    fn new() -> Self {
        let mut t = Self {
            cpio: Cpio::new(),
            dirs: BTreeSet::new(),
        };
        t.cpio.dir("dev");
        t.cpio.entry("dev/console", 0o020600, &[], (5, 1));
        for d in ["bin", "proc", "sys", "tmp", "root"] {
            t.mkdir(d);
        }
        t
    }

    fn mkdir(&mut self, path: &str) {
        let mut at = String::new();
        for part in path.trim_matches('/').split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if self.dirs.insert(at.clone()) {
                self.cpio.dir(&at);
            }
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        if let Some((dir, _)) = path.rsplit_once('/') {
            self.mkdir(dir);
        }
        self.cpio.file(path, mode, data);
    }

    /// A host file at its own path, and the libraries it links.
    fn host_file(&mut self, path: &Path, strip: bool, work: &Path) {
        let data = if strip {
            stripped(path, work)
        } else {
            std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        self.file(path.to_str().expect("utf-8 path"), 0o755, &data);
        for lib in libraries(path) {
            let name = lib.to_str().expect("utf-8 path").to_string();
            if !self.dirs.contains(name.trim_start_matches('/')) {
                let data = std::fs::read(&lib).unwrap_or_else(|e| panic!("{name}: {e}"));
                // Mark it taken (files and directories share the set).
                self.dirs.insert(name.trim_start_matches('/').to_string());
                self.file(&name, 0o755, &data);
            }
        }
    }
}

/// The longest a unit may run in L1 (busybox `timeout`, SIGTERM then
/// SIGKILL: status 143 or 137): a unit that hangs must not hold back the
/// ones after it. The longest seen took 229 s, with its in-L1 retry.
const UNIT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// L1's `/init`: mounts, hands edu and NVMe to vfio-pci, runs every unit
/// (at most [`UNIT_TIMEOUT`] each) with its output framed by `NESTED-RUN`
/// and `NESTED-EXIT <status>`.
fn init_script(units: &[Unit], env: &[(&str, String)]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# No tmpfs on /tmp: the initramfs (itself in RAM) may hold the test
# binaries there, at their host paths.
echo "NESTED-L1 $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, $(grep -o -w svm /proc/cpuinfo | head -n 1), kvm: $(ls /dev/kvm)"
for dev in /sys/bus/pci/devices/*; do
    case "$(cat "$dev/vendor"):$(cat "$dev/device")" in
    0x1234:0x11e8 | 0x1b36:0x0010)
        echo vfio-pci >"$dev/driver_override"
        echo "${dev##*/}" >/sys/bus/pci/drivers_probe
        echo "NESTED-L1 ${dev##*/} $(cat "$dev/vendor"):$(cat "$dev/device") -> $(basename "$(readlink "$dev/driver")")"
        ;;
    esac
done
# A heartbeat: the harness outside takes its silence for a stalled L1.
(while true; do echo "NESTED-HEARTBEAT $(cut -d' ' -f1 /proc/uptime)"; sleep 20; done) &
# The units to run this time: nested.units=N,M,... (indices), else all.
for a in $(cat /proc/cmdline); do
    case "$a" in nested.units=*) units=",${a#nested.units=}," ;; esac
done
want() { [ -z "$units" ] || case "$units" in *",$1,"*) true ;; *) false ;; esac; }
"#,
    );
    for (k, v) in env {
        s.push_str(&format!("export {k}='{v}'\n"));
    }
    for (i, Unit { label, exe, args }) in units.iter().enumerate() {
        s.push_str(&format!(
            "if want {i}; then\necho 'NESTED-RUN {label}'\nstart=$(cut -d' ' -f1 /proc/uptime)\n\
             timeout -k 10 {} {} {} 2>&1\nstatus=$?\n\
             echo \"NESTED-EXIT $status {label} (from $start s to $(cut -d' ' -f1 /proc/uptime) s of L1)\"\nfi\n",
            UNIT_TIMEOUT.as_secs(),
            exe.display(),
            args.join(" ")
        ));
    }
    s.push_str("echo NESTED-DONE\npoweroff -f\n");
    s
}

/// A unit's output and exit status, from the console.
#[derive(Clone)]
struct Outcome {
    label: String,
    status: Option<i32>,
    output: String,
}

fn outcomes(console: &str) -> Vec<Outcome> {
    let mut v: Vec<Outcome> = Vec::new();
    for line in console.lines() {
        if let Some(label) = line.strip_prefix("NESTED-RUN ") {
            v.push(Outcome {
                label: label.trim().to_string(),
                status: None,
                output: String::new(),
            });
        } else if let Some(rest) = line.strip_prefix("NESTED-EXIT ") {
            if let Some(o) = v.last_mut() {
                o.status = rest.split_whitespace().next().and_then(|s| s.parse().ok());
                o.output.push_str(line);
            }
        } else if let Some(o) = v.last_mut() {
            if o.status.is_none() {
                o.output.push_str(line);
                o.output.push('\n');
            }
        }
    }
    v
}

/// Whether the plan step for `target` runs: all of them, unless
/// `PVMM_NESTED_STEPS` lists some (comma-separated target names; for
/// working on one of them, with `PVMM_NESTED_FILTER`, a test name filter
/// for every step, and `RUST_LOG`, passed to L1).
fn selected(target: &str) -> bool {
    match std::env::var("PVMM_NESTED_STEPS") {
        Ok(list) => list.split(',').any(|t| t.trim() == target),
        Err(_) => true,
    }
}

#[test]
fn pvmm_on_nested_kvm_amd() {
    let Some(mut qemu) = artifacts::require_qemu() else {
        return;
    };
    let mut qemu_data = None;
    if let Ok(q) = std::env::var("PVMM_NESTED_QEMU") {
        qemu = PathBuf::from(&q);
        qemu_data = std::env::var("PVMM_NESTED_QEMU_DATA").ok();
    }
    if !artifacts::require(
        linux::busybox().is_ok(),
        "busybox not found (.ci/setup installs busybox-static)",
    ) {
        return;
    }
    let Some(kernel) = l1_kernel() else { return };
    let work = std::env::temp_dir().join(format!("pvmm-nested-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("work dir");

    // Everything L1 runs, built for this test binary's target and profile.
    let pvmm = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    let remote =
        artifacts::workspace_binary("api", "pvmm-remote").unwrap_or_else(|e| panic!("{e}"));
    let test_kernel = artifacts::test_kernel().unwrap_or_else(|e| panic!("{e}"));
    let debian = linux::debian_kernel().unwrap_or_else(|e| panic!("{e}"));
    let hvpv = linux::hv_pviommu_kernel().unwrap_or_else(|e| panic!("{e}"));
    let vfio_dma = linux::vfio_dma_program().unwrap_or_else(|e| panic!("{e}"));
    let mut args = vec!["-p", "vmm", "-p", "integration-tests"];
    for s in PLAN {
        args.push(if s.kind == "bench" {
            "--bench"
        } else {
            "--test"
        });
        args.push(s.target);
    }
    let exes = artifacts::test_executables(&args).unwrap_or_else(|e| panic!("{e}"));

    let mut tree = Tree::new();
    let busybox = std::fs::read(linux::busybox().expect("busybox")).expect("busybox");
    tree.file("bin/busybox", 0o755, &busybox);
    tree.host_file(&pvmm, true, &work);
    tree.host_file(&remote, true, &work);
    tree.file(
        test_kernel.to_str().expect("utf-8"),
        0o644,
        &std::fs::read(&test_kernel).expect("test kernel"),
    );
    tree.file(
        "payload/bzImage",
        0o644,
        &std::fs::read(&debian.bzimage).expect("bzImage"),
    );
    tree.file(
        "payload/vmlinux",
        0o644,
        &std::fs::read(&debian.vmlinux).expect("vmlinux"),
    );
    tree.file(
        "payload/hvpv-bzImage",
        0o644,
        &std::fs::read(&hvpv).expect("Linux with the pvIOMMU driver"),
    );
    tree.file(
        "payload/vfio-dma",
        0o755,
        &std::fs::read(&vfio_dma).expect("the VFIO guest program"),
    );
    // The pattern the L2 Linux writes to the NVMe disk.
    let token = artifacts::random_token();
    // For work on one test: PVMM_NESTED_FILTER filters every step's tests.
    let filter = std::env::var("PVMM_NESTED_FILTER").ok();
    let mut units = Vec::new();
    for s in PLAN.iter().filter(|s| selected(s.target)) {
        let (_, _, exe) = exes
            .iter()
            .find(|(k, n, _)| k == s.kind && n == s.target)
            .unwrap_or_else(|| panic!("cargo built no {} target {}", s.kind, s.target));
        let of_step = self::units(s, exe, filter.as_deref());
        if !of_step.is_empty() {
            tree.host_file(exe, true, &work);
        }
        units.extend(of_step);
    }
    assert!(
        filter.is_none() || units.iter().any(|u| u.label.starts_with("test ")),
        "PVMM_NESTED_FILTER={filter:?} matches no test"
    );
    let mut env = vec![
        ("CI", "true".to_string()),
        ("HOME", "/root".to_string()),
        ("RUST_BACKTRACE", "1".to_string()),
        ("PVMM_BIN", pvmm.display().to_string()),
        ("PVMM_REMOTE_BIN", remote.display().to_string()),
        ("TEST_KERNEL", test_kernel.display().to_string()),
        ("PVMM_LINUX_BZIMAGE", "/payload/bzImage".to_string()),
        ("PVMM_LINUX_VMLINUX", "/payload/vmlinux".to_string()),
        (
            "PVMM_LINUX_HVPV_BZIMAGE",
            "/payload/hvpv-bzImage".to_string(),
        ),
        ("PVMM_GUEST_VFIO_DMA", "/payload/vfio-dma".to_string()),
        ("PVMM_NESTED", "1".to_string()),
        ("PVMM_CONSOLE_ECHO", "1".to_string()),
        ("PVMM_NVME_TOKEN", token.clone()),
    ];
    for var in ["RUST_LOG"] {
        if let Ok(v) = std::env::var(var) {
            env.push((var, v));
        }
    }
    tree.file("init", 0o755, init_script(&units, &env).as_bytes());
    let initrd = work.join("initramfs.cpio");
    std::fs::write(&initrd, tree.cpio.finish()).expect("initramfs");
    let disk = work.join("nvme.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("disk image");
    let l1 = L1 {
        qemu,
        qemu_data,
        kernel,
        initrd,
        disk: disk.clone(),
        work: work.clone(),
    };

    let _vm = run::vm_lock();
    let started = Instant::now();
    let mut results: Vec<Option<Outcome>> = units.iter().map(|_| None).collect();
    let mut log = String::new();
    let mut problems = Vec::new();
    // The nested emulator (QEMU TCG's SVM) sometimes stalls L1 or crashes an
    // L2 guest for reasons of its own: a unit that fails or never ends gets
    // more runs in a fresh L1 (up to L1_ATTEMPTS, within BUDGET), and every
    // run is reported.
    let mut to_run: Vec<usize> = (0..units.len()).collect();
    for attempt in 1..=L1_ATTEMPTS {
        let left = BUDGET.saturating_sub(started.elapsed());
        if left < MIN_L1_RUN {
            problems.push(format!(
                "out of time: the harness's L1 runs took {} s of their {} s, and units \
                 {to_run:?} still have to pass",
                started.elapsed().as_secs(),
                BUDGET.as_secs()
            ));
            break;
        }
        // The first run runs everything: no list on L1's command line.
        let list = (attempt > 1).then_some(to_run.as_slice());
        let run = l1.run(attempt, list, left.min(L1_TIMEOUT));
        log.push_str(&format!(
            "=== L1 run {attempt} ({} units): {} s, {}\n{}\n",
            to_run.len(),
            run.wall.as_secs(),
            run.end,
            run.console
        ));
        let found = outcomes(&run.console);
        // Failed units with their rank for the next run: those that never
        // started first, then those L1 died under, then those that failed,
        // so that a unit that fails the same way every time (or kills L1)
        // does not keep the others from running.
        let mut failed = Vec::new();
        for &i in &to_run {
            let label = &units[i].label;
            let o = found.iter().find(|o| &o.label == label).cloned();
            let rank = match &o {
                None => 0,
                Some(o) if o.status.is_none() => 1,
                Some(o) if o.status != Some(0) => 2,
                Some(_) => 3,
            };
            if rank < 3 {
                failed.push((rank, i));
                println!(
                    "nested harness: {label} failed in L1 run {attempt} ({})",
                    o.as_ref().map_or("did not finish".to_string(), |o| format!(
                        "status {:?}",
                        o.status
                    ))
                );
            }
            // A later run that never reached the unit keeps its failure.
            if o.is_some() {
                results[i] = o;
            }
        }
        if failed.is_empty() {
            break;
        }
        failed.sort_by_key(|&(rank, _)| rank);
        let failed: Vec<usize> = failed.into_iter().map(|(_, i)| i).collect();
        to_run = failed;
        if attempt == L1_ATTEMPTS {
            problems.push(format!(
                "L1 run {attempt} ended: {}\n{}",
                run.end, run.stderr
            ));
        }
    }
    let image = std::fs::read(&disk).unwrap_or_default();
    std::fs::remove_dir_all(&work).ok();
    println!("{log}");
    // Kept for the CI log, which shows the figures in it (.ci/test).
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nested-harness.log");
    if let Err(e) = std::fs::write(&kept, &log) {
        println!("cannot keep the log in {}: {e}", kept.display());
    }
    for (Unit { label, .. }, result) in units.iter().zip(&results) {
        match result {
            None => problems.push(format!("{label}: did not finish")),
            Some(o) if o.status != Some(0) => {
                problems.push(format!("{label}: exit status {:?}\n{}", o.status, o.output))
            }
            Some(_) => {}
        }
    }
    // What L2's nvme driver wrote is on the disk: at 0 (the command-line
    // device), at 8 MiB (the hot-added one) and at 16 MiB (the one on
    // vPCI, behind Linux's pvIOMMU driver), where those tests ran.
    let pattern = format!("pvmm-nvme-{token}\n");
    for (test, mib) in [
        ("nvme_on_the_command_line", 0usize),
        ("nvme_hot_added_through_the_api", 8),
        ("nvme_on_vpci_behind_the_pviommu", 16),
    ] {
        let label = format!("test passthrough {test}");
        if !units.iter().any(|u| u.label == label) {
            continue;
        }
        let at = mib << 20;
        let found = image
            .get(at..at + pattern.len())
            .is_some_and(|b| b == pattern.as_bytes());
        if !found {
            problems.push(format!(
                "{label}: the NVMe disk image has no {pattern:?} at {mib} MiB"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// How an L1 run ended.
struct L1Run {
    console: String,
    stderr: String,
    wall: Duration,
    end: String,
}

/// L1 runs a failing unit gets in all (a fresh L1 each): nested TCG's SVM
/// sometimes stalls or crashes an L2 guest, or L1 itself (one CI run lost
/// an L1 and then two NVMe boots in a row, each in its own way; another
/// lost two L1s to freezes and one to a crash in the `linux` step). A
/// fresh L1 runs only the units that have not passed yet.
const L1_ATTEMPTS: u32 = 5;

/// What all L1 runs together may take: CI's whole run must end within 90
/// minutes, and a nested emulator that fails run after run must fail the
/// harness, not CI's clock (one CI run of five whole-step retries did).
const BUDGET: Duration = Duration::from_secs(50 * 60);

/// Less time than this left in [`BUDGET`] starts no further L1: booting L1
/// and one Linux guest in it take about that long.
const MIN_L1_RUN: Duration = Duration::from_secs(3 * 60);

/// What it takes to boot L1.
struct L1 {
    qemu: PathBuf,
    qemu_data: Option<String>,
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
    work: PathBuf,
}

/// L1 prints a heartbeat every 20 s (never more than 20.3 s apart in six
/// nested runs' logs, and the first within about 3 s of L1's boot): this
/// much silence is a stalled L1, which never recovers, so a longer wait
/// only delays the fresh L1.
const STALL: Duration = Duration::from_secs(90);

impl L1 {
    /// Boots L1 running the units `units` (indices; `None`: all of them),
    /// and waits until it powers off, stalls ([`STALL`]) or runs out of
    /// `time`.
    fn run(&self, attempt: u32, units: Option<&[usize]>, time: Duration) -> L1Run {
        let console_log = self.work.join(format!("console-{attempt}.log"));
        let stderr_log = self.work.join(format!("qemu-{attempt}.err"));
        let list = units.map_or(String::new(), |u| {
            let list: Vec<String> = u.iter().map(usize::to_string).collect();
            format!("nested.units={}", list.join(","))
        });
        let append = format!(
            "console=ttyS0 intel_iommu=on loglevel=5 panic=-1 {list} {}",
            std::env::var("PVMM_NESTED_L1_EXTRA").unwrap_or_default()
        );
        let mut c = Command::new(&self.qemu);
        if let Some(d) = &self.qemu_data {
            c.args(["-L", d, "-L", "/usr/share/seabios"]);
        }
        c.args([
            "-nodefaults",
            "-accel",
            "tcg",
            "-M",
            "q35,kernel-irqchip=split",
            "-cpu",
            "EPYC,+svm,+npt,-xsave,-avx,-avx2,-fma,-f16c",
            "-smp",
            "2",
            "-m",
            L1_MEMORY,
            "-device",
            "intel-iommu,intremap=on,caching-mode=on",
            "-device",
            "edu",
            "-drive",
        ])
        .arg(format!(
            "file={},if=none,id=nvm,format=raw",
            self.disk.display()
        ))
        .args(["-device", "nvme,serial=pvmm-nvme,drive=nvm", "-kernel"])
        .arg(&self.kernel)
        .arg("-initrd")
        .arg(&self.initrd)
        .args(["-append", &append])
        .args(["-display", "none", "-monitor", "none", "-serial"])
        .arg(format!("file:{}", console_log.display()))
        .arg("-no-reboot")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_log).map_or(Stdio::null(), Stdio::from));
        let start = Instant::now();
        let mut child = c.spawn().expect("QEMU starts");
        let (mut size, mut changed) = (0u64, Instant::now());
        let end = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("QEMU exited: {status}");
            }
            let now = std::fs::metadata(&console_log).map_or(0, |m| m.len());
            if now != size {
                (size, changed) = (now, Instant::now());
            }
            if changed.elapsed() > STALL {
                let _ = child.kill();
                let _ = child.wait();
                break format!("L1 stalled: no console output for {} s", STALL.as_secs());
            }
            if start.elapsed() > time {
                let _ = child.kill();
                let _ = child.wait();
                break format!("L1 timed out after {} s", time.as_secs());
            }
            std::thread::sleep(Duration::from_secs(2));
        };
        L1Run {
            console: std::fs::read_to_string(&console_log).unwrap_or_default(),
            stderr: std::fs::read_to_string(&stderr_log).unwrap_or_default(),
            wall: start.elapsed(),
            end,
        }
    }
}

#[test]
fn outcomes_are_framed_by_markers() {
    let console =
        "noise\nNESTED-RUN test a\nrunning 1 test\nNESTED-EXIT 0 test a (from 1 s to 3 s)\n\
                   NESTED-RUN bench b\npanic\nNESTED-EXIT 101 bench b (from 3 s to 4 s)\n";
    let o = outcomes(console);
    assert_eq!(o.len(), 2);
    assert_eq!((o[0].label.as_str(), o[0].status), ("test a", Some(0)));
    assert!(o[0].output.contains("running 1 test"));
    assert_eq!((o[1].label.as_str(), o[1].status), ("bench b", Some(101)));
}

#[test]
fn test_names_come_from_the_terse_list() {
    let list = "boots_1_cpu: test\nmod::nested_name: test\nratios: bench\n\n";
    assert_eq!(test_names(list), ["boots_1_cpu", "mod::nested_name"]);
}

#[test]
fn each_unit_runs_under_its_timeout_and_only_when_wanted() {
    let unit = Unit {
        label: "test linux a".into(),
        exe: PathBuf::from("/t/linux"),
        args: vec!["--exact".into(), "a".into()],
    };
    let script = init_script(&[unit], &[("CI", "true".into())]);
    assert!(script.contains("export CI='true'\n"));
    assert!(script.contains("if want 0; then\necho 'NESTED-RUN test linux a'\n"));
    assert!(script.contains("\ntimeout -k 10 600 /t/linux --exact a 2>&1\nstatus=$?\n"));
    assert!(script.ends_with("echo NESTED-DONE\npoweroff -f\n"));
}
