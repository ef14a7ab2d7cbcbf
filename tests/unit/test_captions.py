"""kohya's caption processing: keep_tokens, shuffle, dropout, tag dropout, warmup; seeded and repeatable."""

import random

from tunekit.trainer.data import CaptionOptions, process_caption

CAPTION = "sks dog, red collar, grass, sunny, park"


def run(options, seed=0, **kw):
    return process_caption(CAPTION, options, random.Random(seed), **kw)


def test_fixed_options_never_vary():
    options = CaptionOptions(prefix="photo of", suffix="4k", secondary_separator=";")
    assert not options.varies
    assert process_caption("a;b", options, random.Random(1)) == "photo of a,b 4k"


def test_shuffle_keeps_the_first_tokens_and_is_repeatable_per_seed():
    options = CaptionOptions(shuffle=True, keep_tokens=1)
    results = {run(options, seed) for seed in range(20)}
    assert len(results) > 5 and all(r.startswith("sks dog, ") for r in results)
    assert all(sorted(r.split(", ")) == sorted(CAPTION.split(", ")) for r in results)
    assert run(options, 7) == run(options, 7)


def test_keep_tokens_separator_fixes_a_prefix_and_a_suffix():
    options = CaptionOptions(shuffle=True, keep_tokens_separator="|||")
    caption = "sks dog ||| a, b, c ||| masterpiece"
    for seed in range(10):
        out = process_caption(caption, options, random.Random(seed))
        assert out.startswith("sks dog, ") and out.endswith(", masterpiece")


def test_caption_dropout_rate_and_every_n_epochs():
    options = CaptionOptions(dropout_rate=0.5)
    dropped = sum(run(options, seed) == "" for seed in range(400))
    assert 150 < dropped < 250
    every = CaptionOptions(dropout_every_n_epochs=2)
    assert run(every, epoch=1) == CAPTION and run(every, epoch=2) == "" and run(every, epoch=3) == CAPTION


def test_tag_dropout_drops_tags_but_never_the_kept_ones():
    options = CaptionOptions(tag_dropout_rate=0.5, keep_tokens=1)
    outs = [run(options, seed) for seed in range(50)]
    assert all(o.startswith("sks dog") for o in outs)
    assert min(len(o.split(", ")) for o in outs) < 5


def test_token_warmup_grows_the_caption():
    options = CaptionOptions(token_warmup_step=0.5, token_warmup_min=1)
    lengths = [len(run(options, step=s, max_steps=100).split(", ")) for s in (0, 25, 49, 50)]
    assert lengths == [1, 3, 4, 5]  # kohya: floor(step * (5 - 1) / 50) + 1
