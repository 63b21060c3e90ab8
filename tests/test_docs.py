"""The README and the documentation site (``docs/*.md``, ``mkdocs.yml``).

Convention for fenced code blocks, checked here:

- a block directly after ``<!-- not-run: reason -->`` is not run (the reason says why);
- a block directly after ``<!-- run-by: tests/FILE.py::test_name -->`` is run by that test, which must exist and
  read the page;
- any other ``python`` block is run by ``test_python_blocks_run`` (a fresh interpreter, offline, in a temporary
  folder);
- any other ``bash`` block holds only commands this file understands (the venv, ``pip install -e``, pytest and
  gencnp's entry points): their scripts, sub-commands, extras, markers and config files must exist, and
  ``test_documented_commands_accept_their_options`` runs each entry point's ``--help`` for the options used;
- a block in any other language must be marked.

Also: the README stays short and keeps its Quickstart, links and ``configs/...`` paths exist, every docs page is in
the nav, and the statements that appear on two pages agree.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import os
import re
import runpy
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
MARK = re.compile(r"^<!--\s*(not-run|run-by):\s*(.*?)\s*-->$")
README_MAX_LINES = 250
TRAIN_COMMANDS = {"fit", "validate", "test", "predict"}
ARCH_FOLDERS_EXCLUDED = {"fashion_mnist", "synthetic", "loggers"}  # the default job, the test job, trackers


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mark: tuple[str, str] | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """Fenced blocks of a page, each with the marker comment on the nearest non-blank line above it."""
    lines = page.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang, indent = i, m.group(2), m.group(1)
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :])
            i += 1
        above = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        mark = MARK.match(above)
        blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", (mark[1], mark[2]) if mark else None))
        i += 1
    return blocks


ALL_BLOCKS = [b for p in PAGES for b in code_blocks(p)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python" and b.mark is None]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _evaluate_commands() -> set[str]:
    """Sub-commands of ``evaluate.py`` (``gencnp.commands``, whose functions its ``CLI`` receives)."""
    from gencnp import commands

    assert set(commands.evaluate_commands()) == set(commands.EVALUATE_COMMANDS)
    return set(commands.EVALUATE_COMMANDS)


def _segments(line: str) -> list[list[str]]:
    """A shell line split at ``&&`` into argument lists, leading ``NAME=value`` assignments dropped."""
    out = []
    for part in line.split("&&"):
        argv = shlex.split(part)
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def entry_point(argv: list[str]) -> tuple[str, str | None] | None:
    """``(entry, sub-command)`` of a gencnp command line, e.g. ``("train.py", "fit")``, or None."""
    if argv[:1] == ["gencnp"]:
        return "gencnp", argv[1] if len(argv) > 1 else None
    if argv[:1] != ["python"] or len(argv) < 2:
        return None
    if argv[1] == "-m":
        return (argv[2], None) if argv[2] != "pytest" else None
    sub = argv[2] if len(argv) > 2 and not argv[2].startswith("-") else None
    return argv[1], sub


def check_command(argv: list[str]) -> list[str]:
    """What is wrong with one documented command (empty when the command is one this file can vouch for)."""
    problems = []
    extras = _pyproject()["project"]["optional-dependencies"]
    markers = {m.split(":")[0] for m in _pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
    if argv in (["python3", "-m", "venv", ".venv"], [".", ".venv/bin/activate"], ["source", ".venv/bin/activate"]):
        return []
    if argv[:3] == ["pip", "install", "-e"] and len(argv) == 4:
        m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", argv[3])
        if not m:
            return [f"pip install -e {argv[3]}: expected . or .[extra,...]"]
        return [f"extra '{e}' is not in pyproject.toml" for e in (m[1] or "").split(",") if e and e not in extras]
    if argv[:3] == ["pip", "install", "--no-deps"] and len(argv) == 4:  # the pinned package CI installs apart
        ci = (ROOT / ".ci/run").read_text()
        return [] if f"--no-deps {argv[3]}" in ci else [f"{argv[3]}: not the pin .ci/run installs without dependencies"]
    if argv[:3] == ["python", "-m", "pytest"]:
        args = argv[3:]
        for flag, value in zip(args, args[1:]):
            if flag == "-m":
                unknown = set(re.findall(r"\w+", value)) - markers - {"not", "and", "or"}
                problems += [f"pytest marker '{u}' is not registered in pyproject.toml" for u in sorted(unknown)]
        paths = [a for a, prev in zip(args, [None, *args]) if not a.startswith("-") and prev != "-m"]
        return problems + [f"pytest path {p} does not exist" for p in paths if not (ROOT / p).exists()]
    ep = entry_point(argv)
    if ep is None:
        return [f"'{shlex.join(argv)}' is not a command tests/test_docs.py can check: mark the block <!-- not-run: -->"]
    entry, sub = ep
    if entry == "gencnp":
        from gencnp import commands

        known = {*commands.TRAIN_COMMANDS, *commands.EVALUATE_COMMANDS, "pipeline", "sweep", "seal", "shards"}
        if sub not in known:
            problems.append(f"gencnp has no command '{sub}' ({sorted(known)})")
    elif entry.endswith(".py"):
        if not (ROOT / entry).is_file():
            problems.append(f"script {entry} does not exist")
        elif entry == "train.py" and sub not in TRAIN_COMMANDS:
            problems.append(f"train.py has no sub-command '{sub}' ({sorted(TRAIN_COMMANDS)})")
        elif entry == "evaluate.py" and sub not in _evaluate_commands():
            problems.append(f"evaluate.py has no sub-command '{sub}' ({sorted(_evaluate_commands())})")
    elif (
        not (ROOT / f"{entry.replace('.', '/')}.py").is_file()
        and not (ROOT / entry.replace(".", "/")).joinpath("__main__.py").is_file()
    ):
        problems.append(f"module {entry} is not a gencnp module that python -m can run")
    for a in argv:
        if a.startswith("configs/") and not (ROOT / a).exists():
            problems.append(f"config {a} does not exist")
    return problems


def test_every_code_block_is_run_checked_or_marked():
    assert ALL_BLOCKS, "no code blocks found: the parser is broken"
    problems = []
    for b in ALL_BLOCKS:
        if b.mark and b.mark[0] == "not-run":
            if len(b.mark[1]) < 3:
                problems.append(f"{b.where}: <!-- not-run: --> needs a reason")
        elif b.mark and b.mark[0] == "run-by":
            file, _, name = b.mark[1].partition("::")
            test_file = ROOT / file
            if not test_file.is_file() or f"def {name}(" not in test_file.read_text():
                problems.append(f"{b.where}: run-by names {b.mark[1]}, which does not exist")
            elif b.page.name not in test_file.read_text():
                problems.append(f"{b.where}: {file} never reads {b.page.name}")
        elif b.lang == "python":
            compile(b.code, b.where, "exec")  # run in full by test_python_blocks_run
        elif b.lang in ("bash", "sh"):
            for line in filter(None, (x.strip() for x in b.code.splitlines())):
                problems += [f"{b.where}: {p}" for argv in _segments(line) for p in check_command(argv)]
        else:
            problems.append(f"{b.where}: a '{b.lang or 'plain'}' block must carry <!-- not-run: reason -->")
    assert problems == []


def test_the_block_checks_can_fail():
    assert check_command(shlex.split("python train.py fitt --config configs/fashion_mnist/gencnp.yaml"))
    assert check_command(shlex.split("python train.py fit --config configs/nowhere/gencnp.yaml"))
    assert check_command(shlex.split("python evaluate.py reprt --config configs/fashion_mnist/evaluate.yaml"))
    assert check_command(shlex.split('pip install -e ".[nosuchextra]"'))
    assert check_command(shlex.split("pip install --no-deps torchattacks==0.0.1"))
    assert not check_command(shlex.split("pip install --no-deps torchattacks==3.5.1"))
    assert check_command(shlex.split('python -m pytest -q -m "not quick" tests'))
    assert check_command(shlex.split("rm -rf runs"))
    assert check_command(shlex.split("python evaluate.py report --config configs/fashion_mnist/evaluate.yaml")) == []
    page = DOCS / "index.md"
    assert any(b.lang == "bash" for b in code_blocks(page))


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_blocks_run(block, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", block.code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, f"{block.where} failed:\n{r.stderr[-3000:]}"


def _documented_commands() -> dict[tuple[str, str | None], set[str]]:
    """Every gencnp entry point used in an unmarked bash block, with the options it is given."""
    found: dict[tuple[str, str | None], set[str]] = {}
    for b in ALL_BLOCKS:
        if b.mark is None and b.lang in ("bash", "sh"):
            for argv in (a for line in b.code.splitlines() if line.strip() for a in _segments(line)):
                ep = entry_point(argv)
                if ep and ep[0] in ("train.py", "evaluate.py", "gencnp.pipeline"):
                    found.setdefault(ep, set()).update(a.split("=")[0] for a in argv if a.startswith("--"))
    return found


def _help_text(entry: str, sub: str | None, monkeypatch) -> str:
    argv = [entry, *([sub] if sub else []), "--help"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        if entry.endswith(".py"):
            runpy.run_path(str(ROOT / entry), run_name="__main__")
        else:
            runpy.run_module(entry, run_name="__main__", alter_sys=True)
    assert done.value.code in (0, None), f"{' '.join(argv)} exited {done.value.code}"
    return out.getvalue()


@pytest.mark.slow
def test_documented_commands_accept_their_options(monkeypatch, one_thread):
    commands = _documented_commands()
    assert ("train.py", "fit") in commands and ("gencnp.pipeline", None) in commands
    problems = []
    for (entry, sub), options in sorted(commands.items(), key=str):
        text = _help_text(entry, sub, monkeypatch)
        for opt in sorted(options):
            parts = opt.split(".")  # --trainer.logger.init_args.offline: the help lists --trainer.logger
            if not any(
                re.search(re.escape(".".join(parts[:k])) + r"\b", text)
                for k in range(len(parts), min(2, len(parts)) - 1, -1)
            ):
                problems.append(f"{entry} {sub or ''}: {opt} is not in its --help")
    assert problems == []


def test_readme_is_short_and_keeps_its_quickstart():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    quick = text[text.index("## Quickstart") :]
    quick = quick[: quick.index("\n## ", 1)]
    blocks = re.findall(r"```\w*\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 2, "the Quickstart holds exactly two blocks: the main job, then the test commands"
    main_job, tests = blocks
    assert len(main_job.strip().splitlines()) == 1
    assert "python -m gencnp.pipeline --config configs/fashion_mnist/pipeline.yaml" in main_job
    assert "pytest" in tests and '-m "not slow"' in tests


def _slug(heading: str) -> str:
    """Python-Markdown's toc anchor of a heading (mkdocs)."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def test_relative_links_and_their_anchors_exist():
    problems = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                problems.append(f"{page.name}: link {link} points to nothing")
                continue
            if page.parent == DOCS and DOCS not in target.parents:
                problems.append(f"{page.name}: link {link} leaves docs/ (the site cannot follow it)")
            if anchor and target.suffix == ".md" and anchor not in _anchors(target):
                problems.append(f"{page.name}: link {link}: no heading with anchor #{anchor}")
    assert problems == []


def _expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m[1].split(",") for q in _expand(path[: m.start()] + alt + path[m.end() :])]


def test_config_paths_in_the_docs_exist():
    problems, seen = [], 0
    for page in PAGES:
        for raw in re.findall(r"configs/[\w./{},*-]+", page.read_text()):
            raw = raw.rstrip(".,")
            if raw.endswith(",") or "{" in raw and "}" not in raw:
                continue
            for path in _expand(raw):
                seen += 1
                if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                    problems.append(f"{page.name}: {path} does not exist")
    assert seen > 20 and problems == []


def _nav_pages(nav) -> list[str]:
    """The page files of a (possibly nested) mkdocs nav."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return [p for item in nav for p in _nav_pages(item)]


def test_every_page_is_in_the_nav_and_every_api_object_imports():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = set(_nav_pages(config["nav"]))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert nav == pages, f"in the nav but missing: {nav - pages}; pages left out of the nav: {pages - nav}"
    for name in re.findall(r"^::: ([\w.]+)$", (DOCS / "api.md").read_text(), flags=re.M):
        module, obj = name.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), obj), name


def test_statements_agree_across_pages():
    readme = (ROOT / "README.md").read_text()
    results = (DOCS / "results.md").read_text()
    configs_page = (DOCS / "configs.md").read_text()
    # the README's results table is a copy of the measured one
    rows = [line for line in readme.splitlines() if line.startswith("| ")]
    assert len(rows) >= 5 and all(r in results for r in rows)
    # every duration the README states is one the results page states
    for duration in re.findall(r"\d+ min \d+ s", readme):
        assert duration in results, f"README says {duration}; docs/results.md does not"
    # every config folder is described; every architecture folder has measured numbers
    folders = sorted(p.name for p in (ROOT / "configs").iterdir() if p.is_dir())
    assert [f for f in folders if f"configs/{f}/" not in configs_page] == []
    archs = [f for f in folders if f not in ARCH_FOLDERS_EXCLUDED and (ROOT / "configs" / f / "pipeline.yaml").exists()]
    assert archs and [f for f in archs if f"configs/{f}/" not in results] == []
    for page in PAGES:
        text = " ".join(page.read_text().split())
        for stale in ("only started", "no numbers are claimed"):
            assert stale not in text, f"{page.name} says '{stale}', but docs/results.md has measured numbers"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-q",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path),
        ],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "api" / "index.html").read_text().count("explain") > 0


def test_brace_expansion_helper():
    assert _expand("configs/{a,b}/{x,y}.yaml") == [
        "configs/" + a + "/" + x + ".yaml" for a, x in itertools.product("ab", "xy")
    ]
