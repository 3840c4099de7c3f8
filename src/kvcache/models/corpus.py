"""The offline English prose corpus that the bundled default model is trained on.

Everything comes from what ships with Python itself, so the corpus can be rebuilt on any machine without a
network: the reference topics of ``pydoc_data.topics`` (the language reference as ``help()`` shows it),
the docstrings of the standard library (read with :mod:`ast`, so no module is imported), and the comment
blocks of the standard library's sources. Paragraphs that look like code (indented blocks, doctests, grammar
productions) are dropped; what remains is prose.

Every document has a stable ``key`` (``topic:NAME``, ``doc:module.qualname``, ``comment:module:N``); its
split (train, held-out prose, held-out documents) is a hash of that key, so the split does not depend on
the Python version or on the order in which files are found. The held-out splits are shipped with the
package (``models/default/eval/``) and :func:`build_corpus` drops any training document whose key or text
appears there, so the shipped evaluation data is never trained on even if the Python version differs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

#: standard-library folders that hold tests, vendored wheels or caches, not documentation
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"})

#: split fractions, by hash of the document key: long documents in the first HELDOUT_DOCS_FRACTION are
#: held-out documents (summarisation checks), the next HELDOUT_PROSE_FRACTION are held-out prose (perplexity)
HELDOUT_DOCS_FRACTION = 0.08
HELDOUT_PROSE_FRACTION = 0.03

#: held-out documents kept for summarisation-consistency checks must be at least this long (characters)
MIN_DOCUMENT_CHARS = 800

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_BACKTICKS = re.compile(r"`+([^`]*)`+")


@dataclass(frozen=True)
class Document:
    """One prose document.

    Attributes
    ----------
    key:
        Stable identifier, e.g. ``"topic:assignment"`` or ``"doc:json.decoder.JSONDecoder.decode"``.
    source:
        ``"topics"``, ``"docstring"`` or ``"comment"``.
    text:
        Prose paragraphs separated by blank lines.
    """

    key: str
    source: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """The three disjoint splits of the prose corpus."""

    train: list[Document]
    heldout_prose: list[Document]
    heldout_docs: list[Document]


def _clean_inline(text: str) -> str:
    """Drop reST roles and backticks (``:func:`len``` -> ``len``) and squeeze whitespace."""
    text = _RST_ROLE.sub(r"\1", text)
    text = _BACKTICKS.sub(r"\1", text)
    return " ".join(text.split())


def _is_prose(paragraph: str) -> bool:
    """A paragraph is prose if it reads as sentences: mostly letters, ends like a sentence, no code marks."""
    if len(paragraph) < 40 or ">>>" in paragraph or "::=" in paragraph:
        return False
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    if letters / len(paragraph) < 0.85:
        return False
    return paragraph[-1] in ".!?:)" and len(paragraph.split()) >= 6


def prose_paragraphs(raw: str) -> list[str]:
    """Split raw documentation text into prose paragraphs (one line each).

    Indented blocks (code samples, grammar, option tables) and doctests are dropped: in both reST and
    docstrings an indented block after a blank line is code or a literal, not running text.
    """
    out: list[str] = []
    for block in re.split(r"\n\s*\n", raw):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines or lines[0].startswith((" ", "\t")):
            continue
        paragraph = _clean_inline(" ".join(ln.strip() for ln in lines))
        if _is_prose(paragraph):
            out.append(paragraph)
    return out


def split_sentences(paragraph: str) -> list[str]:
    """Split a prose paragraph into sentences (a heuristic: end mark, space, capital letter)."""
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # sorted, so the order (and thus every derived list) is the same on every machine
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def _docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """Yield ``(qualified name, docstring)`` for the module and its classes and functions."""
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, name = stack.pop()
        doc = ast.get_docstring(node, clean=True) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if doc:
            yield name, doc
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        stack.extend((c, f"{name}.{c.name}") for c in reversed(children))


def _comment_blocks(source: str) -> Iterator[str]:
    """Runs of consecutive ``#`` comment lines, joined into one paragraph each."""
    block: list[str] = []
    for line in source.split("\n") + [""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            block.append(stripped.lstrip("#").strip())
            continue
        if len(block) >= 2:
            yield "\n".join(block)
        block = []


def iter_documents(max_files: int | None = None) -> Iterator[Document]:
    """Yield every prose document of this Python installation, in a deterministic order.

    Parameters
    ----------
    max_files:
        Read at most this many standard-library source files (for fast tests); ``None`` reads all.
    """
    try:
        from pydoc_data.topics import topics  # some distributions ship Python without it
    except ImportError:  # pragma: no cover - depends on the installation
        topics = {}
    for name in sorted(topics):
        paragraphs = prose_paragraphs(topics[name])
        if paragraphs:
            yield Document(f"topic:{name}", "topics", "\n\n".join(paragraphs))
    root = _stdlib_dir()
    for i, path in enumerate(_python_files(root)):
        if max_files is not None and i >= max_files:
            break
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # a few stdlib files are deliberately invalid (e.g. lib2to3 test data)
        module = _module_name(root, path)
        for qualname, doc in _docstrings(tree, module):
            paragraphs = prose_paragraphs(doc)
            if paragraphs:
                yield Document(f"doc:{qualname}", "docstring", "\n\n".join(paragraphs))
        for j, block in enumerate(_comment_blocks(source)):
            paragraph = _clean_inline(block)
            if _is_prose(paragraph):
                yield Document(f"comment:{module}:{j}", "comment", paragraph)


def split_of(key: str) -> str:
    """The split a document key belongs to: ``"train"``, ``"heldout_prose"`` or ``"heldout_docs"``."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    if h < HELDOUT_DOCS_FRACTION:
        return "heldout_docs"
    if h < HELDOUT_DOCS_FRACTION + HELDOUT_PROSE_FRACTION:
        return "heldout_prose"
    return "train"


def build_corpus(*, max_files: int | None = None, exclude: Sequence[Document] = ()) -> Corpus:
    """Read the prose of this Python installation and split it.

    Parameters
    ----------
    max_files:
        Passed to :func:`iter_documents`.
    exclude:
        Documents (typically the shipped held-out splits, see :func:`load_eval_split`) whose key or text
        must never be trained on.
    """
    banned_keys = {d.key for d in exclude}
    banned_text = {d.text for d in exclude}
    seen_text: set[str] = set()
    train: list[Document] = []
    prose: list[Document] = []
    docs: list[Document] = []
    for doc in iter_documents(max_files):
        if doc.text in seen_text:  # inherited / copied docstrings appear many times
            continue
        seen_text.add(doc.text)
        split = split_of(doc.key)
        if split == "heldout_docs" and len(doc.text) < MIN_DOCUMENT_CHARS:
            split = "train"  # short documents are only held out through the prose fraction
        if split == "train":
            if doc.key not in banned_keys and doc.text not in banned_text:
                train.append(doc)
        elif split == "heldout_prose":
            prose.append(doc)
        else:
            docs.append(doc)
    return Corpus(train=train, heldout_prose=prose, heldout_docs=docs)


def eval_split_text(docs: Sequence[Document]) -> str:
    """Documents as JSON lines, one per document, the file :func:`load_eval_split` reads.

    The caller writes it (atomically: ``kvcache.files.write_text_atomic``); this module stays standard-library
    only, for the training script that loads it by path.
    """
    return "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in docs)


def load_eval_split(path: Path) -> list[Document]:
    """Read documents in the form of :func:`eval_split_text`; a missing file is an error naming the fix."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the held-out splits ship in kvcache/models/default/eval/; "
            "rebuild them with `python scripts/train_default_model.py --write-eval-splits`")
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]
