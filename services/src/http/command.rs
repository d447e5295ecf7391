//! What every command endpoint shares: the JSON body with field-precise errors, the
//! `If-Match`, `Idempotency-Key` and `x-correlation-id` headers, and running the
//! command so its events and its idempotency record commit in one transaction.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::wire::WireEvent;
use eventstore::trace::TraceParent;
use eventstore::{AggregateStore, Executed, Metadata, Snapshot, StoreTransaction};
use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use utoipa::IntoParams;
use utoipa::openapi::path::{Parameter, ParameterIn};
use uuid::Uuid;

use super::context::{CorrelationId, ServiceState};
use super::openapi;
use super::problem::ApiError;
use crate::http::problem::ProblemKind;

/// Longest accepted `Idempotency-Key`.
const MAX_KEY_LENGTH: usize = 255;
/// Header set on a response replayed for a repeated `Idempotency-Key`.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// A command request: its JSON body and the headers that steer how it runs.
#[derive(Debug)]
pub struct Command<T> {
    pub body: T,
    pub context: CommandContext,
}

#[derive(Debug, Clone)]
pub struct CommandContext {
    pub correlation_id: Uuid,
    /// Names this request as the cause of the events it records.
    pub command_id: Uuid,
    /// `If-Match`: the stream version the client last saw.
    pub if_match: Option<i64>,
    pub idempotency: Option<IdempotencyKey>,
    /// The trace the request runs in.
    pub trace: Option<TraceParent>,
}

impl CommandContext {
    pub fn metadata(&self) -> Metadata {
        Metadata::new(self.correlation_id, self.command_id).traced(self.trace)
    }
}

/// The headers a command reads, for the OpenAPI document.
impl IntoParams for CommandContext {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            openapi::header(
                "Idempotency-Key",
                "Up to 255 characters. The same key with the same body answers the first \
                 response again (header `idempotent-replayed: true`); with another body, 422.",
            ),
            openapi::header(
                "If-Match",
                "The stream version the client last saw; 409 `version-conflict` if the \
                 aggregate has moved on.",
            ),
        ]
    }
}

#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    /// A keyed digest (HMAC-SHA256) of method, path and body: what must match for the
    /// key to replay. A digest, not the request itself, so a body with a password is
    /// never stored.
    pub request: Vec<u8>,
}

impl<T> FromRequest<ServiceState> for Command<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &ServiceState) -> Result<Self, ApiError> {
        let ids = request.extensions().get::<CorrelationId>().copied();
        let correlation_id = ids.map_or_else(Uuid::now_v7, |ids| ids.uuid);
        let if_match = if_match(request.headers())?;
        let key = idempotency_key(request.headers())?;
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let has_json_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                let essence = v.split(';').next().unwrap_or("").trim();
                essence.eq_ignore_ascii_case("application/json")
                    || essence.to_ascii_lowercase().ends_with("+json")
            });
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                let status = rejection.status();
                if status == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        status,
                        ProblemKind::BodyTooLarge,
                        "the request body is too large",
                    )
                } else {
                    ApiError::new(status, ProblemKind::UnreadableBody, rejection.body_text())
                }
            })?;
        if !bytes.is_empty() && !has_json_type {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ProblemKind::UnsupportedMediaType,
                "send the body as Content-Type: application/json",
            )
            .with_field("content-type"));
        }
        let json: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        let body = parse_json(json)?;
        let idempotency = key.map(|key| IdempotencyKey {
            key,
            request: request_digest(
                state.digest_key.bytes(),
                &format!("{method} {path}\n"),
                &bytes,
            ),
        });
        Ok(Command {
            body,
            context: CommandContext {
                correlation_id,
                command_id: Uuid::now_v7(),
                if_match,
                idempotency,
                trace: ids.map(|ids| ids.trace),
            },
        })
    }
}

/// HMAC-SHA256 of a request's method, path and body, keyed with the digest secret so
/// a digest of a body with a password cannot be tried against guesses by whoever reads
/// the database.
fn request_digest(key: &[u8], head: &str, body: &[u8]) -> Vec<u8> {
    use hmac::Mac;
    // HMAC takes keys of any length.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(head.as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// Parses JSON, naming the field at fault: malformed JSON is a 400, JSON of the wrong
/// shape (a missing field, a wrong type) a 422.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let malformed = |message: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ProblemKind::InvalidJson,
            format!("malformed JSON: {message}"),
        )
        .with_field("body")
    };
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let message = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            return malformed(message);
        }
        // A missing field is reported at its parent; name it from the message.
        let field = match (path.as_str(), missing_field(&message)) {
            (".", Some(missing)) => missing.to_owned(),
            (parent, Some(missing)) => format!("{parent}.{missing}"),
            (".", None) => "body".to_owned(),
            (path, None) => path.to_owned(),
        };
        ApiError::invalid(field, message)
    })?;
    deserializer
        .end()
        .map_err(|error| malformed(error.to_string()))?;
    if has_nul_escape(bytes) {
        return Err(ApiError::invalid(
            nul_field(bytes),
            "text may not contain the NUL character (\\u0000)",
        ));
    }
    Ok(value)
}

/// Whether a JSON text writes the NUL character (`\u0000`), which PostgreSQL text
/// cannot hold: accepted, it would be recorded and then fail every read model that
/// stores it. JSON can only write it as that escape (raw control bytes are invalid),
/// and a backslash starts an escape when an even number of backslashes precede it.
fn has_nul_escape(bytes: &[u8]) -> bool {
    let mut backslashes = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        if byte == b'\\' {
            backslashes += 1;
            continue;
        }
        if byte == b'u' && backslashes % 2 == 1 && bytes[index + 1..].starts_with(b"0000") {
            return true;
        }
        backslashes = 0;
    }
    false
}

/// Where the first NUL character sits (`lines[0].sku`), for the problem's `field`.
fn nul_field(bytes: &[u8]) -> String {
    fn find(value: &serde_json::Value, path: String) -> Option<String> {
        match value {
            serde_json::Value::String(text) => text.contains('\0').then_some(path),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(index, item)| find(item, format!("{path}[{index}]"))),
            serde_json::Value::Object(fields) => fields.iter().find_map(|(name, field)| {
                let inner = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                if name.contains('\0') {
                    Some(inner)
                } else {
                    find(field, inner)
                }
            }),
            _ => None,
        }
    }
    serde_json::from_slice(bytes)
        .ok()
        .and_then(|value| find(&value, String::new()))
        .filter(|path| !path.is_empty())
        .unwrap_or_else(|| "body".to_owned())
}

fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

/// `If-Match: 3` or `If-Match: "3"` (an ETag of the version).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    let text = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    match text.parse::<i64>() {
        Ok(version) if version >= 0 => Ok(Some(version)),
        _ => Err(ApiError::bad_header(
            "if-match",
            "If-Match must be the stream version the client saw, e.g. \"3\"",
        )),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.trim().is_empty() && key.len() <= MAX_KEY_LENGTH => {
            Ok(Some(key.trim().to_owned()))
        }
        _ => Err(ApiError::bad_header(
            "idempotency-key",
            format!("Idempotency-Key must be 1 to {MAX_KEY_LENGTH} visible characters"),
        )),
    }
}

/// A command's response before it is sent (and, with a key, stored).
pub struct Reply {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

/// Runs `command` on the aggregate of `stream_id` in one transaction with its
/// idempotency record, and answers with what `reply` makes of the outcome.
///
/// With an `Idempotency-Key` seen before: the same request gets the first response
/// again (marked with the `idempotent-replayed` header), another request a 422. Two
/// requests racing with one key serialise on the key's row; the second then replays.
pub async fn run<A>(
    aggregates: &AggregateStore,
    context: &CommandContext,
    stream_id: &str,
    command: &A::Command,
    reply: impl Fn(&Executed<A>) -> Reply,
) -> Result<Response, ApiError>
where
    A: Snapshot,
    A::Event: WireEvent,
    A::Error: Into<ApiError>,
{
    fn nothing<'t>(_: &'t mut StoreTransaction<'static>) -> First<'t> {
        Box::pin(async { Ok(()) })
    }
    run_with(aggregates, context, stream_id, command, nothing, reply).await
}

/// The service's own writes before a command, in its transaction (see [`run_with`]).
pub type First<'t> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ApiError>> + Send + 't>>;

/// Makes a closure into what [`run_with`] takes (the compiler needs to be told that
/// the future it returns borrows the transaction it is given).
pub fn first<F>(writes: F) -> F
where
    F: for<'t> FnOnce(&'t mut StoreTransaction<'static>) -> First<'t> + Send,
{
    writes
}

/// As [`run`], with `first` doing the service's own writes (an index the aggregate
/// cannot keep, say) in the same transaction, before the command: its error answers
/// the request and nothing is recorded.
pub async fn run_with<A>(
    aggregates: &AggregateStore,
    context: &CommandContext,
    stream_id: &str,
    command: &A::Command,
    first: impl for<'t> FnOnce(&'t mut StoreTransaction<'static>) -> First<'t> + Send,
    reply: impl Fn(&Executed<A>) -> Reply,
) -> Result<Response, ApiError>
where
    A: Snapshot,
    A::Event: WireEvent,
    A::Error: Into<ApiError>,
{
    let pool = aggregates.event_store().pool();
    if let Some(key) = &context.idempotency
        && let Some(stored) = find_key(pool, &key.key).await?
    {
        return stored.answer(key);
    }
    // The stream is locked before it is loaded (`execute_in`), so no other writer can
    // get in between: a version conflict here is a stale `If-Match`, answered as 409.
    let mut transaction = aggregates.event_store().begin().await?;
    first(&mut transaction).await?;
    let executed = aggregates
        .execute_in::<A>(
            &mut transaction,
            stream_id,
            context.if_match,
            command,
            context.metadata(),
        )
        .await?;
    let Reply { status, body } = reply(&executed);
    if let Some(key) = &context.idempotency
        && !record_key(transaction.connection(), key, status, &body).await?
    {
        // Another request with this key committed first: answer as it did.
        drop(transaction);
        return match find_key(pool, &key.key).await? {
            Some(stored) => stored.answer(key),
            None => Err(ApiError::internal("idempotency key vanished")),
        };
    }
    transaction.commit().await?;
    Ok((status, axum::Json(body)).into_response())
}

struct StoredReply {
    request: Vec<u8>,
    status: i16,
    body: serde_json::Value,
}

impl StoredReply {
    fn answer(self, key: &IdempotencyKey) -> Result<Response, ApiError> {
        if self.request != key.request {
            return Err(ApiError::invalid(
                "idempotency-key",
                "this Idempotency-Key was already used for a different request",
            )
            .with_kind(ProblemKind::IdempotencyKeyReused));
        }
        let status = StatusCode::from_u16(self.status as u16).unwrap_or(StatusCode::OK);
        let mut response = (status, axum::Json(self.body)).into_response();
        response.headers_mut().insert(
            REPLAYED_HEADER,
            axum::http::HeaderValue::from_static("true"),
        );
        Ok(response)
    }
}

async fn find_key(pool: &sqlx::PgPool, key: &str) -> Result<Option<StoredReply>, ApiError> {
    let row: Option<(Vec<u8>, i16, serde_json::Value)> =
        sqlx::query_as("SELECT request, status, body FROM idempotency_keys WHERE key = $1")
            .bind(key)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(request, status, body)| StoredReply {
        request,
        status,
        body,
    }))
}

/// Records the key in the command's transaction; false when another transaction
/// holds it already (this one waited for that one to end).
async fn record_key(
    connection: &mut PgConnection,
    key: &IdempotencyKey,
    status: StatusCode,
    body: &serde_json::Value,
) -> Result<bool, ApiError> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (key, request, status, body) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(&key.key)
    .bind(&key.request)
    .bind(status.as_u16() as i16)
    .bind(body)
    .execute(connection)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_character_is_refused_where_it_is_written() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Body {
            name: String,
            lines: Vec<String>,
        }
        let refused = |json: &str| parse_json::<Body>(json.as_bytes()).unwrap_err();
        assert_eq!(
            refused(r#"{"name":"a\u0000b","lines":[]}"#)
                .field
                .as_deref(),
            Some("name")
        );
        assert_eq!(
            refused(r#"{"name":"a","lines":["x","\u0000"]}"#)
                .field
                .as_deref(),
            Some("lines[1]")
        );
        // An escaped backslash followed by the text u0000 is no NUL.
        assert!(parse_json::<Body>(br#"{"name":"a\\u0000","lines":[]}"#).is_ok());
        assert!(parse_json::<Body>(br#"{"name":"a\\\u0000","lines":[]}"#).is_err());
        assert!(parse_json::<Body>(br#"{"name":"\u00001","lines":[]}"#).is_err());
        assert!(parse_json::<Body>(br#"{"name":"\u0001","lines":[]}"#).is_ok());
    }
}
