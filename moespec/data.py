"""Text corpus for the tiny trained models and the held-out perplexity protocol.

The corpus is the Python standard library's own source (``*.py`` under
``sysconfig.get_paths()["stdlib"]``): it is present on every machine that can run moespec, needs
no download, and is code, so a tiny model trained on it generates recognisable text and its routers
specialise on recognisable token classes (keywords, indentation, identifiers, strings).

Split: a file is held out when a hash of its path relative to the stdlib root falls in one of
``HELDOUT_BUCKETS`` buckets out of ``N_BUCKETS`` (about 5%). Splitting by file, not by offset, keeps
near-duplicate context (a module's own identifiers) out of the training set. The hash depends on the
path only, so the split is the same on every Python patch version; the file *contents* are not, so
the held-out text used for evaluation is shipped in the repository (``models/heldout.txt.gz``) and
read from there, never from the local stdlib.

Evaluation protocol (used by ``tools/train_tiny_moe.py`` for the model cards and by ``moespec eval``):

1. ``token_ids = tokenizer.encode(heldout_text())`` with no special tokens added around the text;
   the ``DOC_SEPARATOR`` strings inside the text must be parsed as the special end-of-text token
   (the default of both ``tokenizers.Tokenizer.encode`` and transformers' tokenizers).
2. ``chunks = heldout_chunks(token_ids, EVAL_CHUNK_LENGTH, EVAL_N_CHUNKS)``: the first
   ``EVAL_N_CHUNKS`` non-overlapping chunks of ``EVAL_CHUNK_LENGTH`` tokens.
3. Each chunk is scored on its own (fresh context, positions 0..length-1, no padding); every
   position but the last predicts the next token of the chunk.
4. perplexity = exp(mean next-token negative log-likelihood over all
   ``EVAL_N_CHUNKS * (EVAL_CHUNK_LENGTH - 1)`` predicted positions), log-softmax in float32 or wider.

``heldout_perplexity`` implements steps 2-4 for any scoring function, so both callers share one code
path.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is only needed by heldout_perplexity; keep importing this module cheap.
    import torch

#: Special token separating documents, used as BOS/EOS by the shipped tokenizer.
DOC_SEPARATOR = "<|endoftext|>"

#: Tokens per evaluation chunk (equal to the tiny models' training context).
EVAL_CHUNK_LENGTH = 256
#: Number of evaluation chunks: 64 * 255 = 16,320 predicted positions.
EVAL_N_CHUNKS = 64

#: A file is held out when ``_path_bucket(relpath) < HELDOUT_BUCKETS`` (1 in 20 files).
N_BUCKETS = 20
HELDOUT_BUCKETS = 1

#: Where the held-out text is shipped: ``<repo>/models/heldout.txt.gz``.
HELDOUT_PATH = Path(__file__).resolve().parent.parent / "models" / "heldout.txt.gz"

#: Path components excluded from the corpus: tests (huge, repetitive, and often deliberately
#: malformed), third-party packages, generated tables and data dumps (codec tables,
#: pydoc topics), and bundled applications whose style is unlike library code.
EXCLUDED_PARTS = frozenset(
    {
        "test",
        "tests",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib-dynload",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "pydoc_data",
        "encodings",
        "ensurepip",
        "__phello__",
    }
)


def stdlib_root() -> Path:
    """Return the directory holding this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_excluded(relpath: Path) -> bool:
    """Whether a stdlib-relative path is left out of the corpus altogether."""
    if any(part in EXCLUDED_PARTS for part in relpath.parts[:-1]):
        return True
    if relpath.parts[0].startswith("config-"):  # build-configuration helpers, platform-specific
        return True
    # _sysconfigdata_*.py is machine-generated build metadata.
    return relpath.name.startswith("_sysconfigdata")


def _path_bucket(relpath: str) -> int:
    """Deterministic bucket in ``[0, N_BUCKETS)`` of a POSIX-style stdlib-relative path."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % N_BUCKETS


def is_heldout(relpath: str) -> bool:
    """Whether the file at this POSIX-style stdlib-relative path belongs to the held-out split."""
    return _path_bucket(relpath) < HELDOUT_BUCKETS


def corpus_files(root: Path | None = None) -> list[str]:
    """Sorted POSIX-style relative paths of all corpus files (both splits) under ``root``."""
    root = stdlib_root() if root is None else root
    paths = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not _is_excluded(rel):
            paths.append(rel.as_posix())
    return sorted(paths)


def _read_files(relpaths: Iterable[str], root: Path) -> list[str]:
    """Read files as UTF-8, skipping unreadable ones and empty ones (``__init__.py`` stubs)."""
    texts = []
    for rel in relpaths:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            texts.append(text)
    return texts


def train_texts(root: Path | None = None) -> list[str]:
    """Contents of the training split of the local stdlib, one string per file, in path order."""
    root = stdlib_root() if root is None else root
    return _read_files((p for p in corpus_files(root) if not is_heldout(p)), root)


def heldout_documents_from_stdlib(root: Path | None = None) -> list[str]:
    """Held-out split read from the local stdlib, ordered by path hash.

    Ordering by hash instead of by path spreads the first evaluation chunks over unrelated
    modules rather than over a single package. Only used to (re)build the shipped file;
    evaluation reads the shipped file via :func:`heldout_text`.
    """
    root = stdlib_root() if root is None else root
    held = [p for p in corpus_files(root) if is_heldout(p)]
    held.sort(key=lambda p: hashlib.sha256(("order:" + p).encode("utf-8")).hexdigest())
    return _read_files(held, root)


def write_heldout_file(path: Path = HELDOUT_PATH, root: Path | None = None) -> int:
    """Write the held-out split of the local stdlib to ``path`` (gzip); return its byte size.

    The gzip header carries no timestamp or file name, so the output is byte-identical for the
    same stdlib.
    """
    text = DOC_SEPARATOR.join(heldout_documents_from_stdlib(root))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    return path.stat().st_size


def heldout_text(path: Path | str | None = None) -> str:
    """The shipped held-out text: held-out files joined by ``DOC_SEPARATOR``."""
    path = HELDOUT_PATH if path is None else Path(path)
    with gzip.open(path, "rb") as f:
        return f.read().decode("utf-8")


def heldout_chunks(token_ids: list[int], length: int, n_chunks: int) -> list[list[int]]:
    """The first ``n_chunks`` non-overlapping chunks of exactly ``length`` tokens.

    Raises ``ValueError`` when the text is too short, so that a silently smaller evaluation never
    produces a number that looks comparable to the model card's.
    """
    if length < 2:
        raise ValueError(f"length={length}: a chunk needs at least 2 tokens to predict one")
    if n_chunks < 1:
        raise ValueError(f"n_chunks={n_chunks}: need at least one chunk")
    if len(token_ids) < length * n_chunks:
        raise ValueError(
            f"token_ids has {len(token_ids)} tokens, fewer than length*n_chunks={length * n_chunks}"
        )
    return [list(token_ids[i * length : (i + 1) * length]) for i in range(n_chunks)]


def heldout_perplexity(
    score: Callable[[torch.Tensor], torch.Tensor],
    token_ids: list[int],
    length: int = EVAL_CHUNK_LENGTH,
    n_chunks: int = EVAL_N_CHUNKS,
    batch_size: int = 8,
) -> float:
    """Held-out perplexity by the module's protocol.

    ``score`` maps a LongTensor ``[B, T]`` of token ids to logits ``[B, T, V]`` (as
    ``moespec.LLM.score`` or ``lambda ids: hf_model(ids).logits`` do); each row is scored as an
    independent sequence. ``token_ids`` is the tokenized :func:`heldout_text`.
    """
    import torch

    chunks = torch.tensor(heldout_chunks(token_ids, length, n_chunks), dtype=torch.long)
    nll_sum = 0.0
    count = 0
    for start in range(0, n_chunks, batch_size):
        batch = chunks[start : start + batch_size]
        logits = score(batch)
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = batch[:, 1:].to(logprobs.device)
        nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll_sum += float(nll.double().sum())
        count += nll.numel()
    return math.exp(nll_sum / count)
