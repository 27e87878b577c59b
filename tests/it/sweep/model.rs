//! The operations of the served OpenAPI document, as much of them as the sweep needs to build
//! a valid request and then break it: parameters, body fields with their limits, security, the
//! documented response statuses.

use crate::helpers::resolve_schema;
use serde_json::Value;
use std::collections::BTreeSet;

/// What a value must be, as the document states it.
#[derive(Debug, Clone)]
pub enum Kind {
    Integer {
        min: Option<i128>,
        max: Option<i128>,
    },
    Uuid,
    String {
        max_length: Option<usize>,
    },
    /// An RFC 3339 time (`format: date-time`).
    DateTime,
    Boolean,
    /// An array of objects with these fields.
    Array {
        min_items: Option<usize>,
        max_items: Option<usize>,
        fields: Vec<Field>,
    },
}

#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub kind: Kind,
    /// Listed in the schema's `required`: leaving it out is an error.
    pub required: bool,
    /// `null` is a valid value (`type: [..., "null"]`).
    pub nullable: bool,
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub method: String,
    /// `/api/v1/products/{id}`
    pub template: String,
    pub path_params: Vec<Field>,
    pub query_params: Vec<Field>,
    /// The JSON body's fields, in the order the schema lists them (serde's positional order
    /// is the struct's; the sweep only needs some order).
    pub body: Option<Vec<Field>>,
    /// Needs a token (the sweep sends the admin token as the valid one).
    pub secured: bool,
    pub statuses: BTreeSet<u16>,
}

/// Every operation of `doc`.
pub fn operations(doc: &Value) -> Vec<Operation> {
    let mut operations = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let parameters = operation["parameters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let params_in = |location: &str| -> Vec<Field> {
                parameters
                    .iter()
                    .filter(|param| param["in"] == location)
                    .map(|param| Field {
                        name: param["name"].as_str().expect("a name").to_owned(),
                        kind: kind(doc, &param["schema"]),
                        required: param["required"] == true,
                        nullable: false,
                    })
                    .collect()
            };
            let body = operation["requestBody"]["content"]["application/json"]["schema"]
                .as_object()
                .map(|_| {
                    object_fields(
                        doc,
                        &operation["requestBody"]["content"]["application/json"]["schema"],
                    )
                });
            operations.push(Operation {
                method: method.to_uppercase(),
                template: template.clone(),
                path_params: params_in("path"),
                query_params: params_in("query"),
                body,
                // Needs a token: some requirement, and none of them the empty one (`{}`: a
                // token is optional, as on the purchase and read endpoints).
                secured: operation["security"].as_array().is_some_and(|schemes| {
                    !schemes.is_empty()
                        && !schemes
                            .iter()
                            .any(|scheme| scheme.as_object().is_some_and(|s| s.is_empty()))
                }),
                statuses: operation["responses"]
                    .as_object()
                    .expect("responses")
                    .keys()
                    .map(|status| status.parse().expect("a numeric status"))
                    .collect(),
            });
        }
    }
    operations
}

/// The fields of the object schema at `schema`.
fn object_fields(doc: &Value, schema: &Value) -> Vec<Field> {
    let schema = resolve_schema(doc, schema);
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    schema["properties"]
        .as_object()
        .expect("a body schema has properties")
        .iter()
        .map(|(name, property)| Field {
            name: name.clone(),
            kind: kind(doc, property),
            required: required.contains(&name.as_str()),
            nullable: types(resolve_schema(doc, property)).contains(&"null"),
        })
        .collect()
}

fn types(schema: &Value) -> Vec<&str> {
    match &schema["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    }
}

fn kind(doc: &Value, schema: &Value) -> Kind {
    let schema = resolve_schema(doc, schema);
    let bound = |key: &str| schema[key].as_i64().map(i128::from);
    let count = |key: &str| schema[key].as_u64().map(|n| n as usize);
    let types = types(schema);
    if types.contains(&"array") {
        Kind::Array {
            min_items: count("minItems"),
            max_items: count("maxItems"),
            fields: object_fields(doc, &schema["items"]),
        }
    } else if types.contains(&"boolean") {
        Kind::Boolean
    } else if schema["format"] == "date-time" {
        Kind::DateTime
    } else if types.contains(&"integer") {
        Kind::Integer {
            min: bound("minimum"),
            max: bound("maximum"),
        }
    } else if schema["format"] == "uuid" {
        Kind::Uuid
    } else if types.contains(&"string") {
        Kind::String {
            max_length: schema["maxLength"].as_u64().map(|n| n as usize),
        }
    } else {
        panic!("the sweep does not know the schema {schema}")
    }
}
