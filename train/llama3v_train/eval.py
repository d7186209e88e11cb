"""Accuracy of the shapes model on freshly generated images, in PyTorch and in the Rust runtime.

    python -m llama3v_train.eval --checkpoint models-src/shapes --model /tmp/shapes-model --images 600

Images come from a seed the training never uses (training uses seed 0). For every image and each of the three
questions, PyTorch answers with transformers' greedy `generate` and the runtime with
`llama3v generate --temperature 0 --json`; an answer is right when it is exactly the task's answer. The runtime's
token ids must equal PyTorch's on every image and question.

A checkpoint in the MiniCPM-Llama3-V 2.5 layout (config `model_type` "minicpmv", `llama3v-train --layout minicpmv`)
is answered in PyTorch by the exporter's reference (`llama3v_export.minicpmv`: its slicing, prompt layout, vision
features and the Llama decoder's greedy `generate`), image by image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from llama3v_export.checkpoint import IMAGE_SETTING_KEYS
from transformers import LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessorPil

from .shapes import QUESTIONS, answer, make_sample

EVAL_SEED = 1000
REPO = Path(__file__).resolve().parents[2]


def load_processor(checkpoint: Path) -> LlavaProcessor:
    """The checkpoint's processor with the image processor pinned to the PIL backend (as the runtime replicates)."""
    proc = LlavaProcessor.from_pretrained(checkpoint)
    settings = json.loads((checkpoint / "preprocessor_config.json").read_text())
    proc.image_processor = SiglipImageProcessorPil(**{k: settings[k] for k in IMAGE_SETTING_KEYS})
    return proc


def layout_of(checkpoint: Path) -> str:
    config = json.loads((checkpoint / "config.json").read_text())
    return "minicpmv" if config.get("model_type") == "minicpmv" else "llava"


def minicpmv_reference(checkpoint: Path):
    """(model, tokenizer, special ids, stop ids) as the exporter loads a MiniCPM-V checkpoint for its reference."""
    from llama3v_export import minicpmv as mcv
    from llama3v_export.minicpmv_export import load_minicpmv_checkpoint, special_ids
    from transformers import PreTrainedTokenizerFast

    files = load_minicpmv_checkpoint(checkpoint)
    model = mcv.load_minicpmv(checkpoint, files.weights)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(files.tokenizer_file),
        bos_token=files.tokenizer_config.get("bos_token"),
        eos_token=files.tokenizer_config.get("eos_token"),
        unk_token=mcv.PLACEHOLDER,
        chat_template=files.chat_template,
    )
    return model, tokenizer, special_ids(files.tokenizer_file), list(files.generation_config["eos_token_id"])


def minicpmv_torch_answers(checkpoint: Path, images: list[Path], question: str) -> list[list[int]]:
    """Greedy answer token ids (stop token excluded) for each image, one image at a time (prompts differ in length
    with the slice grid): the reference's slices, prompt ids, vision features and the decoder's greedy generate."""
    from llama3v_export import minicpmv as mcv
    from PIL import Image

    model, tokenizer, ids, stops = minicpmv_reference(checkpoint)
    out: list[list[int]] = []
    for path in images:
        with Image.open(path) as image:
            messages, slices = mcv.build_messages([image.convert("RGB")], question, None, model.settings)
        input_ids = mcv.prompt_ids(tokenizer, messages)
        bounds = mcv.image_bounds(input_ids, ids["image_start"], ids["image_end"])
        with torch.no_grad():
            features = model.vision_features(slices)
            embeds = model.prompt_embeddings(torch.tensor([input_ids]), features, bounds)
            generated = model.llm.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(1, len(input_ids), dtype=torch.int64),
                do_sample=False,
                max_new_tokens=32,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
        answer_ids = []
        for token in generated[0].tolist():
            if token in stops:
                break
            answer_ids.append(token)
        out.append(answer_ids)
    return out


def torch_answers(checkpoint: Path, images: list[Path], question: str, batch: int = 100) -> list[list[int]]:
    """Greedy answer token ids (stop token excluded) for each image. All prompts have the same length (one image,
    the same question), so batches need no padding."""
    from PIL import Image

    if layout_of(checkpoint) == "minicpmv":
        return minicpmv_torch_answers(checkpoint, images, question)
    proc = load_processor(checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    stops = set(model.generation_config.eos_token_id)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    out: list[list[int]] = []
    for start in range(0, len(images), batch):
        pil = [Image.open(p) for p in images[start : start + batch]]
        inputs = proc(images=pil, text=[prompt] * len(pil), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(**inputs, do_sample=False, max_new_tokens=32)
        for row in generated[:, inputs["input_ids"].shape[1] :].tolist():
            ids = []
            for token in row:
                if token in stops:
                    break
                ids.append(token)
            out.append(ids)
    return out


def runtime_answer(binary: str, model_dir: Path, image: Path, question: str) -> dict:
    args = [binary, "generate", "--model", str(model_dir), "--image", str(image), "--prompt", question]
    args += ["--temperature", "0", "--max-new-tokens", "32", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def part_accuracy(kind: str, texts: list[str], samples: list) -> dict[str, float]:
    parts = {"shape": ("shape",), "color": ("color",), "describe": ("shape", "color", "background")}[kind]
    out = {}
    for part in parts:
        hits = sum(f" {getattr(s, part)}" in f" {t.lower()}" for t, s in zip(texts, samples, strict=True))
        out[part] = hits / len(samples)
    return out


def evaluate(
    checkpoint: Path,
    model_dir: Path | None,
    count: int,
    seed: int,
    workdir: Path,
    binary: str,
    log,
    aspect: tuple[float, float] | None = None,
) -> dict:
    samples = []
    paths = []
    for i in range(count):
        sample = make_sample(seed, i, aspect)
        path = workdir / f"eval_{i:04d}.png"
        sample.image.save(path)
        samples.append(sample)
        paths.append(path)
    ratio = f", aspect ratio {aspect[0]}:1 to {aspect[1]}:1" if aspect else ""
    log(f"{count} images (seed {seed}{ratio}) in {workdir}")
    if layout_of(checkpoint) == "minicpmv":
        _, tok, _, stop_list = minicpmv_reference(checkpoint)
        stops = set(stop_list)
    else:
        tok = load_processor(checkpoint).tokenizer
        stops = set(LlavaForConditionalGeneration.from_pretrained(checkpoint).generation_config.eos_token_id)
    results: dict = {"images": count, "seed": seed, "aspect": aspect, "layout": layout_of(checkpoint), "questions": {}}
    for kind, question in QUESTIONS.items():
        want = [answer(kind, s.shape, s.color, s.background) for s in samples]
        t = time.time()
        ids = torch_answers(checkpoint, paths, question)
        texts = [tok.decode(i, skip_special_tokens=True) for i in ids]
        entry = {
            "question": question,
            "torch_accuracy": sum(a == w for a, w in zip(texts, want, strict=True)) / count,
            # Which part of the answer is right: the shape, color and background words where the question asks them.
            "torch_parts": part_accuracy(kind, texts, samples),
            "torch_seconds": round(time.time() - t, 1),
            "torch_wrong": [
                {"image": p.name, "want": w, "got": a} for p, a, w in zip(paths, texts, want, strict=True) if a != w
            ][:20],
        }
        if model_dir is not None:
            t = time.time()
            with ThreadPoolExecutor(max_workers=2) as pool:
                rust = list(pool.map(lambda p, q=question: runtime_answer(binary, model_dir, p, q), paths))
            rust_ids = [[i for i in r["tokens"] if i not in stops] for r in rust]
            rust_texts = [r["text"] for r in rust]
            mismatched = [p.name for p, a, b in zip(paths, ids, rust_ids, strict=True) if a != b]
            entry.update(
                {
                    "rust_accuracy": sum(a == w for a, w in zip(rust_texts, want, strict=True)) / count,
                    "rust_seconds": round(time.time() - t, 1),
                    "rust_equals_torch": count - len(mismatched),
                    "rust_mismatched_images": mismatched[:20],
                }
            )
        results["questions"][kind] = entry
        parts = ", ".join(f"{k} {v:.2%}" for k, v in entry["torch_parts"].items())
        line = f"{question!r}: torch {entry['torch_accuracy']:.2%} ({parts})"
        if model_dir is not None:
            line += f", rust {entry['rust_accuracy']:.2%}, rust tokens == torch tokens on "
            line += f"{entry['rust_equals_torch']}/{count}"
        log(line)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3v-train-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--model", type=Path, help="exported model directory for the Rust runtime (optional)")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--aspect",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="draw images with a long/short side ratio in [LOW, HIGH] instead of the task's generator (at most 2:1)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--binary", default=os.environ.get("LLAMA3V_BIN", str(REPO / "target/release/llama3v")))
    args = parser.parse_args(argv)
    if args.seed == 0:
        parser.error("seed 0 is the training set")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="llama3v-eval-") as tmp:
        results = evaluate(
            args.checkpoint,
            args.model,
            args.images,
            args.seed,
            Path(tmp),
            args.binary,
            lambda m: print(m, flush=True),
            tuple(args.aspect) if args.aspect else None,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = all(q["torch_accuracy"] >= 0.97 for q in results["questions"].values())
    if args.model is not None:
        ok = ok and all(
            q["rust_accuracy"] >= 0.97 and q["rust_equals_torch"] == args.images for q in results["questions"].values()
        )
    print(
        f"goal (>= 97% on each question{', rust == torch on every image' if args.model else ''}): "
        f"{'met' if ok else 'NOT met'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
