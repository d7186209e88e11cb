//! Options every command that loads a model shares.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use llama3v::ep::ProviderList;
use llama3v::ep_config::EpOptions;
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
    /// Execution providers in order of preference, e.g. cpu, cuda, tensorrt,cuda,cpu: a provider that
    /// cannot run is an error unless a later one is named [default: the config's providers, else cpu]
    #[arg(long)]
    pub ep: Option<String>,
    /// Execution-provider options file (TOML, or JSON by its .json extension); see
    /// docs/EXECUTION_PROVIDERS.md
    #[arg(long, value_name = "FILE")]
    pub ep_config: Option<PathBuf>,
    /// One provider option, applied after --ep-config, e.g. tensorrt.fp16=true, device_id=1,
    /// cuda.memory_limit=20GiB, limits.max_context=4096 (repeatable)
    #[arg(long, value_name = "KEY=VALUE")]
    pub ep_option: Vec<String>,
    /// Intra-op threads for ONNX Runtime, 1 up to the number of cores [default: all cores]
    #[arg(long, value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Skip the sha256 check of the graph files (for large models verified at deploy time)
    #[arg(long)]
    pub no_verify_hashes: bool,
}

/// More intra-op threads than cores only makes them wait for each other; far more exhausts the
/// process's threads.
pub fn parse_threads(value: &str) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=cores).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a number of threads from 1 to {cores} (this machine's cores), got {value:?}"
        )),
    }
}

impl ModelArgs {
    pub fn model_dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(|| {
            std::env::var_os(DEFAULT_MODEL_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR))
        })
    }

    /// The provider options from --ep-config and --ep-option, and the provider list (--ep wins over the
    /// config's `providers`).
    pub fn provider_options(&self) -> Result<(ProviderList, EpOptions)> {
        let mut options = EpOptions::default();
        if let Some(path) = &self.ep_config {
            options.apply_file(path).context("--ep-config")?;
        }
        for arg in &self.ep_option {
            options.apply_arg(arg).context("--ep-option")?;
        }
        let providers = match &self.ep {
            Some(list) => list.parse().context("--ep")?,
            None => options.providers.clone().unwrap_or_else(ProviderList::cpu),
        };
        Ok((providers, options))
    }

    /// The same model options on another provider list (`check --against`).
    pub fn with_ep(&self, ep: &str) -> ModelArgs {
        ModelArgs {
            ep: Some(ep.to_string()),
            ..self.clone()
        }
    }

    pub fn load(&self) -> Result<Model> {
        let dir = self.model_dir();
        let (providers, ep) = self.provider_options()?;
        let uses_gpu = providers.uses_gpu();
        let options = ModelOptions {
            session: SessionOptions {
                providers,
                threads: self.threads,
                ep,
                limits: None,
            },
            load: LoadOptions {
                verify_hashes: !self.no_verify_hashes,
            },
        };
        let model = Model::load(&dir, &options)
            .with_context(|| format!("loading model {}", dir.display()))?;
        // The same fallback usually happens for every graph: say it once, naming the graphs.
        let mut warnings: Vec<(&str, Vec<&str>)> = Vec::new();
        for graph in model.graphs() {
            for warning in &graph.providers.warnings {
                match warnings.iter_mut().find(|(w, _)| w == warning) {
                    Some((_, graphs)) => graphs.push(graph.name),
                    None => warnings.push((warning, vec![graph.name])),
                }
            }
        }
        for (warning, graphs) in warnings {
            eprintln!("warning: {}: {warning}", graphs.join(", "));
        }
        // Where a GPU was asked for, say where the nodes went: ONNX Runtime may split a graph.
        if uses_gpu {
            for graph in model.graphs() {
                eprintln!("info: graph {}", graph.provider_summary());
            }
        }
        Ok(model)
    }
}
