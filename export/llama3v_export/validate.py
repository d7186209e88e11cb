"""Parity of the exported graphs (onnxruntime, CPU) with the PyTorch model they came from.

fp32 exports: every output within 1e-4 absolute. fp16 exports are compared with the fp32 model: relative error
(max abs diff / max abs of the reference) within 1e-2, and top-1 agreement of the logits is reported.

int4 exports (weight-only, decoder only) are not held to float tolerances: the decoder's outputs are compared with
the fp32 model by relative error within INT4_REL_TOLERANCE, and on the reference cases (teacher-forced, so each step
sees the reference's own prefix) the reference's greedy token must be among the int4 logits' INT4_TOP_K largest on
at least INT4_MIN_TOP_K of the steps; top-1 agreement is reported beside it. The bounds separate int4 rounding noise
from a broken graph on random-weight checkpoints, whose nearly flat logits (top-1 ahead of top-2 by ~0.2 of ~4.5)
let that noise reorder the first places (onnx/README.md, "Quantized exports"). The vision and embed graphs stay
float and keep the float tolerances. For fp16 and int4 exports with reference cases, free-running greedy decoding
of GREEDY_TOKENS tokens from the first case's prompt is compared with fp32 transformers' and reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.numpy import load_file
from transformers import DynamicCache, GenerationConfig, LlavaForConditionalGeneration

from .graphs import Dims, GraphSpec, dummy_inputs
from .heap import release_free_heap
from .quantize import QUANTIZED_GRAPHS

FP32_ABS_TOLERANCE = 1e-4
FP16_REL_TOLERANCE = 1e-2
# int4 bounds (onnx/README.md, "Quantized exports"): max abs error relative to the largest fp32 value, and the
# fraction of teacher-forced steps whose fp32 greedy token is among the int4 logits' INT4_TOP_K largest. Measured on
# the random-weight mid preset at block 32: relative error up to 0.56, top-10 membership from 0.72.
INT4_REL_TOLERANCE = 0.75
INT4_TOP_K = 10
INT4_MIN_TOP_K = 0.5


class ValidationError(RuntimeError):
    """An exported graph disagrees with PyTorch beyond tolerance."""


@dataclass(frozen=True)
class Comparison:
    """One output compared on one case; `relative` and `top1` are set for fp16/int4 and logits respectively;
    `top_k` (int4 logits) counts the positions whose reference argmax is among the INT4_TOP_K largest, and
    `min_top_k` is the fraction of them required (None: reported only)."""

    label: str
    max_abs_diff: float
    tolerance: float
    relative: float | None = None
    top1: tuple[int, int] | None = None
    top_k: tuple[int, int] | None = None
    min_top_k: float | None = None

    @property
    def passed(self) -> bool:
        measured = self.max_abs_diff if self.relative is None else self.relative
        if self.min_top_k is not None and self.top_k is not None and self.top_k[0] < self.min_top_k * self.top_k[1]:
            return False
        return bool(measured <= self.tolerance)

    def line(self) -> str:
        text = f"{self.label}: max abs diff {self.max_abs_diff:.3e}"
        if self.relative is None:
            text += f" (tolerance {self.tolerance:.0e})"
        else:
            text += f", relative error {self.relative:.3e} (tolerance {self.tolerance:.2g})"
        if self.top1 is not None:
            text += f", top-1 agreement {self.top1[0]}/{self.top1[1]}"
        if self.top_k is not None:
            text += f", reference token in top {INT4_TOP_K} {self.top_k[0]}/{self.top_k[1]}"
            if self.min_top_k is not None:
                text += f" = {self.top_k[0] / max(self.top_k[1], 1):.3f} (minimum {self.min_top_k:.2f})"
        return text + ("" if self.passed else "  FAILED")


def compare(
    label: str, got: np.ndarray, want: np.ndarray, dtype: str, logits: bool = False, quant: str | None = None
) -> Comparison:
    """Max abs diff of `got` against `want` (fp32 reference), with the dtype's (or the quantization's) tolerance."""
    got32, want32 = got.astype(np.float32), want.astype(np.float32)
    if got32.shape != want32.shape:
        raise ValidationError(f"{label}: shape {got32.shape} differs from the reference's {want32.shape}")
    diff = float(np.abs(got32 - want32).max()) if got32.size else 0.0
    if not np.isfinite(got32).all():
        diff = float("inf")
    top1 = None
    top_k = None
    if logits:
        agree = got32.argmax(-1) == want32.argmax(-1)
        top1 = (int(agree.sum()), int(agree.size))
        if quant == "int4":
            # Rank of the reference's argmax in ours: how many of our logits beat its logit.
            ours_at_ref = np.take_along_axis(got32, want32.argmax(-1)[..., None], -1)
            within = (got32 > ours_at_ref).sum(-1) < INT4_TOP_K
            top_k = (int(within.sum()), int(within.size))
    scale = float(np.abs(want32).max()) if want32.size else 1.0
    relative = diff / max(scale, 1e-30)
    if quant == "int4":
        return Comparison(label, diff, INT4_REL_TOLERANCE, relative, top1, top_k, INT4_MIN_TOP_K if logits else None)
    if dtype == "fp32":
        return Comparison(label, diff, FP32_ABS_TOLERANCE, top1=top1)
    return Comparison(label, diff, FP16_REL_TOLERANCE, relative=relative, top1=top1)


def session(path: Path, lean_dtype: str | None = None) -> ort.InferenceSession:
    """A CPU session; `lean_dtype` (the graph's float dtype) holds its weights once, as the export's memory bound
    needs (docs/PERFORMANCE.md, "Export memory").

    Lean: no prepacking of float MatMul weights (ONNX Runtime would keep a packed copy of each beside the one it
    read, 2x the weights while loading), and for fp16 no graph optimizations, no arena and priority-based node
    order: the CPU has no fp16 MatMul, so ONNX Runtime casts each fp16 weight to fp32; optimized, constant folding
    keeps every cast result (2x the weights in fp32 beside the fp16 ones); unoptimized in the default order, every
    cast (its input is an initializer, so it is ready first) runs before the first MatMul and all results are alive
    at once; in priority order each runs just before its MatMul and is freed after it (six 128 MiB fp16 MatMuls
    in a chain: 2.32 GiB peak against 1.19 GiB). The kernels and their arithmetic are the same; int4 graphs keep
    prepacking (MatMulNBits packs into the layout its int8-activation kernel runs on)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if lean_dtype is not None:
        options.add_session_config_entry("session.disable_prepacking", "1")
        if lean_dtype == "fp16":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.enable_cpu_mem_arena = False
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _torch_reference(model: LlavaForConditionalGeneration, dims: Dims, graph: str, inputs: dict) -> list[np.ndarray]:
    """The model's own code path for each graph, in fp32, with the graph's inputs."""
    as32 = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        if graph == "vision":
            features = model.get_image_features(
                pixel_values=as32["pixel_values"],
                vision_feature_layer=dims.vision_feature_layer,
                vision_feature_select_strategy="full",
            ).pooler_output
            return [torch.stack(list(features)).numpy()]
        if graph == "embed":
            return [model.get_input_embeddings()(as32["input_ids"]).numpy()]
        past = [as32[n] for n in list(as32)[3:]]
        # An empty past is the model's own prefill path: no cache passed in, the model creates it.
        cache = (
            DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(dims.num_layers)]) if past[0].shape[2] else None
        )
        out = model(
            inputs_embeds=as32["inputs_embeds"],
            attention_mask=as32["attention_mask"],
            position_ids=as32["position_ids"],
            cache=cache,
            use_cache=True,
            return_dict=True,
            logits_to_keep=1,
        )
        present = [t.numpy() for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return [out.logits.numpy(), *present]


# (graph, case label, sizes): batch sizes differ from the traced batch (2) where one case covers a graph, and the
# decoder cases cover prefill with an empty past, a single-token decode step and a chunk appended to a past, the
# three regimes a traced graph could have specialised on.
CASES = (
    ("vision", "batch 3", {"batch": 3, "sequence": 1, "past_sequence": 0}),
    ("embed", "B=1 S=7", {"batch": 1, "sequence": 7, "past_sequence": 0}),
    ("decoder", "prefill P=0 S=5", {"batch": 1, "sequence": 5, "past_sequence": 0}),
    ("decoder", "decode P=5 S=1", {"batch": 1, "sequence": 1, "past_sequence": 5}),
    ("decoder", "chunk P=5 S=3, B=2 with padding", {"batch": 2, "sequence": 3, "past_sequence": 5}),
)


def _case_inputs(
    spec: GraphSpec, dims: Dims, sizes: dict[str, int], seed: int, padding: bool = True
) -> dict[str, torch.Tensor]:
    inputs = dummy_inputs(spec, {**sizes, "vocab": dims.vocab_size}, seed=seed)
    if "pixel_values" in inputs:
        # The processor's output range: [0, 1] after rescaling, [-1, 1] after normalising with mean = std = 0.5.
        pixels = inputs["pixel_values"]
        uniform = torch.rand(pixels.shape, generator=torch.Generator().manual_seed(seed))
        inputs["pixel_values"] = (uniform * 2 - 1).to(pixels.dtype)
    if "input_ids" in inputs:
        # Both ends of the table; the last row is the image token's.
        inputs["input_ids"][0, :3] = torch.tensor([0, dims.vocab_size - 1, dims.vocab_size - 2])
    if padding and sizes["batch"] == 2 and "attention_mask" in inputs:
        # Left padding in the second sequence's past; its new positions keep attending to real positions.
        inputs["attention_mask"][1, :2] = 0
    return inputs


def _resolve(shape: Sequence[int | str], sizes: dict[str, int]) -> tuple[int, ...]:
    resolved = {**sizes, "total_sequence": sizes["past_sequence"] + sizes["sequence"]}
    return tuple(resolved[d] if isinstance(d, str) else d for d in shape)


def validate_graphs(
    files: dict[str, Path],
    specs: dict[str, GraphSpec],
    reference: LlavaForConditionalGeneration,
    dims: Dims,
    dtype: str,
    log: Callable[[str], None] = print,
    quant: str | None = None,
    graphs: Sequence[str] = ("vision", "embed", "decoder"),
    decoder: str = "plain",
) -> list[Comparison]:
    """Run every case of `graphs` through onnxruntime and the fp32 PyTorch model; raises ValidationError on any
    failure. `quant` names the quantization of the decoder in `files` (int4: the quantized tolerances; the vision
    and embed graphs stay float).

    One graph at a time, and for each, every onnxruntime run before the reference's: the session is closed before
    the reference model loads its weights (lazy_model.py), so the two never hold weights at once.

    A fused decoder (`decoder="fused"`) runs the chunk case with one sequence (its contract: one unpadded
    sequence; GroupQueryAttention appends several positions to a past for batch 1 only), and also runs the way
    the runtime drives it: prefill, a decode step and a chunk appended in place to buffers bound as both past
    and present."""
    comparisons: list[Comparison] = []
    for graph in graphs:
        graph_quant = quant if graph in QUANTIZED_GRAPHS else None
        cases = []
        for seed, (case_graph, case, sizes) in enumerate(CASES):
            if case_graph != graph:
                continue
            padding = decoder == "plain"
            if not padding and graph == "decoder" and sizes["sequence"] > 1 and sizes["past_sequence"] > 0:
                # GroupQueryAttention appends several positions to a past for one sequence only.
                case, sizes = case.replace(", B=2 with padding", ""), {**sizes, "batch": 1}
            cases.append((case, sizes, _case_inputs(specs[graph], dims, sizes, seed, padding)))
        spec = specs[graph]
        runner = session(files[graph], None if graph_quant else dtype)
        outputs = [runner.run([t.name for t in spec.outputs], {k: v.numpy() for k, v in inputs.items()})
                   for _, _, inputs in cases]  # fmt: skip
        shared = _shared_buffer_runs(runner, spec, dims, dtype) if graph == "decoder" and decoder != "plain" else None
        del runner
        release_free_heap()
        for (case, sizes, inputs), got in zip(cases, outputs, strict=True):
            want = _torch_reference(reference, dims, graph, inputs)
            for tensor, g, w in zip(spec.outputs, got, want, strict=True):
                expected_shape = _resolve(tensor.shape, sizes)
                if g.shape != expected_shape:
                    raise ValidationError(f"{graph} {tensor.name} ({case}): shape {g.shape}, contract {expected_shape}")
                label = f"{graph} {tensor.name} ({case})"
                result = compare(label, g, w, dtype, logits=tensor.name == "logits", quant=graph_quant)
                # One or two positions per case here: top-1 agreement is reported, and judged on the reference cases.
                result = replace(result, min_top_k=None)
                log(result.line())
                comparisons.append(result)
        if shared is not None:
            for result in _shared_buffer_compare(shared, spec, reference, dims, dtype, graph_quant):
                log(result.line())
                comparisons.append(result)
        release_free_heap()
    raise_on_failure(comparisons)
    return comparisons


def _bound_run(
    decoder: ort.InferenceSession, spec: GraphSpec, buffers: list, embeds: np.ndarray, position: int
) -> np.ndarray:
    """One decoder run with every past input and its present output bound to the same buffer (`buffers`, per
    layer key then value), `embeds` `[1, S, D]` appended at `position`; returns the logits."""
    end = position + embeds.shape[1]
    binding = decoder.io_binding()
    binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds))
    binding.bind_cpu_input("attention_mask", np.ones((1, end), np.int64))
    binding.bind_cpu_input("position_ids", np.arange(position, end, dtype=np.int64)[None])
    binding.bind_output(spec.outputs[0].name)
    for past, present, buffer in zip(spec.inputs[3:], spec.outputs[1:], buffers, strict=True):
        binding.bind_ortvalue_input(past.name, buffer)
        binding.bind_ortvalue_output(present.name, buffer)
    decoder.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


def _owned_value(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue holding its own copy of `array` (one made from a numpy array only points at it)."""
    value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype)
    value.update_inplace(np.ascontiguousarray(array))
    return value


def _zeroed_buffers(spec: GraphSpec, dims: Dims, capacity: int, float_type: type) -> list:
    shape = (1, dims.num_kv_heads, capacity, dims.head_dim)
    return [_owned_value(np.zeros(shape, float_type)) for _ in spec.inputs[3:]]


# Runs of the shared-buffer case: prefill, one decode step, then a chunk, into buffers of SHARED_CAPACITY.
SHARED_RUNS = (5, 1, 3)
SHARED_CAPACITY = 12


@dataclass(frozen=True)
class _SharedRuns:
    """The shared-buffer case's inputs and, after each run, the logits and the valid part of every buffer."""

    embeds: torch.Tensor
    logits: list[np.ndarray]
    caches: list[np.ndarray]


def _shared_buffer_runs(decoder: ort.InferenceSession, spec: GraphSpec, dims: Dims, dtype: str) -> _SharedRuns:
    """The fused decoder driven as the runtime drives it: each past input and its present output bound to one
    buffer of SHARED_CAPACITY positions, SHARED_RUNS appended in place."""
    float_type = np.float16 if dtype == "fp16" else np.float32
    embeds = torch.randn(1, sum(SHARED_RUNS), dims.hidden_size, generator=torch.Generator().manual_seed(7))
    buffers = _zeroed_buffers(spec, dims, SHARED_CAPACITY, float_type)
    logits, caches, position = [], [], 0
    for length in SHARED_RUNS:
        end = position + length
        logits.append(_bound_run(decoder, spec, buffers, embeds[:, position:end].numpy().astype(float_type), position))
        caches.append(np.stack([b.numpy()[:, :, :end] for b in buffers]))
        position = end
    return _SharedRuns(embeds, logits, caches)


def _shared_buffer_compare(
    runs: _SharedRuns,
    spec: GraphSpec,
    reference: LlavaForConditionalGeneration,
    dims: Dims,
    dtype: str,
    quant: str | None,
) -> list[Comparison]:
    """After each shared-buffer run, the logits and the valid part of every buffer against the PyTorch model run
    over the whole prefix."""
    comparisons, end = [], 0
    for length, logits, cache in zip(SHARED_RUNS, runs.logits, runs.caches, strict=True):
        end += length
        full = {
            "inputs_embeds": runs.embeds[:, :end],
            "attention_mask": torch.ones(1, end, dtype=torch.int64),
            "position_ids": torch.arange(end)[None],
            **{t.name: torch.zeros(1, dims.num_kv_heads, 0, dims.head_dim) for t in spec.inputs[3:]},
        }
        want_logits, *want_cache = _torch_reference(reference, dims, "decoder", full)
        label = f"decoder shared buffer (runs {'+'.join(map(str, SHARED_RUNS))}, capacity {SHARED_CAPACITY}) P={end}"
        comparisons.append(compare(f"{label} logits", logits, want_logits, dtype, logits=True, quant=quant))
        comparisons.append(compare(f"{label} cache", cache, np.stack(want_cache), dtype, quant=quant))
    # One position per run: top-1 agreement is reported, and judged on the reference cases.
    return [replace(c, min_top_k=None) for c in comparisons]


def raise_on_failure(comparisons: list[Comparison]) -> None:
    failed = [c.line() for c in comparisons if not c.passed]
    if failed:
        raise ValidationError("outside tolerance:\n  " + "\n  ".join(failed))


def validate_reference(
    reference_dir: Path,
    files: dict[str, Path],
    specs: dict[str, GraphSpec],
    dims: Dims,
    dtype: str,
    image_token_id: int,
    log: Callable[[str], None] = print,
    quant: str | None = None,
    decoder: str = "plain",
) -> list[Comparison]:
    """Run each reference case through the exported graphs the way the runtime does (embed, splice image
    features, prefill, one token per step) and compare with transformers' tensors.

    The decode loop feeds the reference's greedy tokens, so every step compares logits of identical inputs;
    full top-1 agreement then means free-running greedy decoding reproduces the reference tokens. `quant` (int4)
    applies to the decoder's logits only; the image features come from the float vision graph.
    """
    document = json.loads((reference_dir / "reference.json").read_text())
    sessions = {name: session(path) for name, path in files.items()}
    comparisons: list[Comparison] = []
    for case in document["cases"]:
        tensors = load_file(str(reference_dir / case["tensors"]))
        results = _run_case(
            sessions, specs, dims, dtype, image_token_id, tensors, case["greedy_tokens"], shared=decoder != "plain"
        )
        for output, (got, want) in results.items():
            label = f"reference {case['name']} {output}"
            logits = output == "step_logits"
            result = compare(label, got, want, dtype, logits=logits, quant=quant if logits else None)
            log(result.line())
            comparisons.append(result)
            if dtype == "fp32" and quant is None and result.top1 is not None and result.top1[0] != result.top1[1]:
                comparisons.append(Comparison(f"{label} greedy tokens", float("inf"), FP32_ABS_TOLERANCE))
    raise_on_failure(comparisons)
    return comparisons


def _run_case(
    sessions: dict[str, ort.InferenceSession],
    specs: dict[str, GraphSpec],
    dims: Dims,
    dtype: str,
    image_token_id: int,
    tensors: dict[str, np.ndarray],
    tokens: list[int],
    free_running: bool = False,
    shared: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(got, want) per compared tensor for one case; `free_running` feeds back each step's own argmax instead
    of `tokens` (then only its length counts); `shared` runs the decoder in shared KV buffers (fused decoders)."""
    float_type = np.float16 if dtype == "fp16" else np.float32
    input_ids = tensors["input_ids"]
    embeds = sessions["embed"].run(None, {"input_ids": input_ids})[0]
    results = {}
    if "pixel_values" in tensors:
        features = sessions["vision"].run(None, {"pixel_values": tensors["pixel_values"].astype(float_type)})[0]
        results["image_features"] = (features, tensors["image_features"])
        embeds[input_ids == image_token_id] = features.reshape(-1, dims.hidden_size)
    logits = decode_steps(sessions, specs["decoder"], dims, float_type, embeds, tokens, free_running, shared)
    results["step_logits"] = (logits, tensors["step_logits"])
    return results


def decode_steps(
    sessions: dict[str, ort.InferenceSession],
    spec: GraphSpec,
    dims: Dims,
    float_type: type,
    embeds: np.ndarray,
    tokens: list[int],
    free_running: bool = False,
    shared: bool = False,
) -> np.ndarray:
    """Step logits `[len(tokens), V]` of the prompt `embeds` `[1, S, D]`, then of each of `tokens` but the last fed
    back through the embed graph (teacher forcing), as the runtime decodes; `free_running` feeds back each step's
    own argmax instead (then only the length of `tokens` counts); `shared` runs the decoder in shared KV buffers
    (fused decoders, as the runtime runs them: appending in place to buffers sized to the request)."""
    past_inputs = [t.name for t in spec.inputs[3:]]
    past = [np.zeros((1, dims.num_kv_heads, 0, dims.head_dim), float_type) for _ in past_inputs]
    buffers = _zeroed_buffers(spec, dims, embeds.shape[1] + len(tokens), float_type) if shared else None
    step_logits, position = [], 0
    for step in range(len(tokens)):
        length = embeds.shape[1]
        if buffers is not None:
            logits = _bound_run(sessions["decoder"], spec, buffers, embeds, position)
        else:
            feed = {
                "inputs_embeds": embeds,
                "attention_mask": np.ones((1, position + length), np.int64),
                "position_ids": np.arange(position, position + length, dtype=np.int64)[None],
                **dict(zip(past_inputs, past, strict=True)),
            }
            logits, *past = sessions["decoder"].run(None, feed)
        step_logits.append(logits[0, -1])
        position += length
        if step + 1 < len(tokens):
            token = int(logits[0, -1].argmax()) if free_running else tokens[step]
            embeds = sessions["embed"].run(None, {"input_ids": np.array([[token]], np.int64)})[0]
    return np.stack(step_logits)


GREEDY_TOKENS = 64


def greedy_agreement(
    reference_dir: Path,
    files: dict[str, Path],
    specs: dict[str, GraphSpec],
    dims: Dims,
    dtype: str,
    image_token_id: int,
    model: LlavaForConditionalGeneration,
    log: Callable[[str], None] = print,
    tokens: int = GREEDY_TOKENS,
    decoder: str = "plain",
) -> tuple[int, int, int]:
    """Free-running greedy decoding of `tokens` tokens from the first reference case's prompt, by the exported
    graphs and by the fp32 model: (equal positions, tokens before the first difference, tokens). Reported for
    reduced-precision exports, not judged: once the two sequences differ they continue from different
    prefixes, and on random weights (nearly flat logits) they differ early."""
    document = json.loads((reference_dir / "reference.json").read_text())
    case = document["cases"][0]
    tensors = load_file(str(reference_dir / case["tensors"]))
    inputs = {"input_ids": torch.from_numpy(tensors["input_ids"])}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "pixel_values" in tensors:
        inputs["pixel_values"] = torch.from_numpy(tensors["pixel_values"])
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        eos_token_id=None,
        pad_token_id=None,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        sequences = model.generate(**inputs, generation_config=config).sequences
    want = sequences[0, inputs["input_ids"].shape[1] :].tolist()
    sessions = {name: session(path) for name, path in files.items()}
    shared = decoder != "plain"
    run = _run_case(sessions, specs, dims, dtype, image_token_id, tensors, [0] * tokens, True, shared)
    got_logits, _ = run["step_logits"]
    got = got_logits.argmax(-1).tolist()
    equal = sum(a == b for a, b in zip(got, want, strict=True))
    prefix = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), tokens)
    log(
        f"reference {case['name']} free-running greedy, {tokens} tokens: {equal}/{tokens} equal to fp32 "
        f"transformers, identical for the first {prefix} (reported, not judged)"
    )
    return equal, prefix, tokens
