//! `llama3v inspect`: what a model directory holds and which providers run its graphs.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use llama3v::decode::layout_description;
use serde_json::json;

use crate::model_args::ModelArgs;

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs) -> Result<ExitCode> {
    let model = args.model.load()?;
    let m = &model.manifest;
    if args.json {
        let graphs: Vec<_> = model
            .graphs()
            .iter()
            .map(|g| {
                json!({
                    "name": g.name,
                    "file": g.spec.file,
                    "providers": g.providers.active.iter().map(|p| p.name()).collect::<Vec<_>>(),
                    // ONNX Runtime's node placement per provider (empty when it did not report it).
                    "placement": g.providers.placement.iter()
                        .map(|(ep, n)| json!({"provider": ep, "nodes": n}))
                        .collect::<Vec<_>>(),
                    "provider_warnings": g.providers.warnings,
                    "inputs": g.spec.inputs,
                    "outputs": g.spec.outputs,
                })
            })
            .collect();
        let value = json!({
            "model": model.dir,
            "dtype": m.dtype,
            "dims": m.model,
            "image": m.image,
            "stop_token_ids": m.text.stop_token_ids,
            "provenance": m.provenance,
            "quantization": m.quantization,
            "graphs": graphs,
            "kv_layout": layout_description(m.decoder_flavour).0,
            "decoder_flavour": m.decoder_flavour.name(),
            "layout": m.layout,
            "minicpmv": m.minicpmv,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    let d = &m.model;
    println!("model      {}", model.dir.display());
    println!("dtype      {:?}", m.dtype);
    if let Some(q) = &m.quantization {
        println!("quantized  {q}");
    }
    println!(
        "decoder    {} layers, {} heads, {} KV heads, head dim {}, hidden {}, vocab {}, context {}",
        d.num_layers,
        d.num_attention_heads,
        d.num_kv_heads,
        d.head_dim,
        d.hidden_size,
        d.vocab_size,
        d.max_context
    );
    let img = &m.image;
    println!(
        "image      {}x{} {}, {} tokens per image, image token {} ({})",
        img.width,
        img.height,
        img.resample,
        img.tokens_per_image,
        img.image_token,
        img.image_token_id
    );
    if let Some(s) = &m.minicpmv {
        println!(
            "layout     MiniCPM-V 2.5: up to {} slices + overview of ~{}px (patch {}), {} queries per slice",
            s.max_slice_nums, s.scale_resolution, s.patch_size, s.query_num
        );
    }
    println!(
        "text       bos {} ({}), stop ids {:?}",
        m.text.bos_token, m.text.bos_token_id, m.text.stop_token_ids
    );
    for g in model.graphs() {
        println!(
            "graph      {} ({}) on {}",
            g.name,
            g.spec.file,
            g.provider_summary()
        );
        for (side, list) in [("in ", &g.spec.inputs), ("out", &g.spec.outputs)] {
            for t in list {
                let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
                println!(
                    "  {side} {:<28} {:<8} [{}]",
                    t.name,
                    t.dtype,
                    dims.join(", ")
                );
            }
        }
    }
    println!(
        "decoder    {} flavour",
        model.manifest.decoder_flavour.name()
    );
    let (layout, how) = layout_description(m.decoder_flavour);
    println!("KV cache   {layout} ({how})");
    Ok(ExitCode::SUCCESS)
}
