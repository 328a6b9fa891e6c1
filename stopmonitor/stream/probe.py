"""Liveness probe of stream mode: ``python -m stopmonitor.stream.probe PATH MAX_AGE_SECONDS``.

Exit 0 when the progress file (written on every stream message and every completed REST
read, at most once a second) is younger than MAX_AGE_SECONDS, 1 otherwise, with one line.
No Django import: it runs in milliseconds inside the pod.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m stopmonitor.stream.probe PATH MAX_AGE_SECONDS", file=sys.stderr)
        return 2
    path, max_age = argv[0], float(argv[1])
    try:
        age = time.time() - os.path.getmtime(path)
    except OSError:
        print(f"no progress yet: {path} does not exist", file=sys.stderr)
        return 1
    if age > max_age:
        print(f"no progress for {age:.0f}s (max {max_age:.0f}s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
