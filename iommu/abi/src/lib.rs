//! pvIOMMU guest ABI: typed, no_std definitions of the Hyper-V-compatible hypercall interface.
#![no_std]
#![forbid(unsafe_code)]
