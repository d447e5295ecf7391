//! Avro codec micro-benchmarks: encoding an event, decoding it under the schema that
//! wrote it, and decoding a v1 event into the v2 reader schema (resolution).
//!
//!     cargo bench -p eventstore --bench codec

use std::hint::black_box;

use apache_avro::Schema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use criterion::{Criterion, criterion_group, criterion_main};
use domain::order::{OrderEvent, OrderLine};
use domain::wire::{SCHEMA_FILES, WireEvent};
use eventstore::SchemaRegistry;
use uuid::Uuid;

fn placed() -> OrderEvent {
    OrderEvent::OrderPlaced {
        order_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        lines: (0..3)
            .map(|n| OrderLine {
                sku: format!("SKU-{n}"),
                quantity: 2,
                unit_price_cents: 1999,
            })
            .collect(),
        total_cents: 11_994,
        currency: "EUR".into(),
        card_token: "tok_visa".into(),
    }
}

/// An OrderPlaced as the v1 code wrote it (no currency field).
fn v1_payload(registry: &SchemaRegistry) -> Vec<u8> {
    let v1_file = SCHEMA_FILES
        .iter()
        .find(|f| f.event_type == "OrderPlaced" && f.version == 1)
        .expect("v1 schema");
    let v1 = Schema::parse_str(v1_file.text).expect("v1 parses");
    let Value::Record(mut fields) = placed().to_avro().expect("encodes") else {
        unreachable!("events are records");
    };
    fields.retain(|(name, _)| name != "currency");
    let mut payload = vec![0xC3, 0x01];
    payload.extend_from_slice(&eventstore::codec::fingerprint(&v1).to_le_bytes());
    GenericDatumWriter::builder(&v1)
        .build()
        .and_then(|w| w.write_value(&mut payload, Value::Record(fields)))
        .expect("v1 writes");
    assert!(registry.decode::<OrderEvent>(&payload).is_ok());
    payload
}

fn codec(c: &mut Criterion) {
    let registry = SchemaRegistry::builtin().expect("schemas parse");
    let event = placed();
    let current = registry.encode(&event).expect("encodes").payload;
    let old = v1_payload(&registry);

    c.bench_function("encode OrderPlaced (3 lines)", |b| {
        b.iter(|| registry.encode(black_box(&event)).expect("encodes"))
    });
    c.bench_function("decode OrderPlaced, same version", |b| {
        b.iter(|| {
            registry
                .decode::<OrderEvent>(black_box(&current))
                .expect("decodes")
        })
    });
    c.bench_function("decode OrderPlaced v1 into v2", |b| {
        b.iter(|| {
            registry
                .decode::<OrderEvent>(black_box(&old))
                .expect("decodes")
        })
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
