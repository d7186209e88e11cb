"""Tiny random-weight LLaVA checkpoints (SigLIP + Llama-3 layout) for tests and benchmarks.

`llama3v-tiny --preset tiny-a --out DIR [--seed N]` writes a complete Hugging Face checkpoint directory: the same
files a real llama3v-class checkpoint carries, with random weights and the real Llama-3 tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from .tokenizer import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    EOT_TOKEN,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    build_tokenizer,
    check_against_tiktoken,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

STOP_TOKEN_IDS = [128001, 128008, 128009]
TEXT_VOCAB_SIZE = IMAGE_TOKEN_ID + 1

# Random weights: std WEIGHT_GAIN / sqrt(fan_in). The decoder's query and key projections get QK_SHARPEN times
# more: sharper attention, as trained models have, so that a long prompt (729 image tokens in `mid`) is not
# averaged into one constant vector that makes every greedy step pick the same token. The vision tower keeps the
# plain gain: sharper there, a random network amplifies fp32 rounding layer by layer (torch fp32 itself then
# drifts from fp64 by more than the 1e-4 parity tolerance at 6 layers).
WEIGHT_GAIN = 1.0
QK_SHARPEN = 1.5


@dataclass(frozen=True)
class Preset:
    """Shapes of one tiny model; names follow the Hugging Face config fields they set."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    vision_hidden_size: int
    vision_num_hidden_layers: int
    vision_num_attention_heads: int
    vision_intermediate_size: int
    vision_feature_layer: int


PRESETS: dict[str, Preset] = {
    # GQA 1 (plain multi-head), last vision layer.
    "tiny-a": Preset(64, 2, 4, 4, 128, 32, 8, 32, 2, 2, 64, -1),
    # GQA 2, a single decoder layer, SigLIP's real patch size 14, second-to-last vision layer (LLaVA's default).
    "tiny-b": Preset(64, 1, 4, 2, 96, 56, 14, 48, 3, 4, 96, -2),
    # GQA 4, head dim 16, an earlier vision layer.
    "tiny-c": Preset(128, 3, 8, 2, 256, 48, 12, 32, 3, 2, 64, -3),
    # Benchmark size: Llama-3-like decoder ratios, SigLIP-so400m's 384 px / patch 14 (729 image tokens).
    "mid": Preset(512, 8, 8, 2, 1536, 384, 14, 384, 6, 6, 1536, -2),
}


TINY_PRESETS = ("tiny-a", "tiny-b", "tiny-c")


def llava_config(preset: Preset) -> LlavaConfig:
    """The LLaVA config of a preset: SigLIP vision tower, Llama-3 text model, `full` feature selection."""
    vision = SiglipVisionConfig(
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        hidden_size=preset.vision_hidden_size,
        num_hidden_layers=preset.vision_num_hidden_layers,
        num_attention_heads=preset.vision_num_attention_heads,
        intermediate_size=preset.vision_intermediate_size,
        # LLaVA reads hidden states; SigLIP's attention-pooling head would be dead weight.
        vision_use_head=False,
    )
    text = LlamaConfig(
        vocab_size=TEXT_VOCAB_SIZE,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=STOP_TOKEN_IDS,
        tie_word_embeddings=False,
    )
    tokens_per_image = (preset.image_size // preset.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=tokens_per_image,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=preset.vision_feature_layer,
        tie_word_embeddings=False,
    )


def _matrix_std(name: str, param: torch.Tensor, gain: float) -> float:
    if name.endswith("embed_tokens.weight"):
        # Rows are looked up, not summed over: O(1) entries keep the current token visible in the residual
        # stream beside the layer outputs.
        return gain
    std = gain / param[0].numel() ** 0.5
    if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
        std *= QK_SHARPEN
    return std


def randomize_(model: torch.nn.Module, gain: float, seed: int) -> None:
    """Seeded weights that keep activations O(1) at every width, yet spread the logits enough that greedy
    decoding does not collapse onto one token.

    Matrices get N(0, gain^2 / fan_in), as trained models roughly have (a fixed std would make wide presets'
    activations, and with them fp32 rounding differences, grow with the width); norm scales 1 + N(0, 0.1) and
    biases N(0, 0.02), so that every parameter kind is exercised by the parity checks instead of sitting at an
    identity value.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                param.copy_(noise * _matrix_std(name, param, gain))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.02 * noise)


def generation_config() -> GenerationConfig:
    """Llama-3-Instruct's generation defaults."""
    return GenerationConfig(
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=STOP_TOKEN_IDS,
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )


def siglip_image_processor(image_size: int) -> SiglipImageProcessorPil:
    """SigLIP's preprocessing (PIL backend): bicubic resize to a square, rescale 1/255, mean/std 0.5."""
    return SiglipImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def processor(preset: Preset) -> LlavaProcessor:
    """Tokenizer + SigLIP image processor (PIL backend) + chat template, as a LLaVA processor."""
    converted = build_tokenizer()
    check_against_tiktoken(converted)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=BOS_TOKEN, eos_token=EOT_TOKEN)
    image_processor = siglip_image_processor(preset.image_size)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=preset.patch_size,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def _add_json_fields(path: Path, fields: dict) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_processor_files(proc: LlavaProcessor, out: Path) -> None:
    """Processor files in the layouts real checkpoints use.

    transformers 5 writes tokenizer.json, tokenizer_config.json, processor_config.json (image processor nested)
    and chat_template.jinja. Older tools read the template from tokenizer_config.json / processor_config.json and
    the image settings from a standalone preprocessor_config.json, so those are written too.
    """
    proc.save_pretrained(out)
    _add_json_fields(out / "tokenizer_config.json", {"chat_template": CHAT_TEMPLATE})
    _add_json_fields(out / "processor_config.json", {"chat_template": CHAT_TEMPLATE})
    image_processor = json.loads((out / "processor_config.json").read_text())["image_processor"]
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")


def make_checkpoint(preset_name: str, out: Path, seed: int = 0) -> Path:
    """Write a complete random-weight checkpoint for `preset_name` into `out` (created if missing)."""
    preset = PRESETS[preset_name]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(preset)).eval()
    randomize_(model, WEIGHT_GAIN, seed)
    model.generation_config = generation_config()
    model.save_pretrained(out, safe_serialization=True)
    write_processor_files(processor(preset), out)
    return out
