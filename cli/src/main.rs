//! `llama3v`: generate, check against the reference, inspect, tokenize and preprocess.

mod bench_cmd;
mod check_cmd;
mod generate_cmd;
mod inspect_cmd;
mod model_args;
mod preprocess_cmd;
mod serve;
mod tokenize_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "llama3v",
    version,
    about = "Run llama3v vision-language models exported to ONNX"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt about zero or more images, streaming the reply.
    Generate(generate_cmd::GenerateArgs),
    /// Compare the runtime with the transformers reference stored in the model directory.
    Check(check_cmd::CheckArgs),
    /// Show the manifest summary and each graph's inputs, outputs and execution providers.
    Inspect(inspect_cmd::InspectArgs),
    /// Tokenize text or render and tokenize a chat (no graphs are loaded).
    Tokenize(tokenize_cmd::TokenizeArgs),
    /// Write one image's pixel_values (.npy) as the vision graph would receive them.
    Preprocess(preprocess_cmd::PreprocessArgs),
    /// Measure vision, prefill, time to first token, decode speed and memory on synthetic input.
    Bench(bench_cmd::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat completions with images, streaming).
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(args) => generate_cmd::run(args),
        Command::Check(args) => check_cmd::run(args),
        Command::Inspect(args) => inspect_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Tokenize(args) => tokenize_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::Preprocess(args) => preprocess_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes joined by ": ", as `{:#}` writes them, leaving out a cause whose text is
/// already there: the library's errors keep their source (an `ort` or I/O error) and also name it in
/// their own message.
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}
