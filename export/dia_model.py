"""Dia in torch, written for export: the encoder and a decoder step with an explicit KV cache.

Parameter names are transformers' HF layout (SPEC.md section 2), so any checkpoint converted by
`export.checkpoint` loads by name with a strict key check; projection kernels are held as `[in, out]`
views of the HF `[out, in]` tensors, so the graphs get plain MatMuls on the stored weights and no
transposed copy of 6 GB is ever made. The forward pass follows SPEC.md
section 3: RMSNorm in float32, attention scale 1.0, rotate-half RoPE, GQA, and for the v0.1 flavour
RoPE on cross-attention too.

The decoder's self-attention cache is a fixed buffer `[B x Hkv x T x D]` per layer. A step writes its
new keys and values into the buffer with one ScatterND and attends over the whole buffer under a
causal mask, so the runtime can bind the same memory as cache input and output and nothing is copied
per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from export.architecture import DiaArchitecture


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Linear(nn.Module):
    """y = x @ weight with weight `[in, out]` (transformers stores its transpose; see `from_state`)."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_in, fan_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: Tensor) -> Tensor:
        fused = self.gate_up_proj(x)
        return self.down_proj(F.silu(fused[..., : self.intermediate]) * fused[..., self.intermediate :])


class Projections(nn.Module):
    """q/k/v/o projections of one attention block (names as in transformers)."""

    def __init__(self, hidden: int, kv_hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = Linear(hidden, heads * head_dim)
        self.k_proj = Linear(kv_hidden, kv_heads * head_dim)
        self.v_proj = Linear(kv_hidden, kv_heads * head_dim)
        self.o_proj = Linear(heads * head_dim, hidden)

    def queries(self, x: Tensor) -> Tensor:
        """Tensor[B x S x E] -> Tensor[B x H x S x D]."""
        return self.q_proj(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Tensor[B x L x E] -> two Tensor[B x Hkv x L x D]."""
        k = self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        return k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """Scale-1.0 attention with grouped queries; returns the projected output Tensor[B x S x E].

        q is Tensor[B x H x S x D], k and v Tensor[B x Hkv x T x D]; `allowed` broadcasts to
        [B x 1 x 1 x S x T]. Query head h reads KV head h // (H / Hkv). Queries are grouped per KV
        head instead of repeating the keys, so the cache is read once and never copied.
        """
        groups = self.heads // self.kv_heads
        q = q.unflatten(1, (self.kv_heads, groups)).flatten(2, 3)
        scores = torch.matmul(q, k.transpose(-1, -2)).unflatten(2, (groups, -1))
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype).flatten(2, 3)
        out = torch.matmul(weights, v).unflatten(2, (groups, -1))  # [B, Hkv, G, S, D]
        out = out.permute(0, 3, 1, 2, 4).flatten(2)  # [B, S, H*D]
        return self.o_proj(out)


class Rotary(nn.Module):
    """Rotate-half RoPE with timescale_i = min * (max/min) ** (2i/D), in float32."""

    def __init__(self, head_dim: int, min_timescale: float, max_timescale: float) -> None:
        super().__init__()
        fraction = 2 * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim
        timescale = min_timescale * (max_timescale / min_timescale) ** fraction
        # a plain attribute, not a buffer: `.half()` must not round it (at position 3000 a float16
        # timescale would move the angle by a radian); the graph gets it as a float32 constant
        self.timescale = timescale.float()
        self.half = head_dim // 2  # a Python int, so the graph slices with constants

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions Tensor[...] (int) -> (cos, sin) Tensor[... x D/2], computed once per graph call."""
        angle = positions.float()[..., None] / self.timescale.to(positions.device)
        return torch.cos(angle), torch.sin(angle)

    def rotate(self, x: Tensor, angles: tuple[Tensor, Tensor]) -> Tensor:
        """x Tensor[B x H x S x D] rotated by the (cos, sin) of its positions."""
        cos, sin = angles
        x1, x2 = x[..., : self.half].float(), x[..., self.half :].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class EncoderLayer(nn.Module):
    def __init__(self, arch: DiaArchitecture) -> None:
        super().__init__()
        e = arch.encoder
        self.pre_sa_norm = RMSNorm(e.hidden, arch.norm_eps)
        self.self_attention = Projections(e.hidden, e.hidden, e.heads, e.heads, e.head_dim)
        self.post_sa_norm = RMSNorm(e.hidden, arch.norm_eps)
        self.mlp = MLP(e.hidden, e.intermediate)


class DecoderLayer(nn.Module):
    def __init__(self, arch: DiaArchitecture) -> None:
        super().__init__()
        d, e = arch.decoder, arch.encoder
        self.pre_sa_norm = RMSNorm(d.hidden, arch.norm_eps)
        self.self_attention = Projections(d.hidden, d.hidden, d.heads, d.kv_heads, d.head_dim)
        self.pre_ca_norm = RMSNorm(d.hidden, arch.norm_eps)
        self.cross_attention = Projections(d.hidden, e.hidden, d.cross_heads, d.cross_heads, d.cross_head_dim)
        self.pre_mlp_norm = RMSNorm(d.hidden, arch.norm_eps)
        self.mlp = MLP(d.hidden, d.intermediate)


class Encoder(nn.Module):
    def __init__(self, arch: DiaArchitecture) -> None:
        super().__init__()
        self.embedding = nn.Embedding(arch.encoder.vocab_size, arch.encoder.hidden)
        self.layers = nn.ModuleList(EncoderLayer(arch) for _ in range(arch.encoder.layers))
        self.norm = RMSNorm(arch.encoder.hidden, arch.norm_eps)


class MultiChannelEmbedding(nn.Module):
    """The nine channel tables stacked into one `[C*V x E]` table, as transformers stores them."""

    def __init__(self, arch: DiaArchitecture) -> None:
        super().__init__()
        d = arch.decoder
        self.embed = nn.Embedding(d.num_channels * d.vocab_size, d.hidden)
        self.register_buffer("offsets", torch.arange(d.num_channels) * d.vocab_size, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """Tensor[B x S x C] ids -> Tensor[B x S x E], the sum of the channel embeddings."""
        return self.embed(tokens + self.offsets).sum(dim=2)


class Decoder(nn.Module):
    def __init__(self, arch: DiaArchitecture) -> None:
        super().__init__()
        self.embeddings = MultiChannelEmbedding(arch)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.decoder.layers))
        self.norm = RMSNorm(arch.decoder.hidden, arch.norm_eps)


class DiaBackbone(nn.Module):
    def __init__(self, arch: DiaArchitecture) -> None:
        super().__init__()
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)


class DiaModel(nn.Module):
    """All Dia weights under transformers' key names (`model.encoder...`, `logits_dense.weight`)."""

    def __init__(self, arch: DiaArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.model = DiaBackbone(arch)
        d = arch.decoder
        self.logits_dense = Linear(d.hidden, d.num_channels * d.vocab_size)
        self.rotary_encoder = Rotary(arch.encoder.head_dim, arch.rope_min_timescale, arch.rope_max_timescale)
        self.rotary_decoder = Rotary(d.head_dim, arch.rope_min_timescale, arch.rope_max_timescale)
        self.rotary_cross = Rotary(d.cross_head_dim, arch.rope_min_timescale, arch.rope_max_timescale)

    @classmethod
    def from_state(cls, arch: DiaArchitecture, state: dict[str, Tensor]) -> DiaModel:
        """Build the model on `state`'s own tensors (no copy): HF `[out, in]` kernels become views."""
        model = cls(arch)
        kernels = {name for name, module in model.named_modules() if isinstance(module, Linear)}
        state = {k: v.T if k.removesuffix(".weight") in kernels else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()


class CacheWrite(torch.autograd.Function):
    """Writes a step's K/V into the cache buffer; exported as one ScatterND so ORT can work in place."""

    @staticmethod
    def forward(ctx, cache: Tensor, indices: Tensor, update: Tensor) -> Tensor:  # noqa: ARG004
        out = cache.clone()
        out[indices[..., 0], indices[..., 1], indices[..., 2]] = update
        return out

    @staticmethod
    def symbolic(g, cache, indices, update):  # noqa: ANN001
        return g.op("ScatterND", cache, indices, update)


def cache_indices(batch: int, kv_heads: int, positions: Tensor) -> Tensor:
    """ScatterND indices Tensor[B x Hkv x S x 3] addressing cache slots (b, h, positions[b, s])."""
    b, h, p = torch.broadcast_tensors(
        torch.arange(batch).view(-1, 1, 1), torch.arange(kv_heads).view(1, -1, 1), positions[:, None, :]
    )
    return torch.stack([b, h, p], dim=-1)


class EncoderGraph(nn.Module):
    """Text -> every decoder layer's cross-attention K/V (run once per request).

    Inputs: text_ids Tensor[B x L] (int64), text_mask Tensor[B x L] (bool, True on real bytes).
    Outputs: cross_key_i, cross_value_i Tensor[B x Hc x L x Dc] for each decoder layer i.
    """

    def __init__(self, model: DiaModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        enc = m.model.encoder
        positions = torch.arange(text_ids.shape[1])
        # a real byte attends real bytes only, a pad byte pad bytes only (SPEC.md section 3)
        allowed = (text_mask[:, :, None] == text_mask[:, None, :])[:, None, None]
        rope = m.rotary_encoder(positions)
        x = enc.embedding(text_ids)
        for layer in enc.layers:
            sa = layer.self_attention
            h = layer.pre_sa_norm(x)
            k, v = sa.keys_values(h)
            q = m.rotary_encoder.rotate(sa.queries(h), rope)
            x = x + sa.attend(q, m.rotary_encoder.rotate(k, rope), v, allowed)
            x = x + layer.mlp(layer.post_sa_norm(x))
        x = enc.norm(x)
        outputs = []
        cross_rope = m.rotary_cross(positions) if m.arch.flavour == "v0.1" else None
        for layer in m.model.decoder.layers:
            k, v = layer.cross_attention.keys_values(x)
            if m.arch.flavour == "v0.1":
                k = m.rotary_cross.rotate(k, cross_rope)
            outputs += [k, v]
        return tuple(outputs)


class DecoderStepGraph(nn.Module):
    """S decoder rows at absolute `positions`, against the cache buffers -> last row's logits.

    Every batch row has positions of its own, so requests at different points of their generation
    share one step (continuous batching). Inputs: tokens Tensor[B x S x C] (int64), positions
    Tensor[B x S] (int64, consecutive along S), text_mask Tensor[B x L] (bool), then per layer
    cross_key_i, cross_value_i Tensor[B x Hc x L x Dc], then per layer past_key_i, past_value_i
    Tensor[B x Hkv x T x D] (a row's slots after its positions may hold any finite values: they are
    masked, and a masked slot's value still enters the sum with weight 0).
    Outputs: logits Tensor[B x C x V] (float32) of the last row, then present_key_i, present_value_i:
    the buffers with this step's rows written at `positions`.
    """

    def __init__(self, model: DiaModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: Tensor, positions: Tensor, text_mask: Tensor, *caches: Tensor
    ) -> tuple[Tensor, ...]:
        m = self.model
        dec = m.model.decoder
        n = len(dec.layers)
        cross, past = caches[: 2 * n], caches[2 * n :]
        batch, kv_heads = tokens.shape[0], m.arch.decoder.kv_heads
        indices = cache_indices(batch, kv_heads, positions)
        slots = torch.arange(past[0].shape[2])
        causal = (slots[None, None, :] <= positions[:, :, None])[:, None, None]  # [B, 1, 1, S, T]
        text_allowed = text_mask[:, None, None, None, :]  # [B, 1, 1, 1, L]
        rope = _per_head(m.rotary_decoder(positions))
        cross_rope = _per_head(m.rotary_cross(positions)) if m.arch.flavour == "v0.1" else None
        x = dec.embeddings(tokens)
        presents = []
        for i, layer in enumerate(dec.layers):
            sa, ca = layer.self_attention, layer.cross_attention
            h = layer.pre_sa_norm(x)
            k, v = sa.keys_values(h)
            k = CacheWrite.apply(past[2 * i], indices, m.rotary_decoder.rotate(k, rope))
            v = CacheWrite.apply(past[2 * i + 1], indices, v)
            presents += [k, v]
            x = x + sa.attend(m.rotary_decoder.rotate(sa.queries(h), rope), k, v, causal)
            q = ca.queries(layer.pre_ca_norm(x))
            if m.arch.flavour == "v0.1":
                q = m.rotary_cross.rotate(q, cross_rope)
            x = x + ca.attend(q, cross[2 * i], cross[2 * i + 1], text_allowed)
            x = x + layer.mlp(layer.pre_mlp_norm(x))
        last = dec.norm(x[:, -1])
        logits = m.logits_dense(last).unflatten(-1, (m.arch.decoder.num_channels, m.arch.decoder.vocab_size))
        return (logits.float(), *presents)


def _per_head(angles: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(cos, sin) Tensor[B x S x D/2] -> Tensor[B x 1 x S x D/2], to rotate Tensor[B x H x S x D]."""
    return angles[0][:, None], angles[1][:, None]
