//! Entry point inside the QEMU guest: `hk-guest [test|selftest|bench]`.

use std::process::ExitCode;

use hk_guest::{bench, suite, tap};

fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "test".into());
    match mode.as_str() {
        "test" | "selftest" => {
            let tests = if mode == "test" {
                suite::VFIO_TESTS
            } else {
                suite::SELFTEST_TESTS
            };
            if suite::run(tests) == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        "bench" => match bench::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tap::diag(format!("benchmark failed: {e}"));
                ExitCode::FAILURE
            }
        },
        other => {
            eprintln!("hk-guest: unknown mode {other:?}; use `test`, `selftest` or `bench`");
            ExitCode::from(2)
        }
    }
}
