"""UNet passes per second of one sampling batch on a CPU, with a given number of torch threads:
    python unet_passes.py <trained pipeline>/unet <threads> <passes> [<batch>, default 250]
One untimed pass, then `passes` timed ones, without gradients, as a sampler calls the UNet. Run two at
once with 1 thread each against one with 2 threads (run.sh) to see what the quality matrix's
`--workers 2 --threads 1` gains over one 2-thread process on two cores."""

import sys
import time

import torch
from diffusers import UNet2DModel

folder, threads, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BATCH = int(sys.argv[4]) if len(sys.argv) > 4 else 250  # the quality matrix's --sample-batch
torch.set_num_threads(threads)
unet = UNet2DModel.from_pretrained(folder).eval()
size, channels = unet.config.sample_size, unet.config.in_channels
x = torch.randn(BATCH, channels, size, size)
t = torch.full((BATCH,), 500)
with torch.inference_mode():
    unet(x, t)
    start = time.perf_counter()
    for _ in range(passes):
        unet(x, t)
    seconds = time.perf_counter() - start
rate = passes * BATCH / seconds
print(f"batch {BATCH}, threads {threads}: {rate:.1f} img-steps/s ({seconds / passes:.2f} s a step)", flush=True)
