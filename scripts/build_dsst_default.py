"""Build models/data/dsst_default.json: P_face from a folder of aligned 512 faces + the analytic DSST.

    python scripts/build_dsst_default.py [--faces ../shared/testdata/aligned] [--sigmas 1 2 4]
                                         [--out models/data/dsst_default.json]

The only real faces available to the project are DifFace's 20 *low-quality* aligned test faces, so the
shipped P_face is their mean spectrum, not FFHQ's: it is blurrier and carries their 8-bit quantisation
floor at high frequencies. The provenance written into the JSON says so; rebuild from clean FFHQ crops
when they are available.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.dsst import DIFFACE_START_INDEX, FACE_SUFFIXES, build_analytic, face_power_spectrum  # noqa: E402
from models.schedule import RespacedSchedule  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--faces",
        type=Path,
        default=REPO.parent / "shared" / "testdata" / "aligned",
        help="folder of aligned size x size face images (png/jpg) whose mean spectrum becomes P_face",
    )
    parser.add_argument(
        "--sigmas", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="blur levels in px (increasing)"
    )
    parser.add_argument("--size", type=int, default=512, help="face size in px the levels refer to")
    parser.add_argument("--spec", default="ddim250", help="respacing of the 1000-step schedule")
    parser.add_argument(
        "--heaviest-start",
        type=int,
        default=DIFFACE_START_INDEX,
        help="start index of the heaviest level; tau is calibrated to it (DifFace's 100)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "models" / "data" / "dsst_default.json", help="table to write"
    )
    args = parser.parse_args(argv)

    paths = sorted(p for p in args.faces.iterdir() if p.suffix.lower() in FACE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no face images in {args.faces}")
    spectrum = face_power_spectrum(paths, args.size)

    command = "python scripts/build_dsst_default.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    provenance = (
        f"P_face = mean radial power spectrum of {len(paths)} real LOW-QUALITY aligned {args.size}px faces "
        f"(DifFace testdata/cropped_faces, S-Lab License 1.0; folder {args.faces.name}/), NOT clean FFHQ "
        "faces: blurrier than clean faces and including their 8-bit quantisation floor. Start indices from "
        "the analytic rule only, not validated by the empirical builder (no ground-truth validation set). "
        f"Built with: {command.strip()}"
    )
    table = build_analytic(
        RespacedSchedule.from_spec(args.spec),
        spectrum,
        args.sigmas,
        args.heaviest_start,
        image_size=args.size,
        provenance=provenance,
    )
    args.out.write_text(table.to_json() + "\n", encoding="utf-8")
    print(
        f"wrote {args.out}: sigmas {table.sigmas} -> start indices {table.start_indices}, tau {table.tau:.4g}"
    )


if __name__ == "__main__":
    main()
