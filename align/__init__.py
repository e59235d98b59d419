"""align: LLM post-training alignment (preference and RL objectives) on HF Accelerate."""

__version__ = "0.1.0"
