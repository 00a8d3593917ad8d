"""Checking one documented command (tests/cli/test_doc_commands.py): composes its overrides, runs
the --help of the module or vtc subcommand it names, reads the Makefile; the rules are
tests/cli/doc_collect.py's docstring."""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.cli.doc_collect import DROPPED, FLOPS_MODULES, HYDRA_APP_FLAGS, METAVAR, PLACEHOLDER, alternatives
from vtc.config import CONF_DIR, ROOT

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
