"""The generation plan: strength parsing, spec validation, hash-derived seeds and shard tasks."""

from __future__ import annotations

from collections import Counter

import pytest

from sia_pipeline.format.genspec import PlanError, parse_strengths, sample_params
from sia_pipeline.format.v1 import parse_key
from sia_pipeline.gen.plan import describe_plan, estimate_bytes, make_spec, make_tasks

CATS = {"bottle": 0, "magnetic_tile": 1}


def spec(**kw):
    args = {"model_id": "sdas-test", "model_categories": CATS, "resolution": 32}
    args.update(kw)
    return make_spec(**args)


def test_parse_uniform_range():
    s = parse_strengths("0.1:0.5")
    assert s.kind == "uniform"
    assert s.values == (0.1, 0.5)
    assert s.value(0.0, 7) == 0.1
    assert s.value(0.5, 7) == pytest.approx(0.3)


def test_parse_grid_includes_both_ends():
    s = parse_strengths("0.1:0.5:0.1")
    assert s.kind == "grid"
    assert s.values == pytest.approx((0.1, 0.2, 0.3, 0.4, 0.5))


def test_parse_list_keeps_order():
    s = parse_strengths(" 0.3, 0,0.1 ")
    assert s.kind == "list"
    assert s.values == (0.3, 0.0, 0.1)


def test_equal_specs_have_one_canonical_text():
    assert parse_strengths("0.10:0.5").text == parse_strengths("0.1:0.50").text
    assert parse_strengths("0.1,0.2").text == parse_strengths("0.10, 0.20").text


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0.5:0.1", "must be below"),
        ("0.2:0.2", "must be below"),
        ("abc", "'abc' is not a number"),
        ("-0.1", ">= 0"),
        ("0.1,-0.2", ">= 0"),
        ("", "empty"),
        ("   ", "empty"),
        ("0.1:", "'' is not a number"),
        ("0.1:0.5:0", "step must be > 0"),
        ("0.1:0.5:-0.1", ">= 0"),
        ("nan", "not finite"),
        ("0.1:inf", "not finite"),
        ("1:2:3:4", "4 ':'-parts"),
        ("0.1:0.2,0.3", "mixes"),
        ("0.1,,0.2", "'' is not a number"),
    ],
)
def test_bad_strengths_name_the_problem(text, needle):
    with pytest.raises(PlanError) as err:
        parse_strengths(text)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_all_means_the_model_categories_in_model_order():
    assert spec(categories="all").categories == ("bottle", "magnetic_tile")
    assert spec(categories="magnetic_tile").class_ids == (1,)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"categories": "screw"}, "unknown category 'screw'"),
        ({"categories": "bottle,../etc"}, "invalid category name '../etc'"),
        ({"categories": "a/b"}, "invalid category name 'a/b'"),
        ({"categories": ".."}, "invalid category name '..'"),
        ({"categories": "bottle,"}, "empty category"),
        ({"categories": "bottle,bottle"}, "more than once"),
        ({"per_category": 0}, "--per-category"),
        ({"shard_size": 0}, "--shard-size"),
        ({"shard_size": 1_000_000}, "--shard-size"),
        ({"seed": -1}, "--seed"),
        ({"steps": 0}, "--steps"),
        ({"steps": 1001}, "--steps"),
        ({"sampler": "euler"}, "--sampler"),
        ({"image_format": "webp"}, "--image-format"),
        ({"sampler": "ddim", "eta": -1.0}, "--eta"),
    ],
)
def test_bad_spec_inputs_are_refused(kwargs, needle):
    with pytest.raises(PlanError) as err:
        spec(**kwargs)
    assert needle in str(err.value)


def test_sample_params_are_pure_and_in_range():
    s = spec(strengths="0.1:0.5", per_category=50)
    first = [sample_params(s, "bottle", i) for i in range(50)]
    again = [sample_params(s, "bottle", i) for i in reversed(range(50))][::-1]
    assert first == again
    assert len({seed for seed, _ in first}) == 50
    assert all(0 <= seed < 2**63 for seed, _ in first)
    assert all(0.1 <= st < 0.5 for _, st in first)
    assert len({st for _, st in first}) == 50  # uniform per sample, not per batch


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "sdas-other"},
        {"seed": 1},
        {"strengths": "0.1:0.6"},
        {"sampler": "ddim"},
        {"steps": 10},
    ],
)
def test_seed_depends_on_every_input_of_the_determinism_rule(change):
    base = spec()
    assert sample_params(base, "bottle", 3)[0] != sample_params(spec(**change), "bottle", 3)[0]
    assert sample_params(base, "bottle", 3)[0] != sample_params(base, "magnetic_tile", 3)[0]


def test_seeds_do_not_depend_on_shard_size_or_category_list():
    a = make_tasks(spec(shard_size=3, per_category=10))
    b = make_tasks(spec(shard_size=4, per_category=10, categories="magnetic_tile,bottle"))

    def by_index(tasks):
        return {
            (t.category, t.start + j): (t.seeds[j], t.strengths[j])
            for t in tasks
            for j in range(t.count)
        }

    assert by_index(a) == by_index(b)


def test_grid_values_occur_equally_often():
    tasks = make_tasks(spec(strengths="0.1:0.4:0.1", per_category=40, shard_size=7))
    counts = Counter(round(st, 9) for t in tasks if t.category == "bottle" for st in t.strengths)
    assert counts == {0.1: 10, 0.2: 10, 0.3: 10, 0.4: 10}


def test_tasks_cover_every_sample_once_with_unique_keys():
    s = spec(per_category=10, shard_size=4)
    tasks = make_tasks(s, batch_size=3)
    assert [t.shard_id for t in tasks] == [
        "bottle-000000",
        "bottle-000001",
        "bottle-000002",
        "magnetic_tile-000000",
        "magnetic_tile-000001",
        "magnetic_tile-000002",
    ]
    assert [t.count for t in tasks] == [4, 4, 2, 4, 4, 2]
    keys = [t.key(j) for t in tasks for j in range(t.count)]
    assert len(set(keys)) == 20
    assert parse_key(tasks[2].key(1)) == ("bottle", 2, 1)
    row = tasks[2].sample_row(1)
    assert row["sample_index"] == 9
    assert row["shard"] == "bottle-000002"
    assert tasks[2].tar_name == "shards/bottle/bottle-000002.tar"
    assert tasks[2].stats_name == "shards/bottle/bottle-000002.json"


def test_spec_hash_is_stable_and_names_the_spec():
    assert spec().spec_hash == spec().spec_hash
    assert spec(strengths="0.10:0.50").spec_hash == spec(strengths="0.1:0.5").spec_hash
    assert spec(per_category=129).spec_hash != spec().spec_hash
    assert spec(image_format="jpg").spec_hash != spec().spec_hash


def test_ddpm_ignores_eta():
    assert spec(sampler="ddpm", eta=0.5).eta == 0.0
    assert spec(sampler="ddim", eta=0.5).eta == 0.5


def test_dry_run_summary_and_estimate():
    s = spec(per_category=2500, shard_size=1000)
    text = describe_plan(s, make_tasks(s), done=2)
    assert "2500 per category x 2 categories = 5000" in text
    assert "6 (3 per category" in text
    assert "2 already done" in text
    assert 5000 * 32 * 32 * 3 * 0.5 < estimate_bytes(s) < 5000 * 32 * 32 * 3 * 2
    assert estimate_bytes(spec(image_format="jpg")) < estimate_bytes(spec())
