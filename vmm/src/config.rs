//! What to run: the VM configuration, independent of the command line.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use api::PciBus;
use resources::layout::MIB;

/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 512 * MIB;
/// The embedded test kernel's default suites, in order.
pub const EMBEDDED_SUITES: &str = "mem,cmdline,smp,pci,irq,pviommu,dma,demo";

/// Most vCPUs pvmm supports (xAPIC ids 0-253; 255 is broadcast).
pub const MAX_VCPUS: u8 = 254;

/// The kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// A bzImage or ELF vmlinux file.
    Path(PathBuf),
    /// The test kernel built into pvmm.
    Embedded,
}

/// Where COM1's output goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// pvmm's standard output.
    #[default]
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere.
    Off,
}

/// A bad `--serial` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid serial output \"{0}\": use stdout, off or file=PATH")]
pub struct SerialConfigError(String);

impl FromStr for SerialConfig {
    type Err = SerialConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "off" => Ok(Self::Off),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(SerialConfigError(s.to_string())),
            },
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => write!(f, "stdout"),
            Self::Off => write!(f, "off"),
            Self::File(p) => write!(f, "file={}", p.display()),
        }
    }
}

/// Which entry point to use for an ELF kernel with a PVH note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocol {
    /// PVH when the ELF has a PVH note, else the Linux 64-bit protocol
    /// (bzImage: always the 64-bit protocol).
    #[default]
    Auto,
    /// The Linux 64-bit boot protocol (boot_params in RSI), even with a PVH
    /// note.
    Linux64,
}

/// Which hypervisor interface the guest sees at CPUID 0x40000000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hypervisor {
    /// Hyper-V ("Microsoft Hv"), no KVM signature anywhere: the pvIOMMU's
    /// interface (crate::hyperv).
    #[default]
    HyperV,
    /// KVM's own leaves as KVM reports them (kvmclock and KVM's other
    /// paravirtual features), no Hyper-V leaves, no pvIOMMU.
    Kvm,
}

/// A bad `--hypervisor` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid hypervisor interface \"{0}\": use hyperv or kvm")]
pub struct HypervisorError(String);

impl FromStr for Hypervisor {
    type Err = HypervisorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hyperv" => Ok(Self::HyperV),
            "kvm" => Ok(Self::Kvm),
            _ => Err(HypervisorError(s.to_string())),
        }
    }
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HyperV => "hyperv",
            Self::Kvm => "kvm",
        })
    }
}

/// A bad size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid size \"{0}\": use a number of bytes with an optional K, M or G suffix, like 512M")]
pub struct SizeError(String);

/// Parses `512M`, `1G`, `4096`, `64K` (powers of 1024; an optional `iB`/`B`
/// after the unit is accepted).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = || SizeError(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1 << shift).ok_or_else(err)
}

/// Everything needed to build and run a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: KernelSource,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` gives the default for the kernel
    /// (for the embedded test kernel it says what to expect).
    pub cmdline: Option<String>,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// COM1 output.
    pub serial: SerialConfig,
    /// Entry point choice for ELF kernels.
    pub boot_protocol: BootProtocol,
    /// The hypervisor interface at CPUID 0x40000000.
    pub hypervisor: Hypervisor,
    /// The pvIOMMU (device domain hypercalls, advertised in the Hyper-V
    /// leaves): needs [`Hypervisor::HyperV`].
    pub pviommu: bool,
    /// Reps per hypercall time slice (`None`: the iommu crate's default).
    pub pviommu_rep_budget: Option<u16>,
    /// VMBus (the SynIC, HvCallPostMessage and the `VMBS` ACPI device):
    /// needs [`Hypervisor::HyperV`].
    pub vmbus: bool,
    /// Where a device that names no bus goes (the command line's and the
    /// API's alike): [`PciBus::Vpci`] needs [`VmConfig::vmbus`]. The
    /// default is the root; the command line picks vpci for `--kernel`
    /// with VMBus.
    pub pci_bus: PciBus,
    /// PCI devices plugged in before boot: the request `vm.add-device`
    /// takes (`--device` is parsed like `pvmm-remote add-device`).
    pub devices: Vec<api::AddDeviceRequest>,
    /// The API serves this VM: the embedded test kernel, after its suites,
    /// stays up and serves hotplug until the VM is shut down.
    pub api: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: KernelSource::Embedded,
            initrd: None,
            cmdline: None,
            memory: DEFAULT_MEMORY,
            cpus: 1,
            serial: SerialConfig::Stdout,
            boot_protocol: BootProtocol::Auto,
            hypervisor: Hypervisor::HyperV,
            pviommu: true,
            pviommu_rep_budget: None,
            vmbus: true,
            // The embedded test kernel has no vPCI client.
            pci_bus: PciBus::Root,
            devices: Vec::new(),
            api: false,
        }
    }
}

impl VmConfig {
    /// Checks what can be checked without KVM: the pvIOMMU is reached
    /// through the Hyper-V interface.
    pub fn validate(&self) -> crate::Result<()> {
        if self.pviommu && self.hypervisor == Hypervisor::Kvm {
            return Err(crate::Error::PviommuNeedsHyperV);
        }
        if self.vmbus && self.hypervisor == Hypervisor::Kvm {
            return Err(crate::Error::VmbusNeedsHyperV);
        }
        if self.pci_bus == PciBus::Vpci && !self.vmbus {
            return Err(crate::Error::VpciNeedsVmbus);
        }
        Ok(())
    }

    /// The command line the guest gets: the configured one, or the default
    /// (`console=ttyS0 panic=1` for a kernel file; `console=ttyS0` plus
    /// `tk.mem` and `tk.cpus` for the embedded test kernel, so that it checks
    /// what it was given, and with the API its default suites and then
    /// hotplug until the VM is shut down).
    pub fn effective_cmdline(&self) -> String {
        match (&self.cmdline, &self.kernel) {
            (Some(c), _) => c.clone(),
            (None, KernelSource::Embedded) => {
                let base = format!("console=ttyS0 tk.mem={} tk.cpus={}", self.memory, self.cpus);
                if self.api {
                    format!("{base} tk.tests={EMBEDDED_SUITES},hotplug tk.hotplug=0")
                } else {
                    base
                }
            }
            (None, KernelSource::Path(_)) => "console=ttyS0 panic=1".to_string(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        for bad in [
            "",
            "M",
            "-1M",
            "1.5G",
            "12Q",
            "0x100",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_size("lots").unwrap_err().to_string(),
            "Invalid size \"lots\": use a number of bytes with an optional K, M or G suffix, like 512M"
        );
    }

    #[test]
    fn serial_values() {
        assert_eq!("stdout".parse(), Ok(SerialConfig::Stdout));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
        assert_eq!(SerialConfig::File("/a".into()).to_string(), "file=/a");
    }

    #[test]
    fn hypervisor_values() {
        assert_eq!("hyperv".parse(), Ok(Hypervisor::HyperV));
        assert_eq!("kvm".parse(), Ok(Hypervisor::Kvm));
        assert!("xen".parse::<Hypervisor>().is_err());
        assert_eq!(Hypervisor::Kvm.to_string(), "kvm");
        assert_eq!(Hypervisor::default(), Hypervisor::HyperV);
        let c = VmConfig::default();
        assert!(c.validate().is_ok());
        let c = VmConfig {
            hypervisor: Hypervisor::Kvm,
            ..Default::default()
        };
        assert!(matches!(
            c.validate(),
            Err(crate::Error::PviommuNeedsHyperV)
        ));
        let c = VmConfig {
            hypervisor: Hypervisor::Kvm,
            pviommu: false,
            ..Default::default()
        };
        assert!(matches!(c.validate(), Err(crate::Error::VmbusNeedsHyperV)));
        let c = VmConfig {
            vmbus: false,
            pci_bus: PciBus::Vpci,
            ..VmConfig::default()
        };
        assert!(matches!(c.validate(), Err(crate::Error::VpciNeedsVmbus)));
        for (hypervisor, pviommu, vmbus) in [
            (Hypervisor::Kvm, false, false),
            (Hypervisor::HyperV, false, false),
            (Hypervisor::HyperV, false, true),
        ] {
            let c = VmConfig {
                hypervisor,
                pviommu,
                vmbus,
                ..Default::default()
            };
            assert!(c.validate().is_ok());
        }
    }

    #[test]
    fn default_cmdlines() {
        let mut c = VmConfig {
            cpus: 2,
            memory: 256 << 20,
            ..Default::default()
        };
        assert_eq!(
            c.effective_cmdline(),
            "console=ttyS0 tk.mem=268435456 tk.cpus=2"
        );
        c.kernel = KernelSource::Path("/vmlinux".into());
        assert!(c.effective_cmdline().starts_with("console=ttyS0"));
        c.cmdline = Some("x".into());
        assert_eq!(c.effective_cmdline(), "x");
        // With the API, the embedded kernel stays up for hotplug.
        let c = VmConfig {
            api: true,
            ..Default::default()
        };
        assert!(c
            .effective_cmdline()
            .ends_with("tk.tests=mem,cmdline,smp,pci,irq,pviommu,dma,demo,hotplug tk.hotplug=0"));
    }
}
