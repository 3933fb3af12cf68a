"""Power and energy sampling for `rali-edge profile`.

Three real sources, one interface (PowerSampler: start(), stop() -> PowerTrace):

- NvmlSampler: desktop/server NVIDIA GPUs through NVML (nvidia-ml-py's `pynvml`). Energy comes
  from the driver's total-energy counter (mJ, Volta+) where supported; otherwise from
  nvmlDeviceGetPowerUsage polled in a background thread and integrated (trapezoid rule).
  Covers the GPU board only, not the host.
- Ina3221Sampler: Jetson's INA3221 power monitors read straight from sysfs.
- TegrastatsSampler: Jetson's `tegrastats --interval MS`, parsed line by line.

Jetson rails measure the whole module (or board); the board total is the VDD_IN rail where the
board has one (Orin NX/Nano, Xavier NX, TX2), POM_5V_IN on the original Nano, VIN on Thor;
otherwise (AGX Orin: VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0) the sum of the connected rails.

No sensor, a missing library or a failing driver never raise: the sampler reports
`available == False` with `unavailable_reason`, and the profile goes on without power.

Samplers take a `clock` and a polling `interval_s` so tests can drive them fast and
deterministically. Energy maths: integrate_energy (trapezoid), measure_idle, energy_report.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from rali_edge.errors import UsageError

# Rails that already measure the whole board/module input, in order of preference.
BOARD_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN")

# A window shorter than this many sensor update periods gives a biased energy figure:
# the first and last readings are stale and NVML's power reading is a 1 s moving average.
MIN_PERIODS_PER_WINDOW = 5


def board_total_mw(rails_mw: Mapping[str, float]) -> float:
    """Board power (mW) from per-rail readings: the total rail if there is one, else the sum."""
    for name in BOARD_TOTAL_RAILS:
        if name in rails_mw:
            return float(rails_mw[name])
    return float(math.fsum(rails_mw.values()))


def _is_unconnected(label: str) -> bool:
    # AGX Orin's second INA3221 has channels labelled "NC" (not connected); the mainline
    # driver may also expose "sum of shunt voltages" (in7), which is not a rail.
    label = label.strip()
    return label == "" or label.upper() == "NC" or label.lower().startswith("sum of shunt")


def integrate_energy(times_s: Sequence[float], watts: Sequence[float]) -> float:
    """Energy in joules under a sampled power curve, by the trapezoid rule.

    Exact for a piecewise-linear power curve whose corners are the samples.
    Fewer than two samples cover no time and give 0 J."""
    if len(times_s) != len(watts):
        raise ValueError(f"{len(times_s)} times but {len(watts)} power values")
    energy = []
    for i in range(1, len(times_s)):
        dt = float(times_s[i]) - float(times_s[i - 1])
        if dt < 0:
            raise ValueError("sample times must not go backwards")
        energy.append(0.5 * (float(watts[i]) + float(watts[i - 1])) * dt)
    return math.fsum(energy)


# ---------------------------------------------------------------- traces


@dataclass(frozen=True)
class PowerSample:
    t_s: float  # sampler clock, seconds
    total_w: float  # board (Jetson) or GPU (NVML) power
    rails_w: dict[str, float] = field(default_factory=dict)


@dataclass
class PowerTrace:
    """What one start()/stop() window measured."""

    source: str
    start_s: float
    stop_s: float
    samples: list[PowerSample] = field(default_factory=list)
    counter_energy_j: float | None = None  # from a hardware energy counter (NVML), if any
    warnings: list[str] = field(default_factory=list)
    unavailable_reason: str | None = None

    @property
    def window_s(self) -> float:
        return max(0.0, self.stop_s - self.start_s)

    @property
    def times_s(self) -> list[float]:
        return [s.t_s for s in self.samples]

    @property
    def total_w(self) -> list[float]:
        return [s.total_w for s in self.samples]

    @property
    def average_w(self) -> float | None:
        """Time-weighted mean power over the window; None when nothing was measured."""
        if self.counter_energy_j is not None and self.window_s > 0:
            return self.counter_energy_j / self.window_s
        if not self.samples:
            return None
        span = self.samples[-1].t_s - self.samples[0].t_s
        if len(self.samples) == 1 or span <= 0:
            return math.fsum(self.total_w) / len(self.samples)
        return integrate_energy(self.times_s, self.total_w) / span

    @property
    def energy_j(self) -> float | None:
        """Energy over the whole window. Without a counter it is average_w * window_s: samples
        that do not reach the window's edges (tegrastats prints on its own schedule) are
        extended by the average rather than dropped."""
        if self.counter_energy_j is not None:
            return self.counter_energy_j
        avg = self.average_w
        return None if avg is None else avg * self.window_s

    @property
    def available(self) -> bool:
        return self.energy_j is not None

    def to_dict(self, include_samples: bool = False) -> dict:
        out = {
            "source": self.source,
            "available": self.available,
            "unavailable_reason": self.unavailable_reason,
            "window_s": self.window_s,
            "n_samples": len(self.samples),
            "average_w": self.average_w,
            "energy_j": self.energy_j,
            "energy_from_counter": self.counter_energy_j is not None,
            "warnings": list(self.warnings),
        }
        if include_samples:
            out["samples"] = [
                {"t_s": s.t_s - self.start_s, "total_w": s.total_w, "rails_w": dict(s.rails_w)}
                for s in self.samples
            ]
        return out


# ---------------------------------------------------------------- sampler base


class PowerSampler:
    """Base class: start() begins a measurement window, stop() ends it and returns a PowerTrace.

    Subclasses implement _read_rails_mw() (one reading: rail -> mW). The base class takes a
    reading at start(), every `interval_s` in a background thread, and at stop(), so the trace
    spans the whole window. It is reusable: each start()/stop() pair is a new window.

    `update_period_s` is how often the sensor's value really changes; windows shorter than
    `min_window_s` get a warning in the trace."""

    name = "base"
    polls = True  # False for sources that push readings (tegrastats)

    def __init__(self, *, interval_s: float = 0.05, clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = float(interval_s)
        self.clock = clock
        self.update_period_s = self.interval_s
        self.unavailable_reason: str | None = None
        self._lock = threading.Lock()
        self._samples: list[PowerSample] = []
        self._warnings: list[str] = []
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._start_s: float | None = None

    # -- what subclasses provide
    def _read_rails_mw(self) -> dict[str, float]:
        raise NotImplementedError

    def _begin(self) -> None:
        """Hook run at start() before the first reading."""

    def _end(self) -> float | None:
        """Hook run at stop() after the last reading; may return counter energy in J."""
        return None

    # -- public
    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    @property
    def min_window_s(self) -> float:
        return MIN_PERIODS_PER_WINDOW * self.update_period_s

    @property
    def running(self) -> bool:
        return self._start_s is not None

    def warn(self, message: str) -> None:
        with self._lock:
            if message not in self._warnings:
                self._warnings.append(message)

    def record(self, rails_mw: Mapping[str, float], t_s: float | None = None) -> PowerSample | None:
        """Add one reading (rail -> mW) to the current window."""
        if not rails_mw:
            return None
        sample = PowerSample(
            t_s=self.clock() if t_s is None else t_s,
            total_w=board_total_mw(rails_mw) / 1000.0,
            rails_w={k: float(v) / 1000.0 for k, v in rails_mw.items()},
        )
        with self._lock:
            self._samples.append(sample)
        return sample

    def sample(self) -> PowerSample | None:
        """Take one reading now. Never raises: a failing read becomes a warning."""
        try:
            rails = self._read_rails_mw()
        except Exception as exc:  # a driver hiccup must not kill the profile
            self.warn(f"{self.name}: reading failed: {exc}")
            return None
        return self.record(rails)

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} sampler already started")
        with self._lock:
            self._samples = []
            self._warnings = []
        self._start_s = self.clock()
        if not self.available:
            return
        try:
            self._begin()
        except Exception as exc:  # e.g. tegrastats cannot be executed: no power, but no crash
            self.unavailable_reason = f"{self.name} could not start: {type(exc).__name__}: {exc}"
            return
        if self.polls:
            self.sample()
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._poll, name=f"{self.name}-power", daemon=True)
            self._thread.start()

    def stop(self) -> PowerTrace:
        if not self.running:
            raise RuntimeError(f"{self.name} sampler stopped before it was started")
        counter_j = None
        if self.available:
            if self._thread is not None:
                self._stop_event.set()
                self._thread.join()
                self._thread = None
            if self.polls:
                self.sample()
            try:
                counter_j = self._end()
            except Exception as exc:
                self.warn(f"{self.name}: could not finish the measurement: {exc}")
        stop_s = self.clock()
        with self._lock:
            trace = PowerTrace(
                source=self.name,
                start_s=self._start_s,
                stop_s=stop_s,
                samples=sorted(self._samples, key=lambda s: s.t_s),
                counter_energy_j=counter_j,
                warnings=list(self._warnings),
                unavailable_reason=self.unavailable_reason,
            )
        self._start_s = None
        if self.available:
            trace.warnings += self._window_warnings(trace)
        return trace

    def close(self) -> None:
        """Release the sensor (NVML handle, tegrastats process)."""
        if self.running:
            self.stop()

    def __enter__(self) -> "PowerSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals
    def _poll(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.sample()

    def _window_warnings(self, trace: PowerTrace) -> list[str]:
        out = []
        if trace.window_s < self.min_window_s:
            out.append(
                f"{self.name}: the measured window ({trace.window_s:.3g} s) is shorter than "
                f"{MIN_PERIODS_PER_WINDOW} sensor update periods ({self.update_period_s:.3g} s each); "
                f"energy is unreliable. Measure for at least {self.min_window_s:.3g} s (--duration)."
            )
        if trace.counter_energy_j is None and len(trace.samples) < 2:
            out.append(f"{self.name}: only {len(trace.samples)} power reading(s) in the window.")
        return out


class NullSampler(PowerSampler):
    """No power measurement (`--power none`, or no sensor found)."""

    name = "none"

    def __init__(self, reason: str = "power measurement disabled", **kwargs):
        super().__init__(**kwargs)
        self.unavailable_reason = reason

    def _read_rails_mw(self) -> dict[str, float]:
        return {}


# ---------------------------------------------------------------- NVML


class NvmlSampler(PowerSampler):
    """GPU power through NVML. `nvml` is the pynvml module (injectable for tests)."""

    name = "nvml"

    # nvmlDeviceGetTotalEnergyConsumption updates every 20-100 ms; nvmlDeviceGetPowerUsage is
    # a 1-second moving average on Ampere and newer.
    COUNTER_UPDATE_S = 0.1
    POWER_USAGE_UPDATE_S = 1.0

    def __init__(self, gpu: int | str = 0, *, interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, nvml=None):
        """`gpu`: NVML's index, or the GPU's UUID ("GPU-..."; see cuda_uuid). NVML numbers GPUs in
        PCI-bus order and ignores CUDA_VISIBLE_DEVICES, so an index from torch is not NVML's."""
        super().__init__(interval_s=interval_s, clock=clock)
        self.gpu = gpu
        self._nvml = None
        self._handle = None
        self.has_energy_counter = False
        self.has_power_usage = False
        self._counter_start_mj: int | None = None
        try:
            if nvml is None:
                import pynvml as nvml  # from nvidia-ml-py
            nvml.nvmlInit()
            self._nvml = nvml
            self._handle = (nvml.nvmlDeviceGetHandleByUUID(gpu) if isinstance(gpu, str)
                            else nvml.nvmlDeviceGetHandleByIndex(gpu))
        except ImportError:
            self.unavailable_reason = (
                "NVML unavailable: the nvidia-ml-py package (module pynvml) is not installed; "
                "`pip install rali-edge[profile]`"
            )
            return
        except Exception as exc:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            self._shutdown()
            self.unavailable_reason = f"NVML unavailable: {type(exc).__name__}: {exc}".rstrip(": ")
            return
        self.has_energy_counter = self._try(nvml.nvmlDeviceGetTotalEnergyConsumption) is not None
        self.has_power_usage = self._try(nvml.nvmlDeviceGetPowerUsage) is not None
        if not (self.has_energy_counter or self.has_power_usage):
            self._shutdown()
            self.unavailable_reason = (
                f"NVML GPU {gpu} reports neither an energy counter nor power usage"
            )
            return
        self.update_period_s = (
            self.COUNTER_UPDATE_S if self.has_energy_counter else self.POWER_USAGE_UPDATE_S
        )

    def _try(self, fn):
        try:
            return fn(self._handle)
        except Exception:
            return None

    def _read_rails_mw(self) -> dict[str, float]:
        if not self.has_power_usage:
            return {}
        return {"GPU": float(self._nvml.nvmlDeviceGetPowerUsage(self._handle))}

    def _begin(self) -> None:
        self._counter_start_mj = None
        if self.has_energy_counter:
            self._counter_start_mj = self._try(self._nvml.nvmlDeviceGetTotalEnergyConsumption)
            if self._counter_start_mj is None:
                self.warn("nvml: energy counter read failed at start; integrating power instead")

    def _end(self) -> float | None:
        if self._counter_start_mj is None:
            return None
        end_mj = self._try(self._nvml.nvmlDeviceGetTotalEnergyConsumption)
        if end_mj is None:
            self.warn("nvml: energy counter read failed at stop; integrating power instead")
            return None
        delta_j = (int(end_mj) - int(self._counter_start_mj)) / 1000.0
        if delta_j <= 0:
            self.warn("nvml: the energy counter did not advance during the window; "
                      "integrating power instead (measure for longer)")
            return None
        return delta_j

    def _shutdown(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._nvml = None
        self._handle = None

    def close(self) -> None:
        super().close()
        self._shutdown()


# ---------------------------------------------------------------- Jetson INA3221 (sysfs)


@dataclass
class _Rail:
    name: str
    chip: str  # I2C device folder, e.g. "1-0040"
    power_file: str | None = None  # older L4T (ina3221x): in_power<N>_input, mW
    volt_file: str | None = None  # mainline hwmon: in<N>_input, mV
    curr_file: str | None = None  # mainline hwmon: curr<N>_input, mA

    def read_mw(self) -> float:
        if self.power_file is not None:
            return float(_read_number(self.power_file))
        return _read_number(self.volt_file) * _read_number(self.curr_file) / 1000.0


def _read_number(path: str) -> float:
    with open(path, encoding="ascii") as f:
        return float(f.read().split()[0])


def _read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read().strip()


def find_ina3221_rails(sysfs_root: str = "/sys") -> tuple[list[_Rail], float | None]:
    """Rails of every INA3221 under `sysfs_root`, and the slowest chip update interval (s).

    Mainline driver (JetPack 5+): bus/i2c/drivers/ina3221/<dev>/hwmon/hwmon<K>/in<N>_label,
    in<N>_input (mV), curr<N>_input (mA). Older L4T driver `ina3221x`:
    bus/i2c/drivers/ina3221x/<dev>/iio:device<K>/rail_name_<N>, in_power<N>_input (mW)."""
    drivers = os.path.join(sysfs_root, "bus", "i2c", "drivers")
    rails: list[_Rail] = []
    update_s: float | None = None
    for hwmon in sorted(glob.glob(os.path.join(drivers, "ina3221*", "*", "hwmon", "hwmon*"))):
        chip = os.path.basename(os.path.dirname(os.path.dirname(hwmon)))
        for label_file in sorted(glob.glob(os.path.join(hwmon, "in*_label"))):
            m = re.fullmatch(r"in(\d+)_label", os.path.basename(label_file))
            if not m:
                continue
            n = m.group(1)
            volt, curr = os.path.join(hwmon, f"in{n}_input"), os.path.join(hwmon, f"curr{n}_input")
            try:
                label = _read_text(label_file)
            except OSError:
                continue
            if _is_unconnected(label) or not (os.path.exists(volt) and os.path.exists(curr)):
                continue
            rails.append(_Rail(label, chip, volt_file=volt, curr_file=curr))
        try:  # ms, documented in Documentation/hwmon/ina3221.rst
            ms = _read_number(os.path.join(hwmon, "update_interval"))
            update_s = max(update_s or 0.0, ms / 1000.0)
        except (OSError, ValueError, IndexError):
            pass
    for iio in sorted(glob.glob(os.path.join(drivers, "ina3221*", "*", "iio:device*"))):
        chip = os.path.basename(os.path.dirname(iio))
        for label_file in sorted(glob.glob(os.path.join(iio, "rail_name_*"))):
            m = re.fullmatch(r"rail_name_(\d+)", os.path.basename(label_file))
            power = os.path.join(iio, f"in_power{m.group(1)}_input") if m else None
            if power is None or not os.path.exists(power):
                continue
            try:
                label = _read_text(label_file)
            except OSError:
                continue
            if not _is_unconnected(label):
                rails.append(_Rail(label, chip, power_file=power))
    # Two chips could reuse a label; keep both, told apart by chip.
    seen: dict[str, int] = {}
    for rail in rails:
        seen[rail.name] = seen.get(rail.name, 0) + 1
    for rail in rails:
        if seen[rail.name] > 1:
            rail.name = f"{rail.name}@{rail.chip}"
    return rails, update_s


class Ina3221Sampler(PowerSampler):
    """Jetson INA3221 rails polled from sysfs in a background thread.

    A rail whose files vanish mid-run (driver unbound, hot-unplugged carrier sensor) is dropped
    with a warning; the run goes on with the others."""

    name = "ina3221"
    DEFAULT_UPDATE_S = 0.1  # used when the driver does not expose update_interval

    def __init__(self, sysfs_root: str = "/sys", *, interval_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(interval_s=interval_s, clock=clock)
        self.sysfs_root = sysfs_root
        self.rails, update_s = find_ina3221_rails(sysfs_root)
        self.update_period_s = update_s or self.DEFAULT_UPDATE_S
        if not self.rails:
            self.unavailable_reason = (
                f"no INA3221 power rails under {os.path.join(sysfs_root, 'bus/i2c/drivers/ina3221*')}"
            )

    @property
    def rail_names(self) -> list[str]:
        return [r.name for r in self.rails]

    def _read_rails_mw(self) -> dict[str, float]:
        out: dict[str, float] = {}
        lost = []
        for rail in list(self.rails):
            try:
                out[rail.name] = rail.read_mw()
            except (OSError, ValueError, IndexError) as exc:
                lost.append(rail)
                self.warn(
                    f"ina3221: rail {rail.name} ({rail.chip}) stopped answering "
                    f"({type(exc).__name__}); dropped, the power total after this point excludes it"
                )
        if lost:
            with self._lock:
                self.rails = [r for r in self.rails if r not in lost]
            if any(r.name in BOARD_TOTAL_RAILS for r in lost):
                self.warn("ina3221: the board total rail was lost; the total is now the sum of "
                          "the remaining rails")
        return out


# ---------------------------------------------------------------- tegrastats

# JetPack 5/6: "VDD_IN 4761mW/4777mW" (instant/average).
# JetPack 7:   "VDD_GPU_SOC 5139mW/5139mW/5139mW" (instant first, then running statistics).
_RAIL_MW = re.compile(r"(?<!\S)([A-Z][A-Z0-9_]*) (\d+(?:\.\d+)?)mW(?:/\d+(?:\.\d+)?mW){0,2}(?!\S)")
# L4T 32 (JetPack 4): "VDD_IN 3902/3611", "POM_5V_IN 4520/4680" (mW without a unit). Only names
# that are rails: "RAM 4722/7844MB" and "SWAP 0/3883MB" carry a unit and never match.
_RAIL_BARE = re.compile(r"(?<!\S)((?:VDD|POM)_[A-Z0-9_]+) (\d+)/(\d+)(?!\S)")


def parse_tegrastats_line(line: str) -> dict[str, float]:
    """Instantaneous power per rail (mW) in one tegrastats line; {} if it has none.

    Only the first (instantaneous) value of each rail is kept: the average/peak that follow
    are tegrastats' own running statistics since it started, which do not match our window."""
    rails: dict[str, float] = {}
    for name, inst in _RAIL_MW.findall(line):
        if not _is_unconnected(name):
            rails[name] = float(inst)
    if not rails:
        for name, inst, _avg in _RAIL_BARE.findall(line):
            rails[name] = float(inst)
    return rails


class TegrastatsSampler(PowerSampler):
    """Runs `tegrastats --interval MS` for the window and parses each line it prints."""

    name = "tegrastats"
    polls = False

    def __init__(self, executable: str = "tegrastats", *, interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(interval_s=interval_s, clock=clock)
        self.executable = shutil.which(executable)
        self.update_period_s = self.interval_s
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        if self.executable is None:
            self.unavailable_reason = f"`{executable}` not found on PATH"

    def _begin(self) -> None:
        interval_ms = max(1, round(self.interval_s * 1000))
        self._proc = subprocess.Popen(
            [self.executable, "--interval", str(interval_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self._reader = threading.Thread(target=self._read_lines, args=(self._proc,),
                                        name="tegrastats-reader", daemon=True)
        self._reader.start()

    def _read_lines(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if not self.running:
                break
            rails = parse_tegrastats_line(line)
            if rails:
                self.record(rails)
            else:
                self.warn("tegrastats: a line without power rails was ignored")

    def _end(self) -> float | None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = proc.returncode
            # Killed by our SIGTERM is the normal end; anything else means tegrastats failed.
            if rc not in (0, -15, 143):
                self.warn(f"tegrastats exited with status {rc}")
        if self._reader is not None:
            self._reader.join(timeout=2.0)
            self._reader = None
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        return None

    def _read_rails_mw(self) -> dict[str, float]:
        return {}  # readings arrive through _read_lines


# ---------------------------------------------------------------- picking a sampler

POWER_KINDS = ("auto", "nvml", "jetson", "tegrastats", "none")


def cuda_uuid(device) -> str:
    """NVML's name ("GPU-<uuid>") of the CUDA device torch calls `device`."""
    import torch

    uuid = str(torch.cuda.get_device_properties(torch.device(device)).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def pick_sampler(kind: str = "auto", *, sysfs_root: str = "/sys", gpu: int | str = 0,
                 tegrastats: str = "tegrastats", interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> PowerSampler:
    """The sampler for `--power KIND`. Never raises for a missing sensor: an explicitly asked
    kind that is absent comes back with available == False and its reason.

    auto prefers the Jetson board sensors (they include CPU and memory, which matter on an
    SoC) over tegrastats (a child process that costs some CPU), then NVML, then none."""
    kind = (kind or "auto").lower()
    if kind not in POWER_KINDS:
        raise UsageError(f"unknown power source {kind!r}; choose one of {', '.join(POWER_KINDS)}")
    kw = {"clock": clock}
    if interval_s is not None:
        kw["interval_s"] = interval_s
    if kind == "none":
        return NullSampler("power measurement disabled (--power none)", **kw)
    makers = {
        "jetson": lambda: Ina3221Sampler(sysfs_root, **kw),
        "tegrastats": lambda: TegrastatsSampler(tegrastats, **kw),
        "nvml": lambda: NvmlSampler(gpu, **kw),
    }
    if kind != "auto":
        return makers[kind]()
    reasons = []
    for name in ("jetson", "tegrastats", "nvml"):
        sampler = makers[name]()
        if sampler.available:
            return sampler
        reasons.append(sampler.unavailable_reason)
        sampler.close()
    return NullSampler("no power sensor found: " + "; ".join(reasons), **kw)


# ---------------------------------------------------------------- idle and energy report


def measure_idle(sampler: PowerSampler, seconds: float, *,
                 sleep: Callable[[float], None] = time.sleep) -> PowerTrace:
    """Idle power: sample for `seconds` while nothing runs. Take it before the model loads
    work onto the GPU and after warm-up clocks settle, so "above idle" means the inference."""
    sampler.start()
    try:
        sleep(seconds)
    finally:
        trace = sampler.stop()
    return trace


@dataclass
class EnergyReport:
    """Power and energy of one load window, for profile.json / profile.md."""

    source: str
    available: bool
    unavailable_reason: str | None = None
    idle_w: float | None = None
    load_avg_w: float | None = None
    load_window_s: float | None = None
    energy_j: float | None = None
    images: int = 0
    j_per_image: float | None = None
    j_per_image_above_idle: float | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def energy_report(load: PowerTrace | None, images: int,
                  idle: PowerTrace | None = None) -> EnergyReport:
    """Energy per image, total and above idle, from a load window and an optional idle window."""
    if load is None:
        return EnergyReport(source="none", available=False, unavailable_reason="no power sampler")
    if not load.available:
        return EnergyReport(
            source=load.source, available=False,
            unavailable_reason=load.unavailable_reason or "no power readings in the load window",
            warnings=list(load.warnings), images=images,
        )
    warnings = list(load.warnings)
    idle_w = None
    if idle is not None:
        warnings += [f"idle: {w}" for w in idle.warnings]
        idle_w = idle.average_w
        if idle_w is None:
            warnings.append("idle power was not measured; energy above idle is left out")
    energy = load.energy_j
    per_image = energy / images if images > 0 else None
    above = None
    if idle_w is not None and images > 0:
        above = (energy - idle_w * load.window_s) / images
        if above < 0:
            warnings.append("load power is not above idle power; energy above idle is noise")
    return EnergyReport(
        source=load.source, available=True, idle_w=idle_w, load_avg_w=load.average_w,
        load_window_s=load.window_s, energy_j=energy, images=images, j_per_image=per_image,
        j_per_image_above_idle=above, warnings=warnings,
    )
