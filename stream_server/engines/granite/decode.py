"""Fast greedy decoding for Granite Speech's LLM: a static KV cache, optionally replayed as CUDA graphs.

``transformers``' ``generate`` spends most of a short decode in Python (logits processors, cache
bookkeeping, mask construction, one eager launch per op): on an H100 about 38 ms per token for the
1b model, whose weights need only ~1.2 ms to stream. :class:`StaticGreedyDecoder` runs the same
network (the model's own modules: embeddings, RMSNorms, q/k/v/o and MLP projections, rotary
embedding, ``lm_head``) in a fixed-shape greedy loop:

* **prefill** — one eager pass over the left-padded prompt (``inputs_embeds`` as the engine builds
  them) that writes every layer's keys/values into a preallocated cache of ``capacity`` slots;
* **step** — embed the last token, one forward at ``q_len = 1`` over the whole cache (an additive
  mask built from the ``valid`` slot flags hides left padding and unwritten slots), greedy argmax
  (EOS suppressed when the token count is forced, rows that emitted EOS keep emitting the pad
  id, as ``generate`` does), then advance the slot and position counters *on the device*.

Because the step reads and writes only preallocated tensors and never leaves the device, the
exact same Python function is either called eagerly (``use_graphs=False``; CPU, tests) or
captured once per ``(batch bucket, capacity bucket)`` into a ``torch.cuda.CUDAGraph`` and replayed
(``use_graphs=True``): one launch per token instead of ~1,500.

Equivalence with ``generate`` (greedy): same modules and multipliers (``embedding_multiplier`` on
every input embedding, ``attention_multiplier`` as the softmax scale, ``residual_multiplier``);
positions are ``cumsum(mask) - 1`` as ``generate`` derives them for left padding; ``logits_scaling``
is positive and does not change the argmax. Grouped-query attention at ``q_len = 1`` is computed by
folding the query heads that share a key/value head into the query-length dimension (the same
head mapping as ``repeat_kv``), so the cache is never repeated.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["StaticGreedyDecoder", "batch_bucket", "capacity_bucket", "decode_states_for_memory"]


def batch_bucket(b: int) -> int:
    """Batch size rounded up to a power of two (graphs are captured per bucket)."""
    n = 1
    while n < b:
        n *= 2
    return n


def capture_cuda_graph(fn, device: torch.device, pool, warmups: int = 1):
    """Warm ``fn`` up on a side stream (cuBLAS handles, lazy buffers, compilation), then capture it.

    Captured on ``device``'s own side stream with ``capture_error_mode="thread_local"``: with one
    worker thread per GPU, the default ("global") lets another GPU's worker invalidate the capture
    (cudaErrorStreamCaptureInvalidated on cuda:1, seen on a 2 x H100 host).

    Returns:
        ``(graph, value)``: the graph, and what ``fn`` returned during the capture (its static output).
    """
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmups):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            value = fn()
    return graph, value


def decode_states_for_memory(free_bytes: int, state_bytes: int, fraction: float = 0.5, low: int = 8,
                             high: int = 64) -> int:
    """How many decode states to keep: as many of ``state_bytes`` as ``fraction`` of the free memory
    holds, within ``[low, high]`` (the rest is for activations, the encoder graphs, fragmentation).

    ``state_bytes`` should be the largest state traffic needs (largest batch bucket x the capacity of
    the longest warmed utterance); smaller buckets cost less, so the count errs on the safe side.
    """
    if state_bytes <= 0:
        return high
    return max(low, min(high, int(free_bytes * fraction) // int(state_bytes)))


def capacity_bucket(n: int, quantum: int = 64) -> int:
    """KV-cache capacity rounded up to a multiple of ``quantum``."""
    return max(quantum, -(-n // quantum) * quantum)


@dataclass
class _State:
    """Preallocated decode state (static addresses: a captured graph reads and writes these)."""

    k: list[torch.Tensor]  # per layer (B, KVH, C, D)
    v: list[torch.Tensor]
    valid: torch.Tensor  # (B, C) bool: slot holds a real (non-pad) token
    out: torch.Tensor  # (B, C) long: token fed at each slot
    tok: torch.Tensor  # (B,) long: next token to feed
    pos: torch.Tensor  # (B,) long: its position id
    cur: torch.Tensor  # (1,) long: its cache slot
    finished: torch.Tensor  # (B,) bool
    eos_bias: torch.Tensor  # (V,) additive logits bias (-inf on EOS when forced)
    prob: torch.Tensor  # (B, C) float32: the model's probability of the token at each slot (as picked)
    graph: torch.cuda.CUDAGraph | None = None  # captured step
    prefill: dict = field(default_factory=dict)  # prompt bucket -> _Prefill
    score: dict = field(default_factory=dict)  # prompt bucket -> _Prefill whose graph returns all hidden states


@dataclass
class _Prefill:
    embeds: torch.Tensor  # (B, T, H) before embedding_multiplier
    positions: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, 1, T, T) additive
    slots: torch.Tensor  # (T,) = arange(T)
    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None  # (B, T, H) final-norm hidden states (score passes only)


COMPILED_SHAPES = 256  # distinct (batch, capacity) buckets a compiled decode step may be compiled for


def _allow_recompiles(shapes: int) -> None:
    """Let torch._dynamo compile one function for ``shapes`` input shapes (process-wide setting).

    The default limit (8 per function) is below the batch x capacity buckets a server meets, and
    ``dynamic=False`` is what keeps each bucket's kernels specialised (and CUDA-graph capturable).
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(int(getattr(cfg, name)), shapes))
            break
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(int(cfg.accumulated_recompile_limit), 2 * shapes)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fused_layer(x, cos, sin, n1, wqkv, wo, n2, wgu, wdown, kc, vc, slots, mask,
                 n_heads: int, n_kv: int, head_dim: int, eps: float, scaling: float, resid: float, kv_len: int):
    """One Granite decoder layer with fused q/k/v and gate/up projections (same arithmetic as HF's).

    x: (B, T, H); cos/sin: (B, T, D); kc/vc: (B, KVH, C, D) caches written at ``slots``;
    mask: additive, (B, 1, 1, C) at T == 1 (all slots) or (B, 1, T, kv_len) otherwise.
    """
    b, t, hid = x.shape
    h = n1 * F.rms_norm(x.float(), (hid,), eps=eps).to(x.dtype)
    qkv = F.linear(h, wqkv).view(b, t, n_heads + 2 * n_kv, head_dim)
    qk = qkv[:, :, : n_heads + n_kv]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    qk = (qk * c) + (_rotate_half(qk) * s)
    q = qk[:, :, :n_heads].transpose(1, 2)
    k = qk[:, :, n_heads:].transpose(1, 2)
    v = qkv[:, :, n_heads + n_kv :].transpose(1, 2)
    kc.index_copy_(2, slots, k)
    vc.index_copy_(2, slots, v)
    rep = n_heads // n_kv
    if t == 1:
        qg = q.reshape(b, n_kv, rep, head_dim)
        o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask, scale=scaling)
        o = o.reshape(b, 1, n_heads * head_dim)
    else:
        kk = kc[:, :, :kv_len].repeat_interleave(rep, dim=1)
        vv = vc[:, :, :kv_len].repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scaling)
        o = o.transpose(1, 2).reshape(b, t, n_heads * head_dim)
    x = x + F.linear(o, wo) * resid
    h = n2 * F.rms_norm(x.float(), (hid,), eps=eps).to(x.dtype)
    gu = F.linear(h, wgu)
    inter = gu.shape[-1] // 2
    x = x + F.linear(F.silu(gu[..., :inter]) * gu[..., inter:], wdown) * resid
    return x


class StaticGreedyDecoder:
    """Greedy decoding of a ``GraniteSpeechForConditionalGeneration``'s LLM over a static KV cache.

    Args:
        model: the speech model (``model.model.language_model`` is a ``GraniteModel``, ``model.lm_head``).
        use_graphs: capture the prefill (prompt length rounded up to ``prompt_quantum`` by extra left
            padding) and each decode step as CUDA graphs (CUDA only) and replay them.
        fused: run the layers through :func:`_fused_layer` (q/k/v and gate/up weights concatenated
            once: fewer, larger kernels; a second copy of those weights, ~1.9 GB for the 1b model).
            Only for plain ``nn.Linear`` projections without bias (no LoRA); otherwise the model's modules
            are called. Default: on with ``use_graphs``.
        compile_step: ``torch.compile`` the fused layer used by the decode step (CUDA; one compile per
            batch/capacity bucket, a few seconds each) — fuses the elementwise work into a few
            kernels. ``"auto"`` compiles too, and lets the owner switch back with :meth:`use_compiled`
            (the engine times both at warm-up and keeps the faster). Raises torch._dynamo's process-wide recompile limits (default 8 shapes per
            function: a server meets more buckets than that); a shape past them runs uncompiled.
        compile_backend: the ``torch.compile`` backend for ``compile_step`` (a name or a backend
            callable; tests pass one that runs the traced graphs without generating code).
        max_graphs: decode states (one per batch/capacity bucket) kept, least recently used dropped.
        sync_every: with EOS stopping, how many steps run between checks that every row is done.
        record_logits: keep every step's logits (``lm_head`` output, before EOS suppression) in
            :attr:`logits_log`, a list of (B, V) float32 tensors, for tests that compare them with a
            transformers forward pass. Eager only (a replayed graph would not append).
    """

    def __init__(self, model, *, use_graphs: bool = False, fused: bool | None = None, compile_step: bool = False,
                 compile_backend="inductor", max_graphs: int = 8, sync_every: int = 8,
                 prompt_quantum: int | None = None, record_logits: bool = False) -> None:
        self.model = model
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        cfg = self.lm.config
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.emb_mult = float(getattr(self.lm, "embedding_multiplier", 1.0))
        # lm_head's output over this is the model's logits (the argmax does not need it; probabilities do)
        self.logits_scaling = float(getattr(cfg, "logits_scaling", None) or 1.0)
        param = next(self.lm.parameters())
        self.device = param.device
        self.dtype = param.dtype
        if use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if record_logits and use_graphs:
            raise ValueError("record_logits needs the eager loop (use_graphs=False)")
        self.logits_log: list[torch.Tensor] | None = [] if record_logits else None
        self.use_graphs = use_graphs
        self.max_graphs = int(max_graphs)
        self.sync_every = max(1, int(sync_every))
        self.prompt_quantum = max(1, int(prompt_quantum if prompt_quantum is not None else (32 if use_graphs else 1)))
        self._states: OrderedDict[tuple, _State] = OrderedDict()
        self._pool: tuple[int, int] | None = None  # torch.cuda.graph_pool_handle(), shared by every capture
        self.captures = 0  # graphs captured so far (for benchmarks / stats)
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        self._fused_weights = None
        if fused is None:
            fused = use_graphs
        if fused and self._can_fuse():
            with torch.no_grad():
                self._fused_weights = [self._fuse(layer) for layer in self.lm.layers[: self.n_layers]]
        self.compile_mode = "auto" if compile_step == "auto" else bool(compile_step)
        self.compile_step = bool(compile_step) and self._fused_weights is not None
        self._layer_step = _fused_layer
        self._compiled_layer = None
        if self.compile_step:
            _allow_recompiles(COMPILED_SHAPES)
            # Not fullgraph=True: with it, a shape beyond the recompile limit fails the whole batch
            # (seen on an H100 at 400 streams: FailOnRecompileLimitHit); without, it runs eagerly.
            self._compiled_layer = torch.compile(_fused_layer, dynamic=False, backend=compile_backend)
            self._layer_step = self._compiled_layer

    def use_compiled(self, compiled: bool) -> None:
        """Run the decode step compiled or not (only where it was built compiled); captured states are
        dropped, since each graph has one of the two step functions baked in."""
        compiled = bool(compiled) and self._compiled_layer is not None
        if compiled == self.compile_step:
            return
        self.compile_step = compiled
        self._layer_step = self._compiled_layer if compiled and self._compiled_layer is not None else _fused_layer
        self._states.clear()

    def _can_fuse(self) -> bool:
        if getattr(self.model, "_hf_peft_config_loaded", False):
            return False
        for layer in self.lm.layers[: self.n_layers]:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                if type(lin) is not torch.nn.Linear or lin.bias is not None:
                    return False
            if getattr(m, "act_fn", None).__class__.__name__ not in ("SiLU", "SiLUActivation"):
                return False
        return True

    @staticmethod
    def _fuse(layer) -> tuple:
        a, m = layer.self_attn, layer.mlp
        return (
            layer.input_layernorm.weight,
            torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous(),
            a.o_proj.weight,
            layer.post_attention_layernorm.weight,
            torch.cat([m.gate_proj.weight, m.up_proj.weight]).contiguous(),
            m.down_proj.weight,
            float(layer.input_layernorm.variance_epsilon),
            float(a.scaling),
            float(layer.residual_multiplier),
        )

    # ------------------------------------------------------------------ network pieces
    def _layers_forward(self, st: _State, x: torch.Tensor, pos_ids: torch.Tensor, slots: torch.Tensor,
                        mask: torch.Tensor, kv_len: int | None, step: bool = False) -> torch.Tensor:
        """Run the decoder layers on ``x`` (B, T, H) (already multiplied), writing K/V at ``slots`` (T,).

        ``mask``: additive (B, 1, T, Lk) over the first ``Lk = kv_len`` (prefill) or all cache slots (step).
        """
        cos, sin = self.lm.rotary_emb(x, pos_ids)
        if self._fused_weights is not None:
            fn = self._layer_step if step else _fused_layer
            for i, (n1, wqkv, wo, n2, wgu, wdown, eps, scaling, resid) in enumerate(self._fused_weights):
                x = fn(x, cos, sin, n1, wqkv, wo, n2, wgu, wdown, st.k[i], st.v[i], slots, mask,
                       self.n_heads, self.n_kv, self.head_dim, eps, scaling, resid, kv_len or 0)
            return self.lm.norm(x)
        from transformers.models.granite.modeling_granite import apply_rotary_pos_emb

        b, t, _ = x.shape
        rep = self.n_heads // self.n_kv
        for i, layer in enumerate(self.lm.layers[: self.n_layers]):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            st.k[i].index_copy_(2, slots, k.to(st.k[i].dtype))
            st.v[i].index_copy_(2, slots, v.to(st.v[i].dtype))
            if t == 1:
                # q heads h*rep .. h*rep+rep-1 share kv head h (repeat_kv's mapping): fold them into q_len.
                qg = q.reshape(b, self.n_kv, rep, self.head_dim)
                o = F.scaled_dot_product_attention(qg, st.k[i], st.v[i], attn_mask=mask, scale=attn.scaling)
                o = o.reshape(b, self.n_heads, 1, self.head_dim)
            else:
                kk = st.k[i][:, :, :kv_len]
                vv = st.v[i][:, :, :kv_len]
                if rep > 1:
                    kk = kk.repeat_interleave(rep, dim=1)
                    vv = vv.repeat_interleave(rep, dim=1)
                o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=attn.scaling)
            o = attn.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
            x = x + o * layer.residual_multiplier
            x = x + layer.mlp(layer.post_attention_layernorm(x)) * layer.residual_multiplier
        return self.lm.norm(x)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        # constants made once, outside any graph capture (a host-to-device copy cannot be captured)
        return torch.where(allowed, self._zero, self._neg)

    def _pick(self, st: _State, logits: torch.Tensor, pad_id: int,
              eos_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of each row and its probability (softmax over the scaled logits, EOS
        suppression included: what greedy decoding chose from, so exp(max - logsumexp))."""
        if self.logits_log is not None:
            self.logits_log.append(logits.float().clone())
        logits = logits.float() + st.eos_bias
        nxt = logits.argmax(-1)
        scaled = logits / self.logits_scaling
        prob = torch.exp(scaled.amax(-1) - torch.logsumexp(scaled, -1))
        nxt = torch.where(st.finished, torch.full_like(nxt, pad_id), nxt)
        st.finished |= (nxt[:, None] == eos_t[None, :]).any(-1)
        return nxt, prob

    def _step(self, st: _State, pad_id: int, eos_t: torch.Tensor) -> None:
        """One decode step, entirely on the device (graph-capturable)."""
        st.valid.index_fill_(1, st.cur, True)
        x = self.lm.embed_tokens(st.tok)[:, None, :] * self.emb_mult
        mask = self._additive(st.valid)[:, None, None, :]
        h = self._layers_forward(st, x, st.pos[:, None], st.cur, mask, None, step=True)
        nxt, prob = self._pick(st, self.lm_head(h[:, -1]), pad_id, eos_t)
        st.cur.add_(1)
        st.pos.add_(1)
        st.tok.copy_(nxt)
        st.out.index_copy_(1, st.cur, nxt[:, None])
        st.prob.index_copy_(1, st.cur, prob[:, None])

    def _prefill(self, st: _State, p: _Prefill, pad_id: int, eos_t: torch.Tensor) -> None:
        """Prompt pass (causal, pads hidden) writing slots 0..T-1, then the first token (graph-capturable)."""
        t = p.embeds.shape[1]
        h = self._layers_forward(st, p.embeds * self.emb_mult, p.positions, p.slots, p.mask, t)
        st.finished.zero_()
        first, prob = self._pick(st, self.lm_head(h[:, -1]), pad_id, eos_t)
        st.tok.copy_(first)
        st.pos.copy_(p.positions[:, -1] + 1)
        st.cur.fill_(t)
        st.out.index_copy_(1, st.cur, first[:, None])
        st.prob.index_copy_(1, st.cur, prob[:, None])

    # ------------------------------------------------------------------ state / graphs
    def _new_state(self, b: int, cap: int) -> _State:
        dev, dt = self.device, self.dtype
        shape = (b, self.n_kv, cap, self.head_dim)
        vocab = self.lm_head.out_features
        return _State(
            k=[torch.zeros(shape, dtype=dt, device=dev) for _ in range(self.n_layers)],
            v=[torch.zeros(shape, dtype=dt, device=dev) for _ in range(self.n_layers)],
            valid=torch.zeros((b, cap), dtype=torch.bool, device=dev),
            out=torch.zeros((b, cap), dtype=torch.long, device=dev),
            tok=torch.zeros((b,), dtype=torch.long, device=dev),
            pos=torch.zeros((b,), dtype=torch.long, device=dev),
            cur=torch.zeros((1,), dtype=torch.long, device=dev),
            finished=torch.zeros((b,), dtype=torch.bool, device=dev),
            eos_bias=torch.zeros((vocab,), dtype=torch.float32, device=dev),
            prob=torch.zeros((b, cap), dtype=torch.float32, device=dev),
        )

    def _new_prefill(self, b: int, t: int) -> _Prefill:
        dev = self.device
        return _Prefill(
            embeds=torch.zeros((b, t, self.lm.config.hidden_size), dtype=self.dtype, device=dev),
            positions=torch.zeros((b, t), dtype=torch.long, device=dev),
            mask=torch.zeros((b, 1, t, t), dtype=self.dtype, device=dev),
            slots=torch.arange(t, device=dev),
        )

    def _capture(self, fn):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, _ = capture_cuda_graph(fn, self.device, self._pool, warmups=2)
        self.captures += 1
        return graph

    def _state(self, b: int, cap: int, pad_id: int, eos_t: torch.Tensor) -> _State:
        if not self.use_graphs:
            return self._new_state(b, cap)
        key = (b, cap, pad_id, tuple(eos_t.tolist()))
        st = self._states.get(key)
        if st is not None:
            self._states.move_to_end(key)
            return st
        while len(self._states) >= self.max_graphs:
            self._states.popitem(last=False)
        st = self._new_state(b, cap)
        st.valid.fill_(True)

        def step():
            st.cur.zero_()
            self._step(st, pad_id, eos_t)

        step()  # outside capture: compile / autotune first
        st.graph = self._capture(lambda: self._step(st, pad_id, eos_t))
        self._states[key] = st
        return st

    def _prefill_for(self, st: _State, b: int, t: int, pad_id: int, eos_t: torch.Tensor) -> _Prefill:
        p = st.prefill.get(t)
        if p is None:
            p = self._new_prefill(b, t)
            if self.use_graphs:
                p.mask.fill_(0)
                p.graph = self._capture(lambda: self._prefill(st, p, pad_id, eos_t))
            st.prefill[t] = p
        return p

    def _fill_prompt(self, p: _Prefill, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Copy left-padded prompts into a prefill's static buffers (extra left padding up to its
        length, filler rows for the batch bucket); returns the (B_bucket, T) real-token mask."""
        dev = self.device
        b, t0, _ = inputs_embeds.shape
        bb, t = p.embeds.shape[:2]
        mask = torch.zeros((bb, t), dtype=torch.bool, device=dev)
        mask[:b, t - t0 :] = attention_mask.to(dev).bool()
        mask[b:, -1] = True  # bucket filler rows: one real token, so no row attends to nothing
        p.embeds.zero_()
        p.embeds[:b, t - t0 :] = inputs_embeds.to(dev, self.dtype)
        p.positions.copy_((mask.long().cumsum(-1) - 1).clamp_(min=0))
        idx = torch.arange(t, device=dev)
        causal = idx[None, :] <= idx[:, None]  # (T, T) query t sees key j <= t; each position sees itself
        allowed = (causal[None] & mask[:, None, :]) | torch.eye(t, dtype=torch.bool, device=dev)[None]
        p.mask.copy_(self._additive(allowed)[:, None])
        return mask

    def _score_pass(self, st: _State, p: _Prefill) -> torch.Tensor:
        t = p.embeds.shape[1]
        return self._layers_forward(st, p.embeds * self.emb_mult, p.positions, p.slots, p.mask, t)

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, pad_token_id: int,
                      eos_token_ids) -> torch.Tensor:
        """The LM's final-norm hidden states of left-padded prompts: what ``lm_head`` reads, one pass.

        The same computation as the decode's prefill (so, with ``use_graphs``, one replay of a
        graph captured per batch x prompt-length bucket instead of transformers' eager forward, whose
        launches dominate a short pass). The engine scores speculative drafts with it.

        Args:
            inputs_embeds: (B, T, H) before ``embedding_multiplier``; attention_mask: (B, T), left padding.
            pad_token_id, eos_token_ids: as for :meth:`generate` (they key the decode state it borrows).

        Returns:
            (B, T, H), aligned with ``inputs_embeds`` (a copy, not the graph's static buffer).
        """
        context = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with context:
            b, t0, _ = inputs_embeds.shape
            eos_t = torch.tensor(sorted(int(e) for e in eos_token_ids), dtype=torch.long, device=self.device)
            bb = batch_bucket(b) if self.use_graphs else b
            t = -(-t0 // self.prompt_quantum) * self.prompt_quantum
            cap = capacity_bucket(t) if self.use_graphs else t
            st = self._state(bb, cap, int(pad_token_id), eos_t)
            p = st.score.get(t)
            if p is None:
                p = self._new_prefill(bb, t)
                if self.use_graphs:
                    p.mask.fill_(0)
                    if self._pool is None:
                        self._pool = torch.cuda.graph_pool_handle()
                    p.graph, p.hidden = capture_cuda_graph(lambda: self._score_pass(st, p), self.device, self._pool,
                                                           warmups=2)
                    self.captures += 1
                st.score[t] = p
            self._fill_prompt(p, inputs_embeds, attention_mask)
            if p.graph is not None:
                p.graph.replay()
                assert p.hidden is not None  # the capture's static output
                hidden = p.hidden
            else:
                hidden = self._score_pass(st, p)
            return hidden[:b, t - t0 :].clone()

    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                 eos_token_ids, pad_token_id: int, suppress_eos: bool = False) -> torch.Tensor:
        """See :meth:`_generate`; runs with this decoder's GPU as the current device (graphs replay on
        the current device's stream, and a worker thread's current device is cuda:0 by default)."""
        return self.generate_with_probs(inputs_embeds, attention_mask, max_new_tokens, eos_token_ids=eos_token_ids,
                                        pad_token_id=pad_token_id, suppress_eos=suppress_eos)[0]

    @torch.inference_mode()
    def generate_with_probs(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                            eos_token_ids, pad_token_id: int,
                            suppress_eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`generate`'s tokens and, alongside, each token's probability under the model when it
        was picked ((B, n) float32 on the CPU; meaningless after a row's EOS)."""
        context = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with context:
            return self._generate(inputs_embeds, attention_mask, max_new_tokens, eos_token_ids=eos_token_ids,
                                  pad_token_id=pad_token_id, suppress_eos=suppress_eos)

    def _generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                  eos_token_ids, pad_token_id: int, suppress_eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy continuation of left-padded prompts.

        Args:
            inputs_embeds: (B, T, H) prompt embeddings (before ``embedding_multiplier``, as given to ``generate``).
            attention_mask: (B, T) 1 for real tokens (left padding).
            max_new_tokens: tokens to produce (fewer when every row has emitted EOS and ``suppress_eos`` is off).
            eos_token_ids: ids that end a row; suppressed entirely when ``suppress_eos``.
            pad_token_id: emitted by rows after their EOS.

        Returns:
            (B, n) long on the CPU, ``n <= max_new_tokens`` (``== max_new_tokens`` when ``suppress_eos``),
            and the (B, n) float32 probabilities of those tokens.
        """
        b, t0, _ = inputs_embeds.shape
        dev = self.device
        pad_id = int(pad_token_id)
        eos_t = torch.tensor(sorted(int(e) for e in eos_token_ids), dtype=torch.long, device=dev)
        bb = batch_bucket(b) if self.use_graphs else b
        t = -(-t0 // self.prompt_quantum) * self.prompt_quantum  # extra left padding up to the bucket
        cap = capacity_bucket(t + max_new_tokens) if self.use_graphs else t + max_new_tokens
        st = self._state(bb, cap, pad_id, eos_t)
        p = self._prefill_for(st, bb, t, pad_id, eos_t)

        mask = self._fill_prompt(p, inputs_embeds, attention_mask)

        # reset the state in place (the captured graphs hold these addresses)
        st.valid.zero_()
        st.valid[:, :t] = mask
        st.out.zero_()
        st.eos_bias.zero_()
        if suppress_eos:
            st.eos_bias.index_fill_(0, eos_t, float("-inf"))
        if p.graph is not None:
            p.graph.replay()
        else:
            self._prefill(st, p, pad_id, eos_t)

        n = int(max_new_tokens)
        done = 1
        while done < n:
            chunk = n - done if suppress_eos else min(self.sync_every, n - done)
            for _ in range(chunk):
                if st.graph is not None:
                    st.graph.replay()
                else:
                    self._step(st, pad_id, eos_t)
            done += chunk
            if not suppress_eos and done < n and bool(st.finished[:b].all()):
                break
        return st.out[:b, t : t + done].cpu(), st.prob[:b, t : t + done].cpu()
