"""Dia2 in torch, written for export: the backbone step and the depformer stage, with explicit caches.

Parameter names are the published checkpoint's (nari-labs/dia2 at 8687268, `dia2/core/*.py`), so a
`model.safetensors` loads by name with a strict key check; kernels are `[in, out]` views of the stored
`[out, in]` tensors, as in `export.dia_model`, whose building blocks (RMSNorm, fused Q/K/V, the cache
write, scale-1.0 attention, rotate-half RoPE) this module shares.

What the reference computes, per frame t (docs/dia2.md):
- the backbone reads the frame's tokens `[C]` (the two text streams, then one id per codebook), adds
  their embeddings (main text, second text unless it is pad, each codebook in order), runs the layers
  (pre-norm attention with per-head RMSNorm of q and k, RoPE at t, scale 1.0; pre-norm gated MLP) and
  gives the normed hidden state, the action logits (the text stream's next move) and codebook 0's logits;
- the depformer then predicts codebooks 1..C-3 one stage at a time: stage s reads the backbone's hidden
  state through weight group `schedule[s]`, the previous codebook's id (and at stage 0 the frame's text
  tokens), attends over the frame's earlier stages with its own cache (RoPE at s), and gives codebook
  s+1's logits, with the pad and BOS ids cut off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dia_ort.dia2_config import Dia2Config, StackDims
from export.dia_model import (
    CacheWrite,
    FusedSelfAttention,
    Linear,
    Projections,
    RMSNorm,
    Rotary,
    additive,
    assign_state,
    attend,
    cache_indices,
    reshape,
    rms_norm,
)

REFERENCE_ROPE_POSITIONS = 1500  # the length of the reference's RoPE tables where it does not pass one


def reference_rotary(head_dim: int, min_timescale: float, max_timescale: float, positions: int) -> Rotary:
    """RoPE tables computed as the reference computes them, in float32: inv_freq = 1 / timescale,
    angle = position * inv_freq."""
    fraction = (2.0 * torch.arange(0, head_dim // 2)) / head_dim
    inv_freq = 1.0 / (min_timescale * (max_timescale / min_timescale) ** fraction)
    angle = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return Rotary(angle.cos(), angle.sin())


def activation(name: str, x: Tensor) -> Tensor:
    if name in ("silu", "swish", "swiglu"):
        return F.silu(x)
    if name in ("gelu", "geglu"):
        return F.gelu(x)
    if name == "relu":
        return F.relu(x)
    return x  # "linear"


class GatedMLP(nn.Module):
    """`wo(act0(gate) * act1(up))`, gate and up side by side in `wi` (the reference's MlpBlock)."""

    def __init__(self, dims: StackDims) -> None:
        super().__init__()
        self.activations, self.intermediate = dims.activations, dims.intermediate
        self.wi = Linear(dims.hidden, 2 * dims.intermediate)
        self.wo = Linear(dims.intermediate, dims.hidden)

    def forward(self, x: Tensor) -> Tensor:
        fused = self.wi(x)
        gate, up = fused[..., : self.intermediate], fused[..., self.intermediate :]
        return self.wo(activation(self.activations[0], gate) * activation(self.activations[1], up))


class TextEmbedding(nn.Module):
    """The two text streams into one vector: main + second (the second only where it is not pad)."""

    def __init__(self, vocab: int, hidden: int, pad_id: int, low_rank: int | None) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embedding = nn.Embedding(vocab, low_rank or hidden)
        self.main_proj = Linear(low_rank or hidden, hidden)
        self.second_proj = Linear(low_rank or hidden, hidden)

    def forward(self, main: Tensor, second: Tensor) -> Tensor:
        out_second = self.second_proj(self.embedding(second))
        return self.main_proj(self.embedding(main)) + torch.where(
            (second != self.pad_id)[..., None], out_second, torch.zeros_like(out_second)
        )


def head_norm(x: Tensor, norm: RMSNorm, heads: int) -> Tensor:
    """Tensor[B x S x heads*D] with each head RMS-normed by `norm` (weight `[D]`)."""
    return reshape(rms_norm(reshape(x, 0, 0, heads, -1), norm.weight, norm.eps), 0, 0, -1)


class Attention(Projections):
    """The backbone's attention: q/k/v/o and a per-head RMSNorm of queries and keys."""

    def __init__(self, dims: StackDims, eps: float) -> None:
        super().__init__(dims.hidden, dims.hidden, dims.heads, dims.kv_heads, dims.head_dim)
        self.q_norm = RMSNorm(dims.head_dim, eps)
        self.k_norm = RMSNorm(dims.head_dim, eps)


class BackboneLayer(nn.Module):
    def __init__(self, dims: StackDims, eps: float) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(dims.hidden, eps)
        self.attn = Attention(dims, eps)
        self.post_norm = RMSNorm(dims.hidden, eps)
        self.mlp = GatedMLP(dims)


class Backbone(nn.Module):
    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        d = config.decoder
        self.audio_embeds = nn.ModuleList(
            nn.Embedding(config.audio_vocab_size, d.hidden) for _ in range(config.codebooks)
        )
        self.text_embed = TextEmbedding(
            config.text_vocab_size, d.hidden, config.text_pad_id, config.text_low_rank_dim
        )
        self.layers = nn.ModuleList(BackboneLayer(d, config.norm_eps) for _ in range(d.layers))
        self.norm = RMSNorm(d.hidden, config.norm_eps)
        self.action_head = Linear(d.hidden, config.action_vocab_size)
        self.cb0_head = Linear(d.hidden, config.audio_vocab_size)


class StageAttention(nn.Module):
    """The depformer's attention: one fused q/k/v and one output kernel per weight group."""

    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        p = config.depformer
        groups = [str(g) for g in config.weight_groups]
        self.in_proj = nn.ModuleDict({g: Linear(p.hidden, 3 * p.heads * p.head_dim) for g in groups})
        self.out_proj = nn.ModuleDict({g: Linear(p.heads * p.head_dim, p.hidden) for g in groups})
        self.q_norm = RMSNorm(p.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(p.head_dim, config.norm_eps)


class DepformerLayer(nn.Module):
    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        self.pre_norm = RMSNorm(config.depformer.hidden, config.norm_eps)
        self.post_norm = RMSNorm(config.depformer.hidden, config.norm_eps)
        self.self_attention = StageAttention(config)
        self.mlp = GatedMLP(config.depformer)


class Depformer(nn.Module):
    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        p, vocab = config.depformer, config.audio_vocab_size
        self.audio_embeds = nn.ModuleList(nn.Embedding(vocab, p.hidden) for _ in range(config.depth))
        if config.depformer_text_embedding:
            self.text_embed = TextEmbedding(config.text_vocab_size, p.hidden, config.text_pad_id, None)
        self.depformer_in = nn.ModuleDict(
            {str(g): Linear(config.decoder.hidden, p.hidden) for g in config.weight_groups}
        )
        self.layers = nn.ModuleList(DepformerLayer(config) for _ in range(p.layers))
        self.norm = RMSNorm(p.hidden, config.norm_eps)
        self.logits = nn.ModuleList(Linear(p.hidden, vocab) for _ in range(config.depth))


class Dia2Model(nn.Module):
    """Every Dia2 weight under the published checkpoint's names (`transformer.*`, `depformer.*`)."""

    def __init__(self, config: Dia2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = Backbone(config)
        self.depformer = Depformer(config)
        d, p = config.decoder, config.depformer
        scales = (config.rope_min_timescale, config.rope_max_timescale)
        self.rotary = reference_rotary(d.head_dim, *scales, positions=config.max_context_steps)
        self.stage_rotary = reference_rotary(p.head_dim, *scales, positions=max(config.depth, 1))

    @property
    def fused_ops(self) -> bool:
        """ONNX Runtime's fused RoPE, attention and add-norm ops, in float32 (as `DiaModel.fused_ops`)."""
        return self.transformer.norm.weight.dtype == torch.float32

    @classmethod
    def from_state(cls, config: Dia2Config, state: dict[str, Tensor]) -> Dia2Model:
        """Build the model on `state`'s own tensors (no copy)."""
        return assign_state(cls(config), state)


class BackboneStepGraph(nn.Module):
    """S frames per batch row at absolute `positions`, against the cache buffers -> the last frame's
    normed hidden state and logits.

    Inputs: tokens Tensor[B x S x C] (int64: main text, second text, codebook 0..C-3), positions
    Tensor[B x S] (int64, consecutive along S: the RoPE positions), slots Tensor[B x S] (int64: the
    cache slots the frames are written to and attend up to; the positions, but one more after a
    prefix, where the reference feeds the prefix's last frame twice), then per layer past_key_i,
    past_value_i Tensor[B x Hkv x T x D] (slots after a row's may hold any finite values: they are masked).
    Outputs: hidden Tensor[B x E], action_logits Tensor[B x A], cb0_logits Tensor[B x V] (float32) of
    the last frame, then present_key_i, present_value_i: the buffers with this step's frames written
    at `positions`.
    """

    def __init__(self, model: Dia2Model) -> None:
        super().__init__()
        self.model = model
        self.self_attention = nn.ModuleList(
            FusedSelfAttention(layer.attn) for layer in model.transformer.layers
        )

    def forward(self, tokens: Tensor, positions: Tensor, slots: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        m, fused = self.model, self.model.fused_ops
        net, d = m.transformer, m.config.decoder
        groups = d.heads // d.kv_heads
        indices = cache_indices(tokens.shape[0], d.kv_heads, slots)
        causal = additive(torch.arange(past[0].shape[2])[None, None, :] <= slots[:, :, None])  # [B, S, T]
        bias = reshape(torch.stack([causal] * groups, dim=2), 0, 1, -1, 0)  # [B, 1, S*G, T]

        x = net.text_embed(tokens[..., 0], tokens[..., 1])
        for index, table in enumerate(net.audio_embeds):
            x = x + table(tokens[..., index + 2])
        h = net.layers[0].pre_norm(x)  # each residual add is fused with the norm after it
        after_mlp = [layer.pre_norm for layer in net.layers[1:]] + [net.norm]
        presents = []
        for i, (layer, norm) in enumerate(zip(net.layers, after_mlp, strict=True)):
            sa = self.self_attention[i]
            q, k, v = torch.split(torch.matmul(h, sa.qkv), sa.splits, dim=-1)
            q = m.rotary.rotate(head_norm(q, layer.attn.q_norm, d.heads), positions, d.heads, fused)
            k = m.rotary.rotate(head_norm(k, layer.attn.k_norm, d.kv_heads), positions, d.kv_heads, fused)
            k = CacheWrite.apply(past[2 * i], indices, reshape(k, 0, 0, d.kv_heads, -1))
            v = CacheWrite.apply(past[2 * i + 1], indices, reshape(v, 0, 0, d.kv_heads, -1))
            presents += [k, v]
            q = reshape(q, 0, -1, d.kv_heads * d.head_dim)  # [B, S*G, Hkv*D]
            attended = attend(q, k, v, bias, d.kv_heads, fused)
            h, x = layer.post_norm.add(
                x, torch.matmul(reshape(attended, 0, -1, d.heads * d.head_dim), sa.o), fused
            )
            h, x = norm.add(x, layer.mlp(h), fused)
        last = h[:, -1]  # net.norm of the last frame's residual stream
        return (last.float(), net.action_head(last).float(), net.cb0_head(last).float(), *presents)


def stage_weight_names(layers: int) -> list[str]:
    """The stage graph's weight inputs: depformer_in, in_proj_0, out_proj_0, in_proj_1, ..., logits_head."""
    per_layer = [f"{kind}_{i}" for i in range(layers) for kind in ("in_proj", "out_proj")]
    return ["depformer_in", *per_layer, "logits_head"]


def stage_kernels(model: Dia2Model, stage: int) -> dict[str, Tensor]:
    """The kernels depformer `stage` reads, by the stage graph's input names (`stage_weight_names`)."""
    config, dep = model.config, model.depformer
    group = str(config.weights_schedule[stage])
    kernels = {"depformer_in": dep.depformer_in[group].weight}
    for i, layer in enumerate(dep.layers):
        kernels[f"in_proj_{i}"] = layer.self_attention.in_proj[group].weight
        kernels[f"out_proj_{i}"] = layer.self_attention.out_proj[group].weight
    kernels["logits_head"] = dep.logits[stage].weight[:, : config.audio_vocab_limit]
    return {name: kernel.detach() for name, kernel in kernels.items()}


class DepformerStageGraph(nn.Module):
    """One depformer stage for every batch row -> the next codebook's logits.

    Inputs: stage Tensor[1] (int64, 0..depth-1), previous Tensor[B] (int64: the id just sampled for
    codebook `stage`), hidden Tensor[B x E] (the backbone's), text Tensor[B x 2] (int64: the frame's
    main and second text tokens, read at stage 0; only where the depformer embeds text), then the
    stage's kernels (`stage_weight_names`: its group's input and attention kernels, its codebook's
    output head, cut to the audio ids), then per layer past_key_i, past_value_i
    Tensor[B x H x depth x D]. Outputs: logits Tensor[B x V'] (float32, V' = the audio vocabulary less
    pad and BOS), then the caches with this stage written at slot `stage`.

    The kernels a stage reads differ per stage, so they are inputs: the runtime binds each stage's
    own (`stacked_weights`), read in place, where a graph that picks them from stacked constants copies
    every one it picks (Gather), and ONNX Runtime packs constants that a MatMul shares (the MLP) once.
    """

    def __init__(self, model: Dia2Model) -> None:
        super().__init__()
        self.model = model
        # one table of every stage's rows: a stage reads its token's row, not a copy of its whole table
        tables = [t.weight.detach() for t in model.depformer.audio_embeds]
        self.audio_embeds = nn.Parameter(torch.cat(tables), False)

    def stacked_weights(self) -> dict[str, tuple[Tensor, list[int]]]:
        """Each weight input -> (its distinct kernels stacked `[R x in x out]`, the row each stage reads):
        stages of one weight group share their group's row."""
        per_stage = [stage_kernels(self.model, stage) for stage in range(self.model.config.depth)]
        stacked = {}
        for name in per_stage[0]:
            distinct: list[Tensor] = []
            rows = []
            for kernels in per_stage:
                kernel = kernels[name]
                same = [i for i, d in enumerate(distinct) if d.data_ptr() == kernel.data_ptr()]
                rows.append(same[0] if same else len(distinct))
                distinct += [] if same else [kernel]
            stacked[name] = (torch.stack(distinct).contiguous(), rows)
        return stacked

    def forward(self, stage: Tensor, previous: Tensor, hidden: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        m, fused = self.model, self.model.fused_ops
        config, dep, p = m.config, m.depformer, m.config.depformer
        text, inputs = (inputs[0], inputs[1:]) if config.depformer_text_embedding else (None, inputs)
        depformer_in, *kernels, head = inputs[: 2 * p.layers + 2]
        past = inputs[2 * p.layers + 2 :]
        batch = previous.shape[0]
        positions = stage.expand(batch)[:, None]  # [B, 1]
        indices = cache_indices(batch, p.heads, positions)
        slots = torch.arange(past[0].shape[2])
        bias = additive(slots[None, None, None, :] <= stage)  # [1, 1, 1, T]: the stages so far
        token = self.audio_embeds[stage * config.audio_vocab_size + previous]  # [B, E']
        if config.depformer_text_embedding:
            text_part = dep.text_embed(text[:, 0], text[:, 1])
            token = token + torch.where(stage == 0, text_part, torch.zeros_like(text_part))
        x = (torch.matmul(hidden, depformer_in) + token)[:, None]  # [B, 1, E']
        h = dep.layers[0].pre_norm(x)
        after_mlp = [layer.pre_norm for layer in dep.layers[1:]] + [dep.norm]
        presents = []
        width = p.heads * p.head_dim
        for i, (layer, norm) in enumerate(zip(dep.layers, after_mlp, strict=True)):
            sa = layer.self_attention
            q, k, v = torch.split(torch.matmul(h, kernels[2 * i]), width, dim=-1)
            q, k = head_norm(q, sa.q_norm, p.heads), head_norm(k, sa.k_norm, p.heads)
            if config.depformer_rope:
                q = m.stage_rotary.rotate(q, positions, p.heads, fused)
                k = m.stage_rotary.rotate(k, positions, p.heads, fused)
            k = CacheWrite.apply(past[2 * i], indices, reshape(k, 0, 0, p.heads, -1))
            v = CacheWrite.apply(past[2 * i + 1], indices, reshape(v, 0, 0, p.heads, -1))
            presents += [k, v]
            attended = attend(q, k, v, bias.expand(batch, 1, 1, -1), p.heads, fused)
            h, x = layer.post_norm.add(x, torch.matmul(attended, kernels[2 * i + 1]), fused)
            h, x = norm.add(x, layer.mlp(h), fused)
        return (torch.matmul(h[:, 0], head).float(), *presents)
