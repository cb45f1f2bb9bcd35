"""Engine stage without TensorRT: Polygraphy config objects, dry run, missing-TensorRT error, pack/unpack with
hash checks, and the per-layer parser on a documented-schema fixture."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from sls_deploy.cli import main
from sls_deploy.trt.engine import engine_settings, polygraphy_loaders, trtexec_command
from sls_deploy.config.recipe import resolve_recipe
from sls_deploy.trt.layers import layer_report

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None,
                                reason="these tests cover the machine without TensorRT")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_images):
    from conftest import write_tiny_recipe, write_tiny_weights

    tmp = tmp_path_factory.mktemp("eng")
    recipe = write_tiny_recipe(tmp, tiny_images,
                               engine={"min": [1, 8, 8], "opt": [1, 45, 80], "max": [2, 90, 160]})
    weights = write_tiny_weights(recipe, tmp / "w.safetensors")
    out = tmp / "b"
    assert main(["build", "--recipe", str(recipe), "--weights", str(weights), "--budget", "0.6", "--method",
                 "oneshot", "--out", str(out), "--no-progress"]) == 0
    return out


def test_config_objects_from_recipe():
    recipe = resolve_recipe("edsr", None)
    s = engine_settings(recipe, "fp16", "enable")
    network, config, engine = polygraphy_loaders(s, Path("/nonexistent"), trt_major=10)
    assert config.sparse_weights is True and config.fp16 is True and not config.int8
    (profile,) = config.profiles
    assert str(profile) == "{lr [min=(1, 3, 32, 32), opt=(1, 3, 180, 320), max=(1, 3, 270, 480)]}"
    _, config11, _ = polygraphy_loaders(s, Path("/nonexistent"), trt_major=11)
    assert not config11.fp16 and not config11.int8  # strongly typed: precision comes from the graph
    s8 = engine_settings(recipe, "int8", "disable", workspace_mb=512)
    _, c8, _ = polygraphy_loaders(s8, Path("/nonexistent"), trt_major=10)
    assert c8.int8 and c8.fp16 and c8.sparse_weights is False
    cmd = trtexec_command(s8, 11)
    assert "--stronglyTyped" in cmd and "--int8" not in cmd and "--sparsity=disable" in cmd
    assert "--memPoolSize=workspace:512M" in cmd


def test_network_loader_needs_tensorrt(bundle):
    from polygraphy.backend.trt import NetworkFromOnnxPath

    with pytest.raises(Exception, match="tensorrt"):
        NetworkFromOnnxPath(str(bundle / "model.onnx"))()


def test_dry_run_writes_build_json(bundle, capsys):
    assert main(["engine", str(bundle), "--dry-run", "--precision", "int8"]) == 0
    out = capsys.readouterr().out
    assert "trtexec --onnx=model.int8.onnx" in out and "polygraphy convert model.int8.onnx" in out
    info = json.loads((bundle / "engine" / "build.json").read_text())
    assert info["dry_run"] and info["tensorrt_major"] is None
    assert info["settings"]["profile"] == {"lr": {"min": [1, 3, 8, 8], "opt": [1, 3, 45, 80], "max": [2, 3, 90, 160]}}
    assert "--minShapes=lr:1x3x8x8 --optShapes=lr:1x3x45x80 --maxShapes=lr:2x3x90x160" in info["trtexec"]


@pytest.mark.parametrize("argv", [["engine"], ["validate", "--backend", "trt"]])
def test_missing_tensorrt_is_one_line_and_writes_nothing(bundle, capsys, argv):
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    assert main([argv[0], str(bundle), *argv[1:]]) == 1
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "TensorRT was not found" in lines[0] and "JetPack" in lines[0]
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before


def test_pack_round_trip_and_tamper_check(bundle, tmp_path, capsys):
    tar = tmp_path / "dev.tar.gz"
    assert main(["pack", str(bundle), "--out", str(tar)]) == 0
    with tarfile.open(tar) as t:
        names = set(t.getnames())
    assert {"pack.json", "plan.json", "model.onnx", "model.fp16.onnx", "model.int8.onnx", "calib_cache.json",
            "recipe.yaml", "manifest.json", "val/astronaut.png"} <= names
    assert "model.safetensors" not in names  # a device needs graphs, not training weights
    assert main(["engine", str(tar), "--dry-run"]) == 0  # unpacks beside the tar, checks every hash
    root = tmp_path / "dev"
    meta = json.loads((root / "pack.json").read_text())
    assert meta["opset"] == 17 and meta["onnx"] and meta["recipe_digest"]
    # tamper with a packed graph: refused
    data = bytearray((root / "model.fp16.onnx").read_bytes())
    data[-5] ^= 0xFF
    (root / "model.fp16.onnx").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["engine", str(root), "--dry-run"]) == 1
    assert "does not match its recorded sha256" in capsys.readouterr().err


def test_folder_bundle_with_tampered_graph_is_refused(bundle, capsys, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "model.int8.onnx").write_bytes(b"changed")
    assert main(["engine", str(copy), "--dry-run", "--precision", "int8"]) == 1
    assert "sha256" in capsys.readouterr().err


def test_layers_json_parser_on_fixture():
    inspector = json.loads((FIXTURES / "trt_inspector_edsr_sample.json").read_text())
    log = (FIXTURES / "trt_build_log_sample.txt").read_text()
    plan_layers = [{"name": "body.0.conv1", "n": 2, "m": 4, "sparse_2to4": True},
                   {"name": "body.0.conv2", "n": 2, "m": 4, "sparse_2to4": True},
                   {"name": "upsample.0", "n": 3, "m": 4, "sparse_2to4": False},
                   {"name": "body.1.conv1", "n": 2, "m": 4, "sparse_2to4": True}]
    nodes = {"body.0.conv1": "/body/body.0/conv1/Conv", "body.0.conv2": "/body/body.0/conv2/Conv",
             "upsample.0": "/upsample/upsample.0/Conv"}
    rows = {r["name"]: r for r in layer_report(plan_layers, nodes, inspector, log)}
    assert rows["body.0.conv1"]["trt_eligible"] and rows["body.0.conv1"]["trt_picked_sparse"]
    assert "sparse" in rows["body.0.conv1"]["tactic"]
    assert rows["body.0.conv2"]["trt_eligible"] and not rows["body.0.conv2"]["trt_picked_sparse"]
    assert rows["upsample.0"]["trt_eligible"] and not rows["upsample.0"]["weights_2to4"]
    assert rows["body.1.conv1"]["onnx_node"] is None and not rows["body.1.conv1"]["trt_eligible"]


def test_inspector_sparse_weights_alone_is_eligible_not_picked():
    """HasSparseWeights means the weights follow 2:4 (eligible): without a "picked sparse implementation" log line
    or a sparse tactic name the layer was NOT given a sparse kernel (TensorRT timed both, kept the dense one)."""
    fused = "/body/body.0/conv1/Conv + /body/body.0/relu/Relu"
    dense_tactic = "sm86_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize64x64x64"
    inspector = {"Layers": [{"Name": fused, "HasSparseWeights": 1, "TacticName": dense_tactic}]}
    eligible = f"[I] [TRT] (Sparsity) Layers eligible for sparse math: {fused}\n"
    picked_none = "[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: \n"
    plan_layers = [{"name": "body.0.conv1", "n": 2, "m": 4, "sparse_2to4": True}]
    nodes = {"body.0.conv1": "/body/body.0/conv1/Conv"}
    for log in ("", eligible + picked_none):  # no sparsity lines at all, or eligible and nothing picked
        (row,) = layer_report(plan_layers, nodes, inspector, log)
        assert row["trt_eligible"] is True and row["trt_has_sparse_weights"] is True
        assert row["trt_picked_sparse"] is False and row["trt_picked_from"] is None
    # the same layer with the log's picked line: picked, and the row says where that came from
    picked = f"(Sparsity) TRT inference plan picked sparse implementation for layers: {fused}"
    (row,) = layer_report(plan_layers, nodes, inspector, eligible + picked)
    assert row["trt_picked_sparse"] is True and row["trt_picked_from"] == "build log"


def test_layer_report_of_a_structured_plan_has_no_nm_fields():
    (row,) = layer_report([{"name": "upconv1"}], {"upconv1": "/upconv1/Conv"}, {"Layers": []}, "")
    assert row["weights_2to4"] is False and row["n"] is None
    assert not row["trt_eligible"] and not row["trt_picked_sparse"]


# --------------------------------------------------------------------------- profiles of every graph input

EDSR_DRY_RUN = [
    "# TensorRT not found here: shown for TensorRT 10 (flags); with 11 use --stronglyTyped and no flags",
    "trtexec --onnx=model.fp16.onnx --saveEngine=engine/model.plan --minShapes=lr:1x3x32x32 "
    "--optShapes=lr:1x3x180x320 --maxShapes=lr:1x3x270x480 --memPoolSize=workspace:4096M "
    "--timingCacheFile=engine/timing.cache --profilingVerbosity=detailed --exportLayerInfo=engine/inspector.json "
    "--sparsity=enable --fp16 --verbose",
    "polygraphy convert model.fp16.onnx --convert-to trt -o engine/model.plan --trt-min-shapes 'lr:[1,3,32,32]' "
    "--trt-opt-shapes 'lr:[1,3,180,320]' --trt-max-shapes 'lr:[1,3,270,480]' --pool-limit workspace:4096M "
    "--load-timing-cache engine/timing.cache --save-timing-cache engine/timing.cache --profiling-verbosity detailed "
    "--sparse-weights --fp16",
]


def test_edsr_dry_run_lines_unchanged():
    """The EDSR recipe's dry run, exactly as before profiles covered every input (one input: lr)."""
    from sls_deploy.trt.engine import build_plan

    info = build_plan(engine_settings(resolve_recipe("edsr", None), "fp16", "enable"), None)
    assert [f"# {info['path']}", info["trtexec"], info["polygraphy"]] == EDSR_DRY_RUN


def test_clip_graph_profile_has_T():
    from sls_deploy.trt.engine import build_plan

    s = engine_settings(resolve_recipe("basicvsr", None), "fp32", "enable")
    assert s.profile == {"lr": ((1, 5, 3, 32, 32), (1, 5, 3, 180, 320), (1, 5, 3, 270, 480))}
    info = build_plan(s, None)
    assert ("--minShapes=lr:1x5x3x32x32 --optShapes=lr:1x5x3x180x320 --maxShapes=lr:1x5x3x270x480"
            in info["trtexec"])
    assert ("--trt-min-shapes 'lr:[1,5,3,32,32]' --trt-opt-shapes 'lr:[1,5,3,180,320]' "
            "--trt-max-shapes 'lr:[1,5,3,270,480]'" in info["polygraphy"])
    _, config, _ = polygraphy_loaders(s, Path("/nonexistent"), trt_major=10)
    assert str(config.profiles[0]) == "{lr [min=(1, 5, 3, 32, 32), opt=(1, 5, 3, 180, 320), max=(1, 5, 3, 270, 480)]}"


def test_step_graph_profile_has_every_input(tmp_path):
    from sls_deploy.trt.engine import build_plan, dry_run

    s = engine_settings(resolve_recipe("streamvsr", None), "fp32", "disable")
    assert list(s.profile) == ["prev_lr", "lr", "hidden"]  # the graph's input order
    assert s.profile["hidden"] == ((1, 32, 32, 32), (1, 32, 180, 320), (1, 32, 270, 480))  # num_feat 32
    assert s.profile["prev_lr"] == s.profile["lr"] == ((1, 3, 32, 32), (1, 3, 180, 320), (1, 3, 270, 480))
    info = build_plan(s, None)
    assert ("--minShapes=prev_lr:1x3x32x32,lr:1x3x32x32,hidden:1x32x32x32 "
            "--optShapes=prev_lr:1x3x180x320,lr:1x3x180x320,hidden:1x32x180x320 "
            "--maxShapes=prev_lr:1x3x270x480,lr:1x3x270x480,hidden:1x32x270x480" in info["trtexec"])
    assert ("--trt-min-shapes 'prev_lr:[1,3,32,32]' 'lr:[1,3,32,32]' 'hidden:[1,32,32,32]' "
            "--trt-opt-shapes 'prev_lr:[1,3,180,320]' 'lr:[1,3,180,320]' 'hidden:[1,32,180,320]' "
            "--trt-max-shapes 'prev_lr:[1,3,270,480]' 'lr:[1,3,270,480]' 'hidden:[1,32,270,480]'" in info["polygraphy"])
    assert "--sparsity=disable" in info["trtexec"] and "--fp16" not in info["trtexec"]
    _, config, _ = polygraphy_loaders(s, Path("/nonexistent"), trt_major=10)
    (profile,) = config.profiles
    assert list(profile) == ["prev_lr", "lr", "hidden"]
    assert tuple(profile["hidden"].max) == (1, 32, 270, 480)
    written = dry_run(tmp_path, s)  # engine/build.dense.json records every input
    saved = json.loads((tmp_path / "engine" / "build.dense.json").read_text())
    assert saved["settings"]["profile"]["hidden"] == {"min": [1, 32, 32, 32], "opt": [1, 32, 180, 320],
                                                      "max": [1, 32, 270, 480]}
    assert set(saved["settings"]["profile"]) == {"prev_lr", "lr", "hidden"} and written["dry_run"]


def test_profile_over_a_fixed_graph_dimension_is_refused(tmp_path):
    """BasicVSR's clip graph fixes its batch (only H/W are dynamic): a profile varying N is a RecipeError."""
    import yaml

    from sls_deploy.config.recipe import builtin_recipe_dir, load_recipe
    from sls_deploy.core.errors import RecipeError

    raw = yaml.safe_load((builtin_recipe_dir() / "basicvsr.yaml").read_text())
    raw["engine"] = {"min": [1, 32, 32], "opt": [1, 64, 64], "max": [2, 64, 64]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match="dimension 0 of graph input 'lr' is fixed"):
        engine_settings(load_recipe(path), "fp32", "enable")


@pytest.mark.parametrize("engine, message", [
    ({"min": [1, -8, 8]}, "engine.min must be [N, H, W] with every value >= 1, not [1, -8, 8]"),
    ({"min": [0, 0, 0]}, "engine.min must be [N, H, W] with every value >= 1, not [0, 0, 0]"),
    ([1, 2], "recipe section 'engine' must be a mapping"),
    ({"max": [1, 8]}, "engine.max must be [N, H, W] (three integers"),
    ({"opt": "1x8x8"}, "engine.opt must be [N, H, W] (three integers"),
    ({"opt": [1, 8, 8]}, "engine: need min <= opt <= max"),
    ({"workspace_mb": 0}, "engine.workspace_mb must be an integer >= 1"),
    ({"max_psnr_drop_db": 0.1}, "engine.max_psnr_drop_db (legacy"),
])
def test_bad_engine_section_is_one_line(tmp_path, capsys, engine, message):
    import yaml

    from sls_deploy.config.recipe import builtin_recipe_dir
    from conftest import error_line

    raw = yaml.safe_load((builtin_recipe_dir() / "edsr.yaml").read_text())
    raw["engine"] = engine
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "recipe.yaml").write_text(path.read_text())
    (bundle / "pack.json").write_text(json.dumps({"files": {"recipe.yaml": __import__("hashlib").sha256(
        path.read_bytes()).hexdigest()}}))
    assert main(["engine", str(bundle), "--dry-run"]) != 0
    line = error_line(capsys.readouterr().err)
    assert message in line


def test_legacy_engine_max_psnr_drop_db_is_still_read(tmp_path):
    import yaml

    from sls_deploy.config.recipe import builtin_recipe_dir, load_recipe

    raw = yaml.safe_load((builtin_recipe_dir() / "edsr.yaml").read_text())
    raw["validate"].pop("max_psnr_drop_db")
    raw["engine"]["max_psnr_drop_db"] = {"fp16": 0.3}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = load_recipe(path)
    assert r.validate.max_drop("fp16") == 0.3 and r.engine.opt_nhw == (1, 180, 320)


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_unpacking_never_deletes_or_overwrites_an_existing_folder(bundle, tmp_path, capsys):
    """`engine X.tar.gz` beside an unrelated folder X/: refused, X/ untouched; beside its own unpacked copy:
    reused (an engine built there stays); a tampered tar leaves nothing under the final name."""
    tar = tmp_path / "photos.tar.gz"
    assert main(["pack", str(bundle), "--out", str(tar)]) == 0
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    before = _tree(photos)
    capsys.readouterr()
    assert main(["engine", str(tar), "--dry-run"]) == 1
    assert "exists and is not this tar's unpacked bundle" in capsys.readouterr().err
    assert _tree(photos) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".photos.unpack-")]  # staging cleaned up

    tar2 = tmp_path / "dev.tar.gz"
    assert main(["pack", str(bundle), "--out", str(tar2)]) == 0
    assert main(["engine", str(tar2), "--dry-run"]) == 0
    (tmp_path / "dev" / "engine" / "model.plan").write_bytes(b"an engine built earlier")
    assert main(["engine", str(tar2), "--dry-run"]) == 0  # the same pack again: reused, the engine stays
    assert (tmp_path / "dev" / "engine" / "model.plan").read_bytes() == b"an engine built earlier"


def test_a_tar_with_an_unlisted_member_is_refused_and_leaves_nothing(bundle, tmp_path, capsys):
    import io

    tar = tmp_path / "dev.tar.gz"
    assert main(["pack", str(bundle), "--out", str(tar)]) == 0
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(tar) as src, tarfile.open(evil, "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        info = tarfile.TarInfo("evil.sh")
        info.size, info.mode = 9, 0o755
        dst.addfile(info, io.BytesIO(b"rm -rf ~\n"))
    capsys.readouterr()
    assert main(["engine", str(evil), "--dry-run"]) == 1
    assert "member 'evil.sh' is not listed in pack.json" in capsys.readouterr().err
    assert not (tmp_path / "evil").exists() and not [p for p in tmp_path.iterdir() if ".unpack-" in p.name]


def test_pack_refuses_to_overwrite_a_user_file(bundle, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["pack", str(bundle), "--out", str(notes)]) == 1
    assert "exists and is not a packed bundle" in capsys.readouterr().err and notes.read_text() == "mine"
    tar = tmp_path / "b.tar.gz"
    assert main(["pack", str(bundle), "--out", str(tar)]) == 0
    assert main(["pack", str(bundle), "--out", str(tar)]) == 0  # our own earlier pack is replaced
    assert main(["pack", str(bundle), "--out", str(notes), "--force"]) == 0


def test_pack_json_without_files_is_one_line(tmp_path, capsys):
    from sls_deploy.core.errors import BundleError
    from sls_deploy.core.packing import verify_packed

    (tmp_path / "pack.json").write_text("{not json")
    with pytest.raises(BundleError, match="not a valid pack.json"):
        verify_packed(tmp_path)
    (tmp_path / "pack.json").write_text("{}")
    with pytest.raises(BundleError, match="not a valid pack.json"):
        verify_packed(tmp_path)
