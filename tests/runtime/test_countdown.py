"""Countdown (a phase of a job that is not a training loop, e.g. evaluate's feature passes): its
start and end always logged, progress lines with an ETA at most every LATENTPIPE_PROGRESS_SECONDS,
none for the last update (the end line says it)."""

import logging

from pipeline.runtime.progress import PROGRESS_SECONDS_ENV, Countdown


def _lines(caplog):
    return [r.getMessage() for r in caplog.records]


def test_every_update_is_a_line_without_a_minimum_interval(caplog, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    with caplog.at_level(logging.INFO, logger="pipeline.runtime.progress"):
        progress = Countdown("evaluate: features", 10, "images")
        progress.update(4)
        progress.update(10)
        progress.finish("cached")
    start, middle, end = _lines(caplog)
    assert start == "evaluate: features: 10 images ..."
    assert middle.startswith("evaluate: features: 4/10 images, elapsed 0:00:00, ETA 0:00:0")
    assert end.startswith("evaluate: features: done in 0:00:00") and end.endswith("(cached)")


def test_updates_within_the_interval_are_quiet(caplog, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "3600")
    with caplog.at_level(logging.INFO, logger="pipeline.runtime.progress"):
        progress = Countdown("likelihood", 1.0, "of the range")
        for done in (0.25, 0.5, 0.75):
            progress.update(done)
        progress.finish()
    assert _lines(caplog) == ["likelihood: 1.00 of the range ...", "likelihood: done in 0:00:00"]
