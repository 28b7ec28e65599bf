"""scripts/replicate.py: the claims' test, and its quick form end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import replicate


def test_the_permutation_test_is_exact() -> None:
    # Three seeds all above three: the observed split is the most extreme of C(6, 3) = 20.
    assert replicate.permutation_p([0.5, 0.6, 0.7], [0.1, 0.2, 0.3]) == pytest.approx(1 / 20)
    assert replicate.permutation_p([0.1, 0.2, 0.3], [0.5, 0.6, 0.7]) == pytest.approx(1.0)
    # One seed of the other arm between two of ours: the observed split and 2 others are at least
    # as extreme (0.65 swapped with 0.5 or with 0.6).
    assert replicate.permutation_p([0.5, 0.6, 0.7], [0.1, 0.2, 0.65]) == pytest.approx(3 / 20)


def test_a_claim_is_held_only_against_every_arm_it_names() -> None:
    claim = replicate.Claim("a beats b and c", "a", ("b", "c"))
    high, low = [0.5, 0.6, 0.7], [0.1, 0.2, 0.3]
    assert replicate.verdict(claim, {"a": high, "b": low, "c": low}, 0.05)[0] == "held"
    assert replicate.verdict(claim, {"a": high, "b": low, "c": [0.4, 0.6, 0.7]}, 0.05)[0] == "inconclusive"
    assert replicate.verdict(claim, {"a": low, "b": low, "c": high}, 0.05)[0] == "not held"
    assert replicate.verdict(claim, {"a": high, "b": low}, 0.05)[0] == "not run"
    # Two seeds can never reach p <= 0.05 (1 of C(4, 2) = 6 at best).
    assert replicate.verdict(claim, {"a": high[:2], "b": low[:2], "c": low[:2]}, 0.05)[0] == "inconclusive"


def test_a_claim_on_an_arm_not_yet_run_is_not_run() -> None:
    # A replication stopped after its first runs: zppo is planned but has none yet.
    runs = [{"name": "grpo", "end": {"greedy/all": 0.6}}, {"name": "grpo", "end": {"greedy/all": 0.7}}]
    alignment = [{"summary": {"teacher": {"correct": {"alignment": 0.4, "questions": 9}, "incorrect": {"alignment": 0.1, "questions": 0}}}}]
    values = replicate.claim_values(runs, alignment, ["grpo", "zppo"])
    assert values == {"grpo": [0.6, 0.7], "alignment/teacher/correct": [0.4]}  # a split with no question is left out
    claim = replicate.Claim("zppo beats grpo", "zppo", ("grpo",))
    assert replicate.verdict(claim, values, 0.05)[0] == "not run"
    assert replicate.verdict(replicate.ALIGNMENT_CLAIMS[0], values, 0.05)[0] == "not run"


def test_retained_is_over_the_embedded_teacher_for_every_arm() -> None:
    assert replicate.teacher_of("opsd") == "self_initial"
    assert replicate.teacher_of("gkd+token_budget/uncapped") == "embedded:teacher"  # the overlay sets none
    runs = [
        {"name": "gkd", "teacher": {"greedy/all": 0.9}, "end": {"greedy/all": 0.45}},
        {"name": "opsd", "teacher": {"greedy/all": 0.4}, "end": {"greedy/all": 0.45}},  # the student as its own teacher
    ]
    assert replicate.reference_teacher(runs) == 0.9
    complete = [{**r, "start": {"greedy/all": 0.4}, "student_tokens": 0, "minutes": 1.0, "end": {**r["end"], "forgotten/all": 0.0}} for r in runs]
    table = replicate.overview_table(complete, ["gkd", "opsd"], replicate.reference_teacher(complete))
    assert "| opsd | baseline | 1 | 0.450 ± 0.000 | 0.000 ± 0.000 | 0.500 ± 0.000 |" in table  # 0.45 / 0.9, not / 0.4


def test_every_arm_and_claim_names_a_shipped_config() -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    named = {*replicate.ARMS, *(c.arm for c in replicate.CLAIMS), *(b for c in replicate.CLAIMS for b in c.beats)}
    for arm in named:
        assert arm in replicate.ARMS, arm
        for part in arm.split("+"):
            assert (configs / f"{part}.yaml").is_file(), part


def test_the_quick_form_writes_the_page_and_the_plots(tmp_path: Path) -> None:
    page = replicate.main(["--quick", f"--out={tmp_path}", f"--logs={tmp_path / 'logs'}"]).read_text()
    for arm in replicate.QUICK_ARMS:
        assert f"| {arm} | 2 |" in page  # two seeds each
    assert "| ZPPO beats GRPO and distillation (GKD and OPD at the same budget) | zppo | not run |" in page  # kd, gkd, opd were not run
    assert "| replay alone is not enough" in page
    # The alignment diagnostic ran once per seed, and its claims are decided on those runs.
    assert len(list(tmp_path.glob("replication/alignment-seed*.json"))) == 2
    for signal in replicate.SIGNALS:
        assert f"| {signal} | 2 |" in page
        assert f"| alignment is higher on incorrect rollouts ({signal}) | alignment/{signal}/incorrect | not run |" not in page
    for name in ("accuracy_vs_tokens.png", "accuracy_by_skill.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # A second call takes the kept runs (a stopped replication goes on where it stopped) ...
    kept = sorted(tmp_path.glob("replication/*-seed*.json"))
    assert len(kept) == 2 * (len(replicate.QUICK_ARMS) + 1)
    times = [path.stat().st_mtime_ns for path in kept]
    again = replicate.main(["--quick", f"--out={tmp_path}", f"--logs={tmp_path / 'logs'}"]).read_text()
    assert [path.stat().st_mtime_ns for path in kept] == times
    assert again.split("## The papers")[0].split("\n")[3:] == page.split("## The papers")[0].split("\n")[3:]
    # --page_only runs nothing: an arm without kept runs is left out, its claims not run.
    only = replicate.main(["--quick", f"--out={tmp_path}", f"--logs={tmp_path / 'logs'}", "--page_only", "--arms", "grpo", "kd"]).read_text()
    assert sorted(tmp_path.glob("replication/*-seed*.json")) == kept
    assert "| grpo | 2 |" in only and "| kd |" not in only
    # ... but never one made with other settings.
    replicate.main(["--quick", f"--out={tmp_path}", f"--logs={tmp_path / 'logs'}", "--arms", "grpo", "--seeds", "0", "--budget", "1000"])
    assert (tmp_path / "replication" / "grpo-seed0.json").stat().st_mtime_ns != times[kept.index(tmp_path / "replication" / "grpo-seed0.json")]
