"""`minsdxl generate --prompts-file FILE` (A1111's "Prompts from file or textbox"), on the bundled tiny model.

A line's image is shown to be the image (and the metadata) of a plain run with that line's flags, in the same
process: the prompts file only saves the model loading. Most runs here are in-process `main()` calls
(0.4 s each at 64x64 and a few steps); one subprocess reads the file from its standard input.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from sdxl_testing import kohya_lora, lora_layers, random_lora_pairs

import minsdxl
from minsdxl.checkpoint import save_safetensors
from minsdxl.cli import build_parser, main, read_png_metadata

SIZE = ["-W", "64", "-H", "64", "--steps", "2"]
CMD_PROMPT = "a green triangle at the bottom right on a white background"
PLAIN = "a red circle at the top left on a white background"
BLUE = "a blue square at the center on a black background"
YELLOW = "a yellow diamond at the center on a gray background"


def _write(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pixels(path):
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _ours(path) -> dict:
    meta = read_png_metadata(path)
    return {"parameters": meta["parameters"], **meta["minsdxl"]}


def _init_image(folder):
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "init.png")


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the model-hash cache, out of the home folder


# the lines and, for each image they make, the plain run's flags that make it too
LINES = (
    "# shapes for the tiny model",
    "",
    PLAIN,  # a plain line: the prompt, over -p; the rest from the command line
    f'--prompt "{BLUE}" --negative-prompt blurry --steps 3 --cfg 6 --seed 3 -W 72 -H 64 --sampler dpmpp_2m',
    "   # an indented comment",
    # A1111's spellings; the command line's prompt
    '--negative_prompt green --cfg_scale=4 --sampler_name "Euler a" --batch_size 2 --steps 1 --width 64 --height 80 '
    "--seed 11",
    f"--prompt '{YELLOW}' -i init.png --strength 0.6",  # img2img, the line's own (relative) image
)
COMMAND = ["-p", CMD_PROMPT, *SIZE, "-s", "7", "-q"]
EXPECTED = {  # output name: the plain run's flags
    "00000-7.png": ["-p", PLAIN, *SIZE, "-s", "7"],
    "00001-3.png": ["-p", BLUE, "-n", "blurry", "--steps", "3", "--cfg", "6", "-s", "3", "-W", "72", "-H", "64"]
    + ["--sampler", "dpmpp_2m"],
    "00002-11.png": ["-p", CMD_PROMPT, "-n", "green", "--cfg", "4", "--sampler", "Euler a", "-b", "2"]
    + ["--steps", "1", "-W", "64", "-H", "80", "-s", "11"],
    "00004-7.png": ["-p", YELLOW, *SIZE, "-s", "7", "-i", "init.png", "--strength", "0.6"],
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The prompts file's run and the plain runs, in one folder: {"dir", "out", "ref"}."""
    folder = tmp_path_factory.mktemp("prompts_file")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        _init_image(folder)
        _write(folder / "prompts.txt", *LINES)
        assert main(["--prompts-file", "prompts.txt", *COMMAND, "--outdir", "out"]) == 0
        for k, argv in enumerate(EXPECTED.values()):
            assert main([*argv, "-o", f"ref{k}.png", "-q"]) == 0
    return folder


def test_lines_make_the_images_and_metadata_of_plain_runs(made):
    assert sorted(os.listdir(made / "out")) == ["00000-7.png", "00001-3.png", "00002-11.png", "00003-12.png"] + [
        "00004-7.png"
    ]
    for k, name in enumerate(EXPECTED):
        # one image of a line = the plain run's; -b 2 in the line: seeds 11, 12 as "ref2-0", "ref2-1"
        refs = [f"ref{k}.png"] if name != "00002-11.png" else ["ref2-0.png", "ref2-1.png"]
        outs = [name] if name != "00002-11.png" else ["00002-11.png", "00003-12.png"]
        for out, ref in zip(outs, refs):
            assert np.array_equal(_pixels(made / "out" / out), _pixels(made / ref)), out
            assert _ours(made / "out" / out) == _ours(made / ref), out  # its own parameters, all of them
    info = read_png_metadata(made / "out" / "00000-7.png")["infotext"]
    assert info["Prompt"] == PLAIN and info["Seed"] == "7"  # the plain line wins over -p
    info = read_png_metadata(made / "out" / "00003-12.png")["infotext"]
    assert (info["Prompt"], info["Negative prompt"], info["Sampler"]) == (CMD_PROMPT, "green", "Euler a")
    assert (info["CFG scale"], info["Size"], info["Steps"]) == ("4.0", "64x80", "1")
    meta = read_png_metadata(made / "out" / "00004-7.png")["minsdxl"]
    assert meta["args"]["init_image"] == str(made / "init.png") and meta["mode"] == "img2img"


@pytest.mark.parametrize("name", ["00001-3.png", "00003-12.png", "00004-7.png"])
def test_from_png_makes_a_lines_image_again(made, tmp_path, name):
    again = tmp_path / "again.png"
    assert main(["--from-png", str(made / "out" / name), "-o", str(again), "-q"]) == 0  # from another folder
    assert np.array_equal(_pixels(again), _pixels(made / "out" / name))
    assert read_png_metadata(again)["minsdxl"]["args"] == read_png_metadata(made / "out" / name)["minsdxl"]["args"]


def test_seeds_per_line_and_numbering_over_the_file(tmp_path, capsys):
    """No seed anywhere: each line draws its own (reported); --seed on a line is that line's; -b 2 gives every
    line seed, seed + 1; the counter runs on over the file."""
    _write(tmp_path / "p.txt", PLAIN, "--seed 5", BLUE)
    out = tmp_path / "out"
    assert main(["--prompts-file", str(tmp_path / "p.txt"), "-W", "64", "-H", "64", "--steps", "1", "-b", "2"]
                + ["--outdir", str(out), "-q"]) == 0  # fmt: skip
    names = sorted(os.listdir(out))
    seeds = [int(n.removesuffix(".png").split("-")[1]) for n in names]
    assert [int(n.split("-")[0]) for n in names] == list(range(6))
    assert seeds[0] + 1 == seeds[1] and seeds[2:4] == [5, 6] and seeds[4] + 1 == seeds[5]
    assert seeds[0] != seeds[4]  # two draws (equal once in 2**32)
    printed = capsys.readouterr().out
    assert all(f"(seed {s})" in printed for s in seeds)
    prompts = [read_png_metadata(out / n)["infotext"]["Prompt"] for n in names]
    assert prompts == [PLAIN, PLAIN, "", "", BLUE, BLUE]  # the command line gave no -p


def test_output_name_with_a_prompts_file(tmp_path, capsys):
    """-o as with -b: "-{index}" added, the index running over the whole file; a name the lines share fails."""
    _write(tmp_path / "p.txt", PLAIN, "--seed 3 --steps 1")
    argv = ["--prompts-file", str(tmp_path / "p.txt"), *SIZE, "-s", "2", "-q"]
    assert main([*argv, "-o", str(tmp_path / "shot.png")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["cache", "p.txt", "shot-0.png", "shot-1.png"]
    assert read_png_metadata(tmp_path / "shot-1.png")["infotext"]["Seed"] == "3"
    _write(tmp_path / "same.txt", PLAIN, BLUE)  # both with seed 2
    argv = ["--prompts-file", str(tmp_path / "same.txt"), *SIZE, "-s", "2", "-q", "-o", str(tmp_path / "{seed}.png")]
    assert main(argv) == 1
    assert "names the same file for several images; add {index}" in capsys.readouterr().err
    assert not (tmp_path / "2.png").exists()


REFUSED = [
    ("--model tiny", "--model"),
    ("--output x.png", "--output"),
    ("--outdir elsewhere", "--outdir"),
    ("--lora style.safetensors:0.5", "--lora"),
    ("--lora-dir loras", "--lora-dir"),
    ("--embedding e.safetensors", "--embedding"),
    ("--vae vae", "--vae"),
    ("--controlnet cn", "--controlnet"),
    ("--t2i-adapter ad", "--t2i-adapter"),
    ("--ip-adapter ip.safetensors", "--ip-adapter"),
    ("--refiner refiner", "--refiner"),
    ("--dtype fp16", "--dtype"),
    ("--device cpu", "--device"),
    ("--offload", "--offload"),
    ("--compile", "--compile"),
    ("--freeu 0.9,0.2,1.3,1.4", "--freeu"),
    ("--hires-upscaler 4x-UltraSharp", "--hires-upscaler"),  # an upscaler model (Lanczos etc. are allowed)
    ("--from-png x.png", "--from-png"),
    ("--from-file other.txt", "--from-file"),
    ("--steps 2 --overwrite", "--overwrite"),
]


@pytest.mark.parametrize("line,flag", REFUSED, ids=[f for _, f in REFUSED])
def test_model_and_run_flags_are_refused_on_a_line(tmp_path, monkeypatch, capsys, line, flag):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "p.txt", PLAIN, "# fine so far", line, BLUE)
    assert main(["--prompts-file", "p.txt", *SIZE, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minsdxl: error: p.txt:3: "), err
    assert flag in err.removeprefix("minsdxl: error: p.txt:3: ").split(" is not a per-image flag")[0].split("/")
    assert "give it on the command line" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["p.txt"]  # nothing loaded, nothing written


BAD_LAST_LINES = {  # line 7 of a file whose first six are fine: (line, what the message says)
    "unknown_flag": ("--steps 2 --colour red", "unrecognized arguments: --colour red"),
    "bad_value": ("--steps two", "argument --steps: invalid int value: 'two'"),
    "unclosed_quote": ('--prompt "a cat', "No closing quotation"),
    "size": ("--width 100", "-W/--width 100 is not a positive multiple of 8"),
    "strength_in_text2img": ("--strength 0.5", "--strength applies to img2img and inpaint"),
    "unknown_sampler": ("--sampler_name 'Heun++'", "unknown scheduler 'Heun++'"),
    "missing_image": ("--init-image missing.png", "cannot read the init image missing.png"),
    "short_flags": ("-s 3 -W 64", "only a line starting with -- holds flags (any other is a prompt): write --seed"),
    "lora_tag_without_dir": (f"{PLAIN} <lora:style:0.8>", "the prompt has <lora:style:0.8>: pass --lora-dir DIR"),
    "needs_the_model": ("--init-image init.png --image-cfg 1.5", "--image-cfg applies to InstructPix2Pix models"),
}


@pytest.mark.parametrize("name", BAD_LAST_LINES)
def test_a_bad_line_late_in_the_file_writes_nothing(tmp_path, monkeypatch, capsys, name):
    """Every line is read and checked before the first image (the model's own checks right after loading it):
    exit status 2, the file and line named, no image written."""
    monkeypatch.chdir(tmp_path)
    _init_image(tmp_path)
    line, message = BAD_LAST_LINES[name]
    _write(tmp_path / "p.txt", PLAIN, "--seed 3", "", "# six fine lines", f"--prompt '{BLUE}'", "--steps 1", line)
    assert main(["--prompts-file", "p.txt", *SIZE, "-q", "--outdir", "out"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("minsdxl: error: p.txt:7: ") and message in captured.err, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_file_level_errors(tmp_path, capsys):
    argv = ["--prompts-file", str(tmp_path / "p.txt"), *SIZE, "-q", "--outdir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--prompts-file" in (err := capsys.readouterr().err) and "cannot read it (No such file" in err
    _write(tmp_path / "p.txt", "# only a comment", "", "  ")
    assert main(argv) == 2
    assert "holds no prompt, only blank lines and # comments" in capsys.readouterr().err
    (tmp_path / "p.txt").write_bytes(b"caf\xe9\n")  # Latin-1
    assert main(argv) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_embeddings_named_by_lines_load_once_for_all(tmp_path, monkeypatch):
    """--embedding-dir: the embeddings any line names load for the whole run (as A1111 loads its folder); a
    line's image is still the plain run's, and its metadata names what was loaded, so --from-png replays it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emb").mkdir()
    for seed, name in enumerate(("mystyle", "otherstyle")):
        g = torch.Generator().manual_seed(seed)
        vectors = {"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 48, generator=g)}
        save_safetensors(vectors, tmp_path / "emb" / f"{name}.safetensors")
    first, second = f"{PLAIN}, mystyle", f"{BLUE}, otherstyle"
    _write(tmp_path / "p.txt", first, second)
    common = [*SIZE, "-s", "2", "--embedding-dir", "emb", "-q"]
    assert main(["--prompts-file", "p.txt", *common, "--outdir", "out"]) == 0
    for k, prompt in enumerate((first, second)):
        assert main(["-p", prompt, *common, "-o", f"ref{k}.png"]) == 0
        assert np.array_equal(_pixels(tmp_path / "out" / f"0000{k}-2.png"), _pixels(tmp_path / f"ref{k}.png"))
    assert main(["-p", second, *SIZE, "-s", "2", "-q", "-o", "plain.png"]) == 0
    assert not np.array_equal(_pixels(tmp_path / "plain.png"), _pixels(tmp_path / "ref1.png"))  # it matters
    info = read_png_metadata(tmp_path / "out" / "00001-2.png")["infotext"]
    assert [h.split(":")[0] for h in info["TI hashes"].split(", ")] == ["mystyle", "otherstyle"]
    assert main(["--from-png", "out/00001-2.png", "-o", "again.png", "-q"]) == 0
    assert np.array_equal(_pixels(tmp_path / "again.png"), _pixels(tmp_path / "ref1.png"))


def test_standard_input(tmp_path):
    """`--from-file -`: the lines come from standard input (the real command, a subprocess)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS=str(torch.get_num_threads()))
    text = f"{PLAIN}\n--seed 4 --prompt '{BLUE}'\n"
    r = subprocess.run([sys.executable, "-m", "minsdxl", "--from-file", "-", *SIZE, "-s", "1", "-q", "--outdir", "out"],
                       input=text, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["saved out/00000-1.png (seed 1)", "saved out/00001-4.png (seed 4)"]
    for k, (prompt, seed) in enumerate(((PLAIN, "1"), (BLUE, "4"))):
        assert main(["-p", prompt, *SIZE, "-s", seed, "-q", "-o", str(tmp_path / f"ref{k}.png")]) == 0
        assert np.array_equal(_pixels(tmp_path / "out" / f"0000{k}-{seed}.png"), _pixels(tmp_path / f"ref{k}.png"))
    bad = subprocess.run([sys.executable, "-m", "minsdxl", "--from-file", "-", *SIZE, "--outdir", "out2"],
                         input=f"{PLAIN}\n--model x\n", cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "minsdxl: error: <stdin>:2: --model is not a per-image flag" in bad.stderr
    assert not (tmp_path / "out2").exists()


def test_help_describes_the_flag():
    text = build_parser()[1]["generate"].format_help()
    assert "--prompts-file FILE, --from-file FILE" in text and "--cfg_scale" in text


def test_a_line_may_pick_a_resizing_hires_upscaler(tmp_path):
    """A1111's latent and PIL hires upscalers load nothing: a line may choose one (an upscaler model may not)."""
    from minsdxl.cli import HIRES_UPSCALERS, _read_prompts_file, build_parser

    _write(tmp_path / "p.txt", "--hires-scale 1.5 --hires-upscaler Lanczos", "--hires-upscaler 'Latent (bicubic)'")
    lines = _read_prompts_file(str(tmp_path / "p.txt"), build_parser()[1]["generate"])
    assert [given["hires_upscaler"] for _, given in lines] == ["Lanczos", "Latent (bicubic)"]
    assert {"Lanczos", "Latent (bicubic)"} <= set(HIRES_UPSCALERS)


def test_each_line_has_its_own_loras(tmp_path, monkeypatch):
    """<lora:NAME:W> tags per line (and --lora for all): every file loads once, and each line's image is the
    image a run of that line alone makes (the adapters set to that line's, the weights recomputed exactly)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loras").mkdir()
    model = minsdxl.load("tiny")
    layers = lora_layers(model, only=lambda n: "attn" in n or "mlp" in n)
    for seed, name in ((1, "style"), (2, "detail")):
        save_safetensors(
            kohya_lora(model, random_lora_pairs(layers, seed=seed), alpha=2.0), f"loras/{name}.safetensors"
        )
    lines = (f"{PLAIN} <lora:style:0.8>", f"--prompt '{BLUE} <lora:detail:0.5> <lora:style:0.3>'", YELLOW)
    _write(tmp_path / "p.txt", *lines)
    common = [*SIZE, "-s", "4", "-q", "--lora-dir", "loras"]
    assert main(["--prompts-file", "p.txt", *common, "--outdir", "out", "--lora", "loras/detail.safetensors:0.2"]) == 0
    singles = (f"{PLAIN} <lora:style:0.8>", f"{BLUE} <lora:detail:0.5> <lora:style:0.3>", YELLOW)
    for k, prompt in enumerate(singles):
        assert main(["-p", prompt, *common, "--lora", "loras/detail.safetensors:0.2", "-o", f"single{k}.png"]) == 0
        made = sorted(os.listdir("out"))[k]
        assert np.array_equal(_pixels(tmp_path / "out" / made), _pixels(tmp_path / f"single{k}.png")), (k, made)
        loras = {(Path(x["path"]).name, x["scale"]) for x in _ours(tmp_path / "out" / made)["loras"]}
        assert loras == {(Path(x["path"]).name, x["scale"]) for x in _ours(tmp_path / f"single{k}.png")["loras"]}
    again = tmp_path / "again.png"  # the second line's image, replayed from its metadata
    assert main(["--from-png", str(tmp_path / "out" / sorted(os.listdir("out"))[1]), "-q", "-o", str(again)]) == 0
    assert np.array_equal(_pixels(again), _pixels(tmp_path / "single1.png"))
