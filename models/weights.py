"""The manifest of every published weight file dynface can use, and pull / verify / list.

Model code never downloads: it loads from a weights directory (`DYNFACE_WEIGHTS_DIR`, default
~/.cache/dynface/weights) and raises `MissingWeightsError` naming the files and the command that
fetches them. Downloads happen only here, on request (`dynface weights pull`), and land under
their final name only once complete and checked, so a crash or a bad mirror never leaves a file
that later loads as garbage.

Checksums: a pinned sha256 is recorded only where it was verified from an independent source;
where it is None the file is reported "unverified (no pinned checksum)" rather than "present"; a
plain pull keeps such a file as it is, `dynface weights pull --force` fetches it again. A pinned
sha256 is checked after each download and again before the file is loaded (`models.pipeline.loading_weights`).

The weights dir is always read by one rule, `resolve_dir` (and `profile_and_dir` for a profile that is
a path), so the worker, the pipeline and `dynface weights` agree on where the files are.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from tqdm import tqdm

if TYPE_CHECKING:
    import httpx2

log = logging.getLogger(__name__)

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
#: except the small Hub config, whose exact byte size the Hub's file listing shows. The Hub repo's
#: scheduler_config.json is not listed: the pipeline uses its own respaced schedule and never reads it.
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
    """A file a profile needs that is absent or the wrong size, and where it should be (the command
    that fetches it: `pull_command`)."""

    name: str
    path: Path


def pull_command(names: Iterable[str], *, force: bool = False) -> str:
    return "dynface weights pull " + ("--force " if force else "") + " ".join(f"--only {n}" for n in names)


def _fetch_hint(command: str, directory: Path, offline: bool) -> str:
    """How to get files into `directory`: the pull command, or, in offline mode (where that very
    command would refuse to download), how to leave offline mode or bring the files in by hand."""
    if offline:
        return (
            "Offline mode is on (DYNFACE_OFFLINE, or `--offline`), so nothing is downloaded: unset "
            f"DYNFACE_OFFLINE (and drop `--offline`) and run `{command}`, or run `{command}` on a machine "
            f"with network access and copy the files into {directory}."
        )
    return f"Fetch them with: {command} (set DYNFACE_WEIGHTS_DIR={directory} if that is not the default dir)."


def _network_hint(command: str, directory: Path) -> str:
    """The next step after a download failed on the network: the proxy variables the HTTP client reads,
    or bringing the files in by hand (and offline mode, so a worker waits for them instead)."""
    return (
        "Check the network; behind a proxy set HTTPS_PROXY (and NO_PROXY for local hosts); where GitHub "
        f"or the Hub cannot be reached, run `{command}` on a machine that can reach them and copy the "
        f"files into {directory} (with DYNFACE_OFFLINE=1 a worker waits for them instead of downloading)."
    )


class MissingWeightsError(FileNotFoundError):
    """Weights a model needs are not in the weights dir (and will not be downloaded for it).

    `command` fetches them; `force` says whether it is a `--force` pull (files that are there but
    do not load: `UnloadableWeightsError`). `offline` (default: $DYNFACE_OFFLINE) changes the advice:
    the plain command would refuse to download too."""

    force = False

    def __init__(self, names: Sequence[str], directory: str | Path, *, offline: bool | None = None) -> None:
        self.names = list(names)
        self.directory = Path(directory)
        self.command = pull_command(self.names, force=self.force)
        if offline is None:
            try:
                offline = offline_from_env()
            except ValueError:  # refused where it is read to act on; here it only words the advice
                offline = False
        super().__init__(f"{self._problem()} {_fetch_hint(self.command, self.directory, offline)}")

    def _problem(self) -> str:
        return f"Missing weights in {self.directory}: {', '.join(self.names)}."


class UnloadableWeightsError(MissingWeightsError):
    """A weight file is there, but the model cannot load it (empty, cut short, not a checkpoint, another
    network's): it needs fetching again, with `--force` since a plain pull keeps a file without a
    pinned checksum. A MissingWeightsError, so a worker waits in `missing_weights` naming it (and
    retries) instead of exiting and being restarted into the same failure."""

    force = True

    def __init__(
        self, names: Sequence[str], directory: str | Path, path: str | Path, problem: str, **kw: bool | None
    ) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(names, directory, **kw)

    def _problem(self) -> str:
        return (
            f"The weights file {self.path} ({', '.join(self.names)}) does not load ({self.problem}): it is "
            "damaged or not the published file and must be fetched again."
        )


class UnreadableWeightsError(PermissionError):
    """A weight file this process may not read (copied in as root with mode 0600, say). No download
    fixes that, so it is no MissingWeightsError: a worker reports it in state `misconfigured` with this
    message, which says how to make the file readable, and retries (it crashed and restarted before)."""

    def __init__(self, names: Sequence[str], path: str | Path, error: OSError) -> None:
        self.names = list(names)
        self.path = Path(path)
        uid, gid, quoted = os.getuid(), os.getgid(), shlex.quote(str(self.path))
        super().__init__(
            f"The weights file {self.path} ({', '.join(self.names)}) cannot be read by this process "
            f"(uid {uid}, gid {gid}): {error.strerror or error}. Make it readable to that user, e.g. "
            f"`chmod a+r {quoted}` or `chown {uid}:{gid} {quoted}` (a file copied in as root may have "
            "mode 0600)."
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


def resolve_dir(directory: str | Path | None = None) -> Path:
    """The weights dir `directory` names, `~` expanded; unset or empty, $DYNFACE_WEIGHTS_DIR taken the
    same way, else ~/.cache/dynface/weights. The one rule of every reader (the worker, the pipeline,
    `dynface weights`): a `~/w` or an empty variable once meant another dir to the pipeline (a dir
    named `~`, the current dir) than to the worker's report and the CLI."""
    if directory is None or directory == "":
        directory = os.environ.get("DYNFACE_WEIGHTS_DIR") or Path.home() / ".cache" / "dynface" / "weights"
    return Path(directory).expanduser()


def profile_and_dir(profile: str | None, directory: str | Path | None = None) -> tuple[str, Path]:
    """The profile (`real` or `tiny`) a service set to `profile` runs, and the weights dir it loads
    from: a profile that names none is a path, itself a `real` weights dir (then `directory` is not
    used); unset or empty is `real`. Dirs as `resolve_dir` reads them."""
    from models.profiles import PROFILES  # torch-free; imports nothing of this module

    if not profile:
        return "real", resolve_dir(directory)
    if profile in PROFILES:
        return profile, resolve_dir(directory)
    return "real", resolve_dir(profile)


def offline_from_env() -> bool:
    """$DYNFACE_OFFLINE read as the service's settings read it (pydantic's spellings; unset or empty
    is false). Any other value is a ValueError, as Settings refuses it: `2` must not mean online."""
    value = os.environ.get("DYNFACE_OFFLINE", "").strip().lower()
    if value in ("1", "on", "t", "true", "y", "yes"):
        return True
    if value in ("", "0", "off", "f", "false", "n", "no"):
        return False
    raise ValueError(
        f"DYNFACE_OFFLINE={value!r} is neither true (1, true, yes, on) nor false (0, false, no, off)"
    )


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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: A zip archive's first and last records (PyTorch checkpoints are zip archives since torch 1.6): a
#: file that begins as one but has no end record within the longest possible tail was cut short.
_ZIP_START, _ZIP_END, _ZIP_END_SIZE = b"PK\x03\x04", b"PK\x05\x06", 22
_ZIP_TAIL = _ZIP_END_SIZE + 0xFFFF  # the end record and the longest comment it may carry


def _cut_short_zip(path: Path, size: int) -> bool:
    """Whether `path` is a zip archive (a torch checkpoint) without its end record: cut short. Two small
    reads, so the cheap probe can afford it; a file of another format is never flagged."""
    try:
        with path.open("rb") as f:
            if f.read(len(_ZIP_START)) != _ZIP_START:
                return False
            f.seek(max(size - _ZIP_TAIL, 0))
            tail = f.read()
    except OSError:  # unreadable: left to whatever reads it next, which names the file
        return False
    end = tail.rfind(_ZIP_END)
    return end < 0 or end + _ZIP_END_SIZE > len(tail)  # no end record, or only the start of one


def _check(entry: WeightFile, path: Path, *, hash_it: bool) -> Status:
    """State of one file; `hash_it=False` checks existence and size only (cheap, for probes), and
    whether a checkpoint (zip archive) was cut short. An empty file is corrupt, pinned size or not.
    A pinned file it may not read to hash raises UnreadableWeightsError."""
    if not path.is_file():
        return Status(entry.name, "missing", path)
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return Status(entry.name, "corrupt", path, f"size {size} B, expected {entry.size} B")
    if size == 0:
        return Status(entry.name, "corrupt", path, "empty file (0 B)")
    if _cut_short_zip(path, size):
        return Status(entry.name, "corrupt", path, "cut short: a checkpoint (zip archive) without its end")
    if entry.sha256 is None:
        return Status(entry.name, "unverified", path, "unverified (no pinned checksum)")
    if hash_it:
        try:
            actual = file_sha256(path)
        except PermissionError as e:
            raise UnreadableWeightsError([entry.name], path, e) from e
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
    root = resolve_dir(weights_dir)
    return [_check(e, root / e.path, hash_it=True) for e in select(names, manifest)]


def missing_for(
    profile_requirements: Iterable[str],
    weights_dir: str | Path | None = None,
    *,
    manifest: Sequence[WeightFile] = MANIFEST,
) -> list[MissingFile]:
    """Files a profile needs that are absent, the wrong size, empty or cut short.

    The cheap probe (what a worker reports in /readyz, what the pipeline checks before loading): it
    never hashes; `verify` does, and so does `models.pipeline.loading_weights` before a pinned file loads.
    """
    root = resolve_dir(weights_dir)
    return [
        MissingFile(entry.name, root / entry.path)
        for entry in select(list(profile_requirements), manifest)
        if _check(entry, root / entry.path, hash_it=False).state in ("missing", "corrupt")
    ]


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
    interrupted pull from the same source and file version, `_download`; one process at a time per
    file), checked for size and sha256 where pinned, and only then renamed
    to their final name (same filesystem, so atomic); a failure, a mismatch included, raises
    DownloadError. Hub files go through `huggingface_hub.hf_hub_download(..., local_dir=...)`, which
    stages, resumes and renames the same way with its own `.incomplete` files.
    `offline` (default: $DYNFACE_OFFLINE) forbids any download: files still needed raise
    MissingWeightsError naming them, saying offline mode is on and how to fetch them elsewhere.
    `progress` shows progress bars, on a terminal only (a log file or a container's log gets none);
    False shows none, Hub downloads' included.
    `force` downloads every named file again, present ones too: a file without a pinned checksum
    ("unverified") that was cut short or copied in by hand is repaired only this way, unless it is
    empty or a checkpoint cut short (those are "corrupt"). The old file
    stays in place until the new one is complete and checked. It cannot be combined with `offline`.
    """
    root = resolve_dir(weights_dir)
    offline = offline_from_env() if offline is None else offline
    if force and offline:
        raise ValueError("force downloads the files again, which offline mode ($DYNFACE_OFFLINE) forbids")
    entries = select(None if names is None else list(names), manifest)
    todo = [
        e for e in entries if force or _check(e, root / e.path, hash_it=True).state in ("missing", "corrupt")
    ]
    if todo and offline:
        raise MissingWeightsError([e.name for e in todo], root, offline=True)
    for entry in todo:
        if entry.hf_repo is not None:
            _pull_hub(entry, root, progress, force)
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
    OS errors writing the weights dir (read-only, full, not a directory), during the download too,
    become DownloadErrors naming the file, which a worker reports as `missing_weights` and retries.
    """
    final = root / entry.path
    partial = _partial_path(root, entry)
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(_beside(partial, ".lock")):
            if not force and _check(entry, final, hash_it=True).state not in ("missing", "corrupt"):
                return  # another process fetched it while this one waited for the lock
            _download(entry, root, progress)
            size = partial.stat().st_size
            problem = None
            if entry.size is not None and size != entry.size:
                problem = f"downloaded {size} B, expected {entry.size} B"
            elif entry.sha256 is not None and (actual := file_sha256(partial)) != entry.sha256:
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
    except (DownloadError, UnreadableWeightsError):
        raise
    except OSError as e:
        raise _unwritable_error(entry, root, e) from e


def _unwritable_error(entry: WeightFile, root: Path, error: OSError) -> DownloadError:
    return DownloadError(
        f"Cannot write {entry.name} ({entry.file_name}) into the weights dir {root}: {error}. Make it "
        "writable (or set DYNFACE_WEIGHTS_DIR to a writable dir), then run "
        f"`{pull_command([entry.name])}`.",
        [entry.name],
    )


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _beside(partial, ".json").unlink(missing_ok=True)


#: Attempts after a network error (a dropped or reset connection, a timeout) that brought no new byte,
#: and the pause before each (as huggingface_hub's `http_get`, which this replaces for release assets).
_RETRIES = 5
_RETRY_PAUSE_S = 1.0
#: Answers retried (by huggingface_hub's `http_stream_backoff`: 5 times, pausing from _RETRY_PAUSE_S
#: doubling up to 8 s, or as a Retry-After says) before the download fails: a CDN's passing 5xx too.
_RETRY_STATUSES = (408, 429, 500, 502, 503, 504)


class _NoBar(tqdm):
    """A progress bar that never draws: `progress=False` (`--quiet`), for huggingface_hub's downloads
    too (its `tqdm_class`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "disable": True})


def _version(headers: Mapping[str, str]) -> str | None:
    """The file version a response names in the form If-Range accepts: its strong ETag, else its
    Last-Modified; None where it names neither (a weak ETag cannot be used in If-Range)."""
    etag = headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")


def _length(response: httpx2.Response) -> int | None:
    """The full length of the file a 200 or 206 response is part of (None where it does not say, or
    where a Content-Encoding makes the bytes written differ from the bytes sent)."""
    if response.headers.get("Content-Encoding", "identity") != "identity":
        return None
    if response.status_code == 206:
        return _range_total(response.headers.get("Content-Range"))
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _head(url: str) -> tuple[str | None, int | None]:
    """The server's version of `url` (`_version`) and its length, from a HEAD; (None, None) where the
    HEAD fails (the GET's answer then names the version)."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        response = get_session().head(url, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
    except (OSError, httpx2.HTTPError):
        return None, None
    if not response.is_success:
        return None, None
    return _version(response.headers), _length(response)


def _range_total(content_range: str | None) -> int | None:
    """The full length in a `Content-Range: bytes A-B/N` (or a 416's `bytes */N`), if it states one."""
    try:
        return int((content_range or "").rsplit("/", 1)[-1])
    except ValueError:
        return None


def _range_start(content_range: str | None) -> int | None:
    """A in `Content-Range: bytes A-B/N`."""
    try:
        return int((content_range or "").removeprefix("bytes ").split("-", 1)[0])
    except ValueError:
        return None


def _download(entry: WeightFile, root: Path, progress: bool) -> None:
    """Fetch `entry` into its partial file (`_partial_path`), resuming what an earlier pull left there
    only if it came from the same URL and from a version (ETag/Last-Modified) recorded with it that the
    server still has.

    Beside the partial, `<partial>.json` records its URL, version and full length as the first answer
    named them: the HEAD's, then the GET's (which wins where they differ, or where the HEAD failed).
    A partial with no recorded version (the server named none) is never resumed: its bytes could be
    of another version than the rest. Every ranged request, retries after a dropped connection
    included, carries If-Range with the recorded version, so a server that replaced the file sends
    all of it and the partial starts over instead of being spliced with the new file's tail.
    A partial cut short by the network is kept for the next pull when its version is known.
    A network failure raises DownloadError saying what to try next; an OS error of the weights dir
    (full, read-only) is raised as it is.
    """
    import httpx2

    partial = _partial_path(root, entry)
    source = _beside(partial, ".json")
    version, length = _head(entry.url)
    try:
        origin = json.loads(source.read_text()) if partial.is_file() else None
    except (OSError, ValueError):
        origin = None  # no record of where it came from: not safe to append to
    if not isinstance(origin, dict):
        origin = None
    size = partial.stat().st_size if partial.is_file() else 0
    stale = (
        origin is None
        or origin.get("url") != entry.url
        or origin.get("validator") is None  # of an unnamed version: maybe not the one served now
        or (version is not None and origin["validator"] != version)
        or (length is not None and origin.get("total") not in (None, length))
        or (length is not None and size > length)  # longer than the file: not a prefix of it
        or (entry.size is not None and size > entry.size)
    )
    if stale:
        _discard(partial)
        origin = {"url": entry.url, "validator": version, "total": length}
        source.write_text(json.dumps(origin))
    bar = (tqdm if progress else _NoBar)(
        total=origin.get("total") or entry.size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=entry.file_name,
        disable=None,  # drawn on a terminal only: a log file would get a line per refresh
    )
    try:
        with partial.open("ab") as f, bar:
            _fetch(entry, f, source, origin, bar)
    except (OSError, httpx2.HTTPError) as e:  # httpx2: the transport huggingface_hub 2.x uses
        kept = partial.stat().st_size if partial.is_file() else 0
        if kept == 0 or origin.get("validator") is None:
            _discard(partial)  # nothing a next pull may resume
            kept = 0
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the weights dir's (full, read-only), not the network's: `_pull_url` says so
        resume_note = f"; {kept} B kept, the next pull resumes" if kept else ""
        raise _network_error(entry, root, f"{e}{resume_note}") from e


def _network_error(entry: WeightFile, root: Path, problem: str) -> DownloadError:
    return DownloadError(
        f"Could not download {entry.name} from {entry.url}: {problem.rstrip('.')}. "
        + _network_hint(pull_command([entry.name]), root),
        [entry.name],
    )


def _fetch(entry: WeightFile, f: BinaryIO, source: Path, origin: dict[str, Any], bar: tqdm) -> None:
    """The GET loop of `_download`: appends to `f` (the partial file, opened for appending) until the
    file is complete, retrying dropped connections. `origin` (its record, in `source`) is updated
    whenever a whole-file answer names the version it is of.

    A 416 to `Range: bytes=N-` means the file has no byte N: if it is N bytes long, an earlier pull got
    all of it and stopped before the rename; else the partial is no prefix of it. Such a partial, and
    a 206 that is not its continuation (another start, another full length), is dropped and the file
    fetched from the start, once per call.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

    def restart() -> None:
        f.truncate(0)
        f.seek(0)  # truncate leaves the position where it was
        bar.reset(total=bar.total)

    started_over = False
    tries, furthest = _RETRIES, f.tell()
    while True:
        start = f.tell()
        if start and origin["validator"] is None:
            restart()  # this attempt's bytes are of no named version: never resumed, even within a call
            start = 0
        if entry.size is not None and start == entry.size:
            return  # all there (from an earlier pull): checked against the manifest next
        headers = {"Range": f"bytes={start}-", "If-Range": origin["validator"]} if start else {}
        try:
            with http_stream_backoff(
                "GET",
                entry.url,
                headers=headers,
                timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                base_wait_time=_RETRY_PAUSE_S,
                retry_on_exceptions=(),  # retried below, resuming from what arrived
                retry_on_status_codes=_RETRY_STATUSES,
            ) as response:
                total = _length(response)
                if response.status_code == 416 and start:
                    if _range_total(response.headers.get("Content-Range")) == start:
                        return
                    if started_over:
                        hf_raise_for_status(response)
                    started_over = True
                    restart()
                    continue
                hf_raise_for_status(response)
                if response.status_code == 206:
                    recorded = origin.get("total")
                    if _range_start(response.headers.get("Content-Range")) != start or (
                        recorded is not None and total != recorded
                    ):
                        if started_over:
                            raise OSError(
                                f"the server's answer to a resume is not the rest of the file "
                                f"(Content-Range {response.headers.get('Content-Range')!r})"
                            )
                        started_over = True
                        restart()
                        continue
                    if bar.n != start:  # a resumed pull's first answer
                        bar.reset(total=total if total is not None else bar.total)
                        bar.update(start)
                else:  # the whole file: a server that ignores Range, or one whose file is not that version
                    if start:
                        restart()
                    origin.update(validator=_version(response.headers), total=total)
                    source.write_text(json.dumps(origin))  # before its bytes, so a crash leaves the record
                    if total is not None:
                        bar.reset(total=total)
                for chunk in response.iter_bytes(chunk_size=constants.DOWNLOAD_CHUNK_SIZE):
                    f.write(chunk)
                    bar.update(len(chunk))
                    if f.tell() > furthest:  # new bytes: the retries start again
                        tries, furthest = _RETRIES, f.tell()
        except httpx2.TransportError as e:
            # Any network error (refused, reset, timed out, cut short, a proxy's) may pass; a URL or
            # request the client cannot send never will.
            if tries <= 0 or isinstance(e, (httpx2.UnsupportedProtocol, httpx2.LocalProtocolError)):
                raise
            tries -= 1
            log.warning("Error while downloading %s: %s; trying to resume", entry.url, e)
            time.sleep(_RETRY_PAUSE_S)
            continue
        if total is not None and f.tell() != total:
            raise OSError(f"the server sent {f.tell()} B of a {total} B file")
        return


def _pull_hub(entry: WeightFile, root: Path, progress: bool, force: bool) -> None:
    """Fetch a Hub file with huggingface_hub (which stages it as `.incomplete` under the target's
    `.cache/huggingface/`, resumes and renames it); a failure is a DownloadError as a release asset's."""
    import httpx2
    from huggingface_hub import hf_hub_download

    assert entry.hf_repo is not None  # only called for Hub entries
    sub = Path(entry.path).parent
    try:
        hf_hub_download(
            entry.hf_repo,
            entry.file_name,
            revision=entry.hf_revision,
            local_dir=root / sub,
            force_download=force,
            tqdm_class=None if progress else _NoBar,  # None: huggingface_hub's, on a terminal only
        )
    except (OSError, httpx2.HTTPError) as e:  # its HTTP errors and offline refusals are OSErrors
        if isinstance(e, OSError) and e.errno is not None:
            raise _unwritable_error(entry, root, e) from e
        raise _network_error(entry, root, str(e)) from e


# ---------------------------------------------------------------- CLI


def service_weights(profile_name: str, weights_dir: Path) -> tuple[list[str], list[str]]:
    """What a worker on the profile `profile_name` (`real` or `tiny`: `profile_and_dir`) loads from
    `weights_dir`, as `RestorationPipeline.from_pretrained` and the worker's
    start-up detector load take it: (required, optional). Required: the profile's files, with the prior
    in the format the pipeline loads from there (`models.pipeline.profile_weights`: the Hub copy where
    only that is present), its detector and, for a real profile, the configured background model's
    ($DYNFACE_BACKGROUND_MODEL; the tiny profile makes a random one and never reads the file).
    Optional: the profile's `optional_weights` not already required, which the service runs without.
    Together the default set of `weights pull` and `verify` — for the tiny profile only its small
    detector; the other format of the prior and an unconfigured background model are fetched only
    when named or with `--all`."""
    from models.background import BackgroundConfig  # torch: only this command needs it
    from models.pipeline import profile_weights  # imports this module: not at the top
    from models.profiles import PROFILES

    profile = PROFILES[profile_name]
    background = BackgroundConfig.from_env()  # checked whatever the profile: a worker refuses a bad one
    required = [
        *profile_weights(profile, weights_dir),
        profile.detector,
        *(background.weight_names if profile.real else ()),
    ]
    required = list(dict.fromkeys(required))
    return required, [n for n in dict.fromkeys(profile.optional_weights) if n not in required]


def add_weights_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `weights pull [--only NAME]... | [--all] [--force]`, `verify` (the same choice) and `list`.

    Each leaf parser sets `func(args) -> int` (the exit code) for the entry point to call.
    """
    weights = subparsers.add_parser("weights", help="download and check model weights")
    weights.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="weights dir (default: $DYNFACE_WEIGHTS_DIR; where $DYNFACE_PROFILE is a path, that dir)",
    )
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


def _service_dir(args: argparse.Namespace) -> tuple[str, Path]:
    """The profile the service runs ($DYNFACE_PROFILE) and the weights dir its worker loads from, as
    the worker resolves them (`profile_and_dir`): `pull`, `verify` and `list` work on that dir, so an
    init job fills the dir the worker reads. Where $DYNFACE_PROFILE is a path, that is the dir: a --dir
    naming another is refused (the worker would never read it)."""
    profile = os.environ.get("DYNFACE_PROFILE")
    name, root = profile_and_dir(profile, args.dir)
    if args.dir is not None and resolve_dir(args.dir).resolve() != root.resolve():
        raise ValueError(
            f"--dir {args.dir} is not the dir the service loads its weights from: DYNFACE_PROFILE={profile} "
            f"is itself its weights dir. Leave out --dir to use {root}, or set DYNFACE_PROFILE=real to "
            "use --dir."
        )
    return name, root


def _chosen(args: argparse.Namespace, profile_name: str, root: Path) -> tuple[list[str] | None, list[str]]:
    """--only's names, None (everything) for --all, else the files the service uses; and which of them
    are optional (only in the service's set: a file named or wanted with --all is wanted)."""
    if args.only or args.all:
        return args.only or None, []
    required, optional = service_weights(profile_name, root)
    return required + optional, optional


def _print_statuses(statuses: Sequence[Status], optional: Collection[str] = ()) -> None:
    for s in statuses:
        notes = [s.detail] if s.detail else []
        if s.name in optional:
            notes.append("optional: the service runs without it")
        detail = f"  ({'; '.join(notes)})" if notes else ""
        print(f"{s.name:24} {s.state:10} {s.path}{detail}")


def pull_optional(
    names: Iterable[str], weights_dir: str | Path | None = None, **options: Any
) -> tuple[list[Status], list[tuple[str, Exception]]]:
    """Fetch files the service runs without (parsing net, other detector), each best effort (`pull`'s
    ``options``): their statuses, and the (name, error) of each that could not be fetched (offline, no
    network, a failed download), for the caller to warn about — never raised."""
    root = resolve_dir(weights_dir)
    statuses: list[Status] = []
    failures: list[tuple[str, Exception]] = []
    for entry in (select([name])[0] for name in names):  # in the order given
        try:
            statuses += pull([entry.name], root, **options)
        except (OSError, ValueError) as e:  # MissingWeightsError and DownloadError are OSErrors
            failures.append((entry.name, e))
            statuses.append(_check(entry, root / entry.path, hash_it=False))
    return statuses, failures


def _cli_pull(args: argparse.Namespace) -> int:
    """Exit code 1 when a wanted file could not be fetched. Optional files (in the service's default
    set only) are fetched after the others, best effort as a worker does at start (`pull_optional`):
    one that cannot be fetched is a warning, since the service runs without it, so an init job's
    `pull && verify` does not stop a deployment for it."""
    options = {"offline": args.offline, "progress": not args.quiet, "force": args.force}
    try:
        profile_name, root = _service_dir(args)
        names, optional = _chosen(args, profile_name, root)
        wanted = None if names is None else [n for n in names if n not in optional]
        statuses = pull(wanted, root, **options)
    except (KeyError, ValueError, OSError) as e:  # MissingWeightsError and DownloadError are OSErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    fetched, failures = pull_optional(optional, root, **options)
    for name, e in failures:
        print(f"warning: optional {name} not fetched (the service runs without it): {e}", file=sys.stderr)
    _print_statuses(statuses + fetched, optional)
    return 0


def _cli_verify(args: argparse.Namespace) -> int:
    """Exit code 1 when a file is corrupt, or missing and not optional (the service would not start)."""
    try:
        profile_name, root = _service_dir(args)
        names, optional = _chosen(args, profile_name, root)
        statuses = verify(root, names=names)
    # An unknown --only, a bad $DYNFACE_BACKGROUND_MODEL, an unreadable file, a --dir the service does
    # not read: reported as `pull` does.
    except (KeyError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_statuses(statuses, optional)
    failed = [
        s for s in statuses if s.state == "corrupt" or (s.state == "missing" and s.name not in optional)
    ]
    return 1 if failed else 0


def _cli_list(args: argparse.Namespace) -> int:
    """Every manifest file with its state by existence and size (cheap; `verify` also hashes), and
    any unfinished download of a release asset waiting under .partial/ (huggingface_hub keeps a Hub
    file's under .cache/huggingface/ in its folder, not shown)."""
    try:
        root = _service_dir(args)[1]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for e in MANIFEST:
        state = _check(e, root / e.path, hash_it=False).state
        size = f"{e.size} B" if e.size is not None else "size unknown"
        checksum = "sha256 pinned" if e.sha256 else "no checksum"
        print(f"{e.name:24} {state:10} {size:>14}  {checksum:14} {e.url}")
        print(f"{'':24} {e.description}")
        partial = _partial_path(root, e)
        if partial.is_file():
            print(f"{'':24} unfinished download: {partial.stat().st_size} B in {partial}")
    return 0
