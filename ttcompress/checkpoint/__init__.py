"""Checkpoints: every input kind (files, state dicts, Hugging Face directories), the header schema and
its validation, rebuilding a model from a header, metadata, architectures, and the small-file reader."""
