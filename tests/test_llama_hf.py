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
from megatron.checkpoint_format import from_megatron_state_dict
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


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tp2_pp2_import_reshards_to_hf_logits_and_exports_bitwise(tmp_path, tie):
    """HF -> import at TP 2 x PP 2 -> reshard.py to TP 1 x PP 1 -> export_hf.py: HF's logits (1e-5), and the
    resharded weights equal a TP 1 import bitwise; the TP 2 x PP 2 import exports directly to the original
    weights, bitwise. The stages hold what Megatron's do: the embedding on stage 0, global layer 1 as
    stage 1's layers.0, the final norm and output layer (or the tied copy) on stage 1."""
    hf = random_llama(tie=tie)
    hf.save_pretrained(tmp_path / "hf")
    for name, layout in (("tp1", ["1", "1"]), ("tp2pp2", ["2", "2"])):
        import_hf_llama.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / name),
                              "--tensor-model-parallel-size", layout[0], "--pipeline-model-parallel-size", layout[1]])  # fmt: skip
    release = tmp_path / "tp2pp2" / "release"
    assert sorted(p.name for p in release.iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"
    ]  # fmt: skip
    whole = load_checkpoint_shards(str(tmp_path / "tp1")).model_shards()[0]  # vocabulary padded to 128
    files = {d.name: torch.load(d / "model_optim_rng.pt", weights_only=False) for d in release.iterdir()}
    stage = {name: from_megatron_state_dict(state["model"]) for name, state in files.items()}
    assert all(
        (state["args"].tensor_model_parallel_size, state["args"].pipeline_model_parallel_size) == (2, 2)
        for state in files.values()
    )
    word = "language_model.embedding.word_embeddings.weight"
    head = "word_embeddings_for_head.weight" if tie else "language_model.output_layer.weight"
    for tp_rank in (0, 1):
        first, last = stage[f"mp_rank_0{tp_rank}_000"], stage[f"mp_rank_0{tp_rank}_001"]
        assert word in first and head not in first and "language_model.encoder.final_layernorm.weight" in last
        assert not any(
            k.startswith(("language_model.embedding.", "language_model.encoder.layers.1.")) for k in last
        )
        # global layer 1 is stage 1's layers.0: this rank's query group, and its halves of gate and up
        qkv = "language_model.encoder.layers.{}.self_attention.query_key_value.weight"
        assert torch.equal(last[qkv.format(0)], whole[qkv.format(1)].chunk(2)[tp_rank])
        h_to_4h = whole["language_model.encoder.layers.1.mlp.dense_h_to_4h.weight"]
        gate_up = torch.cat(
            [h_to_4h[24 * tp_rank : 24 * (tp_rank + 1)], h_to_4h[48 + 24 * tp_rank : 48 + 24 * (tp_rank + 1)]]
        )
        assert torch.equal(last["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"], gate_up)
        # 100 tokens pad to 256 at TP 2: rank 0 holds rows 0..127 (the TP 1 import's), rank 1 padding only
        rows = whole[word if tie else head]
        assert torch.equal(last[head], rows if tp_rank == 0 else torch.zeros_like(rows))
        if tie:
            assert torch.equal(last[head], first[word])  # the tied copy equals the first stage's

    reshard.main(["--load", str(tmp_path / "tp2pp2"), "--save", str(tmp_path / "tp1pp1"),
                  "--target-tensor-model-parallel-size", "1", "--target-pipeline-model-parallel-size", "1",
                  "--true-vocab-size", str(VOCAB)])  # fmt: skip
    resharded = load_checkpoint_shards(str(tmp_path / "tp1pp1"))
    assert resharded.pp_size == 1 and resharded.tp_size == 1
    back = resharded.model_shards()[0]
    assert set(back) == set(whole) and all(torch.equal(back[n], whole[n]) for n in whole)
    ids = tokens()
    expected = hf_logits(hf, ids)
    logits = our_logits(our_model(tmp_path / "tp1pp1"), ids)
    assert_close(logits[..., :VOCAB], expected, "resharded model vs HF")
    export_hf.main(["--load", str(tmp_path / "tp1pp1"), "--output", str(tmp_path / "hf_resharded")])
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf_resharded").eval()
    assert_close(hf_logits(exported, ids)[..., :VOCAB], expected, "exported after reshard vs HF")

    export_hf.main(["--load", str(tmp_path / "tp2pp2"), "--output", str(tmp_path / "hf_from_tp2pp2")])
    original = load_file(tmp_path / "hf" / "model.safetensors")
    direct = load_file(tmp_path / "hf_from_tp2pp2" / "model.safetensors")
    assert set(direct) == set(original)
    for name, tensor in original.items():  # bitwise, the padding rows aside (zero)
        assert torch.equal(direct[name][: tensor.size(0)], tensor), name
        assert not direct[name][tensor.size(0) :].any(), name
    assert_close(hf_logits(LlamaForCausalLM.from_pretrained(tmp_path / "hf_from_tp2pp2").eval(), ids)[..., :VOCAB],
                 expected, "exported from TP 2 x PP 2 vs HF")  # fmt: skip


def test_non_llama_folder_is_refused(tmp_path, capsys):
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SystemExit) as exc:
        import_hf_llama.main(["--hf-dir", str(tmp_path / "gpt2"), "--save", str(tmp_path / "out")])
    assert "model_type is 'gpt2'" in str(exc.value) and "Llama" in str(exc.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exc:
        import_hf_llama.main(["--hf-dir", str(tmp_path / "missing"), "--save", str(tmp_path / "out")])
    assert "no such directory" in str(exc.value)
    random_llama().save_pretrained(tmp_path / "hf")
    with pytest.raises(SystemExit) as exc:  # 2 layers cannot be cut into 3 stages
        import_hf_llama.main(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "out"),
                              "--pipeline-model-parallel-size", "3"])  # fmt: skip
    assert "--pipeline-model-parallel-size 3" in str(exc.value) and not (tmp_path / "out").exists()


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
