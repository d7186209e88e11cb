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

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import LlavaForConditionalGeneration

from .graphs import GraphSpec, past_names, present_names, write_graph

FLAVOURS = ("plain", "fused")
CONTRIB_DOMAIN = "com.microsoft"
ONNX_FLOAT = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
NUMPY_FLOAT = {"float32": np.float32, "float16": np.float16}


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


class _Builder:
    """Accumulates nodes and initializers; names weights after the module they come from."""

    def __init__(self, float_dtype: str):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.float_dtype = float_dtype

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        array = tensor.detach().to(torch.float32).numpy().astype(NUMPY_FLOAT[self.float_dtype])
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs


def _rotary_tables(model: LlavaForConditionalGeneration, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin per position and frequency `[max_context, head_dim/2]`, from the model's own rotary embedding (so
    every rope type transformers implements, Llama-3's frequency scaling included, is what the tables hold)."""
    language = model.model.language_model
    positions = torch.arange(max_context, dtype=torch.int64)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = language.rotary_emb(probe, positions)
    half = cos.shape[-1] // 2
    # rotate_half layout: the two halves of the table are equal; GroupQueryAttention takes one half.
    return cos[0, :, :half], sin[0, :, :half]


def _rms_norm(b: _Builder, x: str, weight: str, out: str, name: str, eps: float, opset: int) -> None:
    """RMSNorm in standard ops, for the first layer's input (no residual to fuse yet). ONNX Runtime fuses this
    pattern into SimplifiedLayerNormalization when it loads the graph; written fused, the node would be outside
    any ONNX opset and fail the checker."""
    b.node("Mul", [x, x], [f"{name}/square"], f"{name}/Square")
    if opset >= 18:
        b.constant(f"{name}/axes", np.array([-1], np.int64))
        b.node("ReduceMean", [f"{name}/square", f"{name}/axes"], [f"{name}/mean"], f"{name}/ReduceMean")
    else:
        b.node("ReduceMean", [f"{name}/square"], [f"{name}/mean"], f"{name}/ReduceMean", axes=[-1])
    b.constant(f"{name}/epsilon", np.array(eps, NUMPY_FLOAT[b.float_dtype]))
    b.node("Add", [f"{name}/mean", f"{name}/epsilon"], [f"{name}/variance"], f"{name}/AddEpsilon")
    b.node("Sqrt", [f"{name}/variance"], [f"{name}/rms"], f"{name}/Sqrt")
    b.node("Div", [x, f"{name}/rms"], [f"{name}/normalized"], f"{name}/Div")
    b.node("Mul", [f"{name}/normalized", weight], [out], f"{name}/Scale")


def build_fused_decoder(
    model: LlavaForConditionalGeneration, spec: GraphSpec, float_dtype: str, opset: int, max_context: int
) -> onnx.ModelProto:
    """The fused decoder of `model` with the contract's inputs and outputs (`spec`)."""
    text = model.config.text_config
    check_supported(text)
    language = model.model.language_model
    layers = language.layers
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    eps = float(text.rms_norm_eps)
    b = _Builder(float_dtype)
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

    cos, sin = _rotary_tables(model, max_context)
    b.weight("cos_cache", cos)
    b.weight("sin_cache", sin)

    pasts, presents = past_names(len(layers)), present_names(len(layers))
    hidden, residual = inputs_embeds, None
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        norm_in = b.weight(f"{p}.input_layernorm.weight", layer.input_layernorm.weight)
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
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0).T
        b.weight(f"{p}.self_attn.qkv_proj.weight", qkv)
        b.node("MatMul", [f"{p}/input_norm", f"{p}.self_attn.qkv_proj.weight"], [f"{p}/qkv"], f"{p}/qkv_proj")
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
            scale=float(attn.scaling),
            do_rotary=1,
            rotary_interleaved=0,
        )
        b.weight(f"{p}.self_attn.o_proj.weight", attn.o_proj.weight.T)
        b.node("MatMul", [f"{p}/attention", f"{p}.self_attn.o_proj.weight"], [f"{p}/attn_out"], f"{p}/o_proj")
        norm_post = b.weight(f"{p}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
        b.node(
            "SkipSimplifiedLayerNormalization",
            [f"{p}/attn_out", residual, norm_post],
            [f"{p}/post_norm", "", "", f"{p}/residual_mid"],
            f"{p}/post_attention_layernorm",
            domain=CONTRIB_DOMAIN,
            epsilon=eps,
        )
        residual = f"{p}/residual_mid"
        ffn = mlp.gate_proj.weight.shape[0]
        b.weight(f"{p}.mlp.gate_up_proj.weight", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0).T)
        b.node("MatMul", [f"{p}/post_norm", f"{p}.mlp.gate_up_proj.weight"], [f"{p}/gate_up"], f"{p}/gate_up_proj")
        b.constant(f"{p}/split", np.array([ffn, ffn], np.int64))
        b.node("Split", [f"{p}/gate_up", f"{p}/split"], [f"{p}/gate", f"{p}/up"], f"{p}/Split", axis=-1)
        b.node("Sigmoid", [f"{p}/gate"], [f"{p}/gate_sigmoid"], f"{p}/Sigmoid")
        b.node("Mul", [f"{p}/gate", f"{p}/gate_sigmoid"], [f"{p}/gate_silu"], f"{p}/SiLU")
        b.node("Mul", [f"{p}/gate_silu", f"{p}/up"], [f"{p}/gated"], f"{p}/Gate")
        b.weight(f"{p}.mlp.down_proj.weight", mlp.down_proj.weight.T)
        b.node("MatMul", [f"{p}/gated", f"{p}.mlp.down_proj.weight"], [f"{p}/mlp_out"], f"{p}/down_proj")
        hidden = f"{p}/mlp_out"

    # Only the last position's logits are sampled from: the final norm and the LM head see one row.
    b.constant("last_start", np.array([-1], np.int64))
    b.constant("last_end", np.array([np.iinfo(np.int64).max], np.int64))
    b.node("Slice", [hidden, "last_start", "last_end", "axis_1"], ["last_hidden"], "last/SliceHidden")
    b.node("Slice", [residual, "last_start", "last_end", "axis_1"], ["last_residual"], "last/SliceResidual")
    b.weight("norm.weight", language.norm.weight)
    b.node(
        "SkipSimplifiedLayerNormalization",
        ["last_hidden", "last_residual", "norm.weight"],
        ["final_norm"],
        "norm",
        domain=CONTRIB_DOMAIN,
        epsilon=eps,
    )
    b.weight("lm_head.weight", model.lm_head.weight.T)
    b.node("MatMul", ["final_norm", "lm_head.weight"], [spec.outputs[0].name], "lm_head")

    elem = ONNX_FLOAT[float_dtype]
    graph_inputs = [
        helper.make_tensor_value_info(t.name, elem if t.dtype != "int64" else TensorProto.INT64, list(t.shape))
        for t in spec.inputs
    ]
    graph_outputs = [helper.make_tensor_value_info(t.name, elem, list(t.shape)) for t in spec.outputs]
    graph = helper.make_graph(b.nodes, "llama3v_decoder_fused", graph_inputs, graph_outputs, b.initializers)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(CONTRIB_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="llama3v-export")


def export_fused_decoder(
    model: LlavaForConditionalGeneration,
    spec: GraphSpec,
    out_dir: Path,
    float_dtype: str,
    opset: int,
    max_context: int,
    external_data: bool | None = None,
) -> list[Path]:
    """Build and write the fused decoder into `out_dir` (same external-data rule as the traced graphs)."""
    proto = build_fused_decoder(model, spec, float_dtype, opset, max_context)
    return write_graph(proto, out_dir / spec.file, spec, external_data)
