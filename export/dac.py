"""The 44.1 kHz DAC codec as plain torch modules, and the two graph-contract wrappers (docs/generation.md section 10).

Weight norm is folded away (`weight = g * v / ||v||`), so every convolution is a plain `nn.Conv1d` or
`nn.ConvTranspose1d`. Parameter names are transformers' `DacModel` names without weight norm:

    encoder.conv1                                  first conv, 1 -> encoder_dim, k7
    encoder.block.{i}.res_unit{1,2,3}.{snake1,conv1,snake2,conv2}
    encoder.block.{i}.snake1, encoder.block.{i}.conv1    strided conv, doubles the channels
    encoder.snake1, encoder.conv2                  last conv, -> latent_dim, k3
    quantizer.quantizers.{q}.{in_proj,out_proj,codebook}
    decoder.conv1                                  latent_dim -> decoder_dim, k7
    decoder.block.{i}.snake1, decoder.block.{i}.conv_t1  transposed conv, halves the channels
    decoder.block.{i}.res_unit{1,2,3}.{snake1,conv1,snake2,conv2}
    decoder.snake1, decoder.conv2                  last conv, -> 1 channel, k7, then tanh

Convolutions hold `weight` and `bias`, Snake activations `alpha` `[1 x C x 1]`, codebooks `weight`
`[codebook_size x codebook_dim]`. `dac_weights` maps descript's layout onto these names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DacArchitecture:
    """The sizes of a DAC; the defaults are the 44.1 kHz, 8 kbps release that Dia uses."""

    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: int = 1024
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    n_codebooks: int = 9
    codebook_size: int = 1024
    codebook_dim: int = 8
    sample_rate: int = 44100

    @property
    def hop_length(self) -> int:
        """Waveform samples per code frame."""
        return math.prod(self.encoder_rates)


DAC_44KHZ = DacArchitecture()
# Same rates, codebooks and hop as the real codec (the runtime's frame math holds), tiny widths.
TINY_DAC = DacArchitecture(encoder_dim=2, latent_dim=32, decoder_dim=32)


class Snake1d(nn.Module):
    """`x + sin(alpha * x)^2 / alpha`, one alpha per channel: `Tensor[B x C x T]` -> same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """Snake, dilated k7 conv, Snake, k1 conv, plus the input; the padding keeps the length."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.snake1 = Snake1d(channels)
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


def _resampling(stride: int) -> dict[str, int]:
    """Kernel and padding of DAC's strided convolutions: the length changes by exactly `stride`."""
    return {"kernel_size": 2 * stride, "stride": stride, "padding": math.ceil(stride / 2)}


class EncoderBlock(nn.Module):
    """Three residual units, then a strided conv: `Tensor[B x C/2 x L]` -> `Tensor[B x C x L/stride]`."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        half = channels // 2
        self.res_unit1 = ResidualUnit(half, dilation=1)
        self.res_unit2 = ResidualUnit(half, dilation=3)
        self.res_unit3 = ResidualUnit(half, dilation=9)
        self.snake1 = Snake1d(half)
        self.conv1 = nn.Conv1d(half, channels, **_resampling(stride))

    def forward(self, x: Tensor) -> Tensor:
        x = self.res_unit3(self.res_unit2(self.res_unit1(x)))
        return self.conv1(self.snake1(x))


class DecoderBlock(nn.Module):
    """A transposed conv, then three residual units: `Tensor[B x In x L]` -> `Tensor[B x Out x L*stride]`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.snake1 = Snake1d(in_channels)
        self.conv_t1 = nn.ConvTranspose1d(in_channels, out_channels, **_resampling(stride))
        self.res_unit1 = ResidualUnit(out_channels, dilation=1)
        self.res_unit2 = ResidualUnit(out_channels, dilation=3)
        self.res_unit3 = ResidualUnit(out_channels, dilation=9)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_t1(self.snake1(x))
        return self.res_unit3(self.res_unit2(self.res_unit1(x)))


class Encoder(nn.Module):
    """Waveform `Tensor[B x 1 x N]` -> latent `Tensor[B x latent_dim x N/hop]`."""

    def __init__(self, arch: DacArchitecture) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, arch.encoder_dim, kernel_size=7, padding=3)
        self.block = nn.ModuleList(
            EncoderBlock(arch.encoder_dim * 2 ** (i + 1), stride)
            for i, stride in enumerate(arch.encoder_rates)
        )
        channels = arch.encoder_dim * 2 ** len(arch.encoder_rates)
        self.snake1 = Snake1d(channels)
        self.conv2 = nn.Conv1d(channels, arch.latent_dim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class Decoder(nn.Module):
    """Latent `Tensor[B x latent_dim x T]` -> waveform `Tensor[B x 1 x T*hop]` in [-1, 1]."""

    def __init__(self, arch: DacArchitecture) -> None:
        super().__init__()
        widths = [arch.decoder_dim // 2**i for i in range(len(arch.decoder_rates) + 1)]
        self.conv1 = nn.Conv1d(arch.latent_dim, arch.decoder_dim, kernel_size=7, padding=3)
        self.block = nn.ModuleList(
            DecoderBlock(widths[i], widths[i + 1], stride) for i, stride in enumerate(arch.decoder_rates)
        )
        self.snake1 = Snake1d(widths[-1])
        self.conv2 = nn.Conv1d(widths[-1], 1, kernel_size=7, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return torch.tanh(self.conv2(self.snake1(x)))


class VectorQuantizer(nn.Module):
    """One codebook, looked up in a `codebook_dim`-wide space by cosine similarity."""

    def __init__(self, arch: DacArchitecture) -> None:
        super().__init__()
        self.in_proj = nn.Conv1d(arch.latent_dim, arch.codebook_dim, kernel_size=1)
        self.out_proj = nn.Conv1d(arch.codebook_dim, arch.latent_dim, kernel_size=1)
        self.codebook = nn.Embedding(arch.codebook_size, arch.codebook_dim)

    def quantize(self, residual: Tensor) -> Tensor:
        """`Tensor[B x latent_dim x T]` -> codes `LongTensor[B x T]` of the nearest normalised entries."""
        latents = F.normalize(self.in_proj(residual), dim=1)
        codebook = F.normalize(self.codebook.weight, dim=1)
        return torch.matmul(latents.transpose(1, 2), codebook.t()).argmax(dim=-1)

    def dequantize(self, codes: Tensor) -> Tensor:
        """Codes `LongTensor[B x T]` -> `Tensor[B x latent_dim x T]` (the unnormalised entries, projected)."""
        return self.out_proj(self.codebook(codes).transpose(1, 2))


class ResidualVectorQuantizer(nn.Module):
    """`n_codebooks` quantizers, each coding what the previous ones left of the latent."""

    def __init__(self, arch: DacArchitecture) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(VectorQuantizer(arch) for _ in range(arch.n_codebooks))

    def encode(self, latent: Tensor) -> Tensor:
        """`Tensor[B x latent_dim x T]` -> codes `LongTensor[B x n_codebooks x T]`."""
        codes = []
        residual = latent
        for quantizer in self.quantizers:
            code = quantizer.quantize(residual)
            residual = residual - quantizer.dequantize(code)
            codes.append(code)
        return torch.stack(codes, dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes `LongTensor[B x n_codebooks x T]` -> latent `Tensor[B x latent_dim x T]`."""
        return sum(quantizer.dequantize(codes[:, i]) for i, quantizer in enumerate(self.quantizers))


class DacCodec(nn.Module):
    """Encoder, residual vector quantizer and decoder of one DAC (names in the module docstring)."""

    def __init__(self, arch: DacArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.quantizer = ResidualVectorQuantizer(arch)
        self.decoder = Decoder(arch)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes `LongTensor[B x n_codebooks x T]` -> waveform `Tensor[B x T*hop]`, the whole item at once
        (what `DacModel.decode` does; the exported decoder streams it, `DacDecodeGraph`)."""
        return self.decoder(self.quantizer.decode(codes)).squeeze(1)


class DacDecodeGraph(nn.Module):
    """Graph contract of `dac_decoder`: one block of an item's codes -> waveform, streamed.

    The decoder's convolutions are non-causal (each k7 conv sees 3 * dilation samples either side), so
    a block's output lags its codes by `delay` samples: the graph returns the audio at samples
    `first_frame * hop - delay` onwards. Every convolution keeps the last inputs it saw as a context
    (`past_context_*` in, `present_context_*` out; zeros before the item's first block), so no frame
    is decoded twice. Each convolution's input is zero outside the item (positions before 0, or from
    frame `end_frame` on: a block inside the item gives its own end), which is what the full-length
    decoder's zero padding sees: blocks of padding codes after the item's end bring out its last
    `delay` samples. Run that way, block by block, the result is the full-length decoder's.
    """

    def __init__(self, codec: DacCodec) -> None:
        super().__init__()
        if any(rate % 2 for rate in codec.arch.decoder_rates):
            raise ValueError(f"a streamed DAC decoder needs even rates, got {codec.arch.decoder_rates}")
        self.codec = codec
        self.inputs, self.delay = _plan(codec.decoder)
        self.contexts = [(site.channels, site.samples) for site in self.inputs]  # `[C, K]` of each

    def forward(self, codes: Tensor, first_frame: Tensor, end_frame: Tensor, *past: Tensor) -> tuple:
        """Codes `LongTensor[B x n_codebooks x T]`, `first_frame` and `end_frame` `LongTensor[B]`, the
        contexts `Tensor[B x C x K]` -> waveform `Tensor[B x T*hop]` (samples `first_frame * hop - delay`
        on) and the next contexts."""
        decoder = self.codec.decoder
        stream = _Stream(first_frame, end_frame, zip(self.inputs, past, strict=True))
        x = stream.conv(decoder.conv1, self.codec.quantizer.decode(codes))
        for block in decoder.block:
            x = stream.conv_transpose(block.snake1, block.conv_t1, x)
            for unit in (block.res_unit1, block.res_unit2, block.res_unit3):
                x = stream.residual(unit, x)
        wave = torch.tanh(stream.conv(decoder.conv2, x, decoder.snake1))
        return (wave.squeeze(1), *stream.present)


@dataclass(frozen=True)
class _ConvInput:
    """The input of one of the decoder's convolutions, as a stream: the `samples` of its last inputs
    it keeps (its context) of `channels`, at `rate` samples per frame, lagging the codes by `delay`."""

    channels: int
    samples: int
    rate: int
    delay: int


def _reach(conv: nn.Conv1d) -> int:
    """Input samples a conv's output sample sees besides its own: (kernel - 1) * dilation."""
    return (conv.kernel_size[0] - 1) * conv.dilation[0]


def _plan(decoder: Decoder) -> tuple[list[_ConvInput], int]:
    """Each convolution's input in the order the decoder runs them, and the delay of its output.

    A k-tap conv's output lags its input by half its reach; a transposed conv of stride s multiplies
    the lag by s and adds its padding (its first output sample needs the input sample before).
    """
    inputs = [_ConvInput(decoder.conv1.in_channels, _reach(decoder.conv1), 1, 0)]
    rate, delay = 1, _reach(decoder.conv1) // 2
    for block in decoder.block:
        inputs.append(_ConvInput(block.conv_t1.in_channels, 1, rate, delay))
        rate, delay = (
            rate * block.conv_t1.stride[0],
            delay * block.conv_t1.stride[0] + block.conv_t1.padding[0],
        )
        for unit in (block.res_unit1, block.res_unit2, block.res_unit3):
            inputs.append(_ConvInput(unit.conv1.in_channels, _reach(unit.conv1), rate, delay))
            delay += _reach(unit.conv1) // 2
    inputs.append(_ConvInput(decoder.conv2.in_channels, _reach(decoder.conv2), rate, delay))
    return inputs, delay + _reach(decoder.conv2) // 2


class _Stream:
    """The decoder's layers run on one block, each convolution after its context."""

    def __init__(
        self, first_frame: Tensor, end_frame: Tensor, inputs: Iterator[tuple[_ConvInput, Tensor]]
    ) -> None:
        self.first_frame, self.end_frame, self.inputs = first_frame, end_frame, inputs
        self.present: list[Tensor] = []

    def _with_context(self, x: Tensor) -> Tensor:
        """`x` zeroed outside the item, after the context it continues; that tail becomes the next."""
        site, past = next(self.inputs)
        position = self.first_frame[:, None] * site.rate - site.delay + torch.arange(x.shape[-1])[None]
        inside = (position >= 0) & (position < self.end_frame[:, None] * site.rate)
        x = torch.cat([past, x * inside[:, None].to(x.dtype)], dim=-1)  # a Mul runs 4x faster than a Where
        self.present.append(x[..., x.shape[-1] - site.samples :])
        return x

    def conv(self, conv: nn.Conv1d, x: Tensor, snake: Snake1d | None = None) -> Tensor:
        x = self._with_context(x)
        x = snake(x) if snake is not None else x
        return F.conv1d(x, conv.weight, conv.bias, dilation=conv.dilation)

    def conv_transpose(self, snake: Snake1d, conv: nn.ConvTranspose1d, x: Tensor) -> Tensor:
        stride = conv.stride[0]
        y = F.conv_transpose1d(snake(self._with_context(x)), conv.weight, conv.bias, stride=stride)
        return y[..., stride:-stride]  # the samples both input samples reach: the previous and this one

    def residual(self, unit: ResidualUnit, x: Tensor) -> Tensor:
        x = self._with_context(x)
        half = _reach(unit.conv1) // 2
        conv1 = F.conv1d(unit.snake1(x), unit.conv1.weight, unit.conv1.bias, dilation=unit.conv1.dilation)
        return x[..., half : x.shape[-1] - half] + unit.conv2(unit.snake2(conv1))


class DacEncodeGraph(nn.Module):
    """Graph contract of `dac_encoder`: waveform -> codes."""

    def __init__(self, codec: DacCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, waveform: Tensor) -> Tensor:
        """Waveform `Tensor[B x N]`, N a multiple of hop -> codes `LongTensor[B x n_codebooks x N/hop]`."""
        return self.codec.quantizer.encode(self.codec.encoder(waveform.unsqueeze(1)))
