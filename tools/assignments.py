"""A course kit: student copies generated from this code, graded by its specification tests.

    python -m tools.assignments make DEST         # a student copy of the repository in DEST
    python -m tools.assignments grade [N ...]     # in a copy: grade assignment N (default: all)

`make` copies the repository and replaces the body of every function an assignment names with
its instructions (as the docstring) and `raise NotImplementedError` naming the assignment. The
teaching code itself carries no solution markers: the table below names what is blanked. The
tests that grade an assignment are the repository's own (test_loco.py is the specification of the
method), so a student's code is held to exactly what the reference implementation is held to.
ASSIGNMENTS.md is the students' text: goal, what to read in the paper, tests, run time.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cli

HERE = cli.ROOT                      # the repository whose copy is made, or graded


@dataclass(frozen=True)
class Assignment:
    title: str
    blanks: dict[str, str]      # "file.py:function" -> the instructions students find there
    files: tuple[str, ...] = ()     # the grading tests: those of these files whose name holds
    keywords: tuple[str, ...] = ()  # one of these (pytest FILES -k "KW or KW ...")

    def grades(self, test: str) -> bool:
        """Whether this assignment is graded by the test of node id `test` (file::name[id]), or
        by `test`, a file of its tests that failed to import (all its tests then fail)."""
        file, _, name = test.partition("::")
        return file in self.files and (not name or any(k in name.lower() for k in self.keywords))


ASSIGNMENTS = {
    1: Assignment("InfoNCE over 2N views", {
        "losses.py:info_nce": """Mean InfoNCE (Eq. 1, SimCLR's NT-Xent) over this process's 2n
        views z (2n, D): rows 0..n-1 are the first views of n images, rows n..2n-1 the second
        views. For anchor i, the positive is the other view of its image and the negatives are
        all other 2n-2 views; similarities are cosines divided by tau. Hints: normalise z, build
        the (2n, 2n) logits, remove each anchor's similarity to itself, use cross-entropy with the
        positive's column as the label. Compute in float32 even under autocast. Across processes,
        the negatives are gather(z): every process's views (losses.gather)."""},
        ("test_loco.py",), ("info_nce",)),
    2: Assignment("The units of SimCLR, GIM and LoCo", {
        "local_units.py:make_units": """Return the units of `method` on pieces whose stages are
        stage_of (without block sharing: one piece per stage, stage_of = [0, 1, ..., K-1]),
        ordered by the piece their head sits on. SimCLR: one unit over everything. GIM: one unit
        per stage. LoCo: unit k spans stages k and k+1 (k < K-1), plus, if top_unit, the top
        stage alone. Sharing (Table 5): "upper" gives a shared piece's weights to the unit above
        only (Unit.learns); "1block"/"2blocks" end unit k at the first piece of stage k+1;
        "soft" ends it at stage k (its decoder holds a copy of stage k+1). The module docstring
        draws the table of which loss reaches which stage."""},
        ("test_loco.py",), ("shares_every_stage", "upper_grad_only_gives", "sharing_blocks_cuts",
                            "soft_sharing_gives")),
    3: Assignment("One local step: each unit's backward, with its cuts", {
        "local_units.py:train_step": """Forward each piece once on both views (concatenated: one
        BatchNorm batch), its input detached, so each piece's graph stands alone; as soon as a
        unit's top piece has run, call backward_unit for it. Count for every piece how many units
        pass through it (`visits`), keep each piece's (input, output) in `graph` until no unit
        needs it, and apply the soft-sharing tie at the end. Return every unit's loss.""",
        "local_units.py:backward_unit": """Backpropagate unit u's loss through its head, with a
        cut of its own (the head's input detached), then hand its gradient to carry, from u.last
        down to u.first (or to `bottom`, where a pipeline's process ends). Return the loss,
        detached, and what carry returns.""",
        "local_units.py:carry": """Carry unit u's gradient g down its pieces from `top` to
        `bottom`, across each cut by hand and no further. A piece's weight gradient is linear in
        its output gradient: hold each learning unit's part in `held` and run ONE weight pass per
        piece, when the last unit through it has delivered (`visits`); run an input-only pass
        only where u continues below the piece (merged into the weight pass when u alone trains
        it). Free a piece's graph after its last use (unless in `keep`; `weights` replaces a
        piece's parameters). Return u's gradient at bottom's input if u continues below bottom,
        else None."""},
        ("test_loco.py",), ("reaches_exactly", "lower_stage_would", "upper_grad_only_still",
                            "reference", "weight_gradient_once", "costs_exactly", "forward_once",
                            "peak_activation")),
    4: Assignment("Linear evaluation on frozen features", {
        "linear_eval.py:stage_features": """Global-average-pooled output of every stage, a list of
        (N, C_k) float32 tensors, and the labels (N,), from (uint8 images, labels) batches. The
        encoder is frozen: it must not move, BatchNorm's running statistics included (why: see
        the module docstring). Standardise the images with augment.standardize and use rt.prepare and
        rt.autocast as train.py does.""",
        "linear_eval.py:fit_linear": """Multinomial logistic regression x (N, D) -> classes with an
        L2 penalty l2 * |W|^2 on the weights, fitted by full-batch L-BFGS (torch.optim.LBFGS,
        strong Wolfe line search, `steps` iterations). Return the fitted nn.Linear."""},
        ("tests/test_eval.py",), ("beats_chance", "refuses_to_report", "paper_protocol")),
    5: Assignment("An experiment: one row of Table 4 or 5", {}),
}
EXPERIMENT = "assignment5.json"     # assignment 5's result file, at the root of the copy
KEYS = {"row": str, "command": str, "linear_top1": float, "knn_top1": float,
        "paper_top1": float, "explanation": str}
UNTOUCHED = Assignment("tests that run without blanked code", {}, (   # pass in a fresh copy
    "tests/test_data.py", "test_loco.py", "tests/test_runtime.py"), (
    "grayscale", "reproducible", "cifar10_layout", "stages_chain", "published", "auto_picks",
    "lacks"))


# ---------------------------------------------------------------------------- make
def blank(source: str, function: str, number: int, title: str, instructions: str) -> tuple[str, list[str]]:
    """source with `function`'s body replaced; and the code lines removed."""
    tree = ast.parse(source)
    node = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                 and n.name == function), None)
    if node is None:
        raise cli.UserError(f"assignment {number}: no function {function} to blank")
    lines = source.splitlines(keepends=True)
    first, last = node.body[0].lineno - 1, node.end_lineno
    indent = " " * node.body[0].col_offset
    text = re.sub(r"\s+", " ", instructions).strip()
    wrapped, line = [], ""
    for word in text.split():
        if len(indent) + len(line) + len(word) > 95:
            wrapped.append(line.rstrip())
            line = ""
        line += word + " "
    wrapped.append(line.rstrip())
    body = [f'{indent}"""Assignment {number}, {title}.\n', "\n"]
    body += [f"{indent}{w}\n" for w in wrapped] + [f'{indent}"""\n']
    body.append(f'{indent}raise NotImplementedError("Assignment {number} ({title}): implement '
                f'{function}; see its docstring and ASSIGNMENTS.md")\n')
    code = node.body[0].end_lineno if ast.get_docstring(node) is not None else first
    return "".join(lines[:first] + body + lines[last:]), lines[code:last]


def repository_files() -> list[Path]:
    """The tracked files of this repository (git), else its sources and texts."""
    try:
        names = subprocess.run(["git", "-C", str(HERE), "ls-files"], capture_output=True,
                               text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        names = [p.name for p in HERE.glob("*") if p.suffix in (".py", ".md", ".txt")]
    return [HERE / n for n in names if n != "tests/test_assignments.py"]


def make(dest: Path) -> list[str]:
    """Write the student copy into dest; return every removed code line."""
    if dest.exists() and any(dest.iterdir()):
        raise cli.UserError(f"{dest} is not empty: give a new directory", flag=True)
    for src in repository_files():
        target = dest / src.relative_to(HERE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    removed = []
    for number, a in ASSIGNMENTS.items():
        for where, instructions in a.blanks.items():
            file, function = where.split(":")
            source, lines = blank((dest / file).read_text(), function, number, a.title,
                                  instructions)
            (dest / file).write_text(source)
            removed += lines
    print(f"wrote a student copy to {dest}: {sum(len(a.blanks) for a in ASSIGNMENTS.values())} "
          f"functions blanked for {len(ASSIGNMENTS)} assignments (ASSIGNMENTS.md)")
    return removed


# ---------------------------------------------------------------------------- grade
def run_tests(assignments: list[Assignment], where: Path) -> dict[str, str]:
    """The outcome of every test that grades one of `assignments`, in one pytest run in `where`
    (one start of torch for all): node id -> "" if it passed, else its failure's one line."""
    files = sorted({f for a in assignments for f in a.files if (where / f).is_file()})
    if not files:
        return {}
    keywords = " or ".join(k for a in assignments for k in a.keywords)
    job = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "--tb=line", "-p",
                          "no:cacheprovider", *files, "-k", keywords], cwd=where,
                         capture_output=True, text=True,     # summary lines unshortened:
                         env={**os.environ, "COLUMNS": "1000"})
    said = (job.stdout + job.stderr).splitlines()
    blocks, inside = [], False         # the "E " lines of each error pytest printed in full
    for line in said:
        if line.startswith("E ") and not inside:
            blocks.append([])
        if inside := line.startswith("E "):
            blocks[-1].append(line[1:].strip())
    error = " ".join(l for l in (blocks or [[]])[-1] if l.strip("^ "))   # the last one
    outcomes = {}
    for line in job.stdout.splitlines():    # -rA: "PASSED id", "FAILED id - why", "ERROR id - why"
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR"):
            test, _, why = rest.partition(" - ")   # a file that fails to import: no why, its error
            if outcomes.get(test, "") == "":     # a failure is kept (a test may also error after)
                outcomes[test] = "" if word == "PASSED" else why or error or word.lower()
    if not outcomes and job.returncode not in (0, 5):      # 5: no test to run here
        raise cli.UserError(f"pytest could not run the tests in {where} (exit {job.returncode}): "
                            f"{error or (said or [''])[-1].strip()}")
    return {t: why for t, why in outcomes.items() if any(a.grades(t) for a in assignments)}


def grade_experiment(where: Path) -> tuple[int, int, str]:
    """Assignment 5: the result file is there and holds every field, of the right kind, with an
    explanation of at least 50 words. Its values are the student's finding, not graded."""
    path = where / EXPERIMENT
    if not path.is_file():
        return 0, len(KEYS) + 1, f"{EXPERIMENT} not found: see ASSIGNMENTS.md, assignment 5"
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return 0, len(KEYS) + 1, f"{EXPERIMENT} is not JSON: {e}"
    ok = [isinstance(result.get(k), t) or (t is float and isinstance(result.get(k), int))
          for k, t in KEYS.items()]
    ok.append(len(str(result.get("explanation", "")).split()) >= 50)
    missing = [k for k, good in zip([*KEYS, "explanation of 50 words"], ok) if not good]
    return sum(ok), len(ok), f"missing or wrong: {', '.join(missing)}" if missing else ""


def grade(numbers: list[int], where: Path = HERE) -> dict[int, tuple[int, int]]:
    numbers = numbers or list(ASSIGNMENTS)
    tested = [ASSIGNMENTS[n] for n in numbers if ASSIGNMENTS[n].files]
    outcomes = run_tests(tested, where) if tested else {}
    scores = {}
    for n in numbers:
        a = ASSIGNMENTS[n]
        if a.files:
            mine = [why for test, why in outcomes.items() if a.grades(test)]
            passed, total = mine.count(""), len(mine)
            reason = next((why for why in mine if why), "")
        else:
            passed, total, reason = grade_experiment(where)
        if total == 0:                   # no test of this assignment ran: not a student copy
            raise cli.UserError(f"{where} holds none of assignment {n}'s tests ({' '.join(a.files)} "
                                f"-k {' or '.join(a.keywords)}): grade inside a copy written by "
                                f"`assignments.py make DEST`")
        scores[n] = (passed, total)
        print(f"assignment {n}  {a.title:<55} {passed:>3}/{total:<3} {100 * passed / max(1, total):5.0f}%"
              + (f"\n    {reason}" if reason and passed < total else ""), flush=True)
    full = sum(p == t for p, t in scores.values())
    print(f"{full} of {len(scores)} assignments complete")
    return scores


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__, "python -m tools.assignments")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("make", help="write a student copy").add_argument("dest", type=Path)
    g = sub.add_parser("grade", help="grade assignments in this copy")
    g.add_argument("numbers", nargs="*", type=int, help=f"any of {list(ASSIGNMENTS)}; default: all")
    args = p.parse_args(argv)
    if args.command == "grade" and not set(args.numbers) <= set(ASSIGNMENTS):
        p.error(f"argument numbers: choose from {list(ASSIGNMENTS)}")
    if args.command == "make":
        make(cli.check_writable(args.dest, "DEST", is_dir=True))
    else:
        grade(args.numbers)


if __name__ == "__main__":
    cli.run(main, "python -m tools.assignments")
