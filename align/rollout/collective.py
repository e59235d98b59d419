"""``vllm_sync: collective``: the weight channel between the trainer's main process and ``align serve``'s vLLM workers.

One process group of ``1 + tensor_parallel_size`` members, outside either side's global process group (its own
TCP store, hosted by the server on ``vllm_group_port``; NCCL on GPUs, gloo on the CPU): the trainer is rank 0 and
the source of every broadcast, each vLLM worker a receiver. HTTP carries only control messages (join, the plan of
a push, leave; :mod:`align.rollout.serve_collective` and :class:`align.rollout.remote.ServerEngine`).

A push is a :func:`plan` of buckets: each bucket at most ``bucket_mb`` of consecutive weights (a larger weight
alone) packed as bytes into one flat tensor, broadcast, unpacked on each worker into views under the weights'
names and loaded in place with vLLM's ``reload_weights`` (every worker receives every weight; vLLM's loader keeps
its own tensor-parallel slice). The trainer packs one bucket at a time from the policy's tensors (a sharded
policy's DTensors or ZeRO-3 partitions gathered one tensor at a time, :func:`full_weight`) while the bucket before
is on the wire, and each worker receives the next bucket while vLLM loads the last, so neither side holds more than
two buckets beyond the model.

Every wait is bounded: the group is created with ``timeout_s`` (store, connection, each collective), so a peer
that dies or stalls ends the wait with an error instead of a hang; :meth:`WeightGroup.close` tears the group
down and is called on every exit path of both sides.
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch

from align.rollout.lora_worker import AdapterReceiver

BACKENDS = ("gloo", "nccl")
STORE_PREFIX = "align-weights"


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def offered_backends() -> list[str]:
    """What this process can join a weight group with: NCCL first where there is a GPU, gloo always."""
    return ["nccl", "gloo"] if torch.cuda.is_available() else ["gloo"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan(specs, bucket_mb: float) -> list[list[list]]:
    """``specs``: ``(name, dtype name, shape)`` in push order; returns buckets, each a list of ``[name, dtype name,
    shape, byte offset, byte count]`` whose bytes add up to at most ``bucket_mb`` MiB (a larger weight alone).
    Every entry starts at a multiple of 16 bytes, so each view is aligned for its dtype."""
    cap = max(1, int(bucket_mb * (1 << 20)))
    buckets, current, used = [], [], 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        start = -(-used // 16) * 16
        if current and start + size > cap:
            buckets.append(current)
            current, start = [], 0
        current.append([name, dtype, list(shape), start, size])
        used = start + size
    if current:
        buckets.append(current)
    return buckets


def bucket_bytes(bucket) -> int:
    return max(offset + size for *_, offset, size in bucket)


def pack(bucket, tensors: dict, device) -> torch.Tensor:
    """The bucket's weights (``tensors[name]``) as one flat uint8 tensor on ``device``."""
    flat = torch.empty(bucket_bytes(bucket), dtype=torch.uint8, device=device)
    for name, _, _, offset, size in bucket:
        t = full_weight(tensors[name]).detach().contiguous()
        flat[offset:offset + size].copy_(t.reshape(-1).view(torch.uint8), non_blocking=False)
    return flat


def unpack(bucket, flat: torch.Tensor):
    """``(name, tensor)`` views into ``flat`` for each entry of ``bucket``."""
    for name, dtype, shape, offset, size in bucket:
        yield name, flat[offset:offset + size].view(getattr(torch, dtype)).view(shape)


def full_weight(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded DTensor or a ZeRO-3 partitioned parameter gathered (a collective: every trainer process
    calls it in the same order, :func:`gathers`)."""
    full = getattr(t, "full_tensor", None)
    if full is not None:
        return full()
    if hasattr(t, "ds_id"):
        from align.zero3 import whole_tensor

        return whole_tensor(t)
    return t


class InOrder:
    """A push's ``(name, tensor)`` pairs read by name in their own order (what :func:`pack` reads): each whole
    tensor is made (gathered, merged) only when its turn comes, so no more than one is held at a time."""

    def __init__(self, pairs):
        self.pairs = iter(pairs)

    def __getitem__(self, name: str) -> torch.Tensor:
        got, tensor = next(self.pairs)
        if got != name:
            raise RuntimeError(f"weight push: {got} came where the plan has {name}")
        return tensor


def gathers(t: torch.Tensor) -> bool:
    """Whether :func:`full_weight` of ``t`` is a collective every trainer process takes part in."""
    return hasattr(t, "full_tensor") or hasattr(t, "ds_id")


def has_shards(model) -> bool:
    """Whether ``model`` holds any weight sharded (a DTensor) or partitioned (ZeRO-3): reading it whole, with
    :func:`full_weight`, is then a collective."""
    return any(gathers(p) for p in model.parameters())


def weight_shape(t: torch.Tensor) -> tuple:
    """The whole shape of ``t`` (a ZeRO-3 parameter's own shape is that of its empty placeholder)."""
    return tuple(getattr(t, "ds_shape", t.shape))


class InFlight:
    """A broadcast under way: :meth:`wait` (at most the group's timeout) returns its tensor once it is complete.
    Pushes keep one bucket in flight while the next is packed (sender) or the last is loaded (receiver)."""

    def __init__(self, work, flat: torch.Tensor, timeout: timedelta):
        self.work, self.flat, self.timeout = work, flat, timeout

    def wait(self) -> torch.Tensor:
        self.work.wait(self.timeout)
        return self.flat


class WeightGroup:
    """This process's membership of a weight group (``rank`` of ``world``) on the TCP store at ``host:port`` (the
    server hosts it, :mod:`align.rollout.serve_collective`). Construction waits at most ``timeout_s`` for the other
    members; so does every collective afterwards."""

    def __init__(self, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float,
                 session: str):
        from torch.distributed import PrefixStore, TCPStore

        self.rank, self.world, self.backend, self.timeout = rank, world, backend, timedelta(seconds=timeout_s)
        self.store = TCPStore(host, port, world_size=None, is_master=False, timeout=self.timeout,
                                       wait_for_workers=False, use_libuv=True)
        prefixed = PrefixStore(f"{STORE_PREFIX}/{session}", self.store)
        if backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            self.pg = ProcessGroupGloo(prefixed, rank, world, self.timeout)
            self.device = torch.device("cpu")
        else:
            from torch.distributed import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.pg = ProcessGroupNCCL(prefixed, rank, world, options)
            self.device = torch.device("cuda", torch.cuda.current_device())

    def start(self, flat: torch.Tensor) -> InFlight:
        """Start broadcasting rank 0's ``flat`` into every member's ``flat`` (same size); the caller waits on the
        answer (at most ``timeout_s``) and keeps ``flat`` until then."""
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, self.timeout
        return InFlight(self.pg.broadcast([flat], opts), flat, self.timeout)

    def broadcast(self, flat: torch.Tensor) -> None:
        """Rank 0's ``flat`` into every member's ``flat`` (same size); waits at most ``timeout_s``."""
        self.start(flat).wait()

    def close(self) -> None:
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None:
            for name in ("abort", "shutdown"):
                try:
                    getattr(pg, name)()
                    break
                except Exception:  # noqa: S112 (one of them exists and works per backend; a dead peer may make it raise)
                    continue
        self.store = None


class WeightReceiver(AdapterReceiver):
    """vLLM worker extension (``worker_extension_cls``): the worker's end of the weight group (and of an adapter
    push, :class:`align.rollout.lora_worker.AdapterReceiver`). Methods are called
    through ``LLM.collective_rpc`` by :mod:`align.rollout.serve_collective`; their names start with ``align_`` so
    they never shadow a vLLM worker method."""

    def align_load_weights(self, payload: bytes) -> None:
        """An HTTP push's body (safetensors) loaded in place. A tensor-parallel server's workers are processes of
        their own: the bytes travel to each in vLLM's messages (tensors would arrive undecoded), and each worker
        keeps its slice."""
        from safetensors.torch import load

        self.reload_weights(weights_iterator=iter(load(payload).items()), is_checkpoint_format=True)

    def align_join(self, host: str, port: int, world: int, backend: str, timeout_s: float, session: str) -> None:
        self.align_leave()
        rank = 1 + _worker_rank(self)
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        self.align_group = WeightGroup(host, port, rank, world, backend, timeout_s, session)

    def align_receive(self, buckets: list) -> int:
        """Receive ``buckets`` (a :func:`plan`) from rank 0 and load them in place; returns the bytes received. A
        broadcast that breaks off ends the weights early, so vLLM's reload finishes (layers not reached keep their
        weights; an exception inside the reload would leave the model unloadable), then raises: the engine holds a
        mix of two versions until the next complete push (:class:`align.rollout.server.RolloutServer` refuses to
        generate until then)."""
        group = getattr(self, "align_group", None)
        if group is None:
            raise RuntimeError("this worker is not in a weight group (POST /collective/join first)")
        received, broken = 0, []

        def receive(k: int) -> InFlight:
            return group.start(torch.empty(bucket_bytes(buckets[k]), dtype=torch.uint8, device=group.device))

        def weights():  # bucket k+1 arrives while vLLM loads bucket k (at most two buckets held)
            nonlocal received
            pending = None
            for k, bucket in enumerate(buckets):
                try:
                    flat = (pending or receive(k)).wait()
                    pending = receive(k + 1) if k + 1 < len(buckets) else None
                except Exception as err:
                    broken.append(err)
                    return
                received += flat.numel()
                yield from unpack(bucket, flat)

        try:
            self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        except BaseException:
            self.align_leave()
            raise
        if broken:
            self.align_leave()  # a broken broadcast leaves the group unusable: tear it down here too
            raise RuntimeError(f"the weight broadcast broke off after {received} bytes: "
                               f"{str(broken[0]).splitlines()[0][:200]}")
        return received

    def align_leave(self) -> None:
        group = getattr(self, "align_group", None)
        self.align_group = None
        if group is not None:
            group.close()


def _worker_rank(worker) -> int:
    """The worker's tensor-parallel rank (0 for a single worker)."""
    return int(getattr(worker, "rank", 0) or 0)
