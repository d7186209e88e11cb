"""The graphs' contract (names, dtypes, shapes: onnx/README.md) and the model dims they are built from; the
graphs themselves are built node by node (vision_graph.py, text_graphs.py, fused.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from transformers import LlavaForConditionalGeneration

# Weights past this size stay in `<graph>.onnx.data` by default. ONNX Runtime copies initializers embedded in the
# protobuf out of the parsed file at load, so an embedded graph briefly needs its weights twice (the mid preset:
# 980 MiB peak against 711 MiB external); external data is read straight into place. Protobuf also cannot hold
# a message over 2 GiB at all. Small graphs stay one self-contained file.
EXTERNAL_DATA_THRESHOLD = 64 * 2**20

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, element type and shape (ints fixed, strings symbolic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """A graph's file stem and its inputs and outputs, in contract order."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


@dataclass(frozen=True)
class Dims:
    """The model dimensions the graphs and the manifest are built from (read from config.json)."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int
    image_size: int
    patch_size: int
    vision_feature_layer: int

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def dims_from_config(config) -> Dims:
    """Dims of a `LlavaConfig`; `vision_feature_layer` must be a single layer (a list concatenates layers)."""
    text, vision = config.text_config, config.vision_config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: only a single layer index is supported")
    return text_dims(text, vision.image_size, vision.patch_size, layer)


def text_dims(text, image_size: int, patch_size: int, vision_feature_layer: int) -> Dims:
    """Dims of the Llama config `text`, with the vision side's image and patch size (both layouts)."""
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Dims(
        num_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=head_dim,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        max_context=text.max_position_embeddings,
        image_size=image_size,
        patch_size=patch_size,
        vision_feature_layer=vision_feature_layer,
    )


def past_names(num_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def graph_specs(dims: Dims, float_dtype: str) -> dict[str, GraphSpec]:
    """Names, dtypes, shapes and order of every graph input and output, exactly as onnx/README.md lists them."""
    d, f = dims, float_dtype
    kv_past = ("batch", d.num_kv_heads, "past_sequence", d.head_dim)
    kv_total = ("batch", d.num_kv_heads, "total_sequence", d.head_dim)
    vision = GraphSpec(
        "vision",
        (TensorSpec("pixel_values", f, ("batch", 3, d.image_size, d.image_size)),),
        (TensorSpec("image_features", f, ("batch", d.tokens_per_image, d.hidden_size)),),
    )
    embed = GraphSpec(
        "embed",
        (TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        (TensorSpec("inputs_embeds", f, ("batch", "sequence", d.hidden_size)),),
    )
    decoder = GraphSpec(
        "decoder",
        (
            TensorSpec("inputs_embeds", f, ("batch", "sequence", d.hidden_size)),
            TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
            TensorSpec("position_ids", "int64", ("batch", "sequence")),
            *(TensorSpec(n, f, kv_past) for n in past_names(d.num_layers)),
        ),
        (
            TensorSpec("logits", f, ("batch", 1, d.vocab_size)),
            *(TensorSpec(n, f, kv_total) for n in present_names(d.num_layers)),
        ),
    )
    return {"vision": vision, "embed": embed, "decoder": decoder}


def dummy_inputs(spec: GraphSpec, sizes: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for `spec`, symbolic dims resolved from `sizes`; attention mask all ones, positions after
    the past, token ids below the text vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    batch, seq, past = sizes["batch"], sizes["sequence"], sizes["past_sequence"]
    resolved = {**sizes, "total_sequence": past + seq}
    tensors: dict[str, torch.Tensor] = {}
    for t in spec.inputs:
        shape = [resolved[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "attention_mask":
            tensors[t.name] = torch.ones(shape, dtype=torch.int64)
        elif t.name == "position_ids":
            tensors[t.name] = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
        elif t.name == "input_ids":
            tensors[t.name] = torch.randint(0, sizes["vocab"], shape, generator=generator, dtype=torch.int64)
        else:
            tensors[t.name] = torch.randn(shape, generator=generator).to(TORCH_DTYPES[t.dtype])
    return tensors


def check_io(path: Path, spec: GraphSpec) -> None:
    """The exported graph's inputs and outputs must be the spec's: same names, order, element types and dims."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for kind, actual, expected in (("input", graph.input, spec.inputs), ("output", graph.output, spec.outputs)):
        got = [(v.name, _onnx_dtype(v), _onnx_shape(v)) for v in actual]
        want = [(t.name, t.dtype, tuple(t.shape)) for t in expected]
        if got != want:
            raise AssertionError(f"{spec.file}: {kind}s differ from the contract:\n  got  {got}\n  want {want}")


def _onnx_dtype(value: onnx.ValueInfoProto) -> str:
    return ONNX_DTYPES.get(value.type.tensor_type.elem_type, str(value.type.tensor_type.elem_type))


def _onnx_shape(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)


def load_model(checkpoint: Path, dtype: str) -> LlavaForConditionalGeneration:
    """The checkpoint as a CPU model in eval mode, eager attention (the sdpa path's masks trace poorly)."""
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch_dtype, attn_implementation="eager", use_safetensors=True
    )
    return model.eval()
