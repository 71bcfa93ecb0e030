"""Plate-aware training and inference: domain batches, plate-control statistics, AdaBN, embedding
centring, Sinkhorn balancing, exact resume with plate batches, and their refusals of bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from rcic.assign import assign_plates, center_log_probs, choose_rotations, plate_lean, sinkhorn
from rcic.config import load_recipe
from rcic.data import RxRxDataModule
from rcic.data.dataset import PHASE_ADAPT, PHASE_PREDICT, DomainBatchSampler, DomainEvalSampler, domain_codes
from rcic.errors import RcicError
from rcic.models import adapting, mix_bn_state, restore_bn_state, save_bn_state, start_domain
from rcic.store import open_source
from rcic.training import fit
from tests.conftest import run_cli
from tests.test_assign import _toy
from tests.test_evaluation import _Crash, _weights

TINY = ["data.num_workers=0", "data.folds=2", "trainer.accelerator=cpu"]


def _sites(plates: dict[tuple[str, int], int]) -> pd.DataFrame:
    return pd.DataFrame([{"experiment": e, "plate": p} for (e, p), n in plates.items() for _ in range(n)])


def test_plate_batches_hold_one_plate_and_cover_every_site():
    sites = _sites({("A-01", 1): 7, ("A-01", 2): 5, ("B-01", 1): 9, ("B-01", 3): 4})
    codes = domain_codes(sites, "plate")
    epochs = {}
    for rank in (0, 1):
        sampler = DomainBatchSampler(codes, batch_size=4, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(1)
        epochs[rank] = list(sampler)
        assert len(epochs[rank]) == len(sampler) == 4  # 2 + 2 + 3 + 1 batches, dealt to 2 ranks
    for batch in epochs[0] + epochs[1]:
        index = np.array(batch) - 1 * len(sites)  # keys are epoch * n + index
        assert len(index) == 4 and len(set(codes[index])) == 1
    seen = {i - len(sites) for b in epochs[0] + epochs[1] for i in b}
    assert seen == set(range(len(sites)))
    # the same epoch rebuilt: identical; another epoch: another order; a resume skips the trained batches
    again = DomainBatchSampler(codes, 4, seed=3, rank=0, world_size=2)
    again.set_epoch(1)
    again.skip_batches(3)
    assert list(again) == epochs[0][3:]
    again.set_epoch(2)
    assert [b[0] % len(sites) for b in again] != [b[0] % len(sites) for b in epochs[0]]


def test_domain_evaluation_gives_whole_domains_to_each_rank():
    sites = _sites({("A-01", 1): 5, ("A-01", 2): 3, ("B-01", 1): 4})
    codes = domain_codes(sites, "plate")
    phases = (PHASE_ADAPT, PHASE_PREDICT)
    plans = [list(DomainEvalSampler(codes, 2, phases, rank=r, world_size=2)) for r in (0, 1)]
    assert len(plans[0]) == len(plans[1])  # padded: every rank takes the same number of steps
    for plan in plans:
        for batch in plan:
            assert len({codes[k % len(codes)] for k in batch}) == 1
    # each domain's adaptation batches come before its prediction batches, on one rank only
    rank0 = [divmod(k, len(codes)) for b in plans[0] for k in b]
    first_domain = [i for phase, i in rank0 if codes[i] == 0]
    assert [p for p, i in rank0 if codes[i] == 0][:5] == [PHASE_ADAPT] * 5
    assert sorted(set(first_domain)) == list(np.flatnonzero(codes == 0))
    predicted = {k % len(codes) for plan in plans for b in plan for k in b if k // len(codes) == PHASE_PREDICT}
    assert predicted == set(range(len(codes)))


def test_adabn_statistics_equal_a_hand_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.Dropout(0.5))
    net.eval()
    before = save_bn_state(net)
    batches = [torch.randn(3, 2, 4, 4) * 2 + 1, torch.randn(2, 2, 4, 4) - 3]
    start_domain(net)
    with adapting(net):
        for x in batches:
            net(x)
    bn = net[1]
    assert not bn.training and not net[4].training  # BatchNorm back in eval mode; dropout never left it
    conv = [net[0](x).detach() for x in batches]
    # momentum=None: the running statistics are the plain mean of the batches' statistics
    mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv]).mean(0)
    var = torch.stack([c.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for c in conv]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    restore_bn_state(net, before)
    torch.testing.assert_close(bn.running_mean, torch.zeros(3))
    assert bn.momentum == 0.1


def test_adabn_prior_mixes_the_trained_statistics_into_the_domains():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    net.train()
    net(torch.randn(8, 2, 4, 4) * 3)  # trained statistics that differ from the domain's
    net.eval()
    trained = save_bn_state(net)
    start_domain(net)
    with adapting(net):
        net(torch.randn(4, 2, 4, 4) + 2)
    domain = save_bn_state(net)
    mix_bn_state(net, trained, 0.3)
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, 0.3 * trained[0]["mean"] + 0.7 * domain[0]["mean"])
    torch.testing.assert_close(bn.running_var, 0.3 * trained[0]["var"] + 0.7 * domain[0]["var"])


def test_adabn_prior_one_predicts_as_without_adabn_and_zero_as_plain_adabn(tiny_store):
    from rcic.predict.runner import predict_run
    from rcic.training.fit import build_task

    source = open_source(tiny_store)
    recipe = load_recipe("cpu-demo", [*TINY, "model.adabn=plate", "model.adabn_prior=0"])
    dm = RxRxDataModule(source, recipe.data, recipe.augment, recipe.seed)
    task = build_task(dm, recipe, "workers", False)
    task.net.train()
    with torch.no_grad():  # trained statistics far from any plate's, so that adaptation matters
        task.net(torch.randn(16, 6, task.input_size, task.input_size) * 4 + 3)
    logits = {prior: predict_run(task, source, "test", tta=1, accelerator="cpu", adabn_prior=prior)[1]
              for prior in (None, 0.0, 0.5, 1.0)}
    without = predict_run(task, source, "test", tta=1, accelerator="cpu", adabn="none")[1]
    np.testing.assert_allclose(logits[1.0], without, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits[0.0], logits[None])  # None keeps the recipe's prior (0 here)
    assert np.abs(logits[0.0] - without).max() > 1e-3
    assert np.abs(logits[0.5] - logits[0.0]).max() > 1e-4 and np.abs(logits[0.5] - without).max() > 1e-4
    with pytest.raises(RcicError, match=r"--adabn-prior 0.5 mixes .* add --adabn plate"):
        predict_run(task, source, "test", tta=1, accelerator="cpu", adabn="none", adabn_prior=0.5)


def _blend(values: dict, agreement: dict, log_softmax: bool = True) -> np.ndarray:
    """``auto`` computed by hand: the candidates' log-softmax (or features, as they are), weighted by
    exp(50 x (agreement - best))."""
    best = max(agreement.values())
    weights = {p: np.exp(50.0 * (a - best)) for p, a in agreement.items()}
    total = sum(w * (torch.log_softmax(torch.from_numpy(values[p]).double(), -1).numpy() if log_softmax
                     else values[p].astype(np.float64)) for p, w in weights.items())
    return total / sum(weights.values())


def test_adabn_prior_auto_blends_the_candidates_by_their_agreement_with_the_plate_assignment(
        tiny_store, tmp_path, monkeypatch):
    """``auto`` (cpu-demo's default) predicts once per prior of the grid and blends the predictions, each
    weighted by how well its arg-max agrees with the plate assignment: equal to a blend, by hand, of the
    priors asked for one by one; the best candidate is recorded as chosen."""
    from rcic.assign import assignment_agreement, treatment_log_probs
    from rcic.predict import predict
    from rcic.predict.runner import ADABN_PRIOR_GRID

    source = open_source(tiny_store)
    run = tmp_path / "run"
    run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", run, *[a for t in TINY for a in
            ("--set", t)], "--set", "trainer.epochs=1")
    assert load_recipe(str(run / "recipe.yaml")).model.adabn_prior == "auto"
    blended = predict([run], source, "test", tta=1, accelerator="cpu", embeddings=True, site_outputs=True)
    record = json.loads(str(blended.extra["runs"][0]))["adabn_prior_auto"]
    treatment_labels = set(source.dataset.vocab.treatment_labels)
    agreement, fixed_logits, fixed_features, fixed_sites = {}, {}, {}, {}
    for prior in ADABN_PRIOR_GRID:
        fixed = predict([run], source, "test", tta=1, accelerator="cpu", adabn_prior=prior, embeddings=True,
                        site_outputs=True)
        treatment = (fixed.wells["well_type"] == "treatment").to_numpy()
        log_probs, classes = treatment_log_probs(fixed.logits[treatment], fixed.classes, treatment_labels)
        agreement[prior] = assignment_agreement(fixed.wells[treatment], log_probs, classes,
                                                source.dataset.plate_groups)
        fixed_logits[prior], fixed_features[prior] = fixed.logits, fixed.extra["embeddings"]
        fixed_sites[prior] = fixed.site_logits
    assert record["agreement"] == {f"{p:g}": pytest.approx(a, abs=1e-6) for p, a in agreement.items()}
    best = max(agreement.values())
    assert record["chosen"] == min(p for p, a in agreement.items() if a == best)  # ties: the smaller prior
    assert json.loads(str(blended.extra["runs"][0]))["adabn_prior"] == record["chosen"]
    assert record["weights"] == {f"{p:g}": pytest.approx(np.exp(50 * (a - best)), abs=1e-6)
                                 for p, a in agreement.items()}
    np.testing.assert_allclose(blended.logits, _blend(fixed_logits, agreement), atol=1e-5)
    np.testing.assert_allclose(blended.extra["embeddings"], _blend(fixed_features, agreement, log_softmax=False),
                               rtol=1e-5, atol=1e-5)
    # each site's own log-softmax (WILDS scores images)
    np.testing.assert_allclose(blended.site_logits, _blend(fixed_sites, agreement), atol=1e-5)
    # scripted agreements, the best in the middle of the grid and tied (rounding must not break the tie):
    # candidates far below it weigh nothing, the tied ones alike, and the smaller tied prior is the chosen one
    import rcic.predict.runner as runner

    scripted = [0.1, 1 / 3, 1 / 3, 0.3, 0.0]
    calls = iter(scripted)
    monkeypatch.setattr(runner, "_agreement", lambda *args: next(calls))
    second = predict([run], source, "test", tta=1, accelerator="cpu")
    second_record = json.loads(str(second.extra["runs"][0]))["adabn_prior_auto"]
    assert second_record["chosen"] == 0.25
    assert second_record["weights"]["0.25"] == second_record["weights"]["0.5"] == 1.0
    assert second_record["weights"]["0"] < 1e-4 and 0.1 < second_record["weights"]["0.75"] < 0.3
    np.testing.assert_allclose(second.logits, _blend(fixed_logits, dict(zip(ADABN_PRIOR_GRID, scripted))),
                               atol=1e-5)
    # AdaBN switched off: auto has nothing to choose and predicts once, as --adabn none
    plain = predict([run], source, "test", tta=1, accelerator="cpu", adabn="none")
    assert "adabn_prior_auto" not in json.loads(str(plain.extra["runs"][0]))
    # nothing to assign (an RxRx1 model embedding other treatments): plain AdaBN, recorded as skipped
    embedded = predict([run], source, "test", tta=1, accelerator="cpu", any_classes=True)
    assert json.loads(str(embedded.extra["runs"][0]))["adabn_prior_auto"]["skipped"].endswith("(any_classes)")
    np.testing.assert_array_equal(embedded.logits, fixed_logits[0.0])
    with pytest.raises(RcicError, match=r"--adabn-prior auto chooses .* add --adabn plate"):  # asked for, both
        predict([run], source, "test", tta=1, accelerator="cpu", adabn="none", adabn_prior="auto")


def test_adabn_prediction_adapts_each_plate_on_its_own_sites(tiny_store, monkeypatch):
    """rcic's domain-wise prediction equals adapting the network to one plate by hand and predicting it,
    whatever the prediction batch size: AdaBN's batches are the sites of ADAPT_WELLS wells."""
    from rcic.data import dataset as dataset_module
    from rcic.data.augment import prepare
    from rcic.predict.runner import predict_run
    from rcic.training.fit import build_task

    monkeypatch.setattr(dataset_module, "ADAPT_WELLS", 1)  # several adaptation batches on a tiny plate
    source = open_source(tiny_store)
    recipe = load_recipe("cpu-demo", [*TINY, "model.adabn=plate", "model.adabn_prior=0"])  # plain AdaBN, by hand
    dm = RxRxDataModule(source, recipe.data, recipe.augment, recipe.seed)
    task = build_task(dm, recipe, "workers", False)
    trained = {k: v.clone() for k, v in task.state_dict().items()}
    wells, logits, _, _ = predict_run(task, source, "test", tta=1, batch_size=1, accelerator="cpu")
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in trained.items())  # statistics restored
    again, other, _, _ = predict_run(task, source, "test", tta=1, batch_size=64, accelerator="cpu")
    assert (again["id_code"] == wells["id_code"]).all()
    np.testing.assert_allclose(other, logits, rtol=1e-5, atol=1e-5)
    dm.setup("predict")
    rows = dm.rows_for("test")
    plate = rows[(rows["experiment"] == rows["experiment"].iloc[0]) & (rows["plate"] == 2)]
    dataset = dm.well_dataset(plate, {c: i for i, c in enumerate(task.cell_types)})
    assert len(dataset) >= 2
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["image"] for item in items]).flatten(0, 1)
    x = prepare(images, recipe.data.normalization, torch.stack([item["stats"] for item in items]).flatten(0, 1),
                task.input_size)
    cell = torch.stack([item["cell_type"] for item in items]).repeat_interleave(2)
    net = task.net.eval()
    trained_bn = save_bn_state(net)
    start_domain(net)
    with adapting(net):
        for start in range(len(items)):  # batches of 1 well (2 sites)
            net(x[start * 2:(start + 1) * 2], cell[start * 2:(start + 1) * 2])
    adapted_bn = save_bn_state(net)
    with torch.no_grad():
        expected = net(x, cell)["logits"].view(len(items), 2, -1).mean(1).numpy()
    rows_of = {c: i for i, c in enumerate(wells["id_code"])}
    got = logits[[rows_of[c] for c in dataset.wells["id_code"]]]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # with a prior, the statistics are mixed once, after the plate's last adaptation batch (several
    # adaptation and prediction batches here): the same by hand
    restore_bn_state(net, adapted_bn)
    mix_bn_state(net, trained_bn, 0.5)
    with torch.no_grad():
        expected = net(x, cell)["logits"].view(len(items), 2, -1).mean(1).numpy()
    restore_bn_state(net, trained_bn)
    _, mixed, _, _ = predict_run(task, source, "test", tta=1, batch_size=1, accelerator="cpu", adabn_prior=0.5)
    np.testing.assert_allclose(mixed[[rows_of[c] for c in dataset.wells["id_code"]]], expected, rtol=1e-4, atol=1e-4)


def test_adaptation_batches_are_the_same_sites_per_site_and_per_well(monkeypatch):
    """Validation (an item per site, one site missing) and prediction (an item per well) adapt on the same sites."""
    from rcic.data import dataset as dataset_module

    monkeypatch.setattr(dataset_module, "ADAPT_WELLS", 2)
    sites = pd.DataFrame({"experiment": "A-01", "plate": [1] * 9 + [2] * 4,
                          "id_code": ["w1", "w1", "w2", "w3", "w3", "w4", "w4", "w5", "w5", "v1", "v1", "v2", "v2"]})
    wells = sites.drop_duplicates("id_code").reset_index(drop=True)
    phases = (PHASE_ADAPT, PHASE_PREDICT)
    per_site = DomainEvalSampler(domain_codes(sites, "plate"), 5, phases, wells=sites["id_code"].to_numpy())
    per_well = DomainEvalSampler(domain_codes(wells, "plate"), 5, phases, wells=wells["id_code"].to_numpy())

    def adapted(plan, table):
        return [sorted(set(table["id_code"].iloc[[k % len(table) for k in b]])) for b in plan
                if b[0] // len(table) == PHASE_ADAPT]

    expected = [["w1", "w2"], ["w3", "w4"], ["w5"], ["v1", "v2"]]
    assert adapted(list(per_site), sites) == adapted(list(per_well), wells) == expected
    # per site, every site of a well is in its well's batch, once
    site_batches = [[k for k in b] for b in per_site if b[0] // len(sites) == PHASE_ADAPT]
    assert sorted(k for b in site_batches for k in b) == list(range(len(sites)))


def test_plate_controls_statistics_equal_a_hand_computation(tiny_store):
    source = open_source(tiny_store)
    recipe = load_recipe("cpu-demo", [*TINY, "data.normalization=plate_controls"])
    dm = RxRxDataModule(source, recipe.data, recipe.augment, recipe.seed)
    dm.setup("fit")
    sites = dm.sites
    on_plate = (sites["experiment"] == "HUVEC-01") & (sites["plate"] == 3)
    controls = sites[on_plate & (sites["well_type"] != "treatment")]
    pixels = np.stack([source.read_site(row) for _, row in controls.iterrows()]).astype(np.float64)
    pixels = pixels.transpose(1, 0, 2, 3).reshape(pixels.shape[1], -1)  # channel x every control pixel
    expected = np.stack([pixels.mean(1), pixels.std(1)], axis=1)
    for i in np.flatnonzero(on_plate.to_numpy()):  # treatment and control sites of the plate alike
        np.testing.assert_allclose(dm._stats[i], expected, rtol=1e-4)
    other = (sites["experiment"] == "HUVEC-01") & (sites["plate"] == 1)
    assert not np.allclose(dm._stats[np.flatnonzero(other.to_numpy())[0]], expected)


def test_sinkhorn_rows_and_columns_sum_to_one_and_plates_stay_permutations():
    rng = np.random.default_rng(0)
    square = np.log(rng.dirichlet(np.full(6, 0.3), size=6))
    square[:, 0] += 3  # a model biased towards one treatment
    balanced = sinkhorn(square)
    np.testing.assert_allclose(balanced.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(balanced.sum(0), 1, atol=1e-6)
    # a balanced matrix is a rescaled one: each entry's ratio to the original is row factor x column factor
    ratio = np.log(balanced) - square
    np.testing.assert_allclose(ratio - ratio[:, :1] - ratio[:1, :] + ratio[0, 0], 0, atol=1e-8)
    wide = sinkhorn(np.log(rng.dirichlet(np.ones(7), size=5)))  # two wells missing from a plate
    np.testing.assert_allclose(wide.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(wide.sum(0), 5 / 7, atol=1e-6)
    wells, logp, classes, groups, truth = _toy(n_per_group=6, signal=1.0, seed=5)
    choices = choose_rotations(wells, logp, classes, groups)
    assigned = assign_plates(wells, logp, classes, groups, choices, balance="sinkhorn")
    for p in range(1, 5):
        rows = np.flatnonzero(wells["plate"].to_numpy() == p)
        allowed = {classes.index(c) for c in groups.groups[choices["X-01"].order[p - 1]]}
        assert len(set(assigned[rows])) == len(rows) and set(assigned[rows]) == allowed


def test_resumed_plate_batch_run_ends_with_the_uninterrupted_weights(tiny_store, tmp_path):
    source = open_source(tiny_store)
    # plate batches and, with them, embeddings centred by the batch's plate mean (the training side of centring)
    recipe = load_recipe("cpu-demo", [*TINY, "data.batch_size=5", "trainer.epochs=1", "trainer.limit_train_batches=3",
                                      "trainer.checkpoint_every_n_steps=2", "data.sampler=plate",
                                      "model.center_embeddings=plate"])
    fit(source, recipe, tmp_path / "full", progress=False)
    with pytest.raises(RuntimeError, match="killed"):
        fit(source, recipe, tmp_path / "killed", progress=False, extra_callbacks=[_Crash(3)])
    last = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 and last["epoch"] == 0  # in the middle of epoch 0 (3 batches)
    fit(source, recipe, tmp_path / "killed", resume=True, progress=False)
    # the network's weights and BatchNorm statistics (the metrics' running sums are the lifecycle's business)
    a, b = ({k: v for k, v in _weights(tmp_path / r / "checkpoints" / "last.ckpt").items() if k.startswith("net.")}
            for r in ("full", "killed"))
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    history = [pd.read_csv(tmp_path / r / "history.csv") for r in ("full", "killed")]
    pd.testing.assert_frame_equal(*history, rtol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--set", "data.sampler=plate", "--set", "data.batch_size=16"],
     "recipe key data.sampler: plate draws every batch from one plate, but data.batch_size 16 is larger than the "
     "training sites of the smallest plate (HEPG2-02 plate 1: 10 sites; 8 plates of 10-10 sites)"),
    (["--set", "model.center_embeddings=plate"], "recipe key model.center_embeddings: plate centres each training "
                                                 "batch by its domains' means and needs domain batches"),
])
def test_bad_plate_aware_recipes_exit_2_with_one_line(tiny_store, tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", tiny_store, "--recipe", "cpu-demo", "--out", out,
                   *[a for key in TINY for a in ("--set", key)], *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_plate_controls_on_a_plate_without_controls_exits_2(tiny_data, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "test.csv", "test_controls.csv"):
        (data / name).write_bytes((tiny_data / name).read_bytes())
    controls = pd.read_csv(tiny_data / "train_controls.csv")
    controls[~((controls["experiment"] == "HEPG2-02") & (controls["plate"] == 4))].to_csv(
        data / "train_controls.csv", index=False)
    for folder in ("train", "test"):
        (data / folder).symlink_to(tiny_data / folder)
    proc = run_cli("train", "--data", data, "--recipe", "cpu-demo", "--out", tmp_path / "run",
                   *[a for key in TINY for a in ("--set", key)], "--set", "data.normalization=plate_controls",
                   check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ("recipe key data.normalization: plate_controls needs control wells on every plate; 1 of 24 plates "
            "have none (first: HEPG2-02 plate 4, 0 control sites of 4)") in proc.stderr
    assert not (tmp_path / "run").exists()


def test_plate_lean_is_removed_and_a_plate_without_one_is_left_alone():
    """A plate effect (every well of a plate leaning towards the same classes) is what centring removes;
    on a plate without one almost nothing is removed, and the wells' own evidence decides."""
    wells, logp, classes, groups, truth = _toy(n_per_group=8, signal=2.5, seed=11)
    plates = wells["plate"].to_numpy()
    rng = np.random.default_rng(3)
    leaning = logp.copy()
    for p in range(1, 5):
        leaning[plates == p] += rng.normal(0, 4.0, len(classes))  # much stronger than the wells' evidence
    own = (logp.argmax(1) == truth).mean()
    assert (leaning.argmax(1) == truth).mean() < own / 2  # the lean hides the siRNAs
    centered = center_log_probs(wells, leaning)
    assert (centered.argmax(1) == truth).mean() >= own - 0.1  # and centring gives them back
    # the lean, by hand: per-class means of row-centred rows, kept by 1 - (sampling variance / their variance)
    rows = leaning[plates == 1] - leaning[plates == 1].mean(1, keepdims=True)
    means = rows.mean(0)
    keep = 1 - (rows.var(0).mean() / len(rows)) / means.var()
    np.testing.assert_allclose(plate_lean(leaning[plates == 1]), keep * means, atol=1e-12)
    assert 0.9 < keep < 1
    # without a plate effect the means are mostly sampling noise: little is kept
    quiet = plate_lean(logp[plates == 1])
    assert np.abs(quiet).max() < 0.2 * np.abs(plate_lean(leaning[plates == 1])).max()
    np.testing.assert_array_equal(center_log_probs(wells, leaning, "none"), leaning)
    # a per-row constant changes nothing (an un-normalised log-softmax)
    shifted = leaning + rng.normal(0, 5, (len(leaning), 1))
    assert (center_log_probs(wells, shifted).argmax(1) == centered.argmax(1)).all()


def test_unknown_balance_or_adabn_exits_2_with_one_line(tiny_data, tmp_path):
    logits = tmp_path / "x.npz"
    np.savez(logits, id_code=np.array(["a"]), logits=np.zeros((1, 1), np.float32), classes=np.array(["1"]))
    for command in (["submit", "--data", tiny_data, "--logits", logits, "--out", tmp_path / "s.csv"],
                    ["evaluate", tmp_path, "--data", tiny_data]):
        proc = run_cli(*command, "--balance", "hungarian", check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == \
            "error: --balance must be one of none, sinkhorn, got 'hungarian'"
    proc = run_cli("submit", "--data", tiny_data, "--logits", logits, "--out", tmp_path / "s.csv", "--center", "well",
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --center must be one of plate, none, got 'well'"
    proc = run_cli("predict", tmp_path, "--data", tiny_data, "--out", tmp_path / "p.npz", "--adabn", "well",
                   check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "error: --adabn must be one of recipe, none, plate, experiment, got 'well'"
    for command in (["predict", tmp_path, "--data", tiny_data, "--out", tmp_path / "p.npz"],
                    ["evaluate", tmp_path, "--data", tiny_data]):
        for bad in ("1.5", "often"):
            proc = run_cli(*command, "--adabn-prior", bad, check=False)
            assert proc.returncode == 2 and proc.stderr.strip() == \
                f"error: --adabn-prior must be between 0 and 1, or auto, got {bad!r}"
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "p.npz").exists()
