"""The manifest of every published weight file dynface can use, and pull / verify / list.

Model code never downloads: it loads from a weights directory (`DYNFACE_WEIGHTS_DIR`, default
~/.cache/dynface/weights) and raises `MissingWeightsError` naming the files and the command that
fetches them. Downloads happen only here, on request (`dynface weights pull`), and land under
their final name only once complete and checked, so a crash or a bad mirror never leaves a file
that later loads as garbage.

Checksums: a pinned sha256 is recorded only where it was verified from an independent source;
where it is None the file is reported "unverified (no pinned checksum)" rather than "present"; a
plain pull keeps such a file as it is, `dynface weights pull --force` fetches it again.
This module is torch-free so the API's /readyz can use it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

_DIFFACE_RELEASE = "https://github.com/zsyOAOA/DifFace/releases/download/V1.0"
_FACEXLIB_RELEASE = "https://github.com/xinntao/facexlib/releases/download"
_REALESRGAN_RELEASE = "https://github.com/xinntao/Real-ESRGAN/releases/download"


@dataclass(frozen=True)
class WeightFile:
    """One published file. `url` is a direct download URL (GitHub release asset); files that
    live in a Hugging Face repo set `hf_repo` and are fetched with huggingface_hub instead.
    `path` is relative to the weights dir; facexlib requires its files under exactly these
    names at the top level. `size`/`sha256` are None where they could not be pinned.
    """

    name: str
    path: str
    url: str
    size: int | None
    sha256: str | None
    description: str
    hf_repo: str | None = None
    hf_revision: str | None = None

    @property
    def file_name(self) -> str:
        return Path(self.path).name


#: Sources: release URLs are the ones the upstream projects' own code downloads
#: (DifFace's inference scripts; facexlib's `init_detection_model` / `init_parsing_model`).
#: facexlib ResNet-50 and ParseNet size+sha256 agree across several independent pinned
#: manifests (CodeFormer/GFPGAN deployments, an AUR facexlib-model package). The MobileNet
#: size+sha256 are those of ../shared/weights (SOURCES.md: a copy from m2man/Pytorch_Retinaface);
#: CodeFormer's mirror of the same asset has the same size, but that facexlib's own release
#: asset is byte-identical was not verified offline. DifFace's release assets and the Hugging
#: Face files have no published checksums we could check offline: size and sha256 are None,
#: except the two small Hub JSON files whose exact byte sizes the Hub's file listing shows.
#: The Hub revision is unpinned ("main"): the full commit hash was not available offline.
#: Real-ESRGAN's RRDBNet files (the optional background model, models/background.py) are the
#: release assets its own inference script downloads; no checksum we could check offline either.
MANIFEST: tuple[WeightFile, ...] = (
    WeightFile(
        name="difface_prior",
        path="iddpm_ffhq512_ema500000.pth",
        url=f"{_DIFFACE_RELEASE}/iddpm_ffhq512_ema500000.pth",
        size=None,  # unknown offline (Hub copy of the same UNet is ~639 MB)
        sha256=None,  # unknown offline
        description="DifFace iDDPM FFHQ-512 diffusion prior (upstream checkpoint, primary format)",
    ),
    WeightFile(
        name="difface_swinir",
        path="swinir_restoration512_L1.pth",
        url=f"{_DIFFACE_RELEASE}/swinir_restoration512_L1.pth",
        size=None,  # unknown offline
        sha256=None,  # unknown offline
        description="DifFace SwinIR restorer (diffused estimator), L1-trained, 512x512",
    ),
    WeightFile(
        name="hf_difface_unet",
        path="OAOA-DifFace/diffusion_pytorch_model.bin",
        url="https://huggingface.co/OAOA/DifFace/resolve/main/diffusion_pytorch_model.bin",
        size=None,  # the Hub lists "639 MB", not an exact byte count
        sha256=None,  # unknown offline
        description="DifFace prior, Hugging Face diffusers-0.13-fork layout (alternative format)",
        hf_repo="OAOA/DifFace",
        hf_revision="main",
    ),
    WeightFile(
        name="hf_difface_config",
        path="OAOA-DifFace/config.json",
        url="https://huggingface.co/OAOA/DifFace/resolve/main/config.json",
        size=975,
        sha256=None,  # unknown offline
        description="UNet config for the Hugging Face DifFace prior",
        hf_repo="OAOA/DifFace",
        hf_revision="main",
    ),
    WeightFile(
        name="hf_difface_scheduler",
        path="OAOA-DifFace/scheduler_config.json",
        url="https://huggingface.co/OAOA/DifFace/resolve/main/scheduler_config.json",
        size=306,
        sha256=None,  # unknown offline
        description="Scheduler config for the Hugging Face DifFace prior",
        hf_repo="OAOA/DifFace",
        hf_revision="main",
    ),
    WeightFile(
        name="retinaface_resnet50",
        path="detection_Resnet50_Final.pth",
        url=f"{_FACEXLIB_RELEASE}/v0.1.0/detection_Resnet50_Final.pth",
        size=109_497_761,
        sha256="6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d",
        description="RetinaFace ResNet-50 face detector (facexlib)",
    ),
    WeightFile(
        name="retinaface_mobile0.25",
        path="detection_mobilenet0.25_Final.pth",
        url=f"{_FACEXLIB_RELEASE}/v0.1.0/detection_mobilenet0.25_Final.pth",
        size=1_789_735,
        sha256="38ec7bb3c9cbfe2f40edabc05fab970a6d648747cbc534092be85d5eb9b37ed0",
        description="RetinaFace MobileNet-0.25 face detector (facexlib), small and fast",
    ),
    WeightFile(
        name="parsenet",
        path="parsing_parsenet.pth",
        url=f"{_FACEXLIB_RELEASE}/v0.2.2/parsing_parsenet.pth",
        size=85_331_193,
        sha256="3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2",
        description="Face parsing net for paste-back masks (facexlib; optional)",
    ),
    WeightFile(
        name="realesrgan_x2plus",
        path="RealESRGAN_x2plus.pth",
        url=f"{_REALESRGAN_RELEASE}/v0.2.1/RealESRGAN_x2plus.pth",
        size=None,  # unknown offline
        sha256=None,  # unknown offline
        description="Real-ESRGAN x2 RRDBNet background upscaler (only with DYNFACE_BACKGROUND_MODEL)",
    ),
    WeightFile(
        name="realesrgan_x4plus",
        path="RealESRGAN_x4plus.pth",
        url=f"{_REALESRGAN_RELEASE}/v0.1.0/RealESRGAN_x4plus.pth",
        size=None,  # unknown offline
        sha256=None,  # unknown offline
        description="Real-ESRGAN x4 RRDBNet background upscaler (only with DYNFACE_BACKGROUND_MODEL)",
    ),
)

#: Folder (inside the weights dir) holding unfinished downloads until they are complete and checked.
PARTIAL_DIR = ".partial"

State = Literal["present", "missing", "corrupt", "unverified"]


@dataclass(frozen=True)
class Status:
    """State of one manifest file on disk; `detail` says why it is corrupt or unverified."""

    name: str
    state: State
    path: Path
    detail: str = ""


@dataclass(frozen=True)
class MissingFile:
    """For /readyz: a file a profile needs, where it should be, and how to fetch it."""

    name: str
    path: Path
    command: str


def pull_command(names: Iterable[str]) -> str:
    return "dynface weights pull " + " ".join(f"--only {n}" for n in names)


class MissingWeightsError(FileNotFoundError):
    """Weights a model needs are not in the weights dir (and will not be downloaded for it)."""

    def __init__(self, names: Sequence[str], directory: str | Path) -> None:
        self.names = list(names)
        self.directory = Path(directory)
        super().__init__(
            f"Missing weights in {self.directory}: {', '.join(self.names)}. "
            f"Fetch them with: {pull_command(self.names)} "
            f"(set DYNFACE_WEIGHTS_DIR={self.directory} if that is not the default dir)."
        )


class DownloadError(OSError):
    """A download failed (network, HTTP status, cut short, wrong size or sha256, the weights dir not
    writable); the final path holds no unchecked file.

    `names` are the manifest names not fetched, as MissingWeightsError has them, so a worker can
    report a failed file that its profile alone does not list (e.g. a configured background model).
    """

    def __init__(self, message: str, names: Sequence[str]) -> None:
        super().__init__(message)
        self.names = list(names)


def weights_dir() -> Path:
    """The default weights dir: $DYNFACE_WEIGHTS_DIR, else ~/.cache/dynface/weights."""
    env = os.environ.get("DYNFACE_WEIGHTS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dynface" / "weights"


def offline_from_env() -> bool:
    return os.environ.get("DYNFACE_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_dir(directory: str | Path | None) -> Path:
    return Path(directory).expanduser() if directory is not None else weights_dir()


def select(names: Iterable[str] | None, manifest: Sequence[WeightFile] = MANIFEST) -> list[WeightFile]:
    """Manifest entries by name or file name (None = all); unknown names are an error."""
    if names is None:
        return list(manifest)
    if isinstance(names, str):  # a lone name, not an iterable of one-letter names
        names = [names]
    by_key = {e.name: e for e in manifest} | {e.file_name: e for e in manifest}
    unknown = [n for n in names if n not in by_key]
    if unknown:
        known = ", ".join(e.name for e in manifest)
        raise KeyError(f"Unknown weight file(s) {', '.join(unknown)}; known: {known}")
    chosen = [by_key[n] for n in names]
    return [e for e in manifest if e in chosen]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(entry: WeightFile, path: Path, *, hash_it: bool) -> Status:
    """State of one file; `hash_it=False` checks existence and size only (cheap, for probes)."""
    if not path.is_file():
        return Status(entry.name, "missing", path)
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return Status(entry.name, "corrupt", path, f"size {size} B, expected {entry.size} B")
    if entry.sha256 is None:
        return Status(entry.name, "unverified", path, "unverified (no pinned checksum)")
    if hash_it:
        actual = _sha256(path)
        if actual != entry.sha256:
            return Status(entry.name, "corrupt", path, f"sha256 {actual}, expected {entry.sha256}")
    return Status(entry.name, "present", path)


def verify(
    weights_dir: str | Path | None = None,
    *,
    names: Iterable[str] | None = None,
    manifest: Sequence[WeightFile] = MANIFEST,
) -> list[Status]:
    """Check every (or the named) file: present | missing | corrupt | unverified.

    Hashes whole files (a few seconds for the 640 MB prior); `missing_for` is the cheap probe.
    """
    root = _resolve_dir(weights_dir)
    return [_check(e, root / e.path, hash_it=True) for e in select(names, manifest)]


def missing_for(
    profile_requirements: Iterable[str],
    weights_dir: str | Path | None = None,
    *,
    manifest: Sequence[WeightFile] = MANIFEST,
) -> list[MissingFile]:
    """Files a profile needs that are absent or the wrong size, each with its fetch command.

    Meant for /readyz, so it never hashes (that is `verify`'s job).
    """
    root = _resolve_dir(weights_dir)
    out = []
    for entry in select(list(profile_requirements), manifest):
        if _check(entry, root / entry.path, hash_it=False).state in ("missing", "corrupt"):
            out.append(MissingFile(entry.name, root / entry.path, pull_command([entry.name])))
    return out


def pull(
    names: Iterable[str] | None = None,
    weights_dir: str | Path | None = None,
    *,
    offline: bool | None = None,
    progress: bool = True,
    manifest: Sequence[WeightFile] = MANIFEST,
    force: bool = False,
) -> list[Status]:
    """Download the named (default: all) files that are missing or corrupt; returns their status.

    Release assets are downloaded into `<weights_dir>/.partial/` (resumed there after an
    interrupted pull from the same source, with a tqdm progress bar; one process at a time per
    file), checked for size and sha256 where pinned, and only then renamed to their final name
    (same filesystem, so atomic); a failure, a mismatch included, raises DownloadError. Hub files go through
    `huggingface_hub.hf_hub_download(..., local_dir=...)`, which stages, resumes and renames the
    same way with its own `.incomplete` files.
    `offline` (default: $DYNFACE_OFFLINE) forbids any download: files still needed raise
    MissingWeightsError naming them and the command to fetch them elsewhere.
    `force` downloads every named file again, present ones too: a file without a pinned checksum
    ("unverified") that was cut short or copied in by hand is repaired only this way. The old file
    stays in place until the new one is complete and checked. It cannot be combined with `offline`.
    """
    root = _resolve_dir(weights_dir)
    offline = offline_from_env() if offline is None else offline
    if force and offline:
        raise ValueError("force downloads the files again, which offline mode ($DYNFACE_OFFLINE) forbids")
    entries = select(None if names is None else list(names), manifest)
    todo = [
        e for e in entries if force or _check(e, root / e.path, hash_it=True).state in ("missing", "corrupt")
    ]
    if todo and offline:
        raise MissingWeightsError([e.name for e in todo], root)
    for entry in todo:
        if entry.hf_repo is not None:
            _pull_hub(entry, root, force)
        else:
            _pull_url(entry, root, progress, force)
        status = _check(entry, root / entry.path, hash_it=True)
        if status.state == "corrupt":
            (root / entry.path).unlink()
            raise _corrupt_error(entry, status.detail)
    return verify(root, names=[e.name for e in entries], manifest=manifest)


def _corrupt_error(entry: WeightFile, problem: str) -> DownloadError:
    """A DownloadError, like a network failure, so a worker reports `missing_weights` and retries."""
    return DownloadError(
        f"Downloaded {entry.name} ({entry.file_name}) from {entry.url} is corrupt ({problem}); removed it. "
        f"`{pull_command([entry.name])}` fetches it again; if it keeps failing, the upstream file no "
        "longer matches the manifest.",
        [entry.name],
    )


def _partial_path(root: Path, entry: WeightFile) -> Path:
    """Where an unfinished download of `entry` waits to be resumed: outside the final path, under a
    stable name so the next pull finds it. Beside it: `<partial>.json`, the URL and validator it came
    from, and `<partial>.lock`."""
    return root / PARTIAL_DIR / entry.path


def _beside(partial: Path, suffix: str) -> Path:
    return partial.with_name(partial.name + suffix)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (created if needed), so that processes pulling the
    same file (`serve --workers 2` on a fresh machine) take turns instead of appending to one partial
    file together. The lock file stays: deleting it would let a process that opened it just before
    lock a file the next one no longer finds."""
    import fcntl  # POSIX, like the worker; imported here so that the API imports this module anywhere

    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _pull_url(entry: WeightFile, root: Path, progress: bool, force: bool) -> None:
    """Download a release asset with resume, then check it and move it into place atomically.

    Under a per-file lock: a process that waited for it finds the file already there and stops
    (unless `force`: then the file is fetched again whatever is there).
    OS errors writing the weights dir (read-only, full, not a directory) become DownloadErrors
    naming the file, which a worker reports as `missing_weights` and retries.
    """
    final = root / entry.path
    partial = _partial_path(root, entry)
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(_beside(partial, ".lock")):
            if not force and _check(entry, final, hash_it=True).state not in ("missing", "corrupt"):
                return  # another process fetched it while this one waited for the lock
            _download(entry, partial, progress)
            size = partial.stat().st_size
            problem = None
            if entry.size is not None and size != entry.size:
                problem = f"downloaded {size} B, expected {entry.size} B"
            elif entry.sha256 is not None and (actual := _sha256(partial)) != entry.sha256:
                problem = f"sha256 {actual}, expected {entry.sha256} (hash mismatch)"
            if problem is not None:
                _discard(partial)
                raise _corrupt_error(entry, problem)
            final.parent.mkdir(parents=True, exist_ok=True)
            # Synced first, so that a power loss after the rename cannot leave a torn file under the name.
            with partial.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, final)  # same filesystem: the file appears complete or not at all
            _beside(partial, ".json").unlink()
    except DownloadError:
        raise
    except OSError as e:
        raise DownloadError(
            f"Cannot write {entry.name} ({entry.file_name}) into the weights dir {root}: {e}. Make it "
            "writable (or set DYNFACE_WEIGHTS_DIR to a writable dir), then run "
            f"`{pull_command([entry.name])}`.",
            [entry.name],
        ) from e


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _beside(partial, ".json").unlink(missing_ok=True)


def _validator(url: str) -> str | None:
    """The server's strong ETag for `url`, else its Last-Modified (what If-Range accepts); None where
    it sends neither or the HEAD fails (resuming then relies on the URL alone)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        response = get_session().head(url, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
    except (OSError, httpx2.HTTPError):
        return None
    if not response.is_success:
        return None
    etag = response.headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")


def _range_total(content_range: str | None) -> int | None:
    """The full length in a 416's `Content-Range: bytes */N`, if it states one."""
    try:
        return int((content_range or "").rsplit("/", 1)[-1])
    except ValueError:
        return None


def _download(entry: WeightFile, partial: Path, progress: bool) -> None:
    """Fetch `entry` into `partial`, resuming what an earlier pull left there if it came from the
    same URL and, where the server names a version (ETag/Last-Modified), the same version.

    huggingface_hub's `http_get` does the HTTP: Range requests to resume (and a restart when a
    server ignores Range, as it must when If-Range names another version), retries on dropped
    connections, a tqdm bar, and a size check against Content-Length/Content-Range. A partial file
    cut short by the network is kept, with its source in `<partial>.json`, for the next pull.
    """
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    source = _beside(partial, ".json")
    current = _validator(entry.url)
    try:
        origin = json.loads(source.read_text()) if partial.is_file() else None
    except (OSError, ValueError):
        origin = None  # no record of where it came from: not safe to append to
    if not isinstance(origin, dict):
        origin = None
    # A partial begun without a validator (its HEAD failed) cannot be told from another version once the
    # server names one: resuming it without If-Range could splice two versions, so it is stale.
    stale = (
        origin is None
        or origin.get("url") != entry.url
        or (current is not None and origin.get("validator") != current)
        or (entry.size is not None and partial.stat().st_size > entry.size)  # not a prefix of it
    )
    if stale:
        _discard(partial)
        origin = {"url": entry.url, "validator": current}
        source.write_text(json.dumps(origin))
    validator = origin["validator"]
    bar = tqdm if progress else functools.partial(tqdm, disable=True)
    try:
        with partial.open("ab") as f:
            resume = f.tell()
            try:
                http_get(
                    entry.url,
                    f,
                    resume_size=resume,
                    headers={"If-Range": validator} if resume and validator else None,
                    expected_size=entry.size,
                    displayed_filename=entry.file_name,
                    tqdm_class=bar,  # type: ignore[arg-type]  # a partial is accepted (called with kwargs)
                )
            except HfHubHTTPError as e:
                if e.response.status_code != 416:
                    raise
                # 416 to `Range: bytes=N-`: the file has no byte N. If it is N bytes long, an earlier
                # pull downloaded all of it and stopped before the rename; else the partial is no
                # prefix of it and is dropped, so that the next pull starts over.
                if _range_total(e.response.headers.get("Content-Range")) != resume:
                    f.truncate(0)
                    raise
    except (OSError, httpx2.HTTPError) as e:  # httpx2: the transport huggingface_hub 2.x uses
        kept = partial.stat().st_size if partial.is_file() else 0
        if kept == 0:
            _discard(partial)
        resume_note = f"; {kept} B kept, the next pull resumes" if kept else ""
        message = f"Could not download {entry.name} from {entry.url}: {e}{resume_note}"
        raise DownloadError(message, [entry.name]) from e


def _pull_hub(entry: WeightFile, root: Path, force: bool) -> None:
    from huggingface_hub import hf_hub_download

    assert entry.hf_repo is not None  # only called for Hub entries
    sub = Path(entry.path).parent
    hf_hub_download(
        entry.hf_repo,
        entry.file_name,
        revision=entry.hf_revision,
        local_dir=root / sub,
        force_download=force,
    )


# ---------------------------------------------------------------- CLI


def service_weights(weights_dir: Path) -> list[str]:
    """What a worker on the configured profile ($DYNFACE_PROFILE, default real; a path is a real
    weights dir) uses from `weights_dir`: its required files, with the prior in the format the pipeline
    loads from there (`models.pipeline.profile_weights`: the Hub copy where only that is present), its
    optional files, its detector and the configured background model's ($DYNFACE_BACKGROUND_MODEL).
    The default set of `weights pull` and `verify` — for the tiny profile only its small detector; the
    other format of the prior and an unconfigured background model are fetched only when named or
    with `--all`."""
    from models.background import BackgroundConfig  # torch: only this command needs it
    from models.pipeline import profile_weights  # imports this module: not at the top
    from models.profiles import PROFILES

    profile = PROFILES.get(os.environ.get("DYNFACE_PROFILE") or "real", PROFILES["real"])
    names = [
        *profile_weights(profile, weights_dir),
        profile.detector,
        *profile.optional_weights,
        *BackgroundConfig.from_env().weight_names,
    ]
    return list(dict.fromkeys(names))


def add_weights_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `weights pull [--only NAME]... | [--all] [--force]`, `verify` (the same choice) and `list`.

    Each leaf parser sets `func(args) -> int` (the exit code) for the entry point to call.
    """
    weights = subparsers.add_parser("weights", help="download and check model weights")
    weights.add_argument("--dir", type=Path, default=None, help="weights dir (default: $DYNFACE_WEIGHTS_DIR)")
    sub = weights.add_subparsers(dest="weights_command", required=True)

    p = sub.add_parser("pull", help="download missing or corrupt weight files (default: the service's)")
    _add_choice(p)
    p.add_argument("--offline", action="store_true", default=None, help="never download")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--force",
        action="store_true",
        help="download the chosen files again even when present (repairs an 'unverified' file, one "
        "without a pinned checksum, that is truncated or was copied in by hand); each replaces the "
        "old file only once complete",
    )
    p.set_defaults(func=_cli_pull)

    v = sub.add_parser("verify", help="check sizes and checksums (default: the service's files)")
    _add_choice(v)
    v.set_defaults(func=_cli_verify)

    ls = sub.add_parser("list", help="list known weight files: present / missing / corrupt (by size)")
    ls.set_defaults(func=_cli_list)
    return weights


def _add_choice(parser: argparse.ArgumentParser) -> None:
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--only", action="append", metavar="NAME", help="only this file (repeatable)")
    choice.add_argument(
        "--all", action="store_true", help="every manifest file, not only those the service uses"
    )


def _chosen(args: argparse.Namespace) -> list[str] | None:
    """--only's names, None (everything) for --all, else the files the service uses."""
    return args.only or (None if args.all else service_weights(_resolve_dir(args.dir)))


def _print_statuses(statuses: Sequence[Status]) -> None:
    for s in statuses:
        detail = f"  ({s.detail})" if s.detail else ""
        print(f"{s.name:24} {s.state:10} {s.path}{detail}")


def _cli_pull(args: argparse.Namespace) -> int:
    try:
        statuses = pull(
            _chosen(args), args.dir, offline=args.offline, progress=not args.quiet, force=args.force
        )
    except (MissingWeightsError, KeyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_statuses(statuses)
    return 0


def _cli_verify(args: argparse.Namespace) -> int:
    try:
        statuses = verify(args.dir, names=_chosen(args))
    # An unknown --only, a bad $DYNFACE_BACKGROUND_MODEL, an unreadable file: reported as `pull` does.
    except (KeyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_statuses(statuses)
    return 1 if any(s.state in ("missing", "corrupt") for s in statuses) else 0


def _cli_list(args: argparse.Namespace) -> int:
    """Every manifest file with its state by existence and size (cheap; `verify` also hashes)."""
    root = _resolve_dir(args.dir)
    for e in MANIFEST:
        state = _check(e, root / e.path, hash_it=False).state
        size = f"{e.size} B" if e.size is not None else "size unknown"
        checksum = "sha256 pinned" if e.sha256 else "no checksum"
        print(f"{e.name:24} {state:10} {size:>14}  {checksum:14} {e.url}")
        print(f"{'':24} {e.description}")
    return 0
