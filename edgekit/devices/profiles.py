"""Device profiles: what edgekit knows about a target, kept as data in ``edgekit/devices/profiles/*.json``.

One JSON file per device, so adding a device is adding a file, and the facts (memory, CUDA architecture,
supported JetPack/TensorRT releases, tegrastats rails, nvpmodel modes) can be reviewed without reading code.
The files are read with importlib.resources so they work from an installed wheel as well as a checkout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from edgekit.errors import EdgekitError

GIB = 1024**3
KINDS = ("cpu", "cuda", "jetson")

# Memory-fit estimate (check_fits). On a Jetson the CPU, the GPU and the OS share one RAM, so:
# - about 1 GiB is taken by L4T itself (kernel carve-outs, services; a desktop session takes more);
# - the runtime holds the weights twice while it loads: the parsed ONNX/checkpoint initializers and its
#   own copy (TensorRT's builder keeps both until the engine is serialised; ONNX Runtime pre-packs weights);
# - the CUDA context, cuDNN/cuBLAS/TensorRT kernels and small-batch activations add about 1 GiB more.
# It is deliberately rough: its job is to stop a copy that cannot work, not to promise that one will.
SYSTEM_RESERVE_BYTES = 1 * GIB
DEFAULT_RUNTIME_OVERHEAD_BYTES = 1 * GIB
WEIGHT_COPIES = 2


@dataclass(frozen=True)
class PowerMode:
    """An nvpmodel mode; ``id`` is None where the id is not recorded for this module."""

    id: int | None
    name: str


@dataclass(frozen=True)
class SoftwareRelease:
    """One supported software stack; a None version is one this profile does not record."""

    jetpack: str | None
    l4t: str | None
    cuda: str | None
    tensorrt: str | None


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str  # cpu | cuda | jetson
    description: str
    memory_gb: float | None  # shared CPU+GPU RAM on Jetson; None for generic devices
    gpu_arch: str | None
    compute_capability: str | None
    software: tuple[SoftwareRelease, ...]
    versions_as_of: str | None
    rails: tuple[str, ...]  # tegrastats power rails this module prints
    input_rail: str | None  # the rail that measures the whole module input, if the module has one
    power_modes: tuple[PowerMode, ...]
    model_match: tuple[str, ...]  # substrings of /proc/device-tree/model
    notes: str | None = None

    @property
    def jetpack(self) -> tuple[str, ...]:
        return tuple(s.jetpack for s in self.software if s.jetpack)

    @property
    def tensorrt(self) -> tuple[str, ...]:
        """The TensorRT versions recorded for this device, oldest first."""
        return tuple(dict.fromkeys(s.tensorrt for s in self.software if s.tensorrt))

    def tensorrt_for(self, jetpack: str) -> str | None:
        """The TensorRT version shipped with a JetPack release ("6.2", or "5.1.x"), None if not recorded."""
        for release in self.software:
            if release.jetpack == jetpack:
                return release.tensorrt
        return None

    @property
    def memory_bytes(self) -> int | None:
        return int(self.memory_gb * GIB) if self.memory_gb is not None else None


def _from_json(data: dict, source: str) -> DeviceProfile:
    # A malformed file is a packaging bug, not something the user can fix: fail loudly, with the file.
    try:
        profile = DeviceProfile(
            name=data["name"],
            kind=data["kind"],
            description=data["description"],
            memory_gb=data["memory_gb"],
            gpu_arch=data["gpu_arch"],
            compute_capability=data["compute_capability"],
            software=tuple(SoftwareRelease(**s) for s in data["software"]),
            versions_as_of=data["versions_as_of"],
            rails=tuple(data["rails"]),
            input_rail=data["input_rail"],
            power_modes=tuple(PowerMode(**m) for m in data["power_modes"]),
            model_match=tuple(data["model_match"]),
            notes=data.get("notes"),
        )
    except (KeyError, TypeError) as exc:
        raise RuntimeError(f"device profile {source} is malformed: {exc!r}") from exc
    if profile.kind not in KINDS:
        raise RuntimeError(f"device profile {source} has kind {profile.kind!r}, expected one of {KINDS}")
    if f"{profile.name}.json" != source:
        raise RuntimeError(f"device profile {source} is named {profile.name!r}; the file must be <name>.json")
    return profile


@lru_cache(maxsize=1)
def _load_all() -> dict[str, DeviceProfile]:
    folder = resources.files(__package__).joinpath("profiles")
    profiles = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            profile = _from_json(json.loads(entry.read_text(encoding="utf-8")), entry.name)
            profiles[profile.name] = profile
    return dict(sorted(profiles.items()))


def list_profiles() -> list[DeviceProfile]:
    """Every known device profile, sorted by name."""
    return list(_load_all().values())


def get_profile(name: str) -> DeviceProfile:
    profiles = _load_all()
    if name not in profiles:
        raise EdgekitError(
            f"unknown device profile '{name}'",
            f"use one of: {', '.join(profiles)}",
        )
    return profiles[name]


def match_profile(model: str | None, memory_mb: float | None = None) -> DeviceProfile | None:
    """The profile whose ``model_match`` best fits a device-tree model string.

    Memory variants share one model string (AGX Orin 32GB/64GB, Orin Nano 4GB/8GB): the installed memory
    (``MemTotal``, which reads a little below the module's size because of carve-outs) picks the nearest.
    Without it such a model is ambiguous and None is returned rather than a guess.
    """
    if not model:
        return None
    text = model.lower()
    best_len, candidates = 0, []
    for profile in list_profiles():
        length = max((len(s) for s in profile.model_match if s.lower() in text), default=0)
        if length > best_len:
            best_len, candidates = length, [profile]
        elif length and length == best_len:
            candidates.append(profile)
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    sized = [p for p in candidates if p.memory_gb is not None]
    if memory_mb is None or not sized:
        return None
    return min(sized, key=lambda p: abs(p.memory_gb * 1024 - memory_mb))


@dataclass(frozen=True)
class FitEstimate:
    profile: str
    model_bytes: int
    needed_bytes: int
    usable_bytes: int

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.needed_bytes


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def check_fits(profile: DeviceProfile | str, model_bytes: int,
               runtime_overhead_bytes: int = DEFAULT_RUNTIME_OVERHEAD_BYTES) -> FitEstimate | None:
    """Raise EdgekitError when a model of ``model_bytes`` cannot fit the device's memory.

    Call it before copying anything to a device. Returns the estimate, or None for generic profiles whose
    memory is only known at run time (cuda-gpu, x86-cpu). See the constants above for the arithmetic.
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    if model_bytes < 0:
        raise ValueError("model_bytes must not be negative")
    if profile.memory_bytes is None:
        return None
    estimate = FitEstimate(
        profile=profile.name,
        model_bytes=model_bytes,
        needed_bytes=WEIGHT_COPIES * model_bytes + runtime_overhead_bytes,
        usable_bytes=profile.memory_bytes - (SYSTEM_RESERVE_BYTES if profile.kind == "jetson" else 0),
    )
    if estimate.needed_bytes > estimate.usable_bytes:
        raise EdgekitError(
            f"a {_gib(model_bytes)} model needs about {_gib(estimate.needed_bytes)} of memory to load "
            f"({WEIGHT_COPIES} copies of the weights plus {_gib(runtime_overhead_bytes)} of runtime), "
            f"but {profile.name} has about {_gib(estimate.usable_bytes)} usable",
            "make the model smaller (edgekit prune, or an INT8 export) or choose a device with more memory",
        )
    return estimate
