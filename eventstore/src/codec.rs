//! Avro single-object encoding and the schema registry.
//!
//! A payload is `C3 01`, the writer schema's 64-bit CRC-64-AVRO (Rabin) fingerprint in
//! little-endian order, then the Avro binary body. The fingerprint names the exact
//! schema version that wrote the body; decoding resolves that writer schema into the
//! current version of the same event type, so events written by older code are read
//! by newer code (and, through the registry table, the other way round).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use domain::wire::{SCHEMA_FILES, SchemaFile, WireError, WireEvent};
use sqlx::PgPool;

const MAGIC: [u8; 2] = [0xC3, 0x01];
const HEADER_LEN: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("payload is not Avro single-object encoded")]
    NotSingleObject,
    #[error("no schema with fingerprint {0:#018x} is registered")]
    UnknownFingerprint(i64),
    #[error("no current schema for event type {0}")]
    UnknownEventType(String),
    #[error("schema {path} does not parse: {message}")]
    BadSchema { path: String, message: String },
    #[error("avro: {0}")]
    Avro(String),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("schema registry table: {0}")]
    Database(#[from] sqlx::Error),
}

/// An event encoded for storage or the wire.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub event_type: &'static str,
    pub fingerprint: i64,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
struct KnownSchema {
    event_type: String,
    version: u32,
    schema: Schema,
    /// The schema as written (with docs and defaults), for the registry table.
    text: String,
}

/// Every schema version this process knows, by fingerprint, and the current (highest)
/// version of each event type. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SchemaRegistry {
    inner: Arc<RegistryInner>,
}

#[derive(Debug)]
struct RegistryInner {
    /// Grows at run time when an event written by another version of the code names
    /// a fingerprint we only find in the `schema_registry` table.
    by_fingerprint: RwLock<HashMap<i64, Arc<KnownSchema>>>,
    current: HashMap<String, Arc<KnownSchema>>,
    current_fingerprint: HashMap<String, i64>,
}

impl SchemaRegistry {
    /// The registry of the schemas compiled into this binary (`domain/schemas/`).
    pub fn builtin() -> Result<Self, CodecError> {
        Self::from_files(SCHEMA_FILES)
    }

    pub fn from_files(files: &[SchemaFile]) -> Result<Self, CodecError> {
        let mut by_fingerprint = HashMap::new();
        let mut current: HashMap<String, Arc<KnownSchema>> = HashMap::new();
        for file in files {
            let schema = Schema::parse_str(file.text).map_err(|error| CodecError::BadSchema {
                path: file.path(),
                message: error.to_string(),
            })?;
            let known = Arc::new(KnownSchema {
                event_type: file.event_type.to_owned(),
                version: file.version,
                schema,
                text: file.text.to_owned(),
            });
            by_fingerprint.insert(fingerprint(&known.schema), known.clone());
            let newer = current
                .get(file.event_type)
                .is_none_or(|existing| existing.version < file.version);
            if newer {
                current.insert(file.event_type.to_owned(), known);
            }
        }
        let current_fingerprint = current
            .iter()
            .map(|(event_type, known)| (event_type.clone(), fingerprint(&known.schema)))
            .collect();
        Ok(SchemaRegistry {
            inner: Arc::new(RegistryInner {
                by_fingerprint: RwLock::new(by_fingerprint),
                current,
                current_fingerprint,
            }),
        })
    }

    /// Records every known schema in the database's `schema_registry` table, so that
    /// readers running other versions of the code can resolve what this one writes.
    pub async fn publish(&self, pool: &PgPool) -> Result<(), CodecError> {
        let mut fingerprints = Vec::new();
        let mut event_types = Vec::new();
        let mut versions = Vec::new();
        let mut schemas = Vec::new();
        for (fingerprint, schema) in self.read_known().iter() {
            fingerprints.push(*fingerprint);
            event_types.push(schema.event_type.clone());
            versions.push(schema.version as i32);
            schemas.push(schema.text.clone());
        }
        sqlx::query(
            "INSERT INTO schema_registry (fingerprint, event_type, version, schema)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[])
             ON CONFLICT DO NOTHING",
        )
        .bind(fingerprints)
        .bind(event_types)
        .bind(versions)
        .bind(schemas)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Learns a fingerprint this binary does not know from the `schema_registry` table.
    /// Returns false when the table does not know it either.
    pub async fn learn(&self, pool: &PgPool, fingerprint: i64) -> Result<bool, CodecError> {
        let row: Option<(String, i32, String)> = sqlx::query_as(
            "SELECT event_type, version, schema FROM schema_registry WHERE fingerprint = $1",
        )
        .bind(fingerprint)
        .fetch_optional(pool)
        .await?;
        let Some((event_type, version, text)) = row else {
            return Ok(false);
        };
        let schema = Schema::parse_str(&text).map_err(|error| CodecError::BadSchema {
            path: format!("schema_registry[{fingerprint:#018x}]"),
            message: error.to_string(),
        })?;
        self.inner
            .by_fingerprint
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                fingerprint,
                Arc::new(KnownSchema {
                    event_type,
                    version: version as u32,
                    schema,
                    text,
                }),
            );
        Ok(true)
    }

    /// The fingerprint this code writes `event_type` with.
    pub fn current_fingerprint(&self, event_type: &str) -> Option<i64> {
        self.inner.current_fingerprint.get(event_type).copied()
    }

    /// Every fingerprint this registry can read, in order.
    pub fn fingerprints(&self) -> Vec<i64> {
        let mut all: Vec<i64> = self.read_known().keys().copied().collect();
        all.sort_unstable();
        all
    }

    /// The event type and schema version a fingerprint names, if known.
    pub fn describe(&self, fingerprint: i64) -> Option<(String, u32)> {
        self.read_known()
            .get(&fingerprint)
            .map(|known| (known.event_type.clone(), known.version))
    }

    /// Encodes an event with its type's current schema.
    pub fn encode<E: WireEvent>(&self, event: &E) -> Result<Encoded, CodecError> {
        let event_type = event.event_type();
        let known = self
            .inner
            .current
            .get(event_type)
            .ok_or_else(|| CodecError::UnknownEventType(event_type.to_owned()))?;
        let fingerprint = self.inner.current_fingerprint[event_type];
        let value = event.to_avro()?;
        let mut payload = Vec::with_capacity(64);
        payload.extend_from_slice(&MAGIC);
        payload.extend_from_slice(&fingerprint.to_le_bytes());
        GenericDatumWriter::builder(&known.schema)
            .build()
            .and_then(|writer| writer.write_value(&mut payload, value))
            .map_err(avro)?;
        Ok(Encoded {
            event_type,
            fingerprint,
            payload,
        })
    }

    /// Decodes a single-object payload into the current version of its event type.
    pub fn decode<E: WireEvent>(&self, payload: &[u8]) -> Result<E, CodecError> {
        let (event_type, value) = self.decode_value(payload)?;
        Ok(E::from_avro(&event_type, &value)?)
    }

    /// Decodes a payload into its event type and an Avro value of the current schema,
    /// for tools that show events without knowing their Rust type.
    pub fn decode_value(
        &self,
        payload: &[u8],
    ) -> Result<(String, apache_avro::types::Value), CodecError> {
        let fingerprint = read_fingerprint(payload)?;
        let writer = self
            .read_known()
            .get(&fingerprint)
            .cloned()
            .ok_or(CodecError::UnknownFingerprint(fingerprint))?;
        let reader = self
            .inner
            .current
            .get(&writer.event_type)
            .ok_or_else(|| CodecError::UnknownEventType(writer.event_type.clone()))?;
        let mut body = &payload[HEADER_LEN..];
        let builder = GenericDatumReader::builder(&writer.schema);
        let value = if Arc::ptr_eq(&writer, reader) {
            builder.build().and_then(|r| r.read_value(&mut body))
        } else {
            builder
                .reader_schema(&reader.schema)
                .build()
                .and_then(|r| r.read_value(&mut body))
        }
        .map_err(avro)?;
        if !body.is_empty() {
            return Err(CodecError::Avro(format!(
                "{} bytes left over after the body",
                body.len()
            )));
        }
        Ok((writer.event_type.clone(), value))
    }

    /// [`decode`](Self::decode), learning a writer schema this code does not know from
    /// the registry table in `pool` first (an event another version of the service
    /// wrote): what a reader of the store uses.
    pub async fn decode_learning<E: WireEvent>(
        &self,
        pool: &PgPool,
        payload: &[u8],
    ) -> Result<E, CodecError> {
        match self.decode(payload) {
            Err(CodecError::UnknownFingerprint(fingerprint)) => {
                self.learn(pool, fingerprint).await?;
                self.decode(payload)
            }
            other => other,
        }
    }

    /// Decodes a payload into its event type and its data as JSON (in the current
    /// schema of its type), learning a writer schema this code does not know from the
    /// registry table in `pool` first: what operator tools show.
    pub async fn decode_json(
        &self,
        pool: &PgPool,
        payload: &[u8],
    ) -> Result<(String, serde_json::Value), CodecError> {
        let decoded = match self.decode_value(payload) {
            Err(CodecError::UnknownFingerprint(fingerprint)) => {
                self.learn(pool, fingerprint).await?;
                self.decode_value(payload)
            }
            other => other,
        };
        let (event_type, value) = decoded?;
        let json = serde_json::Value::try_from(value).map_err(avro)?;
        Ok((event_type, json))
    }

    fn read_known(&self) -> std::sync::RwLockReadGuard<'_, HashMap<i64, Arc<KnownSchema>>> {
        self.inner
            .by_fingerprint
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The fingerprint in a single-object header.
pub fn read_fingerprint(payload: &[u8]) -> Result<i64, CodecError> {
    if payload.len() < HEADER_LEN || payload[..2] != MAGIC {
        return Err(CodecError::NotSingleObject);
    }
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&payload[2..HEADER_LEN]);
    Ok(i64::from_le_bytes(bytes))
}

/// The CRC-64-AVRO fingerprint of a schema's parsing canonical form, as a signed
/// integer (the form Java's `SchemaNormalization.parsingFingerprint64` gives).
pub fn fingerprint(schema: &Schema) -> i64 {
    let bytes = schema.fingerprint::<Rabin>().bytes;
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[..8]);
    i64::from_le_bytes(le)
}

fn avro(error: apache_avro::Error) -> CodecError {
    CodecError::Avro(error.to_string())
}

#[cfg(test)]
mod tests {
    use domain::order::{OrderEvent, OrderLine};
    use uuid::Uuid;

    use super::*;

    fn placed() -> OrderEvent {
        OrderEvent::OrderPlaced {
            order_id: Uuid::from_u128(1),
            customer_id: Uuid::from_u128(2),
            lines: vec![OrderLine {
                sku: "SKU-1".into(),
                quantity: 3,
                unit_price_cents: 250,
            }],
            total_cents: 750,
            currency: "USD".into(),
            card_token: "tok_visa".into(),
        }
    }

    #[test]
    fn encoding_frames_the_body_with_magic_and_fingerprint() {
        let registry = SchemaRegistry::builtin().unwrap();
        let encoded = registry.encode(&placed()).unwrap();
        assert_eq!(&encoded.payload[..2], &MAGIC);
        assert_eq!(
            read_fingerprint(&encoded.payload).unwrap(),
            encoded.fingerprint
        );
        assert_eq!(
            registry.describe(encoded.fingerprint),
            Some(("OrderPlaced".into(), 3))
        );
        let decoded: OrderEvent = registry.decode(&encoded.payload).unwrap();
        assert_eq!(decoded, placed());
    }

    #[test]
    fn a_v1_event_loads_under_v2_code_with_the_default_currency() {
        // Write exactly as the v1 code did: the v1 schema, the v1 fields, its fingerprint.
        let v1_file = SCHEMA_FILES
            .iter()
            .find(|f| f.event_type == "OrderPlaced" && f.version == 1)
            .unwrap();
        let v1 = Schema::parse_str(v1_file.text).unwrap();
        let mut record = apache_avro::types::Record::new(&v1).unwrap();
        record.put("order_id", Uuid::from_u128(1).to_string());
        record.put("customer_id", Uuid::from_u128(2).to_string());
        let line = apache_avro::types::Value::Record(vec![
            ("sku".into(), "SKU-1".into()),
            ("quantity".into(), apache_avro::types::Value::Long(3)),
            (
                "unit_price_cents".into(),
                apache_avro::types::Value::Long(250),
            ),
        ]);
        record.put("lines", apache_avro::types::Value::Array(vec![line]));
        record.put("total_cents", apache_avro::types::Value::Long(750));
        let mut payload = MAGIC.to_vec();
        payload.extend_from_slice(&fingerprint(&v1).to_le_bytes());
        GenericDatumWriter::builder(&v1)
            .build()
            .unwrap()
            .write_value(&mut payload, record)
            .unwrap();

        let registry = SchemaRegistry::builtin().unwrap();
        assert_ne!(
            Some(fingerprint(&v1)),
            registry.current_fingerprint("OrderPlaced")
        );
        let decoded: OrderEvent = registry.decode(&payload).unwrap();
        let OrderEvent::OrderPlaced { currency, .. } = &decoded else {
            panic!("decoded {decoded:?}");
        };
        assert_eq!(currency, "EUR");
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        let registry = SchemaRegistry::builtin().unwrap();
        for payload in [
            &b""[..],
            &b"\xC3\x01"[..],
            &b"not avro at all"[..],
            &[0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3][..],
        ] {
            assert!(registry.decode::<OrderEvent>(payload).is_err());
        }
        let mut truncated = registry.encode(&placed()).unwrap().payload;
        truncated.truncate(truncated.len() - 3);
        assert!(registry.decode::<OrderEvent>(&truncated).is_err());
    }
}
