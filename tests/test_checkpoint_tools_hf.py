"""tools/checkpoint/export_hf.py and import_hf_gpt2.py: the Hugging Face models give our logits (GPT-2 LM,
MegatronBert MLM + NSP), ours -> HF -> ours is bitwise, HF GPT-2 imports and trains, tokenizers travel,
and bad input fails cleanly without partial output."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    MegatronBertForMaskedLM,
    MegatronBertForPreTraining,
)

import pretrain_gpt
from megatron.arguments import parse_args, transformer_config_from_args
from megatron.checkpoint_format import from_megatron_state_dict, get_checkpoint_name
from megatron.checkpointing import load_checkpoint, save_checkpoint
from megatron.model import BertModel, GPTModel
from megatron.parallel.state import single_process_state
from megatron.tokenizer import build_tokenizer, vocab_size_with_padding
from tests.shared_data import shared_path
from tools import train_tokenizer
from tools.checkpoint import export_hf, import_hf_gpt2, reshard

ROOT = Path(__file__).resolve().parents[1]
SEQ = 12
MODEL_FLAGS = (
    f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length {SEQ} --max-position-embeddings 16 "
    "--micro-batch-size 2 --train-iters 4 --lr 1e-3 --lr-warmup-iters 1 --mock-data --log-interval 100 "
    "--eval-iters 1 --eval-interval 1000 --hidden-dropout 0 --attention-dropout 0"
).split()
NULL_TOKENIZER = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "200"]  # 201 ids, padded to 256
BERT_WORDS = "the quick brown fox jumps over lazy dog hello world ##s ##ing a an".split()


def _tokens(vocab: int) -> torch.Tensor:
    return (torch.arange(2 * SEQ).reshape(2, SEQ) * 37 + 5) % vocab


def _args(*flags: str) -> argparse.Namespace:
    args = parse_args([*MODEL_FLAGS, *flags], world_size=1)
    args.padded_vocab_size = vocab_size_with_padding(build_tokenizer(args).vocab_size, 128, 1)
    return args


def _randomize(model: torch.nn.Module) -> None:
    """Every weight away from its init (zero biases, unit layernorms), so any mis-mapped tensor shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "layernorm.weight" in name else 0.0))


def _save(save_dir: Path, args: argparse.Namespace, bert: bool = False) -> torch.nn.Module:
    config = transformer_config_from_args(args)
    if bert:
        config.num_tokentypes = 2
        config.add_binary_head = args.bert_binary_head
        model = BertModel(config, single_process_state(), parallel_output=False)
    else:
        model = GPTModel(config, single_process_state(), parallel_output=False)
    _randomize(model)
    save_checkpoint(3, model, None, None, args, single_process_state(), str(save_dir))
    return model.eval()


def _flat_model(save_dir: Path, iteration: int, tp_rank: int = 0, release: bool = False) -> dict:
    path = get_checkpoint_name(str(save_dir), iteration, tp_rank, release=release)
    return from_megatron_state_dict(torch.load(path, weights_only=False)["model"])


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def gpt2_tokenizer_files(tmp_path_factory) -> Path:
    """vocab.json + merges.txt of a small byte-level BPE trained on a few WikiText lines."""
    tmp = tmp_path_factory.mktemp("bpe")
    lines = shared_path("wikitext-2", "valid.txt").read_text(encoding="utf-8").splitlines()[:300]
    (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines if t.strip()))
    train_tokenizer.main(["--input", str(tmp / "corpus.jsonl"), "--tokenizer-type", "GPT2BPETokenizer",
                          "--vocab-size", "400", "--output-dir", str(tmp / "tok")])  # fmt: skip
    return tmp / "tok"


# ------------------------------------------------------------------------------------------ GPT export


@pytest.mark.parametrize("gelu_flag,activation", [([], "gelu_new"), (["--no-bias-gelu-fusion"], "gelu")])
def test_gpt_export_gives_our_logits_and_imports_back_bitwise(tmp_path, gelu_flag, activation):
    args = _args(*NULL_TOKENIZER, *gelu_flag)
    model = _save(tmp_path / "ckpt", args)
    export_hf.main(["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])

    config = _read_json(tmp_path / "hf" / "config.json")
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == activation
    shape = [config[k] for k in ("n_layer", "n_embd", "n_head", "n_inner", "n_positions", "vocab_size")]
    assert shape == [2, 32, 4, 128, 16, 256]  # vocab_size: the padded vocabulary
    assert config["layer_norm_epsilon"] == 1e-5 and config["eos_token_id"] == 200
    hf_model, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert all(not keys for keys in info.values()), info
    tokens = _tokens(201)
    with torch.no_grad():
        ours = model(tokens, torch.arange(SEQ).expand(2, SEQ))
        theirs = hf_model.eval()(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    import_hf_gpt2.main(
        ["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "back"), "--iteration", "3"]
    )
    original, back = _flat_model(tmp_path / "ckpt", 3), _flat_model(tmp_path / "back", 3)
    assert list(back) == list(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    saved = torch.load(get_checkpoint_name(str(tmp_path / "back"), 3, 0), weights_only=False)["args"]
    assert saved.bias_gelu_fusion == args.bias_gelu_fusion and not saved.openai_gelu
    assert (saved.num_layers, saved.hidden_size, saved.num_attention_heads, saved.ffn_hidden_size) == (
        2,
        32,
        4,
        128,
    )
    assert (saved.max_position_embeddings, saved.padded_vocab_size) == (16, 256)


def test_export_from_tp2_equals_export_from_tp1(tmp_path):
    _save(tmp_path / "tp1", _args(*NULL_TOKENIZER))
    reshard.main(["--load", str(tmp_path / "tp1"), "--save", str(tmp_path / "tp2"),
                  "--target-tensor-model-parallel-size", "2"])  # fmt: skip
    for tp in ("tp1", "tp2"):
        export_hf.main(["--load", str(tmp_path / tp), "--output", str(tmp_path / f"hf_{tp}")])
    from_tp1, from_tp2 = (load_file(tmp_path / f"hf_{tp}" / "model.safetensors") for tp in ("tp1", "tp2"))
    assert from_tp1.keys() == from_tp2.keys() and "transformer.h.1.attn.c_attn.weight" in from_tp1
    for name in from_tp1:
        assert torch.equal(from_tp1[name], from_tp2[name]), name


def test_gpt2_tokenizer_files_are_exported(tmp_path, gpt2_tokenizer_files):
    tok = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2_tokenizer_files / "vocab.json"),
           "--merge-file", str(gpt2_tokenizer_files / "merges.txt")]  # fmt: skip
    args = _args(*tok)
    _save(tmp_path / "ckpt", args)
    export_hf.main(["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "hf"))
    text = "The quick brown fox jumps over the lazy dog, in 1998."
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer(text)["input_ids"] == build_tokenizer(args).tokenize(text)


# ------------------------------------------------------------------------------------------ BERT export


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]) + "\n")
    return path


@pytest.mark.parametrize("binary_head", [True, False])
def test_bert_export_gives_our_mlm_and_nsp_logits(tmp_path, bert_vocab, binary_head):
    flags = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(bert_vocab)]
    args = _args(*flags, *([] if binary_head else ["--bert-no-binary-head"]))
    model = _save(tmp_path / "ckpt", args, bert=True)
    export_hf.main(["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])

    config = _read_json(tmp_path / "hf" / "config.json")
    architecture = "MegatronBertForPreTraining" if binary_head else "MegatronBertForMaskedLM"
    assert config["architectures"] == [architecture] and config["model_type"] == "megatron-bert"
    assert (config["vocab_size"], config["intermediate_size"], config["hidden_act"]) == (128, 128, "gelu_new")
    hf_class = MegatronBertForPreTraining if binary_head else MegatronBertForMaskedLM
    hf_model, info = hf_class.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert all(not keys for keys in info.values()), info

    tokens = _tokens(len(BERT_WORDS) + 5)
    types = (torch.arange(SEQ) >= SEQ // 2).long().expand(2, SEQ)
    padding = torch.ones(2, SEQ, dtype=torch.long)
    padding[1, -3:] = 0  # the second sequence ends in padding
    with torch.no_grad():
        lm_logits, nsp_logits = model(tokens, padding, tokentype_ids=types)
        out = hf_model.eval()(input_ids=tokens, attention_mask=padding, token_type_ids=types)
    hf_lm = out.prediction_logits if binary_head else out.logits
    real = padding.bool()
    torch.testing.assert_close(hf_lm[real], lm_logits[real], rtol=1e-5, atol=1e-5)
    if binary_head:
        torch.testing.assert_close(out.seq_relationship_logits, nsp_logits, rtol=1e-5, atol=1e-5)
    else:
        assert nsp_logits is None

    text = "The quick brown foxes jumps over hello world"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text, add_special_tokens=False)["input_ids"] == (
        build_tokenizer(args).tokenize(text)
    )


# ------------------------------------------------------------------------------------------ GPT-2 import


def _hf_gpt2(vocab_size: int) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                        activation_function="gelu_new", eos_token_id=0, bos_token_id=0)  # fmt: skip
    torch.manual_seed(2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(
                torch.randn_like(param) * 0.2 + (1.0 if ".ln_" in name and name.endswith("weight") else 0)
            )
    return model


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_hf_gpt2_imports_with_its_logits_at_any_tp(tmp_path, safe_serialization):
    hf_model = _hf_gpt2(vocab_size=250)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=safe_serialization)
    for tp in (1, 2):
        import_hf_gpt2.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / f"tp{tp}"),
                             "--tensor-model-parallel-size", str(tp)])  # fmt: skip
        assert (tmp_path / f"tp{tp}" / "latest_checkpointed_iteration.txt").read_text() == "release"
    args = torch.load(get_checkpoint_name(str(tmp_path / "tp1"), 0, 0, release=True), weights_only=False)[
        "args"
    ]
    assert (args.ffn_hidden_size, args.padded_vocab_size, args.tokenizer_type) == (
        64,
        256,
        "GPT2BPETokenizer",
    )
    assert args.bias_gelu_fusion and args.seq_length == 16 and args.vocab_file is None

    parallel = single_process_state()
    model = GPTModel(transformer_config_from_args(args), parallel, parallel_output=False)
    load_checkpoint(model, None, None, str(tmp_path / "tp1"), parallel)
    tokens = _tokens(250)
    with torch.no_grad():
        ours = model.eval()(tokens, torch.arange(SEQ).expand(2, SEQ))
        theirs = hf_model(tokens).logits
    torch.testing.assert_close(ours[..., :250], theirs, rtol=1e-5, atol=1e-5)
    assert not ours[..., 250:].any()  # zero padding rows: zero logits

    whole = _flat_model(tmp_path / "tp1", 0, release=True)
    shards = [_flat_model(tmp_path / "tp2", 0, r, release=True) for r in range(2)]
    word = "language_model.embedding.word_embeddings.weight"
    assert torch.equal(torch.cat([s[word] for s in shards]), whole[word])
    qkv = "language_model.encoder.layers.0.self_attention.query_key_value.bias"
    assert torch.equal(torch.cat([s[qkv] for s in shards]), whole[qkv])


def test_import_reads_hub_style_files(tmp_path):
    """Hub GPT-2 files name tensors without `transformer.`, omit lm_head and may hold attn.bias mask buffers."""
    hf_model = _hf_gpt2(vocab_size=250)
    hf_model.save_pretrained(tmp_path / "hf")
    hf_model.config.save_pretrained(tmp_path / "hub")
    state = {name.removeprefix("transformer."): t for name, t in hf_model.state_dict().items()}
    del state["lm_head.weight"]
    state["h.0.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
    save_file(state, tmp_path / "hub" / "model.safetensors")
    for name in ("hf", "hub"):
        import_hf_gpt2.main(["--hf-dir", str(tmp_path / name), "--save", str(tmp_path / f"ckpt_{name}")])
    from_hf, from_hub = (_flat_model(tmp_path / f"ckpt_{n}", 0, release=True) for n in ("hf", "hub"))
    assert from_hf.keys() == from_hub.keys()
    assert all(torch.equal(from_hf[name], from_hub[name]) for name in from_hf)


def test_imported_gpt2_trains_with_checkpoint_args(tmp_path, gpt2_tokenizer_files):
    """--use-checkpoint-args takes the whole model and the copied tokenizer from the imported checkpoint."""
    vocab = len(_read_json(gpt2_tokenizer_files / "vocab.json"))
    _hf_gpt2(vocab).save_pretrained(tmp_path / "hf")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "hf" / name).write_bytes((gpt2_tokenizer_files / name).read_bytes())
    import_hf_gpt2.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt")])
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "ckpt"))
    summary = pretrain_gpt.main(["--use-checkpoint-args", "--load", str(tmp_path / "ckpt"), "--micro-batch-size",
                                 "2", "--train-iters", "3", "--lr", "1e-4", "--mock-data", "--eval-iters", "1"])  # fmt: skip
    assert summary["iteration"] == 3 and len(summary["losses"]) == 3
    assert all(torch.isfinite(torch.tensor(step["lm loss"])) for step in summary["losses"])


# ------------------------------------------------------------------------------------------ bad input


def _fails(main, argv: list, message: str) -> None:
    with pytest.raises(SystemExit) as error:
        main([str(a) for a in argv])
    assert str(error.value).startswith("error: ") and message in str(error.value), str(error.value)


def test_export_errors_leave_no_output(tmp_path, monkeypatch):
    _save(tmp_path / "ckpt", _args(*NULL_TOKENIZER))
    out = ["--output", tmp_path / "hf"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(export_hf, "save_file", disk_full)
        _fails(export_hf.main, ["--load", tmp_path / "ckpt", *out], "No space left on device")
    _save(tmp_path / "alibi", _args(*NULL_TOKENIZER, "--position-embedding-type", "alibi"))
    _fails(export_hf.main, ["--load", tmp_path / "alibi", *out], "--position-embedding-type alibi")
    _fails(export_hf.main, ["--load", tmp_path / "nothing", *out], "no such directory")
    assert sorted(os.listdir(tmp_path)) == ["alibi", "ckpt"]  # no hf, no hf.tmp-*

    (tmp_path / "hf").mkdir()
    _fails(export_hf.main, ["--load", tmp_path / "ckpt", *out], "already exists")
    export_hf.main([str(a) for a in ["--load", tmp_path / "ckpt", *out, "--force"]])
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]


def test_import_errors(tmp_path):
    _hf_gpt2(vocab_size=250).save_pretrained(tmp_path / "hf")
    save = ["--save", tmp_path / "ckpt"]
    _fails(import_hf_gpt2.main, ["--hf-dir", tmp_path, *save], "no config.json")
    _fails(import_hf_gpt2.main, ["--hf-dir", tmp_path / "hf", *save, "--tensor-model-parallel-size", 3],
           "must divide the 4 attention heads")  # fmt: skip
    os.remove(tmp_path / "hf" / "model.safetensors")
    _fails(import_hf_gpt2.main, ["--hf-dir", tmp_path / "hf", *save], "no model.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_cli_errors_exit_nonzero_without_traceback(tmp_path):
    for script, argv in (
        ("export_hf.py", ["--load", str(tmp_path / "missing"), "--output", str(tmp_path / "hf")]),
        ("import_hf_gpt2.py", ["--hf-dir", str(tmp_path / "missing"), "--save", str(tmp_path / "ckpt")]),
    ):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "checkpoint" / script), *argv],
                              capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 1 and "no such directory" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
