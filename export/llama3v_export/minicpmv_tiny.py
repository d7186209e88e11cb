"""Tiny random-weight checkpoints in the MiniCPM-Llama3-V 2.5 layout (`llama3v-tiny --preset tiny-minicpmv`).

The files are the ones the published checkpoint carries: config.json (model_type "minicpmv", the Llama fields at
the top, `query_num`, `slice_mode`, `slice_config`, `drop_vision_last_layer`, an Idefics2 `vision_config`),
safetensors weights named `vpm.*`, `resampler.*`, `llm.*`, the Llama-3 tokenizer with 2.5's special tokens in
reserved slots, tokenizer_config.json holding the chat template, generation_config.json, and no preprocessor
config (2.5 holds its pixel constants in code). Small dims and a small `scale_resolution`, so that real photographs
are cut into full grids of slices quickly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from .minicpmv import (
    EOT_TOKEN,
    IMAGE_END,
    IMAGE_START,
    MODEL_TYPE,
    PLACEHOLDER,
    RENAMED_PREFIXES,
    SLICE_END,
    SLICE_START,
    MiniCPMV,
)
from .tiny import QK_SHARPEN, WEIGHT_GAIN, randomize_
from .tokenizer import BOS_TOKEN, BOS_TOKEN_ID, _llama3_tiktoken, check_against_tiktoken, llama3_special_tokens

# 2.5's special tokens take these reserved Llama-3 slots (the llama3v release uses the same ids).
SPECIAL_TOKEN_IDS = {
    PLACEHOLDER: 128002,
    IMAGE_START: 128010,
    IMAGE_END: 128011,
    SLICE_START: 128020,
    SLICE_END: 128021,
}
EOS_TOKEN = "<|end_of_text|>"
STOP_TOKEN_IDS = [128001, 128009]

# Llama-3-Instruct's template as 2.5 ships it: it ends with the assistant header whatever
# `add_generation_prompt` says, and 2.5's code renders it with add_generation_prompt=False.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)


@dataclass(frozen=True)
class MiniCPMVPreset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vision_hidden_size: int
    vision_num_hidden_layers: int
    vision_num_attention_heads: int
    vision_intermediate_size: int
    # Position buckets per side of the vision tower's table (70 in 2.5: image_size 980 / patch 14).
    vision_buckets: int
    scale_resolution: int
    query_num: int = 96
    max_slice_nums: int = 9
    patch_size: int = 14
    drop_vision_last_layer: bool = False


MINICPMV_PRESETS = {
    # 2 resampler heads (hidden 256 / 128), GQA 2; 4 x 4 patches per slice at scale_resolution 56, so a 512 x 512
    # photograph makes an overview and a 3 x 3 grid.
    "tiny-minicpmv": MiniCPMVPreset(256, 2, 4, 2, 512, 64, 2, 2, 128, 10, 56),
}


def checkpoint_config(preset: MiniCPMVPreset) -> dict:
    """config.json as 2.5 publishes it (a LlamaConfig with the vision and slicing fields beside)."""
    return {
        "architectures": ["MiniCPMV"],
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
            "AutoModel": "modeling_minicpmv.MiniCPMV",
            "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
        },
        "model_type": MODEL_TYPE,
        "version": "2.5",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": STOP_TOKEN_IDS[0],
        "hidden_act": "silu",
        "hidden_size": preset.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": preset.intermediate_size,
        "max_position_embeddings": 8192,
        "num_attention_heads": preset.num_attention_heads,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_key_value_heads": preset.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": 128256,
        "batch_vision_input": True,
        "drop_vision_last_layer": preset.drop_vision_last_layer,
        "image_size": preset.scale_resolution,
        "patch_size": preset.patch_size,
        "query_num": preset.query_num,
        "slice_mode": True,
        "slice_config": {
            "model_type": MODEL_TYPE,
            "max_slice_nums": preset.max_slice_nums,
            "patch_size": preset.patch_size,
            "scale_resolution": preset.scale_resolution,
        },
        "vision_config": {
            "model_type": "idefics2",
            "hidden_size": preset.vision_hidden_size,
            "image_size": preset.vision_buckets * preset.patch_size,
            "intermediate_size": preset.vision_intermediate_size,
            "num_attention_heads": preset.vision_num_attention_heads,
            "num_hidden_layers": preset.vision_num_hidden_layers,
            "patch_size": preset.patch_size,
        },
    }


def build_minicpmv_tokenizer() -> Tokenizer:
    """The Llama-3 tokenizer with 2.5's special tokens in their reserved slots (vocabulary stays 128256)."""
    path, llama3 = _llama3_tiktoken()
    specials = llama3_special_tokens()
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        specials[token_id - BOS_TOKEN_ID] = token
    converter = TikTokenConverter(vocab_file=str(path), pattern=llama3.pat_str, extra_special_tokens=specials)
    tokenizer = converter.converted()
    for token, token_id in {**SPECIAL_TOKEN_IDS, BOS_TOKEN: BOS_TOKEN_ID, EOT_TOKEN: 128009}.items():
        if tokenizer.token_to_id(token) != token_id:
            raise AssertionError(f"tokenizer conversion: {token} has id {tokenizer.token_to_id(token)}, not {token_id}")
    return tokenizer


def write_tokenizer_files(out: Path) -> None:
    converted = build_minicpmv_tokenizer()
    check_against_tiktoken(converted)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converted, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=PLACEHOLDER
    )
    save_minicpmv_tokenizer(tokenizer, out)


def save_minicpmv_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Saves `tokenizer` as 2.5 ships it: the chat template inside tokenizer_config.json, not beside it."""
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def randomize_minicpmv_(model: MiniCPMV, seed: int) -> None:
    """tiny.randomize_'s rule, plus LayerNorm scales near 1 for the resampler's `ln_*` and sharper decoder
    attention (tiny.QK_SHARPEN), so greedy decoding does not settle on one token."""
    randomize_(model, WEIGHT_GAIN, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("resampler.ln_") and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            if name.startswith("llm.") and name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(QK_SHARPEN)


def make_minicpmv_checkpoint(preset_name: str, out: Path, seed: int = 0, renamed: bool = False) -> Path:
    """Write a random-weight checkpoint; `renamed` writes the llama3v release's weight names instead."""
    preset = MINICPMV_PRESETS[preset_name]
    out.mkdir(parents=True, exist_ok=True)
    config = checkpoint_config(preset)
    torch.manual_seed(seed)
    model = MiniCPMV(config).eval()
    randomize_minicpmv_(model, seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if renamed:
        back = {new: old for old, new in RENAMED_PREFIXES.items()}
        state = {next((back[p] + k[len(p) :] for p in back if k.startswith(p)), k): v for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": STOP_TOKEN_IDS,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 100,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(out)
    return out
