"""A CLIP byte-level BPE tokenizer generated for the shapes world.

The vocabulary holds the 256 byte symbols with and without ``</w>``, one merge result per
learned merge, and the CLIP special tokens last. Merges are learned on the world's words until
each word is a single token; :func:`simulate_bpe` replays CLIP's BPE to check it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _symbols(word: str) -> tuple[str, ...]:
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + EOW)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Greedy BPE merges (most frequent pair first, ties by name) until each word is one token."""
    corpus = [_symbols(w) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for sym in corpus for p in zip(sym, sym[1:], strict=False))
        if not pairs:
            return merges
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(pair)
        corpus = [_apply_merge(sym, pair) for sym in corpus]


def _apply_merge(sym: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(sym):
        if i + 1 < len(sym) and (sym[i], sym[i + 1]) == pair:
            out.append(sym[i] + sym[i + 1])
            i += 2
        else:
            out.append(sym[i])
            i += 1
    return tuple(out)


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP-ordered vocab: bytes, bytes+``</w>``, merge results, then BOS and EOS."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + EOW for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def simulate_bpe(word: str, merges: Sequence[tuple[str, str]]) -> list[str]:
    """CLIP's BPE on one pre-tokenized word: repeatedly merge the lowest-ranked pair present."""
    ranks = {m: i for i, m in enumerate(merges)}
    sym = _symbols(word.lower())
    while len(sym) > 1:
        pair = min(zip(sym, sym[1:], strict=False), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        sym = _apply_merge(sym, pair)
    return list(sym)


def make_tokenizer(
    words: Iterable[str], max_length: int
) -> tuple[CLIPTokenizer, list[tuple[str, str]]]:
    """A CLIPTokenizer whose world ``words`` are single tokens, and its merges."""
    words = list(words)
    merges = learn_merges(words)
    vocab = build_vocab(merges)
    for w in words:
        pieces = simulate_bpe(w, merges)
        if pieces != [w + EOW]:
            raise AssertionError(f"BPE simulation splits {w!r} into {pieces}")
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)
    return tok, merges


def save_tokenizer(
    tok: CLIPTokenizer, merges: Sequence[tuple[str, str]], folder: str | Path
) -> None:
    """Save ``tok`` and also write the vocab.json / merges.txt files transformers 5 omits."""
    folder = Path(folder)
    tok.save_pretrained(folder)
    _atomic_write(folder / "vocab.json", json.dumps(tok.get_vocab(), ensure_ascii=False))
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    _atomic_write(folder / "merges.txt", "\n".join(lines) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_tokenizer(folder: str | Path, words: Iterable[str], bos_id: int, eos_id: int) -> None:
    """Load ``folder`` as CLIPTokenizer and AutoTokenizer, and from its vocab.json/merges.txt;
    assert each world word is one token, unknown words fall back to byte pieces, and the
    special ids equal ``bos_id``/``eos_id``."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    merges_lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [(a, b) for a, b in (line.split(" ") for line in merges_lines if line)]
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    from_files = CLIPTokenizer(vocab=vocab, merges=merges)
    loaded = [
        CLIPTokenizer.from_pretrained(folder),
        AutoTokenizer.from_pretrained(folder),
        from_files,
    ]
    for tok in loaded:
        if (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) != (bos_id, eos_id, eos_id):
            raise AssertionError(f"special token ids of {type(tok).__name__} do not match")
        for w in [*words, "zebra", "Ünïcode"]:
            expected = simulate_bpe(w, merges)
            ids = tok(w, add_special_tokens=False)["input_ids"]
            if tok.convert_ids_to_tokens(ids) != expected:
                raise AssertionError(f"{w!r}: {tok.convert_ids_to_tokens(ids)} != {expected}")
            if w in words and len(ids) != 1:
                raise AssertionError(f"world word {w!r} is not a single token")
