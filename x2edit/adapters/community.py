"""Community LoRAs (kohya, ComfyUI, XLabs, diffusers/PEFT files) beside the x2edit adapters.

Reading. diffusers' Flux converters (``FluxKontextPipeline.lora_state_dict``) turn every layout into
diffusers/PEFT keys; nothing here re-writes them. ``read_community_file`` is the one reader: it gives
what a file holds for the transformer (``CommunityLora``) without a model, ``load_community_lora``
loads what it returns, and ``retrieval`` (the weight encoder, the LoRA index) reads files only through
``read_community_lora`` (its low-rank factors) and ``read_lora_header``. The strength of each module
is the one stock gives it: PEFT's ``LoraConfig`` (built from the file's metadata, or by diffusers'
``get_peft_kwargs`` from the keys, ranks and ``.alpha`` tensors), resolved per module with PEFT's
``get_pattern_key``:

    delta W = s * B A,   s = alpha / r   (alpha / sqrt(r) with use_rslora)

kohya and ComfyUI alphas are already folded into A and B by the converter (but for kohya's
``final_layer``, see ``_kohya_final_scales``), XLabs files have none. Beyond plain pairs, as stock
loads them: DoRA magnitudes (``lora_magnitude_vector``, PEFT's ``use_dora``), LoRA biases
(``lora_B.bias``, ``lora_bias``), and full weights the file sets outright (the RMSNorm scales of
FLUX.1's Control LoRAs, ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``).

Placement. Each LoRA becomes a ``LoRA`` adapter (a ``DoRA`` for a DoRA) of the ``AdapterLinear``
layers it targets, marked ``config.extra["source"] == "community"``, so a plain one runs in the same
fused kernel call as the MoE-LoRA. Full weights are written into the transformer, their originals kept
for ``unload_community_loras``. The functions below (fuse, unfuse, unload, per-call scale) act on those
marked adapters only, as stock's LoRA methods act on what its ``load_lora_weights`` loaded; the x2edit
editing adapter is part of the model and is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import traceback
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from x2edit.adapters.config import AdapterConfig
from x2edit.adapters.inject import _set_submodule, adapter_layers, adapter_names
from x2edit.adapters.layers import AdapterLinear, DoRA, LoRA, check_adapter_name

logger = logging.getLogger(__name__)

COMMUNITY = "community"  # AdapterConfig.extra["source"] of the LoRAs loaded here

# Key prefixes of text-encoder LoRA weights (kohya, ComfyUI, diffusers): x2edit does not load them.
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")
# What lora_state_dict reads a file with; anything else is refused rather than ignored.
_READ_KWARGS = ("weight_name", "subfolder", "use_safetensors", "local_files_only", "cache_dir", "force_download",
                "proxies", "token", "revision")
# kohya's final_layer LoRAs (sd-scripts names, ComfyUI's diffusion_model.* written so) -> the diffusers module.
_KOHYA_FINAL_LAYER = {"lora_unet_final_layer_linear": "proj_out",
                      "lora_unet_final_layer_adaLN_modulation_1": "norm_out.linear"}
# Attribute the originals of the full weights a LoRA file overwrote are kept under, on the transformer.
_OVERWRITTEN = "_community_overwritten"


@dataclass
class CommunityLora:
    """What a community LoRA file holds for the transformer, as stock diffusers reads it.

    factors: {module: (A (r, K), B (N, r), scale)}: the low-rank update ``scale * B @ A``.
    magnitudes: {module: m (N,)}: the module is a DoRA (``DoRA``; PEFT's ``use_dora``).
    biases: {module: b (N,)}: lora_B's bias (PEFT's ``lora_bias``), scaled as B A.
    weights: {transformer parameter: tensor}: full weights the file sets outright (a Control LoRA's
        RMSNorm scales), as stock's ``load_lora_weights`` writes them into the transformer.
    unprefixed: modules and parameters named without the ``transformer.`` prefix, which stock's loader
        drops; x2edit applies those the model has (diffusers' kohya converter writes x_embedder,
        proj_out, ... so) and drops the others, as stock.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    unprefixed: set[str] = field(default_factory=set)


def is_community(adapter: nn.Module) -> bool:
    """True for an adapter loaded by ``load_community_lora``."""
    return adapter.config.extra.get("source") == COMMUNITY


def community_loras(model: nn.Module) -> list[str]:
    """Names of the community LoRAs in ``model``, in load order."""
    names: dict[str, None] = {}
    for _, layer in adapter_layers(model):
        names.update((n, None) for n, a in layer.adapters.items() if is_community(a))
    return list(names)


def _layout(key: str) -> str | None:
    """The converter family a raw key belongs to (None: a text-encoder key, ignored)."""
    if key.startswith(_TEXT_ENCODER_PREFIXES):
        return None
    if ".processor." in key:
        return "XLabs"
    if key.startswith(("lora_unet_", "lora_transformer_", "diffusion_model.")):
        return "kohya/ComfyUI"
    return "diffusers/PEFT"


def _read(source, kwargs: dict) -> tuple[dict, dict | None]:
    """(raw state dict, diffusers LoRA metadata or None) of a file, directory or dict, read as stock reads it."""
    # diffusers' private reader: the one stock's lora_state_dict uses (directories, weight_name,
    # .bin fallback, metadata header). We need the raw keys before conversion to refuse mixed files.
    from diffusers.loaders.lora_base import _fetch_state_dict

    unknown = sorted(set(kwargs) - set(_READ_KWARGS))
    if unknown:
        raise ValueError(f"unexpected arguments {unknown} for loading a LoRA (accepted: {list(_READ_KWARGS)})")
    if isinstance(source, dict):
        return dict(source), None
    if not os.path.exists(source):
        raise FileNotFoundError(f"LoRA file not found: {source}")
    use_safetensors = kwargs.get("use_safetensors")
    try:
        return _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=source, weight_name=kwargs.get("weight_name"),
            use_safetensors=True if use_safetensors is None else use_safetensors,
            allow_pickle=use_safetensors is None, local_files_only=kwargs.get("local_files_only"),
            cache_dir=kwargs.get("cache_dir"), force_download=kwargs.get("force_download", False),
            proxies=kwargs.get("proxies"), token=kwargs.get("token"), revision=kwargs.get("revision"),
            subfolder=kwargs.get("subfolder"), user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"})
    except Exception as e:
        raise ValueError(f"cannot read LoRA {source}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    if text:
        return f"{type(e).__name__}: {text[0]}"
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__} in {frame.name} ({os.path.basename(frame.filename)}:{frame.lineno})"


def _kohya_final_scales(raw: dict) -> dict[str, float]:
    """{diffusers module: alpha / r} of kohya final_layer LoRAs whose alpha is not their rank.

    diffusers' kohya converter copies final_layer's up/down as they are and drops their ``.alpha`` (a
    TODO there), and stock's loader then drops the resulting unprefixed ``proj_out`` / ``norm_out.linear``
    keys altogether. x2edit applies those keys (see ``CommunityLora.unprefixed``), so it applies them at
    the strength sd-scripts and ComfyUI give them, alpha / r, and says so.
    """
    scales = {}
    for key, alpha in raw.items():
        if "final_layer" not in key or not key.endswith(".alpha"):
            continue
        base = key.removesuffix(".alpha")
        module = _KOHYA_FINAL_LAYER.get(base.replace("diffusion_model.", "lora_unet_", 1).replace(".", "_"))
        down = raw.get(base + ".lora_down.weight")
        if module is None or down is None or float(alpha) == down.shape[0]:
            continue
        scales[module] = float(alpha) / down.shape[0]
        logger.warning("%s = %g differs from the rank %d: x2edit applies this final_layer LoRA (%s) at alpha / r = %g "
                       "as sd-scripts and ComfyUI do; diffusers' kohya converter drops the alpha (it would run at "
                       "1) and stock diffusers does not load final_layer LoRAs at all",
                       key, float(alpha), down.shape[0], module, scales[module])
    return scales


def _convert(raw: dict) -> tuple[dict, dict | None, dict[str, float]]:
    """(diffusers/PEFT state dict, {key: alpha} or None, kohya final_layer scales) by diffusers' Flux converters.

    Refuses first what the converters would misread: mixed layouts (stock would load only part of them).
    """
    from diffusers import FluxKontextPipeline

    layouts: dict[str, str] = {}
    for key in raw:
        layouts.setdefault(_layout(key), key)
    layouts.pop(None, None)
    if len(layouts) > 1:
        (a, ka), (b, kb) = list(layouts.items())[:2]
        raise ValueError(f"the LoRA file mixes key layouts ({a}, e.g. {ka!r}, and {b}, e.g. {kb!r}); diffusers would "
                         "load only part of it")
    dora_scales = [k for k in raw if "dora_scale" in k]
    if dora_scales:
        # kohya/LyCORIS DoRA magnitudes: stock's lora_state_dict drops them (with its own warning) and loads
        # the rest as a plain LoRA; so does x2edit.
        logger.warning("ignoring %d kohya DoRA magnitudes (dora_scale) as stock diffusers does: the file runs as a plain "
                       "LoRA, without DoRA's per-row rescaling, so not quite as trained", len(dora_scales))
    final_scales = _kohya_final_scales(raw) if any(".lora_down.weight" in k for k in raw) else {}
    try:
        # lora_state_dict's converters pop from the dict they get: hand them a copy.
        state, alphas = FluxKontextPipeline.lora_state_dict(dict(raw), return_alphas=True)
    except Exception as e:
        if isinstance(e, AssertionError) and any("single_blocks" in k and "linear1" in k for k in raw):
            raise ValueError("kohya single-block linear1 LoRAs are split by diffusers at FLUX.1's sizes "
                             "(3 x 3072 + 12288 outputs), so they load only into FLUX.1-size transformers") from e
        raise ValueError(f"diffusers' Flux LoRA converter could not read this file ({_one_line(e)})") from e
    return state, alphas, final_scales


def _lora_config(pairs: dict, magnitudes: dict, biases: dict, alphas: dict | None, metadata: dict | None):
    """The ``LoraConfig`` stock builds for the file: from its metadata, else by diffusers' get_peft_kwargs."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    if metadata:
        try:
            return LoraConfig(**metadata)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the LoRA file's PEFT metadata is not a LoraConfig ({_one_line(e)})") from None
    # Keys as diffusers' load_lora_adapter builds them (use_dora and lora_bias come from the key names);
    # the alphas are lora_state_dict's own tensors, so a module without one gets the same default alpha as in stock.
    ranks = {f"^{m}.lora_B.weight": ab["B"].shape[1] for m, ab in pairs.items()}
    state = {f"{m}.lora_A.weight": ab["A"] for m, ab in pairs.items()}
    state.update({f"{m}.lora_magnitude_vector": v for m, v in magnitudes.items()})
    state.update({f"{m}.lora_B.bias": v for m, v in biases.items()})
    try:
        return LoraConfig(**get_peft_kwargs(ranks, alphas, state))
    except (TypeError, ValueError) as e:  # PEFT refuses DoRA magnitudes beside LoRA biases
        raise ValueError(f"PEFT refuses this LoRA's configuration ({_one_line(e)})") from None


def _scalings(pairs: dict, config) -> dict[str, float]:
    """alpha / r for each module (alpha / sqrt(r) with use_rslora), from the LoraConfig stock builds."""
    from peft.utils.other import get_pattern_key

    scalings = {}
    for module, ab in pairs.items():
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        if r != ab["A"].shape[0]:
            raise ValueError(f"the LoRA file's metadata gives {module} rank {r}, but its weights have rank "
                             f"{ab['A'].shape[0]}")
        scalings[module] = float(alpha) / (math.sqrt(r) if config.use_rslora else r)
    return scalings


def _strip(prefix: str, mapping: dict | None) -> tuple[dict | None, set[str]]:
    """(keys of ``mapping`` without ``prefix.``, the keys that had no prefix); keys of another component
    (text_encoder.) are dropped."""
    if not mapping:
        return None, set()
    out, unprefixed = {}, set()
    for k, v in mapping.items():
        if k.startswith(prefix + "."):
            out[k[len(prefix) + 1:]] = v
        elif not k.startswith(_TEXT_ENCODER_PREFIXES):
            out[k] = v  # diffusers' kohya converter writes a few transformer keys without the prefix
            unprefixed.add(k)
    return out or None, unprefixed


def _module_of(key: str, suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def read_community_file(source: str | os.PathLike | dict, prefix: str = "transformer", **kwargs) -> CommunityLora:
    """Read a Flux LoRA file (any layout diffusers converts) for the transformer, without a model.

    The one reader of community LoRA files (``load_community_lora`` loads what it returns).

    Args:
        source: a .safetensors file, a directory (with ``weight_name=`` in kwargs), or a state dict.
        prefix: the component prefix of keys in the file (diffusers writes ``transformer.``).
        **kwargs: how to find the file (weight_name, subfolder, ...), as ``lora_state_dict`` takes them.
    Returns a ``CommunityLora`` (factors sorted by module name). Keys stock ignores (a lora_A bias, kohya
    dora_scale, text-encoder keys) are ignored with a warning. Raises ``ValueError`` with one line naming
    the problem for what stock refuses too (DoRA with LoRA biases, magnitudes or biases the metadata does
    not declare, metadata beside .alpha tensors), and for files that hold nothing for the transformer,
    mismatched factors or non-finite values.
    """
    raw, metadata = _read(source, kwargs)
    state, alphas, final_scales = _convert(raw)
    (metadata, _), (alphas, _) = _strip(prefix, metadata), _strip(prefix, alphas)
    if metadata and alphas:
        raise ValueError("the LoRA file has both PEFT metadata and .alpha tensors (stock diffusers refuses it too)")
    from diffusers import FluxKontextPipeline

    norm_names = FluxKontextPipeline._control_lora_supported_norm_keys  # the full weights stock's Flux loader expects
    stripped, unprefixed = _strip(prefix, state)
    pairs: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    magnitudes, biases, weights, ignored = {}, {}, {}, []
    for key, value in (stripped or {}).items():
        if (m := _module_of(key, (".lora_A.weight",))) is not None:
            pairs[m]["A"] = value
        elif (m := _module_of(key, (".lora_B.weight",))) is not None:
            pairs[m]["B"] = value
        elif (m := _module_of(key, (".lora_B.bias",))) is not None:
            biases[m] = value
        elif (m := _module_of(key, (".lora_magnitude_vector", ".lora_magnitude_vector.weight"))) is not None:
            magnitudes[m] = value
        elif ".lora" in key:  # e.g. a lora_A bias: PEFT has no place for it, stock ignores it
            ignored.append(key)
        else:  # a full weight the file sets outright (a Control LoRA's norms), as stock writes it
            weights[key] = value
    if ignored:
        logger.warning("ignoring %d LoRA keys stock diffusers ignores too (no PEFT parameter of that name), e.g. %r",
                       len(ignored), ignored[0])
    skipped = [k for k in state if k.startswith(_TEXT_ENCODER_PREFIXES)]
    if skipped:
        logger.warning("ignoring %d text-encoder LoRA keys (x2edit applies community LoRAs to the transformer)",
                       len(skipped))
    if not pairs and not any(n in k for k in weights for n in norm_names):
        # stock refuses a file with neither LoRA nor norm keys ("Invalid LoRA checkpoint"), and x2edit has
        # nothing to apply from a text-encoder LoRA
        raise ValueError("the LoRA file holds no transformer LoRA weights")
    for module_name in [*magnitudes, *biases]:
        pairs.setdefault(module_name, {})
    for module_name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA for {module_name} has only {sorted(ab)}; both lora_A and lora_B are needed")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"LoRA for {module_name}: A {tuple(A.shape)} and B {tuple(B.shape)} are not the factors "
                             "of one low-rank update")
        for what, extra in (("DoRA magnitude", magnitudes), ("lora_B bias", biases)):
            if module_name in extra and tuple(extra[module_name].shape) != (B.shape[0],):
                raise ValueError(f"LoRA for {module_name}: its {what} {tuple(extra[module_name].shape)} does not "
                                 f"match B {tuple(B.shape)}")
        tensors = [A, B] + [d[module_name] for d in (magnitudes, biases) if module_name in d]
        if not all(torch.isfinite(t).all() for t in tensors):
            raise ValueError(f"LoRA for {module_name} holds non-finite values (NaN/inf)")
    for name, value in weights.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"the LoRA file's weight {name} holds non-finite values (NaN/inf)")

    config = _lora_config(pairs, magnitudes, biases, alphas, metadata)
    for flag, found, what in (("use_dora", magnitudes, "DoRA magnitudes"), ("lora_bias", biases, "lora_B biases")):
        if found and not getattr(config, flag):
            # stock builds LoRA layers without them from this metadata, and then fails loading the keys
            raise ValueError(f"the LoRA file has {what} but its PEFT metadata does not set {flag} (stock diffusers "
                             "cannot load it either)")
    # use_dora without a module's magnitude: PEFT starts m at ||W + s B A||, i.e. that module is a plain LoRA.
    scalings = _scalings(pairs, config)
    for module, scale in final_scales.items():
        if module in scalings:
            scalings[module] *= scale
    return CommunityLora(
        factors={m: (pairs[m]["A"], pairs[m]["B"], scalings[m]) for m in sorted(pairs)},
        magnitudes=magnitudes, biases=biases, weights=weights,
        unprefixed={_module_of(k, (".lora_A.weight", ".lora_B.weight")) or k for k in unprefixed})


def read_community_lora(source: str | os.PathLike | dict, prefix: str = "transformer",
                        **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The low-rank factors of a Flux LoRA file (any layout diffusers converts), without a model.

    What ``retrieval`` (the weight encoder, the index) reads: ``read_community_file``'s factors, i.e.
    {diffusers module name: (A (r, K), B (N, r), scale)}, sorted by module name; the module's update is
    ``scale * B @ A`` (a DoRA's magnitudes and LoRA biases are left out). Raises ``ValueError`` with one
    line naming the problem for files that hold no transformer LoRA.
    """
    factors = read_community_file(source, prefix, **kwargs).factors
    if not factors:
        raise ValueError("the LoRA file holds no transformer LoRA weights")
    return factors


def read_lora_header(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(key layout, header metadata) of a LoRA .safetensors file, from its header only (no weights read).

    The layout is the converter family of its keys ("kohya/ComfyUI", "XLabs", "diffusers/PEFT"; "mixed"
    for several); the metadata is the header's strings (kohya ``ss_*`` fields, ``modelspec.*``,
    diffusers' ``lora_adapter_metadata``). Other files give ("unknown", {}). A .safetensors file with no
    LoRA key (full model weights, say) is refused here, before any tensor is read.
    """
    from safetensors import safe_open

    if not str(path).endswith(".safetensors"):
        return "unknown", {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = list(f.keys()), dict(f.metadata() or {})
    except Exception as e:
        raise ValueError(f"cannot read the header of {path}: {_one_line(e)}") from e
    if keys and not any("lora" in k.lower() for k in keys):  # every LoRA layout names its factors "lora"
        raise ValueError(f"not a LoRA: none of its {len(keys)} keys is a LoRA key (e.g. {keys[0]!r})")
    layouts = {_layout(k) for k in keys} - {None}
    return (layouts.pop() if len(layouts) == 1 else "mixed" if layouts else "unknown"), metadata


def _fit_input(module_name: str, A: torch.Tensor, in_features: int) -> torch.Tensor:
    """A (r, K') for the input projection x_embedder (in_features K), where a LoRA's K' may differ as stock allows.

    K' < K: zero-padded to (r, K), as stock's ``_maybe_expand_lora_state_dict`` does (a FLUX.1 LoRA on a
    wider-input model, e.g. Fill: it reads the noisy latents, the first K' channels). K' = 2K: a FLUX.1
    Control LoRA (Canny, Depth), whose x_embedder reads the noisy latents and a control image's latents
    side by side. Stock widens the model's x_embedder to 2K (zero columns) and doubles its in_channels, and
    its Kontext pipeline then fails on every call (it makes latents of in_channels / 4 channels); x2edit
    keeps the model and uses the first K columns: exactly stock's transformer given all-zero control latents.
    Anything else is returned as is (and refused as a LoRA for another model).
    """
    if module_name != "x_embedder" or A.shape[1] == in_features:
        return A
    if A.shape[1] < in_features:
        logger.info("zero-padding the x_embedder LoRA's %d inputs to the model's %d, as stock diffusers does",
                    A.shape[1], in_features)
        return torch.cat([A, A.new_zeros(A.shape[0], in_features - A.shape[1])], dim=1)
    if A.shape[1] == 2 * in_features:
        logger.warning("this is a FLUX.1 Control LoRA: its x_embedder reads %d channels, the latents and a control "
                       "image's latents, and x2edit has no control image; it runs as stock's transformer does with "
                       "all-zero control latents (stock's Kontext pipeline loads it and then fails on every call)",
                       A.shape[1])
        return A[:, :in_features]
    return A


def _full_weights(model: nn.Module, lora: CommunityLora, targets: set[str]) -> dict[str, torch.Tensor]:
    """{parameter name: value} of the file's full weights that the model has, checked; others warned and ignored.

    As stock: the norm weights are written into the transformer (``_load_norm_into_transformer``), other
    full weights by PEFT's non-strict ``load_state_dict``, which skips those of a module the LoRA wraps.
    """
    params = dict(model.named_parameters())
    plan, ignored = {}, []
    for name, value in lora.weights.items():
        target = params.get(name)
        if target is None or name.rpartition(".")[0] in targets:
            ignored.append(name)
        elif tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"the LoRA file's {name} has shape {tuple(value.shape)}, the model's {tuple(target.shape)}; "
                             "is the LoRA for another base model?")
        else:
            plan[name] = value
    if ignored:
        logger.warning("ignoring %d full weights of the LoRA file this model has no place for (as stock), e.g. %r",
                       len(ignored), ignored[0])
    return plan


def load_community_lora(model: nn.Module, source: str | os.PathLike | dict, adapter_name: str,
                        prefix: str = "transformer", **kwargs) -> list[str]:
    """Load a Flux LoRA file (any layout diffusers converts) into ``model`` as adapter ``adapter_name``.

    Args:
        model: the transformer (with or without adapters already).
        source: a .safetensors file, a directory (with ``weight_name=`` in kwargs), or a state dict.
        adapter_name: name of the new adapter.
        prefix: the component prefix of keys in the file (diffusers writes ``transformer.``).
        **kwargs: how to find the file, as ``lora_state_dict`` takes them (weight_name, subfolder, ...).
    Returns the adapted module names (none where stock too loads nothing: unprefixed keys naming no module
    of the model). Full weights in the file (a Control LoRA's norms) are written into the model, their
    originals kept for ``unload_community_loras``. On error the model is left unchanged.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pick another adapter_name")
    lora = read_community_file(source, prefix, **kwargs)

    # Validate everything before touching the model.
    plan, dropped = [], []
    for module_name, (A, B, scaling) in lora.factors.items():
        try:
            target = model.get_submodule(module_name)
        except AttributeError:
            if module_name in lora.unprefixed:  # stock loads nothing from unprefixed keys: drop, as it does
                dropped.append(module_name)
                continue
            raise ValueError(f"LoRA targets {module_name!r}, which this model does not have; is the LoRA for "
                             "another base model?") from None
        if not isinstance(target, (nn.Linear, AdapterLinear)):
            raise ValueError(f"LoRA targets {module_name!r}, a {type(target).__name__}, not a linear layer")
        A = _fit_input(module_name, A, target.in_features)
        if A.shape[1] != target.in_features or B.shape[0] != target.out_features:
            raise ValueError(f"LoRA for {module_name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a linear "
                             f"{target.in_features}->{target.out_features}; is the LoRA for another base model?")
        plan.append((module_name, target, A, B, scaling))
    if dropped:
        logger.warning("dropping the LoRA keys of %d modules this model does not have, named without the "
                       "'%s.' prefix (e.g. %r), as stock diffusers drops every unprefixed key (diffusers converts "
                       "keys named after the original FLUX modules only in kohya's lora_down/lora_up form)",
                       len(dropped), prefix, dropped[0])
    weights = _full_weights(model, lora, {p[0] for p in plan})
    if not plan and not weights:
        logger.warning("nothing of this LoRA file reaches the transformer, as with stock diffusers: %r loads nothing",
                       adapter_name)

    for module_name, target, A, B, scaling in plan:
        if isinstance(target, nn.Linear):
            target = AdapterLinear(target)
            _set_submodule(model, module_name, target)
        rank = A.shape[0]
        config = AdapterConfig(kind="lora", rank=rank, alpha=scaling * rank, targets=[module_name],
                               extra={"source": COMMUNITY})
        if module_name in lora.magnitudes:
            adapter = DoRA(target.in_features, target.out_features, rank, scaling, config)
        else:
            adapter = LoRA(target.in_features, target.out_features, rank, scaling, config,
                           bias=module_name in lora.biases)
        with torch.no_grad():
            adapter.lora_A.copy_(A[None])
            adapter.lora_B.copy_(B[None])
            if module_name in lora.magnitudes:
                adapter.magnitude.copy_(lora.magnitudes[module_name])
            if module_name in lora.biases:
                adapter.lora_bias.copy_(lora.biases[module_name])
        adapter.requires_grad_(False)
        target.add_adapter(adapter_name, adapter)
    if weights:
        params, originals = dict(model.named_parameters()), model.__dict__.setdefault(_OVERWRITTEN, {})
        with torch.no_grad():
            for name, value in weights.items():
                originals.setdefault(name, params[name].detach().to("cpu", copy=True))  # the first load's original
                params[name].copy_(value)
    return [p[0] for p in plan]


def _community_layers(model: nn.Module, names: list[str] | None = None) -> Iterator[tuple[str, AdapterLinear, str]]:
    """(module name, layer, adapter name) for each community LoRA (of ``names``, if given) in each layer."""
    for module_name, layer in list(adapter_layers(model)):
        for n, adapter in list(layer.adapters.items()):
            if is_community(adapter) and (names is None or n in names):
                yield module_name, layer, n


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"the LoRA scale must be a finite number, got {scale!r}")


def fused_community_loras(model: nn.Module) -> list[str]:
    """Names of the community LoRAs folded into the base weights (``fuse_community_loras``)."""
    return list(dict.fromkeys(n for _, layer, n in _community_layers(model) if n in layer.merged))


def fuse_community_loras(model: nn.Module, names: list[str], scale: float = 1.0) -> None:
    """Fold community LoRAs ``names`` into the base weights at ``scale`` times their weight.

    As stock (PEFT's ``scale_layer`` before ``merge``), the LoRAs' weights stay multiplied by ``scale``:
    after ``unfuse_community_loras`` they run unfused at that strength until ``set_adapters`` resets
    them. Already fused LoRAs are skipped. Every layer is checked finite before any is written.
    """
    _check_scale(scale)
    todo = [(layer, n) for _, layer, n in _community_layers(model, names) if n not in layer.merged]
    saved = [(layer, n, layer.adapter_weights[n]) for layer, n in todo]
    try:
        for layer, n in todo:
            layer.adapter_weights[n] *= scale
        for layer, n in todo:
            layer.merged_weight(n)  # raises on non-finite weights, before any layer is written
    except Exception:
        for layer, n, w in saved:
            layer.adapter_weights[n] = w
        raise
    for layer, n in todo:
        layer.merge(n)


def unfuse_community_loras(model: nn.Module) -> None:
    """Take every fused community LoRA out of the base weights again (it keeps running unfused)."""
    for _, layer, n in _community_layers(model):
        if n in layer.merged:
            layer.unmerge(n)


def unload_community_loras(model: nn.Module) -> list[str]:
    """Remove every community LoRA; a fused one stays in the base weights, as stock. The full weights LoRA
    files wrote (a Control LoRA's norms) get their originals back, as stock's ``unload_lora_weights`` does
    for the norms (other full weights it leaves overwritten). Returns the names."""
    names = community_loras(model)
    for module_name, layer, n in _community_layers(model):
        # A fused LoRA's update is already in base_layer.weight: forget the merge record, keep the weight
        # (stock's fuse_lora + unload_lora_weights bakes a LoRA into the model this way).
        layer.delete_adapter(n, keep_merged=True)
        if not layer.adapters:
            _set_submodule(model, module_name, layer.base_layer)
    originals = model.__dict__.pop(_OVERWRITTEN, {})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)
    return names


def community_weights(model: nn.Module) -> dict[str, float]:
    """{name: set_adapters weight} of each community LoRA (the same in every layer it targets)."""
    return {n: layer.adapter_weights[n] for _, layer, n in _community_layers(model)}


def set_community_weights(model: nn.Module, weights: dict[str, float]) -> None:
    """Write the set_adapters weight of community LoRAs ``weights`` (name -> weight) in every layer."""
    for _, layer, n in _community_layers(model, list(weights)):
        layer.adapter_weights[n] = float(weights[n])


@contextlib.contextmanager
def community_lora_scale(model: nn.Module, scale: float = 1.0) -> Iterator[None]:
    """Multiply the active, unfused community LoRAs by ``scale`` inside the block (stock's
    ``joint_attention_kwargs={"scale": s}``; a fused LoRA is in the base weights and keeps its strength)."""
    _check_scale(scale)
    saved = [(layer, n, layer.adapter_weights[n]) for _, layer, n in _community_layers(model)
             if n in layer.active_adapters and n not in layer.merged] if scale != 1.0 else []
    for layer, n, w in saved:
        layer.adapter_weights[n] = w * scale
    try:
        yield
    finally:
        for layer, n, w in saved:
            layer.adapter_weights[n] = w
