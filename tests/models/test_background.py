"""Background super-resolution (models/background.py): plumbing tests with RANDOM weights.

Every network here is an RRDBNet with random weights in the published Real-ESRGAN state-dict
format (same key names and shapes, under "params_ema"), at toy width and depth. They check that
such files load through the real loading code and compute BasicSR's RRDBNet, that tiling does not
change the result, output sizes, where the background shows in a photo, and the missing-weights
path. They say nothing about super-resolution quality, which needs the published files.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from spandrel import ModelLoader

from app.settings import Settings
from models import background as bg
from models import faces as face_ops
from models.dsst import default_table
from models.errors import Cancelled
from models.pipeline import DTYPES, RestorationPipeline, RestoreOptions
from models.profiles import PROFILES
from models.weights import MANIFEST, MissingWeightsError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
WEIGHTS = SHARED / "weights"
PHOTOS = SHARED / "testdata" / "photos"
FILES = {"realesrgan_x2plus": "RealESRGAN_x2plus.pth", "realesrgan_x4plus": "RealESRGAN_x4plus.pth"}
#: Toy size of the saved files: one RRDB block, 16 features (the growth channels stay at the
#: published 32). Its receptive field is about 37 input pixels (x2, which works at half
#: resolution) and 19 (x4), so an overlap of 40 covers it.
TOY = {"num_feat": 16, "num_block": 1}
COVERING_OVERLAP = 40


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_published_format(path: Path, scale: int, seed: int, **size: int) -> dict[str, torch.Tensor]:
    """A random RRDBNet saved as Real-ESRGAN publishes it: torch.save({"params_ema": state})."""
    torch.manual_seed(seed)
    state = bg.rrdbnet_state_dict(scale, **size)
    torch.save({"params_ema": state}, path)
    return state


def _basicsr_rrdbnet(state: dict[str, torch.Tensor], x: torch.Tensor, scale: int) -> torch.Tensor:
    """BasicSR's RRDBNet.forward (basicsr/archs/rrdbnet_arch.py), transcribed: the oracle the
    spandrel-loaded model is held to."""

    def conv(name: str, t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, state[f"{name}.weight"].double(), state[f"{name}.bias"].double(), padding=1)

    def lrelu(t: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(t, 0.2)

    def rdb(prefix: str, t: torch.Tensor) -> torch.Tensor:
        feats = [t]
        for k in range(1, 5):
            feats.append(lrelu(conv(f"{prefix}.conv{k}", torch.cat(feats, 1))))
        return conv(f"{prefix}.conv5", torch.cat(feats, 1)) * 0.2 + t

    if scale == 2:  # basicsr's pixel_unshuffle
        b, c, hh, hw = x.shape
        x = x.view(b, c, hh // 2, 2, hw // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, hh // 2, hw // 2)
    feat = conv("conv_first", x)
    body = feat
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    for i in range(blocks):
        inner = body
        for r in (1, 2, 3):
            inner = rdb(f"body.{i}.rdb{r}", inner)
        body = inner * 0.2 + body
    feat = feat + conv("conv_body", body)
    feat = lrelu(conv("conv_up1", F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lrelu(conv("conv_up2", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("conv_hr", feat)))


def test_random_state_dict_has_the_published_layout() -> None:
    """Key names and shapes of BasicSR's RRDBNet(num_feat=64, num_block=23, num_grow_ch=32), the
    architecture of RealESRGAN_x2plus.pth / RealESRGAN_x4plus.pth: 351 convolutions."""
    for scale, in_channels in ((2, 12), (4, 3)):
        state = bg.rrdbnet_state_dict(scale)
        assert len(state) == 2 * (1 + 23 * 3 * 5 + 5)
        assert state["conv_first.weight"].shape == (64, in_channels, 3, 3)
        assert state["body.0.rdb1.conv1.weight"].shape == (32, 64, 3, 3)
        assert state["body.22.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
        for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
            assert state[f"{name}.weight"].shape == (64, 64, 3, 3)
        assert state["conv_last.weight"].shape == (3, 64, 3, 3) and state["conv_last.bias"].shape == (3,)
        # what spandrel infers from such a file: the published width, depth and scale
        model = ModelLoader().load_from_state_dict({"params_ema": state})
        assert model.architecture.id == "ESRGAN" and model.scale == scale
        assert {"64nf", "23nb"} <= set(model.tags)


def test_background_models_are_manifest_files_and_settings_values() -> None:
    by_name = {e.name: e for e in MANIFEST}
    for name, file_name in FILES.items():
        assert by_name[name].path == file_name and "xinntao/Real-ESRGAN/releases" in by_name[name].url
    assert set(bg.BACKGROUND_MODELS) == set(FILES)
    for value in (bg.NONE, *bg.BACKGROUND_MODELS):
        assert Settings(background_model=value).background_model == value
    with pytest.raises(ValueError):
        Settings(background_model="realesrgan_x8")


@pytest.mark.parametrize(("name", "scale"), [("realesrgan_x2plus", 2), ("realesrgan_x4plus", 4)])
def test_published_format_file_loads_and_computes_basicsr_rrdbnet(
    tmp_path: Path, name: str, scale: int
) -> None:
    state = _save_published_format(tmp_path / FILES[name], scale, seed=1, **TOY)
    up = bg.load(bg.BackgroundConfig(name, tile=0), tmp_path)
    assert up is not None and up.scale == scale
    assert up.info == {"model": name, "scale": scale, "weights": FILES[name], "tile": 0, "tile_overlap": 32}
    rgb = _random_image(24, 36)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255
    expected = (_basicsr_rrdbnet(state, x, scale).clamp(0, 1) * 255)[0].permute(1, 2, 0).numpy()
    out = up.super_resolve(rgb)
    assert out.shape == (24 * scale, 36 * scale, 3)
    assert np.abs(out - expected).max() <= 0.5 + 1e-3  # float32 vs float64, then rounding
    assert out.std() > 5  # the random net is not saturated: the comparison means something


def test_a_file_of_another_scale_is_refused(tmp_path: Path) -> None:
    _save_published_format(tmp_path / FILES["realesrgan_x2plus"], 4, seed=1, **TOY)
    with pytest.raises(ValueError, match="scale 2"):
        bg.load(bg.BackgroundConfig("realesrgan_x2plus"), tmp_path)


@pytest.mark.parametrize("name", list(FILES))
def test_tiled_equals_untiled_when_the_overlap_covers_the_receptive_field(tmp_path: Path, name: str) -> None:
    """Odd photo size and a tile size that leaves uneven tiles at the edges (2 x 3 x 5 grid)."""
    _save_published_format(tmp_path / FILES[name], bg.BACKGROUND_MODELS[name], seed=2, **TOY)
    up = bg.load(bg.BackgroundConfig(name, tile=0), tmp_path)
    assert up is not None
    rgb = _random_image(101, 203)
    whole = up.super_resolve(rgb).astype(int)

    def tiled(overlap: int) -> np.ndarray:
        up.config = bg.BackgroundConfig(name, tile=48, overlap=overlap)
        return up.super_resolve(rgb).astype(int)

    diff = np.abs(tiled(COVERING_OVERLAP) - whole)
    # float32 convolutions on differently sized inputs may round a few values to the other side
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4
    # without context the tile borders differ: what the overlap is for
    assert np.abs(tiled(0) - whole).max() > 20


@pytest.mark.parametrize("name", list(FILES))
def test_output_is_exactly_upscale_times_the_photo(name: str) -> None:
    up = bg.tiny(bg.BackgroundConfig(name, tile=64))
    assert up is not None
    rgb = _random_image(37, 50)
    sr = up.super_resolve(rgb)
    assert sr.shape == (37 * up.scale, 50 * up.scale, 3)
    for factor in (1, 2, 3, 4):
        out = up.upscale(rgb, factor)
        assert out.shape == (37 * factor, 50 * factor, 3)
        if factor == 1:  # the photo as decoded: the model does not run at all
            np.testing.assert_array_equal(out, rgb)
        elif factor == up.scale:
            np.testing.assert_array_equal(out, sr)
        else:  # the model once, then Lanczos to the exact size
            np.testing.assert_array_equal(out, face_ops.resize_to(sr, (50 * factor, 37 * factor)))


#: (model, upscale) pairs where the model's output is resized: shrunk (x4 to 2 and 3) or grown (x2 to 3
#: and 4), at integer factors (the API's) and at a fractional one.
RESIZED = [
    ("realesrgan_x4plus", 2),
    ("realesrgan_x4plus", 3),
    ("realesrgan_x4plus", 2.5),
    ("realesrgan_x2plus", 3),
    ("realesrgan_x2plus", 4),
]


@pytest.mark.parametrize(("name", "factor"), RESIZED)
def test_resized_upscale_equals_resizing_the_whole_model_output(name: str, factor: float) -> None:
    """Each tile's output is resized straight into the result, with the margin Lanczos reads cut from
    its context. Untiled, that is exactly the whole output resized; tiled with an overlap that covers
    the receptive field, the margins hold the neighbours' pixels up to the tiling's own float32
    rounding (test_tiled_equals_untiled_...), so at most 1 level in a few values differs. At a
    fractional factor, tile edges fall between output pixels and Pillow rounds them to float32: the
    same bound."""
    rgb = _random_image(101, 203)  # wide: Pillow's own resize then runs its horizontal pass first too
    for tile in (0, 48):
        up = bg.tiny(bg.BackgroundConfig(name, tile=tile, overlap=COVERING_OVERLAP))
        assert up is not None
        out = up.upscale(rgb, factor)
        size = (round(203 * factor), round(101 * factor))
        assert out.shape == (size[1], size[0], 3)
        whole = face_ops.resize_to(up.super_resolve(rgb), size)
        if tile == 0 and float(factor).is_integer():
            np.testing.assert_array_equal(out, whole)
        diff = np.abs(out.astype(int) - whole)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_resized_upscale_runs_pillows_horizontal_pass_first_on_every_photo() -> None:
    """The two Lanczos passes run in a fixed order (horizontal, then vertical) on every tile and photo.
    Pillow's own resize picks its order from the sizes (13.0 goes vertically first on this tall photo),
    which moves values by 1 through the 8-bit intermediate: a whole-output resize is within 1 level."""
    up = bg.tiny(bg.BackgroundConfig("realesrgan_x4plus", tile=48, overlap=COVERING_OVERLAP))
    assert up is not None
    rgb = _random_image(203, 101)
    sr = up.super_resolve(rgb)
    lanczos = Image.Resampling.LANCZOS
    two_pass = np.asarray(Image.fromarray(sr).resize((202, 812), lanczos).resize((202, 406), lanczos))
    diff = np.abs(up.upscale(rgb, 2).astype(int) - two_pass)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert np.abs(face_ops.resize_to(sr, (202, 406)).astype(int) - two_pass).max() <= 1


@pytest.mark.parametrize(("name", "factor"), [("realesrgan_x4plus", 2), ("realesrgan_x2plus", 3)])
def test_resized_upscale_never_holds_the_whole_model_output(name: str, factor: int) -> None:
    """Host memory (numpy's allocations, which tracemalloc sees) stays within twice the result: the
    result and one tile. Resizing the assembled output held it whole first: for x4plus at upscale 2,
    4 times the result's pixels (768 MB for a 16 MP photo, plus Pillow's copy of it)."""
    import tracemalloc

    up = bg.tiny(bg.BackgroundConfig(name, tile=48, overlap=COVERING_OVERLAP))
    assert up is not None
    rgb = _random_image(101, 203)
    up.upscale(rgb, factor)  # warm-up: first-call allocations (kernels, caches) are not the photo's
    tracemalloc.start()
    try:
        out = up.upscale(rgb, factor)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (101 * factor, 203 * factor, 3)
    assert peak < 2 * out.nbytes


@pytest.mark.parametrize("factor", [2, 3])  # the model's own scale (super_resolve), and resized
def test_a_cancel_stops_the_upscale_at_its_next_tile(monkeypatch: pytest.MonkeyPatch, factor: int) -> None:
    """A tile of a large photo takes seconds: once `should_cancel()` is true, the next tile does not
    run (the same `Cancelled` as the sampler's, which the worker ends a job canceled with). A photo
    canceled before its first tile runs none; one canceled after its last keeps its upscale."""
    up = bg.tiny(bg.BackgroundConfig("realesrgan_x2plus", tile=32, overlap=8))
    assert up is not None
    net = up.model.model
    tiles: list[int] = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x: tiles.append(1) or forward(x))
    rgb = _random_image(64, 96)  # 2 × 3 tiles
    for canceled_after in (0, 2):
        tiles.clear()
        with pytest.raises(Cancelled):
            up.upscale(rgb, factor, should_cancel=lambda n=canceled_after: len(tiles) >= n)
        assert len(tiles) == canceled_after
    tiles.clear()
    out = up.upscale(rgb, factor, should_cancel=lambda: len(tiles) >= 6)
    assert out.shape == (64 * factor, 96 * factor, 3) and len(tiles) == 6


# ---------------------------------------------------------------- in the pipeline


@pytest.fixture(scope="module")
def tiny_pipe() -> RestorationPipeline:
    return RestorationPipeline.from_pretrained(
        "tiny", weights_dir=WEIGHTS, background_config=bg.BackgroundConfig()
    )


def _fast(pipe: RestorationPipeline, background: bg.BackgroundUpscaler | None) -> RestorationPipeline:
    """The tiny networks with starts of a few steps (photo-level checks need no long sampling)."""
    table = dataclasses.replace(default_table(), start_indices=(2, 3, 4))
    tiny = PROFILES["tiny"]
    return RestorationPipeline(
        tiny, pipe.unet, pipe.restorer, dsst=table, weights_dir=WEIGHTS, background=background
    )


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_background_runs_in_the_pipeline_precision_and_layout(
    tiny_pipe: RestorationPipeline, dtype: str
) -> None:
    """The pipeline places the model like its other networks: its dtype (fp16 on CUDA by default)
    and memory format; the result stays within rounding of fp32."""
    config = bg.BackgroundConfig("realesrgan_x2plus", tile=32)
    rgb = _random_image(60, 70)
    fp32 = bg.tiny(config)
    assert fp32 is not None
    reference = fp32.super_resolve(rgb).astype(int)
    pipe = RestorationPipeline(
        PROFILES["tiny"],
        copy.deepcopy(tiny_pipe.unet),  # the pipeline casts its networks in place
        copy.deepcopy(tiny_pipe.restorer),
        weights_dir=WEIGHTS,
        dtype=dtype,
        background=bg.tiny(config),
    )
    assert pipe.background is not None and pipe.background.model.dtype == DTYPES[dtype]
    first_conv = next(p for p in pipe.background.model.model.parameters() if p.dim() == 4)
    assert first_conv.is_contiguous(memory_format=torch.channels_last)  # SpeedOptions' default
    assert np.abs(pipe.background.super_resolve(rgb) - reference).max() <= 2


@pytest.mark.skipif(
    not (WEIGHTS / "detection_mobilenet0.25_Final.pth").is_file(), reason="shared detector weights absent"
)
def test_faces_are_pasted_over_the_model_background(tiny_pipe: RestorationPipeline) -> None:
    up = bg.tiny(bg.BackgroundConfig("realesrgan_x2plus", tile=128))
    assert up is not None
    with_model, plain = _fast(tiny_pipe, up), _fast(tiny_pipe, None)
    data = (PHOTOS / "04.jpg").read_bytes()  # one face: restoring it dominates the run time
    options = RestoreOptions(seed=0, upscale=2, format="png")
    out = _decoded(with_model.restore_photo(data, options).image)
    reference = _decoded(plain.restore_photo(data, options).image)
    assert out.shape == reference.shape == (225 * 2, 225 * 2, 3)

    rgb = _decoded(data)
    found = face_ops.FaceDetector(WEIGHTS, "retinaface_mobile0.25").detect(rgb)
    _, affines = face_ops.align(rgb, found.faces)
    weight = face_ops.paste_mask((out.shape[1], out.shape[0]), affines, 2)
    outside, face = weight == 0, weight > 0.99
    assert outside.mean() > 0.3 and face.mean() > 0.1
    # Outside the masks: exactly the model's background, which is not the Lanczos one.
    model_background = up.upscale(rgb, 2)
    np.testing.assert_array_equal(out[outside], model_background[outside])
    assert np.abs(out[outside].astype(int) - reference[outside]).mean() > 5
    # Inside: the same restored faces as without the model (< 1 % of the background shows there).
    assert np.abs(out[face].astype(int) - reference[face]).max() <= 3


def test_no_face_passthrough_uses_the_model_and_upscale_1_leaves_the_photo(
    tiny_pipe: RestorationPipeline,
) -> None:
    up = bg.tiny(bg.BackgroundConfig("realesrgan_x4plus"))
    assert up is not None
    pipe = _fast(tiny_pipe, up)
    rgb = _random_image(30, 44)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    for upscale in (1, 2):
        options = RestoreOptions(upscale=upscale, on_no_face="passthrough", format="png")
        out = _decoded(pipe.restore_photo(buf.getvalue(), options).image)
        np.testing.assert_array_equal(out, up.upscale(rgb, upscale))
    np.testing.assert_array_equal(out, face_ops.resize_to(up.super_resolve(rgb), (88, 60)))


@pytest.mark.skipif(
    not (WEIGHTS / "detection_mobilenet0.25_Final.pth").is_file(), reason="shared detector weights absent"
)
def test_the_model_upscales_transparent_photos_premultiplied(
    tiny_pipe: RestorationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With alpha, the model sees colours premultiplied by it (the magenta under the transparent half
    is 0, so it cannot bleed into the visible edge), and the result is divided by the upscaled alpha."""
    up = bg.tiny(bg.BackgroundConfig("realesrgan_x2plus"))
    assert up is not None
    pipe = _fast(tiny_pipe, up)
    rgba = np.zeros((30, 44, 4), np.uint8)
    rgba[:, :, :3] = _random_image(30, 44)
    rgba[:, 22:] = (255, 0, 255, 0)
    rgba[:, 20:22, 3] = 128
    seen: list[np.ndarray] = []
    plain_upscale = up.upscale

    def spy(rgb: np.ndarray, factor: float, should_cancel: Callable[[], bool] | None = None) -> np.ndarray:
        seen.append(rgb.copy())
        return plain_upscale(rgb, factor, should_cancel=should_cancel)

    monkeypatch.setattr(up, "upscale", spy)
    options = RestoreOptions(upscale=2, on_no_face="passthrough", format="png")
    out = _decoded(pipe.restore_photo(_png(rgba), options).image)
    (fed,) = seen
    assert (fed[:, 22:] == 0).all()
    np.testing.assert_array_equal(fed[:, 20:22], np.rint(rgba[:, 20:22, :3] * (128 / 255)))
    expected = face_ops.upscale_premultiplied(rgba[:, :, :3], rgba[:, :, 3], 2, plain_upscale)
    np.testing.assert_array_equal(out[:, :, :3], expected)

    # Independently of how the result is computed: the colour under fully transparent pixels must not
    # reach the result. The same photo with green instead of magenta there gives the same output,
    # the visible edge next to it included (upscaled straight, the model would mix each colour in).
    green = rgba.copy()
    green[:, 22:, :3] = (0, 255, 0)
    other = _decoded(pipe.restore_photo(_png(green), options).image)
    assert out.shape == other.shape == (60, 88, 4)
    visible = out[:, :, 3] > 0
    assert visible[:, 40:44].all()  # the half-transparent columns 20–21, upscaled
    np.testing.assert_array_equal(other[visible], out[visible])
    np.testing.assert_array_equal(other, out)


def test_a_photo_canceled_during_its_background_stops_between_tiles(
    tiny_pipe: RestorationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline hands the photo's cancel to the background model: a job canceled while its
    background is upscaled stops after the tile it is on, not after the whole photo and its encoding."""
    up = bg.tiny(bg.BackgroundConfig("realesrgan_x2plus", tile=32, overlap=8))
    assert up is not None
    pipe = _fast(tiny_pipe, up)
    net = up.model.model
    tiles: list[int] = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x: tiles.append(1) or forward(x))
    stages: list[str] = []
    options = RestoreOptions(upscale=2, on_no_face="passthrough", format="png")
    with pytest.raises(Cancelled):
        pipe.restore_photo(
            _png(_random_image(64, 96)),  # no face: all background, 2 × 3 tiles
            options,
            progress=lambda stage, step, total: stages.append(stage),
            should_cancel=lambda: bool(tiles),
        )
    assert len(tiles) == 1 and stages[-1] == "paste"


# ---------------------------------------------------------------- configuration and weights


def test_tiny_profile_never_reads_the_real_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with the file in its weights dir (and downloads allowed but offline), the tiny profile
    builds its own random toy RRDBNet and says so."""
    monkeypatch.setenv("DYNFACE_OFFLINE", "1")
    on_disk = _save_published_format(tmp_path / FILES["realesrgan_x2plus"], 2, seed=3, **TOY)
    pipe = RestorationPipeline.from_pretrained(
        "tiny",
        weights_dir=tmp_path,
        download=True,
        background_config=bg.BackgroundConfig("realesrgan_x2plus"),
    )
    assert pipe.info["real"] is False
    assert pipe.info["background"]["weights"] == "random (tiny profile)"
    assert pipe.background is not None
    used = pipe.background.model.model.state_dict()["model.0.weight"]
    assert used.shape == on_disk["conv_first.weight"].shape and not torch.equal(
        used, on_disk["conv_first.weight"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILES["realesrgan_x2plus"]]  # nothing fetched


def test_the_library_reads_no_service_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """from_pretrained takes its files and background model from its arguments only (the worker hands
    it Settings, the CLI its flags): DYNFACE_* variables that would break the load change nothing."""
    monkeypatch.setenv("DYNFACE_BACKGROUND_MODEL", "esrgan")
    monkeypatch.setenv("DYNFACE_BACKGROUND_TILE", "not a number")
    for name in ("DYNFACE_DSST_TABLE", "DYNFACE_DBLM_WEIGHTS", "DYNFACE_DGSA_WEIGHTS"):
        monkeypatch.setenv(name, str(tmp_path / "missing"))
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=tmp_path)
    assert pipe.info["background"] == {"model": "none"}
    assert pipe.info["dblm"] == pipe.info["dgsa"] == "fallback"
    assert pipe.dsst == default_table()
    config = bg.BackgroundConfig("realesrgan_x4plus", tile=128, overlap=8)
    info = RestorationPipeline.from_pretrained("tiny", weights_dir=tmp_path, background_config=config).info
    assert info["background"] == {
        "model": "realesrgan_x4plus",
        "scale": 4,
        "weights": "random (tiny profile)",
        "tile": 128,
        "tile_overlap": 8,
    }


def test_cli_configuration_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bg.BackgroundConfig.from_env() == bg.BackgroundConfig()
    monkeypatch.setenv("DYNFACE_BACKGROUND_MODEL", "realesrgan_x4plus")
    monkeypatch.setenv("DYNFACE_BACKGROUND_TILE", "128")
    monkeypatch.setenv("DYNFACE_BACKGROUND_TILE_OVERLAP", "8")
    assert bg.BackgroundConfig.from_env() == bg.BackgroundConfig("realesrgan_x4plus", tile=128, overlap=8)
    monkeypatch.setenv("DYNFACE_BACKGROUND_MODEL", "esrgan")
    with pytest.raises(ValueError, match="Unknown background model"):
        bg.BackgroundConfig.from_env()


def test_real_profile_lists_a_missing_background_file_with_its_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = bg.BackgroundConfig("realesrgan_x2plus")
    with pytest.raises(MissingWeightsError) as err:
        RestorationPipeline.from_pretrained("real", weights_dir=tmp_path, background_config=config)
    assert err.value.names[-1] == "realesrgan_x2plus"
    assert "--only realesrgan_x2plus" in str(err.value)
    # the download path (offline here) names it too, and fetches nothing
    monkeypatch.setenv("DYNFACE_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as err:
        RestorationPipeline.from_pretrained(
            "real", weights_dir=tmp_path, download=True, background_config=config
        )
    assert "realesrgan_x2plus" in err.value.names and list(tmp_path.iterdir()) == []
    # the loader itself never downloads either
    with pytest.raises(MissingWeightsError, match="realesrgan_x2plus"):
        bg.load(config, tmp_path)
