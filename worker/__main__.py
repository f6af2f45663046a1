"""`python -m worker --device cuda:0` = `dynface worker --device cuda:0`."""

import sys

from worker.cli import main

raise SystemExit(main(["worker", *sys.argv[1:]]))
