"""The canonical preference record that every reader produces and every consumer takes.

A record's prompt is a list of chat messages in the Hugging Face multimodal shape, so the model's
own chat template is applied later (never literal role tags)::

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the vehicles."}]}]

Each ``{"type": "image"}`` slot is filled, in order, by ``images``. ``chosen`` and ``rejected``
are the assistant's answer texts. ``metadata`` carries what the task knows about the record,
for counting: ``{"counts": {"car": 2, "bus": 0, ...}, "source_image": "...", "split": "train"}``.

An unpaired record (KTO's data: one answer, marked desirable or undesirable) is the same class
with ``label`` set: ``True`` puts the answer in ``chosen`` and leaves ``rejected`` empty, ``False``
the reverse, so ``chosen`` is always a desirable answer and ``rejected`` an undesirable one. A pair
has ``label=None`` and reads, writes and hashes exactly as before; an unpaired record is written
``{"id", "images", "prompt", "completion", "label", "metadata"}``, the keys of TRL's unpaired
preference format. ``unpair`` splits a pair into its two unpaired records, as TRL's
``unpair_preference_dataset`` does.
"""

from __future__ import annotations

import copy
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
    label: bool | None = None  # None: a pair; True / False: one desirable / undesirable answer

    @property
    def is_unpaired(self) -> bool:
        return self.label is not None

    @property
    def answer(self) -> str:
        """An unpaired record's one answer (``chosen`` when desirable, else ``rejected``)."""
        return self.chosen if self.label else self.rejected

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
        """Identity of the content: (images, prompt, chosen, rejected), and the label of an unpaired record."""
        content = [self.images, self.prompt, self.chosen, self.rejected]
        if self.is_unpaired:
            content.append(self.label)
        blob = json.dumps(content, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        if self.is_unpaired:
            return {"id": self.id, "images": list(self.images), "prompt": self.prompt,
                    "completion": self.answer, "label": self.label, "metadata": self.metadata}
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
        if "label" in d:
            return unpaired(str(d["id"]), list(d["images"]), list(d["prompt"]), d["completion"],
                            bool(d["label"]), dict(d.get("metadata") or {}))
        return cls(
            id=str(d["id"]),
            images=list(d["images"]),
            prompt=list(d["prompt"]),
            chosen=d["chosen"],
            rejected=d["rejected"],
            metadata=dict(d.get("metadata") or {}),
        )


def unpaired(id_: str, images: list[str], prompt: list[Message], completion: str, label: bool,
             metadata: dict[str, Any] | None = None) -> PreferenceRecord:
    """A record with one answer, desirable when ``label`` (it goes in ``chosen``), else in ``rejected``."""
    chosen, rejected = (completion, "") if label else ("", completion)
    return PreferenceRecord(id_, images, prompt, chosen, rejected, dict(metadata or {}), label)


def unpair(record: PreferenceRecord) -> list[PreferenceRecord]:
    """A pair as two unpaired records, ids ``ID-desirable`` (chosen) and ``ID-undesirable`` (rejected),
    each with its own copy of the metadata; an unpaired record is returned as it is.

    >>> [(r.id, r.answer, r.label) for r in unpair(PreferenceRecord("p1", [], user_prompt("2+2?", 0), "4", "5"))]
    [('p1-desirable', '4', True), ('p1-undesirable', '5', False)]
    """
    if record.is_unpaired:
        return [record]
    return [unpaired(f"{record.id}-{kind}", list(record.images), copy.deepcopy(record.prompt), answer, label,
                     copy.deepcopy(record.metadata))
            for kind, answer, label in (("desirable", record.chosen, True), ("undesirable", record.rejected, False))]


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
