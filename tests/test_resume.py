"""cnnviz.resume (a killed run's lock, half-empty output folders), plan's input helpers and
check-config, without a workflow run (tests/test_user_cases.py and test_fault_injection.py run
them through Snakemake)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cnnviz import plan, resume
from cnnviz.config import load_config_file
from cnnviz.errors import ConfigError
from cnnviz.modelcard import resolve_class
from PIL import Image


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def locked(folder: Path, *owners: dict) -> Path:
    (folder / "locks").mkdir(parents=True)
    (folder / "locks" / "0.input.lock").write_text("results/x\n")
    if owners:
        (folder / resume.OWNER).write_text(json.dumps({"owners": list(owners)}))
    return folder


def test_a_lock_whose_run_is_gone_is_removed(tmp_path: Path) -> None:
    folder = locked(tmp_path / ".snakemake", {"host": socket.gethostname(), "pid": dead_pid()})
    assert "removed the lock" in resume.clear_stale_lock(folder)
    assert not resume.lock_held(folder)


def test_a_live_foreign_or_anonymous_lock_is_left_to_snakemake(tmp_path: Path) -> None:
    live = locked(tmp_path / "a", resume.owner_record())
    other_host = locked(tmp_path / "b", {"host": "elsewhere", "pid": dead_pid()})
    anonymous = locked(tmp_path / "c")
    # two runs started together: one took the lock and still runs
    both = locked(tmp_path / "d", {"host": socket.gethostname(), "pid": dead_pid()},
                  resume.owner_record())  # fmt: skip
    for folder in (live, other_host, anonymous, both):
        assert resume.clear_stale_lock(folder) is None and resume.lock_held(folder)
        assert not resume.claim_lock(folder)


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path: Path) -> None:
    mine = resume.owner_record()
    folder = locked(tmp_path / ".snakemake", dict(mine, start="1"))  # same pid, other process
    assert resume.clear_stale_lock(folder) is not None


def test_dry_run_flags() -> None:
    assert resume.dry_run(["snakemake", "-n"]) and resume.dry_run(["snakemake", "-np"])
    assert resume.dry_run(["snakemake", "--dry-run"])
    assert not resume.dry_run(["snakemake", "--cores", "2", "--nolock"])


def test_a_half_emptied_folder_is_set_aside_and_a_complete_one_kept(tmp_path: Path) -> None:
    done, half, unstamped = (tmp_path / name for name in ("done", "half", "unstamped"))
    for folder in (done, half, unstamped):
        (folder / "sub").mkdir(parents=True)
        (folder / "a.png").write_bytes(b"a")
        (folder / "sub" / "b.npy").write_bytes(b"bb")
    resume.write_stamp(done)
    resume.write_stamp(half)
    (half / "sub" / "b.npy").unlink()
    (done / ".a.png.tmp12345.png").write_bytes(b"")  # a stale temporary: not a job's file
    assert resume.half_state(done) is None
    assert "sub/b.npy is missing" in resume.half_state(half)
    assert "no record" in resume.half_state(unstamped)
    lines = resume.set_aside([done, half, unstamped, tmp_path / "absent"], tmp_path / ".trash")
    assert len(lines) == 2 and all("its job reruns" in line for line in lines)
    assert done.is_dir() and not half.exists() and not unstamped.exists()
    assert not (tmp_path / ".trash").exists()


def test_paths_that_do_not_exist_are_kept_for_staging_to_report(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (4, 4)).save(photos / "a.png")
    (photos / "b.heic").write_bytes(b"x")
    os.symlink(tmp_path / "gone.png", photos / "c.png")
    found = plan.discover_images([str(photos), str(tmp_path / "none" / "*.jpg")])
    assert [p.name for p in found] == ["a.png", "b.heic", "c.png", "*.jpg"]
    assert plan.existing(found) == [str(photos / "a.png"), str(photos / "b.heic")]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_image_sizes_from_the_headers(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(path, format=fmt)
    assert plan.image_size(path) == (53, 37)


def test_memory_grows_with_the_image_up_to_the_staged_size() -> None:
    small = plan.job_memory_mb([(640, 480)])
    large = plan.job_memory_mb([(2048, 2048)])
    assert small < large == plan.job_memory_mb([(9400, 9400)])
    assert plan.job_memory_mb([(9400, 9400)], staging=True) > large
    assert plan.job_memory_mb([(640, 480)], attempt=2) == 2 * small


def test_a_files_digest_follows_the_bytes_not_the_time(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"1234")
    cache = tmp_path / "cache.json"
    first = plan.files_digest([path], cache)
    os.utime(path, (1, 1))
    assert plan.files_digest([path], cache) == first
    path.write_bytes(b"1235")
    os.utime(path, (1, 1))
    assert plan.files_digest([path], cache) != first


def test_a_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text("output: results\nimages:\n  samples: [chelsea\nmodels: {}\n")
    with pytest.raises(ConfigError, match=r"line 4, column \d+"):
        load_config_file(path)


def test_a_label_two_classes_share_is_refused() -> None:
    card = {"name": "m", "labels": ["crane", "dog", "Crane"]}
    with pytest.raises(ConfigError, match=r"names 2 classes .*indices 0, 2"):
        resolve_class(card, "crane")
    assert resolve_class(card, 2) == 2 and resolve_class(card, "dog") == 1


def test_an_unforeseen_exception_is_recorded_as_the_jobs_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnnviz import cli

    def broken(args) -> None:  # noqa: ANN001
        raise ValueError("Required inputs (['aux']) are missing from input feed")

    monkeypatch.setattr(cli, "_predict", broken)
    out = tmp_path / "predictions" / "s000.json"
    argv = ["--record-failures", "predict", "--card", "m/model.json", "--manifest", "x.json",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())["job_failed"]
    assert record["step"] == "predict" and "ValueError: Required inputs" in record["error"]

    def out_of_memory(args) -> None:  # noqa: ANN001
        raise MemoryError

    monkeypatch.setattr(cli, "_predict", out_of_memory)
    with pytest.raises(MemoryError):  # the machine's error: the job fails, Snakemake retries
        cli.main(argv)


def test_a_folder_output_records_its_files_when_the_step_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnnviz import cli

    def writes(args) -> None:  # noqa: ANN001
        Path(args.out_dir).mkdir(parents=True)
        (Path(args.out_dir) / "a.png").write_bytes(b"png")

    monkeypatch.setattr(cli, "_activations", writes)
    folder = tmp_path / "activations" / "s000"
    argv = ["--record-failures", "activations", "--card", "m/model.json", "--manifest", "x.json",
            "--out-dir", str(folder)]  # fmt: skip
    assert cli.main(argv) == 0
    assert resume.half_state(folder) is None
    assert json.loads((folder / resume.STAMP).read_text())["files"] == {"a.png": 3}


def test_a_bad_resize_to_names_the_config_key_at_export() -> None:
    from cnnviz.export import check_preprocess
    from cnnviz.images import model_view

    pre = {"size": [224, 224], "resize": "center_crop", "resize_to": 200}
    with pytest.raises(ConfigError, match=r"models\.mine\.preprocess\.resize_to 200 .* config"):
        check_preprocess(pre, "model 'mine' (onnx:m.onnx)")
    with pytest.raises(ConfigError, match="in the config") as error:
        model_view(Image.new("RGB", (300, 300)), pre)
    assert "model.json" not in str(error.value)


def test_a_claim_keeps_runs_that_still_go_and_forgets_gone_ones(tmp_path: Path) -> None:
    folder = tmp_path / ".snakemake"
    folder.mkdir()
    gone = {"host": socket.gethostname(), "pid": dead_pid(), "start": "1"}
    (folder / resume.OWNER).write_text(json.dumps({"owners": [gone]}))
    assert resume.claim_lock(folder)
    owners = json.loads((folder / resume.OWNER).read_text())["owners"]
    assert owners == [resume.owner_record()]
