"""Weight files that are there but do not load: the pipeline names the file and the `--force` pull
that replaces it (`weights.UnloadableWeightsError`, a MissingWeightsError), instead of torch's error
naming no file, which left a worker crash-looping."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from models import pipeline as pipeline_mod
from models import trained, weights
from models.background import BackgroundConfig
from models.errors import PipelineError
from models.pipeline import RestorationPipeline, load_background, loading_weights, real_networks
from models.profiles import PROFILES
from tests.conftest import WEIGHTS

GARBAGE = bytes(range(7, 250)) * 20  # neither a torch pickle nor a zip archive
MOBILENET = "detection_mobilenet0.25_Final.pth"

needs_non_root = pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DYNFACE_OFFLINE", raising=False)


def foreign_checkpoint(path: Path) -> None:
    """A readable checkpoint of some other network."""
    torch.save({"state_dict": {"other.weight": torch.zeros(3)}, "params_ema": {"x": torch.zeros(2)}}, path)


def write_unloadable(path: Path, content: str) -> None:
    """`garbage` (not a checkpoint) or a `foreign` one (another network's) at ``path``."""
    if content == "garbage":
        path.write_bytes(GARBAGE)
    else:
        foreign_checkpoint(path)


def check_names_file_and_fix(error: weights.UnloadableWeightsError, name: str, path: Path) -> None:
    assert isinstance(error, weights.MissingWeightsError)  # what a worker waits on in missing_weights
    assert error.names[0] == name
    message = str(error)
    assert str(path) in message
    assert f"dynface weights pull --force --only {name}" in message
    assert "weights_only set to False" not in message and "weights_only` set to `False" not in message


@pytest.mark.parametrize("content", ["garbage", "foreign"])
def test_a_prior_that_does_not_load_names_its_file(tmp_path: Path, content: str) -> None:
    prior = tmp_path / "iddpm_ffhq512_ema500000.pth"
    write_unloadable(prior, content)
    with pytest.raises(weights.UnloadableWeightsError) as err:
        real_networks(PROFILES["real"], tmp_path)
    check_names_file_and_fix(err.value, "difface_prior", prior)
    if content == "garbage":  # torch's own advice (weights_only=False) is not passed on
        assert "not a checkpoint torch reads safely" in str(err.value)
    else:
        assert "missing keys" in str(err.value)


def test_a_hub_prior_that_does_not_load_names_its_files(tmp_path: Path) -> None:
    hub = tmp_path / "OAOA-DifFace"
    hub.mkdir()
    (hub / "diffusion_pytorch_model.bin").write_bytes(GARBAGE)
    (hub / "config.json").write_bytes(b"{}" + b" " * 973)  # the pinned size
    with pytest.raises(weights.UnloadableWeightsError) as err:
        real_networks(PROFILES["real"], tmp_path)
    assert err.value.names == ["hf_difface_unet", "hf_difface_config"]
    assert "--force --only hf_difface_unet --only hf_difface_config" in str(err.value)


def test_a_restorer_that_does_not_load_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet, _ = pipeline_mod.tiny_networks(PROFILES["tiny"])
    monkeypatch.setattr(pipeline_mod, "_load_prior", lambda *args: (unet, "prior"))
    restorer = tmp_path / "swinir_restoration512_L1.pth"
    foreign_checkpoint(restorer)
    with pytest.raises(weights.UnloadableWeightsError) as err:
        real_networks(PROFILES["real"], tmp_path)
    check_names_file_and_fix(err.value, "difface_swinir", restorer)


def test_an_empty_prior_is_missing_and_a_plain_pull_fetches_it(tmp_path: Path) -> None:
    """An empty file is caught before loading (weights.py): missing, with the plain pull command."""
    (tmp_path / "iddpm_ffhq512_ema500000.pth").write_bytes(b"")
    (tmp_path / "swinir_restoration512_L1.pth").write_bytes(GARBAGE)
    with pytest.raises(weights.MissingWeightsError) as err:
        RestorationPipeline.from_pretrained("real", weights_dir=tmp_path)
    assert not isinstance(err.value, weights.UnloadableWeightsError)
    assert "difface_prior" in err.value.names and "difface_swinir" not in err.value.names


@pytest.mark.parametrize("content", ["garbage", "foreign"])
def test_a_background_model_that_does_not_load_names_its_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "RealESRGAN_x2plus.pth"
    write_unloadable(path, content)
    with pytest.raises(weights.UnloadableWeightsError) as err:
        load_background(BackgroundConfig(model="realesrgan_x2plus"), tmp_path)
    check_names_file_and_fix(err.value, "realesrgan_x2plus", path)
    assert load_background(BackgroundConfig(), tmp_path) is None
    with pytest.raises(weights.MissingWeightsError):  # absent: still the plain missing error
        load_background(BackgroundConfig(model="realesrgan_x4plus"), tmp_path)


def test_a_detector_that_does_not_load_fails_as_a_missing_one_does(tmp_path: Path) -> None:
    """What the worker's start-up load (`load_detector`) sees: a PipelineError caused by a
    MissingWeightsError (here its UnloadableWeightsError kind), which it reports as missing weights."""
    path = tmp_path / "detection_mobilenet0.25_Final.pth"
    path.write_bytes(GARBAGE)
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=tmp_path)
    with pytest.raises(PipelineError) as err:
        pipe.load_detector()
    cause = err.value.__cause__
    assert isinstance(cause, weights.UnloadableWeightsError)
    check_names_file_and_fix(cause, "retinaface_mobile0.25", path)
    assert "--force --only retinaface_mobile0.25" in str(err.value)


def test_an_optional_parser_that_does_not_load_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "parsing_parsenet.pth").write_bytes(GARBAGE)
    with caplog.at_level(logging.WARNING, logger="models.pipeline"):
        pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=tmp_path)
    assert pipe._parser is None
    assert "--force --only parsenet" in caplog.text


def test_loading_weights_passes_on_what_a_new_copy_would_not_fix(tmp_path: Path) -> None:
    unreadable = pytest.raises(weights.UnreadableWeightsError, match=r"chmod a\+r .*iddpm_ffhq512_ema500000")
    with unreadable, loading_weights(["difface_prior"], tmp_path):
        raise PermissionError(13, "Permission denied")  # no file named: the entry's
    with pytest.raises(torch.OutOfMemoryError), loading_weights(["difface_prior"], tmp_path):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(weights.MissingWeightsError) as err, loading_weights(["difface_prior"], tmp_path):
        raise weights.MissingWeightsError(["difface_prior"], tmp_path)
    assert not isinstance(err.value, weights.UnloadableWeightsError)
    with pytest.raises(ValueError, match="Unknown face detector"), loading_weights(["bogus"], tmp_path):
        raise ValueError("Unknown face detector 'bogus'.")
    wrapped = pytest.raises(weights.UnloadableWeightsError, match="RuntimeError: unexpected EOF")
    with wrapped, loading_weights(["difface_prior"], tmp_path):
        raise RuntimeError("unexpected EOF, expected 21756 more bytes. The file might be corrupted.")


def test_a_cut_short_torch_checkpoint_is_corrupt_before_loading(tmp_path: Path) -> None:
    """torch writes checkpoints as zip archives: one cut short is reported corrupt by the cheap probe,
    so a plain pull (and a worker's own pull) replaces it; the intact one is "unverified"."""
    path = tmp_path / "swinir_restoration512_L1.pth"
    torch.save({"w": torch.arange(10_000.0)}, path)
    assert [s.state for s in weights.verify(tmp_path, names=["difface_swinir"])] == ["unverified"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert [m.name for m in weights.missing_for(["difface_swinir"], tmp_path)] == ["difface_swinir"]


@pytest.mark.parametrize(
    "error",
    [
        ImportError("cannot import name 'RetinaFace' from 'facexlib.detection'"),
        ModuleNotFoundError("No module named 'torchvision'"),
        AttributeError("'NoneType' object has no attribute 'load_state_dict'"),
        TypeError("__init__() got an unexpected keyword argument 'half'"),
        NameError("name 'network' is not defined"),
        AssertionError(),
        NotImplementedError("a subclass of RuntimeError"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_error_of_the_code_is_not_blamed_on_the_file(tmp_path: Path, error: Exception) -> None:
    """A broken install or a bug sent operators to re-download gigabytes of weights for nothing: it
    passes through unchanged, though the file is there and unverified."""
    (tmp_path / "iddpm_ffhq512_ema500000.pth").write_bytes(GARBAGE)
    with pytest.raises(type(error)) as err, loading_weights(["difface_prior"], tmp_path):
        raise error
    assert err.value is error


def test_a_pinned_file_is_hashed_before_it_loads(tmp_path: Path) -> None:
    """A copy of a pinned file that is damaged but loads (a flipped byte in its tensors: the same size,
    a valid archive) is refused before loading, wherever it came from: an offline host's hand copy was
    never hashed (only a pull hashed), and the detector ran on damaged weights."""
    path = tmp_path / MOBILENET
    published = (WEIGHTS / MOBILENET).read_bytes()
    middle = len(published) // 2
    path.write_bytes(published[:middle] + bytes([published[middle] ^ 1]) + published[middle + 1 :])
    pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=tmp_path)
    with pytest.raises(PipelineError) as err:
        pipe.load_detector()
    cause = err.value.__cause__
    assert isinstance(cause, weights.UnloadableWeightsError)
    check_names_file_and_fix(cause, "retinaface_mobile0.25", path)
    assert "sha256" in str(cause)
    path.write_bytes(published)
    pipe.load_detector()  # the published file loads


@needs_non_root
def test_an_unreadable_weight_file_says_how_to_make_it_readable(tmp_path: Path) -> None:
    """A file this process may not read (copied in as root, mode 0600): no pull fixes that, so not a
    MissingWeightsError; the error says how (a worker reports it as `misconfigured`), where a bare
    PermissionError crashed the worker. Pinned (hashed first) or not."""
    prior = tmp_path / "iddpm_ffhq512_ema500000.pth"
    foreign_checkpoint(prior)
    detector = tmp_path / MOBILENET
    detector.write_bytes((WEIGHTS / MOBILENET).read_bytes())
    for path in (prior, detector):
        path.chmod(0)
    with pytest.raises(weights.UnreadableWeightsError) as err:
        real_networks(PROFILES["real"], tmp_path)
    with pytest.raises(weights.UnreadableWeightsError) as pinned:
        RestorationPipeline.from_pretrained("tiny", weights_dir=tmp_path).load_detector()
    for error, path, name in (
        (err.value, prior, "difface_prior"),
        (pinned.value, detector, "retinaface_mobile0.25"),
    ):
        assert not isinstance(error, weights.MissingWeightsError)
        assert (error.path, error.names[0]) == (path, name)
        message = str(error)
        assert f"chmod a+r {path}" in message and f"chown {os.getuid()}:{os.getgid()} {path}" in message


@needs_non_root
def test_an_unreadable_optional_parser_is_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The service runs without the parsing net: one it may not read is a warning, not a crash."""
    (entry,) = weights.select(["parsenet"])
    path = tmp_path / entry.path
    with path.open("wb") as f:
        f.truncate(entry.size)  # the pinned size, so it gets as far as being read
    path.chmod(0)
    with caplog.at_level(logging.WARNING, logger="models.pipeline"):
        pipe = RestorationPipeline.from_pretrained("tiny", weights_dir=tmp_path)
    assert pipe._parser is None
    assert "running without the optional face parser" in caplog.text and f"chmod a+r {path}" in caplog.text


def test_a_published_file_that_verifies_is_not_blamed(tmp_path: Path) -> None:
    """A file whose pinned sha256 matches is the published one: a load error (here a state-dict
    mismatch after a refactor) is the code's, passed through; the same error on a damaged copy is
    the file's."""
    name, path = "retinaface_mobile0.25", tmp_path / "detection_mobilenet0.25_Final.pth"
    published = (WEIGHTS / path.name).read_bytes()
    path.write_bytes(published)
    mismatch = RuntimeError('Error(s) in loading state_dict for RetinaFace: Missing key(s): "body.x"')
    with pytest.raises(RuntimeError) as err, loading_weights([name], tmp_path):
        raise mismatch
    assert err.value is mismatch
    path.write_bytes(published[:-1] + bytes([published[-1] ^ 1]))  # same size, another hash
    with pytest.raises(weights.UnloadableWeightsError) as damaged, loading_weights([name], tmp_path):
        raise mismatch
    check_names_file_and_fix(damaged.value, name, path)


def test_a_corrupt_file_raised_from_the_loader_is_unloadable(tmp_path: Path) -> None:
    """What a damaged file raises from inside the loader (torch's read of it) is still the file's."""
    path = tmp_path / "swinir_restoration512_L1.pth"
    path.write_bytes(GARBAGE)
    with pytest.raises(weights.UnloadableWeightsError) as err, loading_weights(["difface_swinir"], tmp_path):
        torch.load(path, map_location="cpu", weights_only=True)
    check_names_file_and_fix(err.value, "difface_swinir", path)


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("cannot describe this")


@pytest.mark.parametrize("failing", ["tensors", "description"])
def test_saving_trained_weights_keeps_the_old_pair_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """`dynface train`'s export writes the .safetensors and its .json through temp files: a write that
    fails (full disk, Ctrl-C) leaves the old pair as it was and no temp file (before, the tensors were
    overwritten in place: half a file, or new tensors beside the old description)."""
    path = tmp_path / "dblm.safetensors"
    trained.save(nn.Linear(2, 2), "dblm", {"layers": 1}, path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["dblm.json", "dblm.safetensors"]
    info: dict[str, object] = {}
    if failing == "tensors":

        def half_written(tensors: dict[str, torch.Tensor], filename: str) -> None:
            Path(filename).write_bytes(b"half a file")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(trained, "save_file", half_written)
    else:
        info["note"] = _Unprintable()
    with pytest.raises((OSError, RuntimeError)):
        trained.save(nn.Linear(2, 2), "dblm", {"layers": 2}, path, **info)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
