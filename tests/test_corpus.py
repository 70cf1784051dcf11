"""The offline text: enough of each source, disjoint where it must be, and the same every time."""

from __future__ import annotations

import pytest

from tilefx.corpus import calibration_sentences, english_sentences, general_sentences, out_of_domain_sentences
from tilefx.errors import RecipeError


def test_each_source_holds_prose_enough_for_calibration_and_evaluation() -> None:
    general = general_sentences()
    ood = out_of_domain_sentences()
    assert len(general) > 5000 and len(ood["everyday"]) == len(ood["news"]) == 320
    for sentence in general[:200] + ood["everyday"][:50] + ood["news"][:50]:
        assert 6 <= len(sentence.split()) <= 30 and "[[" not in sentence and "{{" not in sentence


def test_no_evaluation_sentence_is_ever_calibrated_on() -> None:
    evaluation = set(english_sentences()[1]) | {s for v in out_of_domain_sentences().values() for s in v}
    for kind in ("docs", "general", "mixed"):
        assert not evaluation & set(calibration_sentences(kind))


def test_mixed_calibration_alternates_the_sources_deterministically() -> None:
    mixed, general, docs = (
        calibration_sentences("mixed"),
        set(general_sentences()),
        set(english_sentences()[0]),
    )
    assert mixed == calibration_sentences("mixed")
    assert all(s in general for s in mixed[0:20:2]) and all(s in docs for s in mixed[1:20:2])
    with pytest.raises(RecipeError, match="kind"):
        calibration_sentences("poetry")
