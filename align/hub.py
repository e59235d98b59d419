"""Pushing a run to the Hugging Face Hub (docs/hub.md, ``## Push``): which files go, the merged LoRA copy, the
upload, and the background checkpoint uploads of ``hub_strategy: every_save``.

transformers' own Trainer never pushes nor creates a repository in align (:mod:`align.trainers.hub_sync`): the run
is saved locally first, then :func:`push_run` (called by :func:`align.recipe.finish_run` on the main process, after
the final save, evaluation, plots and card) uploads it in one commit with the ``huggingface_hub`` client. A failed
push is one :class:`~align.errors.HubError` line naming the repository and the cause; the local output is untouched,
and ``align push OUTPUT_DIR REPO_ID`` (:func:`push_saved`) retries from the saved folder with the same selection
(:func:`select_files`).

What goes: the final model (a LoRA adapter; with ``push_merged`` also ``merged/``, the adapter merged into its base
model, written locally first), tokenizer and chat template, ``align_config.yaml``, the metrics file, ``plots/*.png``,
``README.md`` (the card); iterative runs: ``iterations.jsonl``, the last iteration's model at the root and its
metrics, sampling statistics and pairs in ``iter-<t>/`` (every iteration with ``push_every_iteration``);
``every_save``: each complete ``checkpoint-<N>/``. Never: :data:`NEVER` (reference-log-prob caches, pickled
training arguments, optimizer / scheduler / RNG states, temporary files), a round's own checkpoints, any file that
holds the Hub token (the push stops instead), or a secret config key (never saved:
:func:`align.hub_args.is_secret`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass

from align.checkpoints import WEIGHTS, checkpoints, missing_parts
from align.errors import ConfigError, HubError
from align.hub_args import check_repo_id, check_revision

# Files of a saved model or adapter (top level of its folder).
MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
               "adapter_model.bin", "config.json", "generation_config.json", "adapter_config.json", "tokenizer*",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
               "vocab.json", "vocab.txt", "merges.txt", "spiece.model")
RUN_FILES = ("align_config.yaml", "README.md", "iterations.jsonl")  # + the metrics file and plots/*.png
ITERATION_FILES = ("metrics.json", "sampling.json", "pairs.jsonl")
# Never uploaded, whatever folder they are in (matched against every part of a file's path).
NEVER = ("ref_logps-*.pt", "training_args.bin", "optimizer*", "scheduler.pt", "scaler.pt", "rng_state*", "*.tmp",
         ".*")
OFFLINE = "HF_HUB_OFFLINE is set, so the Hub cannot be reached"
UNSCANNED = (".safetensors", ".bin", ".pt", ".pth")  # weights: not searched for the token
@dataclass(frozen=True)
class PushTarget:
    """Where and what to push (from a run's config: :func:`target_of`; from a saved folder: :func:`push_saved`)."""

    repo_id: str
    private: bool | None = None
    revision: str | None = None  # a branch, created from main when missing; None: main
    token: str | None = None  # None: $HF_TOKEN or the huggingface_hub login
    merged: bool = False  # LoRA: also merged/, the adapter merged into base_model
    checkpoints: bool = False  # every_save: every complete checkpoint-<N>/ too
    all_iterations: bool = False  # iterative: every iter-<t>/ with its model, not only the last one's records
    metrics_file: str = "metrics.jsonl"
    base_model: str | None = None
    torch_dtype: str = "float32"
    trust_remote_code: bool = False


def target_of(config) -> PushTarget:
    """The push a run's config asks for."""
    return PushTarget(
        repo_id=config.hub_model_id, private=config.hub_private_repo, revision=config.hub_revision,
        token=config.hub_token, merged=config.push_merged,
        checkpoints=getattr(config.hub_strategy, "value", config.hub_strategy) == "every_save",
        all_iterations=bool(getattr(config, "push_every_iteration", False)), metrics_file=config.metrics_file,
        base_model=config.model_name_or_path, torch_dtype=config.torch_dtype,
        trust_remote_code=config.trust_remote_code)


def failed(target: PushTarget, cause: str, output_dir: str | None = None) -> HubError:
    """The one-line error of a push that did not happen; with ``output_dir``, how to retry it."""
    retry = (f"; the run is saved in {output_dir!r}, retry with: align push {output_dir} {target.repo_id}"
             if output_dir else "")
    return HubError(f"push to {target.repo_id!r} failed: {cause}{retry}")


# --- which files --------------------------------------------------------------------------------------------------


def _never(remote: str) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in remote.split("/") for pattern in NEVER)


def _pick(folder: str, patterns, prefix: str = "") -> dict[str, str]:
    """The files at the top of ``folder`` that match ``patterns``, as {path in the repo: local path}."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return {prefix + n: os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))
            and any(fnmatch.fnmatch(n, p) for p in patterns) and not _never(n)}


def _walk(folder: str, prefix: str) -> dict[str, str]:
    """Every file under ``folder`` except :data:`NEVER`, as {path in the repo: local path}."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _never(d))
        rel = os.path.relpath(root, folder)
        for name in sorted(files):
            remote = prefix + (name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
            if not _never(remote):
                found[remote] = os.path.join(root, name)
    return found


def has_model(folder: str) -> bool:
    return os.path.isdir(folder) and bool(set(os.listdir(folder)).intersection(WEIGHTS))


def finished_iterations(output_dir: str) -> list[int]:
    """The iterations of an iterative run that finished (``iter-<t>/done``), in order."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else ():
        if name.startswith("iter-") and name[5:].isdigit() and os.path.isfile(os.path.join(output_dir, name, "done")):
            found.append(int(name[5:]))
    return sorted(found)


def iteration_files(output_dir: str, t: int, with_model: bool) -> dict[str, str]:
    """Iteration ``t``'s records (and model) as ``iter-<t>/...``; never its round's checkpoints."""
    patterns = ITERATION_FILES + (MODEL_FILES if with_model else ())
    return _pick(os.path.join(output_dir, f"iter-{t}"), patterns, f"iter-{t}/")


def checkpoint_files(folder: str) -> dict[str, str]:
    """A complete checkpoint's files as ``checkpoint-<N>/...``, without optimizer, scheduler and RNG states."""
    return _walk(folder, os.path.basename(folder.rstrip("/")) + "/")


def select_files(output_dir: str, target: PushTarget) -> dict[str, str]:
    """Every file a push of ``output_dir`` uploads, {path in the repo: local path} (module docstring). The merged
    copy must already be written (:func:`write_merged`)."""
    iterations = finished_iterations(output_dir)
    model_dir = os.path.join(output_dir, f"iter-{iterations[-1]}") if iterations else output_dir
    if not has_model(model_dir):
        raise failed(target, f"no final model in {output_dir!r} (no weights file such as model.safetensors or "
                             "adapter_model.safetensors): the run has not finished")
    files = _pick(model_dir, MODEL_FILES)
    files.update(_pick(output_dir, RUN_FILES))
    metrics = os.path.join(output_dir, target.metrics_file)
    if os.path.isfile(metrics):
        files[target.metrics_file.replace(os.sep, "/")] = metrics
    files.update(_pick(os.path.join(output_dir, "plots"), ("*.png",), "plots/"))
    for t in (iterations if target.all_iterations else iterations[-1:]):
        files.update(iteration_files(output_dir, t, with_model=target.all_iterations))
    if target.merged:
        files.update(_pick(os.path.join(output_dir, "merged"), MODEL_FILES, "merged/"))
    if target.checkpoints:
        for folder in checkpoints(output_dir):
            if not missing_parts(folder):
                files.update(checkpoint_files(folder))
    return files


def check_no_token(files: dict[str, str], token: str | None, target: PushTarget) -> None:
    """Refuse to upload a file that holds the token (weights are not searched)."""
    if not token:
        return
    needle = token.encode()
    for remote, local in files.items():
        if not local.endswith(UNSCANNED):
            with open(local, "rb") as fh:
                if needle in fh.read():
                    raise failed(target, f"{remote} contains the Hub token; remove it from that file")


# --- the merged copy of a LoRA adapter ----------------------------------------------------------------------------


def write_merged(output_dir: str, target: PushTarget) -> str:
    """``output_dir/merged``: the LoRA adapter in ``output_dir`` merged into its base model, with the tokenizer;
    written in a staging folder and renamed into place (whole or absent), kept when newer than the adapter."""
    final = os.path.join(output_dir, "merged")
    adapter = os.path.join(output_dir, "adapter_config.json")
    if not os.path.isfile(adapter):
        raise failed(target, f"push_merged / --merged: {output_dir!r} holds no LoRA adapter (adapter_config.json)")
    if has_model(final) and os.path.getmtime(final) >= os.path.getmtime(adapter):
        return final
    from peft import PeftModel

    from align.modeling import load_model, load_tokenizer

    base = target.base_model
    if not base:
        with open(adapter, encoding="utf-8") as fh:
            base = json.load(fh).get("base_model_name_or_path")
    model = load_model(base, target.torch_dtype, None, target.trust_remote_code, key="push_merged")
    model = PeftModel.from_pretrained(model, output_dir).merge_and_unload()
    stage = tempfile.mkdtemp(prefix=".merged.", suffix=".tmp", dir=output_dir)
    try:
        model.save_pretrained(stage)
        load_tokenizer(output_dir, target.trust_remote_code).save_pretrained(stage)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(stage, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


# --- the upload ---------------------------------------------------------------------------------------------------


def describe(err: BaseException, endpoint: str) -> str:
    """What went wrong, in a few words, from a ``huggingface_hub`` / HTTP error."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return OFFLINE
    response = getattr(err, "response", None)
    if isinstance(err, HfHubHTTPError) and response is not None:
        code = response.status_code
        said = (getattr(err, "server_message", None) or "").strip().splitlines()
        detail = f": {said[0]}" if said else ""
        if code == 401:
            return (f"the Hub refused the token (401 Unauthorized{detail}); set hub_token or HF_TOKEN, or run "
                    "`hf auth login`")
        if code == 403:
            return f"no write access (403 Forbidden{detail}); check the token's permissions and the namespace"
        return f"the Hub answered {code} {response.reason_phrase}{detail}"
    first = (str(err).strip().splitlines() or [""])[0]
    if type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
        return f"cannot reach {endpoint} ({type(err).__name__}: {first})"
    return f"{type(err).__name__}: {first}"


def upload(target: PushTarget, files: dict[str, str], message: str, output_dir: str | None = None) -> str:
    """Create the repository (and branch) if needed and upload ``files`` in one commit; returns the commit URL.
    Files the Hub already holds unchanged are skipped by the client. HubError (one line) on any failure."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    if constants.is_offline_mode():
        raise failed(target, OFFLINE, output_dir)
    token = target.token or get_token()
    if not token:
        raise failed(target, "no Hub token; set hub_token or HF_TOKEN, or run `hf auth login`", output_dir)
    check_no_token(files, token, target)
    api = HfApi(token=token)
    try:
        repo = api.create_repo(target.repo_id, private=target.private, exist_ok=True).repo_id
        if target.revision:
            api.create_branch(repo, branch=target.revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=remote, path_or_fileobj=local) for remote, local in files.items()]
        info = api.create_commit(repo, ops, commit_message=message, revision=target.revision)
    except Exception as err:  # noqa: BLE001 - every failure of the transfer is the user's one line
        raise failed(target, describe(err, api.endpoint), output_dir) from None
    return info.commit_url


def push(output_dir: str, target: PushTarget) -> str:
    """Push the saved run in ``output_dir`` (waiting first for its background uploads); returns the commit URL."""
    wait_background(output_dir)
    if target.merged:
        write_merged(output_dir, target)
    files = select_files(output_dir, target)
    url = upload(target, files, f"align: upload {os.path.basename(os.path.abspath(output_dir))}", output_dir)
    where = f" (branch {target.revision})" if target.revision else ""
    print(f"pushed {len(files)} files to {target.repo_id}{where}: {url}", flush=True)
    return url


def push_run(output_dir: str, config) -> str | None:
    """The end-of-run push (main process only; nothing unless ``push_to_hub``): the commit URL, or HubError."""
    if not getattr(config, "push_to_hub", False) or os.environ.get("RANK", "0") != "0":
        return None
    return push(output_dir, target_of(config))


def push_saved(output_dir: str, repo_id: str, private: bool | None = None, merged: bool = False,
               revision: str | None = None) -> str:
    """``align push``: push a saved run folder with the file selection its ``align_config.yaml`` asked for
    (``push_merged``, ``hub_strategy``, ``push_every_iteration``, ``metrics_file``); repository, branch and
    privacy come from the arguments."""
    from align.config import read_yaml

    check_repo_id(repo_id, "REPO_ID")
    if revision is not None:
        check_revision(revision, "--revision")
    saved = os.path.join(output_dir, "align_config.yaml")
    if not os.path.isfile(saved):
        raise ConfigError(f"OUTPUT_DIR: {output_dir!r} has no align_config.yaml, so it is not an align run folder")
    cfg = read_yaml(saved)
    target = PushTarget(
        repo_id=repo_id, private=private, revision=revision, merged=merged or bool(cfg.get("push_merged")),
        checkpoints=cfg.get("hub_strategy") == "every_save", all_iterations=bool(cfg.get("push_every_iteration")),
        metrics_file=cfg.get("metrics_file") or "metrics.jsonl", base_model=cfg.get("model_name_or_path"),
        torch_dtype=cfg.get("torch_dtype") or "float32", trust_remote_code=bool(cfg.get("trust_remote_code")))
    return push(output_dir, target)


# --- background uploads (every_save checkpoints, push_every_iteration) --------------------------------------------


class BackgroundUploads:
    """Folders of one run uploaded one after another by one daemon thread: at most one upload in flight, training
    never waits. A failure is reported once, as one line on stderr, and training goes on; the final push (which
    waits for this queue) uploads whatever is missing."""

    def __init__(self, target: PushTarget):
        self.target = target
        self.jobs: queue.Queue = queue.Queue()
        self.uploaded: list[str] = []
        self.failures = 0
        threading.Thread(target=self._work, name="align-hub-uploads", daemon=True).start()

    def submit(self, name: str, select) -> None:
        """Upload ``select()`` (files chosen when the upload starts) as commit ``name``."""
        self.jobs.put((name, select))

    def wait(self) -> None:
        self.jobs.join()

    def _work(self) -> None:
        while True:
            name, select = self.jobs.get()
            try:
                files = select()
                if files:
                    upload(self.target, files, f"align: upload {name}")
                    self.uploaded.append(name)
            except Exception as err:  # noqa: BLE001 - reported, never raised into training
                self.failures += 1
                if self.failures == 1:
                    print(f"warning: background upload of {name}: {err}; training goes on, the final push uploads "
                          "it again", file=sys.stderr, flush=True)
            finally:
                self.jobs.task_done()


ACTIVE: dict[str, BackgroundUploads] = {}  # output_dir (absolute) -> its uploads
_LOCK = threading.Lock()


def upload_in_background(output_dir: str, target: PushTarget, name: str, select) -> BackgroundUploads:
    """Queue ``select()`` for upload as ``name`` on ``output_dir``'s background uploader (started on first use)."""
    key = os.path.abspath(output_dir)
    with _LOCK:
        if key not in ACTIVE:
            ACTIVE[key] = BackgroundUploads(target)
        uploads = ACTIVE[key]
    uploads.submit(name, select)
    return uploads


def wait_background(output_dir: str) -> BackgroundUploads | None:
    """Wait for ``output_dir``'s background uploads to finish, and retire its uploader."""
    with _LOCK:
        uploads = ACTIVE.pop(os.path.abspath(output_dir), None)
    if uploads is not None:
        uploads.wait()
    return uploads


def push_iteration(config, t: int) -> None:
    """``push_every_iteration``: queue iteration ``t``'s folder (model and records) for a background upload as
    ``iter-<t>/`` (main process; nothing unless ``push_to_hub``)."""
    if not (config.push_to_hub and config.push_every_iteration) or os.environ.get("RANK", "0") != "0":
        return
    out = config.output_dir
    upload_in_background(out, target_of(config), f"iter-{t}", lambda: iteration_files(out, t, with_model=True))
