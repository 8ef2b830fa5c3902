"""One typed settings object for ``granite-stream serve``, fed by four sources.

Precedence, lowest to highest: built-in defaults < TOML file (``--config FILE`` or
``$GRANITE_STREAM_CONFIG``) < environment variables ``GRANITE_STREAM_<FIELD>`` < command-line flags.
The command-line flags, the environment names, ``--print-config`` and the README's configuration
table are all generated from the field list below, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints

ENV_PREFIX = "GRANITE_STREAM_"


def _opt(default: Any, help: str, group: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


@dataclass(frozen=True)
class ServeConfig:
    """Every setting of the server. Field names are the TOML keys; flags are ``--field-name``."""

    host: str = _opt("127.0.0.1", "interface to bind (0.0.0.0 for all)", "network")
    port: int = _opt(8765, "port for WebSocket and HTTP", "network")
    engine: str = _opt("auto", "auto: Granite on a CUDA GPU when its weights load locally, else bundled Whisper tiny.en",
                       "engine", ("auto", "whisper", "granite"))
    model: str = _opt("", "model id or directory (whisper: tiny.en, base or a CTranslate2 dir; granite: HF id or dir)",
                      "engine")
    device: str = _opt("auto", "auto, cpu or cuda", "engine", ("auto", "cpu", "cuda"))
    gpus: int = _opt(0, "workers on GPUs 0..N-1, one engine each (0: one worker on --device)", "engine")
    preset: str = _opt("auto", "auto: with --engine granite on a CUDA device (local inference), the measured GPU "
                       "configuration (GPU_PRESET: padded encoder batching, batch 64, queue 8192, decode states sized "
                       "from free GPU memory, compiled decode step where faster, 1000 sessions) for every setting no "
                       "source gave; elsewhere the defaults below. gpu / cpu force one. --print-config says which and why",
                       "engine", ("auto", "gpu", "cpu"))
    cpu_threads: int = _opt(0, "engine CPU threads (0: Whisper one per core, shared by its two lanes; Granite torch's default)", "engine")
    processes: int = _opt(1, "server processes sharing the port (SO_REUSEPORT, Linux), each with its own event loop "
                          "and engine; with gpus > 1 process i gets GPU i mod gpus; limits and /metrics are per process",
                          "pool")
    reuse_port: bool = _opt(False, "bind with SO_REUSEPORT so that several processes share the port (set for the "
                            "children of --processes)", "pool")
    inference: str = _opt("local", "local: engines in this process; ray: a Ray Serve inference pool (needs the ray extra)",
                          "pool", ("local", "ray"))
    ray_address: str = _opt("local", "Ray cluster: local (start one in this process), auto (this host's cluster) "
                            "or ray://head:10001", "pool")
    ray_app: str = _opt("granite-stream", "Serve application name of the pool", "pool")
    ray_deploy: str = _opt("missing", "missing: deploy the pool if it is not running; never: only connect; "
                           "always: deploy or update it", "pool", ("missing", "never", "always"))
    ray_min_replicas: int = _opt(1, "pool replicas (a fixed count when equal to ray_max_replicas)", "pool")
    ray_max_replicas: int = _opt(1, "above ray_min_replicas: Serve autoscaling between the two", "pool")
    ray_target_ongoing: float = _opt(4.0, "autoscaling target: ongoing requests per replica", "pool")
    ray_gpus_per_replica: float = _opt(-1.0, "GPUs per replica (-1: 1 if the cluster has GPUs, else CPU replicas)",
                                       "pool")
    ray_cpus_per_replica: float = _opt(0.0, "Ray CPUs reserved per replica (0: cpu_threads, 1 on GPU replicas)", "pool")
    ray_max_inflight: int = _opt(0, "requests this gateway keeps in flight to the pool (0: max replicas x 2 x max_batch)",
                                 "pool")
    ray_local_cpus: int = _opt(0, "CPUs of a ray_address=local instance (0: all)", "pool")
    granite_encoder_batching: str = _opt("exact", "Granite: exact (each utterance encoded alone: a batch decodes as "
                                         "one by one) or padded (one zero-padded encoder batch, replayed from CUDA "
                                         "graphs on a GPU: the benchmarked fast path, docs/gpu_server.md); local "
                                         "inference only", "engine", ("exact", "padded"))
    granite_decode_max_graphs: int = _opt(8, "Granite on CUDA: decode states kept (one per batch x KV-capacity bucket, "
                                          "each a captured graph plus its KV cache); a state evicted and needed "
                                          "again is captured again under load. More cost GPU memory; the measured "
                                          "400-stream configuration used 32 (docs/deployment.md); 0: as many as half "
                                          "the free GPU memory holds at startup (8 to 64)", "engine")
    granite_compile_step: str = _opt("off", "Granite on CUDA: torch.compile the decode step (on), or compile it and "
                                     "keep it only if a timed decode at warm-up is faster than the uncompiled one "
                                     "(auto)", "engine", ("off", "on", "auto"))
    granite_speculation: str = _opt("on", "Granite finals: self-speculative decoding with the CTC draft (on), or always "
                                    "autoregressive (off). The paper (arXiv 2603.11243) measured 4.4x the RTFx of greedy "
                                    "decoding for +12 % relative WER; docs/granite_gpu.md", "engine", ("on", "off"))
    granite_ctc_entropy_threshold: float = _opt(0.7, "Granite speculation: accept the CTC draft unverified when its "
                                                "largest frame entropy (nats) is at most this (IBM: 0.7; lower: more "
                                                "LLM verification, slower, closer to greedy)", "engine")
    granite_verify_threshold: float = _opt(0.1, "Granite speculation: a verified draft is accepted when every token's "
                                           "LLM probability is at least this (IBM: 0.1; higher: more decoding, slower, "
                                           "closer to greedy); 0..1", "engine")
    granite_warm_decode_seconds: str = _opt("3,6,12", "Granite on CUDA: at startup, decode a batch of each size up to "
                                            "max_batch for each of these utterance lengths (s), so that the decode "
                                            "states live traffic needs are captured before it arrives (empty: off)",
                                            "engine")
    max_batch: int = _opt(8, "largest inference batch across sessions", "worker")
    max_wait_ms: float = _opt(5.0, "how long a batch may wait to fill", "worker")
    max_queue: int = _opt(512, "queued inference requests before partials are shed and new sessions refused", "worker")
    early_final_ms: float = _opt(200.0, "decode an utterance's final once a pause reaches this, before the VAD's silence_ms "
                                 "ends it; published if the pause lasts, discarded if speech resumes (0: off)", "worker")
    partial_refresh: str = _opt("on", "while a partial waits in the inference queue, replace it every partial_interval with "
                                "one on the newer audio (nothing extra runs; under load partials come fresher and a little "
                                "less often); off: it runs on the audio it was asked with", "worker", ("on", "off"))
    diarize_threshold: float = _opt(0.84, "speaker labels (diarize): cosine similarity to the nearest speaker below "
                                    "which an utterance starts a new speaker (docs/diarization.md); -1..1", "diarization")
    diarize_max_speakers: int = _opt(8, "speaker labels: at most this many speakers per session (then the nearest)",
                                     "diarization")
    diarize_change_threshold: float = _opt(0.75, "speaker labels: two stretches of one utterance less similar than "
                                           "this are a change of speaker (speaker_turns); -1..1", "diarization")
    max_sessions: int = _opt(256, "concurrent sessions; more get HTTP 503", "limits")
    max_sessions_per_ip: int = _opt(32, "concurrent sessions per client address; more get HTTP 429", "limits")
    max_frame_bytes: int = _opt(1 << 20, "largest audio frame (too_large beyond)", "limits")
    max_utterance_s: float = _opt(30.0, "upper bound for a client's vad.max_utterance_s", "limits")
    max_session_s: float = _opt(4 * 3600.0, "seconds of audio per session (0: no limit)", "limits")
    max_upload_bytes: int = _opt(25 << 20, "largest body POST /v1/audio/transcriptions or /translations accepts "
                                 "(HTTP 413 file_too_large beyond, refused before it is read)", "limits")
    max_upload_audio_s: float = _opt(3600.0, "longest decoded audio of an uploaded file (HTTP 413 audio_too_long "
                                     "beyond; max_session_s applies too; 0: only max_session_s)", "limits")
    idle_timeout_s: float = _opt(60.0, "end sessions that send nothing this long (0: never)", "limits")
    realtime_factor: float = _opt(4.0, "throttle clients sending audio faster than this multiple of real time (0: never)",
                                  "limits")
    drain_deadline_s: float = _opt(10.0, "on SIGTERM/SIGINT, how long open sessions get to receive their finals",
                                   "limits")
    api_keys_file: str = _opt("", "file of accepted API keys, one per line (also $GRANITE_STREAM_API_KEYS)", "security")
    allowed_origins: str = _opt("", "comma-separated Origin values browsers may connect from (empty: any)", "security")
    certfile: str = _opt("", "TLS certificate chain (PEM): serve wss:// and https://", "security")
    keyfile: str = _opt("", "TLS private key (PEM; default: the certfile)", "security")
    malloc_arenas: int = _opt(2, "cap glibc's malloc arenas (0: glibc's default of 8 per core); fewer arenas keep RSS "
                              "from creeping up over days", "memory")
    malloc_mmap_threshold_kb: int = _opt(256, "allocations this large get their own mmap, returned on free (0: glibc's "
                                         "dynamic threshold, which lets large buffers fragment the heap)", "memory")
    memory_trim_s: float = _opt(60.0, "every this many seconds, give free heap pages back to the kernel (0: never)",
                                "memory")
    log_transcripts: bool = _opt(False, "log final transcripts (off: they are personal data)", "logging")
    log_format: str = _opt("text", "text or json (one JSON object per line, with session_id where known)", "logging",
                           ("text", "json"))
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR", "logging", ("DEBUG", "INFO", "WARNING", "ERROR"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A setting from some source could not be used; the message names the source and the field."""


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


def _field_types() -> dict[str, type]:
    hints = get_type_hints(ServeConfig)  # f.type is a string here (from __future__ import annotations)
    kinds = {f.name: hints[f.name] for f in fields(ServeConfig)}
    assert set(kinds.values()) <= {str, int, float, bool}, "a setting is a str, int, float or bool"
    return kinds


def _check(config: ServeConfig, source: str, values: Mapping[str, Any]) -> None:
    for f in fields(ServeConfig):
        choices = f.metadata["choices"]
        if f.name in values and choices and getattr(config, f.name) not in choices:
            raise ConfigError(f"{source}: {f.name} must be one of {list(choices)}, got {getattr(config, f.name)!r}")
    if "granite_verify_threshold" in values and not 0.0 <= config.granite_verify_threshold <= 1.0:
        raise ConfigError(f"{source}: granite_verify_threshold must be between 0 and 1, got "
                          f"{config.granite_verify_threshold!r}")
    for name in ("diarize_threshold", "diarize_change_threshold"):
        if name in values and not -1.0 <= getattr(config, name) <= 1.0:
            raise ConfigError(f"{source}: {name} must be a cosine similarity between -1 and 1, got {getattr(config, name)!r}")
    if "max_upload_bytes" in values and config.max_upload_bytes < 1:
        raise ConfigError(f"{source}: max_upload_bytes must be >= 1, got {config.max_upload_bytes!r}")
    if "max_upload_audio_s" in values and not 0.0 <= config.max_upload_audio_s < math.inf:
        raise ConfigError(f"{source}: max_upload_audio_s must be >= 0 (0: only max_session_s), got "
                          f"{config.max_upload_audio_s!r}")
    if "diarize_max_speakers" in values and config.diarize_max_speakers < 1:
        raise ConfigError(f"{source}: diarize_max_speakers must be >= 1")
    if "granite_decode_max_graphs" in values and config.granite_decode_max_graphs < 0:
        raise ConfigError(f"{source}: granite_decode_max_graphs must be >= 0 (0: from free GPU memory)")
    if "granite_warm_decode_seconds" in values:
        try:
            seconds_list(config.granite_warm_decode_seconds)
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


def load_config(cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                toml_path: Path | str | None = None) -> ServeConfig:
    """Merge the sources into one :class:`ServeConfig` (the preset unresolved; see :func:`load_config_and_sources`)."""
    return load_config_and_sources(cli, env, toml_path)[0]


def load_config_and_sources(cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                            toml_path: Path | str | None = None) -> tuple[ServeConfig, frozenset[str]]:
    """Merge the sources into one :class:`ServeConfig`, and name the settings some source gave.

    Args:
        cli: flag values that were given on the command line (absent flags must be left out).
        env: the environment (``os.environ`` when ``None``).
        toml_path: a TOML file; ``None`` uses ``$GRANITE_STREAM_CONFIG`` if set. Keys may sit at the
            top level or under ``[serve]``.

    Raises:
        ConfigError: unknown TOML keys, wrong types or values, a missing TOML file.

    Returns:
        ``(config, explicit)``: ``explicit`` holds the fields set by the TOML file, the environment or
        a flag (a preset changes only the others).
    """
    env = os.environ if env is None else env
    explicit: set[str] = set()
    types = _field_types()
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
        data = data.get("serve", data)
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        values = {k: _convert(k, types[k], v, str(path)) for k, v in data.items()}
        config = dataclasses.replace(config, **values)
        _check(config, str(path), values)
        explicit.update(values)
    values = {}
    for name, kind in types.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _convert(name, kind, raw, f"${ENV_PREFIX}{name.upper()}")
    config = dataclasses.replace(config, **values)
    _check(config, "environment", values)
    explicit.update(values)
    values = {k: _convert(k, types[k], v, f"--{k.replace('_', '-')}") for k, v in (cli or {}).items() if v is not None}
    config = dataclasses.replace(config, **values)
    _check(config, "command line", values)
    explicit.update(values)
    return config, frozenset(explicit)


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
        explicit: the settings a source gave; the preset never overrides them.
        cuda_available: callable telling whether a CUDA device is present (default: torch's, imported
            only when the answer matters); tests pass their own.

    Returns:
        ``(config, why)``: ``preset`` is resolved to ``gpu`` or ``cpu``; ``why`` is one line naming
        the reason and every setting the preset changed.
    """
    choice = config.preset
    if choice == "auto":
        if config.inference != "local":
            return dataclasses.replace(config, preset="cpu"), "preset cpu: inference runs in a Ray pool (its replicas have their own settings)"
        if config.engine != "granite":
            # auto may fall back to Whisper on the CPU, where batch 64 and the Granite settings do harm
            return dataclasses.replace(config, preset="cpu"), (
                f"preset cpu: engine {config.engine} (the GPU preset needs --engine granite, or --preset gpu)")
        if config.device == "cpu":
            return dataclasses.replace(config, preset="cpu"), "preset cpu: --device cpu"
        if cuda_available is None:
            from stream_server.engines import cuda_available
        if not cuda_available():
            return dataclasses.replace(config, preset="cpu"), "preset cpu: no CUDA device"
        reason = "preset gpu: a CUDA device is present and engine granite serves there"
    else:
        reason = f"preset {choice}: asked for"
    if choice == "cpu":
        return config, reason
    changed = {k: v for k, v in GPU_PRESET.items() if k not in explicit}
    kept = sorted(k for k in GPU_PRESET if k in explicit)
    config = dataclasses.replace(config, preset="gpu", **changed)
    detail = ", ".join(f"{k}={v!r}" for k, v in changed.items()) or "nothing (every preset setting was given)"
    if kept:
        detail += f"; kept as given: {', '.join(kept)}"
    return config, f"{reason}; set {detail}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting, grouped, with no argparse defaults (so only given flags override)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    parser.add_argument("--config", type=Path, default=None,
                        help=f"TOML file of settings (also ${ENV_PREFIX}CONFIG); flags and environment override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective settings as TOML and exit (--print-config-format for others)")
    parser.add_argument("--print-config-format", choices=("toml", "json", "markdown"), default="toml")
    for f in fields(ServeConfig):
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default!r}; env {ENV_PREFIX}{f.name.upper()})"
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action="store_const", const=True, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=str, default=None, choices=f.metadata["choices"],
                               metavar=f.name.upper(), help=help_text)


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (those left ``None`` were not given)."""
    return {f.name: getattr(args, f.name) for f in fields(ServeConfig) if getattr(args, f.name, None) is not None}


def render(config: ServeConfig, fmt: str = "toml", why: str = "") -> str:
    """The effective settings as TOML, JSON, or the README's markdown table (defaults, not values).

    ``why`` (the preset's reason, :func:`resolve_preset`) heads the TOML as a comment."""
    if fmt == "json":
        return json.dumps(config.to_dict(), indent=2)
    if fmt == "markdown":
        rows = ["| setting | flag | environment | default | meaning |", "|---|---|---|---|---|"]
        for f in fields(ServeConfig):
            default = f"`{f.default}`" if f.default != "" else "(empty)"
            rows.append(f"| `{f.name}` | `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | "
                        f"{default} | {f.metadata['help']} |")
        return "\n".join(rows)
    lines = [f"# {why}", "[serve]"] if why else ["[serve]"]
    for key, value in config.to_dict().items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines)
