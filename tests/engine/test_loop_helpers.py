import pytest

from engine.loop import correct_solutions, mcnemar


def test_mcnemar_exact_binomial():
    out = mcnemar([0] * 10 + [1] * 5, [1] * 10 + [0] * 5)
    assert (out["gained_vs_start"], out["lost_vs_start"]) == (10, 5)
    assert out["mcnemar_p"] == pytest.approx(0.30175781, abs=1e-7)
    assert mcnemar([1, 0], [1, 0])["mcnemar_p"] == 1.0


def test_correct_solutions_dedupes_and_caps():
    t = lambda tid, steps, ok: {"task_id": tid, "steps": steps, "correct": ok, "prompt": "p"}  # noqa: E731
    trajs = [t("a", ["1\n"], True), t("a", ["1\n"], True), t("a", ["2\n"], True), t("a", ["3\n"], True),
             t("b", ["x\n"], False), t("c", ["y\n"], True)]
    out = correct_solutions(trajs, per_task=2)
    assert [(r["task_id"], r["steps"]) for r in out] == [("a", ["1\n"]), ("a", ["2\n"]), ("c", ["y\n"])]
