"""`dynface eval --pred DIR --gt DIR [--csv OUT]`: restoration metrics over two folders of aligned faces.

Columns (in this order; method.md quotes only PSNR and FID of the paper's CelebA-Test figure, so the set
and order are the usual blind-face-restoration table's, our choice): PSNR↑ SSIM↑ LPIPS↓ IDS↑ FID↓ NIQE↓
MUSIQ↑, each the mean over images except FID (one value for the folder, against the ground truth folder).

- PSNR (the formula, float64) and SSIM (torchmetrics, its default 11×11 Gaussian window, σ 1.5) on RGB
  in [0, 1] (data range 1), per image. Identical images give PSNR = inf (reported as inf, never a crash
  or a clamp) and SSIM = 1.
- LPIPS (AlexNet), FID (Inception), IDS (ArcFace cosine similarity, facexlib's IR-SE50), NIQE and MUSIQ
  (pyiqa) need pretrained weights or packages that are not always present. LPIPS, FID and IDS load only
  files already in place (never a download); pyiqa fetches the NIQE/MUSIQ weights itself on first use
  where the network is reachable. A metric whose package or weights are absent (for pyiqa: not
  fetchable) is reported *unavailable* with the reason (what to install or where to put which file),
  never silently skipped, failed on or estimated.

Pairs are matched by path relative to each folder, without the suffix (x.png ↔ x.jpg); two files of one
name in one folder (x.png and x.jpg) are an error. Images are decoded as restoration decodes uploads
(`models.images.decode_image`: EXIF orientation applied, 16-bit samples scaled to 8 bits).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from models import images, weights
from models.cli import output_file_problem, write_atomically

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
#: (name, higher is better)
COLUMNS: tuple[tuple[str, bool], ...] = (
    ("PSNR", True),
    ("SSIM", True),
    ("LPIPS", False),
    ("IDS", True),
    ("FID", False),
    ("NIQE", False),
    ("MUSIQ", True),
)
ARCFACE_FILE = "recognition_arcface_ir_se50.pth"  # facexlib's release asset name
#: Pixels an evaluated image may have: the metrics' own limit, not the API's upload limit (Pillow's
#: decompression-bomb error at 2 × MAX_IMAGE_PIXELS still applies on top).
EVAL_MAX_PIXELS = 2**31 - 1


class Unavailable(Exception):
    """A metric cannot be computed here; the message says why and what would make it available."""


def device_problem(device: str | None) -> str | None:
    """What is wrong with a `--device` value (None if nothing; unset picks CUDA only where it is there),
    so a command refuses it before reading any image or loading any model, not with torch's traceback
    on its first tensor."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        return f"--device {device!r} is not a device (cpu, cuda, cuda:N): {e}"
    if dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available here (no GPU, or torch without CUDA); use cpu"
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        return f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
    return None


@dataclass
class EvalReport:
    pred: Path
    gt: Path
    images: int
    values: dict[str, float] = field(default_factory=dict)  # metric → mean (or folder value)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric → reason

    def table(self) -> str:
        """The paper-style one-row table: header with ↑/↓, values, then the reasons for any n/a."""
        heads = [f"{name}{'↑' if up else '↓'}" for name, up in COLUMNS]
        cells = [_fmt(name, self.values.get(name)) for name, _ in COLUMNS]
        widths = [max(len(h), len(c)) for h, c in zip(heads, cells, strict=True)]
        lines = [
            f"{self.images} image pair(s): pred {self.pred}  gt {self.gt}",
            "| " + " | ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)) + " |",
            "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
            "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |",
        ]
        lines += [f"n/a {name}: {why}" for name, why in self.unavailable.items()]
        return "\n".join(lines)

    def write_csv(self, path: Path) -> None:
        """One row in the table's column order; unavailable cells empty, their reasons in `unavailable`.
        Written whole or not at all (`write_atomically`)."""
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(["pred", "gt", "images", *(n for n, _ in COLUMNS), "unavailable"])
        values = [_csv_value(self.values.get(n)) for n, _ in COLUMNS]
        reasons = "; ".join(f"{n}: {why}" for n, why in self.unavailable.items())
        w.writerow([self.pred, self.gt, self.images, *values, reasons])
        write_atomically(path, text.getvalue().encode("utf-8"))


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if name in ("SSIM", "LPIPS", "IDS") else f"{value:.2f}"


def _csv_value(value: float | None) -> str:
    return "" if value is None else repr(value)  # repr: "inf" for inf, full precision otherwise


# ----------------------------------------------------------------------------------------------- pairs
def matched_pairs(pred: Path, gt: Path) -> list[tuple[Path, Path]]:
    """(pred file, gt file) by relative path without suffix; any unmatched file on either side, or two files
    differing only in their suffix, is an error."""

    def index(root: Path) -> dict[Path, Path]:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        by_key: dict[Path, Path] = {}
        for path in files:
            key = path.relative_to(root).with_suffix("")
            if key in by_key:  # x.jpg and x.png: which one to pair would be a silent guess
                raise ValueError(f"{by_key[key]} and {path} are the same image name with two suffixes")
            by_key[key] = path
        return by_key

    p, g = index(pred), index(gt)
    if not g:
        raise ValueError(f"no images under {gt}")
    only_gt, only_pred = sorted(set(g) - set(p)), sorted(set(p) - set(g))
    if only_gt or only_pred:
        raise ValueError(
            f"folders do not match: {len(only_gt)} gt image(s) without a prediction "
            f"{[str(k) for k in only_gt[:5]]}, {len(only_pred)} prediction(s) without gt "
            f"{[str(k) for k in only_pred[:5]]}"
        )
    return [(p[k], g[k]) for k in sorted(g)]


def load_image(path: Path) -> Tensor:
    """(1, 3, H, W) float64 in [0, 1], decoded as restoration decodes uploads (`images.load_rgb`):
    upright by EXIF, 16-bit samples scaled (not clipped), colours in sRGB, alpha dropped."""
    rgb = images.load_rgb(path, max_pixels=EVAL_MAX_PIXELS)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].to(torch.float64) / 255.0


# --------------------------------------------------------------------------------------------- metrics
def psnr(pred: Tensor, gt: Tensor) -> float:
    """PSNR in dB of [0, 1] images, in float64 (inf when identical: MSE 0 is not clamped)."""
    mse = float(torch.mean((pred.double() - gt.double()) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(pred: Tensor, gt: Tensor) -> float:
    """torchmetrics' SSIM (11×11 Gaussian window, σ 1.5), in float32: its float64 convolutions are ~30×
    slower on CPU for no visible digit. SSIM(x, x) = 1 exactly by definition, so equal images skip it."""
    if torch.equal(pred, gt):
        return 1.0
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(pred.float(), gt.float(), data_range=1.0))


def torch_hub_checkpoint(url: str) -> Path:
    """Where torch.hub (torchvision, torch-fidelity) keeps the checkpoint downloaded from `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


PairMetric = Callable[[Tensor, Tensor], float]


def lpips_metric(device: torch.device) -> PairMetric:
    """LPIPS-Alex through torchmetrics (its linear layers ship with it; AlexNet's come from torchvision)."""
    from torchvision.models import AlexNet_Weights

    backbone = torch_hub_checkpoint(AlexNet_Weights.DEFAULT.url)
    if not backbone.is_file():
        raise Unavailable(
            f"AlexNet ImageNet weights not found at {backbone} (torchvision fetches them; no download here)"
        )
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    net = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device).eval()

    def lpips(pred: Tensor, gt: Tensor) -> float:
        with torch.no_grad():
            return float(net(pred.float().to(device), gt.float().to(device)))

    return lpips


def identity_metric(device: torch.device, weights_dir: Path) -> PairMetric:
    """IDS: cosine similarity of ArcFace (facexlib IR-SE50) embeddings of the two aligned faces."""
    path = weights_dir / ARCFACE_FILE
    if not path.is_file():
        raise Unavailable(
            f"ArcFace weights {ARCFACE_FILE} not found in {weights_dir} (facexlib release v0.1.0)"
        )
    from facexlib.recognition.arcface_arch import Backbone

    net = Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    net = net.to(device).eval()

    def embed(x: Tensor) -> Tensor:
        # ArcFace takes 112×112 RGB in [-1, 1]; the aligned 512 crop is resized whole.
        x = F.interpolate(x.float().to(device), size=(112, 112), mode="area")
        return F.normalize(net(x * 2 - 1), dim=1)

    def ids(pred: Tensor, gt: Tensor) -> float:
        with torch.no_grad():
            return float((embed(pred) * embed(gt)).sum())

    return ids


def pyiqa_metric(name: str, device: torch.device) -> Callable[[Tensor], float]:
    """A no-reference pyiqa metric (niqe, musiq) on one [0, 1] image."""
    try:
        import pyiqa
    except ImportError as e:
        raise Unavailable("pyiqa is not installed (pip install pyiqa==0.1.16)") from e
    try:
        net = pyiqa.create_metric(name, device=device)
    except Exception as e:  # pyiqa fetches weights on first use: offline it fails in many ways
        raise Unavailable(f"pyiqa could not load {name} (its weights are fetched on first use): {e}") from e

    def score(img: Tensor) -> float:
        with torch.no_grad():
            return float(net(img.float().to(device)))

    return score


def inception_weights() -> Path:
    """The FID Inception file (the TF-ported network FID is defined with) that torch-fidelity, and so
    torchmetrics' FID, loads: its release asset `URL_INCEPTION_V3` as cached by torch.hub
    (weights-inception-2015-12-05-6726825d.pth; pytorch-fid's pt_inception-… file is another one)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError as e:
        raise Unavailable("torch-fidelity is not installed (pip install torch-fidelity==0.4.0)") from e
    path = torch_hub_checkpoint(URL_INCEPTION_V3)
    if not path.is_file():
        raise Unavailable(
            f"Inception weights not found at {path} (from {URL_INCEPTION_V3}; no download here)"
        )
    return path


def fid(pairs: Sequence[tuple[Path, Path]], device: torch.device) -> float:
    """FID of the predictions against the ground-truth folder (torchmetrics, torch-fidelity's Inception)."""
    if len(pairs) < 2:  # torchmetrics raises: a covariance needs two samples
        raise Unavailable(f"FID needs at least 2 image pairs, got {len(pairs)}")
    inception = inception_weights()
    from torchmetrics.image.fid import FrechetInceptionDistance

    # The checked file by path: torch-fidelity then never calls load_state_dict_from_url (no download).
    metric = FrechetInceptionDistance(
        feature=2048, normalize=True, feature_extractor_weights_path=str(inception)
    ).to(device)
    # disable=None: a bar on a terminal only, not in logs.
    for pred, gt in tqdm(pairs, desc="FID", unit="pair", disable=None):
        metric.update(load_image(gt).float().to(device), real=True)
        metric.update(load_image(pred).float().to(device), real=False)
    return float(metric.compute())


def evaluate(
    pred: Path,
    gt: Path,
    *,
    device: str | torch.device | None = None,
    weights_dir: Path | None = None,
) -> EvalReport:
    """Every column of `COLUMNS` over matched pairs; unavailable ones carry their reason."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pairs = matched_pairs(pred, gt)
    report = EvalReport(pred, gt, len(pairs))
    wdir = weights.resolve_dir(weights_dir)

    paired: dict[str, PairMetric] = {"PSNR": psnr, "SSIM": ssim}
    loaders: dict[str, Callable[[], PairMetric]] = {
        "LPIPS": lambda: lpips_metric(dev),
        "IDS": lambda: identity_metric(dev, wdir),
    }
    for name, load in loaders.items():
        try:
            paired[name] = load()
        except Unavailable as e:
            report.unavailable[name] = str(e)
    single: dict[str, Callable[[Tensor], float]] = {}
    for name in ("NIQE", "MUSIQ"):
        try:
            single[name] = pyiqa_metric(name.lower(), dev)
        except Unavailable as e:
            report.unavailable[name] = str(e)

    sums = dict.fromkeys([*paired, *single], 0.0)
    for p_file, g_file in tqdm(pairs, desc="metrics", unit="pair", disable=None):
        p_img, g_img = load_image(p_file), load_image(g_file)
        if p_img.shape != g_img.shape:
            raise ValueError(f"{p_file} is {tuple(p_img.shape[-2:])}, {g_file} is {tuple(g_img.shape[-2:])}")
        for name, metric in paired.items():
            sums[name] += metric(p_img, g_img)
        for name, score in single.items():
            sums[name] += score(p_img)
    report.values = {name: total / len(pairs) for name, total in sums.items()}
    try:
        report.values["FID"] = fid(pairs, dev)
    except Unavailable as e:
        report.unavailable["FID"] = str(e)
    return report


# ------------------------------------------------------------------------------------------------- CLI
def cli_eval(args: argparse.Namespace) -> int:
    # Before any image is read: an unwritable --csv failed only after the whole evaluation.
    problem = device_problem(args.device) or (
        output_file_problem("--csv", args.csv, "metrics.csv") if args.csv is not None else None
    )
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        report = evaluate(args.pred, args.gt, device=args.device, weights_dir=args.weights_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.csv is not None:
        try:
            report.write_csv(args.csv)
        except OSError as e:  # checked above, but a disk can fill up meanwhile: the table is printed
            print(f"error: could not write {args.csv}: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.csv}")
    return 0
