"""Talk to a model about an image: the base, or the base with a trained adapter (any artifact kind), with the
training chat template, answers streamed token by token.

    python -m pipeline.chat --model /models/llava-1.5-7b-hf --adapter runs/m2pt/adapter --image cat.jpg
    python -m pipeline.chat --adapter out/default/adapter --image img.png --prompt "What colour is the bigger object?"

In a session: type a question (the conversation goes on, turn after turn); `/image PATH` starts over on another
image, `/reset` starts over on the same image, `/exit` (or Ctrl-D) ends. A mistake (an image that is not there or
not an image) is one `error:` line, and the session goes on. With `--prompt` it answers once and exits (scripts,
tests): greedy by default, so the answer is the one `pipeline.evaluate` generates for the same question and image.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.source import ModelSource, Runtime, resolve_device

log = logging.getLogger("m2pt.chat")


@dataclass
class ChatConfig(Runtime, ModelSource):
    """The model to talk to and how it answers (every field is a flag)."""

    adapter: str | None = field(default=None, metadata={"help": (
        "a training artifact: an M2PT adapter, a PEFT LoRA adapter or a fully fine-tuned model folder, or a Hub "
        "repo id holding one (user/name[@revision], read through the Hugging Face cache)")})
    allow_other_base: bool = field(default=False, metadata={"help": (
        "use the adapter on a base other than the one it records (by default an error)")})
    image: Path | None = field(default=None, metadata={"type": Path, "help": (
        "the image to talk about (in a session: /image PATH changes it)")})
    prompt: str | None = field(default=None, metadata={"help": "answer this one question and exit"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per answer at most"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy (deterministic); > 0: sampling"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


def parse_args(argv=None):
    from pipeline.cli import config_parser

    return config_parser(ChatConfig, __doc__).parse_args(argv)


def load_model(cfg: ChatConfig):
    """(base, model, template): the adapter's files and recorded base are checked first, as `evaluate` does."""
    from pipeline.evaluation.runner import EvalConfig, load_row, plan_rows

    ecfg = EvalConfig(**cfg.source(), adapter=[cfg.adapter] if cfg.adapter else None,
                      allow_other_base=cfg.allow_other_base, device=resolve_device(cfg.device), dtype=cfg.dtype)
    rows, _ = plan_rows(ecfg)
    _, _, info = rows[0]  # the base row without --adapter, else the adapter's alone
    return load_row(ecfg, info)


def _printer(tokenizer, out):
    """A transformers streamer that prints the answer's text as it is generated (its leading space trimmed), then a
    newline. (Made on first use: transformers loads only once a model does.)"""
    from transformers import TextStreamer

    class Printer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            print(text, end="\n" if stream_end else "", file=out, flush=True)

    return Printer()


class Session:
    """One conversation about one image (or none): the turns so far, in the training template."""

    def __init__(self, base, model, template, cfg: ChatConfig, out=sys.stdout):
        self.base, self.model, self.template, self.cfg, self.out = base, model, template, cfg, out
        self.history: list[dict] = []
        self.pixels = None

    def set_image(self, path: Path | None) -> None:
        """Start over on another image (None: text only). A bad path is a UsageError; the old image stays."""
        from pipeline.evaluation.generate import _load_image

        if path is not None:
            path = Path(path).expanduser()
            if not path.is_file():
                raise UsageError(f"{path}: no such image file")
            try:
                pixels = _load_image(str(path), self.base.image_processor)
            except Exception as e:  # noqa: BLE001 - any decoder error is "not an image" to the user
                raise UsageError(f"{path}: not a readable image ({e})") from None
        else:
            pixels = None
        self.pixels, self.history = pixels, []

    def max_prompt_tokens(self) -> int:
        """The longest prompt that leaves room for --max_new_tokens within the LLM's positions (the textual prompts
        take the first ones), as the server's context_length_exceeded check counts it."""
        m2pt = getattr(self.model, "m2pt_config", None)
        pt = m2pt.text_prompt_length if m2pt is not None else 0
        return self.model.config.text_config.max_position_embeddings - pt - self.cfg.max_new_tokens

    def ask(self, question: str) -> str:
        """The model's answer to `question` after the turns so far, streamed to `out` as it is generated."""
        import torch

        first = not self.history
        text = ("<image>\n" + question) if first and self.pixels is not None else question
        ids = torch.tensor([self.template.prompt(text, history=self.history)], device=self.model.device)
        limit = self.max_prompt_tokens()
        if ids.shape[1] > limit:  # generate() would answer nothing (or garbage past the positions) and say nothing
            raise UsageError(f"the prompt is {ids.shape[1]} tokens (image and earlier turns included); this model "
                             f"takes at most {limit} with --max_new_tokens {self.cfg.max_new_tokens}: ask a shorter "
                             "question, or /reset the conversation")
        extra = {"pixel_values": self.pixels[None].to(self.model.device, self.model.dtype)} \
            if self.pixels is not None else {}
        sampling = dict(do_sample=True, temperature=self.cfg.temperature) if self.cfg.temperature > 0 \
            else dict(do_sample=False, temperature=None)
        tok = self.base.tokenizer
        streamer = _printer(tok, self.out)
        with torch.no_grad():
            seq = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **extra, **sampling,
                                      max_new_tokens=self.cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, top_p=None, top_k=None, streamer=streamer)
        answer = tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip()
        self.history += [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
        return answer


def command(session: Session, line: str) -> bool:
    """One line of a session; False ends it."""
    if line in ("/exit", "/quit"):
        return False
    if line == "/reset":
        session.history = []
        print("(conversation reset)", file=session.out)
    elif line.startswith("/image"):
        path = line[len("/image"):].strip()
        if not path:
            raise UsageError("/image PATH: give the image's path")
        session.set_image(Path(path))
        print(f"(new conversation on {path})", file=session.out)
    elif line.startswith("/"):
        raise UsageError(f"{line.split()[0]}: unknown command (/image PATH, /reset, /exit)")
    elif line:
        print("ASSISTANT: ", end="", file=session.out, flush=True)
        session.ask(line)
    return True


def interact(session: Session, lines) -> None:
    """Read questions and commands until /exit or the end of input; a mistake is one line and the session goes
    on."""
    print("USER: ", end="", file=session.out, flush=True)
    for raw in lines:
        try:
            if not command(session, raw.strip()):
                return
        except UsageError as e:
            print(f"error: {e}", file=session.out, flush=True)
        print("USER: ", end="", file=session.out, flush=True)
    print(file=session.out)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = ChatConfig(**vars(args))
    import torch

    torch.manual_seed(cfg.seed)
    try:
        session = Session(*load_model(cfg), cfg)
        session.set_image(cfg.image)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.prompt is not None:
        try:
            session.ask(cfg.prompt)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    interact(session, sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
