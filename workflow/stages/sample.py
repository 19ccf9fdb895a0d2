"""Sample stage: the sample set that FID scores, and the grid for people.

    python -m workflow sample [--params params.yaml]

Loads params.paths.trained (EMA weights) and samples fid.num_samples images with sample.sampler
(ddpm | ddim with sample.eta | dpmsolver++) in sample.num_inference_steps, sample.batch_size at a
time (workflow.models.sampling: bf16 + channels_last on a GPU, float32 on CPU, optional torch.compile).
Each batch's PNGs go straight into the output folder (written under a temporary name, renamed to
params.paths.samples when complete, with samples.json holding the timing), so memory does not grow
with the number of samples; only the first grid_size^2 images are kept, for params.paths.grid.
Image i is a function of (seed, i): the samples do not depend on sample.batch_size, a smaller
set is the start of a larger one, and the grid is the start of the sample set.
The set is published whole, and a pipeline whose files no longer match the manifest train
wrote (truncated, altered) is refused, naming the file; weights are read from safetensors only.
"""

from __future__ import annotations

from workflow.core.config import Params
from workflow.core.runtime import Runtime
from workflow.formats.pipeline import load_unet
from workflow.formats.png import write_grid
from workflow.formats.sample_set import write_sample_set
from workflow.models.sampling import sample_batches


def run(params: Params) -> dict:
    s = params.sample
    runtime = Runtime.detect()
    device = runtime.device
    unet, scheduler_config = load_unet(params.paths.trained, device)
    batches = sample_batches(unet, scheduler_config, s, params.seed, params.fid.num_samples, device)
    settings = {
        "sampler": s.sampler,
        "num_inference_steps": s.num_inference_steps,
        "eta": s.eta,
        "device": device.type,
        "dtype": str(runtime.sampling_dtype(s.mixed_precision)).removeprefix("torch."),
        "compile": s.compile,
    }
    grid_images, record = write_sample_set(batches, params.paths.samples, s.grid_size**2, settings)
    write_grid(grid_images, s.grid_size, params.paths.grid)
    return record


def headline(record: dict, params: Params) -> str:
    return (
        f"sampled {record['count']} images with {record['sampler']}-{record['num_inference_steps']} "
        f"in {record['seconds']:.1f} s ({record['images_per_second']:.1f} images/s)"
    )
