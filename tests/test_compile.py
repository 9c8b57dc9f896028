"""minsdxl.compile on CPU: fullgraph torch.compile of the UNet and VAE decoder equals eager, and
later steps and calls reuse the compiled code (a recompile is an error here)."""

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


def test_cuda_graph_text_encoders_outputs_are_copied(tiny_base, monkeypatch):
    # Under CUDA graphs each replay writes its outputs into the same static buffers, so the prompt's
    # pooled embedding (returned as is) was overwritten by the negative prompt's encoding: a GPU run
    # failed with "accessing tensor output of CUDAGraphs that has been overwritten". Simulated here:
    # encoders whose outputs live in one buffer per encoder; each call must start a new graph step
    # (cudagraph_mark_step_begin) and copy its outputs before the next call reuses the buffers.
    eager = minsdxl.load(tiny_base[1])
    model = minsdxl.load(tiny_base[1])
    model.cuda_graphs = True
    events = []
    for name in ("text_encoder", "text_encoder_2"):
        enc, buffers = getattr(model, name), {}

        def static_forward(*args, forward=enc.forward, buffers=buffers, name=name, **kw):
            events.append(name)
            outs = forward(*args, **kw)
            for i, o in enumerate(outs):
                if o is not None:
                    buffers.setdefault(i, torch.empty_like(o)).copy_(o)
            return tuple(None if o is None else buffers[i] for i, o in enumerate(outs))

        monkeypatch.setattr(enc, "forward", static_forward)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("step"))
    kw = dict(prompt="a red circle", negative_prompt="green")
    got, ref = minsdxl.encode_prompt(model, **kw), minsdxl.encode_prompt(eager, **kw)
    assert events == ["step", "text_encoder", "step", "text_encoder_2"] * 2
    for g, r in zip(got, ref):
        assert torch.equal(g, r)
    assert not torch.equal(got[2], got[3])  # the pooled prompt is not the negative's
