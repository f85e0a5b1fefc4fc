"""The token grammar: parse/serialize round trips, positioned errors, and the decoding state machine."""
import dataclasses
import time

import numpy as np
import pytest
import torch

from graspGPT.data.grammar import AllowedSet, Block, GrammarError, GrammarState, Sample, parse, section_starts, serialize, validate
from graspGPT.data.vocab import Vocab
from graspGPT.decoding import allowed_masks

SMALL = Vocab((4, 3, 2))  # 24 cells, V = 363: small enough to check every token
TAGGED = Vocab((4, 3, 2), ["mug", "bowl"])


def ids_of(tokens, vocab=SMALL):
    return np.array([t if isinstance(t, int) else vocab.id_of(t) for t in tokens], dtype=np.int64)


def cells(vocab, *xyz):
    return vocab.cell_ids(np.array(xyz, dtype=np.int64).reshape(-1, 3))


def assert_same_sample(a: Sample, b: Sample):
    def same_blocks(x, y):
        if x is None or y is None:
            assert x is None and y is None
            return
        assert len(x) == len(y)
        for p, q in zip(x, y):
            assert p.tag == q.tag
            np.testing.assert_array_equal(p.cells, q.cells)
            ps = None if p.serials is None or not (p.serials >= 0).any() else p.serials
            qs = None if q.serials is None or not (q.serials >= 0).any() else q.serials
            if ps is None or qs is None:
                assert ps is None and qs is None
            else:
                np.testing.assert_array_equal(ps, qs)

    same_blocks(a.scene, b.scene)
    assert (a.amodal is None) == (b.amodal is None)
    if a.amodal is not None:
        np.testing.assert_array_equal(a.amodal, b.amodal)
    same_blocks(a.unseg, b.unseg)
    same_blocks(a.grasps, b.grasps)


# -- parse / serialize ----------------------------------------------------------------

def build(sections: str, vocab=SMALL) -> Sample:
    obj1, obj2 = vocab.object_tag(1), vocab.object_tag(2)
    s = Sample(scene=[Block(obj2, cells(vocab, (0, 0, 1), (2, 1, 0))), Block(obj1, cells(vocab, (1, 0, 0)))])
    if "amodal" in sections:
        s.scene = [Block(vocab.incomplete, cells(vocab, (0, 0, 1)))]
        s.amodal = cells(vocab, (0, 0, 0), (0, 0, 1), (1, 0, 0), (2, 1, 0))
    if "unseg" in sections:
        s.unseg = [Block(obj1, cells(vocab, (1, 0, 0))), Block(obj2, cells(vocab, (0, 0, 1), (2, 1, 0)))]
    if "grasps" in sections:
        s.grasps = [Block(obj1, cells(vocab, (3, 2, 1), (0, 0, 0), (1, 1, 1))), Block(obj2, cells(vocab, (2, 0, 0), (2, 0, 1)))]
    if "emptygrasps" in sections:
        s.grasps = []
    if "emptyunseg" in sections:
        s.unseg = []
    if "serials" in sections:
        s.scene[0].serials = np.array([-1, vocab.id_of("<serial3>")])
        s.scene[1].serials = np.array([vocab.id_of("<serial240>")])
    return s


@pytest.mark.parametrize("sections", [
    "scene", "scene amodal", "scene unseg", "scene grasps", "scene amodal unseg grasps", "scene amodal grasps",
    "scene unseg grasps", "scene emptygrasps", "scene emptyunseg", "scene serials grasps",
])
def test_round_trip(sections):
    sample = build(sections)
    ids = serialize(sample, SMALL)
    assert ids.dtype == np.int64
    assert sample.num_tokens() == len(ids)
    parsed = parse(ids, SMALL)
    assert_same_sample(parsed, sample)
    np.testing.assert_array_equal(serialize(parsed, SMALL), ids)
    assert validate(ids, SMALL) is None


def test_scene_only_empty_scene():
    ids = ids_of(["scene", "end"])
    s = parse(ids, SMALL)
    assert s.scene == [] and s.amodal is None and s.unseg is None and s.grasps is None
    assert s.num_tokens() == 2
    np.testing.assert_array_equal(serialize(s, SMALL), ids)


def test_serialize_exact_layout():
    tokens = ["scene", "object02", (0, 0, 1), (2, 1, 0), "object01", (1, 0, 0),
              "segment", "object01", (1, 0, 0), "object02", (0, 0, 1), (2, 1, 0), "endunseg",
              "detectgrasp", "grasp", "object01", (3, 2, 1), (0, 0, 0), (1, 1, 1), "grasp", "object02", (2, 0, 0), (2, 0, 1), "end"]
    assert serialize(build("scene unseg grasps"), SMALL).tolist() == ids_of(tokens).tolist()
    amodal = ["scene", "incomplete", (0, 0, 1), "amodal", "unlabel", (0, 0, 0), (0, 0, 1), (1, 0, 0), (2, 1, 0), "endamodal", "end"]
    assert serialize(build("scene amodal"), SMALL).tolist() == ids_of(amodal).tolist()
    serial = ["scene", "object02", (0, 0, 1), (2, 1, 0), "<serial3>", "object01", (1, 0, 0), "<serial240>", "end"]
    assert serialize(build("scene serials"), SMALL).tolist() == ids_of(serial).tolist()


def test_serials_parse_into_blocks():
    s = parse(ids_of(["scene", "object02", (0, 0, 1), (2, 1, 0), "<serial3>", "end"]), SMALL)
    np.testing.assert_array_equal(s.scene[0].cells, cells(SMALL, (0, 0, 1), (2, 1, 0)))
    np.testing.assert_array_equal(s.scene[0].serials, [-1, SMALL.id_of("<serial3>")])
    assert len(s.scene[0]) == 4


def test_dynamic_tags_in_scene_and_grasps():
    ids = ids_of(["scene", "mug", (0, 0, 0), "detectgrasp", "grasp", "bowl", (1, 0, 0), (0, 0, 0), (0, 0, 1), "end"], TAGGED)
    s = parse(ids, TAGGED)
    assert s.scene[0].tag == TAGGED.id_of("mug") and s.grasps[0].tag == TAGGED.id_of("bowl")
    bad = ids_of(["scene", "segment", "mug", (0, 0, 0), "endunseg", "end"], TAGGED)
    assert validate(bad, TAGGED).rule == "unseg"


def test_non_strict_allows_unsorted_and_long_grasps():
    ids = ids_of(["scene", "object01", (1, 0, 0), (0, 0, 0), (0, 0, 0), "detectgrasp", "grasp", "object01",
                  (0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), "end"])
    s = parse(ids, SMALL, strict=False)
    assert len(s.scene[0].cells) == 3 and len(s.grasps[0].cells) == 4
    np.testing.assert_array_equal(serialize(s, SMALL), ids)
    assert validate(ids, SMALL).position == 3


def test_section_starts():
    ids = serialize(build("scene amodal unseg grasps"), SMALL)
    starts = section_starts(ids, SMALL)
    assert ids[starts["amodal"]] == SMALL.amodal and ids[starts["segment"]] == SMALL.segment
    assert ids[starts["detectgrasp"]] == SMALL.detectgrasp and starts["end"] == len(ids) - 1


C0, C1, C2, C3 = (0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)
BAD = [
    ("empty", [], 0, "sequence"),
    ("missing end", ["scene", "object01", C0], 3, "sequence"),
    ("tokens after end", ["scene", "end", "end"], 2, "sequence"),
    ("cell after end", ["scene", "end", C0], 2, "sequence"),
    ("not starting with scene", ["object01", C0, "end"], 0, "sequence"),
    ("serial first token", ["<serial1>", "scene", "end"], 0, "sequence"),
    ("second scene", ["scene", "scene", "end"], 1, "sequence"),
    ("cell after scene", ["scene", C0, "end"], 1, "scene"),
    ("tag without cells", ["scene", "object01", "object02", C0, "end"], 2, "block"),
    ("tag without cells at end", ["scene", "object01", "end"], 2, "block"),
    ("amodal after detectgrasp", ["scene", "detectgrasp", "amodal", "unlabel", C0, "endamodal", "end"], 2, "sequence"),
    ("segment after detectgrasp", ["scene", "detectgrasp", "segment", "endunseg", "end"], 2, "sequence"),
    ("amodal after segment", ["scene", "segment", "endunseg", "amodal", "unlabel", C0, "endamodal", "end"], 3, "sequence"),
    ("two detectgrasp", ["scene", "detectgrasp", "detectgrasp", "end"], 2, "sequence"),
    ("tag after endamodal", ["scene", "amodal", "unlabel", C0, "endamodal", "object01", C1, "end"], 5, "sequence"),
    ("cell after endamodal", ["scene", "amodal", "unlabel", C0, "endamodal", C1, "end"], 5, "sequence"),
    ("cell after command", ["scene", "detectgrasp", C0, "end"], 2, "sequence"),
    ("amodal without unlabel", ["scene", "amodal", "incomplete", C0, "endamodal", "end"], 2, "amodal"),
    ("amodal without cells", ["scene", "amodal", "unlabel", "endamodal", "end"], 3, "amodal"),
    ("amodal without endamodal", ["scene", "amodal", "unlabel", C0, "end"], 4, "amodal"),
    ("amodal cut off", ["scene", "amodal", "unlabel", C0], 4, "amodal"),
    ("amodal serial first", ["scene", "amodal", "unlabel", "<serial1>", C0, "endamodal", "end"], 3, "cell"),
    ("endamodal alone", ["scene", "endamodal", "end"], 1, "amodal"),
    ("unsorted scene cells", ["scene", "object01", C1, C0, "end"], 3, "block"),
    ("repeated scene cell", ["scene", "object01", C0, C1, C1, "end"], 4, "block"),
    ("unsorted across a serial", ["scene", "object01", C1, "<serial1>", C0, "end"], 4, "block"),
    ("unsorted amodal", ["scene", "amodal", "unlabel", C2, C0, "endamodal", "end"], 4, "amodal"),
    ("unsorted unseg", ["scene", "segment", "object01", C2, C0, "endunseg", "end"], 4, "unseg"),
    ("non-object tag in segment", ["scene", "unlabel", C0, "segment", "incomplete", C0, "endunseg", "end"], 4, "unseg"),
    ("segment tag without cells", ["scene", "segment", "object01", "endunseg", "end"], 3, "unseg"),
    ("unclosed segment", ["scene", "segment", "object01", C0, "end"], 4, "unseg"),
    ("unclosed segment before grasps", ["scene", "segment", "detectgrasp", "end"], 2, "unseg"),
    ("endunseg without segment", ["scene", "endunseg", "end"], 1, "unseg"),
    ("tag after endunseg", ["scene", "segment", "endunseg", "object01", C0, "end"], 3, "sequence"),
    ("grasp without tag", ["scene", "detectgrasp", "grasp", C0, C1, C2, "end"], 3, "grasps"),
    ("grasp then end", ["scene", "detectgrasp", "grasp", "end"], 3, "grasps"),
    ("grasp cut off", ["scene", "detectgrasp", "grasp"], 3, "grasps"),
    ("grasp without cells", ["scene", "detectgrasp", "grasp", "object01", "end"], 4, "grasps"),
    ("grasp outside detectgrasp", ["scene", "grasp", "object01", C0, "end"], 1, "grasps"),
    ("tag in detectgrasp", ["scene", "detectgrasp", "object01", C0, "end"], 2, "sequence"),
    ("four grasp cells", ["scene", "detectgrasp", "grasp", "object01", C0, C1, C2, C3, "end"], 7, "grasps"),
    ("four grasp cells with serial", ["scene", "detectgrasp", "grasp", "object01", C0, "<serial2>", C1, C2, C3, "end"], 8, "grasps"),
    ("serial first in block", ["scene", "object01", "<serial1>", C0, "end"], 2, "cell"),
    ("two serials", ["scene", "object01", C0, "<serial1>", "<serial2>", "end"], 4, "cell"),
    ("id above vocabulary", ["scene", "object01", SMALL.size, "end"], 2, "vocabulary"),
    ("negative id", ["scene", -1, "end"], 1, "vocabulary"),
]


@pytest.mark.parametrize("name, tokens, position, rule", BAD, ids=[b[0] for b in BAD])
def test_bad_sequence(name, tokens, position, rule):
    ids = ids_of(tokens)
    with pytest.raises(GrammarError) as info:
        parse(ids, SMALL)
    err = info.value
    assert (err.position, err.rule) == (position, rule), str(err)
    assert str(err).startswith(f"token {position}: ") and str(err).endswith(f"(rule: {rule})")
    assert validate(ids, SMALL).position == position


def test_strict_only_errors_pass_non_strict():
    for name in ("unsorted scene cells", "repeated scene cell", "unsorted across a serial", "unsorted amodal",
                 "unsorted unseg", "four grasp cells", "four grasp cells with serial"):
        tokens = next(b[1] for b in BAD if b[0] == name)
        assert validate(ids_of(tokens), SMALL, strict=False) is None, name


# -- GrammarState -------------------------------------------------------------------

def names(ids, vocab=SMALL):
    return {vocab.token_of(i) for i in ids}


OBJECTS = {f"object{i:02d}" for i in range(88)}
TAGS = {"unknow", "unlabel", "incomplete"} | OBJECTS


def test_state_walkthrough():
    v = SMALL
    st = GrammarState(v)
    assert names(st.allowed_ids_nonvoxel()) == {"scene"} and st.allowed().hi == st.allowed().lo
    st.advance(v.scene)
    assert names(st.allowed_ids_nonvoxel()) == TAGS | {"amodal", "segment", "detectgrasp", "end"}
    st.advance(v.id_of("object01"))
    a = st.allowed()
    assert len(a.nonvoxel_ids()) == 0 and (a.lo, a.hi) == (v.voxel_base, v.size)
    st.advance(v.cell_id(1, 0, 0))
    a = st.allowed()
    assert names(a.nonvoxel_ids()) == TAGS | {"amodal", "segment", "detectgrasp", "end"}
    assert (a.lo, a.hi) == (v.cell_id(1, 0, 0) + 1, v.size)  # strictly increasing cells
    st.feed(ids_of(["amodal"]))
    assert names(st.allowed_ids_nonvoxel()) == {"unlabel"}
    st.feed(ids_of(["unlabel", C0]))
    assert names(st.allowed_ids_nonvoxel()) == {"endamodal"}
    st.advance(v.endamodal)
    assert names(st.allowed_ids_nonvoxel()) == {"segment", "detectgrasp", "end"}
    st.advance(v.segment)
    assert names(st.allowed_ids_nonvoxel()) == OBJECTS | {"endunseg"}
    st.feed(ids_of(["object03", C1]))
    assert names(st.allowed_ids_nonvoxel()) == OBJECTS | {"endunseg"}
    st.advance(v.endunseg)
    assert names(st.allowed_ids_nonvoxel()) == {"detectgrasp", "end"}
    st.advance(v.detectgrasp)
    assert names(st.allowed_ids_nonvoxel()) == {"grasp", "end"}
    st.advance(v.grasp)
    assert names(st.allowed_ids_nonvoxel()) == TAGS
    st.advance(v.id_of("object03"))
    for k in range(3):  # unsorted and repeated grasp cells are fine; exactly 3 of them
        a = st.allowed()
        assert len(a.nonvoxel_ids()) == 0 and (a.lo, a.hi) == (v.voxel_base, v.size)
        st.advance(v.cell_id(2, 0, 0) if k != 1 else v.cell_id(0, 0, 0))
    a = st.allowed()
    assert names(a.nonvoxel_ids()) == {"grasp", "end"} and a.lo == a.hi
    assert not st.done
    st.advance(v.end)
    assert st.done and names(st.allowed_ids_nonvoxel()) == {"end"}
    st.advance(v.end)  # padding by repeated `end` stays done
    assert st.done and st.pos == 19


def test_state_options():
    v = SMALL
    st = GrammarState(v, allow_segment=False).feed(ids_of(["scene"]))
    assert "segment" not in names(st.allowed_ids_nonvoxel())
    st = GrammarState(v, sorted_cells=False).feed(ids_of(["scene", "object01", (2, 0, 0)]))
    assert (st.allowed().lo, st.allowed().hi) == (v.voxel_base, v.size)
    st.feed(ids_of([C0, C0]))
    plain = GrammarState(v).feed(ids_of(["scene", "object01", C0]))
    assert not any(v.is_serial(i) for i in plain.allowed_ids_nonvoxel())
    ser = GrammarState(v, allow_serials=True).feed(ids_of(["scene", "object01"]))
    assert not any(v.is_serial(i) for i in ser.allowed_ids_nonvoxel())  # never first in a block
    ser.advance(v.cell_id(0, 0, 0))
    assert sum(v.is_serial(i) for i in ser.allowed_ids_nonvoxel()) == 240
    ser.advance(v.id_of("<serial5>"))
    assert not any(v.is_serial(i) for i in ser.allowed_ids_nonvoxel())  # never two in a row
    ser.feed(ids_of(["amodal", "unlabel", C0]))  # amodal cells take serials too (the format's cell rule)
    assert names(ser.allowed_ids_nonvoxel()) - set(SERIAL_NAMES) == {"endamodal"}
    assert sum(v.is_serial(i) for i in ser.allowed_ids_nonvoxel()) == 240
    ser.feed(ids_of(["<serial7>", C1, "endamodal", "end"]))
    assert ser.done


SERIAL_NAMES = [f"<serial{i}>" for i in range(1, 241)]


def test_serial_after_amodal_cell_round_trips():
    tokens = ["scene", "incomplete", C0, "amodal", "unlabel", C0, "<serial2>", C1, C2, "<serial240>", "endamodal",
              "detectgrasp", "grasp", "incomplete", C0, C1, C2, "end"]
    ids = ids_of(tokens)
    s = parse(ids, SMALL)
    np.testing.assert_array_equal(s.amodal, cells(SMALL, C0, C1, C2))
    np.testing.assert_array_equal(s.amodal_serials, [SMALL.id_of("<serial2>"), -1, SMALL.id_of("<serial240>")])
    np.testing.assert_array_equal(serialize(s, SMALL), ids)
    assert s.num_tokens() == len(ids) and s.amodal_tokens() == 8
    st = GrammarState(SMALL, allow_serials=True).feed(ids)
    assert st.done


def test_dynamic_tag_named_like_an_object_is_a_segment_tag():
    v = Vocab((4, 3, 2), ["object120", "mug"])
    ids = ids_of(["scene", "unlabel", C0, "segment", "object120", C0, "endunseg", "end"], v)
    assert parse(ids, v).unseg[0].tag == v.id_of("object120")
    with pytest.raises(GrammarError, match="objectNN"):
        parse(ids_of(["scene", "unlabel", C0, "segment", "mug", C0, "endunseg", "end"], v), v)
    st = GrammarState(v).feed(ids_of(["scene", "unlabel", C0, "segment"], v))
    assert "object120" in names(st.allowed_ids_nonvoxel(), v) and "mug" not in names(st.allowed_ids_nonvoxel(), v)


def test_state_dynamic_tags():
    st = GrammarState(TAGGED).feed(ids_of(["scene"], TAGGED))
    assert {"mug", "bowl"} <= names(st.allowed_ids_nonvoxel(), TAGGED)
    st.feed(ids_of(["segment"], TAGGED))
    assert not {"mug", "bowl"} & names(st.allowed_ids_nonvoxel(), TAGGED)


@pytest.mark.parametrize("prefix, bad, match", [
    ([], "object01", "at the start"),
    (["scene"], C0, "between scene blocks"),
    (["scene", "object01", C1], C0, "strictly increasing"),
    (["scene", "object01", C1], "<serial1>", "serials are disabled"),
    (["scene", "amodal"], "incomplete", "expected 'unlabel'"),
    (["scene", "detectgrasp"], "amodal", "between grasps"),
    (["scene", "detectgrasp", "grasp", "object01", C0, C0], "end", "in a grasp"),
    (["scene", "detectgrasp", "grasp", "object01", C0, C0, C0], C0, "exactly 3 cells"),
    (["scene", "segment"], "unlabel", "between segment blocks"),
    (["scene", "end"], "scene", "after 'end'"),
])
def test_state_rejects(prefix, bad, match):
    st = GrammarState(SMALL).feed(ids_of(prefix))
    with pytest.raises(GrammarError, match=match) as info:
        st.advance(ids_of([bad])[0])
    assert info.value.position == len(prefix) and info.value.rule == "decode"
    for i in (-1, SMALL.size):
        with pytest.raises(GrammarError, match=f"id {i} is outside the vocabulary"):
            st.advance(i)


def test_scene_tags_only_limits_grasp_tags_to_the_scene():
    v = SMALL
    prompt = ids_of(["scene", "object05", C0, "object01", C1, "object05", C2, "detectgrasp", "grasp"])
    strict = GrammarState(v, scene_tags_only=True).feed(prompt)
    assert strict.scene_tags == (v.id_of("object01"), v.id_of("object05"))
    allowed = strict.allowed()
    assert names(allowed.nonvoxel_ids()) == {"object01", "object05"} and v.id_of("object02") not in allowed
    mask = allowed_masks([strict], v.size, "cpu")[0]  # decoding's mask holds the limit too
    assert mask.sum() == 2 and bool(mask[v.id_of("object05")])
    with pytest.raises(GrammarError, match="one of the scene's block tags") as info:
        strict.copy().advance(v.id_of("object02"))
    assert info.value.position == len(prompt)
    strict.feed(ids_of(["object05", C0, C1, C2, "grasp"]))  # a scene tag is fine, and the limit holds on
    assert names(strict.allowed_ids_nonvoxel()) == {"object01", "object05"}
    # the plain grammar (and parse) takes any tag; tags seen in later sections are not scene tags
    assert names(GrammarState(v).feed(prompt).allowed_ids_nonvoxel()) == TAGS
    seg = GrammarState(v, scene_tags_only=True).feed(
        ids_of(["scene", "unlabel", C0, "segment", "object03", C0, "endunseg", "detectgrasp", "grasp"]))
    assert names(seg.allowed_ids_nonvoxel()) == {"unlabel"}


def test_state_copy_and_feed_types():
    prompt = ids_of(["scene", "object01", C0, C2, "detectgrasp", "grasp"])
    a = GrammarState(SMALL).feed(prompt)
    b = a.copy()
    b.feed(ids_of(["object01", C0]))
    assert names(a.allowed_ids_nonvoxel()) == TAGS and a.pos == 6 and b.pos == 8
    for form in (prompt.tolist(), torch.from_numpy(prompt), prompt):
        assert GrammarState(SMALL).feed(form).pos == 6


def test_allowed_set_matches_advance_and_mask():
    """For every token of the small vocabulary: in the allowed set <=> advance accepts it <=> decoding's mask
    (decoding.allowed_masks, the one that masks logits) is True."""
    rng = np.random.default_rng(1)
    for opts in ({}, {"allow_serials": True}, {"sorted_cells": False, "allow_segment": False}):
        for _ in range(4):
            st = GrammarState(SMALL, **opts)
            while True:
                a = st.allowed()
                m = allowed_masks([st], SMALL.size, "cpu")[0].numpy()
                ok = np.zeros(SMALL.size, dtype=bool)
                for t in range(SMALL.size):
                    try:
                        st.copy().advance(t)
                        ok[t] = True
                    except GrammarError:
                        pass
                np.testing.assert_array_equal(m, ok)
                assert len(a) == ok.sum() and [t in a for t in range(SMALL.size)] == ok.tolist()
                assert -1 not in a and SMALL.size not in a
                if st.done:
                    break
                st.advance(random_token(st, rng, 40))


def random_token(st: GrammarState, rng, cap: int) -> int:
    """One allowed token: uniform over the non-empty groups (voxels, serials, tags, commands).

    Past `cap` tokens, commands (and voxels where a block needs them) win, so every walk ends.
    """
    v, a = st.vocab, st.allowed()
    nv = a.nonvoxel_ids()
    groups = {"tags": nv[nv < v.num_tags], "commands": nv[(nv >= v.command_base) & (nv < v.serial_base)],
              "serials": nv[nv >= v.serial_base]}
    groups = {k: g for k, g in groups.items() if len(g)}
    if a.hi > a.lo:
        groups["voxels"] = None
    if st.pos > cap:
        groups = {k: g for k, g in groups.items() if k == next(p for p in ("commands", "voxels", "tags") if p in groups)}
    kind = list(groups)[rng.integers(len(groups))]
    return int(rng.integers(a.lo, a.hi)) if kind == "voxels" else int(rng.choice(groups[kind]))


def random_walk(vocab, rng, cap=60, **opts) -> np.ndarray:
    st = GrammarState(vocab, **opts)
    seq = []
    while not st.done:
        seq.append(random_token(st, rng, cap))
        st.advance(seq[-1])
    return np.array(seq, dtype=np.int64)


@pytest.mark.parametrize("opts, strict", [
    ({}, True), ({"allow_serials": True}, True), ({"allow_segment": False}, True), ({"sorted_cells": False}, False),
])
def test_random_walks_parse(opts, strict):
    rng = np.random.default_rng(7)
    seen = {"amodal": 0, "unseg": 0, "grasps": 0, "serials": 0, "unsorted": 0}
    for _ in range(300):
        seq = random_walk(TAGGED, rng, **opts)
        s = parse(seq, TAGGED, strict=strict)
        np.testing.assert_array_equal(serialize(s, TAGGED), seq)
        assert s.num_tokens() == len(seq)
        assert all(len(g.cells) == 3 for g in s.grasps or [])
        seen["amodal"] += s.amodal is not None
        seen["unseg"] += s.unseg is not None
        seen["grasps"] += bool(s.grasps)
        seen["serials"] += any(b.serials is not None for b in s.scene + (s.unseg or []) + (s.grasps or []))
        seen["unsorted"] += any((np.diff(b.cells) <= 0).any() for b in s.scene)
    assert seen["amodal"] > 20 and seen["grasps"] > 20  # the walks are not vacuous
    assert (seen["unseg"] > 20) == opts.get("allow_segment", True)
    assert (seen["serials"] > 20) == opts.get("allow_serials", False)
    assert (seen["unsorted"] > 20) == (not opts.get("sorted_cells", True))


def random_sample(vocab, rng, serials: bool) -> Sample:
    """A valid sample built directly (not through GrammarState), with 3-cell grasps."""
    V, vb = vocab.size, vocab.voxel_base

    def some_cells():
        return np.sort(rng.choice(np.arange(vb, V), size=rng.integers(1, 6), replace=False))

    def block(tag, cell_ids):
        s = None
        if serials and rng.random() < 0.5:
            s = np.where(rng.random(len(cell_ids)) < 0.4, rng.integers(vocab.serial_base, vb, len(cell_ids)), -1)
        return Block(tag, cell_ids, s)

    s = Sample(scene=[block(int(rng.integers(vocab.num_tags)), some_cells()) for _ in range(rng.integers(0, 4))])
    if rng.random() < 0.4:
        s.amodal = some_cells()
    if rng.random() < 0.4:
        s.unseg = [block(vocab.object_tag(int(rng.integers(88))), some_cells()) for _ in range(rng.integers(0, 3))]
    if rng.random() < 0.7:
        s.grasps = [block(int(rng.integers(vocab.num_tags)), rng.integers(vb, V, 3)) for _ in range(rng.integers(0, 4))]
    return s


def test_serialized_samples_are_accepted():
    rng = np.random.default_rng(3)
    for serials in (False, True):
        for _ in range(200):
            sample = random_sample(TAGGED, rng, serials)
            ids = serialize(sample, TAGGED)
            assert_same_sample(parse(ids, TAGGED), sample)
            st = GrammarState(TAGGED, allow_serials=serials).feed(ids[:-1])
            assert not st.done
            st.advance(ids[-1])
            assert st.done


def state_accepts(seq, **opts) -> bool:
    if len(seq) == 0:
        return False
    st = GrammarState(TAGGED, **opts)
    try:
        st.feed(seq[:-1])
        if st.done:
            return False
        st.advance(seq[-1])
    except GrammarError:
        return False
    return st.done


def parser_accepts(seq, strict: bool) -> bool:
    try:
        s = parse(seq, TAGGED, strict=strict)
    except GrammarError:
        return False
    return all(len(g.cells) == 3 for g in s.grasps or [])


def mutate(seq, rng) -> np.ndarray:
    seq = list(seq)
    V = TAGGED.size
    for _ in range(rng.integers(1, 3)):
        token = int(rng.choice([rng.integers(0, TAGGED.voxel_base), rng.integers(0, V), rng.choice([-1, V]), rng.choice(seq)]))
        i = int(rng.integers(len(seq) + 1))
        op = rng.integers(4)
        if op == 0 and i < len(seq):
            seq[i] = token
        elif op == 1:
            seq.insert(i, token)
        elif op == 2 and i < len(seq):
            del seq[i]
        elif i + 1 < len(seq):
            seq[i], seq[i + 1] = seq[i + 1], seq[i]
    return np.array(seq, dtype=np.int64)


def test_state_machine_and_parser_agree():
    """Accepted by the state machine <=> parses with 3-cell grasps, on valid and broken sequences alike."""
    rng = np.random.default_rng(11)
    accepted = 0
    for k in range(1500):
        base = random_walk(TAGGED, rng, cap=30, allow_serials=True) if k % 2 else serialize(random_sample(TAGGED, rng, True), TAGGED)
        seq = mutate(base, rng) if k % 5 else base
        sm = state_accepts(seq, allow_serials=True)
        assert sm == parser_accepts(seq, strict=True), TAGGED.decode([t for t in seq if 0 <= t < TAGGED.size])
        assert state_accepts(seq, allow_serials=True, sorted_cells=False) == parser_accepts(seq, strict=False)
        assert state_accepts(seq) == (parser_accepts(seq, strict=True) and not any(TAGGED.is_serial(t) for t in seq))
        accepted += sm
    assert 400 < accepted < 1400  # both outcomes well represented


def test_allowed_set_interior_voxel_range():
    a = dataclasses.replace(GrammarState(SMALL).allowed(), lo=SMALL.voxel_base + 3, hi=SMALL.voxel_base + 7)
    allowed = [t for t in range(-1, SMALL.size + 1) if t in a]
    assert allowed == [SMALL.scene, *range(SMALL.voxel_base + 3, SMALL.voxel_base + 7)] and len(a) == 5


def test_full_vocab_state_speed():
    """The real grid's vocabulary: the allowed set is a small mask plus a voxel range (no per-voxel set),
    and a 10k-token prompt feeds in milliseconds."""
    v = Vocab((80, 54, 34))
    st = GrammarState(v).feed([v.scene, v.object_tag(5), v.cell_id(40, 20, 10)])
    a = st.allowed()
    assert isinstance(a, AllowedSet) and a.nonvoxel.shape == (v.voxel_base,)
    assert len(a) == (v.size - v.cell_id(40, 20, 10) - 1) + 91 + 4  # later cells, tags, 4 section openers
    prompt = np.concatenate([[v.scene, v.unlabel], np.arange(v.voxel_base, v.voxel_base + 10_000), [v.detectgrasp]])
    start = time.perf_counter()
    GrammarState(v).feed(prompt)
    assert time.perf_counter() - start < 2.0  # ~3 ms idle
