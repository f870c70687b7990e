"""The Vicuna-v1 conversation template (the reference's `conv_vicuna_v1`), shared by training and evaluation.

    {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

Token ids are built segment by segment (BOS, each user turn up to and including "ASSISTANT:", each answer with its
`</s>`) instead of tokenising the whole string and re-deriving the answer spans. The label mask is therefore exact
by construction (the reference's "-2" offset rule silently masks whole samples when a tokenizer disagrees), and an
evaluation prompt is token-for-token the prefix a training sample had before its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE = "<image>"
IGNORE = -100
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


class ConversationError(ValueError):
    """A record whose conversation cannot be rendered (reason code in `.reason`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_conversation(conversations, has_image: bool) -> None:
    """Validate a Vision-Flan/LLaVA conversation list; raise ConversationError(reason) if unusable."""
    _check_turns(conversations)
    _check_image_tokens(conversations, has_image)


def _check_turns(conversations) -> None:
    """Alternating human / gpt turns with string values, ending on a non-empty assistant answer."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("bad_conversation", "conversations must be a non-empty list")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise ConversationError("bad_conversation", f"turn {i} must be {{'from': 'human'|'gpt', 'value': str}}")
        want = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != want:
            raise ConversationError("bad_conversation", f"turn {i} is from {turn['from']!r}, expected {want!r}")
    if len(conversations) % 2:
        raise ConversationError("bad_conversation", "the last turn must be the assistant's ('gpt')")
    for i in range(1, len(conversations), 2):
        if not conversations[i]["value"].strip():
            raise ConversationError("empty_answer", f"turn {i}: empty answer")


def _check_image_tokens(conversations, has_image: bool) -> None:
    """Exactly one <image> placeholder, in a user turn, when the record has an image; none otherwise."""
    n_img = sum(t["value"].count(IMAGE) for t in conversations)
    if has_image and n_img != 1:
        reason = "missing_image_token" if n_img == 0 else "extra_image_token"
        raise ConversationError(reason, f"an image record needs exactly one {IMAGE} placeholder, found {n_img}")
    if not has_image and n_img:
        raise ConversationError("extra_image_token", f"a text-only record has {n_img} {IMAGE} placeholder(s)")
    if any(IMAGE in conversations[i]["value"] for i in range(1, len(conversations), 2)):
        raise ConversationError("bad_conversation", f"{IMAGE} inside an assistant turn")


def _user_text(value: str) -> str:
    # As the reference's preprocess_multimodal: the placeholder moves to the start of its turn, then a newline.
    if IMAGE in value:
        value = IMAGE + "\n" + value.replace(IMAGE, "").strip()
    return value


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class VicunaTemplate:
    """Encodes conversations for one tokenizer; `<image>` expands to `num_image_tokens` copies of `image_token_id`."""

    def __init__(self, tokenizer, image_token_id: int, num_image_tokens: int, system: str = SYSTEM):
        self.tok = tokenizer
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.system = system
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the Vicuna template ends every answer with it")

    def _text(self, s: str) -> list[int]:
        ids: list[int] = []
        for k, piece in enumerate(s.split(IMAGE)):
            if k:
                ids += [self.image_token_id] * self.num_image_tokens
            if piece:
                ids += self.tok.encode(piece, add_special_tokens=False, verbose=False)
        return ids

    def _bos(self) -> list[int]:
        return [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []

    def encode(self, conversations) -> Encoded:
        """Training form: prompt tokens labelled IGNORE, answers + `</s>` supervised."""
        ids, labels = self._bos(), []
        labels += [IGNORE] * len(ids)
        for i in range(0, len(conversations), 2):
            system = self.system + " " if i == 0 else ""
            head = system + "USER: " + _user_text(conversations[i]["value"]) + " ASSISTANT:"
            p = self._text(head)
            a = self.tok.encode(" " + conversations[i + 1]["value"].strip(), add_special_tokens=False, verbose=False)
            a.append(self.tok.eos_token_id)
            ids += p + a
            labels += [IGNORE] * len(p) + a
        return Encoded(ids, labels)

    def prompt(self, question: str, history=()) -> list[int]:
        """Generation form: a user turn (with earlier turns) ending in "ASSISTANT:"; the model writes the answer."""
        conv = list(history) + [{"from": "human", "value": question}, {"from": "gpt", "value": "x"}]
        enc = self.encode(conv)
        # Drop the placeholder answer: everything from the first supervised token of the last turn on.
        last = max(i for i, lab in enumerate(enc.labels) if lab == IGNORE)
        return enc.input_ids[: last + 1]

    def length(self, conversations) -> int:
        return len(self.encode(conversations).input_ids)
