"""The one exception type our nodes raise for bad input: ComfyUI shows its text as the node's error."""


class TurboError(ValueError):
    """A problem with what the user fed a Turbo node; the message names the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(f"comfy-turbo: {message}")
