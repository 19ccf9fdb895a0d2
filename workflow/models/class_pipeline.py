"""A diffusers pipeline for the class-conditional UNets this project trains, with classifier-free guidance.

The package stage ships this file, as it is, as `pipeline.py` beside the weights, so the published
folder loads with diffusers alone (no import of this project):

    from diffusers import DiffusionPipeline
    pipeline = DiffusionPipeline.from_pretrained("models/pipeline", custom_pipeline="models/pipeline",
                                                 trust_remote_code=True)   # runs this file: read it first
    images = pipeline(class_labels=[7] * 8, guidance_scale=2.0, num_inference_steps=50).images

It samples as workflow/models/sampling.py does (the tests check they agree): one image per class label,
eps = eps_uncond + w (eps_cond - eps_uncond), where "no class" is the UNet's last class embedding; w = 1
is the conditional prediction alone and w = 0 the unconditional one, one UNet call each; any other w
evaluates both in one batched call. Hence it imports nothing but torch and diffusers.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_class_embeds - 1  # the last embedding row is "no class"

    def _predict(self, x: torch.Tensor, t, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        no_class = torch.full_like(labels, self.num_classes)
        # the latents stay float32 for the scheduler; a UNet loaded with torch_dtype=float16 needs its own dtype
        x = x.to(self.unet.dtype)
        if guidance_scale in (0.0, 1.0):
            chosen = labels if guidance_scale == 1.0 else no_class
            return self.unet(x, t, class_labels=chosen, return_dict=False)[0].float()
        both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, no_class]), return_dict=False)[0]
        eps_cond, eps_uncond = both.float().chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator=None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """One image per entry of `class_labels` (class indices; class_names.json beside the weights
        names them). `eta` applies to schedulers whose step takes it (DDIM)."""
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must be class indices in 0..{self.num_classes - 1}, got {class_labels}")
        config = self.unet.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        x = x * self.scheduler.init_noise_sigma
        # what this scheduler's step takes: DDIM takes eta; PNDM, LMS, Heun and UniPC take no generator
        accepted = inspect.signature(self.scheduler.step).parameters
        extra = {k: v for k, v in {"eta": eta, "generator": generator}.items() if k in accepted}
        for t in self.progress_bar(self.scheduler.timesteps):
            eps = self._predict(self.scheduler.scale_model_input(x, t), t, labels, guidance_scale)
            x = self.scheduler.step(eps, t, x, **extra).prev_sample
        image = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = self.numpy_to_pil(image)
        return ImagePipelineOutput(images=image) if return_dict else (image,)
