"""The docs cannot drift from the program: every `edge-duet ...` command line in README.md and docs/*.md, and every
option a command's --help mentions, is checked against the CLI's actual parameters (click introspection, so new
commands and flags are covered as they are added); the README's first command is run as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from edge_duet.apps.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.sh"), *(ROOT / "scripts").glob("*.sh")])
# `edge-duet` as a command word: not inside a path (/opt/edge-duet/...) or a name (edge-duet-demo)
COMMAND = re.compile(r"(?<![\w/.~-])edge-duet(?=[ \t]+\S)")
SYNOPSIS_MARKS = ("[", "]", "|", "(", "…", "...")  # a usage synopsis, not a line to copy: flags are checked only
# Flags of other programs that edge-duet's help texts name on purpose (vLLM's server, venv)
EXTERNAL_FLAGS = {"--api-key", "--served-model-name", "--enable-scale-out", "--system-site-packages"}


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # what follows `edge-duet`


# typer builds its commands with its own copy of click: parameters are told apart by ``param_type_name``
def cli():
    return typer.main.get_command(app)


def _join_continued(numbered) -> list[tuple[int, str]]:
    """(first line number, line) with every backslash continuation joined onto the line it continues."""
    out, pending, start = [], "", 0
    for i, line in numbered:
        if not pending:
            start = i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def code_spans(text: str) -> list[tuple[int, str]]:
    """(line number, code) for every fenced block line (continuations joined) and inline `code` span."""
    out: list[tuple[int, str]] = []
    fenced, diagram, block = False, False, []
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            # a block of box-drawing characters is a diagram, not commands
            if fenced:
                end = next((j for j in range(i, len(lines)) if lines[j].lstrip().startswith("```")), len(lines))
                diagram = any(ch in "─│┌└├" for ln in lines[i:end] for ch in ln)
            else:
                out += _join_continued(block)
                block = []
            continue
        if fenced:
            if not diagram:
                block.append((i, line))
        else:
            out += [(i, m) for m in re.findall(r"`([^`]+)`", line)]
    return out + _join_continued(block)


def script_lines(text: str) -> list[tuple[int, str]]:
    """A shell script's lines, continuations joined, ``${VAR:+...}`` expansions dropped (their flags are optional)."""
    out = []
    code = ((i, line) for i, line in enumerate(text.splitlines(), 1) if not line.lstrip().startswith("#"))
    for start, line in _join_continued(code):
        line = re.sub(r"\$\{[^}]*\}", "", line)
        # edge-duet in a command position only (not in an echo'd message or a C string)
        m = re.search(r"(?:^\s*|(?:\|\||&&|;|\bthen|\bdo)\s+)(?=edge-duet\s)", line)
        if m:
            out.append((start, line[m.end():]))
    return out


def doc_commands(path: Path) -> list[DocCommand]:
    found = []
    text = path.read_text(encoding="utf-8")
    for line_no, code in (script_lines(text) if path.suffix == ".sh" else code_spans(text)):
        for m in COMMAND.finditer(code):
            rest = code[m.end():]
            # the command ends at the next command, pipe or redirection
            rest = re.split(r"\s(?:&&|\|\||;|\||\d?>>?)\s", rest)[0].split("$(")[0]
            if "·" in rest:  # a recorded session's banner, not a command
                continue
            found.append(DocCommand(f"{path.relative_to(ROOT)}:{line_no}", rest.strip()))
    return found


def _tokens(text: str) -> list[str]:
    text = text.replace("\\|", "|")
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in a synopsis
        return text.split()


def _option_names(cmd) -> dict:
    names = {}
    for p in cmd.params:
        if p.param_type_name == "option":
            for n in (*p.opts, *p.secondary_opts):
                names[n] = p
    return names


def _is_placeholder(value: str) -> bool:
    """BUNDLE, N, a shell variable, an alternative list: not a literal value to convert."""
    return (bool(re.fullmatch(r"[A-Z][A-Z0-9_.\-]*", value)) or value.startswith("$")
            or any(m in value for m in SYNOPSIS_MARKS))


def _value_problems(cmd, name: str, flag: str, value: str) -> list[str]:
    """Let the command's own parser convert ``flag value`` (types, ranges, choices); other parameters missing is
    not this line's problem."""
    fillers = [("X",) * max(p.nargs, 1) for p in cmd.params if p.param_type_name == "argument" and p.required]
    try:
        cmd.make_context(name, [flag, value, *[x for f in fillers for x in f]], resilient_parsing=False)
    except Exception as exc:  # noqa: BLE001 - click's exceptions, from typer's own copy of click
        if type(exc).__name__ != "MissingParameter":
            return [f"{flag} {value}: {getattr(exc, 'message', exc)}"]
    return []


def check_command(text: str, group=None) -> list[str]:
    """What is wrong with ``edge-duet TEXT`` against the CLI: unknown command or flag, a value a flag does not take,
    too many or too few arguments. A synopsis (brackets, alternatives, ellipses) has its flags checked only; a
    line with flags and no argument at all is prose naming a flag, and is not asked for the arguments."""
    group = group or cli()
    tokens = _tokens(text)
    if not tokens:
        return ["no command"]
    if tokens[0].startswith("-"):  # edge-duet --version / --help
        known = _option_names(group) | {"--help": None}
        return [f"unknown option {t}" for t in tokens if t.startswith("-") and t not in known]
    name, args = tokens[0], tokens[1:]
    cmd = group.commands.get(name)
    if cmd is None:
        return [f"no command {name!r} (edge-duet has: {', '.join(sorted(group.commands))})"]
    synopsis = any(mark in text for mark in SYNOPSIS_MARKS)
    options = _option_names(cmd)
    problems, positionals, i = [], 0, 0
    while i < len(args):
        tok = args[i].strip("[]()")
        i += 1
        if not tok or tok in ("|", "…", "...", "--"):
            continue
        if tok.startswith("-") and not re.fullmatch(r"-\d[\d.]*", tok):
            flag, _, inline = tok.partition("=")
            if flag == "--help":
                continue
            opt = options.get(flag)
            if opt is None:
                problems.append(f"`edge-duet {name}` has no option {flag}")
                continue
            if opt.is_flag or opt.count:
                continue
            value = inline if inline else (args[i] if i < len(args) else None)
            if not inline:
                i += 1
            if value is None or value.startswith("--"):
                problems.append(f"{flag} needs a value")
                continue
            if not _is_placeholder(value):
                problems += _value_problems(cmd, name, flag, value)
            continue
        positionals += 1
    if not synopsis and args:  # a bare `edge-duet NAME` names the command; it is not a command line
        arguments = [p for p in cmd.params if p.param_type_name == "argument"]
        most = None if any(p.nargs < 0 for p in arguments) else sum(p.nargs for p in arguments)
        least = sum(max(p.nargs, 1) for p in arguments if p.required)
        if most is not None and positionals > most:
            problems.append(f"`edge-duet {name}` takes {most} argument(s), the line gives {positionals}")
        elif 0 < positionals < least:  # none at all: prose naming a flag, as in `edge-duet quantize --recipe int8`
            problems.append(f"`edge-duet {name}` needs {least} argument(s), the line gives {positionals}")
    return problems


ALL_DOC_COMMANDS = [c for path in [*DOCS, *SCRIPTS] for c in doc_commands(path)]


def test_the_docs_hold_command_lines_to_check():
    assert len(ALL_DOC_COMMANDS) >= 40, [c.where for c in ALL_DOC_COMMANDS]


@pytest.mark.parametrize("doc", ALL_DOC_COMMANDS, ids=[f"{c.where} {c.text[:40]}" for c in ALL_DOC_COMMANDS])
def test_doc_command_lines_match_the_cli(doc):
    assert check_command(doc.text) == [], f"{doc.where}: edge-duet {doc.text}"


@pytest.mark.parametrize("line, problem", [
    ("infer BUNDLE IN.json -o OUT.jsonl", "takes 1 argument(s), the line gives 2"),
    ("run --camera 0 --modle ./bundle", "has no option --modle"),
    ("bench --model ./bundle", "has no option --model"),
    ("run --demo --frames-per-turn two", "--frames-per-turn two"),
    ("export CKPT", "needs 2 argument(s)"),
    ("inspekt BUNDLE", "no command 'inspekt'"),
    ("--verison", "unknown option --verison"),
    ("run [--camera N | --videos FILE]", "has no option --videos"),
])
def test_the_checker_catches_drift(line, problem):
    problems = check_command(line)
    assert any(problem in p for p in problems), problems


def test_the_checker_accepts_what_the_cli_accepts():
    for line in ("run --demo --fast", "run --camera 0 --model BUNDLE --providers cuda,cpu", "--version",
                 "export CKPT BUNDLE --no-validate", "serve --host 0.0.0.0 --camera 0",
                 "make-checkpoint DIR --shape tiny|perf|3b", "quantize"):
        assert check_command(line) == [], line


# ------------------------------------------------------------------ --help texts
def _help_texts(cmd) -> list[tuple[str, str]]:
    out = [("the description", cmd.help or "")]
    out += [(p.opts[0] if p.opts else p.name, p.help or "") for p in cmd.params if getattr(p, "help", None)]
    return out


def help_problems(name: str, cmd) -> list[str]:
    """Flags a command's help mentions that it lacks; `edge-duet OTHER --flag` spans are checked against OTHER."""
    problems, options = [], set(_option_names(cmd)) | {"--help"}
    for where, text in _help_texts(cmd):
        for span in re.findall(r"`([^`]*)`", text):
            m = COMMAND.search(span)
            if m:
                problems += [f"{name} {where}: `{span}`: {p}" for p in check_command(span[m.end():])]
        prose = re.sub(r"`[^`]*`", " ", text)
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", prose):
            if flag not in options and flag not in EXTERNAL_FLAGS:
                problems.append(f"{name} {where}: mentions {flag}, which `edge-duet {name}` does not have")
    return problems


def test_help_texts_mention_only_flags_their_command_has():
    group = cli()
    problems = [p for name, cmd in sorted(group.commands.items()) for p in help_problems(name, cmd)]
    assert problems == []


def test_the_help_checker_catches_a_flag_the_command_lacks():
    demo = typer.Typer()

    @demo.command()
    def probe(server: str = typer.Option("", "--server", help="with --model BUNDLE: the served model")):
        """Also see `edge-duet run --nope`."""

    problems = help_problems("probe", typer.main.get_command(demo))
    assert any("mentions --model" in p for p in problems) and any("--nope" in p for p in problems), problems


def test_every_exit_code_is_in_the_table_of_docs_run_md():
    from edge_duet.errors import EdgeDuetError

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    table = (ROOT / "docs" / "run.md").read_text(encoding="utf-8").split("## Exit codes", 1)[1]
    rows = {int(code) for row in re.findall(r"^\| ([\d /]+) \|", table, re.M) for code in row.split("/")}
    codes = {cls.exit_code for cls in subclasses(EdgeDuetError)}
    assert codes - rows == set(), f"exit codes missing from docs/run.md: {sorted(codes - rows)}"


# ------------------------------------------------------------------ run as written
@pytest.mark.parametrize("script", [p for p in SCRIPTS if doc_commands(p)], ids=lambda p: p.name)
def test_scripts_find_edge_duet_in_the_venv_without_activation(script):
    """`bash benchmarks/score_demo.sh` right after `make demo`: a new shell has not activated .venv."""
    assert ". scripts/edge_duet_on_path.sh" in script.read_text()


def test_the_path_snippet_puts_the_venv_first(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "edge_duet_on_path.sh").write_text((ROOT / "scripts" / "edge_duet_on_path.sh").read_text())
    probe = "set -e; . scripts/edge_duet_on_path.sh; command -v edge-duet"
    env = {"PATH": "/usr/bin:/bin"}
    missing = subprocess.run(["bash", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "make demo" in missing.stderr
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "edge-duet").write_text("#!/bin/sh\n")
    (venv_bin / "edge-duet").chmod(0o755)
    found = subprocess.run(["bash", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == str(venv_bin / "edge-duet")

def test_version():
    from typer.testing import CliRunner

    from edge_duet import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"edge-duet {__version__}"


@pytest.mark.slow
def test_readme_first_command_runs_as_written(tmp_path):
    """`make demo` runs `edge-duet run --demo`: the scene on the real-time clock (~25 s), replies printed."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`make demo` runs `edge-duet run --demo`" in readme
    assert "\t$(BIN)/edge-duet run --demo\n" in (ROOT / "Makefile").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "edge_duet.apps.cli", "run", "--demo"], cwd=tmp_path, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    replies = [ln for ln in proc.stdout.splitlines() if "] assistant: " in ln]
    assert len(replies) >= 3, proc.stdout
    if "no audio device" in proc.stderr:  # what the README promises without a sound card
        assert "add --audio-dir DIR to keep them as WAV files" in proc.stderr
