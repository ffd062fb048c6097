//! `GET /api/v1/openapi.json`: an OpenAPI 3 document of the REST API in `rest`, built
//! from one table of operations. A test in `tests/it/rest.rs` calls every operation the
//! document lists, so it cannot name a route the server lacks.

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};

use super::grpc::AdminApi;

/// One REST operation: method, path (`{name}` for path parameters), operation id,
/// summary, query parameters (name, type), request body schema, answer schema.
pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    id: &'static str,
    summary: &'static str,
    query: &'static [(&'static str, &'static str)],
    body: Option<&'static str>,
    reply: &'static str,
}

const fn op(
    method: &'static str,
    path: &'static str,
    id: &'static str,
    summary: &'static str,
    query: &'static [(&'static str, &'static str)],
    body: Option<&'static str>,
    reply: &'static str,
) -> Operation {
    Operation {
        method,
        path,
        id,
        summary,
        query,
        body,
        reply,
    }
}

const LOCAL: (&str, &str) = ("local", "boolean");

/// Every operation under `/api/v1`, headscale's first and hsd's own after.
#[rustfmt::skip]
pub const OPERATIONS: &[Operation] = &[
    op("get", "/api/v1/health", "Health", "Whether this member's store works", &[], None, "HealthResponse"),
    op("get", "/api/v1/version", "Version", "The member's version and id", &[], None, "VersionResponse"),
    op("get", "/api/v1/user", "ListUsers", "List users, optionally by id, name or email", &[("id", "string"), ("name", "string"), ("email", "string"), LOCAL], None, "ListUsersResponse"),
    op("post", "/api/v1/user", "CreateUser", "Create a user", &[], Some("CreateUserRequest"), "UserResponse"),
    op("delete", "/api/v1/user/{id}", "DeleteUser", "Delete a user (refused while it owns nodes)", &[], None, "Empty"),
    op("post", "/api/v1/user/{old_id}/rename/{new_name}", "RenameUser", "Rename a user", &[], None, "UserResponse"),
    op("get", "/api/v1/preauthkey", "ListPreAuthKeys", "List pre-auth keys (prefixes only)", &[("user", "string"), LOCAL], None, "ListPreAuthKeysResponse"),
    op("post", "/api/v1/preauthkey", "CreatePreAuthKey", "Create a pre-auth key; the full key is shown only here", &[], Some("CreatePreAuthKeyRequest"), "PreAuthKeyResponse"),
    op("delete", "/api/v1/preauthkey", "DeletePreAuthKey", "Delete a pre-auth key", &[("id", "string")], None, "Empty"),
    op("post", "/api/v1/preauthkey/expire", "ExpirePreAuthKey", "Expire a pre-auth key now", &[], Some("IdRequest"), "Empty"),
    op("get", "/api/v1/node", "ListNodes", "List nodes, optionally of one user", &[("user", "string"), LOCAL], None, "ListNodesResponse"),
    op("post", "/api/v1/node/register", "RegisterNode", "Complete an interactive registration", &[("user", "string"), ("key", "string")], None, "NodeResponse"),
    op("post", "/api/v1/node/backfillips", "BackfillNodeIPs", "Give nodes missing addresses (none ever are in hsd)", &[("confirmed", "boolean")], None, "BackfillNodeIPsResponse"),
    op("get", "/api/v1/node/{node_id}", "GetNode", "Get a node", &[LOCAL], None, "NodeResponse"),
    op("delete", "/api/v1/node/{node_id}", "DeleteNode", "Delete a node", &[], None, "Empty"),
    op("post", "/api/v1/node/{node_id}/expire", "ExpireNode", "Expire a node's key now, at a time, or never", &[("expiry", "string"), ("disableExpiry", "boolean")], None, "NodeResponse"),
    op("post", "/api/v1/node/{node_id}/rename/{new_name}", "RenameNode", "Rename a node (its DNS label)", &[], None, "NodeResponse"),
    op("post", "/api/v1/node/{node_id}/tags", "SetTags", "Replace a node's tags", &[], Some("SetTagsRequest"), "NodeResponse"),
    op("post", "/api/v1/node/{node_id}/approve_routes", "SetApprovedRoutes", "Replace a node's approved routes", &[], Some("SetApprovedRoutesRequest"), "NodeResponse"),
    op("post", "/api/v1/node/{node_id}/approve", "ApproveNode", "Let a node waiting for approval in (hsd)", &[], None, "NodeResponse"),
    op("post", "/api/v1/node/{node_id}/user", "MoveNode", "Move a node to another user", &[("user", "string")], None, "NodeResponse"),
    op("post", "/api/v1/auth/register", "AuthRegister", "Complete a registration for a user", &[], Some("AuthRegisterRequest"), "NodeResponse"),
    op("post", "/api/v1/auth/approve", "AuthApprove", "Approve a pending authentication", &[], Some("AuthIdRequest"), "Empty"),
    op("post", "/api/v1/auth/reject", "AuthReject", "Reject a pending authentication", &[], Some("AuthIdRequest"), "Empty"),
    op("get", "/api/v1/apikey", "ListApiKeys", "List API keys (prefixes only)", &[LOCAL], None, "ListApiKeysResponse"),
    op("post", "/api/v1/apikey", "CreateApiKey", "Create an API key; the full key is shown only here", &[], Some("CreateApiKeyRequest"), "CreateApiKeyResponse"),
    op("post", "/api/v1/apikey/expire", "ExpireApiKey", "Expire an API key by prefix or id", &[], Some("ApiKeyRefRequest"), "Empty"),
    op("delete", "/api/v1/apikey/{prefix}", "DeleteApiKey", "Delete an API key", &[("id", "string")], None, "Empty"),
    op("get", "/api/v1/policy", "GetPolicy", "The running policy", &[LOCAL], None, "PolicyResponse"),
    op("put", "/api/v1/policy", "SetPolicy", "Replace the policy (refused with the reason when invalid)", &[], Some("PolicyRequest"), "PolicyResponse"),
    op("post", "/api/v1/policy/check", "CheckPolicy", "Validate a policy without applying it", &[], Some("PolicyRequest"), "Empty"),
    op("get", "/api/v1/policy/history", "ListPolicyVersions", "Every accepted policy version (hsd)", &[LOCAL], None, "ListPolicyVersionsResponse"),
    op("post", "/api/v1/policy/rollback", "RollbackPolicy", "Make a kept version the running policy again (hsd)", &[], Some("RollbackPolicyRequest"), "PolicyResponse"),
    op("get", "/api/v1/audit", "ListAudit", "The audit log (hsd)", &[("since", "string"), ("actor", "string"), LOCAL], None, "ListAuditResponse"),
    op("get", "/api/v1/cluster/status", "ClusterStatus", "Members, leader and term (hsd)", &[], None, "ClusterStatusResponse"),
];

fn string() -> Value {
    json!({ "type": "string" })
}

fn id() -> Value {
    json!({ "type": "string", "format": "uint64" })
}

fn time() -> Value {
    json!({ "type": "string", "format": "date-time", "nullable": true })
}

fn boolean() -> Value {
    json!({ "type": "boolean" })
}

fn strings() -> Value {
    json!({ "type": "array", "items": { "type": "string" } })
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn list_of(name: &str) -> Value {
    json!({ "type": "array", "items": reference(name) })
}

fn object(properties: Value) -> Value {
    json!({ "type": "object", "properties": properties })
}

fn schemas() -> Value {
    let schemas: [(&str, Value); 35] = [
        ("Empty", object(json!({}))),
        (
            "Status",
            object(
                json!({ "code": { "type": "integer" }, "message": string(), "details": { "type": "array", "items": { "type": "object" } } }),
            ),
        ),
        (
            "HealthResponse",
            object(json!({ "databaseConnectivity": boolean() })),
        ),
        (
            "VersionResponse",
            object(json!({ "version": string(), "memberId": id() })),
        ),
        (
            "User",
            object(
                json!({ "id": id(), "name": string(), "createdAt": time(), "displayName": string(), "email": string(), "providerId": string(), "provider": string(), "profilePicUrl": string() }),
            ),
        ),
        ("UserResponse", object(json!({ "user": reference("User") }))),
        (
            "ListUsersResponse",
            object(json!({ "users": list_of("User") })),
        ),
        (
            "CreateUserRequest",
            object(
                json!({ "name": string(), "displayName": string(), "email": string(), "pictureUrl": string() }),
            ),
        ),
        (
            "PreAuthKey",
            object(
                json!({ "user": reference("User"), "id": id(), "key": string(), "reusable": boolean(), "ephemeral": boolean(), "used": boolean(), "expiration": time(), "createdAt": time(), "aclTags": strings(), "expired": boolean() }),
            ),
        ),
        (
            "PreAuthKeyResponse",
            object(json!({ "preAuthKey": reference("PreAuthKey") })),
        ),
        (
            "ListPreAuthKeysResponse",
            object(json!({ "preAuthKeys": list_of("PreAuthKey") })),
        ),
        (
            "CreatePreAuthKeyRequest",
            object(
                json!({ "user": id(), "reusable": boolean(), "ephemeral": boolean(), "expiration": time(), "aclTags": strings() }),
            ),
        ),
        ("IdRequest", object(json!({ "id": id() }))),
        (
            "Node",
            object(
                json!({ "id": id(), "machineKey": string(), "nodeKey": string(), "discoKey": string(), "ipAddresses": strings(), "name": string(), "user": reference("User"), "lastSeen": time(), "expiry": time(), "preAuthKey": reference("PreAuthKey"), "createdAt": time(), "registerMethod": { "type": "string", "enum": ["REGISTER_METHOD_UNSPECIFIED", "REGISTER_METHOD_AUTH_KEY", "REGISTER_METHOD_CLI", "REGISTER_METHOD_OIDC"] }, "givenName": string(), "online": boolean(), "approvedRoutes": strings(), "availableRoutes": strings(), "subnetRoutes": strings(), "tags": strings(), "member": id(), "approved": boolean(), "ephemeral": boolean(), "expired": boolean() }),
            ),
        ),
        ("NodeResponse", object(json!({ "node": reference("Node") }))),
        (
            "ListNodesResponse",
            object(json!({ "nodes": list_of("Node") })),
        ),
        ("SetTagsRequest", object(json!({ "tags": strings() }))),
        (
            "SetApprovedRoutesRequest",
            object(json!({ "routes": strings() })),
        ),
        (
            "BackfillNodeIPsResponse",
            object(json!({ "changes": strings() })),
        ),
        (
            "AuthRegisterRequest",
            object(json!({ "user": string(), "authId": string() })),
        ),
        ("AuthIdRequest", object(json!({ "authId": string() }))),
        (
            "ApiKey",
            object(
                json!({ "id": id(), "prefix": string(), "expiration": time(), "createdAt": time(), "lastSeen": time(), "expired": boolean() }),
            ),
        ),
        (
            "ListApiKeysResponse",
            object(json!({ "apiKeys": list_of("ApiKey") })),
        ),
        (
            "CreateApiKeyRequest",
            object(json!({ "expiration": time() })),
        ),
        (
            "CreateApiKeyResponse",
            object(json!({ "apiKey": string() })),
        ),
        (
            "ApiKeyRefRequest",
            object(json!({ "prefix": string(), "id": id() })),
        ),
        ("PolicyRequest", object(json!({ "policy": string() }))),
        (
            "PolicyResponse",
            object(json!({ "policy": string(), "updatedAt": time() })),
        ),
        (
            "PolicyVersion",
            object(
                json!({ "version": id(), "policy": string(), "createdAt": time(), "current": boolean() }),
            ),
        ),
        (
            "ListPolicyVersionsResponse",
            object(json!({ "versions": list_of("PolicyVersion") })),
        ),
        ("RollbackPolicyRequest", object(json!({ "version": id() }))),
        (
            "AuditRecord",
            object(
                json!({ "seq": id(), "time": time(), "actor": string(), "action": string(), "target": string(), "result": string() }),
            ),
        ),
        (
            "ListAuditResponse",
            object(json!({ "records": list_of("AuditRecord") })),
        ),
        (
            "Member",
            object(
                json!({ "id": id(), "name": string(), "address": string(), "controlUrl": string(), "role": string(), "voter": boolean(), "healthy": boolean(), "lastApplied": id(), "matchIndex": id(), "version": string(), "clients": id(), "draining": boolean() }),
            ),
        ),
        (
            "ClusterStatusResponse",
            object(
                json!({ "leader": id(), "term": id(), "memberId": id(), "members": list_of("Member") }),
            ),
        ),
    ];
    Value::Object(
        schemas
            .into_iter()
            .map(|(name, schema)| (name.to_string(), schema))
            .collect(),
    )
}

fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": string() }))
        .collect()
}

fn operation(o: &Operation) -> Value {
    let mut parameters = path_parameters(o.path);
    parameters.extend(o.query.iter().map(|(name, kind)| {
        json!({ "name": name, "in": "query", "required": false, "schema": { "type": kind } })
    }));
    let error = json!({ "description": "An error", "content": { "application/json": { "schema": reference("Status") } } });
    let mut value = json!({
        "operationId": o.id,
        "summary": o.summary,
        "parameters": parameters,
        "responses": {
            "200": { "description": "OK", "content": { "application/json": { "schema": reference(o.reply) } } },
            "default": error,
        },
    });
    if let Some(body) = o.body {
        value["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": reference(body) } } });
    }
    value
}

/// The whole document.
pub fn document_value(version: &str) -> Value {
    let mut paths = Map::new();
    for o in OPERATIONS {
        let entry = paths.entry(o.path).or_insert_with(|| json!({}));
        entry[o.method] = operation(o);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "hsd admin API (headscale /api/v1 compatible)",
            "version": version,
        },
        "servers": [{ "url": "/" }],
        "security": [{ "bearer": [] }],
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "An API key: hsctl apikeys create" } },
            "schemas": schemas(),
        },
    })
}

pub async fn document(State(api): State<AdminApi>) -> Json<Value> {
    Json(document_value(api.deps().version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_an_operation_or_schema_names_is_defined() {
        let doc = document_value("test");
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for piece in text.split("#/components/schemas/").skip(1) {
            let name: String = piece.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(schemas.contains_key(&name), "{name} is not defined");
        }
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.contains_key("/api/v1/node/{node_id}"));
        assert_eq!(
            doc["paths"]["/api/v1/node/{node_id}"]["delete"]["operationId"],
            "DeleteNode"
        );
    }
}
