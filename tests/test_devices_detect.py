"""Jetson detection from fake root folders, the L4T -> JetPack table and nvpmodel output."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.devices.detect import (
    JetsonInfo,
    NvpmodelMode,
    detect_jetson,
    jetpack_for_l4t,
    parse_l4t_release,
    parse_nvpmodel_query,
)

ORIN_RELEASE = ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, "
                "DATE: Fri Sep 13 04:36:44 UTC 2024\n"
                "# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n"
                "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n")


def make_root(tmp_path: Path, release: str | None = None, model: str | None = None, mem_kb: int | None = None,
              compatible: str | None = None) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "proc" / "device-tree").mkdir(parents=True)
    if release is not None:
        (root / "etc" / "nv_tegra_release").write_text(release)
    if model is not None:
        (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\x00")
    if compatible is not None:
        (root / "proc" / "device-tree" / "compatible").write_bytes(compatible.encode())
    if mem_kb is not None:
        (root / "proc" / "meminfo").write_text(f"MemTotal:       {mem_kb} kB\nMemFree:         1234 kB\n")
    return root


def test_agx_orin_with_release_model_and_memory(tmp_path):
    root = make_root(tmp_path, ORIN_RELEASE, "NVIDIA Jetson AGX Orin Developer Kit", mem_kb=64_326_604)
    info = detect_jetson(root)
    assert info == JetsonInfo(model="NVIDIA Jetson AGX Orin Developer Kit", l4t="36.4.0", jetpack="6.1",
                              profile="jetson-agx-orin-64gb", power_mode=None)


def test_memory_tells_memory_variants_apart(tmp_path):
    root = make_root(tmp_path, "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n",
                     "NVIDIA Jetson AGX Orin", mem_kb=30_536_000)
    info = detect_jetson(root)
    assert (info.l4t, info.jetpack, info.profile) == ("35.4.1", "5.1.2", "jetson-agx-orin-32gb")


def test_orin_nano_super_devkit(tmp_path):
    root = make_root(tmp_path, "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n",
                     "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", mem_kb=7_802_000)
    info = detect_jetson(root)
    assert (info.l4t, info.jetpack, info.profile) == ("36.4.3", "6.2", "jetson-orin-nano-8gb")


def test_model_without_release_file(tmp_path):
    # A container without /etc/nv_tegra_release still sees the device tree.
    root = make_root(tmp_path, None, "NVIDIA Jetson Xavier NX Developer Kit", mem_kb=7_000_000)
    info = detect_jetson(root)
    assert info == JetsonInfo(model="NVIDIA Jetson Xavier NX Developer Kit", l4t=None, jetpack=None,
                              profile="jetson-xavier-nx")


def test_ambiguous_model_without_meminfo_has_no_profile(tmp_path):
    info = detect_jetson(make_root(tmp_path, ORIN_RELEASE, "NVIDIA Jetson Orin Nano Developer Kit"))
    assert info is not None and info.profile is None and info.jetpack == "6.1"


def test_custom_carrier_board_is_found_by_its_tegra_soc(tmp_path):
    root = make_root(tmp_path, None, "ACME Robot Controller", compatible="acme,robot\x00nvidia,tegra234\x00")
    info = detect_jetson(root)
    assert info is not None and info.model == "ACME Robot Controller" and info.profile is None


def test_thor_and_release_only(tmp_path):
    root = make_root(tmp_path, "# R38 (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64\n",
                     "NVIDIA Jetson AGX Thor Developer Kit", mem_kb=128_000_000)
    assert detect_jetson(root).profile == "jetson-thor"
    assert detect_jetson(root).jetpack == "7.0"
    release_only = detect_jetson(make_root(tmp_path / "b", ORIN_RELEASE))
    assert release_only == JetsonInfo(model=None, l4t="36.4.0", jetpack="6.1", profile=None)


@pytest.mark.parametrize("model", [None, "Raspberry Pi 4 Model B Rev 1.4"])
def test_not_a_jetson(tmp_path, model):
    assert detect_jetson(make_root(tmp_path, None, model, mem_kb=4_000_000)) is None


def test_this_machine_is_told_apart():
    """The answer for this machine follows from its own files: a JetsonInfo exactly when it shows the
    signs of one (an L4T release file, or a device tree naming a Jetson or a Tegra SoC)."""
    from pathlib import Path

    def text(p):
        try:
            return Path(p).read_bytes().decode(errors="replace").lower()
        except OSError:
            return ""

    tree = text("/proc/device-tree/model") or text("/sys/firmware/devicetree/base/model")
    signs = (Path("/etc/nv_tegra_release").is_file() or "jetson" in tree
             or "nvidia,tegra" in text("/proc/device-tree/compatible"))
    info = detect_jetson("/", query_power_mode=False)
    if signs:
        assert isinstance(info, JetsonInfo) and (info.model or info.l4t)
    else:
        assert info is None


@pytest.mark.parametrize("text, expected", [
    ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic", "36.4.0"),
    ("# R35 (release), REVISION: 6.1, GCID: 39115349, BOARD: t186ref, EABI: aarch64", "35.6.1"),
    ("# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref", "32.7.4"),
    ("# R39 (release), REVISION: 2, GCID: 1", "39.2"),
    ("not a release file", None),
])
def test_parse_l4t_release(text, expected):
    assert parse_l4t_release(text) == expected


@pytest.mark.parametrize("l4t, jetpack", [
    ("35.2.1", "5.1"), ("35.4.1", "5.1.2"), ("35.6.0", "5.1.4"), ("35.9.9", "5.x"),
    ("36.3.0", "6.0"), ("36.4.0", "6.1"), ("36.4", "6.1"), ("36.4.3", "6.2"), ("36.4.4", "6.2.1"), ("36.9.0", "6.x"),
    ("38.2.0", "7.0"), ("38.4.0", "7.1"), ("39.2", "7.2"), ("39.5.0", "7.x"),
    ("99.1.0", None), (None, None),
])
def test_jetpack_for_l4t(l4t, jetpack):
    assert jetpack_for_l4t(l4t) == jetpack


@pytest.mark.parametrize("text, expected", [
    ("NV Power Mode: MAXN\n0\n", NvpmodelMode("MAXN", 0)),
    ("NV Power Mode: 15W\n0\n", NvpmodelMode("15W", 0)),
    ("NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN_SUPER\n2\n", NvpmodelMode("MAXN_SUPER", 2)),
    ("NV Power Mode: MODE_30W_ALL\n", NvpmodelMode("MODE_30W_ALL", None)),
    ("nvpmodel: command not found\n", None),
])
def test_parse_nvpmodel_query(text, expected):
    assert parse_nvpmodel_query(text) == expected
