"""The documentation's commands, collected for tests/cli/test_doc_commands.py (issue 23).

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

import re
import shlex
from dataclasses import dataclass, field

from vtc.config import ROOT

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "experiments").glob("README.md")), *sorted((ROOT / "experiments").glob("*/README.md"))]

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
        fenced_lines = fenced_line_numbers(text)
        for line_no, code in snippets(text):
            for cmd in commands_in(code, fenced=line_no in fenced_lines):
                by_text.setdefault(cmd, DocCommand(cmd)).where.append(f"{path.relative_to(ROOT)}:{line_no}")
    return list(by_text.values())


def fenced_line_numbers(text: str) -> set[int]:
    inside, fence, out = False, "", set()
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and (not inside or line.lstrip().startswith(fence)):
            inside, fence = (not inside), m.group(1)
            continue
        if inside:
            out.add(n)
    return out
