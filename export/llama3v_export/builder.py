"""Graphs written node by node, their weights streamed from the checkpoint (weights.py) as each node asks for them.

The embedding, plain-decoder and fused-decoder graphs are built this way (onnxruntime-genai's model builder works
the same way); only the vision tower is traced (graphs.py). `linear` writes a MatMul with its `[in, out]` weight in
the graph's float dtype, or, with int4 quantization, a MatMulNBits whose 4-bit blocks are computed slice by slice
by ONNX Runtime's own quantizer routine, so the packing is the one `MatMulNBitsQuantizer` writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

from .graphs import EXTERNAL_DATA_THRESHOLD, GraphSpec
from .weights import NUMPY_FLOAT, TORCH_FLOAT, CheckpointWeights, ExternalData, Progress

CONTRIB_DOMAIN = "com.microsoft"
# Vocabulary rows per band of an fp16 LM head (`GraphBuilder.lm_head`): 0.25 GiB when widened to fp32 at hidden 4096.
LM_HEAD_BAND_ROWS = 16384
ONNX_FLOAT = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


@dataclass(frozen=True)
class Int4:
    """MatMulNBits settings (quantize.py)."""

    block_size: int
    symmetric: bool
    accuracy_level: int


class GraphBuilder:
    """Nodes and initializers of one graph; weights go to `<graph>.onnx.data` as they are added, constants under
    1 KiB stay in the graph (ONNX Runtime's shape inference reads them at load, and cannot from external data)."""

    def __init__(
        self,
        spec: GraphSpec,
        out_dir: Path,
        float_dtype: str,
        opset: int,
        weights: CheckpointWeights,
        log: Callable[[str], None],
        int4: Int4 | None = None,
    ):
        self.spec = spec
        self.float_dtype = float_dtype
        self.opset = opset
        self.weights = weights
        self.int4 = int4
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.dst = out_dir / spec.file
        for stale in (self.dst, self.dst.with_name(self.dst.name + ".data")):
            stale.unlink(missing_ok=True)
        self.progress = Progress(spec.name, log)
        self.data = ExternalData(self.dst.with_name(self.dst.name + ".data"), self.progress.bytes)
        self.uses_contrib_ops = False

    @property
    def numpy_float(self) -> type:
        return NUMPY_FLOAT[self.float_dtype]

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def float_constant(self, name: str, value: float) -> str:
        return self.constant(name, np.array(value, self.numpy_float))

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        if domain == CONTRIB_DOMAIN:
            self.uses_contrib_ops = True
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def one(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        """A node with a single output named `output` (the node takes the same name)."""
        return self.node(op, inputs, [output], output, **attrs)[0]

    def external(self, name: str, shape: Sequence[int], slices: Iterator[np.ndarray], dtype=None) -> str:
        dtype = np.dtype(dtype or self.numpy_float)
        self.initializers.append(self.data.add(name, shape, dtype, slices))
        return name

    def weight(self, name: str, source: str) -> str:
        """Checkpoint tensor `source` as it is, in the graph's float dtype."""
        shape = self.weights.shape(source)
        slices = (s.numpy() for s in self.weights.row_slices(source, TORCH_FLOAT[self.float_dtype]))
        if int(np.prod(shape)) * np.dtype(self.numpy_float).itemsize < 1024:
            return self.constant(name, self.weights.tensor(source, TORCH_FLOAT[self.float_dtype]).numpy())
        return self.external(name, shape, slices)

    def array(self, name: str, array: np.ndarray) -> str:
        """An array computed by the export (rotary tables), in the graph's float dtype."""
        return self.external(name, array.shape, iter([array.astype(self.numpy_float)]))

    def linear(self, x: str, output: str, name: str, weight: str, sources: Sequence[str]) -> str:
        """`x @ cat(sources, 0).T`: the Linear layers `sources` (`[out, in]` each) as one MatMul named `name`
        whose weight initializer is `weight`; a MatMulNBits (`<weight>_Q4`, `<weight>_scales`) under int4."""
        k = self.weights.shape(sources[0])[1]
        n = sum(self.weights.shape(s)[0] for s in sources)
        if self.int4 is None:
            dtype = np.dtype(self.numpy_float)
            self.initializers.append(self.data.add_transposed(weight, (k, n), dtype, self._column_blocks(sources)))
            return self.node("MatMul", [x, weight], [output], name)[0]
        packed, scales = self._quantized(weight, sources, k, n)
        attrs = {"K": k, "N": n, "bits": 4, "block_size": self.int4.block_size}
        if self.int4.accuracy_level:
            attrs["accuracy_level"] = self.int4.accuracy_level
        return self.node("MatMulNBits", [x, packed, scales], [output], f"{name}_Q4", CONTRIB_DOMAIN, **attrs)[0]

    def lm_head(self, x: str, output: str, source: str) -> str:
        """`x @ source.T`, the LM head. An fp16 graph's is split into bands of LM_HEAD_BAND_ROWS output columns
        joined by a Concat: ONNX Runtime's CPU provider has no fp16 MatMul and widens each fp16 weight to fp32 as
        its node runs, so one band at a time is widened (0.25 GiB at Llama-3-8B) instead of the whole head (1.96
        GiB, which put an fp16 export's validation over its memory bound; docs/PERFORMANCE.md, "Export memory").
        The bands compute the same dot products; CUDA and TensorRT run them as they run one MatMul."""
        n, k = self.weights.shape(source)
        if self.int4 is not None or self.float_dtype != "float16" or n <= LM_HEAD_BAND_ROWS:
            return self.linear(x, output, "lm_head", "lm_head.weight", [source])
        dtype = np.dtype(self.numpy_float)
        bands = []
        for band, start in enumerate(range(0, n, LM_HEAD_BAND_ROWS)):
            stop = min(start + LM_HEAD_BAND_ROWS, n)
            weight = f"lm_head.weight.band{band}"
            blocks = self._column_blocks([source], rows=range(start, stop))
            self.initializers.append(self.data.add_transposed(weight, (k, stop - start), dtype, blocks))
            bands.append(self.node("MatMul", [x, weight], [f"lm_head.band{band}"], f"lm_head.band{band}")[0])
        return self.node("Concat", bands, [output], "lm_head", axis=-1)[0]

    def _column_blocks(self, sources: Sequence[str], rows: range | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, those rows transposed) of `cat(sources, 0)` (of `rows` of each source when given) in the
        graph's float dtype, slice by slice.
        torch transposes: numpy's transposing copy took 0.72 s for one Llama-3-8B down_proj in fp16, torch's
        0.15 s, which was most of a full-size export's time (docs/PERFORMANCE.md, "The real model, measured")."""
        first = 0
        for source in sources:
            for block in self.weights.row_slices(source, TORCH_FLOAT[self.float_dtype], rows):
                yield first, block.t().contiguous().numpy()
                first += block.shape[0]

    def _quantized(self, weight: str, sources: Sequence[str], k: int, n: int) -> tuple[str, str]:
        """The 4-bit blocks of `[K, N]` written slice by slice of output columns (blocks run along K within one
        column, so columns quantize independently); the scales, N x K/block fp32, are written after them."""
        config = DefaultWeightOnlyQuantConfig(
            block_size=self.int4.block_size,
            is_symmetric=self.int4.symmetric,
            accuracy_level=self.int4.accuracy_level,
        )
        quantizer = DefaultWeightOnlyQuantizer(config)
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        scales: list[np.ndarray] = []
        k_blocks = -(-k // self.int4.block_size)

        def packed_slices() -> Iterator[np.ndarray]:
            for source in sources:
                for rows in self.weights.row_slices(source, torch.float32):
                    packed, scale, _ = quantizer.qbits_block_quant(np.ascontiguousarray(rows.numpy().T))
                    scales.append(scale)
                    yield packed

        packed_name = self.external(f"{weight}_Q4", (n, k_blocks, self.int4.block_size // 2), packed_slices(), np.uint8)
        scales_name = self.external(f"{weight}_scales", (n, k_blocks), iter(scales), np.float32)
        return packed_name, scales_name

    def finish(self, graph_name: str, external_data: bool | None) -> list[Path]:
        """Write the graph with the spec's inputs and outputs; returns its files (graph, then external data if kept).

        `external_data=None` keeps the data file when the weights pass EXTERNAL_DATA_THRESHOLD; below it (and with
        `False`) the weights are read back into the graph file, which protobuf limits to 2 GiB."""
        self.data.close()
        elem = ONNX_FLOAT[self.float_dtype]

        def value_info(t):
            return helper.make_tensor_value_info(t.name, elem if t.dtype != "int64" else TensorProto.INT64, t.shape)

        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [value_info(t) for t in self.spec.inputs],
            [value_info(t) for t in self.spec.outputs],
            self.initializers,
        )
        opsets = [helper.make_opsetid("", self.opset)]
        if self.uses_contrib_ops:
            opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="llama3v-export")
        data = self.data.path
        if external_data is None:
            external_data = self.data.written > EXTERNAL_DATA_THRESHOLD
        if not external_data:
            onnx.load_external_data_for_model(model, str(data.parent))
            data.unlink()
        onnx.save_model(model, str(self.dst))
        onnx.checker.check_model(str(self.dst))
        return [self.dst, data] if external_data else [self.dst]
