"""Weights streamed from the checkpoint into the graphs' external data, one tensor (or a slice of one) at a time.

The export never holds the model: each weight is read from its safetensors shard when the graph builder asks for it
(`safe_open` memory-maps the shard; it is opened per read, so pages already copied out are not kept mapped, which
would count them in the process's resident memory), converted to the graph's dtype slice by slice (bf16 -> fp16
without an fp32 copy), transposed where a MatMul needs `[in, out]`, and appended to `<graph>.onnx.data`. The graph
proto keeps only external-data references. Peak memory is the largest slice plus what the caller holds, not the
model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto
from safetensors import safe_open

from .checkpoint import CheckpointError
from .digest import TrailingDigest

# Slices read, converted and written at a time: bounds the working set of every weight, the LM head's included.
SLICE_BYTES = 64 * 2**20
# External tensors start at multiples of this (onnx's own alignment for large tensors): ONNX Runtime maps aligned
# external data straight from the file instead of copying it.
ALIGNMENT = 64 * 2**10

NUMPY_FLOAT = {"float32": np.float32, "float16": np.float16}
TORCH_FLOAT = {"float32": torch.float32, "float16": torch.float16}
ONNX_ELEMENT = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}

# Where a checkpoint may keep a module's weights: transformers 5's module names, the original LLaVA layout that
# `save_pretrained` writes, and the `vision_model.` level older SigLIP towers carry. Each entry: (module name prefix,
# checkpoint key prefixes tried in order). Another layout passes its own table (minicpmv_export.py).
KEY_PREFIXES = (
    ("model.language_model.", ("language_model.model.", "model.language_model.")),
    ("lm_head.", ("language_model.lm_head.", "lm_head.")),
    (
        "model.vision_tower.",
        (
            "vision_tower.",
            "vision_tower.vision_model.",
            "model.vision_tower.",
            "model.vision_tower.vision_model.",
        ),
    ),
    ("model.multi_modal_projector.", ("multi_modal_projector.", "model.multi_modal_projector.")),
)


class CheckpointWeights:
    """The checkpoint's tensors by module name (as `LlavaForConditionalGeneration.named_parameters` spells them),
    read slice by slice from their shards; `prefixes` maps module names to checkpoint keys (KEY_PREFIXES)."""

    def __init__(
        self,
        files: Sequence[Path],
        tie_word_embeddings: bool = False,
        prefixes: Sequence[tuple[str, Sequence[str]]] = KEY_PREFIXES,
    ):
        self._shards: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), "pt") as f:
                self._shards.update(dict.fromkeys(f.keys(), path))
        self._tied = tie_word_embeddings
        self._prefixes = tuple(prefixes)

    def key(self, name: str) -> str:
        """The checkpoint key of module parameter `name`; CheckpointError if the checkpoint lacks it."""
        candidates = [name]
        for module_prefix, saved_prefixes in self._prefixes:
            if name.startswith(module_prefix):
                candidates = [p + name[len(module_prefix) :] for p in saved_prefixes]
        for candidate in candidates:
            if candidate in self._shards:
                return candidate
        if self._tied and name == "lm_head.weight":
            return self.key("model.language_model.embed_tokens.weight")
        raise CheckpointError(f"the checkpoint has no weight for {name} (looked for {', '.join(candidates)})")

    def keys(self) -> list[str]:
        """The checkpoint's own tensor names."""
        return list(self._shards)

    def __contains__(self, name: str) -> bool:
        try:
            self.key(name)
        except CheckpointError:
            return False
        return True

    @contextmanager
    def _slice(self, name: str):
        key = self.key(name)
        with safe_open(str(self._shards[key]), "pt") as f:
            yield f.get_slice(key)

    def shape(self, name: str) -> tuple[int, ...]:
        with self._slice(name) as s:
            return tuple(s.get_shape())

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole tensor in `dtype`, filled slice by slice (no second copy in the checkpoint's dtype)."""
        out = torch.empty(self.shape(name), dtype=dtype)
        if out.ndim == 0:
            with self._slice(name) as s:
                return s[:].to(dtype)
        start = 0
        for rows in self.row_slices(name, dtype):
            out[start : start + rows.shape[0]] = rows
            start += rows.shape[0]
        return out

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        with self._slice(name) as s:
            return s[start:stop].to(dtype)

    def row_slices(self, name: str, dtype: torch.dtype, rows: range | None = None) -> Iterator[torch.Tensor]:
        """The tensor (its `rows`, when given) in `dtype`, in slices of whole rows of about SLICE_BYTES each."""
        shape = self.shape(name)
        rows = rows if rows is not None else range(shape[0])
        row_bytes = max(int(np.prod(shape[1:])), 1) * 4
        step = max(1, SLICE_BYTES // row_bytes)
        for start in range(rows.start, rows.stop, step):
            yield self.rows(name, start, min(start + step, rows.stop), dtype)


class ExternalData:
    """`<graph>.onnx.data` written as the graph is built: each tensor appended once, never held whole unless its
    producer holds it. `written` counts the bytes so far, for progress."""

    def __init__(self, path: Path, progress: Callable[[int], None] | None = None):
        self.path = path
        self.written = 0
        self._file = path.open("wb")
        self._digest = TrailingDigest(path)
        self._progress = progress

    def add(self, name: str, shape: Sequence[int], dtype: np.dtype, slices: Iterable[np.ndarray]) -> TensorProto:
        """Append `slices` (C order, concatenated along the first axis they make up `shape`) as tensor `name`."""
        padding = -self.written % ALIGNMENT
        self._file.write(b"\0" * padding)
        self.written += padding
        offset, length = self.written, 0
        for piece in slices:
            data = np.ascontiguousarray(piece, dtype=dtype)
            self._file.write(data.data)
            length += data.nbytes
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if length != expected:
            raise AssertionError(f"{name}: wrote {length} bytes, shape {list(shape)} needs {expected}")
        self.written += length
        self._finished()
        if self._progress is not None:
            self._progress(self.written)
        return self._reference(name, shape, dtype, offset, length)

    def add_transposed(
        self, name: str, shape: Sequence[int], dtype: np.dtype, column_blocks: Iterable[tuple[int, np.ndarray]]
    ) -> TensorProto:
        """Append `[K, N]` as tensor `name` from blocks `(n0, columns)` (`columns` `[K, nb]`, C order: rows n0..
        of the Linear weights `[N, K]`, transposed in memory by the caller), each written as columns n0..n0+nb of
        every output row. Reading the checkpoint by rows keeps each read contiguous; a band of columns from
        safetensors reads the whole tensor (the LM head: +1 GiB resident and 2 minutes in the first version)."""
        k, n = shape
        itemsize = np.dtype(dtype).itemsize
        self._file.write(b"\0" * (-self.written % ALIGNMENT))
        self._file.flush()
        offset = self._file.tell()
        length = k * n * itemsize
        fd = self._file.fileno()
        covered = 0
        for n0, block in column_blocks:
            columns = np.ascontiguousarray(block, dtype=dtype)
            for row in range(k):
                os.pwrite(fd, columns[row].data, offset + (row * n + n0) * itemsize)
            covered += columns.shape[1]
        if covered != n:
            raise AssertionError(f"{name}: wrote {covered} of {n} columns")
        self._file.seek(offset + length)
        self.written = offset + length
        self._finished()
        if self._progress is not None:
            self._progress(self.written)
        return self._reference(name, shape, dtype, offset, length)

    def _reference(self, name: str, shape: Sequence[int], dtype: np.dtype, offset: int, length: int) -> TensorProto:
        tensor = TensorProto(name=name, dims=list(shape), data_type=onnx.helper.np_dtype_to_tensor_dtype(dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def _finished(self) -> None:
        """The bytes so far are final: the digest thread may hash them."""
        self._file.flush()
        self._digest.finished(self.written)

    def close(self) -> None:
        self._file.close()
        self._digest.close()


class Progress:
    """One line per step of a long graph build: which graph, which part, bytes written, elapsed time."""

    def __init__(self, graph: str, log: Callable[[str], None], total_bytes: int | None = None):
        self.graph = graph
        self.log = log
        self.total = total_bytes
        self.start = time.perf_counter()
        self.written = 0

    def bytes(self, written: int) -> None:
        self.written = written

    def step(self, what: str) -> None:
        total = f" of {self.total / 2**30:.2f}" if self.total else ""
        elapsed = time.perf_counter() - self.start
        self.log(f"{self.graph}: {what}, {self.written / 2**30:.2f}{total} GiB written, {elapsed:.1f} s")
