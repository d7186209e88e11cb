"""The three graphs of a model directory, written one after another, node by node, each weight streamed from the
checkpoint into the graph's external data as its node is written (builder.py, weights.py): the export's memory is
bounded by a slice of one weight plus the graph protos, not by the model.

The embed and decoder graphs are Llama-3's in every layout, built here from the text config; the vision graph is
the layout's own (`vision_graph.build_vision` for LLaVA, minicpmv_export.py for MiniCPM-V), passed in as a callable.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .builder import Int4
from .fused import build_fused_decoder
from .graphs import GraphSpec, check_io
from .text_graphs import build_embed, build_plain_decoder
from .weights import CheckpointWeights


def export_all(
    text_config,
    build_vision_graph: Callable[[GraphSpec], list[Path]],
    weights: CheckpointWeights,
    specs: dict[str, GraphSpec],
    max_context: int,
    out_dir: Path,
    float_dtype: str,
    opset: int,
    log: Callable[[str], None] = print,
    external_data: bool | None = None,
    decoder: str = "plain",
    int4: Int4 | None = None,
) -> dict[str, list[Path]]:
    """Export vision, embed and decoder into `out_dir`, one at a time; returns each graph's files.
    `build_vision_graph(spec)` writes the vision graph; `decoder` is the decoder's flavour (`plain` or `fused`);
    `int4` quantizes the decoder's MatMuls as their weights stream."""
    files: dict[str, list[Path]] = {}
    for name in ("vision", "embed", "decoder"):
        start = time.perf_counter()
        kind = f" ({decoder}{', int4' if int4 else ''})" if name == "decoder" else ""
        log(f"exporting {name} graph{kind} ...")
        if name == "vision":
            files[name] = build_vision_graph(specs[name])
        elif name == "embed":
            files[name] = build_embed(specs[name], out_dir, float_dtype, opset, weights, log, external_data)
        else:
            build = build_fused_decoder if decoder == "fused" else build_plain_decoder
            args = (specs[name], out_dir, float_dtype, opset, text_config, max_context, weights, log, external_data)
            files[name] = build(*args, int4)
        check_io(files[name][0], specs[name])
        size = sum(p.stat().st_size for p in files[name]) / 2**20
        names = ", ".join(p.name for p in files[name])
        log(f"exported {name} graph: {names} ({size:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return files
