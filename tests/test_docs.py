"""What the documents say is what the code does: every command in README.md and ASSIGNMENTS.md
names a script or module that exists and flags it accepts, every README section cited in the code
names a section that exists, and committed results name no machine's folders."""

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "ASSIGNMENTS.md"]


def commands(doc: str) -> list[list[str]]:
    """The python and torchrun commands of a document's code blocks (indented lines), joined
    across trailing backslashes, shell loops unrolled to their first value."""
    lines, out = (ROOT / doc).read_text().splitlines(), []
    text = "\n".join(l[4:] for l in lines if l.startswith("    "))
    text = re.sub(r"\\\n\s*", " ", text)
    loops = dict(re.findall(r"for (\w+) in (\S+)", text))            # for m in simclr gim loco
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        line = re.sub(r"\{(\w+),[^}]*\}", r"\1", line)               # runs/{simclr,gim}/ -> simclr
        line = re.sub(r"\$(\w+)", lambda m: loops.get(m.group(1), "loco"), line)
        for part in line.split(";"):
            part = part.strip().removeprefix("do ").strip()
            if part.startswith(("python ", "torchrun ")) and not part.startswith(
                    ("python -m pytest", "python3 -m venv")):
                out.append(shlex.split(part))
    return out


def entry_point(words: list[str]) -> tuple[str, list[str]]:
    """(module name, its arguments) of `python script.py ...`, `python -m pkg.mod ...` or
    `torchrun [options] script.py ...`."""
    if words[1] == "-m":
        return words[2], words[3:]
    script = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[script].removesuffix(".py").replace("/", "."), words[script + 1:]


CASES = [(doc, " ".join(words)) for doc in DOCS for words in commands(doc)]


def test_the_documents_hold_the_commands_a_user_runs():
    found = {entry_point(shlex.split(c))[0] for _, c in CASES}
    assert {"train", "linear_eval", "tools.experiments", "tools.assignments"} <= found, found


@pytest.mark.parametrize("doc,command", CASES)
def test_every_documented_command_runs_its_help_and_train_accepts_its_flags(doc, command):
    module, argv = entry_point(shlex.split(command))
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main([*argv, "-h"])
    assert e.value.code == 0, (doc, command)
    if module == "train":                # flags and their combinations, checked as a run would
        train.parse_args(argv)


def test_every_readme_section_the_code_cites_exists():
    headings = [h.strip("# ").lower() for h in (ROOT / "README.md").read_text().splitlines()
                if h.startswith("#")]
    cited = {(p.relative_to(ROOT), m.strip().strip('"').lower())
             for p in [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("tests/*.py")]
             for m in re.findall(r"README, ([A-Z][^)]*)\)", p.read_text())}
    assert cited
    missing = [(p, s) for p, s in cited if not any(h.startswith(s) for h in headings)]
    assert missing == []


def test_committed_results_name_no_absolute_path():
    found = [(p.relative_to(ROOT), s) for p in ROOT.glob("results/**/*.json")
             for s in re.findall(r'"(/[^"]*)"', p.read_text())]
    assert found == []
    for p in ROOT.glob("results/**/config.json"):
        config = json.loads(p.read_text())
        assert not Path(config["out"]).is_absolute() and not Path(config["data_dir"]).is_absolute()
