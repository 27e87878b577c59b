//! Judging the answer to one `addToCart`, strictly, in one place: what the README promises for
//! each status, and a short description of anything else.

use super::wire::{ErrorBody, OUT_OF_STOCK, Order, PENDING, REJECTED};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::fmt::Write as _;
use uuid::Uuid;

/// How much of an unexpected response body a description quotes.
const MAX_SNIPPET_CHARS: usize = 200;

/// Why allot refused a request with `503`: the codes of the README's error table. A client
/// tells them apart by the code, never by the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unavailable {
    /// `queue_full`: the product's partition queue is at its bound.
    QueueFull,
    /// `broker_unavailable`: RabbitMQ is unreachable or did not confirm in time.
    BrokerUnavailable,
    /// `redis_unavailable`: Redis (statuses, the shared queue bound, Idempotency-Keys) is
    /// unreachable.
    RedisUnavailable,
    /// `database_unavailable`: PostgreSQL is unreachable where the request needs it at once.
    DatabaseUnavailable,
    /// `timeout`: the server's request timeout ran out.
    Timeout,
}

impl Unavailable {
    pub const ALL: [Unavailable; 5] = [
        Unavailable::QueueFull,
        Unavailable::BrokerUnavailable,
        Unavailable::RedisUnavailable,
        Unavailable::DatabaseUnavailable,
        Unavailable::Timeout,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Unavailable::QueueFull => "queue_full",
            Unavailable::BrokerUnavailable => "broker_unavailable",
            Unavailable::RedisUnavailable => "redis_unavailable",
            Unavailable::DatabaseUnavailable => "database_unavailable",
            Unavailable::Timeout => "timeout",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.code() == code)
    }
}

/// How one `addToCart` was answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `202` with exactly `{"transaction_id": <uuid>, "status": "pending"}` and
    /// `Location: /api/v1/transaction/<uuid>`: accepted, it will reach exactly one outcome.
    Accepted(Uuid),
    /// `200` with exactly the sold-out answer echoing the order (`"final": true`): rejected
    /// `out_of_stock` at once, nothing recorded.
    SoldOut,
    /// `503` with `Retry-After`, in the one error shape, with a documented reason's code: not
    /// accepted, never to be sold.
    Refused {
        reason: Unavailable,
        retry_after: String,
        /// For people; never judged.
        message: String,
    },
    /// Another error in the one shape (a 4xx, or 500).
    Error {
        status: StatusCode,
        code: String,
        /// For people; never judged.
        message: String,
    },
    /// No HTTP answer: the connection failed, dropped or timed out.
    Unanswered(String),
    /// Anything else: a broken promise, described.
    Unexpected(String),
}

impl Answer {
    /// Judges an answer to `order`.
    pub fn judge(
        order: &Order,
        status: StatusCode,
        location: Option<&str>,
        retry_after: Option<&str>,
        body: &str,
    ) -> Answer {
        match status {
            StatusCode::ACCEPTED => accepted(location, body),
            StatusCode::OK => {
                let expected = json!({"status": REJECTED, "reason": OUT_OF_STOCK,
                    "user_id": order.user_id, "product_id": order.product_id,
                    "quantity": order.quantity, "final": true});
                match serde_json::from_str::<Value>(body) {
                    Ok(answer) if answer == expected => Answer::SoldOut,
                    _ => Answer::Unexpected(format!(
                        "HTTP 200 OK that is not the sold-out answer for {order:?}: {}",
                        snippet(body)
                    )),
                }
            }
            _ => refused_or_error(status, retry_after, body),
        }
    }

    /// Judges an answer that promises no final `200`, only a `202` like `addToCart`'s (an
    /// order of several products, a hold), or a refusal or an error.
    pub fn judge_accepted(
        status: StatusCode,
        location: Option<&str>,
        retry_after: Option<&str>,
        body: &str,
    ) -> Answer {
        match status {
            StatusCode::ACCEPTED => accepted(location, body),
            StatusCode::OK => Answer::Unexpected(describe_failure(status, retry_after, body)),
            _ => refused_or_error(status, retry_after, body),
        }
    }

    /// A short description, for reports and failure messages.
    pub fn describe(&self) -> String {
        match self {
            Answer::Accepted(id) => format!("202 Accepted {id}"),
            Answer::SoldOut => "200 sold out (final)".into(),
            Answer::Refused {
                reason,
                retry_after,
                message,
            } => format!(
                "HTTP 503 Service Unavailable {}: {message} (Retry-After: {retry_after})",
                reason.code()
            ),
            Answer::Error {
                status,
                code,
                message,
            } => format!("HTTP {status} {code}: {message}"),
            Answer::Unanswered(why) => format!("no answer: {why}"),
            Answer::Unexpected(what) => what.clone(),
        }
    }
}

/// A `503` with `Retry-After` and a documented reason's code, another error in the one shape,
/// or anything else described.
fn refused_or_error(status: StatusCode, retry_after: Option<&str>, body: &str) -> Answer {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody { error }) if status == StatusCode::SERVICE_UNAVAILABLE => {
            match (Unavailable::from_code(&error.code), retry_after) {
                (Some(reason), Some(retry_after)) => Answer::Refused {
                    reason,
                    retry_after: retry_after.to_owned(),
                    message: error.message,
                },
                _ => Answer::Unexpected(format!(
                    "{} (a 503 needs Retry-After and one of the codes {:?})",
                    describe_failure(status, retry_after, body),
                    Unavailable::ALL.map(Unavailable::code)
                )),
            }
        }
        Ok(ErrorBody { error }) if status.is_client_error() || status.is_server_error() => {
            Answer::Error {
                status,
                code: error.code,
                message: error.message,
            }
        }
        _ => Answer::Unexpected(describe_failure(status, retry_after, body)),
    }
}

/// A `202`: exactly the accepted body, and a `Location` naming its transaction.
fn accepted(location: Option<&str>, body: &str) -> Answer {
    let fields = match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(fields)) => fields,
        Ok(_) | Err(_) => {
            return Answer::Unexpected(format!("202 with an unexpected body: {}", snippet(body)));
        }
    };
    let mut problems = Vec::new();
    let raw_id = fields["transaction_id"].as_str();
    match fields.get("status").and_then(Value::as_str) {
        Some(PENDING) => {}
        status => problems.push(format!("status {status:?} instead of \"pending\"")),
    }
    let extra: Vec<&String> = (fields.keys())
        .filter(|key| !["transaction_id", "status"].contains(&key.as_str()))
        .collect();
    if !extra.is_empty() {
        problems.push(format!("unexpected fields {extra:?}"));
    }
    // A UUID, written as the README writes them (lowercase, hyphenated).
    let id = raw_id.and_then(|raw| Uuid::parse_str(raw).ok());
    match (id, raw_id) {
        (Some(id), Some(raw)) if id.to_string() != raw => {
            problems.push(format!(
                "transaction_id {raw:?} is not in the canonical form {id}"
            ));
        }
        (None, _) => problems.push(format!("transaction_id {raw_id:?} is not a UUID")),
        _ => {}
    }
    let expected_location = raw_id.map(|raw| format!("/api/v1/transaction/{raw}"));
    if location != expected_location.as_deref() {
        problems.push(format!(
            "Location {location:?} instead of {expected_location:?}"
        ));
    }
    match id {
        Some(id) if problems.is_empty() => Answer::Accepted(id),
        _ => Answer::Unexpected(format!("202 with {}", problems.join(", "))),
    }
}

/// Describes an unexpected answer: the status, the error code and message if the body is in the
/// API's error format (otherwise a snippet of it), and `Retry-After` if given.
pub fn describe_failure(status: StatusCode, retry_after: Option<&str>, body: &str) -> String {
    let mut text = format!("HTTP {status}");
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => {
            let _ = write!(text, " {}: {}", error.code, error.message);
        }
        Err(_) if body.trim().is_empty() => {}
        Err(_) => {
            let _ = write!(text, ", body not in the error format: {}", snippet(body));
        }
    }
    if let Some(retry_after) = retry_after {
        let _ = write!(text, " (Retry-After: {retry_after})");
    }
    text
}

/// The beginning of `text`, quoted, for a message.
pub fn snippet(text: &str) -> String {
    let mut chars = text.chars();
    let mut quoted: String = chars.by_ref().take(MAX_SNIPPET_CHARS).collect();
    if chars.next().is_some() {
        quoted.push('…');
    }
    format!("{quoted:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: Order = Order {
        user_id: 7,
        product_id: 1,
        quantity: 1,
    };

    fn judge(
        status: StatusCode,
        location: Option<&str>,
        retry_after: Option<&str>,
        body: &str,
    ) -> Answer {
        Answer::judge(&ORDER, status, location, retry_after, body)
    }

    fn unexpected(answer: Answer) -> String {
        match answer {
            Answer::Unexpected(what) => what,
            other => panic!("expected an unexpected answer, got {other:?}"),
        }
    }

    #[test]
    fn valid_acceptance_is_accepted() {
        let id = Uuid::new_v4();
        let body = format!(r#"{{"transaction_id": "{id}", "status": "pending"}}"#);
        let location = format!("/api/v1/transaction/{id}");
        assert_eq!(
            judge(StatusCode::ACCEPTED, Some(&location), None, &body),
            Answer::Accepted(id)
        );
    }

    #[test]
    fn invalid_acceptances_are_explained() {
        let id = Uuid::new_v4();
        let location = format!("/api/v1/transaction/{id}");
        let body = format!(r#"{{"transaction_id": "{id}", "status": "pending"}}"#);

        let busy =
            r#"{"error": {"code": "broker_unavailable", "message": "broker did not confirm"}}"#;
        let refused = judge(StatusCode::SERVICE_UNAVAILABLE, None, Some("1"), busy);
        assert_eq!(
            refused,
            Answer::Refused {
                reason: Unavailable::BrokerUnavailable,
                retry_after: "1".into(),
                message: "broker did not confirm".into()
            }
        );
        let error = refused.describe();
        assert!(error.contains("503"), "{error}");
        assert!(
            error.contains("broker_unavailable: broker did not confirm"),
            "{error}"
        );
        assert!(error.contains("Retry-After: 1"), "{error}");

        let error = unexpected(judge(StatusCode::OK, Some(&location), None, &body));
        assert!(error.contains("200"), "{error}");

        let error = unexpected(judge(StatusCode::ACCEPTED, None, None, &body));
        assert!(error.contains("Location None"), "{error}");

        let error = unexpected(judge(StatusCode::ACCEPTED, Some("/elsewhere"), None, &body));
        assert!(error.contains("/elsewhere"), "{error}");

        let decided = format!(r#"{{"transaction_id": "{id}", "status": "succeeded"}}"#);
        let error = unexpected(judge(StatusCode::ACCEPTED, Some(&location), None, &decided));
        assert!(error.contains("\"succeeded\""), "{error}");

        let extra = format!(r#"{{"transaction_id": "{id}", "status": "pending", "x": 1}}"#);
        let error = unexpected(judge(StatusCode::ACCEPTED, Some(&location), None, &extra));
        assert!(error.contains("unexpected fields [\"x\"]"), "{error}");

        let not_uuid = r#"{"transaction_id": "abc", "status": "pending"}"#;
        let error = unexpected(judge(
            StatusCode::ACCEPTED,
            Some("/api/v1/transaction/abc"),
            None,
            not_uuid,
        ));
        assert!(error.contains("not a UUID"), "{error}");

        let error = unexpected(judge(StatusCode::ACCEPTED, Some(&location), None, "<html>"));
        assert!(error.contains("<html>"), "{error}");

        let upper = id.to_string().to_uppercase();
        let shouting = format!(r#"{{"transaction_id": "{upper}", "status": "pending"}}"#);
        let location = format!("/api/v1/transaction/{upper}");
        let error = unexpected(judge(
            StatusCode::ACCEPTED,
            Some(&location),
            None,
            &shouting,
        ));
        assert!(error.contains("canonical"), "{error}");
    }

    /// A 503 is a refusal only with `Retry-After` and a documented code, in the one shape.
    #[test]
    fn refusals_are_told_apart_by_their_code_alone() {
        for reason in Unavailable::ALL {
            let body = format!(
                r#"{{"error": {{"code": "{}", "message": "m"}}}}"#,
                reason.code()
            );
            match judge(StatusCode::SERVICE_UNAVAILABLE, None, Some("2"), &body) {
                Answer::Refused {
                    reason: got,
                    retry_after,
                    ..
                } => assert_eq!((got, retry_after.as_str()), (reason, "2")),
                other => panic!("{other:?}"),
            }
            let error = unexpected(judge(StatusCode::SERVICE_UNAVAILABLE, None, None, &body));
            assert!(error.contains("needs Retry-After"), "{error}");
        }
        let old = r#"{"error": {"code": "unavailable", "message": "too many pending orders"}}"#;
        let error = unexpected(judge(StatusCode::SERVICE_UNAVAILABLE, None, Some("1"), old));
        assert!(error.contains("queue_full"), "{error}");
        let extra = r#"{"error": {"code": "queue_full", "message": "m", "reason": "x"}}"#;
        unexpected(judge(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            Some("1"),
            extra,
        ));
    }

    #[test]
    fn sold_out_is_the_exact_final_answer_echoing_the_order() {
        let body = r#"{"status": "rejected", "reason": "out_of_stock", "user_id": 7,
            "product_id": 1, "quantity": 1, "final": true}"#;
        assert_eq!(judge(StatusCode::OK, None, None, body), Answer::SoldOut);
        let other_user = body.replace("\"user_id\": 7", "\"user_id\": 8");
        unexpected(judge(StatusCode::OK, None, None, &other_user));
        let not_final = body.replace("true", "false");
        unexpected(judge(StatusCode::OK, None, None, &not_final));
    }

    /// Where no final `200` is promised (orders, holds), a `200` is a broken promise; a `202`
    /// and a refusal are judged as for `addToCart`.
    #[test]
    fn a_request_that_promises_a_202_is_judged_without_the_sold_out_answer() {
        let id = Uuid::new_v4();
        let location = format!("/api/v1/transaction/{id}");
        let body = format!(r#"{{"transaction_id": "{id}", "status": "pending"}}"#);
        assert_eq!(
            Answer::judge_accepted(StatusCode::ACCEPTED, Some(&location), None, &body),
            Answer::Accepted(id)
        );
        let sold_out = r#"{"status": "rejected", "reason": "out_of_stock", "user_id": 7,
            "product_id": 1, "quantity": 1, "final": true}"#;
        let error = unexpected(Answer::judge_accepted(StatusCode::OK, None, None, sold_out));
        assert!(error.contains("200"), "{error}");
        let full = r#"{"error": {"code": "queue_full", "message": "m"}}"#;
        assert!(matches!(
            Answer::judge_accepted(StatusCode::SERVICE_UNAVAILABLE, None, Some("1"), full),
            Answer::Refused {
                reason: Unavailable::QueueFull,
                ..
            }
        ));
    }

    #[test]
    fn other_errors_keep_their_status_and_code() {
        let body = r#"{"error": {"code": "invalid_body", "message": "quantity must be positive"}}"#;
        match judge(StatusCode::UNPROCESSABLE_ENTITY, None, None, body) {
            Answer::Error { status, code, .. } => {
                assert_eq!(
                    (status, code.as_str()),
                    (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body")
                );
            }
            other => panic!("{other:?}"),
        }
        let error = unexpected(judge(StatusCode::UNPROCESSABLE_ENTITY, None, None, "nope"));
        assert!(error.contains("not in the error format"), "{error}");
    }

    #[test]
    fn failures_are_described() {
        assert_eq!(
            describe_failure(StatusCode::BAD_GATEWAY, None, ""),
            "HTTP 502 Bad Gateway"
        );
        let long = "x".repeat(1000);
        let described = describe_failure(StatusCode::INTERNAL_SERVER_ERROR, None, &long);
        assert!(described.contains("not in the error format"), "{described}");
        assert!(described.len() < 300, "{described}");
    }
}
