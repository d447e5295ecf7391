//! `orderflow replay` throughput: rebuilding the stock-levels read model from a store of
//! BENCH_EVENTS events (default 100,000: 1,000 SKUs, each created and then added to 99
//! times), next to the ceiling, a plain paged `SELECT` of the same rows (no decoding,
//! no writes). Run as alternating pairs, BENCH_REPEATS of them (default 3); prints
//! markdown rows with the CPU steal seen during each pair.
//!
//! `cargo bench -p tests --bench replay`

use std::time::Instant;

use domain::inventory::StockEvent;
use eventstore::{EventStore, ExpectedVersion, Metadata, NewEvent};
use tests::TestDb;
use tests::bench::{cpu_times, env_or, median, steal_share};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Rows per page, for the ceiling as for the rebuild.
const PAGE: i64 = 2_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: usize = env_or("BENCH_EVENTS", 100_000);
    let repeats: usize = env_or("BENCH_REPEATS", 3);
    let db = TestDb::new(4).await?;
    let store = db.store();
    fill(&store, events).await?;
    sqlx::query("VACUUM ANALYZE events")
        .execute(&db.pool)
        .await?;
    println!("replay benchmark: {events} events, stock-levels, {repeats} pairs");
    println!();
    println!("| run | plain SELECT events/s | rebuild events/s | rebuild / ceiling | steal |");
    println!("|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for run in 1..=repeats {
        let before = cpu_times();
        let ceiling = plain_select(&db).await?;
        let rebuild = rebuild(&db).await?;
        let steal = steal_share(before, cpu_times());
        ratios.push(rebuild / ceiling);
        println!(
            "| {run} | {ceiling:.0} | {rebuild:.0} | {:.2} | {:.1} % |",
            rebuild / ceiling,
            steal * 100.0
        );
    }
    println!("\nmedian rebuild/ceiling: {:.2}", median(ratios));
    Ok(())
}

/// `count` events over 1,000 SKU streams, 100 per append.
async fn fill(store: &EventStore, count: usize) -> anyhow::Result<()> {
    let registry = TestDb::registry();
    let per_stream = count.div_ceil(1_000);
    for i in 0..count.div_ceil(per_stream) {
        let sku = format!("BENCH-{i:04}");
        let size = per_stream.min(count - i * per_stream);
        let events = (0..size)
            .map(|n| {
                let event = if n == 0 {
                    StockEvent::StockItemCreated {
                        sku: sku.clone(),
                        name: "bench item".to_owned(),
                    }
                } else {
                    StockEvent::StockAdded {
                        sku: sku.clone(),
                        quantity: 1,
                    }
                };
                let metadata = Metadata::new(Uuid::now_v7(), Uuid::now_v7());
                Ok(NewEvent::new(registry.encode(&event)?, metadata))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        store
            .append(&format!("stock-{sku}"), ExpectedVersion::NoStream, &events)
            .await?;
    }
    Ok(())
}

/// Reads every event row in pages, as the rebuild does, and does nothing with them.
async fn plain_select(db: &TestDb) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut after = 0_i64;
    let mut rows = 0;
    loop {
        let page: Vec<(i64, String, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT global_position, stream_id, stream_version, payload FROM events \
             WHERE global_position > $1 ORDER BY global_position LIMIT $2",
        )
        .bind(after)
        .bind(PAGE)
        .fetch_all(&db.pool)
        .await?;
        let Some(last) = page.last() else { break };
        after = last.0;
        rows += page.len();
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

async fn rebuild(db: &TestDb) -> anyhow::Result<f64> {
    let rebuilt = projections::rebuild::rebuild(
        "stock-levels",
        &db.pool,
        &TestDb::registry(),
        0,
        |_| {},
        &CancellationToken::new(),
    )
    .await?;
    Ok(rebuilt.events as f64 / rebuilt.seconds)
}
