//! Bounded logging for events the guest can cause at will: every such line
//! goes through the process's one limiter, `iommu::guest_log` (a burst,
//! then a rate, and every dropped line counted).

/// `log::warn!` for a guest-caused event, through `iommu::guest_log`.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        iommu::guest_log!(Warn, $($arg)+)
    };
}
