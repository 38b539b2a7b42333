"""Logprob-to-distribution maths, answer keys, JSON-answer validation, prompt shape and few-shot examples."""

import math

import numpy as np
import pytest

from fusion.fewshot import ExamplePool
from fusion.llm import prompts
from fusion.llm.prompts import Example, InvalidAnswer, answer_keys, logprobs_to_distribution, parse_json_answer

CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


def test_answer_keys_use_names_when_prefixes_are_distinct_else_letters():
    assert answer_keys(CLASSES) == CLASSES
    # 'sport' and 'sports news' share a 2-letter prefix: a first token 'sp' would be ambiguous
    assert answer_keys(["sport", "sports news", "tech"]) == ["A", "B", "C"]
    assert answer_keys(["billing issue", "bug"]) == ["billing issue", "bug"]  # "bi" vs "bu": distinct
    assert answer_keys(["refund", "refund request"]) == ["A", "B"]
    assert answer_keys([f"c{i}" for i in range(30)]) == []  # too many for letters: JSON mode


def test_logprobs_renormalise_over_classes_with_prefix_and_case_matching():
    top = [("Business", math.log(0.5)), (" tech", math.log(0.2)), ("Sp", math.log(0.1)), ("The", math.log(0.15))]
    p = logprobs_to_distribution(top, CLASSES, CLASSES)
    assert p.sum() == pytest.approx(1.0, abs=1e-6)
    # listed mass is 0.95, so each of the 2 unseen classes gets min(exp(min lp)=0.1, 0.05/2) = 0.025
    raw = np.array([0.5, 0.025, 0.025, 0.1, 0.2])
    np.testing.assert_allclose(p, raw / raw.sum(), rtol=1e-5)
    assert p.argmax() == 0


def test_logprobs_floor_is_below_the_least_likely_listed_token():
    top = [("sports", math.log(0.3)), ("politics", math.log(0.01))]  # listing leaves 0.69 unexplained
    p = logprobs_to_distribution(top, CLASSES, CLASSES)
    unseen = p[[0, 1, 4]]
    assert np.allclose(unseen, 0.01 / 0.34) and p[2] == pytest.approx(unseen[0])  # floor 0.01 each, not 0.23


def test_logprobs_letter_codes_need_exact_tokens():
    keys = ["A", "B", "C"]
    p = logprobs_to_distribution([("B", -0.1), ("Because", -1.0), ("a", -2.0)], ["x", "y", "z"], keys)
    assert p.argmax() == 1 and p[0] > p[2]  # 'a' counts for A, 'Because' for nothing


def test_logprobs_without_any_class_is_an_invalid_answer():
    with pytest.raises(InvalidAnswer, match="no class among the top answer tokens"):
        logprobs_to_distribution([("The", -0.1), ("I", -2.0)], CLASSES, CLASSES)
    with pytest.raises(InvalidAnswer, match="no logprobs"):
        logprobs_to_distribution([], CLASSES, CLASSES)


def test_json_answer_validation():
    model = prompts.answer_model(CLASSES)
    good = '{"business": 0.7, "entertainment": 0.0, "politics": 0.1, "sports": 0, "tech": 0.2}'
    np.testing.assert_allclose(parse_json_answer(good, CLASSES, model), [0.7, 0, 0.1, 0, 0.2])
    assert parse_json_answer("```json\n" + good + "\n```", CLASSES, model)[0] == pytest.approx(0.7)
    for bad, why in [
        ('{"business": 0.7}', "Field required"),
        (good.replace("0.7", "1.7"), "less than or equal to 1"),
        (good.replace('"tech": 0.2', '"tech": 0.2, "weather": 0.1'), "Extra inputs"),
        ("business", "Invalid JSON"),
        ("", "empty answer"),
    ]:
        with pytest.raises(InvalidAnswer, match=why):
            parse_json_answer(bad, CLASSES, model)


def test_prompts_put_text_first_and_include_few_shot_examples():
    ex = [Example("Shares rose sharply.", ("business",))]
    msgs = prompts.multiclass_messages("The striker scored twice " * 40, CLASSES, CLASSES, 10, ex)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "business"
    last = msgs[-1]["content"]
    assert last.startswith("Text:\nThe striker") and last.endswith("Answer with one word.")
    assert len(last.split("\n")[1].split()) == 11  # 10 words + the ellipsis
    js = prompts.json_messages("x", CLASSES, True, 10, ex)
    assert '"business": 1.0' in js[1]["content"] and "several or none may apply" in js[-1]["content"]
    schema = prompts.json_schema(CLASSES)["json_schema"]["schema"]
    assert schema["required"] == CLASSES and schema["properties"]["tech"]["maximum"] == 1


def test_few_shot_examples_never_show_a_training_text_as_its_own_example():
    """In training, a pool no larger than `few_shot` gave each text itself as an example: its own label in the
    prompt, so the LLM's training scores looked better than they are on new texts."""
    emb = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)  # a-b 0.8, b-c 0.6, a-c 0.0
    pool = ExamplePool(["a", "b", "c"], [("x",), ("y",), ("z",)], emb)
    texts = [[e.text for e in row] for row in pool.neighbours(emb, 5, np.arange(3))]
    assert texts == [["c", "b"], ["c", "a"], ["a", "b"]]  # every other text, nearest last
    assert [[e.text for e in row] for row in pool.neighbours(emb, 1, np.arange(3))] == [["b"], ["a"], ["b"]]
    assert [len(row) for row in pool.neighbours(emb[:1], 5)] == [3]  # serving: a new text, the whole pool
