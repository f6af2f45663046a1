"""DifFace's SwinIR restorer R, re-implemented in plain PyTorch with upstream's state-dict layout.

Upstream: github.com/zsyOAOA/DifFace `models/swinir.py` (SwinIR by Liang et al., arXiv 2108.10257),
as configured by DifFace's `restorer_swinir` (pixel-unshuffle ×8 in, `nearest+conv` ×8 out, so the
output has the input's size). Parameter and buffer names match upstream exactly — including the
`relative_position_index` and shifted-window `attn_mask` buffers upstream saves — so the released
`swinir_restoration512_L1.pth` loads strictly. Only the options that restorer uses are built
(`unshuffle=True`, `upsampler="nearest+conv"`, `resi_connection="1conv"`, `patch_size=1`, patch
norm on, no absolute position embedding); anything else is rejected rather than silently
mis-built. Dropout / stochastic depth are left out: they are identities at inference.

Attention runs through `F.scaled_dot_product_attention` with the relative-position bias (plus the
shift mask) as an additive `attn_mask`, which is numerically the same as upstream's explicit
softmax and lets CUDA pick a fused kernel.

Images are in [0, 1] (upstream subtracts the DIV2K RGB mean internally).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Upstream's RGB mean (DIV2K), subtracted before and added back after the network.
_RGB_MEAN = (0.4488, 0.4371, 0.4040)
# Keys that may wrap the weights in training checkpoints (BasicSR / DifFace / Lightning styles).
_CHECKPOINT_WRAPPERS = ("params_ema", "params", "state_dict")


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C) -> (B·nW, ws·ws, C), windows in row-major order per image (upstream order)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: (B·nW, ws·ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window_size: int) -> Tensor:
    """Index into the (2ws−1)² bias table for every (query, key) pair of a window, as upstream."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return rel[:, :, 0] * (2 * window_size - 1) + rel[:, :, 1]


def shifted_window_mask(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> Tensor:
    """Additive mask (nW, ws², ws²) keeping attention inside the regions a cyclic shift glued together.

    −100 (not −inf) between tokens from different regions, exactly as upstream, so results match.
    """
    img_mask = torch.zeros((1, h, w, 1), device=device)
    cuts = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    for region, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
        img_mask[:, hs, ws, :] = region
    mask_windows = window_partition(img_mask, window_size).squeeze(-1)
    diff = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 → GELU → fc2 (upstream names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws×ws windows with a learned relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent because upstream saves it: strict loading of the release needs the key.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B·nW, N, C); mask: (nW, N, N) additive, or None for unshifted windows."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # (1, nH, N, N)
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).repeat(bw // nw, 1, 1, 1)  # (B·nW, nH, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention + MLP, pre-norm residual; odd blocks shift by ws/2."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if min(input_resolution) <= window_size:
            # Upstream: a feature map no larger than one window is attended whole, unshifted.
            shift_size, window_size = 0, min(input_resolution)
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Upstream precomputes (and saves) the mask for the nominal resolution; other sizes compute it.
        mask = shifted_window_mask(*input_resolution, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer("attn_mask", mask)

    def _mask_for(self, h: int, w: int, like: Tensor) -> Tensor | None:
        if self.shift_size == 0:
            return None
        if (h, w) == self.input_resolution:
            return self.attn_mask
        return shifted_window_mask(h, w, self.window_size, self.shift_size, device=like.device)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        h, w = x_size
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        attn = self.attn(window_partition(x, self.window_size), mask=self._mask_for(h, w, x))
        x = window_reverse(attn, self.window_size, h, w)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + x.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    """A stack of Swin blocks alternating unshifted / shifted windows (upstream container name)."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                0 if i % 2 == 0 else window_size // 2,
                mlp_ratio,
                qkv_bias,
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        for blk in self.blocks:
            x = blk(x, x_size)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin layer → 3×3 conv on the feature map, plus the input."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.residual_group = BasicLayer(
            dim, input_resolution, depth, num_heads, window_size, mlp_ratio, qkv_bias
        )
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        y = self.residual_group(x, x_size)
        b, _, c = y.shape
        y = self.conv(y.transpose(1, 2).reshape(b, c, *x_size))
        return y.flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Feature map (B, C, H, W) → tokens (B, HW, C), then LayerNorm (upstream's patch_norm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


class SwinIR(nn.Module):
    """DifFace's SwinIR restorer; `forward` maps a degraded face in [0,1] to the restored face in [0,1].

    Constructed from upstream's config keys (e.g. `restorer_swinir` of DifFace's sampling config).
    `out_chans` (not an upstream key) lets other heads reuse the backbone — e.g. DBLM predicts
    K×3 estimates + K log-variances — through `reconstruct`, which returns the raw head output;
    `forward` itself requires `out_chans == in_chans`.
    """

    def __init__(
        self,
        *,
        img_size: int = 64,
        patch_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 180,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        sf: int = 8,
        img_range: float = 1.0,
        upsampler: str = "nearest+conv",
        resi_connection: str = "1conv",
        unshuffle: bool = True,
        unshuffle_scale: int | None = 8,
        out_chans: int | None = None,
    ) -> None:
        super().__init__()
        unsupported = {
            "patch_size": (patch_size, 1),
            "upsampler": (upsampler, "nearest+conv"),
            "resi_connection": (resi_connection, "1conv"),
            "unshuffle": (unshuffle, True),
            "unshuffle_scale": (unshuffle_scale, sf),
            "in_chans": (in_chans, 3),
        }
        for name, (got, want) in unsupported.items():
            if got != want:
                raise ValueError(
                    f"SwinIR: only DifFace's restorer layout is built; need {name}={want!r}, got {got!r}"
                )
        if sf not in (2, 4, 8):
            raise ValueError(f"SwinIR: nearest+conv upsampling supports sf in (2, 4, 8), got {sf}")
        num_feat = 64  # upstream's fixed width of the reconstruction head
        self.img_range = img_range
        self.sf = sf
        self.window_size = window_size
        self.in_chans = in_chans
        self.out_chans = out_chans or in_chans

        # 1. Shallow features at 1/sf resolution.
        self.conv_first = nn.Sequential(
            nn.PixelUnshuffle(sf), nn.Conv2d(in_chans * sf * sf, embed_dim, 3, 1, 1)
        )
        # 2. Deep features: RSTBs at the feature resolution `img_size` (where the saved masks apply).
        self.patch_embed = PatchEmbed(embed_dim)
        resolution = (img_size // patch_size, img_size // patch_size)
        self.layers = nn.ModuleList(
            RSTB(embed_dim, resolution, depth, heads, window_size, mlp_ratio, qkv_bias)
            for depth, heads in zip(depths, num_heads, strict=True)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        # 3. Reconstruction: nearest ×2 + conv, log2(sf) times (keys conv_up1..conv_up3 as upstream).
        self.conv_before_upsample = nn.Sequential(
            nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
        )
        self.num_up = int(math.log2(sf))
        for i in range(1, self.num_up + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, self.out_chans, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Upstream's init (matters only for training from scratch, e.g. a DBLM head)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @staticmethod
    def rgb_mean(like: Tensor) -> Tensor:
        """Upstream's mean as (1, 3, 1, 1) in like's dtype/device — a constant, not a buffer, so a model
        materialised from the meta device by loading a checkpoint has nothing left uninitialised."""
        return torch.tensor(_RGB_MEAN, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)

    @property
    def size_multiple(self) -> int:
        """Input sides are padded to this multiple: ×sf unshuffle then whole ws windows (64 for DifFace)."""
        return self.sf * self.window_size

    def forward_features(self, x: Tensor) -> Tensor:
        """Transformer body on shallow features (B, C, h, w) -> (B, C, h, w)."""
        x_size = (x.shape[2], x.shape[3])
        t = self.patch_embed(x)
        for layer in self.layers:
            t = layer(t, x_size)
        t = self.norm(t)
        return t.transpose(1, 2).reshape(x.shape)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw head output (B, out_chans, H, W) for x in [0,1], still mean-subtracted and ×img_range.

        Sides that are not multiples of `size_multiple` are reflect-padded and cropped back; on
        multiples of 64 (all sizes upstream accepts) this is upstream's computation exactly.
        """
        h, w = x.shape[-2:]
        m = self.size_multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        x = (x - self.rgb_mean(x)) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_before_upsample(x)
        for i in range(1, self.num_up + 1):
            conv_up = getattr(self, f"conv_up{i}")
            x = self.lrelu(conv_up(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = self.conv_last(self.lrelu(self.conv_hr(x)))
        return x[:, :, :h, :w]

    def forward(self, x: Tensor) -> Tensor:
        """Restore x (B, 3, H, W) in [0,1]; output same size, nominally [0,1] (not clamped, as upstream)."""
        if self.out_chans != self.in_chans:
            raise RuntimeError(
                "SwinIR.forward needs out_chans == in_chans; use reconstruct() for other heads"
            )
        return self.reconstruct(x) / self.img_range + self.rgb_mean(x)


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """Peel `params_ema` / `params` / `state_dict` wrappers (EMA first) and `module.` prefixes."""
    for key in _CHECKPOINT_WRAPPERS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_state_dict_file(path: str | Path) -> Mapping[str, Any]:
    """Read a `.safetensors` or torch pickle checkpoint onto the CPU (pickles with weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def swinir_from_checkpoint(
    path_or_state_dict: str | Path | Mapping[str, Any], config: Mapping[str, Any]
) -> SwinIR:
    """Build SwinIR from `config` and load every key strictly; returns the model in eval mode.

    Raises KeyError naming every missing / unexpected key, and ValueError on shape mismatches, so a
    wrong or truncated checkpoint fails loudly instead of restoring with random layers.
    """
    raw = (
        path_or_state_dict
        if isinstance(path_or_state_dict, Mapping)
        else load_state_dict_file(path_or_state_dict)
    )
    state = unwrap_state_dict(raw)
    model = SwinIR(**config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"SwinIR checkpoint does not match config: missing keys {missing}, unexpected keys {unexpected}"
        )
    bad = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"SwinIR checkpoint shape mismatch (checkpoint vs model): {bad}")
    model.load_state_dict(state, strict=True)
    return model.eval()
