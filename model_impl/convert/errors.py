"""The one error type of conversion: its message says what is wrong and what to do."""


class ConvertError(ValueError):
    """SRC cannot be read, mapped or recovered; nothing has been written to DST."""
