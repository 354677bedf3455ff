//! Every VMM error a user can hit ends pvmm with status 1 and a message that
//! says what to fix (run against the built `pvmm` binary).

use std::path::PathBuf;
use std::process::{Command, Output};

const PVMM: &str = env!("CARGO_BIN_EXE_pvmm");

fn pvmm(args: &[&str]) -> Output {
    Command::new(PVMM)
        .args(args)
        .output()
        .expect("cannot run pvmm")
}

/// Asserts a failure with exit status 1 and `needle` in the one-line error.
fn assert_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.starts_with("pvmm: error: "),
        "stderr does not start with the error prefix: {stderr}"
    );
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pvmm-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn kernel_missing() {
    let out = pvmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_error(
        &out,
        "Cannot read kernel /nonexistent/vmlinux: No such file or directory",
    );
}

#[test]
fn kernel_is_a_directory() {
    let out = pvmm(&["--kernel", "/"]);
    assert_error(&out, "Cannot read kernel /: Is a directory");
}

#[test]
fn kernel_of_unknown_format() {
    let dir = scratch("format");
    let k = dir.join("kernel.txt");
    std::fs::write(&k, "this is not a kernel\n".repeat(100)).expect("write");
    let out = pvmm(&["--kernel", k.to_str().expect("utf-8")]);
    assert_error(&out, "has an unknown format: pvmm boots an ELF vmlinux");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn memory_too_small() {
    assert_error(
        &pvmm(&["--memory", "1M"]),
        "Memory size 1 MiB is too small: the guest needs at least 8 MiB",
    );
}

#[test]
fn memory_too_large() {
    assert_error(
        &pvmm(&["--memory", "2T"]),
        "Memory size 2 TiB is too large: the guest layout holds at most",
    );
}

#[test]
fn memory_not_page_aligned() {
    assert_error(&pvmm(&["--memory", "10001K"]), "is not a multiple of 4 KiB");
}

#[test]
fn memory_not_a_size() {
    let out = pvmm(&["--memory", "lots"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Invalid size \"lots\""), "{stderr}");
}

#[test]
fn initrd_too_big() {
    let dir = scratch("initrd");
    let initrd = dir.join("initrd.img");
    let f = std::fs::File::create(&initrd).expect("create");
    // Sparse: 20 MiB do not fit below the top of 16 MiB of RAM.
    f.set_len(20 << 20).expect("set_len");
    let out = pvmm(&[
        "--memory",
        "16M",
        "--initrd",
        initrd.to_str().expect("utf-8"),
    ]);
    assert_error(&out, "is too big (20 MiB): at most");
    assert_error(&out, "raise --memory");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn initrd_missing() {
    assert_error(
        &pvmm(&["--initrd", "/nonexistent/initrd"]),
        "Cannot read initrd /nonexistent/initrd: No such file or directory",
    );
}

#[test]
fn too_many_vcpus() {
    assert_error(
        &pvmm(&["--cpus", "255"]),
        "--cpus 255 is too many: this host allows at most",
    );
    assert_error(&pvmm(&["--cpus", "100000"]), "--cpus 100000 is too many");
}

#[test]
fn zero_vcpus() {
    assert_error(&pvmm(&["--cpus", "0"]), "--cpus must be at least 1");
}

#[test]
fn bad_serial_value() {
    let out = pvmm(&["--serial", "tty"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use stdout, off or file=PATH"));
}

#[test]
fn serial_file_not_writable() {
    assert_error(
        &pvmm(&["--serial", "file=/nonexistent/dir/serial.log"]),
        "Cannot open serial output file /nonexistent/dir/serial.log",
    );
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    #[allow(unsafe_code)]
    let uid = unsafe { libc::getuid() };
    uid == 0
}

/// Runs pvmm in a private mount namespace where /dev is an empty tmpfs, so
/// /dev/kvm does not exist. Needs root (and unshare); skipped otherwise.
#[test]
fn no_dev_kvm() {
    if !is_root() {
        eprintln!("skipped: hiding /dev/kvm needs root (a private mount namespace)");
        return;
    }
    let script = format!("mount -t tmpfs none /dev && exec {PVMM}");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("cannot run unshare");
    assert_error(&out, "/dev/kvm does not exist: this host has no KVM");
}

/// Runs pvmm as user nobody, who may not open the root-only /dev/kvm.
/// Needs root (setpriv) and a /dev/kvm closed to others; skipped otherwise.
#[test]
fn no_permission_on_dev_kvm() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        eprintln!("skipped: changing to another user needs root");
        return;
    }
    let mode = std::fs::metadata("/dev/kvm").map(|m| m.permissions().mode());
    if !matches!(mode, Ok(m) if m & 0o006 == 0) {
        eprintln!("skipped: /dev/kvm is open to every user here ({mode:?})");
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", PVMM])
        .output()
        .expect("cannot run setpriv");
    assert_error(
        &out,
        "Permission denied on /dev/kvm: add your user to the kvm group",
    );
}
