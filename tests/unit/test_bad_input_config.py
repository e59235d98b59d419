"""Bad config, model and output input (issue 20 §4): every case is exit status 2 and one line ``error: ...`` naming
the culprit, printed before any model is loaded (the one ``at_load`` case is a file only loading can judge).

The cases run through the recipe entry point (:func:`align.recipe.main`) in-process, on the testbed configs. The
table ``Bad input, case by case: config, models, outputs`` in docs/errors.md lists the same case ids (a test below
keeps the two equal).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from align.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"dpo": "configs/dpo/testbed.yaml", "grpo": "configs/grpo/testbed.yaml", "raft": "configs/raft/testbed.yaml",
           "online_dpo": "configs/online_dpo/testbed.yaml", "xpo": "configs/xpo/testbed.yaml",
           "egpo": "configs/egpo/testbed.yaml", "iterative_dpo": "configs/iterative/testbed-apo.yaml",
           "sft": "configs/sft/testbed.yaml"}
DOCS_SECTION = "## Bad input, case by case: config, models, outputs"


@dataclass(frozen=True)
class Case:
    id: str
    recipe: str
    args: tuple[str, ...]
    expect: str  # the line after "error: " contains this; it names the key, file or option
    at_load: bool = False  # only loading the weights can tell (the check then is: one line naming the file)
    world: int = 1  # the processes the launcher announces (what align's checks read as WORLD_SIZE)


def case(id_, recipe, args, expect, at_load=False, world=1):
    return Case(id_, recipe, tuple(args.split()) if isinstance(args, str) else tuple(args), expect, at_load, world)


FEW = "max_train_samples=16"  # cases that reach the data: keep it small

CASES = [
    # --- config files and overrides ---
    case("yaml-duplicate-key", "dpo", "--config={yaml:dup}", "c.yaml': key 'beta' appears twice (lines 11 and 22); "
                                                              "keep one"),
    case("yaml-duplicate-nested-key", "dpo", "--config={yaml:dup_nested}", "c.yaml': key 'gamma' appears twice"),
    case("yaml-not-utf8", "grpo", "--config={yaml:latin1}", "c.yaml' is not UTF-8 text (byte 0xe9 on line 29); save "
                                                             "it as UTF-8"),
    case("yaml-syntax", "sft", "--config={yaml:syntax}", "c.yaml' is not valid YAML"),
    case("yaml-not-mapping", "raft", "--config={yaml:list}", "c.yaml' must hold a mapping of key: value, got list"),
    case("yaml-missing", "online_dpo", "--config=/no/such/config.yaml", "--config: file '/no/such/config.yaml' does "
                                                                        "not exist"),
    case("shipped-config-unknown", "xpo", "--config=testbedd", "--config: no file or shipped config 'testbedd'"),
    case("override-broken-list", "dpo", "testbed_tasks=[add1,", "testbed_tasks: expected list[str], got '[add1,' "
                                                                "(from command line)"),
    case("override-broken-list-rewards", "grpo", "reward_funcs=[accuracy,", "reward_funcs: expected list[str]"),
    case("override-broken-dict", "dpo", "objective_kwargs={gamma:", "objective_kwargs: expected dict"),
    case("override-not-key-value", "sft", "oops", "override 'oops' is not of the form key=value"),
    case("override-empty-key", "sft", "=1", "override '=1' has an empty key"),
    case("unknown-key", "grpo", "learning_rat=1e-3", "unknown config key 'learning_rat' in command line (did you "
                                                     "mean 'learning_rate'?)"),
    case("renamed-key", "iterative_dpo", "max_new_tokens=8", "max_new_tokens: renamed to max_completion_length"),
    case("wrong-type-float", "xpo", "learning_rate=fast", "learning_rate: expected float, got 'fast'"),
    case("wrong-type-int", "raft", "max_steps=2.5", "max_steps: expected int, got '2.5'"),
    case("wrong-type-bool", "dpo", "use_peft=maybe", "use_peft: expected bool, got 'maybe'"),
    # --- the trainer's numbers ---
    case("lr-negative", "dpo", "learning_rate=-1e-5", "learning_rate: must be a finite number > 0 (0 would never "
                                                      "change the weights), got -1e-05"),
    case("lr-zero", "grpo", "learning_rate=0", "learning_rate: must be a finite number > 0"),
    case("lr-nan", "sft", "learning_rate=nan", "learning_rate: must be a number, got 'nan' (from command line)"),
    case("lr-inf", "online_dpo", "learning_rate=inf", "learning_rate: must be a finite number > 0"),
    case("lr-zero-iterative", "iterative_dpo", "learning_rate=0", "learning_rate: must be a finite number > 0"),
    case("max-grad-norm-negative", "dpo", "max_grad_norm=-1", "max_grad_norm: must be >= 0 (0 or null: no "
                                                              "clipping), got -1.0"),
    case("max-grad-norm-nan", "egpo", "max_grad_norm=nan", "max_grad_norm: must be a number, got 'nan'"),
    case("warmup-negative", "sft", "warmup_steps=-1", "warmup_steps: must be >= 0 (below 1: a fraction of the "
                                                      "training steps), got -1"),
    case("weight-decay-negative", "raft", "weight_decay=-0.1", "weight_decay: must be a finite number >= 0"),
    case("adam-beta1-one", "dpo", "adam_beta1=1", "adam_beta1: must be in [0, 1), got 1.0"),
    case("adam-beta2-negative", "grpo", "adam_beta2=-0.1", "adam_beta2: must be in [0, 1), got -0.1"),
    case("adam-epsilon-zero", "online_dpo", "adam_epsilon=0", "adam_epsilon: must be a finite number > 0"),
    case("epochs-inf", "sft", "max_steps=-1 num_train_epochs=inf", "num_train_epochs: must be a finite number >= 0"),
    case("max-steps-negative", "dpo", "max_steps=-5", "max_steps: must be >= -1 (-1: train num_train_epochs "
                                                      "instead), got -5"),
    case("steps-and-epochs-zero", "iterative_dpo", "max_steps=0 num_train_epochs=0", "max_steps / num_train_epochs: "
                                                                                      "one of them must be > 0"),
    case("seed-negative", "grpo", "seed=-1", "seed: must be in [0, 2**32), got -1"),
    case("seed-too-big", "dpo", "seed=4294967296", "seed: must be in [0, 2**32), got 4294967296"),
    case("data-seed-negative", "sft", "data_seed=-3", "data_seed: must be in [0, 2**32) or null, got -3"),
    case("logging-steps-zero", "dpo", "logging_steps=0", "logging_steps: must be > 0"),
    case("logging-steps-negative", "grpo", "logging_steps=-5", "logging_steps: must be > 0"),
    case("save-steps-zero", "sft", "save_strategy=steps save_steps=0", "save_steps: must be > 0"),
    case("eval-steps-negative", "dpo", "eval_steps=-1", "eval_steps: must be > 0"),
    case("dataloader-workers-negative", "raft", "dataloader_num_workers=-1", "dataloader_num_workers: must be >= 0"),
    case("batch-size-zero", "online_dpo", "per_device_train_batch_size=0", "per_device_train_batch_size: must be >= "
                                                                           "1, got 0"),
    case("eval-batch-size-zero", "dpo", "per_device_eval_batch_size=0", "per_device_eval_batch_size: must be >= 1"),
    case("grad-accum-zero", "sft", "gradient_accumulation_steps=0", "gradient_accumulation_steps: must be >= 1"),
    case("load-best-without-eval", "dpo", "load_best_model_at_end=true", "load_best_model_at_end: needs evaluation "
                                                                         "to pick the best checkpoint"),
    case("load-best-without-eval-rl", "grpo", "load_best_model_at_end=true", "load_best_model_at_end: needs "
                                                                             "evaluation"),
    case("eval-without-split", "sft", "eval_strategy=steps", "eval_strategy: evaluation is on but dataset_test_split "
                                                             "is not set"),
    case("report-to-unknown", "grpo", "report_to=wandbb", "report_to: unknown logger 'wandbb' (known: azure_ml"),
    case("report-to-not-installed", "dpo", "report_to={logger}", "report_to: '{logger}' is not installed"),
    case("lr-scheduler-unknown", "iterative_dpo", "lr_scheduler_type=cosinee", "lr_scheduler_type: expected "
         "transformers.trainer_utils.SchedulerType | str (one of: linear, cosine, "),
    case("optim-unknown", "dpo", "optim=adamw_fast", "optim: expected transformers.training_args.OptimizerNames | "
                                                     "str (one of: adamw_torch, "),
    case("save-strategy-unknown", "grpo", "save_strategy=sometimes", "save_strategy: expected "
         "transformers.trainer_utils.SaveStrategy | str (one of: no, steps, epoch, best), got 'sometimes'"),
    case("fp16-and-bf16", "sft", "fp16=true bf16=true", "fp16 / bf16: choose at most one"),
    case("torch-dtype-unknown", "dpo", "torch_dtype=float8", "torch_dtype: must be one of ('float32', "
                                                          "'bfloat16', 'float16', 'auto'), got 'float8'"),
    case("attn-unknown", "dpo", "attn_implementation=flash", "attn_implementation: must be one of eager, "),
    # --- models ---
    case("model-missing-folder", "sft", "model_name_or_path=/no/model", "model_name_or_path: folder '/no/model' does "
                                                                        "not exist"),
    case("model-testbed-unknown", "raft", "model_name_or_path=testbed:large", "model_name_or_path: unknown testbed "
                                                                              "model 'testbed:large'"),
    case("model-hub-offline", "online_dpo", "model_name_or_path=someorg/some-model", "model_name_or_path: "
         "'someorg/some-model' is not a local folder and not in the Hub cache, and HF_HUB_OFFLINE is set"),
    case("model-no-config", "sft", "model_name_or_path={model:no_config}", "has no config.json, so it is not a model "
                                                                           "folder"),
    case("model-config-not-json", "dpo", "model_name_or_path={model:config_not_json}", "config_not_json/config.json "
         "is not valid JSON (Expecting property name enclosed in double quotes at line 1 column 24)"),
    case("model-config-not-object", "xpo", "model_name_or_path={model:config_list}", "config_list/config.json must "
                                                                                     "hold a JSON object, got list"),
    case("model-unknown-model-type", "grpo", "model_name_or_path={model:unknown_type}", "model_name_or_path: unknown "
                                                                                        "model_type 'llamma' in "),
    case("model-no-model-type", "sft", "model_name_or_path={model:no_type}", "no_type/config.json has no model_type"),
    case("model-not-causal", "online_dpo", "model_name_or_path={model:not_causal}", "model_type 'vit' in "),
    case("model-truncated-safetensors", "dpo", "model_name_or_path={model:truncated}", "truncated/model.safetensors "
                                                                                       "is truncated (5118484 bytes"),
    case("model-garbage-safetensors", "raft", "model_name_or_path={model:garbage}", "garbage/model.safetensors is not "
                                                                                    "a safetensors file"),
    case("model-zero-safetensors", "egpo", "model_name_or_path={model:zeros}", "zeros/model.safetensors is not a "
                                                                               "safetensors file (its header is not "
                                                                               "JSON)"),
    case("model-no-weights", "xpo", "model_name_or_path={model:no_weights}", "no_weights' has no weights file (one of "
                                                                             "model.safetensors, "),
    case("model-missing-shard", "egpo", "model_name_or_path={model:missing_shard}", "missing_shard/model.safetensors."
         "index.json names shard 'model-00002-of-00002.safetensors', which is missing"),
    case("model-empty-bin", "iterative_dpo", "model_name_or_path={model:empty_bin}", "empty_bin/pytorch_model.bin is "
                                                                                     "empty"),
    case("ref-model-truncated", "dpo", "ref_model_name_or_path={model:truncated}", "ref_model_name_or_path: "
         "{model:truncated}/model.safetensors is truncated"),
    case("ref-model-unknown-type", "grpo", "beta=0.04 ref_model_name_or_path={model:unknown_type}",
         "ref_model_name_or_path: unknown model_type 'llamma'"),
    case("ref-model-missing", "online_dpo", "ref_model_name_or_path=/no/ref", "ref_model_name_or_path: folder "
                                                                              "'/no/ref' does not exist"),
    case("ref-without-kl", "grpo", "ref_model_name_or_path=testbed:base", "ref_model_name_or_path: set, but beta is "
                                                                          "0, so there is no KL term"),
    case("no-chat-template-dpo", "dpo", f"{FEW} model_name_or_path={{model:no_chat}}", "model_name_or_path: the "
         "tokenizer of '{model:no_chat}' has no chat template, and the train dataset is conversational"),
    case("no-chat-template-grpo", "grpo", f"{FEW} model_name_or_path={{model:no_chat}}", "has no chat template, and "
                                                                                         "the train dataset is "
                                                                                         "conversational"),
    case("no-chat-template-online", "online_dpo", f"{FEW} model_name_or_path={{model:no_chat}}", "has no chat "
                                                                                                 "template"),
    case("tokenizer-broken", "dpo", f"{FEW} model_name_or_path={{model:bad_tokenizer}}", "model_name_or_path: cannot "
         "load the tokenizer from '{model:bad_tokenizer}' (JSONDecodeError: "),
    case("model-garbage-bin", "sft", f"{FEW} model_name_or_path={{model:garbage_bin}}", "model_name_or_path: cannot "
         "load the model from '{model:garbage_bin}' (UnpicklingError: ", at_load=True),
    # --- LoRA ---
    case("lora-r-without-peft", "dpo", "lora_r=4", "lora_r: set to 4 but use_peft is false; add use_peft=true to "
                                                   "train a LoRA adapter, or remove lora_r"),
    case("lora-targets-without-peft", "grpo", "lora_target_modules=[q_proj]", "lora_target_modules: set to "
                                                                              "['q_proj'] but use_peft is false"),
    case("lora-alpha-without-peft", "sft", "lora_alpha=64", "lora_alpha: set to 64 but use_peft is false"),
    case("lora-target-matches-nothing", "dpo", "use_peft=true lora_target_modules=[qkv_proj]", "lora_target_modules: "
         "'qkv_proj' matches no layer of 'testbed:policy' that LoRA can adapt (layer names: embed_tokens, q_proj, "
         "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head)"),
    case("lora-target-one-of-two", "sft", "use_peft=true lora_target_modules=[q_proj,attn_out]", "lora_target_modules:"
                                                                                                 " 'attn_out' matches "
                                                                                                 "no layer"),
    case("lora-target-container", "grpo", "use_peft=true lora_target_modules=[self_attn]", "lora_target_modules: "
                                                                                           "'self_attn' matches no "
                                                                                           "layer"),
    case("lora-r-zero", "raft", "use_peft=true lora_r=0", "lora_r: must be >= 1 with use_peft, got 0"),
    case("lora-alpha-zero", "dpo", "use_peft=true lora_alpha=0", "lora_alpha: must be > 0"),
    case("lora-dropout-one", "online_dpo", "use_peft=true lora_dropout=1", "lora_dropout: must be in [0, 1), got 1.0"),
    # --- outputs ---
    case("output-dir-is-file", "dpo", "output_dir={file}", "output_dir: '{file}' is a file, not a folder"),
    case("output-dir-under-file", "grpo", "output_dir={file}/out", "output_dir: '{file}/out' cannot be created, "
                                                                   "'{file}' is a file"),
    case("output-dir-unwritable", "sft", "output_dir=/proc/align-no-such/out", "output_dir: '/proc/align-no-such/out' "
                                                                               "is not writable (cannot create "
                                                                               "folders in '/proc'"),
    case("metrics-file-absolute", "dpo", "metrics_file=/tmp/metrics.jsonl", "metrics_file: must be a file name inside "
                                                                            "output_dir (e.g. metrics.jsonl), got "
                                                                            "'/tmp/metrics.jsonl'"),
    case("metrics-file-parent", "online_dpo", "metrics_file=../metrics.jsonl", "metrics_file: must be a file name "
                                                                               "inside output_dir"),
    case("metrics-file-empty", "raft", "metrics_file=", "metrics_file: must be a file name inside output_dir"),
    # --- objectives (offline, online, iterative) ---
    case("dpo-beta-negative", "dpo", "beta=-0.1", "beta: objective 'dpo' needs beta in (0, inf), got -0.1"),
    case("dpo-beta-zero", "dpo", "beta=0", "beta: objective 'dpo' needs beta in (0, inf), got 0.0"),
    case("ipo-beta-zero", "dpo", "objective=ipo beta=0", "beta: objective 'ipo' needs beta in (0, inf), got 0.0"),
    case("hinge-beta-negative", "dpo", "objective=hinge beta=-1", "beta: objective 'hinge' needs beta in (0, inf)"),
    case("hdpo-alpha-zero", "dpo", "objective=hdpo alpha=0", "alpha: objective 'hdpo' needs alpha in (0, inf), got "
                                                             "0.0"),
    case("hdpo-alpha-negative", "online_dpo", "objective=hdpo alpha=-1", "alpha: objective 'hdpo' needs alpha in "
                                                                         "(0, inf), got -1.0"),
    case("robust-label-smoothing-half", "dpo", "objective=robust label_smoothing=0.5", "label_smoothing: objective "
         "'robust' needs label_smoothing in [0, 0.5), got 0.5"),
    case("robust-label-smoothing-negative", "dpo", "objective=robust label_smoothing=-0.1", "label_smoothing: "
                                                                                            "objective 'robust' needs"),
    case("rpo-eta-negative", "dpo", "objective=rpo eta=-1", "eta: objective 'rpo' needs eta in [0, inf), got -1.0"),
    case("rpo-sft-norm-unknown", "dpo", "objective=rpo sft_norm=median", "sft_norm: must be one of ('sum', 'mean', "
                                                                         "'token'), got 'median'"),
    case("lrdpo-length-alpha-inf", "dpo", "objective=lrdpo length_alpha=inf", "length_alpha: objective 'lrdpo' needs "
                                                                              "a finite number, got inf"),
    case("objective-kwargs-beta", "dpo", ["objective_kwargs={beta: -1}"], "beta: objective 'dpo' needs beta in (0, "
                                                                        "inf), got -1"),
    case("objective-unknown", "dpo", "objective=dop", "objective: unknown objective 'dop'"),
    case("objective-param-not-taken", "dpo", "alpha=0.9", "alpha: objective 'dpo' does not take it"),
    case("online-beta-zero", "online_dpo", "beta=0", "beta: objective 'dpo' needs beta in (0, inf)"),
    case("xpo-ipo-beta-negative", "xpo", "objective=ipo beta=-1", "beta: objective 'ipo' needs beta in (0, inf)"),
    case("egpo-beta-zero", "egpo", "beta=0", "beta: objective 'online_ipo' needs beta in (0, inf)"),
    case("iterative-beta-negative", "iterative_dpo", "beta=-0.1", "beta: objective 'dpo' needs beta in (0, inf)"),
    case("max-length-one", "dpo", "max_length=1", "max_length: must be >= 2, got 1"),
    case("logits-block-size-negative", "grpo", "logits_block_size=-1", "logits_block_size: must be >= 0 (0 = off) or "
                                                                       "auto, got -1"),
    case("logits-block-size-too-large", "dpo", "logits_block_size=65", "logits_block_size: 65 is larger than the "
                                                                       "longest sequence, 64 tokens (max_length 64); "
                                                                       "use at most 64, auto or 0 (off)"),
    case("logits-block-size-too-large-rl", "raft", "logits_block_size=4096", "logits_block_size: 4096 is larger than "
                                                                             "the longest sequence, 80 tokens "
                                                                             "(max_prompt_length 64 + "
                                                                             "max_completion_length 16)"),
    case("padding-free-attention", "online_dpo", "padding_free=true attn_implementation=paged|eager", "padding_free: "
         "attn_implementation 'paged|eager' cannot keep packed sequences apart (supported: sdpa, eager, "),
    case("sft-max-length-one", "sft", "max_length=1", "max_length: must be >= 2 (or null: no truncation), got 1"),
    case("sft-packing-completion-only", "sft", "packing=true completion_only_loss=true", "packing / "
                                                                                         "completion_only_loss"),
    # --- sampling: generation, RL, online, iterative ---
    case("temperature-zero", "grpo", "temperature=0", "temperature: must be > 0 and finite for sampling, got 0.0"),
    case("temperature-nan", "raft", "temperature=nan", "temperature: must be a number, got 'nan'"),
    case("temperature-inf", "online_dpo", "temperature=inf", "temperature: must be > 0 and finite"),
    case("top-p-zero", "grpo", "top_p=0", "top_p: must be in (0, 1], got 0.0"),
    case("top-p-above-one", "egpo", "top_p=1.5", "top_p: must be in (0, 1], got 1.5"),
    case("top-k-negative", "grpo", "top_k=-1", "top_k: must be >= 0 (0: no cut), got -1"),
    case("max-prompt-length-zero", "raft", "max_prompt_length=0", "max_prompt_length: must be >= 1"),
    case("max-completion-length-zero", "online_dpo", "max_completion_length=0", "max_completion_length: must be >= 1"),
    case("generation-batch-size-zero", "xpo", "generation_batch_size=0", "generation_batch_size: must be >= 1"),
    case("num-generations-one", "grpo", "num_generations=1", "num_generations: GRPO groups need at least 2"),
    case("num-generations-zero", "raft", "num_generations=0", "num_generations: must be >= 1, got 0"),
    case("epsilon-negative", "grpo", "epsilon=-0.1", "epsilon: must be >= 0"),
    case("epsilon-high-below-epsilon", "grpo", "epsilon_high=0.1", "epsilon_high: must be >= epsilon (0.2)"),
    case("rl-beta-negative", "grpo", "beta=-0.01", "beta: must be >= 0"),
    case("num-minibatches-indivisible", "grpo", "num_minibatches=3", "num_minibatches: 3 does not divide the round's "
                                                                     "128 rollouts"),
    # --- a number of processes the batch does not fit (what every process of a `--num_processes N` launch reads) ---
    case("batch-last-padded-2-processes", "dpo", "max_train_samples=40 per_device_train_batch_size=8 max_steps=-1 "
         "num_train_epochs=1", "per_device_train_batch_size: 8 x processes 2 = 16 rows a batch does not divide the 40 "
         "train rows, so accelerate would fill the last batch with 8 rows repeated from the start (one process trains "
         "on the 8 left); set dataloader_drop_last: true, or max_train_samples: 32", world=2),
    case("iterative-2-processes-no-drop-last", "iterative_dpo", "", "dataloader_drop_last: must be true for the "
         "iterative driver on 2 processes: a round's pairs are counted only after sampling", world=2),
    case("num-minibatches-3-processes", "grpo", "per_device_train_batch_size=1 num_generations=2 num_minibatches=4",
         "num_minibatches: 4 does not divide the round's 6 rollouts (per_device_train_batch_size 1 x processes 3 x "
         "num_generations 2)", world=3),
    case("rl-grad-accum", "raft", "gradient_accumulation_steps=2", "gradient_accumulation_steps: must be 1 in the RL "
                                                                   "loop"),
    case("rl-save-steps-in-round", "grpo", "save_strategy=steps save_steps=3", "save_steps: must be a multiple of the "
                                                                               "2 updates per round"),
    case("allocator-unknown", "grpo", "allocator=greedy", "allocator: must be one of ('dynamic', 'gvm', 'uniform'), "
                                                          "got 'greedy'"),
    case("advantage-unknown", "raft", "advantage=ppo", "advantage: must be one of ('grpo', 'raft'), got "
                                                       "'ppo'"),
    case("loss-type-unknown", "grpo", "loss_type=token", "loss_type: must be one of ('grpo', 'bnpo', "
                                                         "'dapo', 'dr_grpo'), got 'token'"),
    case("gvm-min-above-max", "grpo", "allocator=gvm gvm_min_n=4 gvm_max_n=2", "gvm_min_n / gvm_max_n: need 0 <= "
                                                                              "min_n <= max_n, got 4 / 2"),
    case("gvm-min-over-budget", "grpo", "allocator=gvm gvm_min_n=16", "gvm_min_n: budget num_generations x prompts = "
                                                                      "128 is smaller than gvm_min_n x prompts = 256"),
    case("gvm-alpha-negative", "grpo", "allocator=gvm gvm_alpha=-1", "gvm_alpha / gvm_beta: need a finite gvm_alpha "
                                                                     ">= 0 and a finite gvm_beta, got -1.0 / 2.0"),
    case("gvm-beta-inf", "raft", "gvm_beta=inf", "gvm_alpha / gvm_beta: need a finite gvm_alpha >= 0 and a finite "
                                                 "gvm_beta, got 0.001 / inf"),
    case("accept-threshold-inf", "raft", "accept_threshold=-inf", "accept_threshold: must be a finite number, got "
                                                                  "-inf"),
    case("dynamic-max-rounds-negative", "grpo", "allocator=dynamic dynamic_max_rounds=-1", "dynamic_max_rounds: must "
                                                                                           "be >= 0"),
    case("micro-batch-zero", "grpo", "micro_batch_size=0", "micro_batch_size: must be >= 1"),
    case("overlong-cache-too-long", "grpo", "overlong_cache_length=99", "overlong_cache_length: must be in [0, "
                                                                        "max_completion_length], got 99"),
    case("grad-norm-monitor-zero", "grpo", "grad_norm_monitor_steps=0", "grad_norm_monitor_steps: must be >= 1"),
    case("reward-weights-length", "grpo", "reward_weights=[1,2]", "reward_weights: 2 weights for 1 reward functions "
                                                                "(reward_funcs)"),
    case("reward-funcs-unknown", "raft", "reward_funcs=[acuracy]", "reward_funcs: unknown reward function "
                                                            "'acuracy' (known: accuracy, "),
    case("rl-eval-num-samples-negative", "grpo", "eval_num_samples=-1", "eval_num_samples: must be >= 0 (0: greedy "
                                                                        "only), got -1"),
    case("rl-eval-max-new-tokens-zero", "raft", "eval_max_new_tokens=0", "eval_max_new_tokens: must be >= 1 (or "
                                                                         "null: max_completion_length), got 0"),
    case("rollout-unknown", "grpo", "rollout=sglang", "rollout: must be one of ('hf', 'vllm', 'vllm-server'), got "
                                                      "'sglang'"),
    case("vllm-server-port", "online_dpo", "rollout=vllm-server vllm_server_port=70000", "vllm_server_port: must be "
                                                                                         "in 1..65535, got 70000"),
    case("vllm-gpu-memory", "xpo", "rollout=vllm-server vllm_gpu_memory_utilization=1.5", "vllm_gpu_memory_"
                                                                                          "utilization: must be in "
                                                                                          "(0, 1], got 1.5"),
    case("vllm-is-cap-below-one", "grpo", "rollout=vllm-server vllm_is_cap=0.5", "vllm_is_cap: must be >= 1"),
    case("oracle-scale-zero", "online_dpo", "oracle_scale=0", "oracle_scale: must be > 0 and finite, got 0.0"),
    case("oracle-unknown", "online_dpo", "oracle=magic", "oracle: unknown oracle 'magic' (one of "
                                                             "verifier:<reward fn>, "),
    case("opponent-temperature-zero", "egpo", "opponent_temperature=0", "opponent_temperature: must be > 0 for "
                                                                        "sampling"),
    case("online-eval-num-samples-zero", "online_dpo", "eval_num_samples=0", "eval_num_samples: must be >= 1, got 0"),
    case("online-eval-max-new-tokens-zero", "egpo", "eval_max_new_tokens=0", "eval_max_new_tokens: must be >= 1"),
    case("egpo-variant-unknown", "egpo", "egpo_variant=oipo3", "egpo_variant: must be one of ('oipo1', 'oipo2')"),
    case("egpo-odd-save-steps", "egpo", "save_strategy=steps save_steps=3", "save_steps: must be even with EGPO's "
                                                                            "extragradient"),
    case("online-grad-accum", "xpo", "gradient_accumulation_steps=2", "gradient_accumulation_steps: must be 1 for "
                                                                      "online training"),
    case("xpo-alpha-negative", "xpo", "xpo_alpha=[-0.1]", "xpo_alpha: needs one or more finite values >= 0, got "
                                                         "[-0.1]"),
    case("mixture-coef-above-one", "egpo", "mixture_coef=1.5", "mixture_coef: must be in [0, 1], got 1.5"),
    case("mixture-coef-not-egpo", "online_dpo", "mixture_coef=0.5", "mixture_coef: only EGPO samples from a "
                                                                    "mixture, not online_dpo"),
    case("mixture-coef-lora-no-ref", "egpo", "mixture_coef=0.5 use_peft=true", "mixture_coef: 0.5 with use_peft needs "
         "ref_model_name_or_path (the mixture runs the policy and the reference side by side in one generate call; "
         "LoRA's reference is the policy with its adapter off); name the reference, or mixture_coef: 0"),
    # (the tail of the list is not pinned: a test module registers a test-only pair objective at import)
    case("online-objective-needs-gap", "online_dpo", "objective=online_ipo", "objective: must be one of "
         "('dpo', 'hdpo', 'hinge', 'ipo', 'lrdpo', "),
    case("egpo-objective", "egpo", "objective=dpo", "objective: EGPO trains on online_ipo, got 'dpo'"),
    case("iterations-zero", "iterative_dpo", "iterations=0", "iterations: must be >= 1, got 0"),
    case("samples-per-prompt-one", "iterative_dpo", "samples_per_prompt=1", "samples_per_prompt: must be >= 2"),
    case("apo-alpha-one", "iterative_dpo", "apo_alpha=1", "apo_alpha: must be in [0, 1) (or null), got 1.0"),
    case("prompts-per-iteration-zero", "iterative_dpo", "prompts_per_iteration=0", "prompts_per_iteration: must be >= "
                                                                                   "1 (or null), got 0"),
    case("iterative-eval-num-samples-negative", "iterative_dpo", "eval_num_samples=-1", "eval_num_samples: must be "
                                                                                        ">= 0, got -1"),
    case("iterative-ref-model", "iterative_dpo", "ref_model_name_or_path=testbed:base", "ref_model_name_or_path: the "
                                                                                        "iterative driver's reference"),
    case("iterative-precompute-off", "iterative_dpo", "precompute_ref_logps=false", "precompute_ref_logps: must be "
                                                                                    "true for the iterative driver"),
    # --- the Hub push ---
    case("push-without-model-id", "dpo", "push_to_hub=true", "push_to_hub: needs hub_model_id, the Hub repository "
                                                             "to push to (e.g. your-name/qwen-dpo)"),
    case("hub-model-id-invalid", "grpo", "push_to_hub=true hub_model_id=me/bad--name", "hub_model_id: 'me/bad--name' "
         "is not a valid Hub repository id (Cannot have -- or .. in repo_id)"),
    case("hub-model-id-three-parts", "sft", "push_to_hub=true hub_model_id=a/b/c", "hub_model_id: 'a/b/c' is not a "
         "valid Hub repository id (Repo id must be in the form 'repo_name' or 'namespace/repo_name')"),
    case("push-merged-without-lora", "dpo", "push_to_hub=true hub_model_id=me/x push_merged=true", "push_merged: "
         "needs use_peft=true (only a LoRA adapter has a merged copy to push)"),
    case("push-merged-without-push", "raft", "use_peft=true push_merged=true", "push_merged: set to True but "
                                                                               "push_to_hub is false"),
    case("hub-strategy-unknown", "online_dpo", "push_to_hub=true hub_model_id=me/x hub_strategy=checkpoint",
         "hub_strategy: must be one of ('end', 'every_save') (end: push once, after the run; every_save: also upload "
         "each checkpoint in the background), got 'checkpoint'"),
    case("hub-revision-invalid", "xpo", "push_to_hub=true hub_model_id=me/x hub_revision=a..b", "hub_revision: "
                                                                                               "'a..b' is not a "
                                                                                               "valid branch name"),
    case("push-every-iteration-without-push", "iterative_dpo", "push_every_iteration=true", "push_every_iteration: "
         "set to True but push_to_hub is false"),
    case("iterative-every-save", "iterative_dpo", "push_to_hub=true hub_model_id=me/x hub_strategy=every_save",
         "hub_strategy: every_save uploads a trainer's checkpoints; the iterative driver pushes iterations instead"),
]


# --- the inputs the cases name -----------------------------------------------------------------------------------


def _policy_copy(src: Path, dst: Path) -> Path:
    """A model folder that links to the testbed policy's files; a builder then replaces the file it breaks."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


def _replace(folder: Path, name: str, data: bytes | str | None) -> None:
    (folder / name).unlink(missing_ok=True)
    if data is not None:
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)


def _config(src: Path, **change) -> str:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(change)
    return json.dumps({k: v for k, v in cfg.items() if v is not None})


BROKEN = {
    "no_config": lambda d, s: _replace(d, "config.json", None),
    "config_not_json": lambda d, s: _replace(d, "config.json", '{"architectures": [1], broken'),
    "config_list": lambda d, s: _replace(d, "config.json", "[1, 2]"),
    "unknown_type": lambda d, s: _replace(d, "config.json", _config(s, model_type="llamma")),
    "no_type": lambda d, s: _replace(d, "config.json", _config(s, model_type=None)),
    "not_causal": lambda d, s: _replace(d, "config.json", _config(s, model_type="vit")),
    "truncated": lambda d, s: _replace(d, "model.safetensors", (s / "model.safetensors").read_bytes()[:5118484]),
    "garbage": lambda d, s: _replace(d, "model.safetensors", b"\xff" * 64),
    "zeros": lambda d, s: _replace(d, "model.safetensors", b"\x04" + b"\x00" * 63),
    "no_weights": lambda d, s: _replace(d, "model.safetensors", None),
    "missing_shard": lambda d, s: (_replace(d, "model.safetensors", None), _replace(
        d, "model.safetensors.index.json", json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                      "b": "model-00002-of-00002.safetensors"}})),
        (d / "model-00001-of-00002.safetensors").symlink_to(s / "model.safetensors")),
    "empty_bin": lambda d, s: (_replace(d, "model.safetensors", None), _replace(d, "pytorch_model.bin", b"")),
    "garbage_bin": lambda d, s: (_replace(d, "model.safetensors", None), _replace(d, "pytorch_model.bin",
                                                                                    b"not a torch file" * 8)),
    "no_chat": lambda d, s: _replace(d, "chat_template.jinja", None),
    "bad_tokenizer": lambda d, s: _replace(d, "tokenizer.json", '{"version": "1.0", broken'),
}


@pytest.fixture(scope="module")
def broken_models(testbed, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken-models")
    out = {}
    for kind, breaks in BROKEN.items():
        folder = _policy_copy(Path(testbed.policy), root / kind)
        breaks(folder, Path(testbed.policy))
        out[kind] = str(folder)
    return out


def _yaml(kind: str, recipe: str, path: Path) -> Path:
    base = (REPO / CONFIGS[recipe]).read_bytes()
    data = {"dup": base + b"beta: 0.2\n", "dup_nested": base + b"objective_kwargs: {gamma: 1, gamma: 2}\n",
            "latin1": base + "# café\n".encode("latin-1"), "syntax": b"a: [1, 2\n", "list": b"- a\n- b\n"}[kind]
    path.write_bytes(data)
    return path


def _missing_logger() -> str:
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    return next(n for n in INTEGRATION_TO_CALLBACK if n not in get_available_reporting_integrations())


def _fill(text: str, recipe: str, tmp_path: Path, models: dict) -> str:
    text = re.sub(r"\{model:(\w+)\}", lambda m: models[m.group(1)], text)
    text = re.sub(r"\{yaml:(\w+)\}", lambda m: str(_yaml(m.group(1), recipe, tmp_path / "c.yaml")), text)
    if "{logger}" in text:
        text = text.replace("{logger}", _missing_logger())
    return text.replace("{file}", str(tmp_path / "a-file"))


@pytest.fixture
def model_loads(monkeypatch):
    """Every attempt to read weights, recorded and stopped: a case must fail before it."""
    from transformers import AutoModelForCausalLM

    calls = []

    def record(path, *a, **k):
        calls.append(path)
        raise AssertionError(f"a model was loaded ({path}) before the bad input was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    return calls


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit_before_the_model(c, tmp_path, broken_models, capsys, monkeypatch,
                                                                    request):
    from align.recipe import get_recipe, main

    (tmp_path / "a-file").write_text("not a folder\n")
    calls = [] if c.at_load else request.getfixturevalue("model_loads")
    monkeypatch.chdir(tmp_path)  # a relative path a case resolves lands here
    if c.world != 1:  # the launcher's WORLD_SIZE, as align's checks read it (transformers then starts no group)
        import align.args
        import align.recipe

        for module in (align.args, align.recipe):
            monkeypatch.setattr(module, "world_size", lambda: c.world)
    args = [_fill(a, c.recipe, tmp_path, broken_models) for a in c.args]
    code = main(get_recipe(c.recipe), ["--config", str(REPO / CONFIGS[c.recipe]), f"output_dir={tmp_path}/out",
                                       *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert _fill(c.expect, c.recipe, tmp_path, broken_models) in lines[0]
    assert calls == []
    assert not (tmp_path / "out").exists()  # nothing written for a run that never started


def test_at_least_sixty_cases_over_every_recipe():
    from align.recipe import discover

    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {c.recipe for c in CASES} == set(discover()) == set(CONFIGS)


def test_docs_table_lists_exactly_these_cases():
    text = (REPO / "docs/errors.md").read_text()
    assert DOCS_SECTION in text
    section = text.split(DOCS_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    listed = [i for row in rows for i in re.findall(r"`([a-z0-9-]+)`", row.split("|")[1])]
    assert sorted(listed) == sorted(c.id for c in CASES)


# --- the checks, directly: exact values, and no false alarms -----------------------------------------------------


def test_every_testbed_config_and_a_sharded_model_pass(testbed, tmp_path, model_loads):
    """The checks refuse nothing a user may do: every shipped testbed config loads, a LoRA on named layers, and a
    sharded checkpoint whose index and shards are whole."""
    from align.config import load_config
    from align.model_files import check_model_folder
    from align.recipe import get_recipe

    for recipe, path in CONFIGS.items():
        load_config(get_recipe(recipe).config_class, REPO / path, [f"output_dir={tmp_path}/{recipe}"])
    load_config(get_recipe("dpo").config_class, REPO / CONFIGS["dpo"],
                [f"output_dir={tmp_path}/lora", "use_peft=true", "lora_target_modules=[q_proj,v_proj,lm_head]"])
    folder = _policy_copy(Path(testbed.policy), tmp_path / "sharded")
    header = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(header[:8], "little")
    names = [k for k in json.loads(header[8:8 + n]) if k != "__metadata__"]
    _replace(folder, "model.safetensors", None)
    (folder / "model-00001-of-00001.safetensors").symlink_to(Path(testbed.policy) / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in names}}))
    check_model_folder(str(folder), "model_name_or_path")
    assert len(names) == 39 and model_loads == []


def test_safetensors_truncated_by_one_byte_names_both_sizes(testbed, tmp_path):
    from align.model_files import check_safetensors

    data = (Path(testbed.policy) / "model.safetensors").read_bytes()
    path = tmp_path / "m.safetensors"
    path.write_bytes(data[:-1])
    with pytest.raises(ConfigError) as err:
        check_safetensors(str(path), "k")
    assert str(err.value) == (f"k: {path} is truncated ({len(data) - 1} bytes, its header describes {len(data)}); "
                              "re-download or re-save the model")
    path.write_bytes(data)
    check_safetensors(str(path), "k")  # whole again: no error


def test_duplicate_key_inside_a_list_of_mappings_and_merge_keys(tmp_path):
    from align.config import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("base: &b {x: 1}\nover:\n  <<: *b\n  x: 2\n")  # a merge key may be overridden
    assert read_yaml(path) == {"base": {"x": 1}, "over": {"x": 2}}
    path.write_text("a: 1\nitems:\n  - {k: 1}\n  - k: 2\n    k: 3\n")
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    assert str(err.value) == f"--config: {str(path)!r}: key 'k' appears twice (lines 4 and 5); keep one"


def test_bounds_of_every_objective_are_declared_once(tmp_path):
    """β > 0 for every objective that takes it (COMMON_BOUNDS); each objective's own bounds in its register()."""
    from align.objectives import build, registry

    specs = registry()
    assert all(spec.bounds["beta"] == "(0, inf)" for spec in specs.values() if "beta" in spec.params)
    assert specs["hdpo"].bounds["alpha"] == "(0, inf)" and specs["robust"].bounds["label_smoothing"] == "[0, 0.5)"
    assert specs["rpo"].bounds["eta"] == "[0, inf)"
    assert build("robust", label_smoothing=0.0).params["label_smoothing"] == 0.0  # the closed end is allowed
    with pytest.raises(ConfigError, match=r"^beta: objective 'pairnorm' needs beta in \(0, inf\), got 0$"):
        build("pairnorm", beta=0)
    with pytest.raises(ConfigError, match=r"^beta: objective 'dpo' needs a finite number in \(0, inf\), got 'x'$"):
        build("dpo", beta="x")
