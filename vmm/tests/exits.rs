//! How guests end pvmm: every way out gives status 0 and its one line, or
//! status 1 and the failure.

mod common;

use std::process::{Command, Output};

use common::{outb, pvh_elf, temp_file, HALT};

const PVMM: &str = env!("CARGO_BIN_EXE_pvmm");

fn boot(name: &str, code: &[u8]) -> Output {
    let k = temp_file(name, &pvh_elf(code));
    let out = Command::new(PVMM)
        .args(["--kernel", k.to_str().expect("utf-8"), "--memory", "16M"])
        .output()
        .expect("run pvmm");
    std::fs::remove_file(k).ok();
    out
}

fn assert_exit(out: &Output, code: i32, line: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(stderr.starts_with(line), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn acpi_s5_powers_off() {
    let mut code = outb(0x600, (5 << 2) | (1 << 5));
    code.extend(HALT);
    assert_exit(&boot("s5", &code), 0, "pvmm: guest powered off");
}

#[test]
fn acpi_reset_register_resets() {
    let mut code = outb(0x602, 0x42);
    code.extend(HALT);
    assert_exit(&boot("acpi-reset", &code), 0, "pvmm: guest requested reset");
}

#[test]
fn i8042_reset_command_resets() {
    let mut code = outb(0x64, 0xfe);
    code.extend(HALT);
    assert_exit(&boot("i8042", &code), 0, "pvmm: guest requested reset");
}

#[test]
fn triple_fault_resets() {
    // ud2 with no usable IDT: #UD, #DF, shutdown.
    assert_exit(
        &boot("ud2", &[0x0f, 0x0b]),
        0,
        "pvmm: guest reset (triple fault)",
    );
}

#[test]
fn unknown_ports_read_as_all_ones_and_serial_prints() {
    // in al, 0x99; mov dx, 0x3f8; out dx, al ('\xff' would be unreadable, so
    // add 0x42: 0xff + 0x42 = 0x41 = 'A'); then power off.
    let mut code = vec![0xe4, 0x99, 0x04, 0x42];
    code.extend([0x66, 0xba, 0xf8, 0x03, 0xee]);
    code.extend(outb(0x600, (5 << 2) | (1 << 5)));
    code.extend(HALT);
    let out = boot("ports", &code);
    assert_exit(&out, 0, "pvmm: guest powered off");
    assert_eq!(out.stdout, b"A");
}

/// String port I/O is one access per element: `rep outsb` of "pvmm" to
/// COM1 prints four characters, and `rep insw` from an unused port fills
/// every element with all ones (each a 2-byte read; a whole-string access
/// would be one 8-byte read, which no device takes). A `rep outsb` to the
/// hypercall port is no hypercall.
#[test]
fn string_port_io_is_one_access_per_element() {
    let text = 0x10_0200u32.to_le_bytes();
    let buf = 0x10_0300u32.to_le_bytes();
    let mut code = Vec::new();
    code.extend([0xbe, text[0], text[1], text[2], text[3]]); // mov esi, text
    code.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend([0xb9, 4, 0, 0, 0]); // mov ecx, 4
    code.extend([0xf3, 0x6e]); // rep outsb
    code.extend([0xbf, buf[0], buf[1], buf[2], buf[3]]); // mov edi, buf
    code.extend([0x66, 0xba, 0x99, 0x00]); // mov dx, 0x99
    code.extend([0xb9, 4, 0, 0, 0]); // mov ecx, 4
    code.extend([0xf3, 0x66, 0x6d]); // rep insw
                                     // The eight bytes read, checked: if all 0xff, print 'K'.
    code.extend([0x8b, 0x05, buf[0], buf[1], buf[2], buf[3]]); // mov eax, [buf]
    code.extend([0x23, 0x05, buf[0] + 4, buf[1], buf[2], buf[3]]); // and eax, [buf+4]
    code.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend([0x83, 0xf8, 0xff]); // cmp eax, -1
    code.extend([0x75, 0x03]); // jne over the next two instructions
    code.extend([0xb0, b'K']); // mov al, 'K'
    code.extend([0xee]); // out dx, al
                         // rep outsb to 0xE4 (the hypercall port, no hypercall page here).
    code.extend([0xbe, text[0], text[1], text[2], text[3]]); // mov esi, text
    code.extend([0x66, 0xba, 0xe4, 0x00]); // mov dx, 0xe4
    code.extend([0xb9, 4, 0, 0, 0]); // mov ecx, 4
    code.extend([0xf3, 0x6e]); // rep outsb
    code.extend(outb(0x600, (5 << 2) | (1 << 5)));
    code.extend(HALT);
    assert!(code.len() < 0x1f0, "code runs into its data");
    code.resize(0x1f0, 0x90);
    code.extend(b"pvmm");
    let out = boot("string-io", &code);
    assert_exit(&out, 0, "pvmm: guest powered off");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pvmmK");
}
