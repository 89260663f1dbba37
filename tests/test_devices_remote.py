"""RemoteHost against a real OpenSSH server on 127.0.0.1, started for this module with throw-away keys.

The server comes from openssh-server (.ci/install-sshd.sh installs it); without /usr/sbin/sshd these
tests are skipped, with the reason.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgekit.devices.remote import RemoteHost, bench_argv, command_line, run_remote_bench
from edgekit.errors import EdgekitError, MissingExtra

pytest.importorskip("paramiko", reason="paramiko is not installed (pip install 'edgekit-transformers[jetson]')")

SSHD = "/usr/sbin/sshd"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def _account_locked(user: str) -> bool:
    # With UsePAM no (PAM's session modules fail in containers), sshd refuses accounts whose password
    # field starts with '!'; '*' (no password, the usual root entry in images) is fine for keys.
    try:
        for line in Path("/etc/shadow").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == user:
                return rest.startswith("!")
    except OSError:
        pass
    return False


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} is missing: install openssh-server (.ci/install-sshd.sh) to run the SSH tests")
    if not shutil.which("ssh-keygen"):
        pytest.skip("ssh-keygen is missing: install openssh-client to run the SSH tests")
    if not Path("/run/sshd").is_dir():
        if os.geteuid() != 0:
            pytest.skip("/run/sshd is missing and only root can create it (.ci/install-sshd.sh does)")
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    if _account_locked(getpass.getuser()):
        pytest.skip(f"the account '{getpass.getuser()}' is locked ('!' in /etc/shadow): sshd without PAM refuses it")
    d = tmp_path_factory.mktemp("sshd")
    host_key = _keygen(d / "host_ed25519")
    user_key = _keygen(d / "id_ed25519")
    other_key = _keygen(d / "other_ed25519")
    authorized = d / "authorized_keys"
    authorized.write_text((d / "id_ed25519.pub").read_text())
    authorized.chmod(0o600)
    port = _free_port()
    config = d / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {authorized}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PrintMotd no
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, f"sshd rejected the test config: {check.stderr}"
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.05)
    known_hosts = d / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {(d / 'host_ed25519.pub').read_text()}")
    yield SimpleNamespace(port=port, user=getpass.getuser(), key=user_key, other_key=other_key,
                          known_hosts=known_hosts, dir=d)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def host_for(sshd, **options) -> RemoteHost:
    options.setdefault("key_path", sshd.key)
    options.setdefault("known_hosts", sshd.known_hosts)
    return RemoteHost.from_spec(f"{sshd.user}@127.0.0.1:{sshd.port}", timeout=5, **options)


def test_from_spec():
    h = RemoteHost.from_spec("nvidia@orin.local:2222", key_path="~/.ssh/id_ed25519")
    assert (h.user, h.host, h.port, h.key_path) == ("nvidia", "orin.local", 2222, Path.home() / ".ssh/id_ed25519")
    assert RemoteHost.from_spec("nvidia@10.0.0.5").port == 22
    v6 = RemoteHost.from_spec("me@[fe80::1]:2200")
    assert (v6.host, v6.port, v6.target) == ("fe80::1", 2200, "me@[fe80::1]:2200")
    assert RemoteHost.from_spec("orin").user == getpass.getuser()
    for bad in ("nvidia@orin:ssh", "nvidia@orin:0", "@orin", "nvidia@", "nvidia@[::1]x"):
        with pytest.raises(EdgekitError, match="user@host"):
            RemoteHost.from_spec(bad)


def test_paramiko_is_imported_only_when_connecting(monkeypatch):
    code = ("import sys, edgekit.devices.remote, edgekit.devices.detect, edgekit.devices.tegrastats; "
            "assert 'paramiko' not in sys.modules, 'paramiko imported at module import'")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    monkeypatch.setitem(sys.modules, "paramiko", None)  # as if it were not installed
    with pytest.raises(MissingExtra, match=r"edgekit-transformers\[jetson\]"):
        RemoteHost.from_spec("nvidia@orin").connect()


def test_command_line_quotes_every_argument():
    assert command_line(["echo", "a b", "it's"]) == "echo 'a b' 'it'\"'\"'s'"
    assert command_line(["ls"], cwd="/tmp/my dir", env={"A": "x y"}) == "cd '/tmp/my dir' && env 'A=x y' ls"
    with pytest.raises(TypeError):
        command_line("ls -l")  # a string would be split by nobody: refuse it
    with pytest.raises(ValueError):
        command_line(["ls"], env={"A; rm -rf ~": "1"})
    assert bench_argv("/t/model", "/t/r.json", ["--batch", "1"]) == [
        "python3", "-m", "edgekit", "bench", "/t/model", "--json", "/t/r.json", "--batch", "1"]
    assert bench_argv("/t/m", "/t/r.json", python=None)[:2] == ["edgekit", "bench"]


def test_run_keeps_arguments_intact_and_never_executes_them(sshd, tmp_path):
    canary = tmp_path / "pwned"
    tricky = f"a b; touch {canary}"
    with host_for(sshd) as host:
        code, out, err = host.run(["printf", "%s|", tricky, "$(id)", "`id`", "*", "it's"])
        assert (code, out, err) == (0, f"{tricky}|$(id)|`id`|*|it's|", "")
        assert not canary.exists()
        code, out, err = host.run(["sh", "-c", 'echo out; echo err >&2; exit 3'])
        assert (code, out, err) == (3, "out\n", "err\n")
        code, out, _ = host.run(["pwd"], cwd=str(tmp_path), env={"X": "1 2"})
        assert (code, out.strip()) == (0, str(tmp_path))
        assert host.run(["sh", "-c", 'printf "%s" "$X"'], env={"X": "1 2"})[1] == "1 2"
        assert host.run(["no-such-command-edgekit"])[0] == 127


def test_put_and_get_round_trip_a_folder(sshd, tmp_path):
    src = tmp_path / "artifact"
    (src / "sub dir").mkdir(parents=True)
    (src / "model.onnx").write_bytes(bytes(range(256)) * 64)
    (src / "sub dir" / "config.json").write_text('{"a": 1}')
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    remote_dir = str(tmp_path / "remote" / "deep")  # loopback: the "device" shares this file system
    with host_for(sshd) as host:
        remote = host.put(src, remote_dir)
        assert remote == f"{remote_dir}/artifact"
        assert host.run([f"{remote}/run.sh"])[1] == "hi\n"  # the executable bit travelled
        back = host.get(remote, tmp_path / "back")
        single = host.put(src / "model.onnx", remote_dir)
        assert host.get(single, tmp_path) == tmp_path / "model.onnx"
    assert back == tmp_path / "back"
    for f in ("model.onnx", "sub dir/config.json", "run.sh"):
        assert (back / f).read_bytes() == (src / f).read_bytes()
    with pytest.raises(EdgekitError, match="does not exist"):
        host_for(sshd).put(tmp_path / "missing", remote_dir)


def test_unreachable_host_names_host_and_port(sshd):
    port = _free_port()  # nothing listens there
    with pytest.raises(EdgekitError) as err:
        RemoteHost.from_spec(f"{sshd.user}@127.0.0.1:{port}", key_path=sshd.key, timeout=3).connect()
    assert f"127.0.0.1 on port {port}" in str(err.value) and "sshd runs there" in str(err.value)


def test_wrong_key_is_an_authentication_error(sshd):
    with pytest.raises(EdgekitError) as err:
        host_for(sshd, key_path=sshd.other_key).connect()
    message = str(err.value)
    assert str(sshd.other_key) in message and f"user '{sshd.user}'" in message and "authorized_keys" in message
    with pytest.raises(EdgekitError, match="does not exist"):
        host_for(sshd, key_path=sshd.dir / "no_such_key").connect()


def test_unusable_key_files(sshd, tmp_path):
    with pytest.raises(EdgekitError, match=r"not a private key.*not the \.pub one"):
        host_for(sshd, key_path=f"{sshd.key}.pub").connect()
    locked = _keygen(tmp_path / "locked_ed25519", passphrase="secret")
    with pytest.raises(EdgekitError, match="protected by a passphrase"):
        host_for(sshd, key_path=locked).connect()


def test_host_key_problems(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(EdgekitError, match="not in your known_hosts"):
        host_for(sshd, known_hosts=empty).connect()
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {(sshd.dir / 'other_ed25519.pub').read_text()}")
    with pytest.raises(EdgekitError, match="does not match"):
        host_for(sshd, known_hosts=wrong).connect()
    with host_for(sshd, known_hosts=empty, trust_new_host=True) as host:
        assert host.run(["true"])[0] == 0


def test_remote_without_edgekit_gets_the_install_hint(sshd):
    with host_for(sshd, remote_python="/nonexistent/python3") as host:
        with pytest.raises(EdgekitError, match=r"pip install 'edgekit-transformers\[jetson\]'"):
            host.check_edgekit()
    # The system Python is a real interpreter without edgekit, where this machine has one.
    bare = "/usr/bin/python3"
    if not os.path.exists(bare):
        return
    if subprocess.run([bare, "-c", "import edgekit"], cwd="/", capture_output=True,
                      env={"PATH": "/usr/bin:/bin"}).returncode == 0:
        return
    with host_for(sshd, remote_python=bare) as host:
        with pytest.raises(EdgekitError, match=r"not installed.*pip install 'edgekit-transformers\[jetson\]'"):
            host.check_edgekit()


def test_run_remote_bench_for_real(sshd, tmp_path):
    from conftest import build_text_classifier  # tests/conftest.py: tiny BERT checkpoints

    # A few training steps are plenty: this tests the round trip, not the model.
    artifact = build_text_classifier(tmp_path / "text-clf", steps=2)
    remote_tmp = tmp_path / "remote-tmp"  # the "device's" TMPDIR, to see that the run cleans up after itself
    remote_tmp.mkdir()
    env = {"PYTHONPATH": str(REPO), "TMPDIR": str(remote_tmp)}
    with host_for(sshd, remote_python=sys.executable, remote_env=env) as host:
        # Small and quick: the tiny test model has 64 positions, and timing quality is not the point here.
        fast = ["--seq-len", "16", "--iterations", "3", "--min-seconds", "0", "--warmup", "1"]
        report = run_remote_bench(host, artifact, fast)
    assert isinstance(report, dict) and "schema_version" in report  # the device's own bench report
    # (torch may leave its own caches in TMPDIR; only edgekit's folder is checked)
    assert list(remote_tmp.glob("edgekit-bench-*")) == [], "the remote temporary folder was left behind"


def test_run_remote_bench_refuses_before_copying(sshd, tmp_path):
    artifact = tmp_path / "big"
    artifact.mkdir()
    with open(artifact / "model.onnx", "wb") as f:
        f.truncate(3 * 1024**3)  # sparse: 3 GiB on paper, nothing on disk
    host = host_for(sshd, remote_python="/nonexistent/python3")
    with pytest.raises(EdgekitError, match="jetson-orin-nano-4gb"):
        run_remote_bench(host, artifact, profile="jetson-orin-nano-4gb")
    assert host._client is None  # refused before even connecting
    with pytest.raises(EdgekitError, match=r"edgekit-transformers\[jetson\]"):
        run_remote_bench(host, artifact)  # then: no edgekit there, still nothing copied


def test_remote_user_error_sentence_travels_back(sshd, tmp_path, monkeypatch):
    """A refusal on the device (here: sudo -n wants a password for --lock-clocks) reaches this side whole."""
    from edgekit.benchmarks import jetson

    # The device's sentence, made by the real code with a fake sudo -n that needs a password (sudo(8): prints
    # "sudo: a password is required", exits 1, runs nothing).
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sudo").write_text('#!/bin/sh\necho "sudo: a password is required" >&2\nexit 1\n')
    (fake_bin / "sudo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.setattr(jetson.os, "geteuid", lambda: 1000)
    with pytest.raises(EdgekitError) as refused:
        jetson._run_tool(["/usr/bin/jetson_clocks"], ("/usr/sbin/nvpmodel", "/usr/bin/jetson_clocks"))
    sentence = str(refused.value)
    # The device's edgekit as its CLI reports a user error: progress on stderr, the one "Error: ..." line, exit 2
    # (then a late line from a worker thread, which must not hide it).
    device = tmp_path / "device-python"
    device.write_text("#!/bin/sh\n"
                      '[ "$3" = --version ] && { echo "edgekit 0.1"; exit 0; }\n'
                      'echo "Locking clocks" >&2\n'
                      f"cat >&2 <<'END'\nError: {sentence}\nEND\n"
                      'echo "tegrastats stopped" >&2\nexit 2\n')
    device.chmod(0o755)
    artifact = tmp_path / "model"
    artifact.mkdir()
    (artifact / "model.onnx").write_bytes(b"onnx")
    with host_for(sshd, remote_python=str(device)) as host:
        with pytest.raises(EdgekitError) as err:
            run_remote_bench(host, artifact, ["--device", "jetson", "--lock-clocks"])
    message = str(err.value)
    assert message == f"edgekit bench on {host.target} stopped: {sentence}"
    assert "sudo asks for a password" in message and "NOPASSWD: /usr/sbin/nvpmodel, /usr/bin/jetson_clocks" in message
