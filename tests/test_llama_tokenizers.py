"""Tokenizers as Llama uses them: Megatron's Llama2Tokenizer (a SentencePiece model, BOS prepended, eod = EOS)
gives transformers' LlamaTokenizer ids; a Llama-style tokenizer.json (HuggingFaceTokenizer) adds <s> and
ends documents with </s>; both preprocess to <s> ... </s> documents and train through pretrain_gpt; the
exported Hugging Face folder carries a tokenizer that gives the same ids; an imported HF Llama loaded as
tools/generate.py loads it generates greedily exactly as transformers does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sentencepiece
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaTokenizer

import pretrain_gpt
from megatron.data.indexed_dataset import IndexedDataset
from megatron.tokenizer import HuggingFaceTokenizer, Llama2Tokenizer, TokenizerConfigError, build_tokenizer
from tests.test_llama_training import LLAMA_FLAGS, TINY
from tools import preprocess_data
from tools.checkpoint import export_hf

LINES = ["the quick brown fox jumps over the lazy dog", "hello world this is a test",
         "llamas eat grass in the mountains", "a small model learns the patterns of text"] * 40  # fmt: skip
TEXTS = ["the lazy llama", " hello  world", "llamas eat the grass the fox"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama_tok")
    (folder / "corpus.txt").write_text("\n".join(LINES), encoding="utf-8")
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in LINES), encoding="utf-8"
    )
    return folder


@pytest.fixture(scope="module")
def sp_model(corpus) -> str:
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus / "corpus.txt"), model_prefix=str(corpus / "llama"), vocab_size=48, minloglevel=2
    )  # <unk> 0, <s> 1, </s> 2, as Llama's model
    return str(corpus / "llama.model")


@pytest.fixture(scope="module")
def hf_llama_tokenizer(corpus) -> Path:
    """A Llama-style tokenizer.json: BPE, <s> added in front by the post-processor; eos </s> in the config."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train(
        [str(corpus / "corpus.txt")],
        trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = corpus / "hf_tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def test_llama2_tokenizer_gives_transformers_llama_ids(sp_model):
    ours = Llama2Tokenizer(sp_model)
    reference = LlamaTokenizer(vocab_file=sp_model, legacy=False)
    assert ours.vocab_size == reference.vocab_size == 48  # no Megatron special tokens appended
    assert (ours.bos, ours.eos, ours.eod) == (1, 2, 2)
    for text in TEXTS:
        ids = ours.tokenize(text)
        assert ids == reference(text)["input_ids"] and ids[0] == 1 and 2 not in ids
        assert ours.detokenize(ids) == reference.decode(ids, skip_special_tokens=True)
    with pytest.raises(NotImplementedError):
        ours.mask  # noqa: B018 - Llama has no [MASK]


def test_llama2_tokenizer_refuses_a_model_without_bos(corpus):
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus / "corpus.txt"),
        model_prefix=str(corpus / "nobos"),
        vocab_size=40,
        bos_id=-1,
        minloglevel=2,
    )
    with pytest.raises(TokenizerConfigError, match="no BOS piece"):
        Llama2Tokenizer(str(corpus / "nobos.model"))


def _documents(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.mark.parametrize("kind", ["Llama2Tokenizer", "HuggingFaceTokenizer"])
def test_preprocess_stores_bos_text_eos_and_trains(kind, corpus, sp_model, hf_llama_tokenizer, tmp_path):
    model = sp_model if kind == "Llama2Tokenizer" else str(hf_llama_tokenizer)
    flags = ["--tokenizer-type", kind, "--tokenizer-model", model]
    preprocess_data.main(["--input", str(corpus / "corpus.jsonl"), "--output-prefix", str(tmp_path / "d"),
                          "--append-eod", *flags])  # fmt: skip
    tokenizer = build_tokenizer(type("C", (), {"tokenizer_type": kind, "tokenizer_model": model})())
    docs = _documents(str(tmp_path / "d_text_document"))
    assert len(docs) == len(LINES)
    for doc, line in zip(docs, LINES):
        assert doc[0] == tokenizer.bos == 1 and doc[-1] == tokenizer.eod == tokenizer.eos == 2
        assert doc[:-1] == tokenizer.tokenize(line)
    if kind == "HuggingFaceTokenizer":
        assert isinstance(tokenizer, HuggingFaceTokenizer)
    summary = pretrain_gpt.main(
        [*TINY, *LLAMA_FLAGS, "--train-iters", "4", "--global-batch-size", "4", "--data-path",
         str(tmp_path / "d_text_document"), "--split", "90,10,0", "--data-cache-path", str(tmp_path), *flags]
    )  # fmt: skip
    assert all(math.isfinite(step["lm loss"]) for step in summary["losses"])


def test_exported_llama_folder_carries_the_tokenizer(sp_model, tmp_path):
    from tests.test_llama_hf import random_llama
    from tools.checkpoint import import_hf_llama
    from tools.checkpoint.checkpoint_io import load_checkpoint_shards, shard_file_state, write_checkpoint

    random_llama().save_pretrained(tmp_path / "hf")
    import_hf_llama.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt")])
    checkpoint = load_checkpoint_shards(str(tmp_path / "ckpt"))  # point its args at the SentencePiece model
    args = checkpoint.args
    args.tokenizer_type, args.tokenizer_model = "Llama2Tokenizer", sp_model
    write_checkpoint(
        str(tmp_path / "ckpt_sp"), 0, True, [shard_file_state(args, 0, checkpoint.model_shards()[0])]
    )
    export_hf.main(["--load", str(tmp_path / "ckpt_sp"), "--output", str(tmp_path / "out")])
    exported = AutoTokenizer.from_pretrained(tmp_path / "out", use_fast=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # from the SentencePiece model
    for text in TEXTS:
        assert exported(text)["input_ids"] == Llama2Tokenizer(sp_model).tokenize(text)


def test_tokenizer_json_travels_through_import_and_export(hf_llama_tokenizer, tmp_path):
    import shutil

    from tests.test_llama_hf import random_llama
    from tools.checkpoint import import_hf_llama

    random_llama().save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_llama_tokenizer / name, tmp_path / "hf" / name)
    import_hf_llama.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt")])
    ours = build_tokenizer(
        type(
            "C",
            (),
            {
                "tokenizer_type": "HuggingFaceTokenizer",
                "tokenizer_model": str(tmp_path / "ckpt" / "tokenizer.json"),
            },
        )()
    )
    assert ours.eod == 2 and ours.bos == 1
    export_hf.main(["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")])
    exported = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert exported.eos_token_id == 2
    for text in TEXTS:
        assert exported(text)["input_ids"] == ours.tokenize(text)


def test_imported_llama_generates_like_transformers(hf_llama_tokenizer, tmp_path):
    """An HF Llama (with its tokenizer.json) imported and loaded the way tools/generate.py loads it (model and
    tokenizer from the checkpoint's args) continues a prompt greedily with the KV cache exactly as
    transformers' generate() does."""
    import argparse
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron.text_generation import (
        GREEDY,
        add_inference_args,
        generate,
        inference_args,
        load_model_for_inference,
    )
    from tools.checkpoint import import_hf_llama

    vocab = HuggingFaceTokenizer(str(hf_llama_tokenizer)).vocab_size
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():  # large weights: peaked logits, no argmax ties
            param.copy_(torch.randn_like(param) * 0.5 + (1.0 if "norm" in name else 0.0))
    hf.save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_llama_tokenizer / name, tmp_path / "hf" / name)
    import_hf_llama.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt")])

    cli = add_inference_args(argparse.ArgumentParser()).parse_args(["--load", str(tmp_path / "ckpt")])
    model, tokenizer, parallel = load_model_for_inference(inference_args(cli))
    prompt = tokenizer.tokenize("the quick brown fox")
    ours = generate(model, [prompt], 12, parallel, GREEDY, vocab_size=tokenizer.vocab_size, eod=tokenizer.eod)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
    assert ours.generated()[0] == theirs.tolist()
    assert len(set(theirs.tolist())) >= 3
