"""Errors a user can fix. The CLI prints their message as one sentence and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed CSV, an incompatible run folder."""


class ImageError(UserError):
    """An image that cannot be decoded (corrupt, zero bytes, unsupported).

    `permanent` is False for a failure that may pass (an I/O error reading the file): such a photo
    is tried again next time; a permanent one is remembered by the caches and not retried until
    the file changes."""

    def __init__(self, message: str, permanent: bool = True):
        super().__init__(message)
        self.permanent = permanent
