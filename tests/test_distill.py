"""Depth pruning and distillation (compress/prune.py, compress/distill.py) on a tiny random teacher: pruning keeps
shapes consistent and the student loads in the engine; a few seconds of training lower its KL to the teacher
(the test fails if training is a no-op); the CLI writes both students and reports both KLs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tinymodel import write_tiny_llama
from tokenmill import LLM, SamplingParams
from tokenmill.cli import main
from tokenmill.compress import prune
from tokenmill.compress.distill import DistillOptions, distill, layers_to_drop, with_exit_layer
from tokenmill.compress.kld import kl_divergence
from tokenmill.compress.quantize import float_weights
from tokenmill.model.loader.checkpoint import load_checkpoint
from tokenmill.texts import shipped_text


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    write_tiny_llama(folder, load_checkpoint().tokenizer, seed=7, num_hidden_layers=4)
    return folder


def test_block_influence_ranks_a_near_identity_layer_lowest(teacher):
    """A layer whose output projections are zeroed adds nothing to the residual stream: influence 0, dropped
    first."""
    llm = LLM(str(teacher), dtype="float32", kv_cache_memory=2**22)
    with torch.no_grad():
        llm.model.layers[2].self_attn.o_proj.weight.zero_()
        llm.model.layers[2].mlp.down_proj.weight.zero_()
    ids = llm.tokenizer.encode(shipped_text("calibration_en.txt"))[:100]
    influence = prune.block_influence(llm.model, llm.score, ids, seq_len=40)
    assert influence.shape == (4,) and influence[2] == pytest.approx(0, abs=1e-6) and (influence[[1, 3]] > 1e-3).all()
    assert prune.least_influential(influence, 1) == [2]
    with pytest.raises(ValueError, match="can drop 0 to 2 of 4 layers"):
        prune.least_influential(influence, 3)


def test_dropped_layers_are_renumbered_and_the_student_loads(teacher, tmp_path):
    ckpt = load_checkpoint(str(teacher))
    weights, config = prune.drop_layers(float_weights(ckpt), ckpt.config, [1, 2])
    assert config.num_layers == 2 and not any(name.startswith(("layers.2.", "layers.3.")) for name in weights)
    torch.testing.assert_close(weights["layers.1.mlp.down_proj.weight"],
                               float_weights(ckpt)["layers.3.mlp.down_proj.weight"])
    assert layers_to_drop(1000, 100, 0.7, 8) == 3 and layers_to_drop(1000, 100, 0.1, 8) == 6


def test_distillation_lowers_the_students_kl_to_the_teacher(teacher, tmp_path):
    """Half the layers dropped, then ~8 s of training on the teacher's distributions: the KL on the training
    text falls well below the pruned student's (a random teacher's function of unseen text is not learnable in
    seconds: held-out numbers for real models are in BENCHMARKS.md), and both students load and generate."""
    llm = LLM(str(teacher), dtype="float32", kv_cache_memory=2**22)
    train = [llm.tokenizer.encode(shipped_text("calibration_en.txt"))[:256]]
    eval_ids = train[0][:128]
    options = DistillOptions(params_fraction=0.9, minutes=8 / 60, seq_len=64, lr=1e-3, sample_tokens=0)
    result = distill(llm, train, eval_ids, tmp_path / "student", options)
    assert result.dropped_layers and result.student_params < result.teacher_params
    assert result.steps >= 5 and result.losses[-1] < result.losses[0]
    assert result.distilled.mean < 0.8 * result.pruned.mean
    for folder in (tmp_path / "student", tmp_path / "student" / "pruned"):
        student = LLM(str(folder), dtype="float32", kv_cache_memory=2**22)
        assert student.config.num_layers == 4 - len(result.dropped_layers)
        out = student.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
    record = json.loads((tmp_path / "student" / "config.json").read_text())["distillation"]
    assert record["dropped_layers"] == result.dropped_layers and record["steps"] == result.steps


def test_distill_cli(teacher, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["distill", str(teacher), "--out", str(out), "--minutes", "0.05", "--params-fraction", "0.9",
                 "--seq-len", "32", "--sample-tokens", "64", "--eval-tokens", "64", "--dtype", "float32",
                 "--save-result", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "pruned" in text and "distilled" in text and (out / "pruned" / "config.json").exists()
    assert json.loads((tmp_path / "r.json").read_text())["steps"] >= 1


def test_exit_layer_is_a_copy_of_the_last_after_the_first_layers(teacher):
    ckpt = load_checkpoint(str(teacher))
    weights = float_weights(ckpt)
    out, config = with_exit_layer(weights, ckpt.config, 2)
    assert config.num_layers == 3 and not any(name.startswith("layers.3.") for name in out)
    torch.testing.assert_close(out["layers.1.self_attn.q_proj.weight"], weights["layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(out["layers.2.mlp.up_proj.weight"], weights["layers.3.mlp.up_proj.weight"])
    assert out["layers.2.mlp.up_proj.weight"].data_ptr() != weights["layers.3.mlp.up_proj.weight"].data_ptr()
    with pytest.raises(ValueError, match="exit_layer must be in 1..3"):
        with_exit_layer(weights, ckpt.config, 4)
    with pytest.raises(ValueError, match="exit_layer is for method 'early-exit'"):
        DistillOptions(exit_layer=2)


def test_early_exit_head_learns_and_drafts_without_changing_greedy_output(teacher, tmp_path):
    """An exit after 2 of 4 layers trains for ~8 s: its KL to the teacher on the training text falls far below the
    raw exit's (final norm and LM head after layer 2), only the exit layer and the final norm change, the teacher
    is untouched, and the draft it makes leaves greedy output as it is without speculation."""
    llm = LLM(str(teacher), dtype="float32", kv_cache_memory=2**22)
    train = [llm.tokenizer.encode(shipped_text("calibration_en.txt"))[:256]]
    probe = llm.score(train[0][:32]).clone()
    options = DistillOptions(method="early-exit", exit_layer=2, minutes=8 / 60, seq_len=64, lr=1e-3)
    result = distill(llm, train, train[0][:128], tmp_path / "draft", options)
    torch.testing.assert_close(llm.score(train[0][:32]), probe, rtol=0, atol=0)
    assert result.dropped_layers == [2, 3] and result.steps >= 5 and result.losses[-1] < 0.5 * result.losses[0]
    # untrained, the exit (a copy of the last layer) is at 0.77x the raw exit's KL; trained for 1 s, 0.46x
    assert result.distilled.mean < 0.5 * result.pruned.mean
    draft, raw = load_checkpoint(str(tmp_path / "draft")), load_checkpoint(str(tmp_path / "draft" / "pruned"))
    assert (draft.config.num_layers, raw.config.num_layers) == (3, 2)
    teacher_weights = float_weights(load_checkpoint(str(teacher)))
    for name in ("layers.1.mlp.down_proj.weight", "embed_tokens.weight"):
        torch.testing.assert_close(float_weights(draft)[name], teacher_weights[name], rtol=0, atol=0)
    assert not torch.equal(float_weights(draft)["norm.weight"], teacher_weights["norm.weight"])
    record = json.loads((tmp_path / "draft" / "config.json").read_text())["distillation"]
    assert record["method"] == "early-exit+kd" and record["exit_layer"] == 2
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = llm.generate(["The history of"], params)[0].outputs[0].token_ids
    spec = LLM(str(teacher), dtype="float32", kv_cache_memory=2**22,
               speculative_config={"method": "draft_model", "model": str(tmp_path / "draft"),
                                   "num_speculative_tokens": 3, "mode": "always"})
    assert spec.generate(["The history of"], params)[0].outputs[0].token_ids == plain
    assert spec.engine.stats().spec_num_drafts > 0


def test_quantization_aware_distillation_beats_round_to_nearest(teacher, tmp_path):
    """The teacher's weights trained ~8 s through int4 g128 rounding: closer to the teacher than plain
    round-to-nearest on the same grid (DIR/pruned), and so are the int4 checkpoints saved, loaded by the engine."""
    llm = LLM(str(teacher), dtype="float32", kv_cache_memory=2**22)
    train = [llm.tokenizer.encode(shipped_text("calibration_en.txt"))[:256]]
    options = DistillOptions(method="qad", group_size=128, minutes=8 / 60, seq_len=64, lr=1e-3)
    result = distill(llm, train, train[0][:128], tmp_path / "qad", options)
    assert result.dropped_layers == [] and result.student_params == result.teacher_params and result.steps >= 5
    assert result.distilled.mean < 0.7 * result.pruned.mean
    saved = {}
    for name, folder in (("qad", tmp_path / "qad"), ("rtn", tmp_path / "qad" / "pruned")):
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert (config["bits"], config["group_size"]) == (4, 128)
        quantized = LLM(str(folder), dtype="float32", kv_cache_memory=2**22)
        saved[name] = kl_divergence(llm.score, quantized.score, train[0][:128], 64, 32).mean
    assert saved["qad"] < 0.7 * saved["rtn"]
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        DistillOptions(method="qad", group_size=48)


def test_a_run_resumes_from_its_trainer_state(teacher, tmp_path):
    """A 2 s run leaves its trainer state; resumed to 4 s, training goes on from it (same first losses, more
    steps) instead of starting over; other options than the run had, or no state, are refused."""
    llm = LLM(str(teacher), dtype="float32", kv_cache_memory=2**22)
    train = [llm.tokenizer.encode(shipped_text("calibration_en.txt"))[:256]]
    options = DistillOptions(method="early-exit", exit_layer=2, minutes=2 / 60, seq_len=64, lr=1e-3)
    first = distill(llm, train, train[0][:64], tmp_path / "run", options)
    resumed = distill(llm, train, train[0][:64], tmp_path / "run", dataclasses.replace(options, minutes=4 / 60,
                                                                                       resume=True))
    assert resumed.steps > first.steps and resumed.losses[:first.steps] == first.losses
    assert resumed.seconds >= 4 and resumed.distilled.mean < first.distilled.mean
    with pytest.raises(ValueError, match="cannot resume with other lr"):
        distill(llm, train, train[0][:64], tmp_path / "run", dataclasses.replace(options, lr=1e-4, resume=True))
    with pytest.raises(ValueError, match="nothing to resume"):
        distill(llm, train, train[0][:64], tmp_path / "new", dataclasses.replace(options, resume=True))
