//! Each job's last log lines, for the dashboard: a `tracing` layer that keeps, per job, the
//! last [`LINES`] events logged inside its `job` span (the span a job's thread runs in),
//! each cut to [`LINE_MAX`] bytes.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Lines kept per job.
pub const LINES: usize = 20;
/// Bytes kept of a line.
pub const LINE_MAX: usize = 300;

static LOGS: Mutex<BTreeMap<String, VecDeque<String>>> = Mutex::new(BTreeMap::new());

/// The job a span belongs to, kept in the span's extensions.
struct JobName(String);

/// Reads a span's `name` field, or an event's message and fields.
#[derive(Default)]
struct Text {
    name: Option<String>,
    line: String,
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "name" => self.name = Some(format!("{value:?}")),
            "message" => {
                let _ = write!(self.line, "{value:?}");
            }
            other => {
                let _ = write!(self.line, " {other}={value:?}");
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "name" => self.name = Some(value.to_string()),
            "message" => self.line.push_str(value),
            other => {
                let _ = write!(self.line, " {other}={value}");
            }
        }
    }
}

/// The layer; add it to the subscriber (`layerwise` does, for every command).
pub struct JobLog;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for JobLog {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "job" {
            return;
        }
        let mut text = Text::default();
        attrs.record(&mut text);
        if let (Some(name), Some(span)) = (text.name, ctx.span(id)) {
            span.extensions_mut().insert(JobName(name));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else { return };
        let Some(job) = scope.from_root().find_map(|s| s.extensions().get::<JobName>().map(|j| j.0.clone())) else {
            return;
        };
        let mut text = Text::default();
        event.record(&mut text);
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
        let mut line = format!("{h:02}:{m:02}:{s:02} {:<5} {}", event.metadata().level(), text.line);
        if line.len() > LINE_MAX {
            let cut = (0..=LINE_MAX).rev().find(|&i| line.is_char_boundary(i)).unwrap_or(0);
            line.truncate(cut);
            line.push('…');
        }
        let mut logs = LOGS.lock().unwrap_or_else(|p| p.into_inner());
        let lines = logs.entry(job).or_default();
        if lines.len() == LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }
}

/// The last lines logged in job `name`'s span, oldest first.
pub fn lines(name: &str) -> Vec<String> {
    LOGS.lock().unwrap_or_else(|p| p.into_inner()).get(name).map_or(vec![], |l| l.iter().cloned().collect())
}
