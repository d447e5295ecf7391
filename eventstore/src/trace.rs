//! W3C trace context: the `traceparent` one request's messages carry, so one order's
//! work forms one trace across HTTP, the store, RabbitMQ and every service.
//!
//! A [`TraceParent`] is stored with each event and outbox command and travels in the
//! AMQP headers. Where work starts (an HTTP request, a consumed message, an event a
//! subscription applies), [`continue_trace`] makes the new span a child of it. When
//! an OpenTelemetry layer is installed, spans that declare an `otel.kind` field are
//! exported and [`current`] names the span that is running; without one, nothing is
//! exported and the context a message arrived with is passed on unchanged, so a trace
//! id still joins the log lines of every hop.

use std::fmt;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

/// The header (HTTP and AMQP) that carries a [`TraceParent`].
pub const TRACEPARENT: &str = "traceparent";
/// The header with vendors' trace state, passed on where a span continues a request.
pub const TRACESTATE: &str = "tracestate";

/// Which trace a piece of work belongs to and the span that caused it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: TraceId,
    /// The span that caused this work: the parent of the next span.
    pub span_id: SpanId,
    pub flags: TraceFlags,
}

impl TraceParent {
    /// A new trace, sampled: for work that arrived with none. The ids come from
    /// UUIDv7s, whose right-most bytes are random as W3C asks.
    pub fn root() -> TraceParent {
        let span = Uuid::now_v7().as_u128() as u64;
        TraceParent {
            trace_id: TraceId::from(Uuid::now_v7().as_u128()),
            span_id: SpanId::from(span.max(1)),
            flags: TraceFlags::SAMPLED,
        }
    }

    /// Reads a `traceparent` header value; `None` for anything W3C says to ignore
    /// (a wrong length, upper-case or non-hex digits, all-zero ids, version `ff`).
    pub fn parse(text: &str) -> Option<TraceParent> {
        let text = text.trim();
        let mut parts = text.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; a later version may append more.
        if version.len() != 2
            || version == "ff"
            || (version == "00" && parts.next().is_some())
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let hex = |field: &str| {
            field
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if ![version, trace, span, flags].into_iter().all(hex) {
            return None;
        }
        let trace_id = TraceId::from(u128::from_str_radix(trace, 16).ok()?);
        let span_id = SpanId::from(u64::from_str_radix(span, 16).ok()?);
        let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
        (trace_id != TraceId::INVALID && span_id != SpanId::INVALID).then_some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    fn of(context: &SpanContext) -> Option<TraceParent> {
        context.is_valid().then(|| TraceParent {
            trace_id: context.trace_id(),
            span_id: context.span_id(),
            flags: context.trace_flags(),
        })
    }

    fn remote(self, state: TraceState) -> SpanContext {
        SpanContext::new(self.trace_id, self.span_id, self.flags, true, state)
    }

    /// The OpenTelemetry context whose span is this one: what a link points at.
    pub fn span_context(self) -> SpanContext {
        self.remote(TraceState::NONE)
    }
}

/// The header value: `00-<trace id>-<span id>-<flags>`.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            self.flags.to_u8()
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A row's `traceparent` column (events, outbox, sagas, notifications): text, NULL for
/// an untraced writer. A value that does not parse (written by hand) is none rather
/// than a failed read.
pub fn stored(row: &sqlx::postgres::PgRow) -> Result<Option<TraceParent>, sqlx::Error> {
    use sqlx::Row;
    let text: Option<&str> = row.try_get("traceparent")?;
    Ok(text.and_then(TraceParent::parse))
}

/// The exported span running now, if an OpenTelemetry layer is installed and one is:
/// what a message written now names as its cause.
pub fn current() -> Option<TraceParent> {
    TraceParent::of(opentelemetry::Context::current().span().span_context())
}

/// What a message written now carries: the running span, or else (nothing exported)
/// the context the work arrived with.
pub fn outgoing(arrived_with: Option<TraceParent>) -> Option<TraceParent> {
    current().or(arrived_with)
}

/// Makes `span` continue `parent` (the context work arrived with, if any) and records
/// its `trace_id` field. Returns the context the work runs in: `span`'s own when it is
/// exported; otherwise `parent`, or a new trace when there was none, so that log lines
/// can always be joined by trace id.
pub fn continue_trace(
    span: &tracing::Span,
    parent: Option<TraceParent>,
    state: Option<&str>,
) -> TraceParent {
    if let Some(parent) = parent {
        let state = state
            .and_then(|state| state.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = opentelemetry::Context::new().with_remote_span_context(parent.remote(state));
        // Fails only when no OpenTelemetry layer sees the span: nothing to continue.
        let _ = span.set_parent(context);
    }
    running(span, parent)
}

/// Records `span`'s `trace_id`: its own trace when exported, else `parent`'s (or a
/// new one). For a span whose enclosing span already continues `parent`.
fn running(span: &tracing::Span, parent: Option<TraceParent>) -> TraceParent {
    let running = TraceParent::of(span.context().span().span_context())
        .or(parent)
        .unwrap_or_else(TraceParent::root);
    span.record("trace_id", tracing::field::display(running.trace_id));
    running
}

/// Makes `span`, which serves several pieces of work at once (one transaction for a
/// batch of messages), continue the trace of a lone one and link to each of many, so
/// it shows up in every trace it served.
pub fn serve_all(span: &tracing::Span, parents: &[Option<TraceParent>]) {
    match parents {
        [one] => {
            continue_trace(span, *one, None);
        }
        many => {
            for parent in many.iter().flatten() {
                span.add_link(parent.span_context());
            }
        }
    }
}

/// The span one message or event is handled in, with the ids every log line written
/// meanwhile is joined by: a child of the span that sent or wrote it (`parent`), or,
/// when it was `alone` in its transaction, of the transaction's span, which continues
/// `parent` already.
pub fn handling(
    message_type: &str,
    message_id: Uuid,
    stream_id: &str,
    correlation_id: Uuid,
    parent: Option<TraceParent>,
    alone: bool,
) -> tracing::Span {
    let span = tracing::info_span!(
        "handle",
        otel.kind = "consumer",
        otel.name = message_type,
        messaging.message.id = %message_id,
        stream_id,
        correlation_id = %correlation_id,
        trace_id = tracing::field::Empty,
    );
    if alone {
        running(&span, parent);
    } else {
        continue_trace(&span, parent, None);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_survives_its_header_text() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(text).expect("valid");
        assert_eq!(parsed.to_string(), text);
        assert!(parsed.flags.is_sampled());
        let root = TraceParent::root();
        assert_eq!(TraceParent::parse(&root.to_string()), Some(root));
    }

    #[test]
    fn what_w3c_says_to_ignore_is_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version may add fields; its first four are read.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        assert!(TraceParent::parse(later).is_some());
    }

    #[test]
    fn without_an_exporter_work_continues_the_trace_it_arrived_with() {
        let parent = TraceParent::root();
        let span = tracing::info_span!("work", trace_id = tracing::field::Empty);
        assert_eq!(continue_trace(&span, Some(parent), None), parent);
        assert_eq!(outgoing(Some(parent)), Some(parent));
        assert_ne!(continue_trace(&span, None, None), parent, "a new trace");
    }
}
