"""What the documents say is what the code does: every command in README.md, ASSIGNMENTS.md and
docs/ names a script or module that exists and flags it accepts (tools always as
`python -m tools.NAME`), the README's first run follows the warm-up rule, its files table counts
each file's lines, every README section and docs page cited in the code exists, and committed
results name no machine's folders."""

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "ASSIGNMENTS.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]


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


def test_the_documents_hold_the_commands_a_user_runs_and_run_tools_as_modules():
    found = {entry_point(shlex.split(c))[0] for _, c in CASES}
    assert {"train", "linear_eval", "tools.experiments", "tools.assignments",
            "tools.multinode", "tools.benchmark", "tools.detect"} <= found, found
    assert [c for _, c in CASES if re.search(r"python3? tools/", c)] == []


def test_the_readme_first_run_is_the_checked_one_and_its_warm_up_ends_early():
    """The first command of README's "A first run" is the one `python -m tools.experiments
    first-run` checks for accuracy, and its warm-up (the default: a tenth of the run) leaves most
    of the run to reach --lr and decay from it: the 10-epoch warm-up once outlasted it."""
    from tools import experiments
    text = (ROOT / "README.md").read_text().split("## A first run", 1)[1]
    first = next(shlex.split(l.strip()) for l in text.splitlines()
                 if l.startswith("    python train.py"))
    assert first[2:] == experiments.README_RUN
    args = train.parse_args(first[2:])
    assert args.warmup_epochs <= args.epochs / 10 and args.warmup_epochs < args.epochs


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
    sources = [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("tests/*.py")]
    cited = {(p.relative_to(ROOT), m.strip().strip('"').lower()) for p in sources
             for m in re.findall(r"README, ([A-Z][^)]*)\)", p.read_text())}
    assert cited
    missing = [(p, s) for p, s in cited if not any(h.startswith(s) for h in headings)]
    pages = {(p.relative_to(ROOT), m) for p in sources
             for m in re.findall(r"docs/[\w-]+\.md", p.read_text())}
    missing += [(p, m) for p, m in pages if not (ROOT / m).exists()]
    assert pages and missing == []


def test_committed_results_name_no_absolute_path():
    found = [(p.relative_to(ROOT), s) for p in ROOT.glob("results/**/*.json")
             for s in re.findall(r'"(/[^"]*)"', p.read_text())]
    assert found == []
    for p in ROOT.glob("results/**/config.json"):
        config = json.loads(p.read_text())
        assert not Path(config["out"]).is_absolute() and not Path(config["data_dir"]).is_absolute()


def test_the_readme_files_table_counts_each_files_lines():
    """The reading-order table gives each file's length, so a reader can plan an hour: a file
    that grew and a count that did not is caught here."""
    rows = re.findall(r"^\| `([\w./]+)` \| .* \| (\d+) \|$", (ROOT / "README.md").read_text(),
                      re.M)
    assert len(rows) >= 9
    for name, count in rows:
        assert len((ROOT / name).read_text().splitlines()) == int(count), name
