//! A PCI device plugged in through `DeviceManager::add_pci_device` before
//! boot is enumerated by the test kernel, with its BAR where the allocator
//! put it.

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::pci::{BarKind, PciConfiguration, PciDevice, PciHeader};
use vmm::{ExitReason, KernelSource, SerialConfig, VmConfig, VmHooks, Vmm};

struct Dummy {
    config: PciConfiguration,
}

impl PciDevice for Dummy {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

impl BusDevice for Dummy {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

#[test]
fn a_plugged_device_is_enumerated() {
    let mut config = PciConfiguration::new(&PciHeader {
        vendor_id: 0x1234,
        device_id: 0xabcd,
        class: 0xff,
        ..Default::default()
    });
    config
        .add_bar(0, 0x1000, BarKind::Mmio32, false)
        .expect("BAR");
    let dev = Arc::new(Mutex::new(Dummy { config }));
    let log = std::env::temp_dir().join(format!("pvmm-pci-{}.log", std::process::id()));
    let vmm = Vmm::new(
        VmConfig {
            kernel: KernelSource::Embedded,
            cmdline: Some("console=ttyS0 tk.tests=pci".into()),
            serial: SerialConfig::File(log.clone()),
            ..Default::default()
        },
        VmHooks::default(),
    )
    .expect("VM");
    let addr = vmm
        .devices()
        .lock()
        .expect("lock")
        .add_pci_device(dev.clone(), None, false)
        .expect("plug");
    assert_eq!(addr.to_string(), "0000:00:01.0");
    let bar = dev.lock().expect("lock").config.bar_address(0);
    assert_eq!(bar, Some(resources::layout::PCI_MMIO32_START));
    assert_eq!(vmm.run().expect("run"), ExitReason::PowerOff);
    let out = std::fs::read_to_string(&log).expect("serial log");
    std::fs::remove_file(&log).ok();
    assert!(out.contains("ecam 00:01.0 [1234:abcd]"), "{out}");
    assert!(out.contains("2 function(s) on bus 0"), "{out}");
    assert!(out.contains("ok 1 - pci"), "{out}");
}
