"""edgekit serve through real servers on 127.0.0.1 (started and stopped by the tests, bounded in requests and
time): every endpoint, API keys, limits, dynamic batching equal to unbatched answers, backpressure, graceful
shutdown, metrics that match the requests sent, TLS with two workers, the page in headless chromium; and the
Triton repository written from a bundle."""

import base64
import json
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from helpers import assert_user_error, read_json, run_cli
from serving import Server, free_port

KEY = "test-key-0123456789abcdef"
TEXTS = ["good bright film", "a dull and awful plot", "great fun", "bad acting sad story", "good good great",
         "awful", "a fine and bright movie", "dull bad dull"]


@pytest.fixture(scope="module")
def bundle(released_run):
    return released_run / "dist" / "model"


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory):
    f = tmp_path_factory.mktemp("keys") / "keys.txt"
    f.write_text(f"# keys for the tests\n{KEY}\nanother-key-abcdefghijklmnop\n")
    return f


@pytest.fixture(scope="module")
def clf(bundle, keyfile):
    with Server(bundle, "--api-key-file", keyfile, "--max-batch", 8, "--max-wait-ms", 50, "--max-request-bytes", 4096,
                "--max-inputs", 8, "--max-tokens", 120, key=KEY) as s:
        yield s


def _scores(answer: dict) -> dict:
    return {s["label"]: s["score"] for s in answer["scores"]}


# ---- endpoints and access control ------------------------------------------------------------------------------


def test_every_endpoint_needs_the_key_but_health_and_page(clf, bundle):
    assert clf.get("/healthz", key=None).json() == {"status": "ok"}
    assert "<script>" in clf.get("/", key=None).text
    for path in ("/readyz", "/v1/models", "/metrics"):
        assert clf.get(path, key=None).status_code == 401, path
        assert clf.get(path, key="wrong-key-0123456789abcdef").status_code == 401, path
        assert clf.get(path).status_code == 200, path
    r = clf.post("/v1/classify", {"input": "good"}, key=None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["error"]["message"]
    assert clf.post("/v1/classify", {"input": "good"}, key="another-key-abcdefghijklmnop").status_code == 200

    assert clf.get("/readyz").json() == {"ready": True, "verified": True, "model": "model"}
    m = read_json(bundle / "manifest.json")
    (entry,) = clf.get("/v1/models").json()["data"]
    s = entry["edgekit"]
    assert entry["id"] == "model" and s["verified"] and s["task"] == "text-classification"
    assert s["sha256"] == m["models"]["int8"]["sha256"] and s["files_checked"] == len(m["files"])
    assert s["accuracy_gate"]["passed"] is True and s["edgekit_version"] == m["edgekit_version"]
    assert s["bench"][0]["latency_ms"]["p50_ms"] == next(v["latency"]["p50_ms"] for v in m["bench"][0]["variants"]
                                                          if "INT8" in v["name"])


def test_classify_answers_are_the_verified_runtime_s(clf, bundle):
    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import encode
    from edgekit.release.bundle import load_bundle

    r = clf.post("/v1/classify", {"input": TEXTS[:6]})
    assert r.status_code == 200
    data = r.json()["data"]
    session = load_bundle(bundle)
    arrays, _ = encode(load_tokenizer(bundle / "int8"), TEXTS[:6], 64)
    logits = session.run(arrays)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    id2label = read_json(bundle / "int8" / "config.json")["id2label"]
    for i, d in enumerate(data):
        assert d["index"] == i and d["label"] == id2label[str(int(p[i].argmax()))]
        np.testing.assert_allclose(d["score"], p[i].max(), atol=1e-6)
        assert abs(sum(s["score"] for s in d["scores"]) - 1) < 1e-6 and d["truncated"] is False


def test_batched_answers_equal_unbatched(clf):
    alone = [clf.post("/v1/classify", {"input": t}).json()["data"][0] for t in TEXTS]  # one at a time: batches of 1
    count0, sum0 = clf.metric("edgekit_batch_size_count"), clf.metric("edgekit_batch_size_sum")
    start = threading.Barrier(len(TEXTS))

    def one(t):
        with clf.client() as c:
            start.wait()
            return c.post("/v1/classify", json={"input": t}).json()["data"][0]

    with ThreadPoolExecutor(len(TEXTS)) as pool:
        together = list(pool.map(one, TEXTS))
    batches = clf.metric("edgekit_batch_size_count") - count0
    texts = clf.metric("edgekit_batch_size_sum") - sum0
    assert texts == len(TEXTS) and batches < len(TEXTS), (batches, texts)  # they did share batches
    for a, b in zip(alone, together):
        assert a["label"] == b["label"]
        # padded to the batch's longest and INT8 activation scales taken per batch: equal within float noise
        for label, score in _scores(a).items():
            assert abs(score - _scores(b)[label]) < 1e-4, (a, b)


def test_limits_are_413_and_bad_bodies_400(clf):
    before = clf.metric("edgekit_rejected_requests_total", reason="too_large")
    r = clf.post("/v1/classify", {"input": ["x" * 5000]})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    r = clf.post("/v1/classify", {"input": ["good"] * 9})
    assert r.status_code == 413 and "9 inputs" in r.json()["error"]["message"]
    long = " ".join(["good"] * 200)
    r = clf.post("/v1/classify", {"input": [long] * 3})  # each truncated to 64 tokens: 192 > 120
    assert r.status_code == 413 and "192 tokens" in r.json()["error"]["message"]
    assert clf.metric("edgekit_rejected_requests_total", reason="too_large") - before == 3
    one = clf.post("/v1/classify", {"input": long}).json()
    assert one["data"][0]["truncated"] is True and one["usage"]["prompt_tokens"] == 64
    for body in ({"input": []}, {"input": 3}, {"text": "good"}):
        r = clf.post("/v1/classify", body)
        assert r.status_code == 400 and r.json()["error"]["message"], body
    r = clf.post("/v1/embeddings", {"input": "good"})
    assert r.status_code == 404 and "/v1/classify" in r.json()["error"]["message"]
    with clf.client() as c:
        assert c.post("/v1/classify", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400


def test_metrics_count_the_requests_sent(clf, bundle):
    ok0 = clf.metric("edgekit_requests_total", endpoint="/v1/classify", status="200")
    denied0 = clf.metric("edgekit_requests_total", endpoint="/v1/classify", status="401")
    unauth0 = clf.metric("edgekit_rejected_requests_total", reason="unauthorized")
    dur0 = clf.metric("edgekit_request_duration_seconds_count", endpoint="/v1/classify")
    for t in TEXTS[:3]:
        assert clf.post("/v1/classify", {"input": t}).status_code == 200
    for _ in range(2):
        assert clf.post("/v1/classify", {"input": "good"}, key=None).status_code == 401
    assert clf.metric("edgekit_requests_total", endpoint="/v1/classify", status="200") - ok0 == 3
    assert clf.metric("edgekit_requests_total", endpoint="/v1/classify", status="401") - denied0 == 2
    assert clf.metric("edgekit_rejected_requests_total", reason="unauthorized") - unauth0 == 2
    assert clf.metric("edgekit_request_duration_seconds_count", endpoint="/v1/classify") - dur0 == 5
    sha = read_json(bundle / "manifest.json")["models"]["int8"]["sha256"]
    assert clf.metric("edgekit_model_info", sha256=sha, task="text-classification", gate_passed="true") == 1
    assert clf.metric("edgekit_model_bench_latency_seconds", quantile="0.99") > 0
    assert clf.metric("edgekit_queue_depth") == 0
    assert clf.get("/metrics").headers["content-type"].startswith("text/plain")


def test_the_example_alert_rules_use_metrics_the_server_exports(clf):
    import yaml
    from prometheus_client.parser import text_string_to_metric_families

    rules = yaml.safe_load((Path(__file__).parent.parent / "examples/prometheus/edgekit-alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    families = {f.name for f in text_string_to_metric_families(clf.get("/metrics").text)}
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"edgekit_[a-z0-9_]+", e)}
    used = {n[: -len("_total")] if n.endswith("_total") else n for n in used}  # the parser names counters without it
    assert used and used <= families, used - families
    assert any("edgekit_model_bench_latency_seconds" in e and "0.99" in e for e in exprs)


# ---- refusals before anything listens ----------------------------------------------------------------------


def test_a_tampered_bundle_refuses_to_start(bundle, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(bundle, bad)
    f = bad / "int8" / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    line = assert_user_error(run_cli("serve", bad, "--port", free_port(), expect=None), "refusing to serve",
                             "tampered int8/model.onnx")
    assert "download the release again" in line
    (bad / "int8" / "model.onnx").write_bytes(f.read_bytes())  # nothing was written into the bundle
    assert not (bad / "int8" / "extra").exists()


def test_a_tampered_tarball_refuses_and_a_good_one_serves(released_run, tmp_path):
    import tarfile

    from edgekit.serve.model import open_served

    tarball = released_run / "dist" / "model.tar.gz"
    served = open_served(tarball)
    try:
        assert served.verified and served.name == "model" and served.task == "text-classification"
    finally:
        served.close()
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(tarball) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name.endswith("int8/config.json"):
                data = data.replace(b'"positive"', b'"POSITIVE"')
                m.size = len(data)
            dst.addfile(m, __import__("io").BytesIO(data) if data is not None else None)
    assert_user_error(run_cli("serve", bad, "--port", free_port(), expect=None), "refusing to serve", "config.json")


@pytest.mark.parametrize("args,fragment", [
    (("--ssl-keyfile", "KEYFILE"), "both --ssl-keyfile and --ssl-certfile"),
    (("--api-key-file", "EMPTY"), "holds no key"),
    (("--api-key-file", "SHORT"), "shorter than 16 characters"),
    (("--variant", "fp32"), "has no 'fp32' model"),
    (("--public-key", "KEYFILE"), "public key"),
])
def test_bad_options_are_one_sentence(bundle, tmp_path, args, fragment):
    (tmp_path / "empty").write_text("# nothing\n\n")
    (tmp_path / "short").write_text("abc\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    paths = {"KEYFILE": tmp_path / "key.pem", "EMPTY": tmp_path / "empty", "SHORT": tmp_path / "short"}
    argv = [paths.get(a, a) for a in args]
    assert_user_error(run_cli("serve", bundle, "--port", free_port(), *argv, expect=None), fragment)


def test_a_port_in_use_is_one_sentence(bundle):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert_user_error(run_cli("serve", bundle, "--port", s.getsockname()[1], expect=None), "could not listen")


def test_binding_beyond_loopback_without_keys_warns():
    from edgekit.serve.config import ServeConfig
    from edgekit.serve.server import check

    assert check(ServeConfig()) == [] and check(ServeConfig(host="::1")) == []
    (w,) = check(ServeConfig(host="0.0.0.0"))
    assert "without --api-key-file" in w
    assert check(ServeConfig(host="0.0.0.0", api_key_file=__file__)) == []


def test_a_request_over_its_timeout_is_504(bundle):
    from fastapi.testclient import TestClient

    from edgekit.serve.config import ServeConfig
    from edgekit.serve.server import build_app

    app = build_app(str(bundle), ServeConfig(max_wait_ms=1500, max_batch=64, request_timeout=0.2))
    with TestClient(app) as c:
        r = c.post("/v1/classify", json={"input": "good"})
        assert r.status_code == 504 and "0.2 s" in r.json()["error"]["message"]
        assert 'reason="timeout"} 1.0' in c.get("/metrics").text


# ---- backpressure and shutdown -----------------------------------------------------------------------------------


def test_a_flood_beyond_the_queue_gets_429_and_every_request_an_answer(bundle):
    n = 40
    with Server(bundle, "--max-queue", 4, "--max-batch", 64, "--max-wait-ms", 400) as s:
        start = threading.Barrier(n)

        def one(i):
            with s.client(timeout=30) as c:
                start.wait()
                return c.post("/v1/classify", json={"input": TEXTS[i % len(TEXTS)]})

        t0 = time.monotonic()
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(one, range(n)))
        assert time.monotonic() - t0 < 30  # nothing hung
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 4, codes
        for r in answers:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["error"]["message"]
        assert s.metric("edgekit_requests_total", endpoint="/v1/classify", status="200") == codes.count(200)
        assert s.metric("edgekit_requests_total", endpoint="/v1/classify", status="429") == codes.count(429)
        assert s.metric("edgekit_rejected_requests_total", reason="queue_full") == codes.count(429)


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(bundle):
    s = Server(bundle, "--max-batch", 64, "--max-wait-ms", 2500)
    results = []

    def one(t):
        results.append(s.post("/v1/classify", {"input": t}))

    threads = [threading.Thread(target=one, args=(t,)) for t in TEXTS[:3]]
    for t in threads:
        t.start()
    time.sleep(0.8)  # the three wait in the queue for their batch (2.5 s window)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.4)
    with pytest.raises(httpx.ConnectError):  # the socket is closed at once
        httpx.post(s.url + "/v1/classify", json={"input": "good"}, timeout=5)
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert s.terminate(30) == 0, s.output()
    assert "Traceback" not in s.output()


# ---- other tasks: embeddings, token classification (TLS, two workers), completions ---------------------------


@pytest.fixture(scope="module")
def encoder_int8(encoder_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-enc") / "int8"
    run_cli("quantize", encoder_ckpt, "-o", out)
    return out


@pytest.fixture(scope="module")
def embedder(encoder_int8):
    with Server(encoder_int8, "--max-batch", 8, "--max-wait-ms", 10) as s:
        yield s


def test_embeddings_follow_openai_and_equal_the_runtime_s(embedder, encoder_int8):
    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import encode
    from edgekit.metrics import mean_pool
    from edgekit.runtimes.base import load

    r = embedder.post("/v1/embeddings", {"input": TEXTS[:3], "model": "anything", "user": "x"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["model"] == "int8" and body["usage"]["prompt_tokens"] > 0
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"embedding"}
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    arrays, _ = encode(load_tokenizer(encoder_int8), TEXTS[:3], 64)
    direct = mean_pool(load(encoder_int8).run(arrays), arrays["attention_mask"])
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    alone = np.array(embedder.post("/v1/embeddings", {"input": TEXTS[0]}).json()["data"][0]["embedding"])
    b64 = embedder.post("/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"}).json()["data"][0]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b64["embedding"]), "<f4"), alone.astype("<f4"))
    # alone or in a batch: dynamic INT8 takes its activation scales per batch, so the vectors differ in the 4th
    # decimal (measured: 3.5e-4 at most here), not in direction
    assert float(alone @ vectors[0]) > 0.9999
    assert embedder.get("/readyz").json()["verified"] is False  # a model folder, not a bundle
    assert embedder.post("/v1/classify", {"input": "x"}).status_code == 404
    assert embedder.post("/v1/embeddings", {"input": "x", "dimensions": 8}).status_code == 400


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (cryptography), and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / "key.pem", d / "cert.pem"


def test_token_classification_over_tls_with_two_workers(token_ckpt, tls, tmp_path):
    import ssl

    run_cli("quantize", token_ckpt, "-o", tmp_path / "tok")
    key, cert = tls
    verify = ssl.create_default_context(cafile=str(cert))
    with Server(tmp_path / "tok", "--workers", 2, "--ssl-keyfile", key, "--ssl-certfile", cert, scheme="https",
                verify=verify) as s:
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP is not served
            httpx.get(s.url.replace("https", "http") + "/healthz", timeout=5)
        texts = ["alice went to paris", "bob saw a dog in london"]
        for _ in range(3):
            r = s.post("/v1/classify", {"input": texts})
            assert r.status_code == 200
            for text, d in zip(texts, r.json()["data"]):
                assert [e["word"] for e in d["entities"]] == text.split()
                assert all(text[e["start"]:e["end"]] == e["word"] and 0 < e["score"] <= 1 for e in d["entities"])
        # both workers write their counts; /metrics (from either) sums them
        assert s.metric("edgekit_requests_total", endpoint="/v1/classify", status="200") == 3
        assert s.terminate(30) == 0


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    from tiny_decoders import build

    root = tmp_path_factory.mktemp("serve-lm")
    build("llama", root / "ckpt")
    run_cli("export", root / "ckpt", "-o", root / "onnx")
    return root / "onnx"


def test_completions_stream_the_greedy_continuation(llama_onnx):
    from edgekit.generate import generate

    prompt = "a b c"
    expected = generate(llama_onnx, prompt, new_tokens=8)
    with Server(llama_onnx) as s:
        r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 8})
        body = r.json()
        assert r.status_code == 200 and body["object"] == "text_completion"
        choice = body["choices"][0]
        assert choice["text"] == expected.text and choice["finish_reason"] in ("length", "stop")
        assert body["usage"]["completion_tokens"] == len(expected.tokens)
        assert body["usage"]["prompt_tokens"] == expected.prompt_tokens

        with s.client() as c, c.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 8,
                                                                       "stream": True}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == expected.text
        assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"] and len(chunks) > 2

        for bad, status in (({"prompt": prompt, "temperature": 0.7}, 400), ({"prompt": prompt, "n": 2}, 400),
                            ({"prompt": prompt, "max_tokens": 100000}, 413), ({"prompt": "  "}, 400)):
            assert s.post("/v1/completions", bad).status_code == status, bad
        assert s.post("/v1/embeddings", {"input": "x"}).status_code == 404


# ---- the page, in a real headless browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    # chromium's profile and its singleton-socket folder (org.chromium.Chromium.*, which it leaves behind) go to
    # a pytest temp folder, not the machine's /tmp
    temp = tmp_path_factory.mktemp("chromium")
    opts.add_argument(f"--user-data-dir={temp / 'profile'}")
    service = Service("/usr/bin/chromedriver", env={**os.environ, "TMPDIR": str(temp)})
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _use_page(driver, url: str, text: str, key: str | None = None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    wait = WebDriverWait(driver, 20)
    if key:
        wait.until(lambda d: "401" in d.find_element(By.ID, "error").text)  # it asks for the key first
        driver.find_element(By.ID, "key").send_keys(key)
    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "run").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#result[data-done='1']")))
    assert driver.find_element(By.ID, "error").text == ""
    return driver


def test_the_page_classifies_in_headless_chromium(browser, clf):
    from selenium.webdriver.common.by import By

    _use_page(browser, clf.url, "a dull and awful plot", key=KEY)
    rows = browser.find_elements(By.CSS_SELECTOR, "#result tr.row")
    shown = [(r.find_elements(By.TAG_NAME, "td")[0].text, float(r.find_elements(By.TAG_NAME, "td")[1].text))
             for r in rows]
    api = clf.post("/v1/classify", {"input": "a dull and awful plot"}).json()["data"][0]
    assert [label for label, _ in shown] == [s["label"] for s in api["scores"]]
    assert abs(shown[0][1] - api["score"]) < 1e-3
    assert "verified bundle" in browser.find_element(By.ID, "model").text


def test_the_page_ranks_embedding_neighbours_in_headless_chromium(browser, embedder):
    from selenium.webdriver.common.by import By

    lines = ["good bright film", "great fun", "a dull and awful plot", "bad acting sad story"]
    _use_page(browser, embedder.url, "\n".join(lines))
    shown = [r.find_elements(By.TAG_NAME, "td")[0].text for r in browser.find_elements(By.CSS_SELECTOR, "#result tr.row")]
    v = np.array([d["embedding"] for d in embedder.post("/v1/embeddings", {"input": lines}).json()["data"]])
    expected = [lines[1 + i] for i in np.argsort(-(v[1:] @ v[0]), kind="stable")]
    assert shown == expected


# ---- Triton --------------------------------------------------------------------------------------------------


def test_triton_repository_from_a_bundle(bundle, tmp_path):
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from edgekit.artifacts import sha256_file

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x01" * 64)  # stands in for an engine built on the target: copied, never run here
    r = run_cli("release", "triton", bundle, "-o", tmp_path / "repo", "--max-batch", 8, "--engine", engine)
    assert "parsed with tritonclient's ModelConfig schema" in r.output
    repo = tmp_path / "repo"
    m = read_json(bundle / "manifest.json")
    cfg = text_format.Parse((repo / "model" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "model" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 8
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 5000
    graph = onnx.load(str(bundle / "int8" / "model.onnx")).graph
    assert [i.name for i in cfg.input] == [i.name for i in graph.input]
    assert all(list(i.dims) == [-1] and i.data_type == model_config_pb2.TYPE_INT64 for i in cfg.input)
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [2])]
    assert cfg.parameters["edgekit_model_sha256"].string_value == m["models"]["int8"]["sha256"]
    assert sha256_file(repo / "model" / "1" / "model.onnx") == m["models"]["int8"]["sha256"]
    assert (repo / "model" / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert read_json(repo / "model" / "1" / "tokenizer" / "config.json")["id2label"]
    plan = text_format.Parse((repo / "model_tensorrt" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert plan.platform == "tensorrt_plan" and (repo / "model_tensorrt" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert "client-side" in (repo / "README.md").read_text()
    # an existing repository is not replaced without --overwrite; nothing is written into the bundle
    assert_user_error(run_cli("release", "triton", bundle, "-o", repo, expect=None), "not empty")
    assert_user_error(run_cli("release", "triton", bundle, "-o", bundle / "repo", expect=None))


def test_release_build_writes_the_triton_repository_too(released_run, tmp_path):
    r = run_cli("release", "build", released_run / "run", "-o", tmp_path / "dist", "--name", "m",
                "--triton", tmp_path / "repo")
    assert "Triton repository:" in r.output
    assert (tmp_path / "repo" / "m" / "config.pbtxt").is_file() and (tmp_path / "dist" / "m.tar.gz").is_file()
