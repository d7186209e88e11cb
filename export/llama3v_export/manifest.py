"""manifest.json: the model directory's contract with the runtime (onnx/README.md, format version 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer

from . import __version__
from .checkpoint import PIL_RESAMPLE, Checkpoint, CheckpointError
from .digest import sha256
from .graphs import Dims, GraphSpec

FORMAT = "llama3v-model"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"


def graph_entry(spec: GraphSpec, files: list[Path]) -> dict[str, Any]:
    """A graph's file, checksums, and inputs/outputs in contract order; `external_data` is [] when the weights
    are inside the graph file."""
    graph, *external = files
    return {
        "file": graph.name,
        "sha256": sha256(graph),
        "external_data": [{"file": p.name, "sha256": sha256(p)} for p in external],
        "inputs": [t.to_json() for t in spec.inputs],
        "outputs": [t.to_json() for t in spec.outputs],
    }


def _token_content(token: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token


def _token_id(tokenizer: Tokenizer, token: str, source: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise CheckpointError(f"{source} names {token!r}, which is not in tokenizer.json")
    return token_id


def model_section(dims) -> dict:
    """The manifest's `model` dims, the same for every layout."""
    return {
        "num_layers": dims.num_layers,
        "num_attention_heads": dims.num_attention_heads,
        "num_kv_heads": dims.num_kv_heads,
        "head_dim": dims.head_dim,
        "hidden_size": dims.hidden_size,
        "vocab_size": dims.vocab_size,
        "max_context": dims.max_context,
    }


def provenance_section(
    checkpoint: Checkpoint, opset: int, dtype: str, quantization: dict[str, Any] | None, **layout: str
) -> dict[str, Any]:
    """Where the export came from and what made it; `layout` adds layout-specific keys (both layouts)."""
    return {
        "source_checkpoint": str(checkpoint.path.resolve()),
        **layout,
        "exporter": f"llama3v-export {__version__}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx_opset": opset,
        "dtype": dtype,
        "quantization": quantization["method"] if quantization else None,
    }


def generation_section(generation: dict) -> dict:
    """The sampling defaults of generation_config.json the runtime resolves requests against; unset ones are null."""
    return {k: generation.get(k) for k in ("temperature", "top_p", "top_k", "do_sample", "repetition_penalty")}


def text_settings(checkpoint: Checkpoint) -> dict[str, Any]:
    """Tokenizer file, BOS, end-of-turn token, stop ids (generation_config.json's eos_token_id) and template."""
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_file))
    generation = checkpoint.generation_config
    bos = _token_content(checkpoint.tokenizer_config.get("bos_token"))
    if bos is None:
        bos = tokenizer.id_to_token(generation["bos_token_id"])
    eos = _token_content(checkpoint.tokenizer_config.get("eos_token"))
    stop = generation.get("eos_token_id", checkpoint.config["text_config"].get("eos_token_id"))
    if stop is None:
        raise CheckpointError(f"{checkpoint.path}: generation_config.json has no eos_token_id (the stop tokens)")
    stop_ids = [stop] if isinstance(stop, int) else list(stop)
    if eos is not None:
        _token_id(tokenizer, eos, "tokenizer_config.json eos_token")
    return {
        "tokenizer_file": TOKENIZER_FILE,
        "bos_token": bos,
        "bos_token_id": _token_id(tokenizer, bos, "tokenizer_config.json bos_token"),
        "eos_token": eos,
        "pad_token_id": generation.get("pad_token_id"),
        "stop_token_ids": stop_ids,
        "chat_template": checkpoint.chat_template,
    }


def image_settings(checkpoint: Checkpoint, dims: Dims) -> dict[str, Any]:
    """Preprocessing as the checkpoint's SigLIP image processor does it, and the image token."""
    image = checkpoint.image_settings
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_file))
    token_id = _token_id(tokenizer, checkpoint.image_token, "the processor's image_token")
    if token_id != checkpoint.image_token_id:
        raise CheckpointError(
            f"{checkpoint.path}: tokenizer.json gives {checkpoint.image_token} id {token_id}, config.json says "
            f"{checkpoint.image_token_id}"
        )
    return {
        "height": image["size"]["height"],
        "width": image["size"]["width"],
        "resample": PIL_RESAMPLE[image["resample"]],
        "do_rescale": image["do_rescale"],
        "rescale_factor": image["rescale_factor"],
        "do_normalize": image["do_normalize"],
        "mean": list(image["image_mean"]),
        "std": list(image["image_std"]),
        "do_convert_rgb": image["do_convert_rgb"],
        "tokens_per_image": dims.tokens_per_image,
        "image_token": checkpoint.image_token,
        "image_token_id": token_id,
    }


def build_manifest(
    checkpoint: Checkpoint,
    dims: Dims,
    specs: dict[str, GraphSpec],
    files: dict[str, list[Path]],
    dtype: str,
    opset: int,
    quantization: dict[str, Any] | None = None,
    decoder_flavour: str = "plain",
) -> dict[str, Any]:
    """`quantization` (quantize.quantization_entry) is written when graphs were quantized; `dtype` stays the
    float type of the graphs' inputs and outputs. `decoder_flavour` is how the decoder graph was built."""
    generation = checkpoint.generation_config
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "decoder_flavour": decoder_flavour,
        "graphs": {name: graph_entry(specs[name], files[name]) for name in ("vision", "embed", "decoder")},
        "model": model_section(dims),
        "image": image_settings(checkpoint, dims),
        "text": text_settings(checkpoint),
        "generation": generation_section(generation),
        "provenance": provenance_section(checkpoint, opset, dtype, quantization),
    }
    if quantization is not None:
        manifest["quantization"] = quantization
    return manifest


def write_model_files(out: Path, checkpoint: Checkpoint, manifest: dict[str, Any]) -> Path:
    """Copy the tokenizer beside the graphs and write manifest.json (last, so a directory with a manifest is
    complete)."""
    shutil.copyfile(checkpoint.tokenizer_file, out / TOKENIZER_FILE)
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
