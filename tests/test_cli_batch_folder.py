"""`-i FOLDER` (A1111's img2img batch): each image in the folder in turn, its output named after it, with
`--mask FOLDER` the mask of the same name; every output equals a plain run on that image."""

import numpy as np
import PIL.Image

from minsdxl.cli import main, read_png_metadata

BASE = ["-p", "a blue square", "--steps", "2", "-s", "4", "-q", "--strength", "0.6"]


def _pixels(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    for name, size in (("frame_b.png", (64, 64)), ("frame_a.jpg", (72, 64))):
        PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "in" / name)
        mask = np.zeros((size[1], size[0]), dtype=np.uint8)
        mask[16:48, 16:48] = 255
        PIL.Image.fromarray(mask).save(tmp_path / "masks" / (name.split(".")[0] + ".png"))
    (tmp_path / "in" / "notes.txt").write_text("not an image")


def test_img2img_and_inpaint_batches(tmp_path):
    _folder(tmp_path)
    assert main([*BASE, "-i", str(tmp_path / "in"), "--outdir", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["frame_a.png", "frame_b.png"]
    for name in ("frame_a.jpg", "frame_b.png"):
        single = tmp_path / f"single_{name}.png"
        assert main([*BASE, "-i", str(tmp_path / "in" / name), "-o", str(single)]) == 0
        out = tmp_path / "out" / (name.split(".")[0] + ".png")
        assert np.array_equal(_pixels(out), _pixels(single)), name
        assert read_png_metadata(out)["minsdxl"]["args"]["init_image"].endswith(name)
    argv = [*BASE, "-i", str(tmp_path / "in"), "--mask", str(tmp_path / "masks"), "--outdir", str(tmp_path / "inp")]
    assert main(argv) == 0
    single = tmp_path / "single_mask.png"
    argv = [*BASE, "-i", str(tmp_path / "in" / "frame_b.png"), "--mask", str(tmp_path / "masks" / "frame_b.png")]
    assert main([*argv, "-o", str(single)]) == 0
    assert np.array_equal(_pixels(tmp_path / "inp" / "frame_b.png"), _pixels(single))
    assert main([*BASE, "-i", str(tmp_path / "in"), "--outdir", str(tmp_path / "out")]) == 1  # would overwrite


def test_bad_batches_are_usage_errors(tmp_path, capsys):
    _folder(tmp_path)
    (tmp_path / "empty").mkdir()
    cases = [
        (["-i", str(tmp_path / "empty")], "the folder holds no image"),
        (["-i", str(tmp_path / "in"), "-o", str(tmp_path / "x.png")], "give --outdir, not -o"),
        (["-i", str(tmp_path / "in"), "--mask", str(tmp_path / "masks" / "frame_b.png")], "a folder of masks"),
        (["-i", str(tmp_path / "in"), "--mask", str(tmp_path / "empty")], "has no mask for frame_a.jpg, frame_b.png"),
        (["-i", str(tmp_path / "in"), "--xyz", "cfg=4,5"], "goes without --prompts-file and --xyz"),
    ]
    for argv, message in cases:
        where = [] if "-o" in argv else ["--outdir", str(tmp_path / "o")]
        assert main([*BASE, *argv, *where]) == 2, message
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
