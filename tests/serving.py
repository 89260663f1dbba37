"""A real ``edgekit serve`` process on 127.0.0.1 for the tests: started by the test, stopped by it, bounded in time."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

START_TIMEOUT_S = 120  # importing transformers and opening the model on a busy 2-core runner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *args, key: str | None = None, scheme: str = "http", verify=True):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.key, self.verify = key, verify
        # the server's output, in a folder of its own that terminate() removes (no log left in the temp folder)
        self.log = Path(tempfile.mkdtemp(prefix=f"edgekit-serve-{self.port}-")) / "serve.log"
        cmd = [sys.executable, "-m", "edgekit", "serve", str(model), "--port", str(self.port), "--log-level", "warning",
               *[str(a) for a in args]]
        self._log, self._final = open(self.log, "w"), None
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self._remove_log()
                raise RuntimeError(f"edgekit serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2, verify=verify).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait(5)
                self._remove_log()
                raise RuntimeError(f"edgekit serve did not start in {START_TIMEOUT_S} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        if self._final is not None:
            return self._final
        if not self._log.closed:
            self._log.flush()
        return self.log.read_text()

    def headers(self, key: str | None = "default") -> dict:
        key = self.key if key == "default" else key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def client(self, key: str | None = "default", timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(key), timeout=timeout, verify=self.verify)

    def post(self, path: str, body: dict, key: str | None = "default", **kw) -> httpx.Response:
        with self.client(key) as c:
            return c.post(path, json=body, **kw)

    def get(self, path: str, key: str | None = "default") -> httpx.Response:
        with self.client(key) as c:
            return c.get(path)

    def metric(self, name: str, **labels) -> float:
        """A sample's value in /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.get("/metrics").text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"edgekit serve did not stop within {timeout} s of SIGTERM:\n{self.output()}")
        finally:
            self._remove_log()

    def _remove_log(self) -> None:
        """Keep what the server wrote (output() still answers), then remove its folder."""
        if self._final is None:
            self._log.close()
            self._final = self.log.read_text()
            shutil.rmtree(self.log.parent, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.terminate()
