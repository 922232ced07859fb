"""Chat templates: the model's tokenizer.chat_template (or --chat-template) rendered by Jinja2 in a sandbox, as
llama-cpp-python and Hugging Face do. A model without one gets ChatML, the stated fallback (also llama-server's)."""
from __future__ import annotations

from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML: what the fallback renders; its end marker is also a stop string, since a model that lacks the template
# lacks <|im_end|> as a special end-of-generation token too
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_STOP = ["<|im_end|>"]


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or a message is malformed)."""


def _raise(message: str):
    raise TemplateError(message)


class ChatTemplate:
    """A compiled chat template. source: where it came from, for /health and the logs."""

    def __init__(self, template: str, *, bos_token: str = "", eos_token: str = "", source: str = "",
                 stop: list[str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(template)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template ({source or 'given'}) does not compile: {e}") from None
        self.bos_token, self.eos_token, self.source = bos_token, eos_token, source
        self.text = template  # the Jinja2 source itself (/props shows it, as llama-server does)
        self.stop = list(stop or [])

    @classmethod
    def for_model(cls, model, override: str | None = None, override_source: str = "") -> "ChatTemplate":
        """--chat-template's text if given, else the GGUF's, else ChatML."""
        bos = model.token_text(model.bos_id) if model.bos_id is not None else ""
        eos = model.token_text(model.eos_id) if model.eos_id is not None else ""
        if override is not None:
            return cls(override, bos_token=bos, eos_token=eos, source=override_source or "--chat-template")
        if model.chat_template:
            return cls(model.chat_template, bos_token=bos, eos_token=eos, source="the model's tokenizer.chat_template")
        return cls(CHATML, bos_token=bos, eos_token=eos, source="ChatML (fallback: the model has no chat template)",
                   stop=CHATML_STOP)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template rejected the messages: {e}") from None
        except Exception as e:  # templates index and call things: a malformed message shows up as any error
            raise ChatTemplateError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None

    def prompt_tokens(self, model, messages: list[dict]) -> list[int]:
        """The rendered prompt as tokens. A template that writes BOS itself would double the one the tokenizer
        adds, so the rendered text loses a leading BOS when the tokenizer adds one (as llama.cpp does)."""
        text = self.render(messages)
        adds_bos = bool(model.tokenize("", add_special=True))
        if adds_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return model.tokenize(text, add_special=True, parse_special=True)
