"""Error types. Every message is one line that names what was wrong and where."""


class LrcompileError(Exception):
    """Base class: a one-line message meant for the user, never a traceback to read."""


class PolicyError(LrcompileError, ValueError):
    """A policy file or dict that does not validate: names the file:line, the rule and the key."""


class SiteError(LrcompileError):
    """A site that cannot be rewritten as asked (raised only under `strict: true`)."""


class PlanError(LrcompileError, ValueError):
    """A saved plan that does not fit the model it is loaded into."""


def first_line(e: BaseException) -> str:
    """`Type: message` on one line: torch's and YAML's messages span several."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
