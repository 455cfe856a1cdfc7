"""Prompt rendering shared by every stage that talks to the model.

The same function renders the prompt at sampling time, at scoring time and at training time,
so that the behaviour log-probabilities recorded by ``sample`` are computed on exactly the
token sequence the trainer conditions on.
"""

from __future__ import annotations

import contextlib
import weakref
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


def question_prompt(tokenizer, problem: str) -> str:
    """The paper code's training prompt (``train.prompt_format: question``): the chat template applied
    to one user turn holding the bare problem, with the generation prompt; no system turn and no
    instruction beyond what the template adds by itself (verl's ``SFTDataset``, ``prompt_dict_keys:
    ['question']``)."""
    return render_prompt(tokenizer, problem, {"system": None, "instruction": ""})


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt. The chat template already carries any BOS token."""
    add_special = not bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


_TURN_MARK = "drsft7turn7mark"


def special_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens (the named ones and every added special token)."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {int(i) for i, t in added.items() if getattr(t, "special", False)}


# end_of_turn_id per tokenizer object (weakly held), with the chat template it was read from: the
# answer is needed once per training row, and rendering a template each time costs more than the row.
_EOT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the tokenizer's chat template (Qwen's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``), or None: no template, or the turn ends in plain text.

    Found by rendering a conversation whose assistant turn is a marker and reading the first
    non-blank token after it, which must be a special token. Cached per tokenizer and template."""
    template = getattr(tokenizer, "chat_template", None)
    try:
        hit = _EOT_CACHE.get(tokenizer)
    except TypeError:  # an unhashable tokenizer stand-in: no cache
        hit = None
    if hit is not None and hit[0] == template:
        return hit[1]
    found = _find_end_of_turn(tokenizer)
    with contextlib.suppress(TypeError):
        _EOT_CACHE[tokenizer] = (template, found)
    return found


def _find_end_of_turn(tokenizer) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": _TURN_MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render an assistant turn names none
        return None
    at = text.rfind(_TURN_MARK)
    if at < 0:
        return None
    special = special_ids(tokenizer)
    for tid in tokenizer(text[at + len(_TURN_MARK):], add_special_tokens=False)["input_ids"]:
        if int(tid) in special:
            return int(tid)
        if tokenizer.decode([tid]).strip():
            return None
    return None


def response_end_id(tokenizer) -> int:
    """The token a training response ends with: the chat template's end of turn, else EOS; so that
    training, sampling and evaluation agree on where an answer stops (docs/records.md)."""
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        return eot
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither an end-of-turn token in its chat template nor an EOS token")
    return int(tokenizer.eos_token_id)


def stop_token_ids(tokenizer, generation_eos=None, extra=()) -> set[int]:
    """Every id generation stops at: the model's ``generation_config.eos_token_id`` (an int or a
    list), the tokenizer's EOS, the chat template's end of turn, and ``rollout.stop_token_ids``."""
    ids: set[int] = set()
    for value in (generation_eos, tokenizer.eos_token_id, end_of_turn_id(tokenizer)):
        if value is not None:
            ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    ids.update(int(v) for v in extra)
    return ids


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of a response the model should learn to produce: the text, then the token that
    ends an assistant turn (:func:`response_end_id`)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) + [response_end_id(tokenizer)]
