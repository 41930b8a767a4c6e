"""Our checkpoints are read by Hugging Face's converters for Megatron-LM's classic checkpoints
(convert_megatron_gpt2_checkpoint.py, convert_megatron_bert_checkpoint.py, transformers 4.46), and the
converted models give our logits. scripts/test.sh extracts the two scripts into .venv/hf_megatron_converters."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import pretrain_bert
import pretrain_gpt
from megatron.arguments import transformer_config_from_args
from megatron.checkpointing import get_checkpoint_name, load_args_from_checkpoint, load_checkpoint
from megatron.model import BertModel, GPTModel
from megatron.parallel.state import single_process_state

CONVERTERS = Path(sys.prefix) / "hf_megatron_converters"
TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
    "--micro-batch-size 2 --lr 1e-3 --train-iters 3 --log-interval 10 --eval-iters 0 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 100"
).split()


def _converter(model: str):
    path = CONVERTERS / f"convert_megatron_{model}_checkpoint.py"
    if not path.exists():
        pytest.skip(f"{path} missing: run bash scripts/test.sh, which extracts it from transformers 4.46.3")
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
