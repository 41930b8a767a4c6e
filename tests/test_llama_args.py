"""Llama-family flags (Megatron-LM's names): accepted, mapped onto the model config, and refused with a
clear message naming the flags when the shapes cannot work."""

from __future__ import annotations

import pytest

from megatron.arguments import parse_args, transformer_config_from_args
from megatron.model.transformer import check_llama_config
from megatron.parallel.state import single_process_state
from tests.test_arguments import BASE, _error

LLAMA = (
    "--position-embedding-type rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu "
    "--group-query-attention --num-query-groups 2 --untie-embeddings-and-output-weights "
    "--disable-bias-linear --rotary-base 500000"
).split()


def test_llama_flags_reach_the_model_config():
    args = parse_args(BASE + LLAMA)
    assert args.ffn_hidden_size == 128  # Megatron: int(4 h 2/3 / 64) 64 for h = 64
    args.padded_vocab_size = 128
    config = transformer_config_from_args(args)
    assert (config.position_embedding_type, config.normalization, config.layernorm_epsilon) == (
        "rope",
        "RMSNorm",
        1e-6,
    )
    assert config.swiglu and config.num_query_groups == 2 and config.rotary_base == 500000
    assert config.untie_embeddings_and_output_weights and not config.add_bias_linear


def test_defaults_are_gpt2_and_old_rotary_alias():
    args = parse_args(BASE)
    args.padded_vocab_size = 128
    config = transformer_config_from_args(args)
    assert config.num_query_groups == 4 and config.add_bias_linear and not config.swiglu
    assert config.normalization == "LayerNorm" and config.position_embedding_type == "learned_absolute"
    assert parse_args(BASE + ["--use-rotary-position-embeddings"]).position_embedding_type == "rope"
    assert parse_args(BASE + ["--swiglu", "--ffn-hidden-size", "96"]).ffn_hidden_size == 96


@pytest.mark.parametrize(
    "extra, world, needle",
    [
        (["--group-query-attention", "--num-query-groups", "3"], 1, "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
        (["--group-query-attention", "--num-query-groups", "1", "--tensor-model-parallel-size", "2"], 2,
         "--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2"),
        (["--num-query-groups", "2"], 1, "--num-query-groups needs --group-query-attention"),
        (["--position-embedding-type", "rope", "--kv-channels", "15"], 1, "needs an even rotary dimension"),
        (["--position-embedding-type", "rope", "--rotary-percent", "0.2"], 1, "needs an even rotary dimension"),
        (["--position-embedding-type", "rope", "--rotary-percent", "1.5"], 1, "--rotary-percent must be in (0, 1]"),
        (["--position-embedding-type", "rope", "--rotary-percent", "0"], 1, "--rotary-percent must be in (0, 1]"),
        (["--rotary-percent", "0.5"], 1, "--rotary-percent and --rotary-base need --position-embedding-type rope"),
        (["--normalization", "BatchNorm"], 1, "invalid choice: 'BatchNorm'"),
    ],
)  # fmt: skip
def test_llama_shape_errors_name_the_flags(capsys, extra, world, needle):
    assert needle in _error(capsys, BASE + extra, world_size=world)


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"num_query_groups": 3}, "must be divisible by --num-query-groups"),
        ({"position_embedding_type": "rope", "kv_channels": 7}, "even rotary dimension"),
        ({"position_embedding_type": "rope", "rotary_percent": 0.0}, "--rotary-percent must be in (0, 1]"),
        ({"normalization": "rms"}, "--normalization must be one of"),
    ],
)
def test_model_config_checks(fields, needle):
    from tests.test_model_common import tiny_config

    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        check_llama_config(tiny_config("gpt", **fields), single_process_state())


def test_bert_refuses_an_untied_output_layer(capsys):
    import pretrain_bert

    argv = "--num-layers 1 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
    argv += "--train-iters 1 --lr 1e-3 --mock-data --untie-embeddings-and-output-weights"
    with pytest.raises(SystemExit) as exc:
        pretrain_bert.main(argv.split() + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"])
    assert exc.value.code == 1
    assert "--untie-embeddings-and-output-weights: BERT's masked-LM head" in capsys.readouterr().err
