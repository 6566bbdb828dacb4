"""From the token strings a remote teacher answers with back to the teacher's token ids.

vLLM answers `token_id:123` when asked (`return_tokens_as_token_ids`): exact. A plain
OpenAI-compatible server answers each token as its decoded text, and its chat API also as its
UTF-8 `bytes`. Those are mapped back through the teacher's tokenizer: the bytes first (exact for
a byte-level BPE vocabulary, where every token is a distinct byte string), then the text. A
token that no id, or several ids, match (byte fragments of one UTF-8 character all decode to
"\ufffd") cannot be mapped. Such a position is flagged with the id `UNMAPPED` (-1) in the row;
its logprob is kept.
"""

from __future__ import annotations

from typing import Any

UNMAPPED = -1
TOKEN_ID_PREFIX = "token_id:"
REPLACEMENT = "\ufffd".encode()


class TokenMapper:
    """Maps token strings to ids; built once per worker from the teacher's vocabulary."""

    def __init__(self, tokenizer: Any) -> None:
        self._by_text: dict[str, int | None] = {}
        self._by_piece: dict[str, int] = {}
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id])
            # Seen twice: ambiguous, never guessed.
            self._by_text[text] = None if text in self._by_text else token_id
        # The vocabulary's own spelling ("Ġthe"), which some servers answer with.
        self._by_piece = {piece: i for piece, i in tokenizer.get_vocab().items()}
        self._by_bytes = byte_level_vocabulary(self._by_piece)

    def to_id(self, token: str, token_bytes: list[int] | None = None) -> int:
        parsed = parse_token_id(token)
        if parsed is not None:
            return parsed
        # Some servers (vLLM) send the bytes of the decoded text, where a fragment of a UTF-8
        # character has become U+FFFD: such bytes name the U+FFFD token, not the fragment.
        if token_bytes is not None and REPLACEMENT not in bytes(token_bytes):
            by_bytes = self._by_bytes.get(bytes(token_bytes), UNMAPPED)
            if by_bytes is not None and by_bytes != UNMAPPED:
                return by_bytes
        by_text = self._by_text.get(token, UNMAPPED)
        if by_text is None:  # ambiguous
            return UNMAPPED
        if by_text != UNMAPPED:
            return by_text
        return self._by_piece.get(token, UNMAPPED)


def parse_token_id(token: str) -> int | None:
    """The id in vLLM's `token_id:123` spelling, else None (no tokenizer needed)."""
    if token.startswith(TOKEN_ID_PREFIX):
        try:
            return int(token[len(TOKEN_ID_PREFIX):])
        except ValueError:
            return None
    return None


def byte_level_vocabulary(pieces: dict[str, int]) -> dict[bytes, int | None]:
    """{token bytes: id} for a byte-level BPE vocabulary (GPT-2's byte-to-character table);
    None marks bytes several ids share. Empty for other vocabularies."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]  # unannotated in transformers
    by_bytes: dict[bytes, int | None] = {}
    for piece, token_id in pieces.items():
        if all(char in byte_of for char in piece):
            raw = bytes(byte_of[char] for char in piece)
            by_bytes[raw] = None if raw in by_bytes else token_id
    return by_bytes
