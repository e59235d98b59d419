"""The model card: ``README.md`` in the output folder of every run, pushed or not (docs/hub.md, "Model card").

:func:`write_model_card` writes a Hub YAML header (base model, library, license, datasets, tags, pipeline tag) and
what was trained and how: each method with a paragraph and its paper's BibTeX (:mod:`align.citations`), the
settings that differ from the recipe's defaults plus the full config, the data with row counts, the compute, the
final metrics, the training-curve PNGs, the framework versions and the command that reproduces the run. What
it knows about the run beyond the config and the result comes from :func:`align.run_info.run_info`. No secret
(a token or a key, by name or by value) ever reaches the card.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import yaml

from align.citations import METHODS, TRL_BIB, methods_of
from align.config import to_dict
from align.hub_args import is_secret
from align.io import atomic_write_text, read_records
from align.modeling import HUB_ID
from align.run_info import scrub

TESTBED_LICENSE = "apache-2.0"  # the testbed models are built by align itself (pyproject: Apache-2.0)


def is_adapter(config, result: dict) -> bool:
    """Whether the final model is a LoRA adapter (an iterative run saves every iteration merged)."""
    return bool(config.use_peft) and not result.get("iterations")


def write_model_card(output_dir: str, config, result: dict, run_info: dict) -> str:
    """Write ``<output_dir>/README.md`` for the run (``run_info`` from :func:`align.run_info.run_info`); returns
    its path."""
    path = os.path.join(output_dir, "README.md")
    atomic_write_text(path, scrub(render(output_dir, config, result or {}, run_info), config))
    return path


def render(output_dir: str, config, result: dict, info: dict) -> str:
    """The card's text (before :func:`align.run_info.scrub`)."""
    methods = methods_of(config)
    model = model_id(output_dir, config, result)
    parts = [
        "---\n" + yaml.safe_dump(hub_metadata(config, info, methods, model, is_adapter(config, result)),
                                 sort_keys=False, allow_unicode=True)
        + "---",
        f"# Model card for {os.path.basename(model.rstrip('/'))}",
        intro(config, info, is_adapter(config, result)),
        "## Quick start\n\n" + usage(config, model, output_dir, result),
        "## Training procedure\n\n" + "\n\n".join(method_section(key) for key in methods),
        "### Data\n\n" + data_table(info),
        "### Hyper-parameters\n\n" + settings(config, info),
        "### Compute\n\n" + compute(config, info),
        "## Results\n\n" + results(output_dir, config, result),
        "## Reproduce\n\n" + reproduce(info),
        "### Framework versions\n\n" + "\n".join(f"- {name}: {v}" for name, v in info["versions"].items()),
        "## Citations\n\n" + citations(methods),
    ]
    return "\n\n".join(parts) + "\n"


# --- the header ------------------------------------------------------------------------------------------------


def hub_metadata(config, info: dict, methods: list[str], model: str, adapter: bool) -> dict:
    """The YAML header the Hub reads (``adapter``: the final model is a LoRA adapter)."""
    start = config.model_name_or_path
    base = base_model(start)
    meta: dict = {}
    if base:  # an adapter only of the very model it was trained on (a Hub id or its cache snapshot)
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if adapter and base in (start, snapshot_repo(start)) else "finetune"
    datasets = [d["name"] for d in info["datasets"] if is_hub_id(d["name"])]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["license"] = license_of(config.model_name_or_path)
    meta["model_name"] = os.path.basename(model.rstrip("/"))
    meta["pipeline_tag"] = "text-generation"
    tags = ["align", "generated_from_trainer", info["recipe"], *methods, *(["lora"] if config.use_peft else [])]
    if info["recipe"] == "sft":
        tags.append("trl")  # trained by TRL's SFTTrainer
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub id (``org/name`` or ``name``), not a plugin name or a local path."""
    return bool(name) and ":" not in name and not os.path.exists(name) and bool(HUB_ID.match(name))


def _card_header(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "README.md"), encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return {}
    match = re.match(r"---\n(.*?)\n---", text, re.S)
    try:
        header = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return header if isinstance(header, dict) else {}


def snapshot_repo(folder: str) -> str | None:
    """The Hub repository of a local Hub-cache snapshot folder (``.../models--org--name/snapshots/<sha>``)."""
    found = re.search(r"models--([^/]+)--([^/]+)/snapshots/", os.path.abspath(folder).replace(os.sep, "/") + "/")
    return f"{found.group(1)}/{found.group(2)}" if found else None


def base_model(name: str | None, depth: int = 0) -> str | None:
    """The Hub id ``name`` stands for: ``name`` itself when it is a Hub id; for a local folder, its known origin (a
    Hub cache snapshot's repository, the ``base_model`` of its own card, or the model an align run in it started
    from); None for a plugin's model (``testbed:policy``) or a folder of unknown origin."""
    if not name or depth > 4:
        return None
    if not os.path.isdir(name):
        return name if is_hub_id(name) else None
    cached = snapshot_repo(name)
    if cached:
        return cached
    found = _card_header(name).get("base_model")
    if isinstance(found, list):
        found = found[0] if found else None
    if isinstance(found, str) and is_hub_id(found):
        return found
    for file, key in (("align_config.yaml", "model_name_or_path"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            with open(os.path.join(name, file), encoding="utf-8") as fh:
                start = (yaml.safe_load(fh) or {}).get(key)  # JSON is YAML
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(start, str):
            return base_model(start, depth + 1)
    return None


def license_of(name: str | None) -> str:
    """The license to declare: the testbed's (align's own), else the one the start model's card declares (a local
    folder, or a Hub model's card in the local Hub cache), else ``other``."""
    if name and name.startswith("testbed:"):
        return TESTBED_LICENSE
    folder = name if name and os.path.isdir(name) else None
    if folder is None and is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "README.md")
        folder = os.path.dirname(cached) if isinstance(cached, str) else None
    found = _card_header(folder).get("license") if folder else None
    return found if isinstance(found, str) else "other"


# --- the body --------------------------------------------------------------------------------------------------


def final_folder(output_dir: str, result: dict) -> str:
    """The folder that holds the final model: ``output_dir``, or the last ``iter-*`` of an iterative run."""
    iterations = result.get("iterations") or []
    return os.path.join(output_dir, f"iter-{len(iterations) - 1}") if iterations else output_dir


def model_id(output_dir: str, config, result: dict) -> str:
    """What ``from_pretrained`` loads the trained model from: the Hub repository when the run pushes, else
    :func:`final_folder`."""
    if getattr(config, "push_to_hub", False) and getattr(config, "hub_model_id", None):
        return config.hub_model_id
    return final_folder(output_dir, result)


def intro(config, info: dict, adapter: bool) -> str:
    base, start = base_model(config.model_name_or_path), config.model_name_or_path
    origin = f"[{base}](https://huggingface.co/{base})" if base == start else f"`{start}`" + (
        f" (from [{base}](https://huggingface.co/{base}))" if base else "")
    data = [d for d in info["datasets"] if d["role"] == "train"]
    on = ""
    if data:
        name = data[0]["name"]
        on = (f" on the [{name}](https://huggingface.co/datasets/{name}) dataset" if is_hub_id(name)
              else f" on `{name}`")
    kind = "a LoRA adapter for" if adapter else "a fine-tuned version of"
    return (f"This model is {kind} {origin}{on}. It has been trained with align (`align train {info['recipe']}`), "
            "on 🤗 Transformers' Trainer and [TRL](https://github.com/huggingface/trl).")


def _has_chat_template(folder: str) -> bool:
    if os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        return True
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as fh:
            return bool(json.load(fh).get("chat_template"))
    except (OSError, ValueError):
        return False


def usage(config, model: str, output_dir: str, result: dict) -> str:
    """A snippet that loads the model and generates (peft for a LoRA adapter)."""
    chat = _has_chat_template(final_folder(output_dir, result))
    prompt = ('[{"role": "user", "content": "What is 12 + 7?"}]' if chat else '"Question: What is 12 + 7?\\nAnswer:"')
    if is_adapter(config, result):
        load = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer, pipeline\n\n"
                f'model = AutoPeftModelForCausalLM.from_pretrained("{model}").merge_and_unload()  # adapter into base\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{model}")\n'
                'generator = pipeline("text-generation", model=model, tokenizer=tokenizer)\n')
    else:
        load = f'from transformers import pipeline\n\ngenerator = pipeline("text-generation", model="{model}")\n'
    snippet = (f"```python\n{load}output = generator({prompt}, max_new_tokens=64, return_full_text=False)[0]\n"
               'print(output["generated_text"])\n```')
    if config.use_peft and getattr(config, "push_to_hub", False) and getattr(config, "push_merged", False):
        snippet += ("\n\nThe repository also holds the adapter merged into its base model, in `merged/`: load it "
                    f'without peft with `pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained('
                    f'"{model}", subfolder="merged"), tokenizer=AutoTokenizer.from_pretrained("{model}", '
                    'subfolder="merged"))`.')
    return snippet


def method_section(key: str) -> str:
    method = METHODS.get(key)
    if method is None:  # an objective registered after this table was written: its registry entry
        from align.objectives import registry

        spec = registry().get(key)
        return f"### {key}\n\n{spec.summary if spec else key} ({spec.paper if spec else 'no paper recorded'})."
    link = f" ([{method.paper}](https://huggingface.co/papers/{method.arxiv}))" if method.arxiv else ""
    return f"### {method.title}{link}\n\n{method.explanation}"


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}" if math.isfinite(value) else str(value)
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else "` `"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def data_table(info: dict) -> str:
    rows = [[d["role"], f"`{d['name']}`", f"`{d['split']}`", str(d["rows"]) if d["rows"] is not None else "?"]
            for d in info["datasets"]]
    unit = info["datasets"][0]["unit"] if info["datasets"] else "rows"
    return _table(["role", "dataset", "split", unit], rows) + "\n\nRow counts are after loading, the sample limits " \
                                                              "and every check (the rows the trainer used)."


def recipe_defaults(config) -> dict:
    """The recipe config class's defaults (as :func:`align.config.to_dict`), built on the accelerator state the run
    configured (``use_configured_state``). A plain new TrainingArguments resets that state and sets up a new one: under
    ``accelerate launch``, once the run has left its process group, that waits forever for the other ranks."""
    try:
        return to_dict(type(config)(accelerator_config={"use_configured_state": True}))
    except ValueError:  # no accelerator state configured yet (a card written outside a run)
        return to_dict(type(config)())


def changed_settings(config) -> dict[str, tuple]:
    """Config key -> (value, recipe default) for every key whose value differs from the recipe config's default
    (secrets left out)."""
    defaults, values = recipe_defaults(config), to_dict(config)
    return {k: (v, defaults.get(k)) for k, v in values.items() if v != defaults.get(k) and not is_secret(k)}


def settings(config, info: dict) -> str:
    changed = changed_settings(config)
    rows = [[f"`{k}`", _cell(v), _cell(d)] for k, (v, d) in sorted(changed.items())]
    public = {k: v for k, v in to_dict(config).items() if not is_secret(k)}
    full = yaml.safe_dump(public, sort_keys=True, allow_unicode=True)
    return (f"Every setting that differs from the defaults of the `{info['recipe']}` recipe "
            f"(`align train {info['recipe']} --help` lists them all):\n\n"
            + _table(["setting", "value", "default"], rows)
            + "\n\n<details>\n<summary>Full config (as align_config.yaml; secrets removed)</summary>\n\n"
            + f"```yaml\n{full}```\n\n</details>")


def _duration(seconds: float) -> str:
    s = round(seconds)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return (f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s" if m else f"{s} s") + f" ({seconds:.1f} s)"


def compute(config, info: dict) -> str:
    tokens = info.get("tokens")
    logged = [r for r in (config.report_to or []) if r not in ("none", None)]
    nodes = info.get("machines", 1)
    where = f" on {nodes} machines" if nodes > 1 else ""
    lines = [f"- Processes: {info['processes']}{where} ({info['device']})",
             f"- Precision: {info['precision']}",
             f"- Wall time: {_duration(info['wall_time_s'])}"
             + (" in this session (the run resumed from a checkpoint)" if config.resume_from_checkpoint else ""),
             f"- Tokens trained on: {tokens:,}" if tokens else
             "- Tokens trained on: not recorded (`include_num_input_tokens_seen: all` counts them)",
             f"- Metrics logged to: `{config.metrics_file}`" + "".join(f", {r}" for r in logged)]
    if info.get("tracker_url"):
        lines.append(f"- Run page: {info['tracker_url']}")
    return "\n".join(lines)


def last_train_values(output_dir: str, config) -> dict[str, tuple[float, int]]:
    """Metric -> (its last logged value, the step) over the training logs of the run's metrics file (not the eval
    logs nor the end-of-training summary); a metric logged only on some steps keeps its last value."""
    path = os.path.join(output_dir, config.metrics_file)
    found = {}
    for record in read_records(path):
        if any(k.startswith("eval_") or k == "train_runtime" for k in record):
            continue
        for key, value in _numeric(record).items():
            if key not in ("step", "epoch"):
                found[key] = (value, record.get("step"))
    return found


def _numeric(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def results(output_dir: str, config, result: dict) -> str:
    """The final metrics: the last training log next to the final evaluation, the run's totals, the iterations of
    an iterative run, and the training-curve PNGs."""
    train = last_train_values(output_dir, config)
    evaluation = {k[len("eval_"):]: v for k, v in _numeric(result).items() if k.startswith("eval_")}
    out = []
    if train or evaluation:
        names = list(dict.fromkeys([*train, *evaluation]))
        rows = [[f"`{n}`", *([_cell(train[n][0]), str(train[n][1])] if n in train else ["", ""]),
                 _cell(evaluation[n]) if n in evaluation else ""] for n in names]
        out.append("### Final metrics\n\n" + _table(["metric", "train (last logged)", "at step", "eval (end)"], rows))
    totals = {k: v for k, v in _numeric(result).items() if not k.startswith("eval_")}
    if totals:
        rows = [[f"`{k}`", _cell(v)] for k, v in totals.items()]
        out.append("### Run totals\n\n" + _table(["metric", "value"], rows))
    iterations = [_numeric(r) for r in result.get("iterations") or []]
    if iterations:
        keys = list(dict.fromkeys(k for r in iterations for k in r))
        out.append("### Iterations\n\n" + _table([f"`{k}`" for k in keys],
                                                [[_cell(r[k]) if k in r else "" for k in keys] for r in iterations]))
    plots = sorted(glob.glob(os.path.join(output_dir, "plots", "*.png")))
    if plots:
        out.append("### Training curves\n\n" + "\n\n".join(
            f"![{os.path.splitext(os.path.basename(p))[0]}](plots/{os.path.basename(p)})" for p in plots))
    return "\n\n".join(out) if out else "No metrics were recorded."


def reproduce(info: dict) -> str:
    many = info["processes"] > 1
    launch = (f"\n\nThe run used {info['processes']} processes: start the same command under `accelerate launch` "
              f"(e.g. `accelerate launch --num_processes {info['processes']} recipes/{info['recipe']}.py` with the "
              "same arguments).") if many else ""
    return (f"With align {info['versions'].get('align', '?')} (tokens and keys are never recorded; give them again "
            f"through the environment, e.g. `HF_TOKEN`):\n\n```bash\n{info['command']}\n```{launch}")


def citations(methods: list[str]) -> str:
    blocks, seen = [], set()
    for key in methods:
        method = METHODS.get(key)
        if method is None or not method.bibtex or method.bibtex in seen:
            continue
        seen.add(method.bibtex)
        blocks.append(f"Cite {method.title} as:\n\n```bibtex\n{method.bibtex}\n```")
    blocks.append(f"Cite TRL as:\n\n```bibtex\n{TRL_BIB}\n```")
    return "\n\n".join(blocks)
