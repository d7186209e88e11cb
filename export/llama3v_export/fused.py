"""The fused decoder flavour (`llama3v-export --decoder fused`): the Llama stack written node by node with ONNX
Runtime's contrib ops instead of traced from PyTorch.

Per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm in one op), one MatMul for the packed
q/k/v projection, GroupQueryAttention (rotary from cos/sin tables, grouped KV heads, causal softmax, and the
cache append), the output projection, a second SkipSimplifiedLayerNormalization, one MatMul for the packed
gate/up projection, SiLU, and the down projection. The final norm and the LM head run on the last position only.

Same inputs and outputs as the plain graph (onnx/README.md), one difference in the cache: GroupQueryAttention
appends into the past tensor itself when the caller binds `present.{i}` to the same buffer as
`past_key_values.{i}` (a buffer of fixed capacity, `total_sequence` positions valid); given a past of exactly
`P` positions it returns a new present of `P+S` like the plain graph. The attention mask must be all ones
(GroupQueryAttention derives each row's length from the mask's sum, so left padding would be misread); the
runtime runs one unpadded sequence.

Standard ONNX ops are used where no contrib op helps (MatMul, Split, Sigmoid, Mul, Slice); the graph needs ONNX
Runtime (CPU or CUDA provider), not TensorRT, which is why the plain flavour stays the default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import TensorProto

from .builder import CONTRIB_DOMAIN, GraphBuilder, Int4
from .graphs import GraphSpec, past_names, present_names
from .text_graphs import LANGUAGE, rotary_tables
from .weights import CheckpointWeights

FLAVOURS = ("plain", "fused")


class FusedExportError(ValueError):
    """The checkpoint has a feature the fused graph does not implement."""


def check_supported(text_config) -> None:
    """Raises FusedExportError for a Llama feature the fused graph does not build."""
    unsupported = []
    if getattr(text_config, "attention_bias", False):
        unsupported.append("attention_bias")
    if getattr(text_config, "mlp_bias", False):
        unsupported.append("mlp_bias")
    if getattr(text_config, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {text_config.hidden_act!r}")
    if getattr(text_config, "pretraining_tp", 1) != 1:
        unsupported.append("pretraining_tp")
    if unsupported:
        raise FusedExportError(
            f"the fused decoder does not implement {', '.join(unsupported)}: export with --decoder plain"
        )


def _rms_norm(b: GraphBuilder, x: str, weight: str, out: str, name: str, eps: float, opset: int) -> None:
    """RMSNorm in standard ops, for the first layer's input (no residual to fuse yet). ONNX Runtime fuses this
    pattern into SimplifiedLayerNormalization when it loads the graph; written fused, the node would be outside
    any ONNX opset and fail the checker."""
    b.node("Mul", [x, x], [f"{name}/square"], f"{name}/Square")
    if opset >= 18:
        b.constant(f"{name}/axes", np.array([-1], np.int64))
        b.node("ReduceMean", [f"{name}/square", f"{name}/axes"], [f"{name}/mean"], f"{name}/ReduceMean")
    else:
        b.node("ReduceMean", [f"{name}/square"], [f"{name}/mean"], f"{name}/ReduceMean", axes=[-1])
    b.float_constant(f"{name}/epsilon", eps)
    b.node("Add", [f"{name}/mean", f"{name}/epsilon"], [f"{name}/variance"], f"{name}/AddEpsilon")
    b.node("Sqrt", [f"{name}/variance"], [f"{name}/rms"], f"{name}/Sqrt")
    b.node("Div", [x, f"{name}/rms"], [f"{name}/normalized"], f"{name}/Div")
    b.node("Mul", [f"{name}/normalized", weight], [out], f"{name}/Scale")


def build_fused_decoder(
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
    """Build and write the fused decoder with the contract's inputs and outputs (`spec`), weights streamed from
    `weights`; returns its files (same external-data rule as every graph)."""
    check_supported(text_config)
    layers = text_config.num_hidden_layers
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    eps = float(text_config.rms_norm_eps)
    b = GraphBuilder(spec, out_dir, float_dtype, opset, weights, log, int4)
    inputs_embeds, attention_mask, position_ids = (t.name for t in spec.inputs[:3])

    # GroupQueryAttention's lengths: seqlens_k = valid positions - 1 per row, total = the mask's length.
    b.constant("one_i64", np.array(1, np.int64))
    b.constant("axis_1", np.array([1], np.int64))
    b.node("ReduceSum", [attention_mask, "axis_1"], ["mask_sum"], "lengths/ReduceSum", keepdims=0)
    b.node("Sub", ["mask_sum", "one_i64"], ["seqlens_k_i64"], "lengths/Sub")
    b.node("Cast", ["seqlens_k_i64"], ["seqlens_k"], "lengths/Cast", to=TensorProto.INT32)
    b.node("Shape", [attention_mask], ["mask_shape"], "lengths/Shape")
    b.node("Gather", ["mask_shape", "one_i64"], ["total_i64"], "lengths/Gather", axis=0)
    b.node("Cast", ["total_i64"], ["total_sequence_length"], "lengths/CastTotal", to=TensorProto.INT32)

    # rotate_half layout: the two halves of each table are equal; GroupQueryAttention takes one half.
    cos, sin = rotary_tables(text_config, max_context)
    b.array("cos_cache", np.ascontiguousarray(cos[:, : head_dim // 2]))
    b.array("sin_cache", np.ascontiguousarray(sin[:, : head_dim // 2]))

    pasts, presents = past_names(layers), present_names(layers)
    hidden, residual = inputs_embeds, None
    for i in range(layers):
        p, m = f"layers.{i}", f"{LANGUAGE}.layers.{i}"
        attn, mlp = f"{m}.self_attn", f"{m}.mlp"
        norm_in = b.weight(f"{p}.input_layernorm.weight", f"{m}.input_layernorm.weight")
        if residual is None:
            _rms_norm(b, hidden, norm_in, f"{p}/input_norm", f"{p}/input_layernorm", eps, opset)
            residual = hidden
        else:
            _, _, _, residual = b.node(
                "SkipSimplifiedLayerNormalization",
                [hidden, residual, norm_in],
                [f"{p}/input_norm", "", "", f"{p}/residual_in"],
                f"{p}/input_layernorm",
                domain=CONTRIB_DOMAIN,
                epsilon=eps,
            )
        qkv_sources = [f"{attn}.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj")]
        b.linear(f"{p}/input_norm", f"{p}/qkv", f"{p}/qkv_proj", f"{p}.self_attn.qkv_proj.weight", qkv_sources)
        b.node(
            "GroupQueryAttention",
            [
                f"{p}/qkv",
                "",
                "",
                pasts[2 * i],
                pasts[2 * i + 1],
                "seqlens_k",
                "total_sequence_length",
                "cos_cache",
                "sin_cache",
                position_ids,
            ],
            [f"{p}/attention", presents[2 * i], presents[2 * i + 1]],
            f"{p}/GroupQueryAttention",
            domain=CONTRIB_DOMAIN,
            num_heads=heads,
            kv_num_heads=kv_heads,
            scale=float(head_dim**-0.5),
            do_rotary=1,
            rotary_interleaved=0,
        )
        b.linear(f"{p}/attention", f"{p}/attn_out", f"{p}/o_proj", f"{p}.self_attn.o_proj.weight",
                 [f"{attn}.o_proj.weight"])  # fmt: skip
        norm_post = b.weight(f"{p}.post_attention_layernorm.weight", f"{m}.post_attention_layernorm.weight")
        b.node(
            "SkipSimplifiedLayerNormalization",
            [f"{p}/attn_out", residual, norm_post],
            [f"{p}/post_norm", "", "", f"{p}/residual_mid"],
            f"{p}/post_attention_layernorm",
            domain=CONTRIB_DOMAIN,
            epsilon=eps,
        )
        residual = f"{p}/residual_mid"
        ffn = weights.shape(f"{mlp}.gate_proj.weight")[0]
        b.linear(f"{p}/post_norm", f"{p}/gate_up", f"{p}/gate_up_proj", f"{p}.mlp.gate_up_proj.weight",
                 [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"])  # fmt: skip
        b.constant(f"{p}/split", np.array([ffn, ffn], np.int64))
        b.node("Split", [f"{p}/gate_up", f"{p}/split"], [f"{p}/gate", f"{p}/up"], f"{p}/Split", axis=-1)
        b.node("Sigmoid", [f"{p}/gate"], [f"{p}/gate_sigmoid"], f"{p}/Sigmoid")
        b.node("Mul", [f"{p}/gate", f"{p}/gate_sigmoid"], [f"{p}/gate_silu"], f"{p}/SiLU")
        b.node("Mul", [f"{p}/gate_silu", f"{p}/up"], [f"{p}/gated"], f"{p}/Gate")
        b.linear(f"{p}/gated", f"{p}/mlp_out", f"{p}/down_proj", f"{p}.mlp.down_proj.weight",
                 [f"{mlp}.down_proj.weight"])  # fmt: skip
        hidden = f"{p}/mlp_out"
        b.progress.step(f"layer {i + 1}/{layers}")

    # Only the last position's logits are sampled from: the final norm and the LM head see one row.
    b.constant("last_start", np.array([-1], np.int64))
    b.constant("last_end", np.array([np.iinfo(np.int64).max], np.int64))
    b.node("Slice", [hidden, "last_start", "last_end", "axis_1"], ["last_hidden"], "last/SliceHidden")
    b.node("Slice", [residual, "last_start", "last_end", "axis_1"], ["last_residual"], "last/SliceResidual")
    b.weight("norm.weight", f"{LANGUAGE}.norm.weight")
    b.node(
        "SkipSimplifiedLayerNormalization",
        ["last_hidden", "last_residual", "norm.weight"],
        ["final_norm"],
        "norm",
        domain=CONTRIB_DOMAIN,
        epsilon=eps,
    )
    b.lm_head("final_norm", spec.outputs[0].name, "lm_head.weight")
    b.progress.step("LM head")
    return b.finish("llama3v_decoder_fused", external_data)
