"""Prompt rendering shared by every stage that talks to the model.

The same function renders the prompt at sampling time, at scoring time and at training time,
so that the behaviour log-probabilities recorded by ``sample`` are computed on exactly the
token sequence the trainer conditions on.
"""

from __future__ import annotations

from collections.abc import Mapping


def user_message(problem: str, prompt_cfg: Mapping, hint: str | None = None) -> str:
    """The user turn: the plain problem plus instruction, or the guided template with a hint."""
    instruction = prompt_cfg.get("instruction", "")
    if hint is None:
        return f"{problem}\n{instruction}".strip() if instruction else problem
    return prompt_cfg["guided_template"].format(problem=problem, hint=hint, instruction=instruction).strip()


def render_prompt(tokenizer, problem: str, prompt_cfg: Mapping, hint: str | None = None) -> str:
    """Render a prompt string through the tokenizer's chat template when it has one."""
    messages = []
    system = prompt_cfg.get("system")
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user_message(problem, prompt_cfg, hint)})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # No chat template (a base model): plain text turns.
    return "".join(f"{m['content']}\n\n" for m in messages)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt. The chat template already carries any BOS token."""
    add_special = not bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of a response the model should learn to produce: the text, then EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]
