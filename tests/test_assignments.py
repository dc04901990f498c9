"""assignments.py: a student copy imports, its untouched tests pass, its graded tests fail with a
NotImplementedError naming the assignment, no blanked line survives anywhere in it, and putting
the solutions back makes the grades full. (With the solutions back, assignments 3 and 4 take
minutes of tests: that grading is run by hand, README, A course kit)."""

import json
import shutil
import subprocess
import sys

import pytest

from tools import assignments


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    dest = tmp_path_factory.mktemp("student")
    removed = assignments.make(dest)
    return dest, removed


@pytest.mark.slow
def test_the_student_copy_imports_and_its_untouched_tests_pass(copy):
    dest, _ = copy
    modules = ("import train, linear_eval, tsne, curves; "
               "from tools import detect, experiments, benchmark")
    imports = subprocess.Popen([sys.executable, "-c", modules], cwd=dest)   # beside the tests
    outcomes = assignments.run_tests([assignments.UNTOUCHED], dest)
    assert imports.wait(timeout=120) == 0
    assert len(outcomes) > 5 and all(why == "" for why in outcomes.values()), outcomes


def test_no_blanked_line_survives_anywhere_in_the_copy(copy):
    dest, removed = copy
    code = [l.strip() for l in removed if len(l.strip()) >= 16 and not l.strip().startswith("#")]
    assert len(code) > 30                                   # the blanked bodies were real code
    text = "\n".join(p.read_text(errors="replace") for p in dest.rglob("*")
                     if p.is_file() and p.suffix in (".py", ".md", ".txt", ".json"))
    assert [l for l in code if l in text] == []


@pytest.mark.slow
def test_graded_tests_fail_naming_the_assignment_and_pass_with_the_solution_back(copy, tmp_path,
                                                                                capsys):
    """No point is free: every grading test of assignments 1-4 fails in a fresh copy (a test
    that calls no blanked function would pass there)."""
    dest, _ = copy
    scores = assignments.grade([1, 2, 3, 4], dest)
    assert all(p == 0 and t > 0 for p, t in scores.values()), scores
    assert "Assignment 1 (InfoNCE over 2N views)" in capsys.readouterr().out   # the reason shown
    solved = tmp_path / "solved"
    shutil.copytree(dest, solved)
    shutil.copy(assignments.HERE / "losses.py", solved / "losses.py")
    passed, total = assignments.grade([1], solved)[1]
    assert passed == total > 0


def test_the_experiment_is_graded_by_the_shape_of_its_result_file(tmp_path):
    assert assignments.grade_experiment(tmp_path)[0] == 0
    result = {"row": "GIM: 1 conv block", "command": "python -m tools.experiments ablations",
              "linear_top1": 40.1, "knn_top1": 33, "paper_top1": 65.1,
              "explanation": " ".join(["word"] * 50)}
    (tmp_path / assignments.EXPERIMENT).write_text(json.dumps(result))
    assert assignments.grade_experiment(tmp_path)[:2] == (7, 7)
    result["explanation"] = "too short"
    (tmp_path / assignments.EXPERIMENT).write_text(json.dumps(result))
    assert assignments.grade_experiment(tmp_path)[:2] == (6, 7)
