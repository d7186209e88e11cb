"""Train the shapes model in four stages and save it as a Hugging Face LLaVA (or MiniCPM-V) checkpoint.

    python -m llama3v_train.train --out models-src/shapes
    python -m llama3v_train.train --layout minicpmv --out models-src/shapes-minicpmv

Stage V pretrains the vision tower alone with an auxiliary classification head (shape, color, background) on its
mean-pooled last layer, the analogue of SigLIP being pretrained before LLaVA training; the head is discarded.
Stage 0 trains the tower, projector and language model together on the answer loss (the auxiliary loss stays on
the tower); stage 1 trains only the projector, tower and language model frozen; stage 2 fine-tunes only the
language model, tower and projector frozen. The answer loss is the cross-entropy of the assistant's answer tokens
(and the closing <|eot_id|>) only.

`--layout minicpmv` trains the same task, tokenizer merges, losses and loop on MiniCPM-Llama3-V 2.5's architecture
(minicpmv_model.py): the "projector" is the resampler, images are sliced as the exporter's reference slices them,
and the auxiliary head reads the resampler's output pooled over an image's slices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import torch
from llama3v_export.tiny import write_processor_files
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from . import minicpmv_model
from .model import TOKENS_PER_IMAGE, generation_config, llava_config, processor
from .shapes import BACKGROUNDS, COLORS, QUESTIONS, SHAPES, answer, make_sample, question_for

TRAIN_SEED = 0
# Held-out images on which the tower's auxiliary classifier is scored after stages V and 0 (not the evaluation
# command's seed 1000, the test's 2000 or the example image's 3000).
VALIDATION_SEED = 500
VALIDATION_IMAGES = 1000
PARAPHRASE_RATE = 0.2
IGNORE = -100
WORKERS = 2


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    trains: tuple[str, ...]  # parameter-name prefixes that get gradients ("aux_head" is the auxiliary classifier)
    steps: int
    lr: float
    batch_size: int
    answer_loss: bool  # the language model's answer loss (stage V runs the tower alone)
    aux_loss: bool  # the tower's auxiliary classification loss


TOWER = ("model.vision_tower", "aux_head")
STAGES = (
    Stage("V-vision", TOWER, 6000, 2e-3, 64, answer_loss=False, aux_loss=True),
    Stage(
        "0-joint",
        (*TOWER, "model.multi_modal_projector", "model.language_model", "lm_head"),
        1200,
        1e-3,
        48,
        answer_loss=True,
        aux_loss=True,
    ),
    Stage("1-projector", ("model.multi_modal_projector",), 200, 1e-3, 48, answer_loss=True, aux_loss=False),
    Stage("2-language-model", ("model.language_model", "lm_head"), 400, 5e-4, 48, answer_loss=True, aux_loss=False),
)
# The MiniCPM-V layout: an image is an overview and up to 6 slices (7x the LLaVA layout's vision work per image),
# so batches are smaller and stages shorter; the resampler plays the projector's part.
MINICPMV_TOWER = ("vpm", "resampler", "aux_head")
MINICPMV_STAGES = (
    Stage("V-vision", MINICPMV_TOWER, 600, 1e-3, 24, answer_loss=False, aux_loss=True),
    Stage("0-joint", (*MINICPMV_TOWER, "llm"), 900, 7e-4, 24, answer_loss=True, aux_loss=True),
    Stage("1-projector", ("resampler",), 100, 5e-4, 24, answer_loss=True, aux_loss=False),
    Stage("2-language-model", ("llm",), 200, 3e-4, 24, answer_loss=True, aux_loss=False),
)
LAYOUT_STAGES = {"llava": STAGES, "minicpmv": MINICPMV_STAGES}


class AuxHead(torch.nn.Module):
    """Shape, color and background logits from the mean over image tokens of the tower's last encoder layer: the
    features LLaVA reads (`vision_feature_layer` -1 is the last layer's output, before the post-layernorm). Used in
    stages V and 0 only; not part of the checkpoint."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.linear = torch.nn.Linear(hidden, len(SHAPES) + len(COLORS) + len(BACKGROUNDS))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.linear(self.norm(features.mean(1)))
        return logits.split([len(SHAPES), len(COLORS), len(BACKGROUNDS)], dim=-1)


class Trainee:
    """The LLaVA model with the auxiliary head beside it; a hook keeps the tower's last-layer output of the
    current forward pass for the head."""

    def __init__(self, model: LlavaForConditionalGeneration):
        self.model = model
        self.aux_head = AuxHead(model.config.vision_config.hidden_size)
        self.features: torch.Tensor | None = None
        model.model.vision_tower.encoder.layers[-1].register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        self.features = output[0] if isinstance(output, tuple) else output

    def named_parameters(self):
        # Names as in the checkpoint ("model.vision_tower...", "lm_head...") plus "aux_head...".
        yield from self.model.named_parameters()
        yield from self.aux_head.named_parameters(prefix="aux_head")

    def take(self, pixels: torch.Tensor, index: list[int], rng: random.Random) -> torch.Tensor:
        return flip(pixels[index], rng)

    def vision(self, pixels: torch.Tensor) -> None:
        self.model.model.vision_tower(pixel_values=pixels)

    def aux_logits(self) -> tuple[torch.Tensor, ...]:
        return self.aux_head(self.features)

    def answer_logits(self, pixels: torch.Tensor, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.encoder.batch(pairs)
        logits = self.model(input_ids=batch["input_ids"], pixel_values=pixels, attention_mask=batch["attention_mask"])
        return logits.logits, batch["labels"]


def label_tensor(labels: list[tuple[str, str, str]]) -> torch.Tensor:
    names = (SHAPES, tuple(COLORS), BACKGROUNDS)
    return torch.tensor([[n.index(v) for n, v in zip(names, row, strict=True)] for row in labels])


def flip(pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Each image mirrored left-right and/or top-bottom at random. The generator's distribution is symmetric under
    both mirrors (free or +-20 degree turns, uniform position), so the labels stay right: four images per image."""
    out = pixels.clone()
    for row in range(out.shape[0]):
        dims = [d for d, p in ((-1, rng.random()), (-2, rng.random())) if p < 0.5]
        if dims:
            out[row] = out[row].flip(dims)
    return out


def aux_accuracy(trainee, inputs, labels: torch.Tensor) -> dict[str, float]:
    """The auxiliary classifier's accuracy on held-out images (shape, color, background)."""
    chunk = 100
    parts = []
    with torch.no_grad():
        for start in range(0, len(labels), chunk):
            trainee.vision(inputs[start : start + chunk])
            parts.append(trainee.aux_logits())
    logits = [torch.cat(p) for p in zip(*parts, strict=True)]
    return {
        name: round((part.argmax(-1) == labels[:, k]).float().mean().item(), 4)
        for k, (name, part) in enumerate(zip(("shape", "color", "background"), logits, strict=True))
    }


def _pixels_chunk(args: tuple[int, int, int]) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    seed, start, stop = args
    image_processor = processor().image_processor
    samples = [make_sample(seed, i) for i in range(start, stop)]
    pixels = image_processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
    return pixels, [(s.shape, s.color, s.background) for s in samples]


def make_dataset(seed: int, count: int, workers: int, layout: str = "llava") -> tuple:
    """Preprocessed images and labels of `count` images: LLaVA, pixel values (the SigLIP image processor's output);
    MiniCPM-V, each image's slices (uint8) and grid, half of the images beyond 2:1 (minicpmv_model.TRAIN_ASPECT)."""
    chunk = 500
    if layout == "minicpmv":
        jobs = [(seed, s, min(s + chunk, count), True) for s in range(0, count, chunk)]
        with Pool(workers) as pool:
            parts = pool.map(minicpmv_model.slices_chunk, jobs)
        entries = [minicpmv_model.as_tensors(e) for entries, _ in parts for e in entries]
        return entries, [label for _, labels in parts for label in labels]
    jobs = [(seed, s, min(s + chunk, count)) for s in range(0, count, chunk)]
    with Pool(workers) as pool:
        parts = pool.map(_pixels_chunk, jobs)
    return torch.cat([p for p, _ in parts]), [label for _, labels in parts for label in labels]


class Encoder:
    """Chat-template token ids for (question, answer) with <image> expanded, and labels on the answer only."""

    def __init__(self, proc: LlavaProcessor):
        self.proc = proc
        self.tok = proc.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids(proc.image_token)
        self.cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        for i in ids:
            out.extend([i] * TOKENS_PER_IMAGE if i == self.image_id else [i])
        return out

    def encode(self, question: str, reply: str) -> tuple[list[int], list[int]]:
        key = (question, reply)
        if key not in self.cache:
            prompt = self.prompt_ids(question)
            target = self.tok(reply + "<|eot_id|>", add_special_tokens=False)["input_ids"]
            self.cache[key] = (prompt + target, [IGNORE] * len(prompt) + target)
        return self.cache[key]

    def batch(self, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(q, a) for q, a in pairs]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tok.pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (i, lab) in enumerate(encoded):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(i)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy where labels are not IGNORE (the answer tokens)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def set_trainable(trainee, prefixes: tuple[str, ...]) -> list[torch.nn.Parameter]:
    params = []
    for name, param in trainee.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            params.append(param)
    return params


def stage_loss(
    trainee,
    stage: Stage,
    inputs,
    labels: torch.Tensor,
    names: list[tuple[str, str, str]],
    rng: random.Random,
) -> torch.Tensor:
    loss = torch.zeros(())
    if stage.answer_loss:
        pairs = []
        for shape, color, background in names:
            kind = rng.choice(list(QUESTIONS))
            pairs.append((question_for(kind, rng, PARAPHRASE_RATE), answer(kind, shape, color, background)))
        logits, answer_labels = trainee.answer_logits(inputs, pairs)
        loss = loss + answer_loss(logits, answer_labels)
    else:
        trainee.vision(inputs)
    if stage.aux_loss:
        parts = trainee.aux_logits()
        loss = loss + sum(torch.nn.functional.cross_entropy(p, labels[:, k]) for k, p in enumerate(parts))
    return loss


def run_stage(
    trainee,
    stage: Stage,
    data: tuple,
    validation: tuple,
    rng: random.Random,
    log,
) -> dict:
    inputs, names = data
    labels = label_tensor(names)
    params = set_trainable(trainee, stage.trains)
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = max(1, stage.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, stage.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    trainee.model.train()
    start, recent, history = time.time(), [], []
    for step in range(stage.steps):
        index = [rng.randrange(len(names)) for _ in range(stage.batch_size)]
        loss = stage_loss(
            trainee, stage, trainee.take(inputs, index, rng), labels[index], [names[i] for i in index], rng
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        recent.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == stage.steps:
            mean = sum(recent) / len(recent)
            history.append({"step": step + 1, "loss": round(mean, 5)})
            log(f"stage {stage.name} step {step + 1}/{stage.steps} loss {mean:.4f} ({time.time() - start:.0f} s)")
            recent = []
    seconds = round(time.time() - start, 1)
    trainee.model.eval()
    report = {
        "stage": stage.name,
        "trains": list(stage.trains),
        "trainable_params": sum(p.numel() for p in params),
        "steps": stage.steps,
        "batch_size": stage.batch_size,
        "lr": stage.lr,
        "loss": ("answer" if stage.answer_loss else "")
        + (" + " if stage.answer_loss and stage.aux_loss else "")
        + ("auxiliary classification" if stage.aux_loss else ""),
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "seconds": seconds,
        "loss_every_50": history,
    }
    if stage.aux_loss:
        report["validation_aux_accuracy"] = aux_accuracy(trainee, *validation)
        log(f"stage {stage.name}: tower's auxiliary accuracy on held-out images {report['validation_aux_accuracy']}")
    return report


def train(
    out: Path,
    images: int,
    threads: int,
    seed: int,
    stages: tuple[Stage, ...],
    log=print,
    layout: str = "llava",
    init_from: Path | None = None,
) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    total = time.time()
    t = time.time()
    data = make_dataset(TRAIN_SEED, images, WORKERS, layout)
    val_inputs, val_names = make_dataset(VALIDATION_SEED, VALIDATION_IMAGES, WORKERS, layout)
    data_seconds = round(time.time() - t, 1)
    log(f"{images} training and {VALIDATION_IMAGES} validation images generated and preprocessed in {data_seconds} s")
    if layout == "minicpmv":
        tok = minicpmv_model.tokenizer()
        trainee = minicpmv_model.Trainee(tok)
        model = trainee.model
        if init_from is not None:
            copied = trainee.init_from_llava(init_from)
            log(f"initialized {len(copied)} tower and decoder tensors from {init_from}")
    else:
        proc = processor()
        model = LlavaForConditionalGeneration(llava_config(proc))
        trainee = Trainee(model)
        trainee.encoder = Encoder(proc)
    log(f"model: {sum(p.numel() for p in model.parameters())} parameters")
    validation = (val_inputs, label_tensor(val_names))
    steps = " ".join(str(s.steps) for s in stages)

    def training_log(reports: list[dict]) -> dict:
        return {
            "command": f"python -m llama3v_train.train{' --layout minicpmv' if layout == 'minicpmv' else ''} "
            f"--out {out} --images {images} --threads {threads} --seed {seed} --steps {steps}"
            + (f" --init-from {init_from}" if init_from else ""),
            "torch": torch.__version__,
            "layout": layout,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_image_seed": TRAIN_SEED,
            "images": images,
            "validation_image_seed": VALIDATION_SEED,
            "validation_images": VALIDATION_IMAGES,
            "data_seconds": data_seconds,
            "stages": reports,
            "total_seconds": round(time.time() - total, 1),
        }

    reports = []
    for stage in stages:
        if stage.steps == 0:
            log(f"stage {stage.name}: 0 steps, skipped")
            continue
        reports.append(run_stage(trainee, stage, data, validation, rng, log))
        if layout == "minicpmv":
            # Written after every stage, so a run cut short leaves the last finished stage's checkpoint and log.
            minicpmv_model.write_checkpoint(model, tok, out)
            (out / "training_log.json").write_text(json.dumps(training_log(reports), indent=2) + "\n")
    if layout != "minicpmv":
        out.mkdir(parents=True, exist_ok=True)
        model.generation_config = generation_config(proc)
        model.save_pretrained(out, safe_serialization=True)
        write_processor_files(proc, out)
    report = training_log(reports)
    (out / "training_log.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"saved {out} ({report['total_seconds']} s in all)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3v-train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument(
        "--layout", choices=sorted(LAYOUT_STAGES), default="llava", help="checkpoint layout (architecture)"
    )
    parser.add_argument("--images", type=int, help="training images (seed 0; default 30000, minicpmv 12000)")
    parser.add_argument(
        "--init-from",
        type=Path,
        help="minicpmv: start the tower and decoder from this LLaVA-layout shapes checkpoint (models-src/shapes)",
    )
    # One compute thread: on a shared 2-core machine a 2-thread pool spends its time waiting for the other core
    # (measured: 0.1 s per step with 1 thread, 0.3 s with 2). Data generation uses WORKERS processes.
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads")
    parser.add_argument("--seed", type=int, default=0, help="initialization and batch-order seed")
    parser.add_argument(
        "--steps", type=int, nargs=len(STAGES), metavar=tuple(s.name for s in STAGES), help="override stage steps"
    )
    args = parser.parse_args(argv)
    stages = LAYOUT_STAGES[args.layout]
    if args.steps:
        stages = tuple(dataclasses.replace(s, steps=n) for s, n in zip(stages, args.steps, strict=True))
    if args.init_from and args.layout != "minicpmv":
        parser.error("--init-from is for --layout minicpmv")
    images = args.images or (12000 if args.layout == "minicpmv" else 30000)
    log = lambda m: print(m, flush=True)  # noqa: E731
    train(args.out, images, args.threads, args.seed, stages, log, args.layout, args.init_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
