//! The SynIC and the VMBus server over arbitrary guest MSR writes,
//! HvCallPostMessage inputs, slot takes and event signals (see
//! `vmbus::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmbus::fuzzing::run(data);
});
