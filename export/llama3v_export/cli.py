"""`llama3v-export`: a Hugging Face LLaVA checkpoint directory -> a llama3v model directory (onnx/README.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from transformers import LlavaConfig

from .checkpoint import CheckpointError, checkpoint_model_type, load_checkpoint
from .export_run import FLOAT_DTYPES, ExportResult, clear_results, progress_log
from .fused import FLAVOURS, FusedExportError, check_supported
from .graph_export import export_all
from .graphs import GraphSpec, dims_from_config, graph_specs, load_model
from .lazy_model import lazy_reference
from .manifest import build_manifest, write_model_files
from .minicpmv_export import export_minicpmv
from .quantize import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, int4_settings, quantization_entry
from .reference import write_reference
from .validate import ValidationError, greedy_agreement, validate_graphs, validate_reference
from .vision_graph import build_vision
from .weights import CheckpointWeights

DEFAULT_OPSET = 17
OPSETS = range(14, 21)
# `--external-data` → export_all's `external_data` (None: decided per graph by the size of its weights).
EXTERNAL_DATA_CHOICES = {"auto": None, "always": True, "never": False}


def export_model(
    checkpoint_dir: Path,
    out: Path,
    dtype: str = "fp32",
    reference: bool = False,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    log: Callable[[str], None] = print,
    external_data: bool | None = None,
    quant: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    decoder: str = "plain",
) -> ExportResult:
    """Export, validate against PyTorch, optionally write reference cases, then write the manifest.

    Weights stream from the checkpoint into each graph (weights.py): the export holds at most one graph's weights
    and the validation's reference loads each module's weights only while it runs (lazy_model.py). `quant="int4"`
    quantizes the decoder's weights as they stream, validated with the int4 tolerances (validate.py).
    `decoder="fused"` builds the decoder from ONNX Runtime's contrib ops (fused.py). `reference=True` runs
    transformers' `generate`, which needs the whole fp32 model in memory.

    Raises CheckpointError for an unusable checkpoint and ValidationError when a graph is out of tolerance (the
    manifest is then not written, so the directory is not loadable).
    """
    if quant is not None and dtype != "fp32":
        raise CheckpointError(f"--quant {quant} quantizes an fp32 export; got --dtype {dtype}")
    if checkpoint_model_type(checkpoint_dir) == "minicpmv":
        options = (dtype, reference, opset, validate, log, external_data, quant, block_size, decoder)
        return export_minicpmv(checkpoint_dir, out, *options)
    step = progress_log(log)
    checkpoint = load_checkpoint(checkpoint_dir)
    step(f"checkpoint {checkpoint.path}: {', '.join(p.name for p in checkpoint.weights)}")
    clear_results(out)
    config = LlavaConfig.from_pretrained(checkpoint.path)
    dims = dims_from_config(config)
    if decoder != "plain":
        check_supported(config.text_config)
    weights = CheckpointWeights(checkpoint.weights, config.text_config.tie_word_embeddings)
    specs = graph_specs(dims, FLOAT_DTYPES[dtype])
    step(
        f"model ({dtype}): {dims.num_layers} layers, hidden {dims.hidden_size}, {dims.tokens_per_image} "
        "image tokens; weights stream from the checkpoint"
    )
    int4 = int4_settings(block_size) if quant is not None else None
    float_dtype = FLOAT_DTYPES[dtype]

    def vision(spec: GraphSpec) -> list[Path]:
        return build_vision(spec, out, float_dtype, opset, config, dims, weights, step, external_data)

    text = config.text_config
    files = export_all(
        text, vision, weights, specs, dims.max_context, out, float_dtype, opset, step, external_data, decoder, int4
    )
    graph_files = {name: paths[0] for name, paths in files.items()}
    result = ExportResult(out, {})
    if validate:
        step("validating graphs with onnxruntime against PyTorch (fp32, each module's weights loaded as it runs)")
        reference_model = lazy_reference(config, weights)
        result.comparisons += validate_graphs(
            graph_files, specs, reference_model, dims, dtype, step, quant, decoder=decoder
        )
    if reference:
        step("computing reference cases with transformers (the whole fp32 model)")
        model = load_model(checkpoint.path, "fp32")
        # The reference runs the attention users get by default, not the eager path traced for export.
        model.set_attn_implementation("sdpa")
        result.reference = write_reference(checkpoint, model, out / "reference", step)
        if validate:
            step("running the reference cases through the exported graphs")
            # What both runs through the reference cases take: the cases, the graphs, and how to read them.
            cases = (out / "reference", graph_files, specs, dims, dtype, checkpoint.image_token_id)
            result.comparisons += validate_reference(*cases, step, quant=quant, decoder=decoder)
            if dtype != "fp32" or quant is not None:
                result.greedy = greedy_agreement(*cases, model, step, decoder=decoder)
    quantization = quantization_entry(block_size) if quant is not None else None
    result.manifest = build_manifest(checkpoint, dims, specs, files, dtype, opset, quantization, decoder)
    write_model_files(out, checkpoint, result.manifest)
    step(f"wrote {out / 'manifest.json'}")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llama3v-export", description=__doc__)
    parser.add_argument("--checkpoint", required=True, type=Path, help="Hugging Face LLaVA checkpoint directory")
    parser.add_argument("--out", required=True, type=Path, help="model directory to write")
    parser.add_argument("--dtype", choices=sorted(FLOAT_DTYPES), default="fp32")
    parser.add_argument("--reference", action="store_true", help="also write reference/ cases from transformers")
    parser.add_argument(
        "--opset", type=int, choices=OPSETS, default=DEFAULT_OPSET, metavar="N", help="ONNX opset, 14..20 (default 17)"
    )
    parser.add_argument("--skip-validation", action="store_true", help="do not compare the graphs with PyTorch")
    parser.add_argument(
        "--external-data",
        choices=sorted(EXTERNAL_DATA_CHOICES),
        default="auto",
        help="weights in <graph>.onnx.data: auto (graphs with over 64 MiB of weights), always, never",
    )
    parser.add_argument(
        "--decoder",
        choices=FLAVOURS,
        default="plain",
        help="decoder graph: plain (traced, standard ONNX ops, every provider including TensorRT) or fused "
        "(ONNX Runtime contrib ops: GroupQueryAttention appending to a shared KV buffer; CPU and CUDA)",
    )
    parser.add_argument(
        "--quant",
        choices=["int4"],
        help="weight-only quantization of the decoder's MatMuls (MatMulNBits; the vision and embed graphs stay fp32)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=DEFAULT_BLOCK_SIZE,
        metavar="N",
        help=f"--quant block size along the input dimension, one of {BLOCK_SIZES} (default {DEFAULT_BLOCK_SIZE})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = export_model(
            args.checkpoint,
            args.out,
            args.dtype,
            args.reference,
            args.opset,
            validate=not args.skip_validation,
            external_data=EXTERNAL_DATA_CHOICES[args.external_data],
            quant=args.quant,
            block_size=args.block_size,
            decoder=args.decoder,
        )
    except (CheckpointError, FusedExportError) as err:
        print(f"llama3v-export: error: {err}", file=sys.stderr)
        return 2
    except ValidationError as err:
        print(f"llama3v-export: validation failed: {err}", file=sys.stderr)
        return 1
    checked = f"{len(result.comparisons)} comparisons within tolerance" if result.comparisons else "not validated"
    cases = f", {len(result.reference['cases'])} reference cases" if result.reference else ""
    kind = args.dtype if args.quant is None else f"{args.dtype} + {args.quant} decoder (block {args.block_size})"
    kind += f", {args.decoder} decoder"
    print(f"llama3v-export: wrote {kind} model directory {result.model_dir} ({checked}{cases})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
