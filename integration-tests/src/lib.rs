//! End-to-end tests: the test kernel, the host-kernel harness and benchmarks.
