"""The engine's end of a LoRA adapter push that skips the adapter file (vLLM worker extension, ``align_`` methods).

The first push of an adapter goes through vLLM's own path (:class:`align.rollout.lora.AdapterSlot` writes PEFT's
files and calls ``add_lora``), so vLLM's loader checks it: a rank, target module or format it cannot take is refused
then, before training. Every later push of the same adapter (same config, same tensor names: only the values move)
hands the tensors to :meth:`AdapterReceiver.align_replace_adapter` through ``LLM.collective_rpc``, which builds
vLLM's ``LoRAModel`` from them in memory, the way vLLM's loader does after reading the file, and swaps it into the
adapter's slot: no file written or read, no config parsed again. In a tensor-parallel server every worker runs it and
keeps its own slice, as with the file.
"""

from __future__ import annotations


class AdapterReceiver:
    """vLLM worker extension (``worker_extension_cls``): replace a loaded adapter's weights from tensors."""

    def align_replace_adapter(self, lora_id: int, config: dict, tensors: dict | bytes) -> None:
        """``tensors``: PEFT's names to tensors (an engine in this process), or those as one safetensors body (an
        engine whose workers are processes of their own: vLLM's messages carry bytes, not tensors, to them)."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed

        if isinstance(tensors, bytes):
            from safetensors.torch import load

            tensors = load(tensors)
        workers = self.model_runner.lora_manager
        manager = workers._adapter_manager  # vLLM's model-side manager (the pinned vLLM's layout)
        if lora_id not in manager.list_adapters():
            raise RuntimeError(f"adapter {lora_id} is not loaded in this engine (push it through add_lora first)")
        helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": workers.max_position_embeddings})
        helper.validate_legal(workers.lora_config)
        model = manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        lora = LoRAModel.from_lora_tensors(
            lora_model_id=lora_id, tensors=tensors, peft_helper=helper, device="cpu",
            dtype=workers.lora_config.lora_dtype, model_vocab_size=workers.vocab_size,
            weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            skip_prefixes=getattr(model, "lora_skip_prefixes", None))
        with gpu_sync_allowed():
            manager.remove_adapter(lora_id)
            manager.add_adapter(lora)
            manager.activate_adapter(lora_id)
