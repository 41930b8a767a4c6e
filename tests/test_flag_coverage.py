"""Every flag the parser accepts either changes behaviour that a named test exercises, or is on a
documented list of flags that only choose an implementation (megatron/arguments/compat.py), are refused with
the reason, or are set by the launcher. A flag that is on no list fails this test, with the place to
register it; so does a registry entry whose test or flag no longer exists.

To register a new flag: add `"--my-flag": "tests/test_x.py::test_that_exercises_it"` to FLAG_TESTS below
(the test must exist and its file must mention the flag or its attribute name); or, if the flag has no
effect on results in this project, add it with the reason to NO_EFFECT / NO_EFFECT_VALUE in
megatron/arguments/compat.py; or, if it cannot be honoured, to UNSUPPORTED there (it is then refused).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from megatron.arguments import build_parser
from megatron.arguments import compat as compat_args
from tasks.main import add_task_args

ROOT = Path(__file__).resolve().parents[1]
HERE = "tests/test_flag_coverage.py"

# Set by the launcher, not by the user: the local rank is read from LOCAL_RANK (torchrun and
# torch.distributed.launch set it) or SLURM_LOCALID; the flag is accepted because the launcher passes it.
LAUNCHER_FLAGS = {"--local-rank": "megatron/arguments/ launcher_ranks() reads LOCAL_RANK / SLURM_LOCALID"}

# flag -> "tests/<file>.py::<test function>" that exercises what the flag changes.
FLAG_TESTS = {
    "--num-layers": "tests/test_training.py::test_checkpoint_of_another_shape_is_named_in_flags",
    "--use-distributed-optimizer": "tests/test_distrib_optim.py::test_dp2_matches_plain_optimizer_with_dropout",
    "--overlap-param-gather": "tests/test_distrib_optim.py::test_dp2_matches_plain_optimizer_with_dropout",
    "--sequence-parallel": "tests/test_sequence_parallel.py::test_tp2_sequence_parallel_matches_tensor_parallel",
    "--hidden-size": "tests/test_training.py::test_checkpoint_of_another_shape_is_named_in_flags",
    "--ffn-hidden-size": "tests/test_training.py::test_checkpoint_of_another_shape_is_named_in_flags",
    "--num-attention-heads": "tests/test_checkpoint_tools_hf.py::test_gpt_export_gives_our_logits_and_imports_back_bitwise",
    "--kv-channels": "tests/test_arguments.py::test_valid_args_derive_defaults",
    "--seq-length": "tests/test_training.py::test_bert_trains_on_sentence_split_real_text",
    "--max-position-embeddings": "tests/test_training_flags.py::test_num_zeros_and_params_norm_in_the_log_line",
    "--position-embedding-type": "tests/test_checkpoint_tools_hf.py::test_export_errors_leave_no_output",
    "--use-rotary-position-embeddings": "tests/test_llama_args.py::test_defaults_are_gpt2_and_old_rotary_alias",
    "--rotary-base": "tests/test_llama_hf.py::test_import_gives_hf_logits_and_export_round_trips_bitwise",
    "--rotary-percent": "tests/test_llama_parallel.py::test_llama_tp2_equals_single_process_and_generates_like_tp1",
    "--normalization": "tests/test_llama_hf.py::test_import_gives_hf_logits_and_export_round_trips_bitwise",
    "--norm-epsilon": "tests/test_llama_args.py::test_llama_flags_reach_the_model_config",
    "--swiglu": "tests/test_llama_training.py::test_llama_tp2_and_tp2_dp2_reproduce_single_process",
    "--group-query-attention": "tests/test_llama_training.py::test_llama_tp2_and_tp2_dp2_reproduce_single_process",
    "--num-query-groups": "tests/test_llama_training.py::test_llama_tp2_and_tp2_dp2_reproduce_single_process",
    "--untie-embeddings-and-output-weights": "tests/test_llama_training.py::test_llama_tp2_and_tp2_dp2_reproduce_single_process",
    "--disable-bias-linear": "tests/test_llama_training.py::test_llama_tp2_and_tp2_dp2_reproduce_single_process",
    "--embedding-layernorm": "tests/test_checkpointing.py::test_nested_layout_of_bert_keys_and_round_trip",
    "--make-vocab-size-divisible-by": "tests/test_checkpoint_tools.py::test_vocab_is_repadded_when_the_multiple_changes",
    "--layernorm-epsilon": "tests/test_model_hf_reference.py::test_gpt_matches_hf_gpt2",
    "--apply-residual-connection-post-layernorm": "tests/test_model_hf_reference.py::test_bert_post_layernorm_order_matches_hf_bert",
    "--openai-gelu": "tests/test_training.py::test_checkpoint_of_another_shape_is_named_in_flags",
    "--no-bias-gelu-fusion": "tests/test_hf_megatron_converters.py::test_hf_bert_converter_reads_our_checkpoint",
    "--fp32-residual-connection": "tests/test_model_behaviour.py::test_fp32_residual_connection_with_bf16_parameters",
    "--bert-no-binary-head": "tests/test_checkpoint_tools_hf.py::test_bert_export_gives_our_mlm_and_nsp_logits",
    "--attention-dropout": "tests/test_model_behaviour.py::test_recompute_gives_the_same_gradients_with_dropout_and_saves_less",
    "--hidden-dropout": "tests/test_model_behaviour.py::test_recompute_gives_the_same_gradients_with_dropout_and_saves_less",
    "--weight-decay": "tests/test_optimizer.py::test_fp32_adam_matches_torch_adamw",
    "--start-weight-decay": "tests/test_training_flags.py::test_learning_rate_and_weight_decay_flags_reach_the_scheduler",
    "--end-weight-decay": "tests/test_training_flags.py::test_learning_rate_and_weight_decay_flags_reach_the_scheduler",
    "--weight-decay-incr-style": "tests/test_training_flags.py::test_learning_rate_and_weight_decay_flags_reach_the_scheduler",
    "--clip-grad": "tests/test_training.py::test_persistent_nan_stops_with_clear_message",
    "--adam-beta1": "tests/test_optimizer.py::test_fp32_adam_matches_torch_adamw",
    "--adam-beta2": "tests/test_optimizer.py::test_fp32_adam_matches_torch_adamw",
    "--adam-eps": "tests/test_optimizer.py::test_fp32_adam_matches_torch_adamw",
    "--sgd-momentum": "tests/test_optimizer.py::test_sgd_matches_torch_sgd_with_l2_weight_decay",
    "--micro-batch-size": "tests/test_training.py::test_resume_is_bitwise_exact_with_dropout",
    "--global-batch-size": "tests/test_training.py::test_gpt_loss_falls_on_real_text",
    "--rampup-batch-size": "tests/test_training.py::test_batch_size_rampup_with_train_samples",
    "--recompute-activations": "tests/test_training_flags.py::test_recompute_activations_is_selective_recompute",
    "--recompute-granularity": "tests/test_arguments.py::test_old_megatron_spellings_are_taken_as_current_flags",
    "--train-iters": "tests/test_training.py::test_relaunch_of_finished_run_exits_cleanly_and_rewrites_nothing",
    "--train-samples": "tests/test_training.py::test_relaunch_of_finished_run_exits_cleanly_and_rewrites_nothing",
    "--log-interval": "tests/test_training_flags.py::test_timers_and_memory_are_written_to_tensorboard",
    "--exit-interval": "tests/test_training.py::test_resume_is_bitwise_exact_with_dropout",
    "--exit-duration-in-mins": "tests/test_training.py::test_exit_duration_saves_and_stops",
    "--max-nan-iterations": "tests/test_training.py::test_persistent_nan_stops_with_clear_message",
    "--optimizer": "tests/test_optimizer.py::test_requires_ddp_and_matching_precision_flags",
    "--dataloader-type": "tests/test_data_samplers.py::test_data_loader_batches",
    "--num-workers": "tests/test_training_flags.py::test_data_loader_workers_give_the_same_batches",
    "--seed": "tests/test_model_behaviour.py::test_recompute_gives_the_same_gradients_with_dropout_and_saves_less",
    "--init-method-std": "tests/test_model_behaviour.py::test_initialisation",
    "--lr": "tests/test_training.py::test_gpt_loss_falls_on_real_text",
    "--lr-decay-style": "tests/test_lr_scheduler.py::test_lr_values_at_known_steps",
    "--lr-decay-iters": "tests/test_training_flags.py::test_learning_rate_and_weight_decay_flags_reach_the_scheduler",
    "--lr-decay-samples": "tests/test_training_flags.py::test_learning_rate_and_weight_decay_flags_reach_the_scheduler",
    "--lr-warmup-fraction": "tests/test_arguments.py::test_old_megatron_spellings_are_taken_as_current_flags",
    "--lr-warmup-iters": "tests/test_training.py::test_batch_size_rampup_with_train_samples",
    "--lr-warmup-samples": "tests/test_training.py::test_batch_size_rampup_with_train_samples",
    "--lr-warmup-init": "tests/test_training_flags.py::test_learning_rate_and_weight_decay_flags_reach_the_scheduler",
    "--min-lr": "tests/test_training.py::test_persistent_nan_stops_with_clear_message",
    "--override-opt-param-scheduler": "tests/test_training.py::test_persistent_nan_stops_with_clear_message",
    "--use-checkpoint-opt-param-scheduler": "tests/test_training_flags.py::test_old_checkpoint_lr_scheduler_flag_reaches_the_scheduler",
    "--save": "tests/test_training_flags.py::test_no_save_optim_and_rng_leave_the_keys_out_and_loading_asks_for_the_flags",
    "--save-interval": "tests/test_training.py::test_resume_is_bitwise_exact_with_dropout",
    "--no-save-optim": "tests/test_training_flags.py::test_no_save_optim_and_rng_leave_the_keys_out_and_loading_asks_for_the_flags",
    "--no-save-rng": "tests/test_training_flags.py::test_no_save_optim_and_rng_leave_the_keys_out_and_loading_asks_for_the_flags",
    "--load": "tests/test_training_flags.py::test_no_save_optim_and_rng_leave_the_keys_out_and_loading_asks_for_the_flags",
    "--no-load-optim": "tests/test_training_flags.py::test_no_save_optim_and_rng_leave_the_keys_out_and_loading_asks_for_the_flags",
    "--no-load-rng": "tests/test_training_flags.py::test_no_save_optim_and_rng_leave_the_keys_out_and_loading_asks_for_the_flags",
    "--finetune": "tests/test_checkpointing.py::test_finetune_and_no_load_flags",
    "--use-checkpoint-args": "tests/test_checkpoint_tools_hf.py::test_imported_gpt2_trains_with_checkpoint_args",
    "--fp16": "tests/test_training_flags.py::test_static_and_minimum_loss_scale",
    "--bf16": "tests/test_training.py::test_bf16_trains",
    "--loss-scale": "tests/test_training_flags.py::test_static_and_minimum_loss_scale",
    "--initial-loss-scale": "tests/test_training_flags.py::test_static_and_minimum_loss_scale",
    "--min-loss-scale": "tests/test_training_flags.py::test_static_and_minimum_loss_scale",
    "--loss-scale-window": "tests/test_optimizer.py::test_fp16_overflow_skips_step_and_halves_scale_with_hysteresis",
    "--hysteresis": "tests/test_training_flags.py::test_static_and_minimum_loss_scale",
    "--tensor-model-parallel-size": "tests/test_training.py::test_tp_mismatch_is_a_clear_error",
    "--pipeline-model-parallel-size": "tests/test_pipeline_training.py::test_gpt_pp2_tp2_pp2_pp2_dp2_equal_single_process",
    "--virtual-pipeline-model-parallel-size": "tests/test_pipeline_training.py::test_gpt_virtual_and_uneven_stages_equal_single_process",
    "--num-layers-per-virtual-pipeline-stage": "tests/test_arguments.py::test_pipeline_flags_derive_the_virtual_size",
    "--decoder-first-pipeline-num-layers": "tests/test_pipeline_training.py::test_gpt_virtual_and_uneven_stages_equal_single_process",
    "--decoder-last-pipeline-num-layers": "tests/test_pipeline_training.py::test_gpt_virtual_and_uneven_stages_equal_single_process",
    "--distributed-backend": "tests/test_arguments.py::test_nccl_without_gpu_is_named",
    "--distributed-timeout-minutes": "tests/test_training_flags.py::test_distributed_timeout_reaches_the_process_group",
    "--no-overlap-grad-reduce": "tests/test_distributed_ddp.py::test_dp_averaged_grads_equal_full_batch_grads",
    "--ddp-bucket-size": "tests/test_training_flags.py::test_ddp_bucket_size_sets_the_buckets",
    "--eval-iters": "tests/test_checkpoint_tools_hf.py::test_imported_gpt2_trains_with_checkpoint_args",
    "--eval-interval": "tests/test_training.py::test_training_leaves_args_unchanged_and_checkpoints_megatron_keys",
    "--skip-train": "tests/test_training.py::test_relaunch_of_finished_run_evaluates_when_asked",
    "--data-path": "tests/test_training.py::test_gpt_loss_falls_on_real_text",
    "--split": "tests/test_training.py::test_gpt_loss_falls_on_real_text",
    "--data-cache-path": "tests/test_training.py::test_gpt_loss_falls_on_real_text",
    "--mock-data": "tests/test_training.py::test_resume_is_bitwise_exact_with_dropout",
    "--tokenizer-type": "tests/test_training.py::test_bert_trains_on_sentence_split_real_text",
    "--vocab-file": "tests/test_training.py::test_bert_trains_on_sentence_split_real_text",
    "--merge-file": "tests/test_checkpoint_tools_hf.py::test_gpt2_tokenizer_files_are_exported",
    "--tokenizer-model": "tests/test_tokenizer.py::test_build_tokenizer_dispatches_on_type",
    "--vocab-size": "tests/test_training.py::test_checkpoint_of_another_shape_is_named_in_flags",
    "--vocab-extra-ids": "tests/test_tokenizer.py::test_bert_special_ids_and_megatron_added_tokens",
    "--mask-prob": "tests/test_training_flags.py::test_bert_masking_flags_reach_the_dataset",
    "--short-seq-prob": "tests/test_training_flags.py::test_bert_masking_flags_reach_the_dataset",
    "--reset-position-ids": "tests/test_training_flags.py::test_document_flags_shape_the_gpt_batch",
    "--reset-attention-mask": "tests/test_training_flags.py::test_document_flags_shape_the_gpt_batch",
    "--eod-mask-loss": "tests/test_training_flags.py::test_document_flags_shape_the_gpt_batch",
    "--tensorboard-dir": "tests/test_training_flags.py::test_timers_and_memory_are_written_to_tensorboard",
    "--tensorboard-log-interval": "tests/test_training_flags.py::test_tensorboard_log_interval",
    "--wandb-project": "tests/test_training_flags.py::test_wandb_project_and_name_reach_wandb",
    "--wandb-exp-name": "tests/test_training_flags.py::test_wandb_project_and_name_reach_wandb",
    "--log-timers-to-tensorboard": "tests/test_training_flags.py::test_timers_and_memory_are_written_to_tensorboard",
    "--log-memory-to-tensorboard": "tests/test_training_flags.py::test_timers_and_memory_are_written_to_tensorboard",
    "--log-num-zeros-in-grad": "tests/test_training_flags.py::test_num_zeros_and_params_norm_in_the_log_line",
    "--log-params-norm": "tests/test_training_flags.py::test_num_zeros_and_params_norm_in_the_log_line",
    "--batch-size": "tests/test_arguments.py::test_old_megatron_spellings_are_taken_as_current_flags",
    "--model-parallel-size": "tests/test_arguments.py::test_old_megatron_spellings_are_taken_as_current_flags",
    "--warmup": "tests/test_arguments.py::test_old_megatron_spellings_are_taken_as_current_flags",
    "--override-lr-scheduler": "tests/test_arguments.py::test_old_megatron_spellings_are_taken_as_current_flags",
    "--use-checkpoint-lr-scheduler": "tests/test_training_flags.py::test_old_checkpoint_lr_scheduler_flag_reaches_the_scheduler",
    "--checkpoint-activations": "tests/test_arguments.py::test_megatron_launch_script_flags_are_accepted",
    "--activations-checkpoint-method": "tests/test_arguments.py::test_old_megatron_spellings_are_taken_as_current_flags",
    "--task": "tests/test_tasks_finetune.py::test_malformed_file_is_a_clean_cli_error",
    "--epochs": "tests/test_tasks_finetune.py::test_malformed_file_is_a_clean_cli_error",
    "--pretrained-checkpoint": "tests/test_tasks_finetune.py::test_malformed_file_is_a_clean_cli_error",
    "--train-data": "tests/test_tasks_finetune.py::test_malformed_file_is_a_clean_cli_error",
    "--valid-data": "tests/test_tasks_finetune.py::test_malformed_file_is_a_clean_cli_error",
    "--overlapping-eval": "tests/test_tasks_zeroshot.py::test_wikitext103_end_to_end",
    "--strict-lambada": "tests/test_tasks_zeroshot.py::test_lambada_end_to_end",
    "--eval-micro-batch-size": "tests/test_tasks_zeroshot.py::test_lambada_end_to_end",
}


def _accepted_flags() -> dict[str, str]:
    """Every flag of the pretraining and task parsers (first spelling) -> its attribute name."""
    parser = build_parser(add_task_args)
    return {a.option_strings[0]: a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


def _documented() -> set[str]:
    return set(compat_args.NO_EFFECT) | set(compat_args.NO_EFFECT_VALUE) | set(compat_args.UNSUPPORTED)


def test_every_accepted_flag_is_covered_by_a_test_or_documented():
    flags = _accepted_flags()
    missing = sorted(
        f for f in flags if f not in FLAG_TESTS and f not in _documented() and f not in LAUNCHER_FLAGS
    )
    assert not missing, (
        f"flags accepted by the parser but neither exercised by a registered test nor documented: {missing}. "
        f"Register each in FLAG_TESTS in {HERE} (flag -> 'tests/test_x.py::test_name' of a test that exercises "
        "it), or, for a flag with no effect on results, add it with the reason to NO_EFFECT / NO_EFFECT_VALUE "
        "in megatron/arguments/compat.py (UNSUPPORTED there if it must be refused)."
    )


def test_registered_tests_exist_and_mention_their_flag():
    flags = _accepted_flags()
    problems = []
    for flag, target in FLAG_TESTS.items():
        if flag not in flags:
            problems.append(f"{flag}: no longer accepted by the parser; remove it from FLAG_TESTS")
            continue
        path, _, name = target.partition("::")
        file = ROOT / path
        if not file.is_file():
            problems.append(f"{flag}: {path} does not exist")
            continue
        source = file.read_text(encoding="utf-8")
        functions = {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
        if name not in functions:
            problems.append(f"{flag}: {path} has no test function {name}")
        elif not re.search(re.escape(flag) + r"(?![\w-])|\b" + re.escape(flags[flag]) + r"\b", source):
            problems.append(f"{flag}: {path} mentions neither {flag} nor {flags[flag]}")
    assert not problems, f"stale or wrong entries in FLAG_TESTS ({HERE}):\n" + "\n".join(problems)


def test_documented_flags_are_not_also_registered():
    both = sorted(set(FLAG_TESTS) & (_documented() | set(LAUNCHER_FLAGS)))
    assert not both, f"{both} are both documented as no-effect/refused and registered in FLAG_TESTS ({HERE})"
