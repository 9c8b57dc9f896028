"""minsdxl.compile on CPU: fullgraph torch.compile of the UNet and VAE decoder equals eager, and
later steps and calls reuse the compiled code (a recompile is an error here)."""

import numpy as np
import PIL.Image
import pytest
import torch
import torch._dynamo
from sdxl_testing import rel_err

import minsdxl


def test_compile_matches_eager_without_recompiles(tiny_base):
    kw = dict(prompt="a red circle", height=64, width=64, output_type="np", progress=False)
    eager = minsdxl.load(tiny_base[1])
    model = minsdxl.compile(minsdxl.load(tiny_base[1]))  # fullgraph=True: a graph break fails here
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # not cleared by reset()
    try:
        model_out = minsdxl.text2img(model, **kw, num_inference_steps=1, seed=0)  # compiles
        # one graph each: both text encoders, the UNet and the VAE decoder
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 4
        assert (
            rel_err(
                torch.from_numpy(model_out),
                torch.from_numpy(minsdxl.text2img(eager, **kw, num_inference_steps=1, seed=0)),
            )
            <= 1e-5
        )
        with torch._dynamo.config.patch(error_on_recompile=True):
            # more steps (new timesteps), another prompt and seed: all reuse the compiled graphs
            got = minsdxl.text2img(model, **{**kw, "prompt": "a blue square"}, num_inference_steps=3, seed=1)
        ref = minsdxl.text2img(eager, **{**kw, "prompt": "a blue square"}, num_inference_steps=3, seed=1)
        # 1e-5 relative: inductor fuses and reorders fp32 ops; a wrong graph is off by far more
        assert rel_err(torch.from_numpy(got), torch.from_numpy(ref)) <= 1e-5
    finally:
        torch._dynamo.reset()


def test_attention_per_model(tiny_base):
    # load(attention=...) sets the backend of that model's attention layers only, and "math" (fp32
    # softmax(q k^T) v) gives SDPA's image; the process default is untouched
    kw = dict(prompt="a red circle", height=64, width=64, output_type="pt", progress=False, num_inference_steps=2)
    default = minsdxl.load(tiny_base[1])
    math = minsdxl.load(tiny_base[1], attention="math")
    parts = (math.unet, math.vae, math.text_encoder, math.text_encoder_2)
    layers = [m for c in parts for m in c.modules() if hasattr(m, "attention_backend")]
    assert {type(m).__name__ for m in layers} == {"Attention", "VAEAttention", "CLIPAttention"}
    assert layers and all(m.attention_backend == "math" for m in layers)
    assert all(m.attention_backend is None for m in default.unet.modules() if hasattr(m, "attention_backend"))
    assert minsdxl.attention.get_backend() == "sdpa"
    got, ref = minsdxl.text2img(math, **kw, seed=0), minsdxl.text2img(default, **kw, seed=0)
    assert rel_err(got, ref) <= 1e-5  # same maths, other summation order
    with pytest.raises(ValueError, match=r"load\(attention=\.\.\.\) got 'flash'; choose one of sdpa, math, triton"):
        minsdxl.load(tiny_base[1], attention="flash")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        minsdxl.set_attention("flash", default)


def test_load_compile_and_cuda_graph_steps(tiny_base, monkeypatch):
    # load(compile=True) = minsdxl.compile(model); with CUDA graphs (reduce-overhead) the sampler marks
    # each step for torch (on the CPU inductor skips the graphs, the marking must still run)
    model = minsdxl.load(tiny_base[1], compile=True)
    assert hasattr(model.unet, "_compiled_call_impl") and model.unet._compiled_call_impl is not None
    assert not model.cuda_graphs
    eager = minsdxl.load(tiny_base[1])
    eager.cuda_graphs = True
    kw = dict(prompt="a red circle", height=64, width=64, output_type="pt", progress=False, num_inference_steps=2)
    ref = minsdxl.text2img(minsdxl.load(tiny_base[1]), **kw, seed=0)
    assert torch.equal(minsdxl.text2img(eager, **kw, seed=0), ref)
    # an explicit attention= survives compile=True (compile's "auto" would pick Triton on CUDA)
    seen = []
    monkeypatch.setattr(minsdxl.speed, "compile", lambda model, **kw: seen.append(kw) or model)
    minsdxl.load(tiny_base[1], attention="math", compile=True)
    minsdxl.load(tiny_base[1], compile=True)
    assert seen == [{"attention_backend": "math"}, {"attention_backend": "auto"}]


def test_compiled_text_encoders_match_eager(tiny_base):
    # encode_prompt through the compiled encoders: the same 4-tuple as eager within inductor's fp32
    # reordering; clip_skip (a Python int) is a new graph, not a wrong one; text_encoders=False leaves
    # the encoders eager
    eager = minsdxl.load(tiny_base[1])
    model = minsdxl.compile(minsdxl.load(tiny_base[1]))
    torch._dynamo.reset()
    try:
        for clip_skip in (None, 1):
            kw = dict(prompt=["a red circle", "a blue square"], negative_prompt="green", clip_skip=clip_skip)
            got, ref = minsdxl.encode_prompt(model, **kw), minsdxl.encode_prompt(eager, **kw)
            for g, r in zip(got, ref):
                assert g.shape == r.shape and rel_err(g, r) <= 1e-5
        assert not torch.equal(got[0][0], got[0][1])  # two prompts, two different embeddings
    finally:
        torch._dynamo.reset()
    kept = minsdxl.compile(minsdxl.load(tiny_base[1]), text_encoders=False)
    assert kept.unet._compiled_call_impl is not None
    assert kept.text_encoder._compiled_call_impl is None and kept.text_encoder_2._compiled_call_impl is None
    assert model.text_encoder_2._compiled_call_impl is not None


SIZE = dict(height=64, width=64)


class _GraphBuffers:
    """CUDA graphs' output rule, simulated on the CPU: each compiled part writes its outputs into its own
    static buffers, which a replay or a new graph step (cudagraph_mark_step_begin) may overwrite. Here every
    earlier output is filled with NaN at each step and at each compiled call (stricter than torch, whose
    graphs of one step keep each other's outputs). Code that uses an output after that (the compiled text
    encoders' pooled embedding did, found on an H100, where torch raises) gets NaN instead of eager's."""

    def __init__(self, models, monkeypatch):
        self.events, self.live, wrapped = [], [], set()
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", self.step)
        for model in models:
            parts = {name: getattr(model, name, None) for name in ("unet", "text_encoder", "text_encoder_2")}
            for name, module in {**parts, "vae.decoder": model.vae.decoder}.items():
                if module is not None and id(module) not in wrapped:  # a refiner shares the base's te2 and VAE
                    wrapped.add(id(module))
                    self.wrap(module, name, monkeypatch)
            model.cuda_graphs = True

    def step(self):
        self.events.append("step")
        self.poison()

    def poison(self):
        for b in self.live:
            b.fill_(float("nan"))

    def wrap(self, module, name, monkeypatch):
        forward = module.forward

        def replay(*args, **kwargs):
            self.events.append(name)
            self.poison()
            outs = forward(*args, **kwargs)
            single = torch.is_tensor(outs)
            statics = [None if o is None else o.detach().clone() for o in ((outs,) if single else outs)]
            self.live += [b for b in statics if b is not None]
            return statics[0] if single else tuple(statics)

        monkeypatch.setattr(module, "forward", replay)


def test_cuda_graph_outputs_are_used_before_they_are_overwritten(tiny_base, tiny_refiner, tiny_inpaint, monkeypatch):
    # every pipeline with model.cuda_graphs set (as minsdxl.compile sets it on CUDA) under the simulated
    # buffer reuse gives eager's output exactly: the sampler marks each step and the prompt encoder each call
    # and copies its outputs (text2img with an encoded negative, img2img, inpaint, the base -> refiner handoff)
    kw = dict(prompt="a red circle", negative_prompt="green", progress=False, seed=0)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:40] = 255
    runs = {
        "text2img": (
            tiny_base,
            None,
            lambda m, r: minsdxl.text2img(m, **kw, **SIZE, num_inference_steps=3, output_type="pt"),
        ),
        "img2img": (
            tiny_base,
            None,
            lambda m, r: minsdxl.img2img(m, **kw, image=image, strength=0.6, output_type="pt"),
        ),
        "inpaint": (
            tiny_inpaint,
            None,
            lambda m, r: minsdxl.inpaint(m, **kw, image=image, mask_image=PIL.Image.fromarray(mask), output_type="pt"),
        ),
        "handoff": (
            tiny_base,
            tiny_refiner,
            lambda m, r: minsdxl.img2img(
                r,
                **kw,
                image=minsdxl.text2img(m, **kw, **SIZE, num_inference_steps=4, denoising_end=0.5, output_type="latent"),
                num_inference_steps=4,
                denoising_start=0.5,
                output_type="pt",
            ),
        ),
    }
    for name, (base, refiner, run) in runs.items():
        eager = minsdxl.load(base[1])
        ref = run(eager, refiner and minsdxl.load(refiner[1], share=eager))
        with monkeypatch.context() as mp:
            model = minsdxl.load(base[1])
            ref_model = refiner and minsdxl.load(refiner[1], share=model)
            graphs = _GraphBuffers([m for m in (model, ref_model) if m is not None], mp)
            got = run(model, ref_model)
        assert torch.isfinite(got).all() and torch.equal(got, ref), name
        assert graphs.events[:4] == ["step", "text_encoder", "step", "text_encoder_2"], name
        # each UNet and text-encoder call starts a graph step (the VAE decoder follows the last UNet step's)
        calls = [i for i, e in enumerate(graphs.events) if e in ("unet", "text_encoder", "text_encoder_2")]
        assert calls and all(graphs.events[i - 1] == "step" for i in calls), (name, graphs.events)
