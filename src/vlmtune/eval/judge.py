"""Judges that score free-form answers: an OpenAI-compatible endpoint or a local model.

LLaVA-Bench's protocol (``llava/eval/eval_gpt_review_visual.py`` and ``table/rule.json`` in
haotian-liu/LLaVA): the judge sees the question, the image's context, the reference answer as
"Assistant 1" and the model's answer as "Assistant 2", and replies with a first line of two
scores from 1 to 10, then an explanation. A reply whose first line is not two numbers is a
failure for that question (recorded, never a crash).

A judge here is a callable ``judge(conversations) -> list[str]``: chat messages in, reply texts
out; a message's content is a string or a list of parts, an image part ``{"type": "image",
"image": PATH}``. :class:`HttpJudge` is the one HTTP client (timeouts, retries with back-off,
images as data URLs); :mod:`vlmtune.judges` builds the scoring and pairwise judges on top of it.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError

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
        raise VlmtuneError(f"environment variable {variable} is not set; export the judge's API key in it")
    return key


class JudgeUnavailable(VlmtuneError):
    """The judge gave no answer after every retry (connection refused, timeout, 408, 429, 5xx)."""


MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is cut to this (the OpenAI Python SDK waits at most 60 s too)


def should_retry(status: int) -> bool:
    """Whether an HTTP status is worth asking again: a request timeout, a rate limit, a server error.

    >>> [should_retry(s) for s in (200, 400, 401, 408, 429, 500, 503)]
    [False, False, False, True, True, True, True]
    """
    return status in (408, 429) or status >= 500


class HttpJudge:
    """An OpenAI-compatible chat endpoint: ``POST {url}/chat/completions``.

    ``url`` is the API base (``http://127.0.0.1:8000/v1``) or the full ``.../chat/completions``.
    LLaVA's settings: temperature 0.2, up to 1024 tokens. A request that fails on the transport
    (connection refused, ``timeout`` seconds passed) or with HTTP 408, 429 or 5xx is tried again up to
    ``retries`` times, after ``backoff * 2**i`` seconds (or the server's ``Retry-After``, capped at
    60 s); then :class:`JudgeUnavailable` is raised. Other 4xx answers and bodies that are not
    OpenAI chat completions raise :class:`VlmtuneError` at once: asking again cannot fix them.
    Messages may hold ``{"type": "image", "image": PATH}`` parts; they are sent as data URLs.
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 temperature: float = 0.2, max_tokens: int = 1024, retries: int = 3, backoff: float = 1.0):
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise VlmtuneError(
                f"judge: retries ({retries}) and backoff ({backoff}) must be >= 0 and timeout ({timeout}) > 0"
            )
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.retries = retries
        self.backoff = backoff

    def __call__(self, conversations: list[list[dict[str, Any]]]) -> list[str]:
        from vlmtune.progress import progress_bar

        with self.client() as client:
            return [self.ask(client, messages) for messages in progress_bar(conversations, desc="judge", unit="request")]

    def client(self):
        """An ``httpx.Client`` with the timeout and the Bearer key; use it as a context manager."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(timeout=self.timeout, headers=headers)

    def ask(self, client, messages: list[dict[str, Any]]) -> str:
        """The reply text to one conversation, asking again on transient failures (see the class)."""
        body = {"model": self.model, "messages": openai_messages(messages), "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        for attempt in range(self.retries + 1):
            response, problem = self._post(client, body)
            if response is not None and not should_retry(response.status_code):
                return self._reply_text(response)
            if attempt == self.retries:
                break
            time.sleep(_retry_delay(response, self.backoff * 2**attempt))
        raise JudgeUnavailable(
            f"could not reach the judge at {self.endpoint}: no answer after {self.retries + 1} tries ({problem}); "
            "check --judge-url and that the server is running"
        )

    def _post(self, client, body: dict[str, Any]):
        """``(response, None)``, or ``(None, what went wrong)`` when the transport failed."""
        import httpx

        try:
            response = client.post(self.endpoint, json=body)
        except httpx.TransportError as e:
            return None, f"{type(e).__name__}: {e}"
        return response, f"HTTP {response.status_code}: {response.text[:300]}"

    def _reply_text(self, response) -> str:
        if response.status_code in (401, 403):
            raise VlmtuneError(f"the judge at {self.endpoint} refused the request ({response.status_code}); check the API key")
        if response.status_code >= 400:
            raise VlmtuneError(
                f"the judge at {self.endpoint} answered HTTP {response.status_code}: {response.text[:300]}"
            )
        try:
            return str(response.json()["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise VlmtuneError(
                f"the judge at {self.endpoint} did not answer in the OpenAI chat format "
                f"(got {response.text[:200]!r}); is --judge-url an OpenAI-compatible API base?"
            ) from None


def _retry_delay(response, default: float) -> float:
    """The server's ``Retry-After`` in seconds when it sent a number (capped), else ``default``."""
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except (TypeError, ValueError):
        return default


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every ``{"type": "image", "image": PATH}`` part as an ``image_url`` data URL."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [_openai_part(part) for part in content]
        out.append({**message, "content": content})
    return out


def _openai_part(part: dict[str, Any]) -> dict[str, Any]:
    if part.get("type") != "image":
        return part
    return {"type": "image_url", "image_url": {"url": image_data_url(part["image"])}}


def image_data_url(path: str | Path) -> str:
    """``data:image/...;base64,...``: PNG and JPEG files as they are, any other image re-encoded as PNG."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise VlmtuneError(f"judge: cannot read the image {path}: {e}; check the record's image path") from None
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    elif data.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    else:
        data, mime = _as_png(path, data), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _as_png(path: str | Path, data: bytes) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
    except (UnidentifiedImageError, OSError) as e:
        raise VlmtuneError(f"judge: {path} is not an image PIL can read ({e}); check the record's image path") from None
    return buffer.getvalue()


class LocalJudge:
    """A local language or vision-language model as the judge, through :func:`vlmtune.generate.generate`.

    ``{"type": "image", "image": PATH}`` parts become the item's images, in order (greedy decoding).
    """

    def __init__(self, model, processor, max_new_tokens: int = 256, batch_size: int = 4):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, conversations: list[list[dict[str, Any]]]) -> list[str]:
        from vlmtune.generate import generate

        items = [_as_item(messages) for messages in conversations]
        return generate(self.model, self.processor, items, self.max_new_tokens, self.batch_size, progress="judge")


def _as_item(messages: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(images, messages)`` for :func:`vlmtune.generate.generate`: image paths pulled out of the parts."""
    images: list[str] = []
    out = []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for part in [] if isinstance(content, str) else content:
            if part.get("type") == "image":
                images.append(part["image"])
                part = {"type": "image"}
            parts.append(part)
        out.append({"role": message["role"], "content": parts})
    return images, out
