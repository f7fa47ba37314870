"""Tokenizer layer: HF tokenizer.json loading, special-token resolution, byte tokenizer, streaming.

The HF tokenizers are real `tokenizer.json` files trained here on a small inline corpus (no
network, well under a second): a GPT-2/Llama-3 style byte-level BPE, a Llama-2 style
SentencePiece BPE with byte fallback, and a Unigram model with a Metaspace decoder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jaxpd.errors import ConfigError
from jaxpd.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, Tokenizer, load_tokenizer
from jaxpd.tokenizer.byte import BOS_ID, EOS_ID, PAD_ID

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Café naïve résumé; über straße. Déjà vu in the façade.",
    "中文分词测试。我们正在测试分词器。你好，世界！日本語のテキストです。",
    "Emoji time 🙂🚀🎉 and flags 🇫🇷 with family 👨‍👩‍👧.",
    "e\u0301 combining a\u0308 marks n\u0303 and 한국어 텍스트.",
] * 20

SAMPLES = [
    "Hello world",
    "Café résumé naïve",
    "中文分词测试，你好世界",
    "smile 🙂 rocket 🚀 family 👨‍👩‍👧 flag 🇫🇷",
    "e\u0301 a\u0308 n\u0303 combining marks",
    "mixed: héllo 中文 🙂 e\u0301!",
    "two  spaces and trailing  ",
    "unseen: 𝔘 Ω ж ☃ 🦀",
    "adjacent unseen:𝔘𝔙ΩЖ☃🦀",  # one run of <0xNN> pieces spanning several characters
    "line\nbreaks\tand tabs",
    "",
]

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]


# --------------------------------------------------------------------------- fixtures


def _write_folder(folder: Path, raw: RawTokenizer, *, tokenizer_config: dict | None = None,
                  generation_config: dict | None = None, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw.save(str(folder / "tokenizer.json"))
    for name, data in [("tokenizer_config.json", tokenizer_config),
                       ("generation_config.json", generation_config), ("config.json", config)]:
        if data is not None:
            (folder / name).write_text(json.dumps(data), encoding="utf-8")
    return folder


def _bytelevel_bpe() -> RawTokenizer:
    """GPT-2 / Llama-3 style: byte-level BPE, BOS added by the post-processor."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=LLAMA3_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _llama2_bpe(template: bool = False) -> RawTokenizer:
    """Llama-2 style: Metaspace BPE with <0xNN> byte fallback and the Replace/ByteFallback/Fuse/Strip
    decoder; BOS comes from `add_bos_token`, unless `template` adds a BOS post-processor too."""
    tok = RawTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SP_SPECIALS))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # SentencePiece's byte pieces, which the trainer does not create
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    if template:
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}},
        }
    return RawTokenizer.from_str(json.dumps(spec))


def _unigram() -> RawTokenizer:
    """SentencePiece Unigram with the Metaspace decoder (strips the first token's leading space)."""
    tok = RawTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=SP_SPECIALS, unk_token="<unk>"))
    return tok


SP_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "pad_token": None,
    "unk_token": "<unk>",
}


@pytest.fixture(scope="module")
def raw_bytelevel() -> RawTokenizer:
    return _bytelevel_bpe()


@pytest.fixture(scope="module")
def hf(tmp_path_factory, raw_bytelevel) -> dict[str, HFTokenizer]:
    """One loaded tokenizer per style, each from a real model-like folder."""
    root = tmp_path_factory.mktemp("hf")
    folders = {
        "bytelevel": _write_folder(
            root / "bytelevel", raw_bytelevel,
            tokenizer_config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
            generation_config={"bos_token_id": 0, "eos_token_id": [1, 2]}),
        "llama2": _write_folder(root / "llama2", _llama2_bpe(), tokenizer_config=SP_TOKENIZER_CONFIG),
        "llama2_template": _write_folder(root / "llama2_template", _llama2_bpe(template=True),
                                         tokenizer_config=SP_TOKENIZER_CONFIG),
        "unigram": _write_folder(root / "unigram", _unigram(),
                                 tokenizer_config={**SP_TOKENIZER_CONFIG, "add_bos_token": False}),
    }
    return {name: load_tokenizer(folder) for name, folder in folders.items()}


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    chunks = [detok.push(i) for i in ids]
    return chunks, detok.flush()


def _check_stream(tok: Tokenizer, ids: list[int]) -> None:
    """Streamed text equals the full decode, and no chunk holds a half character."""
    chunks, tail = _stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(chunks) + tail == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in c for c in [*chunks, tail]), chunks


# --------------------------------------------------------------------------- ByteTokenizer


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (259, BOS_ID, (EOS_ID,), PAD_ID)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids[0] == BOS_ID and ids[1:] == list(text.encode())
        assert tok.decode(ids) == text
        assert tok.encode(text, add_special_tokens=False) == list(text.encode())
    assert tok.decode([BOS_ID, 104, 105, EOS_ID, PAD_ID], skip_special_tokens=False) == "<bos>hi<eos><pad>"
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"


def test_byte_tokenizer_extra_ids_decode_to_nothing():
    tok = ByteTokenizer(vocab_size=1024)
    emoji = list("🙂".encode())
    # Extra ids (and skipped specials) between the bytes of one character do not split it.
    assert tok.decode([emoji[0], 300, emoji[1], EOS_ID, emoji[2], 1023, emoji[3]]) == "🙂"
    assert tok.decode([259, 1000], skip_special_tokens=False) == ""
    with pytest.raises(ValueError, match="outside"):
        tok.decode([1024])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    with pytest.raises(ConfigError, match="259"):
        ByteTokenizer(vocab_size=258)


def test_byte_emoji_split_across_four_tokens():
    tok = ByteTokenizer()
    chunks, tail = _stream(tok, list("🙂".encode()))
    assert chunks == ["", "", "", "🙂"] and tail == ""


def test_byte_stream_holds_only_the_partial_character():
    tok = ByteTokenizer()
    ids = list("ab中".encode())
    chunks, tail = _stream(tok, ids)
    assert chunks == ["a", "b", "", "", "中"] and tail == ""
    # An incomplete character at the very end comes out of flush() as U+FFFD.
    chunks, tail = _stream(tok, list("x".encode()) + list("中".encode())[:2])
    assert chunks == ["x", "", ""] and tail == "\ufffd"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.text(max_size=60))
def test_byte_tokenizer_property(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    _check_stream(tok, ids)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 299), max_size=80))
def test_byte_tokenizer_stream_of_arbitrary_ids(ids):
    """Any id sequence, invalid UTF-8 and specials included, streams to exactly its decode."""
    tok = ByteTokenizer(vocab_size=300)
    for skip in (True, False):
        chunks, tail = _stream(tok, ids, skip_special_tokens=skip)
        assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=skip)


# --------------------------------------------------------------------------- HFTokenizer


@pytest.mark.parametrize("name", ["bytelevel", "llama2", "llama2_template"])
def test_hf_round_trip(hf, name):
    tok = hf[name]
    assert isinstance(tok, Tokenizer)
    for text in SAMPLES:
        if name != "bytelevel":
            text = text.strip()  # SentencePiece-style decoding drops one leading space by design
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_hf_byte_fallback_is_exercised(hf):
    """Characters absent from training go through <0xNN> pieces, so streaming meets partial bytes."""
    tok = hf["llama2"]
    ids = tok.encode("🦀", add_special_tokens=False)
    assert len(ids) >= 4 and tok.decode(ids[:-1]).endswith("\ufffd")


@pytest.mark.parametrize("name", ["bytelevel", "llama2", "llama2_template"])
def test_hf_bos_added_exactly_once(hf, name):
    tok = hf[name]
    bos = tok.bos_token_id
    literal = "<|begin_of_text|>" if name == "bytelevel" else "<s>"
    ids = tok.encode("hello world")
    assert ids[0] == bos and ids.count(bos) == 1
    assert bos not in tok.encode("hello world", add_special_tokens=False)
    # A rendered chat template that already starts with BOS does not get a second one.
    ids = tok.encode(literal + "hello world")
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.encode(literal + "hi", add_special_tokens=False)[0] == bos
    assert tok.decode(tok.encode("hello world"), skip_special_tokens=False).startswith(literal)


def test_hf_decode_rejects_negative_ids_and_ignores_ids_past_vocab(hf):
    tok = hf["bytelevel"]
    with pytest.raises(ValueError):
        tok.decode([-1])
    assert tok.decode([tok.vocab_size + 5]) == ""


def test_hf_no_bos_when_config_says_so(hf):
    tok = hf["unigram"]  # add_bos_token: false, no post-processor
    assert tok.bos_token_id == tok.token_to_id("<s>")
    assert tok.bos_token_id not in tok.encode("hello world")


def test_hf_special_ids_from_configs(hf):
    tok = hf["bytelevel"]
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIALS}
    assert tok.bos_token_id == ids["<|begin_of_text|>"]
    # tokenizer_config's eos first, then generation_config's, without duplicates.
    assert tok.eos_token_ids == (ids["<|eot_id|>"], ids["<|end_of_text|>"])
    assert tok.pad_token_id is None
    assert tok.vocab_size == 400
    sp = hf["llama2"]
    assert sp.eos_token_ids == (sp.token_to_id("</s>"),)
    assert sp.vocab_size == len(sp._tok.get_vocab(with_added_tokens=True)) > 256


EOS_CASES = {
    "tokenizer_config string": ({"tokenizer_config": {"eos_token": "<|eot_id|>"}}, ["<|eot_id|>"]),
    "tokenizer_config dict": ({"tokenizer_config": {"eos_token": {"content": "<|end_of_text|>"}}},
                              ["<|end_of_text|>"]),
    "generation_config int": ({"generation_config": {"eos_token_id": 2}}, ["<|eot_id|>"]),
    "generation_config list": ({"generation_config": {"eos_token_id": [1, 2]}},
                               ["<|end_of_text|>", "<|eot_id|>"]),
    "config int": ({"config": {"eos_token_id": 1}}, ["<|end_of_text|>"]),
    "config list": ({"config": {"eos_token_id": [2, 1]}}, ["<|eot_id|>", "<|end_of_text|>"]),
    "config text_config": ({"config": {"text_config": {"eos_token_id": [1]}}}, ["<|end_of_text|>"]),
    "union in file order": ({"tokenizer_config": {"eos_token": "<|eot_id|>"},
                             "generation_config": {"eos_token_id": [1, 2]},
                             "config": {"eos_token_id": 1}}, ["<|eot_id|>", "<|end_of_text|>"]),
    "null everywhere": ({"tokenizer_config": {"eos_token": None}, "generation_config": {"eos_token_id": None}}, []),
    "no configs": ({}, []),
}


@pytest.mark.parametrize("case", list(EOS_CASES))
def test_hf_eos_from_each_config_style(tmp_path, raw_bytelevel, case):
    files, expected = EOS_CASES[case]
    tok = HFTokenizer(_write_folder(tmp_path, raw_bytelevel, **files))
    assert tok.eos_token_ids == tuple(raw_bytelevel.token_to_id(t) for t in expected)


def test_hf_bos_and_pad_fallbacks(tmp_path, raw_bytelevel):
    tok = HFTokenizer(_write_folder(tmp_path / "a", raw_bytelevel,
                                    tokenizer_config={"pad_token": "<|pad|>", "unk_token": None},
                                    config={"bos_token_id": 0, "pad_token_id": 1}))
    assert tok.bos_token_id == 0 and tok.pad_token_id == raw_bytelevel.token_to_id("<|pad|>")
    # A pad token missing from the vocabulary is left unset (transformers would add it).
    tok = HFTokenizer(_write_folder(tmp_path / "b", raw_bytelevel, tokenizer_config={"pad_token": "[PAD]"}))
    assert tok.pad_token_id is None and tok.bos_token_id is None


@pytest.mark.parametrize("files, match", [
    ({"tokenizer_config": {"eos_token": "</nope>"}}, r"eos_token '</nope>' is not in the vocabulary"),
    ({"tokenizer_config": {"bos_token": 7}}, "bos_token must be a string"),
    ({"tokenizer_config": {"add_bos_token": "yes"}}, "add_bos_token must be true or false"),
    ({"generation_config": {"eos_token_id": "2"}}, "eos_token_id must be a non-negative int"),
    ({"config": {"eos_token_id": [1, True]}}, "eos_token_id must be a non-negative int"),
    ({"config": [1, 2]}, "must hold a JSON object"),
])
def test_hf_bad_special_token_config(tmp_path, raw_bytelevel, files, match):
    with pytest.raises(ConfigError, match=match):
        HFTokenizer(_write_folder(tmp_path, raw_bytelevel, **files))


def test_hf_unparseable_files(tmp_path, raw_bytelevel):
    folder = _write_folder(tmp_path / "a", raw_bytelevel)
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        load_tokenizer(folder)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot load"):
        load_tokenizer(tmp_path / "b")


def test_hf_ignores_truncation_saved_in_tokenizer_json(tmp_path, raw_bytelevel):
    raw = RawTokenizer.from_str(raw_bytelevel.to_str())
    raw.enable_truncation(max_length=4)
    tok = HFTokenizer(_write_folder(tmp_path, raw))
    assert len(tok.encode("hello world, the quick brown fox")) > 4


# --------------------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_accepts_folder_or_file(hf, tmp_path, raw_bytelevel):
    folder = _write_folder(tmp_path, raw_bytelevel, tokenizer_config={"eos_token": "<|eot_id|>"})
    for path in (folder, str(folder), folder / "tokenizer.json"):
        tok = load_tokenizer(path)
        assert isinstance(tok, HFTokenizer) and tok.eos_token_ids == (raw_bytelevel.token_to_id("<|eot_id|>"),)


def test_load_tokenizer_errors_name_folder_and_file(tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer path given.*tokenizer.json"):
        load_tokenizer(None)
    with pytest.raises(ConfigError) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.json" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ConfigError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("name", ["bytelevel", "llama2", "unigram"])
@pytest.mark.parametrize("text", SAMPLES)
def test_stream_matches_full_decode(hf, name, text):
    tok = hf[name]
    _check_stream(tok, tok.encode(text))
    _check_stream(tok, tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("name", ["llama2", "unigram"])
def test_stream_keeps_sentencepiece_spaces(hf, name):
    """Decoding tokens one by one loses the spaces; the windowed detokenizer keeps them."""
    tok = hf[name]
    ids = tok.encode("hello world there", add_special_tokens=False)
    assert "".join(tok.decode([i]) for i in ids) != "hello world there"  # the trap is real
    chunks, tail = _stream(tok, ids)
    assert "".join(chunks) + tail == "hello world there"


@pytest.mark.parametrize("name", ["llama2", "unigram"])
def test_stream_lone_metaspace_token_first(hf, name):
    """A lone "▁" decodes to "" at the start, yet decides whether the next word has a space."""
    tok = hf[name]
    space = tok.token_to_id("▁")
    word = next(i for t, i in tok._tok.get_vocab().items() if t.startswith("▁") and len(t) > 2)
    special = tok.eos_token_ids[0]
    for ids in ([space, word], [space, special, special, word], [special, space, special, word, space]):
        _check_stream(tok, ids)
        assert tok.decode(ids).startswith(" ")


@pytest.mark.parametrize("name", ["bytelevel", "llama2", "unigram"])
def test_stream_with_prompt_context(hf, name):
    tok = hf[name]
    prompt = tok.encode("The quick brown fox")
    gen = tok.encode(" jumps over 中文 🙂", add_special_tokens=False)
    full = tok.decode(prompt + gen)
    chunks, tail = _stream(tok, gen, context=prompt)
    assert "".join(chunks) + tail == full[len(tok.decode(prompt)):]
    assert chunks[0].startswith(" ")  # the first generated word keeps its space


@pytest.mark.parametrize("name", ["bytelevel", "llama2", "unigram"])
def test_stream_with_interleaved_special_tokens(hf, name):
    tok = hf[name]
    special = tok.eos_token_ids[0]
    ids = tok.encode("hello 中文 🙂 world", add_special_tokens=False)
    mixed = [special] * 3 + [t for i in ids for t in (i, special)] + [special] * 3
    _check_stream(tok, mixed)
    chunks, tail = _stream(tok, mixed, skip_special_tokens=False)
    assert "".join(chunks) + tail == tok.decode(mixed, skip_special_tokens=False)


class _WindowSpy:
    """Records the longest id list the detokenizer asks the tokenizer to decode."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.longest = tok, 0

    def decode(self, ids, *, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("name", ["bytelevel", "llama2", "unigram"])
def test_stream_decodes_a_bounded_window(hf, name):
    """Cost per token does not grow with the sequence: the decoded window stays short."""
    spy = _WindowSpy(hf[name])
    ids = hf[name].encode(" ".join(SAMPLES) * 20, add_special_tokens=False)
    assert len(ids) > 2000
    chunks, tail = _stream(spy, ids)
    assert "".join(chunks) + tail == hf[name].decode(ids)
    assert spy.longest <= 16


def test_stream_window_bounded_for_random_model_ids():
    """A random-weight model over a big vocab mostly samples ids that decode to nothing."""
    tok = ByteTokenizer(vocab_size=4096)
    rng = random.Random(0)
    ids = [rng.randrange(4096) for _ in range(20000)]
    spy = _WindowSpy(tok)
    chunks, tail = _stream(spy, ids)
    assert "".join(chunks) + tail == tok.decode(ids)
    assert spy.longest <= 130


@settings(max_examples=60, deadline=None, derandomize=True)
@given(text=st.text(max_size=40), name=st.sampled_from(["bytelevel", "llama2", "llama2_template", "unigram"]))
def test_hf_stream_property(hf, text, name):
    tok = hf[name]
    ids = tok.encode(text, add_special_tokens=False)
    if name == "bytelevel":
        assert tok.decode(ids) == text  # byte-level BPE is lossless
    _check_stream(tok, ids)
    _check_stream(tok, tok.encode(text))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(ids=st.lists(st.integers(0, 399), max_size=40))
def test_hf_bytelevel_stream_of_arbitrary_ids(hf, ids):
    """Random ids (invalid UTF-8, specials) still stream to exactly the full decode."""
    tok = hf["bytelevel"]
    for skip in (True, False):
        chunks, tail = _stream(tok, ids, skip_special_tokens=skip)
        assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=skip)
