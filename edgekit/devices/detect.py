"""Is this machine a Jetson, which one, and which JetPack does it run?

Read from files under a root folder ("/" on a real device; tests build fake roots):
``/etc/nv_tegra_release`` (the L4T release), ``/proc/device-tree/model`` (the module and carrier name),
``/proc/device-tree/compatible`` and ``/proc/meminfo``. Done by hand because jetson-stats only exposes this
through its root service (jtop), which a dev box or a container does not run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.devices.profiles import match_profile

_L4T_LINE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")

# L4T release -> JetPack release, exact releases only (NVIDIA's JetPack archive). A revision missing here
# falls back to the major line below: guessing a minor would be wrong (L4T 35.1 was JetPack 5.0.2, 35.2.1
# was 5.1), so an unknown 36.x reads "6.x", not "6.2".
L4T_TO_JETPACK = {
    "32.6.1": "4.6", "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4",
    "32.7.5": "4.6.5", "32.7.6": "4.6.6",
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3",
    "35.6.0": "5.1.4", "35.6.1": "5.1.5",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
    "36.5.0": "6.2.2",
    "38.2.0": "7.0", "38.2.1": "7.0", "38.4.0": "7.1",
    "39.2.0": "7.2",
}
L4T_MAJOR_TO_JETPACK = {"32": "4.x", "34": "5.0 DP", "35": "5.x", "36": "6.x", "38": "7.x", "39": "7.x"}


@dataclass(frozen=True)
class NvpmodelMode:
    name: str
    id: int | None


@dataclass(frozen=True)
class JetsonInfo:
    model: str | None  # the device-tree model, e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    l4t: str | None  # e.g. "36.4.0"
    jetpack: str | None  # e.g. "6.1", or "6.x" for an L4T revision not in the table
    profile: str | None  # an edgekit device profile name, None when the model is unknown or ambiguous
    power_mode: NvpmodelMode | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_l4t_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.0, GCID: ...`` -> ``"36.4.0"``; None when the text has no such line."""
    match = _L4T_LINE.search(text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def jetpack_for_l4t(l4t: str | None) -> str | None:
    if not l4t:
        return None
    parts = l4t.split(".")
    # "36.4" and "36.4.0" name the same release.
    padded = ".".join(parts + ["0"] * (3 - len(parts))) if len(parts) < 3 else l4t
    return L4T_TO_JETPACK.get(l4t) or L4T_TO_JETPACK.get(padded) or L4T_MAJOR_TO_JETPACK.get(parts[0])


def parse_nvpmodel_query(text: str) -> NvpmodelMode | None:
    """Parse ``nvpmodel -q``: ``NV Power Mode: MAXN`` then the mode id on its own line.

    Warnings (``NVPM WARN: ...``) and fan lines may come before or between; they are ignored.
    """
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        match = re.match(r"NV Power Mode\s*:\s*(\S.*)$", line)
        if match:
            mode_id = next((int(nxt) for nxt in lines[i + 1:] if nxt.isdigit()), None)
            return NvpmodelMode(name=match.group(1).strip(), id=mode_id)
    return None


def query_nvpmodel(nvpmodel: str = "nvpmodel", timeout: float = 5.0) -> NvpmodelMode | None:
    """The current power mode from ``nvpmodel -q``; None where nvpmodel is absent or fails (exit code, NVPM ERROR)."""
    exe = shutil.which(nvpmodel) or shutil.which(nvpmodel, path="/usr/sbin:/usr/bin")
    if not exe:
        return None
    try:
        done = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    output = done.stdout + "\n" + done.stderr
    # nvpmodel may exit 0 after an error; jtop (jetson_stats nvpmodel.py) also looks for "NVPM ERROR".
    return parse_nvpmodel_query(output) if done.returncode == 0 and "NVPM ERROR" not in output else None


def _read(path: Path) -> str | None:
    try:
        # Device-tree strings end in NUL; compatible holds several NUL-separated strings.
        return path.read_bytes().decode("utf-8", errors="replace").replace("\x00", "\n").strip() or None
    except OSError:
        return None


def _mem_total_mb(root: Path) -> float | None:
    text = _read(root / "proc/meminfo")
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", text or "", re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def detect_jetson(root: str | Path = "/", *, query_power_mode: bool | None = None) -> JetsonInfo | None:
    """A JetsonInfo when the system under ``root`` is a Jetson, else None.

    ``query_power_mode`` runs ``nvpmodel -q``; by default only when ``root`` is "/", since the nvpmodel on
    PATH describes this machine, not a fake root.
    """
    root = Path(root)
    release = _read(root / "etc/nv_tegra_release")
    model = _read(root / "proc/device-tree/model") or _read(root / "sys/firmware/devicetree/base/model")
    compatible = _read(root / "proc/device-tree/compatible") or ""
    if model:
        model = model.splitlines()[0].strip()
    memory_mb = _mem_total_mb(root)
    profile = match_profile(model, memory_mb)
    # A device tree alone is no proof (a Raspberry Pi has one): it must name a Jetson or an NVIDIA Tegra SoC.
    looks_like_jetson = bool(
        release
        or profile
        or (model and "jetson" in model.lower())
        or "nvidia,tegra" in compatible.lower()
    )
    if not looks_like_jetson:
        return None
    l4t = parse_l4t_release(release) if release else None
    if query_power_mode is None:
        query_power_mode = root == Path("/")
    return JetsonInfo(
        model=model,
        l4t=l4t,
        jetpack=jetpack_for_l4t(l4t),
        profile=profile.name if profile else None,
        power_mode=query_nvpmodel() if query_power_mode else None,
    )
