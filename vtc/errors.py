"""One exception type for configurations that cannot work, raised before any model is built."""


class ConfigError(ValueError):
    """A configuration value that cannot work. The message names the key to change."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
