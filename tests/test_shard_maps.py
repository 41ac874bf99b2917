"""The per-shard map files (methods.shard_maps) and the render step that draws their pictures
(cnnviz.pictures): round trips, the float16 signed signal, which rows get a picture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cnnviz.cli import main
from cnnviz.errors import CnnvizError, ConfigError
from cnnviz.failures import record_failure
from cnnviz.methods import backprop
from cnnviz.methods.explain import explain_shard
from cnnviz.methods.shard_maps import (
    pictures_dir,
    read_array,
    read_index,
    read_pictures,
    read_shard_maps,
    signed_row,
    write_shard_maps,
)
from cnnviz.pictures import chosen_images, render_shard
from PIL import Image
from test_explain import shard  # noqa: F401  (fixture: a tiny model and a staged shard)


def test_maps_and_signed_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((3, 5, 6)).astype(np.float32)
    signed = [rng.normal(size=(3, 5, 6)).astype(np.float32) * s for s in (1e-9, 1.0, 1e4)]
    rows = [{"image": f"im{i}", "target": i, "label": f"c{i}"} for i in range(3)]
    folder = tmp_path / "m" / "s000"
    written = write_shard_maps(folder, "guided_backprop", "tiny", rows, maps, signed)
    assert [r["row"] for r in written] == [0, 1, 2]
    got_rows, got = read_shard_maps(folder)
    assert np.array_equal(got, maps) and got.dtype == np.float32
    assert [r["image"] for r in got_rows] == ["im0", "im1", "im2"]
    index = read_index(folder)
    stored = read_array(folder, index, "signed")
    assert stored.dtype == np.float16
    for r, row in enumerate(index["rows"]):
        back = signed_row(stored, row)
        # float16 of the row scaled to [-1, 1]: 3 significant digits at any magnitude ...
        assert np.abs(back - signed[r]).max() <= 1e-3 * np.abs(signed[r]).max()
        # ... and the picture it makes is the same, to one grey level
        diff = backprop.signed_rgb(back).astype(int) - backprop.signed_rgb(signed[r]).astype(int)
        assert np.abs(diff).max() <= 1
    assert not (folder / "signed.npy").exists() or "signed" in index["arrays"]
    plain = write_shard_maps(tmp_path / "p", "gradcam", "tiny", rows, maps, [None] * 3)
    assert "signed_scale" not in plain[0] and not (tmp_path / "p" / "signed.npy").exists()
    assert pictures_dir(folder) == tmp_path / "pictures" / "m" / "s000"


def test_which_images_get_a_picture() -> None:
    ids = ["a", "b", "c", "d"]
    top = {i: [{"index": k, "label": lab, "prob": p}]
           for i, k, lab, p in [("a", 1, "cat", 0.9), ("b", 2, "dog", 0.3),
                                ("c", 1, "cat", 0.95), ("d", 3, "tabby, tabby cat", 0.6)]}
    assert chosen_images("all", ids, top, {}) == set(ids)
    assert chosen_images("none", ids, top, {}) == set()
    assert chosen_images({"top": 2}, ids, top, {}) == {"a", "c"}
    assert chosen_images({"top": 9}, ids, top, {}) == set(ids)
    assert chosen_images("failures", ids, top, {"a": "dog", "b": "dog", "d": "tabby"}) == {"a"}
    assert chosen_images("failures", ids, top, {}) == {"b"}  # no truth: the unsure ones
    with pytest.raises(ConfigError, match="report.pictures"):
        chosen_images({"best": 2}, ids, top, {})


def test_render_draws_only_the_selected_rows(shard, tmp_path: Path) -> None:  # noqa: F811
    model_dir, manifest = shard
    maps = tmp_path / "tiny" / "guided_backprop" / "s000"
    explain_shard(model_dir, manifest, "guided_backprop", maps, {}, device="cpu")
    predictions = tmp_path / "predictions.json"
    rows, _ = read_shard_maps(maps)
    ids = [r["image"] for r in rows]
    predictions.write_text(json.dumps({"images": [
        {"id": i, "top": [{"index": 0, "label": "a", "prob": p}]}
        for i, p in zip(ids, (0.2, 0.9, 0.5), strict=True)]}))  # fmt: skip
    out = pictures_dir(maps)
    code = main(["render", "--card", str(model_dir / "model.json"), "--manifest", str(manifest),
                 "--maps-dir", str(maps), "--predictions", str(predictions),
                 "--out-dir", str(out), "--pictures", '{"top": 1}'])  # fmt: skip
    assert code == 0
    drawn = read_pictures(out)
    assert list(drawn) == [1] and drawn[1] == f"{ids[1]}_c{rows[1]['target']}.png"
    assert sorted(p.name for p in out.glob("*.png")) == [drawn[1]]
    again = render_shard(model_dir, manifest, maps, tmp_path / "all", "all", predictions)
    assert len(again["pictures"]) == 3


def test_one_render_job_draws_every_method_of_a_shard(shard, tmp_path: Path) -> None:  # noqa: F811
    model_dir, manifest = shard
    folders = {m: tmp_path / "tiny" / m / "s000" for m in ("saliency", "deconvnet", "gradcam")}
    for method in ("saliency", "deconvnet"):
        explain_shard(model_dir, manifest, method, folders[method], {}, device="cpu")
    # gradcam's explain job "failed": its folder holds the failure record, not maps
    record_failure("explain", CnnvizError("no rule for Softplus"), [(folders["gradcam"], True)])
    outs = [pictures_dir(f) for f in folders.values()]
    code = main(["render", "--card", str(model_dir / "model.json"), "--manifest", str(manifest),
                 "--maps-dir", *map(str, folders.values()), "--out-dir", *map(str, outs),
                 "--pictures", '"all"'])  # fmt: skip
    assert code == 0
    assert len(read_pictures(outs[0])) == len(read_pictures(outs[1])) == 3
    skipped = json.loads((outs[2] / "pictures.json").read_text())
    assert skipped["pictures"] == [] and "Softplus" in skipped["skipped"]
    # a signed method's picture is the signal as RGB, from the float16 copy
    rows, _ = read_shard_maps(folders["deconvnet"])
    drawn = np.asarray(Image.open(outs[1] / read_pictures(outs[1])[0]))
    index = read_index(folders["deconvnet"])
    signal = signed_row(read_array(folders["deconvnet"], index, "signed"), index["rows"][0])
    assert np.abs(drawn.astype(int) - backprop.signed_rgb(signal).astype(int)).max() == 0


def test_projections_are_one_array_file_with_pictures(shard, tmp_path: Path) -> None:  # noqa: F811
    model_dir, manifest = shard
    folder = tmp_path / "tiny" / "projections" / "s000"
    summary = explain_shard(model_dir, manifest, "projections", folder, {"top_k": 2},
                            device="cpu")
    index = read_index(folder)
    assert index["kind"] == "projections" and len(index["rows"]) == len(summary["maps"]) > 0
    stack = read_array(folder, index, "projections")
    assert stack.shape[:3] == (len(index["rows"]), 2, 3) and stack.dtype == np.float16
    row = index["rows"][0]
    assert {"image", "layer", "channels"} <= set(row) and "scale" in row["channels"][0]
    drawn = render_shard(model_dir, manifest, folder, pictures_dir(folder), {"top": 1})
    images = {p["image"] for p in drawn["pictures"]}
    assert len(images) == 1 and all(p["png"].endswith(f"_{p['layer']}.png")
                                    for p in drawn["pictures"])  # fmt: skip
