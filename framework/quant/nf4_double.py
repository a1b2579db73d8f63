"""Double quantization of NF4 absmax values, bit-exact with bitsandbytes (`compress_statistics=True`).

bitsandbytes subtracts the mean of the fp32 absmax vector, then 8-bit blockwise-quantizes the centred values (blocks of
256) with its signed "dynamic" code (`create_dynamic_map`) and the binary search of its `dQuantize` CUDA routine.
Dequantizing gives code8[q] * absmax2[block] + offset in fp32. Costs 8 + 32/256 bits per absmax instead of 32.
"""

from __future__ import annotations

import torch

DQ_BLOCK = 256  # bitsandbytes' block size for the second-level quantization

_CODE: dict[torch.device, torch.Tensor] = {}


def dynamic_map_values(max_exponent_bits: int = 7, total_bits: int = 8) -> list[float]:
    """bitsandbytes' signed dynamic-exponent 8-bit code: per decade 10^-6..10^0 the midpoints of a linear grid on
    [0.1, 1] (grid sizes 2, 3, 5, 9, 17, 33, 65), both signs, plus 0 and 1; sorted (256 values)."""
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        grid = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return sorted(values)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry fp32 code table on `device` (cached)."""
    device = torch.device(device)
    if device not in _CODE:
        _CODE[device] = torch.tensor(dynamic_map_values(), dtype=torch.float32, device=device)
    return _CODE[device]


def search_code8(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Vectorised copy of bitsandbytes' `dQuantize<0>`: a 7-step binary search from index 127 followed by a midpoint
    test against the last bracketing neighbour. Returns int64 indices into `code` (sorted, 256 entries)."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lo_piv = torch.zeros_like(pivot)
    up_piv = torch.full_like(pivot, 255)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        right = x > val
        lo_piv = torch.where(right, pivot, lo_piv)
        lower = torch.where(right, val, lower)
        up_piv = torch.where(right, up_piv, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(up_piv == 255, code[255], upper)
    lower = torch.where(lo_piv == 0, code[0], lower)
    right = x > val
    up_choice = torch.where(x > (upper + val) * 0.5, up_piv, pivot)
    lo_choice = torch.where(x < (lower + val) * 0.5, lo_piv, pivot)
    return torch.where(right, up_choice, lo_choice)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """fp32 absmax [nb] -> (codes uint8 [nb], absmax2 fp32 [ceil(nb/256)], offset) as bitsandbytes stores them."""
    absmax = absmax.float().reshape(-1)
    offset = absmax.mean()
    centred = absmax - offset
    nb = centred.numel()
    nb2 = -(-nb // DQ_BLOCK)
    padded = torch.nn.functional.pad(centred, (0, nb2 * DQ_BLOCK - nb)).view(nb2, DQ_BLOCK)
    absmax2 = padded.abs().amax(dim=1)
    scaled = (padded * torch.reciprocal(absmax2).unsqueeze(1)).reshape(-1)[:nb]
    codes = search_code8(scaled, dynamic_code(absmax.device)).to(torch.uint8)
    return codes, absmax2, float(offset.item())


def dequantize_absmax(codes: torch.Tensor, absmax2: torch.Tensor, offset: float) -> torch.Tensor:
    """codes uint8 [nb] -> fp32 absmax: code8[q] * absmax2[block] + offset."""
    nb = codes.numel()
    vals = dynamic_code(codes.device)[codes.long()]
    scale = absmax2.float().repeat_interleave(DQ_BLOCK)[:nb]
    return vals * scale + torch.tensor(offset, dtype=torch.float32, device=codes.device)
