"""peft-ft: parameter-efficient fine-tuning of encoder and seq2seq models from TOML recipes."""

from peft_ft.version import __version__  # noqa: F401


def __getattr__(name):
    # Heavy entry points are imported on first use so `import peft_ft` (and the CLI) stays instant.
    if name == "load_run":
        from peft_ft.rundir.load import load_run

        return load_run
    if name == "run":
        from peft_ft.engine.run import run

        return run
    if name == "pipeline":
        from peft_ft.serving.pipelines import pipeline

        return pipeline
    raise AttributeError(f"module 'peft_ft' has no attribute {name!r}")
