import pytest

from lit_zpd.tasks.verifier import (
    EXTRACTORS,
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    normalize_answer,
    score_response,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{{a}{b}} tail", "{a}{b}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{}", ""),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text", ["no answer here", "42", "\\boxed{unclosed", "boxed{3}"])
def test_extract_boxed_none(text):
    assert extract_boxed(text) is None


def test_extract_gsm8k():
    assert extract_gsm8k("48/2 = 24\n#### 72") == "72"
    assert extract_gsm8k("a #### 1 #### 2 ") == "2"
    assert extract_gsm8k("no marker 72") is None


def test_extract_last_number():
    assert extract_last_number("3 apples and 1,250.5 pears.") == "1,250.5"
    assert extract_last_number("it is -7") == "-7"
    assert extract_last_number("none") is None


def test_extractors_cover_the_literal():
    assert set(EXTRACTORS) == {"boxed", "gsm8k", "last_number", "identity"}
    assert EXTRACTORS["identity"](" x ") == " x "


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1,000", "1000"),
        ("007", "7"),
        ("-007", "-7"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("1,000.0", "1000"),
        ("42.", "42"),
        (" 4 2 ", "42"),
        ("0", "000"),
    ],
)
def test_normalize_answer_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize(("a", "b"), [("-7", "7"), ("1.5", "15"), ("70", "7"), ("0.5", "5")])
def test_normalize_answer_different(a, b):
    assert normalize_answer(a) != normalize_answer(b)


def test_normalize_answer_keeps_non_numbers():
    assert normalize_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    assert normalize_answer("x = 3") == "x=3"


def test_score_response():
    assert score_response("work\n\\boxed{72}", "72") == 1.0
    assert score_response("\\boxed{1,000}", "1000") == 1.0
    assert score_response("\\boxed{071}", "71") == 1.0
    assert score_response("\\boxed{71}", "72") == 0.0
    assert score_response("the answer is 72", "72") == 0.0
    assert score_response("\\boxed{72} no wait \\boxed{73}", "72") == 0.0
    assert score_response("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}") == 1.0


def test_verifiers_by_name() -> None:
    from lit_zpd.tasks.verifier import make_verifier

    assert make_verifier("boxed").score("so \\boxed{1,000}", "1000") == 1.0
    assert make_verifier("gsm8k").score("3 + 4 = 7\n#### 7", "7") == 1.0
    assert make_verifier("gsm8k").score("\\boxed{7}", "7") == 0.0
    last = make_verifier("last_number")
    assert last.score("47 + 38 = 85, so the answer is 85.", "85") == 1.0
    assert last.score("47 + 38 = 114", "85") == 0.0
    assert last.extract("no digits") is None
    with pytest.raises(ValueError, match="data.source.verifier: expected one of boxed, gsm8k, last_number, math_verify"):
        make_verifier("regex", "data.source.verifier")  # type: ignore[arg-type]


def test_math_verify_compares_latex_answers() -> None:
    pytest.importorskip("math_verify", reason="math-verify is not installed: pip install 'lit-zpd[math]'")
    from lit_zpd.tasks.verifier import MathVerifyVerifier

    verifier = MathVerifyVerifier()
    assert verifier.score("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5") == 1.0
    assert verifier.score("\\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert verifier.score("\\boxed{\\frac{1}{3}}", "0.5") == 0.0
    assert verifier.score("\\boxed{72}", "72") == 1.0


def test_a_source_takes_its_verifier_from_yaml(tmp_path) -> None:
    from lit_zpd.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "2+2?", "answer": "4"}\n' * 3)
    cli = main(["--config", "configs/sft.yaml", "--data.source=lit_zpd.tasks.DatasetSource",
                f"--data.source.path={data}", "--data.source.verifier=last_number"], run=False)
    assert type(cli.datamodule.source.verifier).__name__ == "LastNumberVerifier"
    assert cli.datamodule.source.verifier.score("it is 4", "4") == 1.0
