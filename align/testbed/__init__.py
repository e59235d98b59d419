"""The embedded testbed: a tiny Llama-style model, a locally trained tokenizer, and synthetic
verifiable arithmetic tasks, all built offline and saved as ordinary HF folders."""
