//! Options every command that loads a model shares.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use llama3v::ep::ProviderList;
use llama3v::graph::SessionOptions;
use llama3v::manifest::LoadOptions;
use llama3v::{Model, ModelOptions};

/// Where `--model` points when it is not given: `$LLAMA3V_MODEL`, else `models/default` (made by setup).
pub const DEFAULT_MODEL_ENV: &str = "LLAMA3V_MODEL";
pub const DEFAULT_MODEL_DIR: &str = "models/default";

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory written by llama3v-export [default: $LLAMA3V_MODEL or models/default]
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Execution providers in order of preference, e.g. cpu, cuda, tensorrt,cuda,cpu
    #[arg(long, default_value = "cpu")]
    pub ep: String,
    /// Intra-op threads for ONNX Runtime [default: all cores]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Skip the sha256 check of the graph files (for large models verified at deploy time)
    #[arg(long)]
    pub no_verify_hashes: bool,
}

impl ModelArgs {
    pub fn model_dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(|| {
            std::env::var_os(DEFAULT_MODEL_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR))
        })
    }

    pub fn load(&self) -> Result<Model> {
        let dir = self.model_dir();
        let providers: ProviderList = self.ep.parse().context("--ep")?;
        let options = ModelOptions {
            session: SessionOptions {
                providers,
                threads: self.threads,
            },
            load: LoadOptions {
                verify_hashes: !self.no_verify_hashes,
            },
        };
        let model = Model::load(&dir, &options)
            .with_context(|| format!("loading model {}", dir.display()))?;
        for graph in model.graphs() {
            for warning in &graph.providers.warnings {
                eprintln!("warning: {}: {warning}", graph.name);
            }
        }
        Ok(model)
    }
}
