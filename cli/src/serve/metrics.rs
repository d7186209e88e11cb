//! Prometheus text exposition of what an operator watches: requests by outcome, tokens, queue depth and
//! latency histograms. Plain counters behind one mutex: a scrape or an update costs microseconds.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency buckets: from a cached-prompt first token to a long reply.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Cumulative count per bucket of `BUCKETS`.
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// (endpoint, status) -> count.
    requests: BTreeMap<(String, u16), u64>,
    /// finish reason -> count of completions.
    finished: BTreeMap<String, u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    request_seconds: Histogram,
    ttft_seconds: Histogram,
    queue_seconds: Histogram,
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Gauges read from the scheduler at scrape time.
pub struct Gauges {
    pub running: usize,
    pub queued: usize,
    /// `--max-concurrent` and `--max-queue`: the capacity `running` and `queued` are measured against.
    pub max_running: usize,
    pub max_queued: usize,
    pub ready: bool,
    /// Set from SIGTERM until exit.
    pub draining: bool,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic while holding the lock leaves plain counters, still fine to read and update.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut inner)
    }

    pub fn count_request(&self, endpoint: &str, status: u16) {
        self.with(|m| {
            *m.requests
                .entry((endpoint.to_string(), status))
                .or_default() += 1
        });
    }

    pub fn observe_queue_wait(&self, seconds: f64) {
        self.with(|m| m.queue_seconds.observe(seconds));
    }

    /// A generation that ran: its tokens, how it ended and how long it took.
    pub fn observe_generation(
        &self,
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: &str,
        ttft_seconds: Option<f64>,
        total_seconds: f64,
    ) {
        self.with(|m| {
            m.prompt_tokens += prompt_tokens as u64;
            m.completion_tokens += completion_tokens as u64;
            *m.finished.entry(finish_reason.to_string()).or_default() += 1;
            if let Some(ttft) = ttft_seconds {
                m.ttft_seconds.observe(ttft);
            }
            m.request_seconds.observe(total_seconds);
        });
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        self.with(|m| {
            header(
                &mut out,
                "llama3v_requests_total",
                "counter",
                "HTTP requests by endpoint and status.",
            );
            for ((endpoint, status), count) in &m.requests {
                let _ = writeln!(
                    out,
                    "llama3v_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {count}"
                );
            }
            header(
                &mut out,
                "llama3v_completions_total",
                "counter",
                "Generations by finish reason (cancelled: the client went away or the server shut \
                 down).",
            );
            for (reason, count) in &m.finished {
                let _ = writeln!(
                    out,
                    "llama3v_completions_total{{finish_reason=\"{reason}\"}} {count}"
                );
            }
            single(
                &mut out,
                "llama3v_prompt_tokens_total",
                "counter",
                "Prompt tokens processed.",
                m.prompt_tokens,
            );
            single(
                &mut out,
                "llama3v_completion_tokens_total",
                "counter",
                "Tokens generated.",
                m.completion_tokens,
            );
            m.request_seconds.render(
                &mut out,
                "llama3v_request_duration_seconds",
                "Time from admission to the end of generation.",
            );
            m.ttft_seconds.render(
                &mut out,
                "llama3v_time_to_first_token_seconds",
                "Time from admission to the first generated token.",
            );
            m.queue_seconds.render(
                &mut out,
                "llama3v_queue_wait_seconds",
                "Time a request waited for a generation slot.",
            );
        });
        single(
            &mut out,
            "llama3v_requests_running",
            "gauge",
            "Generations running now.",
            gauges.running,
        );
        single(
            &mut out,
            "llama3v_queue_depth",
            "gauge",
            "Requests waiting for a generation slot.",
            gauges.queued,
        );
        single(
            &mut out,
            "llama3v_max_concurrent",
            "gauge",
            "Generations that may run at once (--max-concurrent): the capacity llama3v_requests_running \
             is measured against; an autoscaler's target per replica.",
            gauges.max_running,
        );
        single(
            &mut out,
            "llama3v_max_queue",
            "gauge",
            "Requests that may wait (--max-queue); beyond running plus these, requests get 429.",
            gauges.max_queued,
        );
        single(
            &mut out,
            "llama3v_ready",
            "gauge",
            "1 once the model is loaded.",
            u8::from(gauges.ready),
        );
        single(
            &mut out,
            "llama3v_draining",
            "gauge",
            "1 after SIGTERM/SIGINT while in-flight requests finish (new ones get 503).",
            u8::from(gauges.draining),
        );
        out
    }
}

/// A metric's `# HELP` and `# TYPE` lines.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A metric with one unlabelled value.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.003);
        h.observe(0.3);
        h.observe(500.0);
        assert_eq!(h.counts[0], 1, "le=0.005");
        assert_eq!(h.counts[6], 2, "le=0.5");
        assert_eq!(h.counts[BUCKETS.len() - 1], 2, "le=120");
        assert_eq!(h.count, 3);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
    }
}
