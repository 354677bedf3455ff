//! What a device behind a VMBus channel sees: a packet transport
//! ([`Channel`]) and the device's side of it ([`ChannelDevice`]).
//!
//! The server owns the rings: once the guest opens the channel, every
//! HvCallSignalEvent to the channel's connection id runs the device's
//! [`ChannelDevice::run`] with the channel's rings as a [`Channel`], on the
//! signalling vCPU's thread. The device reads what the guest sent and
//! answers at once (Linux's pci-hyperv polls for some answers with
//! interrupts off, so answers never wait for another thread). When the
//! host has news for the guest (a device to eject), the VMM's thread has
//! the device send it without serving the guest's packets
//! ([`ChannelDevice::flush`], through [`crate::Server::flush_channel`]);
//! [`crate::Server::run_channel`] runs a device in full.

use crate::ring::{Packet, RingError};

/// A channel's packet transport, as its device uses it.
pub trait Channel {
    /// The next packet the guest sent, if any; its space in the ring is
    /// freed.
    fn recv(&mut self) -> Result<Option<Packet>, RingError>;

    /// Sends a packet of type `packet_type` (`VM_PKT_*`) to the guest,
    /// and interrupts it if the ring protocol says so. [`RingError::Full`]
    /// when the guest has not read enough: nothing is written then.
    fn send(
        &mut self,
        packet_type: u16,
        flags: u16,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<(), RingError>;
}

/// Why a device gave up on its channel: the server closes the channel's
/// rings to the device until the guest opens it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelFault {
    /// The rings failed (guest memory or indices make no sense).
    #[error("ring: {0}")]
    Ring(#[from] RingError),
}

/// A device behind a channel.
pub trait ChannelDevice: Send {
    /// The guest opened the channel: a fresh protocol session starts.
    fn opened(&mut self) {}

    /// Serves what the guest sent (the guest signalled the channel, or the
    /// host has news): reads every packet there is, answers, sends what the
    /// host has to say.
    fn run(&mut self, channel: &mut dyn Channel) -> Result<(), ChannelFault>;

    /// Sends only what the host has to say (answers that waited for room,
    /// news), without reading the guest's packets: for a host thread that
    /// must not serve the guest. By default a device has nothing of its own
    /// to say between runs.
    fn flush(&mut self, _channel: &mut dyn Channel) -> Result<(), ChannelFault> {
        Ok(())
    }

    /// The guest closed the channel, unloaded VMBus, or the rings failed.
    fn closed(&mut self) {}
}

/// A device for tests and fuzzing.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod testing {
    use std::sync::{Arc, Mutex};

    use super::{Channel, ChannelDevice, ChannelFault};
    use crate::abi::VM_PKT_COMP;

    /// Answers every packet with a completion of the same transaction id
    /// and payload; counts what it saw.
    #[derive(Debug, Default)]
    pub(crate) struct Echo {
        pub(crate) opened: u32,
        pub(crate) closed: u32,
        pub(crate) packets: u32,
    }

    impl Echo {
        pub(crate) fn shared() -> Arc<Mutex<Self>> {
            Arc::new(Mutex::new(Self::default()))
        }
    }

    impl ChannelDevice for Echo {
        fn opened(&mut self) {
            self.opened += 1;
        }

        fn run(&mut self, channel: &mut dyn Channel) -> Result<(), ChannelFault> {
            // Bounded: a ring holds at most a few thousand packets.
            for _ in 0..4096 {
                let Some(p) = channel.recv()? else {
                    break;
                };
                self.packets += 1;
                channel.send(
                    VM_PKT_COMP,
                    0,
                    p.descriptor.transaction_id.get(),
                    &p.payload,
                )?;
            }
            Ok(())
        }

        fn closed(&mut self) {
            self.closed += 1;
        }
    }
}
