"""Live drift per station and modality (inference.drift): the last WINDOW answers of each, held against
the validation distribution of the model that gave them, as /metrics gauges with an alert.

    verity_drift_psi{station, modality, signal}      PSI of the scores or of the images' brightness
    verity_drift_not_recognised_rate{station, modality}
    verity_drift_alert{station, modality}            1 when a PSI is above inference.drift.DRIFT_ALERT_PSI

A station is the answer's station id ("-" for none). Station ids sent without a key are claims, so at most
MAX_STATIONS are tracked one by one and the rest share "other": the gauges cannot be grown without bound.
A window restarts when its modality's model changes (a promotion): the reference is that model's.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from verity.inference.drift import WINDOW, drift_figures
from verity.inference.input_profile import MEDIAN_LEVEL

MAX_STATIONS = 200
OTHER = "other"
NO_STATION = "-"


@dataclass
class _Window:
    model: tuple[str, str]
    reference: dict[str, Any]
    scores: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    brightness: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    not_recognised: deque[bool] = field(default_factory=lambda: deque(maxlen=WINDOW))


class DriftMonitor:
    """Each answer is appended to its window; the figures are computed when they are read (a /metrics
    scrape, the admin's lifecycle view), not per answer: a scrape every few seconds costs what a PSI per
    verdict would cost at every request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()
        registry.register(_DriftCollector(self))

    def _station(self, station_id: str | None, modality: str) -> str:
        station = station_id or NO_STATION
        known = {key[0] for key in self._windows if key[1] == modality}
        return station if station in known or len(known) < MAX_STATIONS else OTHER

    def observe(
        self, station_id: str | None, modality: str, model: tuple[str, str], reference: dict[str, Any],
        score: float, profile: np.ndarray | None, recognised: bool | None,
    ) -> None:  # fmt: skip
        """Adds one answer to its window."""
        brightness = float(profile[MEDIAN_LEVEL]) if profile is not None else float("nan")
        with self._lock:
            station = self._station(station_id, modality)
            window = self._windows.get((station, modality))
            if window is None or window.model != model:
                window = self._windows[(station, modality)] = _Window(model, reference)
            window.scores.append(score)
            window.brightness.append(brightness)
            window.not_recognised.append(recognised is False)

    def figures(self) -> list[dict[str, Any]]:
        """Each window's figures now (station, modality, model, PSI of each signal, alert)."""
        with self._lock:
            windows = [(key, w.model, w.reference, np.array(w.scores), np.array(w.brightness),
                        np.array(w.not_recognised)) for key, w in self._windows.items()]  # fmt: skip
        return [
            {"station": station, "modality": modality, "model": f"{model[0]}/{model[1]}",
             **drift_figures(reference, scores, brightness, flags)}  # fmt: skip
            for (station, modality), model, reference, scores, brightness, flags in windows
        ]


class _DriftCollector:
    """The drift gauges, computed from the windows at each scrape (prometheus_client's collector protocol)."""

    def __init__(self, monitor: DriftMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        psi, not_recognised, alert = self._families()
        for row in self.monitor.figures():
            labels = [row["station"], row["modality"]]
            for signal in ("score", "brightness"):
                if row[f"{signal}_psi"] is not None:
                    psi.add_metric([*labels, signal], row[f"{signal}_psi"])
            if row["not_recognised_rate"] is not None:
                not_recognised.add_metric(labels, row["not_recognised_rate"])
            alert.add_metric(labels, 1.0 if row["alert"] else 0.0)
        yield from (psi, not_recognised, alert)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("verity_drift_psi", "Population stability index of the last answers against "
                              "the model's validation split, by station, modality and signal (score, "
                              "brightness).", labels=["station", "modality", "signal"]),  # fmt: skip
            GaugeMetricFamily("verity_drift_not_recognised_rate", "Share of the last answers not "
                              "recognised, by station and modality.", labels=["station", "modality"]),
            GaugeMetricFamily("verity_drift_alert", "1 when a drift PSI is above the alert level, by station "
                              "and modality.", labels=["station", "modality"]),  # fmt: skip
        )
