"""Random draws in diffusers' order and place (diffusers.utils.torch_utils.randn_tensor).

The same seed reproduces diffusers' image only if noise is drawn on the generator's device, in the
target dtype, one tensor per generator when a list is given, and then moved.
"""

import torch


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """= diffusers randn_tensor: draw on the generator's device, then move to `device`."""
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
            shape1 = (1,) + tuple(shape[1:])
            return torch.cat([randn(shape1, g, device, dtype) for g in generator], dim=0)
    rand_device = generator.device if generator is not None else device
    if rand_device.type != device.type and rand_device.type != "cpu":
        raise ValueError(f"cannot draw on a {rand_device.type} generator for a {device.type} tensor")
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)
