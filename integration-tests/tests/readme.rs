//! The README's examples, run as written.
//!
//! Each example is a ```sh block right after a line
//! `<!-- example: NAME ... -->`; its commands run with `sh -e` in a
//! scratch directory, with `pvmm` and `pvmm-remote` of this build first on
//! `PATH`. Examples that need a standard KVM or a VFIO device are
//! `#[ignore]`d here and run inside the nested-KVM harness (tests/nested.rs),
//! where QEMU's edu sits at 0000:00:01.0 bound to vfio-pci. The two commands
//! at the top are the project's own: `.ci/test` is what CI runs, and
//! `.ci/main` is run here as written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::{artifacts, linux, run};

const README: &str = include_str!("../../README.md");

/// The examples: (name, commands).
fn examples() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = README.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim().strip_prefix("<!-- example: ") else {
            continue;
        };
        let name = rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        assert_eq!(lines.next(), Some("```sh"), "example {name}: no sh block");
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        out.push((name, body.join("\n")));
    }
    out
}

fn example(name: &str) -> String {
    examples()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("the README has no example {name}"))
}

/// Runs the example with `sh -e` in a scratch directory holding `files`; returns
/// stdout and stderr, panicking on a non-zero status.
fn run_example(name: &str, files: &[(&str, &Path)]) -> (String, String) {
    let pvmm = artifacts::pvmm().unwrap_or_else(|e| panic!("{e}"));
    let remote = artifacts::pvmm_remote().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("pvmm-readme-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    for (file, from) in files {
        std::os::unix::fs::symlink(from, dir.join(file)).expect("example file");
    }
    let mut path: Vec<PathBuf> = [&pvmm, &remote]
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    // POSIX sh (busybox's inside the nested harness, dash or bash here).
    let mut c = Command::new("sh");
    c.args(["-e", "-c", &example(name)])
        .current_dir(&dir)
        .env("PATH", std::env::join_paths(path).expect("PATH"));
    let out = run::run(c, Duration::from_secs(600)).expect("sh runs");
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        out.success(),
        "the README's {name} example failed:\n{}",
        out.describe()
    );
    (out.stdout, out.stderr)
}

#[test]
fn every_example_is_known_and_runs_somewhere() {
    let names: Vec<String> = examples().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["linux", "pviommu", "vfio", "api", "api-vfio"],
        "a README example without its test below"
    );
    // Every sh block of the README is an example or one of the two
    // commands (or the benchmark list, run by hand).
    let blocks = README.matches("```sh").count();
    assert_eq!(blocks, names.len() + 2);
}

#[test]
fn the_main_command_as_written() {
    if !artifacts::require_kvm() {
        return;
    }
    let _vm = run::vm_lock();
    let root = artifacts::workspace_root();
    let mut c = Command::new("bash");
    c.arg(".ci/main").current_dir(&root);
    let out = run::run(c, Duration::from_secs(1200)).expect("bash runs");
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("ok 8 - demo"), "{}", out.describe());
    assert!(out.stderr.contains("pvmm: guest powered off"));
}

#[test]
fn pviommu_example() {
    if !artifacts::require_kvm() {
        return;
    }
    let _vm = run::vm_lock();
    let (stdout, stderr) = run_example("pviommu", &[]);
    // Both boots: the default suites, then the two chosen ones.
    assert_eq!(stdout.matches("ok 7 - dma").count(), 1, "{stdout}");
    assert!(stdout.contains("ok 2 - dma"), "{stdout}");
    assert_eq!(stderr.matches("pvmm: guest powered off").count(), 2);
}

#[test]
fn api_example() {
    if !artifacts::require_kvm() {
        return;
    }
    let _vm = run::vm_lock();
    let (stdout, _) = run_example("api", &[]);
    assert!(stdout.contains(r#""id": "d0""#), "{stdout}");
    assert!(stdout.contains(r#""kind": "dma-test""#), "{stdout}");
    // The guest may see d0 arrive, or (when the removal comes first) only
    // its eject request; either way it ejected it.
    let console = std::fs::read_to_string("/tmp/pvmm-console.log").unwrap_or_default();
    assert!(console.contains("# hotplug: ejected"), "{console}");
}

#[test]
#[ignore = "needs a standard KVM (VMX or SVM); the nested harness (tests/nested.rs) runs it"]
fn linux_example() {
    let k = linux::debian_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = std::env::temp_dir().join(format!("pvmm-readme-{}.cpio", std::process::id()));
    linux::initramfs(&initrd, &[]).unwrap_or_else(|e| panic!("{e}"));
    let _vm = run::vm_lock();
    let (stdout, stderr) = run_example(
        "linux",
        &[("bzImage", &k.bzimage), ("initramfs.cpio", &initrd)],
    );
    std::fs::remove_file(&initrd).ok();
    // pvmm's stderr too: why the VM ended, when the guest did not get far.
    assert!(
        stdout.contains("PVMM-FACT cpus=2"),
        "{stdout}\n--- pvmm's stderr ---\n{stderr}"
    );
    assert!(stderr.contains("pvmm: guest powered off"), "{stderr}");
}

#[test]
#[ignore = "needs a standard KVM and QEMU's edu bound to vfio-pci at 0000:00:01.0: the nested harness runs it"]
fn vfio_example() {
    let _vm = run::vm_lock();
    let (stdout, stderr) = run_example("vfio", &[]);
    assert!(
        stdout.contains("[1234:11e8]"),
        "the guest saw no edu:\n{stdout}"
    );
    assert!(stdout.contains("ok 1 - pci"), "{stdout}");
    assert!(stderr.contains("pvmm: guest powered off"), "{stderr}");
}

#[test]
#[ignore = "needs a standard KVM and QEMU's edu bound to vfio-pci at 0000:00:01.0: the nested harness runs it"]
fn api_vfio_example() {
    let _vm = run::vm_lock();
    let (stdout, _) = run_example("api-vfio", &[]);
    assert!(stdout.contains(r#""id": "edu0""#), "{stdout}");
    let console = std::fs::read_to_string("/tmp/pvmm-console.log").unwrap_or_default();
    assert!(console.contains("# hotplug: ejected"), "{console}");
}
