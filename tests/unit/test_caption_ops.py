"""Pure caption operations (trainer/captions/ops.py): what nodes, the editor's routes and auto-captioning share."""

import pytest

from tunekit.trainer.captions import (
    add_trigger, append, dedupe_tags, has_tag, limit_characters, limit_tags, lowercase, normalize, prepend,
    parse_renames, remove_tags, remove_trigger, rename_tags, replace_text, shuffle_tags, sort_tags, split_tags, tag_frequency,
)
from tunekit.trainer.errors import TuneKitError

TAGS = "sks dog, red collar, grass, sunny"


def test_split_and_normalize_drop_empty_tags_and_extra_whitespace():
    assert split_tags(" a,,  b   c ,c,") == ["a", "b c", "c"]
    assert normalize("a,,b ;c", ) == "a, b ;c"
    assert split_tags("a; b", separator=";") == ["a", "b"]


def test_prepend_and_append_add_no_stray_separator():
    assert prepend(TAGS, "photo") == "photo, " + TAGS
    assert append(TAGS, "4k") == TAGS + ", 4k"
    assert prepend("", "photo") == "photo" and append("a dog", "") == "a dog"


def test_replace_plain_is_literal_and_regex_uses_groups():
    assert replace_text("a.b a.b", ".", "-") == "a-b a-b"
    assert replace_text("Dog dog", "dog", "cat", case_sensitive=False) == "cat cat"
    assert replace_text("x", "x", r"\1") == r"\1"  # plain replacement is literal too
    assert replace_text("red collar, blue collar", r"(\w+) collar", r"collar \1", regex=True) == "collar red, collar blue"
    assert replace_text(TAGS, "", "x") == TAGS


def test_a_bad_regex_names_the_pattern_and_the_fix():
    with pytest.raises(TuneKitError, match=r"'\(unclosed'.*regex"):
        replace_text("a", "(unclosed", "", regex=True)


def test_trigger_word_is_added_once_and_removed_as_a_whole_tag():
    assert add_trigger(TAGS, "ohwx") == "ohwx, " + TAGS
    assert add_trigger(TAGS, "ohwx", at_end=True) == TAGS + ", ohwx"
    assert add_trigger("ohwx, dog", "OHWX") == "ohwx, dog"
    assert add_trigger("", "ohwx") == "ohwx"
    assert remove_trigger("sks, sks dog, grass", "sks") == "sks dog, grass"


def test_tags_compare_ignoring_case_space_and_underscore():
    assert has_tag(TAGS, "Red_Collar") and not has_tag(TAGS, "red")
    assert remove_tags(TAGS, ["red_collar", "SUNNY"]) == "sks dog, grass"
    assert rename_tags(TAGS, {"red_collar": "collar", "grass": ""}) == "sks dog, collar, sunny"


def test_renames_are_parsed_one_per_line():
    assert parse_renames("blue = azure\n\nred_hair=  \n") == {"blue": "azure", "red_hair": ""}
    with pytest.raises(TuneKitError, match=r"line 2 \('cat'\) has no '='"):
        parse_renames("a=b\ncat")


def test_dedupe_keeps_the_first_occurrence():
    assert dedupe_tags("a, b, A, c, b , a") == "a, b, c"


def test_sort_keeps_the_first_tags_and_shuffle_is_seeded():
    assert sort_tags("sks, c, a, b", keep_first=1) == "sks, a, b, c"
    assert sort_tags("b, a", reverse=True) == "b, a"
    tags = ", ".join(f"t{i}" for i in range(10))
    shuffled = {shuffle_tags("sks, " + tags, seed, keep_first=1) for seed in range(10)}
    assert len(shuffled) > 5 and all(s.startswith("sks, ") for s in shuffled)
    assert shuffle_tags(tags, 3) == shuffle_tags(tags, 3)
    assert sorted(split_tags(shuffle_tags(tags, 3))) == sorted(split_tags(tags))


def test_lowercase():
    assert lowercase("A Dog, Red") == "a dog, red"


def test_length_limits_cut_at_whole_tags_or_words():
    assert limit_tags(TAGS, 2) == "sks dog, red collar" and limit_tags(TAGS, 0) == TAGS
    assert limit_characters(TAGS, 19) == "sks dog, red collar"
    assert limit_characters(TAGS, 18) == "sks dog"
    assert limit_characters("a photo of a dog on grass", 12) == "a photo of a"
    assert limit_characters("a photo of a dog", 11) == "a photo of"
    assert limit_characters("abcdefgh", 3) == "abc"
    assert limit_characters(TAGS, 0) == TAGS and limit_characters("short", 100) == "short"
    assert all(len(limit_characters(TAGS, n)) <= n for n in range(1, len(TAGS)))


def test_tag_frequency_counts_each_caption_once_most_frequent_first():
    captions = ["sks, dog, dog", "sks, Dog, grass", "cat, sks"]
    assert tag_frequency(captions) == [("sks", 3), ("dog", 2), ("cat", 1), ("grass", 1)]
    assert tag_frequency([]) == []
