"""Text data for language models: ``text:FILE_OR_DIR`` tokenized, packed and split.

The text is tokenized with the ``tokenizer.json`` of the model's directory (read as data with the
``tokenizers`` package: no code runs, nothing is downloaded), the documents are concatenated (an
end-of-text token between them when the tokenizer has one) and cut into sequences of ``seq_len``
tokens; the incomplete tail is dropped. The sequences are split at random into train and
validation (:data:`~ttcompress.data.user.USER_TEST_FRACTION` held out, seed
:data:`~ttcompress.data.user.USER_SPLIT_SEED`).

An item is ``({"input_ids": ids, "attention_mask": mask}, labels)``: int64 ids and a 0/1 mask of
``seq_len`` positions, and the next-token labels (the ids, with ``-100`` where the mask is 0).
The bundle's ``targets`` is ``"tokens"``: the task loss is the shifted next-token cross-entropy
(:func:`ttcompress.report.evaluation.task_loss`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ttcompress.data.bundle import DatasetBundle
from ttcompress.data.user import random_split
from ttcompress.errors import DataError, UserInputError
from ttcompress.checkpoint.io import read_header

__all__ = [
    "DEFAULT_SEQ_LEN",
    "IGNORE_INDEX",
    "TOKENIZER_FILE",
    "TextDataset",
    "context_length",
    "find_tokenizer",
    "load_text_data",
    "model_tokenizer_dir",
    "read_documents",
]

#: The longest default sequence: the model's context length is used when it is shorter.
DEFAULT_SEQ_LEN = 512
#: The label of a position that no loss or metric counts (padding), as in transformers.
IGNORE_INDEX = -100
#: The tokenizer file read from a model's directory.
TOKENIZER_FILE = "tokenizer.json"
#: Text files read from a directory (``.jsonl`` / ``.json``: JSON lines with a ``text`` field).
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".json")
_END_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


class TextDataset(Dataset):
    """Packed token sequences held in memory: ``ids`` and ``mask`` of shape ``(N, seq_len)``."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if ids.dim() != 2 or ids.dtype != torch.int64:
            raise TypeError("ids must be an int64 tensor of shape (N, seq_len)")
        mask = torch.ones_like(ids) if mask is None else mask.to(torch.int64)
        if mask.shape != ids.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of ids {tuple(ids.shape)}")
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids, mask = self.ids[index], self.mask[index]
        return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, IGNORE_INDEX)


def find_tokenizer(source: str | os.PathLike[str]) -> Path:
    """The ``tokenizer.json`` for ``source``: that file itself, or the one in that directory.

    Raises
    ------
    DataError
        No such file or directory, or a directory without ``tokenizer.json``.
    """
    p = Path(source).expanduser()
    if p.is_dir():
        candidate = p / TOKENIZER_FILE
        if candidate.is_file():
            return candidate
        raise DataError(f"no {TOKENIZER_FILE} in {p}: text data needs the model's tokenizer (give the tokenizer's "
                        "directory)")
    if p.is_file() and p.suffix.lower() == ".json":
        return p
    raise DataError(f"no tokenizer at {p}: expected a directory holding {TOKENIZER_FILE}, or that file")


def model_tokenizer_dir(model: str | os.PathLike[str]) -> Path | None:
    """Where the tokenizer of a model file or directory is: the directory itself, or for a
    ttcompress checkpoint the directory it was compressed from (``source_path`` in its header),
    when that directory still holds a ``tokenizer.json``; else None. Only the header is read."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if not p.is_file():
        return None
    try:
        header = read_header(p)
    except Exception:  # noqa: BLE001 - a model file that does not parse records no tokenizer
        return None
    info = header.get("info") if isinstance(header, dict) else None
    source = info.get("source_path") if isinstance(info, dict) else None
    if isinstance(source, str) and (Path(source) / TOKENIZER_FILE).is_file():
        return Path(source)
    return None


def context_length(directory: str | os.PathLike[str] | None) -> int | None:
    """The context length a ``config.json`` in ``directory`` records, read as data, else None."""
    if directory is None:
        return None
    config = Path(directory) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    for key in _CONTEXT_KEYS:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception types on a malformed file
        raise DataError(f"cannot read tokenizer {path}: {' '.join(str(exc).split())[:200]}") from None


def _files(p: Path) -> list[Path]:
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES
                      and not any(part.startswith(".") for part in q.relative_to(p).parts))  # fmt: skip
    raise DataError(f"text data {str(p)!r} does not exist")


def read_documents(source: str | os.PathLike[str]) -> list[str]:
    """The documents of a text file, a JSON-lines file (one ``{"text": ...}`` per line) or a
    directory of them (files with a suffix in :data:`TEXT_SUFFIXES`, sorted by path, hidden ones
    skipped). A plain text file is one document; a file that is not UTF-8 text is refused.

    Raises
    ------
    DataError
        Missing path, undecodable file, a JSON line without a string ``text`` field, or no text.
    """
    p = Path(source).expanduser()
    docs: list[str] = []
    for f in _files(p):
        try:
            raw = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"text file {f} is not UTF-8 text") from None
        except OSError as exc:
            raise DataError(f"cannot read text file {f}: {exc.strerror or exc}") from None
        if f.suffix.lower() in (".jsonl", ".json"):
            docs.extend(_json_lines(raw, f))
        elif raw.strip():
            docs.append(raw)
    if not docs:
        raise DataError(f"text data {str(p)!r} holds no text")
    return docs


def _json_lines(raw: str, f: Path) -> list[str]:
    out = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{f} line {number} is not JSON (JSON lines need one {{\"text\": ...}} per line)") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{f} line {number} has no string 'text' field")
        if text.strip():
            out.append(text)
    return out


#: Characters of text tokenized at once: a tokenizer's per-token records (offsets, strings) are
#: many times the ids, so a long document is tokenized in pieces cut at line ends.
_PIECE_CHARS = 1 << 16


def _pieces(doc: str) -> list[str]:
    """``doc`` cut after line ends into pieces of about :data:`_PIECE_CHARS` characters."""
    out, start = [], 0
    while len(doc) - start > _PIECE_CHARS:
        cut = doc.rfind("\n", start, start + _PIECE_CHARS) + 1
        cut = cut if cut > start else start + _PIECE_CHARS
        out.append(doc[start:cut])
        start = cut
    out.append(doc[start:])
    return out


def _token_ids(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """The ids of every document, an end-of-text id after each when the tokenizer has one; only
    the ids are kept (int32 while collecting), one piece of text tokenized at a time."""
    end = next((tid for tok in _END_TOKENS if (tid := tokenizer.token_to_id(tok)) is not None), None)
    parts: list[torch.Tensor] = []
    for doc in docs:
        for piece in _pieces(doc):
            parts.append(torch.tensor(tokenizer.encode(piece, add_special_tokens=False).ids, dtype=torch.int32))
        if end is not None:
            parts.append(torch.tensor([end], dtype=torch.int32))
    return torch.cat(parts).to(torch.int64) if parts else torch.zeros(0, dtype=torch.int64)


def load_text_data(
    source: str,
    *,
    tokenizer: str | os.PathLike[str] | None,
    seq_len: int | None = None,
) -> DatasetBundle:
    """Tokenize, pack and split the text of ``source`` (see the module docstring).

    Parameters
    ----------
    source : str
        A text file, JSON-lines file, or a directory of them.
    tokenizer : path or None
        The directory holding ``tokenizer.json`` (a model's directory), or that file.
    seq_len : int or None
        Tokens per sequence; default the context length of the ``config.json`` beside the
        tokenizer, at most :data:`DEFAULT_SEQ_LEN`.

    Raises
    ------
    UserInputError
        ``seq_len`` is not a positive int.
    DataError
        No tokenizer, no text, fewer tokens than two sequences.
    """
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise UserInputError(f"seq_len must be a positive int, got {seq_len!r}")
    if not source:
        raise DataError("text needs a file or directory: text:FILE_OR_DIR")
    if tokenizer is None:
        raise DataError(f"text data {source!r} needs a tokenizer: give the model's directory (with "
                        f"{TOKENIZER_FILE}) as the tokenizer")
    tok_path = find_tokenizer(tokenizer)
    docs = read_documents(source)
    if seq_len is None:
        seq_len = min(context_length(tok_path.parent) or DEFAULT_SEQ_LEN, DEFAULT_SEQ_LEN)
    ids = _token_ids(_load_tokenizer(tok_path), docs)
    n = ids.numel() // seq_len
    if n < 2:
        raise DataError(f"text data {source!r} has {ids.numel()} tokens: fewer than 2 sequences of {seq_len} "
                        "(a train/validation split needs 2; lower the sequence length or add text)")
    full = TextDataset(ids[: n * seq_len].view(n, seq_len).clone())
    train, test, split = random_split(full, f"text:{source}")
    note = f"{split}; sequences of {seq_len} tokens ({n * seq_len:,} of {ids.numel():,} tokens; tokenizer {tok_path})"
    return DatasetBundle(f"text:{source}", train, test, None, (seq_len,), (), targets="tokens", split=note)
