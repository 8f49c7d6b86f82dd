"""The exceptions peftlab raises. Every message names the field, the value and what is allowed."""


class PeftlabError(Exception):
    """Base class of every error peftlab raises on purpose."""


class ValidationError(PeftlabError, ValueError):
    """Bad input, caught before any expensive work."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")


class UnknownNameError(PeftlabError, KeyError):
    """A component name that no loaded plugin provides."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(name)

    def __str__(self) -> str:
        known = ", ".join(self.known) or "(none registered)"
        return f"unknown {self.kind} {self.name!r}; known {self.kind}s: {known}"


class PluginError(PeftlabError):
    """A plugin failed to load or to register its components (fatal only in strict mode)."""


class MissingDependency(PluginError):
    """A component needs a program or package this machine lacks (a Java runtime, an optional
    package). Raised by a component's constructor, it is not the author's mistake: the component
    stays registered, and building it says what to install."""
