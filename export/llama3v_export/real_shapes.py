"""The `real-shapes` checkpoint: the real target's dimensions, random weights, a chosen number of layers.

Llama-3-8B's text model (hidden 4096, FFN 14336, 32 query and 8 KV heads, vocabulary 128256 + the image token,
rope theta 500000, 8192 positions) and SigLIP-so400m-patch14-384's vision tower (hidden 1152, FFN 4304, 16 heads,
384 px, 729 image tokens), with `decoder_layers` and `vision_layers` layers. Written tensor by tensor into bf16
safetensors, as real checkpoints ship, without ever holding the model: one decoder layer is already 2.6 GB of
weights (the embedding table and the LM head are 1 GB each), and 32 layers would be 16 GB.

safetensors' own writers (`save_file`, `save_model`) take every tensor at once; the format is a JSON header of
offsets followed by the raw bytes, so the header is written first from the shapes alone and each tensor is
generated and appended in row chunks.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from .tiny import (
    WEIGHT_GAIN,
    Preset,
    _matrix_std,
    generation_config,
    llava_config,
    processor,
    write_processor_files,
)

REAL_SHAPES_PRESET = "real-shapes"
DEFAULT_DECODER_LAYERS = 1
DEFAULT_VISION_LAYERS = 2
MAX_POSITION_EMBEDDINGS = 8192
# Shards of at most this many bytes, as Hugging Face checkpoints are split (an index names each tensor's shard).
SHARD_BYTES = 4 * 2**30
# Random values are generated and written this many elements at a time.
CHUNK_ELEMENTS = 1 << 24

# Module names of a LlavaForConditionalGeneration -> the keys its `save_pretrained` writes (transformers keeps
# the original LLaVA checkpoint layout on disk).
SAVED_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def real_shapes_preset(decoder_layers: int, vision_layers: int) -> Preset:
    """Llama-3-8B + SigLIP-so400m-patch14-384 with the given layer counts (LLaVA's second-to-last vision layer)."""
    if decoder_layers < 1 or vision_layers < 1:
        raise ValueError(f"real-shapes needs at least one layer of each (got {decoder_layers}, {vision_layers})")
    return Preset(4096, decoder_layers, 32, 8, 14336, 384, 14, 1152, vision_layers, 16, 4304, -2)


def real_shapes_config(decoder_layers: int, vision_layers: int) -> LlavaConfig:
    config = llava_config(real_shapes_preset(decoder_layers, vision_layers))
    config.text_config.max_position_embeddings = MAX_POSITION_EMBEDDINGS
    config.dtype = torch.bfloat16
    config.text_config.dtype = config.vision_config.dtype = torch.bfloat16
    return config


def saved_name(module_name: str) -> str:
    for module_prefix, saved_prefix in SAVED_PREFIXES:
        if module_name.startswith(module_prefix):
            return saved_prefix + module_name[len(module_prefix) :]
    return module_name


def _parameters(config: LlavaConfig) -> list[tuple[str, str, torch.Size]]:
    """(module name, saved name, shape) of every parameter, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return [(name, saved_name(name), p.shape) for name, p in model.named_parameters()]


def _random_chunks(name: str, shape: torch.Size, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's values in bf16, row chunk by row chunk, drawn by the rules of `tiny.randomize_`."""
    generator = torch.Generator().manual_seed(seed)
    meta = torch.empty(shape, device="meta")
    rows = shape[0]
    row_elements = max(meta[0].numel(), 1) if meta.ndim > 1 else 1
    step = max(1, CHUNK_ELEMENTS // row_elements)
    for start in range(0, rows, step):
        chunk_shape = (min(step, rows - start), *shape[1:])
        noise = torch.randn(chunk_shape, generator=generator, dtype=torch.float32)
        if meta.ndim >= 2:
            values = noise * _matrix_std(name, meta, WEIGHT_GAIN)
        elif "norm" in name and name.endswith("weight"):
            values = 1.0 + 0.1 * noise
        else:
            values = 0.02 * noise
        yield values.to(torch.bfloat16)


def _write_shard(path: Path, tensors: list[tuple[str, str, torch.Size]], seed: int, first: int, log) -> None:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, saved, shape in tensors:
        size = 2 * shape.numel()
        header[saved] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for index, (name, _, shape) in enumerate(tensors, first):
            for chunk in _random_chunks(name, shape, seed * 1_000_003 + index):
                f.write(chunk.view(torch.int16).numpy().tobytes())
    log(f"wrote {path.name}: {len(tensors)} tensors, {offset / 2**30:.2f} GiB")


def write_real_shapes_checkpoint(
    out: Path,
    decoder_layers: int = DEFAULT_DECODER_LAYERS,
    vision_layers: int = DEFAULT_VISION_LAYERS,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """A complete checkpoint directory (config, bf16 safetensors shards with an index, tokenizer, processor and
    generation files) whose memory use does not grow with the model."""
    config = real_shapes_config(decoder_layers, vision_layers)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    parameters = _parameters(config)
    shards: list[list[tuple[str, str, torch.Size]]] = [[]]
    shard_bytes = 0
    for parameter in parameters:
        size = 2 * parameter[2].numel()
        if shards[-1] and shard_bytes + size > SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(parameter)
        shard_bytes += size
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    first = 0
    for name, tensors in zip(names, shards, strict=True):
        _write_shard(out / name, tensors, seed, first, log)
        first += len(tensors)
    total = sum(2 * shape.numel() for _, _, shape in parameters)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {saved: name for name, tensors in zip(names, shards, strict=True) for _, saved, _ in tensors},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    generation_config().save_pretrained(out)
    write_processor_files(processor(real_shapes_preset(decoder_layers, vision_layers)), out)
    return out
