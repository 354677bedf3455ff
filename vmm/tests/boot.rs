//! `pvmm` boots its embedded test kernel: TAP results on COM1, poweroff,
//! status 0 and one line on stderr.

use std::process::{Command, Output};

const PVMM: &str = env!("CARGO_BIN_EXE_pvmm");

fn pvmm(args: &[&str]) -> Output {
    Command::new(PVMM)
        .args(args)
        .output()
        .expect("cannot run pvmm")
}

/// Checks a TAP stream: a plan `1..N` with N at least `min_tests`, N `ok`
/// lines (skips included), no `not ok`, no bail-out.
fn assert_tap_ok(stdout: &str, min_tests: usize) {
    let plan = stdout
        .lines()
        .find_map(|l| l.strip_prefix("1.."))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no TAP plan:\n{stdout}"));
    assert!(
        plan >= min_tests,
        "plan 1..{plan}, expected at least {min_tests}:\n{stdout}"
    );
    let not_oks: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("not ok") || l.starts_with("Bail out!"))
        .collect();
    assert!(not_oks.is_empty(), "failures: {not_oks:?}\n{stdout}");
    let oks = stdout.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(oks, plan, "{stdout}");
}

fn assert_powered_off(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "pvmm: guest powered off\n");
}

#[test]
fn no_arguments_boots_the_embedded_test_kernel() {
    let out = pvmm(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_powered_off(&out);
    assert!(stdout.contains("booted through PVH"), "{stdout}");
    assert!(stdout.contains("cmdline: console=ttyS0 tk.mem=536870912 tk.cpus=1"));
    for t in ["mem", "cmdline", "smp", "pci"] {
        assert!(
            stdout.contains(&format!(" - {t}")),
            "{t} missing:\n{stdout}"
        );
    }
    assert_tap_ok(&stdout, 4);
}

#[test]
fn four_vcpus_and_memory_above_4_gib() {
    let out = pvmm(&["--cpus", "4", "--memory", "5G"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_powered_off(&out);
    assert!(stdout.contains("4 of 4 CPUs up"), "{stdout}");
    assert!(stdout.contains("= 5368709120 bytes"), "{stdout}");
    assert_tap_ok(&stdout, 4);
}

#[test]
fn linux_64_bit_entry_of_the_same_elf() {
    let out = pvmm(&["--linux64", "--cpus", "2", "--memory", "64M"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_powered_off(&out);
    assert!(stdout.contains("Linux 64-bit boot protocol"), "{stdout}");
    assert_tap_ok(&stdout, 4);
}

#[test]
fn command_line_and_test_selection() {
    let out = pvmm(&[
        "--cmdline",
        "console=ttyS0 tk.tests=cmdline tk.echo=hello-pvmm",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_powered_off(&out);
    assert!(stdout.contains("# echo: hello-pvmm"), "{stdout}");
    assert_tap_ok(&stdout, 1);
}

#[test]
fn serial_to_a_file_and_off() {
    let path = std::env::temp_dir().join(format!("pvmm-serial-{}.log", std::process::id()));
    let arg = format!("file={}", path.display());
    let out = pvmm(&["--serial", &arg]);
    assert_powered_off(&out);
    assert!(out.stdout.is_empty());
    let log = std::fs::read_to_string(&path).expect("serial log");
    assert_tap_ok(&log, 4);
    std::fs::remove_file(&path).ok();

    let out = pvmm(&["--serial", "off"]);
    assert_powered_off(&out);
    assert!(out.stdout.is_empty());
}

#[test]
fn initrd_is_passed_as_a_pvh_module() {
    let path = std::env::temp_dir().join(format!("pvmm-initrd-{}.img", std::process::id()));
    std::fs::write(&path, vec![0x5au8; 3 << 20]).expect("initrd");
    let out = pvmm(&["--initrd", path.to_str().expect("utf-8"), "--memory", "32M"]);
    assert_powered_off(&out);
    assert_tap_ok(&String::from_utf8_lossy(&out.stdout), 4);
    std::fs::remove_file(&path).ok();
}
