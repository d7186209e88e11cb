"""The MiniCPM-Llama3-V 2.5 checkpoint layout (config `model_type` "minicpmv"), in PyTorch.

This is the reference the export and the tests check against: transformers' own `Idefics2VisionTransformer`
(`vpm.*`) and `LlamaForCausalLM` (`llm.*`), plus the perceiver resampler (`resampler.*`), the image slicing, the
pixel transform and the prompt layout, each written from the facts of the published 2.5 code:

- The vision tower runs on each slice laid out as a `[3, patch, n * patch]` strip of its `n = h * w` patches (row
  after row of patches), without target sizes, so its position buckets come from a 1 x n strip: patch `i` gets
  bucket `i * side / n` of the first row of the tower's `side x side` position table. All slices of a request go
  through the tower as one batch padded to the longest strip with a patch mask (`batch_vision_input`).
- The resampler has `query_num` learned queries (96 in 2.5; the config class default of 64 is overridden),
  `hidden / 128` heads, keys = ln_kv(kv_proj(x)) + a 2-D sin-cos table over the slice's `h x w` patches (the
  column's half first, then the row's), values = ln_kv(kv_proj(x)), then ln_post and `@ proj`.
- Pixels: `ToTensor` (uint8 / 255 in float32) then `Normalize(0.5, 0.5)`; 2.5 holds these as constants and ships
  no preprocessor config.
- Slicing: `slice_image` below; the prompt puts `<image>` + `<unk>` x query_num + `</image>` for the overview,
  then the grid inside `<slice>` ... `</slice>` (rows joined by newlines), before the text of the message, joined
  by newlines; the chat template is rendered with `add_generation_prompt=False` (2.5's template always ends with
  the assistant header). Image features replace the rows between each `<image>` and `</image>`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig, Idefics2VisionTransformer

MODEL_TYPE = "minicpmv"
# The resampler's heads are `hidden / RESAMPLER_HEAD_DIM` (2.5's `init_resampler`).
RESAMPLER_HEAD_DIM = 128
# The resampler's initial sin-cos table size (2.5 grows it when a slice has more patches per side).
RESAMPLER_MAX_SIZE = (70, 70)
# 2.5's pixel transform constants (IMAGENET_INCEPTION_MEAN / STD).
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
# MiniCPMVSliceConfig's defaults, used where config.json leaves a field out.
SLICE_DEFAULTS = {"patch_size": 14, "max_slice_nums": 9, "scale_resolution": 448}

IMAGE_START, IMAGE_END = "<image>", "</image>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
PLACEHOLDER = "<unk>"
EOT_TOKEN = "<|eot_id|>"

# The llama3v release renamed the weights of the same model: `vison.*` for `vpm.*` and `projection.*` for
# `resampler.*` (`llm.*` unchanged). Loading maps them back, so one code path serves both.
RENAMED_PREFIXES = {"vison.": "vpm.", "projection.": "resampler."}


class MiniCPMVCheckpointError(ValueError):
    """The checkpoint is not a usable MiniCPM-Llama3-V 2.5 layout; the message names the setting."""


@dataclass(frozen=True)
class SliceSettings:
    """Slicing and prompt-layout settings of a checkpoint (config.json and its `slice_config`)."""

    query_num: int
    max_slice_nums: int
    scale_resolution: int
    patch_size: int
    slice_mode: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SliceSettings:
        slice_config = config.get("slice_config") or {}

        def setting(key: str) -> int:
            return int(slice_config.get(key, config.get(key, SLICE_DEFAULTS[key])))

        if "query_num" not in config:
            raise MiniCPMVCheckpointError("config.json has no query_num (96 for MiniCPM-Llama3-V 2.5)")
        return cls(
            query_num=int(config["query_num"]),
            max_slice_nums=setting("max_slice_nums"),
            scale_resolution=setting("scale_resolution"),
            patch_size=setting("patch_size"),
            slice_mode=bool(config.get("slice_mode", True)),
        )


def text_config(config: dict[str, Any]) -> LlamaConfig:
    """The Llama config: 2.5's config class is a LlamaConfig with the vision and slicing fields beside."""
    own = {"vision_config", "slice_config", "auto_map", "architectures", "model_type", "query_num", "slice_mode"}
    fields = {k: v for k, v in config.items() if k not in own and not (k == "rope_scaling" and v is None)}
    return LlamaConfig(**fields)


def vision_config(config: dict[str, Any]) -> Idefics2VisionConfig:
    if "vision_config" not in config:
        raise MiniCPMVCheckpointError("config.json has no vision_config")
    fields = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    return Idefics2VisionConfig(**fields)


def sincos_table(embed_dim: int, height: int, width: int) -> np.ndarray:
    """2.5's `get_2d_sincos_pos_embed` for an `height x width` grid: `[height, width, embed_dim]` float32; the
    first half encodes the column, the second the row (sin then cos in each), computed in float32 as numpy does."""
    omega = np.arange(embed_dim // 4, dtype=np.float32)
    omega /= embed_dim / 4.0
    omega = 1.0 / 10000**omega
    columns, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    return np.concatenate([encode(columns), encode(rows)], axis=-1)


def resampler_omega(embed_dim: int) -> np.ndarray:
    """The frequencies of `sincos_table` (float32), for graphs that compute the table themselves."""
    omega = np.arange(embed_dim // 4, dtype=np.float32)
    omega /= embed_dim / 4.0
    return (1.0 / 10000**omega).astype(np.float32)


class Resampler(nn.Module):
    """2.5's perceiver resampler (one cross-attention of learned queries over a slice's patch features)."""

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int):
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, embed_dim // RESAMPLER_HEAD_DIM)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """`x` [B, L, kv_dim] (padded to the longest slice), `tgt_sizes` [B, 2] patches (h, w) -> [B, Q, D]."""
        batch = x.shape[0]
        lengths = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        max_h = max(int(tgt_sizes[:, 0].max()), RESAMPLER_MAX_SIZE[0])
        max_w = max(int(tgt_sizes[:, 1].max()), RESAMPLER_MAX_SIZE[1])
        table = torch.from_numpy(sincos_table(self.embed_dim, max_h, max_w))
        padding = torch.zeros((batch, x.shape[1]), dtype=torch.bool)
        pos = torch.zeros(batch, x.shape[1], self.embed_dim, dtype=x.dtype)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            pos[i, : h * w] = table[:h, :w].reshape(h * w, -1).to(x.dtype)
            padding[i, int(lengths[i]) :] = True
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, batch, 1)
        out = self.attn(q, kv + pos.permute(1, 0, 2), kv, key_padding_mask=padding)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


class MiniCPMV(nn.Module):
    """`vpm` (Idefics2 vision tower), `resampler`, `llm` (Llama-3), with the published parameter names."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.settings = SliceSettings.from_config(config)
        self.llm = LlamaForCausalLM(text_config(config))
        self.vpm = Idefics2VisionTransformer(vision_config(config))
        if config.get("drop_vision_last_layer", True):
            self.vpm.encoder.layers = self.vpm.encoder.layers[:-1]
        hidden = self.llm.config.hidden_size
        if hidden % RESAMPLER_HEAD_DIM:
            raise MiniCPMVCheckpointError(
                f"hidden_size {hidden} is not a multiple of {RESAMPLER_HEAD_DIM} (the resampler's head width)"
            )
        self.resampler = Resampler(self.settings.query_num, hidden, self.vpm.config.hidden_size)

    def set_attn_implementation(self, name: str) -> None:
        self.llm.set_attn_implementation(name)
        self.vpm.set_attn_implementation(name)

    def vision_features(self, slices: list[torch.Tensor]) -> torch.Tensor:
        """Slices `[3, H, W]` (normalized pixels, H and W multiples of the patch size) -> [n, Q, D], the way 2.5
        runs them: strips padded into one batch with a patch mask, no target sizes, then the resampler."""
        patch = self.settings.patch_size
        strips = [to_strip(s, patch) for s in slices]
        tgt_sizes = torch.tensor([[s.shape[1] // patch, s.shape[2] // patch] for s in slices], dtype=torch.int32)
        longest = max(s.shape[-1] for s in strips)
        batch = torch.zeros(len(strips), 3, patch, longest, dtype=strips[0].dtype)
        mask = torch.zeros(len(strips), 1, longest // patch, dtype=torch.bool)
        for i, strip in enumerate(strips):
            batch[i, :, :, : strip.shape[-1]] = strip
            mask[i, 0, : strip.shape[-1] // patch] = True
        hidden = self.vpm(batch, patch_attention_mask=mask).last_hidden_state
        return self.resampler(hidden, tgt_sizes)

    def prompt_embeddings(self, input_ids: torch.Tensor, features: torch.Tensor | None, bounds) -> torch.Tensor:
        """Token embeddings with each image bound's rows replaced by one slice's features, in order."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if features is not None and len(bounds):
            rows = torch.cat([torch.arange(start, end) for start, end in bounds])
            embeds[0, rows] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
        return embeds


def to_strip(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """2.5's `reshape_by_patch`: `[3, H, W]` -> `[3, patch, n * patch]`, patches row by row."""
    columns = torch.nn.functional.unfold(pixels, (patch, patch), stride=(patch, patch))
    columns = columns.reshape(pixels.shape[0], patch, patch, -1)
    return columns.permute(0, 1, 3, 2).reshape(pixels.shape[0], patch, -1)


def map_renamed_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The llama3v release's names (`vison.*`, `projection.*`) back to the published ones; others unchanged."""
    mapped = {}
    for key, tensor in state.items():
        for old, new in RENAMED_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        mapped[key] = tensor
    return mapped


def check_weight_names(path: Path, model: MiniCPMV, names) -> None:
    """The checkpoint's weight names (after `map_renamed_keys`) must be exactly the model's parameters."""
    expected, names = set(model.state_dict()), set(names)
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise MiniCPMVCheckpointError(
            f"{path}: weights do not match the MiniCPM-Llama3-V 2.5 layout: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )


def load_minicpmv(path: Path, weights: tuple[Path, ...], dtype: torch.dtype = torch.float32) -> MiniCPMV:
    """The checkpoint as a CPU model in eval mode with eager attention (the path the graphs are traced on)."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    model = MiniCPMV(config)
    state: dict[str, torch.Tensor] = {}
    for file in weights:
        state.update(load_file(str(file)))
    state = map_renamed_keys(state)
    check_weight_names(path, model, state)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.set_attn_implementation("eager")
    return model.eval()


# --- Slicing (2.5's slice_image and helpers), on PIL images ---------------------------------------------------


def ensure_divide(length: float, patch_size: int) -> int:
    # Python's round(): half to even.
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale=False):
    width, height = size
    if (width * height > scale_resolution * scale_resolution) or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int):
    width, height = size
    columns, rows = grid
    cell = (ensure_divide(width, columns) / columns, ensure_divide(height, rows) / rows)
    best = find_best_resize(cell, scale_resolution, patch_size, allow_upscale=True)
    return best[0] * columns, best[1] * rows


def best_grid(size: tuple[int, int], settings: SliceSettings) -> tuple[int, int] | None:
    """(columns, rows) of the slice grid, or None when the image is not sliced."""
    width, height = size
    ratio = width * height / (settings.scale_resolution * settings.scale_resolution)
    multiple = min(math.ceil(ratio), settings.max_slice_nums)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, min_error = None, float("inf")
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > settings.max_slice_nums:
            continue
        for m in range(1, count + 1):
            if count % m == 0:
                error = abs(log_ratio - math.log(m / (count // m)))
                if error < min_error:
                    best, min_error = (m, count // m), error
    return best


def slice_image(image: Image.Image, settings: SliceSettings) -> tuple[Image.Image, list[Image.Image], tuple | None]:
    """(overview, grid slices row by row, grid (columns, rows) or None), as 2.5's `slice_image`."""
    size, s, p = image.size, settings.scale_resolution, settings.patch_size
    grid = best_grid(size, settings)
    if grid is None:
        return image.resize(find_best_resize(size, s, p, allow_upscale=True), Image.Resampling.BICUBIC), [], None
    overview = image.resize(find_best_resize(size, s, p), Image.Resampling.BICUBIC)
    refined = image.resize(refine_size(size, grid, s, p), Image.Resampling.BICUBIC)
    cell_w, cell_h = refined.size[0] // grid[0], refined.size[1] // grid[1]
    cells = [
        refined.crop((x, y, x + cell_w, y + cell_h))
        for y in range(0, refined.size[1], cell_h)
        for x in range(0, refined.size[0], cell_w)
    ]
    return overview, cells, grid


def to_pixels(image: Image.Image) -> torch.Tensor:
    """ToTensor then Normalize(0.5, 0.5): `[3, H, W]` float32."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    pixels = array.permute(2, 0, 1).to(torch.float32).div(255)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(PIXEL_STD, dtype=torch.float32)[:, None, None]
    return pixels.sub(mean).div(std).contiguous()


def image_placeholder(query_num: int) -> str:
    return IMAGE_START + PLACEHOLDER * query_num + IMAGE_END


def slice_placeholder(grid: tuple[int, int] | None, query_num: int) -> str:
    """The overview's placeholder, then the grid's: rows of placeholders joined by newlines in <slice>...</slice>."""
    text = image_placeholder(query_num)
    if grid is not None:
        columns, rows = grid
        lines = [image_placeholder(query_num) * columns for _ in range(rows)]
        text += SLICE_START + "\n".join(lines) + SLICE_END
    return text


def build_messages(
    images: list[Image.Image], prompt: str, system: str | None, settings: SliceSettings
) -> tuple[list[dict], list[torch.Tensor]]:
    """2.5's `chat` for one user message with `images` before `prompt`: the messages to render (string content)
    and the slices' pixels in placeholder order."""
    parts, pixels = [], []
    for image in images:
        overview, cells, grid = slice_image(image, settings)
        parts.append(slice_placeholder(grid, settings.query_num))
        pixels += [to_pixels(overview)] + [to_pixels(c) for c in cells]
    parts.append(prompt)
    messages = [{"role": "user", "content": "\n".join(parts)}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages, pixels


def prompt_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> list[int]:
    """2.5's `apply_chat_template(..., tokenize=True, add_generation_prompt=False)`: render, then encode without
    adding special tokens (the template writes BOS)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return tokenizer.encode(text, add_special_tokens=False)


def image_bounds(input_ids: list[int], start_id: int, end_id: int) -> list[tuple[int, int]]:
    """(first, end) row of each image's placeholder tokens: after each <image>, up to its </image>."""
    starts = [i + 1 for i, t in enumerate(input_ids) if t == start_id]
    ends = [i for i, t in enumerate(input_ids) if t == end_id]
    return list(zip(starts, ends, strict=False))
