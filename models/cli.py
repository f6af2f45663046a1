"""Model-level commands of the `dynface` CLI: restore-faces, restore, weights, train, dsst, eval.

They run the pipeline in-process (no server, no queue); the entry point that also has `serve` and
`worker` is `worker.cli`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import numpy as np
from tqdm import tqdm

from models import images
from models.errors import InvalidImageError, PipelineError
from models.weights import add_weights_cli

if TYPE_CHECKING:
    from models.pipeline import RestorationPipeline

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add restore-faces, restore, weights, train, dsst and eval to the `dynface` parser."""
    faces = subparsers.add_parser("restore-faces", help="restore aligned 512×512 face crops")
    faces.add_argument("inputs", nargs="+", type=Path, help="aligned face images or folders of them")
    faces.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    _add_pipeline_args(faces)
    _add_method_args(
        faces, "input i (in listing order) draws its noise from seed + i (default: drawn, and printed)"
    )
    faces.set_defaults(func=_restore_faces)

    photos = subparsers.add_parser("restore", help="restore every face in whole photos")
    photos.add_argument("inputs", nargs="+", type=Path, help="photos or folders of photos")
    photos.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    _add_pipeline_args(photos)
    _add_method_args(
        photos,
        "every photo's seed, as the API's `seed` option: its face k draws from seed + k, so a photo gets "
        "what it gets alone (default: drawn per photo, written to its .json report)",
    )
    photos.add_argument("--aligned", action="store_true", help="inputs are aligned 512×512 faces")
    photos.add_argument("--upscale", type=int, default=1, choices=range(1, 5), help="upscale factor 1–4")
    photos.add_argument("--only-center-face", action="store_true")
    photos.add_argument("--detector", choices=["retinaface_resnet50", "retinaface_mobile0.25"], default=None)
    photos.add_argument("--max-faces", type=int, default=None, help="restore at most N faces (largest first)")
    photos.add_argument("--min-face-size", type=float, default=0.0, help="ignore faces smaller than N px")
    photos.add_argument("--color-correction", default="none", choices=["none", "wavelet", "adain"])
    photos.add_argument(
        "--outputs",
        default="image",
        help="comma-separated subset of image,faces,crops,comparison (default image)",
    )
    photos.add_argument("--format", default="same", choices=["png", "jpeg", "webp", "same"])
    photos.add_argument("--on-no-face", default="fail", choices=["fail", "passthrough"])
    photos.set_defaults(func=_restore_photos)

    add_weights_cli(subparsers)
    _add_reproduction_commands(subparsers)


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command function imported when the command runs, so `dynface --help` does not import torch."""
    return lambda args: getattr(importlib.import_module(module), name)(args)


def _add_reproduction_commands(subparsers: argparse._SubParsersAction) -> None:
    """train (models/train.py), dsst build (models/dsst_build.py), eval (models/evaluate.py)."""
    train = subparsers.add_parser(
        "train", help="train DBLM or DGSA (several GPUs: torchrun ... -m worker.cli)"
    )
    kinds = train.add_subparsers(dest="train_kind", required=True)
    for kind, what in (("dblm", "the blur-level mapping net"), ("dgsa", "the guidance-scale net")):
        q = kinds.add_parser(kind, help=f"train {what}")
        q.add_argument("config", type=Path, help="YAML or JSON config (fields: models/train.py TrainConfig)")
        q.add_argument(
            "--resume",
            action="store_true",
            help="continue from <out_dir>/checkpoints/last.pt (needed when out_dir holds a run)",
        )
        q.add_argument("--no-progress", action="store_true", help="no tqdm bar")
        q.set_defaults(func=_lazy("models.train", "cli_train"), train_kind=kind)

    dsst = subparsers.add_parser("dsst", help="build the DSST start-step table")
    dsst_sub = dsst.add_subparsers(dest="dsst_command", required=True)
    b = dsst_sub.add_parser(
        "build", help="start-step table (method.md §4) from clean aligned faces; used via --dsst FILE"
    )
    b.add_argument(
        "--method",
        default="analytic",
        choices=["analytic", "sweep"],
        help="analytic: closed form over the faces' spectrum; sweep: run the prior's sampler on the faces "
        "blurred to each level from every candidate start, keep the best PSNR − w·LPIPS",
    )
    b.add_argument(
        "--prior",
        default="real",
        help="profile whose schedule and blur levels the table is for (and whose prior the sweep runs): "
        "real | tiny | a weights dir (= real)",
    )
    b.add_argument("--faces", type=Path, required=True, help="folder of clean aligned 512² faces (nested ok)")
    b.add_argument("--out", type=Path, required=True, help="table to write (JSON)")
    b.add_argument(
        "--sigmas", type=float, nargs="+", default=None, help="blur levels in px (default: profile's)"
    )
    b.add_argument("--max-faces", type=int, default=None, help="use at most N faces (sorted by path)")
    b.add_argument(
        "--note",
        default=None,
        help="caveats about the faces (e.g. not clean FFHQ), written first in the table's provenance",
    )
    b.add_argument(
        "--heaviest-start", type=int, default=None, help="analytic: heaviest level's start (default: 100)"
    )
    b.add_argument(
        "--candidates", type=int, nargs="+", default=None, help="sweep: start indices (default: 10, 20 … 100)"
    )
    b.add_argument("--eta", type=float, default=None, help="sweep: DDIM eta (default: DifFace's 0.5)")
    b.add_argument("--seed", type=int, default=None, help="sweep: noise seed (default: 0)")
    b.add_argument(
        "--lpips-weight",
        type=float,
        default=None,
        help="sweep: dB per LPIPS unit in the score (default: 20; 0 = PSNR only, no AlexNet weights needed)",
    )
    b.add_argument("--device", default=None, help="sweep: cpu, cuda, cuda:N (default: cuda if available)")
    b.set_defaults(func=_lazy("models.dsst_build", "cli_build"))

    e = subparsers.add_parser(
        "eval", help="PSNR/SSIM/LPIPS/IDS/FID/NIQE/MUSIQ of restored vs ground-truth faces"
    )
    e.add_argument("--pred", type=Path, required=True, help="restored faces (folder)")
    e.add_argument("--gt", type=Path, required=True, help="ground-truth faces, same relative names")
    e.add_argument("--csv", type=Path, default=None, help="also write the row as CSV here")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    e.add_argument("--weights-dir", type=Path, default=None, help="where the ArcFace weights are (IDS)")
    e.set_defaults(func=_lazy("models.evaluate", "cli_eval"))


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        default=os.environ.get("DYNFACE_PROFILE", "real"),
        help="real | tiny (random toy weights, not a restoration) | a weights folder "
        "(default: $DYNFACE_PROFILE, else real)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=os.environ.get("DYNFACE_DTYPE", "auto"),
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto = fp16 on CUDA, else fp32 (default: $DYNFACE_DTYPE, else auto)",
    )
    p.add_argument("--weights-dir", type=Path, default=None, help="default $DYNFACE_WEIGHTS_DIR")
    p.add_argument("--max-batch", type=int, default=8, help="faces per sampler batch")
    p.add_argument(
        "--dsst",
        type=Path,
        default=_env_path("DYNFACE_DSST_TABLE"),
        help="DSST table JSON (default $DYNFACE_DSST_TABLE, else shipped)",
    )
    p.add_argument(
        "--dblm-weights",
        type=Path,
        default=_env_path("DYNFACE_DBLM_WEIGHTS"),
        help="trained DBLM .safetensors (default $DYNFACE_DBLM_WEIGHTS, else the training-free fallback)",
    )
    p.add_argument(
        "--dgsa-weights",
        type=Path,
        default=_env_path("DYNFACE_DGSA_WEIGHTS"),
        help="trained DGSA .safetensors (default $DYNFACE_DGSA_WEIGHTS, else the training-free fallback)",
    )


def _env_path(name: str) -> Path | None:
    """The service's setting as a CLI default, so `dynface restore` loads what the worker loads."""
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def _add_method_args(p: argparse.ArgumentParser, seed_help: str) -> None:
    p.add_argument("--mode", default="dynfacerestore", choices=["dynfacerestore", "difface"])
    p.add_argument("--fidelity", type=_fidelity, default=None, help='"auto" (default) or DDIM eta in [0, 1]')
    p.add_argument("--seed", type=int, default=None, help=seed_help)


def _fidelity(value: str) -> float | None:
    if value == "auto":
        return None
    eta = float(value)
    if not 0.0 <= eta <= 1.0:
        raise argparse.ArgumentTypeError("fidelity must be 'auto' or a number in [0, 1]")
    return eta


def _load_pipeline(args: argparse.Namespace, **limits: int) -> RestorationPipeline:
    """torch is imported here, not at module import, so `dynface --help` stays fast. ``limits``: the
    pipeline's own (`max_faces`, …) where a flag sets them."""
    import torch

    from models.background import BackgroundConfig
    from models.pipeline import RestorationPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = RestorationPipeline.from_pretrained(
        args.profile,
        weights_dir=args.weights_dir,
        device=device,
        dtype=args.dtype,
        max_batch=args.max_batch,
        dsst_table=args.dsst,
        dblm_weights=args.dblm_weights,
        dgsa_weights=args.dgsa_weights,
        background_config=BackgroundConfig.from_env(),
        **limits,
    )
    if not pipe.info["real"]:
        print("warning: profile 'tiny' has random weights; outputs are NOT restorations", file=sys.stderr)
    return pipe


def _setup_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with --device or the input paths (None if nothing), before any folder is listed or
    the model loaded: a GPU-less `--device cuda` failed in the model load with torch's traceback, and a
    mistyped input was reported skipped only after the load."""
    from models.evaluate import device_problem  # imports torch, which the command loads anyway

    missing = [str(p) for p in args.inputs if not p.exists()]
    return device_problem(args.device) or (
        f"no such file or folder: {', '.join(missing)}" if missing else None
    )


def _refuse(problem: str | None) -> bool:
    """Print `problem` as a usage error; True when there was one."""
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    return bool(problem)


def _refuse_no_images(files: Sequence[tuple[Path, Path]], inputs: Sequence[Path]) -> bool:
    """Print a usage error when the inputs hold no image (only empty folders, or folders of other
    files), so that the model is not loaded for nothing; True when there was none."""
    if not files:
        suffixes = " / ".join(f"*{s}" for s in sorted(IMAGE_SUFFIXES))
        print(f"error: no images ({suffixes}) found under {', '.join(map(str, inputs))}", file=sys.stderr)
    return not files


def _image_files(inputs: list[Path]) -> Iterator[tuple[Path, Path]]:
    """(file, output stem relative to the output folder) for every input image.

    Files found in a folder keep their sub-folder, so a/x.jpg and b/x.jpg do not overwrite each
    other's results; a file named directly is written at the top of the output folder.
    """
    for path in inputs:
        if path.is_dir():
            for p in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                yield p, p.relative_to(path).with_suffix("")
        else:
            yield path, Path(path.stem)


#: What `restore` appends to a photo's stem for each extra output it writes (a regex), by output kind.
_EXTRA_NAMES = {"faces": r"face\d+", "crops": r"crop\d+", "comparison": "comparison"}


def _output_clashes(files: Sequence[tuple[Path, Path]], extras: Sequence[str] = ()) -> list[str]:
    """Inputs whose outputs would overwrite each other's, one line per clash (empty when none).

    Two inputs with one output stem (a/x.png and b/x.png given as folders a/ b/, or x.jpg and x.png)
    clash. `extras` are the suffixes the run appends for extra outputs (`_EXTRA_NAMES`): an input
    x_face00.png clashes with x.png's first face, although the number of faces is only known after
    the run; refusing is the safe side of that guess.
    """
    by_stem: dict[Path, list[Path]] = {}
    for path, stem in files:
        by_stem.setdefault(stem, []).append(path)
    clashes = [f"{stem}: {', '.join(map(str, paths))}" for stem, paths in by_stem.items() if len(paths) > 1]
    if extras:
        derived = re.compile(rf"(.+)_(?:{'|'.join(extras)})")
        for stem, paths in by_stem.items():
            match = derived.fullmatch(stem.name)
            owner = stem.with_name(match[1]) if match else None
            if owner in by_stem:
                clashes.append(f"{stem}: {paths[0]} and the outputs of {by_stem[owner][0]}")
    return clashes


def _refuse_clashes(clashes: list[str], output: Path) -> bool:
    """Print the clashes as a usage error; True when there were any."""
    if clashes:
        lines = "\n".join(f"  {c}" for c in clashes)
        print(
            f"error: these inputs would overwrite each other's outputs in {output} (rename them, or "
            f"restore them into separate output folders):\n{lines}",
            file=sys.stderr,
        )
    return bool(clashes)


def _output_problem(
    inputs: Sequence[Path],
    files: Sequence[tuple[Path, Path]],
    output: Path,
    suffixes: Sequence[str],
    extras: Sequence[str] = (),
) -> str | None:
    """What makes `output` unsafe for these inputs (None if nothing): a file there; the output folder
    being an input folder or inside one (its results would be mixed with the inputs, restored again by
    the next run over that folder, and could replace them); or an input that a file of the run would
    replace: <output>/<stem><suffix>, or <output>/<stem>_<extra><suffix> with `extras` (`_EXTRA_NAMES`),
    compared after resolving links and `..`."""
    if output.exists() and not output.is_dir():
        return f"-o {output} is a file; give an output folder"
    out = output.resolve()
    for folder in (p for p in inputs if p.is_dir()):
        inside = folder.resolve()
        if out == inside or inside in out.parents:
            where = "the input folder" if out == inside else "inside the input folder"
            return (
                f"-o {output} is {where} {folder}: the outputs would be mixed with the inputs (and could "
                "replace them); choose an output folder outside it"
            )
    ends = "|".join(map(re.escape, suffixes))
    shapes = [re.compile(rf"(.+)(?:{ends})")]
    if extras:
        shapes.append(re.compile(rf"(.+)_(?:{'|'.join(extras)})(?:{ends})"))
    # Each input by every output path (without suffix) that would land on it.
    by_target: dict[Path, list[Path]] = {}
    for path, _ in files:
        # An input that is a link is replaced by a write to its name (as a link, its target would be).
        for name in {path.parent.resolve() / path.name, path.resolve()}:
            for shape in shapes:
                if match := shape.fullmatch(name.name):
                    by_target.setdefault(name.with_name(match[1]), []).append(path)
    replaced = [
        f"{victim} (by the output of {path})"
        for path, stem in files
        for victim in by_target.get((out / stem).parent.resolve() / stem.name, [])
    ]
    if replaced:
        more = f" and {len(replaced) - 5} more" if len(replaced) > 5 else ""
        return (
            f"-o {output}: the outputs would replace these inputs: {', '.join(replaced[:5])}{more}; "
            "choose another output folder"
        )
    return None


def _restore_faces(args: argparse.Namespace) -> int:
    from models.pipeline import draw_seed

    # Before the model load, so that a usage error costs none.
    if _refuse(_setup_problem(args)):
        return 2
    files = list(_image_files(args.inputs))
    if _refuse_no_images(files, args.inputs) or _refuse_clashes(_output_clashes(files), args.output):
        return 2
    if _refuse(_output_problem(args.inputs, files, args.output, [".png"])):
        return 2
    try:
        pipe = _load_pipeline(args)
    # MissingWeightsError (a FileNotFoundError), or a missing or wrong --dsst / trained-weights file
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    # The i-th input (in listing order) draws from seed + i, as face i of one `restore_faces` call: its
    # result depends neither on --max-batch nor on which other inputs failed to read.
    seed = draw_seed() if args.seed is None else args.seed
    print(f"seed {seed} (input i draws from seed + i)", file=sys.stderr)
    failed = 0
    with tqdm(total=len(files), unit="face") as bar:
        for start in range(0, len(files), pipe.max_batch):
            read: list[tuple[int, np.ndarray, Path]] = []
            for i, (path, stem) in enumerate(files[start : start + pipe.max_batch], start):
                try:
                    read.append((i, _read_aligned(path, pipe.max_pixels), stem))
                except (OSError, PipelineError) as e:
                    failed += 1
                    tqdm.write(f"skipped {path}: {e}")
            for run in _consecutive_runs(read):
                result = pipe.restore_faces(
                    np.stack([face for _, face, _ in run]),
                    mode=args.mode,
                    fidelity=args.fidelity,
                    seed=seed + run[0][0],
                )
                for (_, _, stem), face in zip(run, result.faces, strict=True):
                    data, _ = images.encode_image(face, format="png")
                    write_atomically(args.output / f"{stem}.png", data)
            bar.update(len(files[start : start + pipe.max_batch]))
    print(f"restored {len(files) - failed} face(s) into {args.output}; skipped {failed}")
    return 1 if failed else 0


def _consecutive_runs(items: list[tuple[int, np.ndarray, Path]]) -> list[list[tuple[int, np.ndarray, Path]]]:
    """``items`` (index first, indices increasing) split where an index is skipped."""
    runs: list[list[tuple[int, np.ndarray, Path]]] = []
    for item in items:
        if runs and runs[-1][-1][0] + 1 == item[0]:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _read_aligned(path: Path, max_pixels: int) -> np.ndarray:
    decoded = images.decode_image(path.read_bytes(), max_pixels=max_pixels)
    h, w = decoded.rgb.shape[:2]
    if (h, w) != (512, 512):
        raise InvalidImageError(
            f"an aligned face must be 512×512, got {w}×{h} (use `dynface restore` for photos)"
        )
    return decoded.rgb


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, renamed over it: an
    interrupted run (Ctrl-C, a full disk) leaves the previous file or none, never a cut-off one. The
    temporary name ends in .tmp, so a run over that folder never takes a leftover for an image. A link
    is followed (its target rewritten, the link kept) and a file's mode kept; what is no regular file
    (`--csv /dev/stdout`, a pipe) is written to as it is."""
    if path.exists() and not path.resolve().is_file():
        path.write_bytes(data)
        return
    target = path.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        if target.exists():
            shutil.copymode(target, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_file_problem(flag: str, path: Path, example_name: str) -> str | None:
    """What keeps a command from writing its result file `path` (None if nothing), checked before the
    work that makes the result: a directory there, or a parent that cannot be created (its nearest
    existing ancestor is a file, or not writable)."""
    if path.is_dir():
        return f"{flag} {path} is a directory; give a file name, e.g. {path / example_name}"
    if path.exists() and not path.resolve().is_file():  # /dev/stdout, a pipe: written as it is
        return None if os.access(path, os.W_OK) else f"{flag} {path} cannot be written (no permission)"
    ancestor = path.resolve().parent
    while not ancestor.exists():  # ends at the root or at "."
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{flag} {path} cannot be written: {ancestor} is not a writable directory"
    return None


def _restore_photos(args: argparse.Namespace) -> int:
    from models.pipeline import OUTPUT_KINDS, RestoreOptions

    # Option errors first: they should not cost a model load.
    outputs = tuple(o.strip() for o in args.outputs.split(",") if o.strip())
    unknown = set(outputs) - set(OUTPUT_KINDS)
    if unknown:
        choices = ",".join(OUTPUT_KINDS)
        print(f"error: unknown outputs {sorted(unknown)}; choose from {choices}", file=sys.stderr)
        return 2
    if args.max_faces is not None and args.max_faces < 1:
        print("error: --max-faces must be ≥ 1", file=sys.stderr)
        return 2
    if _refuse(_setup_problem(args)):
        return 2
    files = list(_image_files(args.inputs))
    if _refuse_no_images(files, args.inputs):
        return 2
    # Every photo writes <stem>.json, so a shared stem always clashes, whatever the image format.
    extras = [_EXTRA_NAMES[kind] for kind in outputs if kind in _EXTRA_NAMES]
    if _refuse_clashes(_output_clashes(files, extras), args.output):
        return 2
    # "same" writes each photo in its own format (by its content, not its name): any of them.
    formats = get_args(images.OutputFormat) if args.format == "same" else (args.format,)
    suffixes = [*(f".{f}" for f in formats), ".json"]
    if _refuse(_output_problem(args.inputs, files, args.output, suffixes, extras)):
        return 2
    try:
        # --max-faces replaces the pipeline's cap (32), which a request's max_faces only lowers.
        pipe = _load_pipeline(args, **({} if args.max_faces is None else {"max_faces": args.max_faces}))
    # MissingWeightsError (a FileNotFoundError), or a missing or wrong --dsst / trained-weights file
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    options = RestoreOptions(
        mode=args.mode,
        fidelity=args.fidelity,
        seed=args.seed,
        aligned=args.aligned,
        upscale=args.upscale,
        only_center_face=args.only_center_face,
        detector=args.detector,
        outputs=outputs,
        format=args.format,
        on_no_face=args.on_no_face,
        max_faces=args.max_faces,
        min_face_size=args.min_face_size,
        color_correction=args.color_correction,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path, stem in tqdm(files, unit="photo"):
        try:
            result = pipe.restore_photo(path.read_bytes(), options)
        except (OSError, PipelineError) as e:
            failed += 1
            tqdm.write(f"skipped {path}: {getattr(e, 'code', 'unreadable')}: {e}")
            continue
        ext = "." + result.media_type.split("/")[-1]
        out = args.output / stem
        if "image" in outputs:
            write_atomically(out.with_name(f"{out.name}{ext}"), result.image)
        for kind, files_of_kind in (("face", result.faces), ("crop", result.crops)):
            for k, data in enumerate(files_of_kind):
                write_atomically(out.with_name(f"{out.name}_{kind}{k:02d}{ext}"), data)
        if result.comparison is not None:
            write_atomically(out.with_name(f"{out.name}_comparison{ext}"), result.comparison)
        # What the API reports per job, so a batch run can be audited face by face.
        report = {
            "input": str(path),
            "faces": [f.to_dict() for f in result.face_reports],
            "faces_dropped": result.faces_dropped,
            "seed": result.seed,
            "timings": result.timings,
            "warnings": result.warnings,
        }
        write_atomically(out.with_name(f"{out.name}.json"), json.dumps(report, indent=1).encode())
        for warning in result.warnings:
            tqdm.write(f"{path}: {warning}")
    print(f"restored {len(files) - failed} photo(s) into {args.output}; skipped {failed}")
    return 1 if failed else 0
