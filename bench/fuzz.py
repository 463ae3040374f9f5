"""The fuzz suite (tests/test_fuzz.py) with more cases per reader than CI runs.

    python bench/fuzz.py                 # 400 cases per reader
    python bench/fuzz.py --examples 2000

Seeded (derandomized): the same cases every run for a given count. Prints the cases tried,
refused (the package's one-line error) and clean (read without complaint) per reader; any
other outcome fails the run with the smallest input Hypothesis finds.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=400, help="cases per reader")
    args = p.parse_args()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MLXFLUX_FUZZ_EXAMPLES": str(args.examples)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"]
    return subprocess.run(cmd, cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
