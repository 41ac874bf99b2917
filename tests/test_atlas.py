"""The feature atlas: the sharded top-k equals a brute force over all images; the reduce's
projections, boxes and picture; a workflow with several shards equals one with a single shard."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from cnnviz.errors import ConfigError
from cnnviz.methods import atlas
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIDE = 16
LAYERS = ["conv1", "conv2"]


def tiny_onnx(path: Path, seed: int = 7) -> Path:
    """Conv-Clip(0, 1)-MaxPool-Conv-Relu-GAP-Gemm: the Clip saturates, so activations tie."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv1.weight": rng.normal(0, 0.6, (4, 3, 3, 3)), "conv1.bias": rng.normal(0, 0.2, 4),
        "conv2.weight": rng.normal(0, 0.4, (5, 4, 3, 3)), "conv2.bias": rng.normal(0, 0.1, 5),
        "fc.weight": rng.normal(0, 1, (3, 5)), "fc.bias": np.zeros(3),
        "lo": np.array(0.0), "hi": np.array(1.0),
    }  # fmt: skip
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "conv1.weight", "conv1.bias"],
            ["c1"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"]),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node(
            "Conv",
            ["p1", "conv2.weight", "conv2.bias"],
            ["c2"],
            kernel_shape=[3, 3],
            pads=[0, 1, 2, 1],
        ),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIDE, SIDE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()]
    model = helper.make_model(
        helper.make_graph(nodes, "tiny", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


PREPROCESS = {"resize": "stretch", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
LABELS = ["a", "b", "c"]


def write_images(folder: Path, n: int = 40, duplicates: int = 10) -> list[Path]:
    """n random images, `duplicates` exact copies of the first ones (ties across images) and
    two flat grey images (ties between positions within an image)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        paths.append(folder / f"img{i:02d}.png")
        Image.fromarray(pixels).save(paths[-1])
    for i in range(duplicates):
        paths.append(folder / f"zdup{i:02d}.png")
        shutil.copy(paths[i], paths[-1])
    for name in ("flat1", "flat2"):
        paths.append(folder / f"{name}.png")
        Image.fromarray(np.full((SIDE, SIDE, 3), 140, np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from cnnviz.export import export_model
    from cnnviz.images import stage_shard
    from cnnviz.plan import assign_ids

    root = tmp_path_factory.mktemp("atlas")
    model_dir = root / "models" / "tiny"
    export_model(
        "tiny",
        f"onnx:{tiny_onnx(root / 'tiny.onnx')}",
        model_dir,
        preprocess=PREPROCESS,
        labels=LABELS,
    )
    paths = write_images(root / "inputs")
    ids = assign_ids(paths)
    pairs = list(zip(ids, paths, strict=True))
    cuts = [0, 7, 20, 21, 37, len(pairs)]  # uneven shards, one of a single image
    manifests = []
    for s, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        manifest = root / "images" / f"s{s:03d}.json"
        stage_shard(pairs[a:b], root / "images" / f"s{s:03d}", manifest)
        manifests.append(manifest)
    whole = root / "images" / "all.json"
    stage_shard(pairs, root / "images" / "all", whole)
    return {
        "root": root,
        "model_dir": model_dir,
        "manifests": manifests,
        "whole": whole,
        "ids": ids,
    }


def map_all(run: dict, k: int, manifests: list[Path], tag: str, batch_size: int = 3) -> list:
    out = []
    for manifest in manifests:
        path = run["root"] / f"shards-{tag}-{k}" / f"{manifest.stem}.json"
        atlas.map_shard(run["model_dir"], manifest, path, LAYERS, k, "cpu", 1, batch_size)
        out.append(path)
    return out


def brute_force(run: dict, k: int) -> dict[str, list[list[tuple]]]:
    """Every image alone through ONNX Runtime; per channel all (image, unit) sorted in Python."""
    from cnnviz.graph import expose
    from cnnviz.images import load_image, preprocess, read_manifest
    from cnnviz.modelcard import load_card
    from cnnviz.runtime import make_session

    card = load_card(run["model_dir"])
    model = onnx.load(str(run["model_dir"] / "model.onnx"))
    rows = {name: next(r for r in card["layers"] if r["name"] == name) for name in LAYERS}
    names = [t for r in rows.values() for t in (r["tensor"], r["conv_output"])]
    session = make_session(expose(model, names), "cpu", 1)
    per_layer: dict[str, list[list[tuple]]] = {name: [] for name in LAYERS}
    candidates: dict[str, dict[int, list[tuple]]] = {name: {} for name in LAYERS}
    for entry in read_manifest(run["whole"])["images"]:
        x = preprocess(load_image(entry["path"]), card["preprocess"])[None]
        values = dict(zip(names, session.run(names, {"input": x}), strict=True))
        for name, row in rows.items():
            act, pre = values[row["tensor"]][0], values[row["conv_output"]][0]
            for c in range(act.shape[0]):
                units = [
                    (-float(act[c, y, x_]), -float(pre[c, y, x_]), y, x_)
                    for y in range(act.shape[1])
                    for x_ in range(act.shape[2])
                ]
                v, p, y, x_ = min(units)
                candidates[name].setdefault(c, []).append((v, p, entry["id"], y, x_))
    for name in LAYERS:
        for c in sorted(candidates[name]):
            best = sorted(candidates[name][c])[:k]
            per_layer[name].append([(i, -v, -p, [y, x]) for v, p, i, y, x in best])
    return per_layer


def as_tuples(top: atlas.TopK) -> list[list[tuple]]:
    return [
        [(e["image"], e["value"], e["pre"], e["position"]) for e in top.entries(c)]
        for c in range(top.channels)
    ]


@pytest.mark.parametrize("k", [9, 60])
def test_merged_top_k_equals_the_brute_force_top_k(run: dict, k: int) -> None:
    expected = brute_force(run, k)
    shards = map_all(run, k, run["manifests"], "sharded")
    merged, ranked, _ = atlas.merge_shards(shards, LAYERS, k)
    assert sorted(ranked) == sorted(run["ids"]) and len(ranked) == 52
    for name in LAYERS:
        assert as_tuples(merged[name]) == expected[name], name
    # Same result whatever the order of the shards or the sharding.
    backwards, _, _ = atlas.merge_shards(shards[::-1], LAYERS, k)
    whole, _, _ = atlas.merge_shards(map_all(run, k, [run["whole"]], "one", 8), LAYERS, k)
    for name in LAYERS:
        assert as_tuples(backwards[name]) == as_tuples(whole[name]) == expected[name]
    # The test has exact ties: saturated values (same value, different pre-activation) and
    # copies of an image (same value and pre: the image id decides).
    entries = [e for name in LAYERS for channel in expected[name] for e in channel]
    values = [e[1] for e in entries]
    assert values.count(1.0) >= 2
    if k == 60:
        pairs = {(e[1], e[2]) for e in entries if e[0].startswith("zdup")}
        assert pairs and all(
            any(e[0].startswith("img") and (e[1], e[2]) == pair for e in entries) for pair in pairs
        )


def test_unit_maxima_breaks_ties_by_pre_activation_then_raster_order() -> None:
    act = np.zeros((1, 3, 2, 3), np.float32)
    pre = np.zeros_like(act)
    act[0, 0] = [[6, 1, 6], [6, 0, 0]]  # three saturated units ...
    pre[0, 0] = [[7, 1, 9], [9, 0, 0]]  # ... two with the same, highest conv output
    act[0, 1] = 2.0  # flat: the first unit
    pre[0, 1] = 2.0
    act[0, 2] = [[np.nan, 1, 3], [3, 0, 0]]  # NaN never wins
    pre[0, 2] = act[0, 2]
    value, pre_at, y, x = atlas.unit_maxima(act, pre)
    assert value.tolist() == [[6, 2, 3]] and pre_at.tolist() == [[9, 2, 3]]
    assert y.tolist() == [[0, 0, 0]] and x.tolist() == [[2, 0, 2]]


def test_choose_channels() -> None:
    top = atlas.TopK.empty(5, 2)
    top.push(
        atlas.TopK(
            np.array([[1.0], [3.0], [3.0], [0.5], [-np.inf]]),
            np.array([[1.0], [3.0], [4.0], [0.5], [-np.inf]]),
            np.array([["a"]] * 5),
            np.zeros((5, 1), np.int64),
            np.zeros((5, 1), np.int64),
            np.array([[True]] * 4 + [[False]]),
        )
    )
    assert atlas.choose_channels(top, "most_active", 4) == [2, 1, 0, 3]
    assert atlas.choose_channels(top, "first", 3) == [0, 1, 2]
    assert atlas.choose_channels(top, "first", 9) == [0, 1, 2, 3, 4]
    assert atlas.choose_channels(top, "most_active", 2, named=[4, 0]) == [4, 0]
    with pytest.raises(ConfigError, match="out of range"):
        atlas.choose_channels(top, "first", 2, named=[5], layer="conv1")


def _top(values: list[list[float]]) -> atlas.TopK:
    """A TopK whose rows are `values` (NaN = an unfilled slot), best first."""
    array = np.array(values, np.float64)
    filled = ~np.isnan(array)
    shape = array.shape
    return atlas.TopK(np.where(filled, array, -np.inf), np.where(filled, array, -np.inf),
                      np.full(shape, "a"), np.zeros(shape, np.int64), np.zeros(shape, np.int64),
                      filled)  # fmt: skip


def test_selectivity_known_values() -> None:
    top = _top([
        [4.0, 1.0, 1.0],  # 1 - 2/4
        [2.0, 2.0, 2.0],  # equal: 0
        [6.0, 3.0, np.nan],  # two images only: 1 - 4.5/6
        [5.0, np.nan, np.nan],  # one image: 0
        [-1.0, -2.0, -3.0],  # never positive: 0
        [np.nan, np.nan, np.nan],  # no image: 0
        [10.0, 0.0, 0.0],  # one image stands out: 1 - 10/3/10
    ])  # fmt: skip
    expected = [0.5, 0.0, 0.25, 0.0, 0.0, 0.0, 2 / 3]
    np.testing.assert_allclose(atlas.selectivity(top), expected, rtol=1e-12)
    # Scale-free: the same channel with every value doubled is as selective.
    np.testing.assert_allclose(atlas.selectivity(_top([[8.0, 2.0, 2.0]])), [0.5])
    # A saturated channel (ReLU6: every activation 6) is ranked by its conv outputs 12, 6, 6.
    saturated = _top([[6.0, 6.0, 6.0]])
    saturated.pre[0] = [12.0, 6.0, 6.0]
    np.testing.assert_allclose(atlas.selectivity(saturated), [1 - 8 / 12])
    # most_selective: by selectivity, ties by the top activation, then the lower index;
    # channels without an image last.
    assert atlas.choose_channels(top, "most_selective", 7) == [6, 0, 2, 3, 1, 4, 5]
    assert atlas.choose_channels(top, "most_active", 3) == [6, 2, 3]


def test_channel_strip_columns_and_empty_cells() -> None:
    cell, sep = 4, atlas.SEP
    red, blue = np.full((cell, cell, 3), (255, 0, 0), np.uint8), np.zeros((cell, cell, 3), np.uint8)
    strip = atlas.channel_strip([red, red], [blue, blue], 3, cell)
    assert strip.shape == (2 * cell + sep, 3 * cell + 2 * sep, 3)
    for j in range(2):
        left = j * (cell + sep)
        assert (strip[:cell, left : left + cell] == red).all()
        assert (strip[cell + sep :, left : left + cell] == blue).all()
    left = 2 * (cell + sep)  # two images for k = 3: the third column is EMPTY
    assert (strip[:cell, left:] == atlas.EMPTY).all()
    assert (strip[cell + sep :, left:] == atlas.EMPTY).all()


def test_reduce_writes_the_atlas_and_its_json(run: dict) -> None:
    from cnnviz.images import display_image, load_image, preprocess, read_manifest
    from cnnviz.modelcard import load_card
    from cnnviz.receptive import receptive_field, unit_box
    from reference_methods import Projector

    k = 4
    shards = map_all(run, k, run["manifests"], "reduce")
    out = run["root"] / "atlas-out"
    options = {
        "layers": LAYERS,
        "top_k": k,
        "channels": "most_active",
        "count": 3,
        "named": {"conv2": [4, 1]},
    }
    infos = atlas.reduce_atlas(
        run["model_dir"], shards, run["manifests"], out, options, "cpu", 1, batch_size=5
    )
    merged, _, _ = atlas.merge_shards(shards, LAYERS, k)
    model = onnx.load(str(run["model_dir"] / "model.onnx"))
    card = load_card(run["model_dir"])
    paths = {e["id"]: e["path"] for m in run["manifests"] for e in read_manifest(m)["images"]}
    for info in infos:
        layer = info["layer"]
        saved = json.loads((out / f"{layer}.json").read_text())
        assert saved == json.loads(json.dumps(info))
        picture = np.asarray(Image.open(out / f"{layer}.png"))
        assert picture.ndim == 3 and picture.shape[1] > 2 * 3 * atlas.CELL
        chosen = [c["channel"] for c in saved["channels"]]
        expected = [4, 1] if layer == "conv2" else atlas.choose_channels(merged[layer], count=3)
        assert chosen == expected
        peaked = atlas.selectivity(merged[layer])
        assert [c["selectivity"] for c in saved["channels"]] == pytest.approx(
            [peaked[c] for c in chosen], rel=1e-5, abs=1e-7)
        row = next(r for r in card["layers"] if r["name"] == layer)
        fields = receptive_field(model, row["tensor"])
        assert saved["receptive_field"]["size"] == [f.size for f in fields]
        for channel in saved["channels"]:
            entries = merged[layer].entries(channel["channel"])
            assert channel["images"] == [e["image"] for e in entries]
            assert len(channel["top"]) == k
            # The channel's strip: column j = rank j's projection above the patch of its image
            # under the unit's receptive field (recomputed here from the image and position).
            strip = np.asarray(Image.open(out / channel["strip"]))
            cell, sep = atlas.CELL, atlas.SEP
            assert channel["strip"] == f"{layer}/ch{channel['channel']:04d}.png"
            assert strip.shape == (2 * cell + sep, k * (cell + sep) - sep, 3)
            for j, entry in enumerate(entries):
                left = j * (cell + sep)
                shown = strip[cell + sep :, left : left + cell]
                image = load_image(paths[entry["image"]])
                _, window = atlas.unit_window(fields, entry["position"], (SIDE, SIDE), None)
                patch = atlas.crop_window(display_image(image, card["preprocess"]), window, 255)
                np.testing.assert_array_equal(shown, atlas._fit(patch, cell))
                # a projection, never a flat tile: a saturated unit (conv1's Clip at 1, most of
                # the top units here) is projected from its conv output, not through its own Clip
                assert strip[:cell, left : left + cell].std() > 0, (layer, channel["channel"], j)
            for shown, entry in zip(channel["top"], entries, strict=True):
                assert shown["position"] == entry["position"]
                assert shown["box"] == unit_box(fields, entry["position"], (SIDE, SIDE))
    # The reduce's projection of a winner is the step-by-step reference's for that image and
    # channel (reference_methods.Projector: forward session, host-side seed, deconvnet session).
    winner = merged["conv2"].entries(4)[0]
    path = next(
        e["path"]
        for m in run["manifests"]
        for e in read_manifest(m)["images"]
        if e["id"] == winner["image"]
    )
    x = preprocess(load_image(path), card["preprocess"])[None]
    projector = Projector(model, card, ["conv2"], batch=1, device="cpu", threads=1)
    theirs = projector.project(x, "conv2", [4])[0][0]
    assert theirs["position"] == winner["position"] and theirs["value"] == winner["value"]
    from cnnviz.methods.projections import unit_projection_graph
    from cnnviz.modelcard import find_layer
    from cnnviz.runner import Runner

    runner = Runner(unit_projection_graph(model, find_layer(card, "conv2")["tensor"], 1), "cpu", 1)
    ours = atlas.project_units(runner, x, [(4, *winner["position"], winner["value"])])[0]
    np.testing.assert_allclose(ours, theirs["projection"], rtol=1e-5, atol=1e-6)
    # The reduce seeds at the conv output (atlas._seed_tensor): the same projection for this
    # unsaturated ReLU unit.
    row = find_layer(card, "conv2")
    assert atlas._seed_tensor(row) == row["conv_output"] != row["tensor"]
    pre = Runner(unit_projection_graph(model, row["conv_output"], 1), "cpu", 1)
    from_pre = atlas.project_units(pre, x, [(4, *winner["position"], winner["value"])])[0]
    np.testing.assert_allclose(from_pre, theirs["projection"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the workflow


def snakemake(workdir: Path, config: dict, target: str) -> subprocess.Popen:
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "workflow" / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        "1",
        target,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_several_shards_give_the_same_atlas_as_one(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "tiny.onnx")
    images = write_images(tmp_path / "inputs", n=7, duplicates=1)
    runs = {}
    for shard_size in (4, 100):  # 10 images: 3 shards, 1 shard; one run after the other
        workdir = tmp_path / f"run{shard_size}"
        workdir.mkdir()
        config = {
            "output": "results", "device": "cpu", "threads": 1, "shard_size": shard_size,
            "batch_size": 2, "images": {"paths": [str(images[0].parent)]},
            "models": {"tiny": {"source": f"onnx:{model}", "preprocess": PREPROCESS,
                                "labels": LABELS}},
            "methods": {"enabled": []},
            "atlas": {"layers": "auto", "top_k": 4, "count": 3},
        }  # fmt: skip
        process = snakemake(workdir, config, "results/tiny/atlas/layers")
        runs[shard_size] = (workdir, process, process.communicate(timeout=600)[0])
    results = {}
    for shard_size, (workdir, process, output) in runs.items():
        assert process.returncode == 0, output[-4000:]
        shards = sorted((workdir / "results" / "tiny" / "atlas" / "shards").glob("*.json"))
        assert len(shards) == (3 if shard_size == 4 else 1)
        folder = workdir / "results" / "tiny" / "atlas" / "layers"
        results[shard_size] = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }  # not snakemake's timestamp  # fmt: skip
    assert results[4].keys() == results[100].keys()
    assert {Path(name).suffix for name in results[4]} == {".png", ".json"}
    layers = sorted(name for name in results[4] if name.endswith(".json"))
    assert len(layers) == 2  # auto on a two-layer model: both layers, a picture each ...
    strips = [json.loads(results[4][name])["channels"] for name in layers]
    assert len(results[4]) == 4 + sum(len(channels) for channels in strips) == 4 + 2 * 3
    for channels in strips:  # ... and a strip per shown channel
        assert all(channel["strip"] in results[4] for channel in channels)
    for name in results[4]:
        assert results[4][name] == results[100][name], name
    # The report over the workflow's results: a page per atlas layer, reached from the index,
    # every strip shown, every image of every column linked to its page; no broken link.
    from cnnviz.report import build_report, crawl

    results_dir = runs[4][0] / "results"
    found = crawl(build_report(results_dir, models=["tiny"]))
    assert not found.broken and not found.external
    report = results_dir / "report"
    for name, channels in zip(layers, strips, strict=True):
        page = report / "tiny" / "atlas" / f"{Path(name).stem}.html"
        assert page in found.pages
        html = page.read_text()
        for channel in channels:
            assert results_dir / "tiny" / "atlas" / "layers" / channel["strip"] in found.files
            for image in channel["images"]:
                assert f'href="../{image}.html"' in html and report / "tiny" / f"{image}.html" \
                    in found.pages
