"""The judge's prompts and the pure readers of its replies: MT-Bench's prompts, asked about an image.

MT-Bench (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", arXiv
2306.05685, Appendix: ``single-v1``, ``pair-v2``, and the reference-guided ``single-math-v1``,
``pair-math-v1``), with "the user question displayed below" turned into a question about the
image(s) shown above it: the record's images come first in the user message, as image parts
``{"type": "image", "image": PATH}``, then the text.

- A score is a rating from 1 to 10 answered as ``Rating: [[N]]`` (:func:`parse_rating`).
- A comparison's verdict is ``[[A]]``, ``[[B]]`` or ``[[C]]``, a tie (:func:`parse_verdict`).
- A bare reply (``7``, ``A``, ``tie``) is read too. A reply with no readable verdict, two
  different ones, or a rating outside 1-10 reads as ``None``: a failure.
- Position bias (ibid., Sec. 3.3-3.4): :func:`combine_orders` makes one verdict from the two
  orders (a, b) and (b, a); when they disagree the pair is a tie.
"""

from __future__ import annotations

import re
from typing import Any

from vlmtune.data.records import PreferenceRecord
from vlmtune.errors import VlmtuneError
from vlmtune.eval.judge import SYSTEM_PROMPT

# MT-Bench's single-v1 prompt, the question being about the image(s) shown before it.
SCORE_PROMPT = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided "
    "by an AI assistant to the user question about the image(s) shown above. Your evaluation should "
    "consider factors such as the helpfulness, relevance, accuracy with respect to the image, and level "
    "of detail of the response.{reference_rule} Begin your evaluation by providing a short explanation. Be "
    "as objective as possible. After providing your explanation, you must rate the response on a scale of "
    '1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
    "[Question]\n{question}\n\n{reference}"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)

# MT-Bench's pair-v2 prompt, likewise.
PAIR_PROMPT = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the responses provided "
    "by two AI assistants to the user question about the image(s) shown above. You should choose the "
    "assistant that follows the user's instructions and answers the user's question better. Your "
    "evaluation should consider factors such as the helpfulness, relevance, accuracy with respect to the "
    "image, and level of detail of their responses.{reference_rule} Begin your evaluation by comparing the "
    "two responses and provide a short explanation. Avoid any position biases and ensure that the order "
    "in which the responses were presented does not influence your decision. Do not allow the length of "
    "the responses to influence your evaluation. Be as objective as possible. After providing your "
    'explanation, output your final verdict by strictly following this format: "[[A]]" if assistant A '
    'is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.\n\n'
    "[User Question]\n{question}\n\n{reference}"
    "[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]"
)

# MT-Bench's reference-guided variants (single-math-v1, pair-math-v1): the record's `chosen` as the reference.
REFERENCE_RULE = (
    " You will be given a reference answer: compare with it, and identify and correct any mistakes."
)
REFERENCE_BLOCK = "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_BARE_NUMBER = re.compile(r"^(?:rating:\s*)?(\d+(?:\.\d+)?)\.?$", re.IGNORECASE)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_BARE_VERDICTS = {"a": 1, "b": -1, "c": 0, "tie": 0}


# ----------------------------------------------------------------------------------- parsing (pure)


def parse_rating(reply: str) -> float | None:
    """The 1-10 rating in a judge's reply (``[[N]]`` or a bare number), or ``None``.

    >>> parse_rating("The count is right.\\nRating: [[8]]"), parse_rating(" 7 "), parse_rating("[[11]]")
    (8.0, 7.0, None)
    """
    found = {float(x) for x in _RATING.findall(reply or "")}
    if not found:
        bare = _BARE_NUMBER.match((reply or "").strip())
        found = {float(bare.group(1))} if bare else set()
    if len(found) != 1:
        return None
    (rating,) = found
    return rating if 1.0 <= rating <= 10.0 else None


def parse_verdict(reply: str) -> int | None:
    """+1 for ``[[A]]``, -1 for ``[[B]]``, 0 for ``[[C]]`` (a tie); a bare ``A``/``B``/``tie`` too; else ``None``.

    >>> parse_verdict("A is more precise. [[A]]"), parse_verdict("b."), parse_verdict("[[A]] or [[B]]")
    (1, -1, None)
    """
    found = set(_VERDICT.findall(reply or ""))
    if len(found) == 1:
        return _BARE_VERDICTS[found.pop().lower()]
    if found:
        return None
    return _BARE_VERDICTS.get((reply or "").strip().strip(".!").strip().lower())


def combine_orders(first: int | None, second: int | None) -> int | None:
    """One verdict on (a, b) from ``first`` (a shown as A) and ``second`` (b shown as A).

    ``second`` speaks for b, so a's verdict there is ``-second``; two verdicts that disagree make
    a tie, and a failure in either order fails the pair.

    >>> combine_orders(1, -1), combine_orders(1, 1), combine_orders(0, 0), combine_orders(1, None)
    (1, 0, 0, None)
    """
    if first is None or second is None:
        return None
    return first if first == -second else 0


# ----------------------------------------------------------------------------------- prompts


def scoring_messages(record: PreferenceRecord, answer: str, reference: bool = False) -> list[dict[str, Any]]:
    """The chat that asks for a 1-10 rating of ``answer`` to ``record`` (images first).

    With ``reference``, the record's ``chosen`` answer is shown as the reference answer.
    """
    text = SCORE_PROMPT.format(question=record.prompt_text(), answer=answer, **_reference(record, reference))
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _image_parts(record) + [{"type": "text", "text": text}]}]


def pairwise_messages(record: PreferenceRecord, a: str, b: str, reference: bool = False) -> list[dict[str, Any]]:
    """The chat that asks which of ``a`` (shown as A) and ``b`` (shown as B) answers ``record`` better.

    With ``reference``, the record's ``chosen`` answer is shown as the reference answer.
    """
    text = PAIR_PROMPT.format(question=record.prompt_text(), a=a, b=b, **_reference(record, reference))
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _image_parts(record) + [{"type": "text", "text": text}]}]


def _reference(record: PreferenceRecord, reference: bool) -> dict[str, str]:
    """The prompt's reference sentence and block: empty without ``reference``."""
    if not reference:
        return {"reference_rule": "", "reference": ""}
    if not record.chosen.strip():
        raise VlmtuneError(
            f"record {record.id}: a judge with a reference answer shows the record's `chosen` answer, which is "
            "empty; give the records a reference answer or judge without one"
        )
    return {"reference_rule": REFERENCE_RULE, "reference": REFERENCE_BLOCK.format(reference=record.chosen)}


def _image_parts(record: PreferenceRecord) -> list[dict[str, Any]]:
    if record.image_slots() != len(record.images):
        raise VlmtuneError(
            f"record {record.id}: its prompt has {record.image_slots()} image slot(s) but {len(record.images)} "
            "image(s); a judge must see the images the question is about (as a GRPO reward, pass the "
            "`images` column)"
        )
    return [{"type": "image", "image": path} for path in record.images]
