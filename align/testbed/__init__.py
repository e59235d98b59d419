"""The embedded testbed: a tiny Llama-style model, a locally trained tokenizer, and synthetic
verifiable arithmetic tasks, all built offline and saved as ordinary HF folders. A plugin of the library:
:mod:`align.testbed.plugin` owns the ``testbed:`` model and dataset names."""
