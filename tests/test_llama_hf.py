"""Hugging Face Llama both ways: a random LlamaForCausalLM (built with transformers, no Hub) imported with
tools/checkpoint/import_hf_llama.py gives its logits in our GPTModel; exporting ours with export_hf.py gives
a LlamaForCausalLM with the same logits; HF -> ours -> HF and TP 2 -> reshard -> TP 1 are bitwise; an HF
folder of another architecture is refused cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from megatron.arguments import transformer_config_from_args
from megatron.model import GPTModel
from megatron.parallel.state import single_process_state
from tools.checkpoint import export_hf, import_hf_llama, reshard
from tools.checkpoint.checkpoint_io import load_checkpoint_shards
from tools.checkpoint.tp_layout import merge_shards

VOCAB, SEQ = 100, 10  # 100 tokens pad to 128: padding rows and columns are exercised


def random_llama(tie: bool = False, bias: bool = False, kv_heads: int = 2) -> LlamaForCausalLM:
    """A small LlamaForCausalLM (4 heads, h 32) with EVERY parameter random, norms included."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=500.0,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def our_model(save_dir: Path) -> GPTModel:
    """Our GPTModel built from the checkpoint's args, with the TP-merged weights loaded strictly."""
    checkpoint = load_checkpoint_shards(str(save_dir))
    args = checkpoint.args
    model = GPTModel(transformer_config_from_args(args), single_process_state(), parallel_output=False)
    model.load_state_dict(merge_shards(checkpoint.model_shards(), "model", args.swiglu), strict=True)
    return model.eval()


def our_logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(ids.size(1)).expand_as(ids))


def hf_logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(
    "tie, bias, kv_heads", [(False, False, 2), (True, True, 4)], ids=["gqa-untied", "mha-tied-bias"]
)
def test_import_gives_hf_logits_and_export_round_trips_bitwise(tmp_path, tie, bias, kv_heads):
    hf = random_llama(tie, bias, kv_heads)
    hf.save_pretrained(tmp_path / "hf")
    import_hf_llama.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ours")])
    ours = our_model(tmp_path / "ours")
    args = load_checkpoint_shards(str(tmp_path / "ours")).args
    assert (args.position_embedding_type, args.normalization, args.swiglu) == ("rope", "RMSNorm", True)
    assert args.untie_embeddings_and_output_weights is not tie and args.add_bias_linear is bias
    assert args.rotary_base == 500 and args.group_query_attention is (kv_heads != 4)

    ids = tokens()
    expected = hf_logits(hf, ids)
    logits = our_logits(ours, ids)
    assert logits.shape == (2, SEQ, 128)
    assert_close(logits[..., :VOCAB], expected, "imported model vs HF")
    assert torch.equal(logits[..., VOCAB:], torch.zeros_like(logits[..., VOCAB:]))  # zero padding rows

    export_hf.main(["--load", str(tmp_path / "ours"), "--output", str(tmp_path / "back")])
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert exported.config.vocab_size == 128 and exported.config.tie_word_embeddings is tie
    assert_close(hf_logits(exported, ids), logits, "exported model vs ours")
    original, back = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert set(back) == set(original)
    for name, tensor in original.items():  # HF -> ours -> HF is bitwise (the padding rows aside)
        assert torch.equal(back[name][: tensor.size(0)], tensor), name


def test_tp2_import_reshards_to_the_tp1_import_bitwise(tmp_path):
    random_llama().save_pretrained(tmp_path / "hf")
    for tp in (1, 2):
        import_hf_llama.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / f"tp{tp}"),
                              "--tensor-model-parallel-size", str(tp)])  # fmt: skip
    shard = load_checkpoint_shards(str(tmp_path / "tp2")).model_shards()[0]
    h_to_4h = shard["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"]
    whole = our_model(tmp_path / "tp1").state_dict()[
        "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"
    ]
    # TP rank 0 holds [the first half of gate; the first half of up] (Megatron's SwiGLU layout).
    assert torch.equal(h_to_4h, torch.cat([whole[:24], whole[48:72]]))
    reshard.main(["--load", str(tmp_path / "tp2"), "--save", str(tmp_path / "tp2to1"),
                  "--target-tensor-model-parallel-size", "1", "--true-vocab-size", str(VOCAB)])  # fmt: skip
    a, b = (load_checkpoint_shards(str(tmp_path / d)).model_shards()[0] for d in ("tp1", "tp2to1"))
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    export_hf.main(["--load", str(tmp_path / "tp2"), "--output", str(tmp_path / "hf_from_tp2")])
    original, back = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "hf_from_tp2" / "model.safetensors"),
    )
    assert all(torch.equal(back[n][: t.size(0)], t) for n, t in original.items())


def test_non_llama_folder_is_refused(tmp_path, capsys):
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SystemExit) as exc:
        import_hf_llama.main(["--hf-dir", str(tmp_path / "gpt2"), "--save", str(tmp_path / "out")])
    assert "model_type is 'gpt2'" in str(exc.value) and "Llama" in str(exc.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exc:
        import_hf_llama.main(["--hf-dir", str(tmp_path / "missing"), "--save", str(tmp_path / "out")])
    assert "no such directory" in str(exc.value)


def test_unexportable_and_unreshardable_llama_checkpoints_are_refused(tmp_path):

    random_llama().save_pretrained(tmp_path / "hf")
    import_hf_llama.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ours")])
    with pytest.raises(SystemExit) as exc:  # 2 query groups cannot be split over 4 ranks
        reshard.main(["--load", str(tmp_path / "ours"), "--save", str(tmp_path / "tp4"),
                      "--target-tensor-model-parallel-size", "4", "--true-vocab-size", str(VOCAB)])  # fmt: skip
    assert "does not divide the 2 query groups" in str(exc.value) and not (tmp_path / "tp4").exists()

    checkpoint = load_checkpoint_shards(str(tmp_path / "ours"))
    args = checkpoint.args
    args.normalization = "LayerNorm"  # RoPE + SwiGLU with LayerNorm: no Hugging Face Llama expresses it
    from tools.checkpoint.checkpoint_io import shard_file_state, write_checkpoint

    write_checkpoint(str(tmp_path / "ln"), 0, True, [shard_file_state(args, 0, checkpoint.model_shards()[0])])
    with pytest.raises(SystemExit) as exc:
        export_hf.main(["--load", str(tmp_path / "ln"), "--output", str(tmp_path / "hf_ln")])
    assert (
        "LlamaForCausalLM needs --normalization RMSNorm" in str(exc.value)
        and not (tmp_path / "hf_ln").exists()
    )
