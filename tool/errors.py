"""The two failures a user is told about in one line, without a traceback (see tool.cli.run_main)."""


class InputError(ValueError):
    """A user mistake (bad path, bad file, bad value), reported as one line without traceback."""


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; training stops and keeps the last good checkpoint."""
