"""A LlavaForConditionalGeneration whose weights stay in the checkpoint until a module runs.

Built on the meta device (no memory), it is transformers' own model code; validation runs it as the PyTorch
reference with every module's weights loaded in fp32 just before its forward and dropped just after, so the
reference of an 8B model never holds more than its largest weight (the LM head or the embedding table) in fp32.
"""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

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
    remaining = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if remaining:
        raise NotImplementedError(f"buffers the export cannot compute: {', '.join(remaining)}")
    return model.eval()


def _drop(module: torch.nn.Module) -> None:
    for name, param in module.named_parameters(recurse=False):
        setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))


def lazy_reference(config: LlavaConfig, weights: CheckpointWeights) -> LlavaForConditionalGeneration:
    """The fp32 reference whose modules load their own weights for each forward and drop them after."""
    model = meta_model(config)
    for prefix, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        module.register_forward_pre_hook(
            lambda m, _args, prefix=prefix: _load_own(m, prefix, weights), with_kwargs=False
        )
        module.register_forward_hook(lambda m, _args, _out: _drop(m))
    return model


def _load_own(module: torch.nn.Module, prefix: str, weights: CheckpointWeights) -> None:
    for name, _ in list(module.named_parameters(recurse=False)):
        tensor = weights.tensor(f"{prefix}.{name}", torch.float32)
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))
