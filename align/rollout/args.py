"""The rollout options, defined once for every trainer that generates (RL, the online preference trainers, the
iterative driver): ``rollout: hf | vllm | vllm-server`` and the vLLM knobs, checked before training.

A trainer's arguments inherit :class:`RolloutArguments` (the ``rollout`` part), build their engine with
:func:`align.rollout.build_engine` and push weights with :class:`align.rollout.sync.WeightSync`.
"""

from __future__ import annotations

from dataclasses import dataclass

from align.args import option
from align.errors import ConfigError
from align.timeouts import REQUEST_TIMEOUT_S, check_timeout

ROLLOUTS = ("hf", "vllm", "vllm-server")
SYNCS = ("http", "collective")


@dataclass
class RolloutArguments:
    part = "rollout"

    rollout: str = option("hf", f"Rollout engine, one of {ROLLOUTS}.")
    vllm_sync_steps: int = option(1, "Push the policy's weights to vLLM before a generation when this many optimizer "
                                     "steps have passed since the last push (1: always the newest weights).")
    vllm_gpu_memory_utilization: float = option(0.3, "rollout: vllm: share of GPU memory (CPU: of RAM) vLLM may take.")
    vllm_enable_sleep_mode: bool = option(False, "rollout: vllm (CUDA only): offload vLLM's weights and free its KV "
                                                 "cache between generations.")
    vllm_tensor_parallel_size: int = option(1, "rollout: vllm: tensor-parallel size of the colocated engine: 1 (it "
                                               "takes weight pushes in this process; several trainer processes run "
                                               "an engine each); a tensor-parallel engine is `align serve "
                                               "--tensor-parallel-size N` with rollout: vllm-server.")
    vllm_server_host: str = option("127.0.0.1", "rollout: vllm-server: host of `align serve`.")
    vllm_server_port: int = option(8000, "rollout: vllm-server: port of `align serve`.")
    vllm_timeout_s: float = option(60.0, "rollout: vllm-server: the longest silence of the server (it sends a "
                                         "heartbeat every 0.25 s while it generates or loads weights), and with "
                                         "vllm_sync: collective the longest wait of the weight group (joining, each "
                                         "bucket); then the run stops naming the server and what it waited for.")
    vllm_sync: str = option("http", f"rollout: vllm-server: how weights reach the server, one of {SYNCS}: http (one "
                                    "safetensors body per push) or collective (a process group with the server's "
                                    "workers, NCCL on GPUs, gloo on the CPU; HTTP carries only control messages).")
    vllm_group_port: int = option(51216, "rollout: vllm-server, vllm_sync: collective: the port on the server's host "
                                         "for the weight group's store (the server binds it; it must be reachable "
                                         "from the trainer, as the group's own connections must).")
    vllm_bucket_mb: float = option(128.0, "rollout: vllm-server, vllm_sync: collective: the most MiB of weights "
                                          "broadcast at once (a larger single weight goes alone); each side holds "
                                          "one bucket beyond the model.")
    vllm_lora_adapter: bool = option(True, "use_peft with rollout: vllm / vllm-server: push only the LoRA adapter "
                                           "to vLLM's LoRA path (the server needs align serve --max-lora-rank; "
                                           "without it the merged weights go, said once); false: always the "
                                           "merged weights.")
    vllm_request_timeout_s: float = option(REQUEST_TIMEOUT_S, "rollout: vllm-server: the longest one request (a "
                                                              "generation, a weight push) may take in all, heartbeats "
                                                              "or not; then the run stops naming the server, the "
                                                              "request and this option. At least vllm_timeout_s.")

    def validate(self, world: int) -> None:
        """One-line ConfigErrors for rollout options that cannot work with ``world`` processes (before any model)."""
        if self.rollout not in ROLLOUTS:
            raise ConfigError(f"rollout: must be one of {ROLLOUTS}, got {self.rollout!r}")
        if self.rollout == "hf":
            return
        if self.vllm_sync_steps < 1:
            raise ConfigError(f"vllm_sync_steps: must be >= 1, got {self.vllm_sync_steps}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization: must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        check_timeout("vllm_timeout_s", self.vllm_timeout_s)
        if self.vllm_timeout_s < 1:
            raise ConfigError(f"vllm_timeout_s: must be >= 1 (the server's heartbeats come every 0.25 s), got "
                              f"{self.vllm_timeout_s}")
        check_timeout("vllm_request_timeout_s", self.vllm_request_timeout_s)
        if self.vllm_request_timeout_s < self.vllm_timeout_s:
            raise ConfigError(f"vllm_request_timeout_s: must be >= vllm_timeout_s ({self.vllm_timeout_s:g}), got "
                              f"{self.vllm_request_timeout_s:g}")
        if not 0 < self.vllm_server_port < 65536:
            raise ConfigError(f"vllm_server_port: must be in 1..65535, got {self.vllm_server_port}")
        if not 1024 <= self.vllm_group_port < 65536:
            raise ConfigError(f"vllm_group_port: must be in 1024..65535 (the server binds it), got "
                              f"{self.vllm_group_port}")
        if self.vllm_sync not in SYNCS:
            raise ConfigError(f"vllm_sync: must be one of {SYNCS}, got {self.vllm_sync!r}")
        if self.vllm_sync == "collective" and self.rollout != "vllm-server":
            raise ConfigError("vllm_sync: collective is for rollout: vllm-server (the colocated engine loads the "
                              "weights in place in this process); use vllm_sync: http")
        if not 0 < self.vllm_bucket_mb <= 1 << 20:
            raise ConfigError(f"vllm_bucket_mb: must be in (0, 1048576], got {self.vllm_bucket_mb}")
        if self.vllm_sync == "collective" and self.vllm_group_port == self.vllm_server_port:
            raise ConfigError(f"vllm_group_port: {self.vllm_group_port} is the server's HTTP port (vllm_server_port); "
                              "pick another")
        if getattr(self, "use_peft", False) and self.vllm_lora_adapter:
            from align.rollout.lora import engine_rank

            engine_rank(getattr(self, "lora_r", 1))
        if self.rollout == "vllm":
            from align.rollout.vllm_engine import check_tensor_parallel, require_vllm

            require_vllm()
            if world > 1 and self.vllm_tensor_parallel_size != 1:
                raise ConfigError(f"vllm_tensor_parallel_size: with several trainer processes ({world}) each process "
                                  f"runs its own colocated engine of size 1, got {self.vllm_tensor_parallel_size}; "
                                  "use rollout: vllm-server for a tensor-parallel engine")
            check_tensor_parallel(self.vllm_tensor_parallel_size)
            if self.vllm_tensor_parallel_size != 1:  # vLLM would run the ranks in processes of its own
                raise ConfigError(f"vllm_tensor_parallel_size: {self.vllm_tensor_parallel_size}: a colocated engine "
                                  "takes weight pushes at size 1 only (in this process); for a tensor-parallel engine "
                                  "use rollout: vllm-server with align serve --tensor-parallel-size N")
            if self.vllm_enable_sleep_mode:
                import torch

                if not torch.cuda.is_available():
                    raise ConfigError("vllm_enable_sleep_mode: vLLM's sleep mode needs a CUDA GPU")
        elif self.vllm_enable_sleep_mode:
            raise ConfigError("vllm_enable_sleep_mode: only for rollout: vllm (the server manages its own memory)")
        elif self.vllm_tensor_parallel_size != 1:
            raise ConfigError("vllm_tensor_parallel_size: for rollout: vllm-server the server's size is set by "
                              "`align serve --tensor-parallel-size N`")

