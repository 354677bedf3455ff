//! Builds the test kernel (`../integration-tests/test-kernel`, a `no_std`
//! crate for x86_64-unknown-none) and embeds it in pvmm.
//!
//! The kernel is built by a nested `cargo build --release --target
//! x86_64-unknown-none` into a target directory under OUT_DIR, with the
//! environment of the outer build (flags, wrappers, target, cfg and feature
//! variables) removed so that it does not leak into the guest build. If the
//! build fails (no x86_64-unknown-none target, say), pvmm still builds: it
//! embeds an empty kernel and the reason, which it reports when asked to boot
//! the embedded kernel.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let kernel_dir = manifest_dir.join("../integration-tests/test-kernel");
    let elf_out = out_dir.join("test-kernel.elf");
    let error_out = out_dir.join("test-kernel-error.rs");

    for p in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "link.ld"] {
        println!("cargo:rerun-if-changed={}", kernel_dir.join(p).display());
    }
    // The kernel's path dependencies: the pvIOMMU and VMBus ABI crates.
    for abi in ["../iommu/abi", "../vmbus/abi"] {
        let abi_dir = manifest_dir.join(abi);
        for p in ["src", "Cargo.toml"] {
            println!("cargo:rerun-if-changed={}", abi_dir.join(p).display());
        }
    }
    println!("cargo:rerun-if-env-changed=PVMM_SKIP_TEST_KERNEL");

    let result = if env::var_os("PVMM_SKIP_TEST_KERNEL").is_some() {
        Err("PVMM_SKIP_TEST_KERNEL was set".to_string())
    } else {
        build_kernel(&kernel_dir, &out_dir.join("test-kernel-target"))
    };
    let (bytes, error) = match result {
        Ok(elf) => match fs::read(&elf) {
            Ok(b) => (b, None),
            Err(e) => (
                Vec::new(),
                Some(format!("cannot read {}: {e}", elf.display())),
            ),
        },
        Err(e) => (Vec::new(), Some(e)),
    };
    if let Some(e) = &error {
        println!("cargo:warning=the embedded test kernel was not built: {e}");
    }
    let error_src = match &error {
        Some(e) => format!("Some({e:?})"),
        None => "None".to_string(),
    };
    write_if_changed(&elf_out, &bytes);
    write_if_changed(&error_out, error_src.as_bytes());
}

fn write_if_changed(path: &Path, bytes: &[u8]) {
    if fs::read(path).ok().as_deref() != Some(bytes) {
        if let Err(e) = fs::write(path, bytes) {
            panic!("cannot write {}: {e}", path.display());
        }
    }
}

fn build_kernel(kernel_dir: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    if !kernel_dir.join("Cargo.toml").exists() {
        return Err(format!("{} does not exist", kernel_dir.display()));
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(kernel_dir)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(target_dir);
    // Keep the outer build's settings out of the guest build.
    for (key, _) in env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        let leaks = matches!(
            k,
            "RUSTFLAGS"
                | "CARGO_ENCODED_RUSTFLAGS"
                | "RUSTDOCFLAGS"
                | "CARGO_ENCODED_RUSTDOCFLAGS"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "RUSTC_WRAPPER"
                | "CARGO_TARGET_DIR"
                | "CARGO_BUILD_TARGET"
                | "CARGO_MAKEFLAGS"
                | "MAKEFLAGS"
                | "MFLAGS"
        ) || k.starts_with("CARGO_CFG_")
            || k.starts_with("CARGO_FEATURE_")
            || k.starts_with("CARGO_BUILD_")
            || k.starts_with("CARGO_PROFILE_")
            || k.starts_with("CARGO_TARGET_");
        if leaks {
            cmd.env_remove(&key);
        }
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "cargo build --target {TARGET} failed ({}):\n{}",
            out.status,
            tail.join("\n")
        ));
    }
    Ok(target_dir.join(TARGET).join("release").join("test-kernel"))
}
