"""Device profiles: the data files, lookup, model matching and the memory-fit check."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from edgekit.devices.profiles import (
    GIB,
    DeviceProfile,
    check_fits,
    get_profile,
    list_profiles,
    match_profile,
)
from edgekit.errors import EdgekitError

EXPECTED_NAMES = {
    "jetson-agx-orin-64gb", "jetson-agx-orin-32gb", "jetson-orin-nx-16gb", "jetson-orin-nx-8gb",
    "jetson-orin-nano-8gb", "jetson-orin-nano-4gb", "jetson-xavier-nx", "jetson-agx-xavier", "jetson-thor",
    "cuda-gpu", "x86-cpu",
}


def test_every_profile_file_loads_and_is_consistent():
    profiles = list_profiles()
    assert {p.name for p in profiles} == EXPECTED_NAMES
    files = [f.name for f in resources.files("edgekit.devices").joinpath("profiles").iterdir()
             if f.name.endswith(".json")]
    assert sorted(files) == sorted(f"{name}.json" for name in EXPECTED_NAMES)
    for p in profiles:
        assert isinstance(p, DeviceProfile) and p.kind in ("cpu", "cuda", "jetson") and p.description
        if p.kind == "jetson":
            assert p.memory_gb and p.compute_capability and p.gpu_arch and p.model_match and p.rails
            assert p.jetpack and p.versions_as_of and p.power_modes
            assert p.input_rail is None or p.input_rail in p.rails
        else:
            assert p.memory_gb is None and not p.model_match
        hash(p)  # frozen all the way down


def test_versions_are_the_recorded_ones():
    orin = get_profile("jetson-agx-orin-64gb")
    assert orin.compute_capability == "8.7" and orin.memory_gb == 64
    assert orin.tensorrt_for("6.2") == "10.3" and orin.tensorrt_for("5.1.x") == "8.5.2"
    assert orin.tensorrt_for("7.2") is None  # not recorded rather than guessed
    assert "10.3" in orin.tensorrt and "6.2" in orin.jetpack
    assert [(m.id, m.name) for m in orin.power_modes][0] == (0, "MAXN")
    thor = get_profile("jetson-thor")
    assert thor.jetpack[0] == "7.0" and thor.tensorrt_for("7.0") == "10.13" and thor.compute_capability == "11.0"
    assert "VIN" in thor.rails and thor.input_rail is None
    xavier = get_profile("jetson-xavier-nx")
    assert not any(j.startswith("6") for j in xavier.jetpack)  # JetPack 6 dropped Xavier
    nano = get_profile("jetson-orin-nano-8gb")
    assert {m.name: m.id for m in nano.power_modes}["MAXN_SUPER"] == 2 and nano.input_rail == "VDD_IN"


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(EdgekitError) as err:
        get_profile("jetson-nano-2gb")
    assert "jetson-nano-2gb" in str(err.value) and "jetson-orin-nano-8gb" in str(err.value)


@pytest.mark.parametrize("model, memory_mb, expected", [
    ("NVIDIA Jetson AGX Orin Developer Kit", 62_817, "jetson-agx-orin-64gb"),
    ("NVIDIA Jetson AGX Orin Developer Kit", 30_536, "jetson-agx-orin-32gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 15_400, "jetson-orin-nx-16gb"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", 7_600, "jetson-orin-nx-8gb"),
    ("NVIDIA Jetson Orin Nano Developer Kit", 7_620, "jetson-orin-nano-8gb"),
    ("NVIDIA Jetson Orin Nano Developer Kit", 3_300, "jetson-orin-nano-4gb"),
    ("NVIDIA Jetson Xavier NX Developer Kit", None, "jetson-xavier-nx"),
    ("Jetson-AGX", None, "jetson-agx-xavier"),
    ("NVIDIA Jetson AGX Thor Developer Kit", None, "jetson-thor"),
    ("NVIDIA Jetson AGX Orin Developer Kit", None, None),  # ambiguous without the memory size
    ("Raspberry Pi 4 Model B", 4_000, None),
    (None, None, None),
])
def test_match_profile(model, memory_mb, expected):
    found = match_profile(model, memory_mb)
    assert (found.name if found else None) == expected


def test_check_fits_refuses_a_model_too_big_for_the_device():
    estimate = check_fits("jetson-orin-nano-4gb", 200 * 1024**2)
    assert estimate.needed_bytes == 2 * 200 * 1024**2 + GIB
    assert estimate.usable_bytes == 3 * GIB and estimate.headroom_bytes > 0
    with pytest.raises(EdgekitError) as err:
        check_fits(get_profile("jetson-orin-nano-4gb"), 2 * GIB)
    message = str(err.value)
    assert "jetson-orin-nano-4gb" in message and "2.0 GiB model" in message and "smaller" in message
    assert check_fits("jetson-agx-orin-64gb", 2 * GIB) is not None
    # A larger runtime overhead can tip a borderline model over.
    with pytest.raises(EdgekitError):
        check_fits("jetson-orin-nano-8gb", 2 * GIB, runtime_overhead_bytes=4 * GIB)


def test_generic_profiles_cannot_be_judged_in_advance():
    assert check_fits("cuda-gpu", 100 * GIB) is None
    assert check_fits("x86-cpu", 100 * GIB) is None


def test_profiles_are_plain_json_data():
    folder = resources.files("edgekit.devices").joinpath("profiles")
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            assert data["name"] + ".json" == entry.name
