"""The CI examples (examples/ci/) are run, not only read.

- Both files validate against the schemas GitHub and GitLab publish (check-jsonschema's vendored copies).
- The GitHub workflow's structure is asserted (split jobs, least privilege, fork-safe comments, provenance),
  and its baseline-download step runs in bash against a stand-in `gh` (GitHub is not reachable from here):
  only "no model release yet" takes the first-run path; a 403 or a release without manifest.json fails.
- The GitLab pipeline runs for real with gitlab-ci-local (shell executor) in a throwaway git repository that
  holds a tiny fine-tuned model, against a local HTTP server standing in for GitLab's API (releases and
  generic packages). The merge-request path, the first-run path, the failure paths of the baseline fetch,
  and a gate that fails are all exercised; the job's result follows the gate's.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from helpers import damaged_copy, run_cli

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "examples" / "ci"
GITHUB = CI / "github-actions.yml"
GITHUB_COMMENT = CI / "github-actions-comment.yml"
GITLAB = CI / "gitlab-ci.yml"
VENV_BIN = Path(sys.executable).parent
GITLAB_CI_LOCAL_VERSION = "4.52.0"  # later versions need Node 22; this machine has Node 20


def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


# ---- schemas -------------------------------------------------------------------------------------------


def _check_jsonschema(schema: str, *files: Path) -> subprocess.CompletedProcess:
    exe = _tool("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    return subprocess.run([exe, "--builtin-schema", schema, *map(str, files)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("schema,files", [
    ("vendor.github-workflows", [GITHUB, GITHUB_COMMENT]),
    ("vendor.gitlab-ci", [GITLAB]),
])
def test_ci_example_validates_against_its_schema(schema, files, tmp_path):
    r = _check_jsonschema(schema, *files)
    assert r.returncode == 0, r.stdout + r.stderr
    # The validator can fail: the same file with one value the schema does not allow is refused.
    text = files[0].read_text()
    wrong = {"timeout-minutes: 60": "timeout-minutes: sixty", "interruptible: true": "interruptible: maybe"}
    old = next(k for k in wrong if k in text)
    bad = tmp_path / files[0].name
    bad.write_text(text.replace(old, wrong[old], 1))
    r = _check_jsonschema(schema, bad)
    assert r.returncode != 0, r.stdout


# ---- GitHub: structure ---------------------------------------------------------------------------------


def _workflow(path: Path) -> dict:
    wf = yaml.safe_load(path.read_text())
    wf["on"] = wf.pop(True, wf.get("on"))  # YAML 1.1 reads the key `on` as True
    return wf


def _steps(job: dict, uses: str) -> list[dict]:
    return [s for s in job["steps"] if s.get("uses", "").split("@")[0] == uses]


def _step(job: dict, name: str) -> dict:
    return next(s for s in job["steps"] if s.get("name") == name)


WRITE = {"write"}


def test_github_workflow_structure():
    text = GITHUB.read_text()
    wf = _workflow(GITHUB)
    assert set(wf["on"]) == {"pull_request", "push"}
    assert wf["permissions"] == {}, "top-level permissions grant nothing; each job asks for its own"
    assert "group" in wf["concurrency"] and "pull_request" in str(wf["concurrency"]["cancel-in-progress"])
    jobs = wf["jobs"]
    assert set(jobs) == {"compress", "gate", "release"}
    for name, job in jobs.items():
        assert isinstance(job.get("timeout-minutes"), int), name
        assert isinstance(job.get("permissions"), dict), f"{name} states its permissions"
        for s in _steps(job, "actions/setup-python"):
            w = s.get("with", {})
            assert w.get("cache") is None or "cache-dependency-path" in w, "cache: pip without a file to key on"

    # Pull requests: read-only jobs; the gate job fails with the gate (no continue-on-error, no `|| true`).
    for name in ("compress", "gate"):
        assert set(jobs[name]["permissions"].values()) <= {"read", "none"}, name
        assert "if" not in jobs[name]
    gate = jobs["gate"]
    assert gate["needs"] == "compress"
    run = _step(gate, "Regression gate")
    assert "continue-on-error" not in run and "|| true" not in run["run"] and "if" not in run
    assert run["run"].startswith("edgekit gate run/report.json --baseline baseline/model.tar.gz")
    assert "--require accuracy,latency,size" in run["run"]
    assert "steps.baseline.outputs.found == 'false' && '--allow-missing-baseline'" in run["run"]
    assert "$GITHUB_STEP_SUMMARY" in _step(gate, "Summary")["run"]

    # Release: push to main only, after the gate, the only job that writes, with provenance for the tarball.
    rel = jobs["release"]
    assert "github.event_name == 'push'" in rel["if"] and "refs/heads/main" in rel["if"]
    assert rel["needs"] == "gate"
    assert rel["permissions"] == {"contents": "write", "id-token": "write", "attestations": "write"}
    for name in ("compress", "gate"):
        assert not WRITE & set(jobs[name]["permissions"].values())
        assert "id-token" not in jobs[name]["permissions"] and "attestations" not in jobs[name]["permissions"]
    (attest,) = _steps(rel, "actions/attest-build-provenance")
    assert attest["with"]["subject-path"] == "dist/model.tar.gz"
    names = [s.get("name") or s.get("uses") for s in rel["steps"]]
    assert names.index(attest["uses"]) < names.index("Release") and names.index("Build the release bundle") < names.index(attest["uses"])

    # No comment from the pull-request run (a fork's token is read-only), and never --edit-last.
    assert "--edit-last" not in text and "gh pr comment" not in text
    assert "mikepenz/action-junit-report" not in text  # needs checks: write: done by the workflow_run file


def test_github_comment_workflow_is_fork_safe():
    wf = _workflow(GITHUB_COMMENT)
    assert wf["on"] == {"workflow_run": {"workflows": [_workflow(GITHUB)["name"]], "types": ["completed"]}}
    assert wf["permissions"] == {}
    (job,) = wf["jobs"].values()
    assert "workflow_run.event == 'pull_request'" in job["if"] and isinstance(job["timeout-minutes"], int)
    assert job["permissions"] == {"actions": "read", "checks": "write", "pull-requests": "write"}
    assert not _steps(job, "actions/checkout"), "never check out (or run) the pull request's code with write access"
    (dl,) = _steps(job, "actions/download-artifact")
    assert dl["with"]["run-id"] == "${{ github.event.workflow_run.id }}"
    (junit,) = _steps(job, "mikepenz/action-junit-report")
    assert junit["with"]["commit"] == "${{ github.event.workflow_run.head_sha }}"
    script = _step(job, "Comment on the pull request")["run"]
    assert "--edit-last" not in script and "<!-- edgekit-gate -->" in script and "github-actions[bot]" in script


# ---- GitHub: the baseline download, run in bash against a stand-in gh -----------------------------------

FAKE_GH = r'''#!{python}
"""Stands in for GitHub's CLI (GitHub is not reachable from the tests): answers from $FAKE_GH_DIR.
`gh api PATH --jq FILTER` applies the real jq to releases.json (or fails as api_error says);
`gh release download TAG --pattern P... --dir D` copies the matching files of assets/TAG/."""
import fnmatch, os, shutil, subprocess, sys
d = os.environ["FAKE_GH_DIR"]
args = sys.argv[1:]
if args[0] == "api":
    err = os.path.join(d, "api_error")
    if os.path.exists(err):
        sys.stderr.write(open(err).read()); sys.exit(1)
    jq = args[args.index("--jq") + 1]
    sys.exit(subprocess.run(["jq", "-r", jq, os.path.join(d, "releases.json")]).returncode)
if args[:2] == ["release", "download"]:
    tag, out = args[2], args[args.index("--dir") + 1]
    pats = [args[i + 1] for i, a in enumerate(args) if a == "--pattern"]
    src = os.path.join(d, "assets", tag)
    hits = [f for f in (os.listdir(src) if os.path.isdir(src) else []) if any(fnmatch.fnmatch(f, p) for p in pats)]
    if not hits:
        sys.stderr.write("no assets match the file pattern\n"); sys.exit(1)
    os.makedirs(out, exist_ok=True)
    for f in hits:
        shutil.copy(os.path.join(src, f), os.path.join(out, f))
    sys.exit(0)
sys.stderr.write(f"unexpected gh call: {args}\n"); sys.exit(2)
'''


def _run_baseline_step(tmp_path: Path, releases: list | None, assets: dict[str, list[str]] | None = None,
                       api_error: str | None = None) -> tuple[subprocess.CompletedProcess, str]:
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (apt-get install jq): the stand-in gh applies the step's real jq filter")
    gate = _workflow(GITHUB)["jobs"]["gate"]
    script = _step(gate, "Download the last release (the baseline)")["run"]
    fake, work = tmp_path / "gh-data", tmp_path / "work"
    (tmp_path / "bin").mkdir()
    work.mkdir()
    fake.mkdir()
    gh = tmp_path / "bin" / "gh"
    gh.write_text(FAKE_GH.replace("{python}", sys.executable))
    gh.chmod(0o755)
    (fake / "releases.json").write_text(json.dumps(releases or []))
    if api_error:
        (fake / "api_error").write_text(api_error)
    for tag, files in (assets or {}).items():
        (fake / "assets" / tag).mkdir(parents=True)
        for f in files:
            (fake / "assets" / tag / f).write_text("{}")
    out = tmp_path / "github_output"
    out.write_text("")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_GH_DIR": str(fake),
           "GITHUB_OUTPUT": str(out), "GITHUB_REPOSITORY": "owner/repo"}
    r = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    return r, out.read_text()


RELEASES = [{"tag_name": "v2.0", "draft": False}, {"tag_name": "model-41", "draft": True},
            {"tag_name": "model-40", "draft": False}, {"tag_name": "model-39", "draft": False}]


def test_github_baseline_first_run_is_a_warning_not_a_failure(tmp_path):
    r, out = _run_baseline_step(tmp_path, releases=[{"tag_name": "v2.0", "draft": False}])
    assert r.returncode == 0, r.stderr
    assert "::warning::No model release yet" in r.stdout and "found=false" in out


def test_github_baseline_is_the_newest_published_model_release(tmp_path):
    r, out = _run_baseline_step(tmp_path, RELEASES, {"model-40": ["manifest.json", "model.tar.gz", "x.txt"]})
    assert r.returncode == 0, r.stderr
    assert "found=true" in out
    assert sorted(p.name for p in (tmp_path / "work" / "baseline").iterdir()) == ["manifest.json", "model.tar.gz"]


@pytest.mark.parametrize("case", ["forbidden", "network", "no manifest", "no assets"])
def test_github_baseline_failures_fail_the_job(case, tmp_path):
    kw = {
        "forbidden": dict(releases=RELEASES, api_error="HTTP 403: Resource not accessible by integration\n"),
        "network": dict(releases=RELEASES, api_error="error connecting to api.github.com\n"),
        "no manifest": dict(releases=RELEASES, assets={"model-40": ["model.tar.gz"]}),
        "no assets": dict(releases=RELEASES, assets={}),
    }[case]
    r, out = _run_baseline_step(tmp_path, **kw)
    assert r.returncode != 0, r.stdout
    assert "found=" not in out  # neither path is taken: the gate step does not run
    if case == "no manifest":
        assert "has no manifest.json asset" in r.stdout


# ---- GitLab: the pipeline, for real, with gitlab-ci-local -------------------------------------------------


class FakeGitLab:
    """A local HTTP server standing in for GitLab's REST API (no GitLab here): /projects/:id/releases and
    the generic package files, each answer set by the test. Records every request and its JOB-TOKEN."""

    def __init__(self):
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("JOB-TOKEN")))
                path = self.path.split("?")[0]
                route = next((v for k, v in outer.routes.items() if path.endswith(k)), None)
                status, headers, body = route or (404, {"Content-Type": "application/json"}, b'{"message":"404"}')
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/v4"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def releases(self, releases: list) -> None:
        self.routes["/releases"] = (200, {"Content-Type": "application/json"}, json.dumps(releases).encode())

    def file(self, suffix: str, data: bytes) -> None:
        self.routes[suffix] = (200, {"Content-Type": "application/octet-stream"}, data)

    def publish(self, iid: int, dist: Path, files=("model.tar.gz", "manifest.json")) -> None:
        """A release as the example's bundle + release jobs make it: package files and asset links."""
        links = []
        for name in files:
            suffix = f"/packages/generic/model/{iid}/{name}"
            src = dist / name if name.endswith(".tar.gz") else dist / "model" / name
            self.file(suffix, src.read_bytes())
            links.append({"name": name, "url": f"{self.url}/projects/1217{suffix}", "link_type": "package"})
        self.releases([{"tag_name": "v9", "assets": {"links": []}},
                       {"tag_name": f"model-{iid}", "assets": {"links": links}}])

    def close(self):
        self.server.shutdown()


def _gitlab_ci_local() -> str:
    exe = shutil.which("gitlab-ci-local")
    if exe is None:
        pytest.skip(f"gitlab-ci-local is not installed (npm install -g gitlab-ci-local@{GITLAB_CI_LOCAL_VERSION})")
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (apt-get install rsync): gitlab-ci-local needs it")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    return exe


def _make_repo(folder: Path, ckpt: Path, data_dir: Path) -> Path:
    """A project as a user would set it up: the example recipe and pipeline, a model, its eval data."""
    folder.mkdir()
    shutil.copytree(ckpt, folder / "models" / "sentiment-bert")
    (folder / "data").mkdir()
    shutil.copy(data_dir / "eval.tsv", folder / "data" / "dev.tsv")
    recipe = yaml.safe_load((ROOT / "examples" / "edgekit.yaml").read_text())
    assert recipe["checkpoint"] == "models/sentiment-bert" and recipe["data"]["eval"] == "data/dev.tsv"
    recipe["bench"] = None  # the gate re-times both models itself (--rebench); this keeps the test short
    recipe["devices"] = ["x86-cpu"]
    (folder / "edgekit.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    shutil.copy(GITLAB, folder / ".gitlab-ci.yml")
    (folder / ".gitignore").write_text(".gitlab-ci-local/\n")
    _git(folder, "init", "-q", "-b", "main")
    _git(folder, "add", "-A")
    _git(folder, "commit", "-q", "-m", "model")
    return folder


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=folder, check=True,
                   capture_output=True, timeout=60)


def _pipeline(repo: Path, api: FakeGitLab, *jobs: str) -> subprocess.CompletedProcess:
    """A merge-request pipeline (or the named jobs of one) on the shell executor, with the checkout's own
    edgekit (EDGEKIT_INSTALL overridden) and the stand-in API."""
    for f in ("gate.xml", "gate.md"):
        (repo / f).unlink(missing_ok=True)
    shutil.rmtree(repo / "baseline", ignore_errors=True)
    variables = {
        "CI_PIPELINE_SOURCE": "merge_request_event", "CI_MERGE_REQUEST_IID": "7", "CI_DEFAULT_BRANCH": "main",
        "CI_API_V4_URL": api.url, "CI_JOB_TOKEN": "job-token-123", "GITLAB_CI": "true",
        "EDGEKIT_INSTALL": "edgekit --version",
        # Latency is left out here: this machine is shared by parallel test runs, and the gate rightly
        # refuses to judge (and, with --require latency, fails) a rebench whose spread is that large.
        # The rebench itself is tested in the gate's own tests; here the pipeline's wiring is.
        "EDGEKIT_GATE_OPTIONS": "--require accuracy,size --no-rebench --max-accuracy-drop 0.5 --max-size-growth 5%",
    }
    cmd = [_gitlab_ci_local(), "--home", str(repo.parent / "gcl-home"), "--unset-variable", "CI_COMMIT_BRANCH",
           "--max-job-name-padding", "0", *jobs]
    for k, v in variables.items():
        cmd += ["--variable", f"{k}={v}"]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1200)


def _log(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr


def _junit_cases(path: Path) -> dict[str, str]:
    """JUnit test case name -> pass / fail / skipped."""
    import xml.etree.ElementTree as ET

    out = {}
    for case in ET.parse(path).iter("testcase"):
        kids = {c.tag for c in case}
        out[case.get("name")] = "fail" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "pass"
    return out


@pytest.fixture(scope="module")
def gitlab(text_ckpt, data_dir, tmp_path_factory):
    """The first pipeline of a new project (no release yet), then its run bundled as the release model-40."""
    _gitlab_ci_local()
    root = tmp_path_factory.mktemp("gitlab")
    repo = _make_repo(root / "project", text_ckpt, data_dir)
    api = FakeGitLab()
    api.releases([])
    first = _pipeline(repo, api)
    dist = root / "dist"
    if first.returncode == 0:
        run_cli("release", "build", repo / "run", "-o", dist, "--name", "model")
    yield repo, api, first, dist
    api.close()


def test_gitlab_first_run_passes_with_a_warning_and_skipped_checks(gitlab):
    repo, api, first, _ = gitlab
    log = _log(first)
    assert first.returncode == 0, log
    assert "PASS" in log and "compress" in log and "gate" in log
    assert "no model release yet" in log and "section_start:" in log  # GitLab's collapsible warning section
    cases = _junit_cases(repo / "gate.xml")
    assert len(cases) >= 3 and set(cases.values()) == {"skipped"}, cases
    (path, token), = [q for q in api.requests if "/releases" in q[0]]
    assert "per_page=100" in path and token == "job-token-123"


def test_gitlab_merge_request_gate_passes_against_the_release(gitlab):
    repo, api, first, dist = gitlab
    assert first.returncode == 0, _log(first)
    api.publish(40, dist)
    api.requests.clear()
    r = _pipeline(repo, api, "gate")
    log = _log(r)
    assert r.returncode == 0, log
    assert "baseline: release model-40" in log and "edgekit gate: PASSED" in log
    cases = _junit_cases(repo / "gate.xml")
    assert cases["accuracy"] == cases["INT8 model size"] == "pass", cases
    assert "fail" not in cases.values()
    assert [p.split("/")[-1] for p, _ in api.requests] == ["releases?per_page=100", "model.tar.gz", "manifest.json"]
    assert {t for _, t in api.requests} == {"job-token-123"}


@pytest.mark.parametrize("case", ["sign-in redirect", "sign-in page", "forbidden", "no manifest link"])
def test_gitlab_baseline_fetch_failures_fail_the_job(case, gitlab):
    repo, api, first, dist = gitlab
    assert first.returncode == 0, _log(first)
    api.publish(40, dist)
    html = (b"<html><body>You need to sign in</body></html>")
    if case == "sign-in redirect":  # what the /-/releases/permalink URL does on a private project
        api.routes["/packages/generic/model/40/model.tar.gz"] = (302, {"Location": "http://127.0.0.1/users/sign_in",
                                                                     "Content-Type": "text/html"}, html)
    elif case == "sign-in page":
        api.routes["/releases"] = (200, {"Content-Type": "text/html; charset=utf-8"}, html)
    elif case == "forbidden":
        api.routes["/releases"] = (403, {"Content-Type": "application/json"}, b'{"message":"403 Forbidden"}')
    else:
        api.publish(40, dist, files=("model.tar.gz",))
    r = _pipeline(repo, api, "gate")
    log = _log(r)
    assert r.returncode != 0, log
    assert "FAIL" in log and "edgekit gate:" not in log  # stopped before the gate: no verdict pretended
    want = {"sign-in redirect": "answered '302 text/html", "sign-in page": "answered '200 text/html",
            "forbidden": "failed", "no manifest link": "no model.tar.gz or manifest.json asset link"}[case]
    assert want in log, log


def test_gitlab_job_fails_when_the_gate_fails(gitlab, data_dir, tmp_path):
    """A merge request that ships a worse model: compress passes (INT8 matches its own original), the gate
    against the release fails, and so does the pipeline."""
    repo, api, first, dist = gitlab
    assert first.returncode == 0, _log(first)
    worse = damaged_copy(repo / "models" / "sentiment-bert", tmp_path / "worse")
    mr = _make_repo(tmp_path / "mr", worse, data_dir)
    api.publish(40, dist)
    r = _pipeline(mr, api)
    log = _log(r)
    assert r.returncode != 0, log
    assert "PASS  compress" in log and "FAIL  gate" in log, log
    assert "edgekit gate: FAILED" in log
    cases = _junit_cases(mr / "gate.xml")
    assert cases["accuracy"] == "fail" and cases["INT8 model size"] == "pass", cases
