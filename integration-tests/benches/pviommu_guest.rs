//! Guest-driven pvIOMMU benchmark (issue 4), not a timed test: boots the
//! test kernel with `tk.tests=hvbench` against the real `iommu` dispatcher
//! through pvmm's vCPU loop (the `hv_double` hooks, until pvmm wires the
//! pvIOMMU itself) and prints the ratios the kernel measured in one run:
//! null hypercall against a bare port-I/O exit (target <= 1.2x), a 507-page
//! MAP against a null hypercall (target <= 2x), pages mapped per second.
//!
//! Run: `cargo bench -p integration-tests --bench pviommu_guest`.

use integration_tests::{artifacts, hv_double, tap};
use iommu::IommuConfig;

fn main() {
    if !artifacts::kvm_usable() {
        println!("SKIP: /dev/kvm cannot be opened");
        return;
    }
    let kernel = artifacts::test_kernel().unwrap_or_else(|e| panic!("{e}"));
    let run = hv_double::boot(kernel, "tk.tests=hvbench", 1, IommuConfig::default(), &[]);
    if let Err(e) = &run.exit {
        panic!("pvmm failed: {e}\n{}", run.serial);
    }
    let r = tap::parse(&run.serial);
    if let Err(p) = r.expect_all_ok(&["hvbench"]) {
        panic!("{p}\n{}", run.serial);
    }
    for d in r.diagnostics.iter().filter(|d| d.starts_with("bench: ")) {
        println!("{}", &d["bench: ".len()..]);
    }
}
