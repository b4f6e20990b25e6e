"""One exception type for everything a user can get wrong.

Every message says *what* is wrong, *where* (file, key, layer) and *how to fix it*.
The CLI prints these without a traceback.
"""


class QuantkitError(Exception):
    """A user-facing error: bad input, bad recipe, bad checkpoint, unsupported model."""


class RecipeError(QuantkitError):
    pass


class CheckpointError(QuantkitError):
    pass


class ModelSourceError(QuantkitError):
    pass


class DataError(QuantkitError):
    """Calibration (or evaluation) data a user supplied that cannot be used as it is."""


class NumericalError(QuantkitError):
    """A quantizer met numbers it cannot work with (non-PD Hessian, NaN/inf)."""


def pydantic_message(e, where: str) -> str:
    """Turn a pydantic ValidationError into one line per bad key, each naming the key."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        lines.append(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)
