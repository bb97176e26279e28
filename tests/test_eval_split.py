"""The validation split (for tuning, never the test rows) and the prompt template."""

import pandas as pd
import pytest

from haflq_flower.config import ConfigError, parse_run_config
from haflq_flower.data import DataLoadError, apply_template, load_task


def test_validation_split_is_balanced_and_disjoint():
    cfg = parse_run_config({"data.test-per-class": 50, "data.validation-per-class": 30})
    task = load_task(cfg.data)
    plain = load_task(parse_run_config({"data.test-per-class": 50}).data)
    assert task.validation["label"].value_counts().to_dict() == {0: 30, 1: 30}
    # the same test rows as without a validation split; validation comes out of training
    pd.testing.assert_frame_equal(task.test, plain.test)
    assert len(task.train) == len(plain.train) - 60
    key = lambda f: set(zip(f["text"], f["label"], strict=True))  # noqa: E731
    assert not key(task.validation) & key(task.test)
    assert not key(task.validation) & key(task.train)
    assert task.split("validation") is task.validation and task.split("test") is task.test
    with pytest.raises(DataLoadError, match="validation-per-class"):
        plain.split("validation")


def test_eval_split_validation_needs_a_validation_split():
    with pytest.raises(ConfigError, match="validation-per-class"):
        parse_run_config({"eval.split": "validation"})
    assert parse_run_config({"eval.split": "validation", "data.validation-per-class": 5})


def test_template_wraps_every_text_once():
    frame = pd.DataFrame({"text": ["good", "bad"], "label": [1, 0]})
    out = apply_template(frame, "Review: {text}\nSentiment:")
    assert out["text"].tolist() == ["Review: good\nSentiment:", "Review: bad\nSentiment:"]
    assert apply_template(frame, "") is frame
    task = load_task(parse_run_config({"data.template": "<{text}>"}).data)
    assert (
        task.test["text"].str.startswith("<").all() and task.train["text"].str.endswith(">").all()
    )
    with pytest.raises(ConfigError, match="exactly once"):
        parse_run_config({"data.template": "no placeholder"})


def test_packaged_datasets_bring_their_prompt_and_label_words():
    from haflq_flower.prompts import PROMPTS

    cfg = parse_run_config({"data.template": "auto"})
    assert cfg.data.template == PROMPTS["rotten-tomatoes"].template
    assert cfg.model.label_words == ("negative", "positive")
    news = parse_run_config({"data.template": "auto", "data.name": "20newsgroups"})
    assert news.data.template == "{text}\nTopic:" and len(news.model.label_words) == 20
    # other data: the text as is and the label names; explicit values always win
    local = parse_run_config({"data.template": "auto", "data.name": "local"})
    assert local.data.template == "" and local.model.label_words == ()
    mine = parse_run_config({"data.template": "<{text}>", "model.label-words": "bad,good"})
    assert mine.data.template == "<{text}>" and mine.model.label_words == ("bad", "good")
