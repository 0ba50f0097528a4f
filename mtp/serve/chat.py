"""Chat prompts: a checkpoint's chat template (Hugging Face's Jinja `chat_template`, kept in the
tokenizer's config when a model is imported, e.g. SmolLM2-Instruct from its GGUF) rendered as
transformers' `apply_chat_template` renders it, then tokenised with the template's special
tokens (`<|im_start|>`, ...) read as the special ids they are."""

from __future__ import annotations

import json

from mtp.errors import MTPError

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatError(MTPError):
    """A chat request this model cannot take (a 400)."""


class ChatFormat:
    """Renders and encodes chat messages for one tokenizer; `available` is False without a template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template_text = getattr(tokenizer, "chat_template", None)
        self.available = bool(self.template_text)
        self._template = None
        self._encoder = None
        if not self.available:
            return
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        # the environment transformers renders chat templates in
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(self.template_text)
        except TemplateError as e:
            raise MTPError(f"the checkpoint's chat template does not parse: {e}") from None
        hf = getattr(tokenizer, "hf_tokenizer", None)
        if hf is not None:  # a copy of the BPE pipeline that reads special-token strings as specials
            from tokenizers import Tokenizer as HFTokenizer

            self._encoder = HFTokenizer.from_str(hf.to_str())
            self._encoder.encode_special_tokens = False

    def render(self, messages: list[dict]) -> str:
        from jinja2.exceptions import TemplateError

        if not self.available:
            raise ChatError("this model has no chat template: use /v1/completions with a prompt")
        tok = self.tokenizer
        bos = tok.decode_piece(tok.bos_ids[0]) if getattr(tok, "bos_ids", ()) else ""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                         eos_token=tok.decode_piece(tok.eot_id))
        except TemplateError as e:
            raise ChatError(f"the chat template refused these messages: {e}") from None

    def encode(self, messages: list[dict]) -> list[int]:
        """Token ids of the rendered conversation (the template writes any start token itself)."""
        text = self.render(messages)
        if self._encoder is not None:
            return self._encoder.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text)


def parse_messages(messages) -> list[dict]:
    """OpenAI chat messages -> [{"role", "content": str}]; ChatError for malformed ones."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # content parts: only text ones
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ChatError(f"messages[{i}].content[{j}]: only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out
