//! The `pvmm` command line.

use std::path::PathBuf;

use clap::Parser;

use api::{AddDeviceRequest, DeviceSource, EmulatedKind, PciBus};

use crate::config::{parse_size, BootProtocol, Hypervisor, KernelSource, SerialConfig, VmConfig};

/// Boots a kernel in a KVM virtual machine with a serial console, ACPI, SMP
/// and PCI. Without --kernel, boots the test kernel built into pvmm.
#[derive(Debug, Parser)]
#[command(name = "pvmm", version, about)]
pub struct Cli {
    /// Kernel to boot: a bzImage, or an ELF vmlinux (PVH entry when it has
    /// a PVH note). Default: the embedded test kernel.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. Default: "console=ttyS0 panic=1" for --kernel;
    /// "console=ttyS0 tk.mem=<bytes> tk.cpus=<n>" (what the test kernel
    /// should expect) for the embedded kernel.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest memory, with an optional K, M or G suffix.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Where the serial console (COM1) goes: stdout, file=PATH or off.
    #[arg(long, value_name = "WHERE", default_value = "stdout")]
    pub serial: SerialConfig,
    /// Enter ELF kernels through the Linux 64-bit boot protocol even when
    /// they have a PVH note.
    #[arg(long, hide = true)]
    pub linux64: bool,
    /// Serve the REST API (HTTP/1.1) on this Unix socket (mode 0600); see
    /// api/openapi.json and pvmm-remote.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// The paravirtual IOMMU, reached through the Hyper-V interface.
    /// Default: on, unless --hypervisor kvm (which cannot have it).
    #[arg(long, value_name = "on|off", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub pviommu: Option<bool>,
    /// The hypervisor interface the guest sees: hyperv (Hyper-V leaves and
    /// synthetic MSRs, no KVM signature: what the pvIOMMU needs) or kvm
    /// (KVM's own leaves, kvmclock, no pvIOMMU). Default: hyperv, unless
    /// --pviommu off.
    #[arg(long, value_name = "hyperv|kvm")]
    pub hypervisor: Option<Hypervisor>,
    /// VMBus, Hyper-V's device bus (the SynIC, HvCallPostMessage and its
    /// ACPI device). Default: on with the Hyper-V interface, off with
    /// --hypervisor kvm (which cannot have it).
    #[arg(long, value_name = "on|off", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub vmbus: Option<bool>,
    /// Reps per pvIOMMU hypercall time slice (tests of rep restarts).
    #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u16).range(1..))]
    pub pviommu_rep_budget: Option<u16>,
    /// Where a device that names no bus goes: vpci (a Hyper-V virtual PCI
    /// bus of its own, over VMBus, the way Hyper-V presents assigned
    /// devices) or root (the ordinary PCI root). Default: vpci with VMBus
    /// and --kernel; root without VMBus, and with the embedded test kernel,
    /// which has no vPCI client.
    #[arg(long, value_name = "root|vpci", value_parser = str::parse::<PciBus>)]
    pub pci_bus: Option<PciBus>,
    /// A PCI device, repeatable:
    /// dma-test[,id=NAME][,iommu=pviommu|direct][,bus=root|vpci], or a host
    /// PCI function bound to vfio-pci:
    /// vfio,path=/sys/bus/pci/devices/SSSS:BB:DD.F[,id=NAME][,iommu=...][,bus=...].
    /// bus=vpci: a Hyper-V virtual PCI bus of its own, over VMBus;
    /// bus=root: the ordinary PCI root; default: --pci-bus.
    /// With no arguments at all, pvmm boots its test kernel with one
    /// dma-test device.
    #[arg(long = "device", value_name = "SPEC", value_parser = api::client::parse_device_spec)]
    pub devices: Vec<AddDeviceRequest>,
}

/// A dma-test device with the VMM's name and mode, on the ordinary root
/// (where the embedded test kernel, which has no vPCI client, finds it).
fn dma_test() -> AddDeviceRequest {
    AddDeviceRequest {
        source: DeviceSource::Emulated(EmulatedKind::DmaTest),
        id: None,
        iommu: None,
        bus: Some(PciBus::Root),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("Invalid value \"{s}\": use on or off")),
    }
}

impl Cli {
    /// The hypervisor interface and whether the pvIOMMU is on, from
    /// `--hypervisor` and `--pviommu`: either alone decides the other
    /// (`--pviommu off` alone keeps KVM's interface, as before there was a
    /// choice); `--hypervisor kvm --pviommu on` is refused, and
    /// `--hypervisor hyperv --pviommu off` is Hyper-V without the pvIOMMU.
    pub fn interface(&self) -> Result<(Hypervisor, bool), crate::Error> {
        match (self.hypervisor, self.pviommu) {
            (Some(Hypervisor::Kvm), Some(true)) => Err(crate::Error::PviommuNeedsHyperV),
            (Some(Hypervisor::Kvm), _) | (None, Some(false)) => Ok((Hypervisor::Kvm, false)),
            (Some(Hypervisor::HyperV) | None, pviommu) => {
                Ok((Hypervisor::HyperV, pviommu.unwrap_or(true)))
            }
        }
    }

    /// The VM configuration; `Err` with a message for values that cannot
    /// be represented at all (the VMM checks the rest against the host).
    pub fn to_config(&self) -> Result<VmConfig, crate::Error> {
        let (hypervisor, pviommu) = self.interface()?;
        let vmbus = match (hypervisor, self.vmbus) {
            (Hypervisor::Kvm, Some(true)) => return Err(crate::Error::VmbusNeedsHyperV),
            (Hypervisor::Kvm, _) => false,
            (Hypervisor::HyperV, on) => on.unwrap_or(true),
        };
        let pci_bus = match (self.pci_bus, vmbus) {
            (Some(PciBus::Vpci), false) => return Err(crate::Error::VpciNeedsVmbus),
            (Some(bus), _) => bus,
            (None, true) if self.kernel.is_some() => PciBus::Vpci,
            (None, _) => PciBus::Root,
        };
        let cpus = match u8::try_from(self.cpus) {
            Ok(0) => return Err(crate::Error::NoCpus),
            Ok(n) => n,
            Err(_) => {
                return Err(crate::Error::TooManyCpus {
                    requested: self.cpus,
                    max: u32::from(crate::config::MAX_VCPUS),
                })
            }
        };
        if cpus > crate::config::MAX_VCPUS {
            return Err(crate::Error::TooManyCpus {
                requested: self.cpus,
                max: u32::from(crate::config::MAX_VCPUS),
            });
        }
        Ok(VmConfig {
            kernel: match &self.kernel {
                Some(p) => KernelSource::Path(p.clone()),
                None => KernelSource::Embedded,
            },
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            memory: self.memory,
            cpus,
            serial: self.serial.clone(),
            boot_protocol: if self.linux64 {
                BootProtocol::Linux64
            } else {
                BootProtocol::Auto
            },
            hypervisor,
            pviommu,
            pviommu_rep_budget: self.pviommu_rep_budget,
            vmbus,
            pci_bus,
            api: self.api_socket.is_some(),
            devices: if self.devices.is_empty()
                && self.kernel.is_none()
                && self.cmdline.is_none()
                && pviommu
            {
                // The main command: the test kernel shows the pvIOMMU at
                // work on a DMA test device.
                vec![dma_test()]
            } else {
                self.devices.clone()
            },
        })
    }
}

/// Runs pvmm with `args` (including the program name); returns the process
/// exit status. Prints the exit reason or the error on stderr.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = cli.to_config().and_then(|config| match &cli.api_socket {
        Some(socket) => crate::rest::run_config(config, socket),
        None => crate::run(config),
    });
    match result {
        Ok(reason) => {
            eprintln!("{}", reason.message());
            0
        }
        Err(e) => {
            eprintln!("pvmm: error: {}", resources::ErrorChain(&e));
            1
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pvmm").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap().to_config().unwrap();
        assert_eq!(
            c,
            VmConfig {
                devices: vec![dma_test()],
                ..VmConfig::default()
            }
        );
        let c = parse(&["--cmdline", "x"]).unwrap().to_config().unwrap();
        assert!(c.devices.is_empty() && c.pviommu);
        assert_eq!(c.hypervisor, Hypervisor::HyperV);
    }

    #[test]
    fn hypervisor_and_pviommu() {
        let interface = |args: &[&str]| {
            let c = parse(args).unwrap().to_config().unwrap();
            (c.hypervisor, c.pviommu)
        };
        assert_eq!(interface(&[]), (Hypervisor::HyperV, true));
        assert_eq!(interface(&["--pviommu", "on"]), (Hypervisor::HyperV, true));
        assert_eq!(interface(&["--pviommu", "off"]), (Hypervisor::Kvm, false));
        assert_eq!(
            interface(&["--hypervisor", "kvm"]),
            (Hypervisor::Kvm, false)
        );
        assert_eq!(
            interface(&["--hypervisor", "kvm", "--pviommu", "off"]),
            (Hypervisor::Kvm, false)
        );
        assert_eq!(
            interface(&["--hypervisor", "hyperv"]),
            (Hypervisor::HyperV, true)
        );
        assert_eq!(
            interface(&["--hypervisor", "hyperv", "--pviommu", "off"]),
            (Hypervisor::HyperV, false)
        );
        let e = parse(&["--hypervisor", "kvm", "--pviommu", "on"])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(matches!(e, crate::Error::PviommuNeedsHyperV));
        assert!(e
            .to_string()
            .contains("--hypervisor kvm needs --pviommu off"));
        // KVM's interface: the test kernel runs without the demo device.
        let c = parse(&["--hypervisor", "kvm"])
            .unwrap()
            .to_config()
            .unwrap();
        assert!(c.devices.is_empty());
        assert!(parse(&["--hypervisor", "xen"]).is_err());
    }

    #[test]
    fn devices_go_on_vpci_by_default_with_vmbus_and_a_kernel() {
        let bus = |args: &[&str]| parse(args).unwrap().to_config().map(|c| c.pci_bus);
        // The embedded test kernel has no vPCI client.
        assert_eq!(bus(&[]).unwrap(), PciBus::Root);
        assert_eq!(bus(&["--kernel", "/k"]).unwrap(), PciBus::Vpci);
        assert_eq!(
            bus(&["--kernel", "/k", "--vmbus", "off"]).unwrap(),
            PciBus::Root
        );
        assert_eq!(
            bus(&["--kernel", "/k", "--hypervisor", "kvm"]).unwrap(),
            PciBus::Root
        );
        assert_eq!(
            bus(&["--kernel", "/k", "--pci-bus", "root"]).unwrap(),
            PciBus::Root
        );
        assert_eq!(bus(&["--pci-bus", "vpci"]).unwrap(), PciBus::Vpci);
        assert!(matches!(
            bus(&["--pci-bus", "vpci", "--vmbus", "off"]),
            Err(crate::Error::VpciNeedsVmbus)
        ));
        assert!(parse(&["--pci-bus", "pcie"]).is_err());
    }

    #[test]
    fn vmbus_follows_the_interface() {
        let vmbus = |args: &[&str]| parse(args).unwrap().to_config().map(|c| c.vmbus);
        assert!(vmbus(&[]).unwrap());
        assert!(vmbus(&["--pviommu", "off", "--hypervisor", "hyperv"]).unwrap());
        assert!(!vmbus(&["--vmbus", "off"]).unwrap());
        assert!(!vmbus(&["--hypervisor", "kvm"]).unwrap());
        assert!(!vmbus(&["--pviommu", "off"]).unwrap());
        assert!(!vmbus(&["--hypervisor", "kvm", "--vmbus", "off"]).unwrap());
        let e = vmbus(&["--hypervisor", "kvm", "--vmbus", "on"]).unwrap_err();
        assert!(matches!(e, crate::Error::VmbusNeedsHyperV));
        assert!(e
            .to_string()
            .contains("KVM's interface (--hypervisor kvm, or --pviommu off alone) cannot have it"));
        let e = vmbus(&["--pviommu", "off", "--vmbus", "on"]).unwrap_err();
        assert!(matches!(e, crate::Error::VmbusNeedsHyperV));
        assert!(vmbus(&[
            "--pviommu",
            "off",
            "--hypervisor",
            "hyperv",
            "--vmbus",
            "on"
        ])
        .unwrap());
        assert!(parse(&["--vmbus", "yes"]).is_err());
    }

    #[test]
    fn every_flag() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "a b",
            "--memory",
            "1G",
            "--cpus",
            "4",
            "--serial",
            "file=/tmp/s",
            "--pviommu",
            "off",
            "--pviommu-rep-budget",
            "16",
            "--device",
            "dma-test,id=a",
            "--device",
            "dma-test",
            "--device",
            "vfio,path=/sys/bus/pci/devices/0000:00:04.0,iommu=direct",
        ])
        .unwrap()
        .to_config()
        .unwrap();
        assert_eq!(c.kernel, KernelSource::Path("/k".into()));
        assert_eq!(c.initrd, Some("/i".into()));
        assert_eq!(c.cmdline.as_deref(), Some("a b"));
        assert_eq!(c.memory, 1 << 30);
        assert_eq!(c.cpus, 4);
        assert_eq!(c.serial, SerialConfig::File("/tmp/s".into()));
        assert!(!c.pviommu);
        assert_eq!(c.hypervisor, Hypervisor::Kvm);
        assert_eq!(c.pviommu_rep_budget, Some(16));
        // KVM's interface: no VMBus, the devices' default bus is the root.
        assert_eq!(c.pci_bus, PciBus::Root);
        // As given: no bus of their own.
        let given = AddDeviceRequest {
            bus: None,
            ..dma_test()
        };
        assert_eq!(
            c.devices,
            vec![
                AddDeviceRequest {
                    id: Some(api::DeviceId::new("a").unwrap()),
                    ..given.clone()
                },
                given,
                AddDeviceRequest {
                    source: DeviceSource::Vfio("/sys/bus/pci/devices/0000:00:04.0".into()),
                    id: None,
                    iommu: Some(api::IommuMode::Direct),
                    bus: None,
                }
            ]
        );
    }

    #[test]
    fn bad_values() {
        assert!(parse(&["--memory", "lots"]).is_err());
        assert!(parse(&["--serial", "tty"]).is_err());
        assert!(parse(&["--cpus", "-1"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["--pviommu", "maybe"]).is_err());
        assert!(parse(&["--pviommu-rep-budget", "0"]).is_err());
        assert!(parse(&["--device", "nvme"]).is_err());
        assert!(parse(&["--device", "dma-test,id="]).is_err());
        assert!(parse(&["--device", "vfio"]).is_err());
        assert!(parse(&["--device", "vfio,path=relative"]).is_err());
        assert!(matches!(
            parse(&["--cpus", "0"]).unwrap().to_config(),
            Err(crate::Error::NoCpus)
        ));
        assert!(matches!(
            parse(&["--cpus", "255"]).unwrap().to_config(),
            Err(crate::Error::TooManyCpus {
                requested: 255,
                max: 254
            })
        ));
        assert!(matches!(
            parse(&["--cpus", "100000"]).unwrap().to_config(),
            Err(crate::Error::TooManyCpus { .. })
        ));
    }
}
