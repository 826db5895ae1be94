"""Published architectures of the supported model families, for random-weight builds.

Timing needs the real shapes, not the real weights: these configs are the ones the public
checkpoints ship (diffusers names), so a random-weight build costs what the real model costs.
"tiny" keeps every structural feature (cross-attention, down/up blocks, an 8x VAE) at a size
that exports and denoises in seconds on two CPU cores.
"""

from __future__ import annotations

from typing import Any

SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "clip_sample": False,
}

SDXL_SCHEDULER = {
    **SD_SCHEDULER,
    "_class_name": "EulerDiscreteScheduler",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "vocab_size": 49408,
}

SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

SD_UNET_BLOCKS = {
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
}

TINY: dict[str, Any] = {
    "family": "sd1",
    "size": 64,
    "unet": {
        "sample_size": 8,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
    },
    "scheduler": SD_SCHEDULER,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    # Structural variants of "tiny" for the other pipelines, exercised by the parity tests.
    "tiny-inpaint": {**TINY, "unet": {**TINY["unet"], "in_channels": 9}},
    "tiny-sd2": {
        **TINY,
        "family": "sd2",
        "pad_token": "!",
        "unet": {**TINY["unet"], "use_linear_projection": True, "attention_head_dim": [4, 8]},
        "text_encoder": {**TINY["text_encoder"], "hidden_act": "gelu"},
        "scheduler": {**SD_SCHEDULER, "prediction_type": "v_prediction"},
    },
    "tiny-lcm": {
        **TINY,
        "unet": {**TINY["unet"], "time_cond_proj_dim": 32},
        "scheduler": {**SD_SCHEDULER, "_class_name": "LCMScheduler", "timestep_spacing": "leading"},
    },
    "tiny-turbo": {
        **TINY,
        "scheduler": {
            **SD_SCHEDULER,
            "_class_name": "EulerDiscreteScheduler",
            "timestep_spacing": "trailing",
        },
    },
    "sd15": {
        "family": "sd1",
        "size": 512,
        "unet": {
            **SD_UNET_BLOCKS,
            "sample_size": 64,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        "vae": {**SD_VAE, "sample_size": 512},
        "text_encoder": CLIP_L,
        "scheduler": SD_SCHEDULER,
    },
    "sd21": {
        "family": "sd2",
        "size": 768,
        "unet": {
            **SD_UNET_BLOCKS,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        "vae": {**SD_VAE, "sample_size": 768},
        "text_encoder": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 23,
            "projection_dim": 512,
            "hidden_act": "gelu",
            "vocab_size": 49408,
        },
        "scheduler": {**SD_SCHEDULER, "prediction_type": "v_prediction"},
    },
    "tiny-sdxl": {
        **TINY,
        "family": "sdxl",
        "unet": {
            **TINY["unet"],
            "attention_head_dim": [2, 4],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "transformer_layers_per_block": [1, 2],
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "cross_attention_dim": 64,
        },
        "text_encoder_2": {**TINY["text_encoder"], "hidden_act": "gelu"},
        "vae": {**TINY["vae"], "scaling_factor": 0.13025},
        "scheduler": SDXL_SCHEDULER,
    },
    "sdxl": {
        "family": "sdxl",
        "size": 1024,
        "unet": {
            "sample_size": 128,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
        "text_encoder": CLIP_L,
        "text_encoder_2": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 20,
            "num_hidden_layers": 32,
            "projection_dim": 1280,
            "hidden_act": "gelu",
            "vocab_size": 49408,
        },
        "scheduler": SDXL_SCHEDULER,
    },
}
