//! `llama3v check`: the runtime against the stored transformers reference, stage by stage.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &CheckArgs) -> Result<ExitCode> {
    let mut model = args.model.load()?;
    let report = model
        .check_reference()
        .with_context(|| format!("checking {}", model.dir.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "model {} ({:?}); providers: {}",
            report.model.display(),
            report.dtype,
            model
                .graphs()
                .iter()
                .map(|g| g.provider_summary())
                .collect::<Vec<_>>()
                .join("; ")
        );
        for case in &report.cases {
            println!("case {}:", case.case);
            for m in &case.measures {
                println!(
                    "  {:<15} {:>11.3e}  (tolerance {:.3e})  {}  {}",
                    m.stage,
                    m.measured,
                    m.tolerance,
                    if m.pass { "ok  " } else { "FAIL" },
                    m.detail
                );
            }
        }
        println!(
            "{}",
            if report.pass() {
                "check passed"
            } else {
                "check FAILED"
            }
        );
    }
    Ok(if report.pass() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
