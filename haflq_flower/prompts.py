"""The prompt and answer words of each packaged dataset (no imports: read by the config).

With ``model.head-init`` = ``label-words`` (or ``auto`` on a model with tied embeddings)
the model answers a prompt with one word per label, through its own LM head. The packaged
datasets carry a prompt and words chosen by measurement (docs/benchmarks.md, "Decided
head-to-head"); other datasets use their label names and the text as is unless the run
config says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    template: str
    label_words: tuple[str, ...]


PROMPTS: dict[str, Prompt] = {
    # 0.54 zero-shot on 96 validation rows with either of two prompts; this one had the
    # lower loss (0.736 vs 0.854 for "fresh or rotten? Answer:" with rotten,fresh)
    "rotten-tomatoes": Prompt(
        "Review: {text}\nSentiment (positive or negative):", ("negative", "positive")
    ),
    # one word per newsgroup in label order (alt.atheism ... talk.religion.misc); their
    # first tokens differ (checked when the head is built)
    "20newsgroups": Prompt(
        "{text}\nTopic:",
        (
            "atheism",
            "graphics",
            "windows",
            "ibm",
            "mac",
            "x",
            "sale",
            "cars",
            "motorcycles",
            "baseball",
            "hockey",
            "encryption",
            "electronics",
            "medicine",
            "space",
            "christianity",
            "guns",
            "israel",
            "politics",
            "religion",
        ),
    ),
}

AUTO = "auto"
# model.head-init: the classification head starts as the LM head's rows of one word per
# label ("label-words": the model answers with a label word), a fresh seeded head
# ("random"), or label words where the model allows them ("auto": tied embeddings and
# distinct first tokens; model.py decides).
HEAD_INITS = (AUTO, "random", "label-words")


def resolve_template(template: str, dataset: str) -> str:
    """``auto``: the packaged dataset's prompt, or the text as is ("") for other data."""
    if template != AUTO:
        return template
    prompt = PROMPTS.get(dataset)
    return prompt.template if prompt else ""


def resolve_label_words(words: tuple[str, ...], dataset: str) -> tuple[str, ...]:
    """No words given: the packaged dataset's words, or () (= the data's label names)."""
    if words:
        return words
    prompt = PROMPTS.get(dataset)
    return prompt.label_words if prompt else ()
