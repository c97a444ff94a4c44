"""Every command shown in README.md and docs/*.md is one the code accepts, and the README's path works.

The commands are the lines of the fenced ```bash blocks of README.md and of the top-level docs/*.md
(backslash-continued lines joined, comment lines skipped). Each is checked without running it:
`gerne-jax CMD ...` (or `python -m gerne_jax CMD ...`) through the command's own parser, `make TARGET`
by `make -n`, `pip install ...` against pyproject.toml's extras and the lock file, the experiment and
benchmark scripts through their argument parsers. A command of a kind this file does not know fails,
so a new command in the docs gets a check here first. UPPER-CASE placeholders (DATA_DIR, RUN, ...) are
fine for parsing.

Besides: the config table of docs/configs.md against `configs/default.py`, the relative links and
images of the docs, the README's shape, and (slow) the README's "Your own slides" commands run for real
on three small synthetic slides.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from importlib import metadata

import pytest

from gerne_jax.core.errors import InputError
from tests import benchmark_scripts
from tests.helpers import REPO

README = REPO / "README.md"
DOC_FILES = [README, *sorted((REPO / "docs").glob("*.md"))]
BIN = pathlib.Path(sys.executable).parent
README_MAX_LINES = 300
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


# --- extracting the commands -------------------------------------------------------------------------

def bash_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```bash blocks of a Markdown text."""
    return re.findall(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S)


def command_lines(block: str) -> list[str]:
    """A block's commands: backslash-continued lines joined, blank and comment lines skipped."""
    commands, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append((pending + line).strip())
        pending = ""
    assert not pending, f"a backslash continues past the end of the block: {pending!r}"
    return commands


def documented_commands() -> list[tuple[str, str]]:
    """(file name, command line) for every command of the docs."""
    return [(str(path.relative_to(REPO)), line) for path in DOC_FILES
            for block in bash_blocks(path.read_text()) for line in command_lines(block)]


def simple_commands(line: str) -> list[list[str]]:
    """The argument lists of a command line, split at `&&` and `;`, trailing comments dropped."""
    parts: list[list[str]] = [[]]
    for token in shlex.split(line, comments=True):
        if token in ("&&", ";"):
            parts.append([])
        else:
            parts[-1].append(token)
    return [part for part in parts if part]


# --- checking one command ----------------------------------------------------------------------------

class Rejected(Exception):
    """The docs show a command that its parser (or the repository) does not accept."""


class _Parsed(Exception):
    """Raised right after a script's argparse parser accepted its arguments, before the script runs."""


def parses(parse: Callable[[], object]) -> None:
    """Runs a parser; argparse's exit on a bad argument (status 2) becomes Rejected."""
    try:
        parse()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise Rejected(f"the parser exited with status {exit_.code}") from None
    except InputError as error:  # a check of the arguments beyond argparse's
        raise Rejected(str(error)) from None


def check_gerne_jax(args: list[str]) -> None:
    registered = {entry.name for entry in metadata.entry_points(group="gerne_jax.commands")}
    if not args or args[0] not in registered:
        raise Rejected(f"not a gerne-jax command: {args[:1]} (registered: {sorted(registered)})")
    name, rest = args[0], args[1:]
    if name == "train":
        from gerne_jax.commands import train

        if any(arg in ("-h", "--help") for arg in rest):
            train.help_text(train.with_config_paths(rest))  # loads the config a --config names
            return
        train.FLAGS.unparse_flags()  # absl keeps the values of an earlier parse
        try:
            train.parse_flags(rest)
        except Exception as error:  # InputError, or absl's own errors
            raise Rejected(f"{type(error).__name__}: {error}") from None
        finally:
            train.FLAGS.unparse_flags()
    elif name in ("synthetic", "tile", "stats"):
        from data_pipeline import commands

        parses(lambda: commands.parse_args(name, rest))
    elif name in ("evaluate", "predict"):
        module = importlib.import_module(f"gerne_jax.commands.{name}")
        parses(lambda: module.parse_args(rest))
    else:
        raise Rejected(f"gerne-jax {name} is registered but this test does not know how to check it")


def check_experiment(module_name: str, args: list[str]) -> None:
    module = importlib.import_module(module_name)
    if hasattr(module, "parse_args"):
        parses(lambda: module.parse_args(args))
    elif args:
        raise Rejected(f"{module_name} takes no arguments, the docs give {args}")


def check_benchmark(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / script
    if path.parent != REPO / "benchmarks" or not path.is_file():
        raise Rejected(f"no benchmark script {script}")
    module = benchmark_scripts.load(path.stem)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise _Parsed

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(sys, "argv", [script, *args])
        try:
            module.main()
        except _Parsed:
            return
        except SystemExit as exit_:
            raise Rejected(f"{script}: the parser exited with status {exit_.code}") from None
    raise Rejected(f"{script}: main() returned without parsing its arguments")


def check_pip(args: list[str]) -> None:
    if not args or args[0] != "install":
        raise Rejected(f"only `pip install` is known, got pip {args}")
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    constraints, targets, rest = [], [], iter(args[1:])
    for arg in rest:
        if arg in ("-c", "--constraint"):
            constraints.append(next(rest))
        elif arg in ("-e", "--editable", "-q", "-U", "--upgrade"):
            continue
        elif arg.startswith("-"):
            raise Rejected(f"pip option {arg} is not known to this test")
        else:
            targets.append(arg)
    for constraint in constraints:
        if not (REPO / constraint).is_file():
            raise Rejected(f"constraints file {constraint} does not exist")
    for target in targets:
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
        if match:  # this project: locked, with extras that exist
            if "requirements.lock" not in constraints:
                raise Rejected(f"install of this project without `-c requirements.lock`: pip {' '.join(args)}")
            unknown = set((match.group(1) or "").split(",")) - extras - {""}
            if unknown:
                raise Rejected(f"extras {sorted(unknown)} are not in pyproject.toml ({sorted(extras)})")
        elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", target):
            raise Rejected(f"pip target {target!r} is neither this project nor a package name")


def check_make(args: list[str]) -> None:
    if not args:
        raise Rejected("make without a target")
    for target in args:
        result = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise Rejected(f"make -n {target}: {result.stderr.strip()}")


def check_python(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if args[:2] == ["-m", "gerne_jax"]:
        check_gerne_jax(args[2:])
    elif args[:1] == ["-m"] and args[1].startswith("experiments."):
        check_experiment(args[1], args[2:])
    elif args[:2] == ["-m", "pytest"]:
        missing = [arg for arg in args[2:] if arg.startswith("tests/") and not (REPO / arg.split("::")[0]).exists()]
        if missing:
            raise Rejected(f"no such test files: {missing}")
    elif args[:2] == ["-m", "venv"] and len(args) == 3:
        pass
    elif args[:1] == ["-c"] and len(args) == 2:
        try:
            compile(args[1], "<python -c>", "exec")
        except SyntaxError as error:
            raise Rejected(f"python -c: {error}") from None
    elif args and args[0].startswith("benchmarks/") and args[0].endswith(".py"):
        check_benchmark(args[0], args[1:], monkeypatch)
    else:
        raise Rejected(f"python {' '.join(args[:2])} ...: not a command this test knows (gerne-jax's commands "
                       "replace python -m data_pipeline and python train.py|evaluate.py|predict.py)")


def check_command(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks one simple command; raises Rejected."""
    while argv and ENV_ASSIGNMENT.match(argv[0]):  # VAR=value before the program
        argv = argv[1:]
    if not argv:
        raise Rejected("an assignment without a command")
    program, args = pathlib.PurePosixPath(argv[0]).name, argv[1:]
    if program == "gerne-jax":
        check_gerne_jax(args)
    elif re.fullmatch(r"python(3(\.\d+)?)?", program):
        check_python(args, monkeypatch)
    elif program == "pip":
        check_pip(args)
    elif program == "make":
        check_make(args)
    elif program == "cd" and len(args) == 1:
        pass
    elif program == "srun":  # srun OPTIONS COMMAND
        inner = [i for i, arg in enumerate(args) if not arg.startswith("-")]
        if not inner:
            raise Rejected("srun without a command")
        check_command(args[inner[0]:], monkeypatch)
    elif program == "gcloud":  # gcloud ... --command="A && B": the commands run on the machines
        remote = [arg.split("=", 1)[1] for arg in args if arg.startswith("--command=")]
        if not remote:
            raise Rejected("gcloud without --command=")
        for command in simple_commands(remote[0]):
            check_command(command, monkeypatch)
    else:
        raise Rejected(f"{argv[0]}: not a command this test knows; add a check for it to tests/project/test_docs.py")


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    files = {name for name, _ in COMMANDS}
    assert "README.md" in files and len(COMMANDS) > 40, files


@pytest.mark.parametrize(("doc", "line"), COMMANDS, ids=[f"{doc}:{i}" for i, (doc, _) in enumerate(COMMANDS)])
def test_documented_command_is_accepted(doc: str, line: str, monkeypatch: pytest.MonkeyPatch):
    for argv in simple_commands(line):
        try:
            check_command(argv, monkeypatch)
        except Rejected as error:
            pytest.fail(f"{doc}: `{line}`\n  {error}")


@pytest.mark.parametrize("line", [
    "gerne-jax train --config demo:erm --workdir runs/x --config.method.betta=1",  # mistyped key
    "gerne-jax train --config demo:ermm --workdir runs/x",  # unknown switch
    "gerne-jax train --config demo:erm",  # no --workdir
    "gerne-jax tile --manifest m.csv --out d",  # no --patch-size
    "gerne-jax predict --workdir r --out o",  # no --manifest
    "gerne-jax evaluate --workdir r --split tset",
    "gerne-jax fit --config demo:erm",
    "python train.py --config configs/demo.py:erm --workdir runs/x",
    "python -m data_pipeline tile --manifest m.csv --out d --patch-size 64",
    "python -m experiments.grid --root R --sedes 0",
    "python benchmarks/tiling.py --sise 4096",
    'pip install -c requirements.lock -e ".[cuda11]"',
    'pip install -e ".[beam]"',  # not locked
    "make deploy",
    "conda install jax",
])
def test_a_wrong_command_is_rejected(line: str, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(Rejected):
        for argv in simple_commands(line):
            check_command(argv, monkeypatch)


def test_command_extraction():
    text = "x\n```bash\n# a comment\ngerne-jax tile --manifest m.csv \\\n  --out d   # note\n\n```\n```text\nno\n```\n"
    expected = [["gerne-jax tile --manifest m.csv    --out d   # note"]]
    assert [command_lines(block) for block in bash_blocks(text)] == expected
    assert simple_commands("cd a && gerne-jax stats --data-dir d  # comment") == [
        ["cd", "a"], ["gerne-jax", "stats", "--data-dir", "d"]]


# --- the config table, links, the README's shape -----------------------------------------------------

def config_table() -> dict[str, str]:
    """docs/configs.md's key table: {key: the default column's first code span}."""
    rows = {}
    for line in (REPO / "docs" / "configs.md").read_text().splitlines():
        match = re.match(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def flatten(config, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_config_table_matches_default_config():
    import ast

    from configs import default

    keys = flatten(default.get_config())
    table = config_table()
    assert sorted(table) == sorted(keys), (
        f"missing from docs/configs.md: {sorted(set(keys) - set(table))}; "
        f"not in configs/default.py: {sorted(set(table) - set(keys))}")
    for key, written in table.items():
        try:
            documented = ast.literal_eval(written)
        except (ValueError, SyntaxError):
            documented = written  # a bare string
        assert documented == keys[key] and type(documented) is type(keys[key]), (
            f"docs/configs.md says {key} = {written}, configs/default.py has {keys[key]!r}")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def links(text: str) -> Iterator[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # not inside code blocks
    for match in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        yield match.group(1)


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(REPO)) for p in DOC_FILES])
def test_relative_links_and_images_exist(path: pathlib.Path):
    broken = []
    for target in links(path.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#{1,6} (.+)$", resolved.read_text(), flags=re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{path.relative_to(REPO)}: broken links {broken}"


def test_readme_starts_with_demo_and_test_and_is_short():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    first_block = command_lines(bash_blocks(text)[0])
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert text.index("```bash") < text.index("\n## ")


# --- the README's path, for real --------------------------------------------------------------------

OWN_SLIDES_SECTION = "## Your own slides"
# Small enough to finish in seconds on 2 CPU cores; appended to the README's train commands.
QUICK_TRAINING = ["--config.model.name=tiny", "--config.training.steps=4", "--config.training.eval_every=2",
                  "--config.training.checkpoint_every=2", "--config.training.batch_per_group=2",
                  "--config.data.eval_batch_size=32"]
# What the README says each step writes, relative to the folder the command names.
WRITES = {
    "tile": ["patches.csv", "tiling_report.json", "qc/{slide}.png"],
    "stats": ["tissue_ratio.png"],
    "train": ["config.json", "metrics.jsonl", "tensorboard", "checkpoints/latest", "checkpoints/best_wga",
              "checkpoints/best_bca", "checkpoints/best_worst_class"],
    "evaluate": ["best_wga_test.json", "best_wga_test_error_vs_tissue_ratio.png"],
    "predict": ["index.md", "slides.csv", "metrics.json", "slides/{test_slide}/probability.ome.tif",
                "slides/{test_slide}/overlay.png", "slides/{test_slide}/regions.geojson",
                "slides/{test_slide}/patches.csv", "slides/{test_slide}/summary.json"],
}
OUTPUT_FLAG = {"tile": "--out", "stats": "--data-dir", "train": "--workdir", "evaluate": "--out", "predict": "--out"}


def own_slides_section() -> str:
    text = README.read_text()
    start = text.index(OWN_SLIDES_SECTION)
    end = text.find("\n## ", start + len(OWN_SLIDES_SECTION))
    return text[start:end if end >= 0 else None]


def flag_value(args: list[str], flag: str) -> str:
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with the value of `flag` replaced (or the flag added)."""
    if flag not in args:
        return [*args, flag, value]
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


def test_own_slides_section_names_what_each_step_writes():
    section = own_slides_section()
    for names in WRITES.values():
        for name in names:
            assert pathlib.PurePosixPath(name.replace("{slide}", "<slide_id>")
                                         .replace("{test_slide}", "<slide_id>")).name in section, name


@pytest.mark.slow
def test_readme_own_slides_commands_run(tmp_path: pathlib.Path):
    """The README's tile -> stats -> train -> evaluate -> predict (its first block of the section; the others
    are parsed, above) on three synthetic 512-pixel slides."""
    commands = [args for line in command_lines(bash_blocks(own_slides_section())[0]) for args in simple_commands(line)]
    steps = [args[1] for args in commands]
    assert steps == ["tile", "stats", "train", "train", "evaluate", "predict"], steps
    assert all(args[0] == "gerne-jax" for args in commands)
    manifest = pathlib.PurePosixPath(flag_value(commands[0], "--manifest"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

    def run(args: list[str]) -> None:
        result = subprocess.run([str(BIN / "gerne-jax"), *args], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"gerne-jax {' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    run(["synthetic", "--out", str(manifest.parent), "--slides", "3", "--size", "512", "--seed", "0"])
    with open(tmp_path / manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert manifest.name == "manifest.csv" and len(rows) == 3
    test_slide = next(row["slide_id"] for row in rows if row["split"] == "test")

    for args in commands:
        step = args[1]
        args = list(args[1:])
        if step == "tile":  # the README's patch size for real slides is most of a 512-pixel slide,
            # and the synthetic slides are at 2 µm/pixel
            args = with_flag(with_flag(with_flag(args, "--patch-size", "64"), "--workers", "2"), "--mpp", "2")
        if step == "train":
            args += QUICK_TRAINING
        run(args)
        folder = tmp_path / flag_value(args, OUTPUT_FLAG[step])
        slides = [row["slide_id"] for row in rows] if step == "tile" else [None]
        for slide in slides:
            for name in WRITES[step]:
                path = folder / name.format(slide=slide, test_slide=test_slide)
                assert path.exists(), f"gerne-jax {' '.join(args)} did not write {path.relative_to(tmp_path)}"

    predict_out = tmp_path / flag_value(commands[-1], "--out")
    summary = json.loads((predict_out / "slides" / test_slide / "summary.json").read_text())
    assert summary["patches"] > 0, summary
    regions = json.loads((predict_out / "slides" / test_slide / "regions.geojson").read_text())
    assert regions["type"] == "FeatureCollection"
