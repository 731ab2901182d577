"""The same work in PyTorch diffusers/transformers, for side-by-side ratios.

The reference models are built from our named configs (`to_diffusers()`,
`to_hf()`) with diffusers'/transformers' own random init, SDPA attention,
and run on one device (CUDA if torch sees one, else CPU) with our
*per-device* batch, so the ratio of per-device throughputs compares like
with like. Sampling runs a `StableDiffusionPipeline` assembled from those
parts with the same scheduler config, steps, guidance and size, and
`output_type="np"` (images back on the host, as ours). SDXL models run a
`StableDiffusionXLPipeline` (both text encoders, the base's zeroed empty
negative prompt, default time ids, no watermark); in fp16 diffusers decodes
with the VAE upcast to fp32, as its `force_upcast` says.
"""

from __future__ import annotations

from t2i_jax.bench import core

# Our sampler names -> diffusers scheduler classes.
_SCHEDULERS = {
    "pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


class DiffusersBench:
    """Builds the reference parts once; `run(mode, ...)` times one mode."""

    def __init__(self, s: core.BenchSettings, r: core.Resolved):
        try:
            import diffusers
            import torch
            import transformers
        except ImportError as e:
            raise RuntimeError(f"--compare diffusers needs torch, diffusers and transformers installed ({e}); "
                               "pip install torch diffusers transformers") from e
        self.torch, self.diffusers, self.transformers = torch, diffusers, transformers
        self.s, self.r = s, r
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.type == "cuda"
        name = s.torch_dtype or (r.dtype if cuda else "fp32")
        self.dtype_name = name
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
        spec = core.MODELS[s.model]
        torch.manual_seed(s.seed)
        self.sdxl = spec.is_sdxl
        self.unet_config = spec.unet_config().to_diffusers()
        self.vae_config = spec.vae_config().to_diffusers()
        self.text_config = transformers.CLIPTextConfig(**spec.text_config().to_hf())
        self.text_2_config = transformers.CLIPTextConfig(**spec.text_2_config().to_hf()) if self.sdxl else None
        from t2i_jax.schedulers.schedule import SD_SCHEDULER

        self.scheduler_config = dict(SD_SCHEDULER, skip_prk_steps=True)
        self.batch = r.per_device_batch

    def info(self) -> dict:
        t = self.torch
        return {"torch": t.__version__, "diffusers": self.diffusers.__version__,
                "transformers": self.transformers.__version__, "device": str(self.device),
                "device_name": t.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu",
                "dtype": self.dtype_name, "torch_compile": self.s.torch_compile, "attention": "sdpa",
                "batch_size": self.batch, "num_threads": t.get_num_threads()}

    # -- helpers --------------------------------------------------------------

    def _sync(self, x=None):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        return x

    def _build_unet(self, train: bool = False):
        unet = self.diffusers.UNet2DConditionModel.from_config(self.unet_config)
        if train:
            unet = unet.to(self.device).train()  # fp32 params, autocast compute
            if self.s.remat:
                unet.enable_gradient_checkpointing()
        else:
            unet = unet.to(self.device, self.dtype).eval()
        return self.torch.compile(unet) if self.s.torch_compile else unet

    def _inputs(self, rows: int, dtype):
        """(latents, timesteps, context, added_cond_kwargs: None, or SDXL's pooled text and time ids)."""
        t = self.torch
        r = self.r
        g = t.Generator().manual_seed(self.s.seed)
        x = t.randn(rows, self.unet_config["in_channels"], r.latent, r.latent, generator=g)
        width = self.unet_config["cross_attention_dim"]
        ctx = t.randn(rows, 77, width[0] if isinstance(width, list) else width, generator=g)
        ts = t.randint(0, 1000, (rows,), generator=g)
        added = None
        if self.sdxl:
            pooled = t.randn(rows, self.text_2_config.projection_dim, generator=g)
            # original size, crop top-left, target size: diffusers' defaults for a square image
            ids = t.tensor([[r.resolution, r.resolution, 0, 0, r.resolution, r.resolution]] * rows)
            added = {"text_embeds": pooled.to(self.device, dtype), "time_ids": ids.to(self.device, dtype)}
        return x.to(self.device, dtype), ts.to(self.device), ctx.to(self.device, dtype), added

    def _memory_reset(self):
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def _memory_peak(self):
        return int(self.torch.cuda.max_memory_allocated()) if self.device.type == "cuda" else None

    # -- modes ------------------------------------------------------------------

    def run(self, mode: str, flops_per_item: float | None, peaks) -> dict:
        """Times `mode` ("unet", "sample", "train"); FLOPs per item are ours (same work)."""
        self._memory_reset()
        fn, items, extra = getattr(self, f"_mode_{mode}")()
        timing = core.time_calls(fn, self.s.warmup, self.s.iters, self._sync)
        out = core.figures(timing, items, 1, flops_per_item, *peaks)
        out.update(extra)
        if "model_evals" in extra:
            out["ms_per_unet_step"] = out["ms_per_iter"] / extra["model_evals"]
        # Eager torch compiles nothing; with torch.compile the first call
        # compiles, and its excess over a steady call is the compile time.
        out["compile_s"] = (out["first_call_s"] - out["ms_per_iter"] / 1e3) if self.s.torch_compile else None
        out["peak_bytes_in_use"] = self._memory_peak()
        return out

    def _mode_unet(self):
        t = self.torch
        rows = self.batch * (2 if self.s.unet_cfg else 1)
        unet = self._build_unet()
        x, ts, ctx, added = self._inputs(rows, self.dtype)

        def fn():
            with t.inference_mode():
                return unet(x, ts, encoder_hidden_states=ctx, added_cond_kwargs=added).sample

        return fn, rows, {"item": "sample", "rows": rows}

    def _mode_sample(self):
        t, d = self.torch, self.diffusers
        from t2i_jax.tokenizer import Tokenizer

        unet = self._build_unet()
        vae = d.AutoencoderKL.from_config(self.vae_config).to(self.device, self.dtype).eval()
        text = self.transformers.CLIPTextModel(self.text_config).to(self.device, self.dtype).eval()
        sched = getattr(d, _SCHEDULERS[self.r.scheduler]).from_config(self.scheduler_config)
        if self.sdxl:
            text_2 = self.transformers.CLIPTextModelWithProjection(self.text_2_config).to(self.device, self.dtype)
            pipe = d.StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2.eval(),
                                               tokenizer=Tokenizer.bundled().hf,
                                               tokenizer_2=Tokenizer.bundled(pad_token="!").hf, unet=unet,
                                               scheduler=sched, force_zeros_for_empty_prompt=True,
                                               add_watermarker=False)
        else:
            pipe = d.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=Tokenizer.bundled().hf, unet=unet,
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        size = self.r.resolution
        prompts = [core.PROMPT] * self.batch
        sched.set_timesteps(self.s.steps)
        evals = len(sched.timesteps)

        def fn():
            g = t.Generator(self.device).manual_seed(self.s.seed)
            with t.inference_mode():
                return pipe(prompts, num_inference_steps=self.s.steps, guidance_scale=self.s.guidance_scale,
                            height=size, width=size, output_type="np", generator=g).images

        return fn, self.batch, {"item": "image", "model_evals": evals, "scheduler": self.r.scheduler,
                                "loop": f"diffusers {type(pipe).__name__}(output_type='np')"}

    def _mode_train(self):
        t, d = self.torch, self.diffusers
        unet = self._build_unet(train=True)
        fused = self.device.type == "cuda"
        opt = t.optim.AdamW(unet.parameters(), lr=self.s.learning_rate, weight_decay=self.s.weight_decay,
                            **({"fused": True} if fused else {}))
        sched = d.DDPMScheduler.from_config(self.scheduler_config)
        x0, _, ctx, _ = self._inputs(self.batch, t.float32)
        low = self.dtype != t.float32
        scaler = t.amp.GradScaler(self.device.type) if self.dtype == t.float16 else None

        def fn():
            noise = t.randn_like(x0)
            ts = t.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), device=self.device)
            noisy = sched.add_noise(x0, noise, ts)
            with t.autocast(self.device.type, dtype=self.dtype, enabled=low):
                pred = unet(noisy, ts, encoder_hidden_states=ctx).sample
            loss = t.nn.functional.mse_loss(pred.float(), noise)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return fn, self.batch, {"item": "sample", "remat": self.s.remat}

