"""Compare an environment with requirements.lock: every locked package (whose markers match this interpreter)
installed at its exact version, nothing else installed but the project itself and pip.

    .venv/bin/python scripts/lock_check.py            # report; exit 1 on any difference
    .venv/bin/python scripts/lock_check.py --sync     # first uninstall what the lock does not list
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

UNLOCKED = {"spae", "pip"}  # the project itself (installed editable) and the installer


def locked(lock: Path) -> dict[str, str]:
    """name -> version for every line of `lock` whose environment markers hold here."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        (spec,) = req.specifier  # a lock pins each package with exactly one ==
        assert spec.operator == "==", f"{lock}: {line!r} is not an exact pin"
        pins[canonicalize_name(req.name)] = spec.version
    return pins


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def differences(pins: dict[str, str], have: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(f"{n}=={v}" for n, v in pins.items() if n not in have)
    wrong = sorted(
        f"{n}: {have[n]} installed, {v} locked"
        for n, v in pins.items()
        if n in have and Version(have[n]) != Version(v)
    )
    extra = sorted(n for n in have if n not in pins and n not in UNLOCKED)
    return missing, wrong, extra


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lock", type=Path, default=Path(__file__).resolve().parent.parent / "requirements.lock"
    )
    parser.add_argument("--sync", action="store_true", help="uninstall packages the lock does not list")
    args = parser.parse_args()
    pins = locked(args.lock)
    missing, wrong, extra = differences(pins, installed())
    if args.sync and extra:
        print(f"removing {len(extra)} package(s) not in {args.lock.name}: {' '.join(extra)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
        missing, wrong, extra = differences(pins, installed())
    for kind, rows in (("missing", missing), ("other version", wrong), ("not locked", extra)):
        for row in rows:
            print(f"{args.lock.name}: {kind}: {row}", file=sys.stderr)
    return 1 if missing or wrong or extra else 0


if __name__ == "__main__":
    sys.exit(main())
