"""One exception type for configurations that cannot work, raised before any model is built."""


class ConfigError(ValueError):
    """A configuration value that cannot work. The message names the key to change."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


def exit_on_config_error(fn):
    """Entry points: a ``ConfigError`` ends the process with its message alone (exit status 2),
    not a traceback; it is the user's to fix, and the message names the key."""
    import functools
    import sys

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            print(f"vtc: configuration refused, nothing was built or run.\n  {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
