"""`minsdxl generate --xyz FLAG=V1,V2,...` (A1111's X/Y/Z plot) on the bundled tiny model: every cell's image is
the image of a plain run with that cell's flags, and the grid holds each image where its PNG text says."""

import json

import numpy as np
import PIL.Image
import pytest

from minsdxl.cli import main, read_png_metadata

BASE = ["-p", "a red circle at the top left", "-W", "64", "-H", "64", "--steps", "2", "-s", "3", "-q"]


def _pixels(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_a_two_axis_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*BASE, "--xyz", "cfg=4,7.5", "--xyz", "steps=1,3", "--outdir", "out"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names[-1] == "xyz_grid-00000.png" and len(names) == 5  # four cells; the grid numbered as the first
    grid = PIL.Image.open(tmp_path / "out" / names[-1])
    meta = json.loads(grid.text["minsdxl_grid"])
    assert [a["flag"] for a in meta["axes"]] == ["cfg", "steps"] and len(meta["cells"]) == 4
    cells = [("4", "1"), ("7.5", "1"), ("4", "3"), ("7.5", "3")]  # X fastest
    for k, (cfg, steps) in enumerate(cells):
        single = tmp_path / f"single{k}.png"
        args = [*BASE, "--cfg", cfg, "--steps", steps, "-o", str(single)]
        assert main(args) == 0
        cell = meta["cells"][k]
        crop = np.asarray(grid.convert("RGB"))[cell["y"] : cell["y"] + 64, cell["x"] : cell["x"] + 64]
        assert np.array_equal(_pixels(cell["image"]), _pixels(single)), k
        assert np.array_equal(crop, _pixels(single)), k  # the grid shows it there
        info = read_png_metadata(cell["image"])["minsdxl"]["args"]
        assert (info["cfg"], info["steps"]) == (float(cfg), int(steps)) and "xyz" not in info
    assert main(["--from-png", str(tmp_path / "out" / names[-1])]) == 1  # a grid: its cells are the images
    assert "is an X/Y/Z grid: --from-png one of its cells' images (out/00000-3.png" in capsys.readouterr().err
    # the labels are drawn: the margins are not blank
    assert np.asarray(grid.convert("L"))[: meta["cells"][0]["y"]].min() < 128


def test_prompt_search_and_replace_and_a_z_axis(tmp_path):
    out = tmp_path / "p.png"
    argv = [*BASE, "-n", "a red blur", "--xyz", "prompt-sr=red,blue", "--xyz", "seed=3", "--xyz", "sampler=euler,ddim"]
    assert main([*argv, "-o", str(out)]) == 0
    meta = json.loads(PIL.Image.open(tmp_path / "p-grid.png").text["minsdxl_grid"])
    assert len(meta["cells"]) == 4 and len({c["x"] for c in meta["cells"]}) == 4  # Z grids side by side
    second = read_png_metadata(meta["cells"][1]["image"])["minsdxl"]["args"]
    assert second["prompt"] == "a blue circle at the top left" and second["negative_prompt"] == "a blue blur"
    single = tmp_path / "single.png"
    assert (
        main(
            [*BASE, "-p", "a blue circle at the top left", "-n", "a blue blur", "--sampler", "ddim", "-o", str(single)]
        )
        == 0
    )
    assert np.array_equal(_pixels(meta["cells"][3]["image"]), _pixels(single))


def test_without_a_seed_the_grid_draws_one(tmp_path):
    """= A1111's X/Y/Z plot (fix_seed): no -s, one random seed for every cell, so the axes alone differ; an axis
    that sets the seed still sets it."""
    base = [a for a in BASE if a not in ("-s", "3")]
    assert main([*base, "--xyz", "cfg=4,7.5", "--xyz", "steps=1,2", "-o", str(tmp_path / "x.png")]) == 0
    meta = json.loads(PIL.Image.open(tmp_path / "x-grid.png").text["minsdxl_grid"])
    seeds = {read_png_metadata(c["image"])["minsdxl"]["seed"] for c in meta["cells"]}
    assert len(meta["cells"]) == 4 and len(seeds) == 1
    assert main([*base, "--xyz", "seed=5,6", "-o", str(tmp_path / "y.png")]) == 0
    meta = json.loads(PIL.Image.open(tmp_path / "y-grid.png").text["minsdxl_grid"])
    assert [read_png_metadata(c["image"])["minsdxl"]["seed"] for c in meta["cells"]] == [5, 6]


@pytest.mark.parametrize(
    "axes,message",
    [
        (["cfg"], "write FLAG=V1,V2"),
        (["cfg=4,"], "write FLAG=V1,V2"),
        (["colour=red"], "unrecognized arguments: --colour"),
        (["model=tiny"], "--model is not a per-image flag"),
        (["steps=two"], "invalid int value: 'two'"),
        (["prompt-sr=green,blue"], "Prompt S/R looks for 'green', which the prompt lacks"),
        (["cfg=4", "steps=1", "seed=1", "sampler=euler"], "at most three axes"),
    ],
)
def test_bad_axes_are_usage_errors(tmp_path, capsys, axes, message):
    argv = [*BASE, "--outdir", str(tmp_path / "out")]
    for a in axes:
        argv += ["--xyz", a]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
