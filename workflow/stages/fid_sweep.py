"""Stage fid_sweep: FID and KID against the number of sampling steps and against the guidance scale,
two DVC plots that the report shows too.

    python -m workflow fid_sweep [--params params.yaml]
    dvc exp run -S 'fid.steps_sweep=[10,25,50]' && dvc plots show     # "FID against sampling steps"
    dvc exp run -S 'fid.guidance_sweep=[1,2,4]'                        # class-conditional: FID against w

For each n in fid.steps_sweep: samples fid.num_samples images from params.paths.trained with
sample.sampler (and sample.eta, timestep_spacing, batch size, precision, compile, guidance) in n steps,
which are exactly the images the sample stage makes with sample.num_inference_steps = n, and scores them against
params.paths.fid_ref as evaluate does. For each w in fid.guidance_sweep, the same with
sample.guidance_scale = w (class-conditional and text-to-image models; a text-to-image fine-tune samples
through StableDiffusionPipeline from the sample stage's prompts, workflow.formats.captions.fid_prompts).
The images stay in memory, batch by batch: PNG is lossless, so their
features equal those of the written samples. Writes params.paths.fid_steps and params.paths.fid_guidance,
CSVs of the swept value, fid, kid, seconds (sampling and scoring of that point).

Off by default: with both sweeps empty the stage writes the headers alone and loads nothing, so the
CPU default run pays nothing for it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from workflow.core.config import Params
from workflow.formats.fid_sweeps import write_sweep
from workflow.formats.reference_stats import check_weights, load_reference

SWEEPS = {  # params.fid key -> (the sample.* setting it varies, the paths key of its CSV)
    "steps_sweep": ("num_inference_steps", "fid_steps"),
    "guidance_sweep": ("guidance_scale", "fid_guidance"),
}


@dataclasses.dataclass
class Scorer:
    """What every point of a sweep shares: the trained UNet, the sample labels (or prompts, and the text
    pipeline), Inception, the reference."""

    params: Params
    unet: object
    scheduler_config: object
    labels: np.ndarray | None
    extractor: object
    reference: dict
    prompts: list | None = None
    text_encoders: object | None = None

    @classmethod
    def load(cls, params: Params) -> Scorer:
        # torch, diffusers and the FID maths load here, not with the module: a run without sweeps (the
        # default) then costs a fraction of a second instead of seconds of imports
        from workflow.core.runtime import default_device
        from workflow.formats.labels import load_labels
        from workflow.formats.pipeline import load_class_names, load_unet
        from workflow.models.inception import load_extractor
        from workflow.models.sampling import sample_labels

        extractor, info = load_extractor(params.fid)  # first: it refuses a batch over `fid.max_activation_gib`
        reference = load_reference(params.paths.fid_ref)
        check_weights(reference, info, params.paths.fid_ref)
        if params.model.pretrained is not None:
            from workflow.formats.captions import fid_prompts
            from workflow.formats.pipeline import load_finetuned_unet

            unet = load_finetuned_unet(params.paths.trained, params.paths.base_model, default_device())
            prompts, _ = fid_prompts(params)
            return cls(params, unet, None, None, extractor, reference, prompts)
        unet, scheduler_config = load_unet(params.paths.trained, default_device())
        names = load_class_names(params.paths.trained)
        labels = sample_labels(params, names, load_labels(params.paths.labels)) if names else None
        return cls(params, unet, scheduler_config, labels, extractor, reference)

    def point(self, setting: str, value) -> dict:
        """FID/KID of the sample set made with sample.<setting> = value; features taken batch by batch."""
        from workflow.core.runtime import feature_workers
        from workflow.maths import fid
        from workflow.models.sampling import sample_batches

        p, device = self.params, self.unet.device
        settings = dataclasses.replace(p.sample, **{setting: value})
        started, feats = time.perf_counter(), []
        if self.prompts is not None:
            from workflow.models.text_sampling import prompt_batches, text_pipeline

            pipe = text_pipeline(p.paths.base_model, self.unet, settings, device, self.encoders())
            batches = prompt_batches(pipe, self.prompts, settings, p.seed, p.data.resolution)
        else:
            batches = sample_batches(
                self.unet, self.scheduler_config, settings, p.seed, p.fid.num_samples, device, labels=self.labels
            )
        for _, images in batches:
            chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
            feats.append(fid.features(chw, self.extractor, p.fid.batch_size, device, feature_workers(device)))
        scores = fid.score(np.concatenate(feats), self.reference, p.seed, with_precision_recall=False)
        return {setting: value, "fid": scores["fid"], "kid": scores["kid"], "seconds": time.perf_counter() - started}

    def encoders(self):
        """The pretrained VAE and text encoder, loaded once for every point."""
        from workflow.models.latent import load_encoders

        if self.text_encoders is None:
            self.text_encoders = load_encoders(self.params.paths.base_model, self.unet.device)
        return self.text_encoders


def run(params: Params) -> dict:
    """Both sweeps, in their params' order; nothing is loaded when both are empty."""
    wanted = {key: getattr(params.fid, key) for key in SWEEPS}
    scorer = Scorer.load(params) if any(wanted.values()) else None
    summary = {}
    for key, values in wanted.items():
        setting, path_key = SWEEPS[key]
        rows = [scorer.point(setting, value) for value in values]
        write_sweep(getattr(params.paths, path_key), setting, rows)
        summary[key] = rows
    return summary


def headline(summary: dict, params: Params) -> str:
    parts = []
    for key, rows in summary.items():
        setting = SWEEPS[key][0]
        points = ", ".join(f"{setting} {r[setting]:g}: {r['fid']:.2f}" for r in rows)
        parts.append(points or f"none (fid.{key} is empty)")
    return f"fid_sweep ({params.sample.sampler}): FID {'; '.join(parts)} -> {params.paths.fid_steps}, " + (
        f"{params.paths.fid_guidance}"
    )
