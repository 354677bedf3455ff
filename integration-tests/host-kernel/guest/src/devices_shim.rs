//! The `devices` crate's VFIO passthrough device, compiled here by path:
//! `devices`' lib.rs does not declare `pub mod vfio` yet. The module names
//! the rest of its crate only through `super::`, which these re-exports
//! stand in for. Once `devices::vfio` exists, this file becomes
//! `pub use devices::vfio;`.

pub use devices::{bus, pci};

#[path = "../../../../devices/src/vfio/mod.rs"]
pub mod vfio;
