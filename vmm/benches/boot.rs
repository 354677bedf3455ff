//! Boot benchmark: pvmm against `qemu-system-x86_64 -accel kvm -M microvm`
//! booting the same embedded test kernel (PVH) to poweroff.
//!
//! Runs are interleaved (pvmm, QEMU, pvmm, ...) so that both see the same
//! machine noise. For each VMM it prints the median wall time and the median
//! peak RSS (`wait4` rusage), and their ratios, against the targets
//! (pvmm at most 0.15x QEMU's wall time, at most 15 MiB peak RSS).
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

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful either: the benchmark always runs in full.
    let runs: usize = std::env::var("PVMM_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(21);
    let kernel = std::env::temp_dir().join(format!("pvmm-bench-kernel-{}.elf", std::process::id()));
    if vmm::boot::EMBEDDED_KERNEL.is_empty() {
        eprintln!("boot bench: this pvmm has no embedded test kernel; nothing to measure");
        std::process::exit(1);
    }
    if let Err(e) = std::fs::write(&kernel, vmm::boot::EMBEDDED_KERNEL) {
        eprintln!("boot bench: cannot write the kernel: {e}");
        std::process::exit(1);
    }
    let cmdline = format!("console=ttyS0 tk.mem={MEMORY_BYTES} tk.cpus=1 tk.tests={TESTS}");
    let have_qemu = Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());

    let pvmm_cmd = || {
        let mut c = Command::new(PVMM);
        c.args([
            "--kernel",
            path_str(&kernel),
            "--memory",
            MEMORY,
            "--cpus",
            "1",
        ])
        .args(["--cmdline", &cmdline]);
        c
    };
    let qemu_cmd = || {
        let mut c = Command::new(QEMU);
        c.args(["-accel", "kvm", "-M", "microvm", "-m", MEMORY, "-smp", "1"])
            .args(["-kernel", path_str(&kernel), "-append", &cmdline])
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
            .args(["-nodefaults", "-no-reboot"]);
        c
    };

    let mut pvmm = Vec::with_capacity(runs);
    let mut qemu = Vec::with_capacity(runs);
    let fail = |what: &str, e: String| -> ! {
        eprintln!("boot bench: {what} run failed: {e}");
        std::process::exit(1);
    };
    for _ in 0..runs {
        match measure(&mut pvmm_cmd(), "pvmm: guest powered off") {
            Ok(s) => pvmm.push(s),
            Err(e) => fail("pvmm", e),
        }
        if have_qemu {
            match measure(&mut qemu_cmd(), "3 passed, 0 failed") {
                Ok(s) => qemu.push(s),
                Err(e) => fail("QEMU", e),
            }
        }
    }
    std::fs::remove_file(&kernel).ok();

    let wall = |v: &[Sample]| median(&mut v.iter().map(|s| s.wall).collect::<Vec<_>>());
    let rss = |v: &[Sample]| median(&mut v.iter().map(|s| s.max_rss_kib).collect::<Vec<_>>());
    let (pw, pr) = (wall(&pvmm), rss(&pvmm));
    println!("boot to poweroff of the embedded test kernel (tk.tests={TESTS}), {runs} interleaved runs each, medians:");
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
