"""Energy meters: measure (or model) the joules an interval of serving costs, each reading labelled with its source.

    python -m helios.energy            # which meter "auto" picks here, and a 1-s reading

    meter = make_meter("auto")           # or "nvml", "rapl", "model"; see also meter_from_config(conf/energy/*.yaml)
    meter.start(); ...serve an epoch...; reading = meter.stop()
    reading.energy_j, reading.source, reading.detail

Sources, in the order "auto" tries them:
  nvml   NVIDIA's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, millijoules since driver load,
         Volta and newer) through nvidia-ml-py. Whole-GPU energy: other processes on the GPU count too.
  rapl   Intel/AMD RAPL counters, `/sys/class/powercap/intel-rapl:N/energy_uj` (microjoules), summed over the
         top-level package zones (their sub-zones, core/uncore, are parts of the package and would double count;
         DRAM is not included). Needs read access, which recent kernels give only to root. The counter wraps at
         `max_energy_range_uj`; one wrap per interval is corrected, so intervals must be shorter than a wrap period
         (max_energy_range_uj / package watts: about 20 minutes at 200 W for the common 262 kJ range).
  model  no sensor, a documented model:
           formula "cpu_time":  energy_j = watts_per_core * cpu_s + static_w * wall_s
                                cpu_s = user + system CPU seconds of this process (all its threads) in the interval
           formula "macs":      energy_j = joules_per_mac * macs + static_w * wall_s
                                macs reported by the caller (`meter.add_macs(result.decode_macs)`)
         Defaults: 6 W per busy core (a 200 W, 32-core server package at full load), static_w = 0 (only the
         dynamic part of serving is charged), 4.6 pJ per MAC (Horowitz, ISSCC 2014, 45 nm: fp32 multiply 3.7 pJ +
         add 0.9 pJ; arithmetic only, memory traffic excluded, so a lower bound). Set them for your hardware.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Literal

METER_KINDS: tuple[str, ...] = ("auto", "nvml", "rapl", "model")
MODEL_FORMULAS: tuple[str, ...] = ("cpu_time", "macs")
RAPL_ROOT = Path("/sys/class/powercap")
DEFAULT_WATTS_PER_CORE = 6.0
DEFAULT_JOULES_PER_MAC = 4.6e-12
_TOP_LEVEL_ZONE = re.compile(r"^intel-rapl:\d+$")


class EnergyMeterUnavailableError(RuntimeError):
    """An explicitly requested meter cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class EnergyReading:
    energy_j: float
    source: str  # "nvml" | "rapl" | "model"
    detail: dict[str, Any]  # what was measured or assumed: devices/zones, formula and its parameters


class EnergyMeter:
    """start() begins an interval, stop() ends it and returns its EnergyReading. Meters are reusable."""

    source: str = ""

    def __init__(self) -> None:
        self._started = False

    def start(self) -> None:
        self._started = True
        self._begin()

    def stop(self) -> EnergyReading:
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}.stop() called without start()")
        self._started = False
        return self._end()

    def _begin(self) -> None:
        raise NotImplementedError

    def _end(self) -> EnergyReading:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- nvml


class NvmlMeter(EnergyMeter):
    source = "nvml"

    def __init__(self, device_index: int = 0) -> None:
        super().__init__()
        ok, reason = nvml_status(device_index)
        if not ok:
            raise EnergyMeterUnavailableError(f"nvml energy meter unavailable: {reason}")
        import pynvml

        self._nvml = pynvml
        self.device_index = device_index
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self._start_mj = 0

    def _read_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def _begin(self) -> None:
        self._start_mj = self._read_mj()

    def _end(self) -> EnergyReading:
        delta_mj = self._read_mj() - self._start_mj
        name = self._nvml.nvmlDeviceGetName(self._handle)
        return EnergyReading(
            delta_mj / 1e3, self.source,
            {"device_index": self.device_index, "device": name if isinstance(name, str) else name.decode()},
        )


def nvml_status(device_index: int = 0) -> tuple[bool, str]:
    """(available, reason): nvidia-ml-py importable, NVML initialises, the device exists and has the counter."""
    try:
        import pynvml
    except ImportError:
        return False, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        if not 0 <= device_index < count:
            return False, f"GPU index {device_index} out of range: {count} NVIDIA GPU(s) visible"
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except pynvml.NVMLError as error:
        return False, f"NVML: {error} (no NVIDIA driver/GPU, or a GPU older than Volta without the energy counter)"
    return True, "ok"


# ----------------------------------------------------------------------------------------------- rapl


@dataclasses.dataclass(frozen=True)
class RaplZone:
    path: Path
    name: str
    max_energy_range_uj: int

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text().strip())


def rapl_zones(root: Path = RAPL_ROOT) -> list[RaplZone]:
    """Readable top-level package zones under `root` (package-* by name; all top-level zones if none is)."""
    zones = []
    for path in sorted(Path(root).glob("intel-rapl:*")):
        if not _TOP_LEVEL_ZONE.match(path.name):
            continue
        try:
            zone = RaplZone(
                path, (path / "name").read_text().strip() if (path / "name").exists() else path.name,
                int((path / "max_energy_range_uj").read_text().strip()),
            )
            zone.read_uj()  # unreadable without root on kernels >= 5.10 (PLATYPUS mitigation)
        except (OSError, ValueError):
            continue
        zones.append(zone)
    packages = [zone for zone in zones if zone.name.startswith("package")]
    return packages or zones


def rapl_delta_uj(start_uj: int, end_uj: int, max_energy_range_uj: int) -> int:
    """Energy between two readings of a counter that runs through [0, max_energy_range_uj] and then wraps to 0.

    After one wrap the counter went start -> max -> 0 -> end, i.e. (max - start) + end (plus the one count of the
    wrap step itself, below the counter's resolution and ignored, as powercap readers conventionally do).
    """
    delta = end_uj - start_uj
    return delta if delta >= 0 else delta + max_energy_range_uj


class RaplMeter(EnergyMeter):
    source = "rapl"

    def __init__(self, root: str | Path = RAPL_ROOT) -> None:
        super().__init__()
        self.root = Path(root)
        self.zones = rapl_zones(self.root)
        if not self.zones:
            raise EnergyMeterUnavailableError(
                f"rapl energy meter unavailable: no readable {self.root}/intel-rapl:N/energy_uj "
                "(not an Intel/AMD RAPL machine, or energy_uj is root-only on this kernel)"
            )
        self._start_uj: list[int] = []

    def _begin(self) -> None:
        self._start_uj = [zone.read_uj() for zone in self.zones]

    def _end(self) -> EnergyReading:
        end_uj = [zone.read_uj() for zone in self.zones]
        deltas = [rapl_delta_uj(s, e, z.max_energy_range_uj) for s, e, z in zip(self._start_uj, end_uj, self.zones)]
        return EnergyReading(
            sum(deltas) / 1e6, self.source,
            {"zones": [z.name for z in self.zones], "zone_energy_j": [d / 1e6 for d in deltas]},
        )


# ----------------------------------------------------------------------------------------------- model


class ModelMeter(EnergyMeter):
    """Energy from a stated model (module docstring); its parameters are in every reading's detail."""

    source = "model"

    def __init__(
        self,
        formula: Literal["cpu_time", "macs"] = "cpu_time",
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        joules_per_mac: float = DEFAULT_JOULES_PER_MAC,
        static_w: float = 0.0,
    ) -> None:
        super().__init__()
        if formula not in MODEL_FORMULAS:
            raise ValueError(f"unknown energy model formula {formula!r}; valid: {list(MODEL_FORMULAS)}")
        for label, value in (("watts_per_core", watts_per_core), ("joules_per_mac", joules_per_mac), ("static_w", static_w)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"energy model {label} must be a number >= 0; got {value!r}")
        self.formula = formula
        self.watts_per_core = float(watts_per_core)
        self.joules_per_mac = float(joules_per_mac)
        self.static_w = float(static_w)
        self._cpu0 = self._wall0 = 0.0
        self._macs = 0

    def add_macs(self, macs: int) -> None:
        """Report multiply-adds done in the current interval (formula "macs"), e.g. GenerationResult.decode_macs."""
        if not self._started:
            raise RuntimeError("ModelMeter.add_macs() outside a start()/stop() interval")
        self._macs += int(macs)

    def _begin(self) -> None:
        self._macs = 0
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()

    def _end(self) -> EnergyReading:
        cpu_s = time.process_time() - self._cpu0
        wall_s = time.perf_counter() - self._wall0
        static_j = self.static_w * wall_s
        if self.formula == "cpu_time":
            energy_j = self.watts_per_core * cpu_s + static_j
            detail = {"formula": "watts_per_core * cpu_s + static_w * wall_s", "watts_per_core": self.watts_per_core}
        else:
            energy_j = self.joules_per_mac * self._macs + static_j
            detail = {"formula": "joules_per_mac * macs + static_w * wall_s", "joules_per_mac": self.joules_per_mac}
        detail.update(static_w=self.static_w, cpu_s=cpu_s, wall_s=wall_s, macs=self._macs)
        return EnergyReading(energy_j, self.source, detail)


# ----------------------------------------------------------------------------------------------- factory


def make_meter(
    kind: str = "auto",
    *,
    device: str | None = None,
    device_index: int = 0,
    rapl_root: str | Path = RAPL_ROOT,
    formula: Literal["cpu_time", "macs"] = "cpu_time",
    watts_per_core: float = DEFAULT_WATTS_PER_CORE,
    joules_per_mac: float = DEFAULT_JOULES_PER_MAC,
    static_w: float = 0.0,
) -> EnergyMeter:
    """The meter called `kind`; "auto" takes the first available of nvml, rapl, model.

    `device` ("cpu", "cuda", "cuda:1") says where the model runs: with "cpu", auto skips nvml (a GPU's counter says
    nothing about CPU serving); with "cuda:N", nvml reads GPU N.
    """
    if kind not in METER_KINDS:
        raise ValueError(f"unknown energy meter {kind!r}; valid: {list(METER_KINDS)}")
    if device is not None and device.startswith("cuda:"):
        device_index = int(device.split(":", 1)[1])
    if kind == "nvml":
        return NvmlMeter(device_index)
    if kind == "rapl":
        return RaplMeter(rapl_root)
    if kind == "model":
        return ModelMeter(formula, watts_per_core, joules_per_mac, static_w)
    if device is None or device.startswith("cuda"):
        if nvml_status(device_index)[0]:
            return NvmlMeter(device_index)
    if rapl_zones(Path(rapl_root)):
        return RaplMeter(rapl_root)
    return ModelMeter(formula, watts_per_core, joules_per_mac, static_w)


_CONFIG_KEYS = ("kind", "device_index", "rapl_root", "model")
_MODEL_KEYS = ("formula", "watts_per_core", "joules_per_mac", "static_w")


def meter_from_config(cfg: Any, device: str | None = None) -> EnergyMeter:
    """A meter from a `conf/energy/*.yaml` node: kind, device_index, rapl_root, model {formula, watts_per_core, ...}."""
    from helios.config import check_keys, plain

    cfg = dict(plain(cfg) or {})
    check_keys("energy config", cfg, _CONFIG_KEYS)
    model_cfg = dict(cfg.get("model") or {})
    check_keys("energy.model config", model_cfg, _MODEL_KEYS)
    return make_meter(
        cfg.get("kind", "auto"), device=device, device_index=cfg.get("device_index", 0),
        rapl_root=cfg.get("rapl_root", RAPL_ROOT), **model_cfg,
    )


def main() -> None:
    meter = make_meter("auto")
    meter.start()
    deadline = time.perf_counter() + 1.0
    spins = 0
    while time.perf_counter() < deadline:  # keep one core busy so every meter has something to see
        spins += 1
    reading = meter.stop()
    print(f"auto meter: {reading.source}; 1 s of one busy core: {reading.energy_j:.3f} J; detail {reading.detail}")
    print(f"nvml: {nvml_status()[1]}; rapl zones: {[z.name for z in rapl_zones()] or 'none readable'}")


if __name__ == "__main__":
    main()
