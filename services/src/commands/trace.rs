//! `orderflow trace`: an order's causal chain, from the stores (no collector needed).

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;

use services::config::Config;
use services::ops::{self, Link};
use uuid::Uuid;

use super::json_line;

pub(crate) async fn trace(config: &Config, order_id: Uuid, json: bool) -> anyhow::Result<ExitCode> {
    let trace = ops::trace(config, order_id).await?;
    if json {
        json_line(&trace)?;
    } else {
        let correlations: Vec<String> = trace.correlation_ids.iter().map(Uuid::to_string).collect();
        println!(
            "order {order_id}: {} links, correlation {}",
            trace.links.len(),
            correlations.join(", ")
        );
        let ids: HashSet<Uuid> = trace.links.iter().map(|link| link.id).collect();
        let mut children: HashMap<Uuid, Vec<&Link>> = HashMap::new();
        let mut roots = Vec::new();
        for link in &trace.links {
            match link.causation_id.filter(|cause| ids.contains(cause)) {
                Some(cause) => children.entry(cause).or_default().push(link),
                None => roots.push(link),
            }
        }
        for root in roots {
            print_link(root, &children, 1, true);
        }
    }
    for gap in &trace.gaps {
        eprintln!("orderflow: partial trace, {gap}");
    }
    Ok(ExitCode::SUCCESS)
}

/// One link and, indented below it, what it caused.
fn print_link(link: &Link, children: &HashMap<Uuid, Vec<&Link>>, depth: usize, root: bool) {
    let cause = match (root, link.causation_id) {
        (true, Some(cause)) => format!("  ← {cause}"),
        _ => String::new(),
    };
    let trace = link
        .trace_id
        .as_deref()
        .map(|id| format!("  trace {id}"))
        .unwrap_or_default();
    println!(
        "{}{}  {:<12} {:<12} {:<26} {}  id {}{cause}{trace}",
        "  ".repeat(depth),
        link.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        link.service.name(),
        link.kind,
        link.name,
        link.detail,
        link.id,
    );
    for child in children.get(&link.id).into_iter().flatten() {
        print_link(child, children, depth + 1, false);
    }
}
