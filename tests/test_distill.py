"""Distillation from the dense model during finetuning (training/distill.py, --distill-weight,
--feature-distill-weight): the terms, the teacher run once per step, the refusals, and the stage's record."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import error_line, run_cli, write_tiny_recipe, write_tiny_weights
from sls_deploy.core.errors import UsageError
from sls_deploy.models.edsr import EDSR
from sls_deploy.training.distill import DenseDistill, feature_term, output_term


def tiny_edsr(seed: int, widths=None) -> EDSR:
    torch.manual_seed(seed)
    return EDSR(scale=2, num_feat=8, num_block=2, widths=widths)


def test_output_term_is_zero_for_the_teacher_itself_and_pulls_a_student_toward_it():
    teacher = tiny_edsr(0)
    x = torch.rand(2, 3, 6, 6)
    same = DenseDistill(copy.deepcopy(teacher), [output_term(1.0)])
    twin = copy.deepcopy(teacher)
    same.attach(twin)
    twin(x)
    assert float(same.regularizer().detach()) == 0.0
    same.detach(twin)

    student = tiny_edsr(1)
    kd = DenseDistill(teacher, [output_term(2.0)])
    kd.attach(student)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    terms = []
    for _ in range(6):
        student(x)
        loss = kd.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
        terms.append(float(loss.detach()))
    kd.detach(student)
    assert len(calls) == 6  # one teacher run per step
    with torch.no_grad():
        expect = 2.0 * (student(x) - teacher(x)).abs().mean()
    assert terms[0] > 0 and terms[-1] < terms[0]
    assert kd.last == {"output distillation": pytest.approx(terms[-1])}
    assert abs(float(expect) - terms[-1]) < terms[0]  # the term is 2 x mean |out_s - out_t|
    assert not any(p.requires_grad for p in teacher.parameters())
    assert kd.regularizer() is None  # nothing recorded since the last step


def test_feature_term_compares_every_block_output_and_refuses_a_narrower_stream():
    teacher = tiny_edsr(0)
    names = ("body.0", "body.1")
    x = torch.rand(1, 3, 5, 7)
    # block inner channels pruned, the stream kept: every block output has the dense shape
    narrow_blocks = tiny_edsr(1, widths={"body.0.conv1": 4, "body.1.conv1": 4})
    both = DenseDistill(teacher, [output_term(1.0), feature_term(names, 0.5)])
    both.attach(narrow_blocks)
    narrow_blocks(x)
    loss = both.regularizer()
    with torch.no_grad():
        feats = {}
        for n in names:
            dict(teacher.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: feats.setdefault(("t", n), o))
            dict(narrow_blocks.named_modules())[n].register_forward_hook(
                lambda m, i, o, n=n: feats.setdefault(("s", n), o))
        out_s, out_t = narrow_blocks(x), teacher(x)
        want_f = torch.stack([(feats[("s", n)] - feats[("t", n)]).abs().mean() for n in names]).mean()
        want = (out_s - out_t).abs().mean() + 0.5 * want_f
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert set(both.last) == {"output distillation", "feature distillation"}
    both.detach(narrow_blocks)

    thin_stream = tiny_edsr(1, widths={"stream": 4})
    kd = DenseDistill(teacher, [feature_term(names, 0.5)])
    kd.attach(thin_stream)
    thin_stream(x)
    with pytest.raises(UsageError, match=r"^feature distillation: 'body.0' is \(1, 4, 5, 7\) in the pruned model and "
                                         r"\(1, 8, 5, 7\) in the dense one; .*--keep-full stream"):
        kd.regularizer()


def test_terms_refuse_what_cannot_work():
    with pytest.raises(UsageError, match="output distillation weight must be > 0, not 0"):
        output_term(0.0)
    with pytest.raises(UsageError, match="adapter names no feature modules"):
        feature_term((), 1.0)
    kd = DenseDistill(tiny_edsr(0), [feature_term(("body.7",), 1.0)])
    with pytest.raises(UsageError, match="feature distillation: the model has no module 'body.7'"):
        kd.attach(tiny_edsr(1))


def l1_bundle(tmp_path, images, capsys, keep_full: str, budget: str):
    """A tiny l1 channel build (FP32 graph only) with the stream kept (``stream``) or pruned (``none``)."""
    recipe = write_tiny_recipe(tmp_path, images)
    weights = write_tiny_weights(recipe, tmp_path / "w.safetensors")
    out = tmp_path / "b"
    code, _, err = run_cli(capsys, "build", "--recipe", recipe, "--weights", weights, "--budget", budget,
                           "--method", "l1", "--keep-full", keep_full, "--round-to", "4", "--out", out,
                           "--no-progress", "--precision", "fp32")
    assert code == 0, err
    return out


@pytest.fixture
def pruned_bundle(tmp_path, tiny_images, capsys):
    return l1_bundle(tmp_path, tiny_images, capsys, "stream", "0.6")


def test_finetune_with_distillation_records_its_terms_and_changes_the_weights(pruned_bundle, capsys):
    b = pruned_bundle
    plain = (b / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "finetune", b, "--steps", "3", "--distill-weight", "0.5",
                           "--feature-distill-weight", "0.2", "--no-progress")
    assert code == 0, err
    ft = json.loads((b / "manifest.json").read_text())["stages"]["finetune"]["result"]
    assert ft["steps"] == 3
    assert ft["distill"]["output_weight"] == 0.5 and ft["distill"]["feature_weight"] == 0.2
    assert set(ft["distill"]["final_terms"]) == {"output distillation", "feature distillation"}
    assert all(v > 0 for v in ft["distill"]["final_terms"].values())
    assert (b / "model.safetensors").read_bytes() != plain


def test_feature_distillation_of_a_pruned_stream_is_one_line_and_keeps_the_weights(tmp_path, tiny_images, capsys):
    out = l1_bundle(tmp_path, tiny_images, capsys, "none", "0.5")
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "finetune", out, "--steps", "2", "--feature-distill-weight", "1",
                           "--no-progress")
    assert code == 2
    assert error_line(err).startswith("error: feature distillation: 'body.0' is ") and "--keep-full stream" in err
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--distill-weight", "-1"], "Invalid value for '--distill-weight'"),
    (["--feature-distill-weight", "nan"], "error: --feature-distill-weight must be a finite number >= 0, not nan"),
])
def test_bad_distill_weights_are_usage_errors(capsys, tmp_path, tiny_recipe, args, message):
    code, _, err = run_cli(capsys, "build", "--recipe", tiny_recipe, "--budget", "0.5", "--out", tmp_path / "b",
                           *args)
    assert code == 2 and message in err and not (tmp_path / "b").exists()


def test_recipe_distill_section(tmp_path, tiny_images):
    from sls_deploy.config.recipe import load_recipe
    from sls_deploy.config.settings import Settings
    from sls_deploy.core.errors import RecipeError

    r = load_recipe(write_tiny_recipe(tmp_path, tiny_images, distill={"weight": 0.5}))
    assert r.distill.weight == 0.5 and r.distill.feature_weight == 0.0
    s = Settings.resolve(r, budget=0.5, method="l1")
    assert (s.distill_weight, s.feature_distill_weight) == (0.5, 0.0)
    assert Settings.resolve(r, budget=0.5, method="l1", distill_weight=0.0).distill_weight == 0.0  # the CLI wins
    with pytest.raises(RecipeError, match="distill.feature_weight must be >= 0, not -1"):
        load_recipe(write_tiny_recipe(tmp_path, tiny_images, distill={"feature_weight": -1}))
    with pytest.raises(RecipeError, match="distill"):
        load_recipe(write_tiny_recipe(tmp_path, tiny_images, distill={"wieght": 1}))
