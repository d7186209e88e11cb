"""The embed graph and the plain decoder graph, built node by node in standard ONNX ops (builder.py).

The plain decoder is the Llama stack as transformers runs it in eager mode, the reference it is validated against:
RMSNorm in float32, rotary embeddings from the model's own cos/sin tables gathered at `position_ids`, grouped-query
attention with a causal and padding mask (left padding allowed, any batch size), softmax in float32, SiLU-gated
MLP, and the final norm and LM head on the last position only (only its logits are ever sampled from; over every
prompt position the LM head would dominate prefill and its `[S, vocab]` output the memory peak).

The query heads are grouped by the KV head they share and the two attention MatMuls broadcast over the group axis,
so the graph never copies the KV cache once per query head: in the `mid` decoder that removed 16 Expand nodes and
their copies, 12 % of a decode step's kernel time at 2014 tokens of context (docs/PERFORMANCE.md, run 5).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .builder import GraphBuilder, Int4
from .checkpoint import CheckpointError
from .graphs import GraphSpec, past_names, present_names
from .weights import CheckpointWeights

LANGUAGE = "model.language_model"


def rotary_tables(text_config, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin `[max_context, head_dim]` (rotate_half layout, attention scaling applied) from transformers' own
    rotary embedding, so every rope type it implements (Llama-3's frequency scaling included) is what the tables
    hold."""
    rotary = LlamaRotaryEmbedding(config=text_config)
    positions = torch.arange(max_context, dtype=torch.int64)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0].numpy(), sin[0].numpy()


def check_plain_supported(text_config) -> None:
    unsupported = []
    if getattr(text_config, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {text_config.hidden_act!r}")
    if getattr(text_config, "pretraining_tp", 1) != 1:
        unsupported.append("pretraining_tp")
    if unsupported:
        raise CheckpointError(f"the decoder graph does not implement {', '.join(unsupported)}")


def build_embed(
    spec: GraphSpec,
    out_dir: Path,
    float_dtype: str,
    opset: int,
    weights: CheckpointWeights,
    log: Callable[[str], None],
    external_data: bool | None,
) -> list[Path]:
    """input_ids -> inputs_embeds: a Gather over the token embedding table."""
    b = GraphBuilder(spec, out_dir, float_dtype, opset, weights, log)
    table = b.weight("embed_tokens.weight", f"{LANGUAGE}.embed_tokens.weight")
    b.node("Gather", [table, spec.inputs[0].name], [spec.outputs[0].name], "embed_tokens", axis=0)
    return b.finish("llama3v_embed", external_data)


class Ops:
    """Small helpers over a builder for the patterns both layers and attention repeat."""

    def __init__(self, b: GraphBuilder):
        self.b = b
        self.float32 = b.float_dtype == "float32"

    def ints(self, name: str, values: list[int]) -> str:
        return self.b.constant(name, np.array(values, np.int64))

    def to_float32(self, x: str, name: str) -> str:
        return x if self.float32 else self.b.one("Cast", [x], name, to=TensorProto.FLOAT)

    def from_float32(self, x: str, name: str) -> str:
        return x if self.float32 else self.b.one("Cast", [x], name, to=TensorProto.FLOAT16)

    def rms_norm(self, x: str, weight: str, p: str, eps: float) -> str:
        """LlamaRMSNorm: in float32, back to the input dtype, then scaled by the weight."""
        b = self.b
        x32 = self.to_float32(x, f"{p}/to_float32")
        square = b.one("Mul", [x32, x32], f"{p}/square")
        if b.opset >= 18:
            mean = b.one("ReduceMean", [square, self.ints(f"{p}/axes", [-1])], f"{p}/mean")
        else:
            mean = b.one("ReduceMean", [square], f"{p}/mean", axes=[-1])
        eps_c = b.constant(f"{p}/epsilon", np.array(eps, np.float32))
        rms = b.one("Sqrt", [b.one("Add", [mean, eps_c], f"{p}/variance")], f"{p}/rms")
        normalized = self.from_float32(b.one("Div", [x32, rms], f"{p}/normalized"), f"{p}/to_input_dtype")
        return b.one("Mul", [weight, normalized], f"{p}/scaled")

    def rotate(self, x: str, cos: str, sin: str, p: str, half: int) -> str:
        """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) along the head dimension."""
        b = self.b
        split = self.ints(f"{p}/halves", [half, half])
        x1, x2 = b.node("Split", [x, split], [f"{p}/x1", f"{p}/x2"], f"{p}/Split", axis=-1)
        rotated = b.one("Concat", [b.one("Neg", [x2], f"{p}/neg_x2"), x1], f"{p}/rotate_half", axis=-1)
        return b.one(
            "Add",
            [b.one("Mul", [x, cos], f"{p}/x_cos"), b.one("Mul", [rotated, sin], f"{p}/rotated_sin")],
            f"{p}/rotated",
        )

    def heads(self, x: str, count: int, head_dim: int, p: str) -> str:
        """[B, S, count * Hd] -> [B, count, S, Hd]."""
        shaped = self.b.one("Reshape", [x, self.ints(f"{p}/shape", [0, 0, count, head_dim])], f"{p}/split_heads")
        return self.b.one("Transpose", [shaped], f"{p}/heads", perm=[0, 2, 1, 3])


def _attention_mask(b: GraphBuilder, ops: Ops, inputs_embeds: str, attention_mask: str) -> str:
    """Boolean `[B, 1, 1, S, T]`: query i (absolute position T - S + i) may attend key j when j <= T - S + i and
    attention_mask[b, j] is 1 (the causal rule transformers applies by cache position, plus padding)."""
    one = b.constant("mask/one", np.array(1, np.int64))
    mask_shape = b.one("Shape", [attention_mask], "mask/mask_shape")
    total = b.one("Gather", [mask_shape, one], "mask/total", axis=0)
    embeds_shape = b.one("Shape", [inputs_embeds], "mask/embeds_shape")
    sequence = b.one("Gather", [embeds_shape, one], "mask/sequence", axis=0)
    past = b.one("Sub", [total, sequence], "mask/past")
    keys = b.one("Range", [b.constant("mask/zero_scalar", np.array(0, np.int64)), total, one], "mask/keys")
    queries = b.one("Range", [past, total, one], "mask/queries")
    queries_col = b.one("Unsqueeze", [queries, ops.ints("mask/axis_last", [-1])], "mask/queries_col")
    future = b.one("Greater", [keys, queries_col], "mask/future")
    causal = b.one("Not", [future], "mask/causal")
    padding = b.one("Cast", [attention_mask], "mask/padding_bool", to=TensorProto.BOOL)
    padding = b.one("Unsqueeze", [padding, ops.ints("mask/axes_123", [1, 2, 3])], "mask/padding")
    return b.one("And", [causal, padding], "mask/allowed")


def build_plain_decoder(
    spec: GraphSpec,
    out_dir: Path,
    float_dtype: str,
    opset: int,
    text_config,
    max_context: int,
    weights: CheckpointWeights,
    log: Callable[[str], None],
    external_data: bool | None,
    int4: Int4 | None = None,
) -> list[Path]:
    """inputs_embeds, attention_mask, position_ids, past -> logits (last position), present."""
    check_plain_supported(text_config)
    b = GraphBuilder(spec, out_dir, float_dtype, opset, weights, log, int4)
    ops = Ops(b)
    layers = text_config.num_hidden_layers
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    eps = float(text_config.rms_norm_eps)
    inputs_embeds, attention_mask, position_ids = (t.name for t in spec.inputs[:3])
    pasts, presents = past_names(layers), present_names(layers)

    cos_table, sin_table = rotary_tables(text_config, max_context)
    b.array("cos_table", cos_table)
    b.array("sin_table", sin_table)
    # [B, 1, S, Hd]: broadcast over the heads.
    cos = b.one("Unsqueeze", [b.one("Gather", ["cos_table", position_ids], "rotary/cos_bsd", axis=0),
                              ops.ints("rotary/axis_1", [1])], "rotary/cos")  # fmt: skip
    sin = b.one("Unsqueeze", [b.one("Gather", ["sin_table", position_ids], "rotary/sin_bsd", axis=0),
                              ops.ints("rotary/axis_1b", [1])], "rotary/sin")  # fmt: skip
    allowed = _attention_mask(b, ops, inputs_embeds, attention_mask)
    # Masked scores take the dtype's lowest value, as transformers' additive mask gives them.
    masked = b.float_constant("attention/masked", float(np.finfo(b.numpy_float).min))
    scale = b.float_constant("attention/scale", head_dim**-0.5)
    group = heads // kv_heads

    def bias(x: str, module: str, p: str) -> str:
        name = f"{module}.bias"
        return b.one("Add", [x, b.weight(name, name)], f"{p}/bias") if name in weights else x

    hidden = inputs_embeds
    for i in range(layers):
        p, m = f"layers.{i}", f"{LANGUAGE}.layers.{i}"
        attn, mlp = f"{m}.self_attn", f"{m}.mlp"
        norm = ops.rms_norm(hidden, b.weight(f"{p}.input_layernorm.weight", f"{m}.input_layernorm.weight"),
                            f"{p}/input_layernorm", eps)  # fmt: skip
        projections = {}
        for proj, count in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            out = b.linear(norm, f"{p}/{proj}", f"{p}/{proj}/MatMul", f"{p}.self_attn.{proj}.weight",
                           [f"{attn}.{proj}.weight"])  # fmt: skip
            projections[proj] = ops.heads(bias(out, f"{attn}.{proj}", f"{p}/{proj}"), count, head_dim, f"{p}/{proj}")
        half = head_dim // 2
        query = ops.rotate(projections["q_proj"], cos, sin, f"{p}/q_rotary", half)
        key = ops.rotate(projections["k_proj"], cos, sin, f"{p}/k_rotary", half)
        key = b.one("Concat", [pasts[2 * i], key], presents[2 * i], axis=2)
        value = b.one("Concat", [pasts[2 * i + 1], projections["v_proj"]], presents[2 * i + 1], axis=2)
        # [B, KV, G, S, Hd] x [B, KV, 1, Hd, T] -> [B, KV, G, S, T]
        grouped = b.one("Reshape", [query, ops.ints(f"{p}/group_shape", [0, kv_heads, group, -1, head_dim])],
                        f"{p}/grouped_query")  # fmt: skip
        key5 = b.one("Unsqueeze", [key, ops.ints(f"{p}/axis_2", [2])], f"{p}/key5")
        key_t = b.one("Transpose", [key5], f"{p}/key_t", perm=[0, 1, 2, 4, 3])
        scores = b.one("Mul", [b.one("MatMul", [grouped, key_t], f"{p}/qk"), scale], f"{p}/scores")
        scores = b.one("Where", [allowed, scores, masked], f"{p}/masked_scores")
        probs = ops.from_float32(
            b.one("Softmax", [ops.to_float32(scores, f"{p}/scores32")], f"{p}/probs32", axis=-1), f"{p}/probs"
        )
        value5 = b.one("Unsqueeze", [value, ops.ints(f"{p}/axis_2v", [2])], f"{p}/value5")
        context = b.one("MatMul", [probs, value5], f"{p}/context5")
        context = b.one("Reshape", [context, ops.ints(f"{p}/heads_shape", [0, heads, -1, head_dim])],
                        f"{p}/context_heads")  # fmt: skip
        context = b.one("Transpose", [context], f"{p}/context_bshd", perm=[0, 2, 1, 3])
        context = b.one("Reshape", [context, ops.ints(f"{p}/merge_shape", [0, 0, heads * head_dim])],
                        f"{p}/context")  # fmt: skip
        attn_out = b.linear(context, f"{p}/o_proj", f"{p}/o_proj/MatMul", f"{p}.self_attn.o_proj.weight",
                            [f"{attn}.o_proj.weight"])  # fmt: skip
        hidden = b.one("Add", [hidden, bias(attn_out, f"{attn}.o_proj", f"{p}/o_proj")], f"{p}/residual_attn")

        norm = ops.rms_norm(hidden, b.weight(f"{p}.post_attention_layernorm.weight",
                            f"{m}.post_attention_layernorm.weight"), f"{p}/post_attention_layernorm", eps)  # fmt: skip
        gate = bias(b.linear(norm, f"{p}/gate_proj", f"{p}/gate_proj/MatMul", f"{p}.mlp.gate_proj.weight",
                             [f"{mlp}.gate_proj.weight"]), f"{mlp}.gate_proj", f"{p}/gate_proj")  # fmt: skip
        up = bias(b.linear(norm, f"{p}/up_proj", f"{p}/up_proj/MatMul", f"{p}.mlp.up_proj.weight",
                           [f"{mlp}.up_proj.weight"]), f"{mlp}.up_proj", f"{p}/up_proj")  # fmt: skip
        silu = b.one("Mul", [gate, b.one("Sigmoid", [gate], f"{p}/gate_sigmoid")], f"{p}/gate_silu")
        gated = b.one("Mul", [silu, up], f"{p}/gated")
        down = bias(b.linear(gated, f"{p}/down_proj", f"{p}/down_proj/MatMul", f"{p}.mlp.down_proj.weight",
                             [f"{mlp}.down_proj.weight"]), f"{mlp}.down_proj", f"{p}/down_proj")  # fmt: skip
        hidden = b.one("Add", [hidden, down], f"{p}/residual_mlp")
        b.progress.step(f"layer {i + 1}/{layers}")

    last = b.one("Slice", [hidden, ops.ints("last/start", [-1]), ops.ints("last/end", [np.iinfo(np.int64).max]),
                           ops.ints("last/axis", [1])], "last/hidden")  # fmt: skip
    norm = ops.rms_norm(last, b.weight("norm.weight", f"{LANGUAGE}.norm.weight"), "norm", eps)
    b.lm_head(norm, spec.outputs[0].name, "lm_head.weight")
    b.progress.step("LM head")
    return b.finish("llama3v_decoder", external_data)
