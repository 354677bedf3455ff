//! IOMMUFD ioctls and structures that `iommufd-ioctls` 0.4 does not wrap.
//!
//! Taken from Linux 6.12: `include/uapi/linux/iommufd.h` (IOAS_IOVA_RANGES)
//! and `drivers/iommu/iommufd/iommufd_test.h` (the selftest mock driver,
//! present when the kernel has CONFIG_IOMMUFD_TEST). The structures that
//! `iommufd-bindings` already defines are reused from there.

use iommufd_bindings::iommufd::{IOMMUFD_CMD_BASE, IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_TYPE};

vmm_sys_util::ioctl_io_nr!(
    IOMMU_IOAS_IOVA_RANGES,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_IOVA_RANGES
);
vmm_sys_util::ioctl_io_nr!(IOMMU_TEST_CMD, IOMMUFD_TYPE as u32, IOMMUFD_CMD_BASE + 32);

/// `size_of::<T>()` as the `u32` that uapi structures carry in `size`,
/// `entry_len` and `data_len` fields; evaluated at compile time.
pub const fn size_u32<T>() -> u32 {
    let size = size_of::<T>();
    assert!(size <= u32::MAX as usize);
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let size = size as u32;
    size
}

/// `IOMMU_TEST_OP_*`: the operations of `IOMMU_TEST_CMD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum TestOp {
    /// Create a mock device bound to the iommufd and attach it to `id`.
    MockDomain = 2,
    /// Attach mock device `id` to another page table.
    MockDomainReplace = 10,
    /// Compare one mock IOTLB entry of nested HWPT `id`.
    MdCheckIotlb = 14,
}

/// `IOMMU_HWPT_DATA_SELFTEST`: HWPT data type of the mock nested domain.
pub const IOMMU_HWPT_DATA_SELFTEST: u32 = 0xdead;
/// `IOMMU_TEST_IOTLB_DEFAULT`: what every mock IOTLB entry holds after allocation.
pub const IOMMU_TEST_IOTLB_DEFAULT: u32 = 0x0bad_beef;
/// `IOMMU_HWPT_INVALIDATE_DATA_SELFTEST`: invalidation data type of the mock.
pub const IOMMU_HWPT_INVALIDATE_DATA_SELFTEST: u32 = 0xdead_beef;
/// `IOMMU_TEST_INVALIDATE_FLAG_ALL`: invalidate every entry, ignore `iotlb_id`.
pub const IOMMU_TEST_INVALIDATE_FLAG_ALL: u32 = 1;
/// `MOCK_NESTED_DOMAIN_IOTLB_ID_MAX`: the highest valid mock IOTLB index.
pub const MOCK_NESTED_DOMAIN_IOTLB_ID_MAX: u32 = 3;
/// `MOCK_NESTED_DOMAIN_IOTLB_NUM`: entries in a mock IOTLB.
pub const MOCK_NESTED_DOMAIN_IOTLB_NUM: u32 = 4;

/// Size of the union in `struct iommu_test_cmd` (its largest member, `dirty`).
const TEST_PAYLOAD_SIZE: usize = 48;

/// One member of the union in `struct iommu_test_cmd`, padded to the union's size.
pub trait TestPayload: Copy + Default {
    /// The operation this member belongs to.
    const OP: TestOp;
}

/// `struct iommu_test_cmd` with its union member `P`.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct IommuTestCmd<P: TestPayload> {
    pub size: u32,
    pub op: u32,
    pub id: u32,
    pub reserved: u32,
    pub payload: P,
    pub last: u32,
}

impl<P: TestPayload> IommuTestCmd<P> {
    /// A command for object `id` with payload `payload`.
    pub fn new(id: u32, payload: P) -> Self {
        Self {
            size: const { size_u32::<Self>() },
            op: P::OP as u32,
            id,
            reserved: 0,
            payload,
            last: 0,
        }
    }
}

/// `mock_domain` member: outputs of [`TestOp::MockDomain`].
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(8))] // the C union holds __aligned_u64 members
pub struct MockDomain {
    pub out_stdev_id: u32,
    pub out_hwpt_id: u32,
    /// The standard iommufd device object of the mock device (its `dev_id`).
    pub out_idev_id: u32,
    pub pad: [u32; 9],
}
impl TestPayload for MockDomain {
    const OP: TestOp = TestOp::MockDomain;
}

/// `mock_domain_replace` member.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(8))] // the C union holds __aligned_u64 members
pub struct MockDomainReplace {
    pub pt_id: u32,
    pub pad: [u32; 11],
}
impl TestPayload for MockDomainReplace {
    const OP: TestOp = TestOp::MockDomainReplace;
}

/// `check_iotlb` member: entry `id` of the mock IOTLB must equal `iotlb`.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(8))] // the C union holds __aligned_u64 members
pub struct CheckIotlb {
    pub id: u32,
    pub iotlb: u32,
    pub pad: [u32; 10],
}
impl TestPayload for CheckIotlb {
    const OP: TestOp = TestOp::MdCheckIotlb;
}

/// `struct iommu_hwpt_selftest`: data of a mock nested HWPT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct HwptSelftest {
    pub iotlb: u32,
}

/// `struct iommu_hwpt_invalidate_selftest`: one invalidation entry of the mock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct HwptInvalidateSelftest {
    pub flags: u32,
    pub iotlb_id: u32,
}

const _: () = assert!(size_of::<MockDomain>() == TEST_PAYLOAD_SIZE);
const _: () = assert!(size_of::<MockDomainReplace>() == TEST_PAYLOAD_SIZE);
const _: () = assert!(size_of::<CheckIotlb>() == TEST_PAYLOAD_SIZE);
const _: () = assert!(align_of::<MockDomain>() == 8);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;
    use iommufd_bindings::iommufd::{iommu_ioas_iova_ranges, iommu_iova_range};

    #[test]
    fn ioctl_numbers_match_linux_6_12() {
        // _IO(';', 0x84) and _IO(';', 0x80 + 32).
        assert_eq!(IOMMU_IOAS_IOVA_RANGES(), 0x3b84);
        assert_eq!(IOMMU_TEST_CMD(), 0x3ba0);
    }

    #[test]
    fn test_ops_match_the_enum_of_iommufd_test_h() {
        // IOMMU_TEST_OP_ADD_RESERVED = 1, then counting up.
        assert_eq!(TestOp::MockDomain as u32, 2);
        assert_eq!(TestOp::MockDomainReplace as u32, 10);
        assert_eq!(TestOp::MdCheckIotlb as u32, 14);
    }

    #[test]
    fn test_cmd_layout() {
        // The kernel requires size >= offsetofend(last) = 68; sizeof is 72.
        assert_eq!(size_of::<IommuTestCmd<MockDomain>>(), 72);
        assert_eq!(offset_of!(IommuTestCmd<MockDomain>, size), 0);
        assert_eq!(offset_of!(IommuTestCmd<MockDomain>, op), 4);
        assert_eq!(offset_of!(IommuTestCmd<MockDomain>, id), 8);
        assert_eq!(offset_of!(IommuTestCmd<MockDomain>, reserved), 12);
        assert_eq!(offset_of!(IommuTestCmd<MockDomain>, payload), 16);
        assert_eq!(offset_of!(IommuTestCmd<MockDomain>, last), 64);
        assert_eq!(offset_of!(IommuTestCmd<CheckIotlb>, last), 64);
        assert_eq!(offset_of!(IommuTestCmd<MockDomainReplace>, last), 64);
        assert_eq!(IommuTestCmd::new(7, CheckIotlb::default()).size, 72);
        assert_eq!(IommuTestCmd::new(7, CheckIotlb::default()).op, 14);
    }

    #[test]
    fn test_payload_layouts() {
        assert_eq!(offset_of!(MockDomain, out_stdev_id), 0);
        assert_eq!(offset_of!(MockDomain, out_hwpt_id), 4);
        assert_eq!(offset_of!(MockDomain, out_idev_id), 8);
        assert_eq!(offset_of!(MockDomainReplace, pt_id), 0);
        assert_eq!(offset_of!(CheckIotlb, id), 0);
        assert_eq!(offset_of!(CheckIotlb, iotlb), 4);
        assert_eq!(size_of::<HwptSelftest>(), 4);
        assert_eq!(offset_of!(HwptSelftest, iotlb), 0);
        assert_eq!(size_of::<HwptInvalidateSelftest>(), 8);
        assert_eq!(offset_of!(HwptInvalidateSelftest, flags), 0);
        assert_eq!(offset_of!(HwptInvalidateSelftest, iotlb_id), 4);
    }

    #[test]
    fn reused_binding_layouts_match_linux_6_12() {
        assert_eq!(size_of::<iommu_ioas_iova_ranges>(), 32);
        assert_eq!(offset_of!(iommu_ioas_iova_ranges, num_iovas), 8);
        assert_eq!(offset_of!(iommu_ioas_iova_ranges, allowed_iovas), 16);
        assert_eq!(offset_of!(iommu_ioas_iova_ranges, out_iova_alignment), 24);
        assert_eq!(size_of::<iommu_iova_range>(), 16);
    }
}
