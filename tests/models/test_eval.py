"""`dynface eval`: PSNR/SSIM on real faces against independent references; unavailable metrics say why."""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.evaluate import (
    ARCFACE_FILE,
    COLUMNS,
    Unavailable,
    evaluate,
    fid,
    identity_metric,
    inception_weights,
    load_image,
    matched_pairs,
    torch_hub_checkpoint,
)
from tests.models.stand_in_weights import stand_in_alexnet_hub
from worker.cli import main

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
ALIGNED = SHARED / "testdata" / "aligned"
pytestmark = pytest.mark.skipif(not ALIGNED.is_dir(), reason=f"shared test data not found at {ALIGNED}")

NAMES = ("0143.png", "0240.png")


def _jpeg(path: Path, quality: int) -> np.ndarray:
    """A real degraded version of a face: its JPEG round trip (uint8 RGB)."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(buf).convert("RGB"))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """gt (two real faces, nested), an identical copy, and JPEG-q20 predictions saved as PNG."""
    gt, same, pred = tmp_path / "gt", tmp_path / "same", tmp_path / "pred"
    for root in (gt, same, pred):
        (root / "sub").mkdir(parents=True)
    for name in NAMES:
        shutil.copy(ALIGNED / name, gt / "sub" / name)
        shutil.copy(ALIGNED / name, same / "sub" / name)
        Image.fromarray(_jpeg(ALIGNED / name, 20)).save(pred / "sub" / name)
    return gt, same, pred


@pytest.fixture
def no_downloaded_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch.hub cache ($TORCH_HOME: torch.hub.get_dir reads it on every call, and nothing
    here calls torch.hub.set_dir) and no pyiqa (in no extra of pyproject.toml; hidden should a
    developer have installed it), so what is unavailable does not depend on the machine's caches.
    Returns the hub folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # `import pyiqa` raises ImportError
    hub = Path(torch.hub.get_dir())
    assert hub == tmp_path / "empty-torch-home" / "hub"
    return hub


def _expected_unavailable(hub: Path, weights_dir: Path) -> dict[str, str]:
    """The reasons `evaluate` gives with no downloaded weights: each names the missing file and where
    it was looked for."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torchvision.models import AlexNet_Weights

    alexnet = hub / "checkpoints" / AlexNet_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    inception = hub / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    no_pyiqa = "pyiqa is not installed (pip install pyiqa==0.1.16)"
    return {
        "LPIPS": f"AlexNet ImageNet weights not found at {alexnet} "
        "(torchvision fetches them; no download here)",
        "IDS": f"ArcFace weights recognition_arcface_ir_se50.pth not found in {weights_dir} "
        "(facexlib release v0.1.0)",
        "NIQE": no_pyiqa,
        "MUSIQ": no_pyiqa,
        "FID": f"Inception weights not found at {inception} (from {URL_INCEPTION_V3}; no download here)",
    }


def test_identical_folders_give_psnr_inf_and_ssim_one(
    folders: tuple[Path, Path, Path], tmp_path: Path, no_downloaded_weights: Path
) -> None:
    gt, same, _ = folders
    report = evaluate(same, gt, device="cpu", weights_dir=tmp_path)
    assert report.images == 2
    assert report.values == {"PSNR": math.inf, "SSIM": pytest.approx(1.0, abs=1e-12)}
    # Every other column is reported unavailable, with the reason naming what is missing (LPIPS: the
    # AlexNet backbone; LPIPS computed: test_lpips_is_computed_when_the_backbone_weights_are_present).
    assert report.unavailable == _expected_unavailable(no_downloaded_weights, tmp_path)
    assert "alexnet" in report.unavailable["LPIPS"].lower()
    names = [n for n, _ in COLUMNS]
    assert sorted(names) == sorted([*report.values, *report.unavailable])


def test_psnr_matches_the_formula_and_ssim_orders_degradations(folders: tuple[Path, Path, Path]) -> None:
    gt, _, pred = folders
    report = evaluate(pred, gt, device="cpu")
    expected = []
    for name in NAMES:
        a = np.asarray(Image.open(pred / "sub" / name), dtype=np.float64)
        b = np.asarray(Image.open(gt / "sub" / name), dtype=np.float64)
        expected.append(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))
    assert report.values["PSNR"] == pytest.approx(float(np.mean(expected)), abs=1e-9)
    assert 20 < report.values["PSNR"] < 45
    # A milder JPEG is closer to the ground truth in SSIM too.
    for name in NAMES:
        Image.fromarray(_jpeg(ALIGNED / name, 90)).save(pred / "sub" / name)
    milder = evaluate(pred, gt, device="cpu")
    assert report.values["SSIM"] < milder.values["SSIM"] < 1.0


def test_lpips_is_computed_when_the_backbone_weights_are_present(
    folders: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LPIPS path itself, with stand-in AlexNet weights (the ImageNet file cannot be fetched here):
    LPIPS of identical images is 0 for any backbone, and positive for different ones."""
    stand_in_alexnet_hub(tmp_path / "hub", monkeypatch)
    gt, same, pred = folders
    assert evaluate(same, gt, device="cpu").values["LPIPS"] == pytest.approx(0.0, abs=1e-6)
    assert evaluate(pred, gt, device="cpu").values["LPIPS"] > 1e-4


def test_eval_cli_prints_the_table_and_writes_csv(
    folders: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_downloaded_weights: Path,
) -> None:
    gt, same, _ = folders
    out = tmp_path / "metrics.csv"
    weights_dir = tmp_path / "weights"  # no ArcFace file: IDS unavailable too
    argv = ["eval", "--pred", str(same), "--gt", str(gt), "--csv", str(out), "--device", "cpu"]
    assert main([*argv, "--weights-dir", str(weights_dir)]) == 0
    printed = capsys.readouterr().out
    assert "PSNR↑" in printed and "SSIM↑" in printed and "LPIPS↓" in printed and "FID↓" in printed
    (row,) = list(csv.DictReader(out.open()))
    assert row["PSNR"] == "inf" and float(row["SSIM"]) == pytest.approx(1.0)
    assert row["images"] == "2"
    # Unavailable metrics: empty cells, their reasons in `unavailable` (in the report's order) and
    # printed under the table.
    reasons = _expected_unavailable(no_downloaded_weights, weights_dir)
    for name, why in reasons.items():
        assert row[name] == "", (name, row[name])
        assert f"n/a {name}: {why}" in printed.splitlines()
    assert row["unavailable"] == "; ".join(f"{name}: {why}" for name, why in reasons.items())


@pytest.mark.parametrize(
    ("csv_path", "message"),
    [
        ("{dir}", "--csv {dir} is a directory; give a file name, e.g. {dir}/metrics.csv"),
        ("{file}/m.csv", "--csv {file}/m.csv cannot be written: {file} is not a writable directory"),
    ],
)
def test_a_csv_path_that_cannot_be_written_is_refused_before_the_evaluation(
    folders: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    csv_path: str,
    message: str,
) -> None:
    """`--csv DIR` ended in IsADirectoryError's traceback after the whole evaluation."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    names = {"dir": tmp_path / "dir", "file": tmp_path / "file"}
    gt, same, _ = folders
    argv = ["eval", "--pred", str(same), "--gt", str(gt), "--device", "cpu"]
    assert main([*argv, "--csv", csv_path.format(**names)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message.format(**names)}") and "Traceback" not in captured.err
    assert captured.out == ""  # refused before any metric: no table
    assert not any((tmp_path / "dir").iterdir())


def test_an_interrupted_csv_write_leaves_the_previous_file_whole(
    folders: tuple[Path, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_downloaded_weights: Path,
) -> None:
    """The CSV was written in place: interrupted, a cut-off row was left under its name."""
    gt, same, _ = folders
    out = tmp_path / "metrics.csv"
    out.write_text("the previous row\n")

    def interrupted(self: Path, data: bytes) -> int:
        with self.open("wb") as f:
            f.write(data[:10])
        raise KeyboardInterrupt

    report = evaluate(same, gt, device="cpu", weights_dir=tmp_path)
    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.write_csv(out)
    assert out.read_text() == "the previous row\n"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["metrics.csv"]


def stand_in_arcface(weights_dir: Path) -> None:
    """facexlib's IR-SE50 with random weights at the ArcFace file's name in `weights_dir` (the release
    file cannot be fetched here): IDS then loads and runs the network as it would the real one, whose
    similarities these are not. Stored in half precision (88 MB instead of 175); loading casts back."""
    from facexlib.recognition.arcface_arch import Backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se").state_dict()
    weights_dir.mkdir(parents=True, exist_ok=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half, weights_dir / ARCFACE_FILE)


def test_ids_is_one_for_a_face_and_itself_and_less_for_another_face(tmp_path: Path) -> None:
    """The IDS path (the ArcFace file loaded strictly, faces resized to 112, cosine of the embeddings),
    on stand-in weights: a face's embedding is its own for any network, another face's is not."""
    stand_in_arcface(tmp_path)
    ids = identity_metric(torch.device("cpu"), tmp_path)
    face, other = (load_image(ALIGNED / name) for name in NAMES)
    assert ids(face, face) == pytest.approx(1.0, abs=1e-5)
    assert ids(face, other) < 0.99


def test_unmatched_folders_are_an_error(
    folders: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gt, same, _ = folders
    (same / "sub" / NAMES[0]).unlink()
    assert main(["eval", "--pred", str(same), "--gt", str(gt)]) == 2
    assert "without a prediction" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "--device cuda: CUDA is not available here"),
        ("cuda:1", "--device cuda:1: CUDA is not available here"),
        ("gpu", "--device 'gpu' is not a device (cpu, cuda, cuda:N)"),
    ],
)
def test_a_device_that_cannot_be_used_is_a_usage_error(
    folders: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    message: str,
) -> None:
    """`dynface eval --device cuda` without a GPU (or a device torch cannot parse) ended in torch's
    traceback; it is refused before any image is read or metric loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    gt, same, _ = folders
    assert main(["eval", "--pred", str(same), "--gt", str(gt), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Traceback" not in err


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    """A 16-bit grey PNG is scaled to 8 bits as the pipeline decodes uploads, not clipped to 0/255."""
    Image.fromarray(np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)).save(tmp_path / "grey16.png")
    grey = load_image(tmp_path / "grey16.png")
    assert grey.shape == (1, 3, 1, 4) and grey.dtype == torch.float64
    expected = torch.tensor([0, 4, 117, 255], dtype=torch.float64) / 255  # round(v / 257)
    for channel in range(3):
        assert torch.equal(grey[0, channel, 0], expected)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """The metrics see the picture upright, as the user does and as the pipeline decodes it."""
    stored = (np.arange(8, dtype=np.uint8).reshape(2, 4) * 30)[:, :, None].repeat(3, axis=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(stored).save(tmp_path / "rotated.png", exif=exif)
    upright = load_image(tmp_path / "rotated.png")[0].permute(1, 2, 0) * 255
    assert torch.equal(upright, torch.from_numpy(np.rot90(stored, -1).astype(np.float64)))


def test_one_name_with_two_suffixes_is_an_error(
    folders: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """x.png and x.jpg in one folder would both be "x": pairing one of them silently is a guess."""
    gt, same, _ = folders
    stem = Path(NAMES[0]).stem
    Image.open(gt / "sub" / NAMES[0]).convert("RGB").save(gt / "sub" / f"{stem}.jpg")
    with pytest.raises(ValueError, match=re.escape(f"{gt / 'sub' / stem}.jpg and {gt / 'sub' / NAMES[0]}")):
        matched_pairs(same, gt)
    assert main(["eval", "--pred", str(same), "--gt", str(gt)]) == 2
    assert "the same image name with two suffixes" in capsys.readouterr().err


def test_an_undecodable_image_is_an_error_naming_it(
    folders: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gt, same, _ = folders
    broken = same / "sub" / NAMES[0]
    broken.write_bytes(b"not an image")
    assert main(["eval", "--pred", str(same), "--gt", str(gt)]) == 2
    err = capsys.readouterr().err
    assert f"error: {broken}: " in err and "Traceback" not in err


def test_fid_of_a_single_pair_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    """FID's covariance needs two samples: one pair reports why instead of failing the whole run."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for root in (gt, pred):
        root.mkdir()
        shutil.copy(ALIGNED / NAMES[0], root / NAMES[0])
    report = evaluate(pred, gt, device="cpu", weights_dir=tmp_path)
    assert report.images == 1 and report.values["PSNR"] == math.inf
    assert report.unavailable["FID"] == "FID needs at least 2 image pairs, got 1"


#: torch-fidelity 0.4.0's `feature_extractor_inceptionv3.URL_INCEPTION_V3`, the file torchmetrics' FID loads.
TORCH_FIDELITY_INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
#: pytorch-fid's Inception file: the same network, but a file torch-fidelity never loads.
PYTORCH_FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture
def torch_fidelity_url(monkeypatch: pytest.MonkeyPatch) -> str:
    """torch-fidelity's Inception URL: the installed package's, else (not installed here) a stand-in
    module carrying 0.4.0's constant, so the availability check can be exercised without it."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:
        module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
        module.URL_INCEPTION_V3 = TORCH_FIDELITY_INCEPTION_URL  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
        monkeypatch.setitem(sys.modules, module.__name__, module)
        return TORCH_FIDELITY_INCEPTION_URL
    assert URL_INCEPTION_V3 == TORCH_FIDELITY_INCEPTION_URL
    return URL_INCEPTION_V3


def test_fid_needs_torch_fidelitys_inception_file_not_pytorch_fids(
    folders: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_fidelity_url: str
) -> None:
    """FID is available exactly when torch-fidelity's own file is in the torch.hub cache: pytorch-fid's
    pt_inception file (same network, another name) does not count, since torch-fidelity would then try
    to download its file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    wanted = torch_hub_checkpoint(torch_fidelity_url)
    assert wanted.name == "weights-inception-2015-12-05-6726825d.pth"
    wanted.parent.mkdir(parents=True)
    (wanted.parent / PYTORCH_FID_INCEPTION_FILE).write_bytes(b"")
    gt, same, _ = folders
    pairs = [(same / "sub" / n, gt / "sub" / n) for n in NAMES]
    with pytest.raises(Unavailable, match=re.escape(f"Inception weights not found at {wanted} ")):
        fid(pairs, torch.device("cpu"))
    wanted.write_bytes(b"")
    assert inception_weights() == wanted


def _stand_in_inception(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A random torch-fidelity Inception state dict at `path` (the real file cannot be fetched here):
    FID then runs exactly as with the real network; its values mean nothing but FID(x, x) = 0. He-normal
    convolutions keep the activations' scale through the ~90 layers (torch's default init shrinks the
    features to ~1e-8, where every FID is round-off)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with monkeypatch.context() as m, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def test_fid_is_computed_from_the_cached_file_without_any_download(
    folders: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With torch-fidelity installed and its file cached, FID loads that file by path: a download
    attempt (torch.hub's, as torch-fidelity makes without a path) fails the test."""
    tf_inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    _stand_in_inception(torch_hub_checkpoint(tf_inception.URL_INCEPTION_V3), monkeypatch)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("FID tried to download its weights")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    gt, same, pred = folders
    identical = evaluate(same, gt, device="cpu", weights_dir=tmp_path)
    assert "FID" not in identical.unavailable
    assert evaluate(pred, gt, device="cpu", weights_dir=tmp_path).values["FID"] > 0
    different = fid([(_upside_down(tmp_path, g), g) for _, g in matched_pairs(same, gt)], torch.device("cpu"))
    # FID(x, x) is 0 in exact arithmetic, but 2 images give rank-1 2048² covariances: the square roots of
    # the ~2047 round-off eigenvalues of their product leave a residue (~5e-5 here, ~2e-5 of the FID of
    # upside-down faces) that depends on the CPU's maths library. So it is bounded relative to a real
    # difference's FID, not by an absolute 1e-6.
    assert abs(identical.values["FID"]) < 1e-3 * different


def _upside_down(folder: Path, path: Path) -> Path:
    out = folder / f"upside-down-{path.name}"
    Image.open(path).convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(out)
    return out
