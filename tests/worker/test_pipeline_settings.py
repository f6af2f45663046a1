"""The worker's pipeline is built from its Settings alone (worker.main.pipeline_from_settings)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from app.settings import Settings
from models.dsst import default_table
from models.errors import ConfigurationError
from tests.conftest import WEIGHTS, base_settings
from worker.main import pipeline_from_settings


def test_every_model_setting_reaches_the_pipeline(tmp_path: Path) -> None:
    """Settings made in code, not read from the environment, still decide what the worker loads."""
    table = dataclasses.replace(default_table(), start_indices=(3, 5, 7))
    path = tmp_path / "dsst.json"
    path.write_text(table.to_json(), encoding="utf-8")
    settings = base_settings(
        uuid.uuid4().hex[:10],
        weights_dir=str(WEIGHTS),
        offline=True,
        dsst_table=str(path),
        background_model="realesrgan_x4plus",
        background_tile=128,
        background_tile_overlap=8,
        max_face_batch=3,
        max_faces=5,
        png_compress_level=0,
    )
    pipe = pipeline_from_settings(settings, "cpu")
    assert pipe.dsst.start_indices == (3, 5, 7)
    assert pipe.info["dsst"]["start_indices"] == [3, 5, 7]
    assert pipe.info["background"] == {
        "model": "realesrgan_x4plus",
        "scale": 4,
        "weights": "random (tiny profile)",
        "tile": 128,
        "tile_overlap": 8,
    }
    assert (pipe.max_batch, pipe.max_faces, pipe.png_compress_level) == (3, 5, 0)
    assert pipe.info["dtype"] == "fp32"  # "auto" on a CPU


def test_a_named_trained_file_that_is_missing_fails_the_load(tmp_path: Path) -> None:
    for field in ("dsst_table", "dblm_weights", "dgsa_weights"):
        settings = base_settings(uuid.uuid4().hex[:10], offline=True, **{field: str(tmp_path / "missing")})
        with pytest.raises(ConfigurationError, match="missing"):
            pipeline_from_settings(settings, "cpu")


def test_an_empty_file_setting_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`DYNFACE_DSST_TABLE=` in an env file is no table (the shipped one), not the current folder."""
    for name in ("DYNFACE_DSST_TABLE", "DYNFACE_DBLM_WEIGHTS", "DYNFACE_DGSA_WEIGHTS"):
        monkeypatch.setenv(name, " ")
    settings = Settings()
    assert (settings.dsst_table, settings.dblm_weights, settings.dgsa_weights) == (None, None, None)


def test_the_pipelines_own_limits_are_the_services_defaults() -> None:
    """`dynface restore` builds the pipeline with its library defaults, the worker from Settings: the
    limits they share agree, so a photo the service accepts is not refused by the CLI (the library's
    pixel cap was 36 MP against the service's 40 MP)."""
    import inspect

    from models.pipeline import RestorationPipeline

    library = inspect.signature(RestorationPipeline.__init__).parameters
    service = Settings.model_fields
    for library_name, setting in (
        ("max_pixels", "max_pixels"),
        ("max_faces", "max_faces"),
        ("max_batch", "max_face_batch"),
    ):
        assert library[library_name].default == service[setting].default, library_name


def test_only_the_method_files_errors_are_configuration_errors(tmp_path: Path) -> None:
    """A worker stays up `misconfigured` (retrying) only for `ConfigurationError`, raised before any
    network loads: a damaged DSST table is one; a ValueError from elsewhere in loading (here a PNG
    compression level the pipeline refuses once the networks are built) is not, and ends the worker
    instead of rebuilding the networks every retry under a misleading "fix the setting"."""
    table = tmp_path / "dsst.json"
    table.write_text("{", encoding="utf-8")
    settings = base_settings(uuid.uuid4().hex[:10], offline=True, dsst_table=str(table))
    with pytest.raises(ConfigurationError, match=str(table)):
        pipeline_from_settings(settings, "cpu")
    settings = base_settings(uuid.uuid4().hex[:10], offline=True)
    with pytest.raises(ValueError) as raised:
        pipeline_from_settings(settings.model_copy(update={"png_compress_level": 10}), "cpu")
    assert not isinstance(raised.value, ConfigurationError)
