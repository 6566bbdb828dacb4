"""From the token strings a remote teacher answers with back to the teacher's token ids.

vLLM answers `token_id:123` when asked (`return_tokens_as_token_ids`): exact. A plain
OpenAI-compatible server answers each token as its decoded text; that is mapped back through
the teacher's tokenizer, and a string that no id decodes to, or that several ids decode to
(byte fragments of one UTF-8 character all decode to "\ufffd"), cannot be mapped. Such a
position is flagged with the id `UNMAPPED` (-1) in the row; its logprob is kept.
"""

from __future__ import annotations

from typing import Any

UNMAPPED = -1
TOKEN_ID_PREFIX = "token_id:"


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

    def to_id(self, token: str) -> int:
        parsed = parse_token_id(token)
        if parsed is not None:
            return parsed
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
