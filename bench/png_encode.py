"""PNG encoding of results: encode time and bytes per zlib level (the DYNFACE_PNG_COMPRESS_LEVEL choice).

The worker encodes every result on the thread that drives the GPU, so encode time is time the GPU
waits. PNG is lossless: the level changes only time and bytes (checked here: every level's file
decodes to the same pixels).

Images: the real photos of ../shared/testdata/photos and the first `--faces` aligned 512 px faces of
../shared/testdata/aligned, each also at 2x (Lanczos), the size an `upscale=2` result has. Each is
encoded with `models.images.encode_image(rgb, format="png", png_compress_level=L)` for every level
in `--levels`, after one untimed call; time = median of `--repeats` calls (`time.perf_counter`).
Reported per level: the summed median time and the summed bytes over the set, and both relative to
Pillow's default level 6; and per image size class the same sums.

Usage: .venv/bin/python -m bench.png_encode [--levels 0,1,2,3,4,6] [--faces 5] [--repeats 5]
       [--no-write]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench._report import ALIGNED, SHARED, header, write_section
from models import images

PHOTOS = SHARED / "testdata" / "photos"


@dataclass(frozen=True)
class Sample:
    name: str
    group: str  # "photo", "photo 2x", "face", "face 2x"
    rgb: np.ndarray


def load_samples(faces: int) -> list[Sample]:
    files = [("photo", p) for p in sorted(PHOTOS.iterdir())] + [
        ("face", p) for p in sorted(ALIGNED.glob("*.png"))[:faces]
    ]
    samples = []
    for group, path in files:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        doubled = rgb.resize((rgb.width * 2, rgb.height * 2), Image.Resampling.LANCZOS)
        samples.append(Sample(path.name, group, np.asarray(rgb)))
        samples.append(Sample(path.name, f"{group} 2x", np.asarray(doubled)))
    return samples


def measure(sample: Sample, level: int, repeats: int) -> tuple[float, int]:
    """(median encode seconds, bytes); asserts the file decodes to the input's pixels."""
    data, _ = images.encode_image(sample.rgb, format="png", png_compress_level=level)
    with Image.open(io.BytesIO(data)) as im:
        if not np.array_equal(np.asarray(im.convert("RGB")), sample.rgb):
            raise AssertionError(f"level {level} changed the pixels of {sample.name}")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        images.encode_image(sample.rgb, format="png", png_compress_level=level)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="0,1,2,3,4,6")
    p.add_argument("--faces", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    args = p.parse_args(argv)
    levels = [int(v) for v in args.levels.split(",")]
    if 6 not in levels:
        levels.append(6)  # the reference column
    samples = load_samples(args.faces)
    head = header("PNG encoding: time and bytes per zlib level")
    t_start = time.perf_counter()

    # results[level][group] = [seconds, bytes]
    results: dict[int, dict[str, list[float]]] = {lv: {} for lv in levels}
    for sample in samples:
        for level in levels:
            seconds, size = measure(sample, level, args.repeats)
            for key in (sample.group, "all"):
                acc = results[level].setdefault(key, [0.0, 0.0])
                acc[0] += seconds
                acc[1] += size

    groups = ["photo", "photo 2x", "face", "face 2x"]
    counts = {g: sum(s.group == g for s in samples) for g in groups}
    pixels = {g: sum(s.rgb.shape[0] * s.rgb.shape[1] for s in samples if s.group == g) for g in groups}
    ref = results[6]["all"]
    rows = []
    for level in sorted(levels):
        t, b = results[level]["all"]
        per_group = " | ".join(
            f"{results[level][g][0] * 1e3:.0f} / {results[level][g][1] / 1e3:.0f}" for g in groups
        )
        default = " (default)" if level == images.PNG_COMPRESS_LEVEL else ""
        rows.append(
            f"| {level}{default} | {t * 1e3:.0f} | {b / 1e3:.0f} | {t / ref[0]:.2f}× | {b / ref[1]:.2f}× "
            f"| {per_group} |"
        )
    elapsed = time.perf_counter() - t_start
    group_heads = " | ".join(f"{g}: ms / KB" for g in groups)
    sets = ", ".join(f"{g} {counts[g]} ({pixels[g] / 1e6:.1f} MP)" for g in groups)
    body = f"""{head}
- images: the photos of `shared/testdata/photos`, the first {args.faces} faces of `shared/testdata/aligned`,
  and each at 2× (Lanczos), the size of an `upscale=2` result. Every level's file decoded to the same
  pixels (checked). Count (pixels) per group: {sets}.
- time: `models.images.encode_image(rgb, format="png", png_compress_level=L)`, median of {args.repeats}
  calls per image, summed over the images; bytes summed likewise. Run took {elapsed:.0f} s.

| level | encode ms (all) | KB (all) | time vs 6 | bytes vs 6 | {group_heads} |
|---|---|---|---|---|{"---|" * len(groups)}
{chr(10).join(rows)}

The service writes PNG results at level {images.PNG_COMPRESS_LEVEL} (`DYNFACE_PNG_COMPRESS_LEVEL`,
docs/configuration.md): the worker encodes on the thread that drives the GPU, so a lower level frees
it sooner, and no pixel changes.
"""
    if args.no_write:
        print(body)
    else:
        write_section("png_encode", body)


if __name__ == "__main__":
    main()
