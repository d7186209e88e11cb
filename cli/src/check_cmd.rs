//! `llama3v check`: the runtime against the stored transformers reference, stage by stage; with
//! `--against EP`, also the same model on two provider lists against each other.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use llama3v::check::{CheckReport, Measure};
use llama3v::compare::{compare_models, ProviderComparison};
use llama3v::Model;
use serde_json::json;

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Also run the reference cases on this provider list (e.g. cpu) and print the per-stage
    /// differences between the two lists; each list is checked against the reference too
    #[arg(long, value_name = "EP")]
    pub against: Option<String>,
    /// Instead of the reference check: run the reference cases as a mixed batch of up to N sequences
    /// (joining and leaving at different steps) and compare every step's logits with the same request
    /// run alone
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,
    /// The longest token budget of the --batch requests
    #[arg(long, default_value_t = 24)]
    pub batch_tokens: usize,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &CheckArgs) -> Result<ExitCode> {
    let model = args.model.load()?;
    if let Some(max_batch) = args.batch {
        return check_batch(&model, max_batch, args.batch_tokens, args.json);
    }
    let report = model
        .check_reference()
        .with_context(|| format!("checking {}", model.dir.display()))?;
    let Some(against) = &args.against else {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_report(&model, &report);
        }
        return Ok(exit(report.pass()));
    };

    let other_args = args.model.with_ep(against);
    let other = other_args.load().context("--against")?;
    let other_report = other
        .check_reference()
        .with_context(|| format!("checking {} on {against}", other.dir.display()))?;
    let (a_name, _) = args.model.provider_options()?;
    let (a_name, b_name) = (a_name.to_string(), against.clone());
    let comparison = compare_models(&model, &other, &a_name, &b_name)
        .with_context(|| format!("comparing {a_name} with {b_name}"))?;
    let pass = report.pass() && other_report.pass() && comparison.pass();
    if args.json {
        let value = json!({
            "pass": pass,
            "a": {"providers": a_name, "placement": placement(&model), "reference": report},
            "b": {"providers": b_name, "placement": placement(&other), "reference": other_report},
            "comparison": comparison,
            "summary": {
                "max_logits_diff": comparison.max_logits_diff(),
                "greedy_agreement": comparison.greedy_agreement().0,
                "greedy_steps": comparison.greedy_agreement().1,
            },
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("== {a_name} against the reference");
        print_report(&model, &report);
        println!("== {b_name} against the reference");
        print_report(&other, &other_report);
        println!("== {a_name} against {b_name}");
        print_comparison(&comparison);
        println!("{}", if pass { "check passed" } else { "check FAILED" });
    }
    Ok(exit(pass))
}

fn check_batch(model: &Model, max_batch: usize, tokens: usize, json: bool) -> Result<ExitCode> {
    let report = model
        .check_batch(max_batch, tokens)
        .with_context(|| format!("batch check of {}", model.dir.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(exit(report.pass()));
    }
    let widest = report.batch_sizes.iter().max().copied().unwrap_or(0);
    println!(
        "batch check: {} requests, up to {max_batch} per decoder run (widest run: {widest} \
         sequences, {} runs)",
        report.rows.len(),
        report.batch_sizes.len()
    );
    for row in &report.rows {
        let m = &row.logits;
        println!(
            "  {:<18} arrives at iteration {:>3}, {:>3} tokens: {} {:.3e} (tolerance {:.0e}, {}), \
             tokens {}",
            row.request,
            row.arrives_at,
            row.tokens,
            m.stage,
            m.measured,
            m.tolerance,
            m.detail,
            if row.tokens_equal { "equal" } else { "DIFFER" }
        );
    }
    let pass = report.pass();
    println!(
        "{}",
        if pass {
            "batch check passed"
        } else {
            "batch check FAILED"
        }
    );
    Ok(exit(pass))
}

fn exit(pass: bool) -> ExitCode {
    if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn placement(model: &Model) -> serde_json::Value {
    model
        .graphs()
        .iter()
        .map(|g| {
            (
                g.name.to_string(),
                json!({
                    "providers": g.providers.active.iter().map(|p| p.name()).collect::<Vec<_>>(),
                    "nodes": g.providers.placement.iter()
                        .map(|(ep, n)| json!({"provider": ep, "nodes": n}))
                        .collect::<Vec<_>>(),
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn print_measure(m: &Measure) {
    println!(
        "  {:<15} {:>11.3e}  (tolerance {:.3e})  {}  {}",
        m.stage,
        m.measured,
        m.tolerance,
        if m.pass { "ok  " } else { "FAIL" },
        m.detail
    );
}

fn print_report(model: &Model, report: &CheckReport) {
    let quantized = model
        .manifest
        .quantization
        .as_ref()
        .map(|q| format!(", {q}"))
        .unwrap_or_default();
    println!(
        "model {} ({:?}{quantized}); providers: {}",
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
        case.measures.iter().for_each(print_measure);
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

fn print_comparison(c: &ProviderComparison) {
    for case in &c.cases {
        println!("case {}:", case.case);
        case.measures.iter().for_each(print_measure);
    }
    let (agree, steps) = c.greedy_agreement();
    println!(
        "{} vs {}: max logits diff {:.3e} (tolerance {:.3e}{}), greedy agreement {agree}/{steps}",
        c.a,
        c.b,
        c.max_logits_diff(),
        c.tolerances.logits,
        if c.tolerances.relative {
            ", relative"
        } else {
            ""
        }
    );
}
