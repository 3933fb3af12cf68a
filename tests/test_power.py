"""Power samplers and energy maths (rali_edge.profiling.power).

Sensors are simulated: INA3221 sysfs trees are built in tmp_path with the real layout, NVML
is a fake module (or an import that fails), tegrastats is a small script printing real lines.
Clocks are fake wherever a number is checked, so no test sleeps for long."""

import shutil
import sys
import textwrap
import time

import numpy as np
import pytest

from rali_edge.errors import RaliEdgeError
from rali_edge.profiling.power import (
    Ina3221Sampler,
    NullSampler,
    NvmlSampler,
    PowerSample,
    PowerTrace,
    TegrastatsSampler,
    board_total_mw,
    energy_report,
    integrate_energy,
    measure_idle,
    parse_tegrastats_line,
    pick_sampler,
)

NEVER = 3600.0  # polling interval that never fires within a test: readings are taken by hand


class FakeClock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


# ---------------------------------------------------------------- energy maths


def test_integrate_energy_linear_ramp_is_exact():
    # P(t) = 2 + 3t W on [0, 4] s: E = 2*4 + 1.5*16 = 32 J. The trapezoid rule is exact on a
    # linear curve whatever the (uneven) sample times.
    t = [0.0, 0.3, 1.0, 1.1, 2.5, 4.0]
    w = [2 + 3 * x for x in t]
    assert integrate_energy(t, w) == pytest.approx(32.0, rel=1e-12)


def test_integrate_energy_matches_numpy_and_converges():
    t = np.sort(np.random.default_rng(0).uniform(0, 10, size=400))
    w = 5 + np.sin(t)
    assert integrate_energy(list(t), list(w)) == pytest.approx(float(np.trapezoid(w, t)), rel=1e-12)
    # Dense sampling of 5 + sin t on [0, 10]: exact 50 + 1 - cos 10; trapezoid error ~ h^2/12.
    t = np.linspace(0, 10, 10001)
    assert integrate_energy(list(t), list(5 + np.sin(t))) == pytest.approx(51 - np.cos(10), abs=1e-6)


def test_integrate_energy_edge_cases():
    assert integrate_energy([], []) == 0.0
    assert integrate_energy([1.0], [5.0]) == 0.0
    with pytest.raises(ValueError):
        integrate_energy([0.0, 1.0], [1.0])
    with pytest.raises(ValueError):
        integrate_energy([0.0, 2.0, 1.0], [1.0, 1.0, 1.0])


def test_board_total_prefers_the_input_rail():
    assert board_total_mw({"VDD_IN": 5000, "VDD_SOC": 1000, "VDD_CPU_GPU_CV": 800}) == 5000
    assert board_total_mw({"POM_5V_IN": 4520, "POM_5V_CPU": 1078}) == 4520
    assert board_total_mw({"VDD_GPU_SOC": 2340, "VDD_CPU_CV": 390, "VIN_SYS_5V0": 4025}) == 6755


def test_trace_energy_extends_average_to_the_window_edges():
    # Readings only between t=2 and t=8 (tegrastats prints on its own schedule) at a constant
    # 3 W: the 10 s window used 30 J.
    samples = [PowerSample(t, 3.0) for t in (2.0, 4.0, 8.0)]
    trace = PowerTrace("x", start_s=0.0, stop_s=10.0, samples=samples)
    assert trace.average_w == pytest.approx(3.0)
    assert trace.energy_j == pytest.approx(30.0)
    # A counter wins over samples.
    trace.counter_energy_j = 12.0
    assert trace.energy_j == 12.0 and trace.average_w == pytest.approx(1.2)
    assert PowerTrace("x", 0.0, 1.0).energy_j is None


def test_energy_report_known_numbers():
    idle = PowerTrace("ina3221", 0.0, 2.0, samples=[PowerSample(0.0, 5.0), PowerSample(2.0, 5.0)])
    # Load ramps 10 -> 12 W over 10 s: 110 J.
    load = PowerTrace("ina3221", 100.0, 110.0,
                      samples=[PowerSample(100.0, 10.0), PowerSample(110.0, 12.0)])
    r = energy_report(load, images=50, idle=idle)
    assert r.available and r.source == "ina3221"
    assert r.idle_w == pytest.approx(5.0)
    assert r.load_avg_w == pytest.approx(11.0)
    assert r.energy_j == pytest.approx(110.0)
    assert r.j_per_image == pytest.approx(2.2)
    assert r.j_per_image_above_idle == pytest.approx((110.0 - 5.0 * 10.0) / 50)
    assert r.to_dict()["j_per_image"] == pytest.approx(2.2)


def test_energy_report_warns_when_load_is_below_idle():
    idle = PowerTrace("x", 0.0, 1.0, samples=[PowerSample(0.0, 8.0), PowerSample(1.0, 8.0)])
    load = PowerTrace("x", 0.0, 1.0, samples=[PowerSample(0.0, 7.0), PowerSample(1.0, 7.0)])
    r = energy_report(load, images=1, idle=idle)
    assert r.j_per_image_above_idle == pytest.approx(-1.0)
    assert any("not above idle" in w for w in r.warnings)


def test_energy_report_unavailable():
    r = energy_report(None, images=10)
    assert not r.available and r.energy_j is None
    s = NullSampler("no sensor")
    s.start()
    r = energy_report(s.stop(), images=10)
    assert not r.available and r.unavailable_reason == "no sensor" and r.j_per_image is None


# ---------------------------------------------------------------- tegrastats lines

# JetPack 5 (L4T 35), AGX Orin 64GB, from GDWR/jetson_exporter issue #14. Includes the second
# INA3221's NC (not connected) channels, which must be ignored.
LINE_JP5_AGX_ORIN = (
    "04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 CV0@-256C CPU@44.562C Tboard@32C "
    "SOC2@40.093C Tdiode@33C SOC0@41.093C CV1@-256C GPU@-256C tj@44.343C SOC1@41.25C CV2@-256C "
    "VDD_GPU_SOC 2340mW/2340mW VDD_CPU_CV 390mW/390mW VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW "
    "VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW"
)
# JetPack 6 (L4T 36), Orin Nano/NX under load, from rbonghi/jetson_stats issue #624.
LINE_JP6_ORIN_NANO = (
    "05-15-2025 18:30:28 RAM 6982/7620MB (lfb 5x1MB) SWAP 2640/16384MB (cached 202MB) "
    "CPU [97%@1984,95%@1984,95%@1984,91%@1984,88%@1984,93%@247] EMC_FREQ 18%@3199 "
    "GR3D_FREQ 84%@[713] NVENC 1%@115 NVDEC 40%@115 NVJPG off NVJPG1 off VIC 31%@115 OFA off "
    "NVDLA0 off PVA0_FREQ off APE 174 cv0@63.031C cpu@65.562C soc2@64.156C soc0@63.031C "
    "cv1@62.937C gpu@63.5C tj@65.562C soc1@64.718C cv2@60.875C "
    "VDD_IN 17946mW/15710mW VDD_CPU_GPU_CV 8896mW/7585mW VDD_SOC 3923mW/3515mW"
)
# JetPack 7 (L4T R39), AGX Orin: three values per rail and temperatures as cur/max
# (the lines rbonghi/jetson_stats tests with).
LINE_JP7_AGX_ORIN = (
    "07-25-2026 09:08:28 RAM 20642/62817MB (lfb 1x2MB) EMC_FREQ 3%@3199 GR3D_FREQ 12%@[1300,1300] "
    "APE 174 cpu@52.968C/52.968C soc2@48.406C/48.406C soc0@49.531C/49.531C gpu@47.625C/47.625C "
    "VDD_GPU_SOC 5139mW/5139mW/5139mW VDD_CPU_CV 3268mW/3268mW/3268mW VIN_SYS_5V0 5500mW/5500mW/5500mW"
)
# L4T 32 (JetPack 4): no unit. Xavier NX, and the original Nano with POM_5V_* rails.
LINE_L4T32_XAVIER_NX = (
    "RAM 2673/7765MB (lfb 118x4MB) SWAP 0/3883MB (cached 0MB) CPU [12%@1190,8%@1190,4%@1190,off,off,off] "
    "EMC_FREQ 7% GR3D_FREQ 33% AO@35C GPU@33C PMIC@100C AUX@33.5C CPU@35C thermal@33.9C "
    "VDD_IN 3902/3611 VDD_CPU_GPU_CV 1331/1180 VDD_SOC 997/941"
)
LINE_L4T32_NANO = (
    "RAM 1180/3965MB (lfb 1x2MB) SWAP 149/1024MB (cached 7MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [30%@1036,33%@1036,28%@1036,26%@1036] EMC_FREQ 10%@1600 GR3D_FREQ 0%@76 NVENC 716 NVDEC 716 "
    "APE 25 PLL@57C CPU@60.5C PMIC@100C GPU@59C AO@65C thermal@59.75C "
    "POM_5V_IN 4520/4680 POM_5V_GPU 0/0 POM_5V_CPU 1078/1205"
)


@pytest.mark.parametrize("line,rails,total", [
    (LINE_JP5_AGX_ORIN,
     {"VDD_GPU_SOC": 2340, "VDD_CPU_CV": 390, "VIN_SYS_5V0": 4025, "VDDQ_VDD2_1V8AO": 301},
     2340 + 390 + 4025 + 301),
    (LINE_JP6_ORIN_NANO, {"VDD_IN": 17946, "VDD_CPU_GPU_CV": 8896, "VDD_SOC": 3923}, 17946),
    (LINE_JP7_AGX_ORIN, {"VDD_GPU_SOC": 5139, "VDD_CPU_CV": 3268, "VIN_SYS_5V0": 5500},
     5139 + 3268 + 5500),
    (LINE_L4T32_XAVIER_NX, {"VDD_IN": 3902, "VDD_CPU_GPU_CV": 1331, "VDD_SOC": 997}, 3902),
    (LINE_L4T32_NANO, {"POM_5V_IN": 4520, "POM_5V_GPU": 0, "POM_5V_CPU": 1078}, 4520),
])
def test_parse_tegrastats_real_lines(line, rails, total):
    parsed = parse_tegrastats_line(line)
    # Instantaneous values only (the first of each rail), exact integers from the text.
    assert parsed == rails
    assert board_total_mw(parsed) == total


def test_parse_tegrastats_uses_instant_not_average():
    parsed = parse_tegrastats_line("VDD_IN 6357mW/6449mW VDD_SOC 2250mW/2262mW\n")
    assert parsed == {"VDD_IN": 6357, "VDD_SOC": 2250}


def test_parse_tegrastats_line_without_rails():
    assert parse_tegrastats_line("RAM 4722/7844MB (lfb 1x512kB) SWAP 149/1024MB (cached 7MB)") == {}
    assert parse_tegrastats_line("") == {}


# ---------------------------------------------------------------- INA3221 sysfs trees


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n")


def _hwmon_chip(root, chip, hwmon, channels, update_interval_ms=None, driver="ina3221"):
    """channels: {N: (label, mV, mA)}; a real chip also has in4-6 (shunt uV, unlabelled)."""
    d = root / "bus" / "i2c" / "drivers" / driver / chip / "hwmon" / hwmon
    _write(d / "name", "ina3221")
    for n, (label, mv, ma) in channels.items():
        _write(d / f"in{n}_label", label)
        _write(d / f"in{n}_input", mv)
        _write(d / f"curr{n}_input", ma)
        _write(d / f"in{n + 3}_input", 1234)  # shunt voltage, not a rail
    if update_interval_ms is not None:
        _write(d / "update_interval", update_interval_ms)
    return d


def make_orin_agx(root):
    """AGX Orin: no VDD_IN; 0x40 has GPU/SOC, CPU/CV and the 5 V system rail, 0x41 has
    two NC channels around VDDQ_VDD2_1V8AO. The driver also labels in7 (sum of shunts)."""
    d40 = _hwmon_chip(root, "1-0040", "hwmon3", {
        1: ("VDD_GPU_SOC", 19152, 122),
        2: ("VDD_CPU_CV", 19152, 20),
        3: ("VIN_SYS_5V0", 4976, 808),
    }, update_interval_ms=140)
    _write(d40 / "in7_label", "sum of shunt voltages")
    _write(d40 / "in7_input", 3000)
    _hwmon_chip(root, "1-0041", "hwmon4", {
        1: ("NC", 0, 0),
        2: ("VDDQ_VDD2_1V8AO", 4976, 60),
        3: ("NC", 0, 0),
    })
    return d40


def make_orin_nano(root):
    return _hwmon_chip(root, "1-0040", "hwmon1", {
        1: ("VDD_IN", 5080, 1187),
        2: ("VDD_CPU_GPU_CV", 5080, 260),
        3: ("VDD_SOC", 5080, 300),
    })


def make_old_l4t_nano(root):
    """L4T 32 `ina3221x` IIO layout: rail_name_<N> and in_power<N>_input in mW."""
    d = root / "bus" / "i2c" / "drivers" / "ina3221x" / "6-0040" / "iio:device0"
    for n, (label, mw) in enumerate([("POM_5V_IN", 4520), ("POM_5V_GPU", 0), ("POM_5V_CPU", 1078)]):
        _write(d / f"rail_name_{n}", label)
        _write(d / f"in_power{n}_input", mw)
        _write(d / f"in_current{n}_input", 900)
        _write(d / f"in_voltage{n}_input", 5000)
    return d


def _mw(mv, ma):
    return mv * ma / 1000.0


def test_ina3221_orin_agx_rails_and_total(tmp_path):
    make_orin_agx(tmp_path)
    clock = FakeClock()
    s = Ina3221Sampler(str(tmp_path), interval_s=NEVER, clock=clock)
    assert s.available and s.name == "ina3221"
    # NC channels and the sum-of-shunts channel are not rails.
    assert sorted(s.rail_names) == ["VDDQ_VDD2_1V8AO", "VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"]
    # update_interval (140 ms) from the driver sets the warning threshold.
    assert s.update_period_s == pytest.approx(0.140)
    s.start()
    clock.now = 2.0
    trace = s.stop()
    expected_w = (_mw(19152, 122) + _mw(19152, 20) + _mw(4976, 808) + _mw(4976, 60)) / 1000.0
    assert len(trace.samples) == 2  # one at start, one at stop
    assert trace.samples[0].total_w == pytest.approx(expected_w, rel=1e-12)
    assert trace.samples[0].rails_w["VIN_SYS_5V0"] == pytest.approx(_mw(4976, 808) / 1000.0)
    assert trace.energy_j == pytest.approx(expected_w * 2.0, rel=1e-12)
    assert trace.warnings == []  # 2 s > 5 * 0.14 s


def test_ina3221_orin_nano_uses_vdd_in(tmp_path):
    hw = make_orin_nano(tmp_path)
    clock = FakeClock()
    s = Ina3221Sampler(str(tmp_path), interval_s=NEVER, clock=clock)
    assert sorted(s.rail_names) == ["VDD_CPU_GPU_CV", "VDD_IN", "VDD_SOC"]
    s.start()  # t=0: VDD_IN 5080 mV * 1187 mA
    clock.now = 1.0
    (hw / "curr1_input").write_text("1987\n")
    s.sample()  # t=1
    clock.now = 3.0
    trace = s.stop()  # t=3, same current
    w0, w1 = _mw(5080, 1187) / 1000, _mw(5080, 1987) / 1000
    assert trace.total_w == pytest.approx([w0, w1, w1], rel=1e-12)
    # Trapezoid by hand: 0.5*(w0+w1)*1 + w1*2.
    assert trace.energy_j == pytest.approx(0.5 * (w0 + w1) + 2 * w1, rel=1e-12)
    assert trace.window_s == 3.0


def test_ina3221_old_l4t_in_power(tmp_path):
    make_old_l4t_nano(tmp_path)
    s = Ina3221Sampler(str(tmp_path), interval_s=NEVER, clock=FakeClock())
    assert sorted(s.rail_names) == ["POM_5V_CPU", "POM_5V_GPU", "POM_5V_IN"]
    sample = s.sample()
    assert sample.rails_w == {"POM_5V_IN": 4.52, "POM_5V_GPU": 0.0, "POM_5V_CPU": 1.078}
    assert sample.total_w == pytest.approx(4.52)


def test_ina3221_rail_disappears_mid_run(tmp_path):
    hw = make_orin_agx(tmp_path)
    clock = FakeClock()
    s = Ina3221Sampler(str(tmp_path), interval_s=NEVER, clock=clock)
    s.start()
    clock.now = 1.0
    s.sample()
    # The CPU/CV channel's files vanish (driver unbound); the run goes on without it.
    (hw / "in2_input").unlink()
    (hw / "curr2_input").unlink()
    clock.now = 2.0
    s.sample()
    clock.now = 3.0
    trace = s.stop()
    assert len(trace.samples) == 4
    assert "VDD_CPU_CV" in trace.samples[1].rails_w
    assert all("VDD_CPU_CV" not in smp.rails_w for smp in trace.samples[2:])
    remaining = (_mw(19152, 122) + _mw(4976, 808) + _mw(4976, 60)) / 1000.0
    assert trace.samples[-1].total_w == pytest.approx(remaining, rel=1e-12)
    assert "VDD_CPU_CV" not in s.rail_names
    assert sum("VDD_CPU_CV" in w and "dropped" in w for w in trace.warnings) == 1
    assert trace.available


def test_ina3221_total_rail_disappears(tmp_path):
    hw = make_orin_nano(tmp_path)
    clock = FakeClock()
    s = Ina3221Sampler(str(tmp_path), interval_s=NEVER, clock=clock)
    s.start()
    (hw / "in1_input").unlink()
    clock.now = 1.0
    trace = s.stop()
    assert trace.samples[-1].total_w == pytest.approx((_mw(5080, 260) + _mw(5080, 300)) / 1000)
    assert any("board total" in w for w in trace.warnings)


def test_ina3221_whole_chip_disappears(tmp_path):
    hw = make_orin_nano(tmp_path)
    clock = FakeClock()
    s = Ina3221Sampler(str(tmp_path), interval_s=NEVER, clock=clock)
    s.start()
    shutil.rmtree(hw)
    clock.now = 2.0
    trace = s.stop()  # must not raise
    assert len(trace.samples) == 1 and s.rail_names == []
    assert len([w for w in trace.warnings if "dropped" in w]) == 3
    assert trace.energy_j is not None  # the one reading extends to the window


def test_ina3221_absent(tmp_path):
    s = Ina3221Sampler(str(tmp_path))
    assert not s.available and "ina3221" in s.unavailable_reason
    s.start()
    trace = s.stop()
    assert not trace.available and trace.samples == []


def test_short_window_warns(tmp_path):
    make_orin_nano(tmp_path)  # no update_interval file: 0.1 s assumed
    clock = FakeClock()
    s = Ina3221Sampler(str(tmp_path), interval_s=NEVER, clock=clock)
    assert s.min_window_s == pytest.approx(0.5)
    s.start()
    clock.now = 0.2
    short = s.stop()
    assert any("shorter than" in w for w in short.warnings)
    s.start()
    clock.now = 1.0
    assert not any("shorter than" in w for w in s.stop().warnings)


def test_background_thread_polls(tmp_path):
    make_orin_nano(tmp_path)
    s = Ina3221Sampler(str(tmp_path), interval_s=0.002)
    s.start()
    deadline = time.monotonic() + 5.0
    while len(s._samples) < 5 and time.monotonic() < deadline:
        time.sleep(0.002)
    trace = s.stop()
    assert len(trace.samples) >= 6  # >= 5 polled + the final reading
    assert trace.times_s == sorted(trace.times_s)
    assert trace.average_w == pytest.approx(_mw(5080, 1187) / 1000, rel=1e-12)


def test_measure_idle_with_fake_sleep(tmp_path):
    make_orin_nano(tmp_path)
    clock = FakeClock(100.0)

    def fake_sleep(seconds):
        clock.now += seconds

    s = Ina3221Sampler(str(tmp_path), interval_s=NEVER, clock=clock)
    idle = measure_idle(s, 3.0, sleep=fake_sleep)
    assert idle.window_s == pytest.approx(3.0)
    assert idle.average_w == pytest.approx(_mw(5080, 1187) / 1000)
    assert not s.running


# ---------------------------------------------------------------- NVML


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """The parts of pynvml the sampler uses. energy_mj / power_mw are lists consumed in order."""

    NVMLError = FakeNVMLError

    def __init__(self, energy_mj=None, power_mw=None, init_error=None):
        self.energy_mj = list(energy_mj) if energy_mj is not None else None
        self.power_mw = list(power_mw) if power_mw is not None else None
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"gpu{i}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return f"uuid:{uuid}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.energy_mj is None:
            raise FakeNVMLError("Not Supported")
        return self.energy_mj.pop(0)

    def nvmlDeviceGetPowerUsage(self, handle):
        if self.power_mw is None:
            raise FakeNVMLError("Not Supported")
        value = self.power_mw.pop(0)
        if isinstance(value, Exception):
            raise value
        return value


def test_nvml_missing_library_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    s = NvmlSampler()
    assert not s.available
    assert "NVML unavailable" in s.unavailable_reason and "not installed" in s.unavailable_reason
    s.start()
    trace = s.stop()
    report = energy_report(trace, images=32)
    assert not report.available and report.energy_j is None
    assert "nvidia-ml-py" in report.unavailable_reason
    s.close()


def test_nvml_failing_init_is_unavailable():
    s = NvmlSampler(nvml=FakeNvml(init_error=FakeNVMLError("Driver Not Loaded")))
    assert not s.available and "Driver Not Loaded" in s.unavailable_reason


def test_nvml_finds_the_gpu_by_uuid_when_given_one():
    """torch's cuda:1 need not be NVML's index 1 (NVML ignores CUDA_VISIBLE_DEVICES): profile
    passes the UUID, and the sampler opens that GPU, not an index."""
    by_uuid = NvmlSampler("GPU-1234", nvml=FakeNvml(energy_mj=[0], power_mw=[5000]), interval_s=NEVER)
    by_index = NvmlSampler(2, nvml=FakeNvml(energy_mj=[0], power_mw=[5000]), interval_s=NEVER)
    assert by_uuid._handle == "uuid:GPU-1234" and by_index._handle == "gpu2"


def test_nvml_energy_counter_delta():
    # Probed once at init, then read at start and stop: 12.5 J over a 2.5 s window.
    fake = FakeNvml(energy_mj=[0, 1_000_000, 1_012_500], power_mw=[5000] * 10)
    clock = FakeClock()
    s = NvmlSampler(nvml=fake, interval_s=NEVER, clock=clock)
    assert s.has_energy_counter and s.update_period_s == NvmlSampler.COUNTER_UPDATE_S
    s.start()
    clock.now = 2.5
    trace = s.stop()
    assert trace.counter_energy_j == pytest.approx(12.5)
    assert trace.energy_j == pytest.approx(12.5) and trace.average_w == pytest.approx(5.0)
    assert trace.to_dict()["energy_from_counter"] is True
    s.close()
    assert fake.shutdowns == 1


def test_nvml_power_usage_fallback_integrates():
    # No energy counter: readings 100, 200, 300 W at t = 0, 1, 2 -> 150 + 250 = 400 J.
    fake = FakeNvml(energy_mj=None, power_mw=[0, 100_000, 200_000, 300_000])
    clock = FakeClock()
    s = NvmlSampler(nvml=fake, interval_s=NEVER, clock=clock)
    assert not s.has_energy_counter and s.has_power_usage
    assert s.update_period_s == NvmlSampler.POWER_USAGE_UPDATE_S
    s.start()
    clock.now = 1.0
    s.sample()
    clock.now = 2.0
    trace = s.stop()
    assert trace.counter_energy_j is None
    assert trace.energy_j == pytest.approx(400.0, rel=1e-12)
    # 2 s is shorter than 5 x the 1 s power-averaging period.
    assert any("shorter than" in w for w in trace.warnings)


def test_nvml_read_failing_mid_run_is_a_warning():
    fake = FakeNvml(energy_mj=None, power_mw=[0, 50_000, FakeNVMLError("GPU is lost"), 50_000])
    clock = FakeClock()
    s = NvmlSampler(nvml=fake, interval_s=NEVER, clock=clock)
    s.start()
    clock.now = 5.0
    assert s.sample() is None
    clock.now = 10.0
    trace = s.stop()
    assert len(trace.samples) == 2 and trace.energy_j == pytest.approx(500.0)
    assert any("GPU is lost" in w for w in trace.warnings)


def test_nvml_counter_that_does_not_advance_falls_back():
    fake = FakeNvml(energy_mj=[7, 7, 7], power_mw=[0, 40_000, 40_000])
    clock = FakeClock()
    s = NvmlSampler(nvml=fake, interval_s=NEVER, clock=clock)
    s.start()
    clock.now = 1.0
    trace = s.stop()
    assert trace.counter_energy_j is None and trace.energy_j == pytest.approx(40.0)
    assert any("did not advance" in w for w in trace.warnings)


# ---------------------------------------------------------------- tegrastats process


FAKE_TEGRASTATS = """\
    #!{python}
    import sys, time
    with open({argv_file!r}, "w") as f:
        f.write(" ".join(sys.argv[1:]))
    print("RAM 779/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB)", flush=True)
    for mw in (6000, 7000, 8000):
        print("VDD_IN %dmW/6625mW VDD_CPU_GPU_CV 1228mW/1230mW VDD_SOC 2380mW/2380mW" % mw, flush=True)
    time.sleep(60)
"""


def test_tegrastats_sampler_runs_and_parses(tmp_path):
    exe = tmp_path / "tegrastats"
    argv_file = tmp_path / "argv.txt"
    exe.write_text(textwrap.dedent(FAKE_TEGRASTATS).format(python=sys.executable,
                                                           argv_file=str(argv_file)))
    exe.chmod(0o755)
    s = TegrastatsSampler(str(exe), interval_s=0.05)
    assert s.available
    s.start()
    deadline = time.monotonic() + 10.0
    while len(s._samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    trace = s.stop()
    assert argv_file.read_text() == "--interval 50"
    assert [smp.total_w for smp in trace.samples] == [6.0, 7.0, 8.0]
    assert trace.samples[0].rails_w["VDD_SOC"] == pytest.approx(2.38)
    assert any("without power rails" in w for w in trace.warnings)  # the RAM-only line
    assert not any("exited with status" in w for w in trace.warnings)


def test_tegrastats_that_cannot_start_is_unavailable(tmp_path):
    exe = tmp_path / "tegrastats"
    exe.write_text("#!/nonexistent/interpreter\n")
    exe.chmod(0o755)
    s = TegrastatsSampler(str(exe))
    assert s.available  # found on disk...
    s.start()  # ...but it cannot run: no exception, power is unavailable
    trace = s.stop()
    assert not trace.available and "could not start" in trace.unavailable_reason
    assert not energy_report(trace, images=4).available


def test_tegrastats_missing(tmp_path):
    s = TegrastatsSampler(str(tmp_path / "no-such-tegrastats"))
    assert not s.available and "not found" in s.unavailable_reason


# ---------------------------------------------------------------- picking


def test_pick_sampler_auto_prefers_jetson_sysfs(tmp_path):
    make_orin_nano(tmp_path)
    s = pick_sampler("auto", sysfs_root=str(tmp_path), tegrastats=str(tmp_path / "none"))
    assert isinstance(s, Ina3221Sampler) and s.available


def test_pick_sampler_auto_without_any_sensor(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    s = pick_sampler("auto", sysfs_root=str(tmp_path), tegrastats=str(tmp_path / "none"))
    assert isinstance(s, NullSampler) and not s.available
    for word in ("INA3221", "not found", "NVML"):
        assert word.lower() in s.unavailable_reason.lower()
    s.start()
    assert energy_report(s.stop(), images=8).available is False


def test_pick_sampler_explicit_kinds(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert isinstance(pick_sampler("none"), NullSampler)
    nvml = pick_sampler("nvml")
    assert isinstance(nvml, NvmlSampler) and not nvml.available  # asked for, absent: no raise
    jetson = pick_sampler("jetson", sysfs_root=str(tmp_path))
    assert isinstance(jetson, Ina3221Sampler) and not jetson.available
    teg = pick_sampler("tegrastats", tegrastats=str(tmp_path / "none"))
    assert isinstance(teg, TegrastatsSampler) and not teg.available
    assert pick_sampler("jetson", sysfs_root=str(tmp_path), interval_s=0.2).interval_s == 0.2
    with pytest.raises(RaliEdgeError):
        pick_sampler("rapl")


@pytest.mark.gpu
def test_cuda_uuid_names_the_gpu_torch_uses():
    pynvml = pytest.importorskip("pynvml")
    import torch

    from rali_edge.profiling.power import cuda_uuid

    pynvml.nvmlInit()
    try:
        for i in range(torch.cuda.device_count()):
            handle = pynvml.nvmlDeviceGetHandleByUUID(cuda_uuid(f"cuda:{i}"))
            name = pynvml.nvmlDeviceGetName(handle)
            assert (name.decode() if isinstance(name, bytes) else name) == torch.cuda.get_device_name(i)
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.gpu
def test_real_nvml_on_a_gpu():
    s = NvmlSampler(interval_s=0.05)
    if not s.available:
        pytest.skip(s.unavailable_reason)
    s.start()
    time.sleep(0.6)
    trace = s.stop()
    s.close()
    # A powered GPU draws more than 1 W and less than 2 kW.
    assert 1.0 < trace.average_w < 2000.0
