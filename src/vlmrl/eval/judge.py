"""Judges that score free-form answers: an OpenAI-compatible endpoint or a local model.

LLaVA-Bench's protocol (``llava/eval/eval_gpt_review_visual.py`` and ``table/rule.json`` in
haotian-liu/LLaVA): the judge sees the question, the image's context, the reference answer as
"Assistant 1" and the model's answer as "Assistant 2", and replies with a first line of two
scores from 1 to 10, then an explanation. A reply whose first line is not two numbers is a
failure for that question (recorded, never a crash).

A judge is a callable ``judge(conversations) -> list[str]``: chat messages in, reply texts out.
"""

from __future__ import annotations

import os
import re
from typing import Any

from vlmrl.errors import VlmrlError

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."

# LLaVA-Bench's rule for every category (table/rule.json, "llava_bench_*").
RULE = (
    "We would like to request your feedback on the performance of two AI assistants in response to "
    "the user question displayed above. The user asks the question on observing an image. For your "
    "reference, the visual content in the image is represented with a few sentences describing the "
    "image. \nPlease rate the helpfulness, relevance, accuracy, level of details of their responses. "
    "Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\nPlease first output a single line containing only two values "
    "indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by a "
    "space.\nIn the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were presented "
    "does not affect your judgment."
)

_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")


def judge_messages(question: str, context: str, reference: str, answer: str) -> list[dict[str, Any]]:
    """The two chat messages LLaVA sends its judge; the reference is Assistant 1, the answer 2."""
    content = (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{RULE}\n\n"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def parse_judge_scores(reply: str) -> tuple[float, float] | None:
    """The two scores on the reply's first non-blank line (commas allowed as separators), or ``None``.

    LLaVA's ``parse_score`` reads the first line the same way; a reply whose first line is
    anything but two numbers counts as a failure.

    >>> parse_judge_scores("8 6\\nAssistant 1 is more detailed.")
    (8.0, 6.0)
    >>> parse_judge_scores("7, 9.5") , parse_judge_scores("Both are good.")
    ((7.0, 9.5), None)
    """
    first = (reply or "").strip().split("\n")[0].replace(",", " ").split()
    if len(first) != 2 or not all(_NUMBER.match(t) for t in first):
        return None
    return float(first[0]), float(first[1])


def api_key_from_env(variable: str | None) -> str | None:
    """The judge's API key from the environment variable the user named (never from a flag)."""
    if not variable:
        return None
    key = os.environ.get(variable)
    if not key:
        raise VlmrlError(f"environment variable {variable} is not set; export the judge's API key in it")
    return key


class HttpJudge:
    """An OpenAI-compatible chat endpoint: ``POST {url}/chat/completions``.

    ``url`` is the API base (``http://127.0.0.1:8000/v1``) or the full ``.../chat/completions``.
    LLaVA's settings: temperature 0.2, up to 1024 tokens.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 temperature: float = 0.2, max_tokens: int = 1024):
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.temperature = temperature
        self.max_tokens = max_tokens

    def __call__(self, conversations: list[list[dict[str, Any]]]) -> list[str]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(timeout=self.timeout, headers=headers) as client:
            return [self._one(client, messages) for messages in conversations]

    def _one(self, client, messages: list[dict[str, Any]]) -> str:
        import httpx

        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        try:
            response = client.post(self.endpoint, json=body)
        except httpx.HTTPError as e:
            raise VlmrlError(
                f"could not reach the judge at {self.endpoint} ({type(e).__name__}: {e}); "
                "check --judge-url and that the server is running"
            ) from None
        if response.status_code in (401, 403):
            raise VlmrlError(f"the judge at {self.endpoint} refused the request ({response.status_code}); check the API key")
        if response.status_code >= 400:
            raise VlmrlError(
                f"the judge at {self.endpoint} answered HTTP {response.status_code}: {response.text[:300]}"
            )
        try:
            return str(response.json()["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise VlmrlError(
                f"the judge at {self.endpoint} did not answer in the OpenAI chat format "
                f"(got {response.text[:200]!r}); is --judge-url an OpenAI-compatible API base?"
            ) from None


class LocalJudge:
    """A local language or vision-language model as the judge, through :func:`vlmrl.generate.generate`."""

    def __init__(self, model, processor, max_new_tokens: int = 256, batch_size: int = 4):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, conversations: list[list[dict[str, Any]]]) -> list[str]:
        from vlmrl.generate import generate

        items = [([], [_as_parts(m) for m in messages]) for messages in conversations]
        return generate(self.model, self.processor, items, self.max_new_tokens, self.batch_size)


def _as_parts(message: dict[str, Any]) -> dict[str, Any]:
    """String content as a list of text parts, the shape multimodal chat templates expect."""
    content = message["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return {"role": message["role"], "content": content}
