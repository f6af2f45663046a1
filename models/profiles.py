"""Pipeline profiles as data: which networks, at what size, with which method knobs.

`real` is DifFace's released FFHQ-512 prior and SwinIR restorer (weights from `models.weights`).
`tiny` has the same architectures at toy size with random weights generated locally from a fixed
seed: it exercises every line of the pipeline quickly on a CPU but restores nothing, and everything
that reports on it says `real: false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# DifFace's released prior (configs/sample/iddpm_ffhq512_swinir.yaml upstream).
REAL_UNET: dict[str, Any] = {
    "image_size": 512,
    "in_channels": 3,
    "model_channels": 32,
    "out_channels": 6,
    "attention_resolutions": [32, 16, 8],
    "dropout": 0.0,
    "channel_mult": [1, 2, 4, 8, 8, 16, 16],
    "num_res_blocks": [1, 2, 2, 2, 2, 3, 4],
    "conv_resample": True,
    "num_head_channels": 64,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_new_attention_order": False,
}
REAL_SWINIR: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 1,
    "in_chans": 3,
    "embed_dim": 180,
    "depths": [6] * 8,
    "num_heads": [6] * 8,
    "window_size": 8,
    "mlp_ratio": 2,
    "sf": 8,
    "img_range": 1.0,
    "upsampler": "nearest+conv",
    "resi_connection": "1conv",
    "unshuffle": True,
    "unshuffle_scale": 8,
}
# Same families at toy size (the shapes of the equivalence fixtures in ../shared/fixtures).
TINY_UNET: dict[str, Any] = {
    **REAL_UNET,
    "image_size": 64,
    "attention_resolutions": [16, 8],
    "channel_mult": [1, 1, 2, 2],
    "num_res_blocks": [1, 2, 1, 2],
    "num_head_channels": 16,
}
TINY_SWINIR: dict[str, Any] = {**REAL_SWINIR, "embed_dim": 24, "depths": [2, 2], "num_heads": [2, 2]}


@dataclass(frozen=True)
class MethodConfig:
    """DynFaceRestore knobs (docs: ../shared/method.md, "Our formulation")."""

    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0)  # blur levels in px at 512
    respacing: str = "ddim250"
    baseline_start_index: int = 100  # DifFace's fixed start (≈ t=400 of 1000)
    guidance_variance: float = 0.01  # v in ρ_i = v·ᾱ_i/(1−ᾱ_i), in [-1,1] units
    guidance_scale: float = 1.0
    dgsa_min_scale: float = 0.2  # g_min of the training-free DGSA map
    level_threshold: float = 8.0  # trained DBLM: max mean predicted std (8-bit) for a level


@dataclass(frozen=True)
class Profile:
    name: str
    real: bool
    unet: dict[str, Any]
    swinir: dict[str, Any]
    detector: str  # facexlib model name used when a request does not pick one
    # Manifest names (models.weights) the profile cannot start without.
    required_weights: tuple[str, ...] = ()
    # Manifest names it uses when present (fetched best-effort on first start): the face parsing
    # net for paste masks, the detector a request may pick instead of the default.
    optional_weights: tuple[str, ...] = ()
    method: MethodConfig = field(default_factory=MethodConfig)

    @property
    def image_size(self) -> int:
        """Working resolution of the diffusion prior; faces are aligned at 512 and resized to it."""
        return int(self.unet["image_size"])


PROFILES: dict[str, Profile] = {
    "real": Profile(
        "real",
        True,
        REAL_UNET,
        REAL_SWINIR,
        detector="retinaface_resnet50",
        required_weights=("difface_prior", "difface_swinir", "retinaface_resnet50"),
        optional_weights=("parsenet", "retinaface_mobile0.25"),
    ),
    # No file is required (its networks are generated), but photos need its small detector.
    "tiny": Profile(
        "tiny",
        False,
        TINY_UNET,
        TINY_SWINIR,
        detector="retinaface_mobile0.25",
        optional_weights=("retinaface_mobile0.25",),
    ),
}
