"""The three graphs of a model directory, each built the way that keeps the export's memory bounded by one graph.

The embed and decoder graphs are written node by node with their weights streamed from the checkpoint
(text_graphs.py, fused.py); the vision graph is traced from the vision tower and projector alone, loaded in the
export dtype (graphs.py): at SigLIP-so400m's 400M parameters its trace stays well under the decoder's weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlavaConfig

from .builder import Int4
from .fused import build_fused_decoder
from .graphs import Dims, VisionGraph, check_io, export_graph, graph_specs
from .lazy_model import materialize, meta_model
from .text_graphs import build_embed, build_plain_decoder
from .weights import TORCH_FLOAT, CheckpointWeights


def export_vision(
    config: LlavaConfig,
    weights: CheckpointWeights,
    dims: Dims,
    out_dir: Path,
    float_dtype: str,
    opset: int,
    external_data: bool | None,
) -> list[Path]:
    model = meta_model(config)
    for prefix in ("model.vision_tower", "model.multi_modal_projector"):
        materialize(model.get_submodule(prefix), prefix, weights, TORCH_FLOAT[float_dtype])
    module = VisionGraph(model, dims.vision_feature_layer).eval()
    spec = graph_specs(dims, float_dtype)["vision"]
    return export_graph(module, spec, out_dir, dims, opset, external_data)


def export_all(
    config: LlavaConfig,
    weights: CheckpointWeights,
    dims: Dims,
    out_dir: Path,
    float_dtype: str,
    opset: int,
    log: Callable[[str], None] = print,
    external_data: bool | None = None,
    decoder: str = "plain",
    int4: Int4 | None = None,
) -> dict[str, list[Path]]:
    """Export vision, embed and decoder into `out_dir`, one at a time; returns each graph's files. `decoder` is the
    decoder's flavour (`plain` or `fused`); `int4` quantizes the decoder's MatMuls as their weights stream."""
    specs = graph_specs(dims, float_dtype)
    text = config.text_config
    files: dict[str, list[Path]] = {}
    for name in ("vision", "embed", "decoder"):
        start = time.perf_counter()
        kind = f" ({decoder}{', int4' if int4 else ''})" if name == "decoder" else ""
        log(f"exporting {name} graph{kind} ...")
        if name == "vision":
            with torch.no_grad():
                files[name] = export_vision(config, weights, dims, out_dir, float_dtype, opset, external_data)
        elif name == "embed":
            files[name] = build_embed(specs[name], out_dir, float_dtype, opset, weights, log, external_data)
        else:
            build = build_fused_decoder if decoder == "fused" else build_plain_decoder
            args = (specs[name], out_dir, float_dtype, opset, text, dims.max_context, weights, log, external_data)
            files[name] = build(*args, int4)
        check_io(files[name][0], specs[name])
        size = sum(p.stat().st_size for p in files[name]) / 2**20
        names = ", ".join(p.name for p in files[name])
        log(f"exported {name} graph: {names} ({size:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return files
