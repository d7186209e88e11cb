"""Weight-only int4 quantization of the decoder graph with ONNX Runtime's own quantizer (MatMulNBits).

Every MatMul of the decoder whose weight is a constant (the layers' q/k/v/o and gate/up/down projections and the
LM head) becomes a `com.microsoft::MatMulNBits` node with 4-bit weights in blocks of `block_size` along the input
dimension, one fp32 scale per block. The attention MatMuls (activations on both sides) stay float, and so do the
vision and embedding graphs: the vision tower runs once per image and the embedding table is a gather, neither
worth the accuracy.

Symmetric blocks (no zero point): the weights of these layers are centred on zero, so a zero point buys little
accuracy for an extra tensor per weight; it is also onnxruntime-genai's default for int4, so the benchmark compares
like with like. `accuracy_level` 4 lets the CPU kernel quantize the activations to int8 per block and run integer
dot products (onnxruntime-genai's CPU default); the validation measures the error of that whole computation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from .graphs import GraphSpec, write_graph

DEFAULT_BLOCK_SIZE = 32
# MatMulNBits accepts power-of-two blocks from 16 (the kernels' smallest) up.
BLOCK_SIZES = (16, 32, 64, 128, 256)
# 4: int8 activations in the CPU kernel (onnxruntime-genai's CPU default); 0: the kernel's own fp32 path.
ACCURACY_LEVEL = 4
SYMMETRIC = True
QUANTIZED_GRAPHS = ("decoder",)


def quantization_entry(block_size: int) -> dict:
    """The manifest's `quantization` object (onnx/README.md)."""
    return {
        "method": "int4",
        "block_size": block_size,
        "symmetric": SYMMETRIC,
        "accuracy_level": ACCURACY_LEVEL,
        "graphs": list(QUANTIZED_GRAPHS),
    }


def quantize_graph(
    files: list[Path], spec: GraphSpec, block_size: int, external_data: bool | None, log: Callable[[str], None]
) -> list[Path]:
    """Quantize one exported graph in place; returns its files (graph, then external data if any), written with
    the same external-data rule as the float export (graphs.EXTERNAL_DATA_THRESHOLD when `external_data` is None).
    """
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size {block_size} is not one of {BLOCK_SIZES}")
    graph = files[0]
    model = onnx.load(str(graph), load_external_data=True)
    float_matmuls = sum(n.op_type == "MatMul" for n in model.graph.node)
    # The quantizer logs every node it visits at INFO.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=SYMMETRIC, accuracy_level=ACCURACY_LEVEL
    )
    quantizer.process()
    quantized = quantizer.model.model
    nbits = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
    if nbits == 0:
        raise ValueError(f"{graph.name}: no MatMul with a constant weight to quantize")
    del model, quantizer
    written = write_graph(quantized, graph, spec, external_data)
    size = sum(p.stat().st_size for p in written) / 2**20
    log(
        f"quantized {graph.name}: {nbits} of {float_matmuls} MatMuls -> MatMulNBits (int4, block {block_size}, "
        f"symmetric, accuracy level {ACCURACY_LEVEL}), {size:.1f} MiB"
    )
    return written
