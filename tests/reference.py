"""Independent references the tests compare the runtime with.

- transformers' `DiaForConditionalGeneration` (0626 semantics), driven as docs/generation.md section 14 says;
- a small torch implementation of docs/generation.md written here from the nari-layout tensors, for v0.1
  (cross-attention RoPE, plain CFG, EOS damping) which transformers does not implement;
- nari-labs/dia2 for Dia2, from a checkout given as $DIA2_REFERENCE (it is not on the package registries).

Sampled streams are compared by drawing both sides' ids by inverse CDF from the same numpy generator
(docs/generation.md section 7): transformers' `torch.multinomial` is replaced for the call by that draw.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from unittest import mock

import numpy as np
import pytest
import torch
from transformers import DiaConfig, DiaForConditionalGeneration

from export.architecture import DiaArchitecture
from export.checkpoint import to_nari_layout


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: on tensors this small its thread pool only adds overhead (20x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def hf_model(arch: DiaArchitecture, state: dict[str, torch.Tensor]) -> DiaForConditionalGeneration:
    config = DiaConfig(
        **{k: v for k, v in arch.to_hf_dict().items() if k not in ("model_type", "architectures")}
    )
    model = DiaForConditionalGeneration(config).eval()
    model.load_state_dict(state, strict=False)  # only the non-persistent offsets buffer is absent
    return model


def delayed_prompt_rows(arch: DiaArchitecture, prompt: np.ndarray | None) -> torch.Tensor:
    """BOS in rows r <= d[c], the prompt shifted by d[c], PAD elsewhere: `[1, P + D + 1, C]`."""
    frames = 0 if prompt is None else len(prompt)
    rows = torch.full((1, frames + max(arch.delay_pattern) + 1, arch.decoder.num_channels), arch.pad_id)
    for c, d in enumerate(arch.delay_pattern):
        rows[0, : d + 1, c] = arch.bos_id
        if frames:
            rows[0, d + 1 : d + 1 + frames, c] = torch.as_tensor(prompt[:, c])
    return rows


def hf_greedy_rows(
    model: DiaForConditionalGeneration,
    arch: DiaArchitecture,
    text_ids: np.ndarray,
    max_new_tokens: int,
    prompt: np.ndarray | None = None,
    cfg_scale: float = 3.0,
    cfg_filter_top_k: int = 45,
) -> np.ndarray:
    """transformers' greedy generation for one text: the delayed decoder rows `[R, C]`."""
    return _hf_generate(
        model,
        arch,
        text_ids,
        prompt,
        do_sample=False,
        guidance_scale=cfg_scale,
        top_k=cfg_filter_top_k,
        max_new_tokens=max_new_tokens,
    )


def _hf_generate(
    model: DiaForConditionalGeneration,
    arch: DiaArchitecture,
    text_ids: np.ndarray,
    prompt: np.ndarray | None,
    **options: object,
) -> np.ndarray:
    """`model.generate` on one text with the decoder input built here (docs/generation.md section 14)."""
    inputs = torch.as_tensor(text_ids)[None]
    rows = delayed_prompt_rows(arch, prompt)
    with torch.no_grad(), one_thread():
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            decoder_input_ids=rows,
            decoder_attention_mask=torch.ones(rows.shape[:2], dtype=torch.long),
            **options,
        )
    return out[0].numpy()


def inverse_cdf(probs: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One id per row of `[N, V]` probabilities from one uniform draw each, as the runtime draws."""
    cumulative = probs.double().cumsum(-1)
    draws = torch.as_tensor(rng.random((len(probs), 1))) * cumulative[:, -1:]
    return (cumulative <= draws).sum(-1).clamp(max=probs.shape[-1] - 1)


def hf_sampled_rows(
    model: DiaForConditionalGeneration,
    arch: DiaArchitecture,
    text_ids: np.ndarray,
    max_new_tokens: int,
    seed: int,
    cfg_scale: float = 3.0,
    top_k: int = 45,
    top_p: float = 1.0,
    temperature: float = 1.0,
) -> np.ndarray:
    """transformers' sampled generation for one text, its ids drawn by `inverse_cdf` from `default_rng(seed)`.

    transformers uses `top_k` both as the guidance filter and as the sampling top-k.
    """
    rng = np.random.default_rng(seed)

    def multinomial(probs: torch.Tensor, num_samples: int) -> torch.Tensor:
        return inverse_cdf(probs, rng)[:, None]

    with mock.patch.object(torch, "multinomial", multinomial):
        return _hf_generate(
            model,
            arch,
            text_ids,
            None,
            do_sample=True,
            guidance_scale=cfg_scale,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
        )


class SpecReference:
    """docs/generation.md sections 3 and 5 to 7 in plain torch, from nari-layout kernels, recomputing every step."""

    def __init__(self, arch: DiaArchitecture, hf_state: dict[str, torch.Tensor]) -> None:
        self.arch = arch
        self.w = to_nari_layout(arch, hf_state)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x `[T, N, H]` rotated by positions `[T]`."""
        half = x.shape[-1] // 2
        lo, hi = self.arch.rope_min_timescale, self.arch.rope_max_timescale
        timescale = lo * (hi / lo) ** (2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
        angle = (positions[:, None].double() / timescale).float()[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)

    def _norm(self, x: torch.Tensor, key: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.arch.norm_eps) * self.w[key]

    def _attention(self, q, k, v, allowed):  # q [T,N,H], k/v [S,K,H], allowed [T,S]
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = torch.einsum("tnh,snh->nts", q, k).masked_fill(~allowed, float("-inf"))
        return torch.einsum("nts,snh->tnh", scores.softmax(-1), v)

    def _self_attention(
        self, x: torch.Tensor, prefix: str, pos: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        h = self._norm(x, f"{prefix}.pre_sa_norm.weight")
        w = {n: self.w[f"{prefix}.self_attention.{n}_proj.weight"] for n in "qkvo"}
        q, k, v = (torch.einsum("td,dnh->tnh", h, w[n]) for n in "qkv")
        a = self._attention(self._rope(q, pos), self._rope(k, pos), v, allowed)
        return torch.einsum("tnh,nhd->td", a, w["o"])

    def _mlp(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        fused = torch.einsum("td,dki->tki", x, self.w[f"{prefix}.mlp.wi_fused.weight"])
        return (torch.nn.functional.silu(fused[:, 0]) * fused[:, 1]) @ self.w[f"{prefix}.mlp.wo.weight"]

    def encode(self, text: torch.Tensor) -> torch.Tensor:
        """Real text bytes `[L]` -> encoder output `[L, E]` (no padding: docs/generation.md section 3)."""
        pos = torch.arange(len(text))
        x = self.w["encoder.embedding.weight"][text]
        allowed = torch.ones(len(text), len(text), dtype=torch.bool)
        for i in range(self.arch.encoder.layers):
            p = f"encoder.layers.{i}"
            x = x + self._self_attention(x, p, pos, allowed)
            x = x + self._mlp(self._norm(x, f"{p}.post_sa_norm.weight"), p)
        return self._norm(x, "encoder.norm.weight")

    def logits(self, rows: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Decoder rows `[T, C]` against encoder output `[L, E]` -> last row's logits `[C, V]`."""
        t = len(rows)
        pos, enc_pos = torch.arange(t), torch.arange(len(memory))
        x = sum(self.w[f"decoder.embeddings.{c}.weight"][rows[:, c]] for c in range(rows.shape[1]))
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        cross_ok = torch.ones(t, len(memory), dtype=torch.bool)
        for i in range(self.arch.decoder.layers):
            p = f"decoder.layers.{i}"
            x = x + self._self_attention(x, p, pos, causal)
            h = self._norm(x, f"{p}.pre_ca_norm.weight")
            q = torch.einsum("td,dnh->tnh", h, self.w[f"{p}.cross_attention.q_proj.weight"])
            k, v = (
                torch.einsum("sd,dnh->snh", memory, self.w[f"{p}.cross_attention.{n}_proj.weight"])
                for n in "kv"
            )
            if self.arch.flavour == "v0.1":
                q, k = self._rope(q, pos), self._rope(k, enc_pos)
            a = self._attention(q, k, v, cross_ok)
            x = x + torch.einsum("tnh,nhd->td", a, self.w[f"{p}.cross_attention.o_proj.weight"])
            x = x + self._mlp(self._norm(x, f"{p}.pre_mlp_norm.weight"), p)
        h = self._norm(x[-1:], "decoder.norm.weight")
        return torch.einsum("td,dcv->tcv", h, self.w["decoder.logits_dense.weight"])[0]

    @torch.no_grad()
    @one_thread()
    def rows(
        self,
        text: np.ndarray,
        steps: int,
        cfg_scale: float = 3.0,
        cfg_filter_top_k: int = 45,
        top_k: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> np.ndarray:
        """v0.1 decoding of up to `steps` rows after row 0, ending D rows after channel 0's EOS.

        Plain CFG; PAD/BOS masked, EOS on channel 0 only and damped by 0.8; temperature 0 is the argmax.
        Sampling (the original v0.1 sampler): divide by the temperature, mask EOS unless it is the
        argmax (never forced), keep the top `min(top_k, cfg_filter_top_k)`, then the smallest sorted
        prefix reaching `top_p`, and draw with `inverse_cdf`.
        """
        arch = self.arch
        eos, delays = arch.eos_id, torch.as_tensor(arch.delay_pattern)
        rng = np.random.default_rng(seed)
        k = cfg_filter_top_k if top_k is None else min(top_k, cfg_filter_top_k)
        text = torch.as_tensor(text)
        cond_mem = self.encode(text)
        uncond_mem = self.encode(torch.zeros_like(text))
        known = delayed_prompt_rows(arch, None)[0]
        out = known[:1].clone()
        eos_row = None
        for t in range(1, steps + 1):
            cond, uncond = self.logits(out, cond_mem), self.logits(out, uncond_mem)
            cfg = cond + cfg_scale * (cond - uncond)
            cfg[:, eos + 1 :] = float("-inf")
            cfg[1:, eos:] = float("-inf")
            cfg[0, eos] *= 0.8
            nxt = cfg.argmax(-1) if temperature == 0 else self._sample(cfg, temperature, k, top_p, rng)
            if t < len(known):  # BOS cells are known
                nxt = torch.where(known[t] == arch.pad_id, nxt, known[t])
            if eos_row is None and nxt[0] == eos:
                eos_row = t
            if eos_row is not None:
                nxt = torch.where(
                    t == eos_row + delays, eos, torch.where(t > eos_row + delays, arch.pad_id, nxt)
                )
            out = torch.cat([out, nxt[None]])
            if eos_row is not None and t == eos_row + max(arch.delay_pattern):
                break
        return out.numpy()

    def _sample(
        self, logits: torch.Tensor, temperature: float, k: int, top_p: float, rng: np.random.Generator
    ) -> torch.Tensor:
        eos = self.arch.eos_id
        logits = logits / temperature
        logits[logits.argmax(-1) != eos, eos] = float("-inf")
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(-1, descending=True)
            remove = sorted_probs.cumsum(-1) > top_p
            remove[:, 1:] = remove[:, :-1].clone()
            remove[:, 0] = False
            drop = torch.zeros_like(remove).scatter(-1, order, remove)
            probs = logits.masked_fill(drop, float("-inf")).softmax(-1)
        return inverse_cdf(probs, rng)


def dia2_reference(*modules: str) -> list[ModuleType]:
    """`modules` of nari-labs/dia2 from the checkout at $DIA2_REFERENCE (at 8687268), else a skip."""
    folder = os.environ.get("DIA2_REFERENCE")
    if not folder:
        pytest.skip("set DIA2_REFERENCE to a checkout of nari-labs/dia2 (8687268) to compare with it")
    sys.path.insert(0, folder)
    try:
        return [importlib.import_module(name) for name in modules]
    finally:
        sys.path.remove(folder)
