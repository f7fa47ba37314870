"""The embedded default model loads with no arguments and continues a prompt in English."""

import re

import pytest

from jaxpd.generate import Generator, SamplingParams
from jaxpd.model.checkpoint import default_checkpoint, load_model
from jaxpd.model.presets import get_preset
from jaxpd.tokenizer import load_tokenizer

COMMON = set("""
a about after again all also am an and any are as at be been before being but by came can
come could day did do does done down each even every first for from gave get give go good
great had has have he her here him himself his house how i if in into is it its just know
lady last left like little long made make man many may me mind miss more most mother mr mrs
much must my never no not nothing now of on one only or other our out over own said same
saw say see seemed shall she should so some soon still such than that the their them then
there these they thing think this those though thought time to too two up upon us very was
way we well were what when where which while who whole will wish with without would yet you
young your sister father family moment sure manner feelings heart friend indeed always
""".split())


def test_default_checkpoint_matches_its_preset():
    model = load_model()
    preset = get_preset("default")
    shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "tie_word_embeddings")
    assert all(getattr(model.config, f) == getattr(preset, f) for f in shape_fields)
    assert model.folder == default_checkpoint()


@pytest.mark.slow
def test_default_model_continues_with_recognisable_words():
    model = load_model()
    tok = load_tokenizer(model.folder)
    prompt = tok.encode("It is a truth universally acknowledged, that")
    [out] = Generator(model.config, model.params).generate([prompt], SamplingParams(max_tokens=40))
    words = re.findall(r"[a-z']+", tok.decode(out).lower())
    assert len(words) >= 10
    known = sum(w in COMMON for w in words) / len(words)
    assert known >= 0.5, (known, tok.decode(out))
