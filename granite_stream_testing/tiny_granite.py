"""A tiny random-weight Granite Speech model and tokenizer, built locally (nothing downloaded).

For tests and CPU smoke runs of :class:`~stream_server.engines.granite.engine.GraniteEngine`: the
architecture is the real one (conformer CTC encoder → Q-Former projector → Granite LLM), only
with a handful of layers and 32-wide hidden states, so a decode takes milliseconds. The
outputs are meaningless text.

The tokenizer is a GPT-2 style byte-level BPE without merges (one token per UTF-8 byte, the
same family as Granite's real tokenizer) plus the special tokens ``<|end_of_text|>`` (bos/eos),
``<|pad|>`` and ``<|audio|>`` (whose id is ``config.audio_token_id``), with a chat template that
renders ``USER: {content}\\n ASSISTANT:`` like granite-4.0-1b-speech's.

The LLM uses granite-4.0-1b-speech's µP multipliers (:data:`REAL_TEXT_MULTIPLIERS`:
``embedding_multiplier`` 12, ``residual_multiplier`` 0.22, ``logits_scaling`` 8, and
``attention_multiplier = 1 / head_dim``, which is 1/128 for the real 128-wide heads and 1/8 here)
and an untied LM head, so that code which forgets a multiplier (or reads the head from the
embeddings) gives different tokens and logits than transformers, and the tests catch it. To make
the random model's output depend on the audio (so batching and prefix tests mean something) the
weights are initialised wider than Granite's (range 0.2) and the CTC head is scaled ×30 (sharper
CTC posteriors).

The encoder's CTC head has :data:`TINY_CTC_CLASSES` = 348 classes, the real head's size, so that
the engine's default CTC vocabulary (class ``i`` → ``chr(i)``, blank ``0``, IBM's convention) applies.
"""

from __future__ import annotations

import torch

__all__ = ["build_tiny_granite", "build_tiny_tokenizer", "tiny_granite_config", "TINY_CTC_CLASSES",
           "REAL_TEXT_MULTIPLIERS"]

TINY_CTC_CLASSES = 348
"""CTC classes of the tiny encoder: granite-4.0-1b-speech's 348 (code points 1..347 plus blank 0)."""

REAL_TEXT_MULTIPLIERS = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0}
"""granite-4.0-1b-speech's LLM multipliers (``attention_multiplier`` is 1/head_dim = 0.0078125 there).

Source: not a stored copy of the checkpoint's config.json (none is reachable here) but two
agreeing secondary ones: IBM's speculative-decoding notebook prints ``Logits scaling: 8`` for
ibm-granite/granite-4.0-1b-speech, and a GGML port's notes (CrispASR HISTORY.md, "Granite Speech
4.0-1B") list embedding 12.0, attention 0.0078125 = 1/head_dim, residual 0.22, logits 8.0; the
same values as granite-3.x/4.x Granite LLM configs (embedding 12, residual 0.22)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT:{{ message['content'] }}<|end_of_text|>{{ '\\n' }}"
    "{% else %}{{ message['content'] }}{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int | None = None):
    """Byte-level BPE tokenizer (no merges) with Granite-like special tokens and chat template.

    Args:
        vocab_size: ``None`` for the tiny model's 259 ids; else exactly this many ids (the full
            model's 100,353 for speed runs): the bytes, fillers ``<fN>``, then the specials last.

    Returns:
        A ``PreTrainedTokenizerFast``. Without ``vocab_size``: ids 0–255 for the bytes, then
        ``<|end_of_text|>`` (256), ``<|pad|>`` (257), ``<|audio|>`` (258). With it:
        ``<|end_of_text|>`` (eos/bos) = vocab_size − 4, ``<|pad|>`` = vocab_size − 3,
        ``<|unused|>`` = vocab_size − 2, ``<|audio|>`` = vocab_size − 1 (100352 for the full size,
        granite-4.0-1b-speech's audio token id).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    if vocab_size is not None:
        for i in range(len(vocab), vocab_size - 4):
            vocab[f"<f{i}>"] = i
        for j, special in enumerate(["<|end_of_text|>", "<|pad|>", "<|unused|>", "<|audio|>"]):
            vocab[special] = vocab_size - 4 + j
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|end_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|audio|>"],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    if vocab_size is not None and (fast.convert_tokens_to_ids("<|audio|>") != vocab_size - 1 or len(fast) != vocab_size):
        raise RuntimeError(f"tokenizer layout: audio id {fast.convert_tokens_to_ids('<|audio|>')}, {len(fast)} ids")
    return fast


def _byte_of(ch: str) -> int:
    """The byte a GPT-2 byte-level alphabet character stands for."""
    # GPT-2 bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tiny_granite_config(tokenizer, ctc_classes: int = TINY_CTC_CLASSES):
    """A ``GraniteSpeechConfig`` a few layers deep and 32 wide, matching ``tokenizer``'s ids."""
    from transformers import GraniteSpeechConfig

    audio_id = tokenizer.convert_tokens_to_ids("<|audio|>")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    return GraniteSpeechConfig(
        text_config={
            "model_type": "granite",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            **REAL_TEXT_MULTIPLIERS,
            "attention_multiplier": 1.0 / (32 // 4),  # 1 / head_dim, as the real 0.0078125 = 1/128
            "initializer_range": 0.2,
            "rms_norm_eps": 1e-5,
            "bos_token_id": eos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "tie_word_embeddings": False,
        },
        encoder_config={
            "input_dim": 160,
            "num_layers": 2,
            "hidden_dim": 32,
            "feedforward_mult": 2,
            "num_heads": 2,
            "dim_head": 16,
            "output_dim": ctc_classes,
            "context_size": 200,
            "max_pos_emb": 512,
            "dropout": 0.0,
            "conv_kernel_size": 15,
            "conv_expansion_factor": 2,
        },
        projector_config={
            "model_type": "blip_2_qformer",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "encoder_hidden_size": 32,
            "cross_attention_frequency": 1,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": 2048,
            "initializer_range": 0.2,
        },
        audio_token_index=audio_id,
        has_lora_adapter=False,
        downsample_rate=5,
        window_size=15,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )


def build_tiny_granite(seed: int = 0, ctc_classes: int = TINY_CTC_CLASSES):
    """Build ``(model, tokenizer)``: a random-weight ``GraniteSpeechForConditionalGeneration`` in eval mode.

    Args:
        seed: torch seed for the weights (the same seed gives the same model).
        ctc_classes: classes of the encoder's CTC head (``encoder_config.output_dim``).
    """
    from transformers import GraniteSpeechForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    config = tiny_granite_config(tokenizer, ctc_classes)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = GraniteSpeechForConditionalGeneration(config)
        # A sharper CTC head than the random init gives (entropies well below log(classes)),
        # so the speculative-decoding thresholds have something to separate.
        with torch.no_grad():
            model.model.encoder.out.weight.mul_(30.0)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer
