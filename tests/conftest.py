"""Shared pytest fixtures, and the rule that CI fails rather than skips.

Under CI (``$CI`` set to anything but empty, 0, false or no; ``.ci/run`` sets it) a skipped test or
module is reported as a failure: a missing browser, data set or optional package means the run
did not test what it claims. Only tests marked ``gpu`` (they need a CUDA device, which CI machines
do not have) may skip there.

Real-speech data fixtures (session-scoped) use ``granite_stream_testing.datasets``: the data is
fetched into the cache (``$GRANITE_STREAM_DATA`` or ``~/.cache/granite-stream/data``)
on first use; CI runs ``scripts/fetch_data`` up front.  If fetching is impossible
(no apt-get/pip, no network) the tests using these fixtures are skipped, unless
``GRANITE_STREAM_REQUIRE_DATA=1`` is set, in which case they fail.  A checksum
mismatch always fails.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from granite_stream_testing import datasets
from granite_stream_testing.datasets import Clip


IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; the only tests that may skip under CI")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_skip(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"{what} was skipped under CI ({_skip_reason(report)}); CI must run it: install what it "
                       "needs (scripts/setup, scripts/setup-system, scripts/fetch_data) or mark it gpu if it needs CUDA")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None:
        _fail_skip(report, item.nodeid)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    report = yield
    if IN_CI and report.skipped:  # a module that skips itself (pytest.skip(allow_module_level=True))
        _fail_skip(report, collector.nodeid)
    return report


def _load(name: str, split: str = "dev") -> list[Clip]:
    try:
        return datasets.load_set(name, split)
    except datasets.FetchError as e:
        if os.environ.get("GRANITE_STREAM_REQUIRE_DATA", "") not in ("", "0"):
            raise
        pytest.skip(f"real speech data {name!r} unavailable (run scripts/fetch_data): {e}")


@pytest.fixture(scope="session")
def librivox_clips() -> list[Clip]:
    """The 5 LibriVox clips from the pocketsphinx 5.1.1 sdist (16 kHz WAV, English)."""
    return _load("librivox")


@pytest.fixture(scope="session")
def librivox_wav_paths(librivox_clips: list[Clip]) -> list[Path]:
    """Absolute paths of the 5 LibriVox WAVs (16 kHz mono 16-bit)."""
    return [c.audio_path for c in librivox_clips]


@pytest.fixture(scope="session")
def asterisk_en_dev() -> list[Clip]:
    """English Asterisk prompts, dev split only (8 kHz WAV; eval is held out)."""
    return _load("asterisk-en", "dev")


@pytest.fixture(scope="session")
def goforward() -> Clip:
    """pocketsphinx goforward.raw (16 kHz s16le raw): "go forward ten meters"."""
    return _load("goforward")[0]


@pytest.fixture(scope="session")
def whisper_engine():
    """The real offline default engine: bundled Whisper tiny.en (int8, CPU), loaded once per run."""
    from stream_server.engines.whisper import WhisperEngine

    return WhisperEngine(cpu_threads=2)


@pytest.fixture
def self_signed(tmp_path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 and its key (PEM), made with openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key
