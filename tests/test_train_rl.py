"""`edge-duet train-rl` (train/grpo.py) on the tiny shape: rollouts equal the reference greedy loop, only sampled
tokens carry loss, advantages are group-normalised, a few steps move the weights and leave a checkpoint that
resumes and exports; bad configurations and a missing SFT checkpoint are refused with their exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="training needs the export extra (torch)")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edge_duet.apps.cli import app  # noqa: E402
from edge_duet.eval import benchmark as bm  # noqa: E402
from edge_duet.train import data as td  # noqa: E402
from edge_duet.train import grpo, sft  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny checkpoint standing in for an SFT one (what the CLI and the trainer need is its layout)."""
    path = tmp_path_factory.mktemp("sft") / "ckpt"
    sft.init_checkpoint(path, sft.TrainOptions(shape="tiny", seed=5))
    return path


@pytest.fixture(scope="module")
def loaded(tiny):
    from tokenizers import Tokenizer

    from edge_duet.export.checkpoint import load_model

    model, _ = load_model(tiny)
    return model, td.DialogueEncoder(Tokenizer.from_file(str(tiny / "tokenizer.json")))


def _frames(enc, ex):
    times = [t for turn in bm.turns(ex, enc.clock) for t in turn.frame_times]
    proc = enc.processor(images=enc.frames(ex, times), return_tensors="pt")
    return proc["pixel_values"], proc["image_grid_thw"]


def test_greedy_rollout_equals_the_full_recompute_loop_and_masks_all_but_sampled_tokens(loaded):
    model, enc = loaded
    ex = next(e for e in bm.sample_examples(21, 12, durations_s=(12.0,)) if e.subset == "multi")
    pv, grid = _frames(enc, ex)
    with torch.no_grad():
        feats = grpo.image_features(model, pv, grid)
    traj = grpo.rollout(model, enc, ex, feats, grid, temperature=1.0, top_k=1, max_new_tokens=6)
    assert traj.replies == sft.greedy_dialogue(model, enc, ex, max_new_tokens=6)
    ids, sampled = np.array(traj.ids), np.array(traj.sampled)
    assert (ids == enc.image_pad).sum() == len(feats)  # every frame's visual tokens, in order
    assert not sampled[ids == enc.image_pad].any()  # user turns (frames, text) never carry loss
    runs = np.flatnonzero(np.diff(np.concatenate([[0], sampled.astype(int), [0]])))
    assert len(runs) // 2 == len(bm.turns(ex, enc.clock))  # one sampled run per assistant turn
    for s, e in zip(runs[::2], runs[1::2]):
        head = enc.ids("<|im_start|>assistant\n")
        before = ids[:s].tolist()
        assert before[-len(head):] == head or enc.tok.decode(before[-6:]).endswith(bm.MUST_REPLY_PREFIX)
        assert e - s <= 6


def test_group_advantages():
    a = grpo.group_advantages([1.0, 2.0, 3.0, 2.0])
    assert float(a.mean()) == pytest.approx(0.0, abs=1e-6) and float(a.std()) == pytest.approx(1.0, abs=1e-4)
    assert a.argmax() == 2 and a.argmin() == 0
    assert torch.equal(grpo.group_advantages([0.5, 0.5, 0.5]), torch.zeros(3))  # nothing to prefer: no gradient


def test_train_rl_smoke_resume_and_export(tiny, tmp_path):
    """A few steps on the tiny shape: rewards computed, the loss moves, the weights change, a checkpoint is written,
    --resume continues it, and it exports."""
    from safetensors.torch import load_file

    out = tmp_path / "rl"
    args = ["train-rl", str(out), "--sft", str(tiny), "--steps", "3", "--group", "2", "--max-new-tokens", "3",
            "--lr", "1e-3", "--save-every", "2", "--threads", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    log = json.loads((out / "training" / "rl_log.json").read_text())
    hist = log["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    for h in hist:
        assert np.isfinite(h["total"]) and 0.0 <= h["pauc"] <= 1.0 and -1.0 <= h["outspan"] <= 0.0
        assert h["total"] == pytest.approx(3 * h["pauc"] + 2 * h["rep"] + 0.5 * h["outspan"] + 2 * h["pfx"])
    assert len({round(h["loss"], 6) for h in hist}) > 1, hist
    before, after = load_file(tiny / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not move"
    assert (out / "training" / "rl_state.pt").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "proactive.json").is_file()

    res = runner.invoke(app, ["train-rl", str(out), "--resume", "--steps", "4", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "resumed" in res.output
    hist2 = json.loads((out / "training" / "rl_log.json").read_text())["history"]
    assert [h["step"] for h in hist2] == [1, 2, 3, 4] and hist2[:3] == hist

    res = runner.invoke(app, ["export", str(out), str(tmp_path / "bundle")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "bundle" / "manifest.json").is_file()


@pytest.mark.parametrize("extra, code, words", [
    (["--group", "1"], 2, "group_size"),
    (["--temperature", "0"], 2, "temperature"),
    (["--w-rep", "-1"], 2, "rep"),
    (["--steps", "0"], 2, "steps"),
])
def test_bad_configs_are_refused(tiny, tmp_path, extra, code, words):
    res = runner.invoke(app, ["train-rl", str(tmp_path / "o"), "--sft", str(tiny), *extra])
    assert res.exit_code == code, res.output
    assert words in res.output and "Traceback" not in res.output


def test_missing_sft_checkpoint_and_nothing_to_resume(tmp_path):
    res = runner.invoke(app, ["train-rl", str(tmp_path / "o"), "--sft", str(tmp_path / "nope")])
    assert res.exit_code == 3 and "no SFT checkpoint" in res.output and "train-demo" in res.output
    res = runner.invoke(app, ["train-rl", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--sft" in res.output
    res = runner.invoke(app, ["train-rl", str(tmp_path / "o"), "--resume"])
    assert res.exit_code == 3 and "nothing to resume" in res.output
    res = runner.invoke(app, ["train-rl", str(tmp_path / "o"), "--resume", "--sft", str(tmp_path)])
    assert res.exit_code == 2 and "drop --sft" in res.output


def test_kl_to_the_sft_model_and_greedy_evaluation(tiny, tmp_path):
    """--kl: the k3 penalty is 0 while the policy is the SFT model and grows once it moves; the held-out greedy
    evaluation reports the reward terms and the evaluator's strict PAUC."""
    from edge_duet.train.grpo import RLOptions, train_rl

    result = train_rl(tiny, tmp_path / "kl", RLOptions(steps=2, group_size=2, max_new_tokens=2, lr=1e-2, kl_coef=0.1,
                                                       eval_dialogues=1, threads=1, progress=False),
                      log=lambda s: None)
    first, second = result.history
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert second["kl"] > 1e-4
    assert [e["step"] for e in result.evals] == [0, 2]
    for e in result.evals:
        assert 0.0 <= e["strict_pauc"] <= 100.0 and 0.0 <= e["pauc"] <= 1.0
