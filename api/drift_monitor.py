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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge

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
    def __init__(self, registry: CollectorRegistry) -> None:
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()
        self.psi = Gauge("verity_drift_psi", "Population stability index of the last answers against the "
                         "model's validation split, by station, modality and signal (score, brightness).",
                         ["station", "modality", "signal"], registry=registry)  # fmt: skip
        self.not_recognised = Gauge("verity_drift_not_recognised_rate", "Share of the last answers not "
                                    "recognised, by station and modality.", ["station", "modality"],
                                    registry=registry)  # fmt: skip
        self.alert = Gauge("verity_drift_alert", "1 when a drift PSI is above the alert level, by station "
                           "and modality.", ["station", "modality"], registry=registry)  # fmt: skip

    def _station(self, station_id: str | None, modality: str) -> str:
        station = station_id or NO_STATION
        known = {key[0] for key in self._windows if key[1] == modality}
        return station if station in known or len(known) < MAX_STATIONS else OTHER

    def observe(
        self, station_id: str | None, modality: str, model: tuple[str, str], reference: dict[str, Any],
        score: float, profile: np.ndarray | None, recognised: bool | None,
    ) -> dict[str, Any]:  # fmt: skip
        """Adds one answer to its window and updates the gauges; returns the window's figures."""
        brightness = float(profile[MEDIAN_LEVEL]) if profile is not None else float("nan")
        with self._lock:
            station = self._station(station_id, modality)
            window = self._windows.get((station, modality))
            if window is None or window.model != model:
                window = self._windows[(station, modality)] = _Window(model, reference)
            window.scores.append(score)
            window.brightness.append(brightness)
            window.not_recognised.append(recognised is False)
            figures = drift_figures(reference, np.array(window.scores), np.array(window.brightness),
                                    np.array(window.not_recognised))  # fmt: skip
        for signal in ("score", "brightness"):
            value = figures[f"{signal}_psi"]
            if value is not None:
                self.psi.labels(station, modality, signal).set(value)
        if figures["not_recognised_rate"] is not None:
            self.not_recognised.labels(station, modality).set(figures["not_recognised_rate"])
        self.alert.labels(station, modality).set(1.0 if figures["alert"] else 0.0)
        return figures

    def figures(self) -> list[dict[str, Any]]:
        """Each window's figures now (station, modality, model, PSI of each signal, alert), for an admin."""
        with self._lock:
            windows = list(self._windows.items())
            return [
                {"station": station, "modality": modality, "model": f"{w.model[0]}/{w.model[1]}",
                 **drift_figures(w.reference, np.array(w.scores), np.array(w.brightness),
                                 np.array(w.not_recognised))}  # fmt: skip
                for (station, modality), w in windows
            ]
