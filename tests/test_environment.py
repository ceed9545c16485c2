"""environment.yml (conda) must stay in step with pyproject.toml (pip).

conda is not available where the tests run, so the conda file is only parsed and compared: every runtime
dependency, and every dependency of the extras that environment.yml installs, must be listed there by name
with the same version range, nothing else may be listed, and its Python must satisfy requires-python.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

yaml = pytest.importorskip("yaml")  # comes with jupyter-book; not a dependency of minillava itself

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "minillava"


def canonical(name: str) -> str:
    """PEP 503 name normalisation: 'Jupyter_Book' and 'jupyter-book' are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def load_pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def load_environment() -> tuple[list[str], list[str]]:
    """Return (conda dependency strings, pip lines) of environment.yml."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = [], []
    for item in env["dependencies"]:
        if isinstance(item, dict):
            pip.extend(item.get("pip", []))
        else:
            conda.append(str(item))
    return conda, pip


def split_pip(lines: list[str]) -> tuple[dict[str, Requirement], set[str]]:
    """Split pip lines into {name: requirement} and the extras of the editable install of this project."""
    reqs, extras = {}, set()
    for line in lines:
        if line.startswith("-e"):
            target = line[2:].strip()
            match = re.fullmatch(r"\.(?:\[([\w,\s-]*)\])?", target)
            assert match, f"environment.yml: unexpected editable install {line!r}"
            extras |= {e.strip() for e in (match.group(1) or "").split(",") if e.strip()}
            continue
        req = Requirement(line)
        assert canonical(req.name) not in reqs, f"environment.yml lists {req.name} twice"
        reqs[canonical(req.name)] = req
    return reqs, extras


def expand_extras(project: dict, extras: set[str]) -> list[Requirement]:
    """Dependencies of the given extras, following self-references such as 'minillava[notebooks]'."""
    optional = project.get("optional-dependencies", {})
    out, todo, seen = [], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"environment.yml installs extra [{extra}], which pyproject.toml lacks"
        for line in optional[extra]:
            req = Requirement(line)
            if canonical(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def expected_requirements() -> list[Requirement]:
    project = load_pyproject()
    _, pip = load_environment()
    _, extras = split_pip(pip)
    return [Requirement(r) for r in project["dependencies"]] + expand_extras(project, extras)


def test_environment_installs_this_project_with_extras():
    _, pip = load_environment()
    _, extras = split_pip(pip)
    assert extras, "environment.yml should install this checkout with `-e .[...]`"
    expand_extras(load_pyproject(), extras)  # every extra named there exists in pyproject.toml


def test_every_dependency_is_in_environment_yml_with_the_same_range():
    _, pip = load_environment()
    listed, _ = split_pip(pip)
    missing, differing = [], []
    for req in expected_requirements():
        got = listed.get(canonical(req.name))
        if got is None:
            missing.append(str(req))
        elif got.specifier != req.specifier:
            differing.append(
                f"{req.name}: pyproject {req.specifier or 'any'}, conda {got.specifier or 'any'}"
            )
    assert not missing, f"in pyproject.toml but not in environment.yml: {missing}"
    assert not differing, f"version ranges disagree: {differing}"


def test_environment_yml_lists_nothing_that_pyproject_lacks():
    _, pip = load_environment()
    listed, _ = split_pip(pip)
    expected = {canonical(r.name) for r in expected_requirements()}
    extra = sorted(set(listed) - expected)
    assert not extra, f"in environment.yml but not in pyproject.toml: {extra}"


def test_python_version_agrees_with_requires_python():
    conda, _ = load_environment()
    pythons = [d for d in conda if re.match(r"python\b", d) and not d.startswith("python-")]
    assert len(pythons) == 1, f"environment.yml should pin one Python, found {pythons}"
    match = re.fullmatch(r"python\s*=*\s*([\d.]+)\*?", pythons[0])
    assert match, f"environment.yml: cannot read the Python version in {pythons[0]!r}"
    requires = SpecifierSet(load_pyproject()["requires-python"])
    assert Version(match.group(1)) in requires, f"python {match.group(1)} does not satisfy {requires}"


def test_no_torchvision():
    """PyPI's torchvision fails to import beside the CPU torch build; nothing may pull it in by name."""
    for req in expected_requirements():
        assert canonical(req.name) != "torchvision", str(req)
        assert not (canonical(req.name) == "transformers" and "vision" in req.extras), str(req)
