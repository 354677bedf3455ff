//! Loading a kernel (bzImage, ELF vmlinux, PVH ELF) with linux-loader, its
//! command line and initrd, and the boot information the kernel reads:
//! `boot_params` with the e820 map (Linux 64-bit protocol) or
//! `hvm_start_info` with its memory map (PVH).

use std::fmt;
use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::{
    load_cmdline, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use resources::layout::{self, boot, MemoryMapEntry, PAGE_SIZE};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::config::BootProtocol;
use crate::cpu::Entry;
use crate::error::{Error, Result};

/// The test kernel built into pvmm (empty when the build could not make it).
pub const EMBEDDED_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-kernel.elf"));
/// Why the embedded kernel is missing, if it is.
pub const EMBEDDED_KERNEL_ERROR: Option<&str> =
    include!(concat!(env!("OUT_DIR"), "/test-kernel-error.rs"));

/// Where a kernel image comes from.
pub enum KernelImage {
    /// A file.
    File(PathBuf, File),
    /// Bytes in memory (the embedded test kernel).
    Bytes(&'static str, Cursor<&'static [u8]>),
}

impl KernelImage {
    /// Opens a kernel file.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::KernelOpen(path.to_path_buf(), e))?;
        let meta = f
            .metadata()
            .map_err(|e| Error::KernelOpen(path.to_path_buf(), e))?;
        if !meta.is_file() {
            return Err(Error::KernelOpen(
                path.to_path_buf(),
                std::io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        Ok(Self::File(path.to_path_buf(), f))
    }

    /// The embedded test kernel.
    pub fn embedded() -> Result<Self> {
        if let Some(why) = EMBEDDED_KERNEL_ERROR {
            return Err(Error::EmbeddedKernelMissing(why));
        }
        Ok(Self::Bytes(
            "(embedded test kernel)",
            Cursor::new(EMBEDDED_KERNEL),
        ))
    }

    /// The path of the kernel, as messages name it.
    fn path(&self) -> PathBuf {
        match self {
            Self::File(p, _) => p.clone(),
            Self::Bytes(n, _) => PathBuf::from(n),
        }
    }
}

/// Kernel image formats pvmm recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF (vmlinux, maybe with a PVH note).
    Elf,
    /// bzImage.
    BzImage,
}

/// What an image that is no kernel pvmm boots turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnknownFormat {
    /// Too short for either header.
    Short(usize),
    /// Neither the ELF magic nor a bzImage header: its first bytes.
    Magic([u8; 4]),
    /// linux-loader took it for a bzImage but found no setup header.
    NoSetupHeader,
}

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short(n) => write!(f, "a file of {n} bytes"),
            Self::Magic(b) => write!(
                f,
                "a file that starts with {:02x} {:02x} {:02x} {:02x}",
                b[0], b[1], b[2], b[3]
            ),
            Self::NoSetupHeader => write!(f, "a bzImage without a setup header"),
        }
    }
}

/// The bytes that tell the format: the ELF magic, or the bzImage setup
/// header's "HdrS" at 0x202.
const HEAD_LEN: usize = 0x206;

/// Tells the format from the image's first bytes.
pub fn detect_format<R: Read + Seek>(image: &mut R) -> std::io::Result<Option<KernelFormat>> {
    Ok(identify(image)?.ok())
}

/// The image's format, or what it is instead.
fn identify<R: Read + Seek>(
    image: &mut R,
) -> std::io::Result<std::result::Result<KernelFormat, UnknownFormat>> {
    let mut head = [0u8; HEAD_LEN];
    image.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        match image.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    image.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Ok(KernelFormat::Elf));
    }
    if n >= HEAD_LEN && head[0x202..HEAD_LEN] == *b"HdrS" {
        return Ok(Ok(KernelFormat::BzImage));
    }
    Ok(Err(if n < 4 {
        UnknownFormat::Short(n)
    } else {
        UnknownFormat::Magic([head[0], head[1], head[2], head[3]])
    }))
}

/// A loaded kernel.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// How the boot vCPU enters it.
    pub entry: Entry,
    /// End of the kernel in guest memory.
    pub kernel_end: u64,
    /// The bzImage setup header, if it was one.
    pub setup_header: Option<setup_header>,
}

/// XLF_KERNEL_64: the kernel has the 64-bit entry point at load + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Boot protocol 2.12 introduced xloadflags... and 2.06 cmdline_size.
const MIN_BZIMAGE_VERSION: u16 = 0x020c;

fn load_with<R>(
    mem: &GuestMemoryMmap,
    image: &mut R,
    path: &Path,
    protocol: BootProtocol,
) -> Result<LoadedKernel>
where
    R: Read + ReadVolatile + Seek,
{
    let unknown = |found| Error::KernelFormat {
        path: path.to_path_buf(),
        found,
    };
    let format = identify(image)
        .map_err(|e| Error::KernelOpen(path.to_path_buf(), e))?
        .map_err(unknown)?;
    let himem = Some(GuestAddress(boot::HIMEM_START));
    let load_err = |e| Error::KernelLoad(path.to_path_buf(), e);
    match format {
        KernelFormat::Elf => {
            let r: KernelLoaderResult = Elf::load(mem, None, image, himem).map_err(load_err)?;
            let entry = match (r.pvh_boot_cap, protocol) {
                (PvhBootCapability::PvhEntryPresent(a), BootProtocol::Auto) => {
                    Entry::Pvh { rip: a.raw_value() }
                }
                _ => Entry::Linux64 {
                    rip: r.kernel_load.raw_value(),
                },
            };
            Ok(LoadedKernel {
                entry,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, image, himem).map_err(load_err)?;
            let hdr = r
                .setup_header
                .ok_or_else(|| unknown(UnknownFormat::NoSetupHeader))?;
            let (version, xload) = (hdr.version, hdr.xloadflags);
            if version < MIN_BZIMAGE_VERSION || xload & XLF_KERNEL_64 == 0 {
                return Err(Error::KernelNot64Bit {
                    path: path.to_path_buf(),
                    version,
                });
            }
            Ok(LoadedKernel {
                entry: Entry::Linux64 {
                    rip: r.kernel_load.raw_value() + 0x200,
                },
                kernel_end: r.kernel_end,
                setup_header: Some(hdr),
            })
        }
    }
}

/// Loads `image` into `mem` and says how to enter it.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    image: KernelImage,
    protocol: BootProtocol,
) -> Result<LoadedKernel> {
    let path = image.path();
    match image {
        KernelImage::File(_, mut f) => load_with(mem, &mut f, &path, protocol),
        KernelImage::Bytes(_, mut c) => load_with(mem, &mut c, &path, protocol),
    }
}

/// Writes the NUL-terminated command line at `boot::CMDLINE_START`.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize> {
    let bad = |source| Error::Cmdline {
        start: cmdline.chars().take(40).collect(),
        max: boot::CMDLINE_MAX_SIZE - 1,
        source,
    };
    let mut c = Cmdline::new(boot::CMDLINE_MAX_SIZE).map_err(bad)?;
    if !cmdline.is_empty() {
        c.insert_str(cmdline).map_err(bad)?;
    }
    load_cmdline(mem, GuestAddress(boot::CMDLINE_START), &c).map_err(Error::CmdlineWrite)?;
    Ok(cmdline.len() + 1)
}

/// Where the initrd went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Places an initrd of `size` bytes as high as possible below `top`
/// (exclusive) and above `floor`, page aligned.
pub fn place_initrd(size: u64, floor: u64, top: u64) -> Option<u64> {
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= floor.next_multiple_of(PAGE_SIZE)).then_some(addr)
}

/// Loads the initrd at the top of low RAM (below `max_addr`, the kernel's
/// `initrd_addr_max` + 1 for a bzImage), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
    max_addr: Option<u64>,
) -> Result<InitrdPlacement> {
    let mut f = File::open(path).map_err(|e| Error::InitrdOpen(path.to_path_buf(), e))?;
    let size = f
        .metadata()
        .map_err(|e| Error::InitrdOpen(path.to_path_buf(), e))?
        .len();
    let mut top = layout::low_ram_end(mem_size);
    if let Some(m) = max_addr {
        top = top.min(m);
    }
    let floor = kernel_end.max(boot::HIMEM_START);
    let addr = place_initrd(size, floor, top).ok_or_else(|| Error::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        room: top.saturating_sub(floor.next_multiple_of(PAGE_SIZE)),
    })?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        room: 0,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| Error::InitrdRead(path.to_path_buf(), e))?;
    Ok(InitrdPlacement { addr, size })
}

/// The command line address as boot_params wants it (below 1 MiB, so the
/// cast keeps every bit).
#[allow(clippy::cast_possible_truncation)]
const CMDLINE_PTR: u32 = {
    assert!(boot::CMDLINE_START < 1 << 20);
    boot::CMDLINE_START as u32
};
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// loadflags: CAN_USE_HEAP.
const CAN_USE_HEAP: u8 = 1 << 7;

/// Writes `boot_params` (zero page) for the Linux 64-bit protocol.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    rsdp: u64,
    map: &[MemoryMapEntry],
) -> Result<u64> {
    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(h) => params.hdr = h,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_PTR;
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(u32::MAX);
    if let Some(i) = initrd {
        // Below the top of low RAM (3 GiB): fits in 32 bits.
        params.hdr.ramdisk_image =
            u32::try_from(i.addr).map_err(|_| Error::BootWrite("the initrd address"))?;
        params.hdr.ramdisk_size =
            u32::try_from(i.size).map_err(|_| Error::BootWrite("the initrd size"))?;
    }
    params.acpi_rsdp_addr = rsdp;
    if map.len() > params.e820_table.len() {
        return Err(Error::BootWrite("the e820 map"));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind as u32;
    }
    params.e820_entries = u8::try_from(map.len()).map_err(|_| Error::BootWrite("the e820 map"))?;
    let bp = BootParams::new(&params, GuestAddress(boot::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem)
        .map_err(|e| Error::BootInfo("boot_params", e))?;
    Ok(boot::ZERO_PAGE_START)
}

/// Writes `hvm_start_info`, its memory map and module list for PVH.
pub fn write_pvh_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    rsdp: u64,
    map: &[MemoryMapEntry],
) -> Result<u64> {
    if map.len() > boot::PVH_MEMMAP_MAX_ENTRIES {
        return Err(Error::BootWrite("the PVH memory map"));
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: boot::CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: boot::PVH_MEMMAP_START,
        memmap_entries: u32::try_from(map.len()).unwrap_or(0),
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut bp = BootParams::new(&info, GuestAddress(boot::PVH_INFO_START));
    if let Some(i) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = boot::PVH_MODLIST_START;
        bp = BootParams::new(&info, GuestAddress(boot::PVH_INFO_START));
        bp.set_modules(
            &[hvm_modlist_entry {
                paddr: i.addr,
                size: i.size,
                ..Default::default()
            }],
            GuestAddress(boot::PVH_MODLIST_START),
        );
    }
    bp.set_sections(&memmap, GuestAddress(boot::PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&bp, mem)
        .map_err(|e| Error::BootInfo("hvm_start_info", e))?;
    Ok(boot::PVH_INFO_START)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    /// A minimal ELF64 with one PT_LOAD of `code` at 1 MiB and, optionally,
    /// a PVH note pointing at 1 MiB + 0x10.
    pub(crate) fn tiny_elf(code: &[u8], pvh: bool) -> Vec<u8> {
        let mut v = vec![0u8; 0x1000];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2; // 64-bit
        v[5] = 1; // little endian
        v[6] = 1;
        v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        v[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        v[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        v[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        let phnum: u16 = if pvh { 2 } else { 1 };
        v[56..58].copy_from_slice(&phnum.to_le_bytes());
        // PT_LOAD: offset 0x800, paddr 1 MiB.
        let ph = 64;
        v[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        v[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        v[ph + 8..ph + 16].copy_from_slice(&0x800u64.to_le_bytes());
        v[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
        v[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        v[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        v[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes());
        v[0x800..0x800 + code.len()].copy_from_slice(code);
        if pvh {
            // PT_NOTE at 0x400: "Xen" note type 18 with a 32-bit entry.
            let ph = 64 + 56;
            v[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
            v[ph + 8..ph + 16].copy_from_slice(&0x400u64.to_le_bytes());
            v[ph + 32..ph + 40].copy_from_slice(&20u64.to_le_bytes());
            let n = 0x400;
            v[n..n + 4].copy_from_slice(&4u32.to_le_bytes());
            v[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes());
            v[n + 8..n + 12].copy_from_slice(&18u32.to_le_bytes());
            v[n + 12..n + 16].copy_from_slice(b"Xen\0");
            v[n + 16..n + 20].copy_from_slice(&0x10_0010u32.to_le_bytes());
        }
        v
    }

    fn load_bytes(bytes: Vec<u8>, p: BootProtocol) -> Result<LoadedKernel> {
        let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        load_kernel(&mem(), KernelImage::Bytes("test", Cursor::new(leaked)), p)
    }

    #[test]
    fn formats() {
        assert_eq!(
            detect_format(&mut Cursor::new(tiny_elf(&[0xf4], false))).unwrap(),
            Some(KernelFormat::Elf)
        );
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            detect_format(&mut Cursor::new(bz)).unwrap(),
            Some(KernelFormat::BzImage)
        );
        assert_eq!(
            detect_format(&mut Cursor::new(b"hello".to_vec())).unwrap(),
            None
        );
        assert_eq!(detect_format(&mut Cursor::new(Vec::new())).unwrap(), None);
    }

    #[test]
    fn elf_entries() {
        let k = load_bytes(tiny_elf(&[0xf4], false), BootProtocol::Auto).unwrap();
        assert_eq!(k.entry, Entry::Linux64 { rip: 0x10_0000 });
        let k = load_bytes(tiny_elf(&[0xf4], true), BootProtocol::Auto).unwrap();
        assert_eq!(k.entry, Entry::Pvh { rip: 0x10_0010 });
        assert_eq!(k.kernel_end, 0x10_0000 + 0x1001);
        let k = load_bytes(tiny_elf(&[0xf4], true), BootProtocol::Linux64).unwrap();
        assert_eq!(k.entry, Entry::Linux64 { rip: 0x10_0000 });
    }

    #[test]
    fn bad_kernels() {
        assert!(matches!(
            load_bytes(b"not a kernel at all".to_vec(), BootProtocol::Auto),
            Err(Error::KernelFormat {
                found: UnknownFormat::Magic(_),
                ..
            })
        ));
        // An ELF whose segment lies beyond RAM.
        let mut e = tiny_elf(&[0xf4], false);
        e[64 + 24..64 + 32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(
            load_bytes(e, BootProtocol::Auto),
            Err(Error::KernelLoad(..))
        ));
        // A truncated ELF.
        let e = tiny_elf(&[0xf4], false)[..100].to_vec();
        assert!(matches!(
            load_bytes(e, BootProtocol::Auto),
            Err(Error::KernelLoad(..))
        ));
        // An old bzImage.
        let mut bz = vec![0u8; 0x2000];
        bz[0x1f1] = 1;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x0202u16.to_le_bytes());
        bz[0x211] = 1; // LOADED_HIGH
        bz[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        assert!(matches!(
            load_bytes(bz, BootProtocol::Auto),
            Err(Error::KernelNot64Bit {
                version: 0x0202,
                ..
            })
        ));
    }

    #[test]
    fn cmdline_written_and_limited() {
        let m = mem();
        assert_eq!(write_cmdline(&m, "console=ttyS0").unwrap(), 14);
        let mut b = [0u8; 14];
        m.read_slice(&mut b, GuestAddress(boot::CMDLINE_START))
            .unwrap();
        assert_eq!(&b, b"console=ttyS0\0");
        assert!(write_cmdline(&m, "").is_ok());
        assert!(matches!(
            write_cmdline(&m, &"x".repeat(boot::CMDLINE_MAX_SIZE)),
            Err(Error::Cmdline { .. })
        ));
        assert!(write_cmdline(&m, "a\0b").is_err());
    }

    #[test]
    fn initrd_placement() {
        assert_eq!(place_initrd(0x1800, 0x20_0000, 0x100_0000), Some(0xff_e000));
        assert_eq!(
            place_initrd(0xe0_0000, 0x20_0000, 0x100_0000),
            Some(0x20_0000)
        );
        assert_eq!(place_initrd(0xe0_0001, 0x20_0000, 0x100_0000), None);
        assert_eq!(place_initrd(u64::MAX, 0, 0x100_0000), None);
    }

    #[test]
    fn initrd_too_big_is_reported() {
        let m = mem();
        let dir = std::env::temp_dir().join(format!("pvmm-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big");
        let f = File::create(&path).unwrap();
        f.set_len(31 << 20).unwrap();
        let e = load_initrd(&m, &path, 32 << 20, 2 << 20, None).unwrap_err();
        assert!(
            matches!(e, Error::InitrdTooBig { size, .. } if size == 31 << 20),
            "{e}"
        );
        f.set_len(1 << 20).unwrap();
        let p = load_initrd(&m, &path, 32 << 20, 2 << 20, None).unwrap();
        assert_eq!(
            p,
            InitrdPlacement {
                addr: 31 << 20,
                size: 1 << 20
            }
        );
        let p = load_initrd(&m, &path, 32 << 20, 2 << 20, Some(16 << 20)).unwrap();
        assert_eq!(p.addr, 15 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            load_initrd(&m, &path, 32 << 20, 2 << 20, None),
            Err(Error::InitrdOpen(..))
        ));
    }

    #[test]
    fn boot_params_and_pvh_info() {
        let m = mem();
        let map = layout::memory_map(32 << 20).unwrap();
        let k = LoadedKernel {
            entry: Entry::Linux64 { rip: 0x100_0000 },
            kernel_end: 0x200_0000,
            setup_header: None,
        };
        let initrd = Some(InitrdPlacement {
            addr: 0x1f0_0000,
            size: 0x1000,
        });
        let zp = write_boot_params(&m, &k, 14, initrd, 0xe0000, &map).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(zp)).unwrap();
        assert_eq!(p.e820_entries as usize, map.len());
        let e1 = p.e820_table[2];
        assert_eq!((e1.addr, e1.size, e1.r#type), (1 << 20, 31 << 20, 1));
        let (rsdp, cmd, img) = (p.acpi_rsdp_addr, p.hdr.cmd_line_ptr, p.hdr.ramdisk_image);
        assert_eq!((rsdp, cmd, img), (0xe0000, CMDLINE_PTR, 0x1f0_0000));
        let (flag, magic) = (p.hdr.boot_flag, p.hdr.header);
        assert_eq!((flag, magic), (KERNEL_BOOT_FLAG_MAGIC, KERNEL_HDR_MAGIC));

        let si = write_pvh_info(&m, initrd, 0xe0000, &map).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(si)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!((info.nr_modules, info.rsdp_paddr), (1, 0xe0000));
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(info.memmap_paddr + 24)).unwrap();
        assert_eq!((e.addr, e.type_), (boot::EBDA_START, 2));
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x1f0_0000, 0x1000));
        let si = write_pvh_info(&m, None, 0xe0000, &map).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(si)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }
}
