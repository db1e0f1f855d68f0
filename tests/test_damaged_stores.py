"""A damaged store never gives a wrong number: a deleted, flipped, truncated chunk, a broken zarr.json or swapped
learner ids, in a kept state or in a metric, is found (manifests, digests, CRC-32C checksums), reported with its
batch folder and what is wrong, and the batch is set aside into ``damaged/`` (never deleted): its learners are
trained again to the numbers of a fresh run, the other batches are still served, and ``serimats-func check``
reports each damage."""

import json
import re
import warnings

import numpy as np
import pytest

from serimats_func import open_store
from serimats_func.cli import main
from serimats_func.interventions import InitWeights
from serimats_func.store.zarr_store import DamagedStoreWarning, Store
from tests import builders, store_paths
from tests.watching import CountSteps

FOUR = [InitWeights.make_variations(seed=range(4))]
CHUNKS = dict(max_learners_per_chunk=2)  # two batches: seeds 0 and 1, then 2 and 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Fresh, undamaged runs of 8 and 16 steps."""
    root = tmp_path_factory.mktemp("reference")
    return {steps: builders.make_experiment(FOUR, store=root / f"ref{steps}.zarr", steps=steps, **CHUNKS).run()
            for steps in (8, 16)}


def assert_same(ds, reference) -> None:
    assert set(ds.data_vars) == set(reference.data_vars)
    for name in reference.data_vars:
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


# what is done to an array's folder, and what the report says about it
DAMAGE = {
    "deleted chunk": (lambda array: store_paths.chunk(array).unlink(), r"the chunk {array}/0[.0]* is missing"),
    "flipped byte": (lambda array: flip_a_byte(store_paths.chunk(array)),
                     r"the chunk {array}/0[.0]* cannot be decoded \(its CRC-32C checksum does not match"),
    "truncated chunk": (lambda array: truncate(store_paths.chunk(array)),
                        r"the chunk {array}/0[.0]* has \d+ bytes, not the \d+ the manifest lists"),
    "broken zarr.json": (lambda array: (array / store_paths.METADATA).write_text('{"zarr_format": 3, "shape": [4,'),
                         r"{array}/zarr.json is not valid JSON"),
}
WHERE = {"state": "states/8/params/1.weight", "metric": "test_acc"}


def check(store, capsys) -> tuple[int, str]:
    code = main(["check", str(store)])
    return code, capsys.readouterr().out


def first_batch(store):
    return store_paths.batch(store, store_paths.batch_names(store)[0])


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_chunk_is_reported_set_aside_and_its_learners_trained_again_to_the_right_numbers(
        experiment, tmp_path, capsys, reference, damage, where):
    store = tmp_path / "s.zarr"
    experiment(FOUR, store=store, steps=8, **CHUNKS).run()
    batch = first_batch(store)
    do, says = DAMAGE[damage]
    do(batch / WHERE[where])
    problem = says.format(array=re.escape(WHERE[where]))

    code, report = check(store, capsys)
    assert code == 1
    assert re.search(rf"DAMAGED batches/{re.escape(batch.name)}: {problem}", report), report
    assert "2 batch(es) and checkpoint(s); 1 verified" in report and "1 damaged" in report

    steps = CountSteps()
    total = 16 if where == "state" else 8  # a state is read when the learners go on from it; metrics when served
    exp = experiment(FOUR, store=store, steps=total, callbacks=[steps], **CHUNKS)
    with pytest.warns(DamagedStoreWarning) as warned:
        ds = exp.run()
    (message,) = {str(w.message) for w in warned if w.category is DamagedStoreWarning}
    assert re.match(rf"Damaged batch {re.escape(str(batch))}: {problem}.*It is moved to "
                    rf"{re.escape(str(store_paths.damaged(store)))}/batches-{re.escape(batch.name)} \(nothing is deleted\); "
                    r"its learners count as missing and are trained again", message), message
    assert_same(ds, reference[total])  # never a wrong number: the learners of the damaged batch trained again
    if where == "state":  # the other batch's learners went on from their states; the damaged one's from scratch
        assert sorted(steps.calls) == sorted([*range(1, 17), *range(9, 17)])
    else:  # the other batch is still served
        assert steps.calls == list(range(1, 9))
    aside = store_paths.damaged(store) / f"batches-{batch.name}"
    assert store_paths.entries(store_paths.damaged(store)) == [aside.name]  # kept, not deleted
    assert (aside / "states").is_dir() and not batch.exists()
    assert check(store, capsys)[0] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing damaged is left in place
        assert experiment(FOUR, store=store, steps=total, **CHUNKS).plan().to_train == 0


@pytest.mark.parametrize("damage", ["swapped learner ids", "broken zarr.json", "deleted zarr.json"])
def test_a_damaged_batch_zarr_json_is_reported_and_never_serves_numbers(experiment, tmp_path, capsys, reference, damage):
    store = tmp_path / "s.zarr"
    experiment(FOUR, store=store, steps=8, **CHUNKS).run()
    batch = first_batch(store)
    meta = batch / store_paths.METADATA
    if damage == "swapped learner ids":  # the numbers would be served under each other's ids
        content = json.loads(meta.read_text())
        ids = content["attributes"]["learner_ids"]
        content["attributes"]["learner_ids"] = ids[::-1]
        meta.write_text(json.dumps(content))
        problem = r"its attributes or its arrays' metadata changed since it was written \(the digest over learner_ids"
    elif damage == "broken zarr.json":
        meta.write_text(meta.read_text()[:100])
        problem = r"its zarr.json is not valid JSON \(100 bytes"
    else:
        meta.unlink()
        problem = "its zarr.json is missing"

    code, report = check(store, capsys)
    assert code == 1 and re.search(rf"DAMAGED batches/{re.escape(batch.name)}: {problem}", report), report
    with pytest.warns(DamagedStoreWarning, match=rf"Damaged batch {re.escape(str(batch))}: {problem}"):
        opened = open_store(store)  # the rest of the store still opens
    assert sorted(opened.learner.values) == sorted(Store(store).index())
    assert len(opened.learner) == 2
    exp = experiment(FOUR, store=store, steps=8, **CHUNKS)
    assert (exp.plan().in_store, exp.plan().to_train) == (2, 2)
    assert_same(exp.run(), reference[8])
    assert store_paths.entries(store_paths.damaged(store)) == [f"batches-{batch.name}"]
    assert check(store, capsys)[0] == 0


def test_open_store_serves_the_undamaged_batches_with_their_right_numbers(experiment, tmp_path, reference):
    store = tmp_path / "s.zarr"
    experiment(FOUR, store=store, steps=8, **CHUNKS).run()
    whole = open_store(store)
    batch = first_batch(store)
    flip_a_byte(store_paths.chunk(batch / "train_loss"))
    with pytest.warns(DamagedStoreWarning, match="the chunk train_loss/0.0 cannot be decoded"):
        opened = open_store(store)
    assert len(opened.learner) == 2
    for name in ("train_loss", "test_acc"):
        np.testing.assert_array_equal(opened[name].values, whole[name].sel(learner=opened.learner).values)


def test_a_damaged_checkpoint_is_set_aside_and_its_chunk_trained_from_scratch(experiment, tmp_path, reference):
    store = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="went down"):
        experiment(FOUR, store=store, steps=16, checkpoint_every=4, callbacks=[CountSteps(crash_before=11)],
                   **CHUNKS).run()
    (name,) = store_paths.checkpoint_names(store)
    flip_a_byte(store_paths.chunk(store_paths.checkpoints(store) / name / "states/8/params/1.weight"))
    steps = CountSteps()
    with pytest.warns(DamagedStoreWarning, match=rf"Damaged checkpoint .*{name}: the chunk states/8/params/1.weight/0.0.0 "
                                                 r"cannot be decoded .*moved to .*damaged/checkpoints-"):
        ds = experiment(FOUR, store=store, steps=16, checkpoint_every=4, callbacks=[steps], **CHUNKS).run()
    assert steps.calls == [*range(1, 17), *range(1, 17)]
    assert_same(ds, reference[16])
    assert store_paths.entries(store_paths.damaged(store)) == [f"checkpoints-{name}"]


def test_a_batch_written_without_checksums_still_reads_and_check_says_it_cannot_be_verified(experiment, tmp_path,
                                                                                          capsys, reference):
    store = tmp_path / "s.zarr"
    ds = experiment(FOUR, store=store, steps=8, **CHUNKS).run()
    meta = first_batch(store) / store_paths.METADATA  # as an older version wrote it: no manifest, no digest
    content = json.loads(meta.read_text())
    del content["attributes"]["manifest"], content["attributes"]["digest"]
    meta.write_text(json.dumps(content))
    code, report = check(store, capsys)
    assert code == 0, report
    assert "1 verified" in report and "1 were written without checksums (by an older version)" in report
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = experiment(FOUR, store=store, steps=8, **CHUNKS)
        assert again.plan().to_train == 0
        assert_same(again.run(), ds)
