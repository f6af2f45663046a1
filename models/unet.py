"""DifFace's iDDPM UNet (guided-diffusion ``UNetModel`` as used by github.com/zsyOAOA/DifFace).

Stock ``diffusers.UNet2DModel`` cannot express the released FFHQ-512 prior (per-level residual-block
counts, attention chosen by spatial size, legacy head-interleaved qkv), so the network is rebuilt here
from small modules whose parameter names are exactly upstream's (``time_embed.0``,
``input_blocks.N.0.in_layers.0``, ``...qkv``, ``middle_block``, ``output_blocks``, ``out.2`` ...).
The upstream checkpoint therefore loads strictly without any renaming, and the config keys are
upstream's hyper-parameter names, so ``IDDPMUNet(**config_512["unet"])`` builds the real prior.

Numerics follow upstream: GroupNorm computes in float32 (safe in fp16/bf16), the sinusoidal timestep
embedding takes unscaled timesteps 0..999, and attention is softmax(q·k/sqrt(d))·v per head, computed
with ``scaled_dot_product_attention``. Half precision is upstream's too (``IDDPMUNet.to_precision``):
only the convolutions of the blocks run in fp16/bf16; the timestep MLP, the blocks' embedding
projections, the norms and the output head stay float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Self

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) evaluated in float32, as upstream does, so half precision cannot overflow.

    The affine parameters are upcast too: ``to_precision`` keeps them float32, but a plain ``.to(dtype)``
    casts them with the rest of the model.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Upstream's sinusoidal embedding: [cos(t·f), sin(t·f)], f_i = max_period^(-i/half), float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """Marker for modules whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest ×2, then an optional 3×3 conv (parameter name ``conv``)."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """Stride-2 3×3 conv or 2×2 average pool (parameter name ``op``)."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op: nn.Module = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Upstream ResBlock; ``use_scale_shift_norm`` applies norm(h)·(1+scale)+shift from the embedding."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with upstream's 1-D conv ``qkv``/``proj_out`` parameters.

    Legacy order (``use_new_attention_order=False``, the released prior): the 3C qkv channels are
    laid out per head as [q, k, v] blocks of ``C // heads`` channels. New order: [q | k | v], each
    split into heads.
    """

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, new_order: bool) -> None:
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels not divisible by num_head_channels {num_head_channels}"
                )
            num_heads = channels // num_head_channels
        self.num_heads = num_heads
        self.new_order = new_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length, heads, ch = qkv.shape[-1], self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = (t.reshape(b, heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b, heads, 3 * ch, length).split(ch, dim=2)
        # (b, heads, length, ch) for SDPA; its default scale 1/sqrt(ch) equals upstream's.
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = self.proj_out(a.transpose(-1, -2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


class IDDPMUNet(ModelMixin, ConfigMixin):
    """DifFace's iDDPM UNet; ``forward(x, timesteps) -> (N, out_channels, H, W)``.

    Config keys are upstream ``UNetModel``'s: ``num_res_blocks`` is an int or a per-level list,
    ``attention_resolutions`` are spatial sizes (attention where the feature map is that many px).
    ``dims`` must be 2 and class conditioning is not supported. ``use_fp16`` is accepted so an upstream
    config loads unchanged, but precision is chosen with ``to_precision(dtype)`` instead.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if dims != 2:
            raise ValueError(f"only dims=2 is supported, got {dims}")
        levels = len(channel_mult)
        blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(blocks) != levels:
            raise ValueError(f"num_res_blocks {blocks} must have one entry per level of {channel_mult}")
        attention_at = set(attention_resolutions)
        emb_dim = model_channels * 4

        def resblock(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, **updown)

        def attention(ch_: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch_, heads, num_head_channels, use_new_attention_order)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(blocks[level]):
                layers: list[nn.Module] = [resblock(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_at:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds //= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch), attention(ch, num_heads), resblock(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(blocks[level] + 1):
                layers = [resblock(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_at:
                    # Upstream builds decoder attention without num_heads (so 1 head when
                    # num_head_channels == -1); reproduced for checkpoint equivalence.
                    layers.append(attention(ch, 1))
                if level and i == blocks[level]:
                    layers.append(
                        resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample)
                    )
                    ds *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def to(self, *args: Any, **kwargs: Any) -> Self:
        """``nn.Module.to``: a dtype given here casts every parameter (for upstream's half-precision mode
        use ``to_precision``). diffusers' ``ModelMixin.to`` (0.42) logs "modules that should be kept in
        float32 ... can lead to inconsistent results" on every dtype cast, even to fp32 and with no such
        module (its empty list is never None); this model declares none (``to_precision`` chooses its
        float32 parts), and a worker should not log a false alarm at every start."""
        return nn.Module.to(self, *args, **kwargs)

    def to_precision(self, dtype: torch.dtype) -> Self:
        """Upstream's precision rule, in place: guided-diffusion's ``convert_to_fp16`` (DifFace's
        ``use_fp16``) turns only the ``nn.Conv1d``/``nn.Conv2d`` layers of ``input_blocks``,
        ``middle_block`` and ``output_blocks`` to half (attention's ``qkv``/``proj_out`` are Conv1d, so
        they are half too); the timestep MLP ``time_embed``, the ResBlocks' ``emb_layers`` (Linear),
        the GroupNorms and the ``out`` head stay float32, so the embedding and eps are not rounded to
        half. ``dtype`` float16 or bfloat16 (the same rule; upstream has fp16 only) or float32 (all
        float32, undoing it).
        """
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"precision must be float32, float16 or bfloat16, got {dtype}")
        nn.Module.to(self, torch.float32)
        for torso in (self.input_blocks, self.middle_block, self.output_blocks):
            for module in torso.modules():
                if isinstance(module, nn.Conv1d | nn.Conv2d):
                    module.to(dtype)
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """Predict (eps ‖ variance values) for ``x`` at unscaled ``timesteps`` (N,) or a scalar.

        As upstream's forward: the embedding in ``time_embed``'s dtype, the blocks in their convolutions'
        (``h = x.type(self.dtype)`` upstream), the ``out`` head in its own (``h.type(x.dtype)`` upstream,
        float32 after ``to_precision``); the result is returned in ``x``'s dtype.
        """
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        sinusoid = timestep_embedding(t, self.config.model_channels)
        emb = self.time_embed(sinusoid.to(self.time_embed[0].weight.dtype))
        h = x.to(self.input_blocks[0][0].weight.dtype)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(self.out[-1].weight.dtype)).to(x.dtype)
