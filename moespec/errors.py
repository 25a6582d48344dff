"""The one exception type users see: a one-line message naming what is wrong."""


class MoespecError(Exception):
    """Bad input or an unsupported request. The CLI prints its message alone, without a traceback."""
