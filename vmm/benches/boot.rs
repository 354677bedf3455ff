//! Boot benchmark: pvmm against `qemu-system-x86_64 -accel kvm -M microvm`
//! booting the same embedded test kernel (PVH) to poweroff.
//!
//! Runs are interleaved (pvmm, QEMU, pvmm, ...) so that both see the same
//! machine noise. For each VMM it prints the median wall time and the median
//! peak RSS (`wait4` rusage), and their ratios, against the targets
//! (pvmm at most 0.15x QEMU's wall time, at most 15 MiB peak RSS).
//!
//! A second comparison boots a trivial PVH guest that triple-faults at its
//! first instruction, which shows the VMMs' own start-up and teardown cost
//! without the guest's. Ring 0 is emulated on the development machines, so
//! the test kernel does its computing in ring 3 (its ring.rs); what is left
//! of its own time is mostly serial output, one exit per byte.
//!
//! `cargo bench -p vmm --bench boot` (PVMM_BENCH_RUNS sets the number of
//! runs per VMM, default 21).
#![allow(unsafe_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PVMM: &str = env!("CARGO_BIN_EXE_pvmm");
const QEMU: &str = "qemu-system-x86_64";
const MEMORY: &str = "512M";
const MEMORY_BYTES: u64 = 512 << 20;
/// The same work in both VMMs (QEMU's microvm has no ECAM for the PVH
/// entry, so the PCI test is left out of both).
const TESTS: &str = "mem,cmdline,smp";
const WALL_TARGET: f64 = 0.15;
const RSS_TARGET_KIB: u64 = 15 * 1024;

struct Sample {
    wall: Duration,
    max_rss_kib: u64,
}

/// Runs `cmd` to completion and measures it with wait4. Fails unless it
/// exits 0 and its output contains `must_print`.
fn measure(cmd: &mut Command, must_print: &str) -> Result<Sample, String> {
    let out_path = std::env::temp_dir().join(format!("pvmm-bench-{}.out", std::process::id()));
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let pid = libc::pid_t::try_from(child.id()).map_err(|e| e.to_string())?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for the kernel to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped (Child::wait is never
    // called); status and usage are valid for writes.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    drop(child);
    if r != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    std::fs::remove_file(&out_path).ok();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("{cmd:?} failed (status {status:#x}):\n{output}"));
    }
    if !output.contains(must_print) {
        return Err(format!("{cmd:?} did not print {must_print:?}:\n{output}"));
    }
    Ok(Sample {
        wall,
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    })
}

fn median<T: Copy + Ord>(v: &mut [T]) -> T {
    v.sort_unstable();
    v[v.len() / 2]
}

/// A PVH ELF whose entry is `ud2` with no IDT: the guest triple-faults at
/// once, which both VMMs treat as a reset (pvmm exits, QEMU exits with
/// -no-reboot). Booting it measures the VMMs' own overhead.
fn trivial_pvh_elf() -> Vec<u8> {
    let mut v = vec![0u8; 0x1000];
    let put = |v: &mut Vec<u8>, at: usize, b: &[u8]| v[at..at + b.len()].copy_from_slice(b);
    put(&mut v, 0, b"\x7fELF\x02\x01\x01");
    put(&mut v, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut v, 18, &0x3eu16.to_le_bytes()); // x86-64
    put(&mut v, 20, &1u32.to_le_bytes());
    put(&mut v, 24, &0x10_0000u64.to_le_bytes()); // e_entry
    put(&mut v, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut v, 52, &64u16.to_le_bytes());
    put(&mut v, 54, &56u16.to_le_bytes());
    put(&mut v, 56, &2u16.to_le_bytes());
    // PT_LOAD: file 0x800.. at 1 MiB.
    for (i, x) in [
        (5u64 << 32) | 1,
        0x800,
        0x10_0000,
        0x10_0000,
        0x100,
        0x100,
        0x1000,
    ]
    .iter()
    .enumerate()
    {
        put(&mut v, 64 + 8 * i, &x.to_le_bytes());
    }
    // PT_NOTE at 0x400: XEN_ELFNOTE_PHYS32_ENTRY -> 1 MiB + 0x10.
    for (i, x) in [4u64, 0x400, 0, 0, 20, 20, 4].iter().enumerate() {
        put(&mut v, 120 + 8 * i, &x.to_le_bytes());
    }
    put(&mut v, 0x400, &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0]);
    put(&mut v, 0x40c, b"Xen\0");
    put(&mut v, 0x410, &0x10_0010u32.to_le_bytes());
    put(&mut v, 0x810, &[0x0f, 0x0b]); // ud2
    v
}

struct Workload<'a> {
    name: &'a str,
    kernel: &'a Path,
    cmdline: Option<&'a str>,
    pvmm_prints: &'a str,
    qemu_prints: &'a str,
}

/// Interleaved runs of both VMMs on `w`; prints the medians and ratios.
fn compare(w: &Workload<'_>, runs: usize, have_qemu: bool) {
    let pvmm_cmd = || {
        let mut c = Command::new(PVMM);
        c.args([
            "--kernel",
            path_str(w.kernel),
            "--memory",
            MEMORY,
            "--cpus",
            "1",
        ]);
        if let Some(cl) = w.cmdline {
            c.args(["--cmdline", cl]);
        }
        c
    };
    let qemu_cmd = || {
        let mut c = Command::new(QEMU);
        c.args(["-accel", "kvm", "-M", "microvm", "-m", MEMORY, "-smp", "1"])
            .args(["-kernel", path_str(w.kernel)])
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
            .args(["-nodefaults", "-no-reboot"]);
        if let Some(cl) = w.cmdline {
            c.args(["-append", cl]);
        }
        c
    };
    let mut pvmm = Vec::with_capacity(runs);
    let mut qemu = Vec::with_capacity(runs);
    let fail = |what: &str, e: String| -> ! {
        eprintln!("boot bench: {what} run failed: {e}");
        std::process::exit(1);
    };
    for _ in 0..runs {
        match measure(&mut pvmm_cmd(), w.pvmm_prints) {
            Ok(s) => pvmm.push(s),
            Err(e) => fail("pvmm", e),
        }
        if have_qemu {
            match measure(&mut qemu_cmd(), w.qemu_prints) {
                Ok(s) => qemu.push(s),
                Err(e) => fail("QEMU", e),
            }
        }
    }
    let wall = |v: &[Sample]| median(&mut v.iter().map(|s| s.wall).collect::<Vec<_>>());
    let rss = |v: &[Sample]| median(&mut v.iter().map(|s| s.max_rss_kib).collect::<Vec<_>>());
    let (pw, pr) = (wall(&pvmm), rss(&pvmm));
    println!("{} ({runs} interleaved runs each, medians):", w.name);
    println!(
        "  pvmm: wall {:8.2} ms, peak RSS {:6.2} MiB",
        pw.as_secs_f64() * 1e3,
        pr as f64 / 1024.0
    );
    if qemu.is_empty() {
        println!("  QEMU: not measured ({QEMU} not found; install qemu-system-x86)");
    } else {
        let (qw, qr) = (wall(&qemu), rss(&qemu));
        println!(
            "  QEMU: wall {:8.2} ms, peak RSS {:6.2} MiB  ({QEMU} -accel kvm -M microvm)",
            qw.as_secs_f64() * 1e3,
            qr as f64 / 1024.0
        );
        let ratio = pw.as_secs_f64() / qw.as_secs_f64();
        println!(
            "  ratio pvmm/QEMU: wall {ratio:.3}x (target <= {WALL_TARGET}x: {}), peak RSS {:.3}x",
            verdict(ratio <= WALL_TARGET),
            pr as f64 / qr as f64
        );
    }
    println!(
        "  pvmm peak RSS {:.2} MiB (target <= {} MiB: {})",
        pr as f64 / 1024.0,
        RSS_TARGET_KIB / 1024,
        verdict(pr <= RSS_TARGET_KIB)
    );
}

fn main() {
    let runs: usize = std::env::var("PVMM_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(21);
    if vmm::boot::EMBEDDED_KERNEL.is_empty() {
        eprintln!("boot bench: this pvmm has no embedded test kernel; nothing to measure");
        std::process::exit(1);
    }
    let dir = std::env::temp_dir();
    let kernel = dir.join(format!("pvmm-bench-kernel-{}.elf", std::process::id()));
    let trivial = dir.join(format!("pvmm-bench-trivial-{}.elf", std::process::id()));
    for (path, bytes) in [
        (&kernel, vmm::boot::EMBEDDED_KERNEL.to_vec()),
        (&trivial, trivial_pvh_elf()),
    ] {
        if let Err(e) = std::fs::write(path, bytes) {
            eprintln!("boot bench: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    let have_qemu = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // Quiet: test results only. Every byte on the serial port is an exit,
    // the same in both VMMs.
    let cmdline =
        format!("console=ttyS0 tk.mem={MEMORY_BYTES} tk.cpus=1 tk.tests={TESTS} tk.quiet=1");
    compare(
        &Workload {
            name: &format!("embedded test kernel to poweroff (tk.tests={TESTS} tk.quiet=1)"),
            kernel: &kernel,
            cmdline: Some(&cmdline),
            pvmm_prints: "pvmm: guest powered off",
            qemu_prints: "3 passed, 0 failed",
        },
        runs,
        have_qemu,
    );
    compare(
        &Workload {
            name: "trivial PVH guest (ud2, triple fault): the VMMs' own overhead",
            kernel: &trivial,
            cmdline: None,
            pvmm_prints: "pvmm: guest reset (triple fault)",
            qemu_prints: "",
        },
        runs,
        have_qemu,
    );
    std::fs::remove_file(&kernel).ok();
    std::fs::remove_file(&trivial).ok();
    // wait4's ru_maxrss of a child includes the spawning process's resident
    // set up to the exec (posix_spawn shares its memory): that is the floor.
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    println!(
        "(the benchmark process's own peak RSS, a floor of the figures above: {:.2} MiB)",
        hwm as f64 / 1024.0
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}
