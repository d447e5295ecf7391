//! Avro decoding of events and commands as a consumer meets them: any bytes as a
//! payload, then the domain type built from the decoded value. Besides raw input,
//! the first byte picks one of the schemas this code reads (every version of every
//! type) and the rest becomes a body written with it, so the fuzzer explores what
//! each schema's reader, and resolution from older writer versions, does with it.
//! Finding: a panic, a stack overflow or an allocation beyond libFuzzer's limit.
#![no_main]

use std::sync::LazyLock;

use domain::inventory::{StockEvent, StockRequest};
use domain::order::OrderEvent;
use domain::payment::{PaymentEvent, PaymentRequest};
use domain::user::UserEvent;
use domain::wire::WireEvent;
use eventstore::SchemaRegistry;
use libfuzzer_sys::fuzz_target;

static REGISTRY: LazyLock<(SchemaRegistry, Vec<i64>)> = LazyLock::new(|| {
    let registry = SchemaRegistry::builtin().expect("the built-in schemas load");
    let fingerprints = registry.fingerprints();
    (registry, fingerprints)
});

fuzz_target!(|data: &[u8]| {
    let (registry, fingerprints) = &*REGISTRY;
    decode(registry, data);
    if let Some((&pick, body)) = data.split_first() {
        let fingerprint = fingerprints[usize::from(pick) % fingerprints.len()];
        let mut payload = vec![0xC3, 0x01];
        payload.extend_from_slice(&fingerprint.to_le_bytes());
        payload.extend_from_slice(body);
        decode(registry, &payload);
    }
});

fn decode(registry: &SchemaRegistry, payload: &[u8]) {
    let Ok((event_type, value)) = registry.decode_value(payload) else {
        return;
    };
    let _ = OrderEvent::from_avro(&event_type, &value);
    let _ = StockEvent::from_avro(&event_type, &value);
    let _ = StockRequest::from_avro(&event_type, &value);
    let _ = PaymentEvent::from_avro(&event_type, &value);
    let _ = PaymentRequest::from_avro(&event_type, &value);
    let _ = UserEvent::from_avro(&event_type, &value);
}
