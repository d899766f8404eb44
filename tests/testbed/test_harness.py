"""Answer extraction and scoring on tricky outputs; gain retention by hand."""

import pytest

from merging.testbed.harness import extract_answer, gain_retention, normalize_answer, score


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("1+2=3\nAnswer: 3", "3"),
        ("Answer: 5\nwait, recheck\nAnswer: 6", "6"),
        ("steps...\nanswer:   42  ", "42"),
        ("Answer: 42\nThis is because 40+2.", "42"),
        ("**Answer:** 17", "** 17"),
        ("The sum is 12.", None),
        ("95 + 37 = 122\nThe answer is 122.", "122."),
        ("The final answer is: True\nAnswer: False", "False"),
        ("", None),
        ("ANSWER：True", "True"),
        ("Answer:", ""),
    ],
)
def test_extract_answer_reads_the_last_answer_line(output, expected):
    assert extract_answer(output) == expected


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("**42**.", "42"),
        ("1,234", "1234"),
        ("0042", "42"),
        ("$\\boxed{17}$", "17"),
        ("true", "True"),
        ("F", "False"),
        ("[3,1 ,  2]", "[3, 1, 2]"),
        ("[ 07, 10 ]", "[7, 10]"),
        ("two   words", "two words"),
        ("", ""),
        (None, None),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_score_is_exact_match_on_the_final_answer():
    assert score("x=3\nAnswer: **True**.", "True")
    assert score("Answer: [1, 2,3]", "[1, 2, 3]")
    assert score("**Answer:** 17", "17")
    assert not score("Answer: 12\nAnswer: 13", "12")
    assert score("so the answer is 12", "12")
    assert not score("the sum is 12", "12")
    assert not score("Answer: 123", "12")
    assert not score("Answer:", "")


def test_gain_retention_by_hand():
    base = {"arithmetic": 0.2, "lists": 0.5, "logic": 0.4, "list_arith": 0.1}
    experts = {"arithmetic": 0.9, "lists": 0.5, "logic": 0.8}
    merged = {"arithmetic": 0.55, "lists": 0.6, "logic": 0.3, "list_arith": 0.3}
    out = gain_retention(merged, base, experts)
    assert out == {"arithmetic": pytest.approx(0.5), "lists": None, "logic": pytest.approx(-0.25)}
