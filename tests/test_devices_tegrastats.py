"""tegrastats parsing against real lines from several modules and JetPack releases, and the sampler."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from edgekit.devices.tegrastats import TegrastatsSampler, parse_line, summarize
from edgekit.errors import EdgekitError

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "jetson" / "tegrastats-samples.txt"


def sample_groups() -> dict[str, list[str]]:
    """'## header' -> the tegrastats lines under it."""
    if not SAMPLES.exists():
        pytest.skip(f"reference data {SAMPLES} is not here (shared/ sits beside the repository)")
    groups: dict[str, list[str]] = {}
    header = None
    for line in SAMPLES.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            header = line[3:].strip()
            groups[header] = []
        elif line.strip() and not line.startswith("#"):
            assert header is not None, f"a sample line before any '## ' header: {line!r}"
            groups[header].append(line)
    return groups


def _agx_orin_jp72(s):
    assert s.timestamp == "07-25-2026 09:08:28"
    assert (s.ram_used_mb, s.ram_total_mb) == (20642, 62817)
    assert s.swap_used_mb is None and s.swap_total_mb is None
    assert len(s.cpu) == 12
    assert s.cpu[0] == (23, 2201) and s.cpu[8] == (33, 2201) and s.cpu[11] == (27, 2201)
    assert (s.emc_load_pct, s.emc_freq_mhz) == (3, 3199)
    assert s.gr3d_load_pct == 12.0
    assert s.gr3d_freq_mhz == (1300, 1300)
    assert s.temperatures == {"cpu": 52.968, "soc2": 48.406, "soc0": 49.531, "gpu": 47.625}
    assert s.rails == {
        "VDD_GPU_SOC": (5139, 5139, 5139),
        "VDD_CPU_CV": (3268, 3268, 3268),
        "VIN_SYS_5V0": (5500, 5500, 5500),
    }
    # AGX Orin has no whole-module rail: VIN_SYS_5V0 reads less than GPU_SOC + CPU_CV, so the rails add up.
    assert s.module_power_mw == 5139 + 3268 + 5500
    assert s.board_power_mw is None


def _orin_jp6_short(s):
    assert s.timestamp is None
    assert (s.ram_used_mb, s.ram_total_mb) == (4722, 7844)
    assert s.cpu == ()
    assert (s.emc_load_pct, s.emc_freq_mhz) == (2, 1866)
    assert s.gr3d_load_pct == 10.0
    assert s.gr3d_freq_mhz == (1300,)
    assert s.temperatures == {} and s.rails == {}
    assert s.module_power_mw is None


def _thor_no_load(s):
    assert (s.ram_used_mb, s.ram_total_mb) == (4722, 7844)
    assert (s.emc_load_pct, s.emc_freq_mhz) == (2, 1866)
    assert s.gr3d_load_pct is None
    assert s.gr3d_freq_mhz == (1000, 1000, 1000)
    assert s.module_power_mw is None


def _xavier_nx(s):
    assert (s.ram_used_mb, s.ram_total_mb) == (2690, 6854)
    assert (s.swap_used_mb, s.swap_total_mb) == (479, 3427)
    assert s.cpu == ((3, 1904), (7, 1906), (1, 1905), (0, 1907), None, None)
    assert (s.emc_load_pct, s.emc_freq_mhz) == (0, 1600)
    assert s.gr3d_load_pct == 0.0
    assert s.gr3d_freq_mhz == (510,)
    assert s.temperatures == {"aux": 39.0, "cpu": 39.5, "ao": 37.5, "gpu": 37.5, "pmic": 50.0}
    assert s.rails == {
        "VDD_IN": (5079, 5079, None),
        "VDD_CPU_GPU_CV": (696, 696, None),
        "VDD_SOC": (1104, 1104, None),
    }
    assert s.module_power_mw == 5079  # VDD_IN is the module input: not added to its own parts


# Header prefix in the samples file -> the exact values of its line(s).
EXPECTED = {
    "agx-orin jetpack-7.2": _agx_orin_jp72,
    "orin jetpack-6": _orin_jp6_short,
    "thor": _thor_no_load,
    "xavier-nx": _xavier_nx,
}


def _expectation(header: str):
    matches = [check for prefix, check in EXPECTED.items() if header.startswith(prefix)]
    assert len(matches) == 1, f"add exact expectations for the new sample form '{header}' to EXPECTED"
    return matches[0]


def test_every_sample_line_parses_with_exact_values():
    groups = sample_groups()
    assert len(groups) >= len(EXPECTED)
    for header, lines in groups.items():
        assert lines, f"no sample line under '## {header}'"
        check = _expectation(header)
        for line in lines:
            check(parse_line(line))


# Forms seen in the wild that the shared file does not hold (jetson-stats' emulator and its docs).
NANO_JP4 = ("RAM 1766/3964MB (lfb 197x4MB) SWAP 0/2048MB (cached 0MB) CPU [24%@1224,15%@1224,13%@1224,10%@1224] "
            "EMC_FREQ 0% GR3D_FREQ 0% PLL@21C CPU@25C PMIC@100C GPU@23.5C AO@33.5C thermal@24.5C "
            "POM_5V_IN 2545/2547 POM_5V_GPU 0/0 POM_5V_CPU 549/529")
TX2 = ("RAM 4722/7844MB (lfb 1x512kB) CPU [55%@2035,14%@2034,27%@2034,55%@2035,47%@2035,45%@2035] "
       "SWAP 149/1024MB (cached 7MB) EMC_FREQ 2%@1866 GR3D_FREQ 37%@1300 APE 150 MTS fg 0% bg 0% BCPU@-45C "
       "MCPU@-45C GPU@-51C PLL@45C AO@47.5C Tboard@37C Tdiode@46.75C PMIC@100C thermal@46.4C "
       "VDD_IN 14025/14416 VDD_CPU 2209/2538 VDD_GPU 6854/6903 VDD_SOC 1371/1370 VDD_WIFI 19/19 NVENC 716 "
       "NVDEC 716 VDD_DDR 2702/2702")
TX1_SHARED_CLOCK = "RAM 1180/3965MB (lfb 1x2MB) IRAM 0/252kB(lfb 252kB) CPU [30%,off,28%,26%]@1036 EMC_FREQ 10%@1600"
THOR_RAILS = ("RAM 9000/125772MB (lfb 2x4MB) GR3D_FREQ @[1000,1000,1000] tj@55.1C VDD_GPU 2400mW/2400mW "
              "VDD_CPU_SOC_MSS 6510mW/6510mW VIN_SYS_5V0 6520mW/6520mW VIN 23000mW/23000mW")


def test_older_and_other_forms():
    nano = parse_line(NANO_JP4)
    assert (nano.swap_used_mb, nano.swap_total_mb) == (0, 2048)
    assert (nano.emc_load_pct, nano.emc_freq_mhz) == (0, None)
    assert (nano.gr3d_load_pct, nano.gr3d_freq_mhz) == (0.0, ())
    assert nano.temperatures["cpu"] == 25.0 and nano.temperatures["thermal"] == 24.5
    assert nano.rails["POM_5V_IN"] == (2545, 2547, None)
    assert nano.module_power_mw == 2545

    tx2 = parse_line(TX2)
    assert tx2.temperatures["bcpu"] == -45.0 and tx2.temperatures["tdiode"] == 46.75
    assert tx2.rails["VDD_DDR"] == (2702, 2702, None) and "NVENC" not in tx2.rails
    assert tx2.module_power_mw == 14025
    assert tx2.gr3d_load_pct == 37.0 and tx2.gr3d_freq_mhz == (1300,)

    tx1 = parse_line(TX1_SHARED_CLOCK)
    assert tx1.cpu == ((30, 1036), None, (28, 1036), (26, 1036))
    assert "IRAM" not in tx1.rails and tx1.ram_total_mb == 3965

    thor = parse_line(THOR_RAILS)
    assert thor.module_power_mw == 2400 + 6510 + 6520  # VIN is the carrier board's input
    assert thor.board_power_mw == 23000


@pytest.mark.parametrize("line", ["", "hello world", "CPU [1%@100] GR3D_FREQ 0%", "NVPM WARN: x"])
def test_a_line_that_is_not_tegrastats_is_a_user_error(line):
    with pytest.raises(EdgekitError, match="not a tegrastats line"):
        parse_line(line)


def test_summarize_energy_per_inference():
    lines = [
        "RAM 1000/7844MB GR3D_FREQ 10%@1300 VDD_IN 5000mW/5000mW VDD_SOC 1000mW/1000mW",
        "RAM 3000/7844MB GR3D_FREQ 30%@1300 VDD_IN 7000mW/6000mW VDD_SOC 1000mW/1000mW",
    ]
    summary = summarize([parse_line(x) for x in lines], n_inferences=100, wall_seconds=2.0)
    assert summary.ram_peak_mb == 3000 and summary.ram_mean_mb == 2000
    assert summary.gr3d_mean_load_pct == 20.0
    assert summary.module_power_mean_mw == 6000
    assert summary.energy_per_inference_mj == pytest.approx(6000 * 2.0 / 100)  # 120 mJ
    assert summary.to_dict()["n_samples"] == 2

    no_rails = summarize([parse_line("RAM 1/2MB GR3D_FREQ @[1000]")], 1, 1.0)
    assert no_rails.module_power_mean_mw is None and no_rails.energy_per_inference_mj is None
    assert no_rails.gr3d_mean_load_pct is None
    with pytest.raises(EdgekitError, match="no tegrastats sample"):
        summarize([], 10, 1.0)


def _fake_tegrastats(folder: Path, lines: list[str], exit_code: int | None = None) -> Path:
    """A stand-in executable with tegrastats' command line that prints real lines."""
    script = folder / "tegrastats"
    body = "\n".join(f"printf '%s\\n' '{line}'" for line in lines)
    if exit_code is None:
        loop = f'while true; do\n{body}\nprintf "some warning\\n"\nsleep "$(awk "BEGIN{{print $2/1000}}")"\ndone\n'
    else:
        loop = f'echo "cannot open /sys/kernel/debug: Permission denied" >&2\nexit {exit_code}\n'
    script.write_text(f'#!/bin/sh\n[ "$1" = "--interval" ] || {{ echo "usage: --interval MS" >&2; exit 2; }}\n{loop}')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_sampler_collects_samples_from_a_tegrastats_process(tmp_path, monkeypatch):
    groups = sample_groups()
    xavier = next(lines[0] for header, lines in groups.items() if header.startswith("xavier-nx"))
    _fake_tegrastats(tmp_path, [xavier])
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")  # found on PATH, like the real one
    with TegrastatsSampler(interval_ms=20) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    samples = sampler.stop()  # already stopped: returns the same samples
    assert len(samples) >= 3
    assert all(s.module_power_mw == 5079 for s in samples)
    assert sampler.skipped_lines >= 1  # the warning line between samples is skipped, not fatal
    summary = summarize(samples, n_inferences=10, wall_seconds=1.0)
    assert summary.energy_per_inference_mj == pytest.approx(507.9)


def test_sampler_reports_a_missing_or_failing_tegrastats(tmp_path):
    with pytest.raises(EdgekitError, match="tegrastats was not found"):
        TegrastatsSampler(tegrastats=tmp_path / "nope").start()
    failing = _fake_tegrastats(tmp_path, [], exit_code=1)
    sampler = TegrastatsSampler(interval_ms=10, tegrastats=failing).start()
    deadline = time.monotonic() + 5
    while sampler._proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(EdgekitError, match="Permission denied"):
        sampler.stop()
