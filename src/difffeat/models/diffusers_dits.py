"""Today's text-to-image diffusion transformers, read through diffusers' own modules: PixArt-α/Σ, SD3/SD3.5
(MMDiT), FLUX.1, and any other diffusers transformer with a ``transformer_blocks`` list.

Why wrap and not rewrite: these models change between releases (qk-norm, dual attention, rotary ids, guidance
embeddings); diffusers tracks them and its forward *is* the reference. We add three things around it:

* **early exit** by forward hooks on the asked blocks: the deepest one raises :class:`StopForward` once its output
  is stored, so diffusers' untouched forward runs up to there and no later block ever runs;
* **noising in the model's own convention** (:data:`FLOW` for SD3/FLUX with the scheduler's shift, DDPM indices
  for PixArt), computed here from the scheduler config and checked against the scheduler's own
  ``scale_noise`` / ``add_noise`` in the tests;
* **conditioning**: the pipeline's own ``encode_prompt`` runs once for the empty prompt; the embedding is cached
  and the text encoders (T5-XXL alone is ~9 GB in bf16) are freed unless ``condition="caption"`` keeps them.

Block indices are 0-based over every block the model has, in execution order: FLUX's 19 double-stream blocks are
0..18 and its 38 single-stream blocks 19..56, named ``transformer_blocks.i`` / ``single_transformer_blocks.j``.

MMDiT and FLUX blocks carry text and image tokens side by side; ``stream`` picks the image tokens (default), the
text tokens, or both (``[text; image]`` along the token axis, FLUX's own order) as the feature.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from difffeat.models.adapter import ModuleAdapter
from difffeat.models.base import DDPM, Clean, Layer, TimeConvention, hub_id_mentions
from difffeat.models.checkpoints import CheckpointError
from difffeat.models.common import StopForward, resolve_indices, run_until_stopped
from difffeat.models.massive import TAPS, MassiveChannels
from difffeat.models.schedule import per_sample_randn
from difffeat.models.vae import LatentEncoder, images_to_tensor, load_vae

FLOW = TimeConvention(
    "flow", 0.0, 1.0, 0.0, False,
    "rectified-flow time t in [0, 1]: t = 0 clean, t = 1 pure noise; x_t = (1 - s) x0 + s eps with s = sigma(t) "
    "shifted as the model's scheduler config says (static shift t / (1 + (shift - 1) t); FLUX.1-dev: dynamic, "
    "by image tokens) or by the shift option; the network is fed 1000 s (FLUX: s)",
)  # fmt: skip
STREAMS = ("image", "text", "both")
FLUX_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default, what FLUX.1-dev's guidance embedding reads
CONDITIONS = ("null", "caption")


@dataclass(frozen=True)
class Family:
    """What differs between the diffusers transformers we read."""

    name: str
    transformer_class: str  # diffusers class name in transformer/config.json
    pipeline_class: str | None  # whose encode_prompt makes the conditioning
    block_lists: tuple[str, ...]  # attributes holding the blocks, in execution order
    joint: bool  # blocks return (text tokens, image tokens)


FAMILIES = {
    "pixart": Family("pixart", "PixArtTransformer2DModel", "PixArtAlphaPipeline", ("transformer_blocks",), False),
    "sd3": Family("sd3", "SD3Transformer2DModel", "StableDiffusion3Pipeline", ("transformer_blocks",), True),
    "flux": Family(
        "flux", "FluxTransformer2DModel", "FluxPipeline", ("transformer_blocks", "single_transformer_blocks"), True
    ),
    "diffusers": Family("diffusers", "", None, ("transformer_blocks",), False),
}
_BY_CLASS = {f.transformer_class: f.name for f in FAMILIES.values() if f.transformer_class}


# ----------------------------------------------------------------------------------------------------------------
# Noise schedules from scheduler configs
# ----------------------------------------------------------------------------------------------------------------


def flow_sigma(t: float, scheduler_config: dict, image_seq_len: int | None = None) -> float:
    """The noise level s(t) the model sees at flow time t, as ``FlowMatchEulerDiscreteScheduler`` shifts it.

    Static shift (SD3: 3.0): ``s = shift t / (1 + (shift - 1) t)``. Dynamic shift (FLUX.1-dev): ``mu`` grows
    linearly with the number of image tokens between (base_seq_len, base_shift) and (max_seq_len, max_shift), as
    the FLUX pipeline's ``calculate_shift``; then ``s = e^mu / (e^mu + 1/t - 1)``.
    """
    if t in (0.0, 1.0):
        return float(t)
    if not scheduler_config.get("use_dynamic_shifting", False):
        shift = scheduler_config.get("shift", 1.0)
        return shift * t / (1 + (shift - 1) * t)
    if image_seq_len is None:
        raise ValueError("a dynamically shifted schedule needs the number of image tokens")
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    mu = base_shift + (max_shift - base_shift) / (max_len - base_len) * (image_seq_len - base_len)
    if scheduler_config.get("time_shift_type", "exponential") == "linear":
        return mu / (mu + (1 / t - 1))
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def ddpm_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """ᾱ of a DDPM-family scheduler config (PixArt's DPM-Solver/DDPM), float32 as diffusers builds it."""
    steps = scheduler_config.get("num_train_timesteps", 1000)
    start, end = scheduler_config.get("beta_start", 1e-4), scheduler_config.get("beta_end", 0.02)
    kind = scheduler_config.get("beta_schedule", "linear")
    if kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
    else:
        raise CheckpointError(f"scheduler beta_schedule {kind!r} is not supported (expected linear or scaled_linear)")
    return torch.cumprod(1.0 - betas, dim=0)


# ----------------------------------------------------------------------------------------------------------------
# The backbone
# ----------------------------------------------------------------------------------------------------------------


class DiffusersBackbone(ModuleAdapter):
    """A diffusers transformer with its VAE, early exit, its noise convention and its (cached) conditioning.

    This class is the generic adapter (registered as ``diffusers``): any diffusers transformer with a
    ``transformer_blocks`` list, conditioned on what the caller passes (``null_condition``: per-row tensors;
    ``fixed_inputs``: other forward arguments, as they are). The subclasses below add each family's prompt
    encoding and input preparation.
    """

    family: ClassVar[str] = "diffusers"
    modality: ClassVar[str] = "image"
    spec: ClassVar[Family] = FAMILIES["diffusers"]
    hub_names: ClassVar[tuple[str, ...]] = ()  # words in a hub id that name this family

    def __init__(
        self,
        transformer: nn.Module,
        scheduler_config: dict,
        vae: Any = None,
        *,
        image_size: int | None = None,
        sample_posterior: bool = True,
        null_condition: dict[str, torch.Tensor] | None = None,
        fixed_inputs: dict[str, Any] | None = None,
        prompts: _PromptEncoder | None = None,
        stream: str = "image",
        guidance: float | None = None,
        shift: float | None = None,
    ) -> None:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        if stream != "image" and not self.spec.joint:
            raise ValueError(f"stream={stream!r} needs a joint text+image model (SD3, FLUX), not {self.family}")
        self.module = transformer.eval().requires_grad_(False)
        self.scheduler_config = scheduler_config
        self.encoder = LatentEncoder(vae, sample=sample_posterior) if vae is not None else None
        self.image_size = image_size or _default_image_size(transformer, vae)
        self.null_condition = null_condition or {}
        self.fixed_inputs = fixed_inputs or {}
        self.prompts = prompts
        self.stream = stream
        self.guidance = _guidance(transformer, guidance, self.family)
        self.time: TimeConvention = FLOW if "FlowMatch" in scheduler_config.get("_class_name", "") else DDPM
        if shift is not None and self.time is not FLOW:
            raise ValueError(f"shift={shift}: this {self.family} model has DDPM time, which has no flow shift")
        self.shift = shift
        self.flow_schedule = scheduler_config if shift is None else {**scheduler_config, "shift": shift,
                                                                     "use_dynamic_shifting": False}  # fmt: skip
        self._blocks = [
            (f"{attr}.{i}", b) for attr in self.spec.block_lists for i, b in enumerate(_list(transformer, attr))
        ]

    # --- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def wraps(cls, model: nn.Module) -> bool:
        """Never: a bare transformer carries neither its scheduler nor its prompt encoding; load the pipeline."""
        return False

    @classmethod
    def recognises(cls, source: str) -> bool:
        """A pipeline root whose ``transformer/config.json`` names this family's class, or a hub id naming it.
        The generic adapter recognises nothing: a user picks it with ``backbone="diffusers"``."""
        config = Path(source) / "transformer" / "config.json"
        if config.is_file():
            return bool(cls.spec.transformer_class) and (
                json.loads(config.read_text()).get("_class_name") == cls.spec.transformer_class
            )
        return bool(cls.hub_names) and hub_id_mentions(source, *cls.hub_names)

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        *,
        vae: str | nn.Module | None = None,
        image_size: int | None = None,
        sample_posterior: bool = True,
        condition: str = "null",
        stream: str = "image",
        dtype: str | torch.dtype = "float32",
        guidance: float | None = None,
        shift: float | None = None,
        max_sequence_length: int | None = None,
        null_condition: dict[str, torch.Tensor] | None = None,
        fixed_inputs: dict[str, Any] | None = None,
    ) -> DiffusersBackbone:
        """A pipeline root (local folder or hub id holding ``transformer/``, ``scheduler/``, ``vae/``,
        ``text_encoder*/``, ``tokenizer*/``) as a backbone.

        The transformer, the VAE and the empty prompt's embedding are kept; the text encoders only with
        ``condition="caption"``. ``dtype`` ("float32", "bfloat16", "float16") is the weights' dtype: a 12B FLUX
        needs bfloat16 to fit one GPU. ``vae`` replaces the pipeline's own. The generic adapter takes no text
        encoders: pass ``null_condition`` / ``fixed_inputs`` yourself.

        ``guidance`` is the value FLUX.1-dev's guidance embedding reads (None: ``FluxPipeline``'s default 3.5); a
        model without a guidance embedder (FLUX.1-schnell, every other family) refuses one. ``shift`` replaces a
        flow model's scheduler shift by a static one, ``s = shift t / (1 + (shift - 1) t)`` (None: the scheduler
        config's own, static for SD3, resolution-dependent for FLUX.1-dev).
        """
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        dtype = _dtype(dtype)
        transformer = _load_transformer(source, cls.spec, dtype)
        scheduler = _read_config(source, "scheduler/scheduler_config.json")
        if isinstance(vae, str | Path) or (vae is None and _has(source, "vae/config.json")):
            vae = load_vae(vae or source, subfolder=None if vae else "vae", dtype=dtype)
        prompts = None
        if cls.spec.pipeline_class:
            prompts = _prompt_encoder(source, cls.spec, dtype, max_sequence_length)
            null_condition = prompts.encode([""])
            if condition == "null":
                prompts = None  # drops the only reference to the text encoders
        elif condition == "caption":
            raise ValueError("the generic diffusers adapter has no text encoders: condition='caption' needs a family")
        return cls(
            transformer, scheduler, vae, image_size=image_size, sample_posterior=sample_posterior,
            null_condition=null_condition, fixed_inputs=fixed_inputs, prompts=prompts, stream=stream,
            guidance=guidance, shift=shift,
        )  # fmt: skip

    # --- what the featurizer asks -------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._blocks)

    def _move_companions(self, device: torch.device | str) -> None:
        if self.encoder is not None:
            self.encoder.vae.to(device)
        if self.prompts is not None:
            self.prompts.pipeline.to(device)
        self.null_condition = {k: v.to(device) for k, v in self.null_condition.items()}

    def layers(self) -> list[Layer]:
        width = _inner_dim(self.module)
        return [Layer(i, name, width) for i, (name, _) in enumerate(self._blocks)]

    def encode(self, inputs: Any, keys: Sequence[str | int], seed: int) -> Clean:
        """Images (PIL list / uint8 / float in [-1, 1]) -> ``(latent_dist.sample() - shift_factor) *
        scaling_factor`` of this model's VAE, with per-sample seeded posterior noise."""
        if self.encoder is None:
            raise ValueError("this backbone has no VAE (the pipeline has no vae/): pass vae= or latents=")
        return Clean(self.encoder.encode(images_to_tensor(inputs, self.image_size), keys, seed))

    def noise(self, x0: Clean, t: float, keys: Sequence[str | int], seed: int, draw: int = 0) -> torch.Tensor:
        """``x0`` noised to time ``t`` (this model's convention) with per-sample seeded noise."""
        t = self.time.check(t)
        x = x0.x
        eps = per_sample_randn(x.shape[1:], keys, seed, t, draw).to(x.device, x.dtype)
        return self.interpolate(x, eps, t)

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
        if self.time is FLOW:
            s = self.sigma(t, x0)
            return (1.0 - s) * x0 + s * eps
        abar = ddpm_alphas_cumprod(self.scheduler_config)[int(t)]
        return abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * eps

    def sigma(self, t: float, x0: torch.Tensor) -> float:
        """Flow noise level s(t) for latents shaped like ``x0`` (FLUX's dynamic shift depends on its size)."""
        tokens = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)  # FLUX packs 2x2 latent patches into one token
        return flow_sigma(float(t), self.flow_schedule, image_seq_len=tokens)

    def model_time(self, t: float, n: int) -> torch.Tensor:
        """The time in this model's convention; ``forward_intermediates`` turns it into the network's input
        (DDPM index; 1000 s(t) for flow models, whose shifted s depends on the latent size for FLUX)."""
        return torch.full((n,), float(self.time.check(t)), device=self.device)

    def condition(
        self, n: int, *, label: int | None = None, captions: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """The cached empty-prompt embedding repeated n times, or the captions' own (condition="caption")."""
        if label is not None:
            raise ValueError(f"a {self.family} model is conditioned on a prompt, not on a class label")
        if captions is None:
            return {k: v.expand(n, *v.shape[1:]) for k, v in self.null_condition.items()}
        if self.prompts is None:
            raise ValueError("caption conditioning needs the text encoders: load with condition='caption'")
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} images")
        return self.prompts.encode(list(captions))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        blocks: Sequence[int],
        mask: torch.Tensor | None = None,
        *,
        tap: str = "output",
        massive: MassiveChannels | None = None,
        **cond: Any,
    ) -> dict[int, torch.Tensor]:
        """Tokens ``[N, T, D]`` of each asked block (the ``stream`` chosen) at ``tap``
        (:data:`~difffeat.models.massive.TAPS`), stopping at the deepest one: after it for its output, inside its
        first norm for its input or modulated input (``massive`` then suppresses the input's channels first)."""
        if tap not in TAPS:
            raise ValueError(f"tap must be one of {TAPS}, got {tap!r}")
        wanted = resolve_indices(blocks, self.depth)
        out: dict[int, torch.Tensor] = {}
        if tap == "output":
            handles = [self._blocks[i][1].register_forward_hook(self._output_hook(i, wanted, out)) for i in wanted]
        else:
            taps = [_NormTap(self, i, wanted[-1], tap, massive, out) for i in wanted]  # each checks its block first
            handles = [h for norm_tap in taps for h in norm_tap.install()]
        run_until_stopped(lambda: self.module(**self.model_inputs(x, t, cond), return_dict=False), handles)
        return out

    def _output_hook(self, index: int, wanted: list[int], out: dict[int, torch.Tensor]):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out[index] = self._select(output, index)
            if index == wanted[-1]:
                raise StopForward

        return hook

    def compile_blocks(self) -> None:
        """``torch.compile`` each block's forward: the hooks that capture and stop stay outside the graph, and
        blocks of one list share a code object, so one graph serves them."""
        for _, block in self._blocks:
            block.forward = torch.compile(block.forward)

    # --- inputs of diffusers' forward ---------------------------------------------------------------------------

    def model_inputs(self, x: torch.Tensor, t: torch.Tensor | float, cond: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of diffusers' forward for latents ``x [N, C, H, W]`` at time ``t``."""
        n = x.shape[0]
        cond = cond or self.condition(n)
        dtype = next(self.module.parameters()).dtype
        x = x.to(dtype)
        cond = {k: _to(v, x.device, dtype) for k, v in {**self.fixed_inputs, **cond}.items()}
        times = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(n)
        if self.time is FLOW:
            times = torch.tensor([self.sigma(float(v), x) for v in times]) * 1000
        return self._inputs(x, times.to(x.device), cond)

    def _inputs(self, x: torch.Tensor, times: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        return {"hidden_states": x, "timestep": times, **cond}

    def _select(self, output: Any, index: int) -> torch.Tensor:
        if not self.spec.joint:
            return output[0] if isinstance(output, tuple) else output
        text, image = output
        if self.stream == "image":
            return image
        if text is None:  # SD3's last block updates only the image tokens (context_pre_only)
            raise ValueError(f"block {index} ({self._blocks[index][0]}) outputs no text tokens; ask an earlier block")
        return text if self.stream == "text" else torch.cat([text, image], dim=1)


_ADALN_NORMS = ("AdaLayerNormZero", "AdaLayerNormZeroSingle", "SD35AdaLayerNormZeroX", "AdaLayerNormContinuous",
                 "AdaLayerNorm")  # fmt: skip  # diffusers norms that return the modulated tokens (first)


class _NormTap:
    """Reads one block's input tokens, or its AdaLN-modulated input, from pre-hooks on the norms that read them,
    leaving diffusers' forward as it is (the modulation is recomputed beside it, on the suppressed input).

    A block's input norms, by stream: ``image`` (``norm1``), ``text`` (``norm1_context`` of an MMDiT / FLUX
    double-stream block) or ``joint`` (a FLUX single-stream block's ``norm``, over ``[text; image]``). They are
    diffusers' adaLN norms (called with the block's own ``temb`` / timestep, as the block calls them), or, for
    PixArt's ``ada_norm_single`` blocks, a plain LayerNorm followed by the block's inline
    ``norm1(x) * (1 + scale_msa) + shift_msa`` with ``scale_shift_table + timestep``, recomputed here.
    """

    def __init__(
        self,
        backbone: DiffusersBackbone,
        index: int,
        deepest: int,
        tap: str,
        massive: MassiveChannels | None,
        out: dict[int, torch.Tensor],
    ) -> None:
        self.name, self.block = backbone._blocks[index]
        self.index, self.deepest, self.tap, self.massive, self.out = index, deepest, tap, massive, out
        self.stream = backbone.stream if backbone.spec.joint else "image"
        self.norms = self._norms(backbone)
        self.block_kwargs: dict[str, Any] = {}
        self.seen: dict[str, tuple[nn.Module, tuple, dict]] = {}

    def _norms(self, backbone: DiffusersBackbone) -> dict[str, nn.Module]:
        """The norms to hook, by stream part, for the stream read; a clear error where there is no adaLN norm."""
        block = self.block
        context = getattr(block, "norm1_context", None)
        if isinstance(getattr(block, "norm1", None), nn.Module):
            parts = {"image": block.norm1, "text": context} if backbone.spec.joint else {"image": block.norm1}
        else:
            parts = {"joint" if backbone.spec.joint else "image": getattr(block, "norm", None)}
        if "joint" not in parts:
            parts = {p: parts[p] for p in (("text", "image") if self.stream == "both" else (self.stream,))}
        for part, norm in parts.items():
            if not self._adaln(norm):
                raise ValueError(
                    f"tap={self.tap!r} (image.tap: modulated) needs an adaLN norm before block {self.index} "
                    f"({self.name}, {type(block).__name__}) of this {backbone.family} model; its {part} tokens' norm "
                    f"is {type(norm).__name__}: read tap='output' instead"
                )
        return parts

    def _adaln(self, norm: nn.Module | None) -> bool:
        if norm is None:
            return False
        single = getattr(self.block, "norm_type", None) == "ada_norm_single" and norm is self.block.norm1
        return single or type(norm).__name__ in _ADALN_NORMS

    def install(self) -> list[Any]:
        handles = [self.block.register_forward_pre_hook(self._on_block, with_kwargs=True)]
        for part, norm in self.norms.items():
            handles.append(norm.register_forward_pre_hook(self._on_norm(part), with_kwargs=True))
        return handles

    def _on_block(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.block_kwargs, self.seen = kwargs, {}

    def _on_norm(self, part: str):
        def hook(norm: nn.Module, args: tuple, kwargs: dict) -> None:
            self.seen[part] = (norm, args, kwargs)
            if len(self.seen) == len(self.norms):
                self.out[self.index] = self._read()
                if self.index == self.deepest:
                    raise StopForward

        return hook

    def _read(self) -> torch.Tensor:
        """The stream's input tokens ``[text; image]``, suppressed and modulated piece by piece (every step is
        per token, with per-sample modulation, so pieces of one norm's input may be modulated apart)."""
        pieces = self._pieces()
        x = torch.cat([p for _, _, _, p in pieces], dim=1)
        if self.tap == "input":
            return x
        if self.massive is not None:
            x = self.massive.apply(self.index, x)
        chunks = x.split([p.shape[1] for _, _, _, p in pieces], dim=1)
        return torch.cat([self._modulate(n, a, k, c) for (n, a, k, _), c in zip(pieces, chunks, strict=True)], dim=1)

    def _pieces(self) -> list[tuple[nn.Module, tuple, dict, torch.Tensor]]:
        """(norm, its call's other arguments, its kwargs, input tokens) for each piece of the stream, text first."""
        if "joint" not in self.seen:
            return [(n, a[1:], k, a[0]) for n, a, k in (self.seen[p] for p in ("text", "image") if p in self.seen)]
        norm, args, kwargs = self.seen["joint"]
        text_len = self.block_kwargs["encoder_hidden_states"].shape[1]
        joint = args[0]
        piece = {"image": joint[:, text_len:], "text": joint[:, :text_len], "both": joint}[self.stream]
        return [(norm, args[1:], kwargs, piece)]

    def _modulate(self, norm: nn.Module, args: tuple, kwargs: dict, x: torch.Tensor) -> torch.Tensor:
        """``norm``'s modulated output for input ``x`` (``forward`` itself: the hooks do not fire again)."""
        if type(norm).__name__ in _ADALN_NORMS:
            out = norm.forward(x, *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out
        timestep = self.block_kwargs["timestep"]
        table = self.block.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)
        shift_msa, scale_msa = table.chunk(6, dim=1)[:2]
        return norm.forward(x) * (1 + scale_msa) + shift_msa


class PixArtBackbone(DiffusersBackbone):
    """PixArt-α / PixArt-Σ: DDPM time, T5 prompt with its attention mask."""

    family = "pixart"
    spec = FAMILIES["pixart"]
    hub_names = ("pixart",)

    def _inputs(self, x: torch.Tensor, times: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        return {"hidden_states": x, "timestep": times, "added_cond_kwargs": self._pixart_added(x), **cond}

    def _pixart_added(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """PixArt-α 1024 px also embeds the image size and aspect ratio (pixels, as its pipeline passes them)."""
        if not getattr(self.module, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        n = x.shape[0]
        return {
            "resolution": torch.tensor([[h, w]], dtype=x.dtype, device=x.device).expand(n, 2),
            "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).expand(n, 1),
        }


class SD3Backbone(DiffusersBackbone):
    """SD3 / SD3.5 (MMDiT): flow time with the scheduler's static shift, CLIP-L + CLIP-G + T5 prompt."""

    family = "sd3"
    spec = FAMILIES["sd3"]
    hub_names = ("stable-diffusion-3", "sd3")


class FluxBackbone(DiffusersBackbone):
    """FLUX.1: double- then single-stream blocks, 2x2-packed latent tokens, dynamic shift, guidance input."""

    family = "flux"
    spec = FAMILIES["flux"]
    hub_names = ("flux",)

    def _inputs(self, x: torch.Tensor, times: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        """FLUX reads 2x2-packed latent tokens with 3-axis rotary ids and time s (not 1000 s), as
        ``FluxPipeline`` prepares them."""
        from diffusers import FluxPipeline

        n, c, h, w = x.shape
        text_len = cond["encoder_hidden_states"].shape[1]
        inputs = {
            "hidden_states": FluxPipeline._pack_latents(x, n, c, h, w),
            "timestep": (times / 1000).to(x.dtype),
            "img_ids": FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype),
            "txt_ids": torch.zeros(text_len, 3, device=x.device, dtype=x.dtype),
            **cond,
        }
        if self.guidance is not None:
            inputs["guidance"] = torch.full((n,), self.guidance, device=x.device, dtype=torch.float32)
        return inputs


ADAPTERS: dict[str, type[DiffusersBackbone]] = {
    c.family: c for c in (PixArtBackbone, SD3Backbone, FluxBackbone, DiffusersBackbone)
}


def _guidance(transformer: nn.Module, guidance: float | None, family: str) -> float | None:
    """The guidance value a transformer with a guidance embedder reads (FluxPipeline's default when None), None
    for one without; a value given to a model without one is an error, not silently dropped."""
    if getattr(transformer.config, "guidance_embeds", False):
        return FLUX_GUIDANCE if guidance is None else float(guidance)
    if guidance is not None:
        raise ValueError(
            f"guidance={guidance}: this {family} transformer has no guidance embedder (FLUX.1-schnell and the "
            "non-FLUX models take none); leave image.guidance unset"
        )
    return None


def _default_image_size(transformer: nn.Module, vae: Any) -> int:
    """The pixel side the model was trained at: its latent ``sample_size`` times the VAE's pixels per latent cell
    (PixArt, SD3); FLUX's transformer has no sample size, so its VAE's (1024 for FLUX.1)."""
    cells = getattr(transformer.config, "sample_size", None)
    if vae is None:
        return (cells or 128) * 8
    if cells is None:
        return vae.config.sample_size
    return cells * 2 ** (len(vae.config.block_out_channels) - 1)


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Floating tensors to the model's device and dtype, other tensors to its device; anything else as given."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def _list(module: nn.Module, attr: str) -> nn.ModuleList:
    blocks = getattr(module, attr, None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise CheckpointError(f"{type(module).__name__} has no '{attr}' block list; it is not a DiT-style transformer")
    return blocks


def _inner_dim(transformer: nn.Module) -> int:
    cfg = transformer.config
    return cfg.num_attention_heads * cfg.attention_head_dim


# ----------------------------------------------------------------------------------------------------------------
# Loading a pipeline root
# ----------------------------------------------------------------------------------------------------------------


def sniff_family(source: str | Path) -> str:
    """The family of a pipeline root (or hub id) from ``transformer/config.json``'s class name."""
    cfg = _read_config(source, "transformer/config.json")
    return _BY_CLASS.get(cfg.get("_class_name", ""), "diffusers")


def _read_config(source: str | Path, name: str) -> dict:
    path = Path(source) / name
    if not path.is_file():
        if Path(source).exists():
            raise CheckpointError(f"{source}: no {name} (expected a diffusers pipeline root: transformer/, vae/...)")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(source), name))
    return json.loads(path.read_text())


def load_diffusers_backbone(source: str | Path, *, family: str | None = None, **options: Any) -> DiffusersBackbone:
    """A pipeline root as the adapter of ``family`` (default: sniffed from the transformer's class); ``options``
    as :meth:`DiffusersBackbone.from_pretrained`."""
    family = family or sniff_family(source)
    if family not in ADAPTERS:
        raise ValueError(f"unknown diffusers family {family!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[family].from_pretrained(str(source), **options)


def _has(source: str | Path, name: str) -> bool:
    """Whether a pipeline root (folder, or hub id) has the file ``name``."""
    path = Path(source)
    if path.exists():
        return (path / name).is_file()
    from huggingface_hub import file_exists

    return file_exists(str(source), name)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def _load_transformer(source: str | Path, spec: Family, dtype: torch.dtype) -> nn.Module:
    import diffusers

    cfg = _read_config(source, "transformer/config.json")
    cls_name = spec.transformer_class or cfg.get("_class_name", "")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise CheckpointError(f"{source}: transformer class {cls_name!r} is not in diffusers {diffusers.__version__}")
    return cls.from_pretrained(str(source), subfolder="transformer", dtype=dtype)


class _PromptEncoder:
    """The pipeline's own ``encode_prompt``, with only its text encoders and tokenizers loaded."""

    def __init__(self, pipeline: Any, family: str, max_sequence_length: int | None) -> None:
        self.pipeline = pipeline
        self.family = family
        self.max_sequence_length = max_sequence_length

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipe, kw = self.pipeline, {}
        if self.max_sequence_length:
            kw["max_sequence_length"] = self.max_sequence_length
        if self.family == "pixart":
            embeds, mask, _, _ = pipe.encode_prompt(prompts, False, clean_caption=False, **kw)
            return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        if self.family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, **kw)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, **kw)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _prompt_encoder(source: str | Path, spec: Family, dtype: torch.dtype, max_len: int | None) -> _PromptEncoder:
    import diffusers

    index = _read_config(source, "model_index.json")
    name = index.get("_class_name", spec.pipeline_class)
    if spec.name == "pixart" and name not in ("PixArtAlphaPipeline", "PixArtSigmaPipeline"):
        name = spec.pipeline_class
    pipeline_cls = getattr(diffusers, name, None) or getattr(diffusers, spec.pipeline_class)
    skip = {k: None for k in ("transformer", "vae") if k in index}
    try:
        pipe = pipeline_cls.from_pretrained(str(source), dtype=dtype, **skip)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: could not load the text encoders of {name} ({exc})") from exc
    return _PromptEncoder(pipe, spec.name, max_len)
