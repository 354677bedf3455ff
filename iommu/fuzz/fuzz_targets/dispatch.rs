//! The pvIOMMU dispatcher and DMA path over arbitrary registers, input pages,
//! guest memory writes and device hot-plug (see `iommu::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    iommu::fuzzing::run(data);
});
