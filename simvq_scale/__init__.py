"""simvq-scale: a distributed trainer for SimVQ tokenizers."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import simvq_scale` stays light (no torch model code) for tools that only need the config.
    if name in ("load_tokenizer", "Tokenizer"):
        from simvq_scale import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'simvq_scale' has no attribute {name!r}")
