"""The reference: transformers' Dia (torch eager) on the same random weights, measured as the runtime
is. Run as `python -m bench.torch_speed {tiny,full} --seed S --positions ... [--device cuda --dtype
float16] --out FILE` (float32 on the CPU by default).

The exported folder's weights are `export.checkpoint.random_state(arch, seed)`; the same call here
gives the same tensors, loaded into `DiaForConditionalGeneration` as tests/reference.py does.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import DiaConfig, DiaForConditionalGeneration, DynamicCache, EncoderDecoderCache

from bench.measure import TEXT, EngineResult, decoder_times, median_ms, peak_rss, reset_peak_rss
from dia_ort.item import cfg_text_rows
from dia_ort.text import encode_text
from export.architecture import PRESETS, DiaArchitecture
from export.checkpoint import random_state

# The cache's keyword: `cache` in newer transformers, `past_key_values` before (5.17 ignored `cache`).
CACHE_ARGUMENT = next(
    name
    for name in ("cache", "past_key_values")
    if name in inspect.signature(DiaForConditionalGeneration.forward).parameters
)


def build_model(arch: DiaArchitecture, seed: int) -> DiaForConditionalGeneration:
    """transformers' model holding `random_state(arch, seed)`."""
    config = DiaConfig(
        **{k: v for k, v in arch.to_hf_dict().items() if k not in ("model_type", "architectures")}
    )
    model = DiaForConditionalGeneration(config).eval()
    model.load_state_dict(random_state(arch, seed), strict=False)  # the offsets buffer is not persistent
    return model


class TorchDecoder:
    """transformers' decoder behind the runtime's `step(tokens, start)`; start 0 begins a new cache."""

    def __init__(self, model: DiaForConditionalGeneration, memory: torch.Tensor, mask: torch.Tensor) -> None:
        self.model, self.memory, self.mask = model, memory, mask
        self.cache: EncoderDecoderCache | None = None

    @torch.no_grad()
    def step(self, tokens: np.ndarray, start: int) -> np.ndarray:
        if start == 0:
            config = self.model.config
            self.cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        elif start != self.cache.get_seq_length():
            raise ValueError(f"the cache holds {self.cache.get_seq_length()} rows, asked to write at {start}")
        out = self.model(
            encoder_outputs=(self.memory,),
            attention_mask=self.mask,
            decoder_input_ids=torch.from_numpy(tokens).to(self.memory.device),
            use_cache=True,
            **{CACHE_ARGUMENT: self.cache},
        )
        batch, channels = tokens.shape[0], tokens.shape[2]
        return out.logits[:, -1].reshape(batch, channels, -1).float().cpu().numpy()  # waits for the GPU


def measure(
    model: DiaForConditionalGeneration, arch: DiaArchitecture, positions: tuple[int, ...], steps: int
) -> tuple[EngineResult, np.ndarray]:
    """Per-phase times on the CFG pair of `TEXT`, and the BOS step's logits `[2, C, V]`."""
    gc.collect()  # the random state is gone: the peak counts the model alone
    reset_peak_rss()
    rows = cfg_text_rows([encode_text(TEXT, arch.encoder.max_length)])
    ids, mask = (torch.from_numpy(a).to(model.device) for a in rows)

    def encode() -> torch.Tensor:
        memory = model.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        memory.sum().item()  # waits for the GPU
        return memory

    with torch.no_grad():
        encoder_ms = median_ms(encode)
        memory = encode()
    decoder = TorchDecoder(model, memory, mask)
    channels = arch.decoder.num_channels
    logits = decoder.step(np.full((2, 1, channels), arch.bos_id), 0)
    prefill_ms, step_ms = decoder_times(decoder, channels, positions, steps)
    precision = str(model.dtype).removeprefix("torch.")
    result = EngineResult(
        name=f"transformers {precision} {model.config._attn_implementation} (torch eager)",
        precision=precision,
        threads=torch.get_num_threads(),
        encoder_ms=encoder_ms,
        prefill_ms=prefill_ms,
        positions=positions,
        step_ms=step_ms,
        load_s=None,
        load_peak_rss=None,
        run_peak_rss=peak_rss(),
    )
    return result, logits


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.torch_speed")
    parser.add_argument("size", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, required=True, help="seed of the export's --random-init")
    parser.add_argument("--positions", type=int, nargs="+", required=True)
    parser.add_argument("--steps", type=int, required=True, help="timed single-row steps per position")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arch = PRESETS[args.size]
    model = build_model(arch, args.seed).to(args.device, getattr(torch, args.dtype))
    result, logits = measure(model, arch, tuple(args.positions), args.steps)
    args.out.write_text(json.dumps({"engine": asdict(result), "logits": logits.tolist()}))


if __name__ == "__main__":
    main()
