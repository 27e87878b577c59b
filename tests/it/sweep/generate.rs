//! Requests derived from the document, then broken: one [`Probe`] at a time from a seeded
//! generator, so a seed replays a run exactly.

use super::model::{Field, Kind, Operation};
use super::raw_http::RawRequest;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// The API's body size limit (`routes::MAX_BODY_BYTES`).
const MAX_BODY_BYTES: usize = 16 * 1024;
const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "FOO", "get",
];

/// One broken request.
pub struct Probe {
    /// What was broken (counted in the summary).
    pub category: &'static str,
    pub request: RawRequest,
    /// The documented operation it is a broken call of, if it is one (not a wrong method or an
    /// unknown path): its status must be among the operation's documented ones.
    pub operation: Option<usize>,
}

pub struct Generator<'a> {
    rng: StdRng,
    operations: &'a [Operation],
    product_id: i64,
    token: &'a str,
}

/// A request under construction: body fields as raw JSON values, so duplicates, unknown keys
/// and bytes that are not UTF-8 can be written.
#[derive(Clone)]
struct Draft {
    method: String,
    path: Vec<u8>,
    query: Vec<u8>,
    fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    content_type: Option<Vec<u8>>,
    authorization: Option<Vec<u8>>,
}

impl Draft {
    fn body(&self) -> Vec<u8> {
        let Some(fields) = &self.fields else {
            return Vec::new();
        };
        let mut body = b"{".to_vec();
        for (index, (key, value)) in fields.iter().enumerate() {
            if index > 0 {
                body.extend_from_slice(b", ");
            }
            body.push(b'"');
            body.extend_from_slice(key);
            body.extend_from_slice(b"\": ");
            body.extend_from_slice(value);
        }
        body.push(b'}');
        body
    }

    fn into_request(self, body: Vec<u8>) -> RawRequest {
        let mut target = self.path;
        if !self.query.is_empty() {
            target.push(b'?');
            target.extend_from_slice(&self.query);
        }
        let mut headers = Vec::new();
        if let Some(content_type) = self.content_type {
            headers.push(("content-type".to_owned(), content_type));
        }
        if let Some(authorization) = self.authorization {
            headers.push(("authorization".to_owned(), authorization));
        }
        RawRequest {
            method: self.method,
            target,
            headers,
            body,
        }
    }
}

impl<'a> Generator<'a> {
    pub fn new(seed: u64, operations: &'a [Operation], product_id: i64, token: &'a str) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            operations,
            product_id,
            token,
        }
    }

    pub fn next_probe(&mut self) -> Probe {
        // Uniform over (operation, way to break it), so the operations with a body, which can
        // be broken in the most ways, get the most requests.
        let pairs: Vec<(usize, &'static str)> = self
            .operations
            .iter()
            .enumerate()
            .flat_map(|(index, operation)| {
                categories(operation)
                    .into_iter()
                    .map(move |category| (index, category))
            })
            .collect();
        let (index, category) = *pairs.choose(&mut self.rng).expect("operations");
        let operation = &self.operations[index];
        let mut draft = self.valid(operation);
        let mut body = None;
        let documented = !matches!(category, "method" | "unknown_path");
        match category {
            "method" => {
                let documented: Vec<&str> = self
                    .operations
                    .iter()
                    .filter(|other| other.template == operation.template)
                    .map(|other| other.method.as_str())
                    .collect();
                let wrong: Vec<&&str> = METHODS
                    .iter()
                    .filter(|method| !documented.contains(method))
                    .collect();
                draft.method = (**wrong.choose(&mut self.rng).expect("a wrong method")).to_owned();
                // With a valid body and token: a misrouted write would show.
                if draft.fields.is_none() {
                    draft.fields = self
                        .operations
                        .iter()
                        .find_map(|op| op.body.as_ref().map(|fields| self.valid_fields(fields)));
                    draft.content_type = Some(b"application/json".to_vec());
                }
                draft.authorization = Some(format!("Bearer {}", self.token).into_bytes());
            }
            "unknown_path" => {
                let suffix = *[
                    "/x",
                    "/",
                    "//",
                    "/%FF",
                    "/restock/x",
                    "/events/x",
                    "/..",
                    "/%2e%2e",
                    "/\u{0}",
                ]
                .choose(&mut self.rng)
                .expect("suffixes");
                match self.rng.random_range(0..4) {
                    0 => draft.path = format!("/docs/{}", self.word()).into_bytes(),
                    1 => draft.path = format!("/api-docs/{}", self.word()).into_bytes(),
                    2 => draft.path = draft.path.to_ascii_uppercase(),
                    _ => draft
                        .path
                        .extend_from_slice(suffix.replace('\u{0}', "%00").as_bytes()),
                }
            }
            "body_not_object" => {
                let values: Vec<Vec<u8>> = draft
                    .fields
                    .as_ref()
                    .expect("a body")
                    .iter()
                    .map(|(_, value)| value.clone())
                    .collect();
                let positional = join(b"[", &values, b"]");
                body = Some(match self.rng.random_range(0..6) {
                    0 | 1 => positional,
                    2 => join(b"[", &[draft.body()], b"]"),
                    3 => b"[]".to_vec(),
                    4 => [&b" \n\t"[..], &positional].concat(),
                    _ => (*[
                        &b"1"[..],
                        b"-1",
                        b"\"x\"",
                        b"true",
                        b"null",
                        b"1.5",
                        b"\"{}\"",
                    ]
                    .choose(&mut self.rng)
                    .expect("scalars"))
                    .to_vec(),
                });
            }
            "body_wrong_type" => {
                let (field, slot) = self.pick_field(operation);
                let value = self.wrong_value(&field);
                draft.fields.as_mut().expect("a body")[slot].1 = value.into_bytes();
            }
            "body_missing_field" => {
                // Only required fields: leaving out an optional one is valid.
                let required: Vec<usize> = operation
                    .body
                    .as_ref()
                    .expect("a body")
                    .iter()
                    .enumerate()
                    .filter(|(_, field)| field.required)
                    .map(|(slot, _)| slot)
                    .collect();
                let fields = draft.fields.as_mut().expect("a body");
                if self.rng.random_bool(0.2) {
                    fields.retain(|(name, _)| {
                        !operation
                            .body
                            .as_ref()
                            .expect("a body")
                            .iter()
                            .any(|field| field.required && field.name.as_bytes() == name.as_slice())
                    });
                } else {
                    let slot = *required.choose(&mut self.rng).expect("a required field");
                    fields.remove(slot);
                }
            }
            "body_duplicate_field" => {
                let fields = draft.fields.as_mut().expect("a body");
                let slot = self.rng.random_range(0..fields.len());
                let duplicate = fields[slot].clone();
                let at = self.rng.random_range(0..=fields.len());
                fields.insert(at, duplicate);
            }
            "body_unknown_field" => {
                let fields = draft.fields.as_mut().expect("a body");
                let slot = self.rng.random_range(0..fields.len());
                let near = String::from_utf8_lossy(&fields[slot].0).into_owned();
                let key = match self.rng.random_range(0..6) {
                    0 => near.to_uppercase(),
                    1 => format!("{near} "),
                    2 => String::new(),
                    3 => format!("{near}_"),
                    _ => self.word(),
                };
                let at = self.rng.random_range(0..=fields.len());
                fields.insert(at, (key.into_bytes(), b"1".to_vec()));
            }
            "body_past_limit" | "body_at_limit_and_unknown_field" => {
                let bounded: Vec<usize> = operation
                    .body
                    .as_ref()
                    .expect("a body")
                    .iter()
                    .enumerate()
                    .filter(|(_, field)| {
                        matches!(
                            field.kind,
                            Kind::Integer { .. } | Kind::DateTime | Kind::Array { .. }
                        )
                    })
                    .map(|(slot, _)| slot)
                    .collect();
                let slot = *bounded.choose(&mut self.rng).expect("a bounded field");
                let field = operation.body.as_ref().expect("a body")[slot].clone();
                let value = if category == "body_past_limit" {
                    self.past_limit_of(&field.kind)
                } else {
                    self.at_limit_of(&field.kind)
                };
                let fields = draft.fields.as_mut().expect("a body");
                fields[slot].1 = value.into_bytes();
                if category == "body_at_limit_and_unknown_field" {
                    fields.push((b"sweep".to_vec(), b"true".to_vec()));
                }
            }
            "body_bad_string" => {
                let strings: Vec<(usize, Option<usize>)> = operation
                    .body
                    .as_ref()
                    .expect("a body")
                    .iter()
                    .enumerate()
                    .filter_map(|(slot, field)| match field.kind {
                        Kind::String { max_length } => Some((slot, max_length)),
                        _ => None,
                    })
                    .collect();
                match strings.choose(&mut self.rng) {
                    Some(&(slot, max_length)) => {
                        let long = format!("\"{}\"", "é".repeat(max_length.unwrap_or(10_000) + 1));
                        let bad = [
                            long.as_str(),
                            "\"\"",
                            "\"   \"",
                            "\"\\u0000\"",
                            "\"Wid\\u0000get\"",
                            "\"a\\u0007b\"",
                            "\"\\u001b[31mred\"",
                            "\"x\\u007f\"",
                            "\"x\\u0085\"",
                            "\"\\tname\"",
                            "\"name\\n\"",
                            "\"\\u2028\"",
                            "\"\\u00a0\\u3000\"",
                        ];
                        let value = bad.choose(&mut self.rng).expect("bad strings");
                        draft.fields.as_mut().expect("a body")[slot].1 = value.as_bytes().to_vec();
                    }
                    // No string field: a string where an integer belongs, with control characters.
                    None => {
                        let (_, slot) = self.pick_field(operation);
                        draft.fields.as_mut().expect("a body")[slot].1 = b"\"1\\u0000\"".to_vec();
                    }
                }
            }
            "body_huge" => {
                let valid = draft.body();
                body = Some(match self.rng.random_range(0..3) {
                    // Over the limit: refused before it is parsed.
                    0 => {
                        let size = self
                            .rng
                            .random_range(MAX_BODY_BYTES + 1..4 * MAX_BODY_BYTES);
                        let mut padded = vec![b' '; size - valid.len()];
                        padded.extend_from_slice(&valid);
                        padded
                    }
                    1 => {
                        let size = self.rng.random_range(MAX_BODY_BYTES..4 * MAX_BODY_BYTES);
                        let fields = draft.fields.as_mut().expect("a body");
                        fields.push((
                            b"padding".to_vec(),
                            format!("\"{}\"", "x".repeat(size)).into_bytes(),
                        ));
                        draft.body()
                    }
                    // Under the limit, with a huge number.
                    _ => {
                        let (_, slot) = self.pick_field(operation);
                        let digits = self.rng.random_range(20..MAX_BODY_BYTES / 2);
                        draft.fields.as_mut().expect("a body")[slot].1 =
                            format!("1{}", "0".repeat(digits)).into_bytes();
                        draft.body()
                    }
                });
            }
            "body_deep" => {
                let depth = self.rng.random_range(100..5000);
                let nested = |open: &str, close: &str| {
                    format!("{}1{}", open.repeat(depth), close.repeat(depth)).into_bytes()
                };
                match self.rng.random_range(0..3) {
                    0 => body = Some(nested("[", "]")),
                    1 => {
                        let (_, slot) = self.pick_field(operation);
                        draft.fields.as_mut().expect("a body")[slot].1 = nested("[", "]");
                    }
                    _ => {
                        let (_, slot) = self.pick_field(operation);
                        draft.fields.as_mut().expect("a body")[slot].1 = nested("{\"a\": ", "}");
                    }
                }
            }
            "body_bad_utf8" => {
                let bad: &[u8] = [
                    &b"\xFF"[..],
                    b"\xC3\x28",
                    b"\xED\xA0\x80",
                    b"\xC0\xAF",
                    b"\xF4\x90\x80\x80",
                    b"\x80",
                ]
                .choose(&mut self.rng)
                .expect("bad bytes");
                let fields = draft.fields.as_mut().expect("a body");
                let slot = self.rng.random_range(0..fields.len());
                match self.rng.random_range(0..5) {
                    0 => fields[slot].0.extend_from_slice(bad),
                    1 => fields[slot].1 = [&b"\"x"[..], bad, b"\""].concat(),
                    2 => fields[slot].1 = b"\"\\ud800\"".to_vec(),
                    3 => {
                        body = Some([&b"\xEF\xBB\xBF"[..], &draft.body()].concat());
                    }
                    _ => fields[slot].1.extend_from_slice(bad),
                }
            }
            "body_malformed" => {
                let valid = draft.body();
                body = Some(match self.rng.random_range(0..9) {
                    0 | 1 => {
                        let cut = self.rng.random_range(0..valid.len());
                        valid[..cut].to_vec()
                    }
                    2 => [&valid[..valid.len() - 1], b",}"].concat(),
                    3 => [&valid[..], b"x"].concat(),
                    4 => [&valid[..], b"{}"].concat(),
                    5 => String::from_utf8_lossy(&valid)
                        .replace('"', "'")
                        .into_bytes(),
                    6 => [&b"/* c */"[..], &valid].concat(),
                    7 => {
                        let (_, slot) = self.pick_field(operation);
                        let value = *[
                            "NaN",
                            "Infinity",
                            "-Infinity",
                            "0x10",
                            "01",
                            "+1",
                            ".5",
                            "1.",
                            "undefined",
                        ]
                        .choose(&mut self.rng)
                        .expect("bad numbers");
                        draft.fields.as_mut().expect("a body")[slot].1 = value.as_bytes().to_vec();
                        draft.body()
                    }
                    _ => {
                        // A raw control character inside a string.
                        let (_, slot) = self.pick_field(operation);
                        let control = self.rng.random_range(0u8..0x20);
                        draft.fields.as_mut().expect("a body")[slot].1 =
                            vec![b'"', b'x', control, b'"'];
                        draft.body()
                    }
                });
            }
            "content_type" => {
                let wrong: &[&[u8]] = &[
                    b"text/plain",
                    b"application/xml",
                    b"application/x-www-form-urlencoded",
                    b"multipart/form-data; boundary=x",
                    b"application/json-patch+json",
                    b"application/merge-patch+json",
                    b"application/jsonl",
                    b"json",
                    b"",
                    b"application/json, text/plain",
                    b"application/json\xFF",
                    b"text/json",
                    b"application",
                ];
                match self.rng.random_range(0..6) {
                    0 => draft.content_type = None,
                    1 => {
                        // Two declarations: ambiguous.
                        let request = {
                            let mut with_two = draft.clone();
                            with_two.content_type = Some(b"application/json".to_vec());
                            let body = with_two.body();
                            let mut request = with_two.into_request(body);
                            request
                                .headers
                                .push(("content-type".to_owned(), b"text/plain".to_vec()));
                            request
                        };
                        return Probe {
                            category,
                            request,
                            operation: Some(index),
                        };
                    }
                    _ => {
                        draft.content_type =
                            Some(wrong.choose(&mut self.rng).expect("types").to_vec());
                    }
                }
            }
            "token" => {
                let token = self.token;
                let wrong: Vec<Vec<u8>> = vec![
                    format!("Bearer {token}x").into_bytes(),
                    format!("Bearer {}", &token[..token.len() - 1]).into_bytes(),
                    format!("Basic {token}").into_bytes(),
                    token.as_bytes().to_vec(),
                    b"Bearer".to_vec(),
                    b"Bearer ".to_vec(),
                    format!("Bearer\t{token}").into_bytes(),
                    [format!("Bearer {token}").as_bytes(), b"\xFF"].concat(),
                    b"Bearer t\xC3\xB6ken".to_vec(),
                    format!("Bearer {}", token.to_uppercase()).into_bytes(),
                ];
                draft.authorization = match self.rng.random_range(0..4) {
                    0 => None,
                    _ => Some(wrong.choose(&mut self.rng).expect("tokens").clone()),
                };
            }
            "path_id" | "path_raw_bytes" => {
                let param = operation
                    .path_params
                    .choose(&mut self.rng)
                    .expect("a path param");
                let bad: Vec<Vec<u8>> = if category == "path_raw_bytes" {
                    vec![
                        b"\xFF".to_vec(),
                        b"1\xC3\x28".to_vec(),
                        b"\xED\xA0\x80".to_vec(),
                    ]
                } else {
                    let mut bad: Vec<&str> = vec![
                        "%FF",
                        "%00",
                        "%C3%28",
                        "%ED%A0%80",
                        "%20",
                        "%2F",
                        "abc",
                        "null",
                        "{id}",
                        "%E2%80%8B1",
                    ];
                    match param.kind {
                        Kind::Uuid => bad.extend([
                            "not-a-uuid",
                            "123",
                            "0191b3c4-8f2e-7000-8000-00000000000g",
                            "0191b3c4-8f2e-7000-8000-0000000000000",
                            "0191b3c4-8f2e-7000-8000-00000000000",
                        ]),
                        _ => bad.extend([
                            "0",
                            "-1",
                            "1.5",
                            "1e3",
                            "9223372036854775808",
                            "0x1",
                            "1%20",
                            "-0",
                            "1,2",
                            "NaN",
                            "%D9%A1",
                            "99999999999999999999999",
                        ]),
                    }
                    bad.iter().map(|raw| raw.as_bytes().to_vec()).collect()
                };
                let value = bad.choose(&mut self.rng).expect("bad ids").clone();
                draft.path = self.concrete(operation, Some((&param.name, value)));
            }
            "query" => {
                let param = operation
                    .query_params
                    .choose(&mut self.rng)
                    .expect("a query param");
                let name = &param.name;
                let mut bad: Vec<String> = vec![
                    format!("{name}=abc"),
                    format!("{name}=1.5"),
                    format!("{name}=%FF"),
                    format!("{name}=1&{name}=2"),
                    format!("{name}="),
                    name.clone(),
                    format!("{name}=9223372036854775808"),
                    format!("{name}=%00"),
                    format!("{name}=1e2"),
                    format!("{}=1", name.to_uppercase()),
                    format!("{name}=1&{}=1", self.word()),
                    "%FF=1".to_owned(),
                    format!("{name}[]=1"),
                ];
                if let Kind::Integer { min, max } = param.kind {
                    bad.extend(min.map(|min| format!("{name}={}", min - 1)));
                    bad.extend(max.map(|max| format!("{name}={}", max + 1)));
                }
                draft.query = bad
                    .choose(&mut self.rng)
                    .expect("bad queries")
                    .clone()
                    .into_bytes();
            }
            other => unreachable!("category {other}"),
        }
        let body = body.unwrap_or_else(|| draft.body());
        Probe {
            category,
            request: draft.into_request(body),
            operation: documented.then_some(index),
        }
    }

    /// The valid request of `operation`, to be broken.
    fn valid(&mut self, operation: &Operation) -> Draft {
        Draft {
            method: operation.method.clone(),
            path: self.concrete(operation, None),
            query: Vec::new(),
            fields: operation
                .body
                .as_ref()
                .map(|fields| self.valid_fields(fields)),
            content_type: operation
                .body
                .as_ref()
                .map(|_| b"application/json".to_vec()),
            authorization: operation
                .secured
                .then(|| format!("Bearer {}", self.token).into_bytes()),
        }
    }

    fn valid_fields(&self, fields: &[Field]) -> Vec<(Vec<u8>, Vec<u8>)> {
        fields
            .iter()
            .map(|field| {
                (
                    field.name.clone().into_bytes(),
                    self.valid_value(field).into_bytes(),
                )
            })
            .collect()
    }

    /// A valid value of `field`: the sweep's product, the smallest allowed integer, a sale
    /// window of this century, one valid item.
    fn valid_value(&self, field: &Field) -> String {
        match &field.kind {
            _ if field.name == "product_id" => self.product_id.to_string(),
            Kind::Integer { min, .. } => min.unwrap_or(1).max(1).to_string(),
            Kind::Uuid => format!("\"{}\"", uuid::Uuid::nil()),
            Kind::String { .. } => "\"Sweep product\"".to_owned(),
            Kind::DateTime if field.name.contains("end") => "\"2100-01-01T00:00:00Z\"".to_owned(),
            Kind::DateTime => "\"2000-01-01T00:00:00Z\"".to_owned(),
            Kind::Boolean => "false".to_owned(),
            Kind::Array { fields, .. } => {
                format!(
                    "[{}]",
                    String::from_utf8(self.object(fields)).expect("UTF-8")
                )
            }
        }
    }

    /// A valid object with `fields`.
    fn object(&self, fields: &[Field]) -> Vec<u8> {
        let draft = Draft {
            method: String::new(),
            path: Vec::new(),
            query: Vec::new(),
            fields: Some(self.valid_fields(fields)),
            content_type: None,
            authorization: None,
        };
        draft.body()
    }

    /// A value of the wrong type for `field` (never `null` where `null` is allowed).
    fn wrong_value(&mut self, field: &Field) -> String {
        let mut wrong: Vec<&str> = match field.kind {
            Kind::String { .. } => vec!["5", "true", "null", "[]", "{}", "[\"x\"]", "-1.5"],
            Kind::DateTime => vec![
                "5",
                "true",
                "null",
                "[]",
                "{}",
                "\"\"",
                "\"2026-13-01T00:00:00Z\"",
                "\"2026-01-01\"",
                "\"2026-01-01T00:00:00\"",
                "\"yesterday\"",
                "\"1700000000\"",
                "1.5",
            ],
            Kind::Boolean => vec!["\"true\"", "1", "0", "null", "[]", "{}", "\"\"", "[true]"],
            Kind::Array { .. } => vec![
                "1", "\"x\"", "true", "null", "{}", "[]", "[1]", "[null]", "[[1, 1]]", "[\"x\"]",
                "[{}]",
            ],
            _ => vec![
                "\"1\"",
                "1.5",
                "1.0",
                "1e2",
                "-0.0",
                "true",
                "null",
                "[]",
                "{}",
                "[1]",
                "\"\"",
                "{\"$numberLong\": \"1\"}",
                "0.99999999999999999999",
            ],
        };
        if field.nullable {
            wrong.retain(|value| *value != "null");
        }
        (*wrong.choose(&mut self.rng).expect("wrong values")).to_owned()
    }

    /// A value of `kind` past its limits.
    fn past_limit_of(&mut self, kind: &Kind) -> String {
        match kind {
            Kind::Integer { min, max } => self.past_limit(*min, *max),
            Kind::DateTime => (*[
                "\"0000-12-31T23:59:59Z\"",
                "\"+10000-01-01T00:00:00Z\"",
                "\"-0001-01-01T00:00:00Z\"",
                "\"+262142-01-01T00:00:00Z\"",
            ]
            .choose(&mut self.rng)
            .expect("times"))
            .to_owned(),
            Kind::Array {
                min_items,
                max_items,
                fields,
            } => {
                let choice = self.rng.random_range(0..4);
                let pick: usize = self.rng.random_range(0..1000);
                let item = |product: i64| {
                    let values: Vec<String> = fields
                        .iter()
                        .map(|field| match field.kind {
                            _ if field.name == "product_id" => {
                                format!("\"{}\": {product}", field.name)
                            }
                            _ => format!("\"{}\": {}", field.name, self.valid_value(field)),
                        })
                        .collect();
                    format!("{{{}}}", values.join(", "))
                };
                match choice {
                    // One item more than allowed, each product once.
                    0 if max_items.is_some() => {
                        let items: Vec<String> = (1..=max_items.unwrap() as i64 + 1)
                            .map(|n| item(self.product_id + n))
                            .collect();
                        format!("[{}]", items.join(", "))
                    }
                    // A product listed twice.
                    1 => format!("[{}, {}]", item(self.product_id), item(self.product_id)),
                    // An item's integer past its limit.
                    2 => {
                        let integers: Vec<&Field> = fields
                            .iter()
                            .filter(|field| matches!(field.kind, Kind::Integer { .. }))
                            .collect();
                        let field = integers[pick % integers.len()];
                        let Kind::Integer { min, max } = field.kind else {
                            unreachable!()
                        };
                        let past = self.past_limit(min, max);
                        let values: Vec<String> = fields
                            .iter()
                            .map(|other| {
                                let value = if other.name == field.name {
                                    past.clone()
                                } else {
                                    self.valid_value(other)
                                };
                                format!("\"{}\": {value}", other.name)
                            })
                            .collect();
                        format!("[{{{}}}]", values.join(", "))
                    }
                    _ if min_items.is_some_and(|min| min > 0) => "[]".to_owned(),
                    _ => format!("[{}, {}]", item(self.product_id), item(self.product_id)),
                }
            }
            _ => unreachable!("no limit to go past"),
        }
    }

    /// A value of `kind` at one of its limits.
    fn at_limit_of(&mut self, kind: &Kind) -> String {
        match kind {
            Kind::Integer { min, max } => {
                let at = [*min, *max].into_iter().flatten().collect::<Vec<_>>();
                at.choose(&mut self.rng)
                    .map_or_else(|| "1".to_owned(), i128::to_string)
            }
            Kind::DateTime => (*[
                "\"0001-01-01T00:00:00Z\"",
                "\"9999-12-31T23:59:59.999999Z\"",
            ]
            .choose(&mut self.rng)
            .expect("times"))
            .to_owned(),
            Kind::Array { fields, .. } => {
                format!(
                    "[{}]",
                    String::from_utf8(self.object(fields)).expect("UTF-8")
                )
            }
            _ => unreachable!("no limit to be at"),
        }
    }

    /// The operation's path with valid ids, or `replace`d for one parameter.
    fn concrete(&mut self, operation: &Operation, replace: Option<(&str, Vec<u8>)>) -> Vec<u8> {
        let mut path = operation.template.clone().into_bytes();
        for param in &operation.path_params {
            let value = match &replace {
                Some((name, value)) if *name == param.name => value.clone(),
                _ => match param.kind {
                    Kind::Uuid => uuid::Uuid::from_u128(self.rng.random())
                        .to_string()
                        .into_bytes(),
                    _ => self.product_id.to_string().into_bytes(),
                },
            };
            let placeholder = format!("{{{}}}", param.name).into_bytes();
            let at = path
                .windows(placeholder.len())
                .position(|window| window == placeholder)
                .expect("the template has the parameter");
            path.splice(at..at + placeholder.len(), value);
        }
        path
    }

    fn pick_field(&mut self, operation: &Operation) -> (Field, usize) {
        let fields = operation.body.as_ref().expect("a body");
        let slot = self.rng.random_range(0..fields.len());
        (fields[slot].clone(), slot)
    }

    /// An integer literal outside `min..=max` (outside the 64-bit range when unbounded).
    fn past_limit(&mut self, min: Option<i128>, max: Option<i128>) -> String {
        let low = min.unwrap_or(i128::from(i64::MIN));
        let high = max.unwrap_or(i128::from(i64::MAX));
        let mut candidates: Vec<String> = vec![
            (low - 1).to_string(),
            (high + 1).to_string(),
            (i128::from(i64::MAX) + 1).to_string(),
            (i128::from(i64::MIN) - 1).to_string(),
            u64::MAX.to_string(),
            format!("1{}", "0".repeat(30)),
            format!("-1{}", "0".repeat(30)),
        ];
        candidates.extend(
            [-1i128, 0, low - 1000, high + 1000]
                .into_iter()
                .filter(|value| *value < low || *value > high)
                .map(|value| value.to_string()),
        );
        candidates.retain(|literal| {
            literal
                .parse::<i128>()
                .map_or(true, |value| value < low || value > high)
        });
        candidates
            .choose(&mut self.rng)
            .expect("candidates")
            .clone()
    }

    fn word(&mut self) -> String {
        let length = self.rng.random_range(1..12);
        (0..length)
            .map(|_| char::from(self.rng.random_range(b'a'..=b'z')))
            .collect()
    }
}

/// The ways `operation` can be broken.
fn categories(operation: &Operation) -> Vec<&'static str> {
    let mut categories = vec!["method", "unknown_path"];
    if let Some(fields) = &operation.body {
        categories.extend(["body_not_object", "body_wrong_type"]);
        if fields.iter().any(|field| field.required) {
            categories.push("body_missing_field");
        }
        if fields.iter().any(|field| {
            matches!(
                field.kind,
                Kind::Integer { .. } | Kind::DateTime | Kind::Array { .. }
            )
        }) {
            categories.extend(["body_past_limit", "body_at_limit_and_unknown_field"]);
        }
        categories.extend([
            "body_duplicate_field",
            "body_unknown_field",
            "body_bad_string",
            "body_huge",
            "body_deep",
            "body_bad_utf8",
            "body_malformed",
            "content_type",
        ]);
    }
    if operation.secured {
        categories.push("token");
    }
    if !operation.path_params.is_empty() {
        categories.extend(["path_id", "path_raw_bytes"]);
    }
    if !operation.query_params.is_empty() {
        categories.push("query");
    }
    categories
}

fn join(open: &[u8], items: &[Vec<u8>], close: &[u8]) -> Vec<u8> {
    let mut joined = open.to_vec();
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(item);
    }
    joined.extend_from_slice(close);
    joined
}
