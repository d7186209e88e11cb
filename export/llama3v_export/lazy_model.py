"""Reference models whose weights stay in the checkpoint until a module runs.

Built on the meta device (no memory), they are transformers' own model code; validation runs them as the PyTorch
reference with every module's weights loaded in fp32 just before its forward and dropped just after, so the
reference of an 8B model never holds more than its largest weight (the LM head or the embedding table) in fp32.
`lazy_reference` is the LLaVA model; `lazy_language_model` the Llama-3 causal LM alone (MiniCPM-V's `llm`), its
weights named as the LLaVA model's language model so one key table per layout serves the graphs and the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .text_graphs import LANGUAGE
from .weights import CheckpointWeights


def meta_model(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """The model with meta parameters, eager attention, and its computed buffers (rotary frequencies, patch
    positions) real."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    # A checkpoint's config names its dtype (bf16 for real ones); modules read their dtype from their parameters,
    # which are loaded in the dtype asked for.
    model.to(torch.float32)
    model.set_attn_implementation("eager")
    language = model.model.language_model
    language.rotary_emb = LlamaRotaryEmbedding(config=config.text_config)
    embeddings = model.model.vision_tower.embeddings
    shape = embeddings.position_ids.shape
    embeddings.register_buffer("position_ids", torch.arange(shape[-1]).expand(shape), persistent=False)
    _check_buffers(model)
    return model.eval()


def _check_buffers(model: torch.nn.Module) -> None:
    remaining = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if remaining:
        raise NotImplementedError(f"buffers the export cannot compute: {', '.join(remaining)}")


def _drop(module: torch.nn.Module) -> None:
    for name, param in module.named_parameters(recurse=False):
        setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))


def _make_lazy(
    model: torch.nn.Module, weights: CheckpointWeights, weight_name: Callable[[str], str] = lambda name: name
) -> torch.nn.Module:
    """Hooks on every module with parameters of its own: load them (named `weight_name(module path)`) before its
    forward, drop them after."""
    for prefix, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        name = weight_name(prefix)
        module.register_forward_pre_hook(lambda m, _args, name=name: _load_own(m, name, weights), with_kwargs=False)
        module.register_forward_hook(lambda m, _args, _out: _drop(m))
    return model


def lazy_reference(config: LlavaConfig, weights: CheckpointWeights) -> LlavaForConditionalGeneration:
    """The fp32 reference whose modules load their own weights for each forward and drop them after."""
    return _make_lazy(meta_model(config), weights)


def lazy_language_model(text_config, weights: CheckpointWeights) -> LlamaForCausalLM:
    """The fp32 Llama causal LM of `text_config`, lazy like `lazy_reference`; its `model.*` weights are read as
    `model.language_model.*` and `lm_head.*` as is (the LLaVA model's names, which `weights` maps to its layout's
    keys)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(text_config)
    model.to(torch.float32)
    model.set_attn_implementation("eager")
    model.model.rotary_emb = LlamaRotaryEmbedding(config=text_config)
    _check_buffers(model)

    def llava_name(path: str) -> str:
        return f"{LANGUAGE}.{path[len('model.') :]}" if path.startswith("model.") else path

    return _make_lazy(model.eval(), weights, llava_name)


def _load_own(module: torch.nn.Module, prefix: str, weights: CheckpointWeights) -> None:
    for name, _ in list(module.named_parameters(recurse=False)):
        tensor = weights.tensor(f"{prefix}.{name}", torch.float32)
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))
