//! `llama3v bench`: vision, prefill, time to first token, decode speed, overhead and peak memory on
//! synthetic input.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use llama3v::bench::{BenchConfig, BenchReport};
use llama3v::bench_batch::BatchBenchConfig;

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text tokens of the prefill prompt (random ids; the images' tokens come on top)
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Decode steps timed at each context length
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Random images encoded in one vision run and spliced into the prefill prompt
    #[arg(long, default_value_t = 1)]
    pub images: usize,
    /// Context lengths at which decode is measured, comma-separated (capped at the model's max context)
    #[arg(long, value_delimiter = ',', default_value = "128,2048")]
    pub contexts: Vec<usize>,
    /// Timed repetitions of vision / prefill (after one warm-up)
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Seed of the synthetic token ids and pixels
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Instead: the batch engine under N concurrent clients, for each N given (e.g. 1,4,8,16):
    /// aggregate decode tokens/s, time to first token and inter-token latency percentiles
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub concurrency: Vec<usize>,
    /// The engine's batch limit with --concurrency [default: the concurrency]; 1 decodes one request
    /// at a time, for comparison
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Requests each client sends one after another (with --concurrency)
    #[arg(long, default_value_t = 3)]
    pub requests_per_client: usize,
    /// Every Nth request carries one image (with --concurrency); 0: text only, as the text-only
    /// peers are measured
    #[arg(long, default_value_t = 3)]
    pub image_every: usize,
    /// Print the report as JSON on stdout (progress goes to stderr)
    #[arg(long)]
    pub json: bool,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn opt_mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "?".to_string(), |b| format!("{:.1}", mib(b)))
}

fn print_table(report: &BenchReport) {
    println!("model {} ({})", report.model, report.dtype);
    println!("providers: {}", report.providers.join("; "));
    if let Some(t) = report.threads {
        println!("intra-op threads: {t}");
    }
    println!(
        "vision          {:>10.1} ms/image ({} images in one run: {:.1} ms)",
        report.vision_ms_per_image, report.config.images, report.vision_batch_ms
    );
    println!(
        "prefill         {:>10.1} tokens/s ({} tokens in {:.1} ms)",
        report.prefill_tokens_per_s, report.prefill_tokens, report.prefill_ms
    );
    println!(
        "time to first   {:>10.1} ms (images + prompt + first token)",
        report.ttft_ms
    );
    for d in &report.decode {
        println!(
            "decode @ {:>5}  {:>10.2} tokens/s (step {:.2} ms, ORT run {:.2} ms, overhead {:.0} us = {:.2} %)",
            d.context, d.tokens_per_s, d.step_ms, d.ort_run_ms, d.overhead_us, d.overhead_pct
        );
    }
    if let [short, .., long] = report.decode.as_slice() {
        println!(
            "long/short      {:>10.3} (decode tokens/s at {} over {})",
            long.tokens_per_s / short.tokens_per_s,
            long.context,
            short.context
        );
    }
    println!(
        "memory          peak RSS {} MiB; graph files {:.1} MiB (decoder {:.1} MiB); KV cache {:.1} MiB",
        report
            .peak_rss_bytes
            .map_or_else(|| "?".to_string(), |b| format!("{:.1}", mib(b))),
        mib(report.weight_bytes),
        mib(report.decoder_weight_bytes),
        mib(report.kv_cache_bytes)
    );
    for point in &report.memory {
        println!(
            "  after {:<40} RSS {:>8} MiB, peak so far {:>8} MiB",
            point.phase,
            opt_mib(point.rss_bytes),
            opt_mib(point.peak_rss_bytes)
        );
    }
}

fn run_concurrency(model: &llama3v::Model, args: &BenchArgs) -> Result<ExitCode> {
    let mut reports = Vec::new();
    for &concurrency in &args.concurrency {
        let config = BatchBenchConfig {
            concurrency,
            max_batch: args.max_batch,
            requests_per_client: args.requests_per_client,
            prompt_tokens: (args.prompt_tokens / 4, args.prompt_tokens),
            new_tokens: (args.new_tokens / 2, args.new_tokens * 3 / 2),
            image_every: args.image_every,
            stagger: 2,
            seed: args.seed,
        };
        eprintln!(
            "concurrency {concurrency}: {} requests",
            concurrency * args.requests_per_client
        );
        let report = model.bench_batch(&config).with_context(|| {
            format!(
                "benchmarking {} at concurrency {concurrency}",
                model.dir.display()
            )
        })?;
        if !args.json {
            println!(
                "concurrency {:>3}: {:>8.1} tokens/s aggregate ({} tokens, {} requests, {:.2} s), \
                 mean batch {:.1}, TTFT p50/p95 {:.1}/{:.1} ms, inter-token p50/p95 {:.1}/{:.1} ms, \
                 engine time vision/prefill/decode {:.1}/{:.1}/{:.1} s, peak RSS {} MiB",
                concurrency,
                report.aggregate_tokens_per_s,
                report.generated_tokens,
                report.requests,
                report.wall_s,
                report.mean_batch,
                report.ttft_ms.p50,
                report.ttft_ms.p95,
                report.inter_token_ms.p50,
                report.inter_token_ms.p95,
                report.vision_s,
                report.prefill_s,
                report.decode_s,
                opt_mib(report.peak_rss_bytes)
            );
        }
        reports.push(report);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    let model = args.model.load()?;
    if !args.concurrency.is_empty() {
        return run_concurrency(&model, args);
    }
    let config = BenchConfig {
        prompt_tokens: args.prompt_tokens,
        new_tokens: args.new_tokens,
        images: args.images,
        contexts: args.contexts.clone(),
        repeats: args.repeats,
        seed: args.seed,
    };
    let report = model
        .bench(&config, args.model.threads, &mut |line| eprintln!("{line}"))
        .with_context(|| format!("benchmarking {}", model.dir.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}
