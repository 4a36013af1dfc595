"""The canonical preference record that every reader produces and every consumer takes.

A record's prompt is a list of chat messages in the Hugging Face multimodal shape, so the model's
own chat template is applied later (never literal role tags)::

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the vehicles."}]}]

Each ``{"type": "image"}`` slot is filled, in order, by ``images``. ``chosen`` and ``rejected``
are the assistant's answer texts. ``metadata`` carries what the task knows about the record,
for counting: ``{"counts": {"car": 2, "bus": 0, ...}, "source_image": "...", "split": "train"}``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]


@dataclass
class PreferenceRecord:
    id: str
    images: list[str]
    prompt: list[Message]
    chosen: str
    rejected: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def image_slots(self) -> int:
        """Number of ``{"type": "image"}`` parts in the prompt."""
        return sum(
            1
            for message in self.prompt
            for part in _parts(message)
            if part.get("type") == "image"
        )

    def prompt_text(self) -> str:
        """The prompt's text parts joined, images shown as ``<image>`` (for display and hashing)."""
        pieces = []
        for message in self.prompt:
            for part in _parts(message):
                if part.get("type") == "image":
                    pieces.append("<image>")
                elif part.get("type") == "text":
                    pieces.append(part.get("text", ""))
        return " ".join(p.strip() for p in pieces if p.strip())

    def content_key(self) -> str:
        """Identity of the pair's content: (images, prompt, chosen, rejected)."""
        blob = json.dumps([self.images, self.prompt, self.chosen, self.rejected], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "images": list(self.images),
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreferenceRecord:
        return cls(
            id=str(d["id"]),
            images=list(d["images"]),
            prompt=list(d["prompt"]),
            chosen=d["chosen"],
            rejected=d["rejected"],
            metadata=dict(d.get("metadata") or {}),
        )


def user_prompt(text: str, n_images: int = 1) -> list[Message]:
    """A one-turn user prompt with the images first, then the text (Qwen-VL's usual order)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _parts(message: Message) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])
