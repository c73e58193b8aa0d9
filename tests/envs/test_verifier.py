import pytest

from envs import answers_equal, extract_answer, parse_number, verify


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("1,000", "1000"),
        ("$1,234.50", "1234.5"),
        ("-3", "-3.0"),
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{3}{4}", "0.75"),
        ("2*(3+4)", "14"),
        ("18 dollars", "18"),
        ("  42. ", "42"),
        ("\u22127", "-7"),
    ],
)
def test_equal(pred, gold):
    assert answers_equal(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [("1001", "1000"), ("-3", "3"), ("0.3333", "1/3"), ("1/0", "0"), ("", "0"), (None, "1")],
)
def test_not_equal(pred, gold):
    assert not answers_equal(pred, gold)


@pytest.mark.parametrize("junk", ["abc", "9**9**9**9", "__import__('os')", "1" * 100, "((", "2^^3", "x+1", "1/"])
def test_malformed_answers_are_not_numbers(junk):
    assert parse_number(junk) is None


def test_extract_answer():
    assert extract_answer("1+2=3\n#### 3\n") == "3"
    assert extract_answer("#### 1\nmore\n#### 2") == "2"
    assert extract_answer("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_answer("no answer here") is None
    assert extract_answer("####   \n") is None


def test_verify_reasons():
    assert verify("1+1=2\n#### 2\n", "2").correct
    v = verify("1+1=3\n#### 3\n", "2")
    assert not v.correct and v.reason == "different value" and v.answer == "3"
    assert verify("1+1=2\n", "2").reason == "no answer"
    assert verify("#### two", "2").reason == "answer is not a number"


@pytest.mark.parametrize(
    ("line", "false"),
    [("17*3=51", False), ("17*3=41", True), ("100-1=99", False), ("1/2=0.5", False), ("1/2 = 0.6", True),
     ("x=3", False), ("5 apples = 3", False), ("#### 4", False), ("12+5", False), ("2*(3+4)=14", False),
     ("2*(3+4)=15", True)],
)
def test_equation_is_false(line, false):
    from envs import equation_is_false

    assert equation_is_false(line) is false
