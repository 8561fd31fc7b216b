"""The install is locked: requirements.lock pins every package exactly, agrees with pyproject.toml's
ranges, is what the README commands and the image install, and this environment is exactly the lock."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def _lock_check():
    spec = importlib.util.spec_from_file_location("lock_check", ROOT / "scripts" / "lock_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_line_of_the_lock_is_an_exact_pin():
    pins = _lock_check().locked(LOCK)  # raises on any line that is not name==version
    assert len(pins) > 100 and pins["ray"] and pins["torch"]


def test_the_lock_satisfies_every_direct_requirement():
    pins = _lock_check().locked(LOCK)
    for req in _direct_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency in pyproject.toml but not in requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {req}"
        )


@pytest.mark.skipif(
    os.environ.get("SPAE_FRESH_RESOLVE") == "1",
    reason="check-upgrade.sh: a fresh resolve, not the lock",
)
def test_this_environment_is_exactly_the_lock():
    """scripts/_install.sh (both README commands, CI) installs the lock and nothing else."""
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lock_check.py")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_differences_name_each_kind_of_drift():
    missing, wrong, extra = _lock_check().differences(
        {"numpy": "2.4.6", "torch": "2.14.1"}, {"numpy": "2.5.0", "spae": "0.1.0", "pip": "25", "six": "1.16"}
    )
    assert missing == ["torch==2.14.1"]
    assert wrong == ["numpy: 2.5.0 installed, 2.4.6 locked"]
    assert extra == ["six"]  # the project itself and pip are not locked


def test_readme_ci_and_image_install_from_the_lock():
    install = (ROOT / "scripts" / "_install.sh").read_text()
    assert "-r requirements.lock" in install and "lock_check.py --sync" in install
    for script in ("demo.sh", "test.sh"):
        assert "source scripts/_install.sh" in (ROOT / "scripts" / script).read_text()
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert "--no-deps -r requirements.lock -r infra/docker/requirements-gpu.lock" in dockerfile
    gpu = [
        line
        for line in (ROOT / "infra/docker/requirements-gpu.lock").read_text().splitlines()
        if "==" in line
    ]
    assert any(line.startswith("faiss-gpu==") for line in gpu)
    assert not set(_lock_check().locked(ROOT / "infra/docker/requirements-gpu.lock")) & set(
        _lock_check().locked(LOCK)
    ), "the image's GPU lock only adds packages; shared ones come from requirements.lock"
