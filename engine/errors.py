"""Errors a user can fix. The CLI prints their message as one sentence and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed CSV, an incompatible run folder."""


class ImageError(UserError):
    """An image that cannot be decoded (corrupt, zero bytes, unsupported)."""
