"""BERT fine-tuning tasks (RACE, MNLI, QQP): input building, file readers and their errors, accuracy
counting, loading a pretrained BERT, and fine-tuning end to end on small synthetic files in the real
formats (loss falls, accuracy matches a hand count, TP x DP = 2, 4 reproduce one process)."""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import pretrain_bert
from megatron.checkpoint_format import from_megatron_state_dict
from megatron.checkpointing import CheckpointError
from megatron.model import TransformerConfig
from megatron.parallel.state import single_process_state
from megatron.tokenizer import BertWordPieceTokenizer
from tasks import main as tasks_main
from tasks.classification import Classification, MultipleChoice
from tasks.data_utils import TaskError, build_pair_input, clean_text, shard_range
from tasks.finetune_utils import evaluate_accuracy, load_pretrained
from tasks.glue.data import MNLI, QQP, GlueDataset, read_glue_tsv
from tasks.race.data import RaceDataset, question_with_option, race_files, read_passage
from tests.distributed_utils import run_distributed
from tests.test_tasks_zeroshot import reshard_to_tp2

WORDS = "the a cat dog sat on mat ran big red blue green is was yes no maybe right wrong what who".split()
FILLER = WORDS[:12]
MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
         "--hidden-dropout 0 --attention-dropout 0 --seed 5 --make-vocab-size-divisible-by 64").split()  # fmt: skip
MNLI_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_LABELS = {"yes": "entailment", "no": "contradiction", "maybe": "neutral"}


def _mnli_row(i: int, sentence1: str, sentence2: str, label: str) -> str:
    return f"{i}\t{i}\t{i}n\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{sentence1}\t{sentence2}\t{label}\t{label}"


def _write_mnli(path: Path, n: int, rng: random.Random) -> None:
    """An easy MNLI: the label is named by a keyword that ends sentence 2."""
    rows = []
    for i in range(n):
        keyword = rng.choice(list(MNLI_LABELS))
        sentence1 = " ".join(rng.choice(FILLER) for _ in range(6))
        sentence2 = " ".join(rng.choice(FILLER) for _ in range(3)) + f" {keyword} ."
        rows.append(_mnli_row(i, sentence1, sentence2, MNLI_LABELS[keyword]))
    path.write_text("\n".join([MNLI_HEADER, *rows]) + "\n")


def _write_race(directory: Path, passages: int, rng: random.Random) -> None:
    """An easy RACE: the right option is the word "right", the three others "wrong"."""
    directory.mkdir(parents=True)
    for p in range(passages):
        questions, options, answers = [], [], []
        for q in range(2):
            answer = rng.randrange(4)
            choices = ["wrong"] * 4
            choices[answer] = "right"
            questions.append("what is the _ one ?" if q else "who sat on the mat ?")
            options.append(choices)
            answers.append("ABCD"[answer])
        article = " ".join(rng.choice(FILLER) for _ in range(20))
        record = {
            "article": article,
            "questions": questions,
            "options": options,
            "answers": answers,
            "id": f"{p}",
        }
        (directory / f"{p}.txt").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A WordPiece vocabulary, synthetic MNLI/QQP/RACE files and a BERT checkpoint (2 mock iterations)."""
    tmp = tmp_path_factory.mktemp("finetune")
    vocab = tmp / "vocab.txt"
    # 8 + 22 + 40 tokens (+ [BOS]/[EOS]) pad to 128 at TP 1 and 2, as the mock-data BERT's 101 do.
    unused = [f"[unused{i}]" for i in range(40)]
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "_", *WORDS, *unused]) + "\n"
    )
    rng = random.Random(0)
    _write_mnli(tmp / "mnli_train.tsv", 48, rng)
    _write_mnli(tmp / "mnli_dev.tsv", 21, rng)
    qqp = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
    for i in range(20):
        question = " ".join(rng.choice(FILLER) for _ in range(4))
        duplicate = i % 2
        qqp.append(
            f"{i}\t{2 * i}\t{2 * i + 1}\t{question} ?\t{question if duplicate else 'who ran'} ?\t{duplicate}"
        )
    qqp.append("20\t40\t41\t\tan empty first question ?\t0")  # skipped, as Megatron skips it
    (tmp / "qqp.tsv").write_text("\n".join(qqp) + "\n")
    _write_race(tmp / "race_train", 8, rng)
    _write_race(tmp / "race_dev", 3, rng)
    bert = tmp / "bert"
    pretrain_bert.main(
        [*MODEL, "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--micro-batch-size",
         "4", "--lr", "1e-4", "--train-iters", "2", "--eval-iters", "0", "--save", str(bert)]
    )  # fmt: skip
    reshard_to_tp2(bert, tmp / "bert_tp2")
    tokenizer_flags = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(vocab)]
    return {"tmp": tmp, "vocab": vocab, "bert": bert, "tok": tokenizer_flags}


def _tokenizer(files) -> BertWordPieceTokenizer:
    return BertWordPieceTokenizer(str(files["vocab"]), lower_case=True)


# --- inputs --------------------------------------------------------------------------------------------


def test_clean_text():
    assert clean_text("A  b\n\nc . d . . e") == "A b c. d.. e"


def test_pair_input_layout_and_truncation():
    cls, sep, pad = 2, 3, 0
    ids, types, padding = build_pair_input([10, 11], [20, 21, 22], 9, cls, sep, pad)
    assert ids == [2, 10, 11, 3, 20, 21, 22, 3, 0]
    assert types == [0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert padding == [1, 1, 1, 1, 1, 1, 1, 1, 0]
    ids, types, padding = build_pair_input([10, 11], [20, 21, 22, 23, 24], 8, cls, sep, pad)
    assert ids == [2, 10, 11, 3, 20, 21, 22, 3]  # B's tail is cut, a [SEP] closes the sequence
    assert types == [0, 0, 0, 0, 1, 1, 1, 1] and padding == [1] * 8
    ids, types, _ = build_pair_input([10, 11], None, 5, cls, sep, pad)
    assert ids == [2, 10, 11, 3, 0] and types == [0, 0, 0, 0, 0]


def test_shard_range_covers_everything_once():
    for n in (0, 1, 7, 8):
        for size in (1, 2, 3, 4):
            shares = [list(shard_range(n, r, size)) for r in range(size)]
            assert sum(shares, []) == list(range(n))


def test_question_with_option():
    assert question_with_option("The cat is _ .", "red") == "The cat is red ."
    assert question_with_option("What is the cat?", "red") == "What is the cat? red"


def test_race_sample_by_hand(files, tmp_path):
    tok = _tokenizer(files)
    record = {"article": "the cat\nsat .", "questions": ["who _ ?"], "options": [["a", "dog", "cat", "the"]],
              "answers": ["C"]}  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(record))
    data = RaceDataset(str(tmp_path), tok, seq_length=12)
    assert len(data) == 1
    sample = data[0]
    assert sample["text"].shape == (4, 12) and int(sample["label"]) == 2
    v = tok.vocab
    expected = [v["[CLS]"], v["who"], v["cat"], v["?"], v["[SEP]"], v["the"], v["cat"], v["sat"], v["."],
                v["[SEP]"], v["[PAD]"], v["[PAD]"]]  # fmt: skip
    assert sample["text"][2].tolist() == expected  # choice C fills the blank
    assert sample["types"][2].tolist() == [0] * 5 + [1] * 5 + [0] * 2
    assert sample["padding_mask"][2].tolist() == [1] * 10 + [0] * 2


def test_race_files_are_found_in_subdirectories(tmp_path):
    for name in ("train/high/2.txt", "train/high/10.txt", "train/middle/1.json", "train/notes.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    high, middle = tmp_path / "train" / "high", tmp_path / "train" / "middle"
    expected = [str(high / "10.txt"), str(high / "2.txt"), str(middle / "1.json")]
    assert race_files(str(tmp_path / "train")) == expected
    assert race_files(str(high / "2.txt")) == [str(high / "2.txt")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskError, match="no .txt or .json passage files"):
        race_files(str(tmp_path / "empty"))


def test_glue_readers(files):
    rows, skipped = read_glue_tsv(str(files["tmp"] / "mnli_dev.tsv"), MNLI)
    assert len(rows) == 21 and skipped == 0
    keyword = rows[0][1].split()[-2]
    assert rows[0][2] == {"contradiction": 0, "entailment": 1, "neutral": 2}[MNLI_LABELS[keyword]]
    rows, skipped = read_glue_tsv(str(files["tmp"] / "qqp.tsv"), QQP)
    assert len(rows) == 20 and skipped == 1 and [r[2] for r in rows[:4]] == [0, 1, 0, 1]
    data = GlueDataset(str(files["tmp"] / "qqp.tsv"), QQP, _tokenizer(files), seq_length=16)
    assert data[0]["text"].shape == (16,) and int(data[1]["label"]) == 1


# --- malformed files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, message",
    [
        (["a\tb"], ":1: no 'sentence1' column in the header"),
        ([MNLI_HEADER, _mnli_row(0, "a b", "c d", "neutral"), "0\t1\t2"], ":3: 3 tab-separated fields"),
        (
            [MNLI_HEADER, _mnli_row(0, "a b", "c d", "neutral"), _mnli_row(1, "a", "b", "nope")],
            ":3: gold_label 'nope'",
        ),
        ([MNLI_HEADER, _mnli_row(0, "a b", "", "neutral")], ":2: empty sentence2"),
    ],
)
def test_malformed_glue_file_names_line(tmp_path, lines, message):
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError, match=re.escape(f"{path}{message}")):
        read_glue_tsv(str(path), MNLI)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"article": "x", ', "malformed JSON"),
        (json.dumps({"article": "x", "questions": ["q"], "options": [["a", "b"]], "answers": ["A"]}),
         "question 0 needs a list of 4 options"),
        (json.dumps({"article": "x", "questions": ["q"], "options": [["a", "b", "c", "d"]], "answers": ["E"]}),
         "question 0 has answer 'E'"),
        (json.dumps({"article": "x", "questions": ["q", "r"], "options": [], "answers": []}), "differ in length"),
        (json.dumps({"questions": []}), '"article" is missing'),
    ],
)  # fmt: skip
def test_malformed_race_file_names_file(tmp_path, content, message):
    path = tmp_path / "3.txt"
    path.write_text(content)
    with pytest.raises(TaskError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        read_passage(str(path))


def test_malformed_file_is_a_clean_cli_error(files, tmp_path, capsys):
    bad = tmp_path / "dev.tsv"
    bad.write_text(MNLI_HEADER + "\n" + _mnli_row(0, "a", "b", "unsure") + "\n")
    with pytest.raises(SystemExit) as info:
        tasks_main.main(["--task", "MNLI", "--epochs", "0", "--valid-data", str(bad), "--pretrained-checkpoint",
                         str(files["bert"]), *MODEL, *files["tok"], "--micro-batch-size", "4"])  # fmt: skip
    assert info.value.code == 1
    assert f"error: {bad}:2: gold_label 'unsure' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        tasks_main.main(["--task", "RACE", "--train-data", str(tmp_path), "--lr", "1e-3", *MODEL, *files["tok"],
                         "--micro-batch-size", "4"])  # fmt: skip
    assert info.value.code == 2 and "--task RACE needs --epochs N" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        tasks_main.main(
            _finetune_argv(files, "MNLI", "mnli_train.tsv", "mnli_dev.tsv", 1, "--train-iters", "3")
        )
    assert info.value.code == 2 and "--train-iters/--train-samples do not apply" in capsys.readouterr().err


# --- accuracy and pretrained weights ---------------------------------------------------------------------


class FixedClassifier(nn.Module):
    """Logits looked up by the sample's first text token: a classifier whose every answer is known."""

    def __init__(self, table: dict[int, list[float]]) -> None:
        super().__init__()
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, text, padding_mask, types):
        return torch.tensor([self.table[int(t)] for t in text[:, 0]])


def test_accuracy_matches_a_hand_count():
    table = {0: [2.0, 1.0, 0.0], 1: [0.0, 3.0, 1.0], 2: [0.0, 1.0, 5.0]}  # predicts 0, 1, 2
    labels = [0, 1, 1, 2, 0]  # first tokens 0, 1, 2, 2, 1: right, right, wrong, right, wrong
    first = [0, 1, 2, 2, 1]
    dataset = [
        {"text": torch.tensor([f, 9]), "padding_mask": torch.ones(2, dtype=torch.long),
         "types": torch.zeros(2, dtype=torch.long), "label": torch.tensor(y)}
        for f, y in zip(first, labels)
    ]  # fmt: skip
    args = argparse.Namespace(eval_micro_batch_size=2)
    assert evaluate_accuracy(FixedClassifier(table), dataset, args, single_process_state()) == (3, 5)


def _config() -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, padded_vocab_size=128,
                             max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip


def test_load_pretrained_takes_the_encoder_and_keeps_the_head(files, capsys):
    model = MultipleChoice(_config(), single_process_state())
    head_before = model.multichoice_head.weight.clone()
    load_pretrained(model, str(files["bert"]), single_process_state())
    assert (
        "multichoice_head.weight, multichoice_head.bias not in the pretrained checkpoint"
        in capsys.readouterr().out
    )
    state = torch.load(
        files["bert"] / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False
    )
    saved = from_megatron_state_dict(state["model"])
    for name, tensor in model.state_dict().items():
        if name.startswith("language_model."):
            assert torch.equal(tensor, saved[name]), name
    assert torch.equal(model.multichoice_head.weight, head_before)


def test_load_pretrained_refuses_a_checkpoint_without_the_encoder(files, tmp_path):
    bigger = Classification(
        TransformerConfig(**{**_config().__dict__, "num_layers": 3}), single_process_state(), 3
    )
    with pytest.raises(CheckpointError, match=r"lacks encoder weights \['language_model.encoder.layers.2"):
        load_pretrained(bigger, str(files["bert"]), single_process_state())
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        load_pretrained(bigger, str(tmp_path), single_process_state())


# --- fine-tuning end to end ------------------------------------------------------------------------------


def _finetune_argv(
    files, task: str, train: str, valid: str, epochs: int, *extra: str, pretrained: str = "bert"
) -> list[str]:
    tmp = files["tmp"]
    return ["--task", task, "--train-data", str(tmp / train), "--valid-data", str(tmp / valid), "--epochs",
            str(epochs), "--pretrained-checkpoint", str(tmp / pretrained), *MODEL, *files["tok"], "--micro-batch-size",
            "4", "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-fraction", "0.1", "--log-interval", "6",
            *extra]  # fmt: skip


def _accuracy_lines(out: str) -> list[tuple[int, int]]:
    return [
        (int(c), int(t))
        for c, t in re.findall(r">> \|epoch: \d+\| overall: correct / total = (\d+) / (\d+)", out)
    ]


def _hand_count(model: nn.Module, dataset) -> int:
    correct = 0
    model.eval()
    with torch.no_grad():
        for i in range(len(dataset)):
            s = dataset[i]
            logits = model(s["text"][None], s["padding_mask"][None], s["types"][None])
            correct += int(int(logits.argmax()) == int(s["label"]))
    return correct


def test_mnli_loss_falls_and_accuracy_matches_a_hand_count(files, capsys):
    tmp, save = files["tmp"], files["tmp"] / "mnli_ckpt"
    # A second dev file with every third label changed: the printed count must match a partial hand count.
    lines = (tmp / "mnli_dev.tsv").read_text().splitlines()
    for i in range(1, len(lines), 3):
        fields = lines[i].split("\t")
        fields[-1] = {"entailment": "neutral", "neutral": "contradiction", "contradiction": "entailment"}[
            fields[-1]
        ]
        lines[i] = "\t".join(fields)
    (tmp / "mnli_noisy.tsv").write_text("\n".join(lines) + "\n")
    argv = _finetune_argv(
        files, "MNLI", "mnli_train.tsv", "mnli_dev.tsv", 12, "--lr", "5e-3", "--save", str(save)
    )
    argv.insert(argv.index("--epochs"), str(tmp / "mnli_noisy.tsv"))
    summary = tasks_main.main(argv)
    out = capsys.readouterr().out
    losses = [step["lm loss"] for step in summary["losses"]]
    assert len(losses) == 12 * 6  # 48 samples / 8 per iteration, 12 epochs
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert first > 1.0 and last < first - 0.5, (first, last)
    assert len(_accuracy_lines(out)) == 12
    printed = {
        name: (int(c), int(t))
        for name, c, t in re.findall(
            r"> \|epoch: 12\| metrics for (\S+): correct / total = (\d+) / (\d+)", out
        )
    }
    assert printed == summary["accuracy"][-1]
    assert _accuracy_lines(out)[-1] == tuple(map(sum, zip(*printed.values())))

    # Recount by hand with the saved weights, and evaluate the saved checkpoint with --epochs 0.
    model = Classification(_config(), single_process_state(), num_classes=3)
    state = torch.load(save / "iter_0000072" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    model.load_state_dict(from_megatron_state_dict(state["model"]))
    for name in ("mnli_dev.tsv", "mnli_noisy.tsv"):
        dev = GlueDataset(str(tmp / name), MNLI, _tokenizer(files), seq_length=32)
        assert printed[str(tmp / name)] == (_hand_count(model, dev), 21)
    assert printed[str(tmp / "mnli_dev.tsv")][0] >= 18  # the keyword task is learnt (chance: 7)
    assert 7 <= printed[str(tmp / "mnli_noisy.tsv")][0] <= 16
    tasks_main.main(["--task", "MNLI", "--epochs", "0", "--valid-data", str(tmp / "mnli_noisy.tsv"),
                     "--load", str(save), *MODEL, *files["tok"], "--micro-batch-size", "4"])  # fmt: skip
    assert _accuracy_lines(capsys.readouterr().out) == [printed[str(tmp / "mnli_noisy.tsv")]]


def test_race_loss_falls(files, capsys):
    summary = tasks_main.main(_finetune_argv(files, "RACE", "race_train", "race_dev", 12, "--lr", "5e-3"))
    out = capsys.readouterr().out
    losses = [step["lm loss"] for step in summary["losses"]]
    assert len(losses) == 12 * 2  # 16 questions / 8 per iteration, 12 epochs
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    accuracies = _accuracy_lines(out)
    assert len(accuracies) == 12 and all(total == 6 and 0 <= c <= 6 for c, total in accuracies)
    assert accuracies[-1][0] >= 5  # the option "right" is learnt (chance: 1.5)
    assert "> RACE: 16 training samples, 2 iterations per epoch of 8, 12 epochs" in out


def test_qqp_runs(files, capsys):
    summary = tasks_main.main(
        _finetune_argv(files, "QQP", "qqp.tsv", "qqp.tsv", 1, "--global-batch-size", "4")
    )
    assert len(summary["losses"]) == 5
    assert _accuracy_lines(capsys.readouterr().out)[0][1] == 20


def _mnli_at(rank: int, world_size: int, files: dict, tp: int) -> tuple[list[float], dict]:
    pretrained = "bert_tp2" if tp == 2 else "bert"
    flags = ["--tensor-model-parallel-size", str(tp)]
    argv = _finetune_argv(files, "MNLI", "mnli_train.tsv", "mnli_dev.tsv", 2, *flags, pretrained=pretrained)
    summary = tasks_main.main(argv)
    return [step["lm loss"] for step in summary["losses"]], summary["accuracy"]


def test_tensor_and_data_parallel_fine_tuning_match_one_process(files):
    reference_losses, reference_accuracy = _mnli_at(0, 1, files, 1)
    for world_size, tp in [(2, 1), (4, 2)]:
        for losses, accuracy in run_distributed(_mnli_at, world_size, args=(files, tp)):
            assert losses == pytest.approx(reference_losses, rel=1e-4), (world_size, tp)
            assert accuracy == reference_accuracy, (world_size, tp)
