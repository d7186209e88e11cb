"""Export of a MiniCPM-Llama3-V 2.5 layout checkpoint (config `model_type` "minicpmv") to a model directory.

Same three graphs as the LLaVA layout; only the vision graph differs (onnx/README.md, "MiniCPM-V layout"):

    vision   pixel_values [B, 3, H, W] (B slices of one size, H and W multiples of the patch size)
             -> image_features [B, query_num, hidden]

The graph lays each slice out as 2.5's `[3, patch, n * patch]` strip, gives patch `i` of the `n` the position
bucket of a 1 x n strip (the boundaries are transformers' own float32 table, so the buckets are bit-equal), runs
the Idefics2 tower and the resampler with the sin-cos table of the slice's `h x w` patches computed in the graph.
The runtime slices, resizes and normalizes, and runs the overview and the grid (all one size) as separate batches.

The embed and decoder graphs are the LLaVA layout's, built by the same streaming builders (text_graphs.py, fused.py;
plain, fused, int4) from the `llm.*` weights, read through this layout's key table (`KEY_PREFIXES`, the llama3v
release's renamed prefixes included) and validated against the same lazy reference (lazy_model.py). The vision
graph is still traced from PyTorch (tower and resampler in memory in the export dtype, then written as one graph):
onnx/README.md, "The MiniCPM-V layout".
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import skimage.data
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from . import minicpmv as mcv
from .checkpoint import Checkpoint, CheckpointError, _read_json, _require, find_chat_template, find_weights
from .export_run import FLOAT_DTYPES, ExportResult, clear_results, progress_log
from .fused import check_supported
from .graph_export import export_all
from .graphs import EXTERNAL_DATA_THRESHOLD, Dims, GraphSpec, TensorSpec, graph_specs, text_dims
from .lazy_model import lazy_language_model
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    _token_id,
    generation_section,
    graph_entry,
    model_section,
    provenance_section,
    text_settings,
    write_model_files,
)
from .quantize import int4_settings, quantization_entry
from .reference import STEPS, Case, greedy_config
from .text_graphs import LANGUAGE
from .validate import Comparison, compare, decode_steps, raise_on_failure, session, validate_graphs
from .weights import CheckpointWeights

LAYOUT = "minicpmv"

# Module names (the LLaVA model's, as the graph builders and the lazy reference ask for weights; `vpm.` and
# `resampler.` for the vision side) -> checkpoint key prefixes: 2.5's names, then the llama3v release's.
KEY_PREFIXES = (
    (f"{LANGUAGE}.", ("llm.model.",)),
    ("lm_head.", ("llm.lm_head.",)),
    *((new, (new, old)) for old, new in mcv.RENAMED_PREFIXES.items()),
)

# The reference cases: one photograph that needs slicing, two of other aspect ratios, text only.
CASES = (
    Case("sliced_image", None, "What is in this image?", ("astronaut",)),
    Case(
        "two_images", "You are a helpful assistant. Answer briefly.", "Compare these two images.", ("chelsea", "coffee")
    ),
    Case("text_only", None, "Write a haiku about llamas.", ()),
)


def load_minicpmv_checkpoint(path: Path) -> Checkpoint:
    """The files of a 2.5 layout checkpoint, checked. `image_settings` holds 2.5's pixel constants (it ships no
    preprocessor config); a missing generation_config.json falls back to 2.5's stop tokens."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = _read_json(_require(path / "config.json", "model configuration"))
    try:
        settings = mcv.SliceSettings.from_config(config)
        mcv.vision_config(config)
    except (mcv.MiniCPMVCheckpointError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / 'config.json'}: {err}") from err
    if not settings.slice_mode:
        raise CheckpointError(f"{path / 'config.json'}: slice_mode false is not supported (2.5 always slices)")
    tokenizer_file = _require(path / "tokenizer.json", "Hugging Face tokenizer")
    tokenizer_config_file = path / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_file) if tokenizer_config_file.is_file() else {}
    template, template_file = find_chat_template(path, tokenizer_config)
    generation_file = path / "generation_config.json"
    generation = _read_json(generation_file) if generation_file.is_file() else {}
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eos = tokenizer_config.get("eos_token", "<|end_of_text|>")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    # 2.5's `_decode` stops at the tokenizer's EOS and <|eot_id|>, besides what generation_config.json names.
    stops = generation.get("eos_token_id", [])
    stops = [stops] if isinstance(stops, int) else list(stops)
    for token in (eos, mcv.EOT_TOKEN):
        token_id = _token_id(tokenizer, token, "the stop tokens")
        if token_id not in stops:
            stops.append(token_id)
    generation = {**generation, "eos_token_id": stops}
    pixel = {
        "size": {"height": settings.scale_resolution, "width": settings.scale_resolution},
        "resample": 3,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mcv.PIXEL_MEAN),
        "image_std": list(mcv.PIXEL_STD),
        "do_convert_rgb": True,
    }
    return Checkpoint(
        path=path,
        config=config,
        weights=find_weights(path),
        tokenizer_file=tokenizer_file,
        tokenizer_config=tokenizer_config,
        chat_template=template,
        chat_template_file=template_file,
        image_settings=pixel,
        processor_settings={"image_token": mcv.PLACEHOLDER},
        generation_config=generation,
    )


def minicpmv_dims(text, settings: mcv.SliceSettings) -> Dims:
    """Dims of the Llama config `text` (2.5's config itself); the image size and patch are the nominal slice's."""
    # The vision graph takes any slice size; these name the nominal one (scale_resolution) and the patch.
    return text_dims(text, settings.scale_resolution, settings.patch_size, vision_feature_layer=-1)


def vision_model(checkpoint: Checkpoint, weights: CheckpointWeights, dtype: torch.dtype) -> mcv.MiniCPMV:
    """The model with the tower's and the resampler's weights in `dtype` and the language model on the meta device
    (its graphs and its reference read the checkpoint themselves)."""
    try:
        with torch.device("meta"):
            model = mcv.MiniCPMV(checkpoint.config)
        # The whole layout, language model included, is checked here, before any graph is written.
        mcv.check_weight_names(checkpoint.path, model, mcv.map_renamed_keys(dict.fromkeys(weights.keys())))
    except mcv.MiniCPMVCheckpointError as err:
        raise CheckpointError(str(err)) from err
    for prefix, module in (("vpm.", model.vpm), ("resampler.", model.resampler)):
        state = {name: weights.tensor(prefix + name, dtype) for name in module.state_dict()}
        module.load_state_dict(state, assign=True)
    model.vpm.set_attn_implementation("eager")
    return model.eval()


def minicpmv_specs(dims: Dims, query_num: int, float_dtype: str) -> dict[str, GraphSpec]:
    """The LLaVA layout's embed and decoder specs, and the slice-size-free vision spec."""
    specs = graph_specs(dims, float_dtype)
    specs["vision"] = GraphSpec(
        "vision",
        (TensorSpec("pixel_values", float_dtype, ("batch", 3, "height", "width")),),
        (TensorSpec("image_features", float_dtype, ("batch", query_num, dims.hidden_size)),),
    )
    return specs


class MiniCPMVisionGraph(torch.nn.Module):
    """pixel_values [B, 3, H, W] -> image_features [B, Q, D]: 2.5's tower + resampler on B slices of one size."""

    def __init__(self, model: mcv.MiniCPMV):
        super().__init__()
        self.vpm = model.vpm
        self.resampler = model.resampler
        self.patch = model.settings.patch_size
        side = self.vpm.embeddings.num_patches_per_side
        # transformers' own boundaries (Idefics2VisionEmbeddings), so that the graph's buckets are bit-equal.
        self.register_buffer("boundaries", torch.arange(1 / side, 1.0, 1 / side), persistent=False)
        self.register_buffer(
            "omega", torch.from_numpy(mcv.resampler_omega(model.resampler.embed_dim)), persistent=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = pixel_values.shape
        p = self.patch
        rows, columns = height // p, width // p
        # reshape_by_patch: [B, 3, H, W] -> [B, 3, p, n * p], patches row by row.
        strip = pixel_values.reshape(batch, channels, rows, p, columns, p).permute(0, 1, 3, 2, 4, 5)
        strip = strip.reshape(batch, channels, p, rows * columns * p)
        embeddings = self.vpm.embeddings.patch_embedding(strip).flatten(2).transpose(1, 2)
        # Position buckets of a 1 x n strip: patch i at i * (1 / n), counted against the boundaries.
        count = rows * columns
        index = torch.arange(count, dtype=torch.float32)
        step = 1.0 / (torch.ones((), dtype=torch.float32) * count)
        fraction = torch.clamp(index * step, max=1.0 - 1e-6)
        buckets = (fraction[:, None] >= self.boundaries[None, :]).sum(-1)
        embeddings = embeddings + self.vpm.embeddings.position_embedding(buckets)[None]
        hidden = self.vpm.encoder(inputs_embeds=embeddings).last_hidden_state
        hidden = self.vpm.post_layernorm(hidden)
        return self._resample(hidden, rows, columns)

    def _resample(self, x: torch.Tensor, rows, columns) -> torch.Tensor:
        r = self.resampler
        dim = r.embed_dim

        def encode(pos: torch.Tensor) -> torch.Tensor:
            out = pos[:, None] * self.omega[None, :]
            return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)

        column_half = encode(torch.arange(columns, dtype=torch.float32))  # [w, D/2]
        row_half = encode(torch.arange(rows, dtype=torch.float32))  # [h, D/2]
        table = (
            torch.cat(
                [column_half[None].expand(rows, columns, dim // 2), row_half[:, None].expand(rows, columns, dim // 2)],
                -1,
            )
            .reshape(rows * columns, dim)
            .to(x.dtype)
        )
        kv = r.ln_kv(r.kv_proj(x))
        keys = kv + table[None]
        query = r.ln_q(r.query)
        w_q, w_k, w_v = r.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = r.attn.in_proj_bias.chunk(3)
        heads = r.attn.num_heads
        head_dim = dim // heads
        q = (query @ w_q.T + b_q).reshape(-1, heads, head_dim).transpose(0, 1)  # [H, Q, hd]
        k = (keys @ w_k.T + b_k).reshape(x.shape[0], -1, heads, head_dim).transpose(1, 2)  # [B, H, L, hd]
        v = (kv @ w_v.T + b_v).reshape(x.shape[0], -1, heads, head_dim).transpose(1, 2)
        scores = torch.matmul(q[None] * head_dim**-0.5, k.transpose(2, 3))
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(x.shape[0], -1, dim)
        out = r.attn.out_proj(out)
        return r.ln_post(out) @ r.proj


# Slice sizes the vision graph is traced on: batch 2 of 3 x 5 patches (every dim distinct and above 1).
TRACE_PATCHES = (2, 3, 5)


def export_vision(
    model: mcv.MiniCPMV, spec: GraphSpec, out_dir: Path, opset: int, external_data: bool | None
) -> list[Path]:
    """Trace the vision graph from `model` (tower and resampler in the export dtype) and write it by the streamed
    graphs' rule: one `<graph>.onnx.data` when its weights pass EXTERNAL_DATA_THRESHOLD (or `external_data`)."""
    batch, rows, columns = TRACE_PATCHES
    p = model.settings.patch_size
    dtype = next(model.vpm.parameters()).dtype
    pixels = torch.rand(batch, 3, rows * p, columns * p, generator=torch.Generator().manual_seed(0)).to(dtype)
    module = MiniCPMVisionGraph(model).eval()
    tensors = spec.inputs + spec.outputs
    dynamic_axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in tensors}
    dst = out_dir / spec.file
    data = dst.with_name(dst.name + ".data")
    for stale in (dst, data):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_file = Path(tmp) / spec.file
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (pixels,),
                str(tmp_file),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
            )
        proto = onnx.load(str(tmp_file), load_external_data=True)
    # The tracer's shape inference loses static dims; the contract's shapes are what the runtime reads.
    graph = proto.graph
    for values, specs in ((graph.input, spec.inputs), (graph.output, spec.outputs)):
        for value, tensor in zip(values, specs, strict=True):
            value.type.tensor_type.shape.CopyFrom(onnx.helper.make_tensor_type_proto(1, tensor.shape).tensor_type.shape)
    if external_data is None:
        external_data = sum(t.ByteSize() for t in graph.initializer) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        onnx.save_model(proto, str(dst))
    else:
        # Tensors under 1 KiB stay in the graph (ONNX Runtime's shape inference reads them at load), as builder.py.
        onnx.save_model(proto, str(dst), save_as_external_data=True, location=data.name, size_threshold=1024)
        # onnx writes the data file readable by its owner only; a server running as another user must read it.
        data.chmod(dst.stat().st_mode & 0o777)
    onnx.checker.check_model(str(dst))
    return [dst, data] if external_data else [dst]


# (label, slices as (count, rows, columns) patch grids): one size alone, two sizes padded together by the
# reference (which the graph runs as two batches), and a long thin strip (many buckets of one row).
VISION_CASES = (
    ("one slice 4x4", ((1, 4, 4),)),
    ("overview 3x5 + grid 3 x (4x2)", ((1, 3, 5), (3, 4, 2))),
    ("strip 1x23", ((1, 1, 23),)),
)


def validate_vision(path: Path, model: mcv.MiniCPMV, dtype: str, log) -> list[Comparison]:
    """The vision graph, one run per slice size, against the reference's padded batch over all the slices."""
    graph = session(path)
    p = model.settings.patch_size
    float_type = np.float16 if dtype == "fp16" else np.float32
    comparisons = []
    for seed, (label, groups) in enumerate(VISION_CASES):
        generator = torch.Generator().manual_seed(seed)
        batches = [torch.rand(n, 3, h * p, w * p, generator=generator) * 2 - 1 for n, h, w in groups]
        with torch.no_grad():
            want = model.vision_features([s for b in batches for s in b]).numpy()
        got = np.concatenate([graph.run(None, {"pixel_values": b.numpy().astype(float_type)})[0] for b in batches])
        result = compare(f"vision image_features ({label})", got, want, dtype)
        log(result.line())
        comparisons.append(result)
    return comparisons


# --- Reference cases ------------------------------------------------------------------------------------------


def _tokenizer(checkpoint: Checkpoint) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint.tokenizer_file),
        bos_token=checkpoint.tokenizer_config.get("bos_token"),
        eos_token=checkpoint.tokenizer_config.get("eos_token"),
        unk_token=mcv.PLACEHOLDER,
        chat_template=checkpoint.chat_template,
    )


def reference_case(
    model: mcv.MiniCPMV, tokenizer: PreTrainedTokenizerFast, case: Case, images: list[Image.Image], ids: dict
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Tensors (input_ids, each slice's pixels, image_features, step_logits) and the greedy tokens of one case."""
    messages, slices = mcv.build_messages(images, case.prompt, case.system, model.settings)
    input_ids = mcv.prompt_ids(tokenizer, messages)
    bounds = mcv.image_bounds(input_ids, ids["image_start"], ids["image_end"])
    if len(bounds) != len(slices):
        raise AssertionError(f"{case.name}: {len(bounds)} image bounds for {len(slices)} slices")
    tensors = {"input_ids": np.array([input_ids], np.int64)}
    with torch.no_grad():
        features = model.vision_features(slices) if slices else None
        embeds = model.prompt_embeddings(torch.tensor([input_ids]), features, bounds)
        out = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.int64),
            generation_config=greedy_config(ids["bos"]),
        )
    for i, pixels in enumerate(slices):
        tensors[f"pixel_values.{i}"] = np.ascontiguousarray(pixels.numpy())
    if features is not None:
        tensors["image_features"] = features.float().numpy()
    tokens = out.sequences[0].tolist()[-STEPS:]
    step_logits = torch.cat(out.logits, dim=0).float().numpy()
    if step_logits.argmax(-1).tolist() != tokens:
        raise AssertionError(f"{case.name}: greedy tokens are not the argmax of the step logits")
    tensors["step_logits"] = np.ascontiguousarray(step_logits, dtype=np.float32)
    return tensors, tokens


def special_ids(tokenizer_file: Path) -> dict[str, int]:
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    names = {
        "image_start": mcv.IMAGE_START,
        "image_end": mcv.IMAGE_END,
        "slice_start": mcv.SLICE_START,
        "slice_end": mcv.SLICE_END,
        "placeholder": mcv.PLACEHOLDER,
        "bos": "<|begin_of_text|>",
    }
    return {key: _token_id(tokenizer, token, "MiniCPM-V's prompt layout") for key, token in names.items()}


def write_reference(checkpoint: Checkpoint, model: mcv.MiniCPMV, out: Path, log) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(checkpoint)
    ids = special_ids(checkpoint.tokenizer_file)
    model.llm.generation_config = greedy_config(ids["bos"])
    cases, index = [], 0
    for case in CASES:
        names = []
        for sample in case.images:
            name = f"image_{index}.png"
            Image.fromarray(getattr(skimage.data, sample)()).convert("RGB").save(out / name)
            names.append(name)
            index += 1
        images = [Image.open(out / n).convert("RGB") for n in names]
        tensors, tokens = reference_case(model, tokenizer, case, images, ids)
        save_file(tensors, str(out / f"{case.name}.safetensors"))
        slices = sum(1 for k in tensors if k.startswith("pixel_values."))
        cases.append(
            {
                "name": case.name,
                "system": case.system,
                "prompt": case.prompt,
                "images": names,
                "slices": slices,
                "tensors": f"{case.name}.safetensors",
                "greedy_tokens": tokens,
            }
        )
        log(
            f"reference case {case.name}: {tensors['input_ids'].shape[1]} prompt tokens, {len(names)} image(s), "
            f"{slices} slice(s)"
        )
    document = {"format_version": 1, "layout": LAYOUT, "cases": cases}
    (out / "reference.json").write_text(json.dumps(document, indent=2) + "\n")
    return document


def slice_features(vision: ort.InferenceSession, slices: list[np.ndarray], float_type) -> np.ndarray:
    """Features of slices in order, one vision run per run of equal-size slices (as the runtime runs them)."""
    out, start = [], 0
    while start < len(slices):
        end = start + 1
        while end < len(slices) and slices[end].shape == slices[start].shape:
            end += 1
        batch = np.stack(slices[start:end]).astype(float_type)
        out.append(vision.run(None, {"pixel_values": batch})[0])
        start = end
    return np.concatenate(out)


def validate_reference(
    reference_dir: Path, files, specs, dims: Dims, dtype: str, placeholder_id: int, log, quant=None, decoder="plain"
) -> list[Comparison]:
    """Each reference case through the graphs as the runtime runs them: vision per slice size, embed, features
    spliced at the placeholder rows, prefill, then one reference token per step; compared with PyTorch's."""
    document = json.loads((reference_dir / "reference.json").read_text())
    sessions = {name: session(path) for name, path in files.items()}
    float_type = np.float16 if dtype == "fp16" else np.float32
    comparisons = []
    for case in document["cases"]:
        tensors = load_file(str(reference_dir / case["tensors"]))
        input_ids = tensors["input_ids"]
        embeds = sessions["embed"].run(None, {"input_ids": input_ids})[0]
        results = {}
        if case["slices"]:
            slices = [tensors[f"pixel_values.{i}"] for i in range(case["slices"])]
            features = slice_features(sessions["vision"], slices, float_type)
            results["image_features"] = (features, tensors["image_features"])
            embeds[input_ids == placeholder_id] = features.reshape(-1, dims.hidden_size)
        logits = decode_steps(
            sessions, specs["decoder"], dims, float_type, embeds, case["greedy_tokens"], shared=decoder != "plain"
        )
        results["step_logits"] = (logits, tensors["step_logits"])
        for output, (got, want) in results.items():
            is_logits = output == "step_logits"
            result = compare(
                f"reference {case['name']} {output}",
                got,
                want,
                dtype,
                logits=is_logits,
                quant=quant if is_logits else None,
            )
            log(result.line())
            comparisons.append(result)
            if dtype == "fp32" and quant is None and result.top1 is not None and result.top1[0] != result.top1[1]:
                comparisons.append(Comparison(f"{result.label} greedy tokens", float("inf"), result.tolerance))
    raise_on_failure(comparisons)
    return comparisons


# --- Manifest ----------------------------------------------------------------------------------------------------


def layout_settings(checkpoint: Checkpoint, settings: mcv.SliceSettings) -> dict[str, Any]:
    """The manifest's `minicpmv` section: slicing and the prompt layout's special tokens."""
    ids = special_ids(checkpoint.tokenizer_file)
    return {
        "query_num": settings.query_num,
        "max_slice_nums": settings.max_slice_nums,
        "scale_resolution": settings.scale_resolution,
        "patch_size": settings.patch_size,
        "image_start_token": mcv.IMAGE_START,
        "image_start_token_id": ids["image_start"],
        "image_end_token": mcv.IMAGE_END,
        "image_end_token_id": ids["image_end"],
        "slice_start_token": mcv.SLICE_START,
        "slice_start_token_id": ids["slice_start"],
        "slice_end_token": mcv.SLICE_END,
        "slice_end_token_id": ids["slice_end"],
    }


def build_manifest(checkpoint, settings, dims, specs, files, dtype, opset, quantization, decoder) -> dict[str, Any]:
    pixel = checkpoint.image_settings
    generation = checkpoint.generation_config
    placeholder_id = special_ids(checkpoint.tokenizer_file)["placeholder"]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": LAYOUT,
        "dtype": dtype,
        "decoder_flavour": decoder,
        "graphs": {name: graph_entry(specs[name], files[name]) for name in ("vision", "embed", "decoder")},
        "model": model_section(dims),
        # Per slice: the nominal slice size, the pixel transform, and the placeholder rows its features replace.
        "image": {
            "height": settings.scale_resolution,
            "width": settings.scale_resolution,
            "resample": "bicubic",
            "do_rescale": pixel["do_rescale"],
            "rescale_factor": pixel["rescale_factor"],
            "do_normalize": pixel["do_normalize"],
            "mean": pixel["image_mean"],
            "std": pixel["image_std"],
            "do_convert_rgb": True,
            "tokens_per_image": settings.query_num,
            "image_token": mcv.PLACEHOLDER,
            "image_token_id": placeholder_id,
        },
        "minicpmv": layout_settings(checkpoint, settings),
        # 2.5's config is itself the Llama config (LLaVA nests it as text_config).
        "text": text_settings(replace(checkpoint, config={**checkpoint.config, "text_config": checkpoint.config})),
        "generation": generation_section(generation),
        "provenance": provenance_section(checkpoint, opset, dtype, quantization, source_layout="MiniCPM-Llama3-V 2.5"),
    }
    if quantization is not None:
        manifest["quantization"] = quantization
    return manifest


def export_minicpmv(
    checkpoint_dir: Path,
    out: Path,
    dtype: str,
    reference: bool,
    opset: int,
    validate: bool,
    log: Callable[[str], None],
    external_data: bool | None,
    quant: str | None,
    block_size: int,
    decoder: str,
) -> ExportResult:
    """`cli.export_model` for the MiniCPM-V layout: same steps, same guarantees (nothing loadable unless valid).

    The embed and decoder graphs stream from the checkpoint as the LLaVA layout's do (int4 quantized as they
    stream) and are validated against the lazy fp32 Llama; the vision graph is traced from the tower and
    resampler alone (the language model is never loaded for it) and validated against them in fp32."""
    step = progress_log(log)
    checkpoint = load_minicpmv_checkpoint(checkpoint_dir)
    step(f"checkpoint {checkpoint.path} (MiniCPM-Llama3-V 2.5 layout): {', '.join(p.name for p in checkpoint.weights)}")
    clear_results(out)
    text = mcv.text_config(checkpoint.config)
    settings = mcv.SliceSettings.from_config(checkpoint.config)
    dims = minicpmv_dims(text, settings)
    if decoder != "plain":
        check_supported(text)
    weights = CheckpointWeights(checkpoint.weights, text.tie_word_embeddings, KEY_PREFIXES)
    float_dtype = FLOAT_DTYPES[dtype]
    specs = minicpmv_specs(dims, settings.query_num, float_dtype)
    step(
        f"model ({dtype}): {dims.num_layers} layers, hidden {dims.hidden_size}, {settings.query_num} queries per "
        f"slice, up to {settings.max_slice_nums} slices of ~{settings.scale_resolution} px, patch "
        f"{settings.patch_size}; text weights stream from the checkpoint"
    )
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32

    def vision(spec: GraphSpec) -> list[Path]:
        step("tracing the vision graph (tower + resampler in memory)")
        return export_vision(vision_model(checkpoint, weights, torch_dtype), spec, out, opset, external_data)

    int4 = int4_settings(block_size) if quant is not None else None
    files = export_all(
        text, vision, weights, specs, dims.max_context, out, float_dtype, opset, step, external_data, decoder, int4
    )
    graph_files = {name: paths[0] for name, paths in files.items()}
    result = ExportResult(out, {})
    if validate:
        step("validating graphs with onnxruntime against PyTorch (fp32; language model weights loaded as it runs)")
        result.comparisons += validate_vision(
            graph_files["vision"], vision_model(checkpoint, weights, torch.float32), dtype, step
        )
        result.comparisons += validate_graphs(
            graph_files,
            specs,
            lazy_language_model(text, weights),
            dims,
            dtype,
            step,
            quant=quant,
            graphs=("embed", "decoder"),
            decoder=decoder,
        )
        raise_on_failure(result.comparisons)
    if reference:
        step("computing reference cases with PyTorch (the whole fp32 model)")
        try:
            model = mcv.load_minicpmv(checkpoint.path, checkpoint.weights, torch.float32)
        except mcv.MiniCPMVCheckpointError as err:
            raise CheckpointError(str(err)) from err
        model.set_attn_implementation("sdpa")
        result.reference = write_reference(checkpoint, model, out / "reference", step)
        del model
        if validate:
            step("running the reference cases through the exported graphs")
            placeholder = special_ids(checkpoint.tokenizer_file)["placeholder"]
            result.comparisons += validate_reference(
                out / "reference", graph_files, specs, dims, dtype, placeholder, step, quant=quant, decoder=decoder
            )
    quantization = quantization_entry(block_size) if quant is not None else None
    result.manifest = build_manifest(checkpoint, settings, dims, specs, files, dtype, opset, quantization, decoder)
    write_model_files(out, checkpoint, result.manifest)
    step(f"wrote {out / 'manifest.json'}")
    return result
