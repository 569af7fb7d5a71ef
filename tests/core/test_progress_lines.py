"""A long step's progress reaches the log (the run's file, a scheduled run's output), not only tqdm's terminal bar."""

from __future__ import annotations

import logging
import re

import numpy as np

import components.core.progress_lines as progress_lines
from components.backbones.features import compute_features
from components.backbones.zoo import get_spec


def test_a_feature_pass_logs_how_far_it_is_how_fast_and_how_long_is_left(digits_dir, caplog, monkeypatch):
    paths = sorted(p for folder in sorted(digits_dir.iterdir()) for p in sorted(folder.iterdir()))[:40]
    monkeypatch.setattr(progress_lines, "LINE_SECONDS", 0.0)  # every batch: these 40 images take milliseconds
    with caplog.at_level(logging.INFO, logger="components.backbones.features"):
        features = compute_features(None, get_spec("efficientnet_lite0"), paths, 32, batch_size=16, desc="features efficientnet_lite0",
                                    extractor=lambda batch: batch.reshape(len(batch), -1)[:, :8].astype(np.float32))
    assert features.shape == (40, 8)
    lines = [r.getMessage() for r in caplog.records if r.name == "components.backbones.features"]
    assert len(lines) == 2, lines  # after 16 and 32 images; the end of the step is not a progress line
    assert re.fullmatch(r"features efficientnet_lite0: 16 of 40 images \(40%\), \d+ images/s, about \d+ s left", lines[0]), lines
    assert lines[1].startswith("features efficientnet_lite0: 32 of 40 images (80%)")


def test_a_step_shorter_than_the_interval_logs_nothing(caplog):
    log = logging.getLogger("components.test")
    with caplog.at_level(logging.INFO, logger="components.test"), progress_lines.ProgressLines(log, "quick", 100) as bar:
        for _ in range(10):
            bar.update(10)
    assert caplog.records == []
