"""The Dockerfile, checked without a container engine (none runs on these machines).

- hadolint (the Dockerfile linter, installed as a Python wheel) finds nothing;
- the final stage is what the chart and the worker Jobs rely on: numeric non-root user
  65532 (``plan.WORKER_UID``), Python's no-bytecode/unbuffered switches, no RUN step (so
  no compiler or package manager can be left in it), only the builder's virtualenv;
- the ``.dockerignore`` keeps everything the COPY lines need and nothing else of note;
- the builder stage's RUN lines run exactly as written, in a fresh folder standing in
  for the image's filesystem, and both entry points then start (``--help`` exits 0)
  as uid 65532 without writing anything outside /tmp.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagebatch_operator import plan

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# -- a small Dockerfile reader --------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The stage's ENV values in order (``$VAR`` left as written)."""
        values: dict[str, str] = {}
        for line in self.all("ENV"):
            for pair in shlex.split(line):
                key, _, value = pair.partition("=")
                values[key] = value
        return values


def instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip()))
    return result


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each with its base image resolved."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base, name))
        elif not stages and instruction.keyword == "ARG":
            key, _, value = instruction.arguments.partition("=")
            args[key] = value
        elif stages:
            stages[-1].instructions.append(instruction)
    return args, stages


def stages() -> list[Stage]:
    return parse(DOCKERFILE.read_text())[1]


# -- .dockerignore as the Docker CLI reads it ------------------------------------------


def _glob(pattern: str, path: str) -> bool:
    """Go ``filepath.Match`` plus ``**`` (any number of folders), as moby's matcher."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        else:
            chunk = fnmatch.translate(pattern[i]).removeprefix("(?s:").removesuffix(")\\Z")
            regex += "[^/]*" if pattern[i] == "*" else "[^/]" if pattern[i] == "?" else chunk
            i += 1
    return re.fullmatch(regex, path) is not None


def ignored(path: str, patterns: list[str]) -> bool:
    """Last matching pattern wins; a pattern matching a parent folder matches the path."""
    parts = path.split("/")
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        clean = pattern.removeprefix("!").strip("/")
        if any(_glob(clean, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not negate
    return result


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]


def build_context() -> list[str]:
    """Every file of the work tree that the Docker CLI would send as build context."""
    patterns = dockerignore_patterns()
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = Path(dirpath).relative_to(ROOT).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv")]
        files += [prefix + f for f in filenames if not ignored(prefix + f, patterns)]
    return sorted(files)


# -- tests ----------------------------------------------------------------------------


def tool(name: str) -> str:
    """A tool installed next to this interpreter (the dev extra), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def test_hadolint_finds_nothing_to_complain_about() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_is_really_linting() -> None:
    """The same linter call fails on a Dockerfile with known mistakes."""
    with tempfile.TemporaryDirectory() as folder:
        bad = Path(folder) / "Dockerfile"
        bad.write_text("FROM python\nRUN apt-get install gcc\nRUN cd /src\n")
        result = subprocess.run(
            [tool("hadolint"), "--no-color", str(bad)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3008" in result.stdout  # unpinned apt package


def test_two_stages_on_the_slim_python_311_base() -> None:
    built = stages()
    assert [s.name for s in built] == ["builder", ""]
    for stage in built:
        assert stage.base.startswith("python:3.11-slim"), stage.base


def test_final_stage_runs_as_the_numeric_worker_uid() -> None:
    final = stages()[-1]
    assert final.all("USER") == [f"{plan.WORKER_UID}:{plan.WORKER_UID}"]


def test_final_stage_sets_the_python_runtime_switches() -> None:
    env = stages()[-1].env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")
    assert env["HOME"] == "/tmp"  # the only writable folder under readOnlyRootFilesystem


def test_final_stage_only_copies_the_builders_virtualenv() -> None:
    final = stages()[-1]
    venv = final.env()["VIRTUAL_ENV"]
    assert final.all("RUN") == []  # no compiler, no package manager, no pip step
    assert final.all("COPY") == [f"--from=builder {venv} {venv}"]
    assert final.all("ADD") == []
    assert stages()[0].env()["VIRTUAL_ENV"] == venv  # same path: the venv's scripts work


def test_command_is_an_entry_point_in_exec_form() -> None:
    assert stages()[-1].all("CMD") == ['["imagebatch-operator"]']


def test_no_build_tools_are_installed_anywhere() -> None:
    text = DOCKERFILE.read_text()
    for word in ("apt-get", "apk ", "gcc", "build-essential", "curl", "wget"):
        assert word not in "\n".join(i.arguments for i in instructions(text)), word


def test_builder_run_lines_use_no_absolute_paths() -> None:
    """So that running them here, in a folder standing in for /, runs the same commands."""
    for line in stages()[0].all("RUN"):
        assert not re.search(r"(^|\s)/", line), line


def test_dockerignore_keeps_what_copy_needs_and_drops_the_rest() -> None:
    context = build_context()
    for line in stages()[0].all("COPY"):
        *sources, _dest = line.split()
        for source in sources:
            assert any(f == source or f.startswith(source) for f in context), source
    assert "pyproject.toml" in context and "README.md" in context
    assert "common/imagebatch_common/contract.py" in context
    assert "cli/imagebatch_cli/main.py" in context
    assert "operator/imagebatch_operator/main.py" in context
    assert "worker/imagebatch_worker/main.py" in context
    for kept_out in ("tests/", "charts/", ".venv/", ".git/", "Dockerfile"):
        assert not any(f.startswith(kept_out) for f in context), kept_out
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in context)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("tests/unit/test_x.py", True, id="everything-else"),
        pytest.param("operator/imagebatch_operator/main.py", False, id="reincluded-folder"),
        pytest.param("worker/imagebatch_worker/__pycache__/x.pyc", True, id="bytecode"),
        pytest.param("pyproject.toml", False, id="reincluded-file"),
    ],
)
def test_dockerignore_matcher(path: str, expected: bool) -> None:
    assert ignored(path, dockerignore_patterns()) is expected


# -- the builder's RUN lines, for real ------------------------------------------------


@dataclass
class ImageRoot:
    """A folder standing in for the image's ``/``; image paths map below it."""

    root: Path

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def remap(self, value: str, owned: tuple[str, ...]) -> str:
        """Map the path elements of an ENV value that live in the image's own folders."""
        out = []
        for element in value.split(":"):
            hit = any(element == p or element.startswith(p + "/") for p in owned)
            out.append(str(self.path(element)) if hit else element)
        return ":".join(out)


def stage_env(
    stage: Stage, image: ImageRoot, owned: tuple[str, ...], base: dict[str, str]
) -> dict[str, str]:
    env = dict(base)
    for key, value in stage.env().items():
        mapped = image.remap(value, owned)
        env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), mapped)
    return env


def host_network_env() -> dict[str, str]:
    """How this machine reaches the package index (a build host's network settings)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith("PIP_") or k.lower().endswith("_proxy") or k in ("SSL_CERT_FILE",)
    }


@pytest.fixture(scope="module")
def built_image() -> Iterator[dict[str, str]]:
    """Run the builder stage's COPY and RUN lines; yield the final stage's ENV."""
    folder = Path(tempfile.mkdtemp(prefix="imagebatch-image-"))
    image = ImageRoot(folder / "root")
    builder, final = stages()
    venv = builder.env()["VIRTUAL_ENV"]
    workdir = builder.all("WORKDIR")[-1]
    owned = (venv, workdir, "/tmp")
    image.path("/tmp").mkdir(parents=True)
    image.path("/tmp").chmod(0o1777)
    # Python 3.11 as `python`, as the base image has it on PATH.
    shims = folder / "shims"
    shims.mkdir()
    (shims / "python").symlink_to(sys.executable)
    base = {
        "PATH": f"{shims}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(folder / "home"),
        "LANG": "C.UTF-8",
        **host_network_env(),
    }
    # COPY: from the build context as the .dockerignore leaves it.
    context = build_context()
    cwd = image.path(workdir)
    cwd.mkdir(parents=True)
    for line in builder.all("COPY"):
        *sources, dest = line.split()
        for source in sources:
            for rel, target in copy_targets(source, dest, context):
                (cwd / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, cwd / target)
    env = stage_env(builder, image, owned, base)
    for line in builder.all("RUN"):
        result = subprocess.run(
            ["/bin/sh", "-c", line],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
        assert result.returncode == 0, f"RUN {line}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    final_env = stage_env(final, image, owned, {"PATH": "/usr/local/bin:/usr/bin:/bin"})
    yield final_env
    shutil.rmtree(folder, ignore_errors=True)


def copy_targets(source: str, dest: str, context: list[str]) -> list[tuple[str, str]]:
    """COPY semantics: a folder's contents go into ``dest``; files keep their name."""
    folder = source.rstrip("/") + "/"
    inside = [f for f in context if f.startswith(folder)]
    if inside:
        return [(f, f"{dest.rstrip('/')}/{f.removeprefix(folder)}") for f in inside]
    assert source in context, f"COPY {source}: not in the build context"
    return [(source, f"{dest.rstrip('/')}/{Path(source).name}" if dest.endswith("/") else dest)]


def files_under(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


@pytest.mark.parametrize(
    ("entry_point", "usage"),
    [
        ("imagebatch-operator", "usage: imagebatch-operator"),
        ("imagebatch-worker", "usage: imagebatch-worker"),
        ("kubectl-imagebatch", "usage: kubectl imagebatch"),
    ],
)
def test_every_entry_point_starts_from_the_built_virtualenv(
    built_image: dict[str, str], entry_point: str, usage: str
) -> None:
    env = built_image
    venv = Path(env["VIRTUAL_ENV"])
    found = shutil.which(entry_point, path=env["PATH"])
    assert found == str(venv / "bin" / entry_point)  # first on the image's PATH
    before = files_under(venv)
    result = subprocess.run(
        [found, "--help"],
        cwd=env["HOME"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(usage)
    assert files_under(venv) == before  # nothing written: a read-only root filesystem is fine


def test_the_virtualenv_holds_no_installer(built_image: dict[str, str]) -> None:
    env = built_image
    venv = Path(env["VIRTUAL_ENV"])
    assert not (venv / "bin" / "pip").exists()
    site = next(venv.glob("lib/python3.11/site-packages"))
    names = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert "imagebatch" in names and "kopf" in names and "pillow" in names
    assert not names & {"pip", "setuptools", "wheel"}
    # Installed, not linked to the work tree: the image carries its own copy.
    assert (site / "imagebatch_operator" / "main.py").exists()
    assert not any(p.suffix == ".pth" and "work" in p.read_text() for p in site.glob("*.pth"))
    # uid 65532 owns nothing in the image: everything must be readable by any user.
    for path in venv.rglob("*"):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        assert mode & stat.S_IROTH, path
        if stat.S_ISDIR(mode) or path.name.startswith("imagebatch-"):
            assert mode & stat.S_IXOTH, path
