"""Every command the docs show parses (issue 23).

Collected from README.md, docs/*.md, experiments/README.md and experiments/*/README.md: each line
of a fenced code block (``\\`` continuations joined; a comment that starts with a command, as in
``make study-fig1   # = python -m vtc.runs.study llavolta_fig1``, counts too) and each inline code span
that starts with one of

* ``python train.py ...`` / ``python eval.py ...`` (also ``.venv/bin/python``): ``-m`` is dropped
  and the ``key=value`` overrides are composed with ``vtc.config.compose_conf("train" / "eval")``,
  which raises on an unknown config group, option or key;
* ``python -m vtc.X ...``: the module exists, ``python -m vtc.X --help`` exits 0 (run once per
  module, the modules in parallel), and every ``--flag`` shown appears in that help text; the
  ``key=value`` arguments of ``vtc.cost.flops`` and ``vtc.distributed.fsdp2`` and the overrides after ``--`` of
  ``vtc.runs.study NAME`` are composed with the train config like train.py's (flops' own
  ``compressors=A,B`` must name conf/compressor options or ``configured``);
* ``make TARGET [ARGS="..."]``: the target exists in the Makefile, and each recipe line that passes
  ``$(ARGS)`` to ``$(PY) train.py`` / ``eval.py`` / ``-m vtc.X`` is checked as that command with
  the ARGS shown (``make test``'s pytest and ``make mlflow``'s MLflow are only looked up);
* ``vtc SUBCOMMAND ...`` (the console script, vtc/cli/__init__.py): as the command it dispatches to.

What the docs write for "fill in your own", and what the test puts there:

1. ``<...>`` (``<run>``, ``<the 3 checkpoints>``, ``<Hydra overrides>``, ``<p>``) becomes the word
   PLACEHOLDER: inside a path or as a value it is a harmless string; standing alone among
   overrides it is dropped.
2. ``[...]`` at the start of a word is usage syntax for an optional part: it is unwrapped, so what
   it offers must exist too (``[--format auto|hf|vtc]``: ``--format`` is checked, its value is
   not).
3. A lone ``...``, ``overrides`` or ``OVERRIDES`` among overrides ("more overrides here") is
   dropped; ``...`` as a value (``ckpt_path=...``) or as a sweep item (``compressors=none,pool,...``)
   is a placeholder value, kept as a string resp. dropped.
4. ``GROUP=NAME`` (an upper-case metavariable as a config group's option, ``benchmark=NAME``) is
   composed once per option of conf/GROUP/.
5. No path is substituted: composing never opens a file, so ``ckpt_path=PATH``,
   ``model.init_from=/models/llava-1.5-7b-hf``, ``hydra.run.dir=DIR`` compose as written. Checking
   values (``compressor.stride=5`` is shown as a command that fails check_config on purpose) is
   not this test's business, only that every key, group and option exists.
6. A sweep ``key=a,b,c`` is composed once per value (the other keys at their first value), as
   Hydra runs one job per value; no cartesian product, and one compose per unique override list
   (cached), no training.
7. A word ``a|b|c`` (``vtc bench compressors|curriculum|...``) stands for each alternative; an
   upper-case metavariable as the vtc subcommand (``vtc SUB --help``) for every subcommand of
   vtc/cli/__init__.py.

A doc command that is wrong today goes into EXPECTED_FAILURES with the reason (a strict xfail:
fixing the doc makes the test fail until the entry is removed). test_a_wrong_command_is_caught
proves the checks fail on a made-up config option, key, flag, module, study, make target and vtc
subcommand.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vtc.config import CONF_DIR, ROOT

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "experiments").glob("README.md")), *sorted((ROOT / "experiments").glob("*/README.md"))]

# Documented commands that are wrong today: {the command as the doc shows it, without its comment and
# with single spaces (DocCommand.text): why}. Empty: every documented command parses.
EXPECTED_FAILURES: dict[str, str] = {}

COMMAND = re.compile(r"(?:\S*/)?(?:python3? (?:train\.py|eval\.py|-m vtc\b)|vtc [\w-]+)|make [\w-]+")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
PLACEHOLDER = "PLACEHOLDER"
DROPPED = {"...", PLACEHOLDER, "overrides", "OVERRIDES"}  # rules 1 and 3
METAVAR = re.compile(r"^[A-Z][A-Z_]*$")  # rules 4 and 7
HYDRA_APP_FLAGS = {"-m", "--multirun", "-h", "--help"}
FLOPS_MODULES = {"vtc.cli.flops"}


# --------------------------------------------------------------------------- collecting


def snippets(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced line (continuations joined) and inline code span."""
    lines = text.splitlines()
    out: list[tuple[int, str]] = []
    prose: list[tuple[int, str]] = []  # (line number, line) outside fences
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].lstrip().startswith(m.group(1)):
            j += 1
        k = i + 1
        while k < j:
            line_no, code = k + 1, lines[k]
            while code.rstrip().endswith("\\") and k + 1 < j:
                k += 1
                code = code.rstrip()[:-1] + " " + lines[k].strip()
            out.append((line_no, code))
            k += 1
        i = j + 1
    # Inline spans never cross a paragraph (blank line), so a stray backtick spoils one paragraph only.
    para: list[tuple[int, str]] = []
    for item in [*prose, (0, "")]:
        if item[1].strip():
            para.append(item)
            continue
        if para:
            body = "\n".join(line for _, line in para)
            for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", body):
                out.append((para[0][0] + body.count("\n", 0, m.start()), " ".join(m.group(1).split())))
        para = []
    return out


def commands_in(code: str, fenced: bool) -> list[str]:
    """The commands a snippet shows: one starting it (after an optional ``$ ``), and in a fenced
    line one starting its comment (``# = python -m ...``)."""
    found = []
    code = code.strip()
    code = code[2:] if code.startswith("$ ") else code
    if COMMAND.match(code):
        found.append(code)
    if fenced:
        m = re.search(r"(?:^|\s)#\s*=?\s*(.*)$", code)
        if m and COMMAND.match(m.group(1)):
            found.append(m.group(1))
    return found


@dataclass
class DocCommand:
    shown: str
    where: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return normalise(self.shown)

    @property
    def text(self) -> str:
        """The command without its comment, spaces collapsed: the key of EXPECTED_FAILURES."""
        return " ".join(re.split(r"\s#(?:\s|$)", self.shown)[0].split())


def normalise(shown: str) -> list[str]:
    """Rules 1 and 2, then shell words (quotes as the shell reads them, comments dropped)."""
    s = re.sub(r"<[^<>]*>", PLACEHOLDER, shown)
    prev = None
    while prev != s:
        prev, s = s, re.sub(r"(?<![^\s\"'])\[([^\[\]]*)\]", r"\1", s)
    argv = shlex.split(s, comments=True)
    if argv and re.fullmatch(r"(?:\S*/)?python3?", argv[0]):
        argv[0] = "python"
    if argv and re.fullmatch(r"\S*/vtc", argv[0]):  # .venv/bin/vtc
        argv[0] = "vtc"
    return argv


def alternatives(argv: list[str]) -> list[list[str]]:
    """Rule 7: a word ``a|b|c`` (no ``=``) stands for each of a, b and c."""
    for i, a in enumerate(argv):
        if "|" in a and "=" not in a:
            return [alt for v in a.split("|") if v for alt in alternatives([*argv[:i], v, *argv[i + 1:]])]
    return [argv]


def doc_commands() -> list[DocCommand]:
    by_text: dict[str, DocCommand] = {}
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        fenced_lines = _fenced_line_numbers(text)
        for line_no, code in snippets(text):
            for cmd in commands_in(code, fenced=line_no in fenced_lines):
                by_text.setdefault(cmd, DocCommand(cmd)).where.append(f"{path.relative_to(ROOT)}:{line_no}")
    return list(by_text.values())


def _fenced_line_numbers(text: str) -> set[int]:
    inside, fence, out = False, "", set()
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and (not inside or line.lstrip().startswith(fence)):
            inside, fence = (not inside), m.group(1)
            continue
        if inside:
            out.add(n)
    return out


# --------------------------------------------------------------------------- checking


@functools.lru_cache(maxsize=None)
def compose_error(config: str, overrides: tuple[str, ...]) -> str | None:
    from vtc.config import compose_conf

    try:
        compose_conf(config, list(overrides))
    except Exception as e:  # noqa: BLE001  (Hydra's parse / composition errors)
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return None


def _split_sweep(value: str) -> list[str] | None:
    """The values of a sweep ``a,b,c`` (rule 6), or None for a single value."""
    if "," not in value or value[:1] in "[{'\"" or "(" in value:
        return None
    return [v for v in value.split(",") if v and v not in DROPPED]


def variants(overrides: list[str]) -> list[list[str]]:
    """Rules 3, 4 and 6: the override lists to compose for one documented command."""
    choices = []
    for o in overrides:
        if o in DROPPED:
            continue
        key, sep, value = o.partition("=")
        group = CONF_DIR / key.lstrip("+~")
        if sep and (vals := _split_sweep(value)) is not None:
            choices.append([f"{key}={v}" for v in vals] or [f"{key}={PLACEHOLDER}"])
        elif sep and METAVAR.match(value) and group.is_dir():
            choices.append([f"{key}={p.stem}" for p in sorted(group.glob("*.yaml"))])
        else:
            choices.append([o])
    base = [c[0] for c in choices]
    out = [base]
    for i, c in enumerate(choices):
        out += [base[:i] + [alt] + base[i + 1:] for alt in c[1:]]
    return out


def compose_problems(config: str, overrides: list[str]) -> list[str]:
    problems = []
    for v in variants(overrides):
        err = compose_error(config, tuple(v))
        if err:
            problems.append(f"compose_conf({config!r}, {v}): {err}")
    return problems


def hydra_app_problems(config: str, args: list[str]) -> list[str]:
    flags = [a for a in args if a.startswith("-") and a not in HYDRA_APP_FLAGS]
    problems = [f"{config}.py: flag {f!r} (the docs' commands use only -m)" for f in flags]
    return problems + compose_problems(config, [a for a in args if not a.startswith("-")])


_HELP: dict[tuple[str, ...], tuple[int, str]] = {}


# ``vtc SUB [BENCH] --help`` for many SUBs in one process: the console script runs its subcommands
# in-process by design (vtc/cli/__init__.py), so one interpreter serves them all, each with its own output.
_VTC_HELPS = r"""
import contextlib, io, json, sys
from vtc.cli import main
out = {}
for key in json.loads(sys.argv[1]):
    buf, code = io.StringIO(), 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main([*key, "--help"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001
            code = 1
            print(f"{type(e).__name__}: {e}")
    out[json.dumps(key)] = [code, buf.getvalue()]
print("\n@@vtc-helps@@" + json.dumps(out))
"""


def _run(argv: list[str]) -> tuple[int, str]:
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return p.returncode, p.stdout + p.stderr


def _run_vtc_helps(keys: list[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[int, str]]:
    """``vtc SUB ... --help`` for every key ("vtc", SUB, ...), all in one process."""
    if not keys:
        return {}
    rc, text = _run([sys.executable, "-c", _VTC_HELPS, json.dumps([list(k[1:]) for k in keys])])
    if "@@vtc-helps@@" not in text:  # the helper itself failed: every key gets its output
        return {k: (rc or 1, text) for k in keys}
    got = json.loads(text.rsplit("@@vtc-helps@@", 1)[1])
    return {("vtc", *json.loads(k)): (c, t) for k, (c, t) in got.items()}


def prefetch_help(keys) -> None:
    """The help texts of ``keys``: (MODULE,) is ``python -m MODULE --help``, one process each, in
    parallel; ("vtc", ...) the console script's, in one more process."""
    todo = sorted({k for k in keys if k not in _HELP})
    modules = [k for k in todo if k[0] != "vtc"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        vtc_job = pool.submit(_run_vtc_helps, [k for k in todo if k[0] == "vtc"])
        for k, res in zip(modules, pool.map(lambda k: _run([sys.executable, "-m", k[0], "--help"]), modules)):
            _HELP[k] = res
        _HELP.update(vtc_job.result())


def help_text(key: tuple[str, ...]) -> tuple[int, str]:
    if key not in _HELP:
        prefetch_help([key])
    return _HELP[key]


def module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def module_problems(module: str, args: list[str], help_key: tuple[str, ...] | None = None) -> list[str]:
    """``python -m module args`` (or the vtc subcommand ``help_key`` that runs it)."""
    help_key = help_key or (module,)
    if not module_exists(module):
        return [f"no module {module}"]
    rc, text = help_text(help_key)
    if rc != 0:
        return [f"{' '.join(help_key)} --help exits {rc}: {text.strip()[-300:]}"]
    before, after = _split_double_dash(args)
    problems = []
    for a in before:
        if a.startswith("-") and a != "-":
            name = a.split("=", 1)[0]
            if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
                problems.append(f"{module}: {name} is not in its --help")
    # positional words: not a flag, nor the value of the flag before it (``--world 8``)
    plain = [a for i, a in enumerate(before) if not a.startswith("-")
             and not (i and before[i - 1].startswith("--") and "=" not in before[i - 1])]
    if module in FLOPS_MODULES:
        problems += flops_problems(before)
    elif module == "vtc.cli.parallel":
        problems += compose_problems("train", plain)
    elif module == "vtc.runs.study":
        names = [a for a in plain if a not in DROPPED and not METAVAR.match(a)]
        for name in names[:1]:
            if not (CONF_DIR / "experiment" / f"{name}.yaml").is_file():
                problems.append(f"vtc.runs.study: no study {name!r} (conf/experiment/{name}.yaml)")
            else:
                problems += compose_problems("train", [f"experiment={name}", *after])
    return problems


def _split_double_dash(args: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments, what comes after ``--``: vtc.runs.study's Hydra overrides)."""
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1:]
    return args, []


def flops_problems(args: list[str]) -> list[str]:
    problems, overrides = [], []
    options = {p.stem for p in (CONF_DIR / "compressor").glob("*.yaml")} | {"configured"}
    for a in args:
        if a.startswith("-"):
            continue
        if a.startswith("compressors="):
            bad = [n for n in a.split("=", 1)[1].split(",") if n and n not in DROPPED and n not in options]
            problems += [f"vtc.cli.flops: compressors={n} is not a conf/compressor option" for n in bad]
        elif not a.startswith("text_tokens="):
            overrides.append(a)
    return problems + compose_problems("train", overrides)


def cli_problems(args: list[str]) -> list[str]:
    """``vtc SUB ...`` (= ``python -m vtc SUB ...``): checked as the command SUB dispatches to."""
    if not args:
        return []
    try:
        from vtc import cli
    except ImportError as e:
        return [f"the vtc console script's module does not import: {e}"]
    sub, rest = args[0], args[1:]
    if METAVAR.match(sub):  # rule 7: vtc SUB ... for every SUB
        return [p for s in vtc_subcommands() for p in cli_problems([s, *rest])]
    if sub in cli.MODULES:
        return module_problems(cli.MODULES[sub][0], rest, vtc_help_key(args))
    if sub == "bench" and rest and rest[0] in cli.BENCHES:
        return module_problems(cli.BENCHES[rest[0]][0], rest[1:], vtc_help_key(args))
    problems = []
    if sub in cli.SCRIPTS:
        problems = hydra_app_problems(Path(cli.SCRIPTS[sub][0]).stem, rest)
    elif sub not in ("-h", "--help", "help", "bench"):
        return [f"vtc: no subcommand {' '.join(args[:2])!r}"]
    if (key := vtc_help_key(args)) is not None:
        rc, text = help_text(key)
        if rc:
            problems.append(f"{' '.join(key)} --help exits {rc}: {text.strip()[-300:]}")
    return problems


def vtc_help_key(args: list[str]) -> tuple[str, ...] | None:
    """The ``vtc ... --help`` whose text checks ``vtc ARGS`` (None: no help text involved)."""
    if not args:
        return None
    sub, rest = args[0], args[1:]
    if sub in ("-h", "--help", "help"):
        return ("vtc",)
    if sub == "bench":
        return ("vtc", "bench", *[a for a in rest if not a.startswith("-")][:1])
    if sub in ("train", "eval"):  # Hydra apps: their help only when the docs ask for it
        return ("vtc", sub) if {"-h", "--help"} & set(rest) else None
    return ("vtc", sub)


def vtc_subcommands() -> list[str]:
    from vtc import cli

    return [*cli.SCRIPTS, *cli.MODULES, "bench"]


@functools.lru_cache(maxsize=None)
def make_targets() -> dict[str, list[str]]:
    """Makefile target -> its recipe lines."""
    targets: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([\w.-]+)\s*:(?!=)", line)
        if m and not m.group(1).startswith("."):
            current = targets.setdefault(m.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif line.strip():
            current = None  # a comment, a variable: the recipe has ended
    return targets


def make_problems(args: list[str]) -> list[str]:
    variables = dict(a.split("=", 1) for a in args if "=" in a)
    names = [a for a in args if "=" not in a]
    targets = make_targets()
    problems = []
    for name in names:
        if name not in targets:
            problems.append(f"make: no target {name!r}")
            continue
        for recipe in targets[name]:
            if "$(ARGS)" not in recipe or not recipe.startswith("$(PY) "):
                continue
            line = recipe.replace("$(PY)", "python").replace("$(ARGS)", "")
            problems += command_problems([*shlex.split(line), *shlex.split(variables.get("ARGS", ""))])
    return problems


def command_problems(argv: list[str]) -> list[str]:
    if not argv:
        return ["empty command"]
    if len(alts := alternatives(argv)) > 1:
        return [p for alt in alts for p in command_problems(alt)]
    if argv[0] == "make":
        return make_problems(argv[1:])
    if argv[0] == "vtc":
        return cli_problems(argv[1:])
    if argv[0] == "python" and len(argv) > 1:
        if argv[1] in ("train.py", "eval.py"):
            return hydra_app_problems(argv[1][:-3], argv[2:])
        if argv[1] == "-m" and len(argv) > 2:
            if argv[2] == "vtc":
                return cli_problems(argv[3:])
            if argv[2].startswith("vtc."):
                return module_problems(argv[2], argv[3:])
    return []


def help_keys(argv: list[str]) -> set[tuple[str, ...]]:
    """The --help texts a command will ask for (to run them in parallel up front)."""
    if len(alts := alternatives(argv)) > 1:
        return {k for alt in alts for k in help_keys(alt)}
    if argv[:2] == ["python", "-m"] and len(argv) > 2 and argv[2].startswith("vtc."):
        return {(argv[2],)}
    if argv[:3] == ["python", "-m", "vtc"]:
        argv = ["vtc", *argv[3:]]
    if argv and argv[0] == "vtc" and len(argv) > 1:
        subs = vtc_subcommands() if METAVAR.match(argv[1]) else [argv[1]]
        return {k for sub in subs if (k := vtc_help_key([sub, *argv[2:]])) is not None}
    if argv and argv[0] == "make":
        out = set()
        for name in argv[1:]:
            for recipe in make_targets().get(name, []):
                if "$(ARGS)" in recipe and recipe.startswith("$(PY) "):
                    out |= help_keys(shlex.split(recipe.replace("$(PY)", "python").replace("$(ARGS)", "")))
        return out
    return set()


# --------------------------------------------------------------------------- tests

DOCS = doc_commands()


@pytest.fixture(scope="module")
def helps():
    prefetch_help(k for c in DOCS for k in help_keys(c.argv))


def test_the_docs_commands_are_found():
    """The collector sees every kind of command (a broken extractor would pass vacuously)."""
    argvs = [c.argv for c in DOCS]
    assert sum(a[:2] == ["python", "train.py"] for a in argvs) >= 5
    assert sum(a[:2] == ["python", "eval.py"] for a in argvs) >= 3
    assert sum(a[:2] == ["python", "-m"] for a in argvs) >= 8
    assert sum(a[0] == "make" for a in argvs) >= 4
    assert set(EXPECTED_FAILURES) <= {c.text for c in DOCS}, "an expected failure no doc shows any more"


@pytest.mark.parametrize("cmd", [
    pytest.param(c, id=c.where[0], marks=[pytest.mark.xfail(reason=EXPECTED_FAILURES[c.text], strict=True)]
                 if c.text in EXPECTED_FAILURES else [])
    for c in DOCS])
def test_documented_command_parses(cmd, helps):
    problems = command_problems(cmd.argv)
    assert not problems, f"{cmd.shown!r} (shown at {', '.join(cmd.where)}):\n  " + "\n  ".join(problems)


FAKE_DOC = """
Some prose with `python train.py compressor=pool compressor.stride=4` that is fine, and:

```bash
python train.py compressor=nonexistent            # an option the group does not have
python eval.py -m ckpt_path=... compressor.no_such_key=1,2
make study-fig1   # = python -m vtc.runs.study no_such_study
```

`python -m vtc.runs.report --experiment train --no-such-flag`, `python -m vtc.no_such_module`,
`make no-such-target`, `make train ARGS="benchmark=gqa"` (a key of eval.py, not train.py) and
`python -m vtc.cli.flops compressors=none,nonexistent`, `vtc no-such-subcommand` and
`.venv/bin/vtc bench compressors --no-such-flag` are all wrong.
"""


def test_a_wrong_command_is_caught(helps):
    found = [cmd for line_no, code in snippets(FAKE_DOC)
             for cmd in commands_in(code, fenced=line_no in _fenced_line_numbers(FAKE_DOC))]
    verdicts = {cmd: command_problems(normalise(cmd)) for cmd in found}
    assert verdicts.pop("python train.py compressor=pool compressor.stride=4") == []
    assert verdicts.pop("make study-fig1   # = python -m vtc.runs.study no_such_study") == []  # the target exists
    assert len(verdicts) == 10, list(verdicts)
    for cmd, problems in verdicts.items():
        assert problems, f"{cmd!r} was not caught"
    def why(prefix: str) -> str:
        return "\n".join(next(v for k, v in verdicts.items() if k.startswith(prefix)))

    assert "compressor/nonexistent" in why("python train.py compressor=nonexistent")
    assert "compressor.no_such_key" in why("python eval.py -m")
    assert "--no-such-flag is not in its --help" in why("python -m vtc.runs.report")
    assert "no_such_study" in why("python -m vtc.runs.study")
    assert "no module vtc.no_such_module" in why("python -m vtc.no_such_module")
    assert "no target 'no-such-target'" in why("make no-such-target")
    assert "benchmark" in why("make train")
    assert "compressors=nonexistent" in why("python -m vtc.cli.flops")
    assert "no-such-subcommand" in why("vtc no-such")
    assert "--no-such-flag" in why(".venv/bin/vtc bench")
