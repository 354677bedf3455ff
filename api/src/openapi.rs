//! The OpenAPI 3 document of the API, checked against the route table.

/// The OpenAPI 3 document of the API (`api/openapi.json`).
pub const OPENAPI: &str = include_str!("../openapi.json");

#[cfg(test)]
mod tests {
    use super::OPENAPI;
    use crate::actions::{self, ApiAction, Operation, Success, ROUTES};
    use crate::types::ErrorBody;
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn document() -> Value {
        serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
    }

    /// Follows a local `$ref` such as `#/components/responses/BadRequest`.
    fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference.strip_prefix('#').expect("local reference");
                doc.pointer(pointer).expect("reference resolves")
            }
            None => value,
        }
    }

    /// The `example` and every `examples.*.value` of a media type object.
    fn examples(media: &Value) -> Vec<&Value> {
        let mut found: Vec<&Value> = media.get("example").into_iter().collect();
        if let Some(map) = media.get("examples").and_then(Value::as_object) {
            found.extend(
                map.values()
                    .map(|e| e.get("value").expect("example has a value")),
            );
        }
        found
    }

    fn json_media(value: &Value) -> Option<&Value> {
        value.pointer("/content/application~1json")
    }

    #[test]
    fn document_routes_are_the_router_routes() {
        let doc = document();
        let paths = doc["paths"].as_object().expect("paths");
        let documented: BTreeSet<(String, String)> = paths
            .iter()
            .flat_map(|(path, item)| {
                let methods = item.as_object().expect("path item");
                methods
                    .keys()
                    .map(move |method| (method.to_uppercase(), path.clone()))
            })
            .collect();
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.as_str().to_owned(), r.path.to_owned()))
            .collect();
        assert_eq!(documented, routed);
    }

    /// The document's operation for `A` agrees with its route and its
    /// examples deserialize into `A`'s types.
    fn check_action<A: ApiAction>(doc: &Value) {
        let route = A::route();
        let operation = &doc["paths"][route.path][route.method.as_str().to_lowercase()];
        assert_eq!(
            operation["operationId"],
            format!("{:?}", route.operation),
            "{route:?}"
        );

        let request = operation.get("requestBody");
        assert_eq!(request.is_some(), route.has_body, "{route:?} request body");
        if let Some(request) = request {
            let media = json_media(request).expect("JSON request body");
            let found = examples(media);
            assert!(!found.is_empty(), "{route:?} has a request example");
            for example in found {
                serde_json::from_value::<A::Body>(example.clone())
                    .unwrap_or_else(|e| panic!("{route:?} request example {example}: {e}"));
            }
        }

        let responses = operation["responses"].as_object().expect("responses");
        let success = resolve(doc, &responses[&route.success.status().to_string()]);
        match route.success {
            Success::NoContent => assert!(json_media(success).is_none(), "{route:?}"),
            Success::Json => {
                let found = examples(json_media(success).expect("JSON answer"));
                assert!(!found.is_empty(), "{route:?} has an answer example");
                for example in found {
                    serde_json::from_value::<A::Reply>(example.clone())
                        .unwrap_or_else(|e| panic!("{route:?} answer example {example}: {e}"));
                }
            }
        }

        // Every route can answer these; each error answer is an ErrorBody.
        for status in ["400", "405", "408", "413", "500", "503"] {
            assert!(
                responses.contains_key(status),
                "{route:?} documents {status}"
            );
        }
        for (status, response) in responses {
            if status.starts_with('2') {
                continue;
            }
            let media = json_media(resolve(doc, response)).expect("error body");
            assert_eq!(media["schema"]["$ref"], "#/components/schemas/ErrorBody");
            for example in examples(media) {
                serde_json::from_value::<ErrorBody>(example.clone())
                    .unwrap_or_else(|e| panic!("{route:?} {status} example {example}: {e}"));
            }
        }
    }

    #[test]
    fn every_operation_matches_its_action() {
        let doc = document();
        for route in &ROUTES {
            match route.operation {
                Operation::VmmPing => check_action::<actions::VmmPing>(&doc),
                Operation::VmInfo => check_action::<actions::VmInfo>(&doc),
                Operation::VmAddDevice => check_action::<actions::VmAddDevice>(&doc),
                Operation::VmRemoveDevice => check_action::<actions::VmRemoveDevice>(&doc),
                Operation::IommuDomains => check_action::<actions::IommuDomains>(&doc),
                Operation::VmShutdown => check_action::<actions::VmShutdown>(&doc),
                Operation::VmmShutdown => check_action::<actions::VmmShutdown>(&doc),
            }
        }
    }

    #[test]
    fn every_reference_resolves() {
        fn walk(doc: &Value, value: &Value) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(reference)) = map.get("$ref") {
                        let pointer = reference.strip_prefix('#').expect("local reference");
                        assert!(doc.pointer(pointer).is_some(), "{reference} resolves");
                    }
                    map.values().for_each(|v| walk(doc, v));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(doc, v)),
                _ => {}
            }
        }
        let doc = document();
        assert_eq!(doc["openapi"], "3.0.3");
        walk(&doc, &doc);
    }
}
