//! Prometheus text exposition of what an operator watches: requests by outcome, tokens, queue depth and
//! latency histograms. Plain counters behind one mutex: a scrape or an update costs microseconds.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use llama3v::engine::{EngineStats, StepReport};

/// Upper bounds (seconds) of the latency buckets: from a cached-prompt first token to a long reply.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Upper bounds of the batch-size buckets (sequences in one decoder run).
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Cumulative count per bucket of `bounds`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&BUCKETS)
    }
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug)]
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
    inter_token_seconds: Histogram,
    batch_rows: Histogram,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            requests: BTreeMap::new(),
            finished: BTreeMap::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            request_seconds: Histogram::default(),
            ttft_seconds: Histogram::default(),
            queue_seconds: Histogram::default(),
            inter_token_seconds: Histogram::default(),
            batch_rows: Histogram::new(&BATCH_BUCKETS),
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Gauges read from the scheduler at scrape time.
pub struct Gauges {
    pub running: usize,
    pub queued: usize,
    /// `--max-batch` and `--max-queue`: the capacity `running` and `queued` are measured against.
    pub max_running: usize,
    pub max_queued: usize,
    pub ready: bool,
    /// Set from SIGTERM until exit.
    pub draining: bool,
    /// The batch engine's state, once the model is loaded.
    pub engine: Option<EngineStats>,
    /// Bytes reserved and the budget, for request bodies and for image decodes (`memory`).
    pub bodies: (u64, u64),
    pub decodes: (u64, u64),
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

    /// One decode step of the batch engine: how many sequences it ran and their inter-token latencies.
    pub fn observe_step(&self, report: &StepReport) {
        self.with(|m| {
            m.batch_rows.observe(report.rows as f64);
            for gap in &report.inter_token {
                m.inter_token_seconds.observe(gap.as_secs_f64());
            }
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
            m.inter_token_seconds.render(
                &mut out,
                "llama3v_inter_token_latency_seconds",
                "Time between two tokens of one sequence (decode steps and the prefill chunks between \
                 them).",
            );
            m.batch_rows.render(
                &mut out,
                "llama3v_batch_size",
                "Sequences in each decoder run of the batch engine.",
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
        if let Some(engine) = &gauges.engine {
            engine_gauges(&mut out, engine);
        }
        single(
            &mut out,
            "llama3v_max_concurrent",
            "gauge",
            "Requests that may run at once (--max-batch, alias --max-concurrent): the capacity \
             llama3v_requests_running is measured against; an autoscaler's target per replica.",
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
        let budgets = [
            ("bodies", "body", gauges.bodies),
            ("decodes", "decode", gauges.decodes),
        ];
        for (budget, flag, (reserved, total)) in budgets {
            single(
                &mut out,
                &format!("llama3v_{budget}_memory_reserved_bytes"),
                "gauge",
                &format!("Bytes reserved from the {budget} memory budget by requests in flight."),
                reserved,
            );
            single(
                &mut out,
                &format!("llama3v_{budget}_memory_budget_bytes"),
                "gauge",
                &format!("The {budget} memory budget (--{flag}-memory)."),
                total,
            );
        }
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

/// The batch engine's gauges: sequences by stage, the batch's capacity and its KV cache against the
/// budget; and its time by phase.
fn engine_gauges(out: &mut String, engine: &EngineStats) {
    single(
        out,
        "llama3v_sequences_decoding",
        "gauge",
        "Sequences in the decoding batch.",
        engine.decoding,
    );
    single(
        out,
        "llama3v_sequences_prefilling",
        "gauge",
        "Sequences whose prompt is being prefilled.",
        engine.prefilling,
    );
    single(
        out,
        "llama3v_sequences_waiting",
        "gauge",
        "Requests waiting in the engine for a batch row or KV budget.",
        engine.waiting,
    );
    let bytes = engine.kv_bytes_per_position;
    single(
        out,
        "llama3v_kv_cache_bytes",
        "gauge",
        "KV cache allocated for the decoding batch (rows x widest row).",
        engine.kv_positions * bytes,
    );
    single(
        out,
        "llama3v_kv_budget_bytes",
        "gauge",
        "KV cache budget (--kv-budget positions).",
        engine.kv_budget * bytes,
    );
    header(
        out,
        "llama3v_engine_seconds_total",
        "counter",
        "Time the engine spent in graph runs, by phase. Vision and prefill are the same work at any \
         batch size: a server whose time goes mostly there gains little from a larger --max-batch.",
    );
    let work = &engine.work;
    for (phase, time) in [
        ("vision", work.vision),
        ("prefill", work.prefill),
        ("decode", work.decode),
    ] {
        let _ = writeln!(
            out,
            "llama3v_engine_seconds_total{{phase=\"{phase}\"}} {}",
            time.as_secs_f64()
        );
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
