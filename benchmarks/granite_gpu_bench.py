"""Granite Speech engine speed: transformers ``generate`` vs the engine's static-cache / CUDA-graph loop.

Builds the full-size granite-4.0-1b-speech architecture (encoder 16×1024 conformer with a
348-class CTC head, 2-layer Q-Former projector, 40-layer 2048-wide Granite LLM with 4 KV heads,
vocab 100353; no LoRA) with **random** bf16 weights initialised directly on the GPU, and a
byte-level tokenizer with the full vocabulary size (nothing is downloaded). Decode lengths are
forced (``force_new_tokens``), so random weights give the real amount of work.

Measured in one run, baseline (``decode_backend="generate"``) against the fast path
(``"graphs"`` on CUDA, ``"loop"`` on CPU), all through ``GraniteEngine.transcribe_batch``:

* ``b1_final``: batch-1 final latency, one 10 s utterance, 30 forced tokens;
* ``b1_breakdown`` (fast path): encoder+projector, prefill (+ first token), per decode token;
* ``b64``: 64 × 10 s utterances in one call, RTFx = audio seconds / wall seconds;
* ``spec_verify``: the speculative accept path (encoder + CTC + one teacher-forced verify pass
  over a ``--draft-tokens``-token draft; random weights make the CTC draft junk, so the draft is
  cut to that length) and the CTC-accept path (encoder + CTC only);
* ``varlen``: a batch of utterances of different lengths vs the same utterances one by one
  (left padding), tokens compared for each backend and between backends;
* ``served``: batch-1 final of the engine exactly as ``granite-stream serve`` builds it on a GPU
  (the GPU preset's options, :func:`stream_server.cli.granite_options`, then ``warmup()``: graph
  captures and the compiled-step choice), same utterance and forced length as ``b1``;
* ``spec`` also times a rejected draft that resumes after half its tokens (the paper's step 3,
  ``resumed``) against the same rejection decoded from scratch (``restart``).

Timings: warm-up first, ``torch.cuda.synchronize()`` around each call, median of ``--repeats``.

    python -m benchmarks.granite_gpu_bench --out granite_gpu.json          # CUDA, full size
    python -m benchmarks.granite_gpu_bench --tiny --out /tmp/tiny.json     # CPU smoke (tiny model)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
import traceback
from typing import Sequence

import numpy as np
import torch

from stream_server.inference.types import InferenceRequest
from granite_stream_testing.forced_granite import ForcedLengthGraniteEngine
from stream_server.engines.granite.engine import Draft, Verification, Work
from stream_server.engines.granite.options import GraniteOptions

SR = 16000


# ---------------------------------------------------------------------------------------------- model
def full_tokenizer(vocab_size: int = 100353):
    """Byte-level tokenizer with ``vocab_size`` ids: bytes 0–255, fillers, then the special tokens
    (``<|audio|>`` = vocab_size − 1 = 100352, granite-4.0-1b-speech's audio token id)."""
    from granite_stream_testing.tiny_granite import build_tiny_tokenizer

    return build_tiny_tokenizer(vocab_size)


def full_config(tokenizer):
    """granite-4.0-1b-speech's architecture (as published; weights random)."""
    from transformers import GraniteSpeechConfig

    eos = tokenizer.eos_token_id
    return GraniteSpeechConfig(
        text_config={
            "model_type": "granite",
            "vocab_size": 100353,
            "hidden_size": 2048,
            "intermediate_size": 4096,
            "num_hidden_layers": 40,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "max_position_embeddings": 4096,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.0078125,
            "residual_multiplier": 0.22,
            "logits_scaling": 8.0,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "bos_token_id": eos,
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,  # untied LM head, as the tiny test model (issue 18)
        },
        encoder_config={
            "input_dim": 160,
            "num_layers": 16,
            "hidden_dim": 1024,
            "feedforward_mult": 4,
            "num_heads": 8,
            "dim_head": 128,
            "output_dim": 348,
            "context_size": 200,
            "max_pos_emb": 512,
            "dropout": 0.1,
            "conv_kernel_size": 15,
            "conv_expansion_factor": 2,
        },
        projector_config={
            "model_type": "blip_2_qformer",
            "hidden_size": 1024,
            "num_hidden_layers": 2,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "encoder_hidden_size": 1024,
            "cross_attention_frequency": 1,
            "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-12,
        },
        audio_token_index=100352,
        has_lora_adapter=False,
        downsample_rate=5,
        window_size=15,
        tie_word_embeddings=False,
    )


def build_full(device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import GraniteSpeechForConditionalGeneration

    tokenizer = full_tokenizer()
    config = full_config(tokenizer)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GraniteSpeechForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    # PreTrainedModel.to is declared with @wraps(torch.nn.Module.to): type checkers see the unbound method.
    model.to(device=device, dtype=dtype)  # type: ignore[call-arg]
    model.eval()
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


def build_tiny(device: str):
    from granite_stream_testing.tiny_granite import build_tiny_granite

    model, tokenizer = build_tiny_granite(seed=0)
    return model.to(device), tokenizer


# ---------------------------------------------------------------------------------------------- helpers
def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(SR * seconds))
    t = np.arange(n) / SR
    f = 150 + 40 * seed % 700
    return (0.3 * np.sin(2 * np.pi * f * t * (1 + t)) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def reqs(clips) -> list[InferenceRequest]:
    return [InferenceRequest("bench", i, "final", c) for i, c in enumerate(clips)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device: str, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
        "n": len(times),
    }


class DraftCutEngine(ForcedLengthGraniteEngine):
    """Bench-only: the CTC draft's tokens cut to ``draft_tokens`` (random weights give junk drafts
    as long as the frame count; a real 10 s draft is ~30 tokens), through the public ``draft`` stage."""

    draft_tokens = 30

    def draft(self, work: Work) -> Draft:
        d = super().draft(work)
        ids = list(d.token_ids)
        if len(ids) < self.draft_tokens:  # pad a short junk draft with spaces' byte id
            ids = ids + self.tokenizer.encode(" a" * self.draft_tokens, add_special_tokens=False)[
                : self.draft_tokens - len(ids)]
        ids = ids[: self.draft_tokens]
        work.info["draft_tokens"] = len(ids)
        return dataclasses.replace(d, token_ids=tuple(ids))


class ResumeEngine(DraftCutEngine):
    """Bench-only: every draft is rejected after its first ``keep`` tokens (random weights give no
    natural rejection point), so the resumed decode's cost can be timed; overrides the public
    ``verify`` stage's verdicts (the scoring pass itself still runs)."""

    keep = 15

    def verify(self, works: list[Work], drafts: Sequence[Draft]) -> list[Verification]:
        verdicts = super().verify(works, drafts)
        return [dataclasses.replace(v, accepted=False, passed_prefix=min(self.keep, len(d.token_ids)))
                for v, d in zip(verdicts, drafts)]


def first_diff(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (len if equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke run)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--fast", default=None, help="fast backend (default: graphs on CUDA, loop on CPU)")
    ap.add_argument("--seconds", type=float, default=10.0, help="utterance length")
    ap.add_argument("--tokens", type=int, default=30, help="forced decode length")
    ap.add_argument("--batch", type=int, default=64, help="throughput batch size")
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats of the fast path (baseline: a third)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=30)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: b1,breakdown,b64,spec,varlen,served")
    ap.add_argument("--compile", action="store_true",
                    help="also measure the graphs backend with a torch.compile'd decode layer (CUDA)")
    ap.add_argument("--encoder-graphs", action="store_true",
                    help="fast path with encoder_batching='padded', so the encoder and projector replay CUDA graphs "
                         "(the server's setting; graphs are captured in the warm-up repeats)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fast_backend = args.fast or ("graphs" if device == "cuda" else "loop")
    skip = set(filter(None, args.skip.split(",")))
    import transformers

    info = {
        "argv": list(sys.argv[1:] if argv is None else argv),  # the flags (e.g. --encoder-graphs) decide which paths the figures are of
        "device": device,
        "card": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "model": "tiny" if args.tiny else "granite-4.0-1b-speech architecture, random weights",
        "fast_backend": fast_backend,
        "seconds": args.seconds,
        "tokens": args.tokens,
    }
    results: dict = {"info": info}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    t0 = time.perf_counter()
    if args.tiny:
        model, tokenizer = build_tiny(device)
    else:
        model, tokenizer = build_full(device, torch.bfloat16 if device == "cuda" else torch.float32)
    sync(device)
    info["build_s"] = time.perf_counter() - t0
    info["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    print(json.dumps(info), flush=True)

    option_fields = {f.name for f in dataclasses.fields(GraniteOptions)}

    def engine(backend, cls=ForcedLengthGraniteEngine, **kw):
        kw.setdefault("force_new_tokens", args.tokens)
        kw.setdefault("speculative", False)
        options = GraniteOptions(decode_backend=backend, max_batch=max(args.batch, 8),
                                 **{k: kw.pop(k) for k in list(kw) if k in option_fields})
        # Every class here records its tokens (info["token_ids"]): sections compare them.
        return cls(model=model, tokenizer=tokenizer, model_label="bench", options=options, **kw)

    encoder_kw = {"encoder_batching": "padded"} if args.encoder_graphs else {}
    base = engine("generate")
    fast = engine(fast_backend, **encoder_kw)
    rb = max(2, args.repeats // 3)
    utt = clip(args.seconds, 1)

    def section(name, fn):
        if name in skip:
            return
        try:
            results[name] = fn()
        except Exception as exc:  # keep the other sections' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(name, json.dumps(results[name]), flush=True)
        save()

    # -- batch-1 final latency
    def b1():
        r = {}
        for label, eng, n in (("generate", base, rb), (fast_backend, fast, args.repeats)):
            r[label] = timeit(lambda: eng.transcribe_batch(reqs([utt])), device, args.warmup, n)
        tb = base.transcribe_batch(reqs([utt]))[0].info["token_ids"]
        tf = fast.transcribe_batch(reqs([utt]))[0].info["token_ids"]
        r["tokens_equal"] = tb == tf
        r["first_diff"] = first_diff(tb, tf)
        r["n_tokens"] = len(tf)
        r["speedup"] = r["generate"]["median_ms"] / r[fast_backend]["median_ms"]
        return r

    section("b1", b1)

    # -- breakdown of the fast path at batch 1
    def breakdown():
        r = {}
        works = fast.prepare(reqs([utt]))

        def enc():
            fast.encode(works)
            fast.project(works)

        with torch.inference_mode():
            r["encoder_projector"] = timeit(enc, device, args.warmup, args.repeats)
            embeds, mask = fast.prompt_embeddings(works)
            r["prompt_len"] = int(embeds.shape[1])
            if fast_backend != "generate":
                one = timeit(lambda: fast.decode(embeds, mask, 1, suppress_eos=True), device, args.warmup, args.repeats)
                full = timeit(lambda: fast.decode(embeds, mask, args.tokens, suppress_eos=True), device, args.warmup,
                              args.repeats)
                r["prefill_plus_first_token"] = one
                r["decode_all"] = full
                r["per_token_ms"] = (full["median_ms"] - one["median_ms"]) / max(1, args.tokens - 1)
            gen_one = timeit(lambda: base.decode(embeds, mask, 1, suppress_eos=True), device, 1, rb)
            gen_full = timeit(lambda: base.decode(embeds, mask, args.tokens, suppress_eos=True), device, 1, rb)
            r["generate_prefill_plus_first_token"] = gen_one
            r["generate_decode_all"] = gen_full
            r["generate_per_token_ms"] = (gen_full["median_ms"] - gen_one["median_ms"]) / max(1, args.tokens - 1)
        return r

    section("breakdown", breakdown)

    # -- batch throughput
    def b64():
        clips = [clip(args.seconds, 100 + i) for i in range(args.batch)]
        audio_s = args.batch * args.seconds
        r = {"batch": args.batch, "audio_s": audio_s}
        for label, eng, n in (("generate", base, max(2, rb // 2)), (fast_backend, fast, max(3, args.repeats // 2))):
            t = timeit(lambda: eng.transcribe_batch(reqs(clips)), device, 1, n)
            t["rtfx"] = audio_s / (t["median_ms"] / 1e3)
            r[label] = t
        works = fast.prepare(reqs(clips))

        def enc():
            fast.encode(works)
            fast.project(works)

        with torch.inference_mode():
            r["encoder_projector"] = timeit(enc, device, 1, 3)
        rb_ = base.transcribe_batch(reqs(clips))
        rf_ = fast.transcribe_batch(reqs(clips))
        same = [a.info["token_ids"] == b.info["token_ids"] for a, b in zip(rb_, rf_)]
        r["rows_equal_generate_vs_fast"] = sum(same)
        r["speedup"] = r["generate"]["median_ms"] / r[fast_backend]["median_ms"]
        return r

    section("b64", b64)

    # -- speculative accept paths
    def spec():
        r = {}
        DraftCutEngine.draft_tokens = args.draft_tokens
        verify_eng = engine(fast_backend, cls=DraftCutEngine, force_new_tokens=None, speculative=True,
                            ctc_entropy_threshold=-1.0, verify_threshold=0.0)
        ctc_eng = engine(fast_backend, force_new_tokens=None, speculative=True, ctc_entropy_threshold=math.inf)
        if not verify_eng.has_ctc:
            return {"error": "no CTC head"}
        r["verify_accept"] = timeit(lambda: verify_eng.transcribe_batch(reqs([utt])), device, args.warmup, args.repeats)
        out = verify_eng.transcribe_batch(reqs([utt]))[0].info
        r["verify_path"] = out.get("path")
        r["draft_tokens"] = out.get("draft_tokens")
        r["ctc_accept"] = timeit(lambda: ctc_eng.transcribe_batch(reqs([utt])), device, args.warmup, args.repeats)
        r["ctc_path"] = ctc_eng.transcribe_batch(reqs([utt]))[0].info.get("path")
        ResumeEngine.draft_tokens, ResumeEngine.keep = args.draft_tokens, args.draft_tokens // 2
        for label, resume in (("resumed", True), ("restart", False)):
            eng = engine(fast_backend, cls=ResumeEngine, force_new_tokens=None, speculative=True,
                         ctc_entropy_threshold=-1.0, verify_threshold=0.0, resume_from_draft=resume)
            r[label] = timeit(lambda: eng.transcribe_batch(reqs([utt])), device, args.warmup, args.repeats)
            out = eng.transcribe_batch(reqs([utt]))[0].info
            r[label].update(path=out.get("path"), new_tokens=out.get("new_tokens"), resumed_tokens=out.get("resumed_tokens"))
        return r

    section("spec", spec)

    # -- variable-length batch == one by one
    def varlen():
        lens = [3.0, 4.5, 6.0, 7.0, 8.0, 9.0, 10.0, 10.5]
        clips = [clip(s, 200 + i) for i, s in enumerate(lens)]
        r = {"seconds": lens}
        toks = {}
        for label, eng in (("generate", base), (fast_backend, fast)):
            batched = [x.info["token_ids"] for x in eng.transcribe_batch(reqs(clips))]
            single = [eng.transcribe_batch(reqs([c]))[0].info["token_ids"] for c in clips]
            toks[label] = (batched, single)
            r[label] = {
                "rows_equal_batch_vs_single": sum(a == b for a, b in zip(batched, single)),
                "first_diff": [first_diff(a, b) for a, b in zip(batched, single)],
            }
        gb, gs = toks["generate"]
        fb, fs = toks[fast_backend]
        r["single_generate_vs_fast_first_diff"] = [first_diff(a, b) for a, b in zip(gs, fs)]
        r["batch_generate_vs_fast_first_diff"] = [first_diff(a, b) for a, b in zip(gb, fb)]
        r["rows"] = len(lens)
        return r

    section("varlen", varlen)

    # -- the served configuration: what `granite-stream serve --engine granite --model DIR` builds on a GPU
    def served():
        from stream_server.cli import granite_options
        from stream_server.settings import load_config_and_sources, resolve_preset

        config, why = resolve_preset(*load_config_and_sources({"engine": "granite"}, {}),
                                     cuda_available=lambda: device == "cuda")
        options = granite_options(config)
        eng = ForcedLengthGraniteEngine(model=model, tokenizer=tokenizer, model_label="bench",
                                        force_new_tokens=args.tokens, options=options)
        t0 = time.perf_counter()
        eng.warmup()
        sync(device)
        r = {"preset": why, "warmup_s": time.perf_counter() - t0, "options": {k: repr(v) for k, v in dataclasses.asdict(options).items()},
             "compile_choice": eng.compile_choice, "decode_backend": eng.decode_backend,
             "encoder_backend": eng.encoder_backend,
             "max_graphs": eng.decoder.max_graphs if eng.decode_backend != "generate" else None}
        r["b1"] = timeit(lambda: eng.transcribe_batch(reqs([utt])), device, args.warmup, args.repeats)
        r["b1_tokens_equal_generate"] = (eng.transcribe_batch(reqs([utt]))[0].info["token_ids"]
                                         == base.transcribe_batch(reqs([utt]))[0].info["token_ids"])
        return r

    section("served", served)

    # -- graphs + torch.compile'd decode layer
    def compiled():
        # The same encoder setting as the fast path (before the third session's fix it was always
        # the eager encoder here, so "graphs+compile" paid ~20 ms of eager encoder at batch 1).
        eng = engine("graphs", compile_step=True, **encoder_kw)
        r = {}
        t0 = time.perf_counter()
        eng.transcribe_batch(reqs([utt]))
        sync(device)
        r["first_call_s"] = time.perf_counter() - t0
        r["b1"] = timeit(lambda: eng.transcribe_batch(reqs([utt])), device, args.warmup, args.repeats)
        tc = eng.transcribe_batch(reqs([utt]))[0].info["token_ids"]
        tb = base.transcribe_batch(reqs([utt]))[0].info["token_ids"]
        r["b1_tokens_equal_generate"] = tc == tb
        with torch.inference_mode():
            works = eng.prepare(reqs([utt]))
            eng.encode(works)
            eng.project(works)
            embeds, mask = eng.prompt_embeddings(works)
            one = timeit(lambda: eng.decode(embeds, mask, 1, suppress_eos=True), device, args.warmup, args.repeats)
            full = timeit(lambda: eng.decode(embeds, mask, args.tokens, suppress_eos=True), device, args.warmup,
                          args.repeats)
        r["prefill_plus_first_token"] = one
        r["per_token_ms"] = (full["median_ms"] - one["median_ms"]) / max(1, args.tokens - 1)
        clips = [clip(args.seconds, 100 + i) for i in range(args.batch)]
        t = timeit(lambda: eng.transcribe_batch(reqs(clips)), device, 1, max(3, args.repeats // 2))
        t["rtfx"] = args.batch * args.seconds / (t["median_ms"] / 1e3)
        r["b64"] = t
        return r

    if args.compile:
        section("compiled", compiled)

    if fast_backend == "graphs":
        results["graph_captures"] = fast.decoder.captures
    if device == "cuda":
        results["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    save()
    print_table(results, fast_backend)
    return 0


def print_table(r: dict, fast: str) -> None:
    info = r["info"]
    print(f"\n# {info['card']} | torch {info['torch']} (CUDA {info['cuda']}) | transformers {info['transformers']}")
    print(f"# model: {info['model']} | {info['seconds']} s utterance, {info['tokens']} forced tokens")

    def med(d, k):
        v = (d or {}).get(k)
        return f"{v['median_ms']:.1f} ms" if isinstance(v, dict) and "median_ms" in v else "-"

    rows = []
    if "b1" in r:
        rows.append(("batch-1 final latency", med(r["b1"], "generate"), med(r["b1"], fast),
                     f"tokens equal: {r['b1'].get('tokens_equal')}"))
    if "breakdown" in r:
        b = r["breakdown"]
        rows.append(("  encoder+projector", "", med(b, "encoder_projector"), f"prompt {b.get('prompt_len')} tok"))
        rows.append(("  prefill + 1st token", med(b, "generate_prefill_plus_first_token"),
                     med(b, "prefill_plus_first_token"), ""))
        g, f = b.get("generate_per_token_ms"), b.get("per_token_ms")
        rows.append(("  per decode token", f"{g:.2f} ms" if g else "-", f"{f:.2f} ms" if f else "-", ""))
    if "b64" in r and "generate" in r["b64"]:
        b = r["b64"]
        rows.append((f"batch-{b['batch']} wall", med(b, "generate"), med(b, fast), ""))
        rows.append((f"batch-{b['batch']} RTFx", f"{b['generate']['rtfx']:.0f}",
                     f"{b[fast]['rtfx']:.0f}" if "rtfx" in b.get(fast, {}) else "-", ""))
    if "spec" in r and "verify_accept" in r["spec"]:
        s = r["spec"]
        rows.append(("verify-accept path", "", med(s, "verify_accept"), f"{s.get('draft_tokens')} draft tok, {s.get('verify_path')}"))
        rows.append(("ctc-accept path", "", med(s, "ctc_accept"), str(s.get("ctc_path"))))
        for label in ("resumed", "restart"):
            if label in s:
                rows.append((f"rejected draft, {label}", "", med(s, label),
                             f"{s[label].get('new_tokens')} new tok after {s[label].get('resumed_tokens') or 0}"))
    if "varlen" in r and "generate" in r["varlen"]:
        v = r["varlen"]
        n = v["rows"]
        rows.append(("varlen batch == single", f"{v['generate']['rows_equal_batch_vs_single']}/{n}",
                     f"{v[fast]['rows_equal_batch_vs_single']}/{n}", ""))
    if "served" in r and "b1" in r["served"]:
        v = r["served"]
        rows.append(("served config: batch-1", "", med(v, "b1"), f"{v.get('compile_choice')}, max_graphs {v.get('max_graphs')}"))
    c = r.get("compiled") or {}
    if "b1" in c:
        rows.append(("graphs+compile: batch-1", "", med(c, "b1"), f"tokens == generate: {c.get('b1_tokens_equal_generate')}"))
        rows.append(("graphs+compile: per token", "", f"{c['per_token_ms']:.2f} ms", f"prefill+1st {med(c, 'prefill_plus_first_token')}"))
        rows.append(("graphs+compile: batch RTFx", "", f"{c['b64']['rtfx']:.0f}", med(c, "b64")))
    w = max(len(x[0]) for x in rows) if rows else 10
    print(f"{'':{w}}  {'generate':>12}  {fast:>12}")
    for name, a, b, note in rows:
        print(f"{name:{w}}  {a:>12}  {b:>12}  {note}")


if __name__ == "__main__":
    raise SystemExit(main())
