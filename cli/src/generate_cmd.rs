//! `llama3v generate`: one reply, streamed to stdout, or one JSON object with `--json`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use llama3v::generate::Request;
use llama3v::manifest::{LoadOptions, Manifest};
use llama3v::preprocess::{read_image_file, DecodeLimits};
use llama3v::request::{check_image_count, resolve_sampling, single_turn, SamplingRequest};
use llama3v::request_limits::{load_images, EncodedImage, RequestLimits};
use serde_json::json;

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image file (PNG, JPEG, WebP, GIF, BMP); repeat for several images, placed before the prompt
    #[arg(long, short = 'i')]
    pub image: Vec<PathBuf>,
    /// The user's question
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Optional system prompt
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate, at least 1 (as serve's max_tokens)
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_new_tokens: u32,
    /// 0 = greedy [default: the model's generation_config]
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep only the K most likely tokens [default: the model's generation_config, else 50 when sampling]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling, in (0, 1] [default: the model's generation_config, else off]
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Penalty on tokens already seen, 1 = off [default: the model's generation_config, else 1]
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed for reproducible sampling
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating through stop tokens until --max-new-tokens
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (text, tokens, prompt_tokens, timings) instead of streaming text
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &GenerateArgs) -> Result<ExitCode> {
    let decode_limits = DecodeLimits::default();
    let request_limits = RequestLimits::default();
    // Files are read (regular files only, size-capped) before the model loads, to fail fast.
    let encoded = args
        .image
        .iter()
        .map(|path| {
            Ok(EncodedImage {
                name: path.display().to_string(),
                bytes: read_image_file(path, &decode_limits)?,
            })
        })
        .collect::<Result<Vec<_>, llama3v::Error>>()?;
    let messages = single_turn(args.system.as_deref(), encoded.len(), &args.prompt);
    request_limits.check_prompt(&messages)?;

    // Images are decoded before the model loads (which hashes every graph file), so a bad image fails
    // fast; the size they are decoded to comes from the manifest alone.
    let dir = args.model.model_dir();
    let manifest = Manifest::load(
        &dir,
        LoadOptions {
            verify_hashes: false,
        },
    )?;
    let checked = request_limits.check_images(encoded, &decode_limits)?;
    let images = load_images(checked, &decode_limits, manifest.image_size(), &mut || {
        Ok(())
    })?;
    let model = args.model.load()?;
    check_image_count(&model, images.len())?;
    let sampling = resolve_sampling(
        &SamplingRequest {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        &model.manifest.generation,
    )?;
    let request = Request {
        messages: &messages,
        images: &images,
        max_new_tokens: args.max_new_tokens as usize,
        sampling,
        ignore_stop: args.ignore_eos,
    };

    let stdout = std::io::stdout();
    let generation = if args.json {
        model.generate(&request, &mut |_| {})?
    } else {
        let mut out = stdout.lock();
        let generation = model.generate(&request, &mut |piece| {
            // A closed stdout (e.g. `| head`) must not abort generation with a panic.
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
        generation
    };
    if args.json {
        let providers: Vec<String> = model
            .graphs()
            .iter()
            .map(|g| g.provider_summary())
            .collect();
        let value = json!({
            "text": generation.text,
            "tokens": generation.tokens,
            "prompt_tokens": generation.prompt_tokens,
            "finish_reason": generation.finish_reason,
            "timings": generation.timings,
            "providers": providers,
        });
        println!(
            "{}",
            serde_json::to_string(&value).context("encoding JSON")?
        );
    }
    Ok(ExitCode::SUCCESS)
}
