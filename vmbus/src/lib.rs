//! VMBus for pvmm: the wire formats, a user-space SynIC and the VMBus
//! control plane (issue 13, "VMBus and a virtual PCI bus").
//!
//! VMBus is Hyper-V's device bus: the host offers channels over SynIC
//! messages, and the guest's `hv_vmbus` (Linux) connects, lists the offers
//! and opens channels whose ring buffers then carry each device's protocol
//! (vPCI among them).
//!
//! # What it does
//! - [`abi`]: the SynIC's register formats, the message and event-flags
//!   pages, HvCallPostMessage's input, the channel messages of connect,
//!   offers and unload (INITIATE_CONTACT, VERSION_RESPONSE, OFFERCHANNEL,
//!   REQUESTOFFERS, ALLOFFERS_DELIVERED, UNLOAD, UNLOAD_RESPONSE) and of a
//!   channel's set-up (GPADL_HEADER/BODY/CREATED/TEARDOWN/TORNDOWN,
//!   OPENCHANNEL, OPENCHANNEL_RESULT, CLOSECHANNEL), VMBus versions and
//!   connection ids. Layouts are tested field by field. The SynIC's MSR
//!   numbers ([`pviommu_abi::msr`]) and the HV_STATUS codes
//!   ([`pviommu_abi::HvError`]) are `pviommu-abi`'s, pvmm's one definition
//!   of Hyper-V's numbers.
//! - [`synic`]: per-VP SynIC state behind the MSRs, message delivery into
//!   the guest's message page with the busy-slot (`msg_pending`/EOM)
//!   protocol and bounded queues, event flags, interrupts through a
//!   [`synic::SintSink`].
//! - [`ring`]: a channel's two rings over its GPADL's pages: packets read
//!   from the guest-to-host ring and written to the host-to-guest one,
//!   with every guest index and header checked.
//! - [`server`]: HvCallPostMessage's VMBus port: version negotiation as
//!   Linux expects it (5.3 down to 5.0 accepted), the offer list (zero or
//!   more offers registered through [`server::Server::add_offer`], each
//!   with its [`channel::ChannelDevice`]), unload, and channel set-up:
//!   GPADLs, open, close; HvCallSignalEvent's ports
//!   ([`server::Server::signal_event`]), which run a channel's device on
//!   its rings, and the channels' interrupts (event flags).
//!   Refusals are typed [`server::PostError`]s and
//!   [`server::SignalError`]s with their HV_STATUS (an
//!   [`pviommu_abi::HvError`]).
//! - [`channel`]: what a device behind a channel sees.
//! - [`vpci`]: the vPCI server for Linux's pci-hyperv (protocol 1.2 to
//!   1.4): bus relations, resource requirements, D0 entry and the config
//!   window, interrupts (x86 MSI messages), retargeting, eject.
//!
//! # Where pvmm uses it
//! `vmm/src/vmbus.rs` wires it to the guest in pvmm's Hyper-V mode: the
//! SynIC MSRs through the MSR filter, HvCallPostMessage, HvCallSignalEvent
//! and HvCallRetargetDeviceInterrupt through the hypercall dispatcher
//! (`pviommu_abi::HypercallCode`), SINT interrupts as MSIs to the local
//! APICs, the SynIC, post-message and signal-event CPUID bits with the
//! auto-EOI deprecation hint, and the ACPI device (`\_SB.VMBS`, with
//! VMBus's MMIO windows) Linux probes. `vmm/src/vpci.rs` puts each
//! vPCI device (by default, every device of a VM with VMBus and a kernel
//! of the user's) on a vPCI bus of its own. Linux 7.2 connects at 5.3,
//! probes such a bus and its pvIOMMU driver manages the device (the nested
//! harness's `linux_vpci_device_behind_the_pviommu`).
//!
//! # What it does NOT do yet
//! - monitor pages (offers say none);
//! - no KVM in-kernel SynIC backend, no save/restore.
//!
//! Items marked `[verify]` in the documentation are the research plan's
//! open points, to be checked against the Linux 7.2 sources.
//!
//! No unsafe code; no panic on guest input; every queue is bounded.
#![forbid(unsafe_code)]

/// The wire formats: the `vmbus-abi` crate (`no_std`, shared with pvmm's
/// test kernel).
pub use vmbus_abi as abi;
pub mod channel;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod ring;
pub mod server;
pub mod synic;
pub mod vpci;

pub use server::{PostError, Server};
pub use synic::{SintSink, Synic};
