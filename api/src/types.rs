//! The bodies that travel over the API: one type per request and per answer.
//!
//! Request types reject what a client must not send (unknown fields, bad ids,
//! both or neither of `path` and `kind`) while they are deserialized, so a
//! request that reaches the VMM is already well formed.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use resources::ErrorChain;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Why a device id was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeviceIdError {
    #[error("Device id is empty")]
    Empty,
    #[error("Device id is {0} bytes long, at most {max} are allowed", max = DeviceId::MAX_LEN)]
    TooLong(usize),
    #[error("Device id must start with an ASCII letter or digit")]
    BadStart,
    #[error("Device id contains {0:?}: only ASCII letters, digits, '-', '_' and '.' are allowed")]
    BadChar(char),
}

/// A device's name, chosen by the user or by the VMM.
///
/// 1 to 64 ASCII letters, digits, `-`, `_` and `.`, starting with a letter or
/// a digit: safe in a URL, a log line and the `key=value,...` syntax of the
/// command lines.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Longest accepted id, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Checks `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, DeviceIdError> {
        let id = id.into();
        let first = id.chars().next().ok_or(DeviceIdError::Empty)?;
        if id.len() > Self::MAX_LEN {
            return Err(DeviceIdError::TooLong(id.len()));
        }
        if !first.is_ascii_alphanumeric() {
            return Err(DeviceIdError::BadStart);
        }
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(DeviceIdError::BadChar(bad));
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for DeviceId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        Self::new(id).map_err(serde::de::Error::custom)
    }
}

/// Why a PCI address was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BdfError {
    #[error("PCI device number {0} is out of range (0 to 31)")]
    Device(u8),
    #[error("PCI function number {0} is out of range (0 to 7)")]
    Function(u8),
    #[error("PCI address {0:?} is not of the form SSSS:BB:DD.F")]
    Syntax(String),
}

/// A PCI address, written `SSSS:BB:DD.F` (segment, bus, device, function).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf {
    segment: u16,
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    pub fn new(segment: u16, bus: u8, device: u8, function: u8) -> Result<Self, BdfError> {
        if device > 31 {
            return Err(BdfError::Device(device));
        }
        if function > 7 {
            return Err(BdfError::Function(function));
        }
        Ok(Self {
            segment,
            bus,
            device,
            function,
        })
    }

    pub fn segment(self) -> u16 {
        self.segment
    }

    pub fn bus(self) -> u8 {
        self.bus
    }

    pub fn device(self) -> u8 {
        self.device
    }

    pub fn function(self) -> u8 {
        self.function
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

impl FromStr for Bdf {
    type Err = BdfError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || BdfError::Syntax(s.to_owned());
        let hex_field = |field: &str, len: usize| {
            if field.len() == len && field.bytes().all(|b| b.is_ascii_hexdigit()) {
                u16::from_str_radix(field, 16).map_err(|_| syntax())
            } else {
                Err(syntax())
            }
        };
        let (segment, rest) = s.split_once(':').ok_or_else(syntax)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(syntax)?;
        let (device, function) = rest.split_once('.').ok_or_else(syntax)?;
        let narrow = |v: u16| u8::try_from(v).map_err(|_| syntax());
        Self::new(
            hex_field(segment, 4)?,
            narrow(hex_field(bus, 2)?)?,
            narrow(hex_field(device, 2)?)?,
            narrow(hex_field(function, 1)?)?,
        )
    }
}

impl Serialize for Bdf {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bdf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Which PCI bus a device sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PciBus {
    /// The ordinary PCI root (segment 0, bus 0), with ACPI hotplug.
    Root,
    /// A Hyper-V virtual PCI bus of its own, offered over VMBus: where
    /// Linux's pvIOMMU driver manages the device (needs VMBus).
    Vpci,
}

/// A bus name that is not `root` or `vpci`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("Invalid PCI bus \"{0}\": use root or vpci")]
pub struct PciBusError(pub String);

impl FromStr for PciBus {
    type Err = PciBusError;

    /// The names of the JSON form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(s.into()).map_err(|_| PciBusError(s.into()))
    }
}

impl fmt::Display for PciBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Root => "root",
            Self::Vpci => "vpci",
        })
    }
}

/// How a device's DMA is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IommuMode {
    /// Attached to the default domain: IOVA = GPA, the guest has no say.
    Direct,
    /// Visible to the guest's pvIOMMU driver, which may put it in its own domains.
    Pviommu,
}

impl fmt::Display for IommuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Pviommu => "pviommu",
        })
    }
}

/// Devices that the VMM emulates and that can be added by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmulatedKind {
    /// The PCI DMA test device.
    DmaTest,
}

/// What a device is, as listed by `vm.info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    DmaTest,
    /// A host device passed through with VFIO.
    Vfio,
}

impl From<EmulatedKind> for DeviceKind {
    fn from(kind: EmulatedKind) -> Self {
        match kind {
            EmulatedKind::DmaTest => Self::DmaTest,
        }
    }
}

/// Why an `add-device` request was refused before it reached the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddDeviceError {
    #[error("Exactly one of \"path\" and \"kind\" is required")]
    PathXorKind,
    #[error("Device path {0:?} is not an absolute, normalized path")]
    BadPath(PathBuf),
}

/// Where a new device comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSource {
    /// A host PCI device bound to VFIO, named by its sysfs path.
    Vfio(PathBuf),
    /// A device the VMM emulates.
    Emulated(EmulatedKind),
}

/// Body of `PUT vm.add-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AddDeviceBody", into = "AddDeviceBody")]
pub struct AddDeviceRequest {
    pub source: DeviceSource,
    /// The device's name; the VMM picks one when it is absent.
    pub id: Option<DeviceId>,
    /// The translation mode; the VMM's default when absent (pviommu when the
    /// VM has the pvIOMMU, direct otherwise).
    pub iommu: Option<IommuMode>,
    /// The bus; the VM's default when absent (pvmm's `--pci-bus`: vPCI
    /// with VMBus and a kernel of the user's, else the ordinary root).
    pub bus: Option<PciBus>,
}

/// The wire form of [`AddDeviceRequest`], before its fields are checked together.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDeviceBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<EmulatedKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<DeviceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iommu: Option<IommuMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bus: Option<PciBus>,
}

/// Longest accepted device path, in bytes (Linux's PATH_MAX).
const MAX_PATH_LEN: usize = 4096;

/// An absolute path without `.`, `..`, empty components or NUL bytes.
fn is_clean_absolute(path: &Path) -> bool {
    let text = path.as_os_str().as_encoded_bytes();
    path.is_absolute()
        && text.len() <= MAX_PATH_LEN
        && !text.contains(&0)
        && !text.windows(2).any(|w| w == b"//")
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

impl TryFrom<AddDeviceBody> for AddDeviceRequest {
    type Error = AddDeviceError;

    fn try_from(body: AddDeviceBody) -> Result<Self, Self::Error> {
        let source = match (body.path, body.kind) {
            (Some(path), None) if is_clean_absolute(&path) => DeviceSource::Vfio(path),
            (Some(path), None) => return Err(AddDeviceError::BadPath(path)),
            (None, Some(kind)) => DeviceSource::Emulated(kind),
            _ => return Err(AddDeviceError::PathXorKind),
        };
        Ok(Self {
            source,
            id: body.id,
            iommu: body.iommu,
            bus: body.bus,
        })
    }
}

impl From<AddDeviceRequest> for AddDeviceBody {
    fn from(request: AddDeviceRequest) -> Self {
        let (path, kind) = match request.source {
            DeviceSource::Vfio(path) => (Some(path), None),
            DeviceSource::Emulated(kind) => (None, Some(kind)),
        };
        Self {
            path,
            kind,
            id: request.id,
            iommu: request.iommu,
            bus: request.bus,
        }
    }
}

/// Answer to `PUT vm.add-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDeviceResponse {
    pub id: DeviceId,
    pub bdf: Bdf,
}

/// Body of `PUT vm.remove-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveDeviceRequest {
    pub id: DeviceId,
}

/// The body of a request that takes none: absent, or an empty object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoBody {}

/// Answer to `GET vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PingResponse {
    /// The VMM's version.
    pub version: String,
    /// The VMM's process id.
    pub pid: u32,
}

impl PingResponse {
    /// The answer for this process, with the VMM's `version`.
    pub fn current(version: impl Into<String>) -> Self {
        Self {
            version: version.into(),
            pid: std::process::id(),
        }
    }
}

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Built, vCPUs not started yet.
    Created,
    Running,
    /// Powered off, reset, or shut down through the API; the VMM may still run.
    Shutdown,
}

/// The configuration the VM was started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigInfo {
    pub cpus: u32,
    pub memory_bytes: u64,
    /// The kernel image; absent for the embedded test kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Whether the guest sees the pvIOMMU.
    pub pviommu: bool,
    /// Where COM1 goes: `stdout`, `file=PATH` or `off`.
    pub serial: String,
    /// Where a device whose request names no bus goes.
    pub pci_bus: PciBus,
}

/// One PCI device of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    pub id: DeviceId,
    pub kind: DeviceKind,
    pub bdf: Bdf,
    pub iommu: IommuMode,
    /// The host device's sysfs path, for VFIO devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// Answer to `GET vm.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfoResponse {
    pub config: VmConfigInfo,
    pub state: VmState,
    pub devices: Vec<DeviceInfo>,
}

/// The kind of a pvIOMMU domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainType {
    /// Id 0: identity, IOVA = GPA.
    Default,
    /// Id 0xFFFFFFFF: every access blocked.
    Null,
    /// A second-stage domain: the guest maps IOVA pages to GPA pages.
    S2,
    /// A first-stage domain: the guest's own page table.
    S1,
}

/// How often a domain's IOTLB was flushed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushCounters {
    /// Domain-wide flushes.
    pub full: u64,
    /// Ranges invalidated by list flushes, after merging.
    pub ranges: u64,
    /// Pages covered by those ranges.
    pub pages: u64,
}

/// What an S1 domain does with DMA, as the guest configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum S1Mode {
    /// Every access blocked (also: not configured yet).
    Blocked,
    /// IOVA = GPA, guest RAM only (translation disabled).
    Identity,
    /// Through the guest's first-stage page table.
    Translate,
}

/// The S1 settings of a domain (CONFIGURE_DEVICE_DOMAIN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S1Settings {
    pub mode: S1Mode,
    /// GPA of the guest's top-level table (0 where no table is used).
    pub root: u64,
    /// Paging levels of the table: 4 or 5.
    pub levels: u8,
}

/// One pvIOMMU domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainInfo {
    pub id: u32,
    #[serde(rename = "type")]
    pub domain_type: DomainType,
    /// The devices attached to it.
    pub devices: Vec<DeviceId>,
    pub mapped_pages: u64,
    pub flushes: FlushCounters,
    /// S1 domains only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s1: Option<S1Settings>,
}

impl DomainInfo {
    /// An S1 domain that translates through the guest's table: a paging
    /// domain of the guest's driver.
    pub fn is_s1_paging(&self) -> bool {
        self.domain_type == DomainType::S1 && self.s1.is_some_and(|s| s.mode == S1Mode::Translate)
    }
}

/// Completed hypercalls of one call code that ended with one status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypercallStatusCount {
    /// The call code's name in the contract (`HvCall...` without the
    /// prefix, e.g. `CREATE_DEVICE_DOMAIN`), or `unknown` for codes outside it.
    pub call: String,
    /// The final status's name, e.g. `SUCCESS` or `INVALID_PARAMETER`.
    pub status: String,
    pub count: u64,
}

/// The direction of a faulting DMA access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DmaAccess {
    Read,
    Write,
}

/// A DMA access the IOMMU refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultInfo {
    pub device: DeviceId,
    pub iova: u64,
    pub access: DmaAccess,
    pub reason: String,
}

/// Answer to `GET iommu.domains`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IommuDomainsResponse {
    pub domains: Vec<DomainInfo>,
    /// The most recent faults (at most 16), oldest first.
    pub faults: Vec<FaultInfo>,
    /// Completed hypercalls per call code and final status (non-zero
    /// counts only).
    #[serde(default)]
    pub hypercalls: Vec<HypercallStatusCount>,
}

impl IommuDomainsResponse {
    /// How many calls of `call` (its name, e.g. `"SIGNAL_EVENT"`) completed,
    /// whatever their status.
    pub fn calls(&self, call: &str) -> u64 {
        self.hypercalls
            .iter()
            .filter(|h| h.call == call)
            .map(|h| h.count)
            .sum()
    }

    /// The calls that completed with a status other than success.
    pub fn failed_calls(&self) -> Vec<&HypercallStatusCount> {
        self.hypercalls
            .iter()
            .filter(|h| h.status != "SUCCESS")
            .collect()
    }

    /// The domain `device` is attached to, if any.
    pub fn domain_of(&self, device: &str) -> Option<&DomainInfo> {
        self.domains
            .iter()
            .find(|d| d.devices.iter().any(|id| id.as_str() == device))
    }
}

/// The body of every error answer: the error and the chain of its causes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: String,
    pub causes: Vec<String>,
}

impl ErrorBody {
    /// `error`'s message and those of its sources, outermost first.
    pub fn from_chain(error: &(dyn std::error::Error + 'static)) -> Self {
        Self {
            error: error.to_string(),
            causes: ErrorChain(error)
                .causes()
                .map(|cause| cause.to_string())
                .collect(),
        }
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)?;
        for cause in &self.causes {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn add_device(value: serde_json::Value) -> Result<AddDeviceRequest, String> {
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    #[test]
    fn iommu_domains_answers_are_queried_by_call_and_device() {
        let answer: IommuDomainsResponse = serde_json::from_value(json!({
            "domains": [
                {"id": 1, "type": "s2", "devices": ["a"], "mapped_pages": 0,
                 "flushes": {"full": 0, "ranges": 0, "pages": 0}},
                {"id": 2, "type": "s2", "devices": ["b", "c"], "mapped_pages": 3,
                 "flushes": {"full": 1, "ranges": 0, "pages": 0}}
            ],
            "faults": [],
            "hypercalls": [
                {"call": "SIGNAL_EVENT", "status": "SUCCESS", "count": 4},
                {"call": "SIGNAL_EVENT", "status": "INVALID_PARAMETER", "count": 1},
                {"call": "POST_MESSAGE", "status": "SUCCESS", "count": 2}
            ]
        }))
        .expect("an answer");
        assert_eq!(answer.calls("SIGNAL_EVENT"), 5);
        assert_eq!(answer.calls("FLUSH_DEVICE_DOMAIN"), 0);
        let failed = answer.failed_calls();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].status, "INVALID_PARAMETER");
        assert_eq!(answer.domain_of("c").map(|d| d.id), Some(2));
        assert!(!answer.domain_of("c").is_some_and(DomainInfo::is_s1_paging));
        assert!(answer.domain_of("d").is_none());
    }

    #[test]
    fn device_ids() {
        for good in ["a", "dma-test0", "A.b_c-9", &"x".repeat(64)] {
            assert_eq!(DeviceId::new(good).expect(good).as_str(), good);
        }
        assert_eq!(DeviceId::new(""), Err(DeviceIdError::Empty));
        assert_eq!(
            DeviceId::new("x".repeat(65)),
            Err(DeviceIdError::TooLong(65))
        );
        assert_eq!(DeviceId::new("-a"), Err(DeviceIdError::BadStart));
        assert_eq!(DeviceId::new("_a"), Err(DeviceIdError::BadStart));
        assert_eq!(DeviceId::new("a,b"), Err(DeviceIdError::BadChar(',')));
        assert_eq!(DeviceId::new("a b"), Err(DeviceIdError::BadChar(' ')));
        assert_eq!(DeviceId::new("a/b"), Err(DeviceIdError::BadChar('/')));
        assert_eq!(DeviceId::new("é"), Err(DeviceIdError::BadStart));
        // Deserialization checks too.
        assert!(serde_json::from_str::<DeviceId>("\"a=b\"").is_err());
        assert_eq!(
            serde_json::from_str::<DeviceId>("\"ok\"").expect("valid id"),
            DeviceId::new("ok").expect("valid id")
        );
    }

    #[test]
    fn bdf_text_form() {
        let bdf = Bdf::new(0, 0x1a, 3, 7).expect("valid bdf");
        assert_eq!(bdf.to_string(), "0000:1a:03.7");
        assert_eq!("0000:1a:03.7".parse::<Bdf>(), Ok(bdf));
        assert_eq!(
            serde_json::to_string(&bdf).expect("serializes"),
            "\"0000:1a:03.7\""
        );
        assert_eq!(Bdf::new(0, 0, 32, 0), Err(BdfError::Device(32)));
        assert_eq!(Bdf::new(0, 0, 0, 8), Err(BdfError::Function(8)));
        assert_eq!("0000:00:20.0".parse::<Bdf>(), Err(BdfError::Device(32)));
        for bad in [
            "",
            "00:03.0",
            "0000:00:03",
            "0000:00:3.0",
            "0000:0g:03.0",
            "0000:00:03.0x",
        ] {
            assert_eq!(
                bad.parse::<Bdf>(),
                Err(BdfError::Syntax(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn add_device_accepts_path_or_kind() {
        let request = add_device(json!({"kind": "dma-test", "id": "d0", "iommu": "pviommu"}))
            .expect("valid request");
        assert_eq!(
            request,
            AddDeviceRequest {
                source: DeviceSource::Emulated(EmulatedKind::DmaTest),
                id: Some(DeviceId::new("d0").expect("valid id")),
                iommu: Some(IommuMode::Pviommu),
                bus: None,
            }
        );
        let request = add_device(json!({"path": "/sys/bus/pci/devices/0000:00:04.0"}))
            .expect("valid request");
        assert_eq!(
            request.source,
            DeviceSource::Vfio("/sys/bus/pci/devices/0000:00:04.0".into())
        );
        assert_eq!((request.id, request.iommu), (None, None));
    }

    #[test]
    fn add_device_rejects_bad_bodies() {
        let cases = [
            (json!({}), "Exactly one of"),
            (
                json!({"kind": "dma-test", "path": "/sys/x"}),
                "Exactly one of",
            ),
            (
                json!({"kind": "dma-test", "color": "red"}),
                "unknown field `color`",
            ),
            (json!({"kind": "vfio"}), "unknown variant `vfio`"),
            (
                json!({"kind": "dma-test", "iommu": "on"}),
                "unknown variant `on`",
            ),
            (json!({"kind": "dma-test", "id": ""}), "Device id is empty"),
            (json!({"kind": "dma-test", "id": 7}), "invalid type"),
            (json!({"path": "sys/bus/pci"}), "not an absolute"),
            (json!({"path": "/sys/../etc"}), "not an absolute"),
            (json!({"path": "/sys//bus"}), "not an absolute"),
            (json!({"path": "/sys/\u{0}"}), "not an absolute"),
            (
                json!({"path": format!("/{}", "a".repeat(4096))}),
                "not an absolute",
            ),
            (json!({"path": null, "kind": null}), "Exactly one of"),
            (json!("dma-test"), "invalid type"),
        ];
        for (body, expected) in cases {
            let error = add_device(body.clone()).expect_err(&body.to_string());
            assert!(error.contains(expected), "{body}: {error}");
        }
    }

    #[test]
    fn add_device_round_trips() {
        let request = AddDeviceRequest {
            source: DeviceSource::Vfio("/sys/bus/pci/devices/0000:00:04.0".into()),
            id: None,
            iommu: Some(IommuMode::Direct),
            bus: None,
        };
        let text = serde_json::to_string(&request).expect("serializes");
        assert_eq!(
            text,
            r#"{"path":"/sys/bus/pci/devices/0000:00:04.0","iommu":"direct"}"#
        );
        assert_eq!(
            serde_json::from_str::<AddDeviceRequest>(&text).expect("parses"),
            request
        );
    }

    #[test]
    fn no_body_is_an_empty_object() {
        assert!(serde_json::from_str::<NoBody>("{}").is_ok());
        assert!(serde_json::from_str::<NoBody>(r#"{"force": true}"#).is_err());
    }

    #[test]
    fn error_body_lists_the_chain() {
        #[derive(Debug, Error)]
        #[error("Cannot add device")]
        struct Outer(#[source] std::io::Error);
        let error = Outer(std::io::Error::new(std::io::ErrorKind::NotFound, "gone"));
        let body = ErrorBody::from_chain(&error);
        assert_eq!(body.error, "Cannot add device");
        assert_eq!(body.causes, ["gone"]);
        assert_eq!(body.to_string(), "Cannot add device: gone");
    }

    #[test]
    fn responses_use_documented_names() {
        let domain = DomainInfo {
            id: 1,
            domain_type: DomainType::S2,
            devices: vec![DeviceId::new("d0").expect("valid id")],
            mapped_pages: 3,
            flushes: FlushCounters::default(),
            s1: None,
        };
        let value = serde_json::to_value(&domain).expect("serializes");
        assert_eq!(value["type"], "s2");
        assert_eq!(value["devices"][0], "d0");
        assert!(value.get("s1").is_none(), "{value}");
        let s1 = DomainInfo {
            domain_type: DomainType::S1,
            s1: Some(S1Settings {
                mode: S1Mode::Identity,
                root: 0,
                levels: 4,
            }),
            ..domain
        };
        let value = serde_json::to_value(&s1).expect("serializes");
        assert_eq!(value["s1"]["mode"], "identity");
        assert_eq!(value["s1"]["levels"], 4);
        assert_eq!(
            serde_json::to_value(VmState::Shutdown).expect("ok"),
            "shutdown"
        );
        assert_eq!(
            serde_json::to_value(DeviceKind::DmaTest).expect("ok"),
            "dma-test"
        );
    }
}
