//! A client of the API: HTTP/1.1 over the Unix socket with hyper, one
//! connection per request.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::UnixStream;

use crate::actions::{ApiAction, Route, Success};
use crate::types::{
    AddDeviceRequest, DeviceId, DeviceIdError, EmulatedKind, ErrorBody, IommuMode, PciBus,
    PciBusError,
};

/// Errors of a client call.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("Cannot connect to the API socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot build the HTTP request")]
    Request(#[source] hyper::http::Error),
    #[error("Cannot encode the request body")]
    Encode(#[source] serde_json::Error),
    #[error("HTTP exchange with the VMM failed")]
    Http(#[source] hyper::Error),
    /// The server answered with an error status.
    #[error("{status}: {body}")]
    Server { status: StatusCode, body: ErrorBody },
    #[error("The VMM's answer ({status}) is not what the API describes")]
    BadAnswer {
        status: StatusCode,
        #[source]
        source: serde_json::Error,
    },
}

/// A raw HTTP answer.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

/// A client of one API socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Calls `A` with `body` and decodes its answer; an error status becomes
    /// [`ClientError::Server`].
    pub async fn call<A: ApiAction>(&self, body: &A::Body) -> Result<A::Reply, ClientError> {
        let route = A::route();
        let body = if route.has_body {
            Some(serde_json::to_vec(body).map_err(ClientError::Encode)?)
        } else {
            None
        };
        let answer = self.send_route(route, body).await?;
        let decoded = match route.success {
            Success::Json => serde_json::from_slice(&answer.body),
            Success::NoContent => serde_json::from_str("null"),
        };
        decoded.map_err(|source| ClientError::BadAnswer {
            status: answer.status,
            source,
        })
    }

    /// Sends a request to `route`; an error status becomes [`ClientError::Server`].
    async fn send_route(
        &self,
        route: &Route,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let answer = self.send(route.method.as_str(), route.path, body).await?;
        if answer.status.is_success() {
            return Ok(answer);
        }
        match serde_json::from_slice(&answer.body) {
            Ok(body) => Err(ClientError::Server {
                status: answer.status,
                body,
            }),
            Err(source) => Err(ClientError::BadAnswer {
                status: answer.status,
                source,
            }),
        }
    }

    /// Sends any request and returns the answer, whatever its status.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        let connection = tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(ClientError::Request)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(ClientError::Http)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(ClientError::Http)?
            .to_bytes();
        connection.abort();
        Ok(RawResponse { status, body })
    }
}

/// Why an `add-device` spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    #[error("Expected key=value, found {0:?}")]
    NotKeyValue(String),
    #[error("Unknown key {0:?}: use path, kind, id, iommu or bus")]
    UnknownKey(String),
    #[error("Key {0:?} is given twice")]
    Repeated(String),
    #[error("Unknown device kind {0:?}: use dma-test, or vfio with path=")]
    Kind(String),
    #[error("Unknown IOMMU mode {0:?}: use direct or pviommu")]
    Iommu(String),
    #[error(transparent)]
    Bus(#[from] PciBusError),
    #[error(transparent)]
    Id(#[from] DeviceIdError),
    #[error("A vfio device needs path=/sys/bus/pci/devices/SSSS:BB:DD.F")]
    VfioPath,
    #[error("Invalid device: {0}")]
    Device(String),
}

/// Parses a device spec, as `pvmm --device` and `pvmm-remote add-device`
/// take it: `kind=dma-test,iommu=pviommu,id=X` or
/// `path=/sys/...,iommu=direct`, optionally led by a bare kind:
/// `dma-test[,...]` (for `kind=dma-test`) or `vfio,path=/sys/...[,...]`.
pub fn parse_device_spec(spec: &str) -> Result<AddDeviceRequest, SpecError> {
    /// Whether `value` names a variant of `T`.
    fn names<T: serde::de::DeserializeOwned>(value: &str) -> bool {
        serde_json::from_value::<T>(value.into()).is_ok()
    }
    let mut body = serde_json::Map::new();
    let mut items = spec.split(',').peekable();
    let mut vfio = false;
    match items.peek() {
        Some(&"vfio") => {
            vfio = true;
            items.next();
        }
        Some(&first) if !first.contains('=') => {
            if !names::<EmulatedKind>(first) {
                return Err(SpecError::Kind(first.to_owned()));
            }
            body.insert("kind".to_owned(), first.into());
            items.next();
        }
        _ => {}
    }
    for item in items {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| SpecError::NotKeyValue(item.to_owned()))?;
        match key {
            "path" => {}
            "kind" if !names::<EmulatedKind>(value) => return Err(SpecError::Kind(value.into())),
            "iommu" if !names::<IommuMode>(value) => return Err(SpecError::Iommu(value.into())),
            "bus" => {
                value.parse::<PciBus>()?;
            }
            "id" => {
                DeviceId::new(value)?;
            }
            "kind" | "iommu" => {}
            _ => return Err(SpecError::UnknownKey(key.to_owned())),
        }
        if body.insert(key.to_owned(), value.into()).is_some() {
            return Err(SpecError::Repeated(key.to_owned()));
        }
    }
    if vfio && !body.contains_key("path") {
        return Err(SpecError::VfioPath);
    }
    if vfio && body.contains_key("kind") {
        return Err(SpecError::Repeated("kind".to_owned()));
    }
    serde_json::from_value(body.into()).map_err(|e| SpecError::Device(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::DeviceSource;

    #[test]
    fn specs_parse() {
        let request = parse_device_spec("kind=dma-test,iommu=pviommu,id=d1").expect("valid");
        assert_eq!(
            request.source,
            DeviceSource::Emulated(EmulatedKind::DmaTest)
        );
        assert_eq!(request.iommu, Some(IommuMode::Pviommu));
        assert_eq!(request.id, Some(DeviceId::new("d1").expect("valid id")));

        let request =
            parse_device_spec("path=/sys/bus/pci/devices/0000:00:04.0,iommu=direct").expect("ok");
        assert_eq!(
            request.source,
            DeviceSource::Vfio("/sys/bus/pci/devices/0000:00:04.0".into())
        );
        assert_eq!(request.id, None);

        // The command line's shorthands.
        let request = parse_device_spec("dma-test").expect("valid");
        assert_eq!(
            request.source,
            DeviceSource::Emulated(EmulatedKind::DmaTest)
        );
        let request = parse_device_spec("dma-test,id=x").expect("valid");
        assert_eq!(request.id, Some(DeviceId::new("x").expect("valid id")));
        let request = parse_device_spec("vfio,path=/sys/bus/pci/devices/0000:00:04.0,id=nvme0")
            .expect("valid");
        assert_eq!(
            request.source,
            DeviceSource::Vfio("/sys/bus/pci/devices/0000:00:04.0".into())
        );
        assert_eq!(request.id, Some(DeviceId::new("nvme0").expect("valid id")));
        assert_eq!(request.bus, None);
        let request = parse_device_spec("dma-test,bus=vpci").expect("valid");
        assert_eq!(request.bus, Some(PciBus::Vpci));
        let request = parse_device_spec("vfio,path=/sys/bus/pci/devices/0000:00:04.0,bus=root")
            .expect("valid");
        assert_eq!(request.bus, Some(PciBus::Root));
    }

    #[test]
    fn bad_specs_say_why() {
        use SpecError::*;
        let cases = [
            ("nvme", Kind("nvme".into())),
            ("vfio", VfioPath),
            ("vfio,id=a", VfioPath),
            ("vfio,kind=dma-test,path=/a", Repeated("kind".into())),
            ("dma-test,kind=dma-test", Repeated("kind".into())),
            ("id=a,dma-test", NotKeyValue("dma-test".into())),
            ("kind=dma-test,color=red", UnknownKey("color".into())),
            ("kind=dma-test,kind=dma-test", Repeated("kind".into())),
            ("kind=nvme", Kind("nvme".into())),
            ("kind=dma-test,iommu=on", Iommu("on".into())),
            ("kind=dma-test,bus=pci", Bus(PciBusError("pci".into()))),
            ("kind=dma-test,bus=vpci,bus=root", Repeated("bus".into())),
            ("kind=dma-test,id=", Id(DeviceIdError::Empty)),
        ];
        for (spec, expected) in cases {
            assert_eq!(parse_device_spec(spec), Err(expected), "{spec}");
        }
        let error = parse_device_spec("iommu=direct").expect_err("no source");
        assert!(error.to_string().contains("Exactly one of"), "{error}");
        let error = parse_device_spec("path=relative").expect_err("relative path");
        assert!(error.to_string().contains("not an absolute"), "{error}");
    }
}
