"""What every config dialect returns: :class:`Translation`; "empty means unset" (:func:`is_unset`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Translation:
    """A config translated into plugtune's recipe keys.

    Attributes:
        data: the plugtune recipe mapping (still to be validated).
        dialect: ``"plugtune"``, ``"axolotl"``, ``"LLaMA-Factory"`` or ``"TRL"``.
        notices: one line per key that was mapped with a caveat or ignored (printed once).
        resume: ``True`` / a checkpoint path when the config asks to resume (``plugtune train``
            then resumes as with ``--resume``), else ``None``.
    """

    data: dict[str, Any]
    dialect: str = "plugtune"
    notices: list[str] = field(default_factory=list)
    resume: bool | str | None = None
    foreign_keys: frozenset[str] = frozenset()

    def explain(self, message: str) -> str:
        """Reword validation errors on keys the dialect knows but no installed part of plugtune
        takes (a training method's key, e.g. ``kto_desirable_weight`` without a KTO method):
        they are the tool's keys, never "unknown"."""
        if not self.foreign_keys:
            return message
        out = []
        for line in message.splitlines():
            key, sep, rest = line.strip().partition(": unknown key")
            if sep and key in self.foreign_keys:
                method = self.data.get("rl") or ("reward" if self.data.get("reward_model") else None)
                why = (f"a key of the {method} training method, which is not installed"
                       if method else "a key of a training method (rl:) this config does not set")
                line = f"  {key}: {self.dialect}'s key, but {why}"
            out.append(line)
        return "\n".join(out)

    def summary(self, source: str) -> str:
        """The one line ``plugtune train`` prints: what was detected and how it was read."""
        if self.dialect == "plugtune":
            return f"plugtune: {source}: plugtune recipe"
        extra = f", {len(self.notices)} notice(s)" if self.notices else ""
        article = "an" if self.dialect[0].lower() in "aeiou" else "a"
        return (f"plugtune: {source}: detected {article} {self.dialect} config; translated to a plugtune "
                f"recipe ({len(self.data)} keys{extra}; `plugtune recipe convert {source}` "
                "prints it)")


def is_unset(value: Any) -> bool:
    """Empty YAML values mean "unset" (``wandb_project:`` reads as ``None``)."""
    return value is None or (isinstance(value, str | list | dict) and len(value) == 0)
