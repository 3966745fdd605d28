"""How closely a quantized variant follows float32, measured teacher-forced on one token stream.

Float32 generates greedily; then both variants read exactly the rows it produced, step by step, so
every step compares the two models on the same context and errors do not compound. Per step the
logits go through the same guidance and special-token masks the sampler uses, and two figures are
kept: how often the top-1 ids agree (per channel), and the KL divergence KL(p_float32 || p_quant).
Torch is not needed: only the exported graphs run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dia_ort.config import ModelConfig
from dia_ort.decoding import encoded_rows, run_at
from dia_ort.engine import Device, Engine
from dia_ort.generation import Generation
from dia_ort.item import cfg_text_rows
from dia_ort.manifest import Manifest
from dia_ort.options import GenerationOptions
from dia_ort.sampling import guide, mask_special
from dia_ort.text import encode_text

DEFAULT_TEXT = "[S1] Dia is an open weights text to dialogue model. [S2] You get full control over scripts."


@dataclass(frozen=True)
class Accuracy:
    """Agreement of a variant with the reference over `steps` teacher-forced decoder steps."""

    steps: int
    agreement: float  # share of (step, channel) cells whose top-1 ids are equal
    channel_agreement: tuple[float, ...]  # the same per channel
    kl: float  # mean over steps and channels of KL(p_reference || p_variant), in nats


def guided_logits(
    logits: np.ndarray, options: GenerationOptions, config: ModelConfig, top_k: int
) -> np.ndarray:
    """A step's `[2B, C, V]` logits (uncond, cond rows) -> `[B, C, V]` as the sampler filters them:
    guidance with the `top_k` candidates of cfg, then the special-token masks."""
    guided = guide(logits[1::2], logits[0::2], options.cfg_scale, top_k, config.flavour)
    return mask_special(guided, config.eos_id, config.flavour)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) over the last axis: ids where p is -inf add nothing (q must be
    finite wherever p is, else the result is inf)."""
    log_p = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    log_q = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    finite = np.isfinite(log_p)  # ids outside p's support add nothing
    log_p, log_q = np.where(finite, log_p, 0.0), np.where(finite, log_q, 0.0)
    return np.where(finite, np.exp(log_p) * (log_p - log_q), 0.0).sum(axis=-1)


def quantization_accuracy(
    folder: str | Path,
    dtype: str,
    text: str = DEFAULT_TEXT,
    steps: int = 200,
    reference: str = "float32",
    options: GenerationOptions | None = None,
) -> Accuracy:
    """Compare variant `dtype` of an exported folder with `reference` over `steps` greedy steps.

    `options` gives the guidance (cfg_scale, cfg_filter_top_k); sampling is greedy.

    Top-1 agreement uses each variant's own guided logits (as the sampler sees them). The 0626
    guidance keeps only the top-k candidates of cfg; the KL compares both variants on the same
    candidates (the reference's), so it stays finite where the variant would pick other candidates.
    """
    folder = Path(folder)
    manifest = Manifest.load(folder)
    config = manifest.model
    device = Device.parse("cpu")
    options = options or GenerationOptions()
    greedy = replace(options, temperature=0.0, max_new_tokens=steps)
    top_k = options.cfg_filter_top_k or config.default_cfg_filter_top_k
    ref_engine = Engine(folder, manifest, reference, device)
    text = encode_text(text, config.text_length)
    generation = Generation(ref_engine, [text], [None], greedy)
    for _ in generation:
        pass
    item = generation.items[0]
    produced = range(item.prefill, min(item.prefill + steps, item.eos_row + config.max_delay + 1))
    states = [
        encoded_rows(engine, *cfg_text_rows([text]), item.slots)
        for engine in (ref_engine, Engine(folder, manifest, dtype, device))
    ]
    rows = np.repeat(item.rows[None], 2, axis=0)  # the cond/uncond pair of the item
    feeds = [(rows[:, : produced[0]], 0)] + [(rows[:, row : row + 1], row) for row in produced[:-1]]
    agree, kl = [], []
    for tokens, start in feeds:
        ref_logits, var_logits = (run_at(state, tokens, start) for state in states)
        ref = guided_logits(ref_logits, options, config, top_k)
        var = guided_logits(var_logits, options, config, top_k)
        var_values = guided_logits(var_logits, options, config, config.vocab_size)  # every id kept
        agree.append(ref.argmax(-1) == var.argmax(-1))  # [B, C]
        kl.append(kl_divergence(ref, np.where(np.isfinite(ref), var_values, ref)))
    agree_all = np.stack(agree)  # [steps, B, C]
    return Accuracy(
        steps=len(produced),
        agreement=float(agree_all.mean()),
        channel_agreement=tuple(float(a) for a in agree_all.mean(axis=(0, 1))),
        kl=float(np.mean(kl)),
    )
