"""What users touch: LangChain tools, ``load_understudy``, the REPL, the server and the demo.

Example:
    >>> from langchain_understudy.plugin import UnderstudyToolkit, load_understudy
    >>> llm = load_understudy("understudy.toml")  # doctest: +SKIP
    >>> tools = UnderstudyToolkit(llm=llm, knowledge=llm.knowledge).get_tools()  # doctest: +SKIP
"""

from langchain_understudy.plugin.loader import load_understudy
from langchain_understudy.plugin.tools import (
    AskUnderstudyTool,
    KnowledgeSearchTool,
    StudentTool,
    UnderstudyToolkit,
)

__all__ = [
    "AskUnderstudyTool",
    "KnowledgeSearchTool",
    "StudentTool",
    "UnderstudyToolkit",
    "load_understudy",
]
