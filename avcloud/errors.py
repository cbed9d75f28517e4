"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from a user (file, config, argument, message): the message names what is wrong."""


class ConfigError(UserError):
    """A configuration file or parameter is invalid."""


class DataError(UserError):
    """A data file (scene, trace, profile) is missing, unreadable or malformed."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so every `finally`,
    `with` and pool shutdown runs on the way out (the CLI exits 143)."""
