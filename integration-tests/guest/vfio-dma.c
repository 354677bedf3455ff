/*
 * vfio-dma: drives pvmm's dma-test device from a Linux guest's user space
 * through vfio-pci and a type1 container, so that every DMA goes through the
 * guest's IOMMU driver (the Hyper-V pvIOMMU) and the page tables it writes.
 *
 *   usage: vfio-dma <iommu group> <PCI address>
 *
 * The device must already be bound to vfio-pci. The program maps two pages
 * of its own memory at IOVA, has the device fill them and checksum them,
 * unmaps them, and has the device fill them again: that DMA must fault at
 * IOVA and write nothing. Each step prints one "VFIO-DMA" line; the last is
 * "VFIO-DMA ok ..." when everything held, and the exit status is 0 then.
 *
 * The register offsets, command, status and fault codes come from
 * dma-test-regs.h, which the test writes from the device's one definition
 * (devices/src/dma_test/regs.rs) and passes with -include.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/pci_regs.h>
#include <linux/vfio.h>

#define IOVA 0x40000000ull
#define LEN (2 * 4096u)
#define PATTERN 0x5aa5c33cu

static int device = -1;
static uint64_t bar0, config;

static void fail(const char *what)
{
	printf("VFIO-DMA fail %s: %s\n", what, errno ? strerror(errno) : "unexpected value");
	exit(1);
}

static void xioctl(int fd, unsigned long request, void *arg, const char *what)
{
	errno = 0;
	if (ioctl(fd, request, arg) < 0)
		fail(what);
}

static void put(uint64_t offset, uint64_t value, size_t width)
{
	errno = 0;
	if (pwrite(device, &value, width, (off_t)(bar0 + offset)) != (ssize_t)width)
		fail("register write");
}

static uint64_t get(uint64_t offset, size_t width)
{
	uint64_t value = 0;

	errno = 0;
	if (pread(device, &value, width, (off_t)(bar0 + offset)) != (ssize_t)width)
		fail("register read");
	return value;
}

static uint64_t region(unsigned int index)
{
	struct vfio_region_info info = { .argsz = sizeof(info), .index = index };

	xioctl(device, VFIO_DEVICE_GET_REGION_INFO, &info, "VFIO_DEVICE_GET_REGION_INFO");
	return info.offset;
}

/* Runs one command; returns its status. */
static uint32_t run(uint32_t command, uint64_t iova)
{
	if (command == DMA_TEST_COMMAND_CHECKSUM)
		put(DMA_TEST_SRC_IOVA, iova, 8);
	else
		put(DMA_TEST_DST_IOVA, iova, 8);
	put(DMA_TEST_LEN, LEN, 4);
	put(DMA_TEST_PATTERN, PATTERN, 4);
	put(DMA_TEST_COMMAND, command, 4);
	return (uint32_t)get(DMA_TEST_STATUS, 4);
}

static int filled(const uint8_t *buf, uint32_t pattern)
{
	for (size_t i = 0; i < LEN; i += 4) {
		uint32_t word;

		memcpy(&word, buf + i, 4);
		if (word != pattern)
			return 0;
	}
	return 1;
}

int main(int argc, char **argv)
{
	char path[64];
	int container, group;
	uint16_t cmd;
	uint32_t status, reason;
	uint64_t sum = 0, fault_iova;
	uint8_t *buf;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 3) {
		fprintf(stderr, "usage: %s <iommu group> <PCI address>\n", argv[0]);
		return 2;
	}

	/* The type1 container, the device's group in it, the device. */
	container = open("/dev/vfio/vfio", O_RDWR);
	if (container < 0)
		fail("open /dev/vfio/vfio");
	errno = 0;
	if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION ||
	    ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1)
		fail("no VFIO type1v2");
	snprintf(path, sizeof(path), "/dev/vfio/%s", argv[1]);
	group = open(path, O_RDWR);
	if (group < 0)
		fail(path);
	struct vfio_group_status gs = { .argsz = sizeof(gs) };
	xioctl(group, VFIO_GROUP_GET_STATUS, &gs, "VFIO_GROUP_GET_STATUS");
	if (!(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
		fail("group not viable");
	xioctl(group, VFIO_GROUP_SET_CONTAINER, &container, "VFIO_GROUP_SET_CONTAINER");
	/* Here the group leaves its default domain for a paging domain of type1's. */
	errno = 0;
	if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0)
		fail("VFIO_SET_IOMMU");
	device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
	if (device < 0)
		fail("VFIO_GROUP_GET_DEVICE_FD");
	bar0 = region(VFIO_PCI_BAR0_REGION_INDEX);
	config = region(VFIO_PCI_CONFIG_REGION_INDEX);
	if (pread(device, &cmd, 2, (off_t)(config + PCI_COMMAND)) != 2)
		fail("config read");
	cmd |= PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
	if (pwrite(device, &cmd, 2, (off_t)(config + PCI_COMMAND)) != 2)
		fail("config write");
	printf("VFIO-DMA open group %s device %s\n", argv[1], argv[2]);

	/* Two pages of ours at IOVA: the device fills them, then sums them. */
	buf = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		fail("mmap");
	memset(buf, 0, LEN);
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)buf,
		.iova = IOVA,
		.size = LEN,
	};
	xioctl(container, VFIO_IOMMU_MAP_DMA, &map, "VFIO_IOMMU_MAP_DMA");
	status = run(DMA_TEST_COMMAND_FILL, IOVA);
	if (status != DMA_TEST_STATUS_DONE || !filled(buf, PATTERN)) {
		printf("VFIO-DMA fill status %" PRIu32 "\n", status);
		fail("fill through the mapping");
	}
	for (size_t i = 0; i < LEN; i++) {
		buf[i] = (uint8_t)(i * 7);
		sum += buf[i];
	}
	status = run(DMA_TEST_COMMAND_CHECKSUM, IOVA);
	if (status != DMA_TEST_STATUS_DONE || get(DMA_TEST_RESULT, 8) != sum)
		fail("checksum through the mapping");
	printf("VFIO-DMA mapped iova 0x%llx: fill and checksum of %u bytes done\n", IOVA, LEN);

	/* Unmapped, the same DMA must fault and write nothing. */
	struct vfio_iommu_type1_dma_unmap unmap = {
		.argsz = sizeof(unmap),
		.iova = IOVA,
		.size = LEN,
	};
	xioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap, "VFIO_IOMMU_UNMAP_DMA");
	if (unmap.size != LEN)
		fail("unmapped size");
	memset(buf, 0, LEN);
	status = run(DMA_TEST_COMMAND_FILL, IOVA);
	fault_iova = get(DMA_TEST_FAULT_IOVA, 8);
	reason = (uint32_t)get(DMA_TEST_FAULT_REASON, 4);
	printf("VFIO-DMA after unmap: status %" PRIu32 " fault iova 0x%" PRIx64 " reason %" PRIu32 "\n",
	       status, fault_iova, reason);
	if (status != DMA_TEST_STATUS_FAULT || fault_iova != IOVA || !filled(buf, 0))
		fail("DMA after unmap");

	close(device);
	close(group);
	close(container);
	printf("VFIO-DMA ok iova 0x%llx fault_reason %" PRIu32 "\n", IOVA, reason);
	return 0;
}
