"""Dia in torch, written for export: the encoder and a decoder step with an explicit KV cache.

Parameter names are transformers' HF layout (docs/generation.md section 2), so any checkpoint converted by
`export.checkpoint` loads by name with a strict key check; projection kernels are held as `[in, out]`
views of the HF `[out, in]` tensors, so the graphs get plain MatMuls on the stored weights and no
transposed copy of 6 GB is ever made. The forward pass follows docs/generation.md
section 3: RMSNorm in float32, attention scale 1.0, rotate-half RoPE, GQA, and for the v0.1 flavour
RoPE on cross-attention too.

The decoder's self-attention cache is a fixed buffer `[B x Hkv x T x D]` per layer. A step writes its
new keys and values into the buffer with one ScatterND and attends over the whole buffer under a
causal mask, so the runtime can bind the same memory as cache input and output and nothing is copied
per step.

The graphs are written to be lean, since ONNX Runtime pays a fixed cost per node at every step:
reshapes carry constant shapes (`reshape`), the step multiplies by one fused Q/K/V kernel, the masks
become additive biases built once per step, and in float32 RoPE, attention and each residual add with
the norm after it export as ONNX Runtime's fused `RotaryEmbedding`, `MultiHeadAttention` and
`SkipSimplifiedLayerNormalization` ops. The torch forward of each fused op is the reference
math the export is verified against. Half-precision graphs (for CUDA) keep standard ops, which every
provider runs in those types.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from export.architecture import DiaArchitecture


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_norm(x: Tensor, update: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual stream `x + update`, normed, and itself."""
    total = x + update
    return rms_norm(total, weight, eps), total


class FusedAddNorm(torch.autograd.Function):
    """`add_norm`, exported as ONNX Runtime's SkipSimplifiedLayerNormalization: one node where a
    residual add and a norm would be two."""

    @staticmethod
    def forward(ctx, x: Tensor, update: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:  # noqa: ARG004
        return add_norm(x, update, weight, eps)

    @staticmethod
    def symbolic(g, x, update, weight, eps):  # noqa: ANN001
        normed, _, _, total = g.op(
            "com.microsoft::SkipSimplifiedLayerNormalization", update, x, weight, epsilon_f=eps, outputs=4
        )
        normed.setType(x.type())
        total.setType(x.type())
        return normed, total


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add(self, x: Tensor, update: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
        """`add_norm` with this norm's weight; one fused node when `fused`."""
        return (FusedAddNorm.apply if fused else add_norm)(x, update, self.weight, self.eps)


class Linear(nn.Module):
    """y = x @ weight with weight `[in, out]` (transformers stores its transpose; see `from_state`)."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_in, fan_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight)


def assign_state(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """`model` on `state`'s own tensors (no copy), with a strict key check: the stored `[out, in]`
    kernels of its `Linear`s become `[in, out]` views."""
    kernels = {name for name, module in model.named_modules() if isinstance(module, Linear)}
    state = {k: v.T if k.removesuffix(".weight") in kernels else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: Tensor) -> Tensor:
        fused = self.gate_up_proj(x)
        return self.down_proj(F.silu(fused[..., : self.intermediate]) * fused[..., self.intermediate :])


class Reshape(torch.autograd.Function):
    """`x` reshaped to `shape`, where 0 keeps the input's dimension and -1 is inferred (ONNX's rule).
    A shape with a 0 needs a -1 as well: torch's exporter cannot infer the output shape otherwise.

    Exported as one Reshape with a constant shape: torch's own reshape and unflatten trace to chains
    of Shape, Gather and Concat nodes that ONNX Runtime would run at every step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, shape: tuple[int, ...]) -> Tensor:  # noqa: ARG004
        return x.reshape([x.shape[i] if size == 0 else size for i, size in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):  # noqa: ANN001
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def reshape(x: Tensor, *shape: int) -> Tensor:
    return Reshape.apply(x, shape)


def heads_first(x: Tensor, heads: int) -> Tensor:
    """Tensor[B x L x heads*D] -> Tensor[B x heads x L x D], the layout of the caches."""
    return reshape(x, 0, 0, heads, -1).transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, heads: int) -> Tensor:
    """Scale-1.0 attention: q Tensor[B x S x H*D], k and v Tensor[B x H x T x D], bias Tensor[B x 1 x S x T]
    (0 where allowed, -inf where masked) -> Tensor[B x S x H*D]. Softmax runs in float32."""
    q = heads_first(q, heads)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() + bias
    out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v)
    return reshape(out.transpose(1, 2), 0, 0, -1)


class FusedAttention(torch.autograd.Function):
    """`attention`, exported as ONNX Runtime's MultiHeadAttention (keys and values in BNSH layout)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, heads: int) -> Tensor:  # noqa: ARG004
        return attention(q, k, v, bias, heads)

    @staticmethod
    def symbolic(g, q, k, v, bias, heads):  # noqa: ANN001
        none = g.op("prim::Constant")  # an absent optional input, as torch's own symbolics write it
        none.setType(torch._C.OptionalType.ofTensor())
        out = g.op(
            "com.microsoft::MultiHeadAttention", q, k, v, none, none, bias, num_heads_i=heads, scale_f=1.0
        )
        out.setType(q.type())  # the output has the query's shape; saying so keeps the exporter quiet
        return out


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, heads: int, fused: bool) -> Tensor:
    """`attention`, as ONNX Runtime's MultiHeadAttention when `fused`."""
    return FusedAttention.apply(q, k, v, bias, heads) if fused else attention(q, k, v, bias, heads)


def rotate_half(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """x Tensor[B x S x heads*D] with each head rotated by its row's angles, in float32.

    positions Tensor[B x S]; cos and sin Tensor[P x D/2], the tables of every position.
    """
    half = int(cos.shape[-1])
    x = reshape(x, 0, 0, heads, -1)
    c, s = cos[positions][:, :, None], sin[positions][:, :, None]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return reshape(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype), 0, 0, -1)


class FusedRotate(torch.autograd.Function):
    """`rotate_half`, exported as ONNX Runtime's RotaryEmbedding."""

    @staticmethod
    def forward(ctx, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:  # noqa: ARG004
        return rotate_half(x, positions, cos, sin, heads)

    @staticmethod
    def symbolic(g, x, positions, cos, sin, heads):  # noqa: ANN001
        out = g.op(
            "com.microsoft::RotaryEmbedding", x, positions, cos, sin, num_heads_i=heads, interleaved_i=0
        )
        out.setType(x.type())
        return out


class Projections(nn.Module):
    """q/k/v/o projections of one attention block (names as in transformers)."""

    def __init__(self, hidden: int, kv_hidden: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = Linear(hidden, heads * head_dim)
        self.k_proj = Linear(kv_hidden, kv_heads * head_dim)
        self.v_proj = Linear(kv_hidden, kv_heads * head_dim)
        self.o_proj = Linear(heads * head_dim, hidden)


def additive(allowed: Tensor) -> Tensor:
    """A boolean mask as an attention bias: 0 where allowed, -inf where not (float32)."""
    return torch.where(allowed, 0.0, float("-inf"))


class Rotary(nn.Module):
    """Rotate-half RoPE by the cos and sin tables `[P x D/2]` of every position below P.

    The tables are computed once at export with the float32 arithmetic the model uses. They are plain
    attributes, not buffers: `.half()` must not round them (at position 3000 a float16 angle would move
    by a radian).
    """

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        super().__init__()
        self.cos, self.sin = cos, sin

    @classmethod
    def dia(cls, head_dim: int, min_timescale: float, max_timescale: float, positions: int) -> Rotary:
        """Dia's tables: timescale_i = min * (max/min) ** (2i/D), angle = position / timescale."""
        fraction = 2 * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim
        timescale = (min_timescale * (max_timescale / min_timescale) ** fraction).float()
        angle = torch.arange(positions, dtype=torch.float32)[:, None] / timescale
        return cls(torch.cos(angle), torch.sin(angle))

    def rotate(self, x: Tensor, positions: Tensor, heads: int, fused: bool) -> Tensor:
        """x Tensor[B x S x heads*D] rotated at positions Tensor[B x S] (int64)."""
        if fused:
            return FusedRotate.apply(x, positions, self.cos, self.sin, heads)
        return rotate_half(x, positions, self.cos, self.sin, heads)


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
        scales = (arch.rope_min_timescale, arch.rope_max_timescale)
        text, audio = arch.encoder.max_length, d.max_length
        self.rotary_encoder = Rotary.dia(arch.encoder.head_dim, *scales, positions=text)
        self.rotary_decoder = Rotary.dia(d.head_dim, *scales, positions=audio)
        # v0.1 rotates cross-attention keys at text positions and queries at audio positions
        self.rotary_cross = Rotary.dia(d.cross_head_dim, *scales, positions=max(text, audio))

    @property
    def fused_ops(self) -> bool:
        """Whether the graphs use ONNX Runtime's fused RotaryEmbedding, MultiHeadAttention and
        SkipSimplifiedLayerNormalization.

        Only in float32 (the CPU variants, what they are quantized from, and float32 on CUDA, which
        has these kernels in float32): the half-precision graphs are for CUDA, whose fused kernels do
        not all take bfloat16, so they keep standard ops.
        """
        return self.logits_dense.weight.dtype == torch.float32

    @classmethod
    def from_state(cls, arch: DiaArchitecture, state: dict[str, Tensor]) -> DiaModel:
        """Build the model on `state`'s own tensors (no copy): HF `[out, in]` kernels become views."""
        return assign_state(cls(arch), state)


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
    """ScatterND indices Tensor[B x S x Hkv x 3] addressing cache slots (b, h, positions[b, s]).

    Ordered as the step's K/V rows come out of their projection, so an update needs no transpose."""
    b, p, h = torch.broadcast_tensors(
        torch.arange(batch).view(-1, 1, 1), positions[:, :, None], torch.arange(kv_heads).view(1, 1, -1)
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
        enc, fused = m.model.encoder, m.fused_ops
        heads = m.arch.encoder.heads
        positions = torch.arange(text_ids.shape[1]).expand_as(text_ids)
        # a real byte attends real bytes only, a pad byte pad bytes only (docs/generation.md section 3)
        bias = additive(text_mask[:, :, None] == text_mask[:, None, :])[:, None]  # [B, 1, L, L]
        x = enc.embedding(text_ids)
        h = enc.layers[0].pre_sa_norm(x)  # each residual add is fused with the norm after it
        after_mlp = [layer.pre_sa_norm for layer in enc.layers[1:]] + [enc.norm]
        for layer, norm in zip(enc.layers, after_mlp, strict=True):
            sa = layer.self_attention
            q = m.rotary_encoder.rotate(sa.q_proj(h), positions, heads, fused)
            k = heads_first(m.rotary_encoder.rotate(sa.k_proj(h), positions, heads, fused), heads)
            v = heads_first(sa.v_proj(h), heads)
            h, x = layer.post_sa_norm.add(x, sa.o_proj(attend(q, k, v, bias, heads, fused)), fused)
            h, x = norm.add(x, layer.mlp(h), fused)
        x = h  # enc.norm of the last residual stream
        outputs = []
        cross_heads = m.arch.decoder.cross_heads
        for layer in m.model.decoder.layers:
            ca = layer.cross_attention
            k = ca.k_proj(x)
            if m.arch.flavour == "v0.1":
                k = m.rotary_cross.rotate(k, positions, cross_heads, fused)
            outputs += [heads_first(k, cross_heads), heads_first(ca.v_proj(x), cross_heads)]
        return tuple(outputs)


class FusedSelfAttention(nn.Module):
    """One decoder layer's self-attention kernels as the step graph multiplies by them.

    `qkv` is q/k/v side by side (one MatMul per step instead of three). Its q columns are ordered
    (group, KV head, dim) instead of (KV head, group, dim), and `o`'s rows likewise, so the G query
    heads that share a KV head become G query rows of one head by a plain reshape: attention then
    reads each cached K/V once and never repeats it. Built once at export, a copy of the weights.
    """

    def __init__(self, sa: Projections) -> None:
        super().__init__()
        groups, kv, d = sa.heads // sa.kv_heads, sa.kv_heads, sa.head_dim
        q = sa.q_proj.weight.detach().unflatten(1, (kv, groups, d)).transpose(1, 2).flatten(1)
        self.qkv = nn.Parameter(
            torch.cat([q, sa.k_proj.weight.detach(), sa.v_proj.weight.detach()], 1), False
        )
        o = sa.o_proj.weight.detach().unflatten(0, (kv, groups, d)).transpose(0, 1).flatten(0, 2)
        self.o = nn.Parameter(o.contiguous(), False)
        self.splits = (sa.heads * d, kv * d, kv * d)


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
        layers = model.model.decoder.layers
        self.self_attention = nn.ModuleList(FusedSelfAttention(layer.self_attention) for layer in layers)

    def forward(
        self, tokens: Tensor, positions: Tensor, text_mask: Tensor, *caches: Tensor
    ) -> tuple[Tensor, ...]:
        m = self.model
        dec, d, fused = m.model.decoder, m.arch.decoder, m.fused_ops
        n = len(dec.layers)
        cross, past = caches[: 2 * n], caches[2 * n :]
        groups = d.heads // d.kv_heads
        indices = cache_indices(tokens.shape[0], d.kv_heads, positions)
        slots = torch.arange(past[0].shape[2])
        causal = additive(slots[None, None, :] <= positions[:, :, None])  # [B, S, T]
        # query row (s, g) of a KV head is row s of its g-th query head
        self_bias = reshape(torch.stack([causal] * groups, dim=2), 0, 1, -1, 0)  # [B, 1, S*G, T]
        # MultiHeadAttention takes a bias row per query row, so the text mask is repeated S times
        cross_bias = additive(text_mask[:, None, :].expand(-1, tokens.shape[1], -1))[:, None]  # [B, 1, S, L]

        x = dec.embeddings(tokens)
        h = dec.layers[0].pre_sa_norm(x)  # each residual add is fused with the norm after it
        after_mlp = [layer.pre_sa_norm for layer in dec.layers[1:]] + [dec.norm]
        presents = []
        for i, (layer, norm) in enumerate(zip(dec.layers, after_mlp, strict=True)):
            sa, ca = self.self_attention[i], layer.cross_attention
            q, k, v = torch.split(torch.matmul(h, sa.qkv), sa.splits, dim=-1)
            q = m.rotary_decoder.rotate(q, positions, d.heads, fused)
            k = m.rotary_decoder.rotate(k, positions, d.kv_heads, fused)
            k = CacheWrite.apply(past[2 * i], indices, reshape(k, 0, 0, d.kv_heads, -1))
            v = CacheWrite.apply(past[2 * i + 1], indices, reshape(v, 0, 0, d.kv_heads, -1))
            presents += [k, v]
            q = reshape(q, 0, -1, d.kv_heads * d.head_dim)  # [B, S*G, Hkv*D]
            attended = attend(q, k, v, self_bias, d.kv_heads, fused)  # [B, S*G, Hkv*D]
            h, x = layer.pre_ca_norm.add(
                x, torch.matmul(reshape(attended, 0, -1, d.heads * d.head_dim), sa.o), fused
            )
            q = ca.q_proj(h)
            if m.arch.flavour == "v0.1":
                q = m.rotary_cross.rotate(q, positions, d.cross_heads, fused)
            attended = attend(q, cross[2 * i], cross[2 * i + 1], cross_bias, d.cross_heads, fused)
            h, x = layer.pre_mlp_norm.add(x, ca.o_proj(attended), fused)
            h, x = norm.add(x, layer.mlp(h), fused)
        logits = reshape(m.logits_dense(h[:, -1]), -1, d.num_channels, d.vocab_size)
        return (logits.float(), *presents)
