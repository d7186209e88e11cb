"""Weight-only int4 quantization of the decoder graph (MatMulNBits), with ONNX Runtime's own quantizer routine.

The decoder builder (builder.py) quantizes each weight as it streams from the checkpoint, slice by slice, with the
routine `MatMulNBitsQuantizer` runs per MatMul (so the packing is the one it writes; test_quant checks that). Every
MatMul of the decoder whose weight is a constant (the layers' q/k/v/o and gate/up/down projections and the
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

from .builder import Int4

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


def int4_settings(block_size: int) -> Int4:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size {block_size} is not one of {BLOCK_SIZES}")
    return Int4(block_size, SYMMETRIC, ACCURACY_LEVEL)
