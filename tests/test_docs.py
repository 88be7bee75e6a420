"""Every code block of the README, docs/ and bench/results/ works as written.

- ``python`` blocks all run (no parse-only marker), each self-contained, in a scratch directory and without
  ``TRITON_INTERPRET`` (as a newcomer runs them: CPU tensors take the reference ops).
- ``bash`` blocks run, unless an HTML comment ``<!-- docs-test: parse-only (why) -->`` on the
  line before marks them as long jobs (installs, training runs, the whole suite). Every
  command line of every bash block is also checked statically: a ``fusedgpt`` command
  (directly, through ``python -m fusedgpt`` or ``torchrun -m fusedgpt``) must parse with
  :func:`fusedgpt.cli.build_parser`, so a wrong flag fails here; ``pytest`` paths and
  ``python -m`` modules must exist; ``pip install`` extras must be declared.
- ``toml`` blocks named by a ``# NAME.toml`` first line are read as ``fusedgpt train
  --config NAME.toml``.
- ``text`` blocks are transcripts and tables and are not run.

And every relative link of those pages points at something that exists.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusedgpt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "bench" / "results").rglob("*.md")])
PARSE_ONLY = re.compile(r"<!--\s*docs-test:\s*parse-only\b")
FENCE = re.compile(r"^```(\S*)\s*$")
KNOWN_LANGUAGES = {"python", "bash", "toml", "text"}
SHELL_UTILITIES = {"printf", "echo", "cat", "ls", "mkdir", "cd"}  # nothing to check statically


@dataclass(frozen=True)
class Block:
    path: Path
    line: int          # 1-based line of the opening fence
    language: str
    code: str
    parse_only: bool

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        found.append(Block(path, i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n",
                           bool(PARSE_ONLY.search(before))))
        i = end + 1
    return found


BLOCKS = [block for path in DOC_FILES for block in blocks_of(path)]


def blocks(language: str, **where) -> list:
    chosen = [b for b in BLOCKS if b.language == language and all(getattr(b, k) == v for k, v in where.items())]
    return [pytest.param(b, id=b.name) for b in chosen]


def newcomer_env() -> dict:
    """The environment of someone running the docs: no interpreter flag, no backend override."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDGPT_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_every_block_has_a_known_language():
    unknown = [f"{b.name} ```{b.language}" for b in BLOCKS if b.language not in KNOWN_LANGUAGES]
    assert not unknown, f"label these blocks with one of {sorted(KNOWN_LANGUAGES)}: {unknown}"


def test_the_readme_opens_with_install_test_and_the_main_job():
    # .ci/run takes the first two lines of the README's first bash block as CI's commands.
    first = next(b for b in BLOCKS if b.path.name == "README.md" and b.language == "bash")
    assert first.code.splitlines()[:3] == ['pip install "torch==2.13.0" -e ".[dev]"', "pytest", "fusedgpt train"]


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_every_relative_link_points_at_a_file_or_directory():
    broken = []
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


# ------------------------------------------------------------------------------ python

# Runs blocks given as JSON on stdin, each in fresh globals; prints one JSON result per block.
RUNNER = r"""
import json, sys, traceback
for block in json.load(sys.stdin):
    try:
        exec(compile(block["code"], block["name"], "exec"), {"__name__": "__main__"})
        print(json.dumps({"name": block["name"], "error": None}), flush=True)
    except BaseException:
        print(json.dumps({"name": block["name"], "error": traceback.format_exc()}), flush=True)
"""


def run_python_blocks(chosen: list[Block], cwd: Path) -> dict:
    """name -> traceback or None. Blocks share one process (imports cost seconds), except
    those that set environment variables before importing, which get a process each."""
    shared = [b for b in chosen if "os.environ" not in b.code]
    groups = [shared] + [[b] for b in chosen if b not in shared]
    results = {}
    for group in filter(None, groups):
        payload = json.dumps([{"name": b.name, "code": b.code} for b in group])
        done = subprocess.run([sys.executable, "-c", RUNNER], input=payload, capture_output=True, text=True,
                              cwd=cwd, env=newcomer_env(), timeout=300)
        reported = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        results.update({r["name"]: r["error"] for r in reported})
        for b in group:
            results.setdefault(b.name, f"the runner died (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return results


@pytest.fixture(scope="module")
def python_results(tmp_path_factory) -> dict:
    chosen = [b for b in BLOCKS if b.language == "python"]
    return run_python_blocks(chosen, tmp_path_factory.mktemp("python-blocks"))


@pytest.mark.parametrize("block", blocks("python"))
def test_python_block_runs(block, python_results):
    error = python_results[block.name]
    assert error is None, f"{block.name} fails as written:\n{error}"


# ------------------------------------------------------------------------------ bash

def command_lines(code: str) -> list[list[str]]:
    """Each command of a bash block as argv: continuations joined, comments dropped, and
    ``a && b`` split into two commands."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return commands


def fusedgpt_arguments(argv: list[str]):
    """The arguments after ``fusedgpt`` (or ``python -m fusedgpt``, ``torchrun ... -m fusedgpt``);
    None when the command is not a fusedgpt command."""
    if argv[0] == "fusedgpt":
        return argv[1:]
    if argv[0] in ("python", "python3", "torchrun") and "-m" in argv:
        at = argv.index("-m")
        if argv[at + 1] == "fusedgpt":
            return argv[at + 2:]
    return None


def check_command(argv: list[str]) -> None:
    """Fail when a command shown in the docs could not work as written."""
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "pytest"]:
        argv = ["pytest", *argv[3:]]
    arguments = fusedgpt_arguments(argv)
    if arguments is not None:
        try:
            build_parser().parse_args(arguments)
        except SystemExit as exc:  # argparse has printed why (captured by pytest)
            raise AssertionError(f"`{shlex.join(argv)}` does not parse: exit {exc.code}") from None
    elif argv[0] == "pytest":
        paths = [a.split("::")[0] for a in argv[1:] if not a.startswith("-")]
        assert all((ROOT / p).exists() for p in paths), f"`{shlex.join(argv)}`: no such test path"
    elif argv[0] in ("python", "python3") and argv[1:2] == ["-m"]:
        assert importlib.util.find_spec(argv[2]) is not None, f"`{shlex.join(argv)}`: no module {argv[2]}"
    elif argv[:2] == ["pip", "install"]:
        declared = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
        for extra in re.findall(r"\.\[([\w,]+)\]", " ".join(argv)):
            for name in extra.split(","):
                assert re.search(rf"^{name} = \[", declared, re.M), f"`{shlex.join(argv)}`: no extra {name!r}"
    elif argv[0] not in SHELL_UTILITIES:
        raise AssertionError(f"test_docs does not know how to check `{shlex.join(argv)}`; teach check_command")


@pytest.mark.parametrize("block", blocks("bash"))
def test_bash_commands_are_well_formed(block):
    for argv in command_lines(block.code):
        check_command(argv)


@pytest.mark.parametrize("block", blocks("bash", parse_only=False))
def test_bash_block_runs(block, tmp_path):
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], capture_output=True, text=True,
                          cwd=tmp_path, env=newcomer_env(), timeout=300)
    assert done.returncode == 0, f"{block.name} fails as written:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


# ------------------------------------------------------------------------------ toml

@pytest.mark.parametrize("block", blocks("toml"))
def test_toml_block_is_a_valid_train_config(block, tmp_path):
    from fusedgpt.train.trainer import config_from_args

    name = re.match(r"#\s*(\S+\.toml)", block.code)
    assert name, f"{block.name}: start a toml block with its file name, e.g. `# run.toml`"
    path = tmp_path / name.group(1)
    path.write_text(block.code, encoding="utf-8")
    config, _ = config_from_args(build_parser().parse_args(["train", "--config", str(path)]))
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    values = tomllib.loads(block.code)
    model = values.pop("model", {})
    assert {k: getattr(config, k) for k in values} == values
    assert {k: config.model[k] for k in model} == model
