"""One-line errors for bad inputs; all are ValueErrors so callers can catch them as such."""


class PreprocessError(ValueError):
    """Base class: a checkpoint, image or prompt that cannot be turned into model inputs."""


class ImageError(PreprocessError):
    """An image that cannot be read (missing, empty, truncated, not an image, too large)."""


class PromptError(PreprocessError):
    """A prompt that cannot be encoded (bad <box>/<point> content, coordinates out of range, too long)."""


class ImageWarning(UserWarning):
    """An image that is read, but that the user should hear about (e.g. very large); the message is
    one line naming the file. Emitted with warnings.warn, so an application can show it its own way."""
