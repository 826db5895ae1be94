"""Inputs that look like deployment, for the fp16 policy's range measurement.

The policy keeps in fp32 the nodes whose activations leave the fp16 range on its inputs, so
those should be what each graph sees while generating: token ids of real prompts, the text
encoders' own embeddings of them (not N(0, 1)), timesteps across the schedule, integer and
fractional (Karras and Euler schedules give fractional ones), latents at the deployment size
where a GPU makes that affordable, and the VAE decoder's input at the scale the pipeline feeds
it (latents / scaling_factor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # sdrt build imports this module for PROMPTS: no torch or onnx at import
    import onnx

PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse on a cliff at dawn, highly detailed",
)
# The start and end of a 1000-step schedule and a fractional point between (Karras and Euler
# schedules give fractional timesteps); each is one measuring pass per fp16 round.
TIMESTEPS = (999.0, 500.25, 1.37)
CUDA = "CUDAExecutionProvider"


def calibration_providers() -> list[str]:
    """The CUDA provider where onnxruntime-gpu has it (its fp16 kernels are what will run),
    else the CPU provider."""
    import onnxruntime as ort

    return (
        [CUDA, "CPUExecutionProvider"]
        if CUDA in ort.get_available_providers()
        else ["CPUExecutionProvider"]
    )


def measuring_room(weight_bytes: int) -> float:
    """How many times the fp16 measurement's working memory at the trace size (what
    `memory_estimate` counts for the graph passes) fits where it runs, beside the graph's
    weights: 1 on the CPU, whose RAM --max-memory sized for the trace size; on the CUDA
    provider, the device's free memory, not the host's RAM."""
    from .memory_estimate import PASS_EXTRA_BYTES

    if CUDA not in calibration_providers():
        return 1.0
    return max(cuda_free_bytes() - weight_bytes, 0) / PASS_EXTRA_BYTES


def cuda_free_bytes() -> int:
    """Free memory on the CUDA device the measuring sessions use (device 0)."""
    import torch

    free, _ = torch.cuda.mem_get_info(0)
    return int(free)


def token_ids(tokenizer: Any, prompts: Sequence[str], length: int | None = None) -> np.ndarray:
    """Padded ids, `length` long (default: the tokenizer's model_max_length)."""
    return np.asarray(
        tokenizer(
            list(prompts), padding="max_length", max_length=length or tokenizer.model_max_length,
            truncation=True,
        ).input_ids,
        np.int32,
    )  # fmt: skip


def prompt_embeddings(pipe: Any) -> dict[str, np.ndarray]:
    """The U-Net's conditioning for each prompt with its unconditional half (""), as
    classifier-free guidance batches them: encoder_hidden_states (and SDXL's text_embeds)."""
    import torch

    prompts = [p for prompt in PROMPTS for p in ("", prompt)]
    second = getattr(pipe, "text_encoder_2", None)
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if second is not None:
        pairs.append((pipe.tokenizer_2, second))
    hidden, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in pairs:
            ids = torch.from_numpy(token_ids(tokenizer, prompts)).long()
            out = encoder(ids, output_hidden_states=second is not None)
            hidden.append(out.hidden_states[-2] if second is not None else out.last_hidden_state)
            pooled = getattr(out, "text_embeds", pooled)
    feeds = {"encoder_hidden_states": torch.cat(hidden, dim=-1).float().numpy()}
    if pooled is not None:
        feeds["text_embeds"] = pooled.float().numpy()
    return feeds


def calibration_feeds(
    pipe: Any, component: Any, dims: dict[str, int], latent_size: tuple[int, int]
) -> list[dict[str, np.ndarray]]:
    """Calibration inputs for `component` (an onnx_export.Component): `dims` are the trace
    sizes, `latent_size` the latent height and width to measure the U-Net and VAE at."""
    rng = np.random.default_rng(0)
    height, width = latent_size
    if component.name.startswith("text_encoder"):
        tokenizer = getattr(pipe, component.name.replace("text_encoder", "tokenizer"))
        length = component.inputs[0].shape[1]  # the graph's fixed sequence (T5's may be shorter)
        return [{"input_ids": token_ids(tokenizer, ["", *PROMPTS], length)}]
    if component.name == "vae_decoder":
        latent = rng.standard_normal((1, pipe.vae.config.latent_channels, height, width))
        return [{"latent": (latent / pipe.vae.config.scaling_factor).astype(np.float32)}]
    if component.name != "unet":  # the transformers too: N(0, 1) latents and conditioning
        return [component.sample_inputs(dims)]
    conditioning = prompt_embeddings(pipe)
    batch = len(conditioning["encoder_hidden_states"])
    sized = {**dims, "unet_batch": batch, "latent_height": height, "latent_width": width}
    feeds = []
    for t in TIMESTEPS:
        feed = component.sample_inputs(sized, seed=len(feeds))  # sample ~ N(0, 1): scaled input
        feed |= conditioning | {"timestep": np.full(batch, t, np.float32)}
        if "time_ids" in feed:  # SDXL: original size, crop, target size
            side = [height * 8, width * 8]
            feed["time_ids"] = np.tile(np.array([*side, 0, 0, *side], np.float32), (batch, 1))
        feeds.append(feed)
    return feeds


def attention_score_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes computing attention scores and their softmax (each Softmax and the
    nodes back to the MatMul of queries and keys): what diffusers computes in fp32 for a
    U-Net configured with upcast_attention (SD 2.x). A fused MultiHeadAttention node has no
    such nodes: ORT's kernels accumulate its scores in fp32 themselves."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    found: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        current = node
        while current is not None and current.name not in found:
            found.add(current.name)
            if current.op_type == "MatMul" or not current.input:
                break
            current = producer.get(current.input[0])
    return found
