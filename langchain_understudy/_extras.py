"""Optional parts of the install: training, plots and the OpenAI teacher are extras.

The core install serves (llama.cpp, FAISS, the HTTP server); ``pip install
'langchain-understudy[train]'`` adds torch and transformers for distillation and export,
``[plots]`` matplotlib, ``[openai]`` the OpenAI-compatible teacher, ``[all]`` all of them.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from langchain_understudy.errors import ConfigError

__all__ = ["pyplot", "require"]

#: What each extra brings, by import name (checked without importing).
EXTRAS = {
    "train": ("torch", "transformers", "accelerate", "peft"),
    "plots": ("matplotlib",),
    "openai": ("langchain_openai",),
}


def require(extra: str, what: str) -> None:
    """Raise a clear error when the modules of ``extra`` are not installed.

    Args:
        extra: A key of :data:`EXTRAS`.
        what: What needs them, for the message ("distillation", "the OpenAI teacher").
    """
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        msg = (
            f"{what} needs {', '.join(missing)}, which the core install leaves out: "
            f"pip install 'langchain-understudy[{extra}]'"
        )
        raise ConfigError(msg)


def pyplot() -> ModuleType:
    """Matplotlib's pyplot on the file-only Agg backend (the ``plots`` extra)."""
    require("plots", "plotting")
    import matplotlib

    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
