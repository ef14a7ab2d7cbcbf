"""Caption operations shared by the caption nodes, the caption editor's routes and auto-captioning.

`ops` holds pure text operations on one caption (or a list of them for tag frequency).
"""

from .ops import (
    add_trigger,
    append,
    dedupe_tags,
    has_tag,
    join_tags,
    limit_characters,
    limit_tags,
    lowercase,
    normalize,
    parse_renames,
    prepend,
    remove_tags,
    remove_trigger,
    rename_tags,
    replace_text,
    shuffle_tags,
    sort_tags,
    split_tags,
    tag_frequency,
    tag_key,
)

__all__ = [
    "add_trigger", "append", "dedupe_tags", "has_tag", "join_tags", "limit_characters", "limit_tags", "lowercase",
    "normalize", "parse_renames", "prepend", "remove_tags", "remove_trigger", "rename_tags", "replace_text",
    "shuffle_tags", "sort_tags", "split_tags", "tag_frequency", "tag_key",
]
