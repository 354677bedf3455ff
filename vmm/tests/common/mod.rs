//! Helpers shared by the integration tests: tiny hand-assembled guests.

#![allow(dead_code)]

/// Where the code of [`pvh_elf`] starts (its PVH entry point).
pub const ENTRY: u32 = 0x10_0010;

/// An ELF64 with one PT_LOAD at 1 MiB and a PVH note whose 32-bit entry
/// (protected mode, paging off) runs `code` at [`ENTRY`].
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    assert!(code.len() <= 0x6f0, "guest code too long");
    let mut v = vec![0u8; 0x1000];
    let mut put = |at: usize, b: &[u8]| v[at..at + b.len()].copy_from_slice(b);
    put(0, b"\x7fELF\x02\x01\x01");
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &0x3eu16.to_le_bytes()); // x86-64
    put(20, &1u32.to_le_bytes());
    put(24, &0x10_0000u64.to_le_bytes()); // e_entry
    put(32, &64u64.to_le_bytes()); // e_phoff
    put(52, &64u16.to_le_bytes()); // e_ehsize
    put(54, &56u16.to_le_bytes()); // e_phentsize
    put(56, &2u16.to_le_bytes()); // e_phnum
                                  // PT_LOAD, R+X: file 0x800.. at 1 MiB.
    let load: [u64; 7] = [
        (5 << 32) | 1,
        0x800,
        0x10_0000,
        0x10_0000,
        0x700,
        0x700,
        0x1000,
    ];
    for (i, x) in load.iter().enumerate() {
        put(64 + 8 * i, &x.to_le_bytes());
    }
    // PT_NOTE: XEN_ELFNOTE_PHYS32_ENTRY.
    let note: [u64; 7] = [4, 0x400, 0, 0, 20, 20, 4];
    for (i, x) in note.iter().enumerate() {
        put(120 + 8 * i, &x.to_le_bytes());
    }
    put(0x400, &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0]);
    put(0x40c, b"Xen\0");
    put(0x410, &ENTRY.to_le_bytes());
    put(0x800 + (ENTRY - 0x10_0000) as usize, code);
    v
}

/// Writes `bytes` to a fresh file in the temporary directory.
pub fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("pvmm-{}-{name}", std::process::id()));
    std::fs::write(&p, bytes).expect("write temp file");
    p
}

/// `mov dx, port; mov al, value; out dx, al`
pub fn outb(port: u16, value: u8) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![0x66, 0xba, p[0], p[1], 0xb0, value, 0xee]
}

/// `hlt; jmp hlt`
pub const HALT: [u8; 3] = [0xf4, 0xeb, 0xfd];
