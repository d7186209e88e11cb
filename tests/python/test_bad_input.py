"""Hostile model directories and bad inputs: each case must be a clear error, exit code 2, no panic.

Table-driven: every case builds what it needs in a temporary directory (a broken copy of a tiny model, a
bad image, bad flags), runs the CLI, and checks the exit code, the message and that nothing panicked.
The README's "Bad input" section lists these cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import llama3v
from onnx import numpy_helper

PRESET = "tiny-a"


@pytest.fixture(scope="module")
def model_dir(exports) -> Path:
    return exports.model_dir(PRESET)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("reference"))
    return dst


def edit_manifest(model: Path, edit: Callable[[dict], None]) -> None:
    path = model / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rehash(model: Path, graph: str) -> None:
    def update(m: dict) -> None:
        spec = m["graphs"][graph]
        spec["sha256"] = sha256(model / spec["file"])
        for ext in spec.get("external_data", []):
            ext["sha256"] = sha256(model / ext["file"])

    edit_manifest(model, update)


def externalize_vision(model: Path) -> None:
    """Rewrites vision.onnx with every initializer in vision.onnx.data and lists that file in the manifest."""
    graph = onnx.load(str(model / "vision.onnx"))
    onnx.save_model(
        graph,
        str(model / "vision.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="vision.onnx.data",
        size_threshold=0,
    )
    edit_manifest(model, lambda m: m["graphs"]["vision"].update(external_data=[{"file": "vision.onnx.data"}]))
    rehash(model, "vision")


def point_external_data(model: Path, entries: dict[str, str], tensor: int = 0) -> None:
    """Sets one external tensor's external_data entries in vision.onnx (the data file is not touched)."""
    path = model / "vision.onnx"
    graph = onnx.load(str(path), load_external_data=False)
    init = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL][tensor]
    current = {e.key: e.value for e in init.external_data}
    current.update(entries)
    del init.external_data[:]
    for key, value in current.items():
        init.external_data.add(key=key, value=value)
    path.write_bytes(graph.SerializeToString())
    rehash(model, "vision")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def small_png(tmp: Path) -> bytes:
    from PIL import Image

    path = tmp / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@dataclass
class Case:
    name: str
    # (tiny model dir, temporary dir) -> CLI arguments; may build a broken model or input under tmp.
    build: Callable[[Path, Path], list[str]]
    message: str | list[str]
    # Seconds the whole command may take (decode bombs must fail fast), or None.
    within: float | None = None


def gen(model: Path, *extra: str, prompt: str = "hi", max_new_tokens: int = 4) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens), *extra]


def broken_model(edit: Callable[[Path], None], command: str = "inspect") -> Callable[[Path, Path], list[str]]:
    def build(model: Path, tmp: Path) -> list[str]:
        broken = copy_model(model, tmp / "broken")
        edit(broken)
        if command == "inspect":
            return ["inspect", "--model", str(broken)]
        return gen(broken, "--temperature", "0")

    return build


def external(entries: dict[str, str], before: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    def edit(m: Path) -> None:
        externalize_vision(m)
        if before:
            before(m)
        point_external_data(m, entries)

    return edit


def outside_file(m: Path) -> None:
    (m.parent / "secret.bin").write_bytes(b"\x07" * 4096)


def symlink_data(m: Path) -> None:
    outside_file(m)
    os.symlink(m.parent / "secret.bin", m / "link.data")


def hardlink_data(m: Path) -> None:
    outside_file(m)
    os.link(m.parent / "secret.bin", m / "hard.data")


def unlisted_data(m: Path) -> None:
    shutil.copy(m / "vision.onnx.data", m / "other.data")


def symlinked_graph(m: Path) -> None:
    outside = m.parent / "vision-outside.onnx"
    shutil.move(m / "vision.onnx", outside)
    os.symlink(outside, m / "vision.onnx")


def append_byte(m: Path) -> None:
    with open(m / "embed.onnx", "ab") as f:
        f.write(b"\0")


def wider_hidden(m: Path) -> None:
    edit_manifest(m, lambda d: d["model"].update(hidden_size=d["model"]["hidden_size"] + 1))


def bomb_png(tmp: Path) -> bytes:
    """A 100-byte PNG whose header claims 100000x100000 pixels (30 GB of RGB)."""
    return png_header(100_000, 100_000) + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + png_chunk(b"IEND", b"")


def wider_vocab(m: Path) -> None:
    """A self-consistent manifest whose vocabulary (and logits dim) is one more than the graph's."""

    def edit(d: dict) -> None:
        d["model"]["vocab_size"] += 1
        d["graphs"]["decoder"]["outputs"][0]["shape"][-1] += 1

    edit_manifest(m, edit)


def float_mask(m: Path) -> None:
    edit_manifest(m, lambda d: d["graphs"]["decoder"]["inputs"][1].update(dtype="float32"))


def extra_tokens(m: Path) -> None:
    """A tokenizer with more tokens than the model's logits have rows."""
    tok = json.loads((m / "tokenizer.json").read_text())
    vocab = json.loads((m / "manifest.json").read_text())["model"]["vocab_size"]
    for i in range(4):
        tok["added_tokens"].append(
            {
                "id": vocab + i,
                "content": f"<|extra_{i}|>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (m / "tokenizer.json").write_text(json.dumps(tok))


def poison_with_nan(m: Path) -> None:
    """Every value of the decoder's largest weight (the LM head) becomes NaN."""
    path = m / "decoder.onnx"
    graph = onnx.load(str(path))
    init = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(init).copy()
    values[...] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(graph, str(path))
    rehash(m, "decoder")


def image_case(write: Callable[[Path], bytes]) -> Callable[[Path, Path], list[str]]:
    def build(model: Path, tmp: Path) -> list[str]:
        path = tmp / "input.png"
        path.write_bytes(write(tmp))
        return gen(model, "--image", str(path), prompt="what is this?")

    return build


def fifo_image(model: Path, tmp: Path) -> list[str]:
    path = tmp / "input.png"
    os.mkfifo(path)
    return gen(model, "--image", str(path))


def many_large_images(model: Path, tmp: Path) -> list[str]:
    from PIL import Image

    path = tmp / "large.png"
    Image.new("RGB", (4096, 4096)).save(path)
    return gen(model, *["--image", str(path)] * 5)


CASES = [
    # --- model directories ---
    Case("missing model directory", lambda m, t: gen(t / "nope"), "not a directory"),
    Case(
        "manifest is not JSON",
        broken_model(lambda m: (m / "manifest.json").write_text("{not json")),
        "invalid manifest",
    ),
    Case(
        "unknown manifest format_version",
        broken_model(lambda m: edit_manifest(m, lambda d: d.update(format_version=99))),
        "format_version 99 is not supported (this runtime reads version 1)",
    ),
    Case(
        "graph file changed (sha256)",
        broken_model(append_byte),
        "embed.onnx: sha256 is",
    ),
    Case(
        "graph file missing",
        broken_model(lambda m: (m / "vision.onnx").unlink()),
        "vision.onnx is missing",
    ),
    Case(
        "graph file is a symlink out of the directory",
        broken_model(symlinked_graph),
        "is a symbolic link",
    ),
    Case(
        "manifest names a file outside the directory",
        broken_model(lambda m: edit_manifest(m, lambda d: d["text"].update(tokenizer_file="../tokenizer.json"))),
        "must be a relative path inside the model directory",
    ),
    Case(
        "external data: absolute path",
        broken_model(external({"location": "/etc/hostname"})),
        ["tensor", "/etc/hostname", "absolute path"],
    ),
    Case(
        "external data: .. component",
        broken_model(external({"location": "../secret.bin"}, outside_file)),
        ['".." component', "../secret.bin"],
    ),
    Case(
        "external data: symlink to a file outside",
        broken_model(external({"location": "link.data"}, symlink_data)),
        "link.data is a symbolic link",
    ),
    Case(
        "external data: hard link to a file outside",
        broken_model(external({"location": "hard.data"}, hardlink_data)),
        "has 2 hard links",
    ),
    Case(
        "external data: offset + length beyond the file",
        broken_model(external({"offset": "0", "length": "999999999"})),
        ["offset 0 + length 999999999 is beyond the file's", "vision.onnx.data"],
    ),
    Case(
        "external data: file not listed in the manifest",
        broken_model(external({"location": "other.data"}, unlisted_data)),
        "not listed in the manifest's external_data",
    ),
    Case(
        "external data: non-numeric offset",
        broken_model(external({"offset": "-4"})),
        'offset "-4" is not a non-negative integer',
    ),
    Case(
        "manifest dims disagree with the graph",
        broken_model(wider_vocab),
        ['output "logits": dim 2 is', "in the manifest", "in the graph"],
    ),
    Case(
        "manifest dims disagree with each other",
        broken_model(wider_hidden),
        "the model settings say",
    ),
    Case(
        "manifest dtype disagrees with the graph",
        broken_model(float_mask),
        'input "attention_mask": the manifest says float32, the graph declares int64',
    ),
    Case(
        "tokenizer larger than the logits",
        broken_model(extra_tokens),
        ["the tokenizer has", "but the model's vocabulary is"],
    ),
    Case(
        "NaN weights give a typed error naming the step",
        broken_model(poison_with_nan, command="generate"),
        "non-finite logits (NaN or Inf) at decode step 0",
    ),
    # --- images ---
    Case("image file missing", lambda m, t: gen(m, "--image", str(t / "x.png")), "x.png"),
    Case("zero-size image", image_case(lambda t: b""), ["input.png", "empty input (0 bytes)"], within=1.0),
    Case(
        "not an image",
        image_case(lambda t: b"hello, this is text\n" * 10),
        ["input.png", "not a recognized image format"],
        within=1.0,
    ),
    Case(
        "truncated PNG",
        image_case(lambda t: small_png(t)[:100]),
        ["input.png", "truncated or unreadable"],
        within=1.0,
    ),
    Case(
        "corrupt PNG data",
        image_case(lambda t: png_header(32, 32) + png_chunk(b"IDAT", b"\x00garbage" * 20) + png_chunk(b"IEND", b"")),
        ["input.png", "corrupt image data"],
        within=1.0,
    ),
    Case(
        "decompression bomb (PNG claiming 100000x100000)",
        image_case(bomb_png),
        ["input.png", "100000x100000 pixels", "exceeds the decode limits"],
        within=1.0,
    ),
    Case(
        "a device as the image (/dev/zero)",
        lambda m, t: gen(m, "--image", "/dev/zero"),
        ["/dev/zero", "not a regular file"],
        within=1.0,
    ),
    Case("a FIFO as the image", fifo_image, ["input.png", "not a regular file"], within=1.0),
    Case(
        "images over the request's pixel budget (5 x 4096x4096)",
        many_large_images,
        ["request too large: 5 image(s) together: 83886080 pixels", "67108864 pixels"],
        within=5.0,
    ),
    # --- options with a resource meaning ---
    Case("zero new tokens", lambda m, t: gen(m, max_new_tokens=0), ["--max-new-tokens", "0 is not in 1.."]),
    Case("zero threads", lambda m, t: gen(m, "--threads", "0"), ["--threads", "expected a number of threads from 1"]),
    Case("more threads than cores", lambda m, t: gen(m, "--threads", "100000"), ["100000", "this machine's cores"]),
    # --- prompt and sampling ---
    Case("more image placeholders than images", lambda m, t: gen(m, prompt="<image> and <image>"), "2 image"),
    Case(
        "prompt + max new tokens over the context",
        lambda m, t: gen(m, max_new_tokens=100000),
        ["with 100000 new tokens that exceeds the context of 2048", "prompt is"],
    ),
    Case(
        "negative temperature",
        lambda m, t: gen(m, "--temperature=-1"),
        "temperature must be a finite number >= 0 (0 = greedy), got -1",
    ),
    Case(
        "NaN temperature",
        lambda m, t: gen(m, "--temperature", "nan"),
        "temperature must be a finite number >= 0",
    ),
    Case(
        "top-p of 0",
        lambda m, t: gen(m, "--temperature", "1", "--top-p", "0"),
        "top_p must be in (0, 1] (1 = off), got 0",
    ),
    Case("top-p above 1", lambda m, t: gen(m, "--temperature", "1", "--top-p", "1.5"), "top_p must be in (0, 1]"),
    Case("top-k of 0", lambda m, t: gen(m, "--temperature", "1", "--top-k", "0"), "top_k must be >= 1"),
    Case(
        "zero repetition penalty",
        lambda m, t: gen(m, "--repetition-penalty", "0"),
        "repetition_penalty must be a finite number > 0",
    ),
    Case("unknown execution provider", lambda m, t: gen(m, "--ep", "gpu9"), "gpu9"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_a_clear_error(case: Case, model_dir: Path, tmp_path: Path) -> None:
    args = case.build(model_dir, tmp_path)
    start = time.monotonic()
    proc = llama3v(*args, timeout=300)
    elapsed = time.monotonic() - start
    print(f"{case.name}: exit {proc.returncode} in {elapsed:.2f} s: {proc.stderr.strip()}")
    assert "panicked" not in proc.stderr
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ")
    for message in [case.message] if isinstance(case.message, str) else case.message:
        assert message in proc.stderr
    if case.within is not None:
        print(f"{case.name}: {elapsed:.3f} s (limit {case.within} s)")
        assert elapsed <= case.within


def test_valid_external_data_loads_and_generates(model_dir: Path, tmp_path: Path) -> None:
    """The external-data checks refuse only what they should: a correct external-data export runs."""
    model = copy_model(model_dir, tmp_path / "external")
    externalize_vision(model)
    image = tmp_path / "ok.png"
    image.write_bytes(small_png(tmp_path))
    args = ["--prompt", "what is this?", "--image", str(image), "--max-new-tokens", "3", "--temperature", "0"]
    proc = llama3v("generate", "--model", str(model), *args, "--json")
    assert proc.returncode == 0, proc.stderr
    reference = llama3v("generate", "--model", str(model_dir), *args, "--json")
    assert json.loads(proc.stdout)["tokens"] == json.loads(reference.stdout)["tokens"]
