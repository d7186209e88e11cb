#!/usr/bin/env python3
"""Several `llama3v serve` replicas behind HAProxy, on loopback: the multi-replica setup of
docs/DEPLOYMENT.md on one machine, for tests and measurements.

Each replica is started through the container's entry point (deploy/entrypoint.sh, flags from
LLAMA3V_SERVE_* variables) on its own port; HAProxy (Debian's `haproxy` package) balances over them by
least connections, checks `/health` every 250 ms (a replica is out after one failed check, back after two
good ones) and retries a request on another replica when one refuses the connection, closes it without
an answer, or answers 503 (loading or draining; such an answer also takes the replica out at once).
Used by tests/python/test_cluster.py, and on its own:

    .venv/bin/python scripts/lb_cluster.py --replicas 3 --model models/default -- \\
        .venv/bin/python scripts/load_test.py --url {url} --clients 8 --requests 64

runs the command with `{url}` replaced by the balancer's address, then stops everything.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
# HAProxy's health-check rhythm; the tests wait a few of these for state changes.
CHECK_INTERVAL_S = 0.25


def free_port() -> int:
    """A port free on 127.0.0.1 now (the OS picks it); replicas keep theirs across restarts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes] | None:
    """(status, body) of GET path on 127.0.0.1:port, None when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return None
    finally:
        conn.close()


class Replica:
    """One `llama3v serve` process on a fixed port, started through deploy/entrypoint.sh."""

    def __init__(
        self, name: str, model: Path, workdir: Path, flags: list[str], binary: str, env: dict[str, str] | None = None
    ):
        self.name = name
        self.extra_env = env or {}
        self.port = free_port()
        self.model = model
        self.flags = flags
        self.binary = binary
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "LLAMA3V_BIN": self.binary,
            "LLAMA3V_MODEL": str(self.model),
            "LLAMA3V_SERVE_HOST": "127.0.0.1",
            "LLAMA3V_SERVE_PORT": str(self.port),
            **self.extra_env,
        }
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([str(ENTRYPOINT), *self.flags], env=env, stdout=log, stderr=log)

    def health(self) -> int | None:
        answer = get(self.port, "/health", timeout=2)
        return answer[0] if answer else None

    def metrics(self) -> str:
        answer = get(self.port, "/metrics")
        assert answer and answer[0] == 200, f"{self.name}: /metrics answered {answer}"
        return answer[1].decode()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.health() != 200:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"{self.name} not ready in {timeout} s:\n{self.log.read_text()}"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise FileNotFoundError("haproxy is not installed: ./scripts/setup.sh installs it (apt-get install haproxy)")
    return found


def haproxy_config(port: int, replicas: list[Replica], stats_socket: Path) -> str:
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
    inter = f"{int(CHECK_INTERVAL_S * 1000)}ms"
    return f"""global
    maxconn 512
    stats socket {stats_socket} mode 600 level admin
    # Requests are retried from HAProxy's buffer: room for a request with a few images as data URLs.
    tune.bufsize 262144

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout queue 30s
    timeout check 2s
    # A refused connection, a connection closed without an answer (a replica killed or closing an idle
    # connection) and a 503 (loading or draining) are retried, each time on another replica.
    retries 3
    option redispatch 1
    # L7 retries resend the request from HAProxy's buffer: wait for the whole body before forwarding.
    option http-buffer-request
    retry-on conn-failure empty-response 503

frontend llama3v
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance leastconn
    option httpchk
    http-check send meth GET uri /health
    http-check expect status 200
    # A 5xx answer (a draining replica's 503) marks the replica down at once, before the next health
    # check: otherwise leastconn would pick the replica that answers fastest, the draining one, again
    # for the retry.
    default-server inter {inter} fastinter {inter} downinter {inter} fall 1 rise 2
    default-server observe layer7 error-limit 1 on-error mark-down
{servers}
"""


class HAProxy:
    def __init__(self, replicas: list[Replica], workdir: Path):
        self.port = free_port()
        self.replicas = replicas
        self.stats_socket = workdir / "haproxy.sock"
        self.config = workdir / "haproxy.cfg"
        self.log = workdir / "haproxy.log"
        self.config.write_text(haproxy_config(self.port, replicas, self.stats_socket))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> None:
        with open(self.log, "w") as log:
            # -db: in the foreground, where SIGTERM stops it.
            self.proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self.stats_socket.exists() or get(self.port, "/health", timeout=1) is None:
            assert self.proc.poll() is None, f"haproxy exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"haproxy not listening in {timeout} s:\n{self.log.read_text()}"
            time.sleep(0.05)

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Replica name -> HAProxy's status of it (`UP`, `DOWN`, `UP 1/2` while rising, ...)."""
        lines = self.command("show stat").lstrip("# ").splitlines()
        rows = csv.DictReader(line for line in lines if line)
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def wait_state(self, name: str, state: str, timeout: float = 30) -> float:
        """Waits until HAProxy reports `name` in `state` (UP or DOWN); returns the seconds it took."""
        start = time.monotonic()
        while (found := self.server_states().get(name)) != state:
            assert time.monotonic() - start < timeout, f"{name} still {found!r}, not {state}, after {timeout} s"
            time.sleep(0.05)
        return time.monotonic() - start

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def cluster(
    model: Path, replicas: int, flags: list[str], binary: str, workdir: Path | None = None
) -> Iterator[tuple[HAProxy, list[Replica]]]:
    """`replicas` servers, all ready and UP behind a started HAProxy; everything stopped on exit."""
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llama3v-cluster-")))
        members = [Replica(f"r{i}", model, workdir, flags, binary) for i in range(replicas)]
        for replica in members:
            stack.callback(replica.stop)
            replica.start()
        for replica in members:
            replica.wait_ready()
        balancer = HAProxy(members, workdir)
        stack.callback(balancer.stop)
        balancer.start()
        for replica in members:
            balancer.wait_state(replica.name, "UP")
        yield balancer, members


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--binary", default=str(REPO / "target" / "release" / "llama3v"))
    parser.add_argument(
        "--flag", action="append", default=[], help="a serve flag for every replica, as --flag=--threads=1 (repeatable)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ... ({url}: the balancer)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    with cluster(args.model, args.replicas, args.flag, args.binary) as (balancer, members):
        print(f"{len(members)} replicas behind {balancer.url}", file=sys.stderr, flush=True)
        done = subprocess.run([part.replace("{url}", balancer.url) for part in command], check=False)
    return done.returncode


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
