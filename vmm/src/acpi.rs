//! ACPI tables (acpi_tables crate): RSDP, XSDT, FADT (hardware-reduced,
//! with the sleep control/status and reset registers of
//! `devices::legacy::AcpiSleep`), MADT, DSDT and MCFG, written at
//! `layout::boot::ACPI_START` (a reserved area of the memory map).

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml_as_bytes, Aml, AmlSink};
use devices::legacy::{RESET_REGISTER, RESET_VALUE, SLEEP_CONTROL, SLEEP_STATUS, SLP_TYP_S5};
use resources::layout::{self, boot, pio};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::{Immutable, IntoBytes};

use crate::error::{Error, Result};

const OEM_ID: [u8; 6] = *b"PVMM  ";
const OEM_TABLE_ID: [u8; 8] = *b"PVMMVM  ";
const OEM_REVISION: u32 = 1;

/// MADT interrupt source override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}
aml_as_bytes!(InterruptSourceOverride);

/// MADT local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: u16,
    lint: u8,
}
aml_as_bytes!(LocalApicNmi);

/// Flags: active high, level triggered.
const MPS_INTI_LEVEL_HIGH: u16 = 0xd;

fn madt(cpus: u8) -> MADT {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(u32::try_from(layout::LAPIC_START).unwrap_or(0)),
    );
    for i in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(
        0,
        u32::try_from(layout::IOAPIC_START).unwrap_or(0),
        0,
    ));
    // ISA IRQs are GSIs of the same number (IOAPIC pin = GSI, see
    // kvm::IrqRouting); IRQ 9, the conventional SCI line, is level
    // triggered, active high. No PCAT_COMPAT flag: there is no PIC.
    m.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 9,
        gsi: 9,
        flags: MPS_INTI_LEVEL_HIGH,
    });
    // LINT1 of every processor is the NMI input.
    m.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0,
        lint: 1,
    });
    m
}

fn io_gas(port: u64) -> GAS {
    GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// IA-PC boot architecture flags: no VGA, no CMOS RTC (and no 8042
/// keyboard, so that guests do not probe it; its reset command still works).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

fn fadt(dsdt: u64) -> Vec<u8> {
    let base = u64::from(layout::ACPI_SLEEP_PORT);
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.sleep_control_reg = io_gas(base + SLEEP_CONTROL);
    f.sleep_status_reg = io_gas(base + SLEEP_STATUS);
    f.reset_reg = io_gas(base + RESET_REGISTER);
    f.reset_value = RESET_VALUE;
    f.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"PVMM\0\0\0\0").into();
    to_bytes(&f.finalize())
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT body: `\_S5` (first, so that a guest looking for it by
/// pattern, like the test kernel in emulated ring 0, finds it at once), the
/// PCI root bridge with its windows, the ECAM reservation, COM1, VMBus's
/// device if `vmbus`, and the PCI hotplug slots.
fn dsdt_body(mem_size: u64, hotplug_gsi: u32, vmbus: bool) -> Result<Vec<u8>> {
    let (mmio64_start, mmio64_size) = layout::mmio64_window(mem_size).map_err(Error::Memory)?;
    let mmio32_first = u32::try_from(layout::PCI_MMIO32_START).unwrap_or(u32::MAX);
    let mmio32_last =
        u32::try_from(layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1).unwrap_or(u32::MAX);
    let ecam_start = u32::try_from(layout::PCI_ECAM_START).unwrap_or(u32::MAX);
    let ecam_size = u32::try_from(layout::PCI_ECAM_SIZE).unwrap_or(u32::MAX);
    let last_bus = u16::try_from(layout::PCI_ECAM_BUSES - 1).unwrap_or(0);
    let com1_len = u8::try_from(pio::COM1_SIZE).unwrap_or(8);
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLP_TYP_S5, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);

    // Each object is serialised in the statement that builds it: the AML
    // builders borrow their children.
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &0u8),
            &aml::Name::new("_SEG".into(), &0u8),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_BBN".into(), &0u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &AddressSpace::new_bus_number(0u16, last_bus),
                    &aml::IO::new(pio::PCI_CONFIG_START, pio::PCI_CONFIG_START, 1, 8),
                    &AddressSpace::new_io(0u16, pio::PCI_CONFIG_START - 1, None),
                    &AddressSpace::new_io(
                        pio::PCI_CONFIG_START + pio::PCI_CONFIG_SIZE,
                        0xffffu16,
                        None,
                    ),
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        mmio32_first,
                        mmio32_last,
                        None,
                    ),
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        mmio64_start,
                        mmio64_start + mmio64_size - 1,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    // The ECAM window, as a motherboard resource (Linux checks that it is
    // reserved before trusting the MCFG).
    aml::Device::new(
        "_SB_.MBRD".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    false, ecam_start, ecam_size,
                )]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(pio::COM1_START, pio::COM1_START, 1, com1_len),
                    &aml::Interrupt::new(true, true, false, false, pio::COM1_GSI),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    if vmbus {
        vmbus_aml(&mut body, mem_size)?;
    }
    crate::hotplug::append_aml(&mut body, hotplug_gsi);
    Ok(body)
}

/// VMBus's ACPI device (crate::vmbus), `\_SB.VMBS`, as Hyper-V's firmware
/// names it: Linux's `hv_vmbus` binds to `_HID "VMBus"` and connects only
/// then. Its `_CRS` holds VMBus's MMIO windows as address-space
/// descriptors (Linux's `vmbus_walk_resources` reads those, below 4 GiB
/// and above): pci-hyperv allocates each vPCI bus's config window and its
/// devices' BARs there (32-bit BARs below 4 GiB, 64-bit ones above). x86
/// Linux takes VMBus's interrupt from the fixed
/// HYPERVISOR_CALLBACK_VECTOR, not from ACPI.
fn vmbus_aml(body: &mut Vec<u8>, mem_size: u64) -> Result<()> {
    let low_first = u32::try_from(layout::VMBUS_MMIO32_START).unwrap_or(u32::MAX);
    let low_last = u32::try_from(layout::VMBUS_MMIO32_START + layout::VMBUS_MMIO32_SIZE - 1)
        .unwrap_or(u32::MAX);
    let (high_start, high_size) = layout::vmbus_mmio64_window(mem_size).map_err(Error::Memory)?;
    aml::Device::new(
        "_SB_.VMBS".into(),
        vec![
            &aml::Name::new("_HID".into(), &"VMBus"),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        low_first,
                        low_last,
                        None,
                    ),
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        high_start,
                        high_start + high_size - 1,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(body);
    Ok(())
}

/// Where the tables went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiTables {
    /// The RSDP (for boot_params.acpi_rsdp_addr / hvm_start_info.rsdp_paddr).
    pub rsdp: u64,
    /// One past the last byte written.
    pub end: u64,
}

/// Writes every table into `mem` at `boot::ACPI_START`; the GED of PCI
/// hotplug interrupts on IOAPIC pin `hotplug_gsi`; VMBus's device if
/// `vmbus`.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cpus: u8,
    hotplug_gsi: u32,
    vmbus: bool,
) -> Result<AcpiTables> {
    let rsdp_addr = boot::ACPI_START;
    let mut next = rsdp_addr + Rsdp::len() as u64;
    let mut put = |bytes: &[u8], what: &'static str| -> Result<u64> {
        let at = next.next_multiple_of(16);
        let end = at + bytes.len() as u64;
        if end > boot::ACPI_END {
            return Err(Error::BootWrite(what));
        }
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|e| Error::GuestWrite(what, e))?;
        next = end;
        Ok(at)
    };

    let body = dsdt_body(mem_size, hotplug_gsi, vmbus)?;
    let mut dsdt = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    let dsdt_addr = put(dsdt.as_slice(), "the DSDT")?;
    let fadt_addr = put(&fadt(dsdt_addr), "the FADT")?;
    let madt_addr = put(&to_bytes(&madt(cpus)), "the MADT")?;
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let last_bus = u8::try_from(layout::PCI_ECAM_BUSES - 1).unwrap_or(0);
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, last_bus);
    let mcfg_addr = put(&to_bytes(&mcfg), "the MCFG")?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for t in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(t);
    }
    let xsdt_addr = put(&to_bytes(&xsdt), "the XSDT")?;
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))
        .map_err(|e| Error::GuestWrite("the RSDP", e))?;
    Ok(AcpiTables {
        rsdp: rsdp_addr,
        end: next,
    })
}

/// Real-mode code at the reset vector (F000:FFF0): writes the FADT's reset
/// value to its reset register and halts. A guest that restarts "through
/// the BIOS" (Linux does, after ACPI, the keyboard controller and EFI, and
/// first of all on hardware-reduced ACPI without EFI) resets the VM instead
/// of running whatever lies there.
fn reset_vector_code() -> [u8; 10] {
    let port = u64::from(layout::ACPI_SLEEP_PORT) + RESET_REGISTER;
    let [lo, hi, ..] = port.to_le_bytes();
    [
        0xba,
        lo,
        hi, // mov dx, reset register
        0xb0,
        RESET_VALUE, // mov al, reset value
        0xee,        // out dx, al
        0xf4,        // hlt
        0xeb,
        0xfd, // jmp back to hlt
        0x90,
    ]
}

/// Writes [`reset_vector_code`] at the reset vector.
pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<()> {
    mem.write_slice(&reset_vector_code(), GuestAddress(boot::RESET_VECTOR))
        .map_err(|e| Error::GuestWrite("the reset vector", e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// Reads a table by its header length.
    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let hdr = read(mem, addr, 36);
        read(mem, addr, u32_at(&hdr, 4) as usize)
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let m = mem();
        let t = write_tables(&m, 512 << 20, 4, 9, true).unwrap();
        assert_eq!(t.rsdp, 0xe0000);
        assert!(t.end <= boot::ACPI_END);
        let rsdp = read(&m, t.rsdp, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt = table(&m, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        let sigs: Vec<Vec<u8>> = entries
            .iter()
            .map(|&a| table(&m, a)[..4].to_vec())
            .collect();
        assert_eq!(
            sigs,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
        for &a in &entries {
            assert!(checksum_ok(&table(&m, a)));
        }

        // FADT: hardware-reduced, sleep/reset registers, DSDT.
        let fadt = table(&m, entries[0]);
        assert_eq!(fadt.len(), 276);
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]); // reset reg: I/O, 8 bits
        assert_eq!(u64_at(&fadt, 120), 0x602);
        assert_eq!(fadt[128], RESET_VALUE);
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 248), 0x600); // sleep control
        assert_eq!(u64_at(&fadt, 260), 0x601); // sleep status
        let dsdt = table(&m, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"COM1") && has(b"_S5_") && has(b"MBRD"));
        assert!(has(b"GED_") && has(b"PHPR") && has(b"S1F_"));
        // VMBus's device: _HID "VMBus" (a string), its two MMIO windows as
        // DWord and QWord address spaces (minimum, then maximum).
        assert!(has(b"VMBS") && has(b"_HID\x0dVMBus\0"));
        let low = [0xf000_0000u32.to_le_bytes(), 0xf7ff_ffffu32.to_le_bytes()].concat();
        assert!(has(&[&[0x87u8][..], &[0x17, 0, 0]].concat()) && has(&low));
        let (start, size) = layout::vmbus_mmio64_window(512 << 20).unwrap();
        let high = [start.to_le_bytes(), (start + size - 1).to_le_bytes()].concat();
        assert!(has(&high));

        // MADT: 4 LAPICs, 1 IOAPIC, 1 override, 1 NMI.
        let madt = table(&m, entries[1]);
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        let mut o = 44;
        let mut kinds = Vec::new();
        while o < madt.len() {
            kinds.push((madt[o], madt[o + 2], madt[o + 3]));
            o += madt[o + 1] as usize;
        }
        assert_eq!(o, madt.len());
        let lapics: Vec<_> = kinds.iter().filter(|k| k.0 == 0).collect();
        assert_eq!(lapics.len(), 4);
        assert!(lapics
            .iter()
            .enumerate()
            .all(|(i, k)| usize::from(k.1) == i && usize::from(k.2) == i));
        assert_eq!(kinds.iter().filter(|k| k.0 == 1).count(), 1);
        assert_eq!(kinds.iter().filter(|k| k.0 == 2).count(), 1);
        assert_eq!(kinds.iter().filter(|k| k.0 == 4).count(), 1);

        // MCFG: bus 0 at the ECAM window.
        let mcfg = table(&m, entries[2]);
        assert_eq!(mcfg.len(), 60);
        assert_eq!(u64_at(&mcfg, 44), layout::PCI_ECAM_START);
        assert_eq!((mcfg[54], mcfg[55]), (0, 0));

        // Without VMBus, no VMBS (the tables move: read them afresh).
        let without = write_tables(&m, 512 << 20, 4, 9, false).unwrap();
        let xsdt = table(&m, u64_at(&read(&m, without.rsdp, 36), 24));
        let fadt = table(&m, u64_at(&xsdt, 36));
        let dsdt = table(&m, u64_at(&fadt, 140));
        assert!(!dsdt.windows(4).any(|w| w == b"VMBS"));
    }

    #[test]
    fn the_largest_vm_fits() {
        let m = mem();
        let t = write_tables(&m, layout::MAX_MEMORY, crate::config::MAX_VCPUS, 9, true).unwrap();
        assert!(t.end <= boot::ACPI_END);
    }

    #[test]
    fn the_reset_vector_writes_the_fadt_reset_register() {
        let m = mem();
        write_reset_vector(&m).unwrap();
        let code = read(&m, boot::RESET_VECTOR, 10);
        // mov dx, 0x602; mov al, 0x42; out dx, al; hlt; jmp $-1
        assert_eq!(
            code,
            [
                0xba,
                0x02,
                0x06,
                0xb0,
                RESET_VALUE,
                0xee,
                0xf4,
                0xeb,
                0xfd,
                0x90
            ]
        );
        assert_eq!(RESET_VALUE, 0x42);
        // The ACPI tables end before it.
        let t = write_tables(&m, 256 << 20, 1, 5, false).unwrap();
        assert!(t.end <= boot::RESET_VECTOR);
    }
}
