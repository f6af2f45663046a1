"""`RestorationPipeline.restore_photos`: several photos, their faces in one sampler batch (the
worker's cross-job batching), each photo ending as it would alone. Tiny profile, real photos.

"As it would alone" is exact for everything the method decides (faces, levels, start steps, etas,
NFE, seeds, formats, sizes) and for pixels up to rounding (tests.conftest.assert_same_up_to_rounding):
the UNet's batched kernels round differently from its one-sample kernels (about 1e-6 per call on
this CPU), as between the faces of one photo (tests/models/test_pipeline.py
`test_faces_of_a_batch_do_not_depend_on_each_other`).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.dsst import default_table
from models.errors import Cancelled, DeviceOutOfMemoryError, InvalidImageError, NoFaceError
from models.pipeline import CancelFn, PhotoRequest, PhotoResult, RestorationPipeline, RestoreOptions
from models.profiles import PROFILES
from tests.conftest import TESTDATA, WEIGHTS, assert_same_up_to_rounding

ALIGNED = TESTDATA / "aligned"
PHOTOS = TESTDATA / "photos"

pytestmark = pytest.mark.skipif(not TESTDATA.is_dir(), reason=f"shared test data not found at {TESTDATA}")


@pytest.fixture(scope="module")
def fast() -> RestorationPipeline:
    """Tiny networks, starts of 2–4 steps, and a face batch of 3 so a batch of photos' faces
    (1 + 4 + 1 below) straddles sampler chunks."""
    base = RestorationPipeline.from_pretrained("tiny", weights_dir=WEIGHTS)
    table = dataclasses.replace(default_table(), start_indices=(2, 3, 4))
    return RestorationPipeline(
        PROFILES["tiny"], base.unet, base.restorer, dsst=table, max_batch=3, weights_dir=WEIGHTS
    )


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(int)


def _assert_same_photo(alone: PhotoResult, together: PhotoResult) -> None:
    assert together.media_type == alone.media_type and together.seed == alone.seed
    assert together.face_reports == alone.face_reports  # boxes, scores and every FaceFacts field
    assert together.warnings == alone.warnings and together.faces_dropped == alone.faces_dropped
    assert list(together.timings) == list(alone.timings)
    assert len(together.faces) == len(alone.faces)
    for a, b in zip([alone.image, *alone.faces], [together.image, *together.faces], strict=True):
        assert_same_up_to_rounding(_pixels(a), _pixels(b))  # batched vs one-sample kernels (docstring)


def test_photos_restored_together_are_what_each_gives_alone(fast: RestorationPipeline) -> None:
    """Different seeds, face counts (1, 4, 1) and per-photo options; face k of photo j draws from
    seed_j + k, so no face takes another's noise (which would change its pixels by far more than 1)."""
    requests = [
        PhotoRequest((ALIGNED / "0143.png").read_bytes(), RestoreOptions(aligned=True, seed=3)),
        PhotoRequest(
            (PHOTOS / "00.jpg").read_bytes(),
            RestoreOptions(seed=11, outputs=("image", "faces"), format="png", upscale=2),
        ),
        PhotoRequest(
            (ALIGNED / "0240.png").read_bytes(),
            RestoreOptions(aligned=True, seed=3, format="png", color_correction="adain"),
        ),
    ]
    seen: dict[int, list[str]] = {j: [] for j in range(len(requests))}
    requests = [
        dataclasses.replace(r, progress=lambda stage, step, total, j=j: seen[j].append(stage))
        for j, r in enumerate(requests)
    ]
    together = fast.restore_photos(requests)
    assert all(isinstance(t, PhotoResult) for t in together), together
    assert [len(t.face_reports) for t in together] == [1, 4, 1]
    for j, request in enumerate(requests):
        # Each photo hears its own stages and the shared ones, in the pipeline's order.
        assert list(dict.fromkeys(seen[j])) == ["decode", "detect", "dblm", "sample", "paste", "encode"]
        alone = fast.restore_photo(request.data, request.options)
        _assert_same_photo(alone, together[j])  # type: ignore[arg-type]
        assert alone.stage_shares == alone.timings
        # What this photo cost: its part of the stages run for the three photos' faces at once.
        result = together[j]
        assert isinstance(result, PhotoResult)
        assert result.stage_shares == pytest.approx(
            {
                stage: seconds / 3 if stage in ("dblm", "sample") else seconds
                for stage, seconds in result.timings.items()
            }
        )


def test_a_failing_photo_ends_alone(fast: RestorationPipeline) -> None:
    """A bad file and a photo without a face fail by themselves; a passthrough photo needs no
    sampling; the photo with a face is restored as alone."""
    flat = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 200, 200)).save(flat, "PNG")
    face = PhotoRequest((ALIGNED / "0342.png").read_bytes(), RestoreOptions(aligned=True, seed=1))
    requests = [
        PhotoRequest(b"not an image", RestoreOptions(seed=1)),
        face,
        PhotoRequest(flat.getvalue(), RestoreOptions(seed=1)),
        PhotoRequest(flat.getvalue(), RestoreOptions(seed=1, on_no_face="passthrough")),
    ]
    bad, restored, no_face, passed = fast.restore_photos(requests)
    assert isinstance(bad, InvalidImageError) and isinstance(no_face, NoFaceError)
    assert isinstance(passed, PhotoResult) and passed.face_reports == [] and "sample" not in passed.timings
    _assert_same_photo(fast.restore_photo(face.data, face.options), restored)  # type: ignore[arg-type]
    with pytest.raises(InvalidImageError):  # the one-photo case raises what ended it
        fast.restore_photo(b"not an image", RestoreOptions())


def test_cancel_stops_the_batch_only_when_every_photo_asks(fast: RestorationPipeline) -> None:
    data = (ALIGNED / "0345.png").read_bytes()
    options = RestoreOptions(aligned=True, seed=0)
    flat = io.BytesIO()
    Image.new("RGB", (96, 64), (10, 10, 10)).save(flat, "PNG")
    passthrough = PhotoRequest(flat.getvalue(), RestoreOptions(seed=0, on_no_face="passthrough"))
    stop = PhotoRequest(data, options, should_cancel=lambda: True)
    both = fast.restore_photos([stop, stop, passthrough])
    assert [type(o) for o in both] == [Cancelled, Cancelled, PhotoResult]  # the faceless one goes on
    # One photo still wants its result: the batch samples on; the one that asked to stop during
    # sampling ends at its next step of its own, before paste-back (it used to be pasted and encoded).
    stages: list[str] = []
    late = PhotoRequest(
        data,
        options,
        progress=lambda stage, step, total: stages.append(stage),
        should_cancel=lambda: "sample" in stages,
    )
    one = fast.restore_photos([late, PhotoRequest(data, options)])
    assert [type(o) for o in one] == [Cancelled, PhotoResult], one
    assert "sample" in stages and "paste" not in stages


def test_a_photo_canceled_before_its_batch_samples_stays_out_of_it(fast: RestorationPipeline) -> None:
    """A photo canceled while it or a later photo of its batch is decoded or detected ends there, and
    its faces do not join the others' in DBLM and the sampler (they used to be restored for nothing)."""
    data = (ALIGNED / "0345.png").read_bytes()
    options = RestoreOptions(aligned=True, seed=0)
    seen: dict[str, list[tuple[str, int]]] = {"first": [], "second": []}

    def request(name: str, should_cancel: CancelFn | None = None) -> PhotoRequest:
        def progress(stage: str, step: int, total: int) -> None:
            seen[name].append((stage, total))

        return PhotoRequest(data, options, progress, should_cancel)

    # Canceled once the second photo is being decoded: after its own detection.
    first = request("first", should_cancel=lambda: bool(seen["second"]))
    outcomes = fast.restore_photos([first, request("second")])
    assert [type(o) for o in outcomes] == [Cancelled, PhotoResult], outcomes
    assert [stage for stage, _ in seen["first"]] == ["decode", "detect"]
    assert ("dblm", 1) in seen["second"]  # its one face alone


def test_photos_must_share_the_sampler_options(fast: RestorationPipeline) -> None:
    data = (ALIGNED / "0345.png").read_bytes()
    with pytest.raises(ValueError, match="must agree on"):
        fast.restore_photos(
            [
                PhotoRequest(data, RestoreOptions(aligned=True, fidelity=0.5)),
                PhotoRequest(data, RestoreOptions(aligned=True, fidelity=0.6)),
            ]
        )


# Out of memory: no GPU here, so the allocator's failure is played by a pipeline method that raises
# `torch.OutOfMemoryError` (what CUDA's allocator raises) for one photo, or for a batch of faces.
OOM_MESSAGE = "The GPU ran out of memory on this photo; try a smaller image or upscale."


def _oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _assert_oom(outcome: object) -> None:
    assert isinstance(outcome, DeviceOutOfMemoryError), outcome
    assert outcome.code == "cuda_oom" and outcome.message == OOM_MESSAGE


@pytest.mark.parametrize("stage", ["_detect_and_align", "_finish_photo"])
def test_out_of_memory_in_a_photos_own_stage_ends_that_photo_alone(
    fast: RestorationPipeline, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """Detection (`_start_photo`) or paste-back/upscaling/encoding (`_finish_photo`) of the photo
    seeded 5 runs out of memory: it ends `cuda_oom`, and its companions (faces sampled together
    with its own, for `_finish_photo`) are restored as alone. It used to end every photo."""
    requests = [
        PhotoRequest((ALIGNED / "0143.png").read_bytes(), RestoreOptions(aligned=True, seed=3)),
        PhotoRequest((ALIGNED / "0240.png").read_bytes(), RestoreOptions(aligned=True, seed=5)),
        PhotoRequest((PHOTOS / "00.jpg").read_bytes(), RestoreOptions(seed=11, upscale=2)),
    ]
    alone = [fast.restore_photo(r.data, r.options) for r in requests]
    run = getattr(fast, stage)

    def failing(*args: Any) -> Any:
        seed = args[0].seed if stage == "_finish_photo" else args[1].seed  # photo / options
        if seed == 5:
            raise _oom()
        return run(*args)

    monkeypatch.setattr(fast, stage, failing)
    first, failed, third = fast.restore_photos(requests)
    _assert_oom(failed)
    _assert_same_photo(alone[0], first)  # type: ignore[arg-type]
    _assert_same_photo(alone[2], third)  # type: ignore[arg-type]
    with pytest.raises(DeviceOutOfMemoryError):  # the one-photo case raises what ended it
        fast.restore_photo(requests[1].data, requests[1].options)


def test_out_of_memory_on_the_shared_faces_retries_each_photo_alone(
    fast: RestorationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampler runs out of memory on more than one face at once, after DBLM: each photo's face
    goes through DBLM and the sampler again alone, from its own seed, so each photo gets exactly what
    it gets alone; its timings count the failed batch's DBLM too."""
    requests = [
        PhotoRequest((ALIGNED / "0143.png").read_bytes(), RestoreOptions(aligned=True, seed=3)),
        PhotoRequest((ALIGNED / "0240.png").read_bytes(), RestoreOptions(aligned=True, seed=5)),
    ]
    alone = [fast.restore_photo(r.data, r.options) for r in requests]
    seen: dict[int, list[str]] = {j: [] for j in range(len(requests))}
    requests = [
        dataclasses.replace(r, progress=lambda stage, step, total, j=j: seen[j].append(stage))
        for j, r in enumerate(requests)
    ]
    sample = fast._sample
    sampled: list[int] = []

    def sample_one_face_at_most(guide: Any, *args: Any) -> torch.Tensor:
        sampled.append(len(guide.sigma))
        if len(guide.sigma) > 1:
            raise _oom()
        return sample(guide, *args)

    monkeypatch.setattr(fast, "_sample", sample_one_face_at_most)
    together = fast.restore_photos(requests)
    assert sampled == [2, 1, 1]
    for j, outcome in enumerate(together):
        assert isinstance(outcome, PhotoResult), outcome
        _assert_same_photo(alone[j], outcome)
        assert outcome.image == alone[j].image  # the very same computation as alone, bit for bit
        assert seen[j].count("dblm") == 2 and seen[j][-2:] == ["paste", "encode"]
    # Each photo's shares hold half the failed try (its timings all of it) and all of its own retry:
    # the difference is half the failed try, the same for both photos.
    for stage in ("dblm", "sample"):
        halves = [r.timings[stage] - r.stage_shares[stage] for r in together]  # type: ignore[union-attr]
        assert halves[0] > 0 and halves[1] == pytest.approx(halves[0], rel=1e-9, abs=1e-12)


def test_a_photo_out_of_memory_alone_too_fails_alone(
    fast: RestorationPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The faces of the photo seeded 5 are too many for the device even alone: after the shared batch
    runs out of memory, it ends `cuda_oom` and its companion is restored as alone. A batch of that
    one photo is not retried."""
    requests = [
        PhotoRequest((ALIGNED / "0143.png").read_bytes(), RestoreOptions(aligned=True, seed=3)),
        PhotoRequest((ALIGNED / "0240.png").read_bytes(), RestoreOptions(aligned=True, seed=5)),
    ]
    alone = fast.restore_photo(requests[0].data, requests[0].options)
    restore_faces = fast._restore_faces
    seeds: list[list[int]] = []

    def out_of_memory_on_seed_5(faces: np.ndarray, generators: list[torch.Generator], **kw: Any) -> Any:
        seeds.append([g.initial_seed() for g in generators])
        if 5 in seeds[-1]:
            raise _oom()
        return restore_faces(faces, generators, **kw)

    monkeypatch.setattr(fast, "_restore_faces", out_of_memory_on_seed_5)
    restored, failed = fast.restore_photos(requests)
    assert seeds == [[3, 5], [3], [5]]
    _assert_oom(failed)
    assert isinstance(restored, PhotoResult), restored
    _assert_same_photo(alone, restored)
    assert restored.image == alone.image
    seeds.clear()
    (only,) = fast.restore_photos(requests[1:])
    _assert_oom(only)
    assert seeds == [[5]]
