//! Building and finding what the integration tests boot: the test kernel
//! ELF, the `pvmm` binary, QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (the parent of `integration-tests/`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The test kernel's crate directory.
pub fn test_kernel_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("test-kernel")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // Nothing of the outer build leaks into the nested one.
    for v in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
    ] {
        c.env_remove(v);
    }
    c
}

fn build(mut c: Command, what: &str) -> Result<(), String> {
    let out = c
        .output()
        .map_err(|e| format!("cannot run cargo to build {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building {what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The test kernel ELF: `TEST_KERNEL` if set, else built with
/// `cargo build --release --target x86_64-unknown-none` in its crate (the
/// same command and path vmm/build.rs uses), once per test process.
pub fn test_kernel() -> Result<PathBuf, String> {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ELF.get_or_init(|| {
        if let Some(p) = std::env::var_os("TEST_KERNEL") {
            return Ok(PathBuf::from(p));
        }
        let dir = test_kernel_dir();
        let mut c = cargo();
        c.current_dir(&dir)
            .args(["build", "--release", "--target", "x86_64-unknown-none"]);
        build(c, "the test kernel")?;
        let elf = dir.join("target/x86_64-unknown-none/release/test-kernel");
        if elf.is_file() {
            Ok(elf)
        } else {
            Err(format!("the test kernel build left no {}", elf.display()))
        }
    })
    .clone()
}

/// The target directory and profile the running test binary was built with,
/// from its path `<target-dir>/<profile-dir>/deps/<test>-<hash>`.
fn own_target() -> Option<(PathBuf, String)> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    let profile_dir = deps.parent()?;
    let profile = profile_dir.file_name()?.to_str()?.to_string();
    Some((profile_dir.parent()?.to_path_buf(), profile))
}

/// `cargo <args> --target-dir <own> [--release|--profile P]` for this test
/// binary's own target directory and profile, and that directory and
/// profile directory.
fn cargo_for_own_target(args: &[&str]) -> Result<(Command, PathBuf, String), String> {
    let (target_dir, profile_dir) =
        own_target().ok_or("cannot tell the test binary's target directory")?;
    let mut c = cargo();
    c.current_dir(workspace_root())
        .args(args)
        .arg("--target-dir")
        .arg(&target_dir);
    match profile_dir.as_str() {
        "debug" => {}
        "release" => {
            c.arg("--release");
        }
        other => {
            c.args(["--profile", other]);
        }
    }
    Ok((c, target_dir, profile_dir))
}

/// Binary `bin` of workspace package `package`, built with `cargo build`
/// into this test binary's own target directory and profile (so it is
/// current).
pub fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf, String> {
    let (c, target_dir, profile_dir) =
        cargo_for_own_target(&["build", "-p", package, "--bin", bin])?;
    build(c, bin)?;
    let path = target_dir.join(&profile_dir).join(bin);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("the {bin} build left no {}", path.display()))
    }
}

/// The `pvmm` binary: `PVMM_BIN` if set; else [`workspace_binary`], once
/// per test process.
pub fn pvmm() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PVMM_BIN") {
            return Ok(PathBuf::from(p));
        }
        workspace_binary("vmm", "pvmm")
    })
    .clone()
}

/// The `pvmm-remote` binary: `PVMM_REMOTE_BIN` if set; else
/// [`workspace_binary`], once per test process.
pub fn pvmm_remote() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PVMM_REMOTE_BIN") {
            return Ok(PathBuf::from(p));
        }
        workspace_binary("api", "pvmm-remote")
    })
    .clone()
}

/// The executables of test and bench targets, built (as `cargo test
/// --no-run <args>` builds them) into this test binary's own target
/// directory and profile: (target kind, target name, path), the kind as
/// cargo names it ("test", "bench", "lib", ...).
pub fn test_executables(args: &[&str]) -> Result<Vec<(String, String, PathBuf)>, String> {
    let mut all = vec![
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ];
    all.extend_from_slice(args);
    let (mut c, _, _) = cargo_for_own_target(&all)?;
    let out = c
        .output()
        .map_err(|e| format!("cannot run cargo test --no-run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo test --no-run {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let target = &v["target"];
        if let (Some(kind), Some(name), Some(exe)) = (
            target["kind"][0].as_str(),
            target["name"].as_str(),
            v["executable"].as_str(),
        ) {
            found.push((kind.to_string(), name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}

/// `qemu-system-x86_64` from PATH, if there.
pub fn qemu() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    })
}

/// Whether a test may run: `true` when `available`; otherwise, under
/// `CI=true`, a panic naming what is missing (CI must not pass a test that
/// could not run), and elsewhere `false` after a SKIP line on stderr.
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what}, and CI=true: this test must run (see .ci/setup)");
    }
    eprintln!("SKIP: {what}");
    false
}

/// [`require`] for /dev/kvm.
pub fn require_kvm() -> bool {
    require(kvm_usable(), "/dev/kvm cannot be opened")
}

/// [`require`] for QEMU: its path.
pub fn require_qemu() -> Option<PathBuf> {
    let q = qemu();
    require(
        q.is_some(),
        "qemu-system-x86_64 not found (Debian's qemu-system-x86; .ci/setup installs it)",
    )
    .then_some(q)
    .flatten()
}

/// Whether /dev/kvm can be opened for reading and writing.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A token that differs between runs (time and process id), for checking
/// that the command line arrives.
pub fn random_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    #[allow(clippy::cast_possible_truncation)] // the low bits are the point
    let mut x = (nanos as u64) ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    // splitmix64 finalizer: spreads the bits.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    format!("{x:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert!(test_kernel_dir().join("Cargo.toml").is_file());
        assert!(workspace_root().join("Cargo.toml").is_file());
        let (dir, profile) = own_target().expect("test binaries live in <target>/<profile>/deps");
        assert!(dir.join(&profile).is_dir());
    }

    #[test]
    fn tokens_differ() {
        let a = random_token();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let b = random_token();
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }
}
