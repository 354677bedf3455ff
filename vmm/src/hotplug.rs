//! PCI hotplug as the guest sees it: the AML that goes with
//! `devices::acpi_hotplug` (a generic event device, a register block and
//! one ejectable slot object per PCI device number).
//!
//! ```text
//! \_SB.GED_  (ACPI0013, level-triggered IOAPIC pin)  _EVT: GEDS bit 0 → \_SB.PHPR.PSCN
//! \_SB.PHPR  (PNP0A06, ports 0x610..0x61F)           PCIU, PCID, B0EJ, GEDS
//!            PSCN: Notify(Sxx, 1) for PCIU bits (device check),
//!                  Notify(Sxx, 3) for PCID bits (eject request)
//!            PCEJ(slot): B0EJ = 1 << slot
//! \_SB.PCI0.S01 .. S1F  _ADR = slot << 16, _SUN = slot, _EJ0 → PCEJ(_SUN)
//! ```
//! Linux's acpiphp binds the slots (they are ejectable), rescans on a device
//! check and runs `_EJ0` after unbinding the driver on an eject request.

use acpi_tables::aml;
use acpi_tables::Aml;
use devices::acpi_hotplug::{GED_PCI_HOTPLUG, HOTPLUG_PORT, HOTPLUG_SIZE};

/// First hotpluggable slot (slot 0 is the host bridge).
pub const FIRST_SLOT: u8 = 1;
/// Number of slots on bus 0.
pub const SLOTS: u8 = 32;

fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// Appends the hotplug objects to a DSDT body: the register block, the slot
/// objects under `\_SB_.PCI0` (which must come first) and the GED on
/// IOAPIC pin `gsi`.
pub fn append_aml(body: &mut Vec<u8>, gsi: u32) {
    let port = HOTPLUG_PORT;
    let size = u8::try_from(HOTPLUG_SIZE).unwrap_or(16);
    let field = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
            aml::FieldEntry::Named(*b"GEDS", 32),
        ],
    );
    // PSCN: read PCIU and PCID once, then notify each slot whose bit is set.
    let masks: Vec<u32> = (FIRST_SLOT..SLOTS).map(|s| 1u32 << s).collect();
    let paths: Vec<aml::Path> = (FIRST_SLOT..SLOTS)
        .map(|s| format!("\\_SB_.PCI0.{}", slot_name(s)).as_str().into())
        .collect();
    let ands_up: Vec<aml::And> = masks
        .iter()
        .map(|m| aml::And::new(&aml::ZERO, &aml::Local(0), m))
        .collect();
    let ands_down: Vec<aml::And> = masks
        .iter()
        .map(|m| aml::And::new(&aml::ZERO, &aml::Local(1), m))
        .collect();
    let device_check = 1u8;
    let eject_request = 3u8;
    let notify_up: Vec<aml::Notify> = paths
        .iter()
        .map(|p| aml::Notify::new(p, &device_check))
        .collect();
    let notify_down: Vec<aml::Notify> = paths
        .iter()
        .map(|p| aml::Notify::new(p, &eject_request))
        .collect();
    let ifs: Vec<aml::If> = ands_up
        .iter()
        .zip(&notify_up)
        .chain(ands_down.iter().zip(&notify_down))
        .map(|(and, notify)| aml::If::new(and, vec![notify]))
        .collect();
    let acquire = aml::Acquire::new("BLCK".into(), 0xffff);
    let release = aml::Release::new("BLCK".into());
    let (pciu, pcid, b0ej) = (
        aml::Path::new("PCIU"),
        aml::Path::new("PCID"),
        aml::Path::new("B0EJ"),
    );
    let read_up = aml::Store::new(&aml::Local(0), &pciu);
    let read_down = aml::Store::new(&aml::Local(1), &pcid);
    let mut pscn: Vec<&dyn Aml> = vec![&acquire, &read_up, &read_down, &release];
    pscn.extend(ifs.iter().map(|i| i as &dyn Aml));

    let shift = aml::ShiftLeft::new(&aml::Local(0), &aml::ONE, &aml::Arg(0));
    let eject = aml::Store::new(&b0ej, &aml::Local(0));
    aml::Device::new(
        "_SB_.PHPR".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
            &aml::Name::new("_UID".into(), &"PCI Hotplug Controller"),
            &aml::Name::new("_STA".into(), &0x0bu8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(port, port, 1, size)]),
            ),
            &aml::OpRegion::new(
                "PCST".into(),
                aml::OpRegionSpace::SystemIO,
                &usize::from(port),
                &usize::from(HOTPLUG_SIZE),
            ),
            &field,
            &aml::Mutex::new("BLCK".into(), 0),
            &aml::Method::new(
                "PCEJ".into(),
                1,
                true,
                vec![
                    &acquire,
                    &shift,
                    &eject,
                    &release,
                    &aml::Return::new(&aml::ZERO),
                ],
            ),
            &aml::Method::new("PSCN".into(), 0, true, pscn),
        ],
    )
    .to_aml_bytes(body);

    for slot in FIRST_SLOT..SLOTS {
        let adr = u32::from(slot) << 16;
        let sun = u32::from(slot);
        let sun_path = aml::Path::new("_SUN");
        let call = aml::MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&sun_path]);
        aml::Device::new(
            format!("\\_SB_.PCI0.{}", slot_name(slot)).as_str().into(),
            vec![
                &aml::Name::new("_ADR".into(), &adr),
                &aml::Name::new("_SUN".into(), &sun),
                &aml::Method::new("_EJ0".into(), 1, false, vec![&call]),
            ],
        )
        .to_aml_bytes(body);
    }

    let geds = aml::Path::new("\\_SB_.PHPR.GEDS");
    let events = aml::Store::new(&aml::Local(0), &geds);
    let is_pci = aml::And::new(&aml::ZERO, &aml::Local(0), &GED_PCI_HOTPLUG);
    let scan = aml::MethodCall::new("\\_SB_.PHPR.PSCN".into(), vec![]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, false, false, false, gsi,
                )]),
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&events, &aml::If::new(&is_pci, vec![&scan])],
            ),
        ],
    )
    .to_aml_bytes(body);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn has(body: &[u8], needle: &[u8]) -> bool {
        body.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn aml_has_every_slot_the_ged_and_the_registers() {
        let mut body = Vec::new();
        append_aml(&mut body, 9);
        for slot in FIRST_SLOT..SLOTS {
            assert!(has(&body, slot_name(slot).as_bytes()), "slot {slot}");
        }
        assert!(!has(&body, b"S00_"), "slot 0 is the host bridge");
        for name in [
            &b"PHPR"[..],
            b"GED_",
            b"ACPI0013",
            b"PCIU",
            b"PCID",
            b"B0EJ",
            b"GEDS",
            b"_EJ0",
            b"_SUN",
            b"_EVT",
            b"PSCN",
            b"PCEJ",
        ] {
            assert!(has(&body, name), "{}", String::from_utf8_lossy(name));
        }
        // The GED's interrupt: extended IRQ descriptor, consumer, level,
        // active high, GSI 9.
        assert!(has(&body, &[0x89, 6, 0, 0x01, 1, 9, 0, 0, 0]));
        // The register block's I/O resource: 0x610, 16 ports.
        assert!(has(&body, &[0x47, 1, 0x10, 0x06, 0x10, 0x06, 1, 16]));
    }
}
