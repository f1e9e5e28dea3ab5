"""Errors that name the file or row at fault, so a user can act on them."""


class MedClipSamError(Exception):
    """Base class for errors this package raises on purpose."""


class InputError(MedClipSamError):
    """An input file or value cannot be used; the message names it and the problem."""


class PromptError(MedClipSamError):
    """A prompt (box or point) is malformed or does not fit its image."""


class ModelError(MedClipSamError):
    """A model or checkpoint cannot be found, read or built."""
