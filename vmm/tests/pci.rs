//! A PCI device plugged in through `DeviceManager::add_pci_device` before
//! boot is enumerated by the test kernel, with its BAR where the allocator
//! put it.

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::pci::{BarKind, PciBarRegion, PciConfiguration, PciDevice, PciError, PciHeader};
use vmm::{ExitReason, KernelSource, SerialConfig, VmConfig, VmHooks, Vmm};

struct Dummy {
    config: PciConfiguration,
}

impl PciDevice for Dummy {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data)
    }
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data)
    }
    fn bar_regions(&self) -> Vec<PciBarRegion> {
        self.config.decoded_bars()
    }
    fn declared_bars(&self) -> Vec<(usize, u64, BarKind)> {
        self.config.declared_bars()
    }
    fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        self.config.set_bar_address(index, addr)
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
        .add_pci_device(dev.clone(), None)
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
