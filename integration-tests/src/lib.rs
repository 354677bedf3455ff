//! End-to-end tests: the test kernel, the host-kernel harness and benchmarks.
//!
//! This library holds what the integration tests share:
//! - [`tap`]: a parser for the test kernel's TAP output;
//! - [`run`]: run a command with a timeout and capture its output;
//! - [`artifacts`]: build and locate the test kernel ELF and the `pvmm`
//!   binary, and find QEMU;
//! - [`api_vm`]: a `pvmm` with an API socket, raw HTTP requests to it and
//!   its guest's serial output;
//! - [`linux`]: Debian's kernel, busybox initramfs images that report what
//!   a Linux guest sees, and a console reader;
//!
//! How tests find `pvmm`: `PVMM_BIN` if set; else [`artifacts::pvmm`] runs
//! `cargo build -p vmm --bin pvmm` with the test binary's own target
//! directory and profile (derived from the test executable's path) and uses
//! `<target-dir>/<profile>/pvmm`. So the binary is always current, whichever
//! `CARGO_TARGET_DIR` or profile the tests were built with.

pub mod api_vm;
pub mod artifacts;
pub mod linux;
pub mod lockfile;
pub mod run;
pub mod tap;

/// The test kernel's pure rules (memory map, ACPI parsing, command line),
/// compiled for the host so that their unit tests run under `cargo test`.
#[cfg(test)]
#[allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]
#[path = "../test-kernel/src/rules.rs"]
mod kernel_rules;
