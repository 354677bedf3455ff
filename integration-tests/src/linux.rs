//! Linux guests for the tests: Debian's 6.12 cloud kernel (downloaded by
//! `.ci/setup` into the cache, never by a test), busybox initramfs images
//! whose `/init` reports what the guest sees, and a console reader.
//!
//! The kernel: `PVMM_LINUX_BZIMAGE` and `PVMM_LINUX_VMLINUX` if set (the
//! nested harness sets them inside its L1 guest); else the newest
//! `linux-image-6.12.*-cloud-amd64-unsigned` `.deb` in
//! `~/.cache/pvmm/linux` (`$PVMM_CACHE_DIR/linux`), unpacked there once: the
//! bzImage, and the uncompressed vmlinux taken from the bzImage's zstd
//! payload (located by the setup header's payload_offset and
//! payload_length), which pvmm enters through its PVH note.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Debian's kernel, both ways pvmm boots it.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The bzImage (`/boot/vmlinuz-*` of the package).
    pub bzimage: PathBuf,
    /// The uncompressed ELF vmlinux, with its PVH note.
    pub vmlinux: PathBuf,
}

/// The cache of downloaded and built artifacts: `$PVMM_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/pvmm`, else `~/.cache/pvmm`.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("PVMM_CACHE_DIR") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("pvmm")
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

/// Linux 7.2 with Linux's own Hyper-V pvIOMMU driver (the unmodified series
/// in `integration-tests/linux-hv-pviommu`), its bzImage:
/// `PVMM_LINUX_HVPV_BZIMAGE` if set (the nested harness sets it inside L1),
/// else built once by `linux-hv-pviommu/build-kernel.sh` into the cache.
pub fn hv_pviommu_kernel() -> Result<PathBuf, String> {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            if let Some(b) = std::env::var_os("PVMM_LINUX_HVPV_BZIMAGE") {
                return Ok(b.into());
            }
            let script = crate::artifacts::workspace_root()
                .join("integration-tests/linux-hv-pviommu/build-kernel.sh");
            let out = Command::new("bash")
                .arg(&script)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => {}
                Some(3) => return Err(format!("run .ci/setup first:\n{stderr}")),
                _ => return Err(format!("{} failed:\n{stderr}", script.display())),
            }
            Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bzImage"))
        })
        .clone()
}

/// The guest program `integration-tests/guest/vfio-dma.c`, a static
/// x86-64 executable that drives a dma-test device through vfio-pci from a
/// Linux guest's user space: `PVMM_GUEST_VFIO_DMA` if set (the nested
/// harness sets it inside L1, which has no compiler), else compiled with
/// `cc -static` (libc6-dev, from `.ci/setup`) into the cache, under a key
/// of its source and header. Its register offsets and codes are written
/// into that header from the device's one definition,
/// `devices::dma_test::regs`.
pub fn vfio_dma_program() -> Result<PathBuf, String> {
    static PROGRAM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROGRAM
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("PVMM_GUEST_VFIO_DMA") {
                return Ok(p.into());
            }
            use devices::dma_test::regs::{command, offset, status};
            let defines = [
                ("SRC_IOVA", offset::SRC_IOVA),
                ("DST_IOVA", offset::DST_IOVA),
                ("LEN", offset::LEN),
                ("PATTERN", offset::PATTERN),
                ("COMMAND", offset::COMMAND),
                ("STATUS", offset::STATUS),
                ("FAULT_IOVA", offset::FAULT_IOVA),
                ("FAULT_REASON", offset::FAULT_REASON),
                ("RESULT", offset::RESULT),
                ("COMMAND_FILL", command::FILL.into()),
                ("COMMAND_CHECKSUM", command::CHECKSUM.into()),
                ("STATUS_DONE", status::DONE.into()),
                ("STATUS_FAULT", status::FAULT.into()),
            ];
            let text: String = defines
                .iter()
                .map(|(name, value)| format!("#define DMA_TEST_{name} {value:#x}u\n"))
                .collect();
            let source =
                crate::artifacts::workspace_root().join("integration-tests/guest/vfio-dma.c");
            let code = std::fs::read(&source).map_err(|e| format!("{}: {e}", source.display()))?;
            let mut key = std::hash::DefaultHasher::new();
            std::hash::Hash::hash(&(&code, &text), &mut key);
            let dir = cache_root().join(format!(
                "guest/vfio-dma-{:016x}",
                std::hash::Hasher::finish(&key)
            ));
            let program = dir.join("vfio-dma");
            if program.is_file() {
                return Ok(program);
            }
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            // Per process until the rename: test processes build at once.
            let header = dir.join(format!("dma-test-regs.h.{}", std::process::id()));
            std::fs::write(&header, text).map_err(|e| format!("{}: {e}", header.display()))?;
            let built = dir.join(format!("vfio-dma.{}", std::process::id()));
            let result = run(Command::new("cc")
                .args(["-static", "-O2", "-Wall", "-Werror", "-include"])
                .arg(&header)
                .arg("-o")
                .arg(&built)
                .arg(&source))
            .map_err(|e| format!("{e} (.ci/setup installs gcc and libc6-dev)"))
            .and_then(|_| {
                std::fs::rename(&built, &program).map_err(|e| format!("{}: {e}", program.display()))
            });
            std::fs::remove_file(&header).ok();
            result.map(|()| program)
        })
        .clone()
}

/// Compares Debian kernel versions like 6.12.117 numerically.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Debian's cloud kernel, unpacked on first use.
pub fn debian_kernel() -> Result<Kernel, String> {
    static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();
    KERNEL.get_or_init(find_or_unpack).clone()
}

fn find_or_unpack() -> Result<Kernel, String> {
    if let (Some(b), Some(v)) = (
        std::env::var_os("PVMM_LINUX_BZIMAGE"),
        std::env::var_os("PVMM_LINUX_VMLINUX"),
    ) {
        return Ok(Kernel {
            bzimage: b.into(),
            vmlinux: v.into(),
        });
    }
    let dir = cache_root().join("linux");
    let deb = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-image-6.12.") && n.ends_with(".deb"))
        })
        .max_by_key(|p| version_key(&p.to_string_lossy()))
        .ok_or_else(|| {
            format!(
                "no linux-image-6.12.*-cloud-amd64-unsigned .deb in {}: run .ci/setup, which \
                 downloads Debian's cloud kernel",
                dir.display()
            )
        })?;
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or("bad .deb name")?
        .to_string();
    let kernel = Kernel {
        bzimage: dir.join(format!("{stem}.vmlinuz")),
        vmlinux: dir.join(format!("{stem}.vmlinux")),
    };
    // Test binaries run at once: one unpacks, the others wait on the lock.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let lock = crate::lockfile::Lock::exclusive(&dir.join(".lock"))?;
    if !(kernel.bzimage.is_file() && kernel.vmlinux.is_file()) {
        unpack(&deb, &kernel)?;
    }
    drop(lock);
    Ok(kernel)
}

fn unpack(deb: &Path, kernel: &Kernel) -> Result<(), String> {
    let dir = deb.parent().ok_or("no directory")?;
    let work = dir.join(format!("work-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&work))?;
    let boot = work.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|e| format!("{}: {e}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("no /boot/vmlinuz-* in {}", deb.display()))?;
    let bzimage = std::fs::read(&vmlinuz).map_err(|e| e.to_string())?;
    let vmlinux = extract_vmlinux(&bzimage, &work)?;
    for (data, dest) in [(&bzimage, &kernel.bzimage), (&vmlinux, &kernel.vmlinux)] {
        let tmp = work.join("cache.tmp");
        std::fs::write(&tmp, data).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, dest).map_err(|e| e.to_string())?;
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

/// The uncompressed vmlinux inside a bzImage: the zstd payload, minus the
/// 4-byte decompressed size the kernel build appends.
pub fn extract_vmlinux(bzimage: &[u8], work: &Path) -> Result<Vec<u8>, String> {
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
    .map_err(|e| format!("{e} (is the zstd command installed? .ci/setup installs it)"))?;
    let vmlinux = std::fs::read(&raw).map_err(|e| e.to_string())?;
    if vmlinux.len() != size || vmlinux.get(..4) != Some(b"\x7fELF") {
        return Err(format!(
            "decompressed payload is {} bytes, expected an ELF of {size}",
            vmlinux.len()
        ));
    }
    Ok(vmlinux)
}

/// A `newc` cpio archive writer (what the kernel's initramfs unpacker reads).
#[derive(Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry: `mode` holds the file type bits, `rdev` is (major,
    /// minor) for device nodes.
    pub fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
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
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data, (0, 0));
    }

    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.bytes
    }
}

/// Where busybox is (Debian's busybox-static).
pub fn busybox() -> Result<PathBuf, String> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| "busybox not found (.ci/setup installs busybox-static)".into())
}

/// What a Linux guest's `/init` (see [`INIT`]) reports: one
/// `PVMM-FACT key=value` line per fact.
pub const FACT: &str = "PVMM-FACT ";
/// The first line `/init` prints: the guest reached user space.
pub const USERSPACE: &str = "PVMM-USERSPACE";

/// How long a full Linux boot to [`USERSPACE`] may take. Under nested KVM
/// (the harness of tests/nested.rs: QEMU TCG, 2 CPUs) one takes 15-25 s. A
/// boot that stalls there does not recover: its stuck vCPU loops inside
/// L1's KVM (see `nested_retry` in tests/linux.rs), so a longer wait only
/// delays the retry.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `f`; in the nested harness (`PVMM_NESTED`), once more if it fails.
/// Nested TCG's SVM stalls or resets about one four-vCPU L2 boot in six,
/// in KVM and Hyper-V mode alike (measured: KVM's interface 3 triple faults
/// in 17 boots; Hyper-V's 6 failures in 38, 2 of them triple faults). In
/// each stall pvmm's vCPU state log (SIGUSR2, sent by [`Console::finish`])
/// showed one vCPU that never left KVM_RUN again, holding L1's own state
/// at VMRUN: RIP just after the `vmrun` of L1's `__svm_vcpu_run`, L1's CR3
/// (outside guest RAM) and stack. L1's KVM re-injects the page fault this
/// causes for ever, while the other vCPUs halt with nothing in their IRR.
/// One of those boots had not made a single hypercall. A failure that
/// repeats is real. Each retry is printed (the CI log shows them), and the
/// first failure's panic message is on stderr.
pub fn nested_retry<T>(what: &str, f: impl Fn() -> T) -> T {
    if std::env::var_os("PVMM_NESTED").is_none() {
        return f();
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&f)) {
        Ok(v) => v,
        Err(_) => {
            println!("RETRY {what}: failed once under nested TCG; running it again");
            f()
        }
    }
}

/// PID 1 of [`initramfs`]: reports what the guest sees (CPUs, RAM from
/// /proc/iomem, ACPI tables, PCI functions, clocksource, wall-clock time)
/// as [`FACT`] lines, runs the
/// script named by `pvmm.run=` on the command line if any (a file of the
/// initramfs), then ends as `pvmm.end=` says: `poweroff` (the default),
/// `reboot`, or `wait` (stays up: a test drives it and kills pvmm).
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo PVMM-USERSPACE
fact() { echo "PVMM-FACT $1=$2"; }
fact cpus "$(grep -c '^processor' /proc/cpuinfo)"
ram=0
for r in $(grep ' : System RAM$' /proc/iomem | sed 's/ : System RAM//'); do
    ram=$((ram + 0x${r#*-} - 0x${r%-*} + 1))
done
fact ram "$ram"
fact acpi "$(ls /sys/firmware/acpi/tables 2>/dev/null | grep -v dynamic | sort | tr '\n' ,)"
for d in /sys/bus/pci/devices/*; do
    [ -e "$d" ] && fact pci "${d##*/} $(cat "$d/vendor"):$(cat "$d/device") $(basename "$(readlink "$d/driver" 2>/dev/null)")"
done
fact clocksource "$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)"
fact time "$(date +%s)"
for a in $(cat /proc/cmdline); do
    case "$a" in
    pvmm.run=*) script=${a#pvmm.run=} ;;
    pvmm.end=*) end=${a#pvmm.end=} ;;
    esac
done
[ -n "$script" ] && sh "/$script"
echo "PVMM-END ${end:=poweroff}"
case "$end" in
reboot) reboot -f ;;
wait) while true; do sleep 3600; done ;;
*) poweroff -f ;;
esac
"#;

/// An initramfs of busybox, [`INIT`] and `extra` files (name, mode, data).
pub fn initramfs(path: &Path, extra: &[(&str, u32, &[u8])]) -> Result<(), String> {
    let bin = std::fs::read(busybox()?).map_err(|e| e.to_string())?;
    let mut c = Cpio::new();
    c.dir("dev");
    c.entry("dev/console", 0o020600, &[], (5, 1));
    for d in ["bin", "proc", "sys", "tmp"] {
        c.dir(d);
    }
    c.file("bin/busybox", 0o755, &bin);
    c.file("init", 0o755, INIT.as_bytes());
    for (name, mode, data) in extra {
        c.file(name, *mode, data);
    }
    std::fs::write(path, c.finish()).map_err(|e| format!("{}: {e}", path.display()))
}

/// The facts a guest reported, in order: (key, value).
pub fn facts(lines: &[String]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let f = l.split_once(FACT)?.1;
            let (k, v) = f.split_once('=')?;
            Some((k.to_string(), v.trim_end().to_string()))
        })
        .collect()
}

/// The one value of fact `key`.
pub fn fact<'a>(facts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    facts
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A running pvmm whose serial console (stdout) is read line by line.
pub struct Console {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line so far.
    pub seen: Vec<String>,
    /// When pvmm was started.
    pub started: Instant,
}

impl Console {
    /// Starts `pvmm` with `args`, stdin closed, stdout read here; stderr
    /// is collected by [`Console::finish`].
    pub fn start(pvmm: &Path, args: &[&str]) -> Result<Self, String> {
        Self::start_with_env(pvmm, args, &[])
    }

    /// [`Console::start`] with `env` added to pvmm's environment.
    pub fn start_with_env(
        pvmm: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let mut child = Command::new(pvmm)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", pvmm.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        // PVMM_CONSOLE_ECHO: every line on stderr as it comes (the nested
        // harness keeps a guest's console even when the test never ends).
        let echo = std::env::var_os("PVMM_CONSOLE_ECHO").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("L2| {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines: rx,
            seen: Vec::new(),
            started: Instant::now(),
        })
    }

    /// Reads lines until one contains `what` (returning it), the console
    /// ends, or `timeout` passes.
    pub fn wait_for(&mut self, what: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(what);
                    self.seen.push(l.clone());
                    if hit {
                        return Ok(l);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("no `{what}` within {timeout:?}"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("the console ended before `{what}`"))
                }
            }
        }
    }

    /// Waits up to `timeout` for pvmm to exit by itself (killing it after
    /// that) and returns its exit code (None when killed) and stderr; the
    /// rest of the console is in `seen`. Before a kill, pvmm is asked for
    /// its vCPUs' state (SIGUSR2), so that stderr says where a guest that
    /// hung was stuck.
    pub fn finish(mut self, timeout: Duration) -> (Option<i32>, String, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut asked = false;
        let code = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) if !asked => {
                    asked = true;
                    self.log_vcpu_states();
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
            }
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.seen.push(l);
        }
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        (code, stderr, std::mem::take(&mut self.seen))
    }

    /// Ends the VM (as [`Console::finish`], waiting 5 s) and panics with
    /// `why`, pvmm's exit code and stderr, and the whole console.
    pub fn fail(self, why: &str) -> ! {
        let (code, stderr, lines) = self.finish(Duration::from_secs(5));
        panic!("{why}\npvmm: {code:?}, {stderr}\n{}", lines.join("\n"))
    }

    /// Asks pvmm to log every vCPU's state on stderr (SIGUSR2: registers,
    /// run state, pending events, local APIC) and gives it a second to.
    pub fn log_vcpu_states(&self) {
        if crate::run::signal(&self.child, libc::SIGUSR2).is_ok() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The console so far, for assertion messages.
    pub fn text(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::new();
        c.file("init", 0o755, b"abc");
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

    #[test]
    fn facts_are_parsed_from_console_noise() {
        let lines: Vec<String> = [
            "[    1.0] random kernel line",
            "PVMM-FACT cpus=4",
            "PVMM-FACT pci=0000:00:00.0 0x8086:0x0d57 ",
            "PVMM-FACT pci=0000:00:01.0 0x1234:0x0d7a",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = facts(&lines);
        assert_eq!(fact(&f, "cpus"), Some("4"));
        assert_eq!(f.iter().filter(|(k, _)| k == "pci").count(), 2);
        assert_eq!(fact(&f, "pci"), Some("0000:00:00.0 0x8086:0x0d57"));
        assert_eq!(fact(&f, "ram"), None);
    }

    #[test]
    fn the_vfio_guest_program_builds_static() {
        let program = vfio_dma_program().unwrap_or_else(|e| panic!("{e}"));
        let elf = std::fs::read(&program).expect("vfio-dma");
        assert_eq!(&elf[..4], b"\x7fELF");
        // No PT_INTERP: the initramfs has no dynamic loader.
        let out = run(Command::new("readelf").arg("-lW").arg(&program)).expect("readelf");
        assert!(
            !String::from_utf8_lossy(&out).contains("INTERP"),
            "vfio-dma is not static"
        );
    }

    #[test]
    fn kernel_versions_compare_numerically() {
        assert!(
            version_key("linux-image-6.12.117+deb12") > version_key("linux-image-6.12.99+deb12")
        );
    }
}
