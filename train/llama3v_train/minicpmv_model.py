"""The shapes model in the MiniCPM-Llama3-V 2.5 layout: its dims, checkpoint files, slicing and batches.

The model is the exporter's PyTorch reference (`llama3v_export.minicpmv.MiniCPMV`: Idefics2 tower `vpm`, perceiver
resampler, Llama `llm`), and every image is cut by the reference's `slice_image` and pixels come from its
`to_pixels` arithmetic, so training sees exactly the preprocessing the runtime replicates. The checkpoint files
are the ones `llama3v-export` reads for this layout (config `model_type` "minicpmv", `vpm.*` / `resampler.*` /
`llm.*` safetensors, a tokenizer with 2.5's special tokens, the chat template in tokenizer_config.json).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from llama3v_export import minicpmv as mcv
from llama3v_export.minicpmv_tiny import CHAT_TEMPLATE, MiniCPMVPreset, checkpoint_config, save_minicpmv_tokenizer
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from .shapes import BACKGROUNDS, COLORS, SHAPES, make_sample
from .tokenizer import BOS_TOKEN, EOS_TOKEN, EOT_TOKEN, MINICPMV_SPECIAL_TOKENS, build_tokenizer

# Slices of about 64 x 64 pixels (scale_resolution) in 8 x 8 patches: 64 patches per slice, as the LLaVA layout's
# 64 x 64 image. Up to 6 slices plus the overview: a 10:1 image is cut 6 x 1, each cell about 1.7:1 and 48 pixels
# on its short side, its proportions kept.
PRESET = MiniCPMVPreset(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    vision_hidden_size=96,
    vision_num_hidden_layers=2,
    vision_num_attention_heads=4,
    vision_intermediate_size=256,
    # Position buckets per side of the tower's table; 2.5 reads only its first row (a 1 x n strip), so a slice's
    # ~64 patches get 32 buckets.
    vision_buckets=32,
    scale_resolution=64,
    query_num=16,
    max_slice_nums=6,
    patch_size=8,
    drop_vision_last_layer=False,
)
MAX_CONTEXT = 512
# Training images: the task's generator (at most 2:1) for even indices, long/short side ratio uniform in this
# range for odd ones.
TRAIN_ASPECT = (2.0, 10.0)


def sample_aspect(index: int) -> tuple[float, float] | None:
    return None if index % 2 == 0 else TRAIN_ASPECT


def tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(MINICPMV_SPECIAL_TOKENS),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=mcv.PLACEHOLDER,
        pad_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def stop_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    return [tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(EOT_TOKEN)]


def config(tok: PreTrainedTokenizerFast) -> dict:
    """2.5's config.json layout (minicpmv_tiny.checkpoint_config) with this model's vocabulary and context."""
    out = checkpoint_config(PRESET)
    out.update(
        {
            "vocab_size": len(tok),
            "bos_token_id": tok.convert_tokens_to_ids(BOS_TOKEN),
            "eos_token_id": stop_ids(tok)[0],
            "pad_token_id": tok.pad_token_id,
            "max_position_embeddings": MAX_CONTEXT,
            "rope_theta": 10000.0,
        }
    )
    return out


def write_checkpoint(model: mcv.MiniCPMV, tok: PreTrainedTokenizerFast, out: Path) -> None:
    """The files `llama3v-export` reads for the MiniCPM-V layout."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    generation = {
        "bos_token_id": tok.convert_tokens_to_ids(BOS_TOKEN),
        "eos_token_id": stop_ids(tok),
        "pad_token_id": tok.pad_token_id,
        "do_sample": False,
        "max_new_tokens": 32,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_minicpmv_tokenizer(tok, out)


# --- Data: each image sliced once, slices kept as uint8 ---------------------------------------------------------


def sliced(image, settings: mcv.SliceSettings) -> tuple[list[np.ndarray], tuple[int, int] | None]:
    """The overview then the grid's cells row by row as uint8 `[H, W, 3]` arrays (numpy, so that worker processes
    return them by pickling, not by one shared-memory file per tensor), and the grid (columns, rows) or None."""
    overview, cells, grid = mcv.slice_image(image.convert("RGB"), settings)
    return [np.asarray(s, dtype=np.uint8).copy() for s in [overview, *cells]], grid


def as_tensors(entry) -> tuple[list[torch.Tensor], tuple[int, int] | None]:
    """`sliced`'s arrays as uint8 `[3, H, W]` tensors."""
    arrays, grid = entry
    return [torch.from_numpy(a).permute(2, 0, 1) for a in arrays], grid


def slices_chunk(args: tuple[int, int, int, bool]) -> tuple[list, list[tuple[str, str, str]]]:
    seed, start, stop, mixed = args
    settings = mcv.SliceSettings.from_config(checkpoint_config(PRESET))
    entries, labels = [], []
    for i in range(start, stop):
        sample = make_sample(seed, i, sample_aspect(i) if mixed else None)
        entries.append(sliced(sample.image, settings))
        labels.append((sample.shape, sample.color, sample.background))
    return entries, labels


def pixels(slice_u8: torch.Tensor) -> torch.Tensor:
    """The reference's `to_pixels` arithmetic on a uint8 slice: /255 in float32, then (x - 0.5) / 0.5."""
    mean = torch.tensor(mcv.PIXEL_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(mcv.PIXEL_STD, dtype=torch.float32)[:, None, None]
    return slice_u8.to(torch.float32).div(255).sub(mean).div(std)


def mirror(entry, rng: random.Random):
    """The image mirrored left-right and/or top-bottom at random: every slice flipped, the grid's cells reordered
    (a row reversed for left-right, the rows reversed for top-bottom). Close to slicing the mirrored image; the
    generator is symmetric under both mirrors, so the labels stay right."""
    slices, grid = entry
    lr, tb = rng.random() < 0.5, rng.random() < 0.5
    dims = [d for d, on in ((-1, lr), (-2, tb)) if on]
    if not dims:
        return entry
    overview, cells = slices[0], slices[1:]
    if grid is not None:
        columns, rows = grid
        table = [cells[r * columns : (r + 1) * columns] for r in range(rows)]
        if lr:
            table = [row[::-1] for row in table]
        if tb:
            table = table[::-1]
        cells = [c for row in table for c in row]
    return [s.flip(dims) for s in [overview, *cells]], grid


class Trainee:
    """The MiniCPM-V model with the auxiliary head on the resampler's output (the rows that reach the language
    model), pooled over all the slices of an image: mean and max of the rows, LayerNorm, one linear layer."""

    def __init__(self, tok: PreTrainedTokenizerFast):
        self.model = mcv.MiniCPMV(config(tok))
        self.tok = tok
        hidden = self.model.llm.config.hidden_size
        self.aux_head = AuxPoolHead(hidden)
        self.features: torch.Tensor | None = None
        self.placeholder_id = tok.convert_tokens_to_ids(mcv.PLACEHOLDER)
        self.cache: dict = {}

    def named_parameters(self):
        yield from self.model.named_parameters()
        yield from self.aux_head.named_parameters(prefix="aux_head")

    def init_from_llava(self, checkpoint: Path) -> list[str]:
        """Start from the LLaVA layout's trained shapes model (`models-src/shapes`), as 2.5 starts from a pretrained
        SigLIP tower and Llama: its SigLIP tower and Llama decoder have this model's dims. Copied: the tower (the
        Idefics2 tower is SigLIP's with bucketed positions; bucket b of the 1 x n strip gets the mean of the 8 x 8
        grid's positions 2b and 2b + 1, which is exact for an 8 x 8 slice's row-major strip), and the decoder, its
        embedding and LM head rows for the 390 tokens both tokenizers share (the same merges and first six special
        tokens). New: the resampler, the four MiniCPM-V special tokens' rows, the position table's unused rows.
        Returns the names of the parameters copied."""
        state = load_file(str(Path(checkpoint) / "model.safetensors"))
        target = dict(self.model.named_parameters())
        copied = []
        with torch.no_grad():
            for key, tensor in state.items():
                if key.startswith("vision_tower."):
                    name = "vpm." + key[len("vision_tower.") :]
                elif key.startswith("language_model."):
                    name = "llm." + key[len("language_model.") :]
                else:
                    continue  # the LLaVA projector: the resampler replaces it
                param = target[name]
                if name == "vpm.embeddings.position_embedding.weight":
                    side = PRESET.vision_buckets
                    grid = tensor.shape[0]
                    per_bucket = grid // side
                    param[:side] = tensor.reshape(side, per_bucket, -1).mean(1)
                elif name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
                    param[: tensor.shape[0]] = tensor
                else:
                    if param.shape != tensor.shape:
                        raise ValueError(f"{key} {tuple(tensor.shape)} does not fit {name} {tuple(param.shape)}")
                    param.copy_(tensor)
                copied.append(name)
        return copied

    def take(self, data, index: list[int], rng: random.Random):
        return [mirror(data[i], rng) for i in index]

    def vision(self, batch) -> torch.Tensor:
        slices = [pixels(s) for slices, _ in batch for s in slices]
        features = self.model.vision_features(slices)
        self.features = features
        self.counts = [len(slices) for slices, _ in batch]
        return features

    def aux_logits(self):
        return self.aux_head(self.features, self.counts)

    def encode(self, question: str, reply: str, grid) -> tuple[list[int], list[int]]:
        key = (question, reply, grid)
        if key not in self.cache:
            text = "\n".join([mcv.slice_placeholder(grid, self.model.settings.query_num), question])
            prompt = mcv.prompt_ids(self.tok, [{"role": "user", "content": text}])
            target = self.tok(reply + EOT_TOKEN, add_special_tokens=False)["input_ids"]
            self.cache[key] = (prompt + target, [-100] * len(prompt) + target)
        return self.cache[key]

    def answer_logits(self, batch, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [self.encode(q, a, grid) for (q, a), (_, grid) in zip(pairs, batch, strict=True)]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), width), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), -100, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (i, lab) in enumerate(encoded):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        features = self.vision(batch)
        embeds = self.model.llm.get_input_embeddings()(ids)
        rows = (ids == self.placeholder_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(rows, features.reshape(-1, features.shape[-1]).to(embeds.dtype))
        logits = self.model.llm(inputs_embeds=embeds, attention_mask=mask).logits
        return logits, labels


class AuxPoolHead(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(2 * hidden)
        self.linear = torch.nn.Linear(2 * hidden, len(SHAPES) + len(COLORS) + len(BACKGROUNDS))

    def forward(self, features: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, ...]:
        pooled = []
        for part in features.split(counts):
            rows = part.reshape(-1, part.shape[-1])
            pooled.append(torch.cat([rows.mean(0), rows.amax(0)]))
        logits = self.linear(self.norm(torch.stack(pooled)))
        return logits.split([len(SHAPES), len(COLORS), len(BACKGROUNDS)], dim=-1)
