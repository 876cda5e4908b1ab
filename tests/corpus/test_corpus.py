"""The pytorchcv corpus (tests/corpus/corpus_models.py): optimize with the default pipeline, compile
for host, compare with eager. The whole list is the ``slow`` tier; a few small, differently shaped
models run by default. ``python tests/corpus/make_table.py`` writes the same rows to docs/corpus.md."""

import pytest

from corpus_models import BY_NAME, DEFAULT_TIER, ENTRIES, check_row, run_one

pytest.importorskip("pytorchcv")

SLOW = [pytest.param(entry, id=entry.name,
                     marks=[pytest.mark.xfail(reason=entry.known_issue, strict=True)] if entry.known_issue else [])
        for entry in ENTRIES if entry.name not in DEFAULT_TIER]


@pytest.mark.parametrize("name", DEFAULT_TIER)
def test_default_tier_model_compiles_and_matches_eager(name):
    entry = BY_NAME[name]
    check_row(entry, run_one(entry))


@pytest.mark.slow
@pytest.mark.parametrize("entry", SLOW)
def test_corpus_model(entry):
    """Compiles for host and matches eager, or fails with the clear FxoptError the entry declares."""
    check_row(entry, run_one(entry))


def test_corpus_list_is_well_formed():
    names = [entry.name for entry in ENTRIES]
    assert len(names) == len(set(names)) and set(DEFAULT_TIER) <= set(names)
    assert len({entry.family for entry in ENTRIES}) >= 20
