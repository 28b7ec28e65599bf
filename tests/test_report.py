"""Accuracy summaries of evaluation batches."""

from __future__ import annotations

import pytest
import torch

from lit_zpd.report import accuracy_table, forgetting, solved, summarize
from lit_zpd.rollout.batch import EvalBatch


def results(skills: list[str], greedy: list[float], sampled: list[float] | None = None, ids: list[str] | None = None) -> EvalBatch:
    ids = ids or [f"p{i}" for i in range(len(skills))]
    return EvalBatch(
        problem_ids=ids, skills=skills, prompts=[""] * len(ids), greedy_correct=torch.tensor(greedy),
        greedy_texts=[""] * len(ids), sample_pass_rate=torch.tensor(sampled) if sampled is not None else None,
    )


def test_summarize_per_skill_overall_and_partial_fraction() -> None:
    out = summarize(results(["b", "a", "b"], [1.0, 0.0, 0.0], [0.5, 0.0, 1.0]))
    assert list(out) == [
        "greedy/b", "greedy/a", "greedy/all", "mean_at_k/b", "mean_at_k/a", "mean_at_k/all", "partial_fraction",
    ]
    assert out["greedy/b"] == pytest.approx(0.5)
    assert out["greedy/all"] == pytest.approx(1 / 3)
    assert out["mean_at_k/b"] == pytest.approx(0.75)
    assert out["partial_fraction"] == pytest.approx(1 / 3)  # only the 0.5 pass rate is strictly inside (0, 1)


def test_greedy_only_batches_have_no_sampled_metrics() -> None:
    out = summarize(results(["a"], [1.0]))
    assert out == {"greedy/a": 1.0, "greedy/all": 1.0}


def test_table_marks_missing_cells() -> None:
    text = accuracy_table({"teacher": {"greedy/all": 1.0, "partial_fraction": 0.1}, "student": {"greedy/all": 0.25}})
    lines = text.splitlines()
    assert "teacher" in lines[0] and "student" in lines[0]
    assert lines[2].split() == ["greedy/all", "1.000", "0.250"]
    assert lines[3].split() == ["partial_fraction", "0.100", "-"]


def test_markdown_table_has_a_row_per_metric_and_a_column_per_model() -> None:
    text = accuracy_table({"teacher": {"greedy/all": 1.0, "partial_fraction": 0.1}, "student": {"greedy/all": 0.25}}, markdown=True)
    assert text.splitlines() == [
        "| metric | teacher | student |", "|---|---:|---:|", "| greedy/all | 1.000 | 0.250 |", "| partial_fraction | 0.100 | - |",
    ]


def test_accuracy_by_skill_draws_a_bar_per_model_and_skill() -> None:
    from lit_zpd.figures import accuracy_by_skill

    start = summarize(results(["b", "a", "b"], [1.0, 0.0, 0.0], [0.5, 0.0, 1.0]))
    end = summarize(results(["b", "a", "b", "c"], [1.0, 1.0, 1.0, 0.0]))
    fig = accuracy_by_skill({"student (start)": start, "teacher (start)": {"greedy/all": 0.9}, "student (end)": end})
    ax = fig.axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["b", "a", "c", "all"]
    bars = {  # name: (skill under the bar, its height) per bar
        name: [(round(bar.get_x() + bar.get_width() / 2), round(bar.get_height(), 3)) for bar in container]
        for name, container in zip(ax.get_legend_handles_labels()[1], ax.containers)
    }
    assert bars == {
        "student (start)": [(0, 0.5), (1, 0.0), (3, 0.333)], "teacher (start)": [(3, 0.9)],
        "student (end)": [(0, 1.0), (1, 1.0), (2, 0.0), (3, 0.75)],
    }


def test_skill_grid_labels_each_arm_with_its_accuracy_and_change() -> None:
    from lit_zpd.figures import skill_grid

    start = {"greedy/b": 0.5, "greedy/all": 0.4, "greedy/a": 0.25}
    fig = skill_grid(start, {"kd": {"greedy/b": 0.75, "greedy/all": 0.3, "greedy/a": 0.25}})
    ax = fig.axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["b", "a", "all"]
    assert [label.get_text() for label in ax.get_yticklabels()] == ["start", "kd"]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["0.50", "0.25", "0.40", "0.75", "+0.25", "0.25", "+0.00", "0.30", "-0.10"]


def test_accuracy_curves_draw_an_arm_without_student_tokens_across_the_panel() -> None:
    from lit_zpd.figures import accuracy_curves

    curves = {"grpo": ([0.0, 3e5, 6e5], [0.45, 0.6, 0.65], [0.0, 0.02, 0.03]), "kd": ([0.0, 0.0], [0.45, 0.74], [0.0, 0.01])}
    fig = accuracy_curves({"methods": curves, "empty": {}})
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.0, 3e5, 6e5]
    (flat,) = [c for c in ax.collections if c.get_label() == "kd (no student tokens)"]
    assert flat.get_segments()[0].tolist() == [[0.0, 0.74], [6e5, 0.74]]  # at kd's end accuracy, over grpo's tokens
    assert ax.get_legend_handles_labels()[1] == ["grpo", "kd (no student tokens)"]
    assert not fig.axes[1].get_lines()


def test_forgetting_counts_only_problems_solved_before() -> None:
    def graded(correct: list[float]) -> EvalBatch:
        return results(["a", "a", "b", "c"], correct, ids=["p1", "p2", "p3", "p4"])

    before = solved(graded([1.0, 1.0, 1.0, 0.0]))
    assert before == ["p1", "p2", "p3"]
    out = forgetting(before, graded([0.0, 1.0, 1.0, 1.0]))  # p1 forgotten; p4 newly solved does not count
    assert out == {"forgotten/a": 0.5, "forgotten/b": 0.0, "forgotten/all": pytest.approx(1 / 3), "solved_before/all": 3.0}
    assert forgetting([], graded([1.0, 1.0, 1.0, 1.0])) == {"forgotten/all": 0.0, "solved_before/all": 0.0}
