"""`llama3v serve` as a cluster citizen, on the default model (models/default), loopback only:

- a draining replica: `/health` 503 at once after SIGTERM, new requests 503 with `Retry-After`, the
  request in flight finishes;
- API keys: 401 in OpenAI's shape without the key, `/health` and `/metrics` open, no key in the log;
- three replicas behind HAProxy (scripts/lb_cluster.py) under a bounded load of the `openai` client:
  a rolling restart (each replica SIGTERM'd and started again) fails no request; a SIGKILL'd replica's
  in-flight requests fail cleanly and promptly, new requests go to the others, and HAProxy takes the
  replica back once it is restarted. Every completed reply equals `llama3v generate`'s greedy output.
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from helpers import REPO, binary, llama3v
from PIL import Image, ImageDraw

try:  # the HTTP library under the openai client: httpx2 since openai 3, httpx before
    import httpx2 as openai_http
except ImportError:
    import httpx as openai_http

sys.path.insert(0, str(REPO / "scripts"))
from lb_cluster import HAProxy, Replica, cluster, haproxy_binary

MODEL = REPO / "models" / "default"
# Three replicas share two cores: one ONNX Runtime thread each.
FLAGS = ["--threads=1", "--max-batch=2", "--max-queue=32", "--shutdown-grace-secs=20", "--max-tokens=420"]
CLIENTS = 6
REQUEST_TIMEOUT_S = 60
# A failure that takes longer than this was a hang cut short by a timeout, not a clean failure.
PROMPT_FAILURE_S = 10
PROMPTS = ["What color is the shape?", "What shape is in the image?", "Describe the image."]
# Long replies (stop tokens ignored, streamed) keep requests in flight when a replica goes away.
LONG_TOKENS = 400


@dataclass(frozen=True)
class Case:
    image: Path
    prompt: str
    long: bool

    def messages(self) -> list[dict]:
        url = "data:image/png;base64," + base64.b64encode(self.image.read_bytes()).decode()
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": self.prompt}]
        return [{"role": "user", "content": parts}]

    def expected(self) -> str:
        args = ["generate", "--model", str(MODEL), "--image", str(self.image), "--prompt", self.prompt]
        args += ["--temperature", "0", "--json", "--threads", "1"]
        args += ["--max-new-tokens", str(LONG_TOKENS), "--ignore-eos"] if self.long else ["--max-new-tokens", "64"]
        done = llama3v(*args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["text"]


@dataclass
class Outcome:
    case: Case
    started: float
    ended: float
    text: str | None = None
    error: str | None = None


def ask(client: openai.OpenAI, case: Case) -> str:
    """Long cases stream (a replica that dies mid-reply cuts the stream); short ones don't."""
    common = {"model": "llama3v", "messages": case.messages(), "temperature": 0}
    if case.long:
        chunks = client.chat.completions.create(
            **common, max_tokens=LONG_TOKENS, stream=True, extra_body={"ignore_eos": True}
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    reply = client.chat.completions.create(**common, max_tokens=64)
    return reply.choices[0].message.content or ""


class Load:
    """CLIENTS threads sending the cases in turn through the balancer until stopped; bounded in count."""

    def __init__(self, url: str, cases: list[Case], max_requests: int = 2000):
        self.url = url
        self.cases = cases
        self.max_requests = max_requests
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sent = 0
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self.threads), "a client is still waiting: a request hangs"

    def client(self) -> None:
        # max_retries=0: every failure the balancer lets through is seen here, none hidden by the client.
        client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        while not self.stopping.is_set():
            with self.lock:
                if self.sent >= self.max_requests:
                    return
                case = self.cases[self.sent % len(self.cases)]
                self.sent += 1
            outcome = Outcome(case, started=time.monotonic(), ended=0.0)
            try:
                outcome.text = ask(client, case)
            except (openai.APIError, openai_http.HTTPError) as err:
                outcome.error = f"{type(err).__name__}: {err}"
            outcome.ended = time.monotonic()
            with self.lock:
                self.outcomes.append(outcome)

    def completed(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def wait_for(self, more: int, timeout: float = 60) -> None:
        """Waits until `more` further requests have finished."""
        target = self.completed() + more
        deadline = time.monotonic() + timeout
        while self.completed() < target:
            assert time.monotonic() < deadline, f"only {self.completed()} of {target} requests finished in {timeout} s"
            time.sleep(0.05)


def check_replies(outcomes: list[Outcome], expected: dict[Case, str]) -> None:
    """Every completed reply equals generate's greedy text for its case."""
    wrong = [(o.case, o.text) for o in outcomes if o.text is not None and o.text != expected[o.case]]
    done = sum(o.text is not None for o in outcomes)
    print(f"{done} completed replies checked against generate: {len(wrong)} differ")
    assert not wrong, wrong[:3]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def served(replica: Replica) -> float:
    return metric(replica.metrics(), 'llama3v_requests_total{endpoint="/v1/chat/completions",status="200"}')


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("cluster-images")
    shapes = [((200, 30, 30), "ellipse", (255, 255, 255)), ((30, 60, 210), "rectangle", (215, 215, 215))]
    paths = []
    for i, (color, shape, background) in enumerate(shapes):
        image = Image.new("RGB", (64, 64), background)
        getattr(ImageDraw.Draw(image), shape)((14, 12, 50, 48), fill=color)
        paths.append(root / f"shape{i}.png")
        image.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def expected(images: list[Path]) -> dict[Case, str]:
    assert (MODEL / "manifest.json").is_file(), "models/default is missing: run ./scripts/setup.sh"
    cases = [Case(image, prompt, long) for image in images for prompt in PROMPTS for long in (False, True)]
    return {case: case.expected() for case in cases}


def post(port: int, path: str, body: dict, headers: dict | None = None) -> tuple[int, http.client.HTTPMessage, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request(
            "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        return response.status, response.headers, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_a_draining_replica_turns_unready_and_answers_503_with_retry_after(tmp_path: Path, expected: dict[Case, str]):
    case = next(c for c in expected if c.long)
    replica = Replica("drain", MODEL, tmp_path, FLAGS, binary())
    try:
        replica.start()
        replica.wait_ready()
        result: dict = {}

        def long_request() -> None:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{replica.port}/v1", api_key="unused", max_retries=0)
            result["text"] = ask(client, case)

        in_flight = threading.Thread(target=long_request)
        in_flight.start()
        deadline = time.monotonic() + 30
        while metric(replica.metrics(), "llama3v_requests_running") < 1:
            assert time.monotonic() < deadline, "the long request never started"
            time.sleep(0.01)
        replica.signal(signal.SIGTERM)
        time.sleep(0.1)
        health = replica.health()
        status, headers, body = post(
            replica.port, "/v1/chat/completions", {"messages": case.messages(), "max_tokens": 4}
        )
        draining = metric(replica.metrics(), "llama3v_draining")
        in_flight.join(REQUEST_TIMEOUT_S)
        code = replica.wait_exit(30)
    finally:
        replica.stop()
    print(f"after SIGTERM: /health {health}, new request {status} Retry-After {headers.get('Retry-After')}, {body}")
    assert health == 503
    assert draining == 1
    assert status == 503 and headers.get("Retry-After") == "1"
    assert body["error"]["type"] == "service_unavailable"
    assert result.get("text") == expected[case], "the request in flight did not finish with generate's text"
    assert code == 0


def test_api_keys_guard_the_api_but_not_health_or_metrics(tmp_path: Path, expected: dict[Case, str]):
    case = next(c for c in expected if not c.long)
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated 2026-11\nsk-file-key-7f3a\n")
    env_key = "sk-env-key-91c2"
    flags = [*FLAGS, f"--api-key-file={key_file}"]
    replica = Replica("auth", MODEL, tmp_path, flags, binary(), env={"LLAMA3V_API_KEY": env_key})
    try:
        replica.start()
        replica.wait_ready()
        url = f"http://127.0.0.1:{replica.port}/v1"
        answers = {}
        for key in (env_key, "sk-file-key-7f3a"):
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
            reply = client.chat.completions.create(
                model="llama3v", messages=case.messages(), temperature=0, max_tokens=64
            )
            answers[key] = reply.choices[0].message.content
        with pytest.raises(openai.AuthenticationError) as wrong:
            openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()
        status, headers, body = post(replica.port, "/v1/chat/completions", {"messages": case.messages()})
        health = replica.health()
        metrics = replica.metrics()
    finally:
        replica.stop()
    log = replica.log.read_text()
    print(f"no key: {status} {body}; wrong key: {wrong.value.body}; /health {health}")
    assert all(text == expected[case] for text in answers.values()), answers
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"
    assert wrong.value.status_code == 401
    assert health == 200 and "llama3v_requests_running" in metrics
    assert "API key" in log
    for secret in (env_key, "sk-file-key-7f3a", "sk-wrong"):
        assert secret not in log


def wait_until(what: str, check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def test_three_replicas_behind_haproxy_survive_a_rolling_restart_and_a_kill(expected: dict[Case, str]):
    cases = list(expected)
    with cluster(MODEL, 3, FLAGS, binary()) as (balancer, replicas):
        # Rolling restart: each replica in turn gets SIGTERM, drains, exits 0 and comes back.
        with Load(balancer.url, cases) as rolling:
            rolling.wait_for(CLIENTS)
            for replica in replicas:
                replica.signal(signal.SIGTERM)
                down_s = balancer.wait_state(replica.name, "DOWN", 10)
                code = replica.wait_exit(30)
                assert code == 0, replica.log.read_text()
                replica.start()
                replica.wait_ready()
                up_s = balancer.wait_state(replica.name, "UP", 10)
                print(f"{replica.name}: out of rotation {down_s:.2f} s after SIGTERM, back {up_s:.2f} s after ready")
                rolling.wait_for(CLIENTS)
        failed = [o.error for o in rolling.outcomes if o.error]
        print(f"rolling restart: {len(rolling.outcomes)} requests, {len(failed)} failed")
        check_replies(rolling.outcomes, expected)
        assert not failed, failed[:5]

        # SIGKILL: requests in flight on the victim fail cleanly or are retried by HAProxy; the rest go on.
        victim = replicas[1]
        with Load(balancer.url, cases) as killing:
            wait_until(
                "a request running on the victim", lambda: metric(victim.metrics(), "llama3v_requests_running") >= 1
            )
            victim.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            victim.wait_exit(10)
            down_s = balancer.wait_state(victim.name, "DOWN", 10)
            out_at = time.monotonic()
            killing.wait_for(2 * CLIENTS)
            victim.start()
            victim.wait_ready()
            up_s = balancer.wait_state(victim.name, "UP", 10)
            wait_until("the restarted replica serving again", lambda: served(victim) >= 2)
            killing.wait_for(CLIENTS)
        outcomes = killing.outcomes
        failed = [o for o in outcomes if o.error]
        print(f"SIGKILL: out of rotation after {down_s:.2f} s, back {up_s:.2f} s after ready; {len(outcomes)} requests")
        for o in failed:
            print(f"  failed after {o.ended - o.started:.2f} s: {o.error[:160]}")
        check_replies(outcomes, expected)
        # Only requests in flight at the kill may fail, each promptly with an error the client sees.
        for o in failed:
            assert o.started <= killed_at <= o.ended, o.error
            assert o.ended - killed_at < PROMPT_FAILURE_S, o.error
        assert len(failed) <= CLIENTS
        after = [o for o in outcomes if o.started > out_at]
        assert after and all(o.error is None for o in after), [o.error for o in after if o.error][:3]
        assert all(balancer.server_states()[r.name] == "UP" for r in replicas), balancer.server_states()


def test_haproxy_config_checks_health(tmp_path: Path):
    """The balancer's configuration is one HAProxy accepts, with health checks on /health."""
    replicas = [Replica(f"r{i}", MODEL, tmp_path, FLAGS, binary()) for i in range(2)]
    balancer = HAProxy(replicas, tmp_path)
    done = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(balancer.config)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "uri /health" in balancer.config.read_text()
