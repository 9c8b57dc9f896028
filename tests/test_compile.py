"""minsdxl.compile on CPU: fullgraph torch.compile of the UNet and VAE decoder equals eager, and
later steps and calls reuse the compiled code (a recompile is an error here)."""

import torch
import torch._dynamo
from sdxl_testing import rel_err

import minsdxl


def test_compile_matches_eager_without_recompiles(tiny_base):
    kw = dict(prompt="a red circle", height=64, width=64, output_type="np", progress=False)
    eager = minsdxl.load(tiny_base[1])
    model = minsdxl.compile(minsdxl.load(tiny_base[1]))  # fullgraph=True: a graph break fails here
    torch._dynamo.reset()
    try:
        first = model_out = minsdxl.text2img(model, **kw, num_inference_steps=1, seed=0)  # compiles
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
        assert not (first == got).all()
    finally:
        torch._dynamo.reset()
