"""Reference cases computed by transformers (fp32, CPU) for `llama3v check` (see onnx/README.md, reference/).

Each case is a chat (optional system prompt, images then a prompt) run through `LlavaProcessor` and greedy
`LlavaForConditionalGeneration.generate` with stopping disabled; the inputs, image features and per-step logits
are stored so the runtime can be checked step by step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image
from safetensors.numpy import save_file
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessorPil,
)

from .checkpoint import IMAGE_SETTING_KEYS, Checkpoint

STEPS = 32


@dataclass(frozen=True)
class Case:
    name: str
    system: str | None
    prompt: str
    images: tuple[str, ...]  # scikit-image sample names, in placeholder order


# Real photographs: a portrait (square), a cat and a cup (both 3:2 landscape, so resizing changes the aspect).
CASES = (
    Case("single_image", None, "What is in this image?", ("astronaut",)),
    Case(
        "two_images",
        "You are a helpful assistant. Answer briefly.",
        "Compare these two images.",
        ("chelsea", "coffee"),
    ),
    Case("text_only", None, "Write a haiku about llamas.", ()),
)


def build_processor(checkpoint: Checkpoint, patch_size: int) -> LlavaProcessor:
    """The checkpoint's LLaVA processor with the image processor pinned to the PIL backend."""
    settings = checkpoint.image_settings
    image_processor = SiglipImageProcessorPil(**{k: settings[k] for k in IMAGE_SETTING_KEYS})
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        chat_template=checkpoint.chat_template,
        image_token=checkpoint.image_token,
        num_additional_image_tokens=0,
    )


def messages(case: Case, images: list[Image.Image]) -> list[dict]:
    """Chat messages with the images as content parts before the prompt."""
    chat: list[dict] = []
    if case.system is not None:
        chat.append({"role": "system", "content": [{"type": "text", "text": case.system}]})
    parts = [{"type": "image", "image": image} for image in images]
    parts.append({"type": "text", "text": case.prompt})
    chat.append({"role": "user", "content": parts})
    return chat


def greedy_config(bos_token_id: int) -> GenerationConfig:
    """Greedy decoding with no stop tokens, so every case runs the full STEPS, keeping each step's raw logits."""
    return GenerationConfig(
        bos_token_id=bos_token_id,
        eos_token_id=None,
        pad_token_id=None,
        do_sample=False,
        max_new_tokens=STEPS,
        output_logits=True,
        return_dict_in_generate=True,
    )


def save_images(case: Case, out: Path, first_index: int) -> list[str]:
    """Write the case's photographs as PNG (lossless: the runtime decodes exactly these pixels)."""
    names = []
    for i, sample in enumerate(case.images):
        name = f"image_{first_index + i}.png"
        Image.fromarray(getattr(skimage.data, sample)()).convert("RGB").save(out / name)
        names.append(name)
    return names


def _read_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.copy()


def run_case(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    case: Case,
    image_files: list[Path],
    bos_token_id: int,
    feature_layer: int,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Tensors and greedy tokens of one case."""
    images = [_read_image(p) for p in image_files]
    inputs = processor.apply_chat_template(
        messages(case, images), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    input_ids = inputs["input_ids"]
    bos_count = int((input_ids == bos_token_id).sum())
    if input_ids[0, 0] != bos_token_id or bos_count != 1:
        raise AssertionError(f"{case.name}: expected exactly one BOS, at the start; got {input_ids[0, :4].tolist()}")
    tensors = {"input_ids": input_ids.to(torch.int64).numpy()}
    with torch.no_grad():
        if images:
            pixel_values = inputs["pixel_values"]
            features = model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=feature_layer, vision_feature_select_strategy="full"
            ).pooler_output
            tensors["pixel_values"] = pixel_values.float().numpy()
            tensors["image_features"] = torch.stack(list(features)).float().numpy()
        out = model.generate(**inputs, generation_config=greedy_config(bos_token_id))
    tokens = out.sequences[0, input_ids.shape[1] :].tolist()
    step_logits = torch.cat(out.logits, dim=0).float().numpy()
    if len(tokens) != STEPS or step_logits.shape[0] != STEPS:
        raise AssertionError(f"{case.name}: generate stopped after {len(tokens)} of {STEPS} steps")
    if step_logits.argmax(-1).tolist() != tokens:
        raise AssertionError(f"{case.name}: greedy tokens are not the argmax of the step logits")
    tensors["step_logits"] = np.ascontiguousarray(step_logits, dtype=np.float32)
    return tensors, tokens


def write_reference(
    checkpoint: Checkpoint,
    model: LlavaForConditionalGeneration,
    out: Path,
    log: Callable[[str], None] = print,
) -> dict:
    """Write reference/ (reference.json, <case>.safetensors, image_*.png) and return reference.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    processor = build_processor(checkpoint, config.vision_config.patch_size)
    bos_token_id = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.bos_token)
    # generate fills the fields left unset (None) from the model's defaults, which would bring the stop ids back.
    model.generation_config = greedy_config(bos_token_id)
    cases, image_index = [], 0
    for case in CASES:
        names = save_images(case, out, image_index)
        image_index += len(names)
        tensors, tokens = run_case(
            model, processor, case, [out / n for n in names], bos_token_id, config.vision_feature_layer
        )
        save_file(tensors, str(out / f"{case.name}.safetensors"))
        cases.append(
            {
                "name": case.name,
                "system": case.system,
                "prompt": case.prompt,
                "images": names,
                "tensors": f"{case.name}.safetensors",
                "greedy_tokens": tokens,
            }
        )
        log(f"reference case {case.name}: {tensors['input_ids'].shape[1]} prompt tokens, {len(names)} image(s)")
    document = {"format_version": 1, "cases": cases}
    (out / "reference.json").write_text(json.dumps(document, indent=2) + "\n")
    return document
