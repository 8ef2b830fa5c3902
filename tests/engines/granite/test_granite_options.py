"""GraniteOptions: the presets, validation, and the settings that select the served GPU path."""

from __future__ import annotations

import dataclasses

import pytest

from stream_server.cli import granite_options
from stream_server.engines.granite.options import PRESETS, GraniteOptions
from stream_server.settings import GPU_PRESET, load_config


def test_presets_name_the_reference_and_the_served_gpu_path():
    exact = GraniteOptions.preset("exact")
    assert (exact.encoder_batching, exact.encoder_backend, exact.decode_backend) == ("exact", "eager", "generate")
    fast = GraniteOptions.preset("fast", max_batch=16)
    assert (fast.encoder_batching, fast.encoder_backend, fast.decode_backend) == ("padded", "graphs", "graphs")
    assert (fast.max_batch, fast.decode_max_graphs, fast.compile_step) == (16, 0, "auto")
    assert GraniteOptions.preset("default") == GraniteOptions()
    with pytest.raises(ValueError, match="unknown Granite preset"):
        GraniteOptions.preset("turbo")


@pytest.mark.parametrize("bad", [{"encoder_batching": "sloppy"}, {"decode_backend": "beam"}, {"max_batch": 0},
                                 {"encoder_backend": "graphs"}, {"decode_max_graphs": -1}, {"compile_step": "yes"},
                                 {"warm_decode_seconds": (3.0, 0.0)}, {"verify_threshold": 1.5},
                                 {"ctc_entropy_reduce": "median"}, {"tokens_per_second_by_language": {"ja": 0.0}}])
def test_invalid_options_are_refused_when_built(bad):
    with pytest.raises(ValueError):
        GraniteOptions(**bad)


def test_gpu_preset_settings_select_the_fast_preset():
    # `serve` on a CUDA device fills unset settings from GPU_PRESET; the options they map to must be
    # the "fast" preset's, with the backends left to the device ("auto": graphs on CUDA).
    flat = {k: str(v) for k, v in GPU_PRESET.items()}
    options = granite_options(load_config(flat, {}))
    fast = PRESETS["fast"]
    assert dataclasses.replace(options, encoder_backend="graphs", decode_backend="graphs") == fast
