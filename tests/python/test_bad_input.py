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
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import binary, llama3v
from onnx import numpy_helper

PRESET = "tiny-a"
# Peak resident memory of a refused model directory whose files are refused before they are read
# (measured: about 15 MiB); the files in those cases are 1 GiB.
MODEL_FILES_RSS_MIB = 64
# A `generate` whose chat template is stopped may hold, beyond a normal `generate` (measured: about
# 200 MiB, mostly the Llama-3 tokenizer and ONNX Runtime), one string minijinja builds before writing it
# (100 MB at most: minijinja's own cap) and the capped output: 160 MiB. Unbounded, these templates would
# write 10 TB or run for hours.
TEMPLATE_EXTRA_RSS_MIB = 160
# Seconds such a `generate` may take: loading the model (about 6 s on a loaded 2-core machine) and a render
# stopped by its limits (0.55 s for the whole fuel budget).
TEMPLATE_SECONDS = 30.0


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
    """Rewrites vision.onnx with its weights in vision.onnx.data and lists that file in the manifest.

    Tensors under 1 KiB (shape constants, which ONNX Runtime's shape inference must read inline) stay in the
    graph, as the exporter's own external-data rule keeps them."""
    graph = onnx.load(str(model / "vision.onnx"))
    onnx.save_model(
        graph,
        str(model / "vision.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="vision.onnx.data",
        size_threshold=1024,
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
    # Peak resident memory (MiB) the command may reach, or None: the bound a size limit protects.
    max_rss_mib: float | None = None
    # Peak resident memory (MiB) the command may reach above a normal `generate` on the same model, or None.
    max_rss_over_generate_mib: float | None = None


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


def sparse(path: Path, size: int) -> None:
    """Makes `path` a file of `size` bytes that takes no disk space (reading it would cost `size`)."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def set_template(template: str) -> Callable[[Path], None]:
    return lambda m: edit_manifest(m, lambda d: d["text"].update(chat_template=template))


# Runs argv[2:] as its child and writes the child's peak resident memory (KiB) to the file argv[1]. The
# CLI is started from this small interpreter, not from pytest: a child's `ru_maxrss` starts at the RSS of
# the process it was forked from (exec keeps the high-water mark), and pytest with torch holds over 1 GiB.
MEASURE_PEAK = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(args: list[str], tmp: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float, float]:
    """Runs the CLI; returns the finished process, its wall time in seconds and its peak resident memory in
    MiB (the kernel's high-water mark for the process, `ru_maxrss`)."""
    peak_file = tmp / "peak_kib"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", MEASURE_PEAK, str(peak_file), binary(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    elapsed = time.monotonic() - start
    return proc, elapsed, int(peak_file.read_text()) / 1024


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
    # --- manifest numbers, model file sizes, chat template (bounded before anything is allocated) ---
    Case(
        "context length of 10^12",
        broken_model(lambda m: edit_manifest(m, lambda d: d["model"].update(max_context=10**12)), command="generate"),
        "model.max_context is 1000000000000, expected 1..=16777216",
        within=5.0,
        max_rss_mib=MODEL_FILES_RSS_MIB,
    ),
    Case(
        "stop id outside the vocabulary",
        broken_model(
            lambda m: edit_manifest(m, lambda d: d["text"].update(stop_token_ids=[10**6])), command="generate"
        ),
        "text.stop_token_ids has 1000000, outside the vocabulary of",
        within=5.0,
    ),
    Case(
        "resample mode the runtime does not implement",
        broken_model(lambda m: edit_manifest(m, lambda d: d["image"].update(resample="bilinear"))),
        'image.resample is "bilinear"; this runtime implements only "bicubic"',
    ),
    Case(
        "do_convert_rgb false",
        broken_model(lambda m: edit_manifest(m, lambda d: d["image"].update(do_convert_rgb=False))),
        "image.do_convert_rgb is false",
    ),
    Case(
        "manifest.json of 1 GiB",
        broken_model(lambda m: sparse(m / "manifest.json", 1 << 30)),
        "the manifest is 1073741824 bytes, over the limit of 16777216",
        within=5.0,
        max_rss_mib=MODEL_FILES_RSS_MIB,
    ),
    Case(
        "tokenizer.json of 1 GiB",
        broken_model(lambda m: sparse(m / "tokenizer.json", 1 << 30), command="generate"),
        "the tokenizer file is 1073741824 bytes, over the limit of 67108864",
        within=5.0,
        max_rss_mib=MODEL_FILES_RSS_MIB,
    ),
    Case(
        "chat template that multiplies a string into gigabytes",
        broken_model(set_template("{% for i in range(100000) %}{{ 'x' * 100000000 }}{% endfor %}"), command="generate"),
        ["chat template: the rendered prompt is over the limit of", "bytes"],
        within=TEMPLATE_SECONDS,
        max_rss_over_generate_mib=TEMPLATE_EXTRA_RSS_MIB,
    ),
    Case(
        "chat template that loops 10^10 times",
        broken_model(
            set_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
            command="generate",
        ),
        "chat template: rendering ran over the limit of 5000000 template instructions",
        within=TEMPLATE_SECONDS,
        max_rss_over_generate_mib=TEMPLATE_EXTRA_RSS_MIB,
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


@pytest.fixture(scope="module")
def generate_peak_mib(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    """Peak resident memory of a normal one-token `generate` on the model: the baseline of the bounds above."""
    proc, _, peak = run_measured(gen(model_dir, max_new_tokens=1), tmp_path_factory.mktemp("baseline"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    print(f"baseline generate: peak resident memory {peak:.1f} MiB")
    return peak


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_a_clear_error(case: Case, model_dir: Path, tmp_path: Path, generate_peak_mib: float) -> None:
    args = case.build(model_dir, tmp_path)
    proc, elapsed, peak_mib = run_measured(args, tmp_path, timeout=300)
    print(f"{case.name}: exit {proc.returncode} in {elapsed:.2f} s, peak {peak_mib:.0f} MiB: {proc.stderr.strip()}")
    assert "panicked" not in proc.stderr
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ")
    for message in [case.message] if isinstance(case.message, str) else case.message:
        assert message in proc.stderr
    if case.within is not None:
        print(f"{case.name}: {elapsed:.3f} s (limit {case.within} s)")
        assert elapsed <= case.within
    if case.max_rss_mib is not None:
        print(f"{case.name}: peak resident memory {peak_mib:.1f} MiB (limit {case.max_rss_mib} MiB)")
        assert peak_mib <= case.max_rss_mib
    if case.max_rss_over_generate_mib is not None:
        limit = generate_peak_mib + case.max_rss_over_generate_mib
        print(
            f"{case.name}: peak resident memory {peak_mib:.1f} MiB (limit {limit:.1f} MiB: a normal generate's "
            f"{generate_peak_mib:.1f} + {case.max_rss_over_generate_mib})"
        )
        assert peak_mib <= limit


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
