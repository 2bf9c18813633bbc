"""The rephrasing prompt library: styles (prompt + generation settings + post-processing) loaded from TOML.

    library = load_library()                       # the built-in prompts.toml
    library = load_library(["my_prompts.toml"])    # plus (or overriding) user styles of the same shape
    style = library["wrap-medium"]
    messages = style.messages(chunk_text, context="")   # OpenAI chat messages
    text = style.postprocess(reply, source=chunk_text)  # raises FormatError when the reply ignores the format

`Style.version` is a hash of everything that shapes the request and its post-processing: it goes into every
output record's provenance, so records made with an edited prompt are told apart.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomllib

BUILTIN = Path(__file__).with_name("prompts.toml")


class FormatError(ValueError):
    """A model reply that does not follow the style's required format (reason in the message)."""


class PromptLibraryError(ValueError):
    """An invalid prompt file (the message names the file and style)."""


@dataclass(frozen=True)
class Style:
    name: str
    template: str
    description: str = ""
    system: str = ""
    continue_template: str = ""
    prefix: str = ""
    postprocess_steps: tuple[str, ...] = ()
    temperature: float = 0.7
    top_p: float = 0.95
    max_output_tokens: int = 1024
    chunk_tokens: int = 512
    min_output_tokens: int = 0
    length_ratio: tuple[float, float] = (0.5, 2.0)
    qa_pairs: bool = False
    source: str = "builtin"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        d = asdict(self)
        d.pop("source")
        d.pop("description")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def messages(self, text: str, context: str = "", language: str = "English") -> list[dict[str, str]]:
        """Chat messages rewriting `text`; with `context` (the rewritten text so far) the continuation prompt."""
        template = self.continue_template if context and self.continue_template else self.template
        values = {"context": context, "language": language, "text": text}  # one pass: no re-substitution
        user = re.sub(r"\{(context|language|text)\}", lambda m: values[m.group(1)], template)
        out = [{"role": "system", "content": self.system}] if self.system else []
        return [*out, {"role": "user", "content": user}]

    def postprocess(self, reply: str | None, *, source: str = "", rng: random.Random | None = None,
                    count_tokens: Callable[[str], int] | None = None) -> str:
        """The cleaned rewrite of one chunk, or FormatError. `source` is the chunk (for append_to_source)."""
        if reply is None or not reply.strip():
            raise FormatError("empty reply")
        text = reply
        for step in self.postprocess_steps:
            text = POSTPROCESS[step](self, text, source, rng or random.Random(0), count_tokens or approx_tokens)
        text = text.strip()
        if not text:
            raise FormatError("nothing left after post-processing")
        if self.min_output_tokens and (count_tokens or approx_tokens)(text) < self.min_output_tokens:
            raise FormatError(f"output shorter than {self.min_output_tokens} tokens")
        return text


def approx_tokens(text: str) -> int:
    """A tokenizer-free token estimate: words and punctuation marks (about a BPE token each for English)."""
    return len(re.findall(r"\w+|[^\w\s]", text))


# ------------------------------------------------------------------------------------------ post-processing
_MD = [(re.compile(r"^#{1,6}\s*", re.M), ""), (re.compile(r"\*\*(.+?)\*\*"), r"\1"), (re.compile(r"__(.+?)__"), r"\1"),
       (re.compile(r"^```\w*\s*$", re.M), ""), (re.compile(r"`([^`]+)`"), r"\1")]


def _strip_markdown(style: Style, text: str, *_: Any) -> str:
    for pattern, repl in _MD:
        text = pattern.sub(repl, text)
    return text.strip()


def _strip_prefix(style: Style, text: str, *_: Any) -> str:
    stripped = text.strip()
    if not style.prefix:
        return stripped
    if not stripped.lower().startswith(style.prefix.lower()):
        raise FormatError(f"reply does not start with the required prefix {style.prefix!r}")
    return stripped[len(style.prefix):].strip()


def _strip_quotes(style: Style, text: str, *_: Any) -> str:
    t = text.strip()
    while len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'`" or (t[:1], t[-1:]) == ("“", "”"):
        t = t[1:-1].strip()
    return t


def _strip_passage_labels(style: Style, text: str, *_: Any) -> str:
    return re.sub(r"^\s*Passage\s*\d+\s*:\s*", "", text, flags=re.M | re.I).strip()


def _strip_bullets(style: Style, text: str, *_: Any) -> str:
    return re.sub(r"^\s*(?:[-*•]|\d+[.)])\s+", "", text, flags=re.M).strip()


_QA = re.compile(r"Question:\s*(.+?)\s*Answer:\s*(.+?)(?=\s*(?:[-*]\s*)?Question:|\Z)", re.S)


def _require_qa(style: Style, text: str, *_: Any) -> str:
    if not _QA.search(text):
        raise FormatError("no Question:/Answer: pairs in the reply")
    return text


def _parse_qa(style: Style, text: str, source: str, rng: random.Random, count: Callable[[str], int]) -> str:
    pairs = [(q.strip(), a.strip()) for q, a in _QA.findall(text)]
    if not pairs:
        raise FormatError("no Question:/Answer: pairs in the reply")
    if style.qa_pairs:  # Nemotron-CC: shuffle, keep randint(1, max(1, int(10 * tokens / 150))) pairs
        rng.shuffle(pairs)
        pairs = pairs[: rng.randint(1, max(1, int(10 * count(source) / 150)))]
    return "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs)


def _append_to_source(style: Style, text: str, source: str, *_: Any) -> str:
    return f"{source.strip()}\n\n{text.strip()}"


POSTPROCESS: dict[str, Callable[..., str]] = {
    "strip_markdown": _strip_markdown, "strip_prefix": _strip_prefix, "strip_quotes": _strip_quotes,
    "strip_passage_labels": _strip_passage_labels, "strip_bullets": _strip_bullets, "require_qa": _require_qa,
    "parse_qa": _parse_qa, "append_to_source": _append_to_source,
}
_FIELDS = {"template", "description", "system", "continue_template", "prefix", "postprocess", "temperature", "top_p",
           "max_output_tokens", "chunk_tokens", "min_output_tokens", "length_ratio", "qa_pairs", "extra"}


def _parse(path: Path, data: Mapping[str, Any]) -> dict[str, Style]:
    defaults = dict(data.get("defaults", {}))
    styles = data.get("styles")
    if not isinstance(styles, Mapping) or not styles:
        raise PromptLibraryError(f"{path}: no [styles.NAME] tables")
    out = {}
    for name, raw in styles.items():
        d = {**defaults, **raw}
        unknown = set(d) - _FIELDS
        if unknown:
            raise PromptLibraryError(f"{path}: style {name!r}: unknown field(s) {sorted(unknown)}; valid: "
                                     f"{sorted(_FIELDS)}")
        if "{text}" not in d.get("template", ""):
            raise PromptLibraryError(f"{path}: style {name!r}: template must contain {{text}}")
        steps = tuple(d.pop("postprocess", ()))
        bad = [s for s in steps if s not in POSTPROCESS]
        if bad:
            raise PromptLibraryError(f"{path}: style {name!r}: unknown postprocess step(s) {bad}; valid: "
                                     f"{sorted(POSTPROCESS)}")
        if "strip_prefix" in steps and not d.get("prefix"):
            raise PromptLibraryError(f"{path}: style {name!r}: strip_prefix needs a prefix")
        lo, hi = d.pop("length_ratio", (0.5, 2.0))
        out[name] = Style(name=name, postprocess_steps=steps, length_ratio=(float(lo), float(hi)),
                          source=str(path), **d)
    return out


def load_library(files: Iterable[str | Path] = (), *, builtin: bool = True) -> dict[str, Style]:
    """Styles by name: the built-in library, then each user file in order (a later style overrides)."""
    paths = ([BUILTIN] if builtin else []) + [Path(f) for f in files]
    library: dict[str, Style] = {}
    for p in paths:
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise PromptLibraryError(f"{p}: cannot read prompt file: {e}") from None
        library.update(_parse(p, data))
    return library
