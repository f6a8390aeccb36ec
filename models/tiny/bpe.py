"""A deterministic BPE trainer for the embedded tokenizers (pure Python: identical on every machine).

Both tiny tokenizers (the byte-level Qwen2 one and the byte-fallback Llama one) learn their
merges here; they differ only in how they split text into words and in their initial vocabulary.
"""

from __future__ import annotations

from collections import Counter


def most_frequent_pair(words: dict[tuple[str, ...], int]) -> tuple[tuple[str, str], int]:
    """Most frequent adjacent symbol pair, weighted by word count; ties broken by the smallest pair."""
    pairs: Counter[tuple[str, str]] = Counter()
    for symbols, count in words.items():
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += count
    if not pairs:
        return ("", ""), 0
    return min(pairs.items(), key=lambda item: (-item[1], item[0]))


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of ``pair`` in ``symbols`` by the merged symbol, left to right."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def learn_merges(
    word_counts: Counter[str], vocab: dict[str, int], vocab_size: int
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Add one token per merge to ``vocab`` (in place) until ``vocab_size`` or no pair occurs twice.

    ``word_counts``: pre-tokenized words and their counts; each word starts as its characters.
    Returns ``(vocab, merges)`` in merge order.
    """
    words = {tuple(word): count for word, count in sorted(word_counts.items())}
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size:
        pair, count = most_frequent_pair(words)
        if count < 2:
            break
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        words = {merge_pair(symbols, pair): n for symbols, n in words.items()}
    return vocab, merges
