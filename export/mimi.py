"""Kyutai's Mimi codec (Dia2's audio codes) as plain torch modules, and its two graph wrappers.

Parameter names are the published `kyutai/mimi` checkpoint's flat layout, which transformers'
`MimiModel` renames on load (`from_state` takes either):

    encoder.layers.{i}[.block.{1,3}].conv           SEANet encoder: causal convs, ELU, resnet blocks
    encoder_transformer.layers.{l}.*                 8 layers: LayerNorm, RoPE attention, GELU MLP, layer scales
    downsample.conv                                  25 Hz -> 12.5 Hz, causal, stride 2
    quantizer.{semantic,acoustic}_residual_vector_quantizer.{input_proj,output_proj,layers.{q}.codebook}
    upsample.conv                                    12.5 Hz -> 25 Hz, depthwise transposed conv
    decoder_transformer.layers.{l}.*
    decoder.layers.{i}[.block.{1,3}].conv            SEANet decoder: transposed convs, resnet blocks

Every convolution is causal (left padding only; a transposed one drops its right overhang), and the
transformers attend causally within a window, so the decoder is exact frame by frame: `MimiDecodeGraph`
takes each layer's left context and the attention caches as inputs and gives them back, and a stream of
chunks equals one call on all the frames. The encoder runs on a whole clip (voice prefixes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.architecture import rope_theta as read_rope_theta
from export.dia_model import additive, attend, reshape

TRANSFORMERS_RENAMES = (  # transformers' MimiModel names -> the published ones
    ("encoder.encoder_seanet.layers.", "encoder.layers."),
    ("encoder.encoder_transformer.", "encoder_transformer."),
    ("encoder.downsample.", "downsample."),
    ("decoder.upsample.", "upsample."),
    ("decoder.decoder_transformer.", "decoder_transformer."),
    ("decoder.decoder_seanet.layers.", "decoder.layers."),
)


@dataclass(frozen=True)
class MimiArchitecture:
    """The sizes of a Mimi; the defaults are `kyutai/mimi`'s (transformers' `MimiConfig` defaults)."""

    sampling_rate: int = 24000
    frame_rate: float = 12.5
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    vector_quantization_hidden_dimension: int = 256
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    head_dim: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    sliding_window: int = 250

    @property
    def hop_length(self) -> int:
        """Waveform samples per code frame."""
        return round(self.sampling_rate / self.frame_rate)

    @property
    def latent_stride(self) -> int:
        """Transformer frames (at the SEANet's rate) per code frame."""
        return self.hop_length // math.prod(self.upsampling_ratios)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MimiArchitecture:
        """A transformers `MimiConfig` dict (a `kyutai/mimi` config.json) -> the sizes this export needs."""
        if config.get("num_key_value_heads", config.get("num_attention_heads")) != config.get(
            "num_attention_heads"
        ):
            raise ValueError("Mimi with fewer key/value heads than query heads is not supported")
        if not config.get("use_causal_conv", True) or config.get("pad_mode", "constant") != "constant":
            raise ValueError("only causal Mimi with zero padding streams frame by frame")
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        values["rope_theta"] = read_rope_theta(config)
        values["upsampling_ratios"] = tuple(values.get("upsampling_ratios", cls.upsampling_ratios))
        return replace(cls(), **values)

    def to_config(self) -> dict[str, Any]:
        """Keyword arguments of transformers' `MimiConfig` for these sizes (the tests' reference)."""
        config = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("frame_rate", "rope_theta")
        }
        config["upsampling_ratios"] = list(self.upsampling_ratios)
        config["num_key_value_heads"] = self.num_attention_heads
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return config


MIMI = MimiArchitecture()
# The real rates and hop (the runtime's frame math holds), tiny widths, a short attention window.
TINY_MIMI = MimiArchitecture(
    hidden_size=32,
    num_filters=4,
    codebook_size=32,
    codebook_dim=16,
    num_quantizers=4,
    vector_quantization_hidden_dimension=16,
    upsample_groups=32,
    num_hidden_layers=2,
    intermediate_size=48,
    num_attention_heads=4,
    head_dim=8,
    sliding_window=6,
)


class CausalConv(nn.Module):
    """A Conv1d fed its left context: `(k - 1) * dilation` columns of zeros at the start of a clip, the
    previous chunk's last input columns in a stream. A strided one pads its right end with zeros to a
    whole number of strides, as the reference does."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad: str = "constant",
    ):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, dilation=dilation, bias=bias)
        self.context = (kernel - 1) * dilation + 1 - stride
        self.pad = pad  # "replicate": the edge columns repeated instead of zeros (the downsampling conv)

    def forward(self, x: Tensor) -> Tensor:
        """A whole clip. The reference pads the right end to a whole number of strides; stride - 1 columns
        give the same outputs for any length (the last window ends where the reference's padding does)."""
        return self.conv(F.pad(x, (self.context, self.conv.stride[0] - 1), mode=self.pad))

    def stream(self, x: Tensor, past: Tensor) -> tuple[Tensor, Tensor]:
        """A chunk after `past` (Tensor[B x C x context]) -> the chunk's output and the next `past`."""
        x = torch.cat([past, x], dim=-1)
        return self.conv(x), x[..., x.shape[-1] - self.context :]


class CausalConvTranspose(nn.Module):
    """A ConvTranspose1d with kernel 2 x stride whose right overhang is dropped: output frame t reads
    input frames t-1 and t, so a stream carries one input frame."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.stream(x, torch.zeros_like(x[..., :1]))[0]

    def stream(self, x: Tensor, past: Tensor) -> tuple[Tensor, Tensor]:
        stride = self.conv.stride[0]
        y = self.conv(torch.cat([past, x], dim=-1))  # the past frame's own outputs come first
        return y[..., stride : y.shape[-1] - stride], x[..., -1:]


class ResnetBlock(nn.Module):
    """`x + conv1x1(elu(conv_k(elu(x))))`, the names of the reference's `block` list (ELUs at 0 and 2)."""

    def __init__(self, dim: int, arch: MimiArchitecture, dilation: int) -> None:
        super().__init__()
        hidden = dim // arch.compress
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                CausalConv(dim, hidden, arch.residual_kernel_size, dilation=dilation),
                nn.ELU(),
                CausalConv(hidden, dim, 1),
            ]
        )

    def convs(self) -> list[CausalConv]:
        return [self.block[1], self.block[3]]


def _seanet_encoder(arch: MimiArchitecture) -> nn.ModuleList:
    layers: list[nn.Module] = [CausalConv(1, arch.num_filters, arch.kernel_size)]
    scale = 1
    for ratio in reversed(arch.upsampling_ratios):
        dim = scale * arch.num_filters
        layers += [
            ResnetBlock(dim, arch, arch.dilation_growth_rate**j) for j in range(arch.num_residual_layers)
        ]
        layers += [nn.ELU(), CausalConv(dim, 2 * dim, 2 * ratio, stride=ratio)]
        scale *= 2
    layers += [nn.ELU(), CausalConv(scale * arch.num_filters, arch.hidden_size, arch.last_kernel_size)]
    return nn.ModuleList(layers)


def _seanet_decoder(arch: MimiArchitecture) -> nn.ModuleList:
    scale = 2 ** len(arch.upsampling_ratios)
    layers: list[nn.Module] = [CausalConv(arch.hidden_size, scale * arch.num_filters, arch.kernel_size)]
    for ratio in arch.upsampling_ratios:
        dim = scale * arch.num_filters
        layers += [nn.ELU(), CausalConvTranspose(dim, dim // 2, ratio)]
        layers += [
            ResnetBlock(dim // 2, arch, arch.dilation_growth_rate**j) for j in range(arch.num_residual_layers)
        ]
        scale //= 2
    layers += [nn.ELU(), CausalConv(arch.num_filters, 1, arch.last_kernel_size)]
    return nn.ModuleList(layers)


class LayerScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))


class SelfAttention(nn.Module):
    def __init__(self, arch: MimiArchitecture) -> None:
        super().__init__()
        width = arch.num_attention_heads * arch.head_dim
        self.q_proj = nn.Linear(arch.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(arch.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(arch.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, arch.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, arch: MimiArchitecture) -> None:
        super().__init__()
        self.fc1 = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.fc2 = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)


class TransformerLayer(nn.Module):
    def __init__(self, arch: MimiArchitecture) -> None:
        super().__init__()
        self.self_attn = SelfAttention(arch)
        self.mlp = MLP(arch)
        self.input_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps)
        self.self_attn_layer_scale = LayerScale(arch.hidden_size)
        self.mlp_layer_scale = LayerScale(arch.hidden_size)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of x Tensor[B x H x N x D] by cos, sin Tensor[N x D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Transformer(nn.Module):
    """Causal attention within `sliding_window` frames (the frame itself and the window - 1 before it)."""

    def __init__(self, arch: MimiArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.layers = nn.ModuleList(TransformerLayer(arch) for _ in range(arch.num_hidden_layers))
        dim = arch.head_dim
        self.inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    @property
    def window(self) -> int:
        """Cached frames a stream carries: the most any new frame can see."""
        return self.arch.sliding_window - 1

    def forward(self, x: Tensor, offset: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """x Tensor[B x N x C] at positions offset.. (offset Tensor[1], int64), after the frames whose
        keys and values `past` holds (per layer Tensor[B x H x W x D], W = `window`; slots before
        position 0 are masked) -> the output and the next `past`."""
        a, heads = self.arch, self.arch.num_attention_heads
        count, window = x.shape[1], past[0].shape[2]
        positions = offset + torch.arange(count)
        freqs = positions.float()[:, None] * self.inv_freq
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        keys_at = offset - window + torch.arange(window + count)
        allowed = (keys_at[None, :] >= 0) & (keys_at[None, :] <= positions[:, None])
        allowed = allowed & (keys_at[None, :] > positions[:, None] - a.sliding_window)
        bias = additive(allowed)[None, None].expand(x.shape[0], 1, count, window + count)
        presents = []
        for i, layer in enumerate(self.layers):
            sa = layer.self_attn
            h = layer.input_layernorm(x)

            def heads_of(projection: nn.Linear, h: Tensor = h) -> Tensor:
                return reshape(projection(h), 0, 0, heads, -1).transpose(1, 2)

            q = rotate(heads_of(sa.q_proj), cos, sin) * (a.head_dim**-0.5)  # a power of two: exact
            k = torch.cat([past[2 * i], rotate(heads_of(sa.k_proj), cos, sin)], dim=2)
            v = torch.cat([past[2 * i + 1], heads_of(sa.v_proj)], dim=2)
            presents += [k[:, :, k.shape[2] - window :], v[:, :, v.shape[2] - window :]]
            attended = attend(reshape(q.transpose(1, 2), 0, 0, -1), k, v, bias, heads, fused=False)
            x = x + layer.self_attn_layer_scale.scale * sa.o_proj(attended)
            h = layer.post_attention_layernorm(x)
            x = x + layer.mlp_layer_scale.scale * layer.mlp.fc2(F.gelu(layer.mlp.fc1(h)))
        return x, presents


class Codebook(nn.Module):
    """The reference's Euclidean codebook buffers; its vectors are `embed_sum / max(cluster_usage, eps)`."""

    def __init__(self, arch: MimiArchitecture) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(arch.codebook_size))
        self.register_buffer("embed_sum", torch.zeros(arch.codebook_size, arch.codebook_dim))

    def vectors(self) -> Tensor:
        return self.embed_sum / self.cluster_usage.clamp(min=1e-5)[:, None]


class VectorQuantization(nn.Module):
    def __init__(self, arch: MimiArchitecture) -> None:
        super().__init__()
        self.codebook = Codebook(arch)


class ResidualQuantizer(nn.Module):
    def __init__(self, arch: MimiArchitecture, count: int) -> None:
        super().__init__()
        dim, hidden = arch.vector_quantization_hidden_dimension, arch.hidden_size
        self.input_proj = nn.Conv1d(hidden, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, hidden, 1, bias=False)
        self.layers = nn.ModuleList(VectorQuantization(arch) for _ in range(count))

    def encode(self, latents: Tensor, count: int) -> Tensor:
        """latents Tensor[B x C x T] -> codes Tensor[count x B x T], each the nearest vector of the residual."""
        residual = self.input_proj(latents).transpose(1, 2)  # [B, T, D]
        codes = []
        for layer in self.layers[:count]:
            vectors = layer.codebook.vectors()
            # squared distances as torch.cdist computes them: one product of [-2x, |x|^2, 1] and [e, 1, |e|^2]
            norms = residual.pow(2).sum(-1, keepdim=True)
            left = torch.cat([residual * -2, norms, torch.ones_like(norms)], dim=-1)
            right = torch.cat(
                [vectors, torch.ones_like(vectors[:, :1]), vectors.pow(2).sum(-1, keepdim=True)], dim=-1
            )
            index = (left @ right.T).clamp_min(0).argmin(dim=-1)
            codes.append(index)
            residual = residual - F.embedding(index, vectors)
        return torch.stack(codes)

    def decode(self, codes: Tensor) -> Tensor:
        """codes Tensor[B x K x T] -> Tensor[B x C x T]."""
        total = torch.zeros(())
        for index, layer in enumerate(self.layers[: codes.shape[1]]):
            total = total + F.embedding(codes[:, index], layer.codebook.vectors())
        return self.output_proj(total.transpose(1, 2))


class SplitQuantizer(nn.Module):
    def __init__(self, arch: MimiArchitecture) -> None:
        super().__init__()
        self.semantic = arch.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = ResidualQuantizer(arch, arch.num_semantic_quantizers)
        self.acoustic_residual_vector_quantizer = ResidualQuantizer(
            arch, arch.num_quantizers - arch.num_semantic_quantizers
        )


class MimiCodec(nn.Module):
    """Every Mimi weight under the published names."""

    def __init__(self, arch: MimiArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = nn.Module()
        self.encoder.layers = _seanet_encoder(arch)
        self.encoder_transformer = Transformer(arch)
        stride = arch.latent_stride
        self.downsample = CausalConv(
            arch.hidden_size, arch.hidden_size, 2 * stride, stride, bias=False, pad="replicate"
        )
        self.quantizer = SplitQuantizer(arch)
        self.upsample = CausalConvTranspose(
            arch.hidden_size, arch.hidden_size, arch.latent_stride, groups=arch.upsample_groups, bias=False
        )
        self.decoder_transformer = Transformer(arch)
        self.decoder = nn.Module()
        self.decoder.layers = _seanet_decoder(arch)

    @classmethod
    def from_state(cls, arch: MimiArchitecture, state: dict[str, Tensor]) -> MimiCodec:
        """The codec on `state` (published or transformers names), with a strict key check."""
        renamed = {}
        for name, tensor in state.items():
            for old, new in TRANSFORMERS_RENAMES:
                if name.startswith(old):
                    name = new + name[len(old) :]
                    break
            renamed[name] = tensor.float()
        codec = cls(arch)
        codec.load_state_dict(renamed, strict=True)
        return codec.eval()

    def decoder_convs(self) -> list[CausalConv | CausalConvTranspose]:
        """Every convolution of the decoding path, in order: each carries left context in a stream."""
        convs: list[CausalConv | CausalConvTranspose] = [self.upsample]
        for layer in self.decoder.layers:
            if isinstance(layer, ResnetBlock):
                convs += layer.convs()
            elif isinstance(layer, CausalConv | CausalConvTranspose):
                convs.append(layer)
        return convs


def stream_names(codec: MimiCodec, prefix: str) -> list[str]:
    """The decoder's state inputs (`past`) or outputs (`present`): each conv's context, then each
    transformer layer's keys and values."""
    convs = [f"{prefix}_conv_{i}" for i in range(len(codec.decoder_convs()))]
    layers = range(codec.arch.num_hidden_layers)
    return convs + [f"{prefix}_{kind}_{i}" for i in layers for kind in ("key", "value")]


class MimiDecodeGraph(nn.Module):
    """A chunk of code frames -> its waveform, carrying the decoder's state from chunk to chunk.

    Inputs: codes Tensor[B x K x F] (int64), offset Tensor[1] (int64: code frames decoded before this
    chunk, times the latent stride), then `stream_names(codec, "past")`: per convolution its left
    context Tensor[B x C x context], per transformer layer keys and values Tensor[B x H x W x D]; all
    zeros at the start of a stream. Outputs: waveform Tensor[B x F*hop], then the `present` states.
    """

    def __init__(self, codec: MimiCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, codes: Tensor, offset: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        c = self.codec
        convs = c.decoder_convs()
        conv_past, attention_past = list(past[: len(convs)]), list(past[len(convs) :])
        presents: list[Tensor] = []

        def conv(module: CausalConv | CausalConvTranspose, x: Tensor) -> Tensor:
            y, state = module.stream(x, conv_past[len(presents)])
            presents.append(state)
            return y

        q = c.quantizer
        latents = q.semantic_residual_vector_quantizer.decode(codes[:, : q.semantic])
        if codes.shape[1] > q.semantic:
            latents = latents + q.acoustic_residual_vector_quantizer.decode(codes[:, q.semantic :])
        x = conv(c.upsample, latents)
        x, attention_present = c.decoder_transformer(x.transpose(1, 2), offset, attention_past)
        x = x.transpose(1, 2)
        for layer in c.decoder.layers:
            if isinstance(layer, ResnetBlock):
                x = x + conv(layer.block[3], F.elu(conv(layer.block[1], F.elu(x))))
            elif isinstance(layer, nn.ELU):
                x = F.elu(x)
            else:
                x = conv(layer, x)
        return (x[:, 0], *presents, *attention_present)

    def initial_state(self, batch: int) -> list[Tensor]:
        """The `past` inputs of a new stream: zeros."""
        c, a = self.codec, self.codec.arch
        states = []
        for module in c.decoder_convs():
            width = 1 if isinstance(module, CausalConvTranspose) else module.context
            states.append(torch.zeros(batch, module.conv.in_channels, width))
        shape = (batch, a.num_attention_heads, c.decoder_transformer.window, a.head_dim)
        return states + [torch.zeros(shape) for _ in range(2 * a.num_hidden_layers)]


class MimiEncodeGraph(nn.Module):
    """A whole clip -> its codes: waveform Tensor[B x N] (float32, 24 kHz) -> codes Tensor[B x K x
    ceil(N / hop)] (int64), K = `codebooks`."""

    def __init__(self, codec: MimiCodec, codebooks: int) -> None:
        super().__init__()
        self.codec, self.codebooks = codec, codebooks

    def forward(self, waveform: Tensor) -> Tensor:
        c = self.codec
        x = waveform[:, None]
        for layer in c.encoder.layers:
            if isinstance(layer, ResnetBlock):
                x = x + layer.block[3](F.elu(layer.block[1](F.elu(x))))
            else:
                x = layer(x)
        past = [
            torch.zeros(x.shape[0], c.arch.num_attention_heads, c.encoder_transformer.window, c.arch.head_dim)
            for _ in range(2 * c.arch.num_hidden_layers)
        ]
        x, _ = c.encoder_transformer(x.transpose(1, 2), torch.zeros(1, dtype=torch.long), past)
        latents = c.downsample(x.transpose(1, 2))
        q = c.quantizer
        codes = q.semantic_residual_vector_quantizer.encode(latents, q.semantic)
        if self.codebooks > q.semantic:
            acoustic = q.acoustic_residual_vector_quantizer.encode(latents, self.codebooks - q.semantic)
            codes = torch.cat([codes, acoustic])
        return codes.transpose(0, 1)
