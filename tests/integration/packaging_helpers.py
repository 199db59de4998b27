"""The Dockerfile read as Docker reads it (dockerfile-parse), and its build
stage replayed here: the files it copies, then its `pip wheel` of the project."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BUILD_TIMEOUT_S = 120


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[dict] = field(default_factory=list)

    def all(self, instruction: str) -> list[dict]:
        return [i for i in self.instructions if i["instruction"] == instruction]

    def last(self, instruction: str) -> str | None:
        found = self.all(instruction)
        return found[-1]["value"] if found else None


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    parser = DockerfileParser(path=str(path))
    out: list[Stage] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            out.append(Stage(words[0], name))
        elif out:
            out[-1].instructions.append(instruction)
    return out


def copy_sources(stage: Stage) -> list[str]:
    """The build-context paths a stage copies (not those from other stages)."""
    return [source for sources, _ in copies(stage) for source in sources]


def ignored(relative: str) -> bool:
    """Whether .dockerignore keeps ``relative`` out of the build context."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    parts = Path(relative).parts
    return any(
        fnmatch(relative, p) or fnmatch(relative, p.removeprefix("**/")) or any(fnmatch(part, p.removeprefix("**/")) for part in parts)
        for p in patterns
    )


def shell_commands(stage: Stage) -> list[list[str]]:
    """Each `&&`-separated command of the stage's RUN instructions, as words."""
    commands: list[list[str]] = []
    for run in stage.all("RUN"):
        words = [w for w in shlex.split(run["value"]) if not w.startswith("--mount=")]
        current: list[str] = []
        for word in words:
            if word == "&&":
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [c for c in commands if c]


def copies(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY / ADD from the build context."""
    out: list[tuple[list[str], str]] = []
    for copy in stage.all("COPY") + stage.all("ADD"):
        words = shlex.split(copy["value"])
        if any(word.startswith("--from") for word in words):
            continue
        words = [word for word in words if not word.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def build_context(stage: Stage, workdir: Path) -> Path:
    """Copy what the stage copies from the repository into ``workdir`` (its
    WORKDIR), as Docker does: a directory's contents go into the destination,
    a file into a destination ending in ``/`` keeps its name."""
    for sources, destination in copies(stage):
        target = workdir / destination
        for source in sources:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                into = target / origin.name if destination.endswith("/") or len(sources) > 1 else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)
    return workdir


def project_wheel_command(stage: Stage) -> list[str]:
    """The build stage's `pip wheel --no-deps … .`: how the image builds the project."""
    found = [c for c in shell_commands(stage) if c[:2] == ["pip", "wheel"] and "--no-deps" in c and c[-1] == "."]
    assert len(found) == 1, f"expected one `pip wheel --no-deps … .` in the build stage, found {found}"
    return found[0]


def build_wheel(stage: Stage, context: Path, out: Path) -> Path:
    """Run the build stage's wheel command in ``context`` with this
    interpreter's pip, offline (the test venv has the build backend)."""
    command = project_wheel_command(stage)
    argv = [sys.executable, "-m", "pip", *command[1:-1], "--no-index", "--quiet", "."]
    argv[argv.index("--wheel-dir") + 1] = str(out)
    done = subprocess.run(argv, cwd=context, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    wheels = list(out.glob("quotameter-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]
