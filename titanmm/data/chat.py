"""Chat templates and loss masks for supervised fine-tuning (SFT) and caption (alignment) pretraining.

A conversation is a list of turns `{"role": "system" | "user" | "assistant", "content": str}`.
`encode_conversation` renders it with a `ChatTemplate` and returns `(input_ids, loss_mask)`, where
`loss_mask[t]` is True exactly on the tokens the model should learn to produce: every assistant turn's
content tokens and the token that ends the turn (`<|eot_id|>`, `</s>`, `<|im_end|>`). System and user
turns, role headers, bos, the text after an end token (ChatML's "\\n") and image tokens are never learned.

Templates (`get_chat_template(name)`), each matching the official HF Jinja template token for token:

| name | format | bos | default system |
|---|---|---|---|
| "llama3" | `<|start_header_id|>role<|end_header_id|>\\n\\n` + content.strip() + `<|eot_id|>` | `<|begin_of_text|>` | none |
| "llama3.1" | as llama3, plus an always-present system block "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n" + system | `<|begin_of_text|>` | "" |
| "mistral" | v0.3: `[INST] user[/INST] assistant</s>` (assistant stripped, one space before it) | `<s>` | none |
| "chatml" = "qwen2" | `<|im_start|>role\\ncontent<|im_end|>\\n` | none | "You are a helpful assistant." |
| "nvlm-yi-34b" | ChatML with the tokenizer's bos first (Megatron `nvlm_yi_34b_template`) | tokenizer's | none |
| "plain" | bos + user/system content + "\\n" (unless it ends with one) + assistant content + eos | tokenizer's | none |

"plain" needs no special tokens beyond the tokenizer's own bos / eos (so it works with any tokenizer, e.g.
the small one that ships with titanmm for the debug flavors). It is LLaVA's "plain" conversation format
(`<image>` + caption + end marker, used for LLaVA's projector pretraining) extended to several turns, with
the tokenizer's eos as the learned end of each assistant turn; there is no HF template to match.
`add_generation_prompt` adds nothing (the prompt already ends with the user turn's "\\n").

How the tokens are made. Special tokens (`<|eot_id|>`, `<|im_start|>`, ...) are looked up with
`tokenizer.token_to_id` and inserted as ids: titanmm's tokenizers encode special-token *text* as plain
text, so a user who writes "<|im_end|>" in a message cannot forge a turn boundary. The text between two
special tokens is encoded with one `tokenizer.encode` call, which is what HF's `apply_chat_template`
does (added tokens split the string first, each piece is then tokenised on its own). Where a piece mixes
unlearned and learned text (ChatML's "assistant\\n" + reply, Llama's "\\n\\n" + reply, Mistral's
" " + reply), the whole piece is still encoded at once, so the ids equal HF's, and the boundary token is
the first token that does not decode to a prefix of the unlearned part; a token that straddles the
boundary (rare: only when pre-tokenisation merges across it) therefore counts as learned.
Mistral's `[INST]` / `[/INST]` are control tokens in the v0.3 vocabulary; with older vocabularies
that lack them they are written as text, as the HF template does.

Deliberate differences from HF (all documented in `ChatTemplate`):
* mistral: the system prompt is prepended ("system\\n\\nuser") to the *last user turn*, as
  mistral-common does. HF's v0.3 template only does so when that user turn is the very last message,
  i.e. it silently drops the system prompt of a conversation that ends with an assistant reply (every
  training sample). For prompts that end with a user turn both agree. `add_generation_prompt` adds
  nothing for mistral (as in HF).

Images. `<image>` placeholders in the content are kept as text by default (then they tokenise like any
text, as in HF without an image token). Pass `image_token_id` to `encode_conversation` and each
placeholder becomes that single id instead (never learned); then `expand_images` turns each one into
tags + `tokens_per_tile * tiles` image tokens with `prompts.expand_image_placeholders` and stretches
the loss mask to match. (Expanding text-level placeholders after rendering is not possible: the
rendered text cannot be re-encoded without losing the special-token ids.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from titanmm.data.packed import IGNORE_INDEX
from titanmm.data.prompts import DEFAULT_PLACEHOLDER, ExpandedPrompt, _tiles_per_image, expand_image_placeholders

ROLES = ("system", "user", "assistant")

LLAMA3 = "llama3"
MISTRAL = "mistral"
CHATML = "chatml"

PLAIN = "plain"

# Tokenizer's own bos / eos (HF templates' `bos_token` / `eos_token`); None there means no bos.
TOKENIZER_BOS = "<tokenizer bos>"
TOKENIZER_EOS = "<tokenizer eos>"

LLAMA31_DEFAULT_DATE = "26 Jul 2024"
QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format.

    Attributes:
        name: registry name.
        style: "llama3", "mistral", "chatml" or "plain" (how turns are laid out).
        bos: bos token text, TOKENIZER_BOS for the tokenizer's bos id, or None for no bos.
        eos: the token that ends an assistant turn (learned); TOKENIZER_EOS for the tokenizer's eos id.
        default_system: system prompt used when the conversation has none (None: no system turn).
        knowledge_preamble: llama3.1 only: always write a system block whose text starts with
            "Cutting Knowledge Date: December 2023\\nToday Date: {date_string}\\n\\n".
        date_string: llama3.1's "Today Date" (the HF template's default is "26 Jul 2024").
    """

    name: str
    style: str
    bos: str | None
    eos: str
    default_system: str | None = None
    knowledge_preamble: bool = False
    date_string: str = LLAMA31_DEFAULT_DATE

    def __post_init__(self):
        if self.style not in (LLAMA3, MISTRAL, CHATML, PLAIN):
            raise ValueError(f"unknown chat template style {self.style!r}")


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "llama3": ChatTemplate("llama3", LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>"),
    "llama3.1": ChatTemplate("llama3.1", LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", default_system="",
                             knowledge_preamble=True),
    "mistral": ChatTemplate("mistral", MISTRAL, bos="<s>", eos="</s>"),
    "chatml": ChatTemplate("chatml", CHATML, bos=None, eos="<|im_end|>", default_system=QWEN2_DEFAULT_SYSTEM),
    "nvlm-yi-34b": ChatTemplate("nvlm-yi-34b", CHATML, bos=TOKENIZER_BOS, eos="<|im_end|>"),
    "plain": ChatTemplate("plain", PLAIN, bos=TOKENIZER_BOS, eos=TOKENIZER_EOS),
}
CHAT_TEMPLATES["qwen2"] = replace(CHAT_TEMPLATES["chatml"], name="qwen2")


def get_chat_template(template: str | ChatTemplate) -> ChatTemplate:
    """The template of a name (see CHAT_TEMPLATES), or the template itself."""
    if isinstance(template, ChatTemplate):
        return template
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[template]


# Rendered pieces: ("special", token text, learn) must be one id; ("control", token text, learn) is one id
# when the vocabulary has it, else text; ("text", str, learn); ("id", int, learn).
def _special(token: str, learn: bool = False):
    return ("special", token, learn)


def _text(text: str, learn: bool = False):
    return ("text", text, learn)


def _content(text: str, learn: bool, image_token_id: int | None, placeholder: str) -> list:
    """Content text, with each image placeholder turned into the image id when one is given."""
    if image_token_id is None:
        return [_text(text, learn)]
    parts = text.split(placeholder)
    pieces = [_text(parts[0], learn)]
    for part in parts[1:]:
        pieces += [("id", image_token_id, False), _text(part, learn)]
    return pieces


def _check_turns(turns: Sequence[dict]) -> None:
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ValueError(f"turn {i} must be a dict with 'role' and 'content', got {turn!r:.100}")
        if turn["role"] not in ROLES:
            raise ValueError(f"turn {i}: unknown role {turn['role']!r}; expected one of {ROLES}")
        if not isinstance(turn["content"], str):
            raise ValueError(f"turn {i}: content must be a string, got {type(turn['content']).__name__}")
        if turn["role"] == "system" and i > 0:
            raise ValueError(f"turn {i}: a system turn may only come first")


def _render_llama3(t: ChatTemplate, turns, add_generation_prompt, content) -> list:
    pieces: list = []
    if t.knowledge_preamble:
        system = turns[0]["content"].strip() if turns and turns[0]["role"] == "system" else (t.default_system or "")
        if turns and turns[0]["role"] == "system":
            turns = turns[1:]
        preamble = f"Cutting Knowledge Date: December 2023\nToday Date: {t.date_string}\n\n"
        pieces += [_special("<|start_header_id|>"), _text("system"), _special("<|end_header_id|>"),
                   _text("\n\n" + preamble)] + content(system, False) + [_special(t.eos)]
    elif t.default_system is not None and (not turns or turns[0]["role"] != "system"):
        turns = [{"role": "system", "content": t.default_system}] + list(turns)
    for turn in turns:
        learn = turn["role"] == "assistant"
        pieces += [_special("<|start_header_id|>"), _text(turn["role"]), _special("<|end_header_id|>"), _text("\n\n")]
        pieces += content(turn["content"].strip(), learn) + [_special(t.eos, learn)]
    if add_generation_prompt:
        pieces += [_special("<|start_header_id|>"), _text("assistant"), _special("<|end_header_id|>"), _text("\n\n")]
    return pieces


def _render_mistral(t: ChatTemplate, turns, add_generation_prompt, content) -> list:
    system = None
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    elif t.default_system is not None:
        system = t.default_system
    for i, turn in enumerate(turns):
        if (turn["role"] == "user") != (i % 2 == 0):
            raise ValueError("mistral: after the optional system turn, roles must alternate user/assistant/...")
    last_user = max((i for i, turn in enumerate(turns) if turn["role"] == "user"), default=None)
    pieces: list = []
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            text = turn["content"]
            if i == last_user and system is not None:
                text = system + "\n\n" + text
            pieces += [("control", "[INST]", False), _text(" ")] + content(text, False) + [("control", "[/INST]", False)]
        else:
            pieces += content(" " + turn["content"].strip(), True) + [_special(t.eos, True)]
    return pieces


def _render_chatml(t: ChatTemplate, turns, add_generation_prompt, content) -> list:
    if t.default_system is not None and turns and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": t.default_system}] + list(turns)
    pieces: list = []
    for turn in turns:
        learn = turn["role"] == "assistant"
        pieces += [_special("<|im_start|>"), _text(turn["role"] + "\n")]
        pieces += content(turn["content"], learn) + [_special(t.eos, learn), _text("\n")]
    if add_generation_prompt:
        pieces += [_special("<|im_start|>"), _text("assistant\n")]
    return pieces


def _render_plain(t: ChatTemplate, turns, add_generation_prompt, content) -> list:
    pieces: list = []
    for turn in turns:
        if turn["role"] == "assistant":
            pieces += content(turn["content"], True) + [_special(t.eos, True)]
        else:
            text = turn["content"]
            pieces += content(text if text.endswith("\n") else text + "\n", False)
    return pieces


_RENDERERS = {LLAMA3: _render_llama3, MISTRAL: _render_mistral, CHATML: _render_chatml, PLAIN: _render_plain}


def render_pieces(turns: Sequence[dict], template: str | ChatTemplate, add_generation_prompt: bool = False, *,
                  image_token_id: int | None = None, placeholder: str = DEFAULT_PLACEHOLDER) -> list:
    """The conversation as (kind, value, learn) pieces, before tokenisation (bos not included)."""
    t = get_chat_template(template)
    _check_turns(turns)

    def content(text: str, learn: bool) -> list:
        return _content(text, learn, image_token_id, placeholder)

    return _RENDERERS[t.style](t, list(turns), add_generation_prompt, content)


def _token_id(tokenizer, token: str, required: bool) -> int | None:
    if token in (TOKENIZER_BOS, TOKENIZER_EOS):
        token_id = tokenizer.bos_id if token == TOKENIZER_BOS else tokenizer.eos_id
        if token_id is None and required:
            raise ValueError(f"the tokenizer {getattr(tokenizer, 'path', tokenizer)!r} has no "
                             f"{'bos' if token == TOKENIZER_BOS else 'eos'} token, which this chat template needs")
        return token_id
    lookup = getattr(tokenizer, "token_to_id", None)
    token_id = lookup(token) if lookup is not None else None
    if token_id is None and required:
        raise ValueError(f"the tokenizer {getattr(tokenizer, 'path', tokenizer)!r} has no token {token!r}, "
                         "which this chat template needs")
    return token_id


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode_run(run: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[bool]]:
    """Ids and loss mask of consecutive text parts, encoded as one string."""
    merged: list[list] = []
    for text, learn in run:
        if not text:
            continue
        if merged and merged[-1][1] == learn:
            merged[-1][0] += text
        else:
            merged.append([text, learn])
    if not merged:
        return [], []
    whole = "".join(text for text, _ in merged)
    ids = list(tokenizer.encode(whole))
    if len(merged) == 1:
        return ids, [merged[0][1]] * len(ids)
    cuts, offset, k = [0], 0, 0
    for text, _ in merged[:-1]:
        offset += len(text)
        k = max(k, _common_prefix(list(tokenizer.encode(whole[:offset])), ids))  # fast path
        while k < len(ids):  # extend over tokens that still decode to a prefix of the unlearned text
            decoded = tokenizer.decode(ids[:k + 1])
            if len(decoded) > offset or not whole.startswith(decoded):
                break
            k += 1
        cuts.append(k)
    cuts.append(len(ids))
    mask: list[bool] = []
    for (_, learn), start, end in zip(merged, cuts[:-1], cuts[1:]):
        mask += [learn] * (end - start)
    return ids, mask


def _tokenize_pieces(pieces: list, tokenizer) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    run: list[tuple[str, bool]] = []

    def flush():
        run_ids, run_mask = _encode_run(run, tokenizer)
        ids.extend(run_ids)
        mask.extend(run_mask)
        run.clear()

    for kind, value, learn in pieces:
        if kind == "text":
            run.append((value, learn))
            continue
        if kind == "control":
            token_id = _token_id(tokenizer, value, required=False)
            if token_id is None:
                run.append((value, learn))
                continue
        elif kind == "special":
            token_id = _token_id(tokenizer, value, required=True)
        else:
            token_id = int(value)
        flush()
        ids.append(token_id)
        mask.append(learn)
    flush()
    return ids, mask


def _bos_id(t: ChatTemplate, tokenizer) -> int | None:
    if t.bos is None:
        return None
    if t.bos == TOKENIZER_BOS:
        return tokenizer.bos_id
    return _token_id(tokenizer, t.bos, required=True)


def encode_conversation(turns: Sequence[dict], tokenizer, template: str | ChatTemplate,
                        add_generation_prompt: bool = False, *, image_token_id: int | None = None,
                        placeholder: str = DEFAULT_PLACEHOLDER) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation rendered with `template`, and its loss mask.

    Args:
        turns: [{"role": "system" | "user" | "assistant", "content": str}, ...]; a system turn only first.
        tokenizer: a titanmm `Tokenizer` with `token_to_id` (HF tokenizer.json or tiktoken).
        template: a ChatTemplate or its name ("llama3", "llama3.1", "mistral", "chatml", "qwen2", "nvlm-yi-34b").
        add_generation_prompt: end with the assistant header (for inference / evaluation prompts).
        image_token_id: when given, every `placeholder` in the content becomes this one id (loss mask
            False), ready for `expand_images`; when None, placeholders stay text.

    Returns (input_ids, loss_mask): loss_mask is True exactly on assistant content tokens and the token
    that ends each assistant turn.
    """
    t = get_chat_template(template)
    pieces = render_pieces(turns, t, add_generation_prompt, image_token_id=image_token_id, placeholder=placeholder)
    ids, mask = _tokenize_pieces(pieces, tokenizer)
    bos_id = _bos_id(t, tokenizer)
    if bos_id is not None:
        ids, mask = [bos_id] + ids, [False] + mask
    return ids, mask


def encode_caption(caption: str, prompt: str, tokenizer, template: str | ChatTemplate | None = None, *,
                   image_token_id: int | None = None, placeholder: str = DEFAULT_PLACEHOLDER,
                   bos: bool = True, eos: bool = True) -> tuple[list[int], list[bool]]:
    """Ids and loss mask of an image-caption sample for the alignment (projector pretraining) stage.

    With a template: the conversation [user: prompt, assistant: caption] (the caption and its end-of-turn
    token are learned). Without one: bos (when `bos` and the tokenizer has one) + prompt + caption + eos
    (when `eos`), encoded as one text so the ids equal encoding the joined string; the caption and eos are
    learned, bos and prompt are not. `<image>` placeholders in the prompt work as in `encode_conversation`.
    """
    if template is not None:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]
        return encode_conversation(turns, tokenizer, template, image_token_id=image_token_id, placeholder=placeholder)
    pieces = _content(prompt, False, image_token_id, placeholder) + [_text(caption, True)]
    ids, mask = _tokenize_pieces(pieces, tokenizer)
    if bos and tokenizer.bos_id is not None:
        ids, mask = [tokenizer.bos_id] + ids, [False] + mask
    if eos and tokenizer.eos_id is not None:
        ids, mask = ids + [tokenizer.eos_id], mask + [True]
    return ids, mask


def expand_images(input_ids: Sequence[int], loss_mask: Sequence[bool], tokenizer, *, image_token_id: int,
                  tokens_per_tile: int, num_tiles: int | Sequence[int] = 1, placeholder_id: int | None = None,
                  **layout) -> tuple[ExpandedPrompt, torch.Tensor]:
    """Expand the image placeholders of `encode_conversation(..., image_token_id=placeholder_id)`.

    Each `placeholder_id` (default: `image_token_id`) becomes tags + image tokens exactly as
    `prompts.expand_image_placeholders` lays them out (`layout`: tag_style, use_tile_tags, tile_format,
    thumbnail_tag). Returns (the ExpandedPrompt, the loss mask stretched to it: False on every image
    token and tag).
    """
    placeholder_id = image_token_id if placeholder_id is None else placeholder_id
    if len(input_ids) != len(loss_mask):
        raise ValueError(f"input_ids ({len(input_ids)}) and loss_mask ({len(loss_mask)}) differ in length")
    kwargs = dict(image_token_id=image_token_id, tokens_per_tile=tokens_per_tile, placeholder_id=placeholder_id, **layout)
    expanded = expand_image_placeholders(list(input_ids), tokenizer, num_tiles=num_tiles, **kwargs)
    tiles = iter(_tiles_per_image(num_tiles, sum(int(i) == placeholder_id for i in input_ids)))
    mask: list[bool] = []
    pending: list[int] = []

    def flush():
        if pending:  # a run of adjacent images is expanded together (their tag text is merged)
            mask.extend([False] * len(expand_image_placeholders([placeholder_id] * len(pending), tokenizer,
                                                                num_tiles=list(pending), **kwargs).input_ids))
            pending.clear()

    for token, learn in zip(input_ids, loss_mask):
        if int(token) == placeholder_id:
            if learn:
                raise ValueError("an image placeholder is marked as learned in the loss mask")
            pending.append(next(tiles))
            continue
        flush()
        mask.append(bool(learn))
    flush()
    if len(mask) != len(expanded.input_ids):
        raise AssertionError(f"expanded loss mask has {len(mask)} entries for {len(expanded.input_ids)} ids")
    return expanded, torch.tensor(mask, dtype=torch.bool)


def sft_sample(input_ids: Sequence[int], loss_mask: Sequence[bool]) -> dict[str, torch.Tensor]:
    """A next-token training sample: input_ids = ids[:-1], labels = ids[1:] with IGNORE_INDEX (-100)
    wherever the target token is not learned (the `packed.sample_dict` convention)."""
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    learn = torch.as_tensor(list(loss_mask), dtype=torch.bool)
    if ids.shape != learn.shape or len(ids) < 2:
        raise ValueError("input_ids and loss_mask must have the same length, at least 2")
    labels = ids[1:].clone()
    labels[~learn[1:]] = IGNORE_INDEX
    return {"input_ids": ids[:-1], "labels": labels}
