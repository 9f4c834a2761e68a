"""Energy meters: the model formula against process CPU time, RAPL on a fake powercap tree (wrap-around by hand),
NVML only where a GPU is, and the factory's errors."""

import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helios.energy import (
    EnergyMeterUnavailableError,
    ModelMeter,
    RaplMeter,
    make_meter,
    meter_from_config,
    nvml_status,
    rapl_delta_uj,
)

CONF = Path(__file__).resolve().parent.parent / "conf" / "energy"


def _busy(seconds: float) -> None:
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        pass


def test_model_cpu_time_formula() -> None:
    meter = ModelMeter("cpu_time", watts_per_core=10.0, static_w=2.0)
    meter.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    _busy(0.05)
    reading = meter.stop()
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    assert reading.source == "model"
    assert reading.detail["cpu_s"] >= 0.05
    assert reading.energy_j == pytest.approx(10.0 * reading.detail["cpu_s"] + 2.0 * reading.detail["wall_s"])
    # The meter's interval and ours differ by a few calls at either end.
    assert reading.detail["cpu_s"] == pytest.approx(cpu_s, abs=5e-3)
    assert reading.detail["wall_s"] == pytest.approx(wall_s, abs=5e-3)


def test_model_macs_formula() -> None:
    meter = ModelMeter("macs", joules_per_mac=2e-12)
    meter.start()
    meter.add_macs(1_000_000)
    meter.add_macs(500_000)
    reading = meter.stop()
    assert reading.energy_j == pytest.approx(3e-6) and reading.detail["macs"] == 1_500_000
    meter.start()  # reusable; macs reset per interval
    assert meter.stop().energy_j == 0.0


def _fake_powercap(root: Path, zones: dict[str, tuple[str, int, int]]) -> None:
    """zones: directory -> (name, energy_uj, max_energy_range_uj)."""
    for directory, (name, energy_uj, max_uj) in zones.items():
        zone = root / directory
        zone.mkdir(parents=True)
        (zone / "name").write_text(name + "\n")
        (zone / "energy_uj").write_text(f"{energy_uj}\n")
        (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")


def test_rapl_wrap_arithmetic_by_hand() -> None:
    assert rapl_delta_uj(1_000, 4_500, 10_000) == 3_500
    # 9_900 -> (wrap at 10_000) -> 250: 100 to the top, then 250.
    assert rapl_delta_uj(9_900, 250, 10_000) == 350


def test_rapl_meter_on_fake_powercap(tmp_path: Path) -> None:
    max_uj = 262_143_328_850
    _fake_powercap(tmp_path, {
        "intel-rapl:0": ("package-0", max_uj - 1_000_000, max_uj),  # about to wrap
        "intel-rapl:0:0": ("core", 5, max_uj),  # a sub-zone: part of package-0, must not be added
        "intel-rapl:1": ("package-1", 2_000_000, max_uj),
    })
    meter = make_meter("rapl", rapl_root=tmp_path)
    assert isinstance(meter, RaplMeter) and [z.name for z in meter.zones] == ["package-0", "package-1"]
    meter.start()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("3000000\n")  # wrapped: 1 J to the top + 3 J
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("999999999\n")
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("4500000\n")  # +2.5 J
    reading = meter.stop()
    assert reading.source == "rapl"
    assert reading.energy_j == pytest.approx(1.0 + 3.0 + 2.5)
    assert reading.detail["zone_energy_j"] == pytest.approx([4.0, 2.5])


def test_auto_prefers_rapl_over_model_and_falls_back(tmp_path: Path) -> None:
    _fake_powercap(tmp_path / "rapl", {"intel-rapl:0": ("package-0", 0, 10**9)})
    assert make_meter("auto", device="cpu", rapl_root=tmp_path / "rapl").source == "rapl"
    assert make_meter("auto", device="cpu", rapl_root=tmp_path / "none").source == "model"


def test_unavailable_or_unknown_meter(tmp_path: Path) -> None:
    with pytest.raises(EnergyMeterUnavailableError, match="rapl energy meter unavailable: no readable"):
        make_meter("rapl", rapl_root=tmp_path)
    if not nvml_status()[0]:
        with pytest.raises(EnergyMeterUnavailableError, match="nvml energy meter unavailable"):
            make_meter("nvml")
    with pytest.raises(ValueError, match=r"unknown energy meter 'joulescope'; valid: \['auto', 'nvml', 'rapl', 'model'\]"):
        make_meter("joulescope")
    with pytest.raises(ValueError, match=r"unknown energy model formula 'tdp'; valid: \['cpu_time', 'macs'\]"):
        make_meter("model", formula="tdp")
    with pytest.raises(RuntimeError, match="stop\\(\\) called without start\\(\\)"):
        ModelMeter().stop()


def test_config() -> None:
    meter = meter_from_config(OmegaConf.load(CONF / "default.yaml"), device="cpu")
    assert meter.source in ("rapl", "model")
    meter = meter_from_config({"kind": "model", "model": {"formula": "macs", "joules_per_mac": 1e-11}})
    assert isinstance(meter, ModelMeter) and meter.joules_per_mac == 1e-11
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['watts'\] in energy.model config"):
        meter_from_config({"model": {"watts": 3}})


@pytest.mark.skipif(not nvml_status()[0], reason="needs an NVIDIA GPU with NVML's energy counter")
def test_nvml_meter_reads_the_counter() -> None:
    import torch

    meter = make_meter("nvml")
    meter.start()
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(200):
        x = x @ x / 64
    torch.cuda.synchronize()
    reading = meter.stop()
    assert reading.source == "nvml" and reading.energy_j > 0
    assert make_meter("auto").source == "nvml"
