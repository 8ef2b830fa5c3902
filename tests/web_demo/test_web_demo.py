"""The browser demo (web_demo/) in a real browser: Debian's Chromium, headless, driven by Playwright,
with a fake microphone that plays a real LibriVox clip into the page's AudioWorklet.

The browser tests are skipped when Chromium is not installed (run scripts/setup-system), except
under CI (``CI`` set), where a missing Chromium fails them. Screenshots, the exported captions and
a console log go to ``artifacts/`` in the repository root.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from granite_stream_testing.datasets import read_audio
from stream_server.core import captions
from stream_server.core.session import SessionSettings
from stream_server.server.app import NetworkSettings, ServerSettings, StreamServer
from tests.fakes import CountingEngine

ROOT = Path(__file__).resolve().parents[2]
EARLY_STABLE = SessionSettings(stable_agreement_s=1.5)
ARTIFACTS = ROOT / "artifacts"
WEB_ROOT = ROOT / "web_demo"
CHROMIUM = os.environ.get("GRANITE_STREAM_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
HAVE_CHROMIUM = Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)

needs_chromium = pytest.mark.skipif(
    not HAVE_CHROMIUM and not IN_CI,
    reason=f"Chromium not found at {CHROMIUM} (install it with scripts/setup-system); under CI this test fails instead",
)

# The flags for a closed network (nothing may phone home) and a fake microphone.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]

# Anything the page would fetch from elsewhere (it must work offline): imports, src/href, url(), fetch.
REMOTE = re.compile(rb"""(\bfrom\s*|import\s*\(\s*|src=|href=|url\(|fetch\(|WebSocket\()['"]?(https?|wss?):""")

LEAD_S, TAIL_S = 1.0, 2.5  # silence around the clip in the fake microphone's (looping) WAV
# Bounds on waits for the page: generous, since a loaded 2-core CI machine runs Chromium, the server
# and Whisper at once; a wait ends as soon as its condition holds, so a fast machine is not slowed.
PATIENCE = 3.0


def normalize(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def write_wav(path: Path, audio: np.ndarray, rate: int) -> float:
    """A 16-bit mono WAV of `audio` with silence around it; returns its duration in seconds."""
    signal = np.concatenate([np.zeros(int(LEAD_S * rate)), audio, np.zeros(int(TAIL_S * rate))])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
    return signal.size / rate


def parse_srt(text: str) -> list[dict]:
    cues = []
    for block in text.strip().split("\n\n"):
        number, times, *lines = block.split("\n")
        match = re.fullmatch(r"(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)", times)
        assert match, f"bad SRT timing line {times!r}"
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, match.groups())
        cues.append({
            "number": int(number),
            "start": h1 * 3600 + m1 * 60 + s1 + ms1 / 1000,
            "end": h2 * 3600 + m2 * 60 + s2 + ms2 / 1000,
            "text": "\n".join(lines),
        })
    return cues


def recall(reference: str, hypothesis: str) -> float:
    """Share of the reference's words that occur in the hypothesis."""
    ref, hyp = normalize(reference), set(normalize(hypothesis))
    return sum(word in hyp for word in ref) / len(ref)


async def http_get(port: int, path: str, headers: dict | None = None):
    def get():
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    return await asyncio.to_thread(get)


def playwright_or_fail():
    if not HAVE_CHROMIUM:
        pytest.fail(f"CI is set but Chromium is missing at {CHROMIUM}: run scripts/setup-system")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return async_playwright


class Page:
    """A Chromium page on the demo, with its console errors and WebSocket traffic recorded."""

    def __init__(self, context, page):
        self.context, self.page = context, page
        self.errors: list[str] = []
        self.console: list[str] = []
        self.sent_text: list[dict] = []
        self.sent_binary: list[int] = []
        self.received: list[dict] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("websocket", self._websocket)

    def _console(self, message) -> None:
        self.console.append(f"{message.type}: {message.text}")
        # A reconnecting page logs failed WebSocket attempts; that is expected, anything else is not.
        if message.type == "error" and "WebSocket connection to" not in message.text:
            self.errors.append(message.text)

    def _websocket(self, ws) -> None:
        def sent(payload):
            if isinstance(payload, str):
                self.sent_text.append(json.loads(payload))
            else:
                self.sent_binary.append(len(payload))

        ws.on("framesent", sent)
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    async def final_texts(self) -> list[str]:
        """Captions of server finals (not what a lost connection left of a partial)."""
        return await self.page.locator("#finals li.final:not(.interrupted) .text").all_inner_texts()

    async def wait_for(self, predicate, timeout: float, what: str):
        timeout *= PATIENCE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await predicate()
            if value:
                return value
            await asyncio.sleep(0.2)
        console = "\n".join(self.console[-30:])
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; console:\n{console}")

    async def download(self, selector: str) -> str:
        async with self.page.expect_download() as info:
            await self.page.click(selector)
        download = await info.value
        return Path(await download.path()).read_text(encoding="utf-8")


async def open_page(playwright, profile: Path, url: str, wav: Path | None = None, **context_options) -> Page:
    args = CHROMIUM_ARGS + ([f"--use-file-for-fake-audio-capture={wav}"] if wav else [])
    # A persistent context with a fresh directory is Chromium's --user-data-dir (Playwright manages the flag).
    context = await playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=args, accept_downloads=True,
        viewport={"width": 1280, "height": 800}, **context_options,
    )
    context.set_default_timeout(PATIENCE * 30_000)  # Playwright's own waits (30 s by default), scaled alike
    page = Page(context, context.pages[0] if context.pages else await context.new_page())
    await page.page.goto(url)
    await page.page.wait_for_function("document.querySelector('#engine').textContent.includes('·')")
    return page


# ---- static files ------------------------------------------------------------------------------


async def test_demo_files_are_served_with_module_types_and_safe_headers(tmp_path):
    async with StreamServer(CountingEngine(), ServerSettings(network=NetworkSettings(port=0))) as server:
        status, headers, body = await http_get(server.port, "/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert b'type="module"' in body and not REMOTE.search(body)
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-cache"
        for name in ("ui.js", "protocol.js", "audio.js", "pcm-worklet.js", "captions.js"):
            status, headers, body = await http_get(server.port, f"/{name}")
            assert status == 200 and headers["Content-Type"] == "text/javascript; charset=utf-8", name
            assert not REMOTE.search(body), f"{name} loads something from the network"
            # Revalidation: the same ETag answers 304 without a body.
            status, _, body = await http_get(server.port, f"/{name}", {"If-None-Match": headers["ETag"]})
            assert status == 304 and body == b""
        status, headers, body = await http_get(server.port, "/style.css")
        assert status == 200 and headers["Content-Type"] == "text/css; charset=utf-8" and not REMOTE.search(body)
        for path in ("/../pyproject.toml", "/%2e%2e/pyproject.toml", "/..%2fpyproject.toml", "/nope.js", "/.hidden"):
            assert (await http_get(server.port, path))[0] == 404, path


# ---- the browser -------------------------------------------------------------------------------


@needs_chromium
async def test_controls_follow_engine_capabilities_and_show_server_errors(tmp_path):
    async_playwright = playwright_or_fail()
    engine = CountingEngine(
        languages=("en", "fr"), tasks=("transcribe", "translate"), translation_pairs=(("fr", "en"),)
    )
    settings = ServerSettings(network=NetworkSettings(port=0))
    async with StreamServer(engine, settings) as server, async_playwright() as pw:
        wav = tmp_path / "silence.wav"
        write_wav(wav, np.zeros(16000, np.float32), 16000)
        demo = await open_page(pw, tmp_path / "profile", f"http://127.0.0.1:{server.port}/", wav)
        page = demo.page
        try:
            assert await page.inner_text("#engine") == "fake · counting"
            assert await option_values(page, "#language") == ["en", "fr"]
            assert await option_values(page, "#task") == ["transcribe", "translate"]
            assert await page.is_hidden("#target-row")
            await page.select_option("#language", "fr")
            await page.select_option("#task", "translate")
            assert await page.is_visible("#target-row")
            assert await option_values(page, "#target") == ["en"]

            # The captions module formats exactly like the server's Python one.
            long_text = ("And Mister John Dashwood had then leisure to consider how much there might be "
                         "prudently in his power to do for them, which he did at length")
            long_words = [{"word": w, "start": 4000 + 0.37 * i, "end": 4000.3 + 0.37 * i, "confidence": 0.9,
                           "speaker": 0 if i < 9 else 2} for i, w in enumerate(long_text.split())]
            finals = [{"start": 0.69, "end": 2.97, "text": "Go forward 10 meters."},
                      {"start": 3.0, "end": 3.5, "text": "  "},
                      {"start": 3661.0004, "end": 3662.5, "text": " Next, one. "},
                      {"start": 3663.0, "end": 3664.0, "text": "Said by the second speaker.", "speaker": 1},
                      {"start": 3665.0, "end": 3677.3, "text": long_text},  # split without words
                      {"start": 4000.0, "end": 4010.0, "text": long_text, "words": long_words, "speaker": 0}]
            rendered = await page.evaluate(
                "async (f) => { const m = await import('./captions.js');"
                " return [m.toSrt(f), m.toVtt(f), m.toText(f)]; }",
                finals,
            )
            assert rendered == [captions.to_srt(finals), captions.to_vtt(finals), captions.to_text(finals)]

            # A start the engine cannot serve: English → translate has no pair. The server's bad_config
            # is shown as it came, the session is given up (no reconnect loop) and the page is idle again.
            await page.select_option("#language", "en")
            assert await page.is_disabled("#target")
            await page.click("#toggle")
            await page.wait_for_selector("#errors li:has-text('bad_config')")
            await demo.wait_for(lambda: _text_is(page, "#conn", "Failed"), 10, "the failed state")
            await demo.wait_for(lambda: _text_is(page, "#toggle", "Start"), 10, "the Start button again")
            start = demo.sent_text[0]
            assert start["type"] == "start" and start["task"] == "translate" and start["language"] == "en"
            assert start["audio"] == {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}
            errors = await page.locator("#errors li span").all_inner_texts()
            assert any("cannot translate 'en'" in e for e in errors), errors
            assert not demo.errors, demo.errors
        finally:
            await demo.context.close()


RESAMPLE_JS = """
async ([rate, frequency]) => {
  const context = new OfflineAudioContext(1, rate, rate);  // one second
  await context.audioWorklet.addModule('./pcm-worklet.js');
  const tone = new OscillatorNode(context, { frequency });
  const node = new AudioWorkletNode(context, 'pcm-capture', { numberOfInputs: 1, numberOfOutputs: 0 });
  const frames = [];
  node.port.onmessage = (event) => frames.push(event.data);
  tone.connect(new GainNode(context, { gain: 0.5 })).connect(node);
  tone.start();
  await context.startRendering();
  // The last frames' messages arrive after rendering ends: wait until the second's 9 or 10 frames are
  // in and no more come for half a second (bounded: 20 s on a loaded machine), not a fixed 300 ms.
  const deadline = Date.now() + 20000;
  let count = -1, quietSince = Date.now();
  while (Date.now() < deadline) {
    if (frames.length !== count) { count = frames.length; quietSince = Date.now(); }
    else if (count >= 9 && Date.now() - quietSince >= 500) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return frames.map((f) => ({ index: f.index, samples: Array.from(new Int16Array(f.samples)) }));
}
"""


@needs_chromium
async def test_worklet_resamples_to_16k_pcm16_without_aliasing(tmp_path):
    async_playwright = playwright_or_fail()
    settings = ServerSettings(network=NetworkSettings(port=0))
    async with StreamServer(CountingEngine(), settings) as server, async_playwright() as pw:
        demo = await open_page(pw, tmp_path / "profile", f"http://127.0.0.1:{server.port}/")
        try:
            for rate in (16000, 44100, 48000):
                for frequency, expected_rms in ((1000, 0.5 / np.sqrt(2)), (11000, 0.0)):
                    if frequency >= rate / 2:
                        continue
                    frames = await demo.page.evaluate(RESAMPLE_JS, [rate, frequency])
                    assert [f["index"] for f in frames] == [1600 * i for i in range(len(frames))]
                    assert all(len(f["samples"]) == 1600 for f in frames) and len(frames) >= 9
                    pcm = np.concatenate([f["samples"] for f in frames]).astype(np.float64) / 32768
                    steady = pcm[800:]  # past the filter's start-up
                    rms = float(np.sqrt(np.mean(steady**2)))
                    if expected_rms:
                        spectrum = np.abs(np.fft.rfft(steady * np.hanning(steady.size)))
                        peak_hz = np.argmax(spectrum) * 16000 / steady.size
                        assert abs(peak_hz - frequency) < 5, (rate, peak_hz)
                        assert rms == pytest.approx(expected_rms, rel=0.03), (rate, rms)
                    else:
                        # 11 kHz is above 16 kHz's Nyquist: it must be filtered, not folded to 5 kHz.
                        assert rms < 0.5 * 10 ** (-50 / 20), (rate, rms)
            assert not demo.errors, demo.errors
        finally:
            await demo.context.close()


async def option_values(page, selector: str) -> list[str]:
    return await page.locator(f"{selector} option").evaluate_all("options => options.map(o => o.value)")


async def _text_is(page, selector: str, text: str) -> bool:
    return (await page.inner_text(selector)).strip() == text


@pytest.mark.slow
@needs_chromium
async def test_live_captions_from_a_fake_microphone_in_chromium(tmp_path, whisper_engine, librivox_clips):
    async_playwright = playwright_or_fail()
    began = time.monotonic()
    clip = librivox_clips[0]  # "and mister john dashwood had then leisure to consider how much ..."
    audio, rate = read_audio(clip)
    wav = tmp_path / "speech.wav"
    loop_s = write_wav(wav, audio, rate)
    ARTIFACTS.mkdir(exist_ok=True)

    # Stable words after 1.5 s of agreement (3 s by default): the page shows them within the looped
    # clips' utterances even on a loaded machine; how the page renders them is what is tested.
    server = StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=0), session=EARLY_STABLE))
    await server.start()
    port = server.port
    try:
        async with async_playwright() as pw:
            demo = await open_page(pw, tmp_path / "profile", f"http://127.0.0.1:{port}/", wav)
            page = demo.page
            try:
                assert await page.inner_text("#engine") == "whisper · tiny.en"
                await page.fill("#keywords", "Dashwood")
                await page.click("#toggle")

                # A final caption with the clip's words (the fake microphone loops the WAV: any final will do).
                async def good_final():
                    return next((t for t in await demo.final_texts() if recall(clip.text, t) >= 0.8), None)

                first = await demo.wait_for(good_final, 3 * loop_s + 15, "a final caption of the clip")
                assert await _text_is(page, "#conn", "Live")
                lat = await page.locator("#finals li.final .lat").first.inner_text()
                # The page's latency readout: its form, and a value (not a wall-clock bound on this machine).
                assert re.fullmatch(r"\d+\.\d\d s", lat) and float(lat[:-2]) > 0.0, lat
                assert re.fullmatch(r"\d+\.\d\d s \(\d+\)", await page.inner_text("#lat-median"))

                start = demo.sent_text[0]
                assert start["type"] == "start" and start["keywords"] == ["Dashwood"]
                assert (start["language"], start["task"], start["vad"]) == ("en", "transcribe", {"silence_ms": 500})
                assert start["audio"] == {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}
                assert demo.sent_binary and all(n % 2 == 0 for n in demo.sent_binary)
                assert sorted(demo.sent_binary)[len(demo.sent_binary) // 2] == 3200  # 100 ms frames
                ready = next(m for m in demo.received if m["type"] == "ready")
                assert ready["config"]["keywords"] == ["Dashwood"]

                # Keywords changed mid-stream go out as `configure`.
                await page.fill("#keywords", "Dashwood, Norland")
                await page.press("#keywords", "Tab")
                await page.wait_for_selector("#applied:has-text('applied from the next utterance')")
                assert {"type": "configure", "keywords": ["Dashwood", "Norland"]}.items() <= demo.sent_text[-1].items()

                await page.screenshot(path=str(ARTIFACTS / "web-demo-desktop.png"))
                await page.click("#caption-mode")
                await page.screenshot(path=str(ARTIFACTS / "web-demo-caption-mode.png"))
                await page.click("#caption-mode")
                await page.set_viewport_size({"width": 390, "height": 844})
                await page.screenshot(path=str(ARTIFACTS / "web-demo-phone.png"))
                await page.set_viewport_size({"width": 1280, "height": 800})

                # The server goes away: the page reconnects with backoff and keeps its captions.
                finals_before = len(await demo.final_texts())
                await server.close()
                await demo.wait_for(lambda: _starts(page, "#conn", "Reconnecting"), 10, "the reconnecting state")
                server = StreamServer(whisper_engine, ServerSettings(network=NetworkSettings(port=port), session=EARLY_STABLE))
                await server.start()
                await demo.wait_for(lambda: _text_is(page, "#conn", "Live"), 30, "the page to reconnect")
                # A partial in place: its stable words solid, the rest dimmed.
                await page.wait_for_selector("#partial:not([hidden]) .stable:not(:empty)",
                                             timeout=PATIENCE * (loop_s + 10) * 1000)
                await page.screenshot(path=str(ARTIFACTS / "web-demo-partial.png"))
                assert first in (await demo.final_texts())[:finals_before]  # nothing captioned was lost
                await demo.wait_for(
                    lambda: _count_above(demo, finals_before), 2 * loop_s + 15, "a final from the new session"
                )
                assert sum(m["type"] == "ready" for m in demo.received) >= 2

                await page.click("#toggle")
                await demo.wait_for(lambda: _text_is(page, "#conn", "Stopped"), 30, "the stopped state")
                assert demo.sent_text[-1] == {"type": "stop"}
                assert any(m["type"] == "end" for m in demo.received)

                srt = await demo.download("[data-export=srt]")
                vtt = await demo.download("[data-export=vtt]")
                txt = await demo.download("[data-export=txt]")
                (ARTIFACTS / "web-demo-captions.srt").write_text(srt, encoding="utf-8")
                (ARTIFACTS / "web-demo-console.log").write_text("\n".join(demo.console), encoding="utf-8")
                assert not demo.errors, demo.errors
            finally:
                await demo.context.close()
    finally:
        await server.close()

    cues = parse_srt(srt)
    assert [c["number"] for c in cues] == list(range(1, len(cues) + 1)) and len(cues) >= 2
    assert all(len(c["text"].split("\n")) <= 2 and all(len(line) <= 42 for line in c["text"].split("\n"))
               for c in cues)  # broadcast limits; long finals are split into several cues
    cues = _finals_of(cues, txt.splitlines())
    good = next(c for c in cues if recall(clip.text, c["text"]) >= 0.8)
    clip_s = audio.size / rate
    # Cue times are seconds since Start; the fake microphone starts the WAV on Start (± its startup),
    # and the speech begins after its lead silence. Later passes of the loop keep that rhythm, also
    # across the reconnection (its audio was buffered, so the timeline has no hole).
    assert cues[0] is good and LEAD_S - 0.6 < good["start"] < LEAD_S + 1.5, cues
    for cue in cues[1:]:
        if recall(clip.text, cue["text"]) >= 0.8:
            passes = (cue["start"] - good["start"]) / loop_s
            assert abs(passes - round(passes)) * loop_s < 0.6, (cue, good, loop_s)
    assert 0.4 * clip_s < good["end"] - good["start"] < clip_s + 2.0
    assert all(c["start"] <= c["end"] for c in cues)
    assert all(a["start"] <= b["start"] for a, b in zip(cues, cues[1:]))
    assert vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == len(parse_srt(srt))
    print(f"\nweb demo test: {time.monotonic() - began:.1f} s; first final: {first!r}; {len(cues)} cues")


def _finals_of(cues: list[dict], lines: list[str]) -> list[dict]:
    """Regroup SRT cues into the finals they were split from (the plain text has one line a final)."""
    finals, i = [], 0
    for line in lines:
        group, text = [], ""
        while text != line:
            assert i < len(cues), (line, text)
            group.append(cues[i])
            text = " ".join(c["text"].replace("\n", " ") for c in group)
            i += 1
        finals.append({"start": group[0]["start"], "end": group[-1]["end"], "text": line})
    assert i == len(cues)
    return finals


async def _starts(page, selector: str, prefix: str) -> bool:
    return (await page.inner_text(selector)).strip().startswith(prefix)


async def _count_above(demo: Page, count: int) -> bool:
    return len(await demo.final_texts()) > count
