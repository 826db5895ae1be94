"""Scheduler configs shared by the scheduler parity tests (test_schedulers_a and _b)."""

from __future__ import annotations

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
}
# Stable Diffusion 1.5's own scheduler_config.json: a PNDM config that every other class must
# read like diffusers' from_config does (class defaults for absent keys, unknown keys ignored).
SD15_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
