"""The doctor's remedies on every adversarial trainer besides the DCGAN (tests/training/
test_doctor_remedies.py): ProGAN, the 2-D mixtures' MLP GAN, the context encoder and pix2pix
take noisy labels, dropout in D, fewer D steps and restarts with changed networks, rewound to the
checkpoint before the failure."""

from __future__ import annotations

import pytest
import torch

from ganforge.training.context_encoder import ContextEncoderTask, ContextEncoderTrainConfig, UNetConfig
from ganforge.training.doctor import MIN_RESTART_NDF
from ganforge.training.gan import MLPGANConfig, load_checkpoint
from ganforge.training.loop import GANTrainer
from ganforge.training.mixtures import MixtureTask, MixtureTrainConfig
from ganforge.training.monitor import Diagnosis
from ganforge.training.pix2pix import Pix2PixConfig, Pix2PixTask, Pix2PixTrainConfig
from ganforge.training.progan import ProGANConfig, ProGANTask, ProGANTrainConfig

COMMON = dict(doctor="auto", checkpoint_every=2, sample_every=1000, log_every=1, threads=1, device="cpu")
TRAINERS = {
    "progan": (ProGANTask, lambda: ProGANTrainConfig(
        steps=40, batch_size=8, n_images=32, stable_images=48, fade_images=48, **COMMON,
        network=ProGANConfig(z_dim=8, resolution=16, fmap_base=64, fmap_max=16, fmap_min=8))),
    "mlpgan": (MixtureTask, lambda: MixtureTrainConfig(
        steps=40, batch_size=16, n_points=256, **COMMON, network=MLPGANConfig(ngf=8, ndf=8))),
    "context-encoder": (ContextEncoderTask, lambda: ContextEncoderTrainConfig(
        steps=40, batch_size=4, tile=32, n_images=16, **COMMON,
        network=UNetConfig(width=8, depth=3, dilations=(1, 2), d_width=8))),
    "pix2pix": (Pix2PixTask, lambda: Pix2PixTrainConfig(
        steps=40, batch_size=4, tile=32, n_images=16, **COMMON, network=Pix2PixConfig(ngf=4, ndf=4, depth=5))),
}


def trainer(name: str, out) -> GANTrainer:
    task_class, cfg = TRAINERS[name]
    torch.set_num_threads(1)
    return type("Stepped", (GANTrainer,), {"task_class": task_class})(cfg(), out)


def d_width(task) -> int:
    """The out-channels of D's first weight: its width at the first layer."""
    return next(v for k, v in task.D.state_dict().items() if k.endswith("weight") and v.dim() >= 2).shape[0]


@pytest.mark.parametrize("name", list(TRAINERS))
def test_d_dominates_flips_labels_inserts_dropout_and_slows_d(name, tmp_path):
    tr = trainer(name, tmp_path)
    task = tr.task
    k = task.knobs()
    assert k["label_flip"] == 0.0 and k["d_dropout"] == 0.0 and k["d_steps_every"] == 1
    task.watch.doctor.remedy(Diagnosis("d_dominates", 4, {}, "forced", 2), task, task.network_sizes())
    k = task.knobs()
    assert k["label_flip"] == 0.05 and k["d_dropout"] == pytest.approx(0.2) and k["d_steps_every"] == 2
    assert task.watch.doctor.pending["changes"]["ndf"] < task.network_sizes()["ndf"]   # fewer filters in D
    tr.train_step()                            # step 0: D updated, with flipped labels and dropout
    before = [p.clone() for p in task.D.parameters()]
    tr.train_step()                            # step 1: D sits out
    assert all(torch.equal(a, b) for a, b in zip(before, task.D.parameters()))


@pytest.mark.parametrize("name", ["progan", "context-encoder", "pix2pix"])
def test_dropout_is_inserted_into_a_d_built_without_it(name, tmp_path):
    task = trainer(name, tmp_path).task
    D = task.D_held if name == "pix2pix" else task.D        # pix2pix's D bound to its conditions
    x = task.watch.monitor.real                             # the doctor's held-out reals, at the stage
    D.train()
    torch.manual_seed(0)
    plain = D(x)
    task.set_knob("d_dropout", 0.5)
    torch.manual_seed(0)
    assert not torch.allclose(plain, D(x))
    D.eval()                                                # no dropout at evaluation
    task.set_knob("d_dropout", 0.0)
    ref = D(x)
    task.set_knob("d_dropout", 0.5)
    assert torch.equal(ref, D(x))


@pytest.mark.parametrize("name", list(TRAINERS))
def test_a_restart_rewinds_to_the_checkpoint_before_the_failure_with_a_wider_d(name, tmp_path):
    tr = trainer(name, tmp_path)
    eng, task = tr.engine, tr.task
    for _ in range(4):
        tr.train_step()
        if eng.step % 2 == 0:
            eng.save(task)
    assert eng.rewind_steps() == [0, 2, 4]
    size = sum(p.numel() for p in task.D.parameters())
    ndf = task.network_sizes()["ndf"]
    task.watch.doctor.remedy(Diagnosis("g_dominates", 4, {}, "forced", onset=3), task, task.network_sizes())
    decision = eng._restart_point(task.restart_decision())
    wider = max(2 * ndf, MIN_RESTART_NDF)            # strengthen D: ndf x2, at least 16
    assert decision["from_step"] == 2 and decision["changes"] == {"ndf": wider}
    eng.rebuild(task, decision)
    assert eng.step == 2 and task.network_sizes()["ndf"] == wider
    assert sum(p.numel() for p in task.D.parameters()) > size
    assert task.opt_D.param_groups[0]["params"][0] is next(task.D.parameters())
    assert task.watch.doctor.restarts[0]["from_step"] == 2 and eng.rewind_steps() == [0, 2]
    tr.train_step()
    tr.train_step()
    payload = load_checkpoint(eng.save(task))
    assert payload["config"][task.sizes["ndf"]] == wider        # export rebuilds the wider D


def _ruin(G) -> None:
    """Every image of G white."""
    with torch.no_grad():
        for rgb in G.to_rgb:
            rgb.weight.zero_()
            rgb.bias.fill_(1.0)


def test_progan_keeps_the_best_weights_of_its_final_resolution_only_judged_on_g_ema(tmp_path):
    torch.set_num_threads(1)
    cfg = TRAINERS["progan"][1]()
    cfg.stable_images = cfg.fade_images = 8            # a stage or fade-in per step: 16 px at step 4
    tr = type("Stepped", (GANTrainer,), {"task_class": ProGANTask})(cfg, tmp_path)
    task = tr.task
    task.doctor_observe(tr.step)                       # at 4 px: no weights kept
    assert task.watch.best.step is None
    while not (task.stage == cfg.network.n_stages - 1 and task.alpha >= 1.0):
        tr.train_step()
    row = task.doctor_observe(tr.step)
    assert "shipped_fd" in row and round(task.watch.best.fd, 5) == row["shipped_fd"]
    best = {k: v.clone() for k, v in task.G_ema.state_dict().items()}
    shown = task.shown
    assert task.watch.best.step == tr.step
    # G ruined, G_ema (what samples and export use) not: the final weights are as good
    _ruin(task.G)
    task.doctor_observe(tr.step)
    kept = tr.keep_best()
    assert not kept["kept"] and kept["measure"] == "FD of the shipped G, shapes-classifier features, 256 samples"
    tr.train_step()                                    # the images shown move on
    _ruin(task.G_ema)
    task.doctor_observe(tr.step)
    kept = tr.keep_best()
    assert kept["kept"] and kept["final_fd"] > 1.1 * kept["fd"]
    assert all(torch.equal(v, best[k]) for k, v in task.G_ema.state_dict().items())
    assert task.shown == shown                         # with the images shown they were kept at


def test_a_checkpoint_holding_a_knob_the_task_no_longer_turns_still_resumes(tmp_path):
    task = trainer("mlpgan", tmp_path).task
    # the MLP GAN's checkpoints once carried its pending network as a knob
    task.load_extra_state({"knobs": {"network": {"ngf": 16}, "label_flip": 0.1}, "doctor": {}})
    assert task.knobs()["label_flip"] == 0.1 and task.network_sizes()["ngf"] == 8
