"""Prompt encoding: the chat template, the length limit (problems left out, rollout prompts skipped
or cut, all counted) and the stop tokens of both engines."""

from __future__ import annotations

import pytest

from lit_zpd.callbacks.exposure import PrivilegedTeacher
from lit_zpd.loss_config import LossConfig
from lit_zpd.model_files import load_causal_lm
from lit_zpd.module import DistillModule
from lit_zpd.rollout.context import RolloutContext
from lit_zpd.rollout.engine import SamplingConfig
from lit_zpd.rollout.hf_engine import HFEngine
from lit_zpd.rollout.prompts import PromptEncoder, PromptFormat, PromptTooLong
from lit_zpd.tasks.arithmetic import ArithmeticCurriculum
from lit_zpd.tasks.problem import Problem, ProblemSource
from lit_zpd.tokenizer import build_char_tokenizer
from tests.conftest import ListSource
from tests.test_rollout import make_data, make_trainer

CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_tokenizer(template: str = CHAT):
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


# ------------------------------------------------------------------------------ the template


def test_the_chat_template_wraps_every_prompt_with_the_system_message() -> None:
    tokenizer = chat_tokenizer()
    encoder = PromptEncoder(tokenizer, PromptFormat(system="Be brief."))
    assert encoder.text("1+2=?\n") == "<system>Be brief.</s><user>1+2=?\n</s><assistant>"
    for prompt in ("", "a {b} }}{{ c\n\n", "ref:\n1+2+0=3\n\\boxed{3}\n1+2=?\n"):
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
            tokenize=False, add_generation_prompt=True,
        )
        assert encoder.text(prompt) == rendered
        assert encoder.encode(prompt) == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_a_template_that_rewrites_the_message_is_rendered_for_each_prompt() -> None:
    encoder = PromptEncoder(chat_tokenizer(CHAT.replace("m['content'] }}", "m['content'] | trim }}")))
    assert encoder._affixes is None
    assert encoder.text("  7+1=?\n") == "<user>7+1=?</s><assistant>"


def test_the_template_can_be_turned_off_and_is_required_when_asked_for() -> None:
    assert PromptEncoder(chat_tokenizer(), PromptFormat(chat_template=False)).text("1+2=?\n") == "1+2=?\n"
    assert PromptEncoder(build_char_tokenizer()).text("1+2=?\n") == "1+2=?\n"  # no template: raw text
    with pytest.raises(ValueError, match="no chat template"):
        PromptEncoder(build_char_tokenizer(), PromptFormat(chat_template=True))
    with pytest.raises(ValueError, match="system needs the tokenizer's chat template"):
        PromptEncoder(build_char_tokenizer(), PromptFormat(system="Be brief."))
    with pytest.raises(ValueError, match="overlong"):
        PromptFormat(overlong="drop")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ length and stops


def test_an_overlong_prompt_is_cut_from_the_left_or_refused() -> None:
    tokenizer = build_char_tokenizer()
    cut = PromptEncoder(tokenizer, PromptFormat(overlong="truncate"), max_tokens=5)
    assert tokenizer.decode(cut.encode("12345+678=?\n")) == "678=?\n"[-5:]
    assert cut.encode("1+2\n") == tokenizer("1+2\n", add_special_tokens=False)["input_ids"]
    with pytest.raises(PromptTooLong, match="longer than the limit of 5"):
        PromptEncoder(tokenizer, PromptFormat(), max_tokens=5).encode("12345+678=?\n")
    assert PromptEncoder(tokenizer, max_tokens=5).lengths(["1+2\n", "12345+678=?\n"]) == [4, 12]



def test_truncation_keeps_the_chat_template_whole_and_the_end_of_the_message() -> None:
    tokenizer = chat_tokenizer()
    overhead = len(PromptEncoder(tokenizer, PromptFormat(system="S")).full(""))
    cut = PromptEncoder(tokenizer, PromptFormat(system="S", overlong="truncate"), max_tokens=overhead + 6)
    assert tokenizer.decode(cut.encode("12345+678=?\n")) == "<system>S</s><user>678=?\n</s><assistant>"
    with pytest.raises(PromptTooLong, match="template alone"):
        PromptEncoder(tokenizer, PromptFormat(system="S", overlong="truncate"), max_tokens=overhead - 1).encode("1")


def test_stop_tokens_are_single_tokens_after_the_end_of_sequence() -> None:
    tokenizer = build_char_tokenizer()
    encoder = PromptEncoder(tokenizer, PromptFormat(stop_tokens=["\n"]))
    assert encoder.stop_ids == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")]
    with pytest.raises(ValueError, match="is 2 tokens"):
        PromptEncoder(tokenizer, PromptFormat(stop_tokens=["ab"]))


def test_the_hf_engine_stops_at_any_stop_token(tiny_student: str) -> None:
    tokenizer = build_char_tokenizer()
    model = load_causal_lm(tiny_student)
    prompts = [tokenizer("12+34=?\n", add_special_tokens=False)["input_ids"]]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    free = HFEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)).generate(prompts, 1, greedy)
    tokens = free[0][0].token_ids
    stop = tokens[3]
    first = tokens.index(stop)
    stopped = HFEngine(model, tokenizer.pad_token_id, [tokenizer.eos_token_id, stop], len(tokenizer)).generate(prompts, 1, greedy)
    assert stopped[0][0].token_ids == tokens[: first + 1]
    assert len(stopped[0][0].logprobs) == first + 1


def test_the_default_limit_is_the_shortest_context_less_the_longest_generation(tiny_student: str, tiny_teacher: str) -> None:
    ctx = RolloutContext(
        student=load_causal_lm(tiny_student), teacher=load_causal_lm(tiny_teacher), tokenizer=build_char_tokenizer(),
        source=ListSource(), engine_factory=lambda m: None, seed=0, loss=LossConfig(sft=1.0),  # type: ignore[arg-type,return-value]
        sampling=SamplingConfig(max_new_tokens=8), eval_sampling=SamplingConfig(max_new_tokens=48),
    )
    assert ctx.prompts.max_tokens == 256 - 48  # both tiny models have 256 positions
    ctx.teacher.config.max_position_embeddings = 100
    ctx._prompts = None
    assert ctx.prompts.max_tokens == 100 - 48


# ------------------------------------------------------------------------------ long prompts in a run


class LongAndShort(ProblemSource):
    """Six short and two long problems in every split (prompt "{a}+{b}=?\\n"), with references."""

    def problems(self, split: str) -> list[Problem]:
        rows = []
        for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (4, 4), (6, 1), (10**60, 1), (10**70, 2)]):
            rows.append(Problem(f"{split}/{i}", f"{a}+{b}=?\n", str(a + b), reference=f"\\boxed{{{a + b}}}"))
        return rows


def long_prompt_run(tiny_student: str, overlong: str, **data: object):
    seen = []
    module = DistillModule(student=tiny_student, teacher=None, loss=LossConfig(policy=1.0))
    datamodule = make_data(
        **({"source": LongAndShort(), "prompts_per_step": 8, "samples_per_prompt": 2,
            "prompt": PromptFormat(max_tokens=40, overlong=overlong)} | data)  # type: ignore[arg-type]
    )
    original = datamodule.train_batch
    datamodule.train_batch = lambda index: seen.append(original(index)) or seen[-1]  # type: ignore[method-assign]
    make_trainer(2).fit(module, datamodule=datamodule)
    return datamodule, seen


def test_problems_with_an_overlong_prompt_are_left_out_with_a_warning(tiny_student: str) -> None:
    with pytest.warns(UserWarning, match="2 of 8 train problems are left out"):
        data, batches = long_prompt_run(tiny_student, "skip")
    assert data.context.overlong_problems == {"train": 2}
    assert [p.problem_id for p in data.context.problems("validation")] == [f"validation/{i}" for i in range(6)]
    assert data.context.overlong_problems == {"train": 2, "validation": 2}
    for batch in batches:
        assert len(set(batch.problem_ids)) == 6
        assert int(batch.attention_mask.sum(1).max()) <= 40 + 8  # prompt limit + max_new_tokens


def test_truncated_prompts_keep_their_end_and_are_counted(tiny_student: str) -> None:
    data, batches = long_prompt_run(tiny_student, "truncate")
    assert data.context.overlong_problems == {}
    tokenizer = data.context.tokenizer
    for batch in batches:
        assert len(set(batch.problem_ids)) == 8  # every problem is drawn each step
        assert batch.metrics["rollout/prompts_truncated_total"] == 2 * (batch.batch_index + 1)
        for row, pid in enumerate(batch.problem_ids):
            prompt = batch.input_ids[row][(batch.attention_mask[row] * (1 - batch.response_mask[row])).bool()]
            if pid.endswith(("/6", "/7")):
                assert len(prompt) == 40 and tokenizer.decode(prompt.tolist()).endswith("=?\n")
    assert data.state_dict()["prompts_truncated"] == 4


def test_privileged_prompts_past_the_limit_are_skipped_and_counted(tiny_student: str) -> None:
    source = ArithmeticCurriculum(problems_per_level=20, max_eval_per_skill=2)
    context = source.privileged_context()
    lengths = sorted(len(context.reveal(p, 1.0)) for p in source.problems("train"))
    limit = lengths[len(lengths) // 2]  # the char tokenizer: one token per character
    module = DistillModule(student=tiny_student, teacher="self_initial", loss=LossConfig(forward_kl=1.0))
    data = make_data(source=source, prompts_per_step=16, prompt=PromptFormat(max_tokens=limit))
    make_trainer(1, [PrivilegedTeacher()]).fit(module, datamodule=data)
    before = data.counters.prompts_skipped  # rollout 0's
    batch = data.rollout(1)
    skipped = batch.metrics["rollout/prompts_skipped_total"] - before
    assert before > 0 and skipped > 0
    assert len(set(batch.problem_ids)) == 16 - skipped
    teacher_prompt_lengths = (batch.teacher_attention_mask * (1 - batch.teacher_response_mask)).sum(1)
    assert int(teacher_prompt_lengths.max()) <= limit
    assert all(len(context.reveal(data.context.problem(pid), 1.0)) <= limit for pid in batch.problem_ids)


def test_measurements_keep_the_problems_whose_built_prompts_fit(make_context) -> None:
    ctx = make_context(prompt=PromptFormat(max_tokens=8))
    problems = ctx.problems("train")[:12]  # "0+1=?\n" .. "11+1=?\n": 6 or 7 bytes
    assert [p.problem_id for p in ctx.fitting(problems, lambda p: "ab" + p.prompt)] == [f"p{i}" for i in range(10)]
    assert ctx.fitting(problems, lambda p: p.prompt, lambda p: "abc" + p.prompt) == []
    truncating = make_context(prompt=PromptFormat(max_tokens=8, overlong="truncate"))
    assert truncating.fitting(problems, lambda p: "abc" + p.prompt) == problems


# ------------------------------------------------------------------------------ characters the tokenizer lacks


def test_characters_the_tokenizer_cannot_encode_are_found() -> None:
    encoder = PromptEncoder(build_char_tokenizer())
    assert encoder.lost_characters(["5 € for 3×4", "12+3=?\n"]) == {"€", "×"}
    assert encoder.lost_characters(["12+3=?\n", ""]) == set()


def test_problems_holding_them_are_named_in_a_warning_at_load_time(make_context) -> None:
    rows = [Problem("ok", "1+2=?\n", "3"), Problem("euro", "5€+1€=?\n", "6€"), Problem("times", "3×4=?\n", "12")]
    source = ListSource(0)
    source.rows = rows
    ctx = make_context(source=source)
    ctx.tokenizer = build_char_tokenizer()
    with pytest.warns(UserWarning, match=r"cannot encode '×€', found in 2 train problems \(first: euro, times\)"):
        assert len(ctx.problems("train")) == 3  # kept: the prompt is still readable
