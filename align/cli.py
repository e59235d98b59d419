"""The ``align`` command: train a recipe, list recipes and objectives, build the testbed, quickstart, serve
rollouts from vLLM."""

from __future__ import annotations

import argparse
import json
import os
import sys

from align import __version__
from align.errors import AlignError, print_error
from align.quickstart import PAIR_PROMPTS


def _train(args) -> int:
    from align.launch import relaunch, split_launcher_flags
    from align.recipe import get_recipe, main

    recipe = get_recipe(args.recipe)
    flags, rest = split_launcher_flags(args.rest)  # --accelerate_config FILE [--num_processes N]: align/launch.py
    if flags:
        relaunch(recipe.run.__module__, flags, rest)
    return main(recipe, rest)


def _recipes(args) -> int:
    from align.objectives import registry
    from align.recipe import discover

    print("recipes (align train <recipe> --config FILE, or a shipped config by name: --config testbed):")
    for name, recipe in discover().items():
        print(f"  {name:<12} {recipe.summary}")
    print("objectives (objective: <name> in a recipe config):")
    objectives = registry()
    for name, spec in objectives.items():
        print(f"  {name:<12} {spec.summary}  [params: {', '.join(spec.params) or '-'}]")
    if not objectives:
        print("  (none registered)")
    return 0


def _testbed(args) -> int:
    from align.testbed.build import default_dir, ensure_testbed

    if args.action == "build":
        tb = ensure_testbed(args.dir, force=args.force, spec=args.spec)
        print(f"testbed ready at {tb.root}")
        print(json.dumps({k: tb.info[k] for k in ("parameters", "build_seconds", "held_out_accuracy")}, indent=2))
    else:
        root = args.dir or default_dir(args.spec)
        path = os.path.join(root, "testbed.json")
        if not os.path.isfile(path):
            print(f"no testbed at {root} (run: align testbed build)")
            return 1
        with open(path, encoding="utf-8") as fh:
            print(fh.read())
    return 0


def _quickstart(args) -> int:
    from align.quickstart import quickstart

    quickstart(args.output_dir, align_steps=args.align_steps, pair_prompts=args.pair_prompts)
    return 0


def _plot(args) -> int:
    from align.plots import plot_command

    paths = plot_command(args.output_dir)
    print(f"{len(paths)} plot(s) in {os.path.join(args.output_dir, 'plots')}: "
          f"{', '.join(os.path.basename(p) for p in paths) or '-'}")
    return 0


def _push(args) -> int:
    from align.hub import push_saved

    push_saved(args.output_dir, args.repo_id, private=args.private, merged=args.merged, revision=args.revision)
    return 0


def _serve(args) -> int:
    from align.errors import ConfigError
    from align.modeling import check_model_path, resolve_model_path
    from align.rollout.lora import VLLM_RANKS
    from align.rollout.serve_http import check_limits
    from align.rollout.server import serve, serve_api_key
    from align.rollout.vllm_engine import check_max_length, check_tensor_parallel

    api_key = serve_api_key(args.host, args.api_key)  # first: an exposed server without a key never starts
    limits = {k: v for k in ("max_body_mb", "max_request_mb", "max_completions", "max_n", "read_timeout_s", "workers")
              if (v := getattr(args, k)) is not None}
    check_limits(limits)
    check_model_path(args.model, "--model")
    check_tensor_parallel(args.tensor_parallel_size, "--tensor-parallel-size")
    check_max_length(resolve_model_path(args.model), args.max_model_len, "--max-model-len", "max model length")
    if args.max_lora_rank not in (0, *VLLM_RANKS):
        raise ConfigError(f"--max-lora-rank: must be 0 (no LoRA) or one of vLLM's ranks "
                          f"{', '.join(map(str, VLLM_RANKS))}, got {args.max_lora_rank}")
    serve(resolve_model_path(args.model), args.host, args.port, max_model_len=args.max_model_len,
          tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
          dtype=args.dtype, seed=args.seed, api_key=api_key, limits=limits, max_lora_rank=args.max_lora_rank)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description="LLM post-training alignment trainer.")
    parser.add_argument("--version", action="version", version=f"align {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    train = sub.add_parser("train", help="run a recipe: align train <recipe> --config FILE|NAME [key=value ...] "
                           "[--accelerate_config FILE [--num_processes N]]: under accelerate launch", add_help=False)
    train.add_argument("recipe", help="recipe name (see: align recipes)")
    train.add_argument("rest", nargs=argparse.REMAINDER,
                       help="--config FILE or a shipped config's name (e.g. testbed), key=value overrides, --help")
    train.set_defaults(func=_train)

    recipes = sub.add_parser("recipes", help="list the recipes and objectives")
    recipes.set_defaults(func=_recipes)

    testbed = sub.add_parser("testbed", help="build or inspect the embedded tiny testbed (no network)")
    testbed.add_argument("action", choices=["build", "info"])
    testbed.add_argument("--dir", default=None, help="cache folder (default: $ALIGN_TESTBED_DIR or ~/.cache/align)")
    testbed.add_argument("--force", action="store_true", help="rebuild even if a build is cached")
    testbed.add_argument("--spec", type=int, default=2, choices=[2, 3],
                         help="2: single-digit facts (the default); 3: multi-digit arithmetic with a scratchpad")
    testbed.set_defaults(func=_testbed)

    quick = sub.add_parser("quickstart", help="testbed + SFT warm-up + a short alignment run, with plots")
    quick.add_argument("--output-dir", default="outputs/quickstart")
    quick.add_argument("--align-steps", type=int, default=None,
                       help="optimizer steps of the alignment run (default: the config's max_steps)")
    quick.add_argument("--pair-prompts", type=int, default=PAIR_PROMPTS,
                       help="training prompts the policy answers to make the preference pairs (fewer: a smoke run)")
    quick.set_defaults(func=_quickstart)

    plot = sub.add_parser("plot", help="draw a run's plots (finished or in progress) into OUTPUT_DIR/plots/")
    plot.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's output_dir (holds its metrics.jsonl)")
    plot.set_defaults(func=_plot)

    push = sub.add_parser("push", help="push a saved run to the Hub (e.g. after a failed push): align push "
                                       "OUTPUT_DIR REPO_ID (docs/hub.md)")
    push.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's output_dir (holds its align_config.yaml)")
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository: name or namespace/name")
    push.add_argument("--private", action="store_true", default=None, help="create the repository private")
    push.add_argument("--merged", action="store_true", help="LoRA: also push the adapter merged into its base "
                      "model, in merged/")
    push.add_argument("--revision", metavar="BR", default=None, help="branch to push to (created when missing)")
    push.set_defaults(func=_push)

    srv = sub.add_parser("serve", help="a vLLM rollout server for rollout: vllm-server (align/rollout/server.py)")
    srv.add_argument("--model", required=True, help="model folder, Hub id or testbed:policy (the policy's start)")
    srv.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over")
    srv.add_argument("--max-model-len", type=int, default=2048, help="longest prompt + completion, in tokens")
    srv.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    srv.add_argument("--dtype", default="auto", help="weights dtype: auto (the CPU build picks bfloat16), float32, "
                     "bfloat16, float16; the trainer warns when it differs from the policy's")
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--max-lora-rank", type=int, default=0, help="serve a LoRA trainer's adapter (pushed alone, "
                     "use_peft + vllm_lora_adapter) up to this rank: 8, 16, 32, 64, ...; 0 (default): no LoRA path, "
                     "a LoRA trainer pushes merged weights")
    srv.add_argument("--api-key", default=None, help="shared key every request must send (Authorization: Bearer); "
                     "default $ALIGN_SERVE_API_KEY, which keeps it out of `ps`; required unless --host is loopback")
    srv.add_argument("--max-body-mb", type=float, default=None, help="largest weight push (default: the model's "
                     "weights in float32, twice, + 64 MB)")
    # defaults (in the help) are align.rollout.serve_http.ServeLimits's, not imported here: that would load torch
    srv.add_argument("--max-request-mb", type=float, help="largest /generate body (default 16)")
    srv.add_argument("--max-completions", type=int, help="most prompts, and most completions, in one /generate "
                     "(default 16384)")
    srv.add_argument("--max-n", type=int, help="most completions of one prompt in one /generate (default 1024)")
    srv.add_argument("--read-timeout-s", type=float, help="time allowed for a request's line and headers, and the "
                     "longest stall of a body or a write (default 30)")
    srv.add_argument("--workers", type=int, help="requests answered at once, at least the number of trainer "
                     "processes (default 32); 64 more connections may wait, others get 503")
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AlignError as err:
        print_error(err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
