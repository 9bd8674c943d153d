"""The one exception type of this pack, so users and tests can tell our errors from crashes."""


import math

ECHO_CHARS = 60  # longest piece of user text an error message repeats back


class Cones2Error(ValueError):
    """A bad input or setting; the message says what to connect or change."""


def short(text: object, limit: int = ECHO_CHARS) -> str:
    """``text`` for an error message: cut to ``limit`` characters, saying how long it was."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s)} characters)"


def check_number(value: object, name: str, lo: float, hi: float) -> float:
    """``value`` as a float when it is a finite number in [lo, hi]; else a Cones2Error naming the range."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and lo <= number <= hi):
        raise Cones2Error(f"{name} = {short(repr(value))} is not allowed: it must be a finite number from {lo:g} "
                          f"to {hi:g}")
    return number
