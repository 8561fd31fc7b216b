"""The deployment manifests stay in step with the code: every YAML parses, every ``spae <command>`` they
run exists, and every ``--config`` file and ``key=value`` override they pass is valid for that
command's config class (``jobs.<command>.CONFIG_CLASS``)."""

from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs.cli import COMMANDS
from spae.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
YAML_FILES = sorted(INFRA.rglob("*.yaml"))
CONFIG_MOUNT = "/etc/spae"  # where raycluster.yaml mounts the spae-job-configs ConfigMap


@dataclass(frozen=True)
class SpaeCall:
    source: str  # file that names it
    command: str
    args: tuple[str, ...]


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return []


def _calls_in(text: str, source: str) -> list[SpaeCall]:
    """Every ``spae <command> args...`` in a shell snippet (split at &&, ||, ;, | and newlines)."""
    calls = []
    for part in re.split(r"&&|\|\||;|\||\n", text):
        try:
            tokens = shlex.split(part)
        except ValueError:
            continue
        if tokens and Path(tokens[0]).name == "spae":
            command = tokens[1] if len(tokens) > 1 else "--help"
            calls.append(SpaeCall(source, command, tuple(tokens[2:])))
    return calls


def _all_calls() -> list[SpaeCall]:
    calls = []
    for path in YAML_FILES:
        for doc in _documents(path):
            if doc.get("kind") == "ConfigMap":
                continue  # data, not commands
            for text in _strings(doc):
                calls += _calls_in(text, str(path.relative_to(ROOT)))
    dockerfile = INFRA / "docker" / "Dockerfile"
    for line in dockerfile.read_text().splitlines():
        line = line.strip()
        if line.startswith("CMD [") or line.startswith("ENTRYPOINT ["):
            words = yaml.safe_load(line.split(None, 1)[1])
            calls += _calls_in(shlex.join(words), "infra/docker/Dockerfile")
        elif not line.startswith("#"):
            calls += _calls_in(line.removeprefix("RUN ").rstrip("\\"), "infra/docker/Dockerfile")
    return calls


def _job_configs() -> dict[str, str]:
    """``/etc/spae/<name>`` -> YAML text, from the ConfigMap the clusters mount."""
    out = {}
    for doc in _documents(INFRA / "kuberay" / "configmap.yaml"):
        if doc["metadata"]["name"] == "spae-job-configs":
            out = {f"{CONFIG_MOUNT}/{name}": text for name, text in doc["data"].items()}
    return out


def _config_class(command: str):
    """The command's config class; raises LookupError naming what is missing."""
    try:
        module = importlib.import_module(COMMANDS[command])
    except ModuleNotFoundError as e:
        raise LookupError(f"job module {COMMANDS[command]} for 'spae {command}' is missing ({e})") from e
    cls = getattr(module, "CONFIG_CLASS", None)
    if cls is None:
        raise LookupError(f"{COMMANDS[command]} has no CONFIG_CLASS")
    return cls


def test_every_yaml_parses_and_has_a_kind_or_is_the_launcher():
    assert len(YAML_FILES) >= 7
    for path in YAML_FILES:
        docs = _documents(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert "kind" in doc or "cluster_name" in doc, (
                f"{path}: neither a Kubernetes object nor a cluster"
            )


def test_manifests_name_pipeline_jobs():
    commands = {call.command for call in _all_calls()}
    assert {"vocab", "pools", "train", "tokenize"} <= commands


def test_every_spae_command_exists_and_its_config_is_valid(tmp_path):
    """Checks every call; missing job modules and bad keys are all listed in one failure."""
    configs = _job_configs()
    problems, checked = [], 0
    for i, call in enumerate(_all_calls()):
        where = f"{call.source}: 'spae {call.command}'"
        if call.command.startswith("-") or call.command == "submit":
            continue  # `spae --help`; submit's own options (what it submits is checked where defined)
        if call.command not in COMMANDS:
            problems.append(f"{where} is not a spae command (choose from {', '.join(COMMANDS)})")
            continue
        config_file, overrides = None, []
        args = list(call.args)
        while args:
            arg = args.pop(0)
            if arg == "--config" and args:
                name = args.pop(0)
                if name not in configs:
                    problems.append(f"{where}: --config {name} is not in the spae-job-configs ConfigMap")
                    continue
                config_file = tmp_path / f"{call.command}-{i}.yaml"
                config_file.write_text(configs[name])
            elif "=" in arg and not arg.startswith("-"):
                overrides.append(arg)
            else:
                problems.append(f"{where}: unexpected argument {arg!r}")
        try:
            load_config(_config_class(call.command), config_file, overrides)
            checked += 1
        except (LookupError, ConfigError) as e:
            problems.append(f"{where}: {e}")
    assert not problems, "\n".join(problems)
    assert checked >= 8


def test_every_mounted_job_config_is_valid(tmp_path):
    problems = []
    for path, text in _job_configs().items():
        command = Path(path).stem
        if command not in COMMANDS:
            problems.append(f"ConfigMap key {path}: no spae command '{command}'")
            continue
        file = tmp_path / Path(path).name
        file.write_text(text)
        try:
            load_config(_config_class(command), file)
        except (LookupError, ConfigError) as e:
            problems.append(f"ConfigMap key {path}: {e}")
    assert not problems, "\n".join(problems)


def test_secrets_only_as_placeholders_and_referenced_objects_exist():
    secret = _documents(INFRA / "kuberay" / "secret.template.yaml")[0]
    assert secret["kind"] == "Secret"
    assert all(value == "REPLACE_ME" for value in secret["stringData"].values())
    settings = next(
        d
        for d in _documents(INFRA / "kuberay" / "configmap.yaml")
        if d["metadata"]["name"] == "spae-settings"
    )
    assert not [k for k in settings["data"] if re.search("SECRET|PASSWORD|TOKEN|ACCESS_KEY", k)]
    names = {"configMapRef": {"spae-settings"}, "secretRef": {secret["metadata"]["name"]}}
    for path in (INFRA / "kuberay").glob("ray*.yaml"):
        text = path.read_text()
        for ref, allowed in names.items():
            for match in re.finditer(rf"{ref}:\s*\n\s*name:\s*(\S+)", text):
                assert match.group(1) in allowed, f"{path.name}: {ref} {match.group(1)} is not defined"
        assert "AWS_SECRET_ACCESS_KEY" not in text, f"{path.name} must take credentials from the Secret"


def test_ray_version_matches_the_pinned_ray():
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    ray_version = next(line.split("==")[1].strip() for line in lock if line.startswith("ray=="))
    for path in (INFRA / "kuberay").glob("ray*.yaml"):
        for doc in _documents(path):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"]) if doc["kind"] == "RayJob" else doc["spec"]
            if "rayVersion" in spec:
                assert spec["rayVersion"] == ray_version, f"{path.name}: rayVersion {spec['rayVersion']}"
    cluster = _documents(INFRA / "kuberay" / "raycluster.yaml")[0]
    gpu = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
