"""``edgekit bench --device jetson`` and ``edgekit devices``.

Runs here: the refusals (no Jetson, no --host; a model that cannot fit, before anything is copied), the
Jetson bench loop with a stand-in tegrastats and /proc/meminfo, clock locking with stand-in nvpmodel and
jetson_clocks, and the SSH path against the real OpenSSH server of test_devices_remote.py (the "device"
is this machine, benchmarking on its CPU). The bench on a real Jetson is marked ``jetson``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from helpers import assert_user_error, run_cli
from test_devices_remote import sshd  # noqa: F401 - the real sshd on 127.0.0.1 (module-scoped fixture)
from tiny_onnx import tiny_classifier

from edgekit.benchmarks.bench import BenchConfig
from edgekit.benchmarks.targets import TargetConfig, bench_on_target, resolve_target
from edgekit.devices.detect import JetsonInfo, detect_jetson
from edgekit.errors import EdgekitError

FAST = ["--seq-len", "16", "--iterations", "3", "--min-seconds", "0", "--warmup", "1"]
LINE = ("RAM 2000/7620MB (lfb 1x2MB) SWAP 0/3810MB (cached 0MB) CPU [10%@1510,20%@1510,off] EMC_FREQ 3%@2133 "
        "GR3D_FREQ 40%@[918] cpu@50C gpu@48.5C VDD_IN 5000mW/5000mW VDD_CPU_GPU_CV 1000mW/1000mW VDD_SOC 1500mW/1500mW")


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_devices_lists_every_profile():
    d = json.loads(run_cli("devices", "--json").stdout)
    names = [p["name"] for p in d["profiles"]]
    assert len(names) == 11 and "jetson-orin-nano-4gb" in names and "x86-cpu" in names
    nano = next(p for p in d["profiles"] if p["name"] == "jetson-orin-nano-4gb")
    assert nano["memory_gb"] == 4 and nano["kind"] == "jetson" and nano["power_modes"]
    table = run_cli("devices").stdout
    assert "jetson-agx-orin-64gb" in table and "MAXN" in table


def test_targets_resolve_profiles_and_kinds():
    assert resolve_target("cpu").kind == "cpu" and resolve_target("jetson").profile is None
    nano = resolve_target("jetson-orin-nano-8gb")
    assert nano.kind == "jetson" and nano.profile.memory_gb == 8
    assert resolve_target("cuda-gpu").kind == "cuda"
    with pytest.raises(EdgekitError, match="unknown device 'orin'.*jetson-thor"):
        resolve_target("orin")


@pytest.mark.skipif(detect_jetson() is not None, reason="this machine is a Jetson")
def test_jetson_without_a_jetson_or_host_exits_2(tmp_path):
    onnx = tiny_classifier(tmp_path / "tiny")
    r = run_cli("bench", onnx, "--device", "jetson", *FAST, expect=None)
    assert_user_error(r, "this machine is not a Jetson", "--host user@address")
    r = run_cli("bench", onnx, "--device", "jetson-orin-nano-8gb", *FAST, expect=None)  # fits, then the same refusal
    assert_user_error(r, "not a Jetson")
    assert_user_error(run_cli("bench", onnx, "--lock-clocks", expect=None), "Jetson options")


def test_a_model_that_cannot_fit_is_refused_before_anything_is_copied(tmp_path):
    onnx = tiny_classifier(tmp_path / "tiny")
    nobody = f"root@127.0.0.1:{_free_port()}"  # nothing listens: reaching it would be a different error
    r = run_cli("bench", onnx, "--device", "jetson-orin-nano-4gb", "--memory-budget", "1.5", "--host", nobody,
                "--key", tmp_path / "no-key", expect=None)
    line = assert_user_error(r, "jetson-orin-nano-4gb has about 0.5 GiB usable", "make the model smaller")
    assert "cannot reach" not in line
    with pytest.raises(EdgekitError, match="jetson-orin-nano-4gb"):  # the Python API, with no host at all
        bench_on_target([onnx], BenchConfig(), TargetConfig(device="jetson-orin-nano-4gb", memory_budget_gb=1.5))
    assert_user_error(run_cli("bench", onnx, "--device", "jetson", "--memory-budget", "2", expect=None),
                      "--memory-budget applies to a device profile")


def test_remote_bench_over_real_ssh(sshd, tmp_path):  # noqa: F811
    onnx = tiny_classifier(tmp_path / "tiny")
    ssh = ["--host", f"{sshd.user}@127.0.0.1:{sshd.port}", "--key", sshd.key, "--known-hosts", sshd.known_hosts]
    # The "Jetson" is this machine: benchmark on its CPU cores with onnxruntime (no TensorRT here).
    r = run_cli("bench", onnx, "--device", "jetson", *ssh, "--remote-python", sys.executable, "--compute", "cpu",
                "--runtime", "onnxruntime", *FAST, "--json")
    report = json.loads(r.stdout)
    v = report["variants"][0]
    assert v["runtime"] == "onnxruntime" and v["latency"]["iterations"] >= 3
    assert report["inputs"]["seq_len"] == 16 and report["environment"]["device"] == "cpu"
    assert report["remote"]["bench_args"][-4:] == ["--device", "cpu", "--runtime", "onnxruntime"]
    assert report["remote"]["host"].endswith(f"127.0.0.1:{sshd.port}")
    r = run_cli("bench", onnx, "--device", "jetson", *ssh, "--remote-python", "/nonexistent/python3", "--compute",
                "cpu", *FAST, expect=None)
    assert_user_error(r, "pip install 'edgekit-transformers[jetson]'")


def test_remote_bench_with_real_lengths(sshd, onnx_dir, tmp_path):  # noqa: F811
    """--data over SSH: the data file travels with the artifact and the device tokenizes it."""
    data = tmp_path / "lengths.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{' '.join(['good'] * n)}\t0\n" for n in (3, 5, 9)), encoding="utf-8")
    r = run_cli("bench", onnx_dir, "--device", "jetson", "--host", f"{sshd.user}@127.0.0.1:{sshd.port}", "--key", sshd.key,
                "--known-hosts", sshd.known_hosts, "--remote-python", sys.executable, "--compute", "cpu", "--runtime",
                "onnxruntime", "--data", data, "--samples", "3", "--iterations", "3", "--min-seconds", "0", "--warmup",
                "1", "--json")
    report = json.loads(r.stdout)
    assert "3 real examples from lengths.tsv" in report["inputs"]["description"], report["inputs"]
    assert report["inputs"]["data"] != str(data)  # the device read its own copy
    assert_user_error(run_cli("bench", onnx_dir, "--device", "jetson", "--host", f"{sshd.user}@127.0.0.1:{sshd.port}",
                              "--key", sshd.key, "--known-hosts", sshd.known_hosts, "--data", tmp_path / "nope.tsv",
                              expect=None), "nope.tsv")


def test_remote_args_follow_the_target():
    from edgekit.benchmarks.jetson import remote_bench_args

    cfg = BenchConfig(iterations=50, min_seconds=2, warmup=5, batch_size=4, seq_len=64, threads=16)
    gpu = remote_bench_args(cfg, TargetConfig(device="jetson", lock_clocks=True, power_mode=0), resolve_target("jetson"))
    assert gpu[gpu.index("--device") + 1] == "jetson" and "tensorrt" in gpu and "--lock-clocks" in gpu
    assert "--threads" not in gpu  # this machine's core count means nothing on the device
    cuda = remote_bench_args(cfg, TargetConfig(device="cuda-gpu", threads_given=8), resolve_target("cuda-gpu"))
    assert cuda[-2:] == ["--device", "cuda"] and "8" in cuda
    real = remote_bench_args(BenchConfig(data="eval.tsv", text_column="sentence", samples=7), TargetConfig(device="jetson"),
                             resolve_target("jetson"))
    assert real[real.index("--samples") + 1] == "7" and real[real.index("--text-column") + 1] == "sentence"
    assert "eval.tsv" not in real  # the local path means nothing there: bench_remote copies the file
    assert "--trust-remote-code" not in real  # opt-in: sent only when given here
    for device in ("jetson", "cuda-gpu"):
        trusted = remote_bench_args(BenchConfig(trust_remote_code=True), TargetConfig(device=device, compute="cpu"),
                                    resolve_target(device))
        assert "--trust-remote-code" in trusted


SAMPLES = Path("/work/shared/data/jetson/tegrastats-samples.txt")


def _real_lines(*headers: str) -> list[str]:
    """The sample line under each '## <header>' of the shared file of real tegrastats output."""
    lines = SAMPLES.read_text().splitlines()
    return [lines[lines.index(next(h for h in lines if h.startswith(f"## {header}"))) + 1] for header in headers]


@pytest.mark.skipif(not SAMPLES.is_file(), reason="needs the shared real tegrastats samples")
def test_jetson_bench_samples_tegrastats_during_the_timed_loop(tmp_path):
    """A stand-in tegrastats prints real, differing lines (Orin short form, Thor without GPU load, Xavier NX
    with rails) and raises NvMap while it runs: peaks, means, clock ranges and the NvMap delta are exact."""
    from edgekit.benchmarks.jetson import bench_jetson

    onnx = tiny_classifier(tmp_path / "tiny")
    lines = _real_lines("orin jetpack-6", "thor", "xavier-nx")
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    meminfo = tmp_path / "meminfo"
    idle, busy = "MemTotal:  7800000 kB\nNvMapMemUsed:   102400 kB\n", "MemTotal:  7800000 kB\nNvMapMemUsed:   167936 kB\n"
    meminfo.write_text(idle)
    # NvMap rises to 164 MB while the variant runs and falls back to 100 MB when tegrastats is stopped
    fake = _script(tmp_path / "tegrastats", f"""
printf '{busy}' > {meminfo}.tmp && mv {meminfo}.tmp {meminfo}
trap 'kill $pid; printf "{idle}" > {meminfo}.tmp && mv {meminfo}.tmp {meminfo}; exit 0' TERM
cat {tmp_path / "lines.txt"}
sleep 60 & pid=$!
wait
""")
    info = JetsonInfo(model="NVIDIA Jetson Orin Nano Developer Kit", l4t="36.4.3", jetpack="6.2",
                      profile="jetson-orin-nano-8gb")
    cfg = BenchConfig(iterations=20, min_seconds=0.4, warmup=1, seq_len=16, threads=1)
    tcfg = TargetConfig(device="jetson", compute="cpu", runtime="onnxruntime", tegrastats=str(fake), interval_ms=50)
    report = bench_jetson([onnx, onnx], cfg, tcfg, jetson=info, meminfo=str(meminfo)).to_dict()
    assert len(report["variants"]) == 2
    # expected figures, read off the three lines by hand
    ram = [4722, 4722, 2690]  # "RAM 4722/7844MB", "RAM 4722/7844MB", "RAM 2690/6854MB"
    for v in report["variants"]:
        js = v["device"]["jetson"]
        ts = js["tegrastats"]
        assert ts["n_samples"] == 3 and ts["n_inferences"] == v["latency"]["iterations"]
        assert ts["ram_peak_mb"] == max(ram) and ts["ram_mean_mb"] == pytest.approx(sum(ram) / 3)
        assert ts["gr3d_mean_load_pct"] == pytest.approx(5.0)  # 10% and 0%; Thor prints no load: not a 0
        assert ts["module_power_mean_mw"] == 5079  # only Xavier NX prints rails: VDD_IN, the module input
        assert ts["energy_per_inference_mj"] == pytest.approx(5079 * ts["wall_seconds"] / ts["n_inferences"])
        # GR3D 1300 / [1000,1000,1000] / [510]; EMC 1866 / 1866 / 1600; CPU cores 1904..1907 (two off)
        assert js["clocks"] == {"gpu_mhz": [510, 1300], "emc_mhz": [1600, 1866], "cpu_mhz": [1904, 1907]}
        assert js["nvmap_before_mb"] == 100 and js["nvmap_peak_mb"] == 164 and js["nvmap_model_mb"] == 64
    env = report["environment"]
    assert env["device"] == "jetson (CPU cores)" and env["jetson"]["jetpack"] == "6.2"
    assert env["jetson"]["clocks_locked"] is False and "timed alone" in report["method"]
    with pytest.raises(EdgekitError, match="is a jetson-orin-nano-8gb, not a jetson-orin-nano-4gb"):
        from edgekit.devices.profiles import get_profile

        bench_jetson([onnx], cfg, tcfg, jetson=info, profile=get_profile("jetson-orin-nano-4gb"))


# Mirrors NVIDIA's jetson_clocks shell script in L4T (/usr/bin/jetson_clocks): it refuses to run unless root
# ("Error: Run this script(...) as a root user" on stdout, exit 1); --store asks "File ... already exists.
# Can I overwrite it? Y/N" before overwriting and exits 1 when stdin gives no answer; --restore needs the
# stored file. FAKE_EUID stands in for the effective uid, so a test decides who runs it (the fake sudo sets 0).
FAKE_JETSON_CLOCKS = """echo "jetson_clocks $*" >> {log}
if [ "${{FAKE_EUID:-$(id -u)}}" -ne 0 ]; then echo "Error: Run this script($0) as a root user"; exit 1; fi
if [ "$1" = --store ]; then
    if [ -e "$2" ]; then echo "File $2 already exists. Can I overwrite it? Y/N"; read answer || exit 1; fi
    echo "stored clocks" > "$2"
fi
if [ "$1" = --restore ] && [ ! -s "$2" ]; then echo "$2 not found" >&2; exit 1; fi
exit 0
"""

# Mirrors L4T's nvpmodel as its output shows it (and as jetson_stats' jtop nvpmodel.py reads it): -q prints
# "NV Power Mode: NAME" then the id; -m N switches live, except a mode that changes the online CPU cores or
# GPU partitions: there it prints "NVPM WARN: Reboot required for changing to this power mode: N", asks "DO
# YOU WANT TO REBOOT NOW? enter YES/yes to confirm:" on stdin and, declined or at EOF, prints "NVPM ERROR:
# optMask is 1, no request for power mode" without switching; the fake exits 0 there, the case jtop guards
# against by looking for "NVPM ERROR" instead of the exit code. Mode {ignored} stands for an -m that reports
# nothing and is not applied (another process putting the mode back), which only re-querying -q can catch.
FAKE_NVPMODEL = """echo "nvpmodel $*" >> {log}
[ -s {state} ] || echo 0 > {state}
name() {{ case "$1" in 0) echo 15W;; 1) echo 7W;; 2) echo MAXN;; *) echo MODE_$1;; esac; }}
if [ "$1" = -q ]; then echo "NV Power Mode: $(name $(cat {state}))"; cat {state}; exit 0; fi
if [ "$1" = -m ]; then
    if [ "$2" = {reboot} ]; then
        echo "NVPM WARN: Reboot required for changing to this power mode: $2"
        echo "NVPM WARN: DO YOU WANT TO REBOOT NOW? enter YES/yes to confirm:"
        if read answer && {{ [ "$answer" = YES ] || [ "$answer" = yes ]; }}; then
            echo "NVPM WARN: rebooting"; echo REBOOTED >> {log}; exit 0
        fi
        echo "NVPM ERROR: optMask is 1, no request for power mode"; exit 0
    fi
    [ "$2" = {ignored} ] || echo "$2" > {state}
fi
exit 0
"""

# Mirrors sudo(8) with -n (non-interactive): where the sudoers entry is NOPASSWD it runs the command as root;
# where a password would be needed it prints "sudo: a password is required" and exits 1, running nothing.
FAKE_SUDO = """echo "sudo $*" >> {log}
[ "$1" = -n ] || {{ echo "usage: this fake only models sudo -n" >&2; exit 1; }}
shift
if [ -n "$FAKE_SUDO_NEEDS_PASSWORD" ]; then echo "sudo: a password is required" >&2; exit 1; fi
FAKE_EUID=0 exec "$@"
"""


@pytest.fixture()
def board(tmp_path, monkeypatch):
    """Fake nvpmodel, jetson_clocks and sudo on PATH, edgekit running as root, the stored clocks in tmp/."""
    import tempfile
    from types import SimpleNamespace

    b = SimpleNamespace(bin=tmp_path / "bin", temp=tmp_path / "tmp", log=tmp_path / "calls", sudo_log=tmp_path / "sudo",
                        state=tmp_path / "mode")
    b.bin.mkdir()
    b.temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(b.temp))  # where ClockLock keeps the stored clocks
    b.nvpmodel = _script(b.bin / "nvpmodel", FAKE_NVPMODEL.format(log=b.log, state=b.state, reboot=1, ignored=3))
    b.clocks = _script(b.bin / "jetson_clocks", FAKE_JETSON_CLOCKS.format(log=b.log))
    _script(b.bin / "sudo", FAKE_SUDO.format(log=b.sudo_log))
    monkeypatch.setenv("PATH", f"{b.bin}:{os.environ['PATH']}")
    b.as_user = lambda uid: (monkeypatch.setenv("FAKE_EUID", str(uid)),
                             monkeypatch.setattr("edgekit.benchmarks.jetson.os.geteuid", lambda: uid))
    b.as_user(0)
    b.calls = lambda: [c.split(" /")[0].strip() for c in b.log.read_text().splitlines()] if b.log.exists() else []
    return b


def test_clock_lock_sets_and_restores(board):
    from edgekit.benchmarks.jetson import ClockLock

    with pytest.raises(RuntimeError, match="boom"):
        with ClockLock(power_mode=2, nvpmodel=str(board.nvpmodel), jetson_clocks=str(board.clocks)) as lock:
            assert len(list(board.temp.rglob("*.conf"))) == 1  # the clocks were really stored
            assert (lock.active.id, lock.active.name) == (2, "MAXN")  # re-queried, not assumed
            raise RuntimeError("boom")  # the clocks are put back even when the run fails
    assert board.calls() == ["nvpmodel -q", "jetson_clocks --store", "nvpmodel -m 2", "nvpmodel -q", "jetson_clocks",
                             "nvpmodel -m 0", "jetson_clocks --restore"]
    assert board.state.read_text().strip() == "0" and not board.sudo_log.exists()  # root: no sudo
    with ClockLock(nvpmodel=str(board.nvpmodel), jetson_clocks=str(board.clocks)) as lock:
        assert lock.active.id == 0
    assert list(board.temp.iterdir()) == []  # no store file, no folder: after success and failure alike


def test_clock_lock_blames_root_only_when_root_is_the_cause(board):
    from edgekit.benchmarks.jetson import ClockLock

    board.as_user(1000)
    board.bin.joinpath("sudo").unlink()  # not root and no sudo: jetson_clocks' own refusal
    with pytest.raises(EdgekitError, match=r"exit code 1: Error: Run this script.*as a root user; .*needs root"):
        with ClockLock(nvpmodel=str(board.nvpmodel), jetson_clocks=str(board.clocks)):
            pass
    board.as_user(0)
    broken = _script(board.bin / "broken_clocks",
                     'echo "starting"; echo "cannot open /sys/kernel/debug/bpmp: No such file" >&2; exit 1\n')
    with pytest.raises(EdgekitError, match=r"exit code 1: cannot open /sys/kernel/debug/bpmp.*by hand") as err:
        with ClockLock(nvpmodel=str(board.nvpmodel), jetson_clocks=str(broken)):
            pass
    assert "needs root" not in str(err.value)  # not a permission problem: root is not blamed
    assert list(board.temp.iterdir()) == []


def test_store_file_is_never_pre_created(board, monkeypatch):
    import tempfile

    from edgekit.benchmarks.jetson import ClockLock

    # A store path that already exists makes the real jetson_clocks ask and exit 1 on EOF.
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    with ClockLock(nvpmodel=str(board.nvpmodel), jetson_clocks=str(board.clocks)):
        assert "already exists" not in board.log.read_text()
    assert made and not Path(made[0]).exists() and "Can I overwrite" not in board.log.read_text()


def test_power_mode_needing_a_reboot_is_refused_not_answered(board):
    from edgekit.benchmarks.jetson import ClockLock

    with pytest.raises(EdgekitError, match=r"mode 1 only takes effect after a reboot.*sudo nvpmodel -m 1', reboot"):
        with ClockLock(power_mode=1, nvpmodel=str(board.nvpmodel), jetson_clocks=str(board.clocks)):
            pass
    assert "REBOOTED" not in board.log.read_text() and board.state.read_text().strip() == "0"
    assert board.calls()[-1] == "jetson_clocks --restore" and list(board.temp.iterdir()) == []


def test_nvpm_error_with_exit_0_is_a_failure(board):
    from edgekit.benchmarks.jetson import _run_tool
    from edgekit.devices.detect import query_nvpmodel

    erring = _script(board.bin / "erring_nvpmodel", 'echo "NVPM ERROR: Error opening /etc/nvpmodel.conf"; exit 0\n')
    with pytest.raises(EdgekitError, match="NVPM ERROR: Error opening"):
        _run_tool([str(erring), "-m", "0"])
    assert query_nvpmodel(str(erring)) is None


def test_power_mode_not_applied_is_refused(board):
    from edgekit.benchmarks.jetson import ClockLock

    with pytest.raises(EdgekitError, match=r"asked nvpmodel for power mode 3 but 'nvpmodel -q' reports mode 0 \(15W\)"):
        with ClockLock(power_mode=3, nvpmodel=str(board.nvpmodel), jetson_clocks=str(board.clocks)):
            pass
    assert board.calls()[-1] == "jetson_clocks --restore"


def test_not_root_goes_through_sudo_n(board, monkeypatch):
    from edgekit.benchmarks.jetson import ClockLock

    board.as_user(1000)
    with ClockLock(power_mode=2, nvpmodel=str(board.nvpmodel), jetson_clocks=str(board.clocks)) as lock:
        assert lock.active.id == 2
    sudo = [c.split()[:2] + [Path(c.split()[2]).name] + c.split()[3:] for c in board.sudo_log.read_text().splitlines()]
    assert sudo == [["sudo", "-n", "jetson_clocks", "--store", sudo[0][4]], ["sudo", "-n", "nvpmodel", "-m", "2"],
                    ["sudo", "-n", "jetson_clocks"], ["sudo", "-n", "nvpmodel", "-m", "0"],
                    ["sudo", "-n", "jetson_clocks", "--restore", sudo[0][4]]]
    monkeypatch.setenv("FAKE_SUDO_NEEDS_PASSWORD", "1")
    with pytest.raises(EdgekitError) as err:
        with ClockLock(nvpmodel=str(board.nvpmodel), jetson_clocks=str(board.clocks)):
            pass
    message = str(err.value)
    assert "sudo asks for a password" in message and "run edgekit as root" in message and "\n" not in message
    assert f"NOPASSWD: {board.nvpmodel}, {board.clocks}" in message  # a sudoers line to paste


def test_jetson_bench_records_the_mode_it_ran_under(board, tmp_path):
    from edgekit.benchmarks.jetson import bench_jetson

    onnx = tiny_classifier(tmp_path / "tiny")
    fake = _script(board.bin / "tegrastats", f'while true; do echo "{LINE}"; sleep 0.02; done\n')
    info = JetsonInfo(model="NVIDIA Jetson Orin Nano Developer Kit", l4t="36.4.3", jetpack="6.2",
                      profile="jetson-orin-nano-8gb")
    cfg = BenchConfig(iterations=5, min_seconds=0.3, warmup=1, seq_len=16, threads=1)
    tcfg = TargetConfig(device="jetson", compute="cpu", runtime="onnxruntime", tegrastats=str(fake), interval_ms=20,
                        lock_clocks=True, power_mode=2)
    env = bench_jetson([onnx], cfg, tcfg, jetson=info, meminfo=str(tmp_path / "none")).to_dict()["environment"]
    assert env["jetson"]["power_mode_observed"] == {"name": "MAXN", "id": 2}  # during the run, not after restore
    assert board.state.read_text().strip() == "0"


@pytest.mark.jetson
@pytest.mark.skipif(detect_jetson() is None or importlib.util.find_spec("tensorrt") is None,
                    reason="needs a Jetson with TensorRT (JetPack 6.1+)")
def test_local_jetson_bench_with_tensorrt(tmp_path):
    onnx = tiny_classifier(tmp_path / "tiny")
    r = run_cli("bench", onnx, "--device", "jetson", "--iterations", "50", "--min-seconds", "1", "--seq-len", "16",
                "--json")
    v = json.loads(r.stdout)["variants"][0]
    assert v["runtime"] == "tensorrt"
    ts = v["device"]["jetson"]["tegrastats"]
    assert ts["n_samples"] > 0 and ts["ram_peak_mb"] > 0
    assert v["device"]["phases"]["compute_ms"]["p50"] > 0
