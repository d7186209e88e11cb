"""`llama3v serve` end to end: the official `openai` client against the server on 127.0.0.1, every error
status over plain HTTP, concurrency (identical greedy tokens, 429 when the queue is full), client
disconnects and graceful shutdown.

Each server runs on a free port the OS picks (`--port 0`; the log says which), for a bounded time, and is
always terminated.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
from helpers import binary, llama3v
from PIL import Image

PRESET = "tiny-a"
PROMPT = "What is in this image?"
START_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 120


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, timeout: float = REQUEST_TIMEOUT_S
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def chat(self, body: bytes | dict, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, dict]:
        status, raw = self.request("POST", "/v1/chat/completions", body, timeout)
        return status, json.loads(raw)

    def metrics(self) -> str:
        status, raw = self.request("GET", "/metrics")
        assert status == 200, raw
        return raw.decode()


def metric(text: str, name: str) -> float:
    """The value of one sample line `name value` (name with its labels), 0 when absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@contextmanager
def serve(model_dir: Path, *flags: str) -> Iterator[Server]:
    with tempfile.NamedTemporaryFile("w+", prefix="llama3v-serve-", suffix=".log", delete=False) as log_file:
        log = Path(log_file.name)
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [binary(), "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", *flags],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        port = None
        while port is None:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no listening line within {START_TIMEOUT_S} s:\n{log.read_text()}"
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else None
            time.sleep(0.05)
        server = Server(proc, port, log)
        while True:
            status, _ = server.request("GET", "/health", timeout=5)
            if status == 200:
                break
            assert status == 503, f"/health answered {status} while loading"
            assert time.monotonic() < deadline, f"not ready within {START_TIMEOUT_S} s:\n{log.read_text()}"
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def model_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models[PRESET]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`allowed/` holds a PNG and a symlink pointing out of it; `outside.png` lies next to `allowed/`."""
    root = tmp_path_factory.mktemp("serve-images")
    allowed = root / "allowed"
    allowed.mkdir()
    image = Image.new("RGB", (40, 30))
    image.putdata([((x * 6) % 256, (y * 8) % 256, ((x + y) * 3) % 256) for y in range(30) for x in range(40)])
    image.save(allowed / "photo.png")
    image.save(root / "outside.png")
    os.symlink(root / "outside.png", allowed / "escape.png")
    return allowed


@pytest.fixture(scope="module")
def image_url(image_dir: Path) -> str:
    return "data:image/png;base64," + base64.b64encode((image_dir / "photo.png").read_bytes()).decode()


@pytest.fixture(scope="module")
def server(model_dir: Path, image_dir: Path) -> Iterator[Server]:
    flags = ["--max-images", "2", "--max-body-bytes", "200000", "--max-tokens", "1900", "--max-image-side", "100"]
    with serve(model_dir, *flags, "--allowed-image-dir", str(image_dir)) as running:
        yield running


def image_message(url: str, prompt: str = PROMPT) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
        }
    ]


def cli_greedy(model_dir: Path, image: Path, max_tokens: int) -> dict:
    done = llama3v(
        "generate", "--model", str(model_dir), "--image", str(image), "--prompt", PROMPT,
        "--temperature", "0", "--max-new-tokens", str(max_tokens), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_openai_client_replies_match_generate(server: Server, model_dir: Path, image_dir: Path, image_url: str):
    expected = cli_greedy(model_dir, image_dir / "photo.png", 24)
    client = server.client()
    [model] = client.models.list().data
    reply = client.chat.completions.create(
        model=model.id, messages=image_message(image_url), max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    print(f"generate: {expected['text']!r} ({expected['finish_reason']}); serve: {choice.message.content!r}")
    assert choice.message.content == expected["text"]
    assert choice.finish_reason == expected["finish_reason"]
    assert reply.usage.prompt_tokens == len(expected["prompt_tokens"])
    assert reply.usage.completion_tokens == len(expected["tokens"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=model.id,
            messages=image_message(image_url),
            max_completion_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    print(f"streamed in {len(chunks)} chunks: {streamed!r}")
    assert streamed == expected["text"]
    assert finish == [expected["finish_reason"]]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(expected["tokens"])
    assert chunks[-1].usage.prompt_tokens == len(expected["prompt_tokens"])


def test_stop_strings_cut_the_reply(server: Server, image_url: str):
    client = server.client()
    full = client.chat.completions.create(
        model="m", messages=image_message(image_url), max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].message.content
    assert len(text) >= 12, f"need a reply of 12+ characters to cut, got {text!r}"
    stop = text[8:11]
    cut = client.chat.completions.create(
        model="m",
        messages=image_message(image_url),
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    print(f"full {text!r}, stop {stop!r}, cut {cut.choices[0].message.content!r}")
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="m",
        messages=image_message(image_url),
        max_tokens=24,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_seeded_sampling_reproduces(server: Server, image_url: str):
    client = server.client()
    replies = [
        client.chat.completions.create(
            model="m", messages=image_message(image_url), max_tokens=16, temperature=1.0, top_p=0.9, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert replies[0] == replies[1]


def test_local_image_paths_only_inside_the_allowed_directory(server: Server, image_dir: Path, image_url: str):
    by_data = server.chat({"messages": image_message(image_url), "max_tokens": 8, "temperature": 0})
    by_path = server.chat({"messages": image_message("photo.png"), "max_tokens": 8, "temperature": 0})
    by_url = server.chat(
        {"messages": image_message(f"file://{image_dir / 'photo.png'}"), "max_tokens": 8, "temperature": 0}
    )
    assert by_data[0] == by_path[0] == by_url[0] == 200, (by_data, by_path, by_url)
    assert by_data[1]["choices"][0]["message"] == by_path[1]["choices"][0]["message"]
    assert by_data[1]["choices"][0]["message"] == by_url[1]["choices"][0]["message"]
    for url, reason in [
        ("../outside.png", "`..`"),
        # Outside, through a symlink or not, reads as any file that is not there (nothing leaks).
        ("escape.png", "is not a readable file inside the allowed image directory"),
        (str(image_dir.parent / "outside.png"), "is not a readable file inside the allowed image directory"),
        ("missing.png", "missing.png"),
        ("https://example.com/cat.png", "not fetched"),
        ("ftp://example.com/cat.png", "unsupported URL scheme"),
    ]:
        status, body = server.chat({"messages": image_message(url), "max_tokens": 8})
        print(url, status, body["error"]["message"])
        assert status == 400
        assert reason in body["error"]["message"]
        assert body["error"]["code"] == "invalid_image"


def test_local_paths_are_refused_without_an_allowed_directory(model_dir: Path, image_dir: Path):
    with serve(model_dir) as bare:
        status, body = bare.chat({"messages": image_message(str(image_dir / "photo.png")), "max_tokens": 8})
    assert status == 400
    assert "--allowed-image-dir" in body["error"]["message"]


def test_a_model_that_fails_to_load_stops_the_server(tmp_path: Path):
    done = subprocess.run(
        [binary(), "serve", "--model", str(tmp_path / "missing"), "--host", "127.0.0.1", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    print(done.stderr)
    assert "listening on http://127.0.0.1:" in done.stderr
    assert done.returncode == 2
    assert "missing" in done.stderr


def test_error_statuses(server: Server, image_url: str):
    def expect(status: int, body: bytes | dict, needle: str, kind: str = "invalid_request_error") -> dict:
        got, raw = server.request("POST", "/v1/chat/completions", body)
        error = json.loads(raw)["error"]
        print(f"{got}: {error['message']}")
        assert got == status, raw
        assert error["type"] == kind, raw
        assert needle in error["message"], raw
        return error

    expect(400, b"{not json", "invalid request body")
    expect(400, {"model": "m"}, "messages")
    expect(400, {"messages": []}, "messages is empty")
    expect(400, {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature")
    expect(400, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "1..=1900")
    expect(400, {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n = 1")
    bogus = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    assert expect(400, {"messages": image_message(bogus)}, "image 0")["code"] == "invalid_image"
    expect(400, {"messages": image_message("data:image/png;base64,@@@@")}, "base64")
    wide = io.BytesIO()
    Image.new("RGB", (120, 10)).save(wide, "PNG")
    wide_url = "data:image/png;base64," + base64.b64encode(wide.getvalue()).decode()
    assert expect(400, {"messages": image_message(wide_url)}, "100x100")["code"] == "invalid_image"
    three = [{"type": "image_url", "image_url": {"url": image_url}}] * 3
    expect(400, {"messages": [{"role": "user", "content": three}]}, "limit of 2")
    # The prompt alone is longer than the 2048-token context: the message names both numbers.
    long_prompt = [{"role": "user", "content": "word " * 2500}]
    error = expect(400, {"messages": long_prompt, "max_tokens": 10}, "exceeds the context of 2048")
    prompt_tokens = int(re.search(r"prompt is (\d+) tokens", error["message"]).group(1))
    assert prompt_tokens > 2048
    assert error["code"] == "context_length_exceeded"
    # A prompt that fits, with max_tokens that do not.
    expect(
        400,
        {"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 1900},
        "with 1900 new tokens",
    )
    big = {"messages": image_message("data:image/png;base64," + "A" * 300_000)}
    assert expect(413, big, "200000 bytes")["code"] == "request_too_large"
    status, raw = server.request("GET", "/v1/nope")
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"


def test_health_models_and_metrics(server: Server):
    status, raw = server.request("GET", "/health")
    assert (status, json.loads(raw)) == (200, {"status": "ok"})
    status, raw = server.request("GET", "/v1/models")
    assert status == 200 and json.loads(raw)["data"][0]["id"] == Path(server.client().models.list().data[0].id).name
    server.chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    text = server.metrics()
    for name in [
        'llama3v_requests_total{endpoint="/v1/chat/completions",status="200"}',
        "llama3v_prompt_tokens_total",
        "llama3v_completion_tokens_total",
        "llama3v_queue_depth",
        "llama3v_requests_running",
        'llama3v_request_duration_seconds_bucket{le="+Inf"}',
        "llama3v_time_to_first_token_seconds_count",
    ]:
        assert name in text, f"{name} missing from /metrics:\n{text}"
    assert metric(text, "llama3v_ready") == 1


def test_concurrent_greedy_requests_give_the_same_tokens(server: Server, image_url: str):
    body = {"messages": image_message(image_url), "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    alone = server.chat(body)
    results: list[tuple[int, dict]] = [None] * 4
    barrier = threading.Barrier(len(results))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = server.chat(body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    assert alone[0] == 200, alone
    texts = [r[1]["choices"][0]["message"]["content"] for r in results]
    print(f"alone: {alone[1]['choices'][0]['message']['content']!r}; together: {texts}")
    assert all(r[0] == 200 for r in results), results
    assert texts == [alone[1]["choices"][0]["message"]["content"]] * len(results)
    assert all(r[1]["usage"]["completion_tokens"] == 48 for r in results)


def test_a_full_queue_answers_429(model_dir: Path, image_url: str):
    with serve(model_dir, "--max-batch", "1", "--max-queue", "1") as busy:
        body = {"messages": image_message(image_url), "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        statuses: list[int] = []
        barrier = threading.Barrier(12)

        def one() -> None:
            barrier.wait()
            status, reply = busy.chat(body)
            if status == 429:
                assert reply["error"]["type"] == "rate_limit_error"
            statuses.append(status)

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S)
        text = busy.metrics()
    print(f"statuses: {sorted(statuses)}")
    assert len(statuses) == 12
    assert set(statuses) == {200, 429}
    # One running plus one queued is the most the server holds at a time.
    assert statuses.count(429) >= 1
    assert metric(text, 'llama3v_requests_total{endpoint="/v1/chat/completions",status="429"}') == statuses.count(429)
    assert metric(text, "llama3v_queue_depth") == 0


def read_sse_until_content(response: http.client.HTTPResponse) -> None:
    """Reads server-sent events until the first one with text content."""
    while True:
        line = response.readline()
        assert line, "stream ended before any content"
        if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
            return


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
def test_a_client_that_disconnects_cancels_its_generation(server: Server, image_url: str, stream: bool):
    before = metric(server.metrics(), 'llama3v_completions_total{finish_reason="cancelled"}')
    body = json.dumps(
        {
            "messages": image_message(image_url),
            "max_tokens": 1800,
            "temperature": 0,
            "ignore_eos": True,
            "stream": stream,
        }
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    if stream:
        response = conn.getresponse()
        assert response.status == 200, response.read()
        read_sse_until_content(response)
        response.close()
    else:
        # Gone before the reply: the server notices the closed connection while it generates.
        time.sleep(0.5)
    conn.sock.close()
    deadline = time.monotonic() + 30
    while True:
        text = server.metrics()
        cancelled = metric(text, 'llama3v_completions_total{finish_reason="cancelled"}')
        if cancelled == before + 1 and metric(text, "llama3v_requests_running") == 0:
            break
        assert time.monotonic() < deadline, f"generation not cancelled within 30 s:\n{text}"
        time.sleep(0.1)
    # The generation stopped early: far fewer than the 1800 tokens asked for were made.
    log = server.log.read_text()
    made = [int(m) for m in re.findall(r"\+ (\d+) completion tokens, cancelled", log)]
    print(f"cancelled after {made[-1]} of 1800 tokens")
    assert made[-1] < 1800


def test_sigterm_finishes_or_cancels_in_flight_requests_and_exits_0(model_dir: Path, image_url: str):
    with serve(model_dir, "--shutdown-grace-secs", "0.5", "--max-tokens", "1900") as running:
        body = json.dumps(
            {
                "messages": image_message(image_url),
                "max_tokens": 1800,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
        ).encode()
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=REQUEST_TIMEOUT_S)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        read_sse_until_content(response)
        running.proc.send_signal(signal.SIGTERM)
        rest = response.read().decode()
        code = running.proc.wait(timeout=30)
        log = running.log.read_text()
    print(log)
    assert code == 0
    # The request either finished inside the grace time or was told the server shut down.
    assert rest.rstrip().endswith("data: [DONE]"), rest[-300:]
    assert '"finish_reason":"length"' in rest or "shut down" in rest, rest[-300:]
    assert "stopped (SIGTERM)" in log
