"""Every command the docs show parses (issue 23): collected by tests/cli/doc_collect.py (its
docstring lists the sources and the rules for placeholders), checked by tests/cli/doc_check.py.

A doc command that is wrong today goes into EXPECTED_FAILURES with the reason (a strict xfail:
fixing the doc makes the test fail until the entry is removed). test_a_wrong_command_is_caught
proves the checks fail on a made-up config option, key, flag, module, study, make target and vtc
subcommand.
"""
from __future__ import annotations

import pytest

from tests.cli.doc_check import command_problems, help_keys, prefetch_help
from tests.cli.doc_collect import fenced_line_numbers, commands_in, doc_commands, normalise, snippets

# Documented commands that are wrong today: {the command as the doc shows it, without its comment and
# with single spaces (DocCommand.text): why}. Empty: every documented command parses.
EXPECTED_FAILURES: dict[str, str] = {}


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
             for cmd in commands_in(code, fenced=line_no in fenced_line_numbers(FAKE_DOC))]
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
