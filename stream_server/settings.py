"""The settings of ``granite-stream serve``, in sections, fed by four sources.

Precedence, lowest to highest: built-in defaults < TOML file (``--config FILE`` or
``$GRANITE_STREAM_CONFIG``) < environment variables ``GRANITE_STREAM_<KEY>`` < command-line flags.

Each section (``network``, ``engine``, ``engine.granite``, ``worker``, ``session``, ``speakers``,
``limits``, ``security``, ``memory``, ``logging``, ``pool``, ``pool.ray``) is a frozen dataclass; where
a runtime object takes the values as they are (:class:`~stream_server.server.app.NetworkSettings`,
:class:`~stream_server.server.app.LimitsSettings`, :class:`~stream_server.server.auth.SecuritySettings`,
:class:`~stream_server.inference.memory.MemorySettings`, :class:`~stream_server.inference.types.WorkerSettings`,
:class:`~stream_server.engines.EngineSettings`, :class:`~stream_server.speakers.clustering.SpeakerSettings`,
:class:`~stream_server.server.logs.LoggingSettings`) the section *is* that object, defined next to the
code that reads it (the server's :class:`~stream_server.server.app.ServerSettings` holds the first four
and the last as they are), and the other sections take their defaults from the runtime objects they feed, so that
every default is written once. Every setting also has a stable flat key (``max_batch``, ``granite_encoder_batching``,
``ray_address``): the flag is ``--max-batch``, the environment name ``GRANITE_STREAM_MAX_BATCH``, and
a TOML file may give it flat (at the top level or under ``[serve]``) or in its section
(``[worker] max_batch = 8``). The flags, the environment names, ``--print-config`` and the README's
configuration table are all generated from :data:`SETTINGS`, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, get_type_hints

from stream_server.core.session import SessionSettings
from stream_server.engines import ENGINE_NAMES, EngineSettings
from stream_server.engines.granite.options import GraniteOptions
from stream_server.inference.ray_pool import DEFAULT_APP_NAME, RayPoolSettings
from stream_server.inference.types import WorkerSettings
from stream_server.inference.memory import MemorySettings
from stream_server.server.app import LimitsSettings, NetworkSettings
from stream_server.server.auth import SecuritySettings
from stream_server.server.logs import LoggingSettings
from stream_server.speakers.clustering import SpeakerSettings

ENV_PREFIX = "GRANITE_STREAM_"

_OFF_ON_AUTO = {False: "off", True: "on", "auto": "auto"}


@dataclass(frozen=True)
class GraniteSettings:
    """The user-facing :class:`~stream_server.engines.granite.options.GraniteOptions`, in settings units
    (on/off, comma-separated seconds); :meth:`options` maps them back (the one place that does)."""

    encoder_batching: str = GraniteOptions.encoder_batching
    decode_max_graphs: int = GraniteOptions.decode_max_graphs
    compile_step: str = _OFF_ON_AUTO[GraniteOptions.compile_step]
    speculation: str = _OFF_ON_AUTO[GraniteOptions.speculative]
    ctc_entropy_threshold: float = GraniteOptions.ctc_entropy_threshold
    verify_threshold: float = GraniteOptions.verify_threshold
    warm_decode_seconds: str = ",".join(f"{s:g}" for s in GraniteOptions.warm_decode_seconds)

    def options(self, max_batch: int = WorkerSettings.max_batch) -> GraniteOptions:
        """These settings as the engine's options, over the ``default`` preset (whose backends follow
        the device: on CUDA with padded encoder batching, the GPU preset's settings, that is the
        ``fast`` preset's path). ``max_batch`` is the ``worker`` section's batch bound.

        Raises:
            ValueError: a value the options refuse (the settings' own checks refuse them earlier).
        """
        from_words = {word: value for value, word in _OFF_ON_AUTO.items()}
        return GraniteOptions.preset(
            "default", max_batch=max_batch, encoder_batching=self.encoder_batching,
            decode_max_graphs=self.decode_max_graphs, compile_step=from_words[self.compile_step],
            warm_decode_seconds=seconds_list(self.warm_decode_seconds), speculative=from_words[self.speculation],
            ctc_entropy_threshold=self.ctc_entropy_threshold, verify_threshold=self.verify_threshold)


@dataclass(frozen=True)
class SessionSection:
    """What :class:`~stream_server.core.session.SessionSettings` holds in other units (ms, on/off)."""

    early_final_ms: float = SessionSettings.early_final_s * 1000.0
    partial_refresh: str = "on" if SessionSettings.refresh_waiting_partials else "off"
    stable_agreement_s: float = SessionSettings.stable_agreement_s


@dataclass(frozen=True)
class PoolSettings:
    inference: str = "local"
    processes: int = 1


@dataclass(frozen=True)
class RaySettings:
    """The user's view of :class:`~stream_server.inference.ray_pool.RayPoolSettings` (0 and -1: automatic)."""

    address: str = RayPoolSettings.address
    app: str = DEFAULT_APP_NAME
    deploy: str = RayPoolSettings.deploy
    min_replicas: int = RayPoolSettings.min_replicas
    max_replicas: int = RayPoolSettings.max_replicas
    target_ongoing: float = RayPoolSettings.target_ongoing_requests
    gpus_per_replica: float = -1.0
    cpus_per_replica: float = 0.0
    max_inflight: int = 0
    local_cpus: int = 0


@dataclass(frozen=True)
class ServeConfig:
    """Every setting of the server, one attribute per section (see :data:`SECTIONS` for their TOML names)."""

    network: NetworkSettings = field(default_factory=NetworkSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    granite: GraniteSettings = field(default_factory=GraniteSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    session: SessionSection = field(default_factory=SessionSection)
    speakers: SpeakerSettings = field(default_factory=SpeakerSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    ray: RaySettings = field(default_factory=RaySettings)

    def value(self, key: str) -> Any:
        """The setting with this flat key (``"max_batch"``)."""
        setting = BY_KEY[key]
        return getattr(getattr(self, setting.section), setting.attr)

    def with_values(self, values: Mapping[str, Any]) -> ServeConfig:
        """A copy with these settings (flat keys, already converted) replaced."""
        by_section: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            setting = BY_KEY[key]
            by_section.setdefault(setting.section, {})[setting.attr] = value
        return dataclasses.replace(self, **{
            name: dataclasses.replace(getattr(self, name), **changes) for name, changes in by_section.items()})

    def to_dict(self) -> dict[str, Any]:
        """Every setting by flat key, in the order of :data:`SETTINGS`."""
        return {s.key: self.value(s.key) for s in SETTINGS}


SECTIONS: dict[str, str] = {
    "network": "network", "engine": "engine", "granite": "engine.granite", "worker": "worker",
    "session": "session", "speakers": "speakers", "limits": "limits", "security": "security", "memory": "memory",
    "logging": "logging", "pool": "pool", "ray": "pool.ray",
}
""":class:`ServeConfig` attribute -> the section's TOML table name."""


@dataclass(frozen=True)
class Setting:
    """One user setting: where it lives (``section``, ``attr``) and how a user names it (``key``)."""

    key: str
    section: str
    attr: str
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def kind(self) -> type:
        hints = get_type_hints(type(getattr(ServeConfig(), self.section)))
        return hints[self.attr]

    @property
    def default(self) -> Any:
        return ServeConfig().value(self.key)


def _section(section: str, prefix: str, entries: list[tuple]) -> list[Setting]:
    """Settings of one section: ``(attr, help[, choices[, key]])``; the key defaults to prefix + attr."""
    out = []
    for entry in entries:
        attr, help_text, choices, key = (*entry, None, None)[:4]
        out.append(Setting(key or prefix + attr, section, attr, help_text, choices))
    return out


SETTINGS: list[Setting] = [
    *_section("network", "", [
        ("host", "interface to bind (0.0.0.0 for all)"),
        ("port", "port for WebSocket and HTTP"),
    ]),
    *_section("engine", "", [
        ("name", "auto: Granite on a CUDA GPU when its weights load locally, else bundled Whisper tiny.en",
         ENGINE_NAMES, "engine"),
        ("model", "model id or directory (whisper: tiny.en, base or a CTranslate2 dir; granite: HF id or dir)"),
        ("device", "auto, cpu or cuda", ("auto", "cpu", "cuda")),
        ("gpus", "workers on GPUs 0..N-1, one engine each (0: one worker on --device)"),
        ("preset", "auto: with --engine granite on a CUDA device (local inference), the measured GPU "
         "configuration (GPU_PRESET: padded encoder batching, batch 64, queue 8192, decode states sized "
         "from free GPU memory, compiled decode step where faster, 1000 sessions) for every setting no "
         "source gave; elsewhere the defaults below. gpu / cpu force one. --print-config says which and why",
         ("auto", "gpu", "cpu")),
        ("cpu_threads", "engine CPU threads (0: Whisper one per core, shared by its two lanes; Granite torch's default)"),
    ]),
    *_section("granite", "granite_", [
        ("encoder_batching", "Granite: exact (each utterance encoded alone: a batch decodes as one by one) or padded "
         "(one zero-padded encoder batch, replayed from CUDA graphs on a GPU: the benchmarked fast path, "
         "docs/gpu_server.md); local inference only", ("exact", "padded")),
        ("decode_max_graphs", "Granite on CUDA: decode states kept (one per batch x KV-capacity bucket, each a "
         "captured graph plus its KV cache); a state evicted and needed again is captured again under load. More "
         "cost GPU memory; the measured 400-stream configuration used 32 (docs/deployment.md); 0: as many as half "
         "the free GPU memory holds at startup (8 to 64)"),
        ("compile_step", "Granite on CUDA: torch.compile the decode step (on), or compile it and keep it only if a "
         "timed decode at warm-up is faster than the uncompiled one (auto)", ("off", "on", "auto")),
        ("speculation", "Granite finals: self-speculative decoding with the CTC draft (on), or always "
         "autoregressive (off). The paper (arXiv 2603.11243) measured 4.4x the RTFx of greedy decoding for +12 % "
         "relative WER; docs/granite_gpu.md", ("on", "off")),
        ("ctc_entropy_threshold", "Granite speculation: accept the CTC draft unverified when its largest frame "
         "entropy (nats) is at most this (IBM: 0.7; lower: more LLM verification, slower, closer to greedy)"),
        ("verify_threshold", "Granite speculation: a verified draft is accepted when every token's LLM probability "
         "is at least this (IBM: 0.1; higher: more decoding, slower, closer to greedy); 0..1"),
        ("warm_decode_seconds", "Granite on CUDA: at startup, decode a batch of each size up to max_batch for each "
         "of these utterance lengths (s), so that the decode states live traffic needs are captured before it "
         "arrives (empty: off)"),
    ]),
    *_section("worker", "", [
        ("max_batch", "largest inference batch across sessions"),
        ("max_wait_ms", "how long a batch may wait to fill"),
        ("max_queue", "queued inference requests before partials are shed and new sessions refused"),
    ]),
    *_section("session", "", [
        ("early_final_ms", "decode an utterance's final once a pause reaches this, before the VAD's silence_ms "
         "ends it; published if the pause lasts, discarded if speech resumes (0: off)"),
        ("partial_refresh", "while a partial waits in the inference queue, replace it every partial_interval with "
         "one on the newer audio (nothing extra runs; under load partials come fresher and a little less often); "
         "off: it runs on the audio it was asked with", ("on", "off")),
        ("stable_agreement_s", "a word becomes stable_text only when partials agreeing on it span this much audio; "
         "less gives stable words sooner and risks locking in a misheard one (>= 0)"),
    ]),
    *_section("speakers", "diarize_", [
        ("threshold", "speaker labels (diarize): cosine similarity to the nearest speaker below which an "
         "utterance starts a new speaker (docs/diarization.md); -1..1"),
        ("max_speakers", "speaker labels: at most this many speakers per session (then the nearest)"),
        ("change_threshold", "speaker labels: two stretches of one utterance less similar than this are a change "
         "of speaker (speaker_turns); -1..1"),
        ("pause_change_threshold", "speaker labels: the same for a cut at a pause inside an utterance, where one "
         "1.6 s encoder window a side is enough (higher: a pause is where turns change); -1..1"),
        ("preload", "speaker labels: load the speaker encoder (torch, ~200 MB, ~0.8 s) at startup instead of when "
         "the first diarizing session asks (its first final may then wait for the load, once per process)"),
    ]),
    *_section("limits", "", [
        ("max_sessions", "concurrent sessions; more get HTTP 503"),
        ("max_sessions_per_ip", "concurrent sessions per client address; more get HTTP 429"),
        ("max_frame_bytes", "largest audio frame (too_large beyond)"),
        ("max_utterance_s", "upper bound for a client's vad.max_utterance_s"),
        ("max_session_s", "seconds of audio per session (0: no limit)"),
        ("max_upload_bytes", "largest body POST /v1/audio/transcriptions or /translations accepts (HTTP 413 "
         "file_too_large beyond, refused before it is read)"),
        ("max_upload_audio_s", "longest decoded audio of an uploaded file (HTTP 413 audio_too_long beyond; "
         "max_session_s applies too; 0: only max_session_s)"),
        ("upload_timeout_s", "seconds a client may take to send one uploaded file's body, however steadily it "
         "trickles (HTTP 408 upload_timeout beyond, its session slot freed; the default passes 25 MiB at "
         "350 kbit/s; 0: no limit but idle_timeout_s between reads)"),
        ("idle_timeout_s", "end sessions that send nothing this long (0: never)"),
        ("realtime_factor", "throttle clients sending audio faster than this multiple of real time (0: never)"),
        ("drain_deadline_s", "on SIGTERM/SIGINT, how long open sessions get to receive their finals"),
    ]),
    *_section("security", "", [
        ("api_keys_file", "file of accepted API keys, one per line (also $GRANITE_STREAM_API_KEYS)"),
        ("allowed_origins", "comma-separated Origin values browsers may connect from (empty: any)"),
        ("certfile", "TLS certificate chain (PEM): serve wss:// and https://"),
        ("keyfile", "TLS private key (PEM; default: the certfile)"),
    ]),
    *_section("memory", "", [
        ("malloc_arenas", "cap glibc's malloc arenas (0: glibc's default of 8 per core); fewer arenas keep RSS "
         "from creeping up over days"),
        ("malloc_mmap_threshold_kb", "allocations this large get their own mmap, returned on free (0: glibc's "
         "dynamic threshold, which lets large buffers fragment the heap)"),
        ("memory_trim_s", "every this many seconds, give free heap pages back to the kernel (0: never)"),
    ]),
    *_section("logging", "", [
        ("log_transcripts", "log final transcripts (off: they are personal data)"),
        ("log_format", "text or json (one JSON object per line, with session_id where known)", ("text", "json")),
        ("log_level", "DEBUG, INFO, WARNING or ERROR", ("DEBUG", "INFO", "WARNING", "ERROR")),
    ]),
    *_section("pool", "", [
        ("inference", "local: engines in this process; ray: a Ray Serve inference pool (needs the ray extra)",
         ("local", "ray")),
        ("processes", "server processes sharing the port (SO_REUSEPORT, Linux), each with its own event loop and "
         "engine; with gpus > 1 process i gets GPU i mod gpus; limits and /metrics are per process"),
    ]),
    *_section("ray", "ray_", [
        ("address", "Ray cluster: local (start one in this process), auto (this host's cluster) or ray://head:10001"),
        ("app", "Serve application name of the pool"),
        ("deploy", "missing: deploy the pool if it is not running; never: only connect; always: deploy or update it",
         ("missing", "never", "always")),
        ("min_replicas", "pool replicas (a fixed count when equal to ray_max_replicas)"),
        ("max_replicas", "above ray_min_replicas: Serve autoscaling between the two"),
        ("target_ongoing", "autoscaling target: ongoing requests per replica"),
        ("gpus_per_replica", "GPUs per replica (-1: 1 if the cluster has GPUs, else CPU replicas)"),
        ("cpus_per_replica", "Ray CPUs reserved per replica (0: cpu_threads, 1 on GPU replicas)"),
        ("max_inflight", "requests this gateway keeps in flight to the pool (0: max replicas x 2 x max_batch)"),
        ("local_cpus", "CPUs of a ray_address=local instance (0: all)"),
    ]),
]
"""Every user setting, in the order of ``--help`` and the README table."""

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


class ConfigError(ValueError):
    """A setting from some source could not be used; the message names the source and the setting."""


def _convert(name: str, kind: type, raw: Any, source: str) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError):
        expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[kind]
        raise ConfigError(f"{source}: {name} must be {expected}, got {raw!r}") from None


def _check(source: str, values: Mapping[str, Any]) -> None:
    """Refuse values outside a setting's choices or range (``values``: converted, by flat key)."""
    for key, value in values.items():
        choices = BY_KEY[key].choices
        if choices and value not in choices:
            raise ConfigError(f"{source}: {key} must be one of {list(choices)}, got {value!r}")
    if "granite_verify_threshold" in values and not 0.0 <= values["granite_verify_threshold"] <= 1.0:
        raise ConfigError(f"{source}: granite_verify_threshold must be between 0 and 1, got "
                          f"{values['granite_verify_threshold']!r}")
    for name in ("diarize_threshold", "diarize_change_threshold", "diarize_pause_change_threshold"):
        if name in values and not -1.0 <= values[name] <= 1.0:
            raise ConfigError(f"{source}: {name} must be a cosine similarity between -1 and 1, got {values[name]!r}")
    if "max_upload_bytes" in values and values["max_upload_bytes"] < 1:
        raise ConfigError(f"{source}: max_upload_bytes must be >= 1, got {values['max_upload_bytes']!r}")
    if "max_upload_audio_s" in values and not 0.0 <= values["max_upload_audio_s"] < math.inf:
        raise ConfigError(f"{source}: max_upload_audio_s must be >= 0 (0: only max_session_s), got "
                          f"{values['max_upload_audio_s']!r}")
    if "upload_timeout_s" in values and not 0.0 <= values["upload_timeout_s"] < math.inf:
        raise ConfigError(f"{source}: upload_timeout_s must be >= 0 (0: no limit), got {values['upload_timeout_s']!r}")
    if "stable_agreement_s" in values and not 0.0 <= values["stable_agreement_s"] < math.inf:
        raise ConfigError(f"{source}: stable_agreement_s must be >= 0, got {values['stable_agreement_s']!r}")
    if "diarize_max_speakers" in values and values["diarize_max_speakers"] < 1:
        raise ConfigError(f"{source}: diarize_max_speakers must be >= 1")
    if "granite_decode_max_graphs" in values and values["granite_decode_max_graphs"] < 0:
        raise ConfigError(f"{source}: granite_decode_max_graphs must be >= 0 (0: from free GPU memory)")
    if "granite_warm_decode_seconds" in values:
        try:
            seconds_list(values["granite_warm_decode_seconds"])
        except ValueError as exc:
            raise ConfigError(f"{source}: granite_warm_decode_seconds {exc}") from None


def seconds_list(text: str) -> tuple[float, ...]:
    """``"3,6,12"`` -> ``(3.0, 6.0, 12.0)``; empty -> ``()``.

    Raises:
        ValueError: an item is not a positive number.
    """
    out = []
    for item in (x.strip() for x in str(text).split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"must be a comma list of seconds, got {item!r}") from None
        if not 0 < value < math.inf:  # NaN fails this too
            raise ValueError(f"must hold positive finite seconds, got {item!r}")
        out.append(value)
    return tuple(out)


_BY_TABLE: dict[tuple[str, str], Setting] = {(SECTIONS[s.section], s.attr): s for s in SETTINGS}


def _toml_settings(data: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The raw values of a TOML document, by flat key.

    A value may sit flat at the top level (``max_batch = 8``, the layout before sections), flat under
    ``[serve]``, or in its section's table (``[worker] max_batch = 8``, ``[engine.granite]
    encoder_batching = "padded"``, ``[engine] name = "granite"``).

    Raises:
        ConfigError: an unknown key or table, or one setting given twice.
    """
    found: dict[str, Any] = {}
    unknown: list[str] = []
    tables = set(SECTIONS.values())

    def put(setting: Setting, value: Any, where: str) -> None:
        if setting.key in found:
            raise ConfigError(f"{path}: {setting.key} is given twice (the second time as {where})")
        found[setting.key] = value

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for name, value in table.items():
            dotted = f"{prefix}.{name}" if prefix else name
            if isinstance(value, dict) and (dotted in tables or any(t.startswith(dotted + ".") for t in tables)):
                walk(value, dotted)
            elif not prefix and name in BY_KEY:
                put(BY_KEY[name], value, name)
            elif (prefix, name) in _BY_TABLE:
                put(_BY_TABLE[(prefix, name)], value, f"[{prefix}] {name}")
            else:
                unknown.append(dotted)

    if isinstance(data.get("serve"), dict):
        walk(data["serve"], "")
        data = {k: v for k, v in data.items() if k != "serve"}
    walk(data, "")
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    return found


def load_config(cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                toml_path: Path | str | None = None) -> ServeConfig:
    """Merge the sources into one :class:`ServeConfig` (the preset unresolved; see :func:`load_config_and_sources`)."""
    return load_config_and_sources(cli, env, toml_path)[0]


def load_config_and_sources(cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                            toml_path: Path | str | None = None) -> tuple[ServeConfig, frozenset[str]]:
    """Merge the sources into one :class:`ServeConfig`, and name the settings some source gave.

    Args:
        cli: flag values by flat key, for the flags given on the command line (absent ones left out).
        env: the environment (``os.environ`` when ``None``).
        toml_path: a TOML file; ``None`` uses ``$GRANITE_STREAM_CONFIG`` if set. Keys may sit flat at
            the top level or under ``[serve]``, or in their sections' tables (:func:`_toml_settings`).

    Raises:
        ConfigError: unknown TOML keys, wrong types or values, a missing TOML file.

    Returns:
        ``(config, explicit)``: ``explicit`` holds the flat keys set by the TOML file, the environment
        or a flag (a preset changes only the others).
    """
    env = os.environ if env is None else env
    explicit: set[str] = set()
    config = ServeConfig()
    toml_path = toml_path or env.get(ENV_PREFIX + "CONFIG") or None
    if toml_path:
        path = Path(toml_path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        values = {k: _convert(k, BY_KEY[k].kind, v, str(path)) for k, v in _toml_settings(data, path).items()}
        _check(str(path), values)
        config = config.with_values(values)
        explicit.update(values)
    values = {}
    for s in SETTINGS:
        raw = env.get(s.env)
        if raw is not None:
            values[s.key] = _convert(s.key, s.kind, raw, f"${s.env}")
    _check("environment", values)
    config = config.with_values(values)
    explicit.update(values)
    values = {k: _convert(k, BY_KEY[k].kind, v, BY_KEY[k].flag) for k, v in (cli or {}).items() if v is not None}
    _check("command line", values)
    config = config.with_values(values)
    explicit.update(values)
    return config, frozenset(explicit)


def ray_pool_settings(config: ServeConfig) -> RayPoolSettings:
    """:class:`RayPoolSettings` from ``granite-stream serve``'s settings.

    The ``engine`` section shapes the replicas; the ``worker`` section's ``max_batch`` and
    ``max_wait_ms`` become Serve's ``max_batch_size`` and ``batch_wait_timeout_s``, its
    ``max_queue`` bounds the gateway queue; the ``pool.ray`` section's 0 and -1 mean "automatic".
    """
    ray, engine, worker = config.ray, config.engine, config.worker
    return RayPoolSettings(
        address=ray.address or "local",
        app_name=ray.app or DEFAULT_APP_NAME,
        deploy=ray.deploy,
        engine=engine.name,
        model=engine.model or None,
        device=engine.device,
        cpu_threads=engine.cpu_threads or 1,
        max_batch=worker.max_batch,
        batch_wait_s=worker.max_wait_ms / 1000.0,
        min_replicas=ray.min_replicas,
        max_replicas=max(ray.min_replicas, ray.max_replicas),
        target_ongoing_requests=ray.target_ongoing,
        gpus_per_replica=None if ray.gpus_per_replica < 0 else ray.gpus_per_replica,
        cpus_per_replica=None if ray.cpus_per_replica <= 0 else ray.cpus_per_replica,
        max_inflight=ray.max_inflight or None,
        max_queue=worker.max_queue,
        local_num_cpus=ray.local_cpus or None,
    )


GPU_PRESET: dict[str, Any] = {
    "granite_encoder_batching": "padded",
    "max_batch": 64,
    "max_queue": 8192,
    "granite_decode_max_graphs": 0,
    "granite_compile_step": "auto",
    "max_sessions": 1000,
}
"""The configuration measured at 400 real-time streams on one GPU (docs/deployment.md,
docs/gpu_server.md), applied on a CUDA device to the settings no source gave. The measured runs
kept 32 decode states; 0 sizes them from the card's free memory instead (an H100's 80 GB gives
about that many at batch 64)."""


def resolve_preset(config: ServeConfig, explicit: frozenset[str] | set[str] = frozenset(),
                   cuda_available=None) -> tuple[ServeConfig, str]:
    """Apply the preset: the GPU configuration where Granite serves on a CUDA device, else the defaults.

    Args:
        config: merged settings (``preset`` may be ``auto``).
        explicit: the settings (flat keys) a source gave; the preset never overrides them.
        cuda_available: callable telling whether a CUDA device is present (default: torch's, imported
            only when the answer matters); tests pass their own.

    Returns:
        ``(config, why)``: ``preset`` is resolved to ``gpu`` or ``cpu``; ``why`` is one line naming
        the reason and every setting the preset changed.
    """
    choice = config.engine.preset
    cpu = config.with_values({"preset": "cpu"})
    if choice == "auto":
        if config.pool.inference != "local":
            return cpu, "preset cpu: inference runs in a Ray pool (its replicas have their own settings)"
        if config.engine.name != "granite":
            # auto may fall back to Whisper on the CPU, where batch 64 and the Granite settings do harm
            return cpu, f"preset cpu: engine {config.engine.name} (the GPU preset needs --engine granite, or --preset gpu)"
        if config.engine.device == "cpu":
            return cpu, "preset cpu: --device cpu"
        if cuda_available is None:
            from stream_server.engines import cuda_available
        if not cuda_available():
            return cpu, "preset cpu: no CUDA device"
        reason = "preset gpu: a CUDA device is present and engine granite serves there"
    else:
        reason = f"preset {choice}: asked for"
    if choice == "cpu":
        return config, reason
    changed = {k: v for k, v in GPU_PRESET.items() if k not in explicit}
    kept = sorted(k for k in GPU_PRESET if k in explicit)
    config = config.with_values({"preset": "gpu", **changed})
    detail = ", ".join(f"{k}={v!r}" for k, v in changed.items()) or "nothing (every preset setting was given)"
    if kept:
        detail += f"; kept as given: {', '.join(kept)}"
    return config, f"{reason}; set {detail}"


def add_arguments(parser: argparse.ArgumentParser, keys: Collection[str] | None = None,
                  environment: bool = True) -> None:
    """Add one flag per setting (those named in ``keys``, default all), grouped by section, with no
    argparse defaults (so only given flags override). All settings also get ``--config`` and
    ``--print-config``; ``environment`` says whether the help names the environment variables (a
    command that reads none passes False)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    if keys is None:
        parser.add_argument("--config", type=Path, default=None,
                            help=f"TOML file of settings (also ${ENV_PREFIX}CONFIG); flags and environment override it")
        parser.add_argument("--print-config", action="store_true",
                            help="print the effective settings as TOML and exit (--print-config-format for others)")
        parser.add_argument("--print-config-format", choices=("toml", "json", "markdown"), default="toml")
    for s in SETTINGS:
        if keys is not None and s.key not in keys:
            continue
        table = SECTIONS[s.section]
        group = groups.setdefault(table, parser.add_argument_group(table))
        help_text = f"{s.help} (default: {s.default!r}; env {s.env})" if environment else f"{s.help} (default: {s.default!r})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help texts; ours hold literal "%"
        if s.kind is bool:
            group.add_argument(s.flag, dest=s.key, action="store_const", const=True, default=None, help=help_text)
        else:
            group.add_argument(s.flag, dest=s.key, type=str, default=None, choices=s.choices,
                               metavar=s.key.upper(), help=help_text)


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, by flat key (those left ``None`` were not given)."""
    return {s.key: getattr(args, s.key) for s in SETTINGS if getattr(args, s.key, None) is not None}


def render(config: ServeConfig, fmt: str = "toml", why: str = "") -> str:
    """The effective settings as TOML (in sections), JSON (flat keys), or the README's markdown table
    (defaults, not values).

    ``why`` (the preset's reason, :func:`resolve_preset`) heads the TOML as a comment."""
    if fmt == "json":
        return json.dumps(config.to_dict(), indent=2)
    if fmt == "markdown":
        rows = ["| setting | TOML | flag | environment | default | meaning |", "|---|---|---|---|---|---|"]
        for s in SETTINGS:
            default = f"`{s.default}`" if s.default != "" else "(empty)"
            rows.append(f"| `{s.key}` | `[{SECTIONS[s.section]}]` `{s.attr}` | `{s.flag}` | `{s.env}` | "
                        f"{default} | {s.help} |")
        return "\n".join(rows)
    lines = [f"# {why}"] if why else []
    for section, table in SECTIONS.items():
        lines.append(f"[{table}]")
        lines.extend(f"{s.attr} = {json.dumps(config.value(s.key))}" for s in SETTINGS if s.section == section)
    return "\n".join(lines)
