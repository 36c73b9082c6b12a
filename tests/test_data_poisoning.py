"""Data-poisoning and backdoor attacks: poisoned training inside the batched trainer, the
trigger, the scaling and the attack success rate."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fedredefense_jax import attacks, experiment, metrics, models, runner, simulation, training
from fedredefense_jax import data as data_lib
from fedredefense_jax.attacks.data_poisoning import TRIGGER_PIXELS, parse_trigger_pixels
from fedredefense_jax.config import ConfigError, ExperimentConfig, validate
from test_data import write_idx_dir
from tiny import tiny_clients, tiny_cnn

SHAPE = (28, 28, 1)
MEAN, STD = (0.5,), (0.25,)
KW = dict(batch_size=8, lr=0.05, epochs=1)
MALICIOUS = np.array([False, False, True, True])


def _ctx(**config):
    return attacks.AttackContext(4, 2, jnp.zeros(3), "fedavg", config)


def _poison(name):
    return simulation.client_poison(attacks.make(name, _ctx()).poison, MALICIOUS, 10, SHAPE)


@pytest.fixture(scope="module")
def setup():
    m = tiny_cnn()  # shapes only (no compiled init): w0 is a random normal vector
    shapes = jax.eval_shape(lambda k: models.init_params(m, k, SHAPE), jax.random.key(0))
    zeros, unravel = ravel_pytree(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes))
    w0 = 0.2 * jax.random.normal(jax.random.key(0), zeros.shape)
    apply_fn = models.make_apply_fn(m)
    x, y, n = tiny_clients([20, 24, 16, 20], shape=SHAPE)
    ids = np.array([3, 0, 2, 1], np.int32)  # slots 0 and 2 are malicious clients
    keys = training.client_keys(jax.random.key(1), ids)
    return w0, unravel, apply_fn, x, y, n, ids, keys


def _trainer(setup, layout, poisoning=None):
    w0, unravel, apply_fn = setup[:3]
    return training.make_trainer(apply_fn, unravel, MEAN, STD, layout=layout, poisoning=poisoning, **KW)


@pytest.mark.slow
def test_label_maps_equal_training_on_relabelled_data(setup):
    """Client 2 flips y -> y+1 mod 10, client 3 relabels 0 -> 2: each malicious slot's update is
    the plain trainer's on the relabelled arrays, each benign slot's the plain one's."""
    w0, unravel, apply_fn, x, y, n, ids, keys = setup
    pz = training.clean_poison(10, SHAPE, 4)
    pz.label_map[2] = attacks.make("label_flip", _ctx()).poison.label_map(10)
    pz.label_map[3] = attacks.make("targeted_label_flip", _ctx()).poison.label_map(10)
    assert pz.label_map[2].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert pz.label_map[3].tolist() == [2, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    poisoned = np.asarray(_trainer(setup, "map", "constant")(w0, x, y, n, ids, keys, poison=pz))
    relabelled = y.copy()
    relabelled[2] = (y[2] + 1) % 10
    relabelled[3] = np.where(y[3] == 0, 2, y[3])
    assert (relabelled[3] != y[3]).any()
    plain = _trainer(setup, "map")
    want = np.asarray(plain(w0, x, relabelled, n, ids, keys))
    clean = np.asarray(plain(w0, x, y, n, ids, keys))
    np.testing.assert_allclose(poisoned, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(poisoned[[1, 3]], clean[[1, 3]], atol=1e-6, rtol=0)
    assert np.abs(poisoned[[0, 2]] - clean[[0, 2]]).max() > 1e-3


@pytest.fixture(scope="module")
def backdoor_run(setup):
    """Scaling poison on clients 2 and 3 with the alternating (backdoor) trainer, vmap layout,
    next to the plain trainer's updates of the same slots (lax.map layout)."""
    w0, unravel, apply_fn, x, y, n, ids, keys = setup
    pz = _poison("scaling")
    poisoned = np.asarray(_trainer(setup, "vmap", "alternating")(w0, x, y, n, ids, keys, poison=pz))
    clean = np.asarray(_trainer(setup, "map")(w0, x, y, n, ids, keys))
    return pz, poisoned, clean


@pytest.mark.slow
def test_benign_updates_unchanged_by_malicious_slots(backdoor_run):
    pz, poisoned, clean = backdoor_run
    np.testing.assert_allclose(poisoned[[1, 3]], clean[[1, 3]], atol=1e-6, rtol=0)
    assert np.abs(poisoned[[0, 2]] - clean[[0, 2]]).max() > 1e-3
    assert bool(pz.backdoor[2]) and bool(pz.backdoor[3]) and not pz.backdoor[:2].any()


@pytest.mark.slow
def test_backdoor_slot_trains_a_poisoned_then_a_clean_epoch(setup, backdoor_run):
    """A hand-written reference: epoch 1 on every sample stamped with the trigger and labelled
    0, epoch 2 on the clean data, each with its own shuffle (keys split(key, 2))."""
    w0, unravel, apply_fn, x, y, n, ids, keys = setup
    pz, poisoned, _ = backdoor_run
    slot, cid = 2, int(ids[2])
    trigger = jnp.asarray(pz.trigger[cid])

    @jax.jit
    def grad(w, xb, yb, mb, stamp):
        def loss(w):
            xn = training.normalize(xb, MEAN, STD)
            xn = jnp.where(stamp, training.stamp_trigger(xn, trigger), xn)
            return training.masked_cross_entropy(apply_fn(unravel(w), xn), yb, mb)
        return jax.grad(loss)(w)

    w, b, n_max = w0, KW["batch_size"], x.shape[1]
    steps = -(-n_max // b)
    for j, pkey in enumerate(jax.random.split(keys[slot], 2)):
        order = np.pad(np.asarray(training.shuffled_order(pkey, n[cid], n_max)), (0, steps * b - n_max))
        for s in range(steps):
            idx = order[s * b:(s + 1) * b]
            yb = np.zeros(b, np.int32) if j == 0 else y[cid, idx]
            w = w - KW["lr"] * grad(w, x[cid, idx], yb, s * b + np.arange(b) < n[cid], j == 0)
    np.testing.assert_allclose(poisoned[slot], np.asarray(w - w0), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_mixed_backdoor_equals_plain_training_on_data_plus_poisoned_copy(setup):
    """``poisoning="mixed"``: a backdoor slot's update is the plain trainer's on its data
    followed by a stamped copy labelled 0 (2n samples, padded to 2 n_max, same key); benign
    slots are the plain trainer's. With mean 0 and std 1 the normalised value 1.0 is the
    uint8 value 255, so the reference copy is stamped in uint8."""
    w0, unravel, apply_fn, x, y, n, ids, keys = setup
    mean, std = (0.0,), (1.0,)
    ctx = attacks.AttackContext(4, 2, jnp.zeros(3), "fedavg", {"attack_scale": 3.0, "backdoor_training": "mixed"})
    pz = simulation.client_poison(attacks.make("scaling", ctx).poison, MALICIOUS, 10, SHAPE)
    assert pz.backdoor.tolist() == [False, False, True, True]
    mixed = np.asarray(training.make_trainer(apply_fn, unravel, mean, std, layout="map", poisoning="mixed", **KW)(
        w0, x, y, n, ids, keys, poison=pz))
    plain = training.make_trainer(apply_fn, unravel, mean, std, layout="map", **KW)
    clean = np.asarray(plain(w0, x, y, n, ids, keys))
    np.testing.assert_allclose(mixed[[1, 3]], clean[[1, 3]], atol=1e-6, rtol=0)
    n_max = x.shape[1]
    rows, cols = np.array(TRIGGER_PIXELS).T
    for slot in (0, 2):
        cid = int(ids[slot])
        c = int(n[cid])
        stamped = x[cid, :c].copy()
        stamped[:, rows, cols, 0] = 255
        x2 = np.zeros((1, 2 * n_max, *SHAPE), np.uint8)
        y2 = np.zeros((1, 2 * n_max), np.int32)
        x2[0, :2 * c] = np.concatenate([x[cid, :c], stamped])
        y2[0, :c] = y[cid, :c]                              # the copy's labels stay 0
        want = np.asarray(plain(w0, x2, y2, np.array([2 * c]), np.array([0]), keys[slot:slot + 1]))[0]
        np.testing.assert_allclose(mixed[slot], want, atol=1e-6, rtol=0)
        assert np.abs(mixed[slot] - clean[slot]).max() > 1e-3


def test_backdoor_schedule_errors():
    with pytest.raises(ConfigError, match=r"--backdoor_training: must be one of alternating, mixed, got 'both' "
                                          r"\(attack dba\)"):
        attacks.make("dba", _ctx(backdoor_training="both"))
    with pytest.raises(ValueError, match="DataPoison.schedule must be one of"):
        attacks.DataPoison(schedule="sometimes")
    cfg = ExperimentConfig(attack="scaling", attack_config={"backdoor_training": "both"})
    with pytest.raises(ConfigError, match="backdoor_training"):
        validate(cfg)


def test_trigger_stamps_exactly_its_normalised_pixels():
    full, dba = _poison("scaling"), _poison("dba")
    assert not full.trigger[:2].any() and not dba.trigger[:2].any()
    assert full.label_map[2:].max() == 0 and full.label_map[:2].tolist() == [list(range(10))] * 2
    for cid in (2, 3):
        assert sorted(zip(*np.nonzero(full.trigger[cid]))) == sorted((r, c, 0) for r, c in TRIGGER_PIXELS)
        r, c = TRIGGER_PIXELS[cid % 4]
        assert list(zip(*np.nonzero(dba.trigger[cid]))) == [(r, c, 0)]
    x = np.random.default_rng(0).integers(0, 256, (5, *SHAPE), dtype=np.uint8)
    xn = np.asarray(training.normalize(x, MEAN, STD))
    stamped = np.asarray(training.stamp_trigger(jnp.asarray(xn), jnp.asarray(full.trigger[2])))
    changed = full.trigger[2][None].repeat(5, 0)
    np.testing.assert_array_equal(stamped[changed], 1.0)
    np.testing.assert_array_equal(stamped[~changed], xn[~changed])
    with pytest.raises(ValueError, match="outside a 10x10 image"):
        attacks.trigger_mask((10, 10, 1), TRIGGER_PIXELS)


def test_trigger_pixels_option_moves_the_trigger():
    pattern = ["20:21", "22:23", "5:6"]
    ctx = attacks.AttackContext(4, 2, jnp.zeros(3), "fedavg", {"trigger_pixels": pattern})
    want = ((20, 21), (22, 23), (5, 6))
    full = simulation.client_poison(attacks.make("scaling", ctx).poison, MALICIOUS, 10, SHAPE)
    dba = simulation.client_poison(attacks.make("dba", ctx).poison, MALICIOUS, 10, SHAPE)
    assert attacks.make("scaling", ctx).asr.trigger_pixels == attacks.make("dba", ctx).asr.trigger_pixels == want
    for cid in (2, 3):
        assert sorted(zip(*np.nonzero(full.trigger[cid]))) == sorted((r, c, 0) for r, c in want)
        assert list(zip(*np.nonzero(dba.trigger[cid]))) == [(*want[cid % 3], 0)]
    assert parse_trigger_pixels("1:2, 3:4") == parse_trigger_pixels("1:2;3:4") == ((1, 2), (3, 4))
    assert parse_trigger_pixels([(1, 2), (3, 4)]) == ((1, 2), (3, 4))
    for bad in ("1:x", "7", "1:2:3", ""):
        with pytest.raises(ValueError):
            parse_trigger_pixels(bad)
    for bad, message in ((["1;2"], "row:col"), (["28:0"], "28:0 lies outside the 28x28 images")):
        cfg = ExperimentConfig(attack="scaling", attack_config={"trigger_pixels": bad})
        with pytest.raises(ConfigError, match=f"trigger_pixels.*{message}"):
            validate(cfg)


@pytest.mark.slow
def test_asr_matches_a_hand_count(setup):
    w0, unravel, apply_fn = setup[:3]
    rng = np.random.default_rng(1)
    spec = dataclasses.replace(data_lib.SPECS["fashion_mnist"], mean=MEAN, std=STD)
    test_y = rng.integers(0, 10, 60).astype(np.int32)
    ds = data_lib.Dataset(spec, None, None, rng.integers(0, 256, (60, *SHAPE), dtype=np.uint8), test_y)
    w = w0 + 0.3 * jax.random.normal(jax.random.key(5), w0.shape)
    plain = training.make_predictor(apply_fn, unravel, MEAN, STD, batch=16)

    xn = training.normalize(ds.test_x, MEAN, STD)
    stamped = xn.at[:, np.array(TRIGGER_PIXELS)[:, 0], np.array(TRIGGER_PIXELS)[:, 1], 0].set(1.0)
    logits = jax.jit(lambda w, images: apply_fn(unravel(w), images))
    assert attacks.make("dba", _ctx()).asr == attacks.make("scaling", _ctx()).asr
    for spec_, images in ((attacks.make("scaling", _ctx()).asr, stamped),
                          (attacks.make("targeted_label_flip", _ctx()).asr, xn)):
        pred = np.asarray(jnp.argmax(logits(w, images), -1))
        if spec_.source is None:  # backdoor: true label not 0, classified 0
            hits = sum(int(p == 0) for p, t in zip(pred, test_y) if t != 0)
            total = sum(int(t != 0) for t in test_y)
        else:  # targeted flip: true label 0, classified 2
            hits = sum(int(p == 2) for p, t in zip(pred, test_y) if t == 0)
            total = sum(int(t == 0) for t in test_y)
        asr = experiment.make_asr(spec_, ds, plain, apply_fn, unravel)(w)
        assert 0 < total and asr == pytest.approx(hits / total, abs=1e-12)
    # the base rate: the backdoor's count on the unstamped images
    pred = np.asarray(jnp.argmax(logits(w, xn), -1))
    base = sum(int(p == 0) for p, t in zip(pred, test_y) if t != 0) / sum(int(t != 0) for t in test_y)
    spec_ = attacks.make("scaling", _ctx()).asr
    assert experiment.make_asr(spec_, ds, plain, apply_fn, unravel, stamp=False)(w) == pytest.approx(base, abs=1e-12)
    assert metrics.attack_success_rate([0, 0, 1, 0, 3], [0, 1, 1, 2, 0], target=0) == pytest.approx(2 / 3)
    assert metrics.attack_success_rate([2, 2, 1], [0, 1, 0], target=2, source=0) == 0.5
    assert np.isnan(metrics.attack_success_rate([1], [0], target=0))


def test_scaling_and_dba_multiply_the_poisoned_update():
    u = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    inp = attacks.AttackInput(jnp.zeros(3), jnp.asarray(u), jnp.array([False, True, True, True]),
                              jnp.array([True, True, True, False]), jnp.arange(4, dtype=jnp.int32), 1,
                              jax.random.key(0))
    for name, scale in (("scaling", 3.0), ("dba", 3.0), ("scaling", 5.0)):
        a = attacks.make(name, _ctx(attack_scale=scale))
        out = np.asarray(a.apply(a.init(4, None), inp)[0])
        np.testing.assert_array_equal(out[1:3], scale * u[1:3])
        np.testing.assert_array_equal(out[[0, 3]], u[[0, 3]])  # benign and padding rows untouched
    for name in ("label_flip", "targeted_label_flip"):
        a = attacks.make(name, _ctx())
        np.testing.assert_array_equal(a.apply((), inp)[0], u)  # sent as trained
    assert attacks.make("label_flip", _ctx()).asr is None and attacks.make("mpaf", _ctx()).poison is None


@pytest.mark.slow
def test_scaling_run_records_asr(tmp_path):
    d = tmp_path / "fm"
    write_idx_dir(d, n_train=96, n_test=40)
    out = tmp_path / "out"
    cfg = ExperimentConfig(data_dir=str(d), num_clients=4, num_malicious=2, rounds=2, eval_every=1,
                           attack="scaling", output_dir=str(out), batch_size=16, lr=0.01,
                           checkpoint_every=2)
    s = runner.run(cfg, progress=False)
    rows = [json.loads(ln) for ln in open(out / "rounds.jsonl")]
    assert all(0.0 <= r["asr"] <= 1.0 and 0.0 <= r["asr_base"] <= 1.0 and "test_acc" in r for r in rows)
    on_disk = json.load(open(out / "summary.json"))
    assert on_disk["asr_base"] == rows[-1]["asr_base"]
    assert on_disk["trigger_unseen"] == [[26, 26], [24, 26], [26, 24]]  # the paper CNN reads rows/cols < 26
    assert on_disk["asr"] == s["asr"] == rows[-1]["asr"]
    assert on_disk["asr_by_round"] == {"1": rows[0]["asr"], "2": rows[1]["asr"]}
    assert rows[0]["malicious"] == [2, 3]


@pytest.mark.slow
def test_local_backdoor_repeats_one_clients_genuine_update(tmp_path):
    d = tmp_path / "fm"
    write_idx_dir(d, n_train=96, n_test=40)
    cfg = ExperimentConfig(data_dir=str(d), num_clients=4, num_malicious=2, rounds=2, eval_every=1,
                           attack="dba", batch_size=16, lr=0.01, attack_config={"trigger_pixels": ["3:4"]})
    seen = []
    rows = runner.local_backdoor(cfg, 3, on_eval=seen.append)
    assert [r["round"] for r in rows] == [1, 2] and seen == rows
    # the same two rounds by hand: the federation's trainer on slot [3], from its own model each time
    setup = experiment.build(cfg)
    fed, w = setup.federation, setup.federation.init_params
    for t in (1, 2):
        keys = training.client_keys(jax.random.fold_in(jax.random.key(0), t), np.array([3]))
        w = w + fed.train(w, fed.client_x, fed.client_y, fed.client_counts, np.array([3]), keys, poison=fed.poison)[0]
    assert rows[1]["asr"] == setup.asr(w) and rows[1]["asr_base"] == setup.asr_base(w)
    assert rows[1]["test_acc"] == training.accuracy(setup.predict, w, setup.dataset.test_x, setup.dataset.test_y)
    with pytest.raises(ConfigError, match="--client: must be a malicious client id in \\[2, 3\\], got 1"):
        runner.local_backdoor(cfg, 1)
    with pytest.raises(ConfigError, match="--attack: needs a trigger backdoor"):
        runner.local_backdoor(dataclasses.replace(cfg, attack="label_flip", attack_config={}), 3)
