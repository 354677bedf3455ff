//! Linux in pvmm: Debian's 6.12 cloud kernel, fetched with `apt-get
//! download` and cached in ~/.cache/pvmm/linux (outside the repository).
//!
//! The bzImage's decompressor does not run on hosts whose KVM emulates guest
//! ring 0 (it uses BMI2), so the tests boot the uncompressed vmlinux taken
//! from the bzImage payload (located by the setup header's payload_offset and
//! payload_length, zstd-compressed), which pvmm enters through its PVH note.
//!
//! - `banner_and_e820`: the Linux banner and an e820 map matching --memory
//!   (pvmm is killed afterwards: Linux cannot finish booting on such hosts).
//! - `bzimage_64_bit_entry`: the bzImage itself through the 64-bit boot
//!   protocol (banner with VMX/SVM; elsewhere its decompressor must run until
//!   its first BMI2 instruction).
//! - `busybox_initramfs_powers_off`: a full boot into a busybox initramfs
//!   that powers off; needs VMX or SVM, skipped with a reason elsewhere.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PVMM: &str = env!("CARGO_BIN_EXE_pvmm");
/// Debian package names of the kernel: the newest one wins.
const PACKAGE_PATTERN: &str = r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-cloud-amd64-unsigned$";
/// Emulated ring 0 is slow: the banner takes about 15 s of CPU here.
const BANNER_DEADLINE: Duration = Duration::from_secs(240);

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("pvmm").join("linux")
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// Compares Debian kernel versions like 6.12.117 numerically.
fn version_key(pkg: &str) -> Vec<u64> {
    pkg.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The newest matching package that apt knows, running `apt-get update`
/// once if it knows none.
fn newest_package() -> Result<String, String> {
    let search = || -> Result<Option<String>, String> {
        let out = run(Command::new("apt-cache").args(["search", "--names-only", PACKAGE_PATTERN]))?;
        let text = String::from_utf8_lossy(&out);
        Ok(text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .max_by_key(|p| version_key(p))
            .map(str::to_string))
    };
    if let Some(p) = search()? {
        return Ok(p);
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    search()?.ok_or_else(|| format!("no package matches {PACKAGE_PATTERN} after apt-get update"))
}

/// The uncompressed vmlinux inside a bzImage: the zstd payload, minus the
/// 4-byte decompressed size the kernel build appends.
fn extract_vmlinux(bzimage: &[u8], work: &Path) -> Result<Vec<u8>, String> {
    let u32_at = |o: usize| -> Result<u32, String> {
        bzimage
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "bzImage too short".to_string())
    };
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS)".into());
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = (setup_sects + 1) * 512 + u32_at(0x248)? as usize;
    let len = u32_at(0x24c)? as usize;
    let payload = bzimage
        .get(offset..offset + len)
        .ok_or("payload outside the bzImage")?;
    if payload.get(..4) != Some(&[0x28, 0xb5, 0x2f, 0xfd][..]) {
        return Err(format!(
            "payload is not zstd (starts {:02x?})",
            &payload[..4]
        ));
    }
    let (frame, size) = payload.split_at(len - 4);
    let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
    let zst = work.join("payload.zst");
    let raw = work.join("vmlinux.raw");
    std::fs::write(&zst, frame).map_err(|e| e.to_string())?;
    run(Command::new("zstd")
        .args(["-d", "-q", "-f", "--long=31"])
        .arg(&zst)
        .arg("-o")
        .arg(&raw))
    .map_err(|e| format!("{e} (is the zstd command installed?)"))?;
    let vmlinux = std::fs::read(&raw).map_err(|e| e.to_string())?;
    if vmlinux.len() != size || vmlinux.get(..4) != Some(b"\x7fELF") {
        return Err(format!(
            "decompressed payload is {} bytes, expected an ELF of {size}",
            vmlinux.len()
        ));
    }
    Ok(vmlinux)
}

/// Fetches (once) and returns the cached vmlinux.
fn vmlinux() -> Result<PathBuf, String> {
    fetch().map(|(_, vmlinux)| vmlinux)
}

/// Fetches (once) and returns the cached bzImage and vmlinux.
fn fetch() -> Result<(PathBuf, PathBuf), String> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pkg = newest_package()?;
    let path = dir.join(format!("{pkg}.vmlinux"));
    let bzimage = dir.join(format!("{pkg}.vmlinuz"));
    if path.exists() && bzimage.exists() {
        return Ok((bzimage, path));
    }
    let work = dir.join(format!("work-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    run(Command::new("apt-get")
        .args(["download", "-qq", &pkg])
        .current_dir(&work))?;
    let deb = std::fs::read_dir(&work)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("apt-get download left no .deb")?;
    let tar = run(Command::new("dpkg-deb").arg("--fsys-tarfile").arg(&deb))?;
    let mut child = Command::new("tar")
        .args(["-xO", "--wildcards", "./boot/vmlinuz-*"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdin = child.stdin.take().ok_or("no tar stdin")?;
    let writer = std::thread::spawn(move || stdin.write_all(&tar));
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    writer
        .join()
        .map_err(|_| "tar writer panicked")?
        .map_err(|e| e.to_string())?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(format!("no ./boot/vmlinuz-* in {}", deb.display()));
    }
    let vmlinux = extract_vmlinux(&out.stdout, &work)?;
    for (data, dest) in [(&out.stdout, &bzimage), (&vmlinux, &path)] {
        let tmp = work.join("cache.tmp");
        std::fs::write(&tmp, data).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, dest).map_err(|e| e.to_string())?;
    }
    std::fs::remove_dir_all(&work).ok();
    Ok((bzimage, path))
}

/// Kills and reaps a pvmm we started.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts pvmm and collects its console lines until `done` says so or the
/// deadline passes; kills it then. Returns the lines.
fn console_until(
    args: &[&str],
    done: impl Fn(&[String]) -> bool,
    deadline: Duration,
) -> Vec<String> {
    let mut child = Command::new(PVMM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start pvmm");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    while !done(&lines) {
        let left = deadline.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(l) => lines.push(l),
            Err(mpsc::RecvTimeoutError::Timeout) if start.elapsed() < deadline => {}
            Err(_) => break,
        }
    }
    kill(&mut child);
    lines
}

/// e820 lines as Linux prints them: (start, end inclusive, type).
fn e820(lines: &[String]) -> Vec<(u64, u64, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.split("BIOS-e820: [mem ").nth(1)?;
            let (range, kind) = rest.split_once("] ")?;
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()?,
                u64::from_str_radix(b.trim_start_matches("0x"), 16).ok()?,
                kind.trim().to_string(),
            ))
        })
        .collect()
}

#[test]
fn banner_and_e820() {
    let kernel = match vmlinux() {
        Ok(k) => k,
        Err(e) => panic!("cannot get Debian's 6.12 cloud kernel: {e}"),
    };
    let memory: u64 = 5 << 30;
    let lines = console_until(
        &[
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--memory",
            "5G",
            "--cpus",
            "2",
            "--cmdline",
            "earlyprintk=serial console=ttyS0",
        ],
        |l| {
            l.iter()
                .any(|x| x.contains("bootconsole [earlyser0] enabled"))
        },
        BANNER_DEADLINE,
    );
    let text = lines.join("\n");
    assert!(
        lines.iter().any(|l| l.contains("Linux version 6.12.")),
        "no Linux banner:\n{text}"
    );
    let map = e820(&lines);
    let usable: u64 = map
        .iter()
        .filter(|e| e.2 == "usable")
        .map(|e| e.1 - e.0 + 1)
        .sum();
    // RAM plus the legacy hole below 1 MiB is what --memory gave.
    assert_eq!(usable + (0x10_0000 - 0x9_fc00), memory, "{text}");
    let want = [
        (0, 0x9_fbff, "usable"),
        (0x9_fc00, 0xf_ffff, "reserved"),
        (0x10_0000, 0xbfff_ffff, "usable"),
        (0xe000_0000, 0xe00f_ffff, "reserved"),
        (0x1_0000_0000, 0x1_7fff_ffff, "usable"),
    ];
    let got: Vec<(u64, u64, &str)> = map.iter().map(|e| (e.0, e.1, e.2.as_str())).collect();
    assert_eq!(got, want, "{text}");
}

/// The bzImage through the Linux 64-bit boot protocol: on VMX/SVM hosts it
/// prints the banner; where KVM emulates ring 0, its decompressor stops on
/// its first BMI2 instruction, well past the entry point (which shows that
/// the entry, page tables and boot_params let it run).
#[test]
fn bzimage_64_bit_entry() {
    let (bzimage, _) = fetch().unwrap_or_else(|e| panic!("cannot get the kernel: {e}"));
    let mut child = Command::new(PVMM)
        .args([
            "--kernel",
            bzimage.to_str().expect("utf-8"),
            "--memory",
            "512M",
            "--cmdline",
            "earlyprintk=serial console=ttyS0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start pvmm");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Linux version 6.12.") {
                let _ = tx.send(());
            }
        }
    });
    let start = Instant::now();
    loop {
        if rx.try_recv().is_ok() {
            kill(&mut child);
            return; // a real boot
        }
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(status.code(), Some(1), "{stderr}");
            assert!(stderr.contains("KVM emulation failure"), "{stderr}");
            let rip = stderr
                .split("RIP 0x")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_hexdigit()).next())
                .and_then(|r| u64::from_str_radix(r, 16).ok())
                .unwrap_or_else(|| panic!("no RIP in {stderr}"));
            assert!(rip > 0x10_0200, "stopped at the entry point: {stderr}");
            return;
        }
        if start.elapsed() > BANNER_DEADLINE {
            kill(&mut child);
            panic!("neither a banner nor an emulation failure within {BANNER_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// A `newc` cpio archive writer (what the kernel's initramfs unpacker reads).
struct Cpio(Vec<u8>, u32);

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.1 += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.1,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
        self.0.extend_from_slice(data);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.0
    }
}

/// An initramfs whose /init prints a marker and powers off.
fn busybox_initramfs(path: &Path) -> Result<(), String> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or("busybox not found (install busybox-static)")?;
    let bin = std::fs::read(busybox).map_err(|e| e.to_string())?;
    let init =
        b"#!/bin/busybox sh\n/bin/busybox echo PVMM-INITRAMFS-OK\n/bin/busybox poweroff -f\n";
    let mut c = Cpio(Vec::new(), 0);
    c.entry("dev", 0o040755, &[], (0, 0));
    c.entry("dev/console", 0o020600, &[], (5, 1));
    c.entry("bin", 0o040755, &[], (0, 0));
    c.entry("bin/busybox", 0o100755, &bin, (0, 0));
    c.entry("init", 0o100755, init, (0, 0));
    std::fs::write(path, c.finish()).map_err(|e| e.to_string())
}

#[test]
fn busybox_initramfs_powers_off() {
    if !hardware_virtualization() {
        eprintln!(
            "skipped: no vmx/svm in /proc/cpuinfo: this host's KVM emulates guest ring 0, where \
             Linux cannot finish booting (banner_and_e820 covers what runs here)"
        );
        return;
    }
    let kernel = vmlinux().unwrap_or_else(|e| panic!("cannot get the kernel: {e}"));
    let initramfs =
        std::env::temp_dir().join(format!("pvmm-initramfs-{}.cpio", std::process::id()));
    busybox_initramfs(&initramfs).unwrap_or_else(|e| panic!("initramfs: {e}"));
    let mut child = Command::new(PVMM)
        .args([
            "--kernel",
            kernel.to_str().expect("utf-8"),
            "--initrd",
            initramfs.to_str().expect("utf-8"),
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--cmdline",
            "console=ttyS0 rdinit=/init panic=-1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start pvmm");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            kill(&mut child);
            panic!("Linux did not power off within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    std::fs::remove_file(&initramfs).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "{status}: {stderr}\n{stdout}");
    assert!(stdout.contains("PVMM-INITRAMFS-OK"), "{stdout}");
    assert_eq!(stderr.trim_end(), "pvmm: guest powered off", "{stdout}");
}

#[test]
fn cpio_newc_layout() {
    let mut c = Cpio(Vec::new(), 0);
    c.entry("init", 0o100755, b"abc", (0, 0));
    let a = c.finish();
    assert_eq!(&a[..6], b"070701");
    assert_eq!(&a[6..14], b"00000001");
    assert_eq!(&a[14..22], b"000081ed");
    assert_eq!(&a[54..62], b"00000003");
    assert_eq!(&a[94..102], b"00000005");
    assert_eq!(&a[110..115], b"init\0");
    assert_eq!(&a[116..119], b"abc");
    assert_eq!(a.len() % 4, 0);
    assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
}
