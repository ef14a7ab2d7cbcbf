"""Pure caption text operations: each takes a caption string and returns the new one, never touching files.

A caption is either booru-style tags ("sks dog, red collar, grass") or a sentence; tag operations split on
`separator` (kohya's `caption_separator`, "," by default) and join with `separator + " "`. Tags compare by
`tag_key`: case-insensitive, surrounding and repeated whitespace ignored, "_" equal to " " (WD14 writes
"red_collar", people write "red collar").
"""

import random
import re
from collections import Counter
from typing import Iterable, Mapping

from ..errors import TuneKitError

SEPARATOR = ","


def split_tags(caption: str, separator: str = SEPARATOR) -> list[str]:
    """The caption's non-empty tags, stripped and with inner whitespace collapsed, in order."""
    tags = (" ".join(tag.split()) for tag in caption.split(separator))
    return [tag for tag in tags if tag]


def join_tags(tags: Iterable[str], separator: str = SEPARATOR) -> str:
    return f"{separator} ".join(tags)


def tag_key(tag: str) -> str:
    """What two tags are compared by: "Red_Collar " and "red collar" are the same tag."""
    return " ".join(tag.replace("_", " ").split()).lower()


def normalize(caption: str, separator: str = SEPARATOR) -> str:
    """Whitespace collapsed, empty tags dropped: "a,, b ,c " -> "a, b, c"."""
    return join_tags(split_tags(caption, separator), separator)


def has_tag(caption: str, tag: str, separator: str = SEPARATOR) -> bool:
    key = tag_key(tag)
    return any(tag_key(t) == key for t in split_tags(caption, separator))


def prepend(caption: str, text: str, separator: str = SEPARATOR) -> str:
    """`text` in front of the caption, joined by the separator; empty parts add no separator."""
    return _join_nonempty(text, caption, separator)


def append(caption: str, text: str, separator: str = SEPARATOR) -> str:
    """`text` at the end of the caption, joined by the separator; empty parts add no separator."""
    return _join_nonempty(caption, text, separator)


def _join_nonempty(first: str, second: str, separator: str) -> str:
    parts = [part.strip() for part in (first, second) if part.strip()]
    return f"{separator} ".join(parts)


def replace_text(
    caption: str, find: str, replacement: str, regex: bool = False, case_sensitive: bool = True
) -> str:
    """Every occurrence of `find` replaced; with `regex`, `find` is a Python pattern and `replacement` may use \\1.

    An invalid pattern raises a TuneKitError naming the pattern and the problem.
    """
    if not find:
        return caption
    pattern = find if regex else re.escape(find)
    flags = 0 if case_sensitive else re.IGNORECASE
    try:
        compiled = re.compile(pattern, flags)
        return compiled.sub(replacement if regex else replacement.replace("\\", "\\\\"), caption)
    except re.error as error:
        raise TuneKitError(
            f"Find pattern {find!r} is not a valid regular expression ({error}). "
            "Fix the pattern, or turn 'regex' off to find the text literally."
        ) from None


def add_trigger(caption: str, trigger: str, at_end: bool = False, separator: str = SEPARATOR) -> str:
    """The caption with `trigger` as its first (or last) tag; a caption that has it as a tag is unchanged."""
    trigger = " ".join(trigger.split())
    if not trigger or has_tag(caption, trigger, separator):
        return caption
    return append(caption, trigger, separator) if at_end else prepend(caption, trigger, separator)


def remove_trigger(caption: str, trigger: str, separator: str = SEPARATOR) -> str:
    """The caption without the tag `trigger` (whole tags only: "sks" leaves "sks dog" alone)."""
    return remove_tags(caption, [trigger], separator)


def remove_tags(caption: str, tags: Iterable[str], separator: str = SEPARATOR) -> str:
    """The caption without any of `tags` (whole tags, compared by `tag_key`); other tags keep their order."""
    unwanted = {tag_key(tag) for tag in tags}
    kept = [tag for tag in split_tags(caption, separator) if tag_key(tag) not in unwanted]
    return join_tags(kept, separator)


def rename_tags(caption: str, renames: Mapping[str, str], separator: str = SEPARATOR) -> str:
    """Tags renamed by `renames` (old -> new, compared by `tag_key`); a rename to "" removes the tag."""
    by_key = {tag_key(old): " ".join(new.split()) for old, new in renames.items()}
    renamed = (by_key.get(tag_key(tag), tag) for tag in split_tags(caption, separator))
    return join_tags((tag for tag in renamed if tag), separator)


def parse_renames(text: str) -> dict[str, str]:
    """Tag renames written one per line as 'old tag = new tag' (blank lines skipped); a line without '=' raises a
    TuneKitError naming the line."""
    renames = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "=" not in line:
            raise TuneKitError(f"Rename line {number} ({line.strip()!r}) has no '=': write 'old tag = new tag'.")
        old, new = line.split("=", 1)
        renames[old.strip()] = new.strip()
    return renames


def dedupe_tags(caption: str, separator: str = SEPARATOR) -> str:
    """Each tag once, at its first place."""
    seen, kept = set(), []
    for tag in split_tags(caption, separator):
        if tag_key(tag) not in seen:
            seen.add(tag_key(tag))
            kept.append(tag)
    return join_tags(kept, separator)


def sort_tags(caption: str, keep_first: int = 0, reverse: bool = False, separator: str = SEPARATOR) -> str:
    """Tags sorted alphabetically (by `tag_key`), the first `keep_first` (e.g. the trigger word) left in front."""
    tags = split_tags(caption, separator)
    fixed, rest = tags[:keep_first], tags[keep_first:]
    return join_tags(fixed + sorted(rest, key=tag_key, reverse=reverse), separator)


def shuffle_tags(caption: str, seed: int, keep_first: int = 0, separator: str = SEPARATOR) -> str:
    """Tags in a random order drawn from `seed` (the same seed, the same order), the first `keep_first` kept."""
    tags = split_tags(caption, separator)
    fixed, rest = tags[:keep_first], tags[keep_first:]
    random.Random(seed).shuffle(rest)
    return join_tags(fixed + rest, separator)


def lowercase(caption: str) -> str:
    return caption.lower()


def limit_tags(caption: str, max_tags: int, separator: str = SEPARATOR) -> str:
    """The first `max_tags` tags (0: no limit)."""
    if max_tags <= 0:
        return caption
    return join_tags(split_tags(caption, separator)[:max_tags], separator)


def limit_characters(caption: str, max_characters: int, separator: str = SEPARATOR) -> str:
    """At most `max_characters` characters (0: no limit): the whole tags that fit, or for a sentence (or a first
    tag too long) the whole words that fit; a first word longer than the limit is cut inside."""
    if max_characters <= 0 or len(caption) <= max_characters:
        return caption
    tags, kept = split_tags(caption, separator), []
    while tags and len(join_tags(kept + tags[:1], separator)) <= max_characters:
        kept.append(tags.pop(0))
    if kept:
        return join_tags(kept, separator)
    head = caption[:max_characters]
    if not caption[max_characters].isspace() and " " in head.strip():
        head = head.rsplit(" ", 1)[0]
    return head.rstrip().rstrip(separator).rstrip()


def tag_frequency(captions: Iterable[str], separator: str = SEPARATOR) -> list[tuple[str, int]]:
    """(tag, number of captions that have it), most frequent first, ties alphabetical; a tag counts once per
    caption and is shown as first written."""
    counts, shown = Counter(), {}
    for caption in captions:
        seen = set()
        for tag in split_tags(caption, separator):
            key = tag_key(tag)
            if key not in seen:
                seen.add(key)
                counts[key] += 1
                shown.setdefault(key, tag)
    return [(shown[key], count) for key, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]
