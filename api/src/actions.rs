//! The API's operations: one route table, and one typed action per route.
//!
//! The router, the client and the OpenAPI check all read [`ROUTES`], so a
//! route exists everywhere or nowhere.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::request::{ApiRequest, Responder};
use crate::types::{
    AddDeviceRequest, AddDeviceResponse, IommuDomainsResponse, NoBody, PingResponse,
    RemoveDeviceRequest, VmInfoResponse,
};

/// The HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpMethod {
    Get,
    Put,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
        }
    }
}

/// What a successful call answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Success {
    /// 200 with a JSON body.
    Json,
    /// 204 without a body.
    NoContent,
}

impl Success {
    pub fn status(self) -> u16 {
        match self {
            Self::Json => 200,
            Self::NoContent => 204,
        }
    }
}

/// The API's operations, in the order of [`ROUTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    VmmPing,
    VmInfo,
    VmAddDevice,
    VmRemoveDevice,
    IommuDomains,
    VmShutdown,
    VmmShutdown,
}

/// One entry of the route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub operation: Operation,
    pub method: HttpMethod,
    pub path: &'static str,
    /// Whether the request has a JSON body.
    pub has_body: bool,
    pub success: Success,
}

/// Every route; `ROUTES[op as usize].operation == op`.
pub const ROUTES: [Route; 7] = [
    Route {
        operation: Operation::VmmPing,
        method: HttpMethod::Get,
        path: "/api/v1/vmm.ping",
        has_body: false,
        success: Success::Json,
    },
    Route {
        operation: Operation::VmInfo,
        method: HttpMethod::Get,
        path: "/api/v1/vm.info",
        has_body: false,
        success: Success::Json,
    },
    Route {
        operation: Operation::VmAddDevice,
        method: HttpMethod::Put,
        path: "/api/v1/vm.add-device",
        has_body: true,
        success: Success::Json,
    },
    Route {
        operation: Operation::VmRemoveDevice,
        method: HttpMethod::Put,
        path: "/api/v1/vm.remove-device",
        has_body: true,
        success: Success::NoContent,
    },
    Route {
        operation: Operation::IommuDomains,
        method: HttpMethod::Get,
        path: "/api/v1/iommu.domains",
        has_body: false,
        success: Success::Json,
    },
    Route {
        operation: Operation::VmShutdown,
        method: HttpMethod::Put,
        path: "/api/v1/vm.shutdown",
        has_body: false,
        success: Success::NoContent,
    },
    Route {
        operation: Operation::VmmShutdown,
        method: HttpMethod::Put,
        path: "/api/v1/vmm.shutdown",
        has_body: false,
        success: Success::NoContent,
    },
];

impl Operation {
    pub fn route(self) -> &'static Route {
        &ROUTES[self as usize]
    }
}

/// One API operation with its typed request body and answer, in the manner
/// of Cloud Hypervisor's `ApiAction`.
pub trait ApiAction: 'static {
    const OPERATION: Operation;
    /// The request body ([`NoBody`] when the route takes none).
    type Body: Serialize + DeserializeOwned + Send + 'static;
    /// The answer (`()` for 204 routes).
    type Reply: Serialize + DeserializeOwned + Send + 'static;

    /// Wraps the body and the responder into the request the VMM receives.
    fn request(body: Self::Body, responder: Responder<Self::Reply>) -> ApiRequest;

    fn route() -> &'static Route {
        Self::OPERATION.route()
    }
}

macro_rules! action {
    ($(#[$doc:meta])* $name:ident, $body:ty, $reply:ty, |$b:pat_param, $r:ident| $make:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name;

        impl ApiAction for $name {
            const OPERATION: Operation = Operation::$name;
            type Body = $body;
            type Reply = $reply;

            fn request($b: Self::Body, $r: Responder<Self::Reply>) -> ApiRequest {
                $make
            }
        }
    };
}

action!(
    /// `GET vmm.ping`: the VMM's version and pid.
    VmmPing, NoBody, PingResponse, |_, r| ApiRequest::VmmPing(r)
);
action!(
    /// `GET vm.info`: configuration, state and devices.
    VmInfo, NoBody, VmInfoResponse, |_, r| ApiRequest::VmInfo(r)
);
action!(
    /// `PUT vm.add-device`: hot-add a VFIO or emulated device.
    VmAddDevice, AddDeviceRequest, AddDeviceResponse, |b, r| ApiRequest::VmAddDevice(b, r)
);
action!(
    /// `PUT vm.remove-device`: hot-remove a device.
    VmRemoveDevice, RemoveDeviceRequest, (), |b, r| ApiRequest::VmRemoveDevice(b, r)
);
action!(
    /// `GET iommu.domains`: pvIOMMU domains and faults.
    IommuDomains, NoBody, IommuDomainsResponse, |_, r| ApiRequest::IommuDomains(r)
);
action!(
    /// `PUT vm.shutdown`: stop the VM; the VMM keeps serving the API.
    VmShutdown, NoBody, (), |_, r| ApiRequest::VmShutdown(r)
);
action!(
    /// `PUT vmm.shutdown`: stop the VMM.
    VmmShutdown, NoBody, (), |_, r| ApiRequest::VmmShutdown(r)
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn route_table_is_indexed_by_operation() {
        for (index, route) in ROUTES.iter().enumerate() {
            assert_eq!(route.operation as usize, index, "{route:?}");
            assert!(route.path.starts_with("/api/v1/"), "{route:?}");
            // GET routes carry no body.
            assert!(
                !(route.method == HttpMethod::Get && route.has_body),
                "{route:?}"
            );
        }
        let paths: HashSet<_> = ROUTES.iter().map(|r| r.path).collect();
        assert_eq!(paths.len(), ROUTES.len(), "paths are unique");
    }

    #[test]
    fn actions_name_their_routes() {
        assert_eq!(VmmPing::route().path, "/api/v1/vmm.ping");
        assert_eq!(VmInfo::route().path, "/api/v1/vm.info");
        assert_eq!(VmAddDevice::route().path, "/api/v1/vm.add-device");
        assert_eq!(VmRemoveDevice::route().success, Success::NoContent);
        assert_eq!(IommuDomains::route().method, HttpMethod::Get);
        assert_eq!(VmShutdown::route().path, "/api/v1/vm.shutdown");
        assert_eq!(VmmShutdown::route().path, "/api/v1/vmm.shutdown");
    }
}
