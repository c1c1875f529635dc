"""Renders helm/nerve with `helm template` for the tests.

HELM names the helm binary (scripts/helm-check.sh sets it); KUBE_VERSION the Kubernetes version
passed to `helm template --kube-version`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable

import pytest
import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "nerve"
VALUES = HERE / "values"
HELM = os.environ.get("HELM", "helm")
KUBE_VERSION = os.environ.get("KUBE_VERSION", "1.30.0")
RELEASE = "t"
FULLNAME = "t-nerve"


class RenderError(Exception):
    pass


def _helm_template(
    values_files: Iterable[str | Path], sets: Iterable[str], chart: Path, extra: Iterable[str] = ()
) -> subprocess.CompletedProcess[str]:
    cmd = [HELM, "template", RELEASE, str(chart), "--namespace", "ns", "--kube-version", KUBE_VERSION]
    for f in values_files:
        path = Path(f)
        cmd += ["-f", str(path if path.is_absolute() or path.exists() else VALUES / path)]
    for s in sets:
        cmd += ["--set", s]
    cmd += list(extra)
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


class Manifests:
    def __init__(self, docs: list[dict[str, Any]]):
        self.docs = docs

    def kinds(self) -> list[str]:
        return sorted(d["kind"] for d in self.docs)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def maybe(self, kind: str) -> dict[str, Any] | None:
        found = self.all(kind)
        assert len(found) <= 1, f"more than one {kind}"
        return found[0] if found else None

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, rendered {self.kinds()}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert len(containers) == 1
        return containers[0]

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.container.get("env", [])}

    def named(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, rendered {self.kinds()}"
        return found[0]

    @property
    def config(self) -> dict[str, str]:
        """The server's settings: the ConfigMap named after the release (the policy has its own)."""
        return self.named("ConfigMap", FULLNAME)["data"]


def render(*values_files: str | Path, sets: Iterable[str] = (), chart: Path = CHART) -> Manifests:
    """Renders the chart; fails the test with helm's message when rendering fails."""
    done = _helm_template(values_files, sets, chart)
    if done.returncode != 0:
        raise RenderError(done.stderr)
    return Manifests([d for d in yaml.safe_load_all(done.stdout) if d])


def render_error(*values_files: str | Path, sets: Iterable[str] = ()) -> str:
    """Renders the chart expecting failure; returns helm's message."""
    done = _helm_template(values_files, sets, CHART)
    assert done.returncode != 0, f"rendering succeeded but should have failed:\n{done.stdout[:2000]}"
    return done.stderr


def render_notes(tmp_path: Path, *values_files: str | Path, sets: Iterable[str] = ()) -> str:
    """Renders templates/NOTES.txt (which `helm template` leaves out) through a copy of the chart with a
    ConfigMap template that evaluates it."""
    chart = tmp_path / "nerve"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n'
    )
    done = _helm_template(values_files, sets, chart, ["--show-only", "templates/zz-notes.yaml"])
    if done.returncode != 0:
        raise RenderError(done.stderr)
    return yaml.safe_load(done.stdout)["data"]["notes"]


VALUE_FILES = sorted(p.name for p in VALUES.glob("*.yaml"))


@pytest.fixture(params=[None, *VALUE_FILES], ids=["defaults", *VALUE_FILES])
def any_values(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """Each value set the check renders: the defaults and every file in values/."""
    return () if request.param is None else (request.param,)


@pytest.fixture(scope="session", autouse=True)
def _helm_present() -> None:
    if shutil.which(HELM) is None and not Path(HELM).exists():
        pytest.fail(f"helm not found ({HELM}): run scripts/helm-check.sh, which installs it")
