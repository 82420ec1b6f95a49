"""The one error sail-chat reports itself: bad input, said in one line (the CLI exits with code 2)."""


class ChatError(ValueError):
    """Input sail-chat cannot use; the message is one line that names the argument at fault."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split("\n")))
