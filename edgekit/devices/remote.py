"""Run edgekit on a Jetson over SSH from a development machine (paramiko, key authentication only).

TensorRT engines are not portable, so measuring on a device means running there: copy the artifact over
SFTP, run ``edgekit bench`` on the device, fetch its JSON report, and clean up. Every argument sent to the
remote shell is quoted with shlex.quote; nothing is ever interpolated into a command string unquoted.
"""

from __future__ import annotations

import getpass
import json
import posixpath
import re
import shlex
import stat
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from edgekit.devices.profiles import DeviceProfile, check_fits
from edgekit.errors import EdgekitError, MissingExtra

INSTALL_HINT = "install it on the device with: pip install 'edgekit-transformers[jetson]'"
_SPEC_HINT = "write the target as user@host or user@host:port"


def _paramiko():
    try:
        import paramiko
    except ImportError as exc:
        raise MissingExtra("paramiko", "jetson") from exc
    return paramiko


def command_line(argv: Sequence[str], cwd: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The shell command that runs ``argv`` exactly as given, each argument quoted."""
    if isinstance(argv, str) or not argv:
        raise TypeError("argv must be a non-empty list of arguments, not a command string")
    words = [str(a) for a in argv]
    if env:
        bad = [k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            raise ValueError(f"not valid environment variable names: {bad}")
        words = ["env", *(f"{k}={v}" for k, v in env.items()), *words]
    line = shlex.join(words)
    return f"cd {shlex.quote(cwd)} && {line}" if cwd else line


def bench_argv(remote_artifact: str, remote_report: str, bench_args: Sequence[str] = (),
               python: str | None = "python3") -> list[str]:
    """The argv that benchmarks an artifact on the device and writes the JSON report there.

    ``python`` None runs the ``edgekit`` console script instead of ``python -m edgekit``.
    """
    prefix = [python, "-m", "edgekit"] if python else ["edgekit"]
    return [*prefix, "bench", remote_artifact, "--json", remote_report, *bench_args]


class RemoteHost:
    """An SSH connection to a device; ``RemoteHost.from_spec("user@host:port")``, then ``connect()``."""

    def __init__(self, host: str, user: str | None = None, port: int = 22, key_path: str | Path | None = None,
                 timeout: float = 10.0, remote_python: str | None = "python3",
                 remote_env: Mapping[str, str] | None = None, known_hosts: str | Path | None = None,
                 trust_new_host: bool = False):
        self.host = host
        self.user = user or getpass.getuser()
        self.port = int(port)
        self.key_path = Path(key_path).expanduser() if key_path else None
        self.timeout = timeout
        self.remote_python = remote_python
        self.remote_env = dict(remote_env or {})
        self.known_hosts = Path(known_hosts).expanduser() if known_hosts else None
        self.trust_new_host = trust_new_host
        self._client = None

    @classmethod
    def from_spec(cls, spec: str, key_path: str | Path | None = None, timeout: float = 10.0,
                  **options) -> RemoteHost:
        """Parse ``user@host``, ``user@host:port``, ``host`` or ``user@[::1]:port``."""
        user, _, rest = spec.rpartition("@")
        port: str | None = None
        if rest.startswith("["):
            host, _, tail = rest[1:].partition("]")
            if tail:
                if not tail.startswith(":"):
                    raise EdgekitError(f"cannot read the SSH target '{spec}'", _SPEC_HINT)
                port = tail[1:]
        elif rest.count(":") == 1:
            host, port = rest.split(":")
        else:
            host = rest
        if not host or (spec.count("@") and not user):
            raise EdgekitError(f"cannot read the SSH target '{spec}'", _SPEC_HINT)
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise EdgekitError(f"'{port}' is not a valid SSH port in '{spec}'", _SPEC_HINT)
        return cls(host, user=user or None, port=int(port) if port else 22, key_path=key_path, timeout=timeout,
                   **options)

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    # ---- connection ------------------------------------------------------------------------------------

    def connect(self) -> RemoteHost:
        if self._client is not None:
            return self
        paramiko = _paramiko()
        if self.key_path is not None and not self.key_path.is_file():
            raise EdgekitError(f"the SSH key {self.key_path} does not exist",
                               "pass the private key that the device accepts (for example ~/.ssh/id_ed25519)")

        class _UnknownHost(paramiko.SSHException):
            pass

        class _Reject(paramiko.MissingHostKeyPolicy):
            def missing_host_key(self, client, hostname, key):
                raise _UnknownHost(hostname)

        client = paramiko.SSHClient()
        try:
            client.load_system_host_keys(str(self.known_hosts) if self.known_hosts else None)
        except OSError as exc:
            raise EdgekitError(f"cannot read the known_hosts file {self.known_hosts}: {exc.strerror}",
                               "pass an existing known_hosts file, or leave it unset for ~/.ssh/known_hosts") from exc
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if self.trust_new_host else _Reject())
        explicit_key = self.key_path is not None
        key_name = str(self.key_path) if explicit_key else "your default keys (~/.ssh/id_* and ssh-agent)"
        pkey = self._load_key(paramiko) if explicit_key else None
        try:
            client.connect(
                self.host, port=self.port, username=self.user, pkey=pkey,
                # An explicit key means exactly that key: no agent, no guessing from ~/.ssh.
                allow_agent=not explicit_key, look_for_keys=not explicit_key,
                timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout,
            )
        except Exception as exc:
            client.close()
            error = self._explain_connect_error(exc, paramiko, _UnknownHost, key_name)
            if error is None:
                raise
            raise error from exc
        self._client = client
        return self

    def _load_key(self, paramiko):
        # Loaded here rather than by connect(), whose errors for a bad key file read like a network problem.
        try:
            return paramiko.PKey.from_path(self.key_path)
        except (TypeError, paramiko.PasswordRequiredException) as exc:  # cryptography: TypeError if encrypted
            raise EdgekitError(
                f"the SSH key {self.key_path} is protected by a passphrase",
                f"load it into ssh-agent (ssh-add {self.key_path}) and leave the key path unset",
            ) from exc
        except (ValueError, OSError, paramiko.SSHException, paramiko.UnknownKeyType) as exc:
            raise EdgekitError(
                f"{self.key_path} is not a private key that edgekit can read ({exc})",
                "pass the private key file (not the .pub one), in OpenSSH or PEM format",
            ) from exc

    def _explain_connect_error(self, exc: Exception, paramiko, unknown_host: type,
                               key_name: str) -> EdgekitError | None:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, unknown_host):
            return EdgekitError(
                f"the host key of {where} is not in your known_hosts",
                f"connect once with 'ssh -p {self.port} {self.user}@{self.host}' to check and record it "
                "(or pass trust_new_host=True on a network you trust)",
            )
        if isinstance(exc, paramiko.BadHostKeyException):
            return EdgekitError(
                f"the host key of {where} does not match the one in known_hosts",
                f"if the device was re-flashed, remove the old key with \"ssh-keygen -R '[{self.host}]:{self.port}'\" "
                "and connect once with ssh; otherwise do not connect: someone may be impersonating it",
            )
        if isinstance(exc, paramiko.PasswordRequiredException):
            return EdgekitError(
                f"the SSH key {key_name} is protected by a passphrase",
                f"load it into ssh-agent (ssh-add {key_name}) and leave the key path unset",
            )
        if isinstance(exc, paramiko.AuthenticationException):
            return EdgekitError(
                f"{where} refused key authentication for user '{self.user}' with {key_name}",
                f"add the public key to ~{self.user}/.ssh/authorized_keys on the device "
                f"(ssh-copy-id -p {self.port} {self.user}@{self.host}), or pass the key it accepts; "
                "edgekit never uses passwords",
            )
        if isinstance(exc, paramiko.SSHException):
            return EdgekitError(
                f"{where} did not complete an SSH handshake ({exc})",
                "check that the port is the device's SSH port and that sshd runs there",
            )
        if isinstance(exc, OSError):
            # NoValidConnectionsError (refused), socket.timeout and gaierror (unknown name) are all OSErrors.
            if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
                why = "connection refused"
            elif isinstance(exc, TimeoutError):
                why = f"no answer within {self.timeout:g} s"
            else:
                why = exc.strerror or str(exc) or "failed"
            return EdgekitError(
                f"cannot reach {self.host} on port {self.port}: {why}",
                "check that the device is on and on the network, that sshd runs there "
                "(sudo systemctl status ssh) and that the host and port are right",
            )
        return None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> RemoteHost:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connected(self):
        if self._client is None:
            self.connect()
        return self._client

    # ---- commands --------------------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None,
            timeout: float | None = None) -> tuple[int, str, str]:
        """Run argv on the device; returns (exit code, stdout, stderr). 127 means the command was not found.

        ``timeout`` bounds the silence between two pieces of output, not the whole run.
        """
        line = command_line(argv, cwd=cwd, env={**self.remote_env, **(env or {})})
        client = self._connected()
        paramiko = _paramiko()
        try:
            stdin, stdout, stderr = client.exec_command(line, timeout=timeout)
            stdin.close()
            stdout.channel.shutdown_write()
            # Drain stderr beside stdout: an unread stream can fill the SSH window and stall the command.
            err_chunks: list[bytes] = []
            reader = threading.Thread(target=lambda: err_chunks.append(stderr.read()), daemon=True)
            reader.start()
            out = stdout.read()
            reader.join()
            code = stdout.channel.recv_exit_status()
        except TimeoutError as exc:
            raise EdgekitError(f"'{argv[0]}' printed nothing for {timeout} s on {self.target}",
                               "raise the timeout, or check on the device why the command hangs") from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise EdgekitError(f"lost the connection to {self.target} while running '{argv[0]}' ({exc})",
                               "check the network and that the device is still up, then run again") from exc
        err = b"".join(err_chunks)
        return code, out.decode("utf-8", errors="replace"), err.decode("utf-8", errors="replace")

    def check_edgekit(self) -> str:
        """The device's ``edgekit --version``; raises EdgekitError with the install command if it is missing."""
        argv = [self.remote_python, "-m", "edgekit", "--version"] if self.remote_python else ["edgekit", "--version"]
        code, out, err = self.run(argv)
        if code == 0:
            return out.strip()
        if code == 127:
            raise EdgekitError(f"'{argv[0]}' was not found on {self.target}",
                               f"{INSTALL_HINT} (with remote_python naming the Python it is installed for)")
        if "No module named edgekit" in err and "__main__" not in err:
            raise EdgekitError(f"edgekit is not installed for {argv[0]} on {self.target}", INSTALL_HINT)
        last = (err.strip().splitlines() or ["no message"])[-1]
        raise EdgekitError(f"'{shlex.join(argv)}' failed on {self.target} with exit code {code}: {last}",
                           "reinstall or upgrade edgekit there: pip install -U 'edgekit-transformers[jetson]'")

    def make_temp_dir(self, prefix: str = "edgekit-") -> str:
        code, out, err = self.run(["mktemp", "-d", "-t", f"{prefix}XXXXXXXX"])
        if code != 0 or not out.strip():
            raise EdgekitError(f"cannot create a temporary folder on {self.target}: {err.strip() or 'mktemp failed'}",
                               "check that /tmp on the device is writable and not full")
        return out.strip()

    # ---- files -----------------------------------------------------------------------------------------

    def _sftp_call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            detail = exc.strerror or str(exc) or type(exc).__name__
            raise EdgekitError(f"cannot {what} on {self.target}: {detail}",
                               "check the path, the free space and the permissions on the device") from exc

    @staticmethod
    def _makedirs(sftp, path: str) -> None:
        current = "/" if path.startswith("/") else ""
        for part in (p for p in path.split("/") if p):
            current = posixpath.join(current, part) if current else part
            try:
                sftp.stat(current)
            except FileNotFoundError:
                sftp.mkdir(current)

    def put(self, local_path: str | Path, remote_dir: str) -> str:
        """Copy a file or a folder (recursively) into ``remote_dir``, created if missing; returns the remote path."""
        local = Path(local_path)
        if not local.exists():
            raise EdgekitError(f"{local} does not exist", "pass the file or folder to copy to the device")
        dest = posixpath.join(remote_dir, local.name)
        with self._connected().open_sftp() as sftp:
            self._sftp_call(f"create {remote_dir}", self._makedirs, sftp, remote_dir)
            if local.is_file():
                self._put_file(sftp, local, dest)
                return dest
            self._sftp_call(f"create {dest}", self._makedirs, sftp, dest)
            for path in sorted(local.rglob("*")):
                target = posixpath.join(dest, *path.relative_to(local).parts)
                if path.is_dir():
                    self._sftp_call(f"create {target}", self._makedirs, sftp, target)
                elif path.is_file():
                    self._put_file(sftp, path, target)
        return dest

    def _put_file(self, sftp, local: Path, remote: str) -> None:
        self._sftp_call(f"write {remote}", sftp.put, str(local), remote)
        # SFTP does not carry permissions: keep executables executable.
        self._sftp_call(f"set the mode of {remote}", sftp.chmod, remote, stat.S_IMODE(local.stat().st_mode))

    def get(self, remote_path: str, local_path: str | Path) -> Path:
        """Copy a remote file or folder to ``local_path`` (into it, when it is an existing folder), like cp -r."""
        local = Path(local_path)
        if local.is_dir():
            local = local / posixpath.basename(remote_path.rstrip("/"))
        with self._connected().open_sftp() as sftp:
            self._get(sftp, remote_path, local)
        return local

    def _get(self, sftp, remote: str, local: Path) -> None:
        info = self._sftp_call(f"read {remote}", sftp.stat, remote)
        if stat.S_ISDIR(info.st_mode):
            local.mkdir(parents=True, exist_ok=True)
            for entry in self._sftp_call(f"list {remote}", sftp.listdir_attr, remote):
                self._get(sftp, posixpath.join(remote, entry.filename), local / entry.filename)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            self._sftp_call(f"read {remote}", sftp.get, remote, str(local))
            local.chmod(stat.S_IMODE(info.st_mode) | stat.S_IRUSR | stat.S_IWUSR)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_remote_bench(host: RemoteHost, artifact_dir: str | Path, bench_args: Sequence[str] = (), *,
                     profile: DeviceProfile | str | None = None, timeout: float | None = None,
                     data: str | Path | None = None) -> dict:
    """Benchmark an artifact on the device and return its JSON report as a dict.

    Checks first that the model fits the profile's memory (when a profile is given) and that edgekit is
    installed there, so nothing is copied in vain. ``data`` (real lengths) is copied beside the artifact and
    passed as ``--data``. The remote temporary folder is always removed.
    """
    artifact = Path(artifact_dir)
    if not artifact.exists():
        raise EdgekitError(f"the artifact {artifact} does not exist", "pass the folder written by edgekit export")
    if data is not None and not Path(data).is_file():
        raise EdgekitError(f"the data file {data} does not exist", "check the path given with --data")
    if profile is not None:
        check_fits(profile, _tree_bytes(artifact))
    host.connect()
    host.check_edgekit()
    remote_tmp = host.make_temp_dir("edgekit-bench-")
    try:
        remote_artifact = host.put(artifact, remote_tmp)
        if data is not None:
            bench_args = [*bench_args, "--data", host.put(data, posixpath.join(remote_tmp, "data"))]
        remote_report = posixpath.join(remote_tmp, "bench-report.json")
        argv = bench_argv(remote_artifact, remote_report, bench_args, python=host.remote_python)
        code, _, err = host.run(argv, timeout=timeout)
        if code != 0:
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in err.splitlines()]
            lines = [line for line in lines if line]
            # The device's edgekit prints a user error as one "Error: ..." line (its CLI's one channel), which
            # already names the fix (e.g. sudo for --lock-clocks): pass that sentence on, whatever follows it.
            told = next((line for line in reversed(lines) if line.startswith("Error: ")), None)
            if told:
                raise EdgekitError(f"edgekit bench on {host.target} stopped: {told[len('Error: '):]}")
            last = (lines or ["no message"])[-1]
            raise EdgekitError(f"edgekit bench failed on {host.target} with exit code {code}: {last}",
                               f"run it there by hand to see the whole output: {shlex.join(argv)}")
        with tempfile.TemporaryDirectory(prefix="edgekit-report-") as local_tmp:
            report = host.get(remote_report, Path(local_tmp) / "bench-report.json")
            try:
                return json.loads(report.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise EdgekitError(f"the bench report from {host.target} is not valid JSON ({exc})",
                                   "check that edgekit on the device is the same version as here") from exc
    finally:
        # Only ever the folder mktemp made for this run; a failed clean-up must not hide the real error.
        try:
            host.run(["rm", "-rf", "--", remote_tmp])
        except EdgekitError:
            pass
