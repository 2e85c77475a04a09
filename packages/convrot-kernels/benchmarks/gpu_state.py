"""What state the GPU ran a measurement in: SM clock and board power, sampled by NVML.

A background thread reads the clock and power of the current device every few
milliseconds; `GpuMonitor.window()` marks one measurement and afterwards holds
the samples appended during it (list appends and slices are atomic in CPython,
so no lock is needed). On a machine without NVML (`nvidia-ml-py`) the monitor is
unavailable and every window stays empty, so benchmarks report no state rather
than a made-up one. The NVML device is the one with the current CUDA device's
index, which is the same GPU unless CUDA_VISIBLE_DEVICES reorders them.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Window:
    samples: list[tuple[float, float]] = field(default_factory=list)  # (SM MHz, watts)


@dataclass
class GpuState:
    """Median SM clock and highest power over a set of samples (None without samples)."""

    sm_mhz: float | None
    max_watts: float | None

    @staticmethod
    def of(samples: list[tuple[float, float]]) -> GpuState:
        if not samples:
            return GpuState(None, None)
        return GpuState(statistics.median(s[0] for s in samples), max(s[1] for s in samples))

    def cell(self) -> str:
        if self.sm_mhz is None:
            return "n/a"
        return f"{self.sm_mhz:.0f} MHz, {self.max_watts:.0f} W"


class GpuMonitor:
    def __init__(self, interval_s: float = 0.005):
        self._samples: list[tuple[float, float]] = []  # (SM MHz, W), appended by the sampling thread
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception as error:  # no NVML here: report nothing rather than guess
            self.available, self.reason = False, f"{type(error).__name__}: {error}"
            return
        self.available, self.reason = True, ""

        def sample() -> None:
            while not self._stop.is_set():
                mhz = pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
                watts = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
                self._samples.append((float(mhz), watts))
                time.sleep(interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def window(self):
        """Collects the samples taken while the block runs."""
        w = Window()
        first = len(self._samples)
        try:
            yield w
        finally:
            w.samples = self._samples[first:]

    def stop(self) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()
