"""The vision graph, built node by node in standard ONNX ops with its weights streamed (builder.py).

pixel_values -> image_features: SigLIP's patch embedding (a strided Conv) plus position embeddings, its encoder
layers up to hidden state `vision_feature_layer` (LLaVA's selection: index into the hidden states, embeddings
output first; later layers and the post-layernorm are not run), every patch kept (strategy `full`), then the LLaVA
projector (linear, activation, linear). The arithmetic is transformers' eager SigLIP: attention softmax in float32,
GELU as configured.

Built rather than traced: tracing runs the tower once in the export dtype, and the CPU has no fp16 MatMul (at
SigLIP-so400m's size, two layers took 90 s of the trace on the shared 2-core machine), and the traced module
holds the tower's weights while the exporter copies them into the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from transformers import LlavaConfig

from .builder import GraphBuilder
from .checkpoint import CheckpointError
from .graphs import Dims, GraphSpec
from .text_graphs import Ops
from .weights import CheckpointWeights

VISION = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def _gelu(b: GraphBuilder, x: str, kind: str, p: str) -> str:
    """GELU, exact (`gelu`: x/2 (1 + erf(x / sqrt 2))) or tanh-approximated; ONNX Runtime fuses either pattern."""
    half = b.float_constant(f"{p}/half", 0.5)
    one = b.float_constant(f"{p}/one", 1.0)
    if kind == "gelu":
        inner = b.one("Erf", [b.one("Mul", [x, b.float_constant(f"{p}/inv_sqrt2", 1 / math.sqrt(2))], f"{p}/xs")],
                      f"{p}/erf")  # fmt: skip
    elif kind in TANH_GELUS:
        cube = b.one("Mul", [b.one("Mul", [x, x], f"{p}/x2"), x], f"{p}/x3")
        poly = b.one("Add", [x, b.one("Mul", [cube, b.float_constant(f"{p}/c", 0.044715)], f"{p}/cx3")], f"{p}/poly")
        scaled = b.one("Mul", [poly, b.float_constant(f"{p}/sqrt_2_pi", math.sqrt(2 / math.pi))], f"{p}/scaled")
        inner = b.one("Tanh", [scaled], f"{p}/tanh")
    else:
        raise CheckpointError(f"the vision graph does not implement the activation {kind!r}")
    gate = b.one("Mul", [half, b.one("Add", [one, inner], f"{p}/one_plus")], f"{p}/gate")
    return b.one("Mul", [x, gate], f"{p}/gelu")


def _layer_norm(b: GraphBuilder, ops: Ops, x: str, module: str, p: str, eps: float) -> str:
    scale, bias = b.weight(f"{module}.weight", f"{module}.weight"), b.weight(f"{module}.bias", f"{module}.bias")
    if b.opset >= 17:
        return b.one("LayerNormalization", [x, scale, bias], f"{p}/out", axis=-1, epsilon=eps)
    x32 = ops.to_float32(x, f"{p}/to_float32")
    axes = {"axes": [-1]}
    mean = b.one("ReduceMean", [x32], f"{p}/mean", **axes)
    centred = b.one("Sub", [x32, mean], f"{p}/centred")
    var = b.one("ReduceMean", [b.one("Mul", [centred, centred], f"{p}/square")], f"{p}/var", **axes)
    eps_c = b.constant(f"{p}/epsilon", np.array(eps, np.float32))
    std = b.one("Sqrt", [b.one("Add", [var, eps_c], f"{p}/var_eps")], f"{p}/std")
    normalized = ops.from_float32(b.one("Div", [centred, std], f"{p}/normalized32"), f"{p}/normalized")
    return b.one("Add", [b.one("Mul", [normalized, scale], f"{p}/scaled"), bias], f"{p}/out")


def _dense(b: GraphBuilder, x: str, module: str, p: str) -> str:
    """A Linear: MatMul on the `[in, out]` weight, then the bias if the checkpoint has one."""
    out = b.linear(x, f"{p}/matmul", f"{p}/MatMul", f"{module}.weight", [f"{module}.weight"])
    if f"{module}.bias" not in b.weights:
        return out
    return b.one("Add", [out, b.weight(f"{module}.bias", f"{module}.bias")], f"{p}/out")


def build_vision(
    spec: GraphSpec,
    out_dir: Path,
    float_dtype: str,
    opset: int,
    config: LlavaConfig,
    dims: Dims,
    weights: CheckpointWeights,
    log: Callable[[str], None],
    external_data: bool | None,
) -> list[Path]:
    vision = config.vision_config
    b = GraphBuilder(spec, out_dir, float_dtype, opset, weights, log)
    ops = Ops(b)
    heads, hidden = vision.num_attention_heads, vision.hidden_size
    head_dim = hidden // heads
    eps = float(vision.layer_norm_eps)
    grid = dims.image_size // dims.patch_size
    # hidden_states[0] is the embeddings' output, hidden_states[i] layer i's; negative indices count from the end.
    layers = dims.vision_feature_layer % (vision.num_hidden_layers + 1)

    patch = f"{VISION}.embeddings.patch_embedding"
    conv = b.one(
        "Conv",
        [
            spec.inputs[0].name,
            b.weight(f"{patch}.weight", f"{patch}.weight"),
            b.weight(f"{patch}.bias", f"{patch}.bias"),
        ],
        "embeddings/patches",
        kernel_shape=[dims.patch_size, dims.patch_size],
        strides=[dims.patch_size, dims.patch_size],
    )
    # [B, D, grid, grid] -> [B, grid * grid, D]
    flat = b.one("Reshape", [conv, ops.ints("embeddings/flat_shape", [0, hidden, grid * grid])], "embeddings/flat")
    tokens = b.one("Transpose", [flat], "embeddings/tokens", perm=[0, 2, 1])
    positions = f"{VISION}.embeddings.position_embedding.weight"
    x = b.one("Add", [tokens, b.weight(positions, positions)], "embeddings/out")
    scale = b.float_constant("attention/scale", head_dim**-0.5)

    for i in range(layers):
        p, m = f"layers.{i}", f"{VISION}.encoder.layers.{i}"
        norm = _layer_norm(b, ops, x, f"{m}.layer_norm1", f"{p}/layer_norm1", eps)
        q, k, v = (
            ops.heads(_dense(b, norm, f"{m}.self_attn.{proj}", f"{p}/{proj}"), heads, head_dim, f"{p}/{proj}")
            for proj in ("q_proj", "k_proj", "v_proj")
        )
        k_t = b.one("Transpose", [k], f"{p}/k_t", perm=[0, 1, 3, 2])
        scores = b.one("Mul", [b.one("MatMul", [q, k_t], f"{p}/qk"), scale], f"{p}/scores")
        probs = ops.from_float32(
            b.one("Softmax", [ops.to_float32(scores, f"{p}/scores32")], f"{p}/probs32", axis=-1), f"{p}/probs"
        )
        context = b.one("Transpose", [b.one("MatMul", [probs, v], f"{p}/context_heads")], f"{p}/context_bshd",
                        perm=[0, 2, 1, 3])  # fmt: skip
        context = b.one("Reshape", [context, ops.ints(f"{p}/merge_shape", [0, 0, hidden])], f"{p}/context")
        x = b.one("Add", [x, _dense(b, context, f"{m}.self_attn.out_proj", f"{p}/out_proj")], f"{p}/residual_attn")
        norm = _layer_norm(b, ops, x, f"{m}.layer_norm2", f"{p}/layer_norm2", eps)
        mlp = _gelu(b, _dense(b, norm, f"{m}.mlp.fc1", f"{p}/fc1"), vision.hidden_act, f"{p}/act")
        x = b.one("Add", [x, _dense(b, mlp, f"{m}.mlp.fc2", f"{p}/fc2")], f"{p}/residual_mlp")
        b.progress.step(f"layer {i + 1}/{layers}")

    projected = _gelu(b, _dense(b, x, f"{PROJECTOR}.linear_1", "projector/linear_1"), config.projector_hidden_act,
                      "projector/act")  # fmt: skip
    out = _dense(b, projected, f"{PROJECTOR}.linear_2", "projector/linear_2")
    b.node("Identity", [out], [spec.outputs[0].name], "image_features")
    b.progress.step("projector")
    return b.finish("llama3v_vision", external_data)
