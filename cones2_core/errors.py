"""The one exception type of this pack, so users and tests can tell our errors from crashes."""


class Cones2Error(ValueError):
    """A bad input or setting; the message says what to connect or change."""
