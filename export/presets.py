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

# Diffusion transformers. "family" picks the export family (export/families/); the text
# encoders are listed in the order the runtime runs them, each with its kind: "clip" (CLIP
# without projection), "clip_projection" (CLIPTextModelWithProjection) or "t5".
FLOW_MATCH = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
SD3_SCHEDULER = {**FLOW_MATCH, "shift": 3.0}
FLUX_DEV_SCHEDULER = {
    **FLOW_MATCH,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
DIT_VAE = {
    **SD_VAE,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "sample_size": 1024,
}
CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "vocab_size": 49408,
}
T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "vocab_size": 32128,
}
SD35_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "attention_head_dim": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
    "qk_norm": "rms_norm",
}
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
TINY_T5 = {
    "d_model": 80,
    "d_ff": 37,
    "d_kv": 8,
    "num_heads": 4,
    "num_layers": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
}
TINY_DIT_VAE = {
    **TINY["vae"],
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TINY_SD3: dict[str, Any] = {
    "family": "sd3",
    "size": 64,
    "text_encoders": [
        ("clip_projection", TINY["text_encoder"]),
        ("clip_projection", {**TINY["text_encoder"], "hidden_act": "gelu"}),
        ("t5", TINY_T5),
    ],
    "t5_max_length": 16,
    # MMDiT-X (SD3.5-medium's): RMSNorm on q/k and a dual attention layer
    "transformer": {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "joint_attention_dim": 80,
        "caption_projection_dim": 32,
        "pooled_projection_dim": 64,
        "pos_embed_max_size": 16,
        "qk_norm": "rms_norm",
        "dual_attention_layers": [0],
    },
    "vae": {**TINY_DIT_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    "scheduler": SD3_SCHEDULER,
}
TINY_FLUX: dict[str, Any] = {
    "family": "flux",
    "size": 64,
    "text_encoders": [("clip", TINY["text_encoder"]), ("t5", TINY_T5)],
    "t5_max_length": 16,
    "transformer": {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 80,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": [4, 6, 6],
    },
    "vae": {**TINY_DIT_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "scheduler": FLUX_DEV_SCHEDULER,
}
SD35: dict[str, Any] = {  # what SD3.5 medium and large share: all but the transformer
    "family": "sd3",
    "size": 1024,
    "text_encoders": [("clip_projection", CLIP_L), ("clip_projection", CLIP_G), ("t5", T5_XXL)],
    "t5_max_length": 256,
    "vae": {**DIT_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    "scheduler": SD3_SCHEDULER,
}
FLUX_DEV: dict[str, Any] = {
    "family": "flux",
    "size": 1024,
    "text_encoders": [("clip", CLIP_L), ("t5", T5_XXL)],
    "t5_max_length": 512,
    "transformer": {**FLUX_TRANSFORMER, "guidance_embeds": True},
    "vae": {**DIT_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "scheduler": FLUX_DEV_SCHEDULER,
}
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-sd3": TINY_SD3,
    "tiny-flux": TINY_FLUX,
    "tiny-flux-schnell": {
        **TINY_FLUX,
        "transformer": {**TINY_FLUX["transformer"], "guidance_embeds": False},
        "scheduler": FLUX_SCHNELL_SCHEDULER,
    },
    "sd35-medium": {
        **SD35,
        "transformer": {
            **SD35_TRANSFORMER,
            "num_layers": 24,
            "num_attention_heads": 24,
            "caption_projection_dim": 1536,
            "pos_embed_max_size": 384,
            "dual_attention_layers": list(range(13)),
        },
    },
    "sd35-large": {
        **SD35,
        "transformer": {
            **SD35_TRANSFORMER,
            "num_layers": 38,
            "num_attention_heads": 38,
            "caption_projection_dim": 2432,
            "pos_embed_max_size": 192,
        },
    },
    "flux-dev": FLUX_DEV,
    "flux-schnell": {  # no guidance embedding, a shorter T5 sequence, a static shift
        **FLUX_DEV,
        "t5_max_length": 256,
        "transformer": {**FLUX_TRANSFORMER, "guidance_embeds": False},
        "scheduler": FLUX_SCHNELL_SCHEDULER,
    },
}
PRESETS.update(DIT_PRESETS)
