"""The one exception type the CLI turns into a single clear line instead of a traceback."""


class FedsynthError(Exception):
    """Bad input or a refused request: the message names what, where and why."""
