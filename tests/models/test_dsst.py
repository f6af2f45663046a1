"""DSST (method.md §4) and the fallback blur estimate (§3): oracle builder, shipped table, level rule.

The analytic builder is checked on the Gaussian-prior oracle (its face spectrum is known exactly), the
shipped default table against the method's configuration, and the blur estimate on real aligned faces
blurred by a known Gaussian.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import GaussianPrior
from PIL import Image

from models.blur import estimate_blur_sigma, gaussian_blur
from models.dsst import (
    DIFFACE_START_INDEX,
    DSSTable,
    blur_distortion,
    build_analytic,
    build_empirical,
    default_table,
)
from models.profiles import PROFILES, MethodConfig
from models.schedule import RespacedSchedule
from worker.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
ALIGNED = SHARED / "testdata" / "aligned"
needs_faces = pytest.mark.skipif(not ALIGNED.is_dir(), reason=f"shared test faces not found at {ALIGNED}")

ORACLE_SIGMAS = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0)


@pytest.fixture(scope="module")
def ddim250() -> RespacedSchedule:
    return RespacedSchedule.from_spec("ddim250")


def _small_table(**changes: object) -> DSSTable:
    spectrum = GaussianPrior().radial_spectrum()
    table = DSSTable(
        sigmas=(1.0, 2.0, 4.0), start_indices=(24, 53, 100), tau=1e-4, face_power_spectrum=spectrum
    )
    return dataclasses.replace(table, **changes)


def _load_face(name: str) -> torch.Tensor:
    """One aligned 512 face as (1, 3, 512, 512) float64 in [-1,1]."""
    rgb = np.array(Image.open(ALIGNED / name).convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].to(torch.float64) / 127.5 - 1.0


def _assert_same_table(a: DSSTable, b: DSSTable) -> None:
    for field in dataclasses.fields(DSSTable):
        if field.name != "face_power_spectrum":
            assert getattr(a, field.name) == getattr(b, field.name), field.name
    assert torch.equal(a.face_power_spectrum.freqs, b.face_power_spectrum.freqs)
    assert torch.equal(a.face_power_spectrum.power, b.face_power_spectrum.power)


def test_blur_distortion_is_the_expected_squared_blur_difference_of_the_prior() -> None:
    """D(σ) from the spectrum equals the Monte-Carlo mean of (x − G_σ*x)² over prior samples."""
    prior = GaussianPrior(size=64, mean_amplitude=0.0)
    samples = prior.sample(64, torch.Generator().manual_seed(0))
    for sigma in (0.5, 1.0, 2.0, 4.0):
        monte_carlo = float(((samples - gaussian_blur(samples, sigma)) ** 2).mean())
        analytic = blur_distortion(prior.radial_spectrum(), sigma, 64)
        assert analytic == pytest.approx(monte_carlo, rel=0.1), sigma
    distortions = [blur_distortion(prior.radial_spectrum(), s, 64) for s in ORACLE_SIGMAS]
    assert all(b > a for a, b in itertools.pairwise(distortions))


def test_oracle_analytic_start_grows_with_blur(ddim250: RespacedSchedule) -> None:
    """(c) On the Gaussian prior the start index is non-decreasing in σ, strictly larger at the
    heaviest level than the lightest, the heaviest lands on DifFace's 100, and every start is the
    first index whose noise hides the blur difference: ᾱ_i·D(σ) ≤ τ·(1 − ᾱ_i)."""
    spectrum = GaussianPrior(size=32).radial_spectrum()
    table = build_analytic(ddim250, spectrum, ORACLE_SIGMAS, image_size=32, provenance="oracle")
    starts = table.start_indices
    assert all(b >= a for a, b in itertools.pairwise(starts)), starts
    assert starts[-1] == DIFFACE_START_INDEX and starts[0] < starts[-1]
    assert table.tau is not None and table.tau > 0
    assert table.method == "analytic" and table.provenance.startswith("oracle")

    abar = [ddim250.alpha_bar(i) for i in range(len(ddim250))]
    for sigma, start in zip(ORACLE_SIGMAS, starts, strict=True):
        distortion = blur_distortion(spectrum, sigma, 32)
        assert abar[start] * distortion <= table.tau * (1 - abar[start])
        assert start == 1 or abar[start - 1] * distortion > table.tau * (1 - abar[start - 1])

    earlier = build_analytic(ddim250, spectrum, ORACLE_SIGMAS, 60, image_size=32)
    assert earlier.start_indices[-1] == 60
    assert all(e <= s for e, s in zip(earlier.start_indices, starts, strict=True))
    with pytest.raises(ValueError):
        build_analytic(ddim250, spectrum, ORACLE_SIGMAS, len(ddim250), image_size=32)


def test_default_table_matches_method_config() -> None:
    table = default_table()
    config = MethodConfig()
    assert table.sigmas == config.sigmas == PROFILES["real"].method.sigmas
    assert table.schedule_spec == config.respacing == "ddim250" and table.num_timesteps == 1000
    schedule = table.schedule()
    assert len(schedule) == 250
    starts = table.start_indices
    assert all(1 <= s < len(schedule) for s in starts)
    assert all(b >= a for a, b in itertools.pairwise(starts)) and starts[0] < starts[-1]
    # calibrated to DifFace: the heaviest level starts where the baseline does, lighter ones earlier
    assert starts[-1] == config.baseline_start_index == DIFFACE_START_INDEX
    assert table.method == "analytic" and table.tau is not None and table.tau > 0
    assert table.image_size == 512
    spectrum = table.face_power_spectrum
    assert bool((spectrum.freqs.diff() > 0).all()) and bool((spectrum.power >= 0).all())
    assert bool((spectrum.power[spectrum.freqs <= 0.5] > 0).all())
    assert float(spectrum.freqs[-1]) >= 0.5  # covers every frequency of the 512 grid's rings
    # provenance: says what the spectrum was made from, that it is not clean FFHQ, and the command
    assert "Built with: dynface dsst build --method analytic" in table.provenance
    assert "LOW-QUALITY" in table.provenance and "NOT clean FFHQ" in table.provenance
    assert "not validated by the empirical builder" in table.provenance
    # the shipped numbers are what the analytic builder gives for the shipped spectrum
    rebuilt = build_analytic(schedule, spectrum, table.sigmas, image_size=table.image_size)
    assert rebuilt.start_indices == starts
    assert rebuilt.tau == pytest.approx(table.tau, rel=1e-9)


@needs_faces
def test_provenance_command_reproduces_the_shipped_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `dynface dsst build` command recorded in the shipped table's provenance, run from the repo
    root on the shared faces, rewrites models/data/dsst_default.json: the same text, integers and
    structure, floats equal up to the last digits (FFT rounding differs between CPUs' kernels)."""
    shipped_path = "models/data/dsst_default.json"
    shipped = (ROOT / shipped_path).read_text(encoding="utf-8")
    command = DSSTable.from_json(shipped).provenance.split("Built with: dynface ")[1].split("\n")[0]
    argv = shlex.split(command)
    out = tmp_path / "dsst.json"
    argv[argv.index("--out") + 1] = str(out)
    monkeypatch.chdir(ROOT)
    assert cli_main(argv) == 0
    rebuilt = out.read_text(encoding="utf-8").replace(shlex.quote(str(out)), shipped_path)
    _assert_same_json(json.loads(rebuilt), json.loads(shipped))


def _assert_same_json(got: object, want: object, where: str = "$") -> None:
    if isinstance(want, float):
        assert isinstance(got, float) and got == pytest.approx(want, rel=1e-9, abs=1e-300), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key, value in want.items():
            _assert_same_json(got[key], value, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for index, (got_item, want_item) in enumerate(zip(got, want, strict=True)):
            _assert_same_json(got_item, want_item, f"{where}[{index}]")
    else:
        assert type(got) is type(want) and got == want, where


def test_the_dsst_module_does_no_file_io() -> None:
    """A math module (docs/design.md): models/dsst.py reads only its packaged default table. Reading face
    images, measuring P_face on them and the `dynface dsst build` command live in models/dsst_build.py."""
    tree = ast.parse((ROOT / "models" / "dsst.py").read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"PIL", "argparse", "os", "pathlib", "shlex", "shutil", "sys"}
    called = {
        n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    assert not called & {"open", "mkdir", "rglob", "glob", "write_text", "write_bytes", "read_bytes"}
    assert not {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} & {"open", "print"}


def test_json_round_trip_is_exact(ddim250: RespacedSchedule) -> None:
    analytic = build_analytic(ddim250, GaussianPrior().radial_spectrum(), (0.7, 1.3), image_size=16)
    empirical = _small_table(tau=None, method="empirical", provenance="sweep\nline two")
    for table in (analytic, empirical, default_table()):
        _assert_same_table(DSSTable.from_json(table.to_json()), table)
    with pytest.raises(ValueError, match="dynface-dsst/1"):
        DSSTable.from_json('{"format": "something-else/1"}')


def test_table_rejects_inconsistent_levels() -> None:
    with pytest.raises(ValueError):
        _small_table(start_indices=(24, 53))  # lengths differ
    with pytest.raises(ValueError):
        _small_table(sigmas=(1.0, 1.0, 4.0))  # not strictly increasing
    with pytest.raises(ValueError):
        _small_table(start_indices=(24, 20, 100))  # a heavier blur starting earlier
    with pytest.raises(ValueError):
        _small_table(start_indices=(-1, 53, 100))
    with pytest.raises(ValueError):
        _small_table(sigmas=(), start_indices=())


@pytest.mark.parametrize(
    ("changes", "bad"),
    [
        ({"start_indices": (0, 53, 100)}, "[0]"),  # no sampling step at all: output = noised estimate
        ({"start_indices": (24, 53, 250)}, "[250]"),  # one past ddim250's last index, 249
        ({"start_indices": (24, 300, 300)}, "[300, 300]"),
        ({"schedule_spec": "ddim100"}, "[100]"),  # the default's 100 is past a 100-step schedule
    ],
)
def test_table_refuses_start_indices_outside_its_schedule(changes: dict[str, object], bad: str) -> None:
    """Every start must be a respaced index of the table's own schedule with at least one step,
    1..len − 1: refused when the table is built or loaded, not when the first face reaches q_sample
    (an IndexError there failed the whole batch)."""
    length = len(RespacedSchedule.from_spec(str(changes.get("schedule_spec", "ddim250"))))
    with pytest.raises(ValueError, match=rf"start indices must be in 1\.\.{length - 1} .*got \{bad}"):
        _small_table(**changes)
    text = json.loads(_small_table().to_json())
    text.update({"start_indices": list(changes.get("start_indices", (24, 53, 100)))})
    if "schedule_spec" in changes:
        text["schedule"]["spec"] = changes["schedule_spec"]
    with pytest.raises(ValueError, match=rf"1\.\.{length - 1}"):
        DSSTable.from_json(json.dumps(text))
    # the edges that are allowed
    assert _small_table(start_indices=(1, 1, 249)).start_indices == (1, 1, 249)
    assert _small_table(schedule_spec="ddim100", start_indices=(1, 53, 99)).schedule_spec == "ddim100"


def _table_text(**changes: object) -> str:
    text = json.loads(_small_table().to_json())
    spectrum = text["face_power_spectrum"]
    for name, value in changes.items():
        (spectrum if name in ("freqs", "power") else text)[name] = value
    return json.dumps(text)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sigmas": [float("nan"), 2.0, 4.0]}, "blur levels must be positive numbers"),
        ({"sigmas": [0.0, 2.0, 4.0]}, "blur levels must be positive numbers"),
        ({"power": [1.0, 2.0]}, "one power each"),  # cut short: `at` indexed past its end per face
        ({"freqs": [0.5, 0.25, 0.0], "power": [1.0, 2.0, 3.0]}, "strictly increasing"),
        ({"freqs": [0.0, 0.5], "power": [1.0, float("inf")]}, "finite"),
        ({"freqs": [0.0, 0.5], "power": [1.0, -2.0]}, "≥ 0"),
    ],
)
def test_a_damaged_table_file_is_refused_when_loaded(changes: dict[str, object], message: str) -> None:
    """A table whose blur levels are NaN or whose face spectrum is cut short, reversed or not finite
    loaded, then failed every face (an IndexError ending the whole batch as `internal`) or gave every
    face the heaviest start: refused at load, where a named table file is checked."""
    with pytest.raises(ValueError, match=message):
        DSSTable.from_json(_table_text(**changes))


def test_analytic_builder_starts_a_very_light_blur_at_one_step(ddim250: RespacedSchedule) -> None:
    """σ = 0.1 px is hidden by index 0's noise already, but a start of 0 would run no sampling step
    (neither prior nor guidance): the builder starts it at 1. Heavier levels are unaffected."""
    spectrum = default_table().face_power_spectrum
    table = build_analytic(ddim250, spectrum, (0.1, 1.0, 4.0))
    assert table.start_indices == (1, 24, 100)
    assert build_analytic(ddim250, spectrum, (1.0, 4.0)).start_indices == (24, 100)


@pytest.mark.parametrize("candidates", [(0, 10, 20), (10, 250), ()])
def test_empirical_builder_refuses_candidates_outside_the_schedule_before_sweeping(
    candidates: tuple[int, ...],
) -> None:
    """A candidate start of 0 or past the schedule is refused before any restoration runs (the sweep
    is the expensive part), not after it when the table is made."""
    calls: list[int] = []

    def restore(y: torch.Tensor, sigma: float, start: int) -> torch.Tensor:
        calls.append(start)
        return y

    target = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"1\.\.249|no candidate"):
        build_empirical(
            restore,
            [(target, target)],
            (1.0, 2.0),
            candidates,
            face_power_spectrum=GaussianPrior().radial_spectrum(),
        )
    assert calls == []


@pytest.mark.parametrize(
    "sigmas", [(4.0, 2.0, 1.0), (1.0, 1.0, 2.0), (0.0, 1.0), (-1.0, 1.0), (1.0, float("nan")), ()]
)
def test_builders_refuse_bad_blur_levels_with_a_value_error(
    ddim250: RespacedSchedule, sigmas: tuple[float, ...]
) -> None:
    """A real check, not an assert (which python -O would skip): decreasing levels used to trip one."""
    spectrum = GaussianPrior().radial_spectrum()
    with pytest.raises(ValueError, match="blur levels must be"):
        build_analytic(ddim250, spectrum, sigmas, image_size=64)
    with pytest.raises(ValueError, match="blur levels must be"):
        build_empirical(lambda y, s, i: y, [], sigmas, (1,), face_power_spectrum=spectrum)


def test_analytic_builder_refuses_faces_without_detail(ddim250: RespacedSchedule) -> None:
    """Flat faces: no power for a blur to remove, so τ = 0 could place no level (it tripped an assert)."""
    spectrum = GaussianPrior().radial_spectrum()
    flat = dataclasses.replace(spectrum, power=torch.zeros_like(spectrum.power))
    with pytest.raises(ValueError, match="no power that a blur removes"):
        build_analytic(ddim250, flat, (1.0, 2.0), image_size=64)


@pytest.mark.parametrize(
    ("sigma_hat", "level", "start"),
    [
        (0.0, 1.0, 24),
        (1.0, 1.0, 24),  # exactly on a level: that level
        (1.0 + 1e-12, 1.0, 24),  # float noise from the estimate does not push it up a level
        (1.01, 2.0, 53),
        (2.0, 2.0, 53),
        (3.99, 4.0, 100),
        (4.0, 4.0, 100),
        (9.0, 4.0, 100),  # blurrier than every level: the heaviest
    ],
)
def test_level_and_start_for_estimated_blur(sigma_hat: float, level: float, start: int) -> None:
    table = _small_table()
    assert table.level_for(sigma_hat) == level
    assert table.start_index_for(sigma_hat) == start


def test_empirical_builder_picks_best_start_and_keeps_table_monotone() -> None:
    """A synthetic restorer whose error is smallest at a known start per level: the sweep finds it,
    ties go to fewer steps, and a level whose best start is earlier than a lighter one's is lifted."""
    best_start = {1.0: 30, 2.0: 20, 4.0: 90}
    target = torch.zeros(1, 3, 4, 4, dtype=torch.float64)

    def restore(y: torch.Tensor, sigma: float, start: int) -> torch.Tensor:
        error = 0.01 * (1 + abs(start - best_start[sigma]) // 20)  # flat within ±19 of the best
        return y + error

    table = build_empirical(
        restore,
        [(target, target)],
        (1.0, 2.0, 4.0),
        (10, 20, 30, 40, 80, 90, 100),
        face_power_spectrum=GaussianPrior().radial_spectrum(),
        provenance="synthetic",
    )
    # σ=1: 20, 30 and 40 tie (within ±19 of 30) → the smallest, 20; σ=2: 10, 20 and 30 tie → 10, lifted
    # to 20 by the running maximum; σ=4: 80, 90, 100 tie → 80.
    assert table.start_indices == (20, 20, 80)
    assert table.method == "empirical" and table.tau is None
    assert table.provenance.startswith("synthetic") and "1 validation faces" in table.provenance


def test_difface_baseline_start_is_index_100() -> None:
    schedule = RespacedSchedule.from_spec("ddim250")
    assert DIFFACE_START_INDEX == 100 == MethodConfig().baseline_start_index
    assert int(schedule.timestep_map[DIFFACE_START_INDEX]) == 400  # ≈ t=400 of 1000


@needs_faces
def test_estimate_blur_sigma_recovers_known_blur_of_real_faces() -> None:
    """Real faces blurred by G_σ (float, as the restorer's output is) give σ̂ ≈ σ, increasing in σ.

    The faces are among the low-quality test faces the shipped P_face was averaged from, so an
    unblurred face reads as ~0 to ~1 px (blur relative to their mean); a σ ≥ 1 blur dominates that.
    """
    spectrum = default_table().face_power_spectrum
    true_sigmas = (0.0, 1.0, 2.0, 4.0)
    for face in ("0143.png", "0444.png"):
        x = _load_face(face)
        estimates = estimate_blur_sigma(torch.cat([gaussian_blur(x, s) for s in true_sigmas]), spectrum)
        assert estimates.shape == (len(true_sigmas),) and estimates.dtype == torch.float64
        assert float(estimates[0]) < 1.2, face
        for sigma, estimate in zip(true_sigmas[1:], estimates[1:].tolist(), strict=True):
            assert estimate == pytest.approx(sigma, abs=0.25), (face, sigma, estimate)
        assert bool((estimates.diff() > 0).all()), (face, estimates)


def test_estimate_blur_sigma_of_a_flat_image_is_sigma_max() -> None:
    """A flat image has nothing above its noise floor: blurred beyond measurement → sigma_max."""
    flat = torch.full((2, 3, 32, 32), 0.25, dtype=torch.float64)
    assert estimate_blur_sigma(flat, GaussianPrior().radial_spectrum(), sigma_max=6.0).tolist() == [6.0, 6.0]
